"""Markdown tables for README.md generated from the registries (models, targets, precisions).

    python -m edgevlm.docs_tables            # rewrite the generated blocks in README.md
    python -m edgevlm.docs_tables --check    # exit 1 if README.md is out of date (tests/test_readme.py does this)

A generated block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers. Torch-free.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from edgevlm.config import format_count, get_model_config, model_names

README = Path(__file__).resolve().parents[1] / "README.md"


def models_table() -> str:
    rows = ["| model | params | projector | visual tokens | image | LLM (d x layers, heads, ffn) | context | "
            "checkpoint |", "|---|---|---|---|---|---|---|---|"]
    for name in model_names():
        c = get_model_config(name)
        rows.append(f"| `{name}` | {format_count(c.num_params()['total'])} | {c.projector_type} "
                    f"({format_count(c.projector_params())}) | {c.visual_tokens} | {c.vision.image_size} px | "
                    f"{c.llm.hidden_size} x {c.llm.num_layers}, {c.llm.num_heads}, {c.llm.intermediate_size} | "
                    f"{c.context_length} | {c.hf_repo or '-'} |")
    return "\n".join(rows)


def targets_table() -> str:
    from edgevlm.targets import get_target, target_names

    rows = ["| target | kind | memory | compute capability | JetPack / TensorRT | precisions | DLA | default recipe |",
            "|---|---|---|---|---|---|---|---|"]
    for name in target_names():
        t = get_target(name)
        d = t.to_dict()
        cc = d.get("compute_capability") or "-"
        jp = "/".join(str(x) for x in (d.get("jetpack"), d.get("tensorrt")) if x) or "-"
        rows.append(f"| `{name}` | {d.get('kind', '-')} | {d.get('memory_gb', '-')} GB {d.get('memory_kind', '')} | "
                    f"{cc} | {jp} | {', '.join(d.get('precisions', []))} | {d.get('dla_cores', 0)} | "
                    f"{d.get('default_recipe', '-')} |")
    return "\n".join(rows)


def precisions_table() -> str:
    from edgevlm.errors import EdgeVLMError
    from edgevlm.targets import PRECISION_PRESETS, get_target, target_names

    def supported(target: str, preset: str) -> bool:
        try:
            get_target(target).recipe(preset)
        except EdgeVLMError:
            return False
        return True

    rows = ["| preset | vision + projector | embedding | decoder | lm_head | targets that support it |",
            "|---|---|---|---|---|---|"]
    from edgevlm.targets import TENSORRT_PRESETS

    for name, comp in PRECISION_PRESETS.items():
        ok = [t for t in target_names() if supported(t, name)]
        head = comp["lm_head"]
        if TENSORRT_PRESETS[name]["lm_head"] != head:         # TensorRT has no weight-only INT8 (INT4 only)
            head = f"{head} (TensorRT targets: {TENSORRT_PRESETS[name]['lm_head']})"
        rows.append(f"| `{name}` | {comp['vision']} | {comp['embedding']} | {comp['decoder']} | {head} | "
                    f"{len(ok)} of {len(target_names())} |")
    return "\n".join(rows)


GENERATORS: dict[str, Callable[[], str]] = {"models-table": models_table, "targets-table": targets_table,
                                            "precisions-table": precisions_table}


def render(text: str) -> str:
    for name, gen in GENERATORS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + gen() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is stale")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    new = render(old)
    if args.check:
        if old != new:
            print(f"{args.readme} is out of date: run python -m edgevlm.docs_tables", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
