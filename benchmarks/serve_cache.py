"""Time to first token with the Session's caches (what ``edgevlm serve`` runs): a cold request against the same image
again with another question.

One Session (``image_cache_mib``, ``prefix_cache=True``, warmed up) answers, for each of ``--runs`` distinct images:

* ``cold``: the caches cleared first (``Session.clear_caches``): preprocess + vision encode + the whole prompt's
  prefill (system prompt + visual tokens + question);
* ``repeat``: the same image with another question: the image embeddings come from the image cache (no vision
  encode) and the KV rows of the system prompt + the image are kept (``Decoder.rewind``), so only the question is
  prefilled (``Decoder.extend``);
* ``new_image``: a different image after that: the vision encode runs, the system prompt's rows are kept.

Each answer is greedy and ``--max-new-tokens`` long at most; the figure is ``timings.ttft_ms`` (request start to the
first token). ``repeat`` must give the tokens that a cold request with the same image and question gives (checked
on every run: a cold reference request after clearing the caches). Medians over the runs; acceptance: median repeat
TTFT <= 25 % of median cold TTFT. The JSON records the CPU model, the command, the load average and every request.

    python benchmarks/serve_cache.py --bundle bundles/mobilevlm-1.7b-int4 --runs 3 \\
        --out benchmarks/results/serve_cache_mobilevlm-1.7b-int4.json

Never imports torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

QUESTIONS = ("What is in the picture? Answer briefly.", "Which colors can you see in this image?",
             "Is there any text in the image?")


def _cpu_model() -> str:
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(kind: str, run: int, r) -> dict:
    t = r.timings
    return {"kind": kind, "run": run, "ttft_ms": round(t.ttft_ms, 2), "preprocess_ms": round(t.preprocess_ms, 2),
            "vision_ms": round(t.vision_ms, 2), "prefill_ms": round(t.prefill_ms, 2),
            "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
            "image_cache_hit": t.image_cache_hit, "generated_tokens": t.generated_tokens,
            "cpu_ms": round(t.cpu_ms, 1), "tokens": [int(x) for x in r.tokens]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True,
                    help="an int4 CPU bundle of mobilevlm-1.7b (edgevlm export --model mobilevlm-1.7b "
                         "--random-init --target cpu-x86-avx512-vnni --precision int4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--image-cache-mib", type=float, default=256.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not Path(args.bundle, "manifest.json").is_file():
        print(f"no bundle at {args.bundle} (export mobilevlm-1.7b int4 there first)", file=sys.stderr)
        return 2

    from edgevlm.bench.workload import ImageStream
    from edgevlm.runtime import Session

    t0 = time.perf_counter()
    s = Session.from_bundle(args.bundle, backend=args.backend, threads=args.threads, warmup=True,
                            image_cache_mib=args.image_cache_mib, prefix_cache=True)
    load_s = time.perf_counter() - t0
    size = s.preprocess_config.image_size
    images = ImageStream((size, size), seed=0, start=100)
    rows: list[dict] = []
    same_tokens = True
    gen = dict(max_new_tokens=args.max_new_tokens)
    for run in range(args.runs):
        img, _ = images.next()
        other, _ = images.next()
        s.clear_caches()
        rows.append(_row("cold", run, s.generate(img, QUESTIONS[0], **gen)))
        rep = s.generate(img, QUESTIONS[1], **gen)
        rows.append(_row("repeat", run, rep))
        rows.append(_row("new_image", run, s.generate(other, QUESTIONS[2], **gen)))
        s.clear_caches()                                       # the reference: the repeat's request, cold
        ref = s.generate(img, QUESTIONS[1], **gen)
        rows.append(_row("repeat_reference_cold", run, ref))
        same_tokens &= ref.tokens == rep.tokens
        print(f"run {run}: cold {rows[-4]['ttft_ms']:.0f} ms, repeat {rows[-3]['ttft_ms']:.0f} ms "
              f"({rows[-3]['cached_tokens']} cached), new image {rows[-2]['ttft_ms']:.0f} ms "
              f"({rows[-2]['cached_tokens']} cached); repeat tokens == cold: {ref.tokens == rep.tokens}",
              flush=True)

    med = {k: statistics.median(r["ttft_ms"] for r in rows if r["kind"] == k)
           for k in ("cold", "repeat", "new_image", "repeat_reference_cold")}
    ratio = med["repeat"] / med["cold"]
    out = {
        "benchmark": "serve_cache", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd()), *(argv or sys.argv[1:])]),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_end": list(os.getloadavg())},
        "bundle": str(args.bundle), "model": s.config.name, "vision_backend": s.vision_backend,
        "decoder_backend": s.decoder_backend, "threads": s.threads, "visual_tokens": s.visual_tokens,
        "load_s": round(load_s, 2), "max_new_tokens": args.max_new_tokens, "runs": args.runs,
        "median_ttft_ms": {k: round(v, 1) for k, v in med.items()},
        "repeat_over_cold": round(ratio, 4), "acceptance": "median repeat TTFT <= 25 % of median cold TTFT",
        "passed": ratio <= 0.25 and same_tokens, "repeat_tokens_equal_cold": same_tokens,
        "cache_stats": s.cache_stats(), "requests": rows,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: out[k] for k in ("median_ttft_ms", "repeat_over_cold", "passed",
                                          "repeat_tokens_equal_cold", "decoder_backend", "threads")}, indent=2))
    s.close()
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
