"""``edgevlm quantize BUNDLE --precision P --out DIR``: the quantization stage on its own (float32 bundle ->
quantized bundle; ``edgevlm export --precision int4`` is export fp32 + this).

    edgevlm export --model mobilevlm-1.7b --checkpoint ./MobileVLM-1.7B --out bundles/fp32
    edgevlm quantize bundles/fp32 --precision int4 --out bundles/int4
    edgevlm quantize bundles/fp32-orin --precision int8 --out bundles/int8-orin --calibration ./my_images

Nothing heavy at import time (no torch: quantization reads ONNX graphs, not the model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from edgevlm.cli import positional

__all__ = ["quantize", "COMMANDS"]


@positional("bundle")
def quantize(bundle: str, precision: str = "int4", out: str | None = None, target: str | None = None,
             calibration: str | None = None, calib_method: Literal["minmax", "entropy", "percentile"] = "minmax",
             calibration_samples: int | None = None, heldout_samples: int | None = None, report: bool = True,
             vision_int8: Literal["auto", "dynamic", "static"] = "auto", block_size: int = 128,
             overwrite: bool = False, json_output: bool = False) -> int:
    """Quantize a float32 bundle into a new bundle (int8 / int4 recipes, per component).

    Reads BUNDLE's fp32 graphs, writes the quantized graphs, the fp16 embedding table and a manifest with the
    recipe, the calibration set and the quantization report (error against the fp32 graphs on held-out inputs)
    into --out, atomically. The graphs and the embedding table are read from BUNDLE and written once (an unchanged
    graph is copied: ONNX refuses hard-linked external data); other files (the tokenizer) are hard links where
    both folders are on one file system. For TensorRT targets the engine build plan of the quantized graphs is
    written too.

    Args:
        bundle: a float32 bundle (`edgevlm export --precision fp32`).
        precision: int8 | int4 | a preset with per-component overrides, e.g. "int4,vision=fp16" (see `edgevlm export
            --help`); the target must support each precision.
        out: the new bundle directory (default: BUNDLE with the precision appended, beside it).
        target: target profile (default: the one BUNDLE was exported for).
        calibration: calibration images: a folder, a LLaVA .json, or "embedded" (the default: the generated set in
            calibration/embedded.toml).
        calib_method: static-QDQ calibration method.
        calibration_samples: how many calibration samples (default: calibration/embedded.toml's).
        heldout_samples: held-out samples of the quantization report (default: calibration/embedded.toml's: 16, or
            4 for models of 1B parameters and more, where each costs float32 forward passes of both graphs).
        report: measure the error against the fp32 graphs on the held-out set (--no-report: faster, and the
            manifest then has no measured error).
        vision_int8: how an int8 vision tower is quantized: auto (dynamic on CPU targets, static on TensorRT),
            dynamic (int8 weights, activation scales computed per image at run time; no calibration; ONNX Runtime
            CPU only; faster and closer to fp32 on CLIP-L than static) or static (calibrated static QDQ).
        block_size: int4 block size (TensorRT targets: 64 or 128).
        overwrite: replace an existing bundle at --out.
        json_output: print the result as one JSON line.
    """
    from edgevlm.bundle import read_bundle
    from edgevlm.console import make_console
    from edgevlm.pipeline import quantize_bundle

    src = Path(bundle)
    dest = Path(out) if out else src.with_name(f"{src.name}-{precision.replace(',', '_').replace('=', '-')}")
    console = make_console(stderr=json_output)
    console.print(f"quantizing [bold]{src}[/] to [bold]{precision}[/] -> {dest}")
    path = quantize_bundle(src, dest, precision, target=target, calibration=calibration, calib_method=calib_method,
                           calibration_samples=calibration_samples, heldout_samples=heldout_samples,
                           report=report, show=not json_output, block_size=block_size, overwrite=overwrite,
                           int8_vision=vision_int8,
                           console=console)
    b = read_bundle(path, verify_hashes=False)
    q = b.manifest.get("quantization") or {}
    summary = {"bundle": str(path), "precision": b.manifest["precision"], "size_bytes": b.total_size,
               "seconds": q.get("seconds"), "sizes": q.get("sizes"), "linked_files": q.get("linked_files", [])}
    if json_output:
        print(json.dumps(summary))
        return 0
    console.print(f"[bold green]bundle written[/]: {path} ({b.total_size / 2**20:.1f} MiB, {b.manifest['precision']}) "
                  f"in {q.get('seconds', 0):.1f} s")
    sys.stdout.flush()
    return 0


COMMANDS = {"quantize": quantize}
