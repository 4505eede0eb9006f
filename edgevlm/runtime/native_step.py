"""ORT prefill + native kernel steps: ``NativeStepDecoder`` (a ``decoders.Decoder``) and how it is opened.

``open_ort_or_native`` starts building the native kernel (``edgevlm.runtime.native.NativeDecoder``) on a helper
thread, creates the ONNX Runtime decoder meanwhile (the kernel's weight setup overlaps ORT's prepacking), and
returns a ``NativeStepDecoder`` when the kernel runs here, else the ``OrtDecoder`` (whose ``native_info`` says
why not; ``NativeUnavailable`` instead where the kernel was required). Use ``decoders.open_decoder``.

Never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from edgevlm.bundle import Bundle
from edgevlm.errors import ConfigError
from edgevlm.runtime.backends import BackendOptions, resolve_providers
from edgevlm.runtime.decoders import Decoder, DecoderIO, OrtDecoder, _Closing, _full
from edgevlm.runtime.kv_cache import KVSpec

log = logging.getLogger(__name__)

__all__ = ["NativeStepDecoder", "open_ort_or_native"]


class _NativeSetup:
    """Builds the native decoder (``edgevlm.runtime.native``) on a helper thread while ONNX Runtime creates the
    decoder session, so mapping and pre-faulting the bundle's weight file (read in place, no copy) overlaps ORT's own
    weight prepacking. ``finish()``
    joins and returns the ``NativeDecoder`` or None; ``info`` says which and why."""

    def __init__(self, bundle: Bundle, io: DecoderIO, opts: BackendOptions, providers: Sequence[Any],
                 mode: str, asked: str) -> None:
        from edgevlm.runtime.native import KV_DTYPES

        if opts.native_kv not in KV_DTYPES:
            raise ConfigError(f"native_kv must be one of {', '.join(KV_DTYPES)}, got {opts.native_kv!r}")
        self.mode, self.kv_dtype = mode, str(opts.native_kv)
        self.info: dict[str, Any] = {"backend": "onnxruntime", "mode": mode, "reason": None}
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._t = time.perf_counter()
        dentry = bundle.component("decoder")
        reason = self._reason(io, dentry, providers, asked)
        if reason:
            self.info["reason"] = reason
            if mode == "on":
                from edgevlm.runtime.native import NativeUnavailable

                raise NativeUnavailable(f"{asked} but {reason}")
            return
        self._thread = threading.Thread(target=self._build, daemon=True, name="edgevlm-native-setup",
                                        args=(bundle.root, dentry["native_decode"], io.kv_spec, opts.resolved_threads))
        self._thread.start()

    def _reason(self, io: DecoderIO, dentry: dict[str, Any], providers: Sequence[Any], asked: str) -> str | None:
        if self.mode == "off":
            return asked
        if any((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider" for p in providers):
            return "the providers are not CPU only"
        if not io.logits_last_only or io.logits_dtype != np.float32:
            return "the decoder's logits are not a float32 last-position output"
        from edgevlm.runtime.native import availability, plan_reason

        # the bundle's facts first (the same on every CPU), then this machine's
        return plan_reason(dentry.get("native_decode"), io.kv_spec) or availability()

    def _build(self, root: Any, plan: dict[str, Any], spec: KVSpec, threads: int) -> None:
        try:
            from edgevlm.runtime.native import NativeDecoder

            self._result = NativeDecoder(root, plan, spec, threads=threads, kv_dtype=self.kv_dtype)
        except BaseException as exc:  # re-raised or reported by finish() on the caller's thread
            self._error = exc

    def finish(self) -> Any:
        if self._thread is None:
            return None
        self._thread.join()
        self.info["setup_s"] = round(time.perf_counter() - self._t, 4)
        if self._error is not None:
            from edgevlm.runtime.native import NativeUnavailable

            if self.mode == "on" or not isinstance(self._error, NativeUnavailable):
                raise self._error                           # a corrupt plan is a bundle error, not a fallback
            self.info["reason"] = str(self._error)
            log.warning("native decode unavailable, decoding with ONNX Runtime: %s", self._error)
            return None
        self.info.update(backend="native", isa=self._result.isa, build=self._result.build, kv_dtype=self.kv_dtype,
                         weight_bytes=self._result.weight_bytes, huge_page_bytes=self._result.huge_page_bytes)
        return self._result


class NativeStepDecoder(_Closing):
    """ONNX Runtime runs the prefill, the native kernel (``edgevlm.runtime.native.NativeDecoder``) every step, on the
    same KV buffers (the ORT decoder's ``shared_buffer`` cache; the kernel keeps an fp16 copy for attention when
    ``native_kv="float16"``). Built by ``open_decoder`` (``NativeStepDecoder.open``)."""

    backend = "native"

    def __init__(self, ort: OrtDecoder, native: Any, native_info: dict[str, Any] | None = None) -> None:
        self.ort, self.native = ort, native
        self.native_info = dict(native_info or {"backend": "native"})
        self.hidden_size, self.vocab_size = ort.hidden_size, ort.vocab_size
        self.max_context, self.max_prompt = ort.max_context, ort.max_prompt
        self.options, self.session_info = ort.options, ort.session_info
        self._logits = ort._logits_row                                # [vocab] float32, shared with ORT
        native.bind(ort.kv.pointers(), ort.max_context)

    @classmethod
    def open(cls, bundle: Bundle, options: BackendOptions | None = None, *, providers: Sequence[Any] | None = None,
             max_context: int | None = None) -> "NativeStepDecoder":
        """ORT session + native kernel (built concurrently); ``NativeUnavailable`` when it cannot run here."""
        opts = options or BackendOptions()
        return open_ort_or_native(bundle, opts, "on", "backend='native'", providers, max_context)  # type: ignore

    @property
    def length(self) -> int:
        return self.ort.length

    def reset(self) -> None:
        self.ort.reset()

    def prefill(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        logits = self.ort.prefill(embeds, positions)
        self.native.sync(0, self.ort.length)          # the prefill's rows into the fp16 cache, if any
        return logits

    def rewind(self, n: int) -> None:
        self.ort.rewind(n)                            # shared_buffer: a length; the fp16 rows [0, n) stay valid

    def extend(self, embeds: np.ndarray) -> np.ndarray:
        n = self.ort.length
        logits = self.ort.extend(embeds)
        self.native.sync(n, self.ort.length)          # the new rows into the fp16 cache, if any
        return logits

    def step(self, embed: np.ndarray, position: int | None = None) -> np.ndarray:
        n = self.ort.length
        _full(n, self.max_context, self.backend)
        e = np.asarray(embed).reshape(-1)
        self.native.step(e, n if position is None else int(position), self._logits)
        self.ort.kv.commit(n + 1)
        return self._logits

    def kv_arrays(self) -> list[np.ndarray]:
        return self.ort.kv_arrays()                   # the kernel writes the fp32 buffers too

    def info(self) -> dict:
        out = self.ort.info()
        out.update(backend="native", native=dict(self.native_info))
        if self.native_info.get("kv_dtype") == "float16":
            out["native_kv_bytes"] = out["kv_bytes"] // 2
        return out

    @property
    def session(self) -> Any:
        return self.ort.session

    def end_profiling(self) -> str:
        return self.ort.end_profiling()

    def close(self) -> None:
        native, self.native = self.native, None
        if native is not None and hasattr(native, "close"):
            native.close()                            # unmaps the weights, drops the fp16 KV copy
        self.ort.close()

    def __repr__(self) -> str:
        return f"NativeStepDecoder(kv={self.native_info.get('kv_dtype')}, context={self.max_context})"


def open_ort_or_native(bundle: Bundle, opts: BackendOptions, mode: str, asked: str,
                        providers: Sequence[Any] | None, max_context: int | None) -> Decoder:
    io = DecoderIO.from_bundle(bundle)
    resolved = resolve_providers(providers if providers is not None else opts.providers)
    setup = _NativeSetup(bundle, io, opts, resolved, mode, asked)  # maps + pre-faults the weights while ORT loads
    try:
        ort = OrtDecoder(bundle, opts, providers=resolved, max_context=max_context, io=io)
    except BaseException:
        if setup._thread is not None:
            setup._thread.join()
        raise
    t = time.perf_counter()
    native = setup.finish()
    setup.info["wait_s"] = round(time.perf_counter() - t, 4)
    if native is None:
        ort.native_info = setup.info                  # type: ignore[attr-defined]
        return ort
    return NativeStepDecoder(ort, native, setup.info)
