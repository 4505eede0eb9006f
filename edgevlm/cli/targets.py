"""``edgevlm targets`` (the hardware profiles) and ``edgevlm plan`` (will a model fit?). No torch needed."""

from __future__ import annotations

import json

from edgevlm.cli.export import precision_presets_help


def targets(json_output: bool = False) -> None:
    """List the hardware target profiles (export/targets/*.toml).

    A target fixes memory, compute capability, the JetPack/TensorRT stack, supported precisions, DLA cores, the
    default precision recipe and the context limit. Aliases: jetson-orin = Jetson AGX Orin 32 GB (the MobileVLM
    paper's board), jetson-orin-nano = Orin Nano 8 GB (the dev kit), cpu = x86-64 AVX2. Append @jp7.2 or
    @trt10.16 to a name for another JetPack / TensorRT version, e.g. --target jetson-orin@jp7.2.

    Args:
        json_output: print JSON instead of a table.
    """
    from edgevlm.targets import get_target, target_aliases, target_names

    aliases: dict[str, list[str]] = {}
    for alias, name in target_aliases().items():
        aliases.setdefault(name, []).append(alias)
    rows = [get_target(n) for n in target_names()]
    if json_output:
        print(json.dumps([t.to_dict() for t in rows], indent=2))
        return
    from rich import box
    from rich.table import Table

    from edgevlm.console import make_console, print_rows

    # one line per target: aliases get their own column; piped, print_rows widens the console to the table so no
    # row wraps (grep-able); on a narrow terminal rich wraps cells (the name never)
    table = Table(title="edgevlm targets", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("name", "aliases", "kind", "memory", "GB/s", "CC", "JetPack / TensorRT", "precisions", "DLA",
                "default", "max ctx"):
        table.add_column(col, no_wrap=col == "name", overflow="fold",
                         justify="right" if col in ("memory", "GB/s", "CC", "DLA", "max ctx") else "left")
    for t in rows:
        if t.is_tensorrt:
            stack = (f"JP {t.jetpack}, " if t.jetpack else "") + f"TRT {t.tensorrt} ({t.builder_mode})"
        else:
            stack = t.backend + (f" ({', '.join(t.cpu_features)})" if t.cpu_features else "")
        table.add_row(t.name, ", ".join(aliases.get(t.name, [])) or "-", t.kind, f"{t.memory_gb:g} GB {t.memory_kind}",
                      f"{t.memory_bandwidth_gbs:g}", t.compute_capability or "-", stack, " ".join(t.precisions),
                      str(t.dla_cores or "-"), t.default_recipe, str(t.max_context))
    print_rows(make_console(), table)


def plan(model: str, target: str, precision: str | None = None, context: int | None = None, batch: int = 1,
         prompt_tokens: int | None = None, memory_gb: float | None = None, workspace_gb: float | None = None,
         kv_shared_buffer: bool = False, json_output: bool = False, strict: bool = False) -> int:
    """Itemized memory budget of a model on a target, and whether it fits.

    Counts weights per component at their precision, the KV cache (past + present buffers), prefill and vision
    activations, runtime overhead, the load transient and, for TensorRT, the engine build (on a Jetson it runs on
    the board and shares its memory). Verdict: fits / near limit (> 90 % of usable memory) / does not fit, with
    suggestions: a smaller precision preset, the longest context that fits, targets where it fits.
    Formulas: edgevlm/planner.py.

    Args:
        model: model name (edgevlm models).
        target: target name or alias (edgevlm targets); NAME@jp7.2 / NAME@trt10.16 pick another software stack.
        precision: a preset (PRECISION_PRESETS_HELP) or a preset with overrides, e.g. "int4,vision=fp16";
            default: the target's default recipe.
        context: KV-cache length in tokens (prompt + answer); default: min(model max, target max_context).
        batch: sequences decoded together.
        prompt_tokens: longest prompt incl. visual tokens; default: visual tokens + 256.
        memory_gb: override the target's memory size (CPU hosts vary).
        workspace_gb: override the TensorRT builder workspace.
        kv_shared_buffer: the runtime updates the KV cache in place (one buffer instead of two).
        json_output: print JSON instead of a table.
        strict: exit with status 1 when it does not fit.
    """
    from edgevlm.config import get_model_config
    from edgevlm.planner import gib, plan_memory
    from edgevlm.targets import get_target

    cfg = get_model_config(model)
    tgt = get_target(target, memory_gb=memory_gb)
    p = plan_memory(cfg, tgt, precision, context, batch, prompt_tokens=prompt_tokens,
                    kv_shared_buffer=kv_shared_buffer, workspace_gb=workspace_gb)
    code = 1 if strict and p.verdict == "does_not_fit" else 0
    if json_output:
        print(json.dumps(p.to_dict(), indent=2))
        return code
    from rich.table import Table

    from edgevlm.console import make_console

    console = make_console()
    phases = list(p.phases)
    title = (f"{p.model} on {p.target}: {p.precision_name} "
             f"({', '.join(f'{k} {v}' for k, v in p.precision.items())}), context {p.context}, "
             f"prompt <= {p.prompt_tokens}, batch {p.batch}, KV {p.kv_dtype}")
    table = Table(title=title)
    table.add_column("item")
    table.add_column("MiB", justify="right")
    for ph in phases:
        table.add_column(ph, justify="center")
    table.add_column("detail")
    for item in p.items:
        table.add_row(item.name, f"{item.bytes / 2**20:,.1f}", *("x" if ph in item.phases else "" for ph in phases),
                      item.detail)
    table.add_section()
    table.add_row("total per phase", "", *(f"{p.phases[ph] / 2**20:,.0f}" for ph in phases), "MiB")
    console.print(table)
    style = {"fits": "green", "near_limit": "yellow", "does_not_fit": "bold red"}[p.verdict]
    console.print(f"usable memory: {gib(p.usable_bytes)} of {gib(p.memory_bytes)} ({tgt.memory_kind}); "
                  f"peak: {gib(p.peak_bytes)} in the {p.peak_phase} phase")
    console.print(f"[{style}]{p.summary()}[/{style}]", highlight=False)
    for s in p.suggestions:
        console.print(f"  - {s}", highlight=False)
    for n in p.notes:
        console.print(f"  note: {n}", style="dim", highlight=False)
    return code


# the --precision help is generated from the registry (edgevlm.targets.PRECISION_PRESETS)
plan.__doc__ = (plan.__doc__ or "").replace("PRECISION_PRESETS_HELP", precision_presets_help())

COMMANDS = {"targets": targets, "plan": plan}
