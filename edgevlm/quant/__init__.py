"""Quantization and calibration: per-component precision recipes applied to the exported ONNX graphs with ONNX
Runtime's quantizers, calibrated on real activations, with a measured accuracy report.

    >>> from edgevlm.quant import plan_quantization, apply_precision, quantize_bundle, task_accuracy
    >>> plan = plan_quantization("int4", "cpu")                  # int8 vision (static QDQ) + int4 decoder (MatMulNBits)
    >>> quantize_bundle("bundles/demo-fp32", "bundles/demo-int4", "int4", target="cpu")   # from a finished fp32 bundle

Modules: ``recipes`` (what each precision means per component and target, the rules), ``calibration`` (calibration
sources and ``CalibrationDataReader``s feeding real activations), ``apply`` (``apply_precision``: quantize a bundle's
graphs in place during export), ``int4_qdq`` (blocked INT4 weight-only Q/DQ as TensorRT takes it: positive scales
amax/7, whole blocks of 64/128), ``fp16`` (fp16 conversion that keeps the norm/softmax islands fp32), ``report`` (error against fp32 on held-out inputs, exact match, teacher-forced
agreement). The calibration set is defined in ``calibration/embedded.toml`` (see ``calibration/README.md``).
"""

from edgevlm.quant.recipes import (CALIB_METHODS, INT4_FORMATS, INT8_DECODER_MODES, ComponentRecipe, QuantPlan,
                                   plan_quantization, recipe_table, tolerances_for)


def __getattr__(name: str):
    # onnxruntime-heavy modules load on first use
    if name in ("apply_precision", "quantize_bundle"):
        from edgevlm.quant import apply

        return getattr(apply, name)
    if name in ("task_accuracy", "teacher_forced_agreement", "print_report", "report_table"):
        from edgevlm.quant import report

        return getattr(report, name)
    if name in ("calibration_set", "calibration_items", "CalibrationSpec", "VisionCalibrationReader",
                "DecoderCalibrationReader", "BundleContext"):
        from edgevlm.quant import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'edgevlm.quant' has no attribute '{name}'")


__all__ = ["plan_quantization", "recipe_table", "tolerances_for", "QuantPlan", "ComponentRecipe", "CALIB_METHODS",
           "INT4_FORMATS", "INT8_DECODER_MODES", "apply_precision", "quantize_bundle", "task_accuracy",
           "teacher_forced_agreement", "print_report", "report_table", "calibration_set", "calibration_items",
           "CalibrationSpec", "VisionCalibrationReader", "DecoderCalibrationReader", "BundleContext"]
