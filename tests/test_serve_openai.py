"""``edgevlm serve`` against the real ``openai`` client: a uvicorn server on a free loopback port (a background
thread), a tiny bundle, and ``openai.OpenAI(base_url=...)``.

Covers what an app sees: a non-streaming answer about an image sent as a data URL (content, finish_reason, usage
with the image tokens counted, the extra ``timings`` object), streaming with ``stream_options.include_usage`` (the
deltas, the final usage chunk carrying ``timings``), and the server's errors arriving as the client's typed
exceptions (401 AuthenticationError, 400 BadRequestError for a bad image and an over-long prompt, 404 NotFoundError,
429 RateLimitError with Retry-After). ``max_retries=0`` so the client reports the first answer. Skips without the
``serve`` extra (starlette, uvicorn) or ``openai``.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="needs the serve extra: pip install 'edgevlm[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'edgevlm[serve]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
httpx = pytest.importorskip("httpx")

from tests.fixtures_bundles import make_image, tiny_bundle  # noqa: E402

API_KEY = "test-key-123"
MODEL = "tiny-vlm"


def _png_data_url(seed: int = 0) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_image(seed)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(question: str = "What color is the circle?", url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url or _png_data_url()}}]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn.Server in a daemon thread (no signal handlers: not the main thread)."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None        # older uvicorn; newer ones skip off-main-thread
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _client(server: _Server, api_key: str = API_KEY, **kw):
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")[0]


@pytest.fixture(scope="module")
def server(bundle):
    from edgevlm.serve import ServeSettings, create_app

    app = create_app(ServeSettings(bundle=bundle, api_key=API_KEY, model_name=MODEL, threads=1, max_queue=4,
                                   max_image_pixels=4096 * 4096))
    with _Server(app) as s:
        yield s


def test_models_lists_the_served_model(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_non_streaming_with_an_image_as_data_url(server):
    r = _client(server).chat.completions.create(model=MODEL, messages=_messages(), max_tokens=6, temperature=0,
                                                seed=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.model == MODEL
    u = r.usage
    assert 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    timings = (r.model_extra or {}).get("timings") or r.to_dict()["timings"]
    # usage counts the image's visual tokens (tiny-ldpnetv2: 4) in the prompt, as llama-server does
    assert timings["image_n"] == 1 and timings["image_tokens"] == 4
    assert u.prompt_tokens > timings["image_tokens"]
    assert u.prompt_tokens == timings["prompt_n"] + timings["cache_n"]
    assert u.prompt_tokens_details.cached_tokens == timings["cache_n"]
    assert timings["predicted_n"] == u.completion_tokens
    for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second", "preprocess_ms",
                "image_encode_ms", "ttft_ms"):
        assert isinstance(timings[key], (int, float)) and timings[key] >= 0, key
    assert timings["image_encode_ms"] > 0 or timings["image_cache_hit"]
    assert timings["ttft_ms"] >= timings["prompt_ms"]


def test_greedy_is_deterministic_and_max_tokens_gives_length(server):
    client = _client(server)
    kw = dict(model=MODEL, messages=_messages("Where is the star?", _png_data_url(3)), temperature=0)
    a = client.chat.completions.create(max_tokens=5, **kw)
    b = client.chat.completions.create(max_completion_tokens=5, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    if a.usage.completion_tokens == 5:
        assert a.choices[0].finish_reason == "length"


def test_streaming_with_usage_and_timings(server):
    client = _client(server)
    kw = dict(model=MODEL, messages=_messages("How many squares are there?", _png_data_url(1)), max_tokens=8,
              temperature=0)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    usage = usage_chunks[0].usage
    assert 1 <= usage.completion_tokens <= 8
    timings = (chunks[-1].model_extra or {}).get("timings")
    assert timings and timings["predicted_n"] == usage.completion_tokens and "image_encode_ms" in timings
    assert all(c.id == chunks[0].id for c in chunks)
    # the same request without streaming gives the same text (greedy)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == usage.completion_tokens


def test_streaming_without_include_usage_has_no_usage_chunk(server):
    chunks = list(_client(server).chat.completions.create(model=MODEL, messages=_messages(), max_tokens=3,
                                                          stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_stop_string_and_sampling_parameters_are_accepted(server):
    r = _client(server).chat.completions.create(model=MODEL, messages=_messages(), max_tokens=6, temperature=0.8,
                                                top_p=0.9, seed=7, stop=["\n\n"], extra_body={"top_k": 20})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_wrong_or_missing_api_key_is_authentication_error(server):
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, api_key="wrong").chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
    assert e.value.status_code == 401
    r = httpx.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": _messages()})
    assert r.status_code == 401 and r.json()["error"]["type"]


def test_bad_image_is_bad_request(server):
    junk = "data:image/png;base64," + base64.b64encode(b"this is not a png" * 10).decode()
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).chat.completions.create(model=MODEL, messages=_messages(url=junk), max_tokens=2)
    assert e.value.status_code == 400
    assert "image" in e.value.message.lower()
    body = e.value.body if isinstance(e.value.body, dict) else {}
    assert set(body) >= {"message", "type"}              # the client unwraps {"error": {...}}
    empty = "data:image/png;base64,"
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model=MODEL, messages=_messages(url=empty), max_tokens=2)


def test_prompt_over_the_context_is_bad_request_with_the_counts(server):
    long_question = " ".join(["describe every shape and colour in great detail"] * 60)   # >> 256 tokens
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).chat.completions.create(model=MODEL, messages=_messages(long_question), max_tokens=2)
    assert e.value.status_code == 400
    msg = e.value.message
    assert "256" in msg and any(ch.isdigit() for ch in msg.replace("256", ""))


def test_unknown_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError) as e:
        _client(server).chat.completions.create(model="gpt-17", messages=_messages(), max_tokens=2)
    assert e.value.status_code == 404
    assert "gpt-17" in e.value.message


def test_server_keeps_answering_after_errors(server):
    r = _client(server).chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


class _SlowSession:
    """A loaded Session whose generation waits on an event first: the single worker stays busy on demand."""

    def __init__(self, session) -> None:
        self._session = session
        self.release = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._session, name)

    def _hold(self) -> None:
        self.entered.set()
        self.release.wait(timeout=60)

    def generate(self, *a, **kw):
        self._hold()
        return self._session.generate(*a, **kw)

    def stream(self, *a, **kw):
        self._hold()
        return self._session.stream(*a, **kw)


def test_queue_full_is_rate_limit_error_with_retry_after(bundle):
    """--max-queue 1: one request running (held), one waiting, the third is refused with 429 + Retry-After."""
    from edgevlm.runtime import Session
    from edgevlm.serve import ServeSettings, create_app

    slow = _SlowSession(Session.from_bundle(bundle, threads=1))
    app = create_app(ServeSettings(bundle=bundle, session=slow, api_key=API_KEY, model_name=MODEL, max_queue=1,
                                   warmup=False))
    with _Server(app) as s:
        client = _client(s)
        results: list = []

        def ask() -> None:
            results.append(client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2))

        first, second = (threading.Thread(target=ask, daemon=True) for _ in range(2))
        first.start()
        try:
            assert slow.entered.wait(timeout=60), "the first request never reached the session"
            second.start()
            health = s.base_url.replace("/v1", "/health")
            deadline = time.monotonic() + 30
            while httpx.get(health).json()["queue"]["waiting"] < 1:
                assert time.monotonic() < deadline, "the second request was never queued"
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
            assert e.value.status_code == 429
            assert e.value.response.headers.get("retry-after", "").isdigit()
            assert "queue" in e.value.message
        finally:
            slow.release.set()
            first.join(timeout=60)
            second.join(timeout=60)
        assert len(results) == 2 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
        # the slots are free again
        r = client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
        assert r.usage.completion_tokens >= 1


def test_repeated_request_reports_the_caches(server):
    """The same image and question twice: the second reuses the image embedding and the KV prefix, and says so in
    usage.prompt_tokens_details.cached_tokens and timings (cache_n, image_cache_hit)."""
    client = _client(server)
    kw = dict(model=MODEL, messages=_messages("What shape is it?", _png_data_url(5)), max_tokens=3, temperature=0)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    t = again.model_extra["timings"]
    assert t["image_cache_hit"] is True
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens == first.usage.prompt_tokens
    assert t["cache_n"] == cached and t["prompt_n"] == again.usage.prompt_tokens - cached
    assert again.choices[0].message.content == first.choices[0].message.content


def test_load_script_smoke(bundle, tmp_path):
    """benchmarks/serve_load.py end to end, small: `python -m edgevlm serve` as a subprocess, streaming and plain
    clients, a disconnect, SIGTERM with requests in flight: nothing failed or lost, the server exits 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_load.py"), "--bundle", str(bundle),
                           "--clients", "3", "--requests", "4", "--max-queue", "1", "--disconnect-clients", "1",
                           "--disconnect-every", "2", "--sigterm-inflight", "2", "--sigterm-new", "1",
                           "--threads", "1", "--max-seconds", "120", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["pass"] and r["load"]["lost"] == 0 and r["load"]["failed"] == 0
    assert r["load"]["ok"] + r["load"]["cancelled"] == 12 and r["load"]["cancelled"] >= 1
    assert r["sigterm"]["exit_code"] == 0 and r["sigterm"]["inflight_completed"] == 2
