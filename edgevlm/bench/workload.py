"""Benchmark workloads: a distinct synthetic image per request and prompts of an exact text-token length
(numpy + PIL + the bundle's tokenizer; no torch).

    >>> from edgevlm.bench.workload import ImageStream, fit_prompt
    >>> images = ImageStream(size=(336, 336), seed=0)
    >>> img, tag = images.next()                 # a new image every call (never repeated within a stream)
    >>> prompt, n = fit_prompt(session, 64)      # session.tokenize(prompt) gives exactly 64 text tokens

**Images**: every measured request gets an image no other request of the run used (peers.md §3: a cached image
encode masquerades as speed; llama-server's TTFT drops from 2,287 ms to 114 ms on a repeated image). The runtime has no
image cache today, but the bench must stay honest if one appears. Images are random colour fields with a few random
shapes, drawn with PIL from ``numpy.random.default_rng([seed, index])``; ``tag`` is the first 12 hex digits of the
pixels' sha256 so a report proves the requests' images were distinct.

**Prompts**: ``fit_prompt`` grows a filler question word by word until the session's own tokenization (template,
BOS and the text around ``<image>``) counts exactly ``n`` text tokens, i.e. ``RequestTimings.text_tokens == n``
(Tks_in = visual tokens + n). ``mode="raw"`` (default) sends ``<image>\\n`` + filler without the chat template, so any
``n`` >= 2 is reachable; ``mode="template"`` wraps the filler in the bundle's template (``n`` must exceed the
template's own length: ~45 tokens for Vicuna v1 with the LLaMA tokenizer).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from edgevlm.errors import ConfigError, PromptError

__all__ = ["ImageStream", "make_image", "fit_prompt", "FILLER_WORDS", "PROMPT_MODES"]

PROMPT_MODES = ("raw", "template")
FILLER_WORDS = ("describe", "the", "picture", "in", "detail", "what", "colour", "is", "each", "shape", "and", "where",
                "does", "it", "sit", "relative", "to", "other", "objects", "near", "edge", "of", "image", "how", "many",
                "are", "there", "a", "small", "red", "circle", "blue", "square", "green", "triangle", "left", "right",
                "top", "bottom", "corner", "center", "large", "bright", "dark", "background", "with", "some", "noise")


def make_image(index: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A ``[H, W, 3]`` uint8 image unique to ``(seed, index)``: a random colour field plus a few random shapes."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng([int(seed), int(index)])
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-40, 41, size=(h, w, 3))
    arr = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, max(1, w - 2))), int(rng.integers(0, max(1, h - 2)))
        x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return np.asarray(img)


class ImageStream:
    """Distinct images on demand: ``next()`` -> ``(image, tag)``; ``tags`` lists every image handed out."""

    def __init__(self, size: tuple[int, int], seed: int = 0, start: int = 0) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.index = int(start)
        self.tags: list[str] = []

    def next(self) -> tuple[np.ndarray, str]:
        img = make_image(self.index, self.size, self.seed)
        self.index += 1
        tag = hashlib.sha256(img.tobytes()).hexdigest()[:12]
        self.tags.append(tag)
        return img, tag


def _count(session: Any, prompt: str, raw: bool) -> int:
    _, _, length = session.tokenize(prompt, raw)
    return int(length) - int(session.visual_tokens)


def fit_prompt(session: Any, n: int, mode: str = "raw", max_words: int = 4096) -> tuple[str, int]:
    """A prompt whose tokenization by ``session`` (``Session.tokenize``) has exactly ``n`` text tokens.

    Returns ``(prompt, text_tokens)``; the prompt is passed to ``generate`` with ``raw_prompt=(mode == "raw")``.
    Raises ``PromptError`` when ``n`` is below the mode's fixed overhead (BOS, ``<image>`` separators, template) or
    no filler lands exactly on ``n`` (the closest count is named).
    """
    if mode not in PROMPT_MODES:
        raise ConfigError(f"prompt mode '{mode}' unknown; known: {', '.join(PROMPT_MODES)}")
    raw = mode == "raw"

    def render(words: list[str]) -> str:
        text = " ".join(words)
        return f"<image>\n{text}" if raw else (text or "?")

    words: list[str] = []
    base = _count(session, render(words), raw)
    if n < base:
        raise PromptError(f"{n} text tokens is below the {'raw' if raw else 'template'} prompt's own length ({base} "
                          f"tokens: BOS, separators{'' if raw else ', chat template'}); ask for >= {base} prompt tokens"
                          f"{'' if raw else ' or use prompt mode raw'}")
    if n == base and raw:
        return render(words), base
    i = 0
    count = base
    while count < n and len(words) < max_words:
        words.append(FILLER_WORDS[i % len(FILLER_WORDS)])
        i += 1
        count = _count(session, render(words), raw)
    if count == n:
        return render(words), count
    # overshoot: try other last words (short ones first), then dropping the last word and trying two short ones
    closest = (abs(count - n), count)
    stem = words[:-1]
    for w in sorted(FILLER_WORDS, key=len) + [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz"):
        c = _count(session, render(stem + [w]), raw)
        if c == n:
            return render(stem + [w]), c
        closest = min(closest, (abs(c - n), c))
    for w1 in ("a", "the", "is", "1"):
        for w2 in list("abcdefghijklmnopqrstuvwxyz") + [str(d) for d in range(10)]:
            c = _count(session, render(stem[:-1] + [w1, w2]), raw)
            if c == n:
                return render(stem[:-1] + [w1, w2]), c
            closest = min(closest, (abs(c - n), c))
    raise PromptError(f"no filler prompt tokenizes to exactly {n} text tokens (closest: {closest[1]}); pick another "
                      f"--prompt-tokens value")
