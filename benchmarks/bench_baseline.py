"""Baseline latency sweep of the mobilevlm-1.7b shape across visual-token budgets, committed under benchmarks/results.

    .venv/bin/python benchmarks/bench_baseline.py                          # export + sweep + report (~30 min)
    .venv/bin/python benchmarks/bench_baseline.py --base-bundle B          # derive budgets from an existing fp32
                                                                           # mobilevlm-1.7b bundle (skips its export)
    .venv/bin/python benchmarks/bench_baseline.py --estimate               # build, then time one request per
                                                                           # extreme bundle and print the estimate

Steps:

1. ``edgevlm.bench.budgets.build_budget_bundles``: the fp32 base (``--model``, 144-token LDP for mobilevlm-1.7b) is
   exported once (random init, seed 0; or taken from ``--base-bundle``); the other budgets (576 ``mlp2x_gelu``, 144
   LDPv2, pooled 64 / 36) get only their vision graph exported and hard-link the base's decoder; the ``--precision``
   bundles (default ``int4,vision=fp32``: MobileVLM's own latency setup, 4-bit LM with the vision encoder and projector
   at original precision) quantize the base's decoder once and link it into every budget.
2. ``edgevlm bench`` over: every budget at ``--precision`` + the base budget at fp32 (the second precision),
   ``--prompt-tokens`` x ``--output-tokens``, ``--threads``, 1 warm-up, ``--repeats`` measured requests each with a
   distinct image, one subprocess per session.
3. ``benchmarks/results/{--name}.json`` / ``.md`` / ``_*.png``; the bundles (GBs) are deleted unless ``--keep``.

The exact command line is stored in the report (``command``) and in benchmarks/results/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilevlm-1.7b")
    ap.add_argument("--budgets", default="576,144,ldpv2:144,64,36")
    ap.add_argument("--precision", default="int4,vision=fp32", help="precision of every budget")
    ap.add_argument("--second-precision", default="fp32", help="precision of the base budget only ('' = none)")
    ap.add_argument("--base-bundle", default=None, help="an existing fp32 bundle of --model to derive from")
    ap.add_argument("--work-dir", default="/tmp/edgevlm-bench-baseline")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--output-tokens", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bandwidth-gib", type=float, default=0.5)
    ap.add_argument("--name", default=None, help="report stem (default baseline_{model})")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--keep", action="store_true", help="keep the bundles")
    ap.add_argument("--estimate", action="store_true", help="build, time one request per extreme bundle, stop")
    ap.add_argument("--cache", default="session", help="optimized-graph cache: session (a temp dir per session), "
                                                     "off, or a directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(ROOT))

    from edgevlm.bench.budgets import build_budget_bundles, parse_precisions
    from edgevlm.bench.sweep import SweepSpec
    from edgevlm.bundle import read_bundle
    from edgevlm.cli.bench import run_bench

    command = shlex.join([".venv/bin/python", "benchmarks/bench_baseline.py", *sys.argv[1:]])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    main_prec = parse_precisions(args.precision)[0]
    precs = ["fp32"] + ([main_prec] if main_prec != "fp32" else [])
    built = build_budget_bundles(args.model, work / "bundles", args.budgets, precisions=precs, random_init=True,
                                 base_bundle=args.base_bundle, progress=lambda s: print(s, flush=True))
    print(f"bundles ready in {time.perf_counter() - t0:.0f} s", flush=True)
    by_prec: dict[str, list[Path]] = {}
    for p in built.bundles:
        m = read_bundle(p, verify_hashes=False).manifest
        by_prec.setdefault(m["precision"], []).append(p)
    main_bundles = by_prec.get(main_prec, [])
    second: list[Path] = []
    if args.second_precision:
        base_path = Path(args.base_bundle) if args.base_bundle else None
        for p in by_prec.get(args.second_precision, []):
            b = read_bundle(p, verify_hashes=False)
            if (base_path and p.resolve() == base_path.resolve()) or b.model_config.name == args.model:
                second.append(p)
    bundles = [str(p) for p in main_bundles + second]
    print("benchmarking:\n  " + "\n  ".join(bundles), flush=True)

    if args.estimate:
        from edgevlm.bench.sweep import run_session

        for p in (main_bundles[0], *(second[:1])):
            job = {"bundle": str(p), "threads": args.threads[0], "backend": "ort-cpu",
                   "prompt_tokens": [max(args.prompt_tokens)], "output_tokens": [max(args.output_tokens)],
                   "warmup": 0, "repeats": 1, "cache": str(work / "ort-cache"), "prime": False}
            t = time.perf_counter()
            rec = run_session(job)
            r = rec["configurations"][0]["requests"][0]
            print(json.dumps({"bundle": Path(p).name, "load_s": round(rec["load_s"], 2),
                              "wall_s": round(time.perf_counter() - t, 1),
                              **{k: round(r[k], 1) for k in ("total_ms", "vision_ms", "prefill_ms", "prefill_tok_s",
                                                               "decode_ms", "decode_tok_s")}}), flush=True)
        return 0

    spec = SweepSpec(bundles=bundles, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                     threads=args.threads, warmup=args.warmup, repeats=args.repeats, isolate=True,
                     cache=None if args.cache == "off" else args.cache)
    name = args.name or f"baseline_{args.model}"
    notes = list(built.notes) + [f"bundles built by edgevlm.bench.budgets (random init, seed 0) from "
                                 f"{args.base_bundle or 'a fresh export of ' + args.model}; deleted after the run"
                                 if not args.keep else "bundles kept"]
    failed_out = work / "failed-report"
    report = run_bench(spec, charts=True, roofline=True, bandwidth_gib=args.bandwidth_gib, out=failed_out, name=name,
                       command=command, notes=notes, build=built.to_dict(), verbose=True)
    failed = [s for s in report["sessions"] if "error" in s]
    if failed:
        print(f"{len(failed)} session(s) failed; report left in {failed_out}, bundles kept in {work / 'bundles'}",
              file=sys.stderr)
        return 1
    from edgevlm.bench.report import write_report

    write_report(report, args.out, name=name)
    eq = report["summary"]["eq4"]
    print(json.dumps({"report": str(Path(args.out) / f"{name}.json"), "wall_s": round(time.perf_counter() - t0),
                      "eq4_heldout_max_rel_error": eq["heldout_max_rel_error"],
                      "eq4_loo_max_rel_error": eq["loo_max_rel_error"]}))
    if not args.keep:
        shutil.rmtree(work / "bundles", ignore_errors=True)
        shutil.rmtree(work / "ort-cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
