"""int8 vision on ONNX Runtime CPU: dynamic vs calibrated static QDQ vs float32, on one bundle's vision graph.

For each way of running the vision tower (``fp32``: the exported graph; ``dynamic``: ``quantize_dynamic``, the CPU
default, ``edgevlm.quant.recipes.INT8_VISION_MODES``; ``static``: ``quant_pre_process`` + ``quantize_static``
calibrated on ``--calibration-samples`` embedded images) it measures:

  * quantization wall time and peak RSS (each in its own process, so one does not inherit the other's heap);
  * latency per image (median of ``--images`` distinct held-out images after one warm-up, ``--threads`` threads);
  * error against fp32 on the same images (cosine of the image embeddings: mean and min, max |d|);
  * the rooflines measured in the same run: float32 and int8 (DynamicQuantizeMatMul) GEMM rates on a
    vision-shaped product, and the tower's FLOPs, so "vision at the machine's int8 rate" is a measured fraction.

    python benchmarks/vision_int8.py --bundle bundles/mobilevlm-1.7b-cpu-fp32        # a float32 bundle
    python benchmarks/vision_int8.py --model tiny-ldpnetv2                            # exports a tiny one (seconds)

Output: a table, ``benchmarks/results/vision_int8_<model>.json`` (environment block with the CPU, rooflines, every
mode) and one JSON line printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("fp32", "dynamic", "static")


def _quantize_child(mode: str, src: str, dst: str, samples: int, bundle: str) -> None:
    """Runs in its own process: quantize ``src`` (vision.onnx) into ``dst`` and print wall s + peak RSS."""
    from edgevlm.quant import apply as A, recipes as R
    from edgevlm.quant.calibration import BundleContext, VisionCalibrationReader, calibration_set

    work = Path(dst).parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if mode == "dynamic":
        info = A._dynamic(Path(src), Path(dst), per_channel=True, work=work, exclude=None,
                          op_types=R.WEIGHT_OPS_DYNAMIC)
    else:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        ctx = BundleContext.from_manifest(Path(bundle), manifest)
        cset = calibration_set(None, samples, heldout_samples=1)
        reader = VisionCalibrationReader(cset.items, ctx.preprocess, src)
        info = A._static_qdq(Path(src), Path(dst), reader, op_types=R.WEIGHT_OPS_VISION, calib_method="minmax",
                             per_channel=True, work=work)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(wall, 2), "peak_rss_gib": round(peak / 2**30, 3),
                      "nodes_quantized": info.get("nodes_quantized")}))


def quantize(mode: str, bundle: Path, out_dir: Path, samples: int) -> tuple[Path, dict]:
    dst = out_dir / mode / "vision.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--_child", mode, str(bundle / "vision.onnx"), str(dst), str(samples),
           str(bundle)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"quantizing {mode} failed:\n{res.stderr[-3000:]}")
    return dst, json.loads(res.stdout.strip().splitlines()[-1])


def run_mode(path: Path, images: list[np.ndarray], threads: int) -> tuple[list[float], list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: images[0]})                                   # warm-up
    times, outs = [], []
    for x in images:
        t = time.perf_counter()
        outs.append(np.asarray(sess.run(None, {name: x})[0], np.float32))
        times.append(time.perf_counter() - t)
    return times, outs


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--bundle", help="a float32 bundle (its vision.onnx is quantized; the bundle is not changed)")
    ap.add_argument("--model", default="tiny-ldpnetv2", help="without --bundle: export this model (random init)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--images", type=int, default=8, help="held-out images timed and compared (default 8)")
    ap.add_argument("--calibration-samples", type=int, default=32, help="static mode's calibration images")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    ap.add_argument("--tmp-dir", default=None, help="where quantized graphs are written (default: system temp)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vision_int8_<model>.json)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        mode, src, dst, n, bundle = a._child
        _quantize_child(mode, src, dst, int(n), bundle)
        return 0

    from edgevlm.bench.env import environment, gemm_rates, model_costs
    from edgevlm.bundle import read_bundle
    from edgevlm.preprocess import preprocess
    from edgevlm.quant.calibration import BundleContext, calibration_set
    from edgevlm.runtime.backends import physical_cores

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or "fp32" not in modes:
        ap.error(f"--modes: {', '.join(bad) or 'fp32 is required (the reference)'}; choose from {', '.join(MODES)}")
    threads = a.threads or physical_cores()
    with tempfile.TemporaryDirectory(dir=a.tmp_dir) as tmp:
        tmp = Path(tmp)
        if a.bundle:
            bundle = Path(a.bundle)
        else:
            from edgevlm.pipeline import export_bundle

            bundle = export_bundle(a.model, tmp / "fp32", random_init=True, precision="fp32")
        b = read_bundle(bundle, verify_hashes=False)
        if b.manifest["components"]["vision"].get("precision") != "fp32":
            raise SystemExit(f"{bundle}: the vision graph is {b.manifest['components']['vision'].get('precision')}; "
                             f"pass a float32 bundle (edgevlm export --precision fp32)")
        cfg = b.model_config
        env = environment(threads, [bundle])
        costs = model_costs(cfg)
        v = cfg.vision
        rates = gemm_rates(threads, v.num_patches + 1, v.hidden_size, v.intermediate_size, int8=True)
        ctx = BundleContext.from_manifest(bundle, b.manifest)
        held = calibration_set(None, 1, heldout_samples=a.images).heldout
        images = [preprocess(it.image, ctx.preprocess)[None].astype(np.float32) for it in held]

        results: dict[str, dict] = {}
        ref_out = None
        for mode in modes:
            if mode == "fp32":
                path, q = bundle / "vision.onnx", {}
            else:
                path, q = quantize(mode, bundle, tmp, a.calibration_samples)
            times, outs = run_mode(path, images, threads)
            if mode == "fp32":
                ref_out = outs
            cos = [_cos(r, o) for r, o in zip(ref_out, outs)]
            med = float(np.median(times))
            rate = "ort_fp32_gflops" if mode == "fp32" else "ort_int8_dynamic_gops"
            bound_ms = costs["vision_gflops"] / rates[rate] * 1e3
            results[mode] = {"quantize": q or None, "latency_ms_median": round(med * 1e3, 1),
                             "latency_ms": [round(t * 1e3, 1) for t in times],
                             "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
                             "max_abs": float(max(np.abs(r - o).max() for r, o in zip(ref_out, outs))),
                             "bound_ms_at_gemm_rate": round(bound_ms, 1), "gemm_rate_used": rate,
                             "fraction_of_rate": round(bound_ms / (med * 1e3), 3)}
            if mode == "static":
                results[mode]["calibration_samples"] = a.calibration_samples
            print(f"{mode:8s} {med * 1e3:8.1f} ms/image (bound {bound_ms:7.1f} ms at {rates[rate]:.0f} G/s, "
                  f"{bound_ms / (med * 1e3):5.1%})  cos mean {np.mean(cos):.5f} min {np.min(cos):.5f}"
                  + (f"  quantize {q['seconds']:.1f} s, peak {q['peak_rss_gib']:.2f} GiB" if q else ""), flush=True)

    doc = {"benchmark": "vision_int8", "model": cfg.name, "bundle": "BUNDLE" if a.bundle else f"random-init {a.model}",
           "threads": threads, "images": a.images, "environment": {**env, "loadavg_end": os.getloadavg()},
           "rooflines": {"gemm": rates, "vision_gflops": costs["vision_gflops"]}, "modes": results}
    for e in doc["environment"].get("bundles", []):
        e["path"] = "BUNDLE"
    line = json.dumps({m: {"ms": r["latency_ms_median"], "cos_min": round(r["cosine_min"], 5)}
                       for m, r in results.items()})
    if not a.no_write:
        out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"vision_int8_{cfg.name}.json"
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
