"""``edgevlm export``: a model (checkpoint or random init) -> a validated ONNX bundle (vision + embed + decoder).

    edgevlm export --model tiny-ldpnetv2 --random-init --out out/tiny          # seconds
    edgevlm export --model mobilevlm-1.7b --random-init --out out/mvlm17       # minutes, ~7 GB of fp32 weights
    edgevlm export --checkpoint runs/ft/checkpoint --target jetson-orin-nano --out out/ft-orin

This module imports nothing heavy; torch / onnx load when the command runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


_COMPONENT_NAMES = {"vision": "vision", "embedding": "embedding", "decoder": "decoder", "lm_head": "LM head"}


def precision_presets_help() -> str:
    """What each ``--precision`` preset does per component, from ``edgevlm.targets.PRECISION_PRESETS`` (so the help
    cannot drift from the registry): ``"fp32 = fp32 everywhere; ...; int4 = int8 vision + fp16 embedding + int4
    decoder + int8 LM head"``."""
    from edgevlm.targets import PRECISION_PRESETS, TENSORRT_PRESETS

    parts = []
    for name, comp in PRECISION_PRESETS.items():
        if len(set(comp.values())) == 1:
            text = f"{name} = {next(iter(comp.values()))} everywhere"
        else:
            text = f"{name} = " + " + ".join(f"{p} {_COMPONENT_NAMES.get(c, c)}" for c, p in comp.items())
        trt = {c: p for c, p in TENSORRT_PRESETS[name].items() if comp.get(c) != p}
        if trt:
            text += " (TensorRT targets: " + ", ".join(f"{p} {_COMPONENT_NAMES.get(c, c)}" for c, p in trt.items()) + ")"
        parts.append(text)
    return "; ".join(parts)


def default_out(model: str | None, checkpoint: str | None, random_init: bool, target: str, precision: str) -> Path:
    """``bundles/{model}[-random-init]-{target}-{precision}`` (a name that cannot hide that the weights are random)."""
    name = model or (Path(checkpoint).resolve().name if checkpoint else "model")
    parts = [name] + (["random-init"] if random_init else []) + [target, precision]
    return Path("bundles") / re.sub(r"[^A-Za-z0-9._@+-]+", "_", "-".join(parts))


def export(model: str | None = None, checkpoint: str | None = None, random_init: bool = False,
           out: str | None = None, target: str = "cpu", precision: str = "fp32", opset: int = 20,
           overwrite: bool = False, skip_parity: bool = False, seed: int = 0, decoder_graph: str = "auto",
           dla: bool = False, calibration: str | None = None, calibration_samples: int | None = None,
           heldout_samples: int | None = None, vision_int8: str | None = None, json_output: bool = False) -> int:
    """Export a model to an ONNX bundle and validate it against PyTorch with ONNX Runtime.

    Writes vision.onnx (pixel values -> image embeddings), embed_tokens.npy (token embedding table),
    decoder.onnx (inputs_embeds + KV cache -> last-position logits + presents), the tokenizer and manifest.json,
    atomically: an export that fails (or is interrupted) leaves nothing at --out. Exactly one of --checkpoint and
    --random-init is required; random-init bundles carry a stand-in tokenizer and are for latency / memory work.

    Args:
        model: registry name (see `edgevlm models`); optional with --checkpoint (checked against it when given).
        checkpoint: MobileVLM checkpoint directory (config.json, safetensors, tokenizer files).
        random_init: random weights (seeded by --seed) instead of a checkpoint.
        out: bundle directory (default: bundles/{model}[-random-init]-{target}-{precision}).
        target: target profile (see `edgevlm targets`); TensorRT targets get the standard-ops / opset check.
        precision: a preset: PRECISION_PRESETS_HELP. Or a preset with per-component overrides (components:
            vision, embedding, decoder, lm_head), e.g. "int4,vision=fp16". With int8 / int4 components the model
            is exported in fp32, then quantized with ONNX Runtime's tools, calibrated on the embedded image set
            (edgevlm/quant/recipes.py); the target must support each precision (`edgevlm targets`).
        opset: ONNX opset (TensorRT 10.x / JetPack 6 parses <= 20).
        overwrite: replace an existing bundle at --out.
        skip_parity: do not validate the graphs against PyTorch (saves the PyTorch reference run and the ONNX
            Runtime comparison, about a minute per billion parameters on 2 cores; the manifest says it was skipped).
            Risk: a graph that computes something other than the model (an exporter or weight-mapping bug, fp16
            overflow) then goes unnoticed until answers look wrong; `edgevlm verify` checks that graphs run and are
            finite, not that they match PyTorch. Quantized exports still measure their error against the fp32
            graphs (the quantization report).
        seed: seed of the random weights, the stand-in tokenizer and the parity inputs.
        decoder_graph: auto | gqa | portable. gqa: ONNX Runtime CPU graph (GroupQueryAttention writing the KV cache
            in place into one preallocated buffer; CPU targets, needs onnxruntime-genai); portable: standard ONNX
            ops with a concatenated past/present (any runtime, TensorRT). auto: gqa on ONNX Runtime CPU targets.
        dla: TensorRT targets with DLA cores (AGX Orin, Orin NX): build the vision engine on DLA core 0 with GPU
            fallback instead of the GPU (default: GPU only). Needs an fp16 or int8 vision precision. Most ViT ops
            (LayerNorm, GELU, attention matmuls) have no DLA layer and fall back to the GPU; the export lists them.
            Compare with the GPU-only build in `edgevlm bench` before keeping it.
        calibration: int8 / int4 recipes: calibration images (a folder, a LLaVA .json, or "embedded", the default:
            the generated set of calibration/embedded.toml).
        calibration_samples: int8 / int4 recipes: how many calibration samples (default: calibration/embedded.toml's).
        heldout_samples: int8 / int4 recipes: held-out samples of the quantization report, the measured error
            against the fp32 graphs (default: calibration/embedded.toml's, 16, or 4 for models of 1B parameters and
            more; each costs float32 forward passes of both graphs).
        vision_int8: int8 vision: auto (the default: dynamic on CPU targets, static on TensorRT), dynamic
            (int8 weights, activation scales at run time; no calibration; ONNX Runtime CPU only) or static
            (calibrated static QDQ).
        json_output: print the result as one JSON line instead of a summary.
    """
    from edgevlm.errors import ConfigError

    if (checkpoint is None) == (not random_init):
        raise ConfigError("pass exactly one of --checkpoint DIR (trained weights) and --random-init (random weights "
                          "for latency and memory work)" + ("; got both" if checkpoint and random_init else ""))
    if random_init and not model:
        raise ConfigError("--random-init needs --model NAME (see `edgevlm models`)")
    if model:
        from edgevlm.config import get_model_config

        get_model_config(model)                           # unknown name -> ConfigError listing the known ones
    from edgevlm.targets import get_target

    tgt = get_target(target)
    out_path = Path(out) if out else default_out(model, checkpoint, random_init, tgt.label, precision)

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgevlm.console import make_console
    from edgevlm.exporter.bundle_export import STAGES
    from edgevlm.pipeline import export_bundle

    console = make_console(stderr=json_output)
    label = " [bold red](random-init)[/]" if random_init else ""
    console.print(f"exporting [bold]{model or checkpoint}[/]{label} for [bold]{tgt.label}[/] ({precision}, opset "
                  f"{opset}) -> {out_path}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=len(STAGES))

        def progress(stage: str, event: str, seconds: float | None) -> None:
            name = STAGES.get(stage, stage)
            if event == "start":
                bar.update(task, description=name)
            elif event == "done":
                bar.console.print(f"  [green]done[/] {name:<24} {seconds:7.1f} s")
                bar.advance(task)
            else:
                bar.console.print(f"  [dim]skip {name}[/]")
                bar.advance(task)

        path = export_bundle(model, out_path, checkpoint=checkpoint, random_init=random_init, target=tgt,
                             precision=precision, opset=opset, overwrite=overwrite, parity=not skip_parity,
                             seed=seed, decoder_graph=decoder_graph, progress=progress, dla=dla,
                             quantize_options={k: v for k, v in (("calibration", calibration),
                                                                 ("calibration_samples", calibration_samples),
                                                                 ("heldout_samples", heldout_samples),
                                                                 ("int8_vision", vision_int8))
                                               if v is not None})

    from edgevlm.bundle import read_bundle

    b = read_bundle(path, verify_hashes=False)
    m = b.manifest
    par = {n: c.get("parity", {}) for n, c in m["components"].items() if "parity" in c}
    summary = {"bundle": str(path), "model": m["model"]["name"], "random_init": b.random_init,
               "target": m["target"]["label"], "precision": m["precision"], "size_bytes": b.total_size,
               "tokenizer_stand_in": bool(m["tokenizer"].get("stand_in")),
               "parity": {n: None if p.get("skipped") else {"max_abs_diff": p["max_abs_diff"], "cosine": p["cosine"]}
                          for n, p in par.items()},
               "timings_s": m["export"]["timings_s"], "peak_rss_bytes": m["export"]["peak_rss_bytes"]}
    engines = tensorrt_summary(m)
    if engines:
        summary["tensorrt_engines"] = engines
    if json_output:
        print(json.dumps(summary))
        return 0
    tag = " [bold red]RANDOM-INIT (random weights, stand-in tokenizer: latency/memory work only)[/]" \
        if b.random_init else ""
    console.print(f"[bold green]bundle written[/]: {path} ({b.total_size / 2**20:.1f} MiB){tag}")
    for n, p in par.items():
        if p.get("skipped"):
            console.print(f"  parity {n:<8} skipped")
        else:
            console.print(f"  parity {n:<8} max |diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.1e}), "
                          f"cosine {p['cosine']:.7f}")
    console.print(f"  total {m['export']['timings_s'].get('total', 0):.1f} s, peak RSS "
                  f"{m['export']['peak_rss_bytes'] / 2**30:.2f} GiB")
    for name, e in engines.items():
        console.print(f"  engine {name:<8} {e['device']}; {', '.join(f'{k}: {v}' for k, v in e['layers'].items())}",
                      highlight=False)
        if e.get("dla_fallback_ops"):
            console.print("    falls back to the GPU (no DLA layer): "
                          + ", ".join(f"{k} x{v}" for k, v in e["dla_fallback_ops"].items()), highlight=False)
    if engines:
        console.print(f"  build the engines on the device: bash {path}/build_engines.sh  (or edgevlm build-engine "
                      f"{path})", highlight=False)
    sys.stdout.flush()
    return 0


def tensorrt_summary(manifest: dict) -> dict[str, dict]:
    """Per planned engine: where it runs (GPU / DLA core), its layer precisions and the ops that fall back from DLA
    to the GPU (from the manifest's ``tensorrt.plan``); empty for non-TensorRT bundles."""
    plan = (manifest.get("tensorrt") or {}).get("plan") or {}
    out = {}
    for e in plan.get("engines", []):
        core = e.get("dla_core")
        out[e["component"]] = {"device": "GPU" if core is None else f"DLA core {core} + GPU fallback",
                               "layers": dict(e.get("layer_precisions") or {}),
                               "dla_fallback_ops": dict(sorted((e.get("dla_fallback_ops") or {}).items(),
                                                               key=lambda kv: (-kv[1], kv[0])))}
    return out


# the --precision help is generated from the registry (PRECISION_PRESETS_HELP in the docstring above)
export.__doc__ = (export.__doc__ or "").replace("PRECISION_PRESETS_HELP", precision_presets_help())

COMMANDS = {"export": export}
