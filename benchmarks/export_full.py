"""Full-size export benchmark: wall time per stage and peak RSS of ``edgevlm export`` for a registry model.

Exports ``--model`` (default mobilevlm-1.7b) with random weights, fp32, into a temp directory (parity validation
on, 16-token prompt), records the stage timings, the peak RSS (``ru_maxrss`` of this process and its children, plus
a 0.2 s RSS sampler that attributes peaks to stages), the bundle's file sizes, the decoder's op histogram, parity
numbers and the environment, prints one JSON line and writes ``benchmarks/results/export_{model}.json``. The bundle
is deleted afterwards (it is GBs) unless ``--keep``.

    .venv/bin/python benchmarks/export_full.py                         # ~minutes, <= 12 GiB peak RSS (goal)
    .venv/bin/python benchmarks/export_full.py --model mobilevlm-v2-1.7b --no-write
    # a released-format checkpoint (fp16 safetensors, random weights) written first, then int4 for the CPU:
    .venv/bin/python benchmarks/export_full.py --make-checkpoint CKPT --checkpoint CKPT \
        --precision int4

    # mobilevlm-v2-7b to an fp16 TensorRT bundle on a 24 GiB machine (issue 20 item 3: <= 20 GiB peak RSS):
    .venv/bin/python benchmarks/export_full.py --model mobilevlm-v2-7b --target jetson-orin --precision fp16 \
        --skip-parity --goal-peak-gib 20 --tmp-dir TMP

Goal (brief, issue 4): <= 10 minutes and <= 12 GiB peak RSS on the project's 2-core CPU machine (``--goal-wall-s``,
``--goal-peak-gib`` record another goal in the result's ``meets_goal``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def environment() -> dict:
    import importlib.metadata as md

    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("edgevlm", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    return {"cpu": cpu, "cores_logical": os.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "ram_available_bytes_at_start": psutil.virtual_memory().available,
            "os": platform.platform(), "python": platform.python_version(), "torch_threads": threads,
            "load_average_at_start": list(os.getloadavg()), "versions": versions}


class RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` s; keeps the max per stage."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.stage = "startup"
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except Exception:  # noqa: BLE001 - a child may exit between listing and reading
                    pass
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


def ru_maxrss_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * scale


#: options whose value is a machine path: recorded as a placeholder in the committed result
_PATH_OPTIONS = {"--tmp-dir": "TMP", "--checkpoint": "CKPT", "--make-checkpoint": "CKPT"}


def _command(argv: list[str]) -> str:
    """The command line as recorded, machine paths replaced by TMP / CKPT."""
    out, skip = ["export_full.py"], None
    for a in argv:
        if skip is not None:
            out.append(skip)
            skip = None
            continue
        name, eq, _ = a.partition("=")
        if name in _PATH_OPTIONS:
            if eq:
                out.append(f"{name}={_PATH_OPTIONS[name]}")
                continue
            skip = _PATH_OPTIONS[name]
        out.append(a)
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilevlm-1.7b")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tmp-dir", default=None, help="where the bundle is written (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the exported bundle (prints its path)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="export this MobileVLM checkpoint directory (released format) "
                    "instead of random weights")
    ap.add_argument("--make-checkpoint", default=None, metavar="DIR",
                    help="first write a released-format checkpoint of --model with random weights (fp16 safetensors, "
                         "shards of 2 GB like the release, a stand-in tokenizer.json) to DIR, unless DIR already has "
                         "one; not timed")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/export_<model>.json")
    ap.add_argument("--goal-wall-s", type=float, default=600, help="wall-time goal recorded in the result (meets_goal)")
    ap.add_argument("--goal-peak-gib", type=float, default=12, help="peak-RSS goal recorded in the result (meets_goal)")
    args = ap.parse_args(argv)

    if args.make_checkpoint and not (Path(args.make_checkpoint) / "config.json").is_file():
        import torch

        from edgevlm.config import get_model_config
        from edgevlm.model.checkpoint import save_checkpoint
        from edgevlm.model.vlm import build_model

        print(f"[export_full] writing a random {args.model} checkpoint to {args.make_checkpoint} ...", file=sys.stderr)
        from edgevlm.exporter.bundle_export import write_tokenizer

        cfg = get_model_config(args.model)
        save_checkpoint(build_model(cfg, seed=0), args.make_checkpoint, dtype=torch.float16, max_shard_size="2GB")
        write_tokenizer(Path(args.make_checkpoint), cfg, source_dir=None)    # a stand-in BPE (no weights download)
        import gc

        gc.collect()
        print("[export_full] run again to time the export in a fresh process (peak RSS)", file=sys.stderr)
        return 0
    env = environment()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    stage_wall: dict[str, float] = {}
    from edgevlm.exporter.bundle_export import STAGES
    from edgevlm.pipeline import export_bundle

    import_s = time.perf_counter() - t0

    def progress(stage: str, event: str, seconds: float | None) -> None:
        if event == "start":
            sampler.stage = stage
            print(f"[export_full] {STAGES.get(stage, stage)} ...", file=sys.stderr, flush=True)
        elif event == "done":
            stage_wall[stage] = round(float(seconds or 0.0), 2)
            print(f"[export_full] {STAGES.get(stage, stage)} done in {seconds:.1f} s "
                  f"(peak so far {ru_maxrss_bytes() / GIB:.2f} GiB)", file=sys.stderr, flush=True)
            sampler.stage = "between"

    tmp = Path(tempfile.mkdtemp(prefix="edgevlm-export-full-", dir=args.tmp_dir))
    source = "checkpoint" if args.checkpoint else "random-init"
    out = tmp / f"{args.model}-{source}-{args.target}-{args.precision}"
    result: dict = {"benchmark": "export_full", "model": args.model, "random_init": not args.checkpoint,
                    "source": source, "target": args.target, "precision": args.precision,
                    "command": _command(argv if argv is not None else sys.argv[1:])}
    try:
        t1 = time.perf_counter()
        export_bundle(args.model, out, random_init=not args.checkpoint, checkpoint=args.checkpoint,
                      target=args.target, precision=args.precision, parity=not args.skip_parity, progress=progress)
        wall = time.perf_counter() - t1
        sampler.stop()
        from edgevlm.bundle import read_bundle

        b = read_bundle(out, verify_hashes=False)
        m = b.manifest
        comps = m["components"]
        result.update({
            "wall_s": round(wall, 1), "import_s": round(import_s, 2), "stages_s": stage_wall,
            "commit_and_other_s": round(wall - sum(stage_wall.values()), 1),   # hashing + rename (BundleWriter)
            "peak_rss_bytes": ru_maxrss_bytes(), "peak_rss_gib": round(ru_maxrss_bytes() / GIB, 2),
            "sampled_peak_rss_gib_by_stage": {k: round(v / GIB, 2) for k, v in sampler.peaks.items()},
            "goal": {"wall_s_max": args.goal_wall_s, "peak_rss_gib_max": args.goal_peak_gib},
            "bundle_bytes": b.total_size,
            "files": {k: v["size"] for k, v in m["files"].items() if not k.startswith("tokenizer/")},
            "parity": {n: {k: c["parity"].get(k) for k in ("passed", "max_abs_diff", "cosine", "tolerance",
                                                          "worst_check", "seconds")}
                       for n, c in comps.items() if "parity" in c},
            "decoder_op_histogram": comps["decoder"]["op_histogram"],
            "vision_op_histogram": comps["vision"]["op_histogram"],
            "decoder_io": {"inputs": len(comps["decoder"]["inputs"]), "outputs": len(comps["decoder"]["outputs"])},
            "opset": comps["decoder"]["opset"], "contrib_ops": comps["decoder"]["contrib_ops"],
        })
        q = m.get("quantization")
        if q:
            result["quantization"] = {"seconds": q.get("seconds"), "sizes": q.get("sizes"),
                                      "vision_s": comps["vision"]["recipe"].get("seconds"),
                                      "decoder_s": comps["decoder"]["recipe"].get("seconds"),
                                      "calibration": (q.get("calibration") or {}).get("calibration"),
                                      "errors": q.get("errors")}
        result["meets_goal"] = result["wall_s"] <= args.goal_wall_s and result["peak_rss_gib"] <= args.goal_peak_gib
    finally:
        sampler.stop()
        if args.keep and out.exists():
            print(f"[export_full] bundle kept at {out}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["environment"] = env
    line = json.dumps(result, sort_keys=True)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "" if (source, args.target, args.precision) == ("random-init", "cpu", "fp32") else \
            f"-{source}-{args.target}-{args.precision}"
        (RESULTS / f"export_{args.model}{suffix}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
