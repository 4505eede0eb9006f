"""``edgevlm bench``: latency sweeps over visual-token budgets, prompt and output lengths, threads and backends, with
MobileVLM's Eq. 4 fitted and checked on held-out configurations; ``--compare`` flags regressions between two reports.

    edgevlm bench bundles/b576 bundles/b144 --prompt-tokens 16 64 --output-tokens 16 64 --threads 2 --out bench-out
    edgevlm bench bundles/sweep --build-budgets --model mobilevlm-v2-1.7b --budgets 576,144,64,36 \\
        --precision fp32,int4 --random-init          # export the budget bundles into bundles/sweep, then bench them
    edgevlm bench --compare base/report.json new/report.json      # exit 1 on a regression beyond the spread
    edgevlm bench bundles/b144 --backend ort native tensorrt auto  # one sweep compares the backends of a bundle

The sweep path imports numpy / onnxruntime / PIL / tokenizers only (no torch); ``--build-budgets`` exports with torch.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

from edgevlm.cli import positional
from edgevlm.errors import ConfigError

log = logging.getLogger(__name__)


def _print_summary(report: dict[str, Any]) -> None:
    from rich import box
    from edgevlm.bench.report import backend_label
    from edgevlm.console import make_console
    from rich.table import Table

    t = Table(title="edgevlm bench (medians per session; total at the largest prompt x output)", box=box.SIMPLE,
              title_justify="left")
    for col in ("bundle", "backend (vision / decoder)", "V", "thr", "load s", "vision ms", "prefill tok/s",
                "decode tok/s", "total ms", "spread", "RSS MiB", "Eq.4 held-out"):
        t.add_column(col, justify="left" if col.startswith(("bundle", "backend")) else "right")
    for r in report["summary"]["rows"]:
        if "error" in r:
            t.add_row(r["bundle_label"], str(r.get("backend", "")), "", "", "failed")
            continue
        ref = r["reference"]
        err = r["eq4_heldout_rel_error"]
        t.add_row(r["bundle_label"], backend_label(r), str(r["visual_tokens"]), str(r["threads"]),
                  f"{r['load_s']:.2f}",
                  f"{r['vision_ms']:.1f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                  f"{ref['total_ms']:.0f}", f"{(ref['total_spread'] or 0) * 100:.1f}%", f"{r['peak_rss_mb'] or 0:.0f}",
                  "-" if err is None else f"{err * 100:.1f}%")
    make_console().print(t)
    for a in report.get("backend_agreement") or []:
        verdict = "identical" if a["identical"] else f"DIFFER: {a['first_mismatch']}"
        print(f"greedy tokens {' / '.join(a['backends'])} on {a['bundle_label']} t{a['threads']}: {verdict} "
              f"({a['requests_compared']} requests)")


def _command_line(kwargs: dict[str, Any]) -> str:
    if sys.argv[1:2] == ["bench"]:
        return shlex.join(["edgevlm", *sys.argv[1:]])
    parts = ["edgevlm", "bench", *[str(b) for b in kwargs.get("bundle") or []]]
    for k, v in kwargs.items():
        if k == "bundle" or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            parts += [flag, *[str(x) for x in v]]
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


def _compare(paths: list[str], fail_on_regression: bool, regression_floor: float, all_rows: bool,
             json_output: bool) -> int:
    from edgevlm.bench.compare import compare_reports, format_comparison
    from edgevlm.bench.report import load_report

    if len(paths) != 2:
        raise ConfigError(f"--compare takes exactly two report JSON files (A = baseline, B = new), got {len(paths)}")
    a, b = load_report(paths[0]), load_report(paths[1])
    res = compare_reports(a, b, floor=regression_floor)
    if json_output:
        print(json.dumps(res))
    else:
        print(f"A = {paths[0]}\nB = {paths[1]}")
        print(format_comparison(res, all_rows=all_rows))
        if res["matched"] == 0:
            print("warning: no configuration of A matches one of B (model, visual tokens, precision, threads, "
                  "backend, prompt and output tokens)")
    if res["regressions"]:
        names = sorted({r["metric"] for r in res["regressions"]})
        print(f"REGRESSION in {', '.join(names)} ({len(res['regressions'])} configuration-metric pairs beyond the "
              f"spread)", file=sys.stderr)
        return 1 if fail_on_regression else 0
    return 0


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise ConfigError(f"--image-size wants WIDTHxHEIGHT (e.g. 640x480), got {text!r}")
    return int(w), int(h)


@positional("bundle")
def bench(bundle: list[str], prompt_tokens: list[int] = [16, 64], output_tokens: list[int] = [16, 64],  # noqa: B006
          threads: list[int] | None = None, backend: list[str] = ["auto"], warmup: int = 1,  # noqa: B006
          repeats: int = 3, out: str = "bench-out", name: str = "report",
          prompt_mode: Literal["raw", "template"] = "raw", image_size: str | None = None, seed: int = 0,
          isolate: bool = True, cache: bool = True, cache_dir: str | None = None, prime: bool = True,
          verify: bool = True, spinning: bool = False, charts: bool = True, roofline: bool = True,
          bandwidth_gib: float = 0.5, timeout: float = 3600.0, compare: bool = False,
          fail_on_regression: bool = True, regression_floor: float = 0.03, all_rows: bool = False,
          build_budgets: bool = False, build_only: bool = False, model: str | None = None,
          budgets: str = "576,144,64,36", precision: list[str] = ["fp32"], random_init: bool = False,  # noqa: B006
          checkpoint: str | None = None, base_bundle: str | None = None, target: str | None = None,
          share_decoder: bool = True,
          parity: bool = False, overwrite: bool = False, verbose_sessions: bool = False,
          json_output: bool = False) -> int:
    """Benchmark bundles across token budgets: load, vision, prefill, decode; Eq. 4 fit; report JSON/Markdown/PNG.

    For each bundle x threads x backend a fresh Session is loaded (load timed on its own, in its own process), then
    warm-up requests, then `repeats` rounds over every prompt-tokens x output-tokens configuration, each request with
    a distinct image and exactly the requested output tokens (EOS ignored). The report (docs/bench.md) holds the
    environment, every request, median/min/max/IQR/spread per configuration, rooflines, and MobileVLM's Eq. 4
    (total = Tks_in / v_prompt + Tks_out / v_decode + c) fitted per session with the largest configuration held out
    and predicted. Positional arguments: bundle directories or directories of bundles; with --compare, two report
    JSONs; with --build-budgets, the directory to export the budget bundles into.

    Args:
        bundle: bundle directories (or directories holding bundles); with --compare: A.json B.json; with
            --build-budgets: the output directory of the bundles.
        prompt_tokens: text tokens per prompt (Tks_in = visual tokens + this).
        output_tokens: generated tokens per request (EOS ignored: exactly this many).
        threads: ONNX Runtime intra-op thread counts to sweep (default: physical cores).
        backend: backends to compare on every bundle (one session each, same images): ort (ONNX Runtime CPU),
            ort-cuda, ort-tensorrt (ONNX Runtime execution providers), native (ORT prefill + the native kernel's
            decode steps), tensorrt (the engines of `edgevlm build-engine`), auto (default: what `edgevlm run`
            picks: TensorRT engines built for this GPU, else native, else ORT).
            One that cannot run here is skipped with its reason; the report says whether their greedy tokens agree.
        warmup: warm-up requests per session (not measured).
        repeats: measured requests per configuration.
        out: output directory of the report.
        name: report file stem ({name}.json, {name}.md).
        prompt_mode: raw (<image> + filler: any length) or template (the bundle's chat template around the filler).
        image_size: WIDTHxHEIGHT of the synthetic images (default: the bundle's input size, square).
        seed: seed of the synthetic images.
        isolate: one subprocess per session (clean load and peak RSS); --no-isolate runs in this process.
        cache: use the runtime's optimized-graph cache for loads (--no-cache: ORT optimizes at every load).
        cache_dir: a persistent cache directory ("auto" = the runtime's ~/.cache/edgevlm/ort); default: a fresh
            temporary cache per session, removed after it (every bundle's load measured alike, no disk left used).
        prime: load once before the measured load so load_s is a warm-cache load (the first one is first_load_s).
        verify: check bundle hashes at load (cheap after the first load with the cache).
        spinning: let ORT threads spin between parallel sections (off by default, as in `edgevlm run`: on a quiet
            machine it gave +7 % decode, 23.2 vs 21.7 tok/s, but with other processes on the cores it halved it,
            2.7 vs 4.9 tok/s, docs/runtime.md; --spinning on a dedicated device).
        charts: write PNG charts (needs matplotlib).
        roofline: measure memory bandwidth and GEMM throughput in this run for the rooflines.
        bandwidth_gib: size of the bandwidth probe's array.
        timeout: per-session time limit in seconds.
        compare: compare two reports (positional: A.json B.json): flags regressions beyond the spread.
        fail_on_regression: with --compare, exit 1 when a regression is found.
        regression_floor: with --compare, the smallest relative change that counts, as a fraction.
        all_rows: with --compare, print every configuration-metric pair, not only the flagged ones.
        build_budgets: export the bundles of a token-budget sweep into the positional directory first.
        build_only: with --build-budgets, export and stop (no benchmark): prints the bundle directories, one per
            line (their build record as JSON with --json-output).
        model: with --build-budgets, the registry model whose vision tower and LLM every budget shares.
        budgets: with --build-budgets, e.g. 576,ldp:144,ldpv2:144,64,36 (N or PROJECTOR:N).
        precision: with --build-budgets, precisions (fp32,int4 or fp32 int4,vision=fp32).
        random_init: with --build-budgets, random weights (latency work).
        checkpoint: with --build-budgets, a checkpoint (its own budget only).
        base_bundle: with --build-budgets, an existing fp32 bundle of the model to derive the budgets from (skips
            the full export of the first budget).
        target: with --build-budgets, the export target (default cpu).
        share_decoder: with --build-budgets, derive budgets from one exported decoder (hard links).
        parity: with --build-budgets, validate the base export against PyTorch (slow at full size).
        overwrite: with --build-budgets, replace existing bundles.
        verbose_sessions: print every request's numbers as it completes.
        json_output: print the report JSON instead of the table (the console output is a table, the Eq. 4
            verdict and the report's paths; the data is in the report files).
    """
    kwargs = dict(locals())
    if compare:
        return _compare(bundle, fail_on_regression, regression_floor, all_rows, json_output)

    from edgevlm.bench.sweep import SweepSpec, expand_bundle_paths, run_sweep

    notes: list[str] = []
    build_info: dict[str, Any] | None = None
    if build_budgets:
        if len(bundle) != 1:
            raise ConfigError("--build-budgets takes one positional argument: the directory to export the bundles into")
        if not model:
            raise ConfigError("--build-budgets needs --model NAME (see `edgevlm models`)")
        from edgevlm.bench.budgets import build_budget_bundles

        res = build_budget_bundles(model, bundle[0], budgets, precisions=precision, random_init=random_init,
                                   checkpoint=checkpoint, base_bundle=base_bundle, target=target, parity=parity,
                                   share_decoder=share_decoder,
                                   overwrite=overwrite, progress=lambda s: print(s, file=sys.stderr, flush=True))
        build_info = res.to_dict()
        notes += res.notes
        paths = [str(p) for p in res.bundles]
        print(f"built {len(paths)} bundles in {res.timings_s['total']:.0f} s", file=sys.stderr)
        if build_only:
            if json_output:
                print(json.dumps(build_info))
            else:
                print("\n".join(paths))               # one bundle directory per line (pipe into `edgevlm bench`)
            return 0
    else:
        paths = expand_bundle_paths(bundle)

    cache_opt: Any = (cache_dir or "session") if cache else None
    spec = SweepSpec(bundles=paths, prompt_tokens=list(prompt_tokens), output_tokens=list(output_tokens),
                     threads=list(threads) if threads else [None], backends=list(backend), warmup=warmup,
                     repeats=repeats, prompt_mode=prompt_mode, image_size=_parse_size(image_size), seed=seed,
                     isolate=isolate, cache=cache_opt, prime=prime, verify_hashes=verify, spinning=spinning,
                     timeout_s=timeout)
    spec.validate()
    report = run_bench(spec, charts=charts, roofline=roofline, bandwidth_gib=bandwidth_gib, out=out, name=name,
                       command=_command_line(kwargs), notes=notes, build=build_info, verbose=verbose_sessions)
    if json_output:
        print(json.dumps(report))
    else:
        from edgevlm.bench.report import eq4_verdict

        _print_summary(report)
        print(eq4_verdict(report))
        for n in report["notes"]:
            print(f"note: {n}")
        print(f"report: {Path(out) / (name + '.json')}, {Path(out) / (name + '.md')}"
              + (f", charts: {', '.join(report['charts'])}" if report["charts"] else ""))
    failed = [s for s in report["sessions"] if "error" in s]
    return 1 if failed and len(failed) == len(report["sessions"]) else 0


def run_bench(spec: Any, *, charts: bool = True, roofline: bool = True, bandwidth_gib: float = 0.5,
              out: str | Path = "bench-out", name: str = "report", command: str | None = None,
              notes: list[str] | None = None, build: dict[str, Any] | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Environment + rooflines + sweep + report files (the API behind the CLI verb); returns the report dict."""
    from edgevlm.bench.env import bandwidth, environment, gemm_rates
    from edgevlm.bench.report import build_report, write_report
    from edgevlm.bench.sweep import run_sweep
    from edgevlm.bundle import read_bundle
    from edgevlm.runtime.backends import physical_cores

    threads = [t or physical_cores() for t in spec.threads]
    env = environment(threads=threads, bundles=spec.bundles)
    roof: dict[str, Any] = {}
    if roofline:
        t = time.perf_counter()
        cfgs = [read_bundle(p, verify_hashes=False).model_config for p in spec.bundles]
        big = max(cfgs, key=lambda c: c.llm.hidden_size * c.llm.intermediate_size)
        roof = {"bandwidth": bandwidth(max(threads), gib=bandwidth_gib),
                "gemm": gemm_rates(max(threads), m=200, k=max(big.llm.hidden_size, 256),
                                   n=max(big.llm.intermediate_size, 256))}
        roof["seconds"] = time.perf_counter() - t
    t0 = time.perf_counter()
    raw = run_sweep(spec, progress=lambda s: print(s, file=sys.stderr, flush=True), verbose=verbose)
    raw["notes"] = list(notes or []) + raw["notes"]
    extra: dict[str, Any] = {"sweep_wall_s": time.perf_counter() - t0}
    if build:
        extra["build"] = build
    report = build_report(raw, spec, environment=env, roofline=roof, command=command, extra=extra)
    write_report(report, out, name=name, charts=charts)
    return report


COMMANDS = {"bench": bench}
