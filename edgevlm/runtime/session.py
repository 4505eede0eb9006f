"""``Session``: run a bundle with numpy + ONNX Runtime (no torch), with the latency decomposition of every request.

    >>> from edgevlm.runtime import Session
    >>> s = Session.from_bundle("out/tiny-bundle", threads=2)
    >>> r = s.generate("cat.jpg", "What is in the picture?", max_new_tokens=64)
    >>> r.text, r.tokens, r.timings.decode_tok_s
    >>> for delta in s.stream("cat.jpg", "Describe it.", temperature=0.7, seed=0):
    ...     print(delta, end="", flush=True)

One request: tokenize (template from the manifest) -> preprocess (PIL + numpy) -> vision graph -> embedding gather
+ image splice (numpy) -> decoder prefill -> decode loop. Everything the runtime needs comes from the manifest:
I/O names and dtypes, the KV-cache block, prompt template, special ids, stop strings, preprocessing.

Decoder I/O is bound once per step with ORT ``IOBinding``:

* ``inputs_embeds`` / ``position_ids``: preallocated numpy buffers (``[1, 1, D]`` / ``[1, 1]`` for decode steps),
  bound by pointer (no copy); the prompt's spliced embeddings for prefill.
* ``attention_mask``: a ``[1, context]`` int64 buffer of ones allocated once; each step binds the contiguous
  view ``mask[:, :past + seq]``.
* ``logits`` (last position only): bound to a preallocated ``[1, 1, vocab]`` buffer, read in place by the sampler.
* KV cache: ``edgevlm.runtime.kv_cache`` (presents stay ORT ``OrtValue``s and are re-bound as the next pasts).

A Session runs one request at a time (a lock serializes concurrent calls). Greedy output equals
``edgevlm.model.MobileVLM.generate`` token for token on fp32 bundles (``tests/test_runtime.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgevlm.bundle import Bundle, load_embedding_table, read_bundle, sha256_file
from edgevlm.errors import BundleError, ConfigError, PromptError
from edgevlm.preprocess import DEFAULT_MAX_PIXELS, ImageInput, preprocess
from edgevlm.prompt import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, build_prompt, check_prompt_ids, tokenize_prompt
from edgevlm.runtime.backends import (BackendOptions, SessionInfo, cache_home, create_session, device_type_for,
                                      resolve_providers)
from edgevlm.runtime.kv_cache import KVCache, KVSpec, make_kv_cache
from edgevlm.runtime.sampling import Sampler, SamplingParams
from edgevlm.runtime.timings import Clock, RequestTimings

log = logging.getLogger(__name__)

__all__ = ["Session", "Result", "Stream", "open_verified"]

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_REQUIRED_DECODER_INPUTS = ("inputs_embeds", "attention_mask")
_OPTIONAL_DECODER_INPUTS = ("position_ids",)          # absent when the graph derives positions (GQA decoders)


@dataclass
class Result:
    """One request's answer. ``tokens`` are the generated ids (the terminating EOS included, like the PyTorch
    reference); ``text`` is their decoded text without special tokens, cut before a stop string."""

    text: str
    tokens: list[int]
    timings: RequestTimings
    finish_reason: str                   # "eos" | "stop_string" | "max_new_tokens" | "context_full"
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": list(self.tokens), "finish_reason": self.finish_reason,
                "prompt": self.prompt, "prompt_ids": list(self.prompt_ids), "timings": self.timings.to_dict()}


class Stream:
    """Iterator of text deltas; ``.result`` holds the ``Result`` once the iterator is exhausted."""

    def __init__(self, gen: Iterator[str]) -> None:
        self._gen = gen
        self.result: Result | None = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def text(self) -> str:
        """Consume the rest of the stream; the full text."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.text


def _dtype(entry: dict[str, Any], where: str) -> np.dtype:
    name = str(entry.get("dtype", "float32"))
    if name not in _NP:
        raise BundleError(f"{where}: dtype '{name}' is not supported by the runtime (supported: {', '.join(_NP)})")
    return np.dtype(_NP[name])


def _io(entry: dict[str, Any], direction: str, component: str) -> dict[str, dict[str, Any]]:
    items = entry.get(direction)
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise BundleError(f"manifest components.{component}.{direction} is missing or malformed (a list of "
                          f"{{name, dtype, shape}}); re-export the bundle")
    return {i["name"]: i for i in items}


def _check_session_io(sess: Any, entry: dict[str, Any], component: str) -> None:
    """The graph's real I/O names must be the manifest's."""
    for direction, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        declared = set(_io(entry, direction, component))
        got = {a.name for a in actual}
        if declared != got:
            raise BundleError(f"component '{component}': the graph's {direction} {sorted(got - declared)} are not "
                              f"in the manifest and {sorted(declared - got)} of the manifest are not in the graph; "
                              f"the manifest does not describe this graph: re-export the bundle")


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back when
    streaming, so a stop string is never half-emitted)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def open_verified(path: str | os.PathLike, *, verify_hashes: bool, stamp_dir: Path | None) -> tuple[Bundle, str]:
    """``read_bundle`` with the sha256 check remembered across loads.

    With ``stamp_dir``, a file whose hash was verified before and whose size, mtime,
    ctime, inode and device are unchanged since is not hashed again (ctime cannot be set back from user space, so any
    write to the file invalidates its stamp); every other file is hashed and compared with the manifest. Returns the
    bundle and how it was verified: ``"off"``, ``"full"`` or ``"stamps (N hashed)"``.
    """
    if not verify_hashes:
        return read_bundle(path, verify_hashes=False), "off"
    if stamp_dir is None:
        return read_bundle(path, verify_hashes=True), "full"
    import hashlib
    import json

    bundle = read_bundle(path, verify_hashes=False)                    # structure, paths, sizes
    root = bundle.root
    ident = hashlib.sha256(f"{root.resolve()}\0{bundle.manifest_sha256}".encode()).hexdigest()[:24]
    stamp_file = stamp_dir / f"{ident}.json"
    try:
        stamps = json.loads(stamp_file.read_text())
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}
    hashed = 0
    fresh: dict[str, Any] = {}
    for rel, entry in bundle.files.items():
        p = root / rel
        key = _stat_key(p)
        old = stamps.get(rel)
        if isinstance(old, dict) and old.get("sha256") == entry["sha256"] and old.get("stat") == key:
            fresh[rel] = old
            continue
        digest = sha256_file(p)
        hashed += 1
        if digest != entry["sha256"]:
            raise BundleError(f"file '{rel}' in bundle '{root}' does not match its sha256 in the manifest (got "
                              f"{digest[:12]}..., expected {entry['sha256'][:12]}...): it was modified or corrupted "
                              f"after export; re-export or re-copy the bundle")
        fresh[rel] = {"sha256": digest, "stat": _stat_key(p)}
    if hashed or fresh != stamps:
        try:
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_file)
        except OSError as exc:
            log.warning("cannot write hash stamps to %s (%s); the next load hashes the bundle again", stamp_file, exc)
    return bundle, f"stamps ({hashed} of {len(bundle.files)} files hashed)"


def _preload_request_modules() -> None:
    """Import onnxruntime and what a first request would otherwise import lazily (PIL's PNG/JPEG plugins,
    numpy.random, psutil): ~0.1-0.2 s of module loading that belongs to load time, not to the first request."""
    import numpy.random  # noqa: F401
    from PIL import Image

    from edgevlm.runtime.backends import import_ort

    import_ort()

    Image.preinit()
    try:
        import psutil  # noqa: F401
    except ImportError:
        pass


NATIVE_MODES = ("auto", "on", "off")


def _int8_saturation_warning(entry: dict[str, Any], device_type: str) -> str | None:
    """A warning when ``entry``'s int8 Q/DQ graph will lose accuracy on this CPU: quantized with full 8-bit weights
    (for a VNNI CPU or a GPU) and run here by ONNX Runtime's x86 u8s8 kernels, whose ``vpmaddubsw`` saturates
    without VNNI (``edgevlm.quant.recipes.int8_reduce_range``). Logged once per load; None when all is well."""
    from edgevlm.runtime.cpuinfo import int8_saturates

    recipe = entry.get("recipe") or {}
    if device_type != "cpu" or recipe.get("method") != "static-qdq" or recipe.get("reduce_range") \
            or not int8_saturates():
        return None
    msg = ("the int8 vision graph was quantized with 8-bit weights (for a VNNI CPU or a GPU), and this CPU has no "
           "VNNI: ONNX Runtime's int8 kernels can saturate here and lose accuracy. Export for this CPU with "
           "--target cpu-x86-avx2 (7-bit weights), or use --precision int4,vision=fp32")
    log.warning(msg)
    return msg


class _NativeSetup:
    """Builds the native decoder (``edgevlm.runtime.native``) on a helper thread while ONNX Runtime creates the
    decoder session, so copying the weights into huge-page memory overlaps ORT's own weight prepacking. ``finish()``
    joins and returns the ``NativeDecoder`` or None; ``info`` says which and why."""

    def __init__(self, session: "Session", dentry: dict[str, Any], opts: BackendOptions) -> None:
        mode = str(opts.native_decode)
        if mode not in NATIVE_MODES:
            raise ConfigError(f"native_decode must be one of {', '.join(NATIVE_MODES)}, got {mode!r}")
        from edgevlm.runtime.native import KV_DTYPES

        if opts.native_kv not in KV_DTYPES:
            raise ConfigError(f"native_kv must be one of {', '.join(KV_DTYPES)}, got {opts.native_kv!r}")
        self.mode, self.kv_dtype = mode, str(opts.native_kv)
        self.info: dict[str, Any] = {"backend": "onnxruntime", "mode": mode, "reason": None}
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._t = time.perf_counter()
        reason = self._reason(session, dentry)
        if reason:
            self.info["reason"] = reason
            if mode == "on":
                from edgevlm.runtime.native import NativeUnavailable

                raise NativeUnavailable(f"native_decode='on' but {reason}")
            return
        plan, root, spec, threads = dentry["native_decode"], session.bundle.root, session.kv_spec, session.threads
        self._thread = threading.Thread(target=self._build, args=(root, plan, spec, threads), daemon=True,
                                        name="edgevlm-native-setup")
        self._thread.start()

    @staticmethod
    def _reason(session: "Session", dentry: dict[str, Any]) -> str | None:
        if session.options.native_decode == "off":
            return "native_decode='off'"
        if session.device_type != "cpu" or any((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider"
                                               for p in session.providers):
            return "the providers are not CPU only"
        if not session._logits_last_only or session._logits_dtype != np.float32:
            return "the decoder's logits are not a float32 last-position output"
        from edgevlm.runtime.native import availability, plan_reason

        # the bundle's facts first (the same on every CPU), then this machine's
        return plan_reason(dentry.get("native_decode"), session.kv_spec) or availability()

    def _build(self, root: Path, plan: dict[str, Any], spec: KVSpec, threads: int) -> None:
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
        self.info.update(backend="native", kv_dtype=self.kv_dtype, weight_bytes=self._result.weight_bytes,
                         huge_page_bytes=self._result.huge_page_bytes)
        return self._result


class Session:
    """A loaded bundle ready to answer requests. Create with ``Session.from_bundle``."""

    def __init__(self, bundle: Bundle, *, options: BackendOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        t_load = time.perf_counter()
        opts = options or BackendOptions()
        self.bundle = bundle
        self.options = opts
        self.max_pixels = max_pixels
        self.config = bundle.model_config
        self.visual_tokens = bundle.visual_tokens
        self.context_length = int(self.config.context_length)   # bounded below by the KV buffer's max_length
        breakdown: dict[str, float] = {}
        m = bundle.manifest
        prompt = m["prompt"]
        self.template = str(prompt["template"])
        self.system = prompt.get("system")
        self.bos_id = prompt.get("bos_token_id")
        self.eos_id = prompt.get("eos_token_id", self.config.llm.eos_token_id)
        self.stop_strings = [str(s) for s in prompt.get("stop_strings", []) if s]
        if prompt.get("image_placeholder", IMAGE_PLACEHOLDER) != IMAGE_PLACEHOLDER or \
                prompt.get("image_token_index", IMAGE_TOKEN_INDEX) != IMAGE_TOKEN_INDEX:
            raise BundleError(f"bundle '{bundle.root}' uses image placeholder {prompt.get('image_placeholder')!r} / "
                              f"index {prompt.get('image_token_index')!r}; this runtime supports "
                              f"'{IMAGE_PLACEHOLDER}' / {IMAGE_TOKEN_INDEX}")
        self.preprocess_config = bundle.preprocess_config

        t = time.perf_counter()
        _preload_request_modules()
        breakdown["imports_s"] = time.perf_counter() - t

        t = time.perf_counter()
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"tokenizer '{m['tokenizer']['file']}' of bundle '{bundle.root}' cannot be read "
                              f"({exc}); re-export the bundle") from exc
        breakdown["tokenizer_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.embed_table = load_embedding_table(bundle)                   # [vocab, D] memory-mapped
        if self.tokenizer.get_vocab_size() > self.embed_table.shape[0]:
            raise BundleError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but the embedding table "
                              f"only {self.embed_table.shape[0]} rows; re-export the bundle")
        breakdown["embed_s"] = time.perf_counter() - t

        self.providers = resolve_providers(opts.providers)
        self.device_type = device_type_for(self.providers)
        self.session_info: dict[str, SessionInfo] = {}

        # ---- decoder --------------------------------------------------------------------------------------------
        dentry = bundle.component("decoder")
        self.kv_spec = KVSpec.from_manifest(dentry.get("kv_cache"))
        max_length = (dentry.get("kv_cache") or {}).get("max_length")
        if max_length:
            self.context_length = min(self.context_length, int(max_length))
        din, dout = _io(dentry, "inputs", "decoder"), _io(dentry, "outputs", "decoder")
        past = set(self.kv_spec.past_names())
        unknown = sorted(set(din) - past - set(_REQUIRED_DECODER_INPUTS) - set(_OPTIONAL_DECODER_INPUTS))
        missing = sorted((set(_REQUIRED_DECODER_INPUTS) | past) - set(din))
        if unknown or missing:
            raise BundleError(f"decoder inputs do not follow the runtime's contract (inputs_embeds, attention_mask, "
                              f"optional position_ids, past KV per kv_cache): unknown {unknown}, missing {missing}; "
                              f"re-export the bundle or upgrade edgevlm")
        self._has_positions = "position_ids" in din
        present = set(self.kv_spec.present_names())
        logit_names = [n for n in dout if n not in present]
        if len(logit_names) != 1 or not present <= set(dout):
            raise BundleError(f"decoder outputs must be one logits tensor plus the presents named by kv_cache; got "
                              f"{sorted(dout)}; re-export the bundle")
        self._logits_name = logit_names[0]
        lshape = dout[self._logits_name].get("shape") or []
        self._logits_last_only = dentry.get("logits") == "last_position" or (len(lshape) == 3 and lshape[1] == 1)
        self._embeds_dtype = _dtype(din["inputs_embeds"], "decoder inputs_embeds")
        self._mask_dtype = _dtype(din["attention_mask"], "decoder attention_mask")
        self._pos_dtype = _dtype(din["position_ids"], "decoder position_ids") if self._has_positions else np.int64
        self._logits_dtype = _dtype(dout[self._logits_name], "decoder logits")
        native = _NativeSetup(self, dentry, opts)         # copies the decoder weights while ORT creates the sessions

        # ---- vision ---------------------------------------------------------------------------------------------
        ventry = bundle.component("vision")
        vin, vout = _io(ventry, "inputs", "vision"), _io(ventry, "outputs", "vision")
        if len(vin) != 1 or len(vout) != 1:
            raise BundleError("component 'vision' must have one input (pixel values) and one output (image "
                              "embeddings); re-export the bundle")
        (self._vision_in, vin_e), = vin.items()
        (self._vision_out, _), = vout.items()
        self._pixel_dtype = _dtype(vin_e, "vision input")
        self.vision_session, info = self._create("vision", "vision", ventry)
        self.session_info["vision"] = info
        self.int8_warning = _int8_saturation_warning(ventry, self.device_type)
        breakdown["vision_session_s"] = info.seconds
        _check_session_io(self.vision_session, ventry, "vision")

        # ---- decoder session ------------------------------------------------------------------------------------
        self.decoder_session, info = self._create("decoder", "decoder", dentry)
        self.session_info["decoder"] = info
        breakdown["decoder_session_s"] = info.seconds
        _check_session_io(self.decoder_session, dentry, "decoder")

        # ---- preallocated buffers + binding ---------------------------------------------------------------------
        d = int(self.embed_table.shape[1])
        vocab = int(self.embed_table.shape[0])
        self.hidden_size, self.vocab_size = d, vocab
        self._mask = np.ones((1, self.context_length), dtype=self._mask_dtype)            # [1, ctx] ones
        self._positions = np.arange(self.context_length, dtype=self._pos_dtype)[None, :]  # [1, ctx]
        self._step_embeds = np.zeros((1, 1, d), dtype=self._embeds_dtype)                  # [1, 1, D]
        self._step_pos = np.zeros((1, 1), dtype=self._pos_dtype)                           # [1, 1]
        self._logits = np.zeros((1, 1, vocab), dtype=self._logits_dtype)                   # [1, 1, vocab]
        self._binding = self.decoder_session.io_binding()
        self.kv: KVCache = make_kv_cache(self.kv_spec, self._binding, device_type=self.device_type,
                                         max_len=self.context_length)
        self._logits_row = self._logits.reshape(-1)                                        # [vocab] view
        t = time.perf_counter()
        self.native = native.finish()
        breakdown["native_decode_wait_s"] = time.perf_counter() - t
        self.native_info = native.info
        if self.native is not None:
            self.native.bind(self.kv.pointers(), self.context_length)
        self._lock = threading.Lock()
        self.verification = "full" if bundle.hashes_verified else "off"
        self.load_s = time.perf_counter() - t_load          # from_bundle adds the bundle read to this
        breakdown["other_s"] = max(0.0, self.load_s - sum(breakdown.values()))   # onnxruntime import, buffers
        self.load_breakdown = breakdown

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, threads: int | None = None,
                    providers: Sequence[Any] | None = None, verify_hashes: bool = True,
                    optimized_cache: str | os.PathLike | bool | None = None,
                    hash_stamps: str | os.PathLike | None = "auto", spinning: bool = False,
                    profile_dir: str | os.PathLike | None = None, graph_optimization_level: str = "all",
                    decoder_arena: bool = False, save_prepacked: bool = False, native_decode: str = "auto",
                    native_kv: str = "float16", max_pixels: int = DEFAULT_MAX_PIXELS,
                    warmup: bool = False, options: BackendOptions | None = None) -> "Session":
        """Open a bundle (validated; sha256 of every file checked unless ``verify_hashes=False``) and create the
        ONNX Runtime sessions.

        Args:
            path: the bundle directory.
            threads: intra-op threads (default: physical cores).
            providers: e.g. ``["cpu"]`` (default), ``["cuda"]``, ``["tensorrt", "cuda"]``.
            verify_hashes: check every bundle file's sha256 against the manifest. A file verified before and
                unchanged since (size, mtime, ctime, inode; remembered in ``hash_stamps``) is not hashed again (see
                ``open_verified``); multi-GB bundles take seconds to hash.
            hash_stamps: where verified hashes are remembered: ``"auto"`` (``cache_home()/verified``), a
                directory, or ``None`` (hash every file on every load).
            optimized_cache: keep ORT-optimized graphs for later loads (``"auto"``, a directory, or ``None``:
                the default, see docs/runtime.md for why).
            spinning: let ORT worker threads spin between parallel sections (off by default, like ``edgevlm run``
                and ``edgevlm bench``: +7 % decode on a quiet machine, half the speed when other processes share
                the cores, docs/runtime.md); ``True`` on a dedicated device.
            profile_dir: write ORT profiles (``end_profiling()`` closes them).
            graph_optimization_level: ``"all"`` (default), ``"extended"``, ``"basic"``, ``"disable"``.
            decoder_arena: use ORT's memory arena for the decoder (off by default).
            save_prepacked: store prepacked weights in the optimized-graph cache too (faster cached loads on
                some graphs; a second copy of the weights on disk).
            native_decode: ``"auto"`` (default) runs decode steps on the native kernel when the bundle has a
                ``native_decode`` plan (int4/int8 CPU exports) and this CPU can build it (x86-64, AVX-512 VNNI, a C
                compiler), else on ONNX Runtime; ``"on"`` raises ``NativeUnavailable`` instead of falling back;
                ``"off"`` always uses ONNX Runtime. ``Session.native_info`` says which ran and why.
            native_kv: ``"float16"`` (default): the native kernel's attention reads an fp16 copy of the KV cache
                (half the KV bytes per step); ``"float32"``: it reads ONNX Runtime's fp32 buffers.
            max_pixels: images above this many pixels are refused before decoding (decompression bombs).
            warmup: run one tiny request after loading (its time is ``load_breakdown['warmup_s']``, not
                ``load_s``) so the first real request does not pay first-run allocations.
            options: a full ``BackendOptions`` (overrides the keyword options above).
        """
        t0 = time.perf_counter()
        opts = options or BackendOptions(threads=threads, providers=providers, optimized_cache=optimized_cache,
                                         spinning=spinning, profile_dir=profile_dir,
                                         graph_optimization_level=graph_optimization_level,
                                         decoder_arena=decoder_arena, save_prepacked=save_prepacked,
                                         native_decode=native_decode, native_kv=native_kv)
        stamps = None if hash_stamps is None else (cache_home() / "verified" if hash_stamps == "auto"
                                                    else Path(hash_stamps))
        bundle, verified = open_verified(path, verify_hashes=verify_hashes, stamp_dir=stamps)
        t_read = time.perf_counter() - t0
        session = cls(bundle, options=opts, max_pixels=max_pixels)
        session.verification = verified
        session.load_breakdown = {"read_bundle_s": t_read, **session.load_breakdown}
        session.load_s += t_read
        if warmup:
            session.warmup()
        return session

    def _create(self, kind: str, component: str, entry: dict[str, Any]) -> tuple[Any, SessionInfo]:
        files = [entry["file"], *(entry.get("external_data") or []), *(entry.get("files") or [])]
        hashes = [self.bundle.files[f]["sha256"] for f in dict.fromkeys(files) if f in self.bundle.files]
        free_dims: dict[str, int] = {}
        for io in entry.get("inputs") or []:
            shape = io.get("shape") or []
            if shape and isinstance(shape[0], str):
                free_dims[shape[0]] = 1                        # batch-1 runtime
        return create_session(self.bundle.component_path(component), kind=kind, component=component,
                              file_hashes=hashes, providers=self.providers, opts=self.options, free_dims=free_dims)

    # ---- public helpers -----------------------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return self.options.resolved_threads

    def render_prompt(self, prompt: str, raw_prompt: bool = False) -> str:
        """The text that is tokenized: ``prompt`` as is when ``raw_prompt`` or when it already holds ``<image>``
        (a full prompt), else the manifest's template around the question (``<image>`` prepended)."""
        if raw_prompt or IMAGE_PLACEHOLDER in prompt:
            return prompt
        return build_prompt(prompt, self.template, system=self.system)

    def tokenize(self, prompt: str, raw_prompt: bool = False, max_new_tokens: int = 0) -> tuple[str, list[int], int]:
        """(rendered prompt, ids with one -200, spliced length). Raises ``PromptError`` on a missing placeholder
        or a prompt longer than the context (the message counts the request's ``max_new_tokens``)."""
        text = self.render_prompt(prompt, raw_prompt)
        ids = tokenize_prompt(text, self.tokenizer, self.bos_id)
        length = check_prompt_ids(ids, self.visual_tokens, self.context_length, max_new_tokens)
        return text, ids, length

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[1, 3, S, S]`` -> image embeddings ``[1, V, D]`` (the vision graph)."""
        x = np.ascontiguousarray(pixel_values, dtype=self._pixel_dtype)
        return self.vision_session.run([self._vision_out], {self._vision_in: x})[0]

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of the embedding table, ``[len(ids), D]`` in the decoder's input dtype."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=self._embeds_dtype)

    def splice(self, ids: Sequence[int], image_embeds: np.ndarray) -> np.ndarray:
        """Text embeddings with the image embeddings in place of the single -200: ``[1, T + V - 1, D]``."""
        p = list(ids).index(IMAGE_TOKEN_INDEX)
        v = image_embeds.shape[1]
        out = np.empty((1, len(ids) - 1 + v, self.hidden_size), dtype=self._embeds_dtype)
        if p:
            out[0, :p] = self.embed(ids[:p])
        out[0, p:p + v] = image_embeds[0]
        if p + 1 < len(ids):
            out[0, p + v:] = self.embed(ids[p + 1:])
        return out

    def warmup(self, max_new_tokens: int = 2) -> None:
        """One short request on a grey image (first-run allocations, thread-pool start, page faults)."""
        from PIL import Image

        t = time.perf_counter()
        size = self.preprocess_config.image_size
        self.generate(Image.new("RGB", (size, size), (128, 128, 128)), "warm up", max_new_tokens=max_new_tokens)
        self.load_breakdown["warmup_s"] = time.perf_counter() - t

    @property
    def last_logits(self) -> np.ndarray:
        """A copy of the logits row ``[vocab]`` the last generated token was selected from (for checks/debugging)."""
        return np.array(self._last_logits(), dtype=np.float32)

    def end_profiling(self) -> list[str]:
        """Close the ORT profiles (``profile_dir``); returns their paths."""
        return [s.end_profiling() for s in (self.vision_session, self.decoder_session)]

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, image: ImageInput | None, prompt: str, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, stream: Callable[[str], Any] | None = None,
                 raw_prompt: bool = False, pixel_values: np.ndarray | None = None,
                 ignore_eos: bool = False) -> Result:
        """Answer one request.

        Args:
            image: a path, bytes, PIL image or ``[H, W(, 3)]`` uint8 array (ignored when ``pixel_values`` given).
            prompt: the question (the manifest's template is applied), or a full prompt holding ``<image>``.
            max_new_tokens: at most this many generated tokens (also bounded by the context).
            temperature: 0 = greedy; > 0 samples.
            top_k: keep the k most likely tokens (0 = off).
            top_p: nucleus sampling mass (1 = off).
            seed: random seed for sampling (None = fresh entropy).
            stop: extra stop strings (the manifest's, e.g. ``</s>``, always apply).
            stream: called with each text delta as it is produced.
            raw_prompt: use ``prompt`` verbatim (no template); it must hold ``<image>``.
            pixel_values: preprocessed ``[3, S, S]`` / ``[1, 3, S, S]`` float pixels instead of ``image``.
            ignore_eos: benchmark mode: neither EOS nor stop strings end the answer (exactly ``max_new_tokens``
                tokens unless the context fills up).
        """
        gen = self._request(image, prompt, max_new_tokens=max_new_tokens,
                            sampling=SamplingParams(temperature, top_k, top_p, seed), stop=stop,
                            raw_prompt=raw_prompt, pixel_values=pixel_values, ignore_eos=ignore_eos)
        while True:
            try:
                delta = next(gen)
            except StopIteration as done:
                return done.value
            if stream is not None:
                stream(delta)

    def stream(self, image: ImageInput | None, prompt: str, **kwargs: Any) -> Stream:
        """Like ``generate`` but returns an iterator of text deltas (``.result`` after the last one)."""
        kwargs.pop("stream", None)
        max_new_tokens = kwargs.pop("max_new_tokens", 256)
        sampling = SamplingParams(kwargs.pop("temperature", 0.0), kwargs.pop("top_k", 0), kwargs.pop("top_p", 1.0),
                                  kwargs.pop("seed", None))
        return Stream(self._request(image, prompt, max_new_tokens=max_new_tokens, sampling=sampling, **kwargs))

    def _bind_step(self, embeds: np.ndarray, positions: np.ndarray, total: int) -> None:
        b = self._binding
        b.bind_input("inputs_embeds", "cpu", 0, embeds.dtype, list(embeds.shape), embeds.ctypes.data)
        mask = self._mask[:, :total]                                            # contiguous view [1, total]
        b.bind_input("attention_mask", "cpu", 0, mask.dtype, [1, total], mask.ctypes.data)
        if self._has_positions:
            b.bind_input("position_ids", "cpu", 0, positions.dtype, list(positions.shape), positions.ctypes.data)
        self.kv.bind_inputs()

    def _bind_outputs(self) -> None:
        b = self._binding
        if self._logits_last_only:
            b.bind_output(self._logits_name, "cpu", 0, self._logits.dtype, list(self._logits.shape),
                          self._logits.ctypes.data)
        else:
            b.bind_output(self._logits_name, "cpu")
        self.kv.bind_outputs(offset=1)

    def _last_logits(self) -> np.ndarray:
        if self._logits_last_only:
            return self._logits[0, -1]
        return self._binding.get_outputs()[0].numpy()[0, -1]

    def _run_decoder(self) -> None:
        self.decoder_session.run_with_iobinding(self._binding)

    def _request(self, image: ImageInput | None, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str] | None = None, raw_prompt: bool = False,
                 pixel_values: np.ndarray | None = None, ignore_eos: bool = False):
        """The request as a generator of text deltas; returns the ``Result``. Time spent by the consumer between
        deltas is excluded from the timings."""
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        with self._lock:
            t_start = time.perf_counter()
            cpu_start = time.process_time()
            decode_cpu = 0.0
            paused = 0.0
            clock = Clock()
            timings = RequestTimings(load_s=self.load_s, threads=self.threads, load_breakdown=dict(self.load_breakdown),
                                     decode_backend=self.decode_backend)

            # ---- prompt + image ----------------------------------------------------------------------------------
            with clock("tokenize"):
                text, ids, length = self.tokenize(prompt, raw_prompt, max_new_tokens)
            with clock("preprocess"):
                if pixel_values is not None:
                    pv = np.asarray(pixel_values, dtype=np.float32)
                    pv = pv[None] if pv.ndim == 3 else pv
                    s = self.preprocess_config.image_size
                    if pv.shape != (1, 3, s, s):
                        raise ConfigError(f"pixel_values must be [3, {s}, {s}] or [1, 3, {s}, {s}], got {pv.shape}")
                else:
                    if image is None:
                        raise ConfigError("generate needs an image (or pixel_values)")
                    pv = preprocess(image, self.preprocess_config, self.max_pixels)[None]   # [1, 3, S, S]
            with clock("vision"):
                image_embeds = self.encode_image(pv)                                       # [1, V, D]
            if image_embeds.shape[1] != self.visual_tokens:
                raise BundleError(f"the vision graph produced {image_embeds.shape[1]} tokens but the manifest "
                                  f"says {self.visual_tokens}; re-export the bundle")

            # ---- prefill -------------------------------------------------------------------------------------------
            with clock("prefill"):
                embeds = self.splice(ids, image_embeds)                                     # [1, T, D]
                self.kv.reset()
                self._bind_step(embeds, self._positions[:, :length], length)
                self._bind_outputs()
                self._run_decoder()
                self.kv.commit(length)
                if self.native is not None:
                    self.native.sync(0, length)                # the prefill's rows into the fp16 cache, if any
            timings.prompt_tokens, timings.visual_tokens = length, self.visual_tokens
            timings.text_tokens = length - self.visual_tokens

            # ---- decode loop ---------------------------------------------------------------------------------------
            sampler = Sampler(sampling)
            stops = [] if ignore_eos else list(dict.fromkeys([*self.stop_strings, *(stop or [])]))
            eos_id = None if ignore_eos else self.eos_id
            produced: list[int] = []
            step_ms: list[float] = []
            emitted = ""
            finish = "max_new_tokens"
            n_ctx = length
            final_text = ""
            while True:
                with clock("sampling"):
                    tok = sampler(self._last_logits())
                produced.append(tok)
                if len(produced) == 1:
                    timings.ttft_ms = (time.perf_counter() - t_start - paused) * 1e3
                with clock("detokenize"):
                    full = self.tokenizer.decode(produced, skip_special_tokens=True)
                    cut = -1
                    for s in stops:
                        i = full.find(s, max(0, len(emitted) - len(s)))
                        if i >= 0 and (cut < 0 or i < cut):
                            cut = i
                    done = False
                    if tok == eos_id:
                        finish, done = "eos", True
                    if cut >= 0:
                        full, finish, done = full[:cut], "stop_string", True
                    if not done and len(produced) >= max_new_tokens:
                        finish, done = "max_new_tokens", True
                    if not done and n_ctx >= self.context_length:
                        finish, done = "context_full", True
                    if done:
                        safe = len(full)
                    else:
                        safe = len(full) - _longest_stop_prefix(full, stops)
                        while safe > len(emitted) and full[safe - 1] == "\ufffd":    # incomplete UTF-8 sequence
                            safe -= 1
                    delta = full[len(emitted):safe] if safe > len(emitted) and full.startswith(emitted) else ""
                if delta:
                    emitted += delta
                    t_pause = time.perf_counter()
                    yield delta
                    paused += time.perf_counter() - t_pause
                if done:
                    final_text = full
                    break
                t_step = time.perf_counter()
                c_step = time.process_time()
                if self.native is not None:                    # same KV buffers, same weights, no ORT call
                    self.native.step(self.embed_table[tok], n_ctx, self._logits_row)
                else:
                    np.copyto(self._step_embeds[0, 0], self.embed_table[tok], casting="unsafe")
                    self._step_pos[0, 0] = n_ctx
                    self._bind_step(self._step_embeds, self._step_pos, n_ctx + 1)
                    self._bind_outputs()
                    self._run_decoder()
                self.kv.commit(n_ctx + 1)
                n_ctx += 1
                dt = time.perf_counter() - t_step
                decode_cpu += time.process_time() - c_step
                clock.add("decode", dt)
                step_ms.append(dt * 1e3)

            if not final_text.startswith(emitted):
                log.warning("streamed text is not a prefix of the final text (tokenizer decode is not "
                            "prefix-stable here); the final text is authoritative")
            total = time.perf_counter() - t_start - paused
            timings.preprocess_ms, timings.tokenize_ms = clock.ms("preprocess"), clock.ms("tokenize")
            timings.vision_ms, timings.prefill_ms = clock.ms("vision"), clock.ms("prefill")
            timings.decode_ms, timings.sampling_ms = clock.ms("decode"), clock.ms("sampling")
            timings.detokenize_ms = clock.ms("detokenize")
            timings.generated_tokens = len(produced)
            timings.cpu_ms = (time.process_time() - cpu_start) * 1e3
            timings.decode_cpu_ms_per_token = decode_cpu * 1e3 / len(step_ms) if step_ms else 0.0
            timings.finalize(total, step_ms)
            return Result(text=final_text, tokens=produced, timings=timings, finish_reason=finish, prompt=text,
                          prompt_ids=list(ids))

    @property
    def decode_backend(self) -> str:
        """``"native"`` when decode steps run on the native kernel, else ``"onnxruntime"``."""
        return "native" if self.native is not None else "onnxruntime"

    def close(self) -> None:
        """Drop the ORT sessions and the native decoder (frees their memory)."""
        self.native = None
        for name in ("_binding", "decoder_session", "vision_session"):
            if hasattr(self, name):
                delattr(self, name)

    def __repr__(self) -> str:
        return (f"Session(bundle='{self.bundle.root}', model='{self.config.name}', threads={self.threads}, "
                f"providers={[p if isinstance(p, str) else p[0] for p in self.providers]}, "
                f"kv_mode='{self.kv_spec.mode}', decode='{self.decode_backend}', load_s={self.load_s:.3f})")
