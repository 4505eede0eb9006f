"""A fake ``tensorrt`` and a fake cuda-python ``cudart`` for end-to-end tests of the TensorRT path on a CPU.

The fake engines run the bundle's own ONNX graphs with ONNX Runtime (CPU), so greedy tokens through
``TrtBackend`` / ``Session(backend="tensorrt")`` / ``edgevlm run --backend tensorrt`` can be compared with ONNX
Runtime exactly; the fake ``cudart``'s "device memory" is host memory (ctypes buffers), so every allocation, copy,
profile switch and KV ping-pong of the runners really happens (and out-of-bounds engine writes are caught).

    from tests.fake_tensorrt import install_fake_tensorrt

    def test_x(monkeypatch, trt_bundle_dir):                    # a bundle exported for a TensorRT target
        install_fake_tensorrt(monkeypatch, trt_bundle_dir)      # engines/*.engine + manifest, fake modules
        ...                                                     # TrtBackend.from_bundle / Session / CLI
        cudart = sys.modules["tensorrt"].cudart                 # the fake device: .mem == {} once all is closed

``install_fake_tensorrt(monkeypatch, bundle_dir, *, version="10.3.0", compute_capability="8.7", ...)`` writes one
fake engine file per engine of the bundle's ``build_plan.json`` (a JSON header + the ONNX model with its weights
inlined: self-contained, so a copied bundle still works), registers them in the manifest exactly like ``edgevlm
register-engines`` (``edgevlm.cli.engine.register_bundle_engines``: file, bytes, sha256, TensorRT version, device,
compute capability, profiles), and monkeypatches ``sys.modules["tensorrt"]`` and cuda-python's runtime bindings
(``cuda.bindings.runtime`` and the older ``cuda.cudart``) plus ``trt_build.cuda_device``. ``runtime_version`` /
``device_compute_capability`` make "this device" differ from the one the engines were recorded for (mismatch
tests). Everything is undone by ``monkeypatch`` at the end of the test; the engine files and the manifest entry
stay in the bundle (re-installing rewrites them).

Engine file format: ``MAGIC`` + one JSON line ``{"component", "onnx", "tensorrt", "profiles"}`` + the serialized
ONNX model. A file without the magic does not deserialize (``None``, like TensorRT with a foreign plan).
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"EDGEVLM-FAKE-TRT-ENGINE\n"

__all__ = ["MAGIC", "FakeCudart", "FakeEngine", "make_fake_tensorrt", "write_fake_engines", "install_fake_tensorrt"]


# ---- the fake CUDA runtime ------------------------------------------------------------------------------------------
class FakeCudart:
    """cuda-python's runtime API shape; "device" allocations are host ctypes buffers, copies are memmove.

    ``mem`` maps live pointers to their buffers (``{}`` when everything was freed); ``streams`` counts live
    streams. ``compute_capability`` / ``device_name`` are what ``cudaGetDeviceProperties`` reports."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = "H2D", "D2H"

    def __init__(self, compute_capability: str = "8.7", device_name: str = "Orin (fake)") -> None:
        self.mem: dict[int, Any] = {}
        self.mallocs, self.host_mallocs, self.freed, self.streams = 0, 0, 0, 0
        self.copies: list[tuple[str, int]] = []
        self.compute_capability, self.device_name = compute_capability, device_name

    def _alloc(self, n: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaMalloc(self, n):
        self.mallocs += 1
        return self._alloc(n)

    def cudaMallocHost(self, n):
        self.host_mallocs += 1
        return self._alloc(n)

    def cudaFree(self, ptr):
        self.freed += 1
        del self.mem[ptr]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        self.copies.append((kind, n))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamCreate(self):
        self.streams += 1
        return 0, 7

    def cudaStreamDestroy(self, stream):
        self.streams -= 1
        return (0,)

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaSetDevice(self, i):
        return (0,)

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, i):
        major, minor = (int(x) for x in self.compute_capability.split("."))
        return 0, types.SimpleNamespace(name=self.device_name.encode(), major=major, minor=minor,
                                        totalGlobalMem=8 << 30)

    def check(self, addr: int, nbytes: int, what: str) -> None:
        """``[addr, addr + nbytes)`` lies inside one live allocation (else AssertionError: an engine would overrun)."""
        if nbytes == 0:
            return
        for start, buf in self.mem.items():
            if start <= addr and addr + nbytes <= start + ctypes.sizeof(buf):
                return
        raise AssertionError(f"{what}: {nbytes} bytes at 0x{addr:x} are not inside one live device allocation")


def _view(addr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(addr), dtype=dtype).reshape(shape)


# ---- the fake TensorRT --------------------------------------------------------------------------------------------
class _Enum:
    """A TensorRT-like enum value (``.name``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Enum.{self.name}"


TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT"), OUTPUT=_Enum("OUTPUT"), NONE=_Enum("NONE"))
DataType = types.SimpleNamespace(**{n: _Enum(n) for n in ("FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL", "UINT8",
                                                          "BF16")})
_ORT_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
            "tensor(int64)": "INT64", "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(bfloat16)": "BF16"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}


class FakeEngine:
    """An ``ICudaEngine`` look-alike over an ONNX Runtime session: I/O table from the session's inputs / outputs
    (symbolic dims -> -1), optimization profiles from the header (the build plan's)."""

    def __init__(self, header: dict[str, Any], onnx_bytes: bytes, cudart: FakeCudart) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.header, self.cudart, self.name = header, cudart, f"{header.get('component', '?')} (fake engine)"
        self.io: list[tuple[str, _Enum, str, tuple[int, ...]]] = []
        for args, mode in ((self.session.get_inputs(), TensorIOMode.INPUT),
                           (self.session.get_outputs(), TensorIOMode.OUTPUT)):
            for a in args:
                shape = tuple(d if isinstance(d, int) else -1 for d in a.shape)
                self.io.append((a.name, mode, _ORT_TRT.get(a.type, a.type), shape))
        self.by_name = {t[0]: t for t in self.io}
        self.inputs = [t[0] for t in self.io if t[1] is TensorIOMode.INPUT]
        self.outputs = [t[0] for t in self.io if t[1] is TensorIOMode.OUTPUT]
        self.profiles = list(header.get("profiles") or [])
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = max(1, len(self.profiles))
        self.contexts: list[FakeExecutionContext] = []

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> _Enum:
        return self.by_name[name][1] if name in self.by_name else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> _Enum:
        return getattr(DataType, self.by_name[name][2])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.by_name[name][3]

    def get_tensor_profile_shape(self, name: str, i: int) -> tuple[tuple[int, ...], ...]:
        shapes = self.profiles[i]["shapes"] if i < len(self.profiles) else {}
        if name not in shapes:                             # a static input (no range in the plan)
            static = self.by_name[name][3]
            return (static,) * 3
        r = shapes[name]
        return tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])

    def create_execution_context(self) -> "FakeExecutionContext":
        ctx = FakeExecutionContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeExecutionContext:
    """``IExecutionContext``: profile, input shapes and tensor addresses; ``execute_async_v3`` reads the inputs from
    the fake device, runs ONNX Runtime and writes every output into its bound address."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addr: dict[str, int] = {}
        self.out_shapes: dict[str, tuple[int, ...]] = {}
        self.profile_calls: list[int] = []
        self.executions: list[tuple[int, dict[str, tuple[int, ...]]]] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        assert isinstance(stream, int), "TensorRT takes the stream handle as an int"
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile, self.shapes = index, {}
        self.profile_calls.append(index)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False                                   # like TensorRT: outside the active profile
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.by_name:
            return False
        self.addr[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        return self.out_shapes.get(name, self.engine.get_tensor_shape(name))

    def execute_async_v3(self, stream: int) -> bool:
        assert isinstance(stream, int), "TensorRT takes the stream handle as an int"
        eng, cudart = self.engine, self.engine.cudart
        missing = [n for n in eng.inputs if n not in self.shapes] + [n for n in eng.by_name if n not in self.addr]
        if missing:
            return False
        feeds = {}
        for n in eng.inputs:
            dt = _NP[eng.by_name[n][2]]
            shape = self.shapes[n]
            cudart.check(self.addr[n], int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize, f"input {n}")
            feeds[n] = np.array(_view(self.addr[n], shape, dt))
        results = eng.session.run(eng.outputs, feeds)
        for n, value in zip(eng.outputs, results):
            value = np.ascontiguousarray(value, dtype=_NP[eng.by_name[n][2]])
            cudart.check(self.addr[n], value.nbytes, f"output {n}")
            _view(self.addr[n], value.shape, value.dtype)[...] = value
            self.out_shapes[n] = tuple(value.shape)
        self.executions.append((self.profile, dict(self.shapes)))
        return True


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(version).split(".")[:3] if p.isdigit())


def make_fake_tensorrt(version: str = "10.3.0", cudart: FakeCudart | None = None) -> types.ModuleType:
    """A ``tensorrt`` module: ``__version__``, ``Logger``, ``Runtime(logger).deserialize_cuda_engine(bytes)`` (fake
    engine files only; None for anything else or for an engine of another TensorRT release, like TensorRT),
    ``TensorIOMode``, ``DataType``. ``.cudart`` is the fake device the engines read and write."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.cudart = cudart or FakeCudart()
    trt.TensorIOMode, trt.DataType = TensorIOMode, DataType
    trt.engines = []                                       # every engine deserialized (tests inspect contexts)

    class Logger:
        WARNING, INFO, ERROR, VERBOSE = 2, 3, 1, 4

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger, self.DLA_core = logger, -1

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            data = bytes(data)
            if not data.startswith(MAGIC):
                return None
            line, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
            header = json.loads(line)
            if _release(header.get("tensorrt", version))[:3] != _release(version)[:3]:
                return None                                # TensorRT refuses plans of another release
            engine = FakeEngine(header, onnx_bytes, trt.cudart)
            trt.engines.append(engine)
            return engine

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


# ---- engine files + installation ------------------------------------------------------------------------------------
def write_fake_engines(bundle_dir: str | Path, *, version: str = "10.3.0") -> dict[str, Path]:
    """One fake engine file per engine of ``build_plan.json`` (the plan's file name, ONNX graph and profiles).
    Returns {component: engine path}."""
    import onnx

    root = Path(bundle_dir)
    if not (root / "build_plan.json").is_file():
        raise FileNotFoundError(f"{root} has no build_plan.json: fake engines need a bundle exported for a TensorRT "
                                f"target, e.g. export_bundle('tiny-ldpnetv2', out, random_init=True, "
                                f"target='jetson-orin-nano-8gb', precision='fp32', parity=False)")
    plan = json.loads((root / "build_plan.json").read_text())
    out = {}
    for e in plan["engines"]:
        model = onnx.load(str(root / e["onnx"]), load_external_data=True)
        header = {"component": e["component"], "onnx": e["onnx"], "tensorrt": version, "profiles": e["profiles"]}
        path = root / e["engine"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + model.SerializeToString())
        out[e["component"]] = path
    return out


def install_fake_tensorrt(monkeypatch: Any, bundle_dir: str | Path, *, version: str = "10.3.0",
                          compute_capability: str = "8.7", device_name: str = "Orin (fake)",
                          runtime_version: str | None = None, device_compute_capability: str | None = None,
                          device_name_here: str | None = None) -> Path:
    """Make ``bundle_dir`` (exported for a TensorRT target) runnable with ``backend="tensorrt"`` on this CPU.

    Writes fake engines (``write_fake_engines``), records them in the manifest like ``edgevlm register-engines``
    (built with TensorRT ``version`` on ``device_name`` / SM ``compute_capability``), and monkeypatches
    ``sys.modules["tensorrt"]`` (``make_fake_tensorrt``), cuda-python's runtime bindings (a ``FakeCudart``) and
    ``edgevlm.exporter.trt_build.cuda_device`` for the rest of the test. "This device" is the recorded one unless
    ``runtime_version`` (installed TensorRT) / ``device_compute_capability`` (+ ``device_name_here``) say otherwise.
    The fake device is ``sys.modules["tensorrt"].cudart``. Returns ``Path(bundle_dir)``.
    """
    from edgevlm.cli.engine import register_bundle_engines
    from edgevlm.exporter import trt_build

    root = Path(bundle_dir)
    write_fake_engines(root, version=version)
    monkeypatch.setattr(trt_build, "cuda_device", lambda: (device_name, compute_capability))
    register_bundle_engines(root, tensorrt=version, trt=make_fake_tensorrt(version), validate=True)

    here_cc = device_compute_capability or compute_capability
    here_name = device_name_here or (device_name if here_cc == compute_capability else f"GPU (SM {here_cc}, fake)")
    cudart = FakeCudart(here_cc, here_name)
    trt = make_fake_tensorrt(runtime_version or version, cudart)
    monkeypatch.setattr(trt_build, "cuda_device", lambda: (here_name, here_cc))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda_pkg.bindings, cuda_pkg.cudart = bindings, cudart
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    return root
