"""``image_url`` -> a validated RGB PIL image, safely.

* ``data:image/...;base64,...``: decoded (strict base64); the body cap bounds its size.
* ``file:///...`` or a plain path: only under ``--media-dir`` (the path is resolved, symlinks included, and must stay
  inside the resolved media dir); refused without the flag.
* ``http(s)://``: only for hosts in ``--allow-remote-images`` (or their sub-domains); httpx with
  ``follow_redirects=False``, a timeout, and a byte cap checked while streaming; refused by default with a message
  naming the flag.

Then ``check_image``: ``edgevlm.preprocess.load_image`` opens the bytes with PIL, reads the header and refuses more
than ``max_image_pixels`` pixels *before* decoding (decompression bombs), then decodes. Every refusal is a
``ServeError(400, code="invalid_image" | "image_url_refused" | "image_fetch_failed")`` naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgevlm.errors import ImageError
from edgevlm.serve.errors import ServeError
from edgevlm.serve.settings import ServeSettings

__all__ = ["resolve_image_url", "check_image", "host_allowed"]


def _refused(message: str, code: str = "image_url_refused") -> ServeError:
    return ServeError(400, message, param="image_url", code=code)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


def _data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise _refused("the data: URL has no ',' before its payload; use data:image/png;base64,<data>",
                       "invalid_image")
    meta = head[5:].split(";")
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise _refused("only base64 data: URLs are accepted (data:image/png;base64,<data>)", "invalid_image")
    mime = meta[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise _refused(f"the data: URL has media type '{mime}'; send an image (image/png, image/jpeg, ...)",
                       "invalid_image")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _refused(f"the data: URL's base64 payload cannot be decoded ({exc})", "invalid_image") from exc
    return data


def _local(url: str, settings: ServeSettings) -> bytes:
    if settings.media_dir is None:
        raise _refused("local image files are refused: start the server with --media-dir DIR to serve images from "
                       "DIR (file:// URLs or paths under it)")
    root = Path(settings.media_dir)
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _refused(f"file URL host '{parts.netloc}' is not local")
        raw = unquote(parts.path)
    else:
        raw = url
    p = Path(raw)
    p = p if p.is_absolute() else root / p
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refused(f"image file '{raw}' does not exist under --media-dir", "invalid_image") from None
    if not real.is_relative_to(root):
        raise _refused(f"image file '{raw}' is outside --media-dir '{root}' (after resolving links); only files "
                       f"under it are served")
    if not real.is_file():
        raise _refused(f"image path '{raw}' is not a regular file", "invalid_image")
    size = real.stat().st_size
    if size > settings.max_body_bytes:
        raise _refused(f"image file '{raw}' is {size} bytes, above the {settings.max_body_mb:g} MB cap",
                       "invalid_image")
    with open(real, "rb") as f:
        return f.read(settings.max_body_bytes + 1)


async def _remote(url: str, settings: ServeSettings) -> bytes:
    host = urlsplit(url).hostname or ""
    if not settings.allow_remote_images:
        raise _refused("remote image URLs are refused by default; start the server with --allow-remote-images "
                       "DOMAIN to fetch images from DOMAIN, or send the image as a data: URL")
    if not host_allowed(host, settings.allow_remote_images):
        raise _refused(f"host '{host}' is not in --allow-remote-images "
                       f"({', '.join(settings.allow_remote_images)})")
    try:
        import httpx
    except ImportError as exc:                                  # pragma: no cover - the serve extra has it
        raise _refused("fetching remote images needs httpx: pip install 'edgevlm[serve]'",
                       "image_fetch_failed") from exc
    cap = settings.max_body_bytes
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=settings.remote_timeout) as client:
            async with client.stream("GET", url) as resp:
                if resp.is_redirect:
                    raise _refused(f"the image URL answered {resp.status_code} (a redirect); redirects are not "
                                   f"followed, use the final URL", "image_fetch_failed")
                if resp.status_code != 200:
                    raise _refused(f"the image URL answered HTTP {resp.status_code}", "image_fetch_failed")
                length = resp.headers.get("content-length")
                if length and length.isdigit() and int(length) > cap:
                    raise _refused(f"the remote image is {length} bytes, above the {settings.max_body_mb:g} MB cap",
                                   "invalid_image")
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) > cap:
                        raise _refused(f"the remote image is above the {settings.max_body_mb:g} MB cap",
                                       "invalid_image")
                return bytes(buf)
    except httpx.HTTPError as exc:
        raise _refused(f"fetching the image failed ({type(exc).__name__}: {exc})", "image_fetch_failed") from exc


async def resolve_image_url(url: str, settings: ServeSettings) -> bytes:
    """The bytes an ``image_url`` names (see the module docstring for what is allowed)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url)
    if scheme in ("http", "https"):
        return await _remote(url, settings)
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return _local(url, settings)
    raise _refused(f"image URL scheme '{scheme}:' is not supported; use data:, https: (with --allow-remote-images) "
                   f"or file: (with --media-dir)")


def check_image(data: bytes, max_pixels: int) -> Any:
    """Bytes -> RGB PIL image; 400 when empty, undecodable, or above ``max_pixels`` (from the header, before the
    pixels are decoded)."""
    if not data:
        raise _refused("the image is empty (0 bytes)", "invalid_image")
    from edgevlm.preprocess import load_image

    try:
        return load_image(bytes(data), max_pixels=max_pixels)
    except ImageError as exc:
        raise _refused(str(exc), "invalid_image") from exc
