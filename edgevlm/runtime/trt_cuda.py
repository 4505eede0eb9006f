"""CUDA side of the TensorRT backend: importing ``tensorrt`` / cuda-python's runtime bindings (``MissingDependency``
naming ``pip install 'edgevlm[tensorrt]'`` otherwise), checking cuda-python's ``(err, *values)`` results
(``_check``), device properties, and the two kinds of memory the runners hold: ``DeviceBuffer`` (``cudaMalloc``,
async host<->device copies on a stream) and ``PinnedBuffer`` (``cudaMallocHost`` with numpy views). ``free_all``
frees a list of buffers even when one free fails. No torch, no onnx; nothing heavy is imported at module load.

    >>> from edgevlm.runtime.trt_cuda import import_cudart, DeviceBuffer
    >>> cudart = import_cudart()
    >>> buf = DeviceBuffer(1024, cudart=cudart, name="x"); buf.copy_from_host(host_array, stream); buf.free()

Part of the TensorRT backend (``trt_cuda`` -> ``trt_engine`` -> ``trt_runners`` -> ``trt_backend``); every public
name is re-exported by ``edgevlm.runtime.trt_backend``.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Sequence

import numpy as np

from edgevlm.errors import MissingDependency, RuntimeBackendError

log = logging.getLogger(__name__)

__all__ = ["import_tensorrt", "import_cudart", "tensorrt_available", "device_properties", "DeviceBuffer",
           "PinnedBuffer", "free_all", "PROVIDER_NAME", "WHERE_TO_RUN"]

#: The ``providers`` name that selects this backend in ``Session`` (not an ONNX Runtime execution provider).
PROVIDER_NAME = "tensorrt-engine"
WHERE_TO_RUN = ("TensorRT engines run on the device they were built on (a Jetson or an NVIDIA GPU with TensorRT "
                "installed; JetPack ships it): build them there with `edgevlm build-engine BUNDLE`")



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



def _destroy_stream(cudart: Any, stream: Any, quiet: bool = False) -> None:
    try:
        _check(cudart, cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
    except RuntimeBackendError as exc:
        if not quiet:
            raise
        log.warning("%s", exc)
