"""One decoder interface for every backend, in the spirit of gpt-fast's ``prefill`` / ``decode_one_token``.

A ``Decoder`` owns its KV cache and runs batch 1: ``prefill(embeds)`` starts a sequence and returns the last
position's logits; ``step(embed)`` appends one token and returns its logits. The generation loop
(``edgevlm.runtime.generation``), ``Session``, bench, verify, parity, calibration and the quantization report all
drive decoders through this interface only.

=====================  ===========================  ===========================================================
backend                class                        what runs
=====================  ===========================  ===========================================================
``onnxruntime-cpu``    ``OrtDecoder``               the bundle's ``decoder.onnx`` with IOBinding; KV cache per
``onnxruntime-cuda``                                manifest mode (``kv_cache``), on the CUDA device under CUDA
``native``             ``NativeStepDecoder``        ORT prefill + the native C kernel for steps (shared KV;
                                                    ``edgevlm.runtime.native_step``)
``tensorrt``           ``trt_backend.TrtDecoderRunner``  the engine built by ``edgevlm build-engine`` (ping-pong KV)
=====================  ===========================  ===========================================================

``open_decoder(bundle, backend="auto" | "ort" | "native" | "tensorrt", options)`` picks one. ``"auto"``: TensorRT
when the bundle records engines usable on this GPU / TensorRT (``trt_backend.engines_usable_here``), else native
where it runs (``options.native_decode`` != ``"off"``), else ONNX Runtime.

    >>> with open_decoder(bundle, "ort") as dec:
    ...     logits = dec.prefill(embeds)            # [1, T, D] -> [vocab] float32 (a view)
    ...     logits = dec.step(table[token])         # [D] -> [vocab]
    ...     dec.rewind(n)                           # keep the first n cached tokens (prompt-prefix reuse)
    ...     logits = dec.extend(more)               # prefill [1, T', D] more tokens after them

``rewind`` / ``extend`` are how ``Session`` reuses the KV cache of a shared prompt prefix
(``edgevlm.runtime.caches``); a decoder that cannot prefill after a cached past raises
``caches.KVReuseUnsupported`` and is prefilled from scratch instead.

Never imports torch (``tests/test_torch_free.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from edgevlm.bundle import Bundle
from edgevlm.errors import BundleError, ConfigError, PromptError, RuntimeBackendError
from edgevlm.runtime.backends import BackendOptions, SessionInfo, device_type_for, resolve_providers
from edgevlm.runtime.bundle_io import create_component_session, io_table, np_dtype
from edgevlm.runtime.caches import KVReuseUnsupported
from edgevlm.runtime.kv_cache import KVCache, KVSpec, make_kv_cache

log = logging.getLogger(__name__)

__all__ = ["Decoder", "VisionEncoder", "DecoderIO", "OrtDecoder", "NativeStepDecoder", "open_decoder",
           "KVReuseUnsupported", "BACKENDS", "NATIVE_MODES", "resolve_backend", "tensorrt_usable", "open_tensorrt"]

#: ``backend=`` values of ``open_decoder`` / ``Session.from_bundle`` / ``edgevlm run --backend``.
BACKENDS = ("auto", "ort", "native", "tensorrt")
NATIVE_MODES = ("auto", "on", "off")

_REQUIRED_INPUTS = ("inputs_embeds", "attention_mask")
_OPTIONAL_INPUTS = ("position_ids",)          # absent when the graph derives positions (GQA decoders)


# ---- the interface ----------------------------------------------------------------------------------------------
@runtime_checkable
class Decoder(Protocol):
    """One decoder backend with its own KV cache; batch 1; prefill then steps (gpt-fast's prefill /
    decode_one_token)."""

    backend: str          # "onnxruntime-cpu" | "onnxruntime-cuda" | "native" | "tensorrt"
    hidden_size: int      # D
    vocab_size: int
    max_context: int      # KV capacity in tokens (prompt + generated)
    max_prompt: int       # longest prefill accepted (== max_context where the backend has no prefill profile)

    @property
    def length(self) -> int:
        """Tokens in the KV cache now."""

    def reset(self) -> None:
        """Forget the sequence (a new request)."""

    def prefill(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """``embeds [1, T, D]`` or ``[T, D]`` (any float dtype; cast to the graph's) -> logits of the LAST position,
        ``[vocab]`` float32 (a view valid until the next call: copy to keep). Starts a new sequence (reset + T
        tokens). ``positions`` default to ``arange(T)``. Raises ``PromptError`` when T > max_prompt or
        T > max_context."""

    def step(self, embed: np.ndarray, position: int | None = None) -> np.ndarray:
        """One token: ``embed [D]`` (or ``[1, 1, D]``) at ``position`` (default: ``length``) -> logits ``[vocab]``
        float32 view. Raises ``PromptError`` when the cache is full (``length == max_context``)."""

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (``0 <= n <= length``; ``0`` = ``reset()``), forget the rest.
        ``KVReuseUnsupported`` where the backend cannot continue after a kept past (then ``prefill``)."""

    def extend(self, embeds: np.ndarray) -> np.ndarray:
        """``embeds [1, T, D]`` / ``[T, D]``: T more tokens after the cache (positions ``length ..``) -> logits of the
        last one (a view, as ``prefill``); ``prefill`` when the cache is empty. ``PromptError`` beyond the context
        or ``max_prompt``; ``KVReuseUnsupported`` where the backend cannot prefill after a past."""

    def kv_arrays(self) -> list[np.ndarray]:
        """Host copies of the cache's past tensors, in ``KVSpec.past_names()`` order, each
        ``[1, kv_heads, length, head_dim]`` (for verify / parity / calibration; not used on the hot path)."""

    def info(self) -> dict:
        """``{"backend", "kv_dtype", "kv_mode", "kv_device", "kv_bytes", "max_context", ...}``."""

    def close(self) -> None:
        """Free everything (idempotent); decoders are context managers."""


@runtime_checkable
class VisionEncoder(Protocol):
    """The vision graph / engine: pixels -> image embeddings."""

    backend: str          # "onnxruntime-cpu" | "onnxruntime-cuda" | "tensorrt"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[B, 3, S, S]`` -> ``[B, V, D]`` float32 (a new array)."""

    def info(self) -> dict:
        """``{"backend", ...}``."""

    def close(self) -> None:
        """Free everything (idempotent)."""


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass


# ---- the manifest's decoder contract ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderIO:
    """What the manifest says about the decoder graph's I/O (checked against the runtime's contract)."""

    kv_spec: KVSpec
    has_positions: bool
    logits_name: str
    logits_last_only: bool
    embeds_dtype: np.dtype
    mask_dtype: np.dtype
    pos_dtype: np.dtype
    logits_dtype: np.dtype
    hidden_size: int
    vocab_size: int
    max_context: int            # min(model context, kv_cache.max_length)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "DecoderIO":
        dentry = bundle.component("decoder")
        spec = KVSpec.from_manifest(dentry.get("kv_cache"))
        context = int(bundle.model_config.context_length)
        max_length = (dentry.get("kv_cache") or {}).get("max_length")
        if max_length:
            context = min(context, int(max_length))
        din, dout = io_table(dentry, "inputs", "decoder"), io_table(dentry, "outputs", "decoder")
        past = set(spec.past_names())
        unknown = sorted(set(din) - past - set(_REQUIRED_INPUTS) - set(_OPTIONAL_INPUTS))
        missing = sorted((set(_REQUIRED_INPUTS) | past) - set(din))
        if unknown or missing:
            raise BundleError(f"decoder inputs do not follow the runtime's contract (inputs_embeds, attention_mask, "
                              f"optional position_ids, past KV per kv_cache): unknown {unknown}, missing {missing}; "
                              f"re-export the bundle or upgrade edgevlm")
        present = set(spec.present_names())
        logit_names = [n for n in dout if n not in present]
        if len(logit_names) != 1 or not present <= set(dout):
            raise BundleError(f"decoder outputs must be one logits tensor plus the presents named by kv_cache; got "
                              f"{sorted(dout)}; re-export the bundle")
        lname = logit_names[0]
        lshape = dout[lname].get("shape") or []
        eshape = din["inputs_embeds"].get("shape") or []
        llm = bundle.model_config.llm
        has_pos = "position_ids" in din
        return cls(kv_spec=spec, has_positions=has_pos, logits_name=lname,
                   logits_last_only=dentry.get("logits") == "last_position" or (len(lshape) == 3 and lshape[1] == 1),
                   embeds_dtype=np_dtype(din["inputs_embeds"], "decoder inputs_embeds"),
                   mask_dtype=np_dtype(din["attention_mask"], "decoder attention_mask"),
                   pos_dtype=np_dtype(din["position_ids"], "decoder position_ids") if has_pos else np.dtype(np.int64),
                   logits_dtype=np_dtype(dout[lname], "decoder logits"),
                   hidden_size=int(eshape[-1]) if eshape and isinstance(eshape[-1], int) else int(llm.hidden_size),
                   vocab_size=int(lshape[-1]) if lshape and isinstance(lshape[-1], int) else int(llm.vocab_size),
                   max_context=context)


def _as_tokens(embeds: np.ndarray, d: int, what: str) -> np.ndarray:
    """``[1, T, D]`` / ``[T, D]`` / ``[D]`` -> ``[T, D]`` (a view where possible)."""
    e = np.asarray(embeds)
    if e.ndim == 3:
        if e.shape[0] != 1:
            raise ConfigError(f"{what}: decoders run batch 1, got embeds {list(e.shape)}")
        e = e[0]
    elif e.ndim == 1:
        e = e[None]
    if e.ndim != 2 or e.shape[1] != d:
        raise ConfigError(f"{what}: embeds must be [1, T, {d}] or [T, {d}], got {list(np.shape(embeds))}")
    return e


def _check_prompt(t: int, max_prompt: int, max_context: int, backend: str) -> None:
    if t < 1:
        raise PromptError("prefill needs at least one token")
    if t > max_context:
        raise PromptError(f"a prompt of {t} tokens does not fit the {backend} decoder's context of {max_context} "
                          f"tokens: shorten the prompt")
    if t > max_prompt:
        raise PromptError(f"a prompt of {t} tokens is longer than the {backend} decoder accepts in one prefill "
                          f"({max_prompt}): shorten it or re-export with a larger prompt budget")


def _full(length: int, max_context: int, backend: str) -> None:
    if length >= max_context:
        raise PromptError(f"the {backend} decoder's KV cache is full ({max_context} tokens): start a new sequence "
                          f"(prefill) or use a bundle with a longer context")


# ---- ONNX Runtime -----------------------------------------------------------------------------------------------
class OrtDecoder(_Closing):
    """The bundle's decoder graph under ONNX Runtime, I/O bound once per step with ``IOBinding``:

    * ``inputs_embeds`` / ``position_ids``: preallocated ``[1, 1, D]`` / ``[1, 1]`` buffers for steps (bound by
      pointer, no copy); the prompt's embeddings (cast to the graph's dtype) for prefill;
    * ``attention_mask``: a ``[1, context]`` buffer of ones allocated once; each run binds ``mask[:, :total]``;
    * ``logits`` (last position only): a preallocated ``[1, 1, vocab]`` buffer (float32 graphs: returned as is);
    * KV cache: ``edgevlm.runtime.kv_cache`` per manifest mode, on the execution provider's device (``"cuda"``
      under the CUDA / TensorRT EPs: the cache never leaves the GPU between steps).

    Args:
        bundle: a read ``Bundle``.
        options: session options (threads, cache, spinning, ...); default ``BackendOptions()``.
        providers: ORT providers (aliases ``"cpu"``, ``"cuda"``...); default ``options.providers`` (CPU).
        max_context: KV capacity (default: the model's context bounded by the manifest's ``kv_cache.max_length``).
    """

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None, *,
                 providers: Sequence[Any] | None = None, max_context: int | None = None,
                 io: DecoderIO | None = None) -> None:
        opts = options or BackendOptions()
        self.options = opts
        self.io = io = io or DecoderIO.from_bundle(bundle)
        self.spec = io.kv_spec
        self.providers = resolve_providers(providers if providers is not None else opts.providers)
        self.device_type = device_type_for(self.providers)
        self.backend = f"onnxruntime-{self.device_type}"
        self.hidden_size, self.vocab_size = io.hidden_size, io.vocab_size
        self.max_context = int(min(max_context or io.max_context, io.max_context))
        self.max_prompt = self.max_context
        self.session, self.session_info = create_component_session(bundle, "decoder", self.providers, opts)
        d, ctx = self.hidden_size, self.max_context
        self._mask = np.ones((1, ctx), dtype=io.mask_dtype)                         # [1, ctx] ones
        self._positions = np.arange(ctx, dtype=io.pos_dtype)[None, :]               # [1, ctx]
        self._step_embeds = np.zeros((1, 1, d), dtype=io.embeds_dtype)              # [1, 1, D]
        self._step_pos = np.zeros((1, 1), dtype=io.pos_dtype)                       # [1, 1]
        self._logits = np.zeros((1, 1, self.vocab_size), dtype=io.logits_dtype)     # [1, 1, vocab]
        self._logits_row = self._logits.reshape(-1)                                 # [vocab] view
        self._logits32 = (self._logits_row if io.logits_dtype == np.float32
                          else np.zeros(self.vocab_size, np.float32))               # [vocab] float32
        self._binding = self.session.io_binding()
        self.kv: KVCache = make_kv_cache(self.spec, self._binding, device_type=self.device_type, max_len=ctx)
        self._closed = False

    # -- state
    @property
    def length(self) -> int:
        return 0 if self._closed else self.kv.length

    def reset(self) -> None:
        if not self._closed:
            self.kv.reset()

    # -- runs
    def _bind(self, embeds: np.ndarray, positions: np.ndarray, total: int) -> None:
        b = self._binding
        b.bind_input("inputs_embeds", "cpu", 0, embeds.dtype, list(embeds.shape), embeds.ctypes.data)
        mask = self._mask[:, :total]                                            # contiguous view [1, total]
        b.bind_input("attention_mask", "cpu", 0, mask.dtype, [1, total], mask.ctypes.data)
        if self.io.has_positions:
            b.bind_input("position_ids", "cpu", 0, positions.dtype, list(positions.shape), positions.ctypes.data)
        self.kv.bind_inputs()
        if self.io.logits_last_only:
            b.bind_output(self.io.logits_name, "cpu", 0, self._logits.dtype, list(self._logits.shape),
                          self._logits.ctypes.data)
        else:
            b.bind_output(self.io.logits_name, "cpu")
        self.kv.bind_outputs(offset=1)

    def _run(self, new_length: int) -> np.ndarray:
        self.session.run_with_iobinding(self._binding)
        self.kv.commit(new_length)
        if self.io.logits_last_only:
            row = self._logits_row
        else:
            row = self._binding.get_outputs()[0].numpy()[0, -1]
        if row is self._logits32:
            return row
        np.copyto(self._logits32, row, casting="unsafe")
        return self._logits32

    def _open(self) -> None:
        if self._closed:
            raise RuntimeBackendError(f"this {self.backend} decoder was closed; open a new one")

    def prefill(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        self._open()
        e = _as_tokens(embeds, self.hidden_size, "prefill")
        t = int(e.shape[0])
        _check_prompt(t, self.max_prompt, self.max_context, self.backend)
        x = np.ascontiguousarray(e[None], dtype=self.io.embeds_dtype)               # [1, T, D]
        if positions is None:
            pos = self._positions[:, :t]
        else:
            pos = np.ascontiguousarray(np.asarray(positions).reshape(1, t), dtype=self.io.pos_dtype)
        self.kv.reset()
        self._bind(x, pos, t)
        return self._run(t)

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` cached tokens. ``shared_buffer``: only the length changes (the rows after ``n`` are
        overwritten by the next run, and the attention mask never reaches them); ``concat``: the pasts are sliced
        to ``n`` rows (one copy of the kept rows)."""
        self._open()
        n, length = int(n), self.kv.length
        if not 0 <= n <= length:
            raise ConfigError(f"rewind({n}): the KV cache holds {length} tokens")
        if n == length:
            return
        if n == 0:
            self.kv.reset()
            return
        if self.spec.mode == "shared_buffer":
            self.kv.length = n
            return
        values = getattr(self.kv, "_values", None)
        if not values:
            raise KVReuseUnsupported(f"the {self.spec.mode} KV cache of this {self.backend} decoder cannot be "
                                     f"rewound")
        import onnxruntime as ort

        axis = self.spec.layout.index("seq")
        kept = []
        for v in values:
            a = np.asarray(v.numpy())
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(0, n)
            kept.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a[tuple(idx)]),
                                                         self.kv.device_type, self.kv.device_id))
        self.kv._values = kept
        self.kv.length = n

    def extend(self, embeds: np.ndarray) -> np.ndarray:
        self._open()
        n = self.kv.length
        if n == 0:
            return self.prefill(embeds)
        e = _as_tokens(embeds, self.hidden_size, "extend")
        t = int(e.shape[0])
        if t < 1:
            raise PromptError("extend needs at least one token")
        _check_prompt(n + t, self.max_prompt, self.max_context, self.backend)
        x = np.ascontiguousarray(e[None], dtype=self.io.embeds_dtype)               # [1, T, D]
        pos = self._positions[:, n:n + t]
        self._bind(x, pos, n + t)
        return self._run(n + t)

    def step(self, embed: np.ndarray, position: int | None = None) -> np.ndarray:
        self._open()
        n = self.kv.length
        _full(n, self.max_context, self.backend)
        np.copyto(self._step_embeds.reshape(-1), np.asarray(embed).reshape(-1), casting="unsafe")
        self._step_pos[0, 0] = n if position is None else int(position)
        self._bind(self._step_embeds, self._step_pos, n + 1)
        return self._run(n + 1)

    # -- facts
    def kv_arrays(self) -> list[np.ndarray]:
        self._open()
        n, axis = self.kv.length, self.spec.layout.index("seq")
        values = getattr(self.kv, "_buffers", None) if self.spec.mode == "shared_buffer" else \
            getattr(self.kv, "_values", None)
        if n == 0 or not values:
            return [np.zeros(self.spec.shape(0), self.spec.np_dtype) for _ in self.spec.past_names()]
        out = []
        for v in values:
            a = np.asarray(v.numpy())
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(0, n)
            out.append(np.array(a[tuple(idx)]))
        return out

    def kv_bytes(self) -> int:
        """Bytes of the KV cache (allocated in ``shared_buffer`` mode; the current length's in ``concat``)."""
        tokens = self.max_context if self.spec.mode == "shared_buffer" else self.kv.length
        return self.spec.bytes_per_token() * tokens

    def info(self) -> dict:
        return {"backend": self.backend, "kv_dtype": self.spec.dtype, "kv_mode": self.spec.mode,
                "kv_device": self.device_type, "kv_bytes": self.kv_bytes(), "max_context": self.max_context,
                "max_prompt": self.max_prompt, "providers": list(self.session.get_providers()),
                "session": self.session_info.to_dict()}

    def end_profiling(self) -> str:
        return self.session.end_profiling()

    def close(self) -> None:
        for name in ("kv", "_binding", "session"):
            if hasattr(self, name):
                delattr(self, name)
        self._closed = True

    def __repr__(self) -> str:
        return f"OrtDecoder({self.backend}, kv={self.spec.mode}, context={self.max_context})"


def resolve_backend(backend: str | None, options: BackendOptions) -> tuple[str, str, str]:
    """``(backend, native mode, why)`` for ``backend`` (default ``options.backend``) and ``options.native_decode``.

    ``native_decode`` is the older switch and still works with ``backend="auto"``: ``"on"`` means
    ``backend="native"`` (an error when the kernel cannot run), ``"off"`` means ``backend="ort"``."""
    backend = backend or getattr(options, "backend", None) or "auto"
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    mode = str(options.native_decode)
    if mode not in NATIVE_MODES:
        raise ConfigError(f"native_decode must be one of {', '.join(NATIVE_MODES)}, got {mode!r}")
    if backend == "auto" and mode != "auto":
        return ("native" if mode == "on" else "ort"), mode, f"native_decode='{mode}'"
    if backend == "native":
        return backend, "on", "backend='native'"
    if backend in ("ort", "tensorrt"):
        return backend, "off", f"backend='{backend}'"
    return backend, "auto", "native_decode='auto'"


# ---- TensorRT ---------------------------------------------------------------------------------------------------
def tensorrt_usable(manifest: dict[str, Any]) -> tuple[bool, str]:
    """(True, why) when the bundle records TensorRT engines built for this GPU and the installed TensorRT, and
    ``tensorrt`` imports (``trt_backend.engines_usable_here``); (False, why) otherwise."""
    try:
        from edgevlm.runtime import trt_backend
    except ImportError as exc:                        # pragma: no cover - the module is torch-free and local
        return False, f"the TensorRT backend does not import ({exc})"
    check = getattr(trt_backend, "engines_usable_here", None)
    if check is None:
        return False, "this build cannot check engines against the device"
    try:
        res = check(manifest)
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable, say why
        return False, str(exc)
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1]) if len(res) > 1 else ""
    return bool(res), "" if res else "no engines usable here"


def open_decoder(bundle: Bundle, backend: str | None = None, options: BackendOptions | None = None, *,
                 providers: Sequence[Any] | None = None, max_context: int | None = None) -> Decoder:
    """The bundle's decoder on ``backend`` (default ``options.backend``, else ``"auto"``).

    * ``"ort"``: ``OrtDecoder`` on ``providers`` (CPU by default);
    * ``"native"``: ``NativeStepDecoder`` (``NativeUnavailable`` when the bundle has no plan or this CPU cannot
      build the kernel);
    * ``"tensorrt"``: the engine's ``TrtDecoderRunner`` (``MissingDependency`` naming ``tensorrt`` when it is not
      installed; a typed error when the engines belong to another GPU / TensorRT). Closing it frees the engine
      and its CUDA stream;
    * ``"auto"``: TensorRT when usable here, else native where it runs (and ``options.native_decode`` allows), else
      ONNX Runtime. The result's ``native_info`` (native / ORT decoders) says why native did or did not run.
    """
    opts = options or BackendOptions()
    backend, mode, asked = resolve_backend(backend, opts)
    if backend == "tensorrt" or (backend == "auto" and tensorrt_usable(bundle.manifest)[0]):
        return open_tensorrt(bundle, max_context=max_context)[1]
    from edgevlm.runtime.native_step import open_ort_or_native

    return open_ort_or_native(bundle, opts, mode, asked, providers, max_context)


def open_tensorrt(bundle: Bundle, *, max_context: int | None = None) -> tuple[Any, Any]:
    """``(TrtVisionRunner, TrtDecoderRunner)`` of the bundle's engines on one CUDA stream; closing the decoder
    (last) also drops the engines and destroys the stream (``TrtBackend.close``)."""
    from edgevlm.runtime.trt_backend import TrtBackend, import_tensorrt

    import_tensorrt()                                  # MissingDependency('tensorrt') first, before any other check
    tb = TrtBackend.from_bundle(bundle, context_length=max_context or int(bundle.model_config.context_length))
    dec = tb.decoder
    closer = dec.close
    done: list[bool] = []

    def close_all() -> None:                           # the decoder closes the whole backend (idempotent)
        if done:
            return                                     # (TrtBackend.close calls decoder.close again)
        done.append(True)
        closer()
        try:
            tb.close()
        except RuntimeBackendError as exc:
            log.warning("%s", exc)

    try:
        dec.close = close_all                          # type: ignore[method-assign]
    except AttributeError:                             # pragma: no cover - slotted runner
        pass
    return tb.vision, dec


def __getattr__(name: str) -> Any:
    if name == "NativeStepDecoder":                   # defined in native_step (which imports this module)
        from edgevlm.runtime.native_step import NativeStepDecoder

        return NativeStepDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def session_info_of(decoder: Any) -> SessionInfo | None:
    """The ORT ``SessionInfo`` of a decoder (None for TensorRT)."""
    return getattr(decoder, "session_info", None)
