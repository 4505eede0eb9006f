"""``edgevlm serve`` with Starlette's TestClient on a tiny bundle: success (non-streaming, SSE), the endpoints, and
one test per bad-input row of issue 18 (413, 400 JSON / schema / image undecodable, empty, huge, bomb / prompt too
long, 401, 404, 429 with Retry-After, 503 while shutting down), the image URL policy (remote refused by default,
media-dir containment) and the Prometheus families. Skips without the ``serve`` extra."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest

pytest.importorskip("starlette", reason="needs the serve extra: pip install 'edgevlm[serve]'")
pytest.importorskip("prometheus_client", reason="needs the serve extra: pip install 'edgevlm[serve]'")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx: pip install 'edgevlm[serve]'")

from starlette.testclient import TestClient  # noqa: E402

from fixtures_bundles import make_image, tiny_bundle  # noqa: E402


def _png(seed: int = 0, size=(40, 60)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_image(seed, size)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header claiming w x h pixels with almost no data: refused from the header, never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)                   # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _body(url: str | None = None, text: str = "What color is the circle?", **kw) -> dict:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": "tiny-ldpnetv2", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from edgevlm.runtime import Session

    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    s = Session.from_bundle(path, backend="ort", threads=1)
    yield s
    s.close()


def _client(session, **kw):
    from edgevlm.serve import ServeSettings, create_app

    kw.setdefault("model_name", "tiny-ldpnetv2")
    return TestClient(create_app(ServeSettings(session=session, **kw)))


@pytest.fixture(scope="module")
def client(session):
    with _client(session) as c:
        yield c


def _err(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- success -----------------------------------------------------------------------------------------------------
def test_chat_completion_non_streaming(client):
    r = client.post("/v1/chat/completions", json=_body(_data_url(_png()), seed=0))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["model"] == "tiny-ldpnetv2"
    choice = d["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = d["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] >= 1
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert "cached_tokens" in u["prompt_tokens_details"]
    t = d["timings"]
    for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second",
              "preprocess_ms", "image_encode_ms", "ttft_ms", "cache_n", "image_cache_hit"):
        assert k in t, k
    assert t["image_n"] == 1 and u["prompt_tokens"] > t["image_tokens"] > 0     # image tokens counted in the prompt
    assert t["prompt_n"] + t["cache_n"] == u["prompt_tokens"] and t["predicted_n"] == u["completion_tokens"]


def test_chat_completion_stream_ends_with_done(client):
    body = _body(_data_url(_png(1)), stream=True, stream_options={"include_usage": True}, max_tokens=6)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and "timings" in finals[0]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1 and "image_encode_ms" in last["timings"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    # the same request without streaming gives the same text (greedy)
    r2 = client.post("/v1/chat/completions", json=_body(_data_url(_png(1)), max_tokens=6))
    assert r2.json()["choices"][0]["message"]["content"] == text


def test_models_health_page(client):
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny-ldpnetv2"
    assert client.get("/v1/models/tiny-ldpnetv2").status_code == 200
    _err(client.get("/v1/models/nope"), 404, "model_not_found")
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    _err(client.get("/no/such/route"), 404)


def test_metrics_families(client):
    client.post("/v1/chat/completions", json=_body(_data_url(_png(2))))
    text = client.get("/metrics").text
    for fam in ("edgevlm_requests_total", "edgevlm_queue_depth", "edgevlm_requests_running",
                "edgevlm_image_cache_hits_total", "edgevlm_image_cache_misses_total",
                "edgevlm_prompt_cached_tokens_total", "edgevlm_prompt_tokens_total",
                "edgevlm_completion_tokens_total", "edgevlm_image_encode_seconds_bucket",
                "edgevlm_prefill_seconds_bucket", "edgevlm_ttft_seconds_bucket", "edgevlm_decode_seconds_bucket",
                "edgevlm_request_seconds_bucket", "edgevlm_requests_cancelled"):
        assert fam in text, fam
    assert 'edgevlm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


# ---- bad input: one test per row -------------------------------------------------------------------------------
def test_413_body_too_large(session):
    with _client(session, max_body_mb=0.01) as c:
        _err(c.post("/v1/chat/completions", json=_body(_data_url(b"x" * 20_000))), 413, "request_too_large")


def test_400_bad_json(client):
    _err(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
         400, "invalid_json")
    _err(client.post("/v1/chat/completions", content=b""), 400, "invalid_json")


@pytest.mark.parametrize("patch, param", [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": 3}, "stop"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
])
def test_400_schema(client, patch, param):
    body = {**_body(_data_url(_png())), **patch}
    if body.get("messages") is None:
        body.pop("messages")
    err = _err(client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param


def test_400_image_count(session, client):
    _err(client.post("/v1/chat/completions", json=_body(None)), 400, "image_required")
    with _client(session, max_images_per_request=2) as c:
        body = _body(_data_url(_png()))
        for k in (3, 4):
            body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": _data_url(_png(k))}})
        err = _err(c.post("/v1/chat/completions", json=body), 400, "too_many_images")
        assert "3 images" in err["message"] and "at most 2" in err["message"]
        assert c.get("/v1/models").json()["data"][0]["meta"]["max_images_per_request"] == 2


def test_two_images_in_one_request(client, session):
    from edgevlm.prompt import template
    from edgevlm.serve import schema

    body = _body(_data_url(_png(1)), text="Compare the circles.", seed=0)
    content = body["messages"][0]["content"]
    content.insert(1, {"type": "text", "text": "and"})
    content.insert(2, {"type": "image_url", "image_url": {"url": _data_url(_png(2))}})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    prompt = schema.render_messages(body["messages"], template(session.template), session.system)
    assert prompt.count("<image>") == 2 and prompt.index("and") < prompt.index("Compare")
    _, ids, length = session.tokenize(prompt, True, 0, 2)
    text_tokens = len(ids) - 2
    assert d["usage"]["prompt_tokens"] == length == text_tokens + 2 * session.visual_tokens
    t = d["timings"]
    assert t["image_n"] == 2 and t["image_tokens"] == 2 * session.visual_tokens
    # the default limit (4) admits 4 images; a fifth is refused naming the limit
    for k in (5, 6, 7):
        content.append({"type": "image_url", "image_url": {"url": _data_url(_png(k))}})
    err = _err(client.post("/v1/chat/completions", json=body), 400, "too_many_images")
    assert "5 images" in err["message"] and "at most 4" in err["message"]


def test_400_image_undecodable(client):
    err = _err(client.post("/v1/chat/completions", json=_body(_data_url(b"this is not a png"))), 400, "invalid_image")
    assert "cannot be decoded" in err["message"]
    _err(client.post("/v1/chat/completions", json=_body("data:image/png;base64,@@@")), 400, "invalid_image")


def test_400_image_empty(client):
    err = _err(client.post("/v1/chat/completions", json=_body("data:image/png;base64,")), 400, "invalid_image")
    assert "empty" in err["message"]


def test_400_image_huge(session):
    with _client(session, max_image_pixels=1000) as c:
        err = _err(c.post("/v1/chat/completions", json=_body(_data_url(_png()))), 400, "invalid_image")
    assert "40x60" not in err["message"] and "60x40" in err["message"] and "limit" in err["message"]


def test_400_image_decompression_bomb(client):
    err = _err(client.post("/v1/chat/completions", json=_body(_data_url(_bomb_png()))), 400, "invalid_image")
    assert "decompression bomb" in err["message"]                       # PIL's own header check
    err = _err(client.post("/v1/chat/completions", json=_body(_data_url(_bomb_png(9000, 9000)))), 400,
               "invalid_image")
    assert "9000x9000" in err["message"] and "limit" in err["message"]  # --max-image-pixels (64 MP default)


def test_400_prompt_too_long_with_counts(client, session):
    text = "red green blue " * (session.context_length + 10)
    err = _err(client.post("/v1/chat/completions", json=_body(_data_url(_png()), text=text)), 400,
               "context_length_exceeded")
    assert "tokens" in err["message"] and str(session.context_length) in err["message"]


def test_401_api_key(session):
    with _client(session, api_key="s3cret") as c:
        body = _body(_data_url(_png()))
        err = _err(c.post("/v1/chat/completions", json=body), 401, "invalid_api_key")
        assert "missing" in err["message"]
        _err(c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        _err(c.get("/v1/models"), 401)
        assert c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_404_unknown_model(client):
    err = _err(client.post("/v1/chat/completions", json={**_body(_data_url(_png())), "model": "gpt-9"}), 404,
               "model_not_found")
    assert "tiny-ldpnetv2" in err["message"]


class _SlowSession:
    """Stands in for a Session: blocks in generate until released (to fill the queue deterministically)."""

    def __init__(self, real) -> None:
        self.real, self.release, self.started = real, threading.Event(), threading.Event()
        self.config, self.template, self.system = real.config, real.template, real.system

    def tokenize(self, *a, **k):
        return self.real.tokenize(*a, **k)

    def generate(self, *a, **k):
        self.started.set()
        self.release.wait(30)
        return self.real.generate(*a, **k)


def test_429_queue_full_with_retry_after(session):
    import concurrent.futures as cf

    slow = _SlowSession(session)
    with _client(slow, max_queue=1) as c, cf.ThreadPoolExecutor(2) as pool:
        body = _body(_data_url(_png()))
        first = pool.submit(c.post, "/v1/chat/completions", json=body)
        assert slow.started.wait(30)                                        # running
        second = pool.submit(c.post, "/v1/chat/completions", json=body)
        st = c.app.state.serve
        for _ in range(300):                                                # wait until it is queued
            if st.worker.waiting == 1:
                break
            threading.Event().wait(0.01)
        r = c.post("/v1/chat/completions", json=body)
        _err(r, 429, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        slow.release.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200


def test_503_while_shutting_down(session):
    with _client(session) as c:
        c.app.state.serve.begin_shutdown()
        _err(c.post("/v1/chat/completions", json=_body(_data_url(_png()))), 503, "shutting_down")
        assert c.get("/health").status_code == 503


def test_disconnect_stops_generation_and_frees_the_session(session):
    """A job stopped mid-generation (the client went away) ends with a 'disconnect' error after at most one more
    delta, is counted, and leaves the Session free for the next request."""
    import asyncio

    from edgevlm.serve.metrics import ServeMetrics
    from edgevlm.serve.worker import Job, Worker

    stop_issued = threading.Event()

    class _PacedSession:                    # holds generation after the first delta until the client has stopped
        def __init__(self, real):
            self.real, self.deltas = real, 0

        def __getattr__(self, name):
            return getattr(self.real, name)

        def generate(self, *a, stream=None, **k):
            def paced(delta):
                self.deltas += 1
                out = stream(delta)
                if self.deltas == 1:
                    assert stop_issued.wait(30), "the client never stopped"
                return out
            return self.real.generate(*a, stream=paced, **k)

    metrics = ServeMetrics()
    paced = _PacedSession(session)
    worker = Worker(paced, 2, metrics)

    async def go():
        job = Job(make_image(0), session.render_prompt("What color?"),
                  {"max_new_tokens": 64, "ignore_eos": True}, timeout=60)
        worker.submit(job)
        kinds = [(await job.next_event())[0]]
        job.stop("disconnect")
        stop_issued.set()
        while kinds[-1] == "delta":
            kind, payload = await job.next_event()
            kinds.append(kind)
        return kinds, payload

    kinds, err = asyncio.run(go())
    worker.close()
    assert kinds[0] == "delta" and kinds[-1] == "error" and err.code == "disconnect"
    assert paced.deltas <= 2 and len(kinds) <= paced.deltas + 1        # stopped at the next delta; nothing after
    assert metrics.cancelled.labels(reason="disconnect")._value.get() == 1
    assert session._lock.acquire(timeout=5)                    # the runtime request was closed
    session._lock.release()
    assert not worker.alive


def test_504_request_timeout(session):
    slow = _SlowSession(session)
    threading.Timer(1.0, slow.release.set).start()
    with _client(slow, request_timeout=0.3) as c:
        _err(c.post("/v1/chat/completions", json=_body(_data_url(_png()), max_tokens=32)), 504, "request_timeout")
        slow.release.set()


# ---- image URL policy -----------------------------------------------------------------------------------------
def test_remote_image_refused_by_default(client):
    err = _err(client.post("/v1/chat/completions", json=_body("https://example.com/cat.png")), 400,
               "image_url_refused")
    assert "--allow-remote-images" in err["message"]


def test_remote_image_host_not_allowed(session):
    with _client(session, allow_remote_images=("images.example.org",)) as c:
        err = _err(c.post("/v1/chat/completions", json=_body("https://evil.example.com/x.png")), 400,
                   "image_url_refused")
    assert "evil.example.com" in err["message"]


def test_local_files_need_media_dir(client, tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(_png())
    err = _err(client.post("/v1/chat/completions", json=_body(p.as_uri())), 400, "image_url_refused")
    assert "--media-dir" in err["message"]


def test_media_dir_containment(session, tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside"
    media.mkdir()
    outside.mkdir()
    (media / "ok.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png(5))
    (media / "link.png").symlink_to(outside / "secret.png")
    with _client(session, media_dir=media) as c:
        assert c.post("/v1/chat/completions", json=_body((media / "ok.png").as_uri())).status_code == 200
        assert c.post("/v1/chat/completions", json=_body("ok.png")).status_code == 200          # relative
        for url in ((outside / "secret.png").as_uri(), "../outside/secret.png", (media / "link.png").as_uri(),
                    "file://" + str(media) + "/../outside/secret.png"):
            err = _err(c.post("/v1/chat/completions", json=_body(url)), 400, "image_url_refused")
            assert "outside --media-dir" in err["message"], url


def test_serve_imports_without_torch(tmp_path):
    """The server is device side: importing it (and building the CLI) loads no torch."""
    import subprocess
    import sys

    code = ("import sys, json; import edgevlm.serve, edgevlm.serve.app, edgevlm.cli.serve; "
            "from edgevlm.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


@pytest.fixture()
def image_host():
    """A loopback HTTP server: /ok.png (an image), /big.png (above a small cap), /redirect (302 to /ok.png)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = _png(7)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/ok.png")
                self.end_headers()
                return
            data = png if self.path == "/ok.png" else b"\0" * 200_000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()                                      # no Content-Length: the cap is checked streaming
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_remote_image_allow_list_no_redirects_size_cap(session, image_host):
    with _client(session, allow_remote_images=("127.0.0.1",), max_body_mb=0.1) as c:
        assert c.post("/v1/chat/completions", json=_body(image_host + "/ok.png")).status_code == 200
        err = _err(c.post("/v1/chat/completions", json=_body(image_host + "/redirect")), 400, "image_fetch_failed")
        assert "redirect" in err["message"]
        err = _err(c.post("/v1/chat/completions", json=_body(image_host + "/big.png")), 400, "invalid_image")
        assert "cap" in err["message"]


def test_cli_serve_sigterm_exits_0(tmp_path_factory, tmp_path):
    """``edgevlm serve`` under uvicorn: answers, and SIGTERM shuts it down gracefully with exit code 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGEVLM_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", "serve", str(path), "--port", str(port), "--threads",
                             "1", "--backend", "ort"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(base + "/v1/chat/completions", json=_body(_data_url(_png())), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "shutting down" in out
