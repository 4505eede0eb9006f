"""``edgevlm inspect BUNDLE``: validate a bundle and print what it holds (no torch, no onnxruntime needed).

    edgevlm inspect out/tiny-bundle               # readable summary (rich), sha256 of every file verified
    edgevlm inspect out/tiny-bundle --no-verify   # skip hashing (sizes and paths are still checked)
    edgevlm inspect out/tiny-bundle --json-output # the manifest as JSON
"""

from __future__ import annotations

import json
from typing import Any

from edgevlm.cli import positional


def _mb(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _io_text(io: dict[str, Any]) -> str:
    dims = ", ".join(str(d) for d in io.get("shape", []) or [])
    return f"{io.get('name', '?')}: {io.get('dtype', '?')} [{dims}]"


def _registry_text(name: str, cfg: Any) -> str:
    """Where the bundle's model stands in the registry (`edgevlm models`): its own entry, or the entry with the same
    architecture (a checkpoint named after its directory), or none."""
    from edgevlm.config import get_model_config, model_names
    from edgevlm.errors import ConfigError

    def arch(c: Any) -> tuple:
        return (c.projector_type, c.visual_tokens, c.vision.image_size, c.vision.patch_size, c.vision.hidden_size,
                c.vision.num_layers, c.llm.hidden_size, c.llm.num_layers, c.llm.num_heads, c.llm.num_kv_heads,
                c.llm.intermediate_size, c.llm.vocab_size)

    try:
        entry = get_model_config(name)
    except ConfigError:
        entry = None
    if entry is not None:
        return "registry model" if arch(entry) == arch(cfg) else "registry name, but dims differ from the registry's"
    same = [n for n in model_names() if arch(get_model_config(n)) == arch(cfg)]
    return f"not a registry name; architecture of {same[0]}" if same else "not in the registry"


@positional("bundle")
def inspect_bundle(bundle: str, json_output: bool = False, verify: bool = True) -> None:
    """Validate a bundle and summarize it: model (registry name), components, I/O, KV layout, target, quantization.

    Reading validates the schema version, every path, every file's size and (unless --no-verify) its sha256;
    a problem is reported with what to do about it.

    Args:
        bundle: the bundle directory (written by `edgevlm export`).
        json_output: print the manifest as JSON instead of a summary.
        verify: check every file's sha256 against the manifest (--no-verify skips hashing).
    """
    from edgevlm.bundle import read_bundle
    from edgevlm.config import format_count

    if json_output:
        b = read_bundle(bundle, verify_hashes=verify)
        print(json.dumps(b.manifest, indent=2, sort_keys=True))
        return

    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from edgevlm.console import make_console

    console = make_console()
    if verify:
        with console.status(f"verifying sha256 of the files in {escape(bundle)} ..."):
            b = read_bundle(bundle, verify_hashes=True)
    else:
        b = read_bundle(bundle, verify_hashes=False)
    m = b.manifest
    cfg = b.model_config
    params = cfg.num_params()

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=Text(title, style="bold"), title_justify="left", show_header=False, box=box.SIMPLE,
                      padding=(0, 1))
        table.add_column(style="cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, Text(value))             # Text: shapes like [batch, 3, 336, 336] are not markup
        console.print(table)

    toolkit = m["toolkit"]
    model = m["model"]
    model_name = str(model.get("name") or cfg.name)
    header = [("model", f"{model_name} ({_registry_text(model_name, cfg)}"
                        + (", random init)" if b.random_init else ")")),
              ("path", str(b.root)), ("schema", str(b.schema_version)),
              ("written by", f"{toolkit.get('name', '?')} {toolkit.get('version', '?')} at {m.get('created', '?')}")]
    if "updated" in m:
        header.append(("updated", str(m["updated"])))
    section("bundle", header)

    section("model", [
        ("name", model_name),
        ("params", f"{format_count(params['total'])} (vision {format_count(params['vision'])}, projector "
                   f"{format_count(params['projector'])}, LLM {format_count(params['llm'])})"),
        ("projector", cfg.projector_type),
        ("visual tokens", str(b.visual_tokens)),
        ("vision", f"{cfg.vision.name}, {cfg.vision.image_size}px / patch {cfg.vision.patch_size}"),
        ("LLM", f"{cfg.llm.name or '-'}: {cfg.llm.hidden_size} x {cfg.llm.num_layers} layers, {cfg.llm.num_heads} "
                f"heads ({cfg.llm.num_kv_heads} kv), vocab {cfg.llm.vocab_size}, context {cfg.context_length}"),
        ("weights", "RANDOM INIT (not trained; outputs are meaningless)" if b.random_init
         else f"trained, from {model.get('source', '?')}"),
    ])
    prompt, pre = m["prompt"], m["preprocess"]
    section("prompt / preprocess", [
        ("template", str(prompt.get("template"))),
        ("image token", f"{prompt.get('image_placeholder', '<image>')} -> {prompt.get('image_token_index', '?')}"
                        + (", chunk-wise tokenization" if prompt.get("chunkwise_tokenization") else "")),
        ("bos/eos/pad", f"{prompt.get('bos_token_id')}/{prompt.get('eos_token_id')}/{prompt.get('pad_token_id')}"),
        ("stop strings", _short(prompt.get("stop_strings", []))),
        ("tokenizer", str(m["tokenizer"].get("file"))),
        ("preprocess", f"{pre.get('image_size')}px, aspect {pre.get('aspect_ratio', 'pad')}, "
                       f"{pre.get('resample', 'bicubic')}, mean {_short(pre.get('mean'))}, std {_short(pre.get('std'))}"),
    ])

    order = [n for n in ("vision", "embed", "decoder") if n in m["components"]]
    order += [n for n in m["components"] if n not in order]
    for name in order:
        entry = m["components"][name]
        paths = list(dict.fromkeys([entry["file"], *(entry.get("external_data") or []), *(entry.get("files") or [])]))
        rows = [("file" if len(paths) == 1 else "files",
                 ", ".join(f"{p} ({_mb(b.files[p]['size'])})" for p in paths if p in b.files))]
        if entry.get("kind"):
            rows.append(("kind", str(entry["kind"])))
        if entry.get("kind") == "table":
            rows.append(("table", f"{entry.get('dtype', '?')} {entry.get('shape', '?')}"))
        for key in ("precision", "opset"):
            if key in entry:
                rows.append((key, str(entry[key])))
        if entry.get("recipe"):
            rows.append(("recipe", _short(entry["recipe"], 400)))
        if "contrib_ops" in entry:
            rows.append(("contrib ops", "yes (com.microsoft: ONNX Runtime only)" if entry["contrib_ops"]
                         else "no (standard ONNX ops)"))
        for direction in ("inputs", "outputs"):
            for i, io in enumerate(entry.get(direction) or []):
                if isinstance(io, dict):
                    rows.append((direction if i == 0 else "", _io_text(io)))
        kv = entry.get("kv_cache")
        if isinstance(kv, dict):
            rows.append(("KV cache", f"{kv.get('num_layers')} layers x {kv.get('num_kv_heads')} heads x "
                                     f"{kv.get('head_dim')} head_dim, [{kv.get('layout')}], {kv.get('dtype')}"))
            rows.append(("KV names", f"{kv.get('past_key')} / {kv.get('past_value')} -> {kv.get('present_key')} / "
                                     f"{kv.get('present_value')}"))
        if "logits" in entry:
            rows.append(("logits", str(entry["logits"])))
        parity = entry.get("parity")
        if isinstance(parity, dict):
            rows.append(("parity", ", ".join(f"{k} {v:.7g}" if isinstance(v, float) else f"{k} {_short(v, 80)}"
                                             for k, v in parity.items())))
        elif parity is not None:
            rows.append(("parity", _short(parity, 400)))
        section(f"component: {name}", rows)

    for key in ("target", "quantization", "engines"):
        if m.get(key):
            console.print(Text(key, style="bold"))
            console.print_json(json.dumps(m[key], sort_keys=True))
    for note in m.get("notes", []) or []:
        console.print(Text.assemble(("note ", "bold"), str(note)))
    status = (Text("sha256 of every file verified", style="green") if b.hashes_verified
              else Text("hashes NOT verified (--no-verify); paths and sizes checked", style="yellow"))
    console.print(Text.assemble(("total ", "bold"), f"{_mb(b.total_size)} in {len(b.files)} files; ", status))


COMMANDS = {"inspect": inspect_bundle}
