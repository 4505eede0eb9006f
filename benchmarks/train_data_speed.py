"""How long the synthetic set takes to draw and write, and to load into the training image cache.

The issue-20 case: 800 images at 336 px (the mobilevlm-1.7b input size), single-question samples, no tokenizer.
Prints one JSON line (machine, command, wall seconds per phase, best of ``--repeats``, and the CPU seconds the
writing took in this process and its worker processes); nothing is written outside a temporary directory.

    PYTHONPATH=. .venv/bin/python benchmarks/train_data_speed.py                    # 800 x 336 px, default workers
    PYTHONPATH=. .venv/bin/python benchmarks/train_data_speed.py --n 800 --size 336 --workers 2   # 2 processes
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    """User + system CPU seconds of this process and of its finished worker processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=800, help="training images")
    ap.add_argument("--size", type=int, default=336, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=None, help="drawing processes (default: write_dataset's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (the best is reported)")
    args = ap.parse_args(argv)

    from edgevlm.config import get_model_config
    from edgevlm.train.dataset import ImageCache
    from edgevlm.train.evaluate import preprocess_config
    from edgevlm.train.llava_data import load_dataset
    from edgevlm.train.recipe import cpu_model
    from edgevlm.train.synthetic import write_dataset

    kw = {}
    if args.workers is not None and "workers" in inspect.signature(write_dataset).parameters:
        kw["workers"] = args.workers
    pcfg = preprocess_config(get_model_config("mobilevlm-1.7b"))
    pcfg = type(pcfg)(**{**pcfg.__dict__, "image_size": args.size}) if pcfg.image_size != args.size else pcfg
    write_s, cache_s, write_cpu = [], [], []
    for _ in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="edgevlm-data-speed-"))
        try:
            t, c = time.perf_counter(), _cpu_s()
            write_dataset(root / "d", train=args.n, val=0, test=0, image_size=args.size, progress=False, **kw)
            write_s.append(time.perf_counter() - t)
            write_cpu.append(_cpu_s() - c)
            recs = load_dataset(root / "d" / "train.json")
            t = time.perf_counter()
            ImageCache([r.image_path for r in recs], pcfg)
            cache_s.append(time.perf_counter() - t)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"benchmark": "train_data_speed", "n": args.n, "image_size": args.size,
                      "workers": kw.get("workers", "default"), "write_s_best": round(min(write_s), 3),
                      "write_s_all": [round(x, 2) for x in write_s],
                      "write_cpu_s_best": round(min(write_cpu), 3), "image_cache_s_best": round(min(cache_s), 3),
                      "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                      "load_avg": [round(x, 2) for x in os.getloadavg()],
                      "command": " ".join([Path(sys.executable).name, *sys.argv])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
