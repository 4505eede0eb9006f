"""The generation loop: one function over any ``Decoder`` (``edgevlm.runtime.decoders``), read top to bottom.

    prefill(prompt embeddings) -> logits        (or: rewind(kept prefix) + extend(the rest), prompt-prefix reuse)
    loop:
        token = sample(logits)                          (edgevlm.runtime.sampling)
        text  = detokenize(tokens); stop at EOS / a stop string / max_new_tokens / a full context
        yield the new text (holding back a possible stop-string prefix and half a UTF-8 character)
        logits = step(embedding of token)

``Session`` wraps a request's ``Generation`` into a ``Result`` (``Stream`` iterates its deltas).
``generate_stream`` is a generator of text deltas whose return value is a ``Generation`` (tokens, text, finish
reason, per-step times). The caller's ``Clock`` receives ``prefill`` / ``sampling`` / ``detokenize`` / ``decode``;
the time the consumer spends between deltas is measured (``paused_s``) so that it can be excluded.

numpy only; never torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from edgevlm.runtime.caches import KVReuseUnsupported
from edgevlm.runtime.sampling import Sampler, SamplingParams
from edgevlm.runtime.timings import Clock, RequestTimings

log = logging.getLogger(__name__)

__all__ = ["Generation", "generate_stream", "longest_stop_prefix", "FINISH_REASONS", "Result", "Stream"]

FINISH_REASONS = ("eos", "stop_string", "max_new_tokens", "context_full")


@dataclass
class Generation:
    """What the loop produced. ``tokens`` include the terminating EOS (like the PyTorch reference); ``text`` is
    cut before a stop string; ``last_logits`` is the row the last token was selected from (a decoder view)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "max_new_tokens"
    step_ms: list[float] = field(default_factory=list)     # one per decode step (prefill excluded)
    decode_cpu_s: float = 0.0                              # process CPU time over the decode steps
    ttft_s: float = 0.0                                    # t_start -> first token selected (pauses excluded)
    paused_s: float = 0.0                                  # time spent by the consumer between deltas
    last_logits: Any = None
    cached_tokens: int = 0                                 # prompt tokens kept in the KV cache, not prefilled


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


def longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back when
    streaming, so a stop string is never half-emitted)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _first_stop(full: str, emitted: int, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``full`` (searching from just before the emitted text), or -1."""
    cut = -1
    for s in stops:
        i = full.find(s, max(0, emitted - len(s)))
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return cut


def generate_stream(decoder: Any, prompt_embeds: np.ndarray, *, embed_table: np.ndarray, tokenizer: Any,
                    sampling: SamplingParams, max_new_tokens: int, eos_id: int | None = None,
                    stop_strings: Sequence[str] = (), ignore_eos: bool = False, max_context: int | None = None,
                    clock: Clock | None = None, t_start: float | None = None, reuse: int = 0,
                    fed: list[int] | None = None) -> Generator[str, None, Generation]:
    """Generate after ``prompt_embeds`` (``[1, T, D]``) on ``decoder``; yields text deltas, returns a
    ``Generation``.

    Args:
        decoder: a ``Decoder`` (prefill / step); its KV cache is reset by the prefill.
        prompt_embeds: the spliced prompt, ``[1, T, D]``.
        embed_table: ``[vocab, D]`` rows of the token embeddings (the next step's input).
        tokenizer: a ``tokenizers.Tokenizer`` (``decode(ids, skip_special_tokens=True)``).
        sampling: greedy when ``temperature == 0``.
        max_new_tokens: at most this many tokens (the EOS counts).
        eos_id: ends the answer (``None``: never).
        stop_strings: end the answer before the first occurrence of any of them.
        ignore_eos: benchmark mode: neither EOS nor stop strings end the answer.
        max_context: stop with ``"context_full"`` when the cache holds this many tokens (default: the decoder's).
        clock: receives ``prefill``, ``sampling``, ``detokenize`` and ``decode`` times.
        t_start: when the request started (``time.perf_counter``), for ``ttft_s``; default: now.
        reuse: the decoder's KV cache already holds ``prompt_embeds[:, :reuse]`` (prompt-prefix reuse): keep those
            rows (``decoder.rewind(reuse)``) and prefill the rest (``decoder.extend``); a decoder that cannot
            (``KVReuseUnsupported``, or no ``rewind``) gets the whole prompt. ``Generation.cached_tokens`` says how
            many were kept. Must be < T (the last prompt position's logits are computed).
        fed: a list that receives each generated token once its step has run (it is then in the KV cache), so a
            caller knows what the cache holds even if the consumer stops the generator early.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    clock = clock or Clock()
    context = min(int(max_context or decoder.max_context), int(decoder.max_context))
    stops = [] if ignore_eos else list(dict.fromkeys(s for s in stop_strings if s))
    eos = None if ignore_eos else eos_id
    sampler = Sampler(sampling)
    out = Generation()

    with clock("prefill"):
        logits = None
        t_prompt = int(np.shape(prompt_embeds)[-2])
        if 0 < reuse < t_prompt and hasattr(decoder, "rewind") and reuse <= decoder.length:
            try:
                decoder.rewind(reuse)
                logits = decoder.extend(prompt_embeds[..., reuse:, :])
                out.cached_tokens = int(reuse)
            except KVReuseUnsupported as exc:
                log.debug("prompt-prefix reuse off for this decoder: %s", exc)
        if logits is None:
            logits = decoder.prefill(prompt_embeds)             # [vocab] of the prompt's last position
    emitted = ""
    while True:
        with clock("sampling"):
            token = sampler(logits)
        out.tokens.append(token)
        out.last_logits = logits
        if len(out.tokens) == 1:
            out.ttft_s = time.perf_counter() - t_start - out.paused_s

        with clock("detokenize"):
            full = tokenizer.decode(out.tokens, skip_special_tokens=True)
            cut = _first_stop(full, len(emitted), stops)
            finish = None
            if token == eos:
                finish = "eos"
            if cut >= 0:
                full, finish = full[:cut], "stop_string"
            if finish is None and len(out.tokens) >= max_new_tokens:
                finish = "max_new_tokens"
            if finish is None and decoder.length >= context:
                finish = "context_full"
            safe = len(full)
            if finish is None:                                  # hold back what may still become a stop string
                safe -= longest_stop_prefix(full, stops)
                while safe > len(emitted) and full[safe - 1] == "\ufffd":    # an incomplete UTF-8 sequence
                    safe -= 1
            delta = full[len(emitted):safe] if safe > len(emitted) and full.startswith(emitted) else ""
        if delta:
            emitted += delta
            t_pause = time.perf_counter()
            yield delta
            out.paused_s += time.perf_counter() - t_pause
        if finish is not None:
            out.text, out.finish_reason = full, finish
            break

        t_step, c_step = time.perf_counter(), time.process_time()
        logits = decoder.step(embed_table[token])              # [D] row -> [vocab]
        if fed is not None:
            fed.append(token)
        dt = time.perf_counter() - t_step
        out.decode_cpu_s += time.process_time() - c_step
        clock.add("decode", dt)
        out.step_ms.append(dt * 1e3)

    if not out.text.startswith(emitted):
        log.warning("streamed text is not a prefix of the final text (tokenizer decode is not prefix-stable "
                    "here); the final text is authoritative")
    return out
