"""The sweep runner: bundles x threads x backends (one fresh Session each) x prompt tokens x output tokens.

    >>> from edgevlm.bench.sweep import SweepSpec, run_sweep
    >>> spec = SweepSpec(bundles=["b/576", "b/144"], prompt_tokens=[16, 64], output_tokens=[16, 64], threads=[2])
    >>> result = run_sweep(spec)                 # {"sessions": [...], "configurations": [...], ...}

One **session** = one (bundle, threads, backend). It runs in its own subprocess by default (``isolate``): the load is
measured in a process that has loaded nothing else, and the process's peak RSS (VmHWM) belongs to that bundle alone.
In the session:

1. ``prime`` (default on with the optimized-graph cache): a first ``Session.from_bundle`` fills ORT's optimized-graph
   cache and the hash stamps, then is closed (``first_load_s``); the measured load is a **fresh Session** created after
   it (``load_s``: what a device pays at every start once the bundle was opened once);
2. prompts of exactly N text tokens are built for every ``prompt_tokens`` value (``workload.fit_prompt``, not timed);
3. ``warmup`` requests (largest prompt, smallest output; their timings are kept apart in ``warmup``);
4. ``repeats`` rounds over every (prompt tokens, output tokens) configuration, round-robin (slow drifts of the machine
   spread over all configurations instead of biasing the last one), each request with a **distinct image**
   (``workload.ImageStream``) and ``ignore_eos=True`` so exactly ``output_tokens`` tokens are generated (EOS and stop
   strings are ignored; a request that ends otherwise is an error).

**Backends** (``--backend``, a list): one sweep compares backends of one bundle. ``ort`` (ONNX Runtime, CPU
provider), ``ort-cuda`` / ``ort-tensorrt`` (ONNX Runtime's CUDA / TensorRT execution providers), ``native`` (ORT
prefill + the native kernel's decode steps), ``tensorrt`` (the engines of ``edgevlm build-engine``), ``auto`` (what
``Session`` picks: TensorRT, else native, else ORT). A backend that cannot run here (no such execution provider, no
``tensorrt``, engines of another GPU, a CPU or bundle the native kernel cannot run) is **skipped with its reason**
(``result["skipped"]`` and a note), never a crash. Every backend of one bundle and thread count sees the same image
stream, and every request records its tokens: the report checks that the backends' greedy tokens agree
(``edgevlm.bench.report``: ``backend_agreement``). Each session records which backend ran vision and which ran the
decoder (``vision_backend`` / ``decoder_backend``).

Torch-free: imports numpy, onnxruntime (through the runtime), PIL, tokenizers. Worker entry point:
``python -m edgevlm.bench.sweep --worker JOB.json`` prints ``RESULT {json}`` as its last line.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edgevlm.errors import ConfigError, EdgeVLMError

log = logging.getLogger(__name__)

__all__ = ["SweepSpec", "run_sweep", "worker_result", "run_session", "BACKENDS", "ALIASES", "available_backends",
           "unavailable_reason", "METRICS", "summarize",
           "expand_bundle_paths"]

#: bench backend name -> (``Session.from_bundle(backend=...)``, its ``providers=``; None = the Session's default)
BACKENDS: dict[str, tuple[str, list[str] | None]] = {
    "ort": ("ort", ["cpu"]), "ort-cuda": ("ort", ["cuda"]), "ort-tensorrt": ("ort", ["tensorrt", "cuda"]),
    "native": ("native", ["cpu"]), "tensorrt": ("tensorrt", None), "auto": ("auto", None)}
#: the name before the backend interface: ORT's CPU provider, decode steps native where the kernel runs = ``auto`` on
#: a CPU machine (old reports and benchmarks/bench_baseline.py say it; ``--compare`` matches it to ``auto``)
ALIASES = {"ort-cpu": "auto"}
_BACKEND_EP = {"ort": "CPUExecutionProvider", "native": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
               "ort-tensorrt": "TensorrtExecutionProvider"}

#: per-request metrics aggregated per configuration (all from ``RequestTimings`` except ``overhead_ms``)
METRICS = ("total_ms", "ttft_ms", "preprocess_ms", "tokenize_ms", "vision_ms", "prefill_ms", "prefill_tok_s",
           "decode_ms", "decode_tok_s", "decode_token_ms_p50", "decode_token_ms_p95", "sampling_ms", "detokenize_ms",
           "other_ms", "overhead_ms", "peak_rss_mb", "rss_mb")
_REQUEST_DROP = ("load_breakdown", "load_s")


@dataclass
class SweepSpec:
    """What to measure. ``threads`` entries of None mean the runtime's default (physical cores)."""

    bundles: list[str]
    prompt_tokens: list[int] = field(default_factory=lambda: [16, 64])
    output_tokens: list[int] = field(default_factory=lambda: [16, 64])
    threads: list[int | None] = field(default_factory=lambda: [None])
    backends: list[str] = field(default_factory=lambda: ["auto"])
    warmup: int = 1
    repeats: int = 3
    prompt_mode: str = "raw"
    image_size: tuple[int, int] | None = None      # (W, H); None = the bundle's square input size
    seed: int = 0
    isolate: bool = True
    cache: str | None = "session"                  # optimized-graph cache: "session" (a fresh temp dir per session,
                                                   # removed after it), "auto" (~/.cache), a directory, or None (off)
    prime: bool = True
    verify_hashes: bool = True
    spinning: bool = False
    timeout_s: float = 3600.0

    def validate(self) -> None:
        if not self.bundles:
            raise ConfigError("no bundles to benchmark; pass bundle directories (or a directory holding bundles)")
        for name, vals in (("prompt_tokens", self.prompt_tokens), ("output_tokens", self.output_tokens)):
            if not vals or any(int(v) < 1 for v in vals):
                raise ConfigError(f"--{name.replace('_', '-')} needs positive token counts, got {vals}")
        if any(t is not None and int(t) < 1 for t in self.threads):
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0 (got {self.repeats}, {self.warmup})")
        self.backends = list(dict.fromkeys(ALIASES.get(b, b) for b in self.backends))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ConfigError(f"backend(s) {', '.join(unknown) or '(none)'} unknown; known: {', '.join(BACKENDS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        d["order"] = "round-robin over configurations within each repeat"
        return d


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine at all (None when it may: a bundle can still lack what it needs,
    e.g. engines or a native plan, which the session reports as skipped)."""
    from edgevlm.runtime.backends import import_ort

    ep = _BACKEND_EP.get(backend)
    if ep is not None:
        have = import_ort().get_available_providers()
        if ep not in have:
            return f"this onnxruntime has no {ep} (available: {', '.join(have)})"
    if backend == "native":
        from edgevlm.runtime.native import availability

        return availability()
    if backend == "tensorrt":
        from edgevlm.errors import MissingDependency
        from edgevlm.runtime.trt_backend import import_tensorrt

        try:
            import_tensorrt()
        except MissingDependency as exc:
            return str(exc)
    return None


def available_backends() -> list[str]:
    """Backends that may run on this machine (``unavailable_reason`` is None)."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def expand_bundle_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Bundle directories as given; a directory that is not a bundle contributes the bundles directly inside it
    (sorted by name)."""
    from edgevlm.bundle import is_bundle

    out: list[str] = []
    for p in paths:
        path = Path(p)
        if is_bundle(path):
            out.append(str(path))
        elif path.is_dir():
            inner = sorted(str(c) for c in path.iterdir() if c.is_dir() and is_bundle(c))
            if not inner:
                raise ConfigError(f"'{path}' is neither a bundle nor a directory holding bundles")
            out += inner
        else:
            raise ConfigError(f"bundle '{path}' does not exist (a bundle directory with manifest.json, or a directory "
                              f"of bundles)")
    return list(dict.fromkeys(out))


# ---- statistics ---------------------------------------------------------------------------------------------------
def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median / mean / min / max / q1 / q3 / iqr / spread (= (max - min) / median) / n."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0}
    med = _quantile(xs, 0.5)
    q1, q3 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    lo, hi = min(xs), max(xs)
    return {"median": med, "mean": sum(xs) / len(xs), "min": lo, "max": hi, "q1": q1, "q3": q3, "iqr": q3 - q1,
            "spread": (hi - lo) / med if med else 0.0, "n": len(xs)}


# ---- one session (in this process) ----------------------------------------------------------------------------------
def _request_record(result: Any, image_tag: str, repeat: int, seq: int) -> dict[str, Any]:
    t = result.timings.to_dict()
    for k in _REQUEST_DROP:
        t.pop(k, None)
    t["overhead_ms"] = max(0.0, t["total_ms"] - t["preprocess_ms"] - t["vision_ms"] - t["prefill_ms"]
                           - t["decode_ms"])
    t.update({"image": image_tag, "repeat": repeat, "seq": seq, "finish_reason": result.finish_reason,
              "tokens": [int(x) for x in result.tokens]})
    return t


def _open(job: dict[str, Any]):
    from edgevlm.runtime import Session

    backend, providers = BACKENDS[ALIASES.get(job["backend"], job["backend"])]
    return Session.from_bundle(job["bundle"], backend=backend, threads=job.get("threads"), providers=providers,
                               verify_hashes=job.get("verify_hashes", True), optimized_cache=job.get("cache"),
                               spinning=job.get("spinning", False))


def _unavailable() -> tuple[type[Exception], ...]:
    """Errors that, raised while opening a session, mean: this backend cannot run this bundle here (skipped)."""
    from edgevlm.errors import MissingDependency, RuntimeBackendError

    return (MissingDependency, RuntimeBackendError)


def run_session(job: dict[str, Any], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure one session (see the module docstring). ``job``: bundle, threads, backend, prompt_tokens,
    output_tokens, warmup, repeats, prompt_mode, image_size, seed, image_start, cache, prime, verify_hashes,
    spinning. Returns the session record with its configurations' per-request rows."""
    from edgevlm.bench.workload import ImageStream, fit_prompt
    from edgevlm.runtime.timings import peak_rss_bytes

    from edgevlm.bench.env import loadavg

    say = progress or (lambda s: None)
    rec: dict[str, Any] = {"bundle": job["bundle"], "backend": job["backend"], "threads_requested": job.get("threads"),
                           "pid": os.getpid(), "loadavg_start": loadavg()}
    try:
        s0 = _open(job)
    except _unavailable() as exc:
        rec["unavailable"] = f"{type(exc).__name__}: {exc}"
        return rec
    if job.get("prime", True) and job.get("cache"):
        rec["first_load_s"] = s0.load_s
        rec["first_load_cache"] = {k: v.cache for k, v in s0.session_info.items()}
        s0.close()
        del s0
        gc.collect()
        s = _open(job)
    else:
        s = s0
    rec.update({"load_s": s.load_s, "load_breakdown": dict(s.load_breakdown), "threads": s.threads,
                "providers": [p if isinstance(p, str) else p[0] for p in s.providers],
                "cache": {k: v.cache for k, v in s.session_info.items()}, "verification": s.verification,
                "visual_tokens": s.visual_tokens, "context_length": s.context_length,
                "manifest_sha256": s.bundle.manifest_sha256, "rss_after_load_mb": _rss_mb(),
                "vision_backend": s.vision_backend, "decoder_backend": s.decoder_backend,
                "native_decode": s.native_info})
    say(f"loaded {Path(job['bundle']).name} in {s.load_s:.2f} s ({s.threads} threads, {job['backend']}: vision "
        f"{s.vision_backend}, decoder {s.decoder_backend})")
    raw = job.get("prompt_mode", "raw") == "raw"
    prompts: dict[int, tuple[str, int]] = {}
    for n in job["prompt_tokens"]:
        prompts[int(n)] = fit_prompt(s, int(n), job.get("prompt_mode", "raw"))
    size = tuple(job["image_size"]) if job.get("image_size") else (s.preprocess_config.image_size,) * 2
    start = int(job.get("image_start", 0))
    images = ImageStream(size, seed=int(job.get("seed", 0)), start=start)
    warm_images = ImageStream(size, seed=int(job.get("seed", 0)) + 7919, start=start)

    configs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for p in job["prompt_tokens"]:
        for o in job["output_tokens"]:
            need = s.visual_tokens + prompts[int(p)][1] + int(o)
            if need > s.context_length:
                skipped.append(f"p{p} o{o}: {need} tokens exceed the context ({s.context_length})")
                continue
            configs.append({"prompt_tokens_requested": int(p), "output_tokens": int(o),
                            "text_tokens": prompts[int(p)][1], "prompt": prompts[int(p)][0], "requests": []})
    rec["skipped"] = skipped

    def one(prompt: str, n_out: int, img_stream: ImageStream, repeat: int, seq: int) -> dict[str, Any]:
        img, tag = img_stream.next()
        r = s.generate(img, prompt, max_new_tokens=n_out, ignore_eos=True, raw_prompt=raw)
        if len(r.tokens) != n_out:
            raise EdgeVLMError(f"request generated {len(r.tokens)} tokens, not {n_out} (finish: {r.finish_reason}); "
                               f"the Session did not honour ignore_eos / max_new_tokens")
        return _request_record(r, tag, repeat, seq)

    warm: list[dict[str, Any]] = []
    if configs:
        pmax = max(configs, key=lambda c: c["text_tokens"])["prompt"]
        omin = min(c["output_tokens"] for c in configs)
        for i in range(int(job.get("warmup", 1))):
            warm.append(one(pmax, omin, warm_images, -1, -1 - i))
    rec["warmup"] = warm
    seq = 0
    for rep in range(int(job["repeats"])):
        for c in configs:
            row = one(c["prompt"], c["output_tokens"], images, rep, seq)
            seq += 1
            c["requests"].append(row)
            say(f"{Path(job['bundle']).name} t{s.threads} p{c['text_tokens']} o{c['output_tokens']} r{rep}: "
                f"total {row['total_ms']:.1f} ms, vision {row['vision_ms']:.1f}, prefill {row['prefill_tok_s']:.1f} "
                f"tok/s, decode {row['decode_tok_s']:.2f} tok/s")
    rec["configurations"] = configs
    rec["peak_rss_mb"] = peak_rss_bytes() / 2**20
    rec["loadavg_end"] = loadavg()
    rec["image_tags"] = images.tags + warm_images.tags
    s.close()
    return rec


def _rss_mb() -> float:
    from edgevlm.runtime.timings import current_rss_bytes

    return current_rss_bytes() / 2**20


def _run_isolated(job: dict[str, Any], timeout: float, verbose: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="edgevlm-bench-job-") as f:
        json.dump(job, f)
        job_file = f.name
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "edgevlm.bench.sweep", "--worker", job_file] + (["--verbose"] if verbose else [])
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, text=True,
                           timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "bundle": job["bundle"]}
    finally:
        os.unlink(job_file)
    wall = time.perf_counter() - t
    res = worker_result(p.stdout, wall)
    if res is not None:
        return res
    err = (p.stderr or "") + p.stdout
    return {"error": f"worker exited with {p.returncode}: {err[-3000:]}", "bundle": job["bundle"],
            "worker_wall_s": wall}


def worker_result(stdout: str, wall_s: float) -> dict[str, Any] | None:
    """The JSON of a worker's last ``RESULT {json}`` line (with ``worker_wall_s`` added), or None if it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "worker_wall_s": wall_s}
    return None


def run_sweep(spec: SweepSpec, progress: Callable[[str], None] | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Run every session of ``spec``; returns ``{"sessions": [...], "notes": [...], "backends": [...],
    "skipped": [{"backend", "bundle", "threads", "reason"}]}`` (raw measurements; ``edgevlm.bench.report.build_report``
    turns them into the report)."""
    spec.validate()
    say = progress or (lambda s: log.info("%s", s))
    notes: list[str] = []
    skipped: list[dict[str, Any]] = []
    backends = []
    for b in spec.backends:
        why = unavailable_reason(b)
        if why is None:
            backends.append(b)
        else:
            notes.append(f"backend {b} skipped: {why}")
            skipped.append({"backend": b, "bundle": None, "threads": None, "reason": why})
    if not backends:
        raise ConfigError(f"none of the requested backends ({', '.join(spec.backends)}) can run here: "
                          + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    sessions: list[dict[str, Any]] = []
    jobs = [(b, t, be) for b in spec.bundles for t in spec.threads for be in backends]
    stream = {bt: k for k, bt in enumerate(dict.fromkeys((b, t) for b, t, _ in jobs))}
    for i, (bundle, threads, backend) in enumerate(jobs):
        job = {"bundle": str(bundle), "threads": threads, "backend": backend,
               "prompt_tokens": [int(x) for x in spec.prompt_tokens],
               "output_tokens": [int(x) for x in spec.output_tokens], "warmup": spec.warmup, "repeats": spec.repeats,
               "prompt_mode": spec.prompt_mode, "image_size": list(spec.image_size) if spec.image_size else None,
               "seed": spec.seed, "image_start": stream[(bundle, threads)] * 1_000_000,  # same images per backend
               "cache": spec.cache, "prime": spec.prime,
               "verify_hashes": spec.verify_hashes, "spinning": spec.spinning}
        say(f"[{i + 1}/{len(jobs)}] {Path(bundle).name}: threads {threads or 'default'}, {backend}")
        t = time.perf_counter()
        tmp_cache = None
        if spec.cache == "session":
            tmp_cache = tempfile.mkdtemp(prefix="edgevlm-bench-cache-")
            job["cache"] = tmp_cache
        try:
            rec = _run_job(job, spec, verbose, say)
        finally:
            if tmp_cache:
                shutil.rmtree(tmp_cache, ignore_errors=True)
        rec.setdefault("bundle", str(bundle))
        rec.setdefault("backend", backend)
        rec.setdefault("threads_requested", threads)
        rec["cache_mode"] = "session" if tmp_cache else spec.cache
        rec["session_wall_s"] = time.perf_counter() - t
        if "unavailable" in rec:
            why = rec["unavailable"]
            say(f"  skipped: {why}")
            notes.append(f"backend {backend} skipped for {Path(bundle).name} (threads {threads}): {why}")
            skipped.append({"backend": backend, "bundle": str(bundle), "threads": threads, "reason": why})
            continue
        if "error" in rec:
            say(f"  failed: {rec['error'][-500:]}")
            notes.append(f"session {Path(bundle).name} threads {threads} {backend} failed: {rec['error'][-300:]}")
        else:
            say(f"  load {rec['load_s']:.2f} s, {sum(len(c['requests']) for c in rec['configurations'])} requests "
                f"in {rec['session_wall_s']:.1f} s")
        sessions.append(rec)
    return {"sessions": sessions, "notes": notes, "backends": backends, "skipped": skipped}


def _run_job(job: dict[str, Any], spec: SweepSpec, verbose: bool, say: Callable[[str], None]) -> dict[str, Any]:
    if spec.isolate:
        rec = _run_isolated(job, spec.timeout_s, verbose)
    else:
        try:
            rec = run_session(job, progress=say if verbose else None)
        except EdgeVLMError as exc:
            rec = {"error": f"{type(exc).__name__}: {exc}", "bundle": job["bundle"]}
    return rec


def _worker(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgevlm.bench.sweep")
    ap.add_argument("--worker", required=True, help="job JSON file")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    job = json.loads(Path(args.worker).read_text())
    try:
        rec = run_session(job, progress=(lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None)
    except EdgeVLMError as exc:
        rec = {"error": f"{type(exc).__name__}: {exc}", "bundle": job["bundle"]}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this session's error, not a crash
        rec = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}", "bundle": job["bundle"]}
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
