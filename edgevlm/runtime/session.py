"""``Session``: read a bundle -> choose the vision encoder and the decoder -> run the generation loop; no torch.

    >>> from edgevlm.runtime import Session
    >>> s = Session.from_bundle("out/tiny-bundle", threads=2)             # backend="auto"
    >>> r = s.generate("cat.jpg", "What is in the picture?", max_new_tokens=64)
    >>> r.text, r.tokens, r.timings.decode_tok_s, s.vision_backend, s.decoder_backend
    >>> for delta in s.stream("cat.jpg", "Describe it.", temperature=0.7, seed=0):
    ...     print(delta, end="", flush=True)

One request: tokenize (template from the manifest) -> preprocess (PIL + numpy) -> ``VisionEncoder.encode`` ->
embedding gather + image splice (numpy) -> ``generation.generate_stream`` over the ``Decoder`` (prefill, then one
step per token). The backends (``edgevlm.runtime.decoders``):

=============  =====================================  ======================================================
``backend``    vision                                 decoder
=============  =====================================  ======================================================
``"ort"``      ONNX Runtime (``providers``)           ``OrtDecoder`` (IOBinding; KV on the EP's device)
``"native"``   ONNX Runtime                           ``NativeStepDecoder`` (ORT prefill + native C steps)
``"tensorrt"`` the vision engine                      the decoder engine (``trt_backend.TrtDecoderRunner``)
``"auto"``     TensorRT when the bundle's engines were built for this GPU and TensorRT, else native where it
               runs, else ONNX Runtime (``native_decode="on"`` / ``"off"`` still select native / ORT)
=============  =====================================  ======================================================

Caches (``edgevlm.runtime.caches``; off unless asked for, so ``edgevlm run`` / ``bench`` measure cold requests;
``edgevlm serve`` turns them on): ``image_cache_mib`` bounds an LRU of image embeddings keyed by the preprocessed
pixels' sha256 (a hit skips the vision encoder: ``timings.image_cache_hit``); ``prefix_cache`` keeps the KV rows of
the longest prefix the new spliced prompt shares with what the decoder holds from the previous request (system
prompt, the same image again, a re-sent chat history) and prefills only the rest (``timings.cached_tokens``).
Greedy tokens are the same with and without them (``tests/test_caches.py``).

A Session runs one request at a time (a lock serializes concurrent calls). Greedy output equals
``edgevlm.model.MobileVLM.generate`` token for token on fp32 bundles (``tests/test_runtime.py``), and is the same
on every backend (``tests/test_decoders.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgevlm.bundle import Bundle, load_embedding_table
from edgevlm.errors import BundleError, ConfigError
from edgevlm.preprocess import DEFAULT_MAX_PIXELS, ImageInput
from edgevlm.prompt import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, build_prompt, check_prompt_ids, tokenize_prompt
from edgevlm.runtime.backends import BackendOptions, cache_home, preload_request_modules
from edgevlm.runtime.bundle_io import open_verified
from edgevlm.runtime.caches import RequestCaches
from edgevlm.runtime.choose import open_backends
from edgevlm.runtime.image_splice import count_images, pixels_list, splice_images
from edgevlm.runtime.session_attributes import SessionAttributes
from edgevlm.runtime.decoders import NATIVE_MODES, DecoderIO, resolve_backend
from edgevlm.runtime.generation import Result, Stream, generate_stream, longest_stop_prefix
from edgevlm.runtime.kv_cache import KVSpec
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.timings import Clock, RequestTimings

log = logging.getLogger(__name__)

__all__ = ["Session", "Result", "Stream", "open_verified", "NATIVE_MODES"]

_longest_stop_prefix = longest_stop_prefix           # the old private name (tests, callers)


def _coarse(decoder_backend: str) -> str:
    """``Decoder.backend`` -> the older ``decode_backend`` names (``"onnxruntime"``, ``"native"``, ``"tensorrt"``)."""
    return "onnxruntime" if decoder_backend.startswith("onnxruntime") else decoder_backend


class Session(SessionAttributes):
    """A loaded bundle ready to answer requests. Create with ``Session.from_bundle``."""

    def __init__(self, bundle: Bundle, *, options: BackendOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, image_cache_mib: float = 0.0,
                 prefix_cache: bool = False) -> None:
        t_load = time.perf_counter()
        opts = options or BackendOptions()
        self.bundle, self.options, self.max_pixels = bundle, opts, max_pixels
        self.config = bundle.model_config
        self.visual_tokens = bundle.visual_tokens
        breakdown: dict[str, float] = {}
        self._read_prompt_facts(bundle)
        self.preprocess_config = bundle.preprocess_config

        t = time.perf_counter()
        preload_request_modules()
        breakdown["imports_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.tokenizer = self._load_tokenizer(bundle)
        breakdown["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.embed_table = load_embedding_table(bundle)                   # [vocab, D] memory-mapped
        if self.tokenizer.get_vocab_size() > self.embed_table.shape[0]:
            raise BundleError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but the embedding table "
                              f"only {self.embed_table.shape[0]} rows; re-export the bundle")
        breakdown["embed_s"] = time.perf_counter() - t

        # ---- choose the backends -----------------------------------------------------------------------------
        self.io = DecoderIO.from_bundle(bundle)
        self.kv_spec: KVSpec = self.io.kv_spec
        context = min(int(self.config.context_length), self.io.max_context)
        chosen = open_backends(bundle, opts, context)                 # edgevlm.runtime.choose
        self.vision, self.decoder = chosen.vision, chosen.decoder
        self.providers, self.device_type, self.native_info = chosen.providers, chosen.device_type, chosen.native_info
        self.int8_warning: str | None = chosen.int8_warning
        breakdown.update(chosen.breakdown)
        self.load_overlapped = dict(chosen.overlapped)   # e.g. the vision session, built beside the decoder's
        self.context_length = min(context, int(self.decoder.max_context))
        self.hidden_size, self.vocab_size = int(self.embed_table.shape[1]), int(self.embed_table.shape[0])
        if self.decoder.hidden_size != self.hidden_size:
            raise BundleError(f"the decoder takes {self.decoder.hidden_size}-wide embeddings but the embedding table "
                              f"has {self.hidden_size} columns; re-export the bundle")
        self._embeds_dtype = self.io.embeds_dtype
        self._last: np.ndarray | None = None
        self._lock = threading.Lock()
        self.caches = RequestCaches(image_cache_mib, prefix_cache)   # edgevlm.runtime.caches
        self.verification = "full" if bundle.hashes_verified else "off"
        self.load_s = time.perf_counter() - t_load          # from_bundle adds the bundle read to this
        breakdown["other_s"] = max(0.0, self.load_s - sum(breakdown.values()))   # onnxruntime import, buffers
        self.load_breakdown = breakdown

    def _read_prompt_facts(self, bundle: Bundle) -> None:
        prompt = bundle.manifest["prompt"]
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

    @staticmethod
    def _load_tokenizer(bundle: Bundle) -> Any:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"tokenizer '{bundle.manifest['tokenizer']['file']}' of bundle '{bundle.root}' cannot "
                              f"be read ({exc}); re-export the bundle") from exc

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str | None = None, threads: int | None = None,
                    providers: Sequence[Any] | None = None, verify_hashes: bool = True,
                    optimized_cache: str | os.PathLike | bool | None = None,
                    hash_stamps: str | os.PathLike | None = "auto", spinning: bool = False,
                    profile_dir: str | os.PathLike | None = None, graph_optimization_level: str = "all",
                    decoder_arena: bool = False, save_prepacked: bool = False, native_decode: str = "auto",
                    native_kv: str = "float16", max_pixels: int = DEFAULT_MAX_PIXELS,
                    warmup: bool = False, options: BackendOptions | None = None, image_cache_mib: float = 0.0,
                    prefix_cache: bool = False) -> "Session":
        """Open a bundle (validated; sha256 of every file checked unless ``verify_hashes=False``) and load its
        vision encoder and decoder on ``backend``.

        Args:
            path: the bundle directory.
            backend: ``"auto"`` (default): TensorRT engines when the bundle records engines built for this GPU and
                the installed TensorRT, else the native kernel where it runs, else ONNX Runtime; ``"ort"``;
                ``"native"`` (``NativeUnavailable`` when it cannot run); ``"tensorrt"`` (``MissingDependency``
                naming ``tensorrt`` when it is not installed). ``Session.vision_backend`` / ``decoder_backend``
                say which ran.
            threads: intra-op threads (default: physical cores).
            providers: ONNX Runtime providers, e.g. ``["cpu"]`` (default), ``["cuda"]``.
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
            native_decode: the older switch, with ``backend="auto"``: ``"auto"`` (default) runs decode steps on the
                native kernel when the bundle has a ``native_decode`` plan (int4/int8 CPU exports) and this CPU
                can build it (x86-64, AVX-512 VNNI, a C compiler); ``"on"`` = ``backend="native"``; ``"off"`` =
                ``backend="ort"``. ``Session.native_info`` says which ran and why.
            native_kv: ``"float16"`` (default): the native kernel's attention reads an fp16 copy of the KV cache
                (half the KV bytes per step); ``"float32"``: it reads ONNX Runtime's fp32 buffers.
            max_pixels: images above this many pixels are refused before decoding (decompression bombs).
            warmup: run one tiny request after loading (its time is ``load_breakdown['warmup_s']``, not
                ``load_s``) so the first real request does not pay first-run allocations.
            options: a full ``BackendOptions`` (overrides the keyword options above; ``backend`` still applies
                when given).
            image_cache_mib: bound of the image-embedding cache in MiB (0, the default: off; ``edgevlm serve``
                uses ``caches.DEFAULT_IMAGE_CACHE_MIB`` = 256). See ``configure_caches``.
            prefix_cache: reuse the KV rows of the prompt prefix shared with the previous request (default off).
        """
        t0 = time.perf_counter()
        opts = options or BackendOptions(threads=threads, providers=providers, optimized_cache=optimized_cache,
                                         spinning=spinning, profile_dir=profile_dir,
                                         graph_optimization_level=graph_optimization_level,
                                         decoder_arena=decoder_arena, save_prepacked=save_prepacked,
                                         native_decode=native_decode, native_kv=native_kv)
        if backend is not None:
            from dataclasses import replace

            opts = replace(opts, backend=backend)
        resolve_backend(None, opts)                        # a bad backend / native_decode fails before any read
        stamps = None if hash_stamps is None else (cache_home() / "verified" if hash_stamps == "auto"
                                                    else Path(hash_stamps))
        bundle, verified = open_verified(path, verify_hashes=verify_hashes, stamp_dir=stamps)
        t_read = time.perf_counter() - t0
        session = cls(bundle, options=opts, max_pixels=max_pixels, image_cache_mib=image_cache_mib,
                      prefix_cache=prefix_cache)
        session.verification = verified
        session.load_breakdown = {"read_bundle_s": t_read, **session.load_breakdown}
        session.load_s += t_read
        if warmup:
            session.warmup()
        return session

    # ---- what runs ----------------------------------------------------------------------------------------------
    @property
    def vision_backend(self) -> str:
        """``VisionEncoder.backend``: ``"onnxruntime-cpu"``, ``"onnxruntime-cuda"`` or ``"tensorrt"``."""
        return str(self.vision.backend)

    @property
    def decoder_backend(self) -> str:
        """``Decoder.backend``: ``"onnxruntime-cpu"``, ``"onnxruntime-cuda"``, ``"native"`` or ``"tensorrt"``."""
        return str(self.decoder.backend)

    @property
    def decode_backend(self) -> str:
        """The older coarse name of ``decoder_backend``: ``"onnxruntime"``, ``"native"`` or ``"tensorrt"``."""
        return _coarse(self.decoder_backend)

    @property
    def threads(self) -> int:
        return self.options.resolved_threads

    # ---- caches -------------------------------------------------------------------------------------------------
    def configure_caches(self, *, image_cache_mib: float | None = None, prefix_cache: bool | None = None) -> None:
        """Turn the caches on / off or resize the image cache (``None``: leave as is; ``RequestCaches.configure``)."""
        with self._lock:
            self.caches.configure(image_cache_mib=image_cache_mib, prefix=prefix_cache)

    def clear_caches(self) -> None:
        """Forget the cached image embeddings and the KV prefix (the next request is cold; counters stay)."""
        with self._lock:
            self.caches.clear()

    def cache_stats(self) -> dict[str, Any]:
        """``{"image": {entries, bytes, max_bytes, hits, misses, evictions}, "prefix": {enabled, requests, reused,
        cached_tokens, prompt_tokens}}`` (counters since load)."""
        return self.caches.stats()

    # ---- public helpers -----------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, raw_prompt: bool = False, images: int = 1) -> str:
        """The text that is tokenized: ``prompt`` as is when ``raw_prompt`` or when it already holds ``<image>``
        (a full prompt), else the manifest's template around the question (``images`` ``<image>`` prepended)."""
        if raw_prompt or IMAGE_PLACEHOLDER in prompt:
            return prompt
        return build_prompt(prompt, self.template, system=self.system, images=images)

    def tokenize(self, prompt: str, raw_prompt: bool = False, max_new_tokens: int = 0,
                 images: int = 1) -> tuple[str, list[int], int]:
        """(rendered prompt, ids with one -200 per image, spliced length). Raises ``PromptError`` unless there are
        exactly ``images`` placeholders, or on a prompt longer than the context (the message counts the request's
        ``max_new_tokens``)."""
        text = self.render_prompt(prompt, raw_prompt, images)
        ids = tokenize_prompt(text, self.tokenizer, self.bos_id)
        length = check_prompt_ids(ids, self.visual_tokens, self.context_length, max_new_tokens, images)
        return text, ids, length

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """``[1, 3, S, S]`` -> image embeddings ``[1, V, D]`` (the vision encoder)."""
        return self.vision.encode(pixel_values)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of the embedding table, ``[len(ids), D]`` in the decoder's input dtype."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=self._embeds_dtype)

    def splice(self, ids: Sequence[int], image_embeds: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Text embeddings with image k's embeddings (``[1, V, D]`` for one image, or a list of them) in place of
        the k-th -200, in order: ``[1, T - N + N * V, D]`` (``image_splice.splice_images``)."""
        return splice_images(ids, image_embeds, self.embed, self.hidden_size, self._embeds_dtype)

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
        if self._last is None:
            raise ConfigError("no request has run on this Session yet")
        return np.array(self._last, dtype=np.float32)

    def end_profiling(self) -> list[str]:
        """Close the ORT profiles (``profile_dir``); returns their paths."""
        return [c.end_profiling() for c in (self.vision, self.decoder) if hasattr(c, "end_profiling")]

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str, *,
                 max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, stream: Callable[[str], Any] | None = None,
                 raw_prompt: bool = False, pixel_values: np.ndarray | None = None,
                 ignore_eos: bool = False) -> Result:
        """Answer one request.

        Args:
            image: a path, bytes, PIL image or ``[H, W(, 3)]`` uint8 array, or a list/tuple of them (several
                images: image k is spliced at the k-th ``<image>``; ignored when ``pixel_values`` given).
            prompt: the question (the manifest's template is applied, one ``<image>`` per image), or a full prompt
                holding one ``<image>`` per image.
            max_new_tokens: at most this many generated tokens (also bounded by the context).
            temperature: 0 = greedy; > 0 samples.
            top_k: keep the k most likely tokens (0 = off).
            top_p: nucleus sampling mass (1 = off).
            seed: random seed for sampling (None = fresh entropy).
            stop: extra stop strings (the manifest's, e.g. ``</s>``, always apply).
            stream: called with each text delta as it is produced.
            raw_prompt: use ``prompt`` verbatim (no template); it must hold ``<image>``.
            pixel_values: preprocessed ``[3, S, S]`` / ``[N, 3, S, S]`` float pixels instead of ``image``.
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

    def stream(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str, **kwargs: Any) -> Stream:
        """Like ``generate`` but returns an iterator of text deltas (``.result`` after the last one)."""
        kwargs.pop("stream", None)
        max_new_tokens = kwargs.pop("max_new_tokens", 256)
        sampling = SamplingParams(kwargs.pop("temperature", 0.0), kwargs.pop("top_k", 0), kwargs.pop("top_p", 1.0),
                                  kwargs.pop("seed", None))
        return Stream(self._request(image, prompt, max_new_tokens=max_new_tokens, sampling=sampling, **kwargs))

    def _encode_checked(self, pixel_values: np.ndarray) -> np.ndarray:
        image_embeds = self.encode_image(pixel_values)                                     # [1, V, D]
        if image_embeds.shape[1] != self.visual_tokens:
            raise BundleError(f"the vision graph produced {image_embeds.shape[1]} tokens but the manifest says "
                              f"{self.visual_tokens}; re-export the bundle")
        return image_embeds

    def _pixels(self, image: Any, pixel_values: np.ndarray | None) -> list[np.ndarray]:
        """One ``[1, 3, S, S]`` per image of the request (``image_splice.pixels_list``)."""
        return pixels_list(image, pixel_values, self.preprocess_config, self.max_pixels)

    def _request(self, image: ImageInput | Sequence[ImageInput] | None, prompt: str, *, max_new_tokens: int,
                 sampling: SamplingParams,
                 stop: Sequence[str] | None = None, raw_prompt: bool = False,
                 pixel_values: np.ndarray | None = None, ignore_eos: bool = False):
        """The request as a generator of text deltas; returns the ``Result``. Time spent by the consumer between
        deltas is excluded from the timings."""
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        with self._lock:
            t_start, cpu_start = time.perf_counter(), time.process_time()
            clock = Clock()
            timings = RequestTimings(load_s=self.load_s, threads=self.threads, load_breakdown=dict(self.load_breakdown),
                                     decode_backend=self.decode_backend, vision_backend=self.vision_backend,
                                     decoder_backend=self.decoder_backend)
            n = timings.images = max(1, count_images(image, pixel_values))
            with clock("tokenize"):
                text, ids, length = self.tokenize(prompt, raw_prompt, max_new_tokens, n)
            with clock("preprocess"):
                pvs = self._pixels(image, pixel_values)                                    # [1, 3, S, S] each
            with clock("vision"):                          # each image: from the embedding cache or encoded
                got = [self.caches.embeddings(pv, self._encode_checked) for pv in pvs]
            timings.image_cache_hit = all(hit for _, _, hit in got)
            with clock("prefill"):
                embeds = self.splice(ids, [e for e, _, _ in got])                          # [1, T, D]
            timings.prompt_tokens, timings.visual_tokens = length, n * self.visual_tokens
            timings.text_tokens = length - n * self.visual_tokens

            # prompt-prefix reuse: what the decoder holds (previous prompt + fed tokens) vs this prompt
            keys = [k for _, k, _ in got]
            ident, reuse = self.caches.plan_reuse(ids, keys, self.visual_tokens, IMAGE_TOKEN_INDEX, self.decoder)
            fed: list[int] = []
            try:
                g = yield from generate_stream(
                    self.decoder, embeds, embed_table=self.embed_table, tokenizer=self.tokenizer, sampling=sampling,
                    max_new_tokens=int(max_new_tokens), eos_id=self.eos_id,
                    stop_strings=[*self.stop_strings, *(stop or [])], ignore_eos=ignore_eos,
                    max_context=self.context_length, clock=clock, t_start=t_start, reuse=reuse, fed=fed)
            finally:                               # also when the consumer closes the stream early
                self.caches.remember(ident, fed, self.decoder.length)
            self._last = g.last_logits
            timings.cached_tokens = int(g.cached_tokens)
            self.caches.count(length, g.cached_tokens)

            total = time.perf_counter() - t_start - g.paused_s
            timings.ttft_ms = g.ttft_s * 1e3
            timings.preprocess_ms, timings.tokenize_ms = clock.ms("preprocess"), clock.ms("tokenize")
            timings.vision_ms, timings.prefill_ms = clock.ms("vision"), clock.ms("prefill")
            timings.decode_ms, timings.sampling_ms = clock.ms("decode"), clock.ms("sampling")
            timings.detokenize_ms = clock.ms("detokenize")
            timings.generated_tokens = len(g.tokens)
            timings.cpu_ms = (time.process_time() - cpu_start) * 1e3
            timings.decode_cpu_ms_per_token = g.decode_cpu_s * 1e3 / len(g.step_ms) if g.step_ms else 0.0
            timings.finalize(total, g.step_ms)
            return Result(text=g.text, tokens=g.tokens, timings=timings, finish_reason=g.finish_reason, prompt=text,
                          prompt_ids=list(ids))

    def info(self) -> dict[str, Any]:
        """What runs: ``{"vision": VisionEncoder.info(), "decoder": Decoder.info()}``."""
        return {"vision": self.vision.info(), "decoder": self.decoder.info()}

    def close(self) -> None:
        """Free the vision encoder and the decoder (ORT sessions, native kernel, TensorRT engines); idempotent."""
        for name in ("decoder", "vision"):
            part = self.__dict__.pop(name, None)
            if part is not None:
                part.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session(bundle='{self.bundle.root}', model='{self.config.name}', threads={self.threads}, "
                f"vision='{self.vision_backend}', decoder='{self.decoder_backend}', kv_mode='{self.kv_spec.mode}', "
                f"load_s={self.load_s:.3f})")
