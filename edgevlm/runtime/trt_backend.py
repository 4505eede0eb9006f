"""Run a bundle's TensorRT engines (built on the device by ``edgevlm build-engine``): vision + decoder with the KV
cache on the GPU. No torch, no onnx; ``tensorrt`` and ``cuda-python`` are imported inside the functions that need
them (``MissingDependency`` naming ``pip install 'edgevlm[tensorrt]'`` otherwise).

    >>> from edgevlm.bundle import read_bundle
    >>> from edgevlm.runtime.trt_backend import TrtBackend
    >>> be = TrtBackend.from_bundle(read_bundle("out/bundle-orin"))       # engines from manifest["tensorrt"]["engines"]
    >>> image_embeds = be.vision(pixel_values)                            # [1, 3, S, S] -> [1, V, D] (host copy)
    >>> logits = be.decoder.prefill(embeds)                               # [1, T, D] -> [vocab] (pinned host view)
    >>> logits = be.decoder.decode(embed_row, position=T)                 # [D] -> [vocab]
    >>> be.close()

Pieces:

* ``DeviceBuffer`` / ``PinnedBuffer``: ``cudaMalloc`` / ``cudaMallocHost`` bytes; host<->device copies with
  ``cudaMemcpyAsync`` on the runner's stream.
* ``TrtEngine``: a deserialized engine (``trt.Runtime``), one ``IExecutionContext``, its I/O table
  (``io_table``: name, input/output, dtype, shape from ``num_io_tensors`` / ``get_tensor_name`` /
  ``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_shape``) and its optimization profiles
  (``profile_table``, via ``get_tensor_profile_shape``); ``run`` selects the profile that accepts the shapes
  (``select_profile``: the planned ``prefill`` profile for prompts, ``decode`` for one token after a past),
  switches with ``set_optimization_profile_async`` only when it changes, then ``set_input_shape``,
  ``set_tensor_address`` and ``execute_async_v3(stream)``.
* ``TrtVisionRunner``: ``pixel_values -> image_embeds`` on the vision engine (buffers for the profile's max batch).
* ``TrtDecoderRunner``: every device buffer is allocated once, for the whole run: ``inputs_embeds`` (longest
  prompt), ``attention_mask`` (ones, max context; each step binds its ``[1, past + seq]`` prefix), ``position_ids``,
  ``logits [1, 1, vocab]`` (+ a pinned host copy the sampler reads in place), and the **KV cache on the device**:
  two max-context buffers per past tensor (layer x key/value), used ping-pong (``KVPingPong``): step t binds
  ``past`` = buffer A viewed as ``[1, H, past, hd]`` and ``present`` = buffer B viewed as ``[1, H, past + seq, hd]``
  (the Optimum graph writes ``concat(past, new)`` into it); step t + 1 swaps A and B. No KV byte crosses to the
  host and nothing is allocated per token; per step only the new embedding rows / positions go up and one logits
  row comes down.

Lifetimes: the runners, engines and ``TrtBackend`` are context managers; a constructor that fails half-way (out of
device memory) frees what it had allocated, ``from_bundle`` closes what it had loaded and destroys its stream, and
``close()`` frees every buffer even when one free fails (the first failure is raised afterwards). A DLA engine is
deserialized with ``IRuntime.DLA_core`` set to the core recorded at build time; engines must match the installed
TensorRT release (major.minor.patch) and GPU architecture (``check_engine_entry``).

Unverified here (no GPU / TensorRT on the machines this was written on): the real-engine path, in particular the
zero-length past of the prefill profile (TensorRT supports empty tensors; reference §4.3/§8). ``tests/
test_trt_backend.py`` checks the bookkeeping with fake engines and a fake ``cudart`` whose "device" is host memory;
its ``tensorrt``-marked tests run the real thing on a device.
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.errors import BundleError, MissingDependency, PromptError, RuntimeBackendError

log = logging.getLogger(__name__)

__all__ = ["import_tensorrt", "import_cudart", "tensorrt_available", "DeviceBuffer", "PinnedBuffer", "TensorInfo",
           "ProfileRange", "io_table", "profile_table", "select_profile", "TrtEngine", "KVPingPong", "KVStep",
           "TrtVisionRunner", "TrtDecoderRunner", "TrtBackend", "engine_entries", "check_engine_entry",
           "PROVIDER_NAME", "WHERE_TO_RUN", "free_all", "DLA_MIN_TRT11"]

#: The ``providers`` name that selects this backend in ``Session`` (not an ONNX Runtime execution provider).
PROVIDER_NAME = "tensorrt-engine"
WHERE_TO_RUN = ("TensorRT engines run on the device they were built on (a Jetson or an NVIDIA GPU with TensorRT "
                "installed; JetPack ships it): build them there with `edgevlm build-engine BUNDLE`")

# TensorRT DataType names -> numpy dtypes (BF16 / FP8 / INT4 / FP4 I/O have no numpy dtype: rejected at binding).
_TRT_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
           "BOOL": np.bool_, "UINT8": np.uint8, "DOUBLE": np.float64}


# ---- imports ------------------------------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    """``import tensorrt`` or ``MissingDependency`` (extra ``tensorrt``) saying where engines run."""
    try:
        import tensorrt as trt
    except ImportError as exc:                  # also: bindings present but libnvinfer missing (reference §4.8)
        err = MissingDependency("tensorrt", "tensorrt", "Running TensorRT engines")
        text = f"{err.args[0]}. {WHERE_TO_RUN}. ({exc})"
        err.args, err.msg = (text,), text       # ImportError.__str__ prints .msg
        raise err from None
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older
    ``cuda.cudart``; ``MissingDependency`` (extra ``tensorrt``) when neither imports."""
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef]
        return cudart
    except ImportError as exc:
        err = MissingDependency("cuda-python", "tensorrt", "Moving data to and from TensorRT engines")
        text = f"{err.args[0]} (or: pip install cuda-python). ({exc})"
        err.args, err.msg = (text,), text
        raise err from None


def tensorrt_available() -> tuple[bool, str]:
    """(True, "TensorRT x.y on <GPU>") when engines can run here, else (False, why)."""
    try:
        trt = import_tensorrt()
    except MissingDependency:
        return False, "tensorrt is not installed"
    try:
        cudart = import_cudart()
    except MissingDependency:
        return False, "cuda-python is not installed"
    try:
        name, cc = device_properties(cudart)
    except RuntimeBackendError as exc:
        return False, f"no usable CUDA device ({exc})"
    return True, f"TensorRT {trt.__version__} on {name} (SM {cc})"


# ---- CUDA helpers -------------------------------------------------------------------------------------------------
def _ok(cudart: Any, err: Any) -> bool:
    success = getattr(getattr(cudart, "cudaError_t", None), "cudaSuccess", 0)
    return err == success or (isinstance(err, int) and int(err) == 0)


def _check(cudart: Any, result: Any, what: str) -> Any:
    """cuda-python calls return ``(err, *values)``; raise on an error, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if not _ok(cudart, err):
        name = str(err)
        try:
            name = cudart.cudaGetErrorString(err)[1].decode(errors="replace")
        except Exception:  # noqa: BLE001 - best effort: keep the enum text when the lookup fails too
            pass
        raise RuntimeBackendError(f"CUDA {what} failed: {name} ({err})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _memcpy_kind(cudart: Any, name: str) -> Any:
    return getattr(cudart.cudaMemcpyKind, name)


def _stream_int(stream: Any) -> int:
    """TensorRT takes the stream handle as an int (``cudaStream_t`` converts with ``int()``)."""
    return int(stream) if stream is not None else 0


def device_properties(cudart: Any, device: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``device``."""
    prop = _check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}.{prop.minor}"


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``), freed by ``free()`` (or the owner's ``close()``).

    Copies are asynchronous on ``stream``; the caller synchronizes the stream before reading a host destination
    or reusing a pageable host source.
    """

    def __init__(self, nbytes: int, *, cudart: Any, name: str = "") -> None:
        self.cudart, self.name = cudart, name
        self.nbytes = int(nbytes)
        self.ptr: int = int(_check(cudart, cudart.cudaMalloc(max(1, self.nbytes)), f"cudaMalloc({name})"))

    def _fits(self, nbytes: int, offset: int, what: str) -> None:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise RuntimeBackendError(f"{what} of {nbytes} bytes at offset {offset} overflows device buffer "
                                      f"'{self.name}' ({self.nbytes} bytes)")

    def copy_from_host(self, array: np.ndarray, stream: Any, offset: int = 0) -> None:
        """Host -> device (``array`` must be C-contiguous)."""
        if not array.flags.c_contiguous:
            raise RuntimeBackendError(f"host source for '{self.name}' is not C-contiguous")
        self._fits(array.nbytes, offset, "host->device copy")
        if array.nbytes:
            _check(self.cudart, self.cudart.cudaMemcpyAsync(
                self.ptr + offset, array.ctypes.data, array.nbytes,
                _memcpy_kind(self.cudart, "cudaMemcpyHostToDevice"), stream), f"cudaMemcpyAsync(H2D {self.name})")

    def copy_to_host(self, out: np.ndarray, stream: Any, offset: int = 0) -> None:
        """Device -> host into ``out`` (C-contiguous; pinned for a truly asynchronous copy)."""
        if not out.flags.c_contiguous:
            raise RuntimeBackendError(f"host destination for '{self.name}' is not C-contiguous")
        self._fits(out.nbytes, offset, "device->host copy")
        if out.nbytes:
            _check(self.cudart, self.cudart.cudaMemcpyAsync(
                out.ctypes.data, self.ptr + offset, out.nbytes,
                _memcpy_kind(self.cudart, "cudaMemcpyDeviceToHost"), stream), f"cudaMemcpyAsync(D2H {self.name})")

    def free(self) -> None:
        """Hand the memory back (once: the pointer is forgotten even when ``cudaFree`` reports an error)."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            _check(self.cudart, self.cudart.cudaFree(ptr), f"cudaFree({self.name})")

    def __repr__(self) -> str:
        return f"DeviceBuffer('{self.name}', {self.nbytes} B, ptr=0x{self.ptr:x})"


class PinnedBuffer:
    """``nbytes`` of page-locked host memory (``cudaMallocHost``) with numpy views (``array``)."""

    def __init__(self, nbytes: int, *, cudart: Any, name: str = "") -> None:
        self.cudart, self.name = cudart, name
        self.nbytes = int(nbytes)
        self.ptr: int = int(_check(cudart, cudart.cudaMallocHost(max(1, self.nbytes)), f"cudaMallocHost({name})"))
        self._raw = (ctypes.c_uint8 * max(1, self.nbytes)).from_address(self.ptr)

    def array(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A writable numpy view ``[shape] dtype`` at the start of the buffer."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dt.itemsize > self.nbytes:
            raise RuntimeBackendError(f"view {tuple(shape)} {dt} overflows pinned buffer '{self.name}' "
                                      f"({self.nbytes} bytes)")
        return np.frombuffer(self._raw, dtype=dt, count=count).reshape(tuple(shape))

    def free(self) -> None:
        if self.ptr:
            self._raw = None
            ptr, self.ptr = self.ptr, 0
            _check(self.cudart, self.cudart.cudaFreeHost(ptr), f"cudaFreeHost({self.name})")


def free_all(buffers: Sequence[Any], what: str) -> None:
    """Free every buffer (``DeviceBuffer`` / ``PinnedBuffer`` / None) even when one ``free()`` fails; then raise the
    first failure (naming how many failed), so one bad pointer never leaks the rest."""
    errors: list[BaseException] = []
    for b in buffers:
        if b is None:
            continue
        try:
            b.free()
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below, after freeing the others
            errors.append(exc)
    if errors:
        raise RuntimeBackendError(f"{what}: {len(errors)} of {sum(b is not None for b in buffers)} buffer(s) could "
                                  f"not be freed; first error: {errors[0]}") from errors[0]


class _Closing:
    """``with X(...) as x:`` closes ``x`` on exit (runners, engines and the backend hold device memory)."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- engine tables --------------------------------------------------------------------------------------------------
def _enum_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name if isinstance(name, str) else value).rsplit(".", 1)[-1].upper()


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor. ``shape`` has -1 for dynamic dims; ``dtype`` is None when numpy has no equivalent."""

    name: str
    is_input: bool
    trt_dtype: str
    dtype: np.dtype | None
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        if self.dtype is None:
            raise RuntimeBackendError(f"engine tensor '{self.name}' has TensorRT dtype {self.trt_dtype}, which the "
                                      f"runtime cannot bind (supported: {', '.join(_TRT_NP)}); export the graph "
                                      f"with float32/float16 I/O (keep_io_types)")
        return self.dtype.itemsize


def io_table(engine: Any) -> dict[str, TensorInfo]:
    """The engine's I/O tensors in engine order (TensorRT 10 name-based API)."""
    out: dict[str, TensorInfo] = {}
    for i in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(i)
        mode = _enum_name(engine.get_tensor_mode(name))
        if mode not in ("INPUT", "OUTPUT"):
            continue
        tdt = _enum_name(engine.get_tensor_dtype(name))
        np_dt = _TRT_NP.get(tdt)
        out[name] = TensorInfo(name, mode == "INPUT", tdt, None if np_dt is None else np.dtype(np_dt),
                               tuple(int(d) for d in engine.get_tensor_shape(name)))
    return out


@dataclass(frozen=True)
class ProfileRange:
    """One optimization profile: ``{input: (min, opt, max)}`` for the engine's inputs."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def fits(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        for name, shape in shapes.items():
            rng = self.shapes.get(name)
            if rng is None:
                continue
            lo, _, hi = rng
            if len(shape) != len(lo) or any(not (a <= int(s) <= b) for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in self.shapes.items())


def profile_table(engine: Any, inputs: Sequence[str], names: Sequence[str] | None = None) -> list[ProfileRange]:
    """Every optimization profile of ``engine`` (``get_tensor_profile_shape(name, i)`` -> [min, opt, max]) for
    ``inputs``; ``names`` (the plan's profile names, in build order) label them, else ``profile{i}``."""
    out = []
    count = int(getattr(engine, "num_optimization_profiles", 1))
    for i in range(count):
        shapes = {}
        for name in inputs:
            lo, opt, hi = engine.get_tensor_profile_shape(name, i)
            shapes[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
        label = names[i] if names is not None and i < len(names) else f"profile{i}"
        out.append(ProfileRange(label, shapes))
    return out


def select_profile(profiles: Sequence[ProfileRange], shapes: Mapping[str, Sequence[int]],
                   prefer: str | None = None, *, engine: str = "engine") -> int:
    """Index of the profile that accepts ``shapes``: the one named ``prefer`` when it fits, else the first that
    fits. ``RuntimeBackendError`` listing every profile's ranges when none does."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(shapes)]
    if not fitting:
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise RuntimeBackendError(f"no optimization profile of {engine} accepts the shapes {got}; profiles: "
                                  + "; ".join(p.describe() for p in profiles)
                                  + ". The request is longer than the engine was planned for: re-export with a "
                                    "larger context / prompt budget and rebuild the engines")
    if prefer is not None:
        for i in fitting:
            if profiles[i].name == prefer:
                return i
    return fitting[0]


# ---- engine ---------------------------------------------------------------------------------------------------------
class TrtEngine(_Closing):
    """A TensorRT engine with one execution context. Create with ``TrtEngine.load(path)`` (or pass deserialized
    ``engine`` objects directly, which is what the tests do with fakes)."""

    def __init__(self, engine: Any, *, name: str = "engine", profile_names: Sequence[str] | None = None,
                 context: Any = None, keep: Sequence[Any] = ()) -> None:
        self.name = name
        self.engine = engine
        self.context = context if context is not None else engine.create_execution_context()
        if self.context is None:
            raise RuntimeBackendError(f"TensorRT could not create an execution context for {name} (out of device "
                                      f"memory?): close other GPU programs or rebuild with a smaller context")
        self._keep = list(keep)                 # runtime / logger must outlive the engine
        self.io = io_table(engine)
        self.inputs = [n for n, t in self.io.items() if t.is_input]
        self.outputs = [n for n, t in self.io.items() if not t.is_input]
        self.profiles = profile_table(engine, self.inputs, profile_names)
        self.active_profile: int | None = None
        self.profile_switches = 0

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None, profile_names: Sequence[str] | None = None,
             trt: Any = None, verbose: bool = False, dla_core: int | None = None) -> "TrtEngine":
        """Deserialize an engine file with ``trt.Runtime``. ``dla_core``: the DLA core the engine was built for
        (``IRuntime.DLA_core`` must be set to it before deserializing a DLA engine; the manifest records it)."""
        trt = trt or import_tensorrt()
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"engine file {path} not found: build it with `edgevlm build-engine`")
        logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        try:
            runtime = trt.Runtime(logger)
        except TypeError as exc:                # "factory function returned nullptr": no CUDA device/driver
            raise RuntimeBackendError(f"TensorRT cannot initialize CUDA here (no usable NVIDIA GPU/driver). "
                                      f"{WHERE_TO_RUN}. ({exc})") from None
        if dla_core is not None:
            runtime.DLA_core = int(dla_core)            # the core chosen at build time (trt_build: config.DLA_core)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeBackendError(f"TensorRT {trt.__version__} cannot deserialize {path}: it was built with "
                                      f"another TensorRT version or for another GPU (see the log above). Rebuild "
                                      f"it on this device with `edgevlm build-engine`")
        return cls(engine, name=name or path.stem, profile_names=profile_names, keep=(runtime, logger))

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.io:
            raise BundleError(f"engine {self.name} has no tensor '{name}' (it has: {', '.join(self.io)}); the engine "
                              f"does not match the manifest: rebuild it with `edgevlm build-engine`")
        return self.io[name]

    def select_profile(self, shapes: Mapping[str, Sequence[int]], prefer: str | None = None) -> int:
        return select_profile(self.profiles, shapes, prefer, engine=self.name)

    def set_profile(self, index: int, stream: Any) -> None:
        """Switch the context's optimization profile (enqueued on ``stream``) when it changes."""
        if self.active_profile == index:
            return
        if len(self.profiles) > 1 or index != 0:
            ok = self.context.set_optimization_profile_async(index, _stream_int(stream))
            if ok is False:
                raise RuntimeBackendError(f"{self.name}: set_optimization_profile_async({index}) failed")
            self.profile_switches += 1
        self.active_profile = index

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        if self.context.set_input_shape(name, tuple(int(d) for d in shape)) is False:
            prof = self.profiles[self.active_profile or 0].describe() if self.profiles else "?"
            raise RuntimeBackendError(f"{self.name}: TensorRT rejected shape {list(shape)} for '{name}' (profile "
                                      f"{prof})")

    def set_address(self, name: str, ptr: int) -> None:
        if self.context.set_tensor_address(name, int(ptr)) is False:
            raise RuntimeBackendError(f"{self.name}: set_tensor_address('{name}') failed")

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def run(self, shapes: Mapping[str, Sequence[int]], addresses: Mapping[str, int], stream: Any,
            prefer: str | None = None) -> int:
        """Select + switch the profile, set the input shapes and every tensor address, enqueue the engine.
        Returns the profile index used."""
        missing = [n for n in self.inputs if n not in shapes] + [n for n in self.io if n not in addresses]
        if missing:
            raise RuntimeBackendError(f"{self.name}: no shape/address for {', '.join(sorted(set(missing)))}")
        index = self.select_profile(shapes, prefer)
        self.set_profile(index, stream)
        for name in self.inputs:
            self.set_input_shape(name, shapes[name])
        for name, ptr in addresses.items():
            self.set_address(name, ptr)
        if self.context.execute_async_v3(_stream_int(stream)) is False:
            raise RuntimeBackendError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        return index

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._keep = []


# ---- KV ping-pong ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVStep:
    """One decoder step's KV plan: read ``past`` tokens from buffer ``past_buffer``, write ``total`` tokens
    (past + seq) into ``present_buffer``."""

    past: int
    seq: int
    total: int
    past_buffer: int
    present_buffer: int


class KVPingPong:
    """Which of the two KV buffers (per tensor) holds the past, and how long it is. Pure bookkeeping."""

    def __init__(self, max_context: int) -> None:
        if max_context < 1:
            raise RuntimeBackendError(f"max_context must be >= 1, got {max_context}")
        self.max_context = int(max_context)
        self.length = 0
        self.current = 0                # buffer holding the valid past

    def reset(self) -> None:
        self.length, self.current = 0, 0

    def plan(self, seq: int) -> KVStep:
        if seq < 1:
            raise RuntimeBackendError(f"a decoder step needs at least one token, got {seq}")
        total = self.length + int(seq)
        if total > self.max_context:
            raise PromptError(f"the KV cache holds at most {self.max_context} tokens (the engines' context); "
                              f"{self.length} cached + {seq} new = {total}: shorten the prompt or lower "
                              f"max_new_tokens (or re-export with a larger context and rebuild the engines)")
        return KVStep(self.length, int(seq), total, self.current, 1 - self.current)

    def commit(self, step: KVStep) -> None:
        if step.past != self.length or step.past_buffer != self.current:
            raise RuntimeBackendError("KV step committed out of order (planned for another cache state)")
        self.length, self.current = step.total, step.present_buffer


# ---- runners --------------------------------------------------------------------------------------------------------
def _volume(shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in shape))


class TrtVisionRunner(_Closing):
    """``pixel_values [B, 3, S, S] -> image_embeds [B, V, D]`` on the vision engine (buffers for the profile's max
    batch, allocated once)."""

    def __init__(self, engine: TrtEngine, *, input_name: str, output_name: str, stream: Any, cudart: Any) -> None:
        self.engine, self.stream, self.cudart = engine, stream, cudart
        self.input_name, self.output_name = input_name, output_name
        tin, tout = engine.tensor(input_name), engine.tensor(output_name)
        self._in_dtype, self._out_dtype = tin.dtype, tout.dtype
        max_in = max((p.shapes[input_name][2] for p in engine.profiles), key=_volume, default=tin.shape)
        if any(d < 0 for d in max_in):
            raise BundleError(f"{engine.name}: input '{input_name}' has no profile range")
        self.max_batch = int(max_in[0])
        out_shape = tuple(self.max_batch if (i == 0 and d < 0) else d for i, d in enumerate(tout.shape))
        if any(d < 0 for d in out_shape):
            raise BundleError(f"{engine.name}: output '{output_name}' {list(tout.shape)} has dynamic dims besides "
                              f"the batch; the runtime expects [batch, visual tokens, hidden]")
        self._out_row = out_shape[1:]
        self.d_in = self.d_out = self.h_in = self.h_out = None
        try:                                    # a failed allocation frees the ones before it
            self.d_in = DeviceBuffer(_volume(max_in) * tin.itemsize, cudart=cudart,
                                     name=f"{engine.name}.{input_name}")
            self.d_out = DeviceBuffer(_volume(out_shape) * tout.itemsize, cudart=cudart,
                                      name=f"{engine.name}.{output_name}")
            self.h_in = PinnedBuffer(self.d_in.nbytes, cudart=cudart, name=f"{engine.name}.{input_name}.host")
            self.h_out = PinnedBuffer(self.d_out.nbytes, cudart=cudart, name=f"{engine.name}.{output_name}.host")
        except BaseException:
            self._free_quietly()
            raise

    @property
    def device_bytes(self) -> int:
        return self.d_in.nbytes + self.d_out.nbytes

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        """Run the engine; returns a new float32 array ``[B, V, D]``."""
        x = np.asarray(pixel_values)
        b = int(x.shape[0])
        if b > self.max_batch:
            raise RuntimeBackendError(f"{self.engine.name}: batch {b} > the engine's max batch {self.max_batch}")
        staged = self.h_in.array(x.shape, self._in_dtype)
        np.copyto(staged, x, casting="same_kind")
        self.d_in.copy_from_host(staged, self.stream)
        self.engine.run({self.input_name: x.shape},
                        {self.input_name: self.d_in.ptr, self.output_name: self.d_out.ptr}, self.stream)
        out_shape = self.engine.output_shape(self.output_name)
        if tuple(out_shape) != (b, *self._out_row):
            raise RuntimeBackendError(f"{self.engine.name}: output shape {list(out_shape)}, expected "
                                      f"{[b, *self._out_row]}")
        host = self.h_out.array(out_shape, self._out_dtype)
        self.d_out.copy_to_host(host, self.stream)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(host, dtype=np.float32)

    def _free_quietly(self) -> None:
        try:
            self.close()
        except RuntimeBackendError as exc:       # the allocation error is the one to report
            log.warning("%s", exc)

    def close(self) -> None:
        """Free every buffer (all of them, even if one free fails; idempotent)."""
        free_all([self.d_in, self.d_out, self.h_in, self.h_out], f"{self.engine.name} vision buffers")


class TrtDecoderRunner(_Closing):
    """The decoder engine with every buffer preallocated and the KV cache on the device (ping-pong, see the
    module docstring). Same step interface as the ORT path of ``Session``:

    * ``reset()``: forget the context (a new request);
    * ``prefill(embeds [1, T, D], positions [1, T] | None) -> logits [vocab]`` (starts a new sequence);
    * ``extend(embeds, positions)``: like prefill but after the cached context (chunked prompts; needs a prefill
      profile with past > 0);
    * ``decode(embed [D] | [1, 1, D], position | None) -> logits [vocab]``.

    The returned logits row is a view of pinned host memory, overwritten by the next step (copy it to keep it).

    Args:
        engine: the decoder ``TrtEngine``.
        kv: the manifest's ``KVSpec`` (names, heads, head_dim, layout; the dtype comes from the engine).
        stream: a CUDA stream (``cudaStreamCreate``).
        cudart: the cuda-python runtime module (``import_cudart()``).
        max_context: KV tokens to allocate (default: the largest ``attention_mask`` length the profiles accept).
        max_prompt: longest prefill (default: the largest ``inputs_embeds`` length the profiles accept).
        logits_name: the logits output (default: the one output that is not a present).
    """

    def __init__(self, engine: TrtEngine, kv: Any, *, stream: Any, cudart: Any, max_context: int | None = None,
                 max_prompt: int | None = None, logits_name: str | None = None, embeds_name: str = "inputs_embeds",
                 mask_name: str = "attention_mask", positions_name: str | None = "position_ids") -> None:
        self.engine, self.kv_spec, self.stream, self.cudart = engine, kv, stream, cudart
        self.past_names, self.present_names = kv.past_names(), kv.present_names()
        for n in (embeds_name, mask_name, *self.past_names):
            if not engine.tensor(n).is_input:
                raise BundleError(f"{engine.name}: '{n}' is not an input of the engine")
        for n in self.present_names:
            if engine.tensor(n).is_input:
                raise BundleError(f"{engine.name}: '{n}' is not an output of the engine")
        if positions_name is not None and positions_name not in engine.io:
            positions_name = None                              # graphs that derive positions themselves
        others = [n for n in engine.outputs if n not in set(self.present_names)]
        if logits_name is None:
            if len(others) != 1:
                raise BundleError(f"{engine.name}: expected one logits output besides the presents, got {others}")
            logits_name = others[0]
        self.embeds_name, self.mask_name, self.positions_name, self.logits_name = (embeds_name, mask_name,
                                                                                   positions_name, logits_name)
        t_emb, t_mask, t_logits = engine.tensor(embeds_name), engine.tensor(mask_name), engine.tensor(logits_name)
        self.hidden_size = int(t_emb.shape[-1])
        self.vocab_size = int(t_logits.shape[-1])
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise BundleError(f"{engine.name}: hidden size / vocab must be static dims "
                              f"({list(t_emb.shape)}, {list(t_logits.shape)})")
        # logits [1, 1, vocab] (last position only) or [1, seq, vocab]
        self.logits_last_only = len(t_logits.shape) == 3 and t_logits.shape[1] == 1

        prof_max = lambda name, axis: max((p.shapes[name][2][axis] for p in engine.profiles  # noqa: E731
                                           if name in p.shapes), default=0)
        self.max_prompt = int(max_prompt or prof_max(embeds_name, 1))
        self.max_context = int(max_context or prof_max(mask_name, 1))
        if self.max_prompt < 1 or self.max_context < 1:
            raise BundleError(f"{engine.name}: cannot tell the prompt / context limits from the profiles; pass "
                              f"max_prompt / max_context")
        self.max_prompt = min(self.max_prompt, self.max_context)
        self.kv = KVPingPong(self.max_context)

        d, p = self.hidden_size, self.max_prompt
        self._emb_dtype, self._mask_dtype, self._logits_dtype = t_emb.dtype, t_mask.dtype, t_logits.dtype
        t_kv = engine.tensor(self.past_names[0])
        self._kv_itemsize = t_kv.itemsize
        self.d_embeds = self.d_mask = self.d_logits = self.d_positions = None
        self.h_embeds = self.h_positions = self.h_logits = None
        self.d_kv: list[list[DeviceBuffer]] = []
        try:                                    # a failed allocation frees the ones before it
            self._allocate(engine, cudart, stream, t_emb, t_mask, t_logits, d, p)
        except BaseException:
            try:
                self.close()
            except RuntimeBackendError as exc:   # the allocation error is the one to report
                log.warning("%s", exc)
            raise
        self.steps = 0
        self.last_profile: int | None = None

    def _allocate(self, engine: TrtEngine, cudart: Any, stream: Any, t_emb: TensorInfo, t_mask: TensorInfo,
                  t_logits: TensorInfo, d: int, p: int) -> None:
        """Every device / pinned buffer of the run, once (see the class docstring)."""
        kv = self.kv_spec
        embeds_name, mask_name, logits_name = self.embeds_name, self.mask_name, self.logits_name
        positions_name = self.positions_name
        mk = lambda n, name: DeviceBuffer(n, cudart=cudart, name=f"{engine.name}.{name}")  # noqa: E731
        self.d_embeds = mk(p * d * t_emb.itemsize, embeds_name)
        self.d_mask = mk(self.max_context * t_mask.itemsize, mask_name)
        rows = 1 if self.logits_last_only else p
        self.d_logits = mk(rows * self.vocab_size * t_logits.itemsize, logits_name)
        self.d_positions = None
        if positions_name is not None:
            t_pos = engine.tensor(positions_name)
            self._pos_dtype = t_pos.dtype
            self.d_positions = mk(p * t_pos.itemsize, positions_name)
        kv_bytes = _volume(kv.shape(self.max_context)) * self._kv_itemsize
        # [tensor j][buffer 0/1]; tensor j = past key 0, past value 0, past key 1, ...
        for j in range(len(self.past_names)):
            self.d_kv.append([])
            for ab in "AB":
                self.d_kv[j].append(mk(kv_bytes, f"kv{j}.{ab}"))

        self.h_embeds = PinnedBuffer(p * d * t_emb.itemsize, cudart=cudart, name="embeds.host")
        self.h_positions = PinnedBuffer(p * 8, cudart=cudart, name="positions.host")
        self.h_logits = PinnedBuffer(self.vocab_size * t_logits.itemsize, cudart=cudart, name="logits.host")
        self.logits = self.h_logits.array((self.vocab_size,), self._logits_dtype)
        ones = np.ones(self.max_context, dtype=self._mask_dtype)
        self.d_mask.copy_from_host(ones, stream)             # the mask is all ones: uploaded once, prefixes bound
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    # -- state
    @property
    def length(self) -> int:
        """Tokens in the KV cache."""
        return self.kv.length

    @property
    def device_bytes(self) -> int:
        """Device memory held by this runner (the KV cache is most of it)."""
        bufs = [self.d_embeds, self.d_mask, self.d_logits, *(b for pair in self.d_kv for b in pair)]
        if self.d_positions is not None:
            bufs.append(self.d_positions)
        return sum(b.nbytes for b in bufs)

    def reset(self) -> None:
        self.kv.reset()

    # -- steps
    def prefill(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """A new sequence: ``embeds [1, T, D]`` (or ``[T, D]``) -> last-position logits ``[vocab]``."""
        self.reset()
        return self.extend(embeds, positions)

    def extend(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """``T`` more tokens after the cached context -> last-position logits ``[vocab]``."""
        e = np.asarray(embeds)
        if e.ndim == 3:
            if e.shape[0] != 1:
                raise RuntimeBackendError(f"the TensorRT decoder runs batch 1, got embeds {list(e.shape)}")
            e = e[0]
        if e.ndim != 2 or e.shape[1] != self.hidden_size:
            raise RuntimeBackendError(f"embeds must be [1, T, {self.hidden_size}], got {list(np.shape(embeds))}")
        t = int(e.shape[0])
        if t > self.max_prompt:
            raise PromptError(f"a prompt of {t} tokens is longer than the engine's prefill profile "
                              f"({self.max_prompt}): shorten it or re-export with a larger prompt budget")
        staged = self.h_embeds.array((t, self.hidden_size), self._emb_dtype)
        np.copyto(staged, e, casting="same_kind")
        pos = None
        if self.d_positions is not None:
            pos = self.h_positions.array((t,), self._pos_dtype)
            if positions is None:
                pos[...] = np.arange(self.length, self.length + t)
            else:
                np.copyto(pos, np.asarray(positions).reshape(-1), casting="same_kind")
        return self._step(t, staged, pos)

    def decode(self, embed: np.ndarray, position: int | None = None) -> np.ndarray:
        """One token (``embed [D]`` / ``[1, 1, D]``) at ``position`` (default: the cache length) -> logits."""
        e = np.asarray(embed).reshape(-1)
        if e.shape[0] != self.hidden_size:
            raise RuntimeBackendError(f"embed must have {self.hidden_size} values, got {e.shape[0]}")
        staged = self.h_embeds.array((1, self.hidden_size), self._emb_dtype)
        np.copyto(staged[0], e, casting="same_kind")
        pos = None
        if self.d_positions is not None:
            pos = self.h_positions.array((1,), self._pos_dtype)
            pos[0] = self.length if position is None else int(position)
        return self._step(1, staged, pos)

    def step_shapes(self, step: KVStep) -> dict[str, tuple[int, ...]]:
        """Input shapes of one step (batch 1)."""
        shapes: dict[str, tuple[int, ...]] = {self.embeds_name: (1, step.seq, self.hidden_size),
                                              self.mask_name: (1, step.total)}
        if self.positions_name is not None:
            shapes[self.positions_name] = (1, step.seq)
        past_shape = tuple(self.kv_spec.shape(step.past))
        for n in self.past_names:
            shapes[n] = past_shape
        return shapes

    def step_addresses(self, step: KVStep) -> dict[str, int]:
        """Tensor addresses of one step: past = buffer ``step.past_buffer``, present = the other one."""
        addr = {self.embeds_name: self.d_embeds.ptr, self.mask_name: self.d_mask.ptr,
                self.logits_name: self.d_logits.ptr}
        if self.positions_name is not None and self.d_positions is not None:
            addr[self.positions_name] = self.d_positions.ptr
        for j, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            addr[past] = self.d_kv[j][step.past_buffer].ptr
            addr[present] = self.d_kv[j][step.present_buffer].ptr
        return addr

    def _step(self, seq: int, embeds: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        step = self.kv.plan(seq)
        self.d_embeds.copy_from_host(embeds, self.stream)
        if positions is not None and self.d_positions is not None:
            self.d_positions.copy_from_host(positions, self.stream)
        phase = "decode" if seq == 1 and step.past > 0 else "prefill"
        self.last_profile = self.engine.run(self.step_shapes(step), self.step_addresses(step), self.stream,
                                            prefer=phase)
        # the last position's logits row -> pinned host memory
        row = 0 if self.logits_last_only else seq - 1
        self.d_logits.copy_to_host(self.logits, self.stream, offset=row * self.logits.nbytes)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.kv.commit(step)
        self.steps += 1
        return self.logits

    def close(self) -> None:
        """Free every buffer (all of them, even if one free fails; idempotent)."""
        free_all([self.d_embeds, self.d_mask, self.d_logits, self.d_positions, self.h_embeds, self.h_positions,
                  self.h_logits, *(b for pair in self.d_kv for b in pair)], f"{self.engine.name} buffers")


# ---- bundle wiring --------------------------------------------------------------------------------------------------
def engine_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``manifest["tensorrt"]["engines"]`` (component -> metadata written by ``edgevlm build-engine``)."""
    trt_entry = manifest.get("tensorrt")
    engines = trt_entry.get("engines") if isinstance(trt_entry, Mapping) else None
    if not isinstance(engines, Mapping) or not engines:
        if not isinstance(trt_entry, Mapping):
            raise BundleError("this bundle was not exported for a TensorRT target (no 'tensorrt' entry in its "
                              "manifest): re-export it with --target jetson-orin (or another TensorRT target from "
                              "`edgevlm targets`), then build its engines on the device with `edgevlm build-engine`")
        raise BundleError(f"this bundle has no TensorRT engines yet: {WHERE_TO_RUN}")
    return {str(k): dict(v) for k, v in engines.items()}


def _release(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> (10, 3, 0): major.minor.patch (the build number is not part of engine compatibility)."""
    out = []
    for part in str(version).strip().lstrip("v").split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


#: DLA returned in TensorRT 11 with 11.4.1 (JetPack 7.2.2+ on AGX Orin); 11.0-11.4.0 have no DLA.
DLA_MIN_TRT11 = (11, 4, 1)


def check_engine_entry(component: str, entry: Mapping[str, Any], trt_version: str,
                       device: tuple[str, str] | None) -> None:
    """An engine only runs with the TensorRT release (major.minor.patch, as recorded at build time) that built it,
    on the same GPU architecture; a DLA engine on TensorRT 11 needs 11.4.1 or later."""
    built = str(entry.get("tensorrt", ""))
    have, want = _release(trt_version), _release(built)
    n = min(len(have), len(want))
    if built and n >= 2 and have[:n] != want[:n]:
        raise RuntimeBackendError(f"the {component} engine was built with TensorRT {built} but TensorRT {trt_version} "
                                  f"is installed: engines only run with the TensorRT that built them. Rebuild on "
                                  f"this device with `edgevlm build-engine BUNDLE`")
    if entry.get("dla_core") is not None and have and have[0] == 11 and have < DLA_MIN_TRT11:
        raise RuntimeBackendError(f"the {component} engine runs on DLA core {entry.get('dla_core')}, but TensorRT "
                                  f"{trt_version} has no DLA (TensorRT 11 brought DLA back in 11.4.1, JetPack "
                                  f"7.2.2+): upgrade TensorRT, or re-export without --dla and rebuild")
    cc = str(entry.get("compute_capability") or "")
    if device is not None and cc and device[1] and cc != device[1]:
        raise RuntimeBackendError(f"the {component} engine was built for SM {cc} ({entry.get('device', '?')}) but "
                                  f"this GPU is {device[0]} (SM {device[1]}). Rebuild on this device with "
                                  f"`edgevlm build-engine BUNDLE`")


class TrtBackend(_Closing):
    """The vision and decoder runners of a bundle on one CUDA stream. ``from_bundle`` picks the engines from
    ``manifest["tensorrt"]["engines"]`` (never from file names) and checks their TensorRT version and GPU."""

    def __init__(self, vision: TrtVisionRunner, decoder: TrtDecoderRunner, *, stream: Any, cudart: Any,
                 info: dict[str, Any] | None = None) -> None:
        self.vision, self.decoder, self.stream, self.cudart = vision, decoder, stream, cudart
        self.info = dict(info or {})

    @classmethod
    def from_bundle(cls, bundle: Any, *, context_length: int | None = None, verbose: bool = False,
                    device: int = 0) -> "TrtBackend":
        """Load ``bundle``'s engines (an ``edgevlm.bundle.Bundle``; its hashes were checked by ``read_bundle``)."""
        import time

        from edgevlm.runtime.kv_cache import KVSpec

        t0 = time.perf_counter()
        m = bundle.manifest
        entries = engine_entries(m)
        missing = [c for c in ("vision", "decoder") if c not in entries]
        if missing:
            raise BundleError(f"the bundle has no TensorRT engine for {', '.join(missing)}: build it on the device "
                              f"with `edgevlm build-engine BUNDLE --only {' '.join(missing)}`")
        trt = import_tensorrt()
        cudart = import_cudart()
        _check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        dev = device_properties(cudart, device)
        for comp in ("vision", "decoder"):
            check_engine_entry(comp, entries[comp], trt.__version__, dev)
        stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

        def load(comp: str) -> TrtEngine:
            e = entries[comp]
            names = [p.get("name") for p in e.get("profiles", []) if isinstance(p, Mapping)]
            core = e.get("dla_core")
            return TrtEngine.load(bundle.path(e["file"]), name=f"{comp} engine", profile_names=names or None,
                                  trt=trt, verbose=verbose, dla_core=None if core is None else int(core))

        held: list[Any] = []                   # closed in reverse if anything below fails (no leaked device memory)
        try:
            vcomp = bundle.component("vision")
            v_engine = load("vision")
            held.append(v_engine)
            vision = TrtVisionRunner(v_engine, input_name=vcomp["inputs"][0]["name"],
                                     output_name=vcomp["outputs"][0]["name"], stream=stream, cudart=cudart)
            held.append(vision)
            dcomp = bundle.component("decoder")
            kv = KVSpec.from_manifest(dcomp.get("kv_cache"))
            dec_engine = load("decoder")
            held.append(dec_engine)
            ctx = None
            if context_length is not None:
                ctx = min(int(context_length), max((p.shapes["attention_mask"][2][1] for p in dec_engine.profiles
                                                    if "attention_mask" in p.shapes), default=int(context_length)))
            decoder = TrtDecoderRunner(dec_engine, kv, stream=stream, cudart=cudart, max_context=ctx)
        except BaseException:
            for obj in reversed(held):
                try:
                    obj.close()
                except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                    log.warning("cleanup after a failed TensorRT load: %s", exc)
            _destroy_stream(cudart, stream, quiet=True)
            raise
        info = {"device": dev[0], "compute_capability": dev[1], "tensorrt": trt.__version__,
                "engines": {c: entries[c]["file"] for c in ("vision", "decoder")},
                "device_bytes": vision.device_bytes + decoder.device_bytes,
                "max_context": decoder.max_context, "max_prompt": decoder.max_prompt,
                "load_s": time.perf_counter() - t0}
        log.info("TensorRT backend: %s, %.1f MiB of device buffers, context %d", dev[0],
                 info["device_bytes"] / 2**20, decoder.max_context)
        return cls(vision, decoder, stream=stream, cudart=cudart, info=info)

    def close(self) -> None:
        """Free both runners' buffers, drop the engines and destroy the stream: every step runs even when one
        fails (the first failure is raised afterwards); calling it twice is harmless."""
        errors: list[BaseException] = []
        for step in (self.vision.close, self.decoder.close, self.vision.engine.close, self.decoder.engine.close):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                _destroy_stream(self.cudart, stream)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]


def _destroy_stream(cudart: Any, stream: Any, quiet: bool = False) -> None:
    try:
        _check(cudart, cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
    except RuntimeBackendError as exc:
        if not quiet:
            raise
        log.warning("%s", exc)
