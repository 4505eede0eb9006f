"""Print (or rewrite in docs/training.md) the per-GPU training-memory table: mobilevlm 1.7B / 3B / 7B under DDP,
FSDP2 on 2 / 4 / 8 GPUs and LoRA, computed by ``edgevlm.train.memory`` from the model configs.

    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_table.py                  # print the markdown table
    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_table.py --write-docs     # replace it in docs/training.md
    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_table.py --micro-batch 8 --text-tokens 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
BEGIN, END = "<!-- memory-table:begin -->", "<!-- memory-table:end -->"


def main(argv: list[str] | None = None) -> int:
    from edgevlm.train.memory import markdown_table, memory_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=16, help="examples per GPU per forward")
    ap.add_argument("--text-tokens", type=int, default=196, help="text tokens per example (visual tokens added)")
    ap.add_argument("--supervised", type=int, default=32, help="supervised (answer) tokens per example")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the table between the markers in {DOC}")
    args = ap.parse_args(argv)
    table = markdown_table(memory_rows(micro_batch=args.micro_batch, text_tokens=args.text_tokens,
                                       supervised=args.supervised))
    if args.write_docs:
        text = DOC.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print(f"wrote the table into {DOC}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
