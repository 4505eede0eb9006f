"""Training speed of one stage, offline: the issue-20 case by default (mobilevlm-1.7b, random init, instruct stage,
global batch 16, 40 steps, bf16 autocast, synthetic 336-px multi-turn data with a BPE tokenizer trained on it).

Writes the synthetic set (timed), trains one stage with ``edgevlm.train.recipe.train`` and prints one JSON line:
the data-preparation time, the stage's ``speed`` block (warm-up vs steady-state step time, tokens/s, model FLOPs
per token, MFU against the GPU's bf16 peak), ``execution`` (kernels, padding, loader), peak GPU memory and the
environment. No weights are downloaded (random init measures the same arithmetic). ``--profile`` also writes a
torch.profiler trace and top-20 table under ``OUT/profile``.

    PYTHONPATH=. .venv/bin/python benchmarks/train_gpu_speed.py                       # the issue's case, on CUDA
    PYTHONPATH=. .venv/bin/python benchmarks/train_gpu_speed.py --profile --out runs/speed
    PYTHONPATH=. .venv/bin/python benchmarks/train_gpu_speed.py --model tiny-ldpnetv2 --steps 4 --train 64 \\
        --device cpu --bf16 off                                                        # smoke run on a CPU
    # the batching of before issue 20, for comparison on the same machine:
    PYTHONPATH=. .venv/bin/python benchmarks/train_gpu_speed.py --group-by-length 0 --pad-multiple 1 --workers 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilevlm-1.7b")
    ap.add_argument("--stage", default="instruct", help="stage preset (align, instruct, vision)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train", type=int, default=800, help="synthetic training images")
    ap.add_argument("--single-turn", action="store_true", help="one question per image (shorter sequences)")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--group-by-length", type=int, default=None)
    ap.add_argument("--pad-multiple", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, deleted after)")
    args = ap.parse_args(argv)

    import torch

    from edgevlm.config import get_model_config
    from edgevlm.train.recipe import environment_info, train
    from edgevlm.train.synthetic import write_dataset

    cfg = get_model_config(args.model)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edgevlm-train-speed-"))
    try:
        t = time.perf_counter()
        data = write_dataset(root / "data", train=args.train, val=0, test=0, image_size=cfg.vision.image_size,
                             multi_turn=not args.single_turn, tokenizer_vocab=min(4096, cfg.llm.vocab_size),
                             overwrite=True, progress=False)
        data_s = time.perf_counter() - t
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res = train(model=args.model, data=str(data), out=str(root / "run"), overwrite=True, stages=[args.stage],
                    steps=args.steps, batch_size=args.batch_size, lr=1e-5, bf16=args.bf16, device=args.device,
                    group_by_length=args.group_by_length, pad_multiple=args.pad_multiple, workers=args.workers,
                    lora_r=args.lora_r or None, profile=args.profile or None, eval_split="none", progress=False)
        stage = res.log["stages"][0]
        report = {
            "benchmark": "train_gpu_speed", "model": args.model, "stage": args.stage, "steps": args.steps,
            "global_batch": args.batch_size, "data_prep_s": round(data_s, 2),
            "mean_text_tokens": round(stage["dataset"]["mean_text_tokens"], 1),
            "speed": stage["speed"], "execution": stage["execution"], "precision": res.log["precision"],
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            if torch.cuda.is_available() else None,
            "profile": stage.get("profile"), "environment": environment_info(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        print(json.dumps(report))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
