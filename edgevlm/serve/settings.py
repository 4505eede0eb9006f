"""``ServeSettings``: everything ``edgevlm serve`` can be told (the CLI flags map one to one), stdlib only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import ConfigError
from edgevlm.preprocess import DEFAULT_MAX_PIXELS

__all__ = ["ServeSettings"]


@dataclass
class ServeSettings:
    """Options of one server.

    Args:
        bundle: the bundle directory (ignored when ``session`` is given).
        host: bind address (loopback by default; ``0.0.0.0`` exposes the server to the network).
        port: TCP port.
        api_key: require ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``) on ``/v1/*``; ``/``, ``/health`` and
            ``/metrics`` stay public.
        api_key_file: read the key from this file (first line), so it is not on the command line.
        media_dir: ``file://`` URLs and plain paths are served only from under this directory (refused without it).
        allow_remote_images: http(s) image URLs are fetched only from these hosts (and their sub-domains); none by
            default.
        max_queue: requests waiting for the worker beyond the one running; one more is answered 429.
        max_body_mb: request bodies above this are answered 413 (checked while reading); also the cap of one image
            read from a file or fetched from a URL.
        max_image_pixels: images with more pixels are refused from their header, before decoding.
        max_images_per_request: image_url parts one request may carry (each is spliced at its own ``<image>``);
            more are answered 400 ``too_many_images``.
        request_timeout: seconds from admission to the end of a request (queue wait included); then 504 / an error
            event in a stream, and the generation is stopped.
        backend: ``auto`` | ``ort`` | ``native`` | ``tensorrt`` (``Session.from_bundle``).
        threads: intra-op threads of the runtime (default: physical cores).
        model_name: the id in ``/v1/models`` and in responses (default: the bundle's model name).
        image_cache_mib: the runtime's image-embedding cache bound, passed to ``Session.from_bundle`` when the
            runtime has one.
        default_max_tokens: ``max_tokens`` when a request gives none.
        remote_timeout: seconds for fetching one remote image.
        graceful_timeout: seconds uvicorn waits for in-flight requests on SIGTERM.
        warmup: run one tiny request at load (first-request allocations move to load time).
        session: an already loaded ``edgevlm.runtime.Session`` (tests, embedding apps); the app does not close it.
    """

    bundle: str | os.PathLike | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str | os.PathLike | None = None
    media_dir: str | os.PathLike | None = None
    allow_remote_images: tuple[str, ...] = ()
    max_queue: int = 8
    max_body_mb: float = 20.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = 4
    request_timeout: float = 300.0
    backend: str = "auto"
    threads: int | None = None
    model_name: str | None = None
    image_cache_mib: float = 256.0
    default_max_tokens: int = 512
    remote_timeout: float = 5.0
    graceful_timeout: float = 30.0
    warmup: bool = True
    session: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.session is None and self.bundle is None:
            raise ConfigError("ServeSettings needs a bundle directory (or a loaded session)")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_mb <= 0 or self.max_image_pixels <= 0 or self.request_timeout <= 0:
            raise ConfigError("max_body_mb, max_image_pixels and request_timeout must be > 0")
        if int(self.max_images_per_request) < 1:
            raise ConfigError(f"max_images_per_request (--max-images) must be >= 1, got {self.max_images_per_request}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("give --api-key or --api-key-file, not both")
        if self.api_key_file is not None:
            p = Path(self.api_key_file)
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"--api-key-file '{p}' cannot be read ({exc})") from exc
            key = lines[0].strip() if lines else ""
            if not key:
                raise ConfigError(f"--api-key-file '{p}' is empty; put the key on its first line")
            self.api_key = key
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty")
        if self.media_dir is not None:
            d = Path(self.media_dir).expanduser()
            if not d.is_dir():
                raise ConfigError(f"--media-dir '{d}' is not a directory")
            self.media_dir = d.resolve()
        self.allow_remote_images = tuple(h.strip().lower().rstrip(".") for h in self.allow_remote_images
                                         if h and h.strip())

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
