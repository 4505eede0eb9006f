"""Vision encoders (``decoders.VisionEncoder``): the bundle's vision graph under ONNX Runtime, or its TensorRT
engine (``trt_backend.TrtVisionRunner``, which conforms to the same protocol).

    >>> with open_vision(bundle, "ort") as enc:
    ...     image_embeds = enc.encode(pixel_values)      # [1, 3, S, S] -> [1, V, D] float32

Never imports torch.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from edgevlm.bundle import Bundle
from edgevlm.errors import BundleError, ConfigError
from edgevlm.runtime.backends import BackendOptions, device_type_for, resolve_providers
from edgevlm.runtime.bundle_io import create_component_session, io_table, np_dtype

log = logging.getLogger(__name__)

__all__ = ["OrtVisionEncoder", "open_vision", "int8_saturation_warning"]


def int8_saturation_warning(entry: dict[str, Any], device_type: str) -> str | None:
    """A warning when ``entry``'s int8 graph (static Q/DQ or dynamic) will lose accuracy on this CPU: quantized with full 8-bit weights
    (for a VNNI CPU or a GPU) and run here by ONNX Runtime's x86 u8s8 kernels, whose ``vpmaddubsw`` saturates
    without VNNI (``edgevlm.quant.recipes.int8_reduce_range``). Logged once per load; None when all is well."""
    from edgevlm.runtime.cpuinfo import int8_saturates

    recipe = entry.get("recipe") or {}
    if device_type != "cpu" or recipe.get("method") not in ("static-qdq", "dynamic") or recipe.get("reduce_range") \
            or not int8_saturates():
        return None
    msg = ("the int8 vision graph was quantized with 8-bit weights (for a VNNI CPU or a GPU), and this CPU has no "
           "VNNI: ONNX Runtime's int8 kernels can saturate here and lose accuracy. Export for this CPU with "
           "--target cpu-x86-avx2 (7-bit weights), or use --precision int4,vision=fp32")
    log.warning(msg)
    return msg


class OrtVisionEncoder:
    """``vision.onnx`` (tower + projector) under ONNX Runtime: one input (pixel values), one output (image
    embeddings). ``int8_warning`` holds the saturation warning of ``int8_saturation_warning`` (or None)."""

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None, *,
                 providers: Sequence[Any] | None = None) -> None:
        opts = options or BackendOptions()
        entry = bundle.component("vision")
        vin, vout = io_table(entry, "inputs", "vision"), io_table(entry, "outputs", "vision")
        if len(vin) != 1 or len(vout) != 1:
            raise BundleError("component 'vision' must have one input (pixel values) and one output (image "
                              "embeddings); re-export the bundle")
        (self.input_name, vin_e), = vin.items()
        (self.output_name, _), = vout.items()
        self.pixel_dtype = np_dtype(vin_e, "vision input")
        self.providers = resolve_providers(providers if providers is not None else opts.providers)
        self.device_type = device_type_for(self.providers)
        self.backend = f"onnxruntime-{self.device_type}"
        self.int8_warning = int8_saturation_warning(entry, self.device_type)
        self.session, self.session_info = create_component_session(bundle, "vision", self.providers, opts)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[B, 3, S, S]`` -> ``[B, V, D]`` float32 (a new array)."""
        x = np.ascontiguousarray(pixel_values, dtype=self.pixel_dtype)
        if x.ndim != 4:
            raise ConfigError(f"pixel_values must be [B, 3, S, S], got {list(x.shape)}")
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def info(self) -> dict:
        return {"backend": self.backend, "providers": list(self.session.get_providers()),
                "session": self.session_info.to_dict(), "int8_warning": self.int8_warning}

    def end_profiling(self) -> str:
        return self.session.end_profiling()

    def close(self) -> None:
        if hasattr(self, "session"):
            del self.session

    def __enter__(self) -> "OrtVisionEncoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_vision(bundle: Bundle, backend: str | None = None, options: BackendOptions | None = None, *,
                providers: Sequence[Any] | None = None) -> Any:
    """The bundle's vision encoder: ``"tensorrt"`` -> its engine (``trt_backend.TrtVisionRunner``; opened alone,
    on its own CUDA stream); anything else (``"auto"``, ``"ort"``, ``"native"``: the native kernel is
    decoder-only) -> ``OrtVisionEncoder`` on ``providers``. ``Session`` opens vision and decoder engines together
    (``decoders.open_tensorrt``) so that they share one stream."""
    from edgevlm.runtime.decoders import BACKENDS, open_tensorrt, tensorrt_usable

    opts = options or BackendOptions()
    backend = backend or opts.backend or "auto"
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt" or (backend == "auto" and tensorrt_usable(bundle.manifest)[0]):
        vision, decoder = open_tensorrt(bundle)
        return _OwningVision(vision, decoder)
    return OrtVisionEncoder(bundle, opts, providers=providers)


class _OwningVision:
    """A TensorRT vision runner that owns the (unused) decoder runner opened with it: closing frees both."""

    backend = "tensorrt"

    def __init__(self, vision: Any, decoder: Any) -> None:
        self._vision, self._decoder = vision, decoder

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._vision.encode(pixel_values)

    def info(self) -> dict:
        return self._vision.info()

    def close(self) -> None:
        self._decoder.close()               # closes the whole TensorRT backend (decoders.open_tensorrt)

    def __enter__(self) -> "_OwningVision":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
