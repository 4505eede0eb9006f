"""The Starlette app: ``create_app(settings) -> Starlette`` and ``run_server(settings)`` (uvicorn).

The Session is loaded eagerly by ``create_app`` (a bad bundle fails before a port is bound; the first request does
not pay the load) unless ``settings.session`` hands one in. One worker thread owns it (``worker.Worker``).

Routes: ``POST /v1/chat/completions`` (OpenAI schema, ``stream`` as SSE), ``GET /v1/models`` (+ ``/v1/models/{id}``),
``GET /health``, ``GET /metrics`` (Prometheus text), and the static web page folder ``static/`` at ``/``.
``/v1/*`` needs the API key when one is set (``Authorization: Bearer KEY`` or ``x-api-key: KEY``); ``/``,
``/health`` and ``/metrics`` are public. Every error is OpenAI's ``{"error": {message, type, param, code}}``.

Order of checks in a chat request (cheap first, before any model work): shutting down (503) -> API key (401) ->
body size while reading (413) -> JSON (400) -> schema (400) -> model name (404) -> image URL policy, then image
header pixel count, then decode (400) -> prompt length vs context (400 with the counts) -> queue admission (429).

SIGTERM (``run_server``): new requests get 503, uvicorn waits up to ``graceful_timeout`` for in-flight ones, the
worker drains, the process exits 0.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator

from edgevlm.errors import MissingDependency, PromptError
from edgevlm.serve import schema
from edgevlm.serve.errors import ServeError, error_body
from edgevlm.serve.images import check_image, resolve_image_url
from edgevlm.serve.settings import ServeSettings
from edgevlm.serve.worker import Job, Worker

log = logging.getLogger(__name__)

__all__ = ["create_app", "run_server", "ServeState", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _need(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise MissingDependency(package, "serve", "edgevlm serve")


class ServeState:
    """What the routes share (``app.state.serve``)."""

    def __init__(self, settings: ServeSettings, session: Any, owns_session: bool) -> None:
        from edgevlm.prompt import template
        from edgevlm.serve.metrics import ServeMetrics

        self.settings, self.session, self.owns_session = settings, session, owns_session
        self.model_name = settings.model_name or str(getattr(session.config, "name", "edgevlm"))
        self.template = template(getattr(session, "template", "vicuna_v1"))
        self.metrics = ServeMetrics()
        self.worker = Worker(session, settings.max_queue, self.metrics)
        self.created = int(time.time())
        self.closed = False

    @property
    def shutting_down(self) -> bool:
        return not self.worker.accepting

    def begin_shutdown(self) -> None:
        """Refuse new requests with 503 from now on (in-flight and queued ones finish)."""
        if self.worker.accepting:
            log.info("shutting down: new requests are refused, in-flight ones finish")
        self.worker.stop_accepting()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.worker.close(timeout=self.settings.graceful_timeout)
        if self.owns_session:
            self.session.close()


def _load_session(settings: ServeSettings) -> Any:
    from edgevlm.runtime import Session

    kwargs: dict[str, Any] = {"backend": settings.backend, "threads": settings.threads,
                              "max_pixels": settings.max_image_pixels, "warmup": settings.warmup}
    # the runtime's caches (off by default in Session, on for the server): image embeddings by content hash (LRU,
    # bounded in MiB) and prompt-prefix KV reuse (the system prompt, and a repeated image, are not prefilled again)
    kwargs.update(image_cache_mib=settings.image_cache_mib, prefix_cache=True)
    return Session.from_bundle(settings.bundle, **kwargs)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _state(request: Any) -> ServeState:
    return request.app.state.serve


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(data, status_code=status, headers=headers)


def _check_key(request: Any, st: ServeState) -> None:
    key = st.settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given:
        raise ServeError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ServeError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _check_open(st: ServeState) -> None:
    if st.shutting_down:
        raise ServeError(503, "the server is shutting down; retry on another instance or after restart",
                         code="shutting_down")


async def _read_body(request: Any, cap: int, cap_mb: float) -> bytes:
    length = request.headers.get("content-length")
    too_large = ServeError(413, f"the request body is above the {cap_mb:g} MB limit (--max-body-mb)",
                           code="request_too_large")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_large
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise too_large
    return bytes(buf)


# ---- routes ----------------------------------------------------------------------------------------------------
async def chat_completions(request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    st = _state(request)
    s = st.settings
    _check_open(st)
    _check_key(request, st)
    raw = await _read_body(request, s.max_body_bytes, s.max_body_mb)
    req = schema.parse_chat_request(schema.parse_json(raw), s.max_images_per_request)
    if req.model is not None and req.model != st.model_name:
        raise ServeError(404, f"model '{req.model}' is not served here; this server serves '{st.model_name}' "
                              f"(GET /v1/models)", param="model", code="model_not_found")
    images = []                                   # in message order: image k is spliced at the k-th <image>
    for url in req.image_urls:
        data = await resolve_image_url(url, s)
        images.append(await run_in_threadpool(check_image, data, s.max_image_pixels))
    prompt = schema.render_messages(req.messages, st.template, getattr(st.session, "system", None))
    max_new = req.max_tokens or s.default_max_tokens
    try:
        await run_in_threadpool(st.session.tokenize, prompt, True, max_new, len(images))
    except PromptError as exc:
        raise ServeError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    params = {"max_new_tokens": max_new, "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
              "seed": req.seed, "stop": req.stop or None}
    job = Job(images, prompt, params, timeout=s.request_timeout)
    st.worker.submit(job)
    cid, created = schema.new_id(), schema.now()
    if req.stream:
        return _SSEResponse(_sse(job, st.model_name, cid, created, req.include_usage),
                            media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        kind, payload = await job.next_event()
        while kind == "delta":
            kind, payload = await job.next_event()
    finally:
        if not job.finished:
            job.stop("disconnect")
    if kind == "error":
        raise payload
    job.finished = True
    return _json(schema.completion_object(cid, st.model_name, created, payload, job.queue_s * 1e3))


def _sse_data(obj: Any) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))) + "\n\n"


async def _sse(job: Job, model: str, cid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    try:
        yield _sse_data(schema.chunk_object(cid, model, created, {"role": "assistant", "content": ""}, **extra))
        while True:
            kind, payload = await job.next_event()
            if kind == "delta":
                yield _sse_data(schema.chunk_object(cid, model, created, {"content": payload}, **extra))
                continue
            if kind == "done":
                timings = schema.timings_object(payload, job.queue_s * 1e3)
                yield _sse_data(schema.chunk_object(cid, model, created, {},
                                                    schema.finish_reason(payload.finish_reason), **extra,
                                                    timings=timings))
                if include_usage:
                    yield _sse_data(schema.chunk_object(cid, model, created, None,
                                                        usage=schema.usage_object(payload), timings=timings))
            else:
                err: ServeError = payload
                yield _sse_data(err.body())
            job.finished = True
            yield _sse_data("[DONE]")
            return
    finally:
        if not job.finished:
            job.stop("disconnect")


def _sse_response_class() -> Any:
    from starlette.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        """A StreamingResponse that always closes its body iterator (so a disconnect stops the job at once)."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()

    return SSEResponse


class _LazySSE:
    def __call__(self, *a: Any, **k: Any) -> Any:
        return _sse_response_class()(*a, **k)


_SSEResponse = _LazySSE()


def _model_card(st: ServeState) -> dict[str, Any]:
    sess = st.session
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "edgevlm",
            "meta": {"context_length": getattr(sess, "context_length", None),
                     "visual_tokens": getattr(sess, "visual_tokens", None),
                     "vision_backend": getattr(sess, "vision_backend", None),
                     "decoder_backend": getattr(sess, "decoder_backend", None),
                     "max_images_per_request": st.settings.max_images_per_request}}


async def models(request: Any) -> Any:
    st = _state(request)
    _check_key(request, st)
    return _json({"object": "list", "data": [_model_card(st)]})


async def model_one(request: Any) -> Any:
    st = _state(request)
    _check_key(request, st)
    name = request.path_params["model"]
    if name != st.model_name:
        raise ServeError(404, f"model '{name}' is not served here; this server serves '{st.model_name}'",
                         param="model", code="model_not_found")
    return _json(_model_card(st))


async def health(request: Any) -> Any:
    st = _state(request)
    w = st.worker
    body = {"status": "shutting_down" if st.shutting_down else "ok", "model": st.model_name,
            "queue": {"waiting": w.waiting, "running": w.running, "max_queue": w.max_queue},
            "completed": w.completed,
            "vision_backend": getattr(st.session, "vision_backend", None),
            "decoder_backend": getattr(st.session, "decoder_backend", None)}
    return _json(body, 503 if st.shutting_down else 200)


async def metrics(request: Any) -> Any:
    from starlette.responses import Response

    data, ctype = _state(request).metrics.render()
    return Response(data, media_type=ctype)


async def _no_page(request: Any) -> Any:
    from starlette.responses import HTMLResponse

    return HTMLResponse("<!doctype html><title>edgevlm serve</title><p>edgevlm serve: the web page is not "
                        "installed; use POST /v1/chat/completions.</p>")


# ---- errors and counting ---------------------------------------------------------------------------------------
async def _serve_error(request: Any, exc: Exception) -> Any:
    assert isinstance(exc, ServeError)
    return _json(exc.body(), exc.status, exc.headers)


async def _http_error(request: Any, exc: Exception) -> Any:
    status = int(getattr(exc, "status_code", 500))
    detail = str(getattr(exc, "detail", "") or "")
    msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return _json(error_body(status, msg.get(status, detail), code="not_found" if status == 404 else None), status,
                 getattr(exc, "headers", None))


async def _internal_error(request: Any, exc: Exception) -> Any:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _json(error_body(500, f"internal error ({type(exc).__name__})", code="internal_error"), 500)


class _CountRequests:
    """Pure ASGI middleware: ``edgevlm_requests_total{endpoint,status}`` for every HTTP response."""

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            path = scope.get("path", "")
            endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "static")
            self.state.metrics.count(endpoint, status[0])


# ---- factory ---------------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings) -> Any:
    """The Starlette app for ``settings``. Loads the Session now (unless ``settings.session`` is given) and starts
    the worker thread; the app's lifespan shutdown drains the worker and closes the Session it loaded."""
    for pkg in ("starlette", "prometheus_client"):
        _need(pkg)
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    owns = settings.session is None
    session = _load_session(settings) if owns else settings.session
    st = ServeState(settings, session, owns)

    routes: list[Any] = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_one, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if (STATIC_DIR / "index.html").is_file():
        routes.append(Mount("/", app=StaticFiles(directory=str(STATIC_DIR), html=True), name="static"))
    else:
        routes.append(Route("/", _no_page, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        from starlette.concurrency import run_in_threadpool

        st.begin_shutdown()
        await run_in_threadpool(st.close)

    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_CountRequests, state=st)],
                    exception_handlers={ServeError: _serve_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.serve = st
    return app


def run_server(settings: ServeSettings) -> int:
    """Serve ``settings`` with uvicorn until SIGINT/SIGTERM; returns 0 after a graceful shutdown."""
    _need("uvicorn")
    import uvicorn

    app = create_app(settings)
    st: ServeState = app.state.serve

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            st.begin_shutdown()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)        # a graceful SIGTERM exits 0, not by re-raising it

    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                            timeout_graceful_shutdown=int(max(1, settings.graceful_timeout)),
                            log_level="info", access_log=False)
    server = _Server(config)
    log.info("edgevlm serve: model '%s' on http://%s:%d (vision %s, decoder %s)", st.model_name, settings.host,
             settings.port, getattr(st.session, "vision_backend", "?"), getattr(st.session, "decoder_backend", "?"))
    server.run()
    st.close()
    return 0
