"""Which vision encoder and decoder run a bundle: ``open_backends(bundle, options, context)``.

``backend`` (``BackendOptions.backend``, with the older ``native_decode`` switch folded in by
``decoders.resolve_backend``): ``"tensorrt"``, or ``"auto"`` when ``decoders.tensorrt_usable`` says the bundle's
engines were built for this GPU and TensorRT -> both TensorRT runners (``decoders.open_tensorrt``); otherwise the
ONNX Runtime vision encoder (``vision.OrtVisionEncoder``) and ``decoders.open_decoder`` (native kernel steps where
they run and are asked for, else ``OrtDecoder``). The load time of each part goes into ``breakdown``.

The two ONNX Runtime sessions are created concurrently: the vision session in a worker thread while this thread
opens the decoder (ONNX Runtime releases the GIL while it builds a session; on a 2-core machine this took the
mobilevlm-1.7b int4 load from the sum of the two toward the decoder's alone). ``breakdown`` holds the critical
path only, so it sums to the load time: ``decoder_session_s`` (this thread) and ``vision_wait_s`` (how long the load
still waited for the vision session afterwards); ``Backends.overlapped`` has ``vision_session_s``, the time its
creation took in its own thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgevlm.runtime.backends import BackendOptions, device_type_for, resolve_providers
from edgevlm.runtime.decoders import open_decoder, open_tensorrt, resolve_backend, tensorrt_usable
from edgevlm.runtime.vision import OrtVisionEncoder

__all__ = ["Backends", "open_backends"]


@dataclass
class Backends:
    """The opened parts and how they were chosen."""

    vision: Any                                   # a VisionEncoder
    decoder: Any                                  # a Decoder
    providers: list[Any]                          # ONNX Runtime providers ([] for TensorRT engines)
    device_type: str                              # "cpu" | "cuda"
    native_info: dict[str, Any]                   # native kernel: which ran and why
    int8_warning: str | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    overlapped: dict[str, float] = field(default_factory=dict)   # work done beside the critical path


def open_backends(bundle: Any, opts: BackendOptions, context: int) -> Backends:
    """Open ``bundle``'s vision encoder and decoder for ``opts`` (``context``: KV tokens to allocate)."""
    backend, _, _ = resolve_backend(None, opts)
    breakdown: dict[str, float] = {}
    if backend == "tensorrt" or (backend == "auto" and tensorrt_usable(bundle.manifest)[0]):
        t = time.perf_counter()
        vision, decoder = open_tensorrt(bundle, max_context=context)
        breakdown["engines_s"] = time.perf_counter() - t
        return Backends(vision, decoder, [], "cuda",
                        {"backend": "tensorrt", "mode": "off", "reason": "TensorRT engines"}, None, breakdown)
    providers = resolve_providers(opts.providers)
    box: dict[str, Any] = {}

    def open_vision() -> None:
        t0 = time.perf_counter()
        try:
            box["vision"] = OrtVisionEncoder(bundle, opts, providers=providers)
        except BaseException as exc:             # re-raised on the calling thread
            box["error"] = exc
        box["seconds"] = time.perf_counter() - t0

    worker = threading.Thread(target=open_vision, name="edgevlm-open-vision", daemon=True)
    worker.start()
    t = time.perf_counter()
    try:
        decoder = open_decoder(bundle, None, opts, providers=providers, max_context=context)
    except BaseException:
        worker.join()
        if "vision" in box:
            box["vision"].close()
        raise
    breakdown["decoder_session_s"] = time.perf_counter() - t
    native_info = dict(getattr(decoder, "native_info", {}))
    breakdown["native_decode_wait_s"] = float(native_info.get("wait_s", 0.0))
    t = time.perf_counter()
    worker.join()
    breakdown["vision_wait_s"] = time.perf_counter() - t
    if "error" in box:
        decoder.close()
        raise box["error"]
    vision = box["vision"]
    return Backends(vision, decoder, providers, device_type_for(providers), native_info, vision.int8_warning,
                    breakdown, {"vision_session_s": box["seconds"]})
