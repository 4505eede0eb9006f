"""``edgevlm serve BUNDLE``: an OpenAI-compatible HTTP server (``POST /v1/chat/completions`` with images, SSE
streaming, per-stage ``timings``), ``/v1/models``, ``/health``, ``/metrics`` and a web page at ``/``.

    edgevlm serve out/tiny-bundle                                   # http://127.0.0.1:8000
    edgevlm serve out/tiny-bundle --api-key-file key.txt --media-dir ./images --max-queue 4
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' -d @request.json

Needs the serve extra (``pip install 'edgevlm[serve]'``: starlette, uvicorn, prometheus-client, httpx); no torch.
SIGTERM finishes in-flight requests, answers new ones 503, and exits 0. Details: docs/serve.md.
"""

from __future__ import annotations

from typing import Literal

from edgevlm.cli import positional


@positional("bundle")
def serve(bundle: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          api_key_file: str | None = None, media_dir: str | None = None,
          allow_remote_images: list[str] | None = None, max_queue: int = 8, max_body_mb: float = 20.0,
          max_image_pixels: int = 64_000_000, request_timeout: float = 300.0,
          backend: Literal["auto", "ort", "native", "tensorrt"] = "auto", threads: int | None = None,
          model_name: str | None = None, image_cache_mib: float = 256.0, default_max_tokens: int = 512,
          graceful_timeout: float = 30.0, max_images: int = 4) -> int:
    """Serve a bundle over HTTP with OpenAI's chat-completions API (images, streaming, timings, metrics).

    Args:
        bundle: the bundle directory.
        host: bind address; 0.0.0.0 exposes the server beyond this machine.
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on /v1/* (visible in ps; prefer --api-key-file).
        api_key_file: read the API key from the first line of this file.
        media_dir: allow file:// URLs and paths under this directory only (refused without it).
        allow_remote_images: fetch http(s) images from these hosts (and sub-domains) only; none by default.
        max_queue: requests waiting beyond the running one; more are answered 429 with Retry-After.
        max_body_mb: request bodies above this are answered 413; also the cap of one fetched or read image.
        max_image_pixels: images with more pixels are refused from their header, before decoding.
        request_timeout: seconds from admission to the end of a request (504 after).
        backend: runtime backend: auto, ort, native or tensorrt.
        threads: runtime intra-op threads (default: physical cores).
        model_name: the model id clients send and see (default: the bundle's model name).
        image_cache_mib: bound of the runtime's image-embedding cache (when the runtime has one).
        default_max_tokens: max_tokens of a request that gives none.
        graceful_timeout: seconds SIGTERM waits for in-flight requests.
        max_images: image_url parts one request may carry (each spliced at its own <image>); more are a 400.
    """
    from edgevlm.serve import ServeSettings, run_server

    settings = ServeSettings(bundle=bundle, host=host, port=port, api_key=api_key, api_key_file=api_key_file,
                             media_dir=media_dir, allow_remote_images=tuple(allow_remote_images or ()),
                             max_queue=max_queue, max_body_mb=max_body_mb, max_image_pixels=max_image_pixels,
                             request_timeout=request_timeout, backend=backend, threads=threads,
                             model_name=model_name, image_cache_mib=image_cache_mib,
                             default_max_tokens=default_max_tokens, graceful_timeout=graceful_timeout,
                             max_images_per_request=max_images)
    return run_server(settings)


COMMANDS = {"serve": serve}
