"""Prompt template and MobileVLM's chunk-wise tokenization (torch-free; shared by training, export and runtime).

The Vicuna v1 template (``conv_vicuna_v1`` in MobileVLM) renders one image question as::

    "<system> USER: <image>\\n<question> ASSISTANT:"

and a training turn appends ``" <answer></s>"``. MobileVLM tokenizes the text on each side of ``<image>``
separately (each chunk gets SentencePiece's dummy prefix; only the first chunk keeps its BOS) and puts a single
``IMAGE_TOKEN_INDEX`` (-200) where the image embeddings are spliced in. ``tokenize_prompt`` reproduces that with a
``tokenizers.Tokenizer`` (the fast tokenizer file that every bundle carries).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from edgevlm.config import VICUNA_V1_SYSTEM
from edgevlm.errors import PromptError

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
STOP_STRING = "</s>"

TEMPLATES = {
    "vicuna_v1": {"system": VICUNA_V1_SYSTEM, "user": "USER", "assistant": "ASSISTANT", "sep": " ", "sep2": "</s>"},
}


class TokenizerLike(Protocol):
    def encode(self, sequence: str, add_special_tokens: bool = True):  # -> tokenizers.Encoding
        ...


def template(name: str = "vicuna_v1") -> dict[str, str]:
    if name not in TEMPLATES:
        raise PromptError(f"prompt template '{name}' unknown; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompt(question: str, template_name: str = "vicuna_v1", system: str | None = None,
                 with_image: bool = True, images: int = 1) -> str:
    """The generation prompt for one question. ``images`` ``<image>\\n`` placeholders (one by default) are
    prepended unless the question already holds ``<image>``."""
    t = template(template_name)
    sys_text = t["system"] if system is None else system
    if with_image and IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * max(1, int(images)) + question
    return f"{sys_text}{t['sep']}{t['user']}: {question}{t['sep']}{t['assistant']}:"


def build_conversation(turns: Sequence[tuple[str, str]], template_name: str = "vicuna_v1",
                       system: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render (question, answer) turns. Returns the text and the character spans of the answers (incl. ``</s>``),
    which are the only positions that carry loss in stage-2 training."""
    t = template(template_name)
    text = t["system"] if system is None else system
    spans: list[tuple[int, int]] = []
    for question, answer in turns:
        text += f"{t['sep']}{t['user']}: {question}{t['sep']}{t['assistant']}:"
        start = len(text)
        text += f" {answer}{t['sep2']}"
        spans.append((start, len(text)))
    return text, spans


def tokenize_prompt(prompt: str, tokenizer: TokenizerLike, bos_token_id: int | None) -> list[int]:
    """MobileVLM's ``tokenizer_image_token``: chunk-wise encoding with one ``IMAGE_TOKEN_INDEX`` per ``<image>``."""
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    ids: list[int] = [bos_token_id] if bos_token_id is not None else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    return ids


def check_prompt_ids(ids: Sequence[int], visual_tokens: int, context_length: int, max_new_tokens: int = 0,
                     images: int = 1) -> int:
    """Validate a tokenized prompt for ``images`` images; returns its length once they are spliced in
    (``len(ids) - images + images * visual_tokens``).

    ``PromptError`` when the prompt does not hold exactly ``images`` placeholders (one per image, spliced in
    order), or when the prompt alone is longer than the context. ``max_new_tokens`` (the request's) is counted in
    that message, so its arithmetic is the whole request's: prompt + new tokens vs. the context. A prompt that fits
    but leaves fewer than ``max_new_tokens`` positions is not an error: the answer stops when the context is full
    (``finish_reason == "context_full"``).
    """
    images = int(images)
    n_found = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if n_found == 0:
        raise PromptError(f"the prompt has no '{IMAGE_PLACEHOLDER}' placeholder but {images} image(s) were given; put "
                          f"'{IMAGE_PLACEHOLDER}' where each image goes, or pass the plain question and let the "
                          f"template add them")
    if n_found != images:
        raise PromptError(f"the prompt has {n_found} '{IMAGE_PLACEHOLDER}' placeholders but {images} image(s) were "
                          f"given; put one '{IMAGE_PLACEHOLDER}' per image (spliced in order)")
    visual = images * visual_tokens
    length = len(ids) - images + visual
    if length > context_length:
        raise PromptError(prompt_too_long_message(length, visual, context_length, max_new_tokens))
    return length


def prompt_too_long_message(length: int, visual_tokens: int, context_length: int, max_new_tokens: int = 0) -> str:
    """``visual_tokens``: all images' visual tokens together.

    ``prompt is N tokens (V visual + T text) + K new tokens requested (--max-new-tokens) = N + K, but the context
    holds M; ...``: the request's arithmetic and the fix (shorten the prompt, by how much, or lower
    --max-new-tokens)."""
    text = length - visual_tokens
    new = max(0, int(max_new_tokens))
    head = f"prompt is {length} tokens ({visual_tokens} visual + {text} text)"
    if new:
        head += f" + {new} new tokens requested (--max-new-tokens) = {length + new}"
    over_prompt, over_all = length - context_length, length + new - context_length
    if not new:
        fix = f"shorten the prompt by at least {over_prompt} tokens"
    elif over_prompt > 0:
        fix = f"shorten the prompt by {over_all} tokens, or by at least {over_prompt} and lower --max-new-tokens"
    else:
        fix = f"shorten the prompt by {over_all} tokens or lower --max-new-tokens to {context_length - length}"
    return f"{head}, but the context holds {context_length}; {fix}"
