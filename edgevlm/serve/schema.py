"""OpenAI Chat Completions in and out: request parsing/validation (``parse_chat_request``), the prompt built from
the messages (``render_messages``), and the response / chunk / usage / timings objects.

Validation is by hand (no pydantic): every refusal is a ``ServeError(400, ..., param=<the field>)``. Unknown fields
are ignored, as llama-server and vLLM do (clients send ``user``, ``frequency_penalty``, ...). ``n`` must be 1.

A request carries one or more ``image_url`` parts (at most ``max_images``, ``--max-images``, default
``MAX_IMAGES`` = 4): the prompt gets one ``<image>`` per image part, where the part is, in message order, and the
runtime splices image k's visual tokens at the k-th ``<image>`` (as MobileVLM / LLaVA do). None, or more than the
limit, are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgevlm.serve.errors import ServeError

__all__ = ["ChatRequest", "parse_chat_request", "render_messages", "finish_reason", "usage_object",
           "timings_object", "completion_object", "chunk_object", "MAX_IMAGES"]

MAX_IMAGES = 4                   # default image_url parts per request (ServeSettings.max_images_per_request)
_ROLES = ("system", "developer", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    image_urls: list[str]
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None, code: str = "invalid_request") -> ServeError:
    return ServeError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if not lo <= float(v) <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if lo is not None and v < lo:
        raise _bad(f"'{name}' must be >= {lo}, got {v}", name, "invalid_value")
    return v


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON ({exc})", None, "invalid_json") from exc


def parse_chat_request(body: Any, max_images: int = MAX_IMAGES) -> ChatRequest:
    """A decoded JSON body -> ``ChatRequest``; ``ServeError(400)`` naming the offending field. At most
    ``max_images`` image_url parts (all messages together)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages",
                   "missing_required_parameter" if messages is None else "invalid_value")
    image_urls: list[str] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{p} must be an object with 'role' and 'content'", p, "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{p}.role must be one of {', '.join(_ROLES)}; got {role!r}", f"{p}.role", "invalid_value")
        content = m.get("content")
        if isinstance(content, str):
            _check_text(content, f"{p}.content")
            continue
        if not isinstance(content, list):
            raise _bad(f"{p}.content must be a string or an array of content parts", f"{p}.content",
                       "invalid_type")
        for j, part in enumerate(content):
            q = f"{p}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{q} must be an object with a 'type'", q, "invalid_type")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{q}.text must be a string", f"{q}.text", "invalid_type")
                _check_text(part["text"], f"{q}.text")
            elif kind == "image_url":
                if role != "user":
                    raise _bad(f"{q}: images are accepted in user messages only", q, "invalid_value")
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu if isinstance(iu, str) else None
                if not isinstance(url, str) or not url:
                    raise _bad(f"{q}.image_url.url must be a non-empty string (a data: URL, a file under "
                               f"--media-dir, or an allow-listed http(s) URL)", f"{q}.image_url", "invalid_value")
                image_urls.append(url)
            else:
                raise _bad(f"{q}.type {kind!r} is not supported; use 'text' or 'image_url'", f"{q}.type",
                           "invalid_value")
    if messages[-1].get("role") != "user":
        raise _bad("the last message must be from the user", f"messages[{len(messages) - 1}].role",
                   "invalid_value")
    if len(image_urls) > max_images:
        raise _bad(f"the request has {len(image_urls)} images but this server accepts at most {max_images} images "
                   f"per request (--max-images); send at most {max_images} image_url parts", "messages",
                   "too_many_images")
    if not image_urls:
        raise _bad("the request has no image; this vision-language model answers about images: add "
                   "a content part {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}",
                   "messages", "image_required")

    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise _bad("'n' must be 1 (one choice per request)", "n", "invalid_value")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    top_k = _integer(body, "top_k", 0) or 0
    seed = _integer(body, "seed")
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise _bad("'top_p' must be > 0", "top_p", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > 16:
        raise _bad(f"'stop' has {len(stops)} strings; at most 16", "stop", "invalid_value")
    stops = [s for s in stops if s]
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        iu = so.get("include_usage", False)
        if not isinstance(iu, bool):
            raise _bad("'stream_options.include_usage' must be true or false", "stream_options.include_usage",
                       "invalid_type")
        include_usage = iu
    return ChatRequest(model=model, messages=messages, image_urls=image_urls, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stops, stream=stream,
                       include_usage=include_usage)


def _check_text(text: str, param: str) -> None:
    if IMAGE_PLACEHOLDER in text:
        raise _bad(f"{param} holds the reserved '{IMAGE_PLACEHOLDER}' placeholder; send the image as an image_url "
                   f"part instead", param, "invalid_value")


def _content_text(content: Any) -> str:
    """A message's content as prompt text; an image part becomes ``<image>`` (on its own line)."""
    if isinstance(content, str):
        return content
    pieces: list[str] = []
    for part in content:
        pieces.append(part["text"] if part["type"] == "text" else IMAGE_PLACEHOLDER)
    return "\n".join(p for p in pieces if p)


def render_messages(messages: list[dict[str, Any]], template: dict[str, str], system: str | None) -> str:
    """The conversation in the bundle's template (Vicuna v1): ``<system> USER: q1 ASSISTANT: a1</s>USER: ...
    ASSISTANT:``. System/developer messages replace the template's system prompt; the image goes where its part is
    (``<image>\\n<question>`` when it comes first, as MobileVLM was trained); several images: one ``<image>`` per
    image part, in message order, the text parts around them kept in order."""
    sys_parts = [_content_text(m["content"]) for m in messages if m["role"] in ("system", "developer")]
    text = "\n".join(sys_parts) if sys_parts else (template["system"] if system is None else system)
    sep, sep2 = template["sep"], template.get("sep2", "")
    for m in messages:
        body = _content_text(m["content"])
        if m["role"] == "user":
            text += f"{sep}{template['user']}: {body}{sep}{template['assistant']}:"
        elif m["role"] == "assistant":
            text += f" {body}{sep2}"
    return text


def finish_reason(runtime_reason: str) -> str:
    """The runtime's reasons -> OpenAI's: eos / stop_string -> "stop"; max_new_tokens / context_full -> "length"."""
    return "stop" if runtime_reason in ("eos", "stop_string") else "length"


def usage_object(result: Any) -> dict[str, Any]:
    t = result.timings
    cached = int(getattr(t, "cached_tokens", 0) or 0)
    prompt, completion = int(t.prompt_tokens), int(t.generated_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def timings_object(result: Any, queue_ms: float = 0.0) -> dict[str, Any]:
    """llama-server's ``timings`` names (prompt_n = prompt tokens actually prefilled, cache_n = reused ones,
    predicted_* over the decode steps after the first token) plus edgevlm's decomposition."""
    t = result.timings
    cached = int(getattr(t, "cached_tokens", 0) or 0)
    prompt_n = max(0, int(t.prompt_tokens) - cached)
    r = lambda x: round(float(x), 3)  # noqa: E731
    return {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": r(t.prefill_ms),
        "prompt_per_token_ms": r(t.prefill_ms / prompt_n) if prompt_n else 0.0,
        "prompt_per_second": r(t.prefill_tok_s),
        "predicted_n": int(t.generated_tokens),
        "predicted_ms": r(t.decode_ms),
        "predicted_per_token_ms": r(t.decode_ms / t.decode_steps) if t.decode_steps else 0.0,
        "predicted_per_second": r(t.decode_tok_s),
        "queue_ms": r(queue_ms),
        "preprocess_ms": r(t.preprocess_ms),
        "tokenize_ms": r(t.tokenize_ms),
        "image_encode_ms": r(t.vision_ms),
        "image_n": int(getattr(t, "images", 1)),
        "image_tokens": int(t.visual_tokens),
        "image_cache_hit": bool(getattr(t, "image_cache_hit", False)),
        "ttft_ms": r(t.ttft_ms),
        "decode_token_ms_p50": r(t.decode_token_ms_p50),
        "decode_token_ms_p95": r(t.decode_token_ms_p95),
        "total_ms": r(t.total_ms),
        "vision_backend": t.vision_backend,
        "decoder_backend": t.decoder_backend,
    }


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_object(cid: str, model: str, created: int, result: Any, queue_ms: float) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": finish_reason(result.finish_reason)}],
            "usage": usage_object(result), "timings": timings_object(result, queue_ms)}


def chunk_object(cid: str, model: str, created: int, delta: dict[str, Any] | None,
                 finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}


def now() -> int:
    return int(time.time())
