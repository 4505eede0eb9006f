"""Every precision edgevlm knows, defined once: names, presets, which stage writes each, storage and parity limits.

The export stage (``edgevlm.exporter``: float graphs), the quantization stage (``edgevlm.quant``: bundle -> bundle),
the targets (``edgevlm.targets``: which precisions a device supports and its default recipe), the memory planner
and the CLI all read this module; nothing else defines a precision. No torch, no onnx.

==========  ===============  ===================================================================================
precision   written by       what it is
==========  ===============  ===================================================================================
fp32        export           as exported from PyTorch (float32)
fp16        export hook      float16 weights and compute, float32 graph I/O, the fp32 islands kept fp32
                             (``edgevlm.quant.fp16``, passed to the exporter by ``edgevlm.pipeline``)
bf16        (none)           recognised in target profiles, not written (use fp16)
fp8         (none)           Ada/Hopper TensorRT targets only, not written (use int8 or fp16)
int8        quantize         vision: static QDQ; decoder: MatMulNBits 8-bit (CPU) or W8A8 QDQ (TensorRT)
int4        quantize         decoder matmuls: MatMulNBits 4-bit (CPU) or blocked INT4 DequantizeLinear (TensorRT)
==========  ===============  ===================================================================================

A recipe assigns a precision to each of ``COMPONENTS``; a preset (``PRECISION_PRESETS``) is a named recipe, and a
spec like ``"int4,vision=fp16"`` overrides components of one (parsed by ``edgevlm.targets``). The per-component
*methods* (which ONNX Runtime tool runs on which target) are in ``edgevlm.quant.recipes``.

    >>> from edgevlm.precisions import PRECISION_PRESETS, is_quantized, tolerances_for
    >>> is_quantized(PRECISION_PRESETS["int4"]), tolerances_for(PRECISION_PRESETS["int4"]).logits.max_abs
    (True, 2.0)
"""

from __future__ import annotations

from typing import Mapping

from edgevlm.graphs.spec import FP16_TOLERANCES, FP32_TOLERANCES, ParityTolerances, Tolerance

#: every precision name a target profile or a recipe may use
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")

#: Components a precision recipe assigns: the vision graph (tower + projector), the token-embedding table, the
#: decoder layers and the LM head (part of the decoder graph, but often kept at a different precision).
COMPONENTS = ("vision", "embedding", "decoder", "lm_head")

#: precisions the quantization stage writes (bundle -> bundle, ``edgevlm quantize``)
QUANTIZED = ("int8", "int4", "fp8")

#: How the token-embedding table is stored per embedding precision (the runtime gathers rows from a ``.npy``).
EMBED_DTYPES = {"fp32": "float32", "fp16": "float16"}

#: One-line descriptions (``edgevlm export --help``, the manifest's recipe entry).
DESCRIPTIONS = {
    "fp32": "as exported (float32)",
    "fp16": "float16 weights and compute, float32 graph I/O (keep_io_types), norms and softmax kept fp32",
    "bf16": "bfloat16 (recognised in target profiles; not written: use fp16)",
    "fp8": "FP8 E4M3 (Ada/Hopper TensorRT; not written: use int8 or fp16)",
    "int8": "8-bit: static QDQ (vision, TensorRT decoders) or weight-only MatMulNBits (CPU decoders)",
    "int4": "4-bit weight-only decoder matmuls (MatMulNBits on CPU, blocked INT4 DequantizeLinear on TensorRT)",
}

# Precision presets. int8/int4 keep the embedding table in fp16: it is gathered (a few rows per token), never
# multiplied, so quantizing it saves memory but no time, and TensorRT has no blocked-quantized Gather.
# The int4 preset keeps the LM head 8-bit: an int4 head flips the top-1 token wherever the model hesitates
# (teacher-forced agreement with fp32 75 % vs 99.8 % with an 8-bit head on a weakly trained demo model; see
# edgevlm/quant/recipes.py). Override with "int4,lm_head=int4".
PRECISION_PRESETS: dict[str, dict[str, str]] = {
    "fp32": {"vision": "fp32", "embedding": "fp32", "decoder": "fp32", "lm_head": "fp32"},
    "fp16": {"vision": "fp16", "embedding": "fp16", "decoder": "fp16", "lm_head": "fp16"},
    "int8": {"vision": "int8", "embedding": "fp16", "decoder": "int8", "lm_head": "int8"},
    "int4": {"vision": "int8", "embedding": "fp16", "decoder": "int4", "lm_head": "int8"},
}
PRESET_ORDER = ("fp32", "fp16", "int8", "int4")   # largest to smallest weights
# The presets as TensorRT targets resolve them. TensorRT's weight-only quantization is INT4 only (no weight-only
# INT8), so the int4 preset's LM head stays float there and runs fp16 (fp16 tensor types on TensorRT >= 11, the
# --fp16 builder flag on 10.x): as close to fp32 as the 8-bit head of the CPU recipe. An explicit "lm_head=int8" on
# a TensorRT target is W8A8 static QDQ of the head (edgevlm/quant/recipes.py).
TENSORRT_PRESETS: dict[str, dict[str, str]] = {
    **PRECISION_PRESETS,
    "int4": {**PRECISION_PRESETS["int4"], "lm_head": "fp16"},
}

#: Precisions of the ONNX Runtime GroupQueryAttention decoder builder (``edgevlm.exporter.ort_decoder``): the
#: decoder body and its LM head.
ORT_BUILDER_PRECISIONS = ("int4", "int8", "fp32")

#: TensorRT 10.x (weakly typed) builder flags a component precision needs (fp16 for the layers Q/DQ leaves float),
#: and the ``tensorrt.BuilderFlag`` member of each flag. TensorRT 11 builds strongly typed: no precision flags.
TENSORRT_WEAK_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (), "fp16": ("fp16",), "bf16": ("bf16",), "int8": ("fp16", "int8"), "int4": ("fp16", "int4"),
    "fp8": ("fp16", "fp8")}
TENSORRT_FLAG_ORDER = ("fp16", "bf16", "int8", "int4", "fp8")
TENSORRT_BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int4": "INT4", "fp8": "FP8"}
#: precisions a Jetson DLA core runs (TensorRT developer guide, Working with DLA)
DLA_PRECISIONS = ("fp16", "int8")

# ---- parity tolerances (against PyTorch, on random inputs) ------------------------------------------------------
# Measured on the parity inputs: tiny-ldpnetv2 / demo random init: int8 vision cosine 0.9989, int8 decoder logits
# cosine >= 0.998, int4 decoder logits cosine >= 0.970; trained demo: int8 vision cosine 0.994 with max |diff| at 0.25
# of the limit below, int8 (W8A8) decoder presents cosine 0.991 at 0.30 of the limit, int4 decoder presents cosine
# 0.996 at 0.36 of the limit. The export's parity check feeds *random* inputs (unit-scale noise pixels /
# embeddings) and compares with PyTorch; quantized graphs are calibrated on real activations, so noise inputs sit
# partly outside the calibrated ranges. The limits below are loose guards (NaN, a wrong graph, a broken KV path);
# the accuracy that matters is measured on real held-out inputs by ``edgevlm.quant.report`` and stored in
# manifest["quantization"]. fp32 / fp16: ``edgevlm.graphs.spec`` (kernel summation order; fp16 rounding).
INT8_VISION_TOLERANCE = Tolerance(1.0, relative=True, min_cosine=0.95)
INT8_LOGITS_TOLERANCE = Tolerance(1.0, relative=True, min_cosine=0.95)
INT4_LOGITS_TOLERANCE = Tolerance(2.0, relative=True, min_cosine=0.90)
INT8_KV_TOLERANCE = Tolerance(1.0, relative=True, min_cosine=0.95)
INT4_KV_TOLERANCE = Tolerance(2.0, relative=True, min_cosine=0.95)

#: Uniform-precision parity limits per precision (vision, logits, KV).
TOLERANCES: dict[str, ParityTolerances] = {
    "fp32": FP32_TOLERANCES,
    "fp16": FP16_TOLERANCES,
    "int8": ParityTolerances(vision=INT8_VISION_TOLERANCE, logits=INT8_LOGITS_TOLERANCE, kv=INT8_KV_TOLERANCE),
    "int4": ParityTolerances(vision=INT8_VISION_TOLERANCE, logits=INT4_LOGITS_TOLERANCE, kv=INT4_KV_TOLERANCE),
}
_ORDER = ("fp32", "fp16", "int8", "int4")             # loosest last


def is_quantized(components: Mapping[str, str]) -> bool:
    """Whether a resolved recipe needs the quantization stage (any graph component int8 / int4 / fp8)."""
    return any(p in QUANTIZED for c, p in components.items() if c != "embedding")


def tolerances_for(components: Mapping[str, str]) -> ParityTolerances:
    """Parity tolerances for a resolved recipe: the loosest of each graph's parts (vision: its own precision;
    logits and KV: the decoder's or its LM head's, whichever is looser)."""
    v, dec, head = components.get("vision", "fp32"), components.get("decoder", "fp32"), components.get("lm_head")
    vision = TOLERANCES.get(v, TOLERANCES["int8"]).vision
    worst = max((p for p in (dec, head) if p in _ORDER), key=_ORDER.index, default="fp32")
    return ParityTolerances(vision=vision, logits=TOLERANCES[worst].logits, kv=TOLERANCES[worst].kv)


def presets_for(tensorrt: bool) -> dict[str, dict[str, str]]:
    """The preset table a target resolves names with: ``TENSORRT_PRESETS`` on TensorRT targets, else
    ``PRECISION_PRESETS``."""
    return TENSORRT_PRESETS if tensorrt else PRECISION_PRESETS


__all__ = ["PRECISIONS", "COMPONENTS", "QUANTIZED", "EMBED_DTYPES", "DESCRIPTIONS", "PRECISION_PRESETS",
           "PRESET_ORDER", "TENSORRT_PRESETS", "ORT_BUILDER_PRECISIONS", "TENSORRT_WEAK_FLAGS", "TENSORRT_FLAG_ORDER",
           "TENSORRT_BUILDER_FLAGS", "DLA_PRECISIONS", "TOLERANCES", "is_quantized",
           "tolerances_for", "presets_for", "INT8_VISION_TOLERANCE", "INT8_LOGITS_TOLERANCE", "INT4_LOGITS_TOLERANCE",
           "INT8_KV_TOLERANCE", "INT4_KV_TOLERANCE"]
