"""The main job on the embedded default: train -> export -> quantize -> check accuracy -> run -> benchmark.

    edgevlm demo                       # full demo, <= 10 minutes on 2 CPU cores
    edgevlm demo --fast                # a one-minute smoke run of every stage (used by the test suite)
    edgevlm demo --target jetson-orin  # bundles for a Jetson (TensorRT build plan + trtexec script included)

Every stage reads the previous stage's artifact from disk (DESIGN.md §1):

1. ``train``: the synthetic shapes dataset is generated, a tokenizer trained, and the ``demo`` preset trained from
   scratch with ``configs/train/demo.toml`` (checkpoint in MobileVLM's HF format + ``train_log.json``);
2. ``export``: the checkpoint becomes an fp32 bundle for the target, validated against PyTorch (parity);
3. ``quantize``: the target's default recipe (``int4`` = int8 vision + int4 decoder on CPU and Orin) with the
   embedded calibration set, and its quantization report;
4. ``accuracy``: exact match of both bundles on the held-out test split through the torch-free runtime;
5. ``answers``: a few test images answered by the quantized bundle beside the ground truth;
6. ``latency``: one request's load / preprocess / vision / prefill / decode decomposition (MobileVLM Eq. 4);
7. ``bench``: a small token-budget sweep (visual-token budgets 16 / 4 / 1 of the demo shape, two precisions) with
   the Eq. 4 fit, written as JSON + Markdown + PNG charts.

Outputs land in ``--out`` (default ``demo_out/``); ``demo_summary.json`` there has every number printed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgevlm.errors import ConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "train" / "demo.toml"

#: --fast: every stage runs, on a few hundred samples and a few dozen steps (minutes -> about one minute).
#: Measured: ~65 % exact match (chance ~28 %) after ~30 s of training on 2 cores.
FAST_TRAIN = {"synthetic_train": 768, "synthetic_test": 48, "eval_samples": 48, "batch_size": 32,
              "stages": [{"name": "tower", "steps": 160, "lr": 2e-3, "warmup": 0.1},
                         {"name": "instruct", "steps": 70, "lr": 1e-3, "warmup": 0.05}]}
FAST_ACCURACY_LIMIT = 48


def _console():
    from edgevlm.console import make_console

    return make_console()


def run_demo(out: str | Path = "demo_out", *, target: str = "cpu", fast: bool = False, overwrite: bool = False,
             threads: int | None = None, accuracy_limit: int | None = None, bench: bool = True,
             console: Any = None) -> dict[str, Any]:
    """Run every stage and return the summary (also written to ``out/demo_summary.json``)."""
    from rich.table import Table

    from edgevlm.targets import get_target

    from edgevlm.bench.env import loadavg
    from edgevlm.outputs import check_destination, mark

    con = console or _console()
    out = Path(out)
    tgt = get_target(target)                                   # unknown target: ConfigError before any work
    loadavg_start = loadavg()                                  # the machine's load before the demo's own work
    # an earlier demo's folder is reused (each stage replaces only its own outputs); anything else is refused
    check_destination(out, "demo", overwrite=overwrite)
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"the demo recipe {DEMO_CONFIG} is missing; run the demo from a source checkout")
    out.mkdir(parents=True, exist_ok=True)
    mark(out, "demo")
    summary: dict[str, Any] = {"target": tgt.name, "fast": fast, "stages": {}}
    t_all = time.perf_counter()

    def stage(name: str, title: str):
        con.rule(f"[bold]{title}")
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        summary["stages"][name] = round(time.perf_counter() - t0, 2)

    # 1. train ------------------------------------------------------------------------------------------------------
    t0 = stage("train", "1/7  train the demo model from scratch on the synthetic shapes set")
    from edgevlm.train.recipe import train

    overrides: dict[str, Any] = dict(FAST_TRAIN) if fast else {}
    res = train(str(DEMO_CONFIG), out=str(out / "train"), overwrite=True, **overrides)
    data_dir = out / "train" / "data"
    summary["train"] = {"checkpoint": str(res.checkpoint), "timings": res.timings,
                        "pytorch_eval": {k: res.eval[k] for k in ("accuracy", "per_type") if k in res.eval}
                        if res.eval else None}
    done("train", t0)
    if res.eval:
        con.print(f"PyTorch exact match on the test split: [bold]{res.eval['accuracy']:.1%}[/] "
                  f"({res.timings.get('train_s', 0):.0f} s of training)")

    # 2. export -----------------------------------------------------------------------------------------------------
    t0 = stage("export", f"2/7  export an fp32 bundle for {tgt.name} (parity-checked against PyTorch)")
    from edgevlm.pipeline import export_bundle

    bundles = out / "bundles"
    fp32 = export_bundle(None, bundles / "demo-fp32", checkpoint=res.checkpoint, target=tgt.name, precision="fp32",
                         overwrite=True)
    done("export", t0)

    # 3. quantize ---------------------------------------------------------------------------------------------------
    preset = tgt.default_recipe
    t0 = stage("quantize", f"3/7  quantize with the target's default recipe '{preset}' (embedded calibration set)")
    from edgevlm.quant.apply import quantize_bundle

    qbundle = quantize_bundle(fp32, bundles / f"demo-{preset}", preset, target=tgt.name, overwrite=True, show=True)
    done("quantize", t0)

    # 4. accuracy ---------------------------------------------------------------------------------------------------
    t0 = stage("accuracy", "4/7  exact match on the held-out test split through the torch-free runtime")
    from edgevlm.quant.report import task_accuracy

    limit = accuracy_limit if accuracy_limit is not None else (FAST_ACCURACY_LIMIT if fast else None)
    acc = {"fp32": task_accuracy(fp32, data_dir, "test", limit, threads=threads, progress=True),
           preset: task_accuracy(qbundle, data_dir, "test", limit, threads=threads, progress=True)}
    summary["accuracy"] = acc
    table = Table(title="exact match (test split)")
    table.add_column("question type")
    for p in acc:
        table.add_column(p, justify="right")
    for qtype in acc["fp32"]["per_type"]:
        table.add_row(qtype, *(f"{acc[p]['per_type'].get(qtype, {}).get('accuracy', float('nan')):.1%}" for p in acc))
    table.add_row("[bold]all", *(f"[bold]{acc[p]['accuracy']:.1%}" for p in acc))
    con.print(table)
    sizes = {p: _bundle_bytes(b) for p, b in (("fp32", fp32), (preset, qbundle))}
    summary["bundle_bytes"] = sizes
    con.print(f"bundle size: fp32 {sizes['fp32'] / 2**20:.1f} MiB, {preset} {sizes[preset] / 2**20:.1f} MiB "
              f"({sizes['fp32'] / max(sizes[preset], 1):.2f}x smaller)")
    done("accuracy", t0)

    # 5. answers ----------------------------------------------------------------------------------------------------
    t0 = stage("answers", f"5/7  answers of the {preset} bundle on generated test images")
    from edgevlm.runtime import Session
    from edgevlm.train.llava_data import load_dataset

    sess = Session.from_bundle(qbundle, threads=threads)
    records = load_dataset(data_dir / "test.json")
    seen: set[str] = set()
    picked = []
    for r in records:                                          # one question of each type
        if r.question_type not in seen:
            seen.add(r.question_type)
            picked.append(r)
    table = Table(title="answers")
    for col in ("image", "question", "answer", "ground truth", ""):
        table.add_column(col)
    answers = []
    for r in picked:
        question = r.turns[0][0].replace("<image>", "").strip()
        result = sess.generate(r.image_path, question, max_new_tokens=16)
        ok = result.text.strip().lower() == r.turns[0][1].strip().lower()
        answers.append({"image": str(r.image_path), "question": question, "answer": result.text,
                        "ground_truth": r.turns[0][1], "correct": ok})
        table.add_row(Path(r.image_path).name, question, result.text, r.turns[0][1], "✓" if ok else "✗")
    con.print(table)
    summary["answers"] = answers
    done("answers", t0)

    # 6. latency ----------------------------------------------------------------------------------------------------
    t0 = stage("latency", "6/7  latency decomposition of one request (MobileVLM Eq. 4)")
    r = picked[0]
    result = sess.generate(r.image_path, "Describe the image.", max_new_tokens=32)
    from edgevlm.runtime.timings import format_eq4_table

    summary["latency"] = result.timings.to_dict()
    t = result.timings
    con.print(f"vision {t.vision_ms:.1f} ms | prefill {t.prompt_tokens} tokens at {t.prefill_tok_s:.0f} tok/s | "
              f"TTFT {t.ttft_ms:.1f} ms | decode {t.generated_tokens} tokens at {t.decode_tok_s:.0f} tok/s "
              f"(p50 {t.decode_token_ms_p50:.2f} ms / p95 {t.decode_token_ms_p95:.2f} ms per token) | "
              f"peak RSS {t.peak_rss_mb:.0f} MiB")
    con.print(format_eq4_table(t), markup=False, highlight=False)
    sess.close()
    done("latency", t0)

    # 7. bench ------------------------------------------------------------------------------------------------------
    if bench:
        t0 = stage("bench", "7/7  token-budget benchmark (visual tokens 16 / 4 / 1 x fp32 / "
                            f"{preset}) with the Eq. 4 fit")
        summary["bench"] = _bench(out / "bench", preset, tgt.name, threads, fast, con)
        done("bench", t0)

    summary["total_s"] = round(time.perf_counter() - t_all, 1)
    summary["bundles"] = {"fp32": str(fp32), preset: str(qbundle)}
    from edgevlm.bench.env import environment

    summary["environment"] = {**environment(threads=threads), "loadavg_start": loadavg_start,
                              "loadavg_end": loadavg()}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    con.rule("[bold]done")
    con.print(f"total {summary['total_s']:.0f} s; bundles in {bundles}; summary {out / 'demo_summary.json'}"
              + (f"; benchmark report {summary['bench']['report']}" if bench else ""))
    return summary


def _bundle_bytes(path: Path) -> int:
    from edgevlm.bundle import read_bundle

    return read_bundle(path, verify_hashes=False).total_size


def _bench(out: Path, preset: str, target: str, threads: int | None, fast: bool, con: Any) -> dict[str, Any]:
    from edgevlm.bench.budgets import build_budget_bundles
    from edgevlm.bench.env import environment
    from edgevlm.bench.report import build_report, eq4_verdict, write_report
    from edgevlm.bench.sweep import SweepSpec, run_sweep

    built = build_budget_bundles("demo", out / "bundles", "16,4,1", precisions=["fp32", preset], random_init=True,
                                 target=target, overwrite=True, progress=lambda m: con.print(f"  {m}"))
    paths = [str(p) for p in built.bundles]
    spec = SweepSpec(bundles=paths, prompt_tokens=[8, 32] if fast else [8, 32, 64],
                     output_tokens=[4, 12] if fast else [4, 16, 32], threads=[threads],
                     warmup=1, repeats=1 if fast else 2, isolate=not fast)
    raw = run_sweep(spec, progress=lambda m: con.print(f"  {m}"))
    report = build_report(raw, spec, environment=environment(threads=threads, bundles=paths),
                          command="edgevlm demo" + (" --fast" if fast else ""))
    files = write_report(report, out, name="report")
    for line in eq4_verdict(report).splitlines():
        con.print(f"  {line}", highlight=False, markup=False)
    con.print(f"  report: {files['markdown']}")
    return {"report": str(files["json"]), "markdown": str(files["markdown"]),
            "charts": [str(p) for k, p in files.items() if k not in ("json", "markdown")]}
