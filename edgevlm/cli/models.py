"""``edgevlm models``: the model registry as a table (no torch needed)."""

from __future__ import annotations

import json

from edgevlm.config import format_count, get_model_config, model_names


def models(json_output: bool = False) -> None:
    """List the registered models with parameter counts, projector and token budget.

    Parameter counts are computed from the configuration (no weights are allocated). A ``NAME@N`` suffix
    selects a pooled N-token ldpnetv2 budget in every command that takes ``--model``.

    Args:
        json_output: print JSON instead of a table.
    """
    rows = []
    for name in model_names():
        cfg = get_model_config(name)
        p = cfg.num_params()
        rows.append({
            "name": name, "params": p["total"], "params_vision": p["vision"], "params_projector": p["projector"],
            "params_llm": p["llm"], "projector": cfg.projector_type, "visual_tokens": cfg.visual_tokens,
            "image_size": cfg.vision.image_size, "llm_hidden": cfg.llm.hidden_size, "llm_layers": cfg.llm.num_layers,
            "llm_heads": cfg.llm.num_heads, "llm_ffn": cfg.llm.intermediate_size, "vocab": cfg.llm.vocab_size,
            "context": cfg.context_length, "description": cfg.description})
    if json_output:
        print(json.dumps(rows, indent=2))
        return
    from edgevlm.console import make_console
    from rich.table import Table

    table = Table(title="edgevlm models")
    for col in ("name", "params", "vision", "projector", "LLM", "visual tokens", "image", "LLM dims (d x L, heads, ffn)",
                "context"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=col == "name")
    for r in rows:
        table.add_row(r["name"], format_count(r["params"]), format_count(r["params_vision"]),
                      f"{r['projector']} ({format_count(r['params_projector'])})", format_count(r["params_llm"]),
                      str(r["visual_tokens"]), f"{r['image_size']}px",
                      f"{r['llm_hidden']} x {r['llm_layers']}, {r['llm_heads']}h, {r['llm_ffn']}", str(r["context"]))
    make_console().print(table)


COMMANDS = {"models": models}
