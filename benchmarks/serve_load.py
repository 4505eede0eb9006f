"""Load test of ``edgevlm serve`` on loopback: concurrent clients, intended 429s, mid-stream disconnects, SIGTERM.

    python benchmarks/serve_load.py                                   # tiny bundle (exported here), 16 clients x 200
    python benchmarks/serve_load.py --bundle BUNDLE_1.7B_INT4 --label mobilevlm-1.7b-int4 --clients 4 --requests 5 \
        --max-tokens 16 --images 3 --max-queue 2 --disconnect-clients 2 --disconnect-every 2 --disconnect-after 3 \
        --retry-cap 5 --sigterm-inflight 2 --sigterm-max-tokens 16 --sigterm-new 2 --max-seconds 900

What it does, bounded in count (``--clients`` x ``--requests``) and time (``--max-seconds``):

1. starts the server as a subprocess (``python -m edgevlm serve BUNDLE --port P --max-queue Q ...``) on 127.0.0.1
   and waits for ``GET /health``; sends a few warm-up requests; reads the server's RSS (psutil).
2. ``--clients`` threads, each sending ``--requests`` chat completions with an image as a data URL (a few distinct
   images, so the image-embedding cache is exercised; a shared system prompt): three in four stream
   (``stream_options.include_usage``), one in four does not. A 429 (queue full; ``--max-queue`` is below the number
   of clients on purpose) is counted as an intended rejection and retried after min(Retry-After, ``--retry-cap``)
   seconds, jittered, so every logical request ends as ``ok``, ``cancelled`` (the ``--disconnect-clients`` first
   clients close the connection on every ``--disconnect-every``-th request: at the first streamed text, or after
   ``--disconnect-after`` seconds without a byte, i.e. while queued or generating tokens that decode to no text) or
   ``failed``; ``lost`` counts requests a thread never accounted for (must be 0). Each ok request is checked: a
   ``finish_reason``, ``usage``, a ``timings`` object, and ``data: [DONE]`` for a stream.
3. reads RSS again (also sampled every 0.5 s during the load: the caches are bounded, so RSS should plateau), then
   sends ``--sigterm-inflight`` streaming requests, waits until all are admitted and the worker runs one, sends
   SIGTERM, and checks that they all finish, that new requests are refused (503, or the connection is refused once
   the listener closes) and that the server exits 0.
4. writes JSON to ``benchmarks/results/serve_load_<label>.json`` (``--out``): counts, p50/p95 of client-side TTFT
   (first streamed text delta) and latency, the server's queue wait + TTFT per request (every request, streamed or
   not, even when its tokens decode to no text) and timings medians, RSS, the machine (``lscpu`` model name, cores,
   load average: other processes may share the cores), the command and the date. Exit status 1 unless it passed.

Client-side figures include HTTP, JSON and SSE framing on the same cores as the server (loopback), so they are
upper bounds of what the server adds; the server-side ``timings`` isolate the model.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SYSTEM = "You are a careful assistant that answers questions about images briefly."


# ---- helpers --------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(seed: int, size: tuple[int, int] = (48, 64)) -> str:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Architecture", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                               "CPU(s)", "Flags"):
                val = val.strip()
                if key.strip() == "Flags":
                    val = " ".join(f for f in val.split() if f.startswith(("avx512_vnni", "avx2", "amx")))
                info[key.strip()] = val
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def rss(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    out = {"rss_mib": round(p.memory_info().rss / 2**20, 1)}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def export_tiny(dest: Path) -> Path:
    """The tiny-ldpnetv2 preset, random init, fp32: a bundle that serves in milliseconds (needs the export extra)."""
    if not (dest / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "edgevlm", "export", "--model", "tiny-ldpnetv2", "--random-init",
                        "--precision", "fp32", "--skip-parity", "--out", str(dest)], check=True,
                       stdout=subprocess.DEVNULL)
    return dest


# ---- one request ----------------------------------------------------------------------------------------------

class Outcome:
    __slots__ = ("kind", "status", "ttft_s", "latency_s", "n429", "error", "timings", "usage")

    def __init__(self) -> None:
        self.kind = "lost"
        self.status = None
        self.ttft_s = None
        self.latency_s = None
        self.n429 = 0
        self.error = None
        self.timings = None
        self.usage = None


def body_for(i: int, images: list[str], max_tokens: int, stream: bool, model: str) -> dict:
    questions = ["What is in the picture?", "Describe the colors.", "Where is the circle?", "How many shapes?"]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.7 if i % 3 else 0.0, "seed": i,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": [
                             {"type": "text", "text": questions[i % len(questions)]},
                             {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _pause_after_429(r: httpx.Response, cap: float) -> None:
    """Honour Retry-After up to ``cap`` seconds, jittered (clients that all retry at once would collide again)."""
    try:
        after = float(r.headers.get("retry-after", "1"))
    except ValueError:
        after = 1.0
    time.sleep(random.uniform(0.5, 1.0) * min(after, cap))


def one_request(client: httpx.Client, body: dict, *, disconnect: bool, deadline: float, headers: dict,
                retry_cap: float = 0.1, disconnect_after: float = 1.0) -> Outcome:
    """One logical request (429s retried). ``disconnect``: close the connection at the first content delta, or
    ``disconnect_after`` seconds after the response head if no text came by then (queued, or a model whose tokens
    decode to no text, like a random-init bundle with a stand-in tokenizer)."""
    o = Outcome()
    while True:
        if time.monotonic() > deadline:
            o.kind, o.error = "not_started", "time budget exhausted"
            return o
        t0 = time.perf_counter()
        try:
            if body.get("stream"):
                # a disconnecting client also gives up after disconnect_after seconds without a byte
                timeout = httpx.Timeout(client.timeout.connect, read=disconnect_after) if disconnect else None
                with client.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                                   **({"timeout": timeout} if timeout else {})) as r:
                    o.status = r.status_code
                    if r.status_code == 429:
                        r.read()
                        o.n429 += 1
                        _pause_after_429(r, retry_cap)
                        continue
                    if r.status_code != 200:
                        o.kind, o.error = "failed", f"HTTP {r.status_code}: {r.read()[:300]!r}"
                        return o
                    finish, done = None, False
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            o.kind, o.error = "failed", f"stream error: {chunk['error']}"
                            return o
                        for ch in chunk.get("choices") or []:
                            if ch.get("delta", {}).get("content") and o.ttft_s is None:
                                o.ttft_s = time.perf_counter() - t0
                                if disconnect:
                                    o.kind, o.latency_s = "cancelled", o.ttft_s
                                    return o                       # leaving the with-block closes the connection
                            finish = ch.get("finish_reason") or finish
                        if chunk.get("usage"):
                            o.usage = chunk["usage"]
                        if chunk.get("timings"):
                            o.timings = chunk["timings"]
                    o.latency_s = time.perf_counter() - t0
                    if not done or finish not in ("stop", "length") or o.usage is None or o.timings is None:
                        o.kind = "failed"
                        o.error = f"incomplete stream: done={done} finish={finish} usage={o.usage is not None} " \
                                  f"timings={o.timings is not None}"
                        return o
                    o.kind = "ok"                              # (a disconnecting one that got no text first)
                    return o
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            o.status = r.status_code
            if r.status_code == 429:
                o.n429 += 1
                _pause_after_429(r, retry_cap)
                continue
            o.latency_s = time.perf_counter() - t0
            if r.status_code != 200:
                o.kind, o.error = "failed", f"HTTP {r.status_code}: {r.text[:300]}"
                return o
            js = r.json()
            ch = js["choices"][0]
            o.usage, o.timings = js.get("usage"), js.get("timings")
            if ch.get("finish_reason") not in ("stop", "length") or o.usage is None or o.timings is None:
                o.kind, o.error = "failed", f"incomplete response: {str(js)[:300]}"
                return o
            o.kind = "ok"
            return o
        except httpx.ReadTimeout as e:
            if disconnect and o.status == 200:                  # our own give-up: the connection is closed
                o.kind, o.latency_s = "cancelled", time.perf_counter() - t0
                return o
            o.kind, o.error = "failed", f"{type(e).__name__}: {e}"
            return o
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            o.kind, o.error = "failed", f"{type(e).__name__}: {e}"
            return o


# ---- phases ---------------------------------------------------------------------------------------------------

def start_server(args, bundle: Path, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgevlm", "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port),
           "--max-queue", str(args.max_queue), "--model-name", args.model_name]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.api_key:
        key_file = log_path.parent / "api_key.txt"                 # a file: the key stays out of ps
        key_file.write_text(args.api_key + "\n")
        cmd += ["--api-key-file", str(key_file)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    proc.cmd = cmd                                                           # type: ignore[attr-defined]
    t_end = time.monotonic() + args.startup_timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} during start-up; log: {log_path}\n"
                             + log_path.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server not healthy after {args.startup_timeout} s; log: {log_path}")


def load_phase(args, base: str, images: list[str], headers: dict) -> tuple[list[Outcome], float]:
    outcomes: list[list[Outcome | None]] = [[None] * args.requests for _ in range(args.clients)]
    deadline = time.monotonic() + args.max_seconds

    def client_thread(c: int) -> None:
        with httpx.Client(base_url=base, timeout=args.request_timeout) as client:
            for k in range(args.requests):
                i = c * args.requests + k
                stream = i % 4 != 3
                disconnect = stream and c < args.disconnect_clients and k % args.disconnect_every == 1
                outcomes[c][k] = one_request(client, body_for(i, images, args.max_tokens, stream, args.model_name),
                                             disconnect=disconnect, deadline=deadline, headers=headers,
                                             retry_cap=args.retry_cap, disconnect_after=args.disconnect_after)

    threads = [threading.Thread(target=client_thread, args=(c,), daemon=True) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + args.request_timeout + 5))
    wall = time.perf_counter() - t0
    flat = []
    for row in outcomes:
        for o in row:
            flat.append(o if o is not None else Outcome())                    # a slot never filled: lost
    return flat, wall


@contextlib.contextmanager
def _admitted_stream(client: httpx.Client, body: dict, headers: dict):
    """A streaming POST retried while the queue is full (429), so that the request ends up admitted (or refused
    for another reason, e.g. 503 once the server is shutting down)."""
    for _ in range(600):
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 429:
                yield r
                return
            r.read()
        time.sleep(0.05)
    raise httpx.HTTPError("still 429 after 600 tries")


def sigterm_phase(args, proc: subprocess.Popen, base: str, images: list[str], headers: dict) -> dict:
    """N streaming requests admitted (one running, the others queued), SIGTERM, then new requests: the N must
    finish, the new ones must be refused (503 or connection refused), and the server must exit 0."""
    n = args.sigterm_inflight
    results: list[Outcome | None] = [None] * n
    streaming = threading.Event()
    answered = [threading.Event() for _ in range(n)]          # response head received: admitted (or refused)

    def inflight(j: int) -> None:
        o = Outcome()
        body = body_for(10_000 + j, images, args.sigterm_max_tokens, True, args.model_name)
        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=base, timeout=args.request_timeout) as client:
                with _admitted_stream(client, body, headers) as r:
                    o.status = r.status_code
                    answered[j].set()
                    if r.status_code != 200:
                        r.read()
                        o.kind = "refused_503" if r.status_code == 503 else "failed"
                        o.error = f"HTTP {r.status_code}"
                        results[j] = o
                        return
                    finish, done = None, False
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line[6:] == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        for ch in chunk.get("choices") or []:
                            if ch.get("delta", {}).get("content"):
                                streaming.set()
                            finish = ch.get("finish_reason") or finish
                        o.usage = chunk.get("usage") or o.usage
                    o.latency_s = time.perf_counter() - t0
                    o.kind = "ok" if done and finish in ("stop", "length") else "failed"
                    if o.kind == "failed":
                        o.error = f"stream cut: done={done} finish={finish}"
        except httpx.HTTPError as e:
            o.kind, o.error = "failed", f"{type(e).__name__}: {e}"
        results[j] = o

    threads = [threading.Thread(target=inflight, args=(j,), daemon=True) for j in range(n)]
    for t in threads:
        t.start()
    for ev in answered:                                   # every request admitted (its SSE head came back) ...
        ev.wait(timeout=args.request_timeout)
    t_end = time.monotonic() + args.request_timeout       # ... and the worker running one of them
    while time.monotonic() < t_end and not all(r is not None for r in results):
        try:
            if httpx.get(f"{base}/health", timeout=5).json()["queue"]["running"]:
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    unfinished_at_sigterm = sum(r is None for r in results)
    t_term = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused, refused_codes = 0, []
    for j in range(args.sigterm_new):
        try:
            r = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=10,
                           json=body_for(20_000 + j, images, 4, False, args.model_name))
            refused_codes.append(r.status_code)
            refused += r.status_code == 503
        except httpx.ConnectError:
            refused_codes.append("connection refused")
            refused += 1
        except httpx.HTTPError as e:
            refused_codes.append(type(e).__name__)
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=args.request_timeout)
    try:
        rc = proc.wait(timeout=args.request_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "did not exit (killed)"
    exit_s = time.perf_counter() - t_term
    done = [o or Outcome() for o in results]
    return {"inflight": n, "inflight_max_tokens": args.sigterm_max_tokens,
            "unfinished_when_sigterm_sent": unfinished_at_sigterm,
            "inflight_completed": sum(o.kind == "ok" for o in done),
            "inflight_refused_503": sum(o.kind == "refused_503" for o in done),
            "inflight_failed_or_lost": [o.error or o.kind for o in done if o.kind not in ("ok", "refused_503")],
            "new_requests_after_sigterm": args.sigterm_new, "new_requests_refused": refused,
            "new_request_answers": refused_codes, "exit_code": rc, "exit_after_sigterm_s": round(exit_s, 2)}


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("ok", "cancelled", "failed", "not_started", "lost")}
    ok = [o for o in outcomes if o.kind == "ok"]
    ttft = [o.ttft_s * 1e3 for o in ok if o.ttft_s is not None]
    srv_ttft = [o.timings["ttft_ms"] + o.timings.get("queue_ms", 0.0) for o in ok if o.timings]
    lat = [o.latency_s * 1e3 for o in ok if o.latency_s is not None]
    srv = [o.timings for o in ok if o.timings]

    def med(key):
        xs = [t[key] for t in srv if isinstance(t.get(key), (int, float))]
        return round(float(np.median(xs)), 2) if xs else None

    hits = [t.get("image_cache_hit") for t in srv if "image_cache_hit" in t]
    cached = [o.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0) or 0 for o in ok if o.usage]
    return {"requests": len(outcomes), **kinds,
            "intended_429": sum(o.n429 for o in outcomes),
            "requests_that_met_429": sum(o.n429 > 0 for o in outcomes),
            "failures": sorted({o.error for o in outcomes if o.kind == "failed"})[:10],
            "wall_s": round(wall, 2), "completed_per_s": round(kinds["ok"] / wall, 2) if wall else None,
            "client_ttft_ms": {"n": len(ttft), "p50": _r(percentile(ttft, 50)), "p95": _r(percentile(ttft, 95))},
            "client_latency_ms": {"n": len(lat), "p50": _r(percentile(lat, 50)), "p95": _r(percentile(lat, 95))},
            "server_queue_plus_ttft_ms": {"n": len(srv_ttft), "p50": _r(percentile(srv_ttft, 50)),
                                          "p95": _r(percentile(srv_ttft, 95))},
            "server_timings_median": {k: med(k) for k in ("preprocess_ms", "image_encode_ms", "prompt_ms",
                                                         "prompt_per_second", "ttft_ms", "predicted_ms",
                                                         "predicted_per_second", "prompt_n", "predicted_n",
                                                         "cache_n")},
            "image_cache_hit_rate": round(sum(bool(h) for h in hits) / len(hits), 3) if hits else None,
            "prompt_tokens_cached_median": float(np.median(cached)) if cached else None}


def _r(x):
    return None if x is None else round(x, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: tiny-ldpnetv2 exported into a temp dir)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--images", type=int, default=6, help="distinct images cycled through")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--disconnect-clients", type=int, default=3)
    ap.add_argument("--disconnect-every", type=int, default=20)
    ap.add_argument("--disconnect-after", type=float, default=1.0,
                    help="a disconnecting client also closes after this many seconds without a byte")
    ap.add_argument("--retry-cap", type=float, default=0.1,
                    help="a 429 is retried after min(Retry-After, this) seconds x U(0.5, 1)")
    ap.add_argument("--sigterm-inflight", type=int, default=6)
    ap.add_argument("--sigterm-max-tokens", type=int, default=160)
    ap.add_argument("--sigterm-new", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="time budget of the load phase")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads")
    ap.add_argument("--backend", default=None, help="the server's --backend")
    ap.add_argument("--api-key", default="load-test-key")
    ap.add_argument("--model-name", default="edgevlm")
    ap.add_argument("--label", default=None, help="result file label (default: the bundle's model name)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    bundle = args.bundle or export_tiny(tmp / "tiny-ldpnetv2")
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest.get("model", {}).get("name") or manifest.get("model_name") or bundle.name
    precision = manifest.get("precision", {})
    label = args.label or str(model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    images = [png_data_url(s) for s in range(args.images)]
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "bundle": str(bundle), "model": model, "precision": precision,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}}

    log_path = tmp / "server.log"
    proc = start_server(args, bundle, port, log_path)
    info["server_command"] = "python " + " ".join(proc.cmd[1:])                               # type: ignore
    try:
        info["health"] = httpx.get(f"{base}/health", timeout=10).json()
        with httpx.Client(base_url=base, timeout=args.request_timeout) as c:      # warm-up: every image once
            for i in range(len(images)):
                o = one_request(c, body_for(i, images, args.max_tokens, i % 2 == 0, args.model_name),
                                disconnect=False, deadline=time.monotonic() + args.request_timeout, headers=headers)
                if o.kind != "ok":
                    raise SystemExit(f"warm-up request failed: {o.error}")
        info["rss_before_load"] = rss(proc.pid)
        print(f"server pid {proc.pid} on {base}: RSS after warm-up {info['rss_before_load']}", flush=True)
        samples: list[tuple[float, float]] = []                 # (s since load start, RSS MiB) every 0.5 s
        sampling = threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not sampling.wait(0.5):
                try:
                    samples.append((round(time.perf_counter() - t0, 1), rss(proc.pid)["rss_mib"]))
                except Exception:                                   # noqa: BLE001 - the server may be gone
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcomes, wall = load_phase(args, base, images, headers)
        sampling.set()
        sampler.join()
        info["load"] = summarize(outcomes, wall)
        info["rss_after_load"] = rss(proc.pid)
        half = len(samples) // 2
        info["rss_during_load_mib"] = {
            "samples": len(samples), "min": min((m for _, m in samples), default=None),
            "max_first_half": max((m for _, m in samples[:half]), default=None),
            "max_second_half": max((m for _, m in samples[half:]), default=None),
            "series": samples[:: max(1, len(samples) // 40)]}
        try:
            info["metrics_excerpt"] = [ln for ln in httpx.get(f"{base}/metrics", headers=headers, timeout=10)
                                       .text.splitlines() if ln and not ln.startswith("#")
                                       and ("_total" in ln or "_count" in ln or "queue" in ln)][:60]
        except httpx.HTTPError as e:
            info["metrics_excerpt"] = f"unavailable: {e}"
        print(json.dumps(info["load"], indent=1), flush=True)
        info["sigterm"] = sigterm_phase(args, proc, base, images, headers)
        print(json.dumps(info["sigterm"], indent=1), flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    info["server_log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    load, term = info["load"], info["sigterm"]
    info["checks"] = {
        "no_failed_or_lost": load["failed"] == 0 and load["lost"] == 0 and load["not_started"] == 0,
        "inflight_finished_after_sigterm": not term["inflight_failed_or_lost"]
                                           and term["inflight_completed"] == term["inflight"],
        "new_requests_refused_after_sigterm": term["new_requests_refused"] == term["new_requests_after_sigterm"],
        "exit_code_0": term["exit_code"] == 0,
        # informative: on a tiny bundle the requests may all be done before the signal lands
        "sigterm_landed_with_requests_in_flight": term["unfinished_when_sigterm_sent"] >= 1}
    info["pass"] = all(v for k, v in info["checks"].items() if k != "sigterm_landed_with_requests_in_flight")
    out = args.out or RESULTS / f"serve_load_{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"pass={info['pass']} {info['checks']} -> {out}")
    return 0 if info["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
