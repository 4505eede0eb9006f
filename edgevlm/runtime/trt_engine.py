"""TensorRT engines as the runtime sees them: the I/O table (``io_table``: name, input/output, dtype, shape from
``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_shape``), the
optimization profiles (``profile_table`` via ``get_tensor_profile_shape``; ``select_profile``: the planned
``prefill`` profile for prompts, ``decode`` for one token after a past), ``TrtEngine`` (a deserialized engine + one
execution context; ``run`` switches profile only when it changes, sets input shapes and tensor addresses, and
enqueues ``execute_async_v3``), and ``KVPingPong`` (pure bookkeeping of which of two KV buffers holds the past).

    >>> from edgevlm.runtime.trt_engine import TrtEngine
    >>> eng = TrtEngine.load("bundle/engines/decoder.engine", profile_names=["prefill", "decode"])
    >>> eng.run({"inputs_embeds": (1, 5, D), ...}, {"inputs_embeds": ptr, ...}, stream, prefer="prefill")

No torch, no onnx; ``tensorrt`` is imported inside ``TrtEngine.load``. Re-exported by
``edgevlm.runtime.trt_backend``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.errors import BundleError, PromptError, RuntimeBackendError
from edgevlm.runtime.trt_cuda import WHERE_TO_RUN, _Closing, _stream_int, import_tensorrt

__all__ = ["TensorInfo", "ProfileRange", "io_table", "profile_table", "select_profile", "TrtEngine", "KVStep",
           "KVPingPong"]

# TensorRT DataType names -> numpy dtypes (BF16 / FP8 / INT4 / FP4 I/O have no numpy dtype: rejected at binding).
_TRT_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
           "BOOL": np.bool_, "UINT8": np.uint8, "DOUBLE": np.float64}



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



def _volume(shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in shape))
