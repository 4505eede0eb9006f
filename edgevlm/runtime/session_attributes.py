"""Attributes of ``Session`` that older callers and tests read: the ONNX Runtime sessions, the KV cache, the native
kernel, per-session facts, the caches. They look inside the chosen ``VisionEncoder`` / ``Decoder``
(``edgevlm.runtime.decoders``), so they are None (or empty) where a backend has no such part (TensorRT engines have
no ORT session)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgevlm.runtime.backends import SessionInfo

__all__ = ["SessionAttributes"]


class SessionAttributes:
    """Mixed into ``Session`` (which sets ``vision``, ``decoder`` and ``caches``)."""

    vision: Any
    decoder: Any
    caches: Any

    @property
    def session_info(self) -> dict[str, SessionInfo]:
        """ONNX Runtime session facts per component (empty for TensorRT engines)."""
        return {k: c.session_info for k, c in (("vision", self.vision), ("decoder", self.decoder))
                if isinstance(getattr(c, "session_info", None), SessionInfo)}

    @property
    def vision_session(self) -> Any:
        return getattr(self.vision, "session", None)

    @property
    def decoder_session(self) -> Any:
        return getattr(self.decoder, "session", None)

    @property
    def kv(self) -> Any:
        """The ONNX Runtime KV cache (``kv_cache.KVCache``) of ORT / native decoders; None for TensorRT."""
        ort = getattr(self.decoder, "ort", self.decoder)
        return getattr(ort, "kv", None)

    @property
    def native(self) -> Any:
        """The native kernel (``native.NativeDecoder``) when decode steps run on it, else None."""
        return getattr(self.decoder, "native", None)

    @property
    def _logits_row(self) -> np.ndarray:
        ort = getattr(self.decoder, "ort", self.decoder)
        return ort._logits_row

    @property
    def image_cache(self) -> Any:
        return self.caches.image

    @property
    def prefix_cache(self) -> bool:
        return self.caches.prefix
