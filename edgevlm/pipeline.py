"""The workstation pipeline: the export stage and the quantization stage, composed.

``edgevlm.exporter`` writes float bundles (fp32, or fp16 through a conversion hook) from a model;
``edgevlm.quant`` turns a float bundle into a quantized one (bundle -> bundle). Neither imports the other; this
module is where they meet, so ``edgevlm export --precision int4`` is "export fp32, then quantize":

    export_bundle(..., precision="fp32" | "fp16")   ->  exporter.export_bundle (fp16: ``quant.fp16`` hook)
    export_bundle(..., precision="int8" | "int4")   ->  exporter.export_bundle(fp32) into a scratch folder beside
                                                        ``out`` -> quant.quantize_bundle(scratch -> out; unchanged
                                                        files hard-linked, not copied) -> memory plan of the result
    quantize_bundle(src, out, precision)             ->  quant.apply.quantize_bundle (``edgevlm quantize``)

Precision names and presets: ``edgevlm.precisions`` (the one registry).

    >>> from edgevlm.pipeline import export_bundle
    >>> export_bundle("tiny-ldpnetv2", "out/tiny-int4", random_init=True, precision="int4")
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from edgevlm.config import ModelConfig, get_model_config
from edgevlm.errors import ExportError
from edgevlm.exporter import bundle_export as X
from edgevlm.precisions import is_quantized

log = logging.getLogger(__name__)


def float_hooks() -> dict[str, Any]:
    """The exporter's conversion hooks for float precisions other than fp32 (``postprocess=``)."""
    from edgevlm.quant.fp16 import convert_fp16_file

    return {"fp16": convert_fp16_file}


def export_bundle(model_name_or_cfg: str | ModelConfig | None, out: str | os.PathLike, *,
                  precision: str | Mapping[str, str] = X.DEFAULT_PRECISION, target=None, dla: bool = False,
                  overwrite: bool = False, progress: X.Progress | None = None,
                  quantize_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Export a MobileVLM to a bundle at ``precision`` (see the module docstring); the arguments are
    ``edgevlm.exporter.bundle_export.export_bundle``'s. ``quantize_options``: keyword arguments for the
    quantization stage (``edgevlm.quant.apply.apply_precision``: calibration, calib_method, calibration_samples,
    heldout_samples, report, block_size, ...)."""
    tgt = X.resolve_target(target)
    comps = tgt.recipe(precision)                 # TargetError when the target lacks a precision
    if not is_quantized(comps):
        if quantize_options:
            from edgevlm.errors import ConfigError

            raise ConfigError(f"{', '.join(sorted(quantize_options))} only apply to int8 / int4 recipes; precision "
                              f"'{precision}' has no quantization stage")
        return X.export_bundle(model_name_or_cfg, out, precision=precision, target=tgt.name, dla=dla,
                               overwrite=overwrite, progress=progress, postprocess=float_hooks(), **kwargs)
    return _export_quantized(model_name_or_cfg, out, target=tgt, precision=precision, overwrite=overwrite,
                             progress=progress, dla=dla, quantize_options=quantize_options, **kwargs)


def _export_quantized(model_name_or_cfg, out, *, target, precision, overwrite: bool, progress, dla: bool,
                      quantize_options: Mapping[str, Any] | None, **kwargs: Any) -> Path:
    """Quantized recipes: an fp32 export (parity-checked against PyTorch; no memory check: it is never built on the
    device) into a scratch directory beside ``out``, then ``quantize_bundle`` (calibrated on the embedded set,
    quantization report in the manifest; for TensorRT targets it writes the engine build plan for the quantized
    graphs, with ``trt_plan_options={"use_dla": dla}``) into ``out``, then the memory plan of the quantized bundle
    from its manifest (``check_fits`` on TensorRT targets). Each step writes atomically; a failure anywhere leaves
    nothing at ``out``."""
    from edgevlm.bundle import update_manifest
    from edgevlm.quant.apply import quantize_bundle

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"'{out}' already exists; pass overwrite=True (--overwrite) or choose another --out")
    tgt = target
    if dla:
        X.check_dla_request(tgt, tgt.recipe(precision))
    # the memory check is for the quantized bundle: the fp32 intermediate is never built on the device
    cfg = model_name_or_cfg if isinstance(model_name_or_cfg, ModelConfig) else getattr(kwargs.get("model"), "cfg", None)
    if cfg is None and isinstance(model_name_or_cfg, str):
        cfg = get_model_config(model_name_or_cfg)
    if cfg is not None:
        X.memory_plan(cfg, tgt, _RecipeView(tgt.recipe(precision)))
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.parent))
    stages = X._Stages(progress)
    options = dict(quantize_options or {})
    if tgt.is_tensorrt:
        options.setdefault("trt_plan_options", {"use_dla": bool(dla)})
    try:
        fp32 = X.export_bundle(model_name_or_cfg, scratch / "fp32", target=tgt.name, precision="fp32",
                               overwrite=False, progress=progress, check_memory=False, **kwargs)
        X.release_memory()                     # the PyTorch model is gone: hand its pages back before quantizing
        stages.run("quantize", lambda: quantize_bundle(fp32, out, precision, target=tgt.name, overwrite=overwrite,
                                                       **options))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        from edgevlm.planner import check_fits, plan_memory_from_manifest

        def record(m: dict[str, Any]) -> None:
            plan = plan_memory_from_manifest(m, target=tgt, suggest=True)
            if tgt.is_tensorrt:
                check_fits(plan)
            m["memory_plan"] = plan.to_dict()

        update_manifest(out, record)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


class _RecipeView:
    """The bit of ``ExportRecipe`` that ``memory_plan`` reads, for a quantized bundle's recipe."""

    def __init__(self, components: dict[str, str]) -> None:
        self.components = components


def quantize_bundle(src: str | os.PathLike, out: str | os.PathLike, precision: Mapping[str, str] | str,
                    **kwargs: Any) -> Path:
    """``edgevlm.quant.apply.quantize_bundle``: a float32 bundle -> a quantized bundle (``edgevlm quantize``)."""
    from edgevlm.quant.apply import quantize_bundle as q

    return q(src, out, precision, **kwargs)


__all__ = ["export_bundle", "quantize_bundle", "float_hooks"]
