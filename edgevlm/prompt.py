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
                 with_image: bool = True) -> str:
    """The generation prompt for one question. ``<image>`` is prepended unless the question already holds it."""
    t = template(template_name)
    sys_text = t["system"] if system is None else system
    if with_image and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
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


def check_prompt_ids(ids: Sequence[int], visual_tokens: int, context_length: int, max_new_tokens: int = 0) -> int:
    """Validate a tokenized prompt; returns its length once images are spliced in.

    ``PromptError`` when the placeholder is missing or repeated, or when the prompt alone is longer than the context.
    ``max_new_tokens`` (the request's) is counted in that message, so its arithmetic is the whole request's: prompt
    + new tokens vs. the context. A prompt that fits but leaves fewer than ``max_new_tokens`` positions is not an
    error: the answer stops when the context is full (``finish_reason == "context_full"``).
    """
    n_images = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if n_images == 0:
        raise PromptError(f"the prompt has no '{IMAGE_PLACEHOLDER}' placeholder; put '{IMAGE_PLACEHOLDER}' where the "
                          f"image goes, or pass the plain question and let the template add it")
    if n_images > 1:
        raise PromptError(f"the prompt has {n_images} '{IMAGE_PLACEHOLDER}' placeholders; one image per request is "
                          f"supported")
    length = len(ids) - 1 + visual_tokens
    if length > context_length:
        raise PromptError(prompt_too_long_message(length, visual_tokens, context_length, max_new_tokens))
    return length


def prompt_too_long_message(length: int, visual_tokens: int, context_length: int, max_new_tokens: int = 0) -> str:
    """``prompt is N tokens (V visual + T text) + K new tokens requested (--max-new-tokens) = N + K, but the context
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
