"""Does quantization keep the trained demo model's accuracy? fp32 vs int8-vision + int4-decoder (and variants).

    python benchmarks/quant_accuracy.py                                   # runs/demo/checkpoint + runs/demo/data
    python benchmarks/quant_accuracy.py --checkpoint runs/demo/checkpoint --data runs/demo/data --sweep
    python benchmarks/quant_accuracy.py --train                           # train the demo first if it is missing

Steps: export the checkpoint to an fp32 bundle (parity-checked against PyTorch), quantize it with
``edgevlm.quant.quantize_bundle`` for each variant (calibration: the embedded set, ``calibration/embedded.toml``),
then on the synthetic **test** split:

* exact-match accuracy through the runtime (``edgevlm.quant.report.task_accuracy``, greedy, one request at a time);
* teacher-forced top-1 agreement with the fp32 bundle over every answer position (``teacher_forced_agreement``);
* bundle size on disk (graphs + external data + embedding table) and its ratio to fp32;
* the bundle's own quantization report (error against fp32 on the held-out calibration split).

Acceptance (the primary variant ``int4@cpu``: int8 static-QDQ vision + int4 MatMulNBits decoder with an 8-bit LM
head, the int4 recipe for CPU targets): exact match within 1 point of fp32 and teacher-forced agreement >= 98 %.
The script exits 1 when it fails. Agreement is also split into near-tie positions (fp32 top-2 margin < 0.1) and
decisive ones: a weakly trained model hesitates between answers, and there any error flips the top-1 token.

Output: a table, ``benchmarks/results/quant_demo.json`` (with the environment block), one JSON line printed last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAX_DROP_POINTS = 1.0
MIN_AGREEMENT = 0.98

def _int4_spec() -> str:
    """The int8-vision + int4-decoder recipe with an 8-bit LM head (see edgevlm/quant/recipes.py): the ``int4``
    preset itself once it says ``lm_head = "int8"``, else the preset with that override."""
    from edgevlm.targets import PRECISION_PRESETS

    return "int4" if PRECISION_PRESETS["int4"]["lm_head"] == "int8" else "int4,lm_head=int8"


INT4 = _int4_spec()
#: (label, precision spec, target, options). The first one is the acceptance variant.
VARIANTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("int4@cpu", INT4, "cpu", {}),                              # int8 QDQ vision + MatMulNBits int4 (+ 8-bit head)
    ("int4@jetson-orin", INT4, "jetson-orin", {}),              # TensorRT form (blocked INT4 DQ amax/7), ORT CPU
    ("int8@cpu", "int8", "cpu", {}),
    ("int8@jetson-orin", "int8", "jetson-orin", {}),            # W8A8 static QDQ, LM head W8A8 too
    ("int4,lm_head=int4@cpu", "int4,lm_head=int4", "cpu", {}),  # why the head stays 8-bit
]
SWEEP: list[tuple[str, str, str, dict[str, Any]]] = [
    ("int4-b64@cpu", INT4, "cpu", {"block_size": 64}),
    ("int4-b128@cpu", INT4, "cpu", {"block_size": 128}),
    ("int4-acc0@cpu", INT4, "cpu", {"accuracy_level": 0}),
    ("int4-entropy@cpu", INT4, "cpu", {"calib_method": "entropy"}),
    ("int4-percentile@cpu", INT4, "cpu", {"calib_method": "percentile"}),
    ("int4,lm_head=fp32@cpu", "int4,lm_head=fp32", "cpu", {}),
    ("int4,vision=fp32@cpu", INT4 + ",vision=fp32", "cpu", {}),
    ("int4,lm_head=int4-b64@cpu", "int4,lm_head=int4", "cpu", {"block_size": 64}),
]


def environment(threads: int | None) -> dict[str, Any]:
    import importlib.metadata as md

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line + " "
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni") if f" {f} " in flags]
    versions = {}
    for pkg in ("numpy", "onnxruntime", "onnx", "torch", "transformers", "tokenizers", "pillow", "edgevlm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import psutil

        mem, phys = psutil.virtual_memory().total, psutil.cpu_count(logical=False)
    except ImportError:
        mem, phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    return {"cpu": cpu, "isa": isa, "cores_logical": os.cpu_count(), "cores_physical": phys, "threads": threads,
            "ram_gib": round(mem / 2**30, 1), "os": platform.platform(), "python": platform.python_version(),
            "versions": versions, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def bundle_bytes(path: Path) -> int:
    m = json.loads((path / "manifest.json").read_text())
    keep = set()
    for name in ("vision", "decoder", "embed"):
        e = m["components"][name]
        keep.add(e["file"])
        keep.update(e.get("external_data") or [])
    return sum(m["files"][f]["size"] for f in keep)


def manifest_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def train_demo(out: Path) -> Path:
    config = ROOT / "configs" / "train" / "demo.toml"
    if not config.is_file():
        sys.exit(f"no checkpoint and no training config {config}: train the demo first (edgevlm train) or pass "
                 f"--checkpoint")
    from edgevlm.train.recipe import train

    result = train(str(config), out=str(out))
    return Path(result.checkpoint)


def run_variant(label: str, precision: str, target: str, opts: dict[str, Any], fp32: Path, work: Path, data: Path,
                args, ref_acc: dict[str, Any]) -> dict[str, Any]:
    from edgevlm.quant.apply import quantize_bundle
    from edgevlm.quant.report import task_accuracy, teacher_forced_agreement

    out = work / label.replace(",", "_").replace("=", "-").replace("@", "_at_")
    t0 = time.perf_counter()
    quantize_bundle(fp32, out, precision, target=target, overwrite=True, show=False,
                    calib_method=opts.get("calib_method", args.calib_method), threads=args.threads,
                    **{k: v for k, v in opts.items() if k != "calib_method"})
    quant_s = time.perf_counter() - t0
    acc = task_accuracy(out, data, args.split, args.limit, threads=args.threads, progress=True)
    agr = teacher_forced_agreement(fp32, out, data, args.split, args.limit, threads=args.threads, progress=True)
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    size = bundle_bytes(out)
    return {"label": label, "precision": precision, "target": target, "options": opts, "bundle": str(out),
            "manifest_sha256": manifest_sha(out), "recipe": q["recipe"], "quantize_s": round(quant_s, 2),
            "exact_match": acc["accuracy"], "correct": acc["correct"], "total": acc["total"],
            "per_type": {k: v["accuracy"] for k, v in acc["per_type"].items()},
            "exact_match_delta_points": round((acc["accuracy"] - ref_acc["accuracy"]) * 100, 3),
            "teacher_forced_agreement": agr["top1_agreement"], "agreement_positions": agr["positions"],
            "agreement_decisive": agr["top1_agreement_decisive"],
            "agreement_near_ties": agr["top1_agreement_near_ties"], "near_tie_positions": agr["near_tie_positions"],
            "logits_cosine_mean": agr["cosine_mean"], "logits_cosine_min": agr["cosine_min"],
            "token_accuracy": agr["token_accuracy"], "bundle_bytes": size,
            "heldout_errors": q.get("errors"), "component_sizes": q.get("sizes")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "checkpoint"))
    p.add_argument("--data", default=None, help="dataset dir with test.json (default: <checkpoint>/../data)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N records of the split (default: all)")
    p.add_argument("--work", default=None, help="where the bundles go (default: runs/quant_bench)")
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--sweep", action="store_true", help="also try block sizes, lm_head int8, calibration methods")
    p.add_argument("--train", action="store_true", help="train the demo (configs/train/demo.toml) if missing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "quant_demo.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        if not args.train:
            sys.exit(f"checkpoint '{ckpt}' not found; pass --checkpoint DIR or --train to train the demo first")
        ckpt = train_demo(ckpt.parent)
    data = Path(args.data) if args.data else ckpt.parent / "data"
    work = Path(args.work) if args.work else ROOT / "runs" / "quant_bench"
    work.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)

    from edgevlm.pipeline import export_bundle
    from edgevlm.quant.report import task_accuracy

    t0 = time.perf_counter()
    fp32 = work / "fp32"
    if fp32.exists():
        shutil.rmtree(fp32)
    export_bundle(None, fp32, checkpoint=ckpt, target="cpu", precision="fp32")
    export_s = time.perf_counter() - t0
    ref = task_accuracy(fp32, data, args.split, args.limit, threads=args.threads, progress=True)
    fp32_bytes = bundle_bytes(fp32)
    fp32_row = {"label": "fp32@cpu", "bundle": str(fp32), "manifest_sha256": manifest_sha(fp32),
                "export_s": round(export_s, 2), "exact_match": ref["accuracy"], "correct": ref["correct"],
                "total": ref["total"], "per_type": {k: v["accuracy"] for k, v in ref["per_type"].items()},
                "bundle_bytes": fp32_bytes}
    rows = []
    portable: Path | None = None             # TensorRT targets quantize the portable (standard-ops) fp32 graph

    def source_for(target: str) -> Path:
        nonlocal portable
        from edgevlm.targets import get_target

        if not get_target(target).is_tensorrt:
            return fp32                          # the CPU export: GroupQueryAttention decoder
        if portable is None:
            portable = work / "fp32-portable"
            if portable.exists():
                shutil.rmtree(portable)
            export_bundle(None, portable, checkpoint=ckpt, target=target, precision="fp32")
        return portable

    for label, prec, tgt, opts in VARIANTS + (SWEEP if args.sweep else []):
        r = run_variant(label, prec, tgt, opts, source_for(tgt), work, data, args, ref)
        r["fp32_decoder_graph"] = json.loads((source_for(tgt) / "manifest.json").read_text())["components"][
            "decoder"].get("graph", "portable")
        r["size_ratio"] = round(r["bundle_bytes"] / fp32_bytes, 4)
        rows.append(r)
        dec = r["agreement_decisive"]
        print(f"{label:<26} exact {r['exact_match'] * 100:6.2f}% ({r['exact_match_delta_points']:+.2f} pts)  "
              f"agreement {r['teacher_forced_agreement'] * 100:6.2f}% (decisive "
              f"{'-' if dec is None else f'{dec * 100:.2f}%'})  size x{r['size_ratio']:.3f}", flush=True)

    training = None
    log_path = ckpt.parent / "train_log.json"
    if log_path.is_file():
        tl = json.loads(log_path.read_text())
        training = {"train_log": str(log_path.resolve()),
                    "stages": [{k: st.get(k) for k in ("name", "train", "steps", "lr")}
                               for st in (tl.get("config") or {}).get("stages", [])],
                    "pytorch_exact_match": (tl.get("eval") or {}).get("accuracy"),
                    "train_s": (tl.get("timings") or {}).get("train_s")}
    primary = rows[0]
    drop = -primary["exact_match_delta_points"]
    passed = drop <= MAX_DROP_POINTS and primary["teacher_forced_agreement"] >= MIN_AGREEMENT
    result = {
        "benchmark": "quant_accuracy", "model": json.loads((fp32 / "manifest.json").read_text())["model"]["name"],
        "checkpoint": str(ckpt.resolve()), "training": training, "data": str(data.resolve()), "split": args.split,
        "limit": args.limit,
        "calibration": "embedded (calibration/embedded.toml)", "environment": env,
        "fp32": fp32_row, "variants": rows,
        "acceptance": {"variant": primary["label"], "precision": primary["precision"],
                       "criteria": {"max_exact_match_drop_points": MAX_DROP_POINTS,
                                    "min_teacher_forced_agreement": MIN_AGREEMENT},
                       "exact_match_fp32": ref["accuracy"], "exact_match": primary["exact_match"],
                       "exact_match_drop_points": round(drop, 3),
                       "teacher_forced_agreement": primary["teacher_forced_agreement"],
                       "size_ratio": primary["size_ratio"], "passed": passed},
        "seconds": round(time.perf_counter() - t0, 1), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"fp32 exact match {ref['accuracy'] * 100:.2f}% ({ref['correct']}/{ref['total']}); "
          f"{primary['label']}: {primary['exact_match'] * 100:.2f}%, agreement "
          f"{primary['teacher_forced_agreement'] * 100:.2f}%, size x{primary['size_ratio']:.3f} -> "
          f"{'PASS' if passed else 'FAIL'} (results: {args.out})")
    print(json.dumps({"benchmark": "quant_accuracy", **result["acceptance"]}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
