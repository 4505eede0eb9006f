"""Per-component precision recipes: what ``--precision`` means for each graph on each kind of target.

A precision spec (``fp32``, ``fp16``, ``int8``, ``int4`` or ``"int4,vision=fp16"``, see ``edgevlm.targets``) is
resolved to ``{vision, embedding, decoder, lm_head} -> precision`` and then, per component, to a *method* that
``edgevlm.quant.apply`` runs with ONNX Runtime's tools, or edgevlm's own where none writes what TensorRT accepts
(the blocked INT4 weights, ``edgevlm.quant.int4_qdq``; the fp32 islands of fp16 graphs, ``edgevlm.quant.fp16``):

==========  ===========  ===============================================================================================
component   precision    method (ORT CPU target | TensorRT target)
==========  ===========  ===============================================================================================
vision      fp32         as exported
vision      fp16         ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` (GPU only)
                         with the fp32 islands (LayerNorm, Softmax: ``precision_islands``) kept fp32 in the graph
vision      int8         CPU: dynamic (``quantize_dynamic``: per-channel int8 MatMul/Gemm weights, activation scales
                         computed per tensor at run time -> DynamicQuantizeMatMul; no calibration; see
                         ``INT8_VISION_MODES``); TensorRT (or ``int8_vision="static"``): static QDQ
                         (``quant_pre_process`` then ``quantize_static``, QuantFormat.QDQ, QInt8/QInt8,
                         ActivationSymmetric + WeightSymmetric, per-channel weights, minmax|entropy|percentile
                         calibration on real preprocessed images; weight-bearing Conv/MatMul/Gemm only). Both: 7-bit
                         weights (``reduce_range``) on x86 CPU targets without VNNI (``int8_reduce_range``)
vision      int4         refused: int4 weight-only is for decoder matmuls
decoder     fp16         ``convert_float_to_float16(keep_io_types=True)`` (GPU targets; KV and logits stay float32),
                         RMSNorm chains and Softmax kept fp32 in the graph (fp16 overflows x**2 for |x| > 256)
decoder     int8         CPU: weight-only ``MatMulNBitsQuantizer(bits=8)`` -> ``com.microsoft::MatMulNBits``
                         (or ``quantize_dynamic`` with ``int8_decoder="dynamic"``);
                         TensorRT: W8A8 static QDQ (``quantize_static``, symmetric, per-channel) calibrated on real
                         prefill + decode activations, the LM head included (TensorRT rejects MatMulInteger,
                         DynamicQuantizeLinear and contrib ops)
decoder     int4         CPU: ``MatMulNBitsQuantizer(bits=4, block 128, symmetric, accuracy_level 4)`` -> MatMulNBits;
                         TensorRT: ``edgevlm.quant.int4_qdq`` -> blocked INT4 ``DequantizeLinear(axis=0,
                         block_size 64|128, scale = amax/7 > 0, no zero point)`` -> ``MatMul`` (opset 21). ORT's
                         QDQ mode writes negative scales, which TensorRT's parser refuses
lm_head     fp16         TensorRT, under an int4/int8 decoder (the int4 preset on TensorRT targets,
                         ``edgevlm.targets.TENSORRT_PRESETS``): float weights, run fp16 (fp16 tensor types on
                         TensorRT >= 11, the ``--fp16`` builder flag on TensorRT 10). TensorRT has no weight-only
                         INT8 (its weight-only quantization is INT4 only)
lm_head     int8         the decoder graph's last MatMul. Under an int4 decoder (``int4,lm_head=int8``; the int4 preset
                         on CPU targets): CPU: ``MatMulNBits`` bits=8; Q/DQ graphs (TensorRT): W8A8 static QDQ of the
                         head node alone (``quantize_static(nodes_to_quantize=[head])``, calibrated like the W8A8
                         decoder). Under a W8A8 decoder the head is quantized like the rest
lm_head     int4 / fp32  like the decoder's other matmuls / kept unquantized (and fp32 in fp16 graphs)
embedding   fp32|fp16    a ``.npy`` table the runtime gathers from (int8/int4 presets store it fp16)
==========  ===========  ===============================================================================================

TensorRT >= 11 builds strongly typed (no ``--fp16``): the ONNX dtypes are the precision, so a Q/DQ graph of float32
tensors would run float32 between its quantized layers (W4A32). There, int8/int4 graphs are converted to fp16 tensor
types after quantization (``convert_float_to_float16``, graph I/O float32, DequantizeLinear scales fp16 so the
dequantized weights are fp16, the fp32 islands kept fp32). On TensorRT 10 (weakly typed) the graphs stay float32 and
the builder flags pick fp16 for the float layers; the build plan pins the islands to fp32. Each graph's recipe
records the result in ``layer_precisions`` (layer class -> precision).

Why the LM head stays 8-bit on CPU: see the note above ``INT4_BLOCK_SIZE`` below (measured on the trained demo).

Rules on top of ``Target.recipe()`` (every violation raises a typed error whose message names the fix):
fp8 needs an Ada/Hopper GPU (and is not implemented here: use int8/fp16); bf16 is not implemented (use fp16);
fp16 is refused on CPU targets; int4 is refused for the vision tower; MatMulNBits (``int4_format="matmulnbits"``,
``int8_decoder="weight-only"``) and ``quantize_dynamic`` are refused on TensorRT targets; INT4 block sizes other
than 64 and 128 are refused on TensorRT targets.

    >>> from edgevlm.quant.recipes import plan_quantization
    >>> plan = plan_quantization("int4", "jetson-orin")
    >>> plan.decoder.method, plan.decoder.params["quant_format"], plan.components["lm_head"]
    ('int4-qdq', 'QDQ', 'fp16')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from edgevlm.errors import ConfigError, QuantizationError, TargetError
from edgevlm.graphs import spec as S
from edgevlm.precisions import tolerances_for

#: Calibration methods of ``quantize_static`` (``--calib-method``).
CALIB_METHODS = ("minmax", "entropy", "percentile")
#: How an int8 decoder is quantized: weight-only MatMulNBits (CPU), quantize_dynamic (CPU), W8A8 static QDQ (any).
INT8_DECODER_MODES = ("weight-only", "dynamic", "qdq")
#: How an int8 vision tower is quantized on ONNX Runtime CPU targets (``int8_vision``; ``auto``: ``dynamic`` on CPU,
#: ``static`` on TensorRT, which rejects DynamicQuantizeLinear / MatMulInteger). ``dynamic`` is the CPU default:
#: measured on mobilevlm-1.7b's CLIP-L/336 + LDP graph (benchmarks/results/vision_int8_mobilevlm-1.7b.json: idle
#: AMD EPYC Zen 4, 2 threads, ORT 1.32, 8 held-out images): fp32 2145 ms, static QDQ 1637 ms, dynamic 712 ms per
#: image (73 % of the tower's FLOPs at the int8 DynamicQuantizeMatMul rate measured in the same run); cosine against
#: fp32 min 0.9979 (static, 32 calibration images) vs 0.9998 (dynamic); quantizing took 17 s at 3.7 GiB peak
#: (dynamic) vs 107 s at 8.0 GiB (static: pre-processing, 32 calibration passes through an unoptimized augmented
#: graph, then the QDQ pass). Per-tensor static activation ranges have to cover every image; dynamic scales fit each
#: image. (``python benchmarks/vision_int8.py --bundle FP32_BUNDLE`` re-measures this on any bundle.)
INT8_VISION_MODES = ("dynamic", "static")
#: Output form of int4 weight-only quantization: contrib MatMulNBits (ORT) or blocked INT4 DequantizeLinear (TensorRT).
INT4_FORMATS = ("matmulnbits", "qdq")

#: The LM head is where quantization error shows first: it maps the last hidden state to logits, and wherever the
#: model hesitates between answers (near-tied logits) any error flips the top-1 token. Measured with
#: benchmarks/quant_accuracy.py (teacher-forced top-1 agreement with fp32 over the test split): on a weakly trained
#: demo model (41 % exact match, many near ties) an int4 LM head kept 75 % agreement, a W8A8 static-QDQ head
#: (per-tensor int8 activations) 64 %, a MatMulNBits 8-bit head and a weight-only per-channel INT8 DQ head 99.8 %;
#: on the demo as trained by configs/train/demo.toml (98.4 % exact match, decisive logits) the 8-bit head agrees
#: 100 % and the int4 head 99.91 % (block 128; benchmarks/results/quant_demo.json). An 8-bit head costs ~2 % of the
#: demo bundle (~3 % of a 1.7B int4 bundle) and removes the failure mode, so the int4 recipe runs with
#: ``lm_head=int8`` on CPU targets (``edgevlm.targets.PRECISION_PRESETS["int4"]``;
#: ``"int4,lm_head=int4"`` for the smallest bundle). TensorRT has no weight-only INT8 (its weight-only mode is INT4),
#: so on TensorRT targets the int4 preset keeps the head float, run fp16 (``edgevlm.targets.TENSORRT_PRESETS``;
#: fp16 is as close to fp32 as the 8-bit head); an explicit ``lm_head=int8`` there is W8A8 static QDQ.
#: Block size 32 vs 64/128 and accuracy_level 4 vs 0 changed no accuracy figure.
#: Defaults of the int4 weight-only recipe (measured on the demo model: benchmarks/results/quant_demo.json).
#: Block 128 rather than 32 (onnxruntime-genai's and llama.cpp Q4_0's): measured with ORT 1.32 MatMulNBits
#: (accuracy_level 4, 2 threads, 16 matmuls of 2048 x 5632): decode GEMV 7.00 -> 4.79 ms, 128-token prefill
#: 180 -> 120 ms, i.e. 1.5x on the decoder's dominant operator; ModelOpt AWQ (TensorRT) uses 128 too. The demo's
#: accuracy and agreement do not change (benchmarks/results/quant_demo.json); override with ``block_size=32``.
INT4_BLOCK_SIZE = 128
#: Block sizes TensorRT's INT4 weight-only quantization supports ("Quantization Schemes": {64, 128}).
TENSORRT_INT4_BLOCK_SIZES = (64, 128)
INT4_ACCURACY_LEVEL = 4          # MatMulNBits: int8 activations inside the kernel (fastest on x86/ARM CPUs)
INT8_BLOCK_SIZE = 128            # MatMulNBits bits=8 (weight-only int8 on ORT CPU; LM head GEMV 1.81 -> 1.54 ms)
WEIGHT_OPS_VISION = ("Conv", "MatMul", "Gemm")
WEIGHT_OPS_DECODER = ("MatMul", "Gemm")
#: quantize_dynamic's op types (its ConvInteger is slower than float Conv on ORT CPU; the vision tower's convs are
#: the patch embedding and the LDP projector's, a small share of its FLOPs).
WEIGHT_OPS_DYNAMIC = ("MatMul", "Gemm")

# Parity tolerances after quantization: ``edgevlm.precisions`` (TOLERANCES, tolerances_for).


@dataclass(frozen=True)
class ComponentRecipe:
    """How one graph is brought to its precision. ``params`` are the arguments passed to ORT's tool."""

    component: str                   # "vision" | "decoder"
    precision: str                   # fp32 | fp16 | int8 | int4
    method: str                      # none | fp16-cast | static-qdq | matmulnbits-int8 | matmulnbits-int4 | int4-qdq
                                     # | dynamic
    params: Mapping[str, Any] = field(default_factory=dict)
    lm_head: str | None = None       # decoder only: precision of the LM head MatMul
    description: str = ""
    float_types: str = "fp32"        # dtype of the graph's float tensors: fp16 for fp16-cast, and for Q/DQ graphs on
                                     # TensorRT >= 11 (strongly typed: converted after quantization)
    builder_mode: str | None = None  # TensorRT builder mode of the target (weak | strong), None on CPU targets

    @property
    def needs_calibration(self) -> bool:
        return self.method == "static-qdq" or self.lm_head_method == "static-qdq"

    @property
    def fp16_after_quantization(self) -> bool:
        """Whether the quantized graph's float parts are converted to fp16 tensor types (TensorRT >= 11)."""
        return self.float_types == "fp16" and self.method not in ("none", "fp16-cast")

    @property
    def lm_head_method(self) -> str | None:
        """How the LM head is brought to its precision when it is not quantized like the rest of the decoder
        (None: like the decoder). ``none``: unquantized, float32 (kept fp32 in fp16 graphs too); ``fp16``:
        unquantized, run fp16 (TensorRT: fp16 tensor types on >= 11, the --fp16 builder flag on 10.x);
        ``static-qdq``: W8A8 static QDQ of the head node (Q/DQ graphs under an int4 decoder);
        ``matmulnbits-int8``: MatMulNBits 8-bit (ORT graphs)."""
        if self.component != "decoder":
            return None
        head = self.lm_head or self.precision
        if head == self.precision:
            return None
        if head == "fp32":
            return "none"
        if head == "fp16":
            return "fp16"
        if head == "int8" and self.method == "int4-qdq":
            return "static-qdq"
        return "matmulnbits-int8"

    @property
    def uses_contrib_ops(self) -> bool:
        return self.method == "matmulnbits-int8" or (self.method == "matmulnbits-int4"
                                                    and self.params.get("quant_format") == "QOperator") \
            or self.lm_head_method == "matmulnbits-int8"

    def layer_precisions(self) -> dict[str, str]:
        """Layer class -> the precision it runs in on the target (``matmul_weights``, ``matmul_activations`` (W8A8
        only), ``matmul_compute``, ``lm_head`` (decoder), ``norms``, ``softmax``, ``other``). On TensorRT 10 (weakly
        typed) the float layers are the builder's choice under ``--fp16``, the norms/softmax pinned to fp32 by the
        build plan's per-layer constraints; on TensorRT >= 11 the graph's tensor types say it."""
        weak = self.builder_mode == "weak"
        if self.float_types == "fp16":
            flt = "fp16"
            island = "fp32 (kept fp32 in the graph" + ("; per-layer constraint in the build plan)" if weak else ")")
        elif weak and self.method != "none":
            flt, island = "fp16 (builder flag)", "fp32 (per-layer constraint in the build plan)"
        else:
            flt, island = "fp32", "fp32"
        m, p = self.method, self.params
        out: dict[str, str] = {}
        if m == "none":
            out.update(matmul_weights="fp32", matmul_compute="fp32")
        elif m == "fp16-cast":
            out.update(matmul_weights="fp16", matmul_compute="fp16")
        elif m == "static-qdq":
            out.update(matmul_weights="int8", matmul_activations="int8", matmul_compute="int8")
        elif m == "int4-qdq":
            out.update(matmul_weights="int4", matmul_compute=flt)
        elif m in ("matmulnbits-int4", "matmulnbits-int8"):
            level = p.get("accuracy_level")
            out.update(matmul_weights="int4" if m.endswith("int4") else "int8",
                       matmul_compute="int8 activations (MatMulNBits accuracy_level 4)" if level == 4 else "fp32")
        elif m == "dynamic":
            out.update(matmul_weights="int8", matmul_activations="int8 (dynamic per-token scales)",
                       matmul_compute="int8")
        if self.component == "decoder":
            hm = self.lm_head_method
            if hm is None:
                out["lm_head"] = "like the other matmuls"
            elif hm == "none":
                out["lm_head"] = "fp32" + (" (kept fp32 in the graph)" if self.float_types == "fp16" else "") \
                    + (" (the --fp16 builder flag lets TensorRT choose)" if weak else "")
            elif hm == "fp16":
                out["lm_head"] = "fp16 (builder flag)" if weak else "fp16"
            elif hm == "static-qdq":
                out["lm_head"] = "int8 weights and activations (W8A8)"
            else:
                out["lm_head"] = "int8 weights (MatMulNBits)"
        out.update(norms=island, softmax=island, other=flt)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "method": self.method, "description": self.description,
                             **copy.deepcopy(dict(self.params)), "float_types": self.float_types}
        if self.component == "decoder":
            d["lm_head"] = self.lm_head or self.precision
            if self.lm_head_method:
                d["lm_head_method"] = self.lm_head_method
        d["layer_precisions"] = self.layer_precisions()
        return d


@dataclass(frozen=True)
class QuantPlan:
    """The resolved recipe for one export: per-component precisions, methods, target facts, parity tolerances."""

    components: dict[str, str]       # {vision, embedding, decoder, lm_head} -> precision
    vision: ComponentRecipe
    decoder: ComponentRecipe
    embed_dtype: str                 # float32 | float16
    target: str                      # target label
    backend: str                     # tensorrt | onnxruntime-cpu
    tensorrt: str | None
    calib_method: str

    @property
    def name(self) -> str:
        from edgevlm.targets import recipe_name

        return recipe_name(self.components, tensorrt=self.backend == "tensorrt")

    @property
    def needs_calibration(self) -> bool:
        return self.vision.needs_calibration or self.decoder.needs_calibration

    @property
    def is_noop(self) -> bool:
        return self.vision.method == "none" and self.decoder.method == "none" and self.decoder.lm_head_method is None

    def recipe(self, component: str) -> ComponentRecipe:
        if component not in ("vision", "decoder"):
            raise ConfigError(f"no graph recipe for component '{component}'; graphs: vision, decoder")
        return self.vision if component == "vision" else self.decoder

    def tolerances(self) -> S.ParityTolerances:
        """Parity tolerances (against PyTorch, random inputs) for the quantized graphs."""
        return tolerances_for(self.components)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "components": dict(self.components), "embed_dtype": self.embed_dtype,
                "target": self.target, "backend": self.backend, "tensorrt": self.tensorrt,
                "calib_method": self.calib_method, "vision": self.vision.to_dict(), "decoder": self.decoder.to_dict()}


def _resolve(precision: str | Mapping[str, str] | None, target) -> dict[str, str]:
    from edgevlm.targets import _resolve_recipe   # same package family; the parser behind Target.recipe()

    return _resolve_recipe(precision, target.default_recipe, tensorrt=target.is_tensorrt)


def _check_rules(comps: Mapping[str, str], target) -> None:
    """edgevlm's own rules, checked before the target's precision list so that the message names the fix."""
    what = ", ".join(f"{c}={p}" for c, p in comps.items())
    if comps.get("vision") == "int4":
        raise QuantizationError("int4 weight-only is for decoder matmuls; use int8 or fp16 for vision (e.g. "
                                "--precision int4,vision=int8, the int4 preset's default)")
    fp8 = [c for c, p in comps.items() if p == "fp8"]
    if fp8:
        if "fp8" not in target.precisions:
            cc = f" (compute capability {target.compute_capability})" if target.compute_capability else ""
            raise TargetError(f"fp8 for {', '.join(fp8)} needs an Ada/Hopper GPU (compute capability >= 8.9); "
                              f"target '{target.name}'{cc} has no fp8: use int8 (W8A8 QDQ) or fp16 instead "
                              f"(--precision int8 or fp16)")
        raise QuantizationError(f"fp8 ({', '.join(fp8)}) is not implemented by edgevlm's quantizer yet; use int8 "
                                f"(W8A8 QDQ) or fp16 on '{target.name}', or quantize to fp8 with NVIDIA ModelOpt")
    bf16 = [c for c, p in comps.items() if p == "bf16"]
    if bf16:
        raise QuantizationError(f"bf16 ({', '.join(bf16)}) is not implemented by edgevlm's exporter; use fp16 "
                                f"(same memory, TensorRT runs both) or fp32")
    if target.kind == "cpu":
        fp16 = [c for c, p in comps.items() if p == "fp16" and c != "embedding"]
        if fp16:
            raise TargetError(f"fp16 for {', '.join(fp16)} on CPU target '{target.name}': ONNX Runtime's CPU "
                              f"provider lacks fp16 kernels for most ops (it inserts casts and runs slower than "
                              f"fp32); use fp32, int8 or int4 on CPU targets (e.g. --precision int8), or pick a "
                              f"GPU/Jetson target for fp16")
    if comps.get("embedding") not in ("fp32", "fp16"):
        raise QuantizationError(f"embedding={comps.get('embedding')}: the embedding table is gathered (a few rows "
                                f"per token), not multiplied, and is stored fp16 or fp32; use embedding=fp16")
    dec, head = comps.get("decoder"), comps.get("lm_head", comps.get("decoder"))
    allowed = {dec, "fp32"} | ({"int8"} if dec == "int4" else set()) \
        | ({"fp16"} if target.is_tensorrt and dec in ("int8", "int4") else set())
    if head not in allowed:
        raise QuantizationError(f"lm_head={head} with decoder={dec} ({what}): the LM head is the decoder graph's last "
                                f"MatMul; it can follow the decoder, stay fp32, be int8 under an int4 decoder "
                                f"(--precision int4,lm_head=int8) or, on TensorRT targets, fp16 under an int8/int4 "
                                f"decoder")


def plan_quantization(precision: str | Mapping[str, str] | None, target=None, *, calib_method: str = "minmax",
                      int8_decoder: str = "auto", int8_vision: str = "auto", int4_format: str = "auto",
                      block_size: int = INT4_BLOCK_SIZE,
                      accuracy_level: int = INT4_ACCURACY_LEVEL, per_channel: bool = True) -> QuantPlan:
    """Resolve ``precision`` for ``target`` into a ``QuantPlan``.

    Args:
        precision: preset name, ``"int4,vision=fp16"`` or a dict (see ``edgevlm.targets.Target.recipe``).
        target: a ``Target`` or a target name (default: ``cpu``).
        calib_method: ``minmax`` | ``entropy`` | ``percentile`` (static QDQ calibration, ``--calib-method``).
        int8_decoder: ``auto`` (CPU: weight-only MatMulNBits 8-bit; TensorRT: W8A8 QDQ), ``weight-only``,
            ``dynamic`` (``quantize_dynamic``; ORT CPU only) or ``qdq``.
        int8_vision: ``auto`` (CPU: ``dynamic``; TensorRT: ``static``), ``dynamic`` (``quantize_dynamic``; ORT CPU
            only) or ``static`` (calibrated static QDQ).
        int4_format: ``auto`` (CPU: ``matmulnbits``; TensorRT: ``qdq``), ``matmulnbits`` or ``qdq``.
        block_size: int4 (and 8-bit weight-only) block size along K (a power of two >= 16).
        accuracy_level: MatMulNBits ``accuracy_level`` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute).
        per_channel: per-channel weight scales for static QDQ.
    """
    from edgevlm.targets import get_target

    tgt = get_target(target if target is not None else "cpu")
    if calib_method not in CALIB_METHODS:
        raise QuantizationError(f"calibration method '{calib_method}' unknown; use one of {', '.join(CALIB_METHODS)} "
                                f"(--calib-method)")
    if int8_decoder not in ("auto", *INT8_DECODER_MODES):
        raise QuantizationError(f"int8 decoder mode '{int8_decoder}' unknown; use auto, "
                                f"{', '.join(INT8_DECODER_MODES)}")
    if int8_vision not in ("auto", *INT8_VISION_MODES):
        raise QuantizationError(f"int8 vision mode '{int8_vision}' unknown; use auto, {', '.join(INT8_VISION_MODES)}")
    if int4_format not in ("auto", *INT4_FORMATS):
        raise QuantizationError(f"int4 format '{int4_format}' unknown; use auto, {', '.join(INT4_FORMATS)}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"block size {block_size} unsupported: int4 blocks must be a power of two >= 16 "
                                f"(e.g. {INT4_BLOCK_SIZE}, the default, 64 or 32; TensorRT targets: "
                                f"{' or '.join(map(str, TENSORRT_INT4_BLOCK_SIZES))})")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizationError(f"accuracy_level {accuracy_level} unknown; use 0 (unset), 1 (fp32), 2 (fp16), "
                                f"3 (bf16) or 4 (int8 compute, the default)")
    comps = _resolve(precision, tgt)                   # ConfigError for unknown names
    _check_rules(comps, tgt)
    comps = tgt.recipe(comps)                          # the target's precision list (TargetError naming it)
    trt = tgt.is_tensorrt
    if trt and int8_decoder in ("weight-only", "dynamic") and "int8" in (comps["decoder"], comps["lm_head"]):
        why = ("MatMulNBits is a com.microsoft contrib op that only ONNX Runtime runs"
               if int8_decoder == "weight-only" else
               "quantize_dynamic emits DynamicQuantizeLinear + MatMulInteger, which TensorRT rejects")
        raise QuantizationError(f"int8_decoder='{int8_decoder}' on TensorRT target '{tgt.name}': {why}; use "
                                f"int8_decoder='qdq' (W8A8 static QDQ, symmetric), the TensorRT default")
    if trt and int4_format == "matmulnbits" and "int4" in (comps["decoder"], comps["lm_head"]):
        raise QuantizationError(f"int4_format='matmulnbits' on TensorRT target '{tgt.name}': MatMulNBits is a "
                                f"com.microsoft contrib op that TensorRT cannot parse; use int4_format='qdq' "
                                f"(blocked INT4 DequantizeLinear + MatMul, symmetric), the TensorRT default")
    if trt and "int4" in (comps["decoder"], comps["lm_head"]) and block_size not in TENSORRT_INT4_BLOCK_SIZES:
        raise QuantizationError(f"INT4 block size {block_size} on TensorRT target '{tgt.name}': TensorRT's INT4 "
                                f"weight-only quantization supports block sizes "
                                f"{' and '.join(map(str, TENSORRT_INT4_BLOCK_SIZES))}; use block_size="
                                f"{INT4_BLOCK_SIZE} (the default) or 64")
    if trt and int8_vision == "dynamic" and comps["vision"] == "int8":
        raise QuantizationError(f"int8_vision='dynamic' on TensorRT target '{tgt.name}': quantize_dynamic emits "
                                f"DynamicQuantizeLinear + MatMulInteger, which TensorRT rejects; use "
                                f"int8_vision='static' (calibrated static QDQ), the TensorRT default")
    if int8_decoder == "auto":
        int8_decoder = "qdq" if trt else "weight-only"
    if int8_vision == "auto":
        int8_vision = "static" if trt else "dynamic"
    if int4_format == "auto":
        int4_format = "qdq" if trt else "matmulnbits"

    reduce_range = int8_reduce_range(tgt)
    vision = _vision_recipe(comps["vision"], calib_method, per_channel, reduce_range, int8_vision)
    decoder = _decoder_recipe(comps["decoder"], comps["lm_head"], int8_decoder=int8_decoder,
                              int4_format=int4_format, calib_method=calib_method, block_size=block_size,
                              accuracy_level=accuracy_level, per_channel=per_channel, reduce_range=reduce_range,
                              allowed_blocks=TENSORRT_INT4_BLOCK_SIZES if trt else None)
    mode = tgt.builder_mode
    vision, decoder = (_for_target(r, mode) for r in (vision, decoder))
    return QuantPlan(components=dict(comps), vision=vision, decoder=decoder,
                     embed_dtype={"fp32": "float32", "fp16": "float16"}[comps["embedding"]], target=tgt.label,
                     backend=tgt.backend, tensorrt=tgt.tensorrt, calib_method=calib_method)


def _for_target(r: ComponentRecipe, mode: str | None) -> ComponentRecipe:
    """``r`` with the target's builder mode and, on TensorRT >= 11 (strongly typed), fp16 tensor types for the float
    parts of a quantized graph (else they would run fp32 between the quantized layers)."""
    from dataclasses import replace

    r = replace(r, builder_mode=mode)
    if mode is not None and (r.method == "static-qdq" or r.lm_head_method == "static-qdq"):
        # TensorRT's DequantizeLinear takes INT8/INT4/FP8/FP4 inputs only: no INT32 bias DQ (ORT's default)
        r = replace(r, params={**r.params, "quantize_bias": False,
                               "bias": "float (QuantizeBias=False: TensorRT dequantizes no INT32 bias)"})
    if mode == "strong" and r.method not in ("none", "fp16-cast"):
        params = {**r.params, "float_layers": "fp16 tensor types: convert_float_to_float16(keep_io_types=True) after "
                                              "quantization, Q/DQ scales fp16, fp32 islands kept fp32 (TensorRT >= 11 "
                                              "builds strongly typed)"}
        r = replace(r, float_types="fp16", params=params,
                    description=r.description + "; float layers fp16 (strongly typed TensorRT)")
    elif mode == "weak" and r.method not in ("none", "fp16-cast"):
        params = {**r.params, "float_layers": "float32 in the graph; fp16 by the --fp16 builder flag (TensorRT 10 "
                                              "weakly typed), fp32 islands pinned by the build plan"}
        r = replace(r, params=params)
    return r


def int8_reduce_range(tgt: Any) -> bool:
    """Whether int8 weights must use 7 bits (``reduce_range``) on ``tgt``: x86 CPU targets without VNNI.

    ONNX Runtime's CPU int8 GEMMs run u8 activations x s8 weights (S8 activations of a QDQ graph are shifted to
    u8). Without VNNI they use ``vpmaddubsw``, which adds two u8 x s8 products into a *saturating* int16:
    255 x 127 x 2 = 64770 > 32767, so large activations meeting large weights clip (measured: int8 vision cosine
    0.988 on an AVX2-only AMD Zen 3 vs 0.999 with VNNI). With 7-bit weights the pair sum is at most
    255 x 64 x 2 = 32640 and never saturates; that costs one bit of weight precision (the quantize_static
    docstring's guidance: "x86 without VNNI: reduce_range=True"). VNNI (``vpdpbusd``) accumulates in int32, ARM's
    dot-product instructions likewise, and TensorRT's int8 kernels are exact: full 8-bit weights there.
    """
    if getattr(tgt, "is_tensorrt", False) or getattr(tgt, "kind", None) != "cpu":
        return False
    from edgevlm.runtime.cpuinfo import has_int8_dot

    feats = set(getattr(tgt, "cpu_features", ()) or ())
    x86 = bool(feats & {"sse4_2", "avx", "avx2", "avx512f"})
    return x86 and not has_int8_dot(feats)          # the target's flags, judged like the host's


def _static_params(calib_method: str, per_channel: bool, op_types: tuple[str, ...],
                   reduce_range: bool = False) -> dict[str, Any]:
    return {"tool": "onnxruntime.quantization.quantize_static", "quant_format": "QDQ", "activation_type": "QInt8",
            "weight_type": "QInt8", "symmetric": True, "activation_symmetric": True, "weight_symmetric": True,
            "per_channel": per_channel, "reduce_range": reduce_range, "calib_method": calib_method,
            "op_types": list(op_types), "weights_only_nodes": True,
            "pre_process": "onnxruntime.quantization.quant_pre_process"}


def _vision_recipe(precision: str, calib_method: str, per_channel: bool,
                   reduce_range: bool = False, int8_vision: str = "static") -> ComponentRecipe:
    if precision == "fp32":
        return ComponentRecipe("vision", "fp32", "none", {}, description="as exported (float32)")
    if precision == "fp16":
        return ComponentRecipe("vision", "fp16", "fp16-cast", _fp16_params(),
                               description="float16 weights and compute, float32 graph I/O, LayerNorm and Softmax "
                                           "fp32", float_types="fp16")
    if precision == "int8" and int8_vision == "dynamic":
        return ComponentRecipe("vision", "int8", "dynamic", {
            "tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": per_channel,
            "reduce_range": reduce_range, "op_types": list(WEIGHT_OPS_DYNAMIC), "symmetric": True,
            "ops": "DynamicQuantizeLinear + MatMulInteger (ONNX Runtime fuses them to DynamicQuantizeMatMul)"},
            description="int8 dynamic quantization (per-channel " + ("7-bit weights for CPUs without VNNI"
                                                                     if reduce_range else "weights")
                        + ", activation scales per image at run time; no calibration; ONNX Runtime CPU only)")
    if precision == "int8":
        return ComponentRecipe("vision", "int8", "static-qdq", _static_params(calib_method, per_channel,
                                                                              WEIGHT_OPS_VISION, reduce_range),
                               description="int8 static QDQ (symmetric activations and weights, per-channel "
                                           + ("7-bit weights for CPUs without VNNI" if reduce_range else "weights")
                                           + ") calibrated on real preprocessed images")
    raise QuantizationError(f"vision precision '{precision}' is not implemented; use fp32, fp16 or int8")


def _fp16_params() -> dict[str, Any]:
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "fp32_islands": "RMSNorm chains, LayerNorm and Softmax (edgevlm.graphs.precision_islands) kept fp32 in "
                            "the graph (node_block_list; the casts between island nodes removed by "
                            "edgevlm.quant.fp16.join_fp32_islands)"}


def _decoder_recipe(precision: str, lm_head: str, *, int8_decoder: str, int4_format: str, calib_method: str,
                    block_size: int, accuracy_level: int, per_channel: bool,
                    reduce_range: bool = False, allowed_blocks: tuple[int, ...] | None = None) -> ComponentRecipe:
    head_notes = {"fp32": ", LM head fp32", "fp16": ", LM head fp16 (unquantized)"}
    if precision == "fp32":
        return ComponentRecipe("decoder", "fp32", "none", {}, lm_head, "as exported (float32)")
    if precision == "fp16":
        return ComponentRecipe("decoder", "fp16", "fp16-cast", _fp16_params(), lm_head,
                               "float16 weights and compute, float32 graph I/O (KV cache and logits stay float32), "
                               "RMSNorm and Softmax fp32", float_types="fp16")
    if precision == "int8":
        if int8_decoder == "weight-only":
            return ComponentRecipe("decoder", "int8", "matmulnbits-int8", {
                "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 8,
                "block_size": INT8_BLOCK_SIZE, "symmetric": True, "accuracy_level": accuracy_level,
                "quant_format": "QOperator", "op": "com.microsoft::MatMulNBits"}, lm_head,
                "int8 weight-only, block-wise (ORT MatMulNBits, ONNX Runtime only)")
        if int8_decoder == "dynamic":
            return ComponentRecipe("decoder", "int8", "dynamic", {
                "tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": per_channel,
                "reduce_range": reduce_range, "op_types": list(WEIGHT_OPS_DECODER), "symmetric": True,
                "ops": "DynamicQuantizeLinear + MatMulInteger"}, lm_head,
                "int8 dynamic quantization (per-token activation scales at run time; ONNX Runtime CPU only)")
        params = _static_params(calib_method, per_channel, WEIGHT_OPS_DECODER, reduce_range)
        if lm_head in ("fp32", "fp16"):
            params["lm_head_format"] = f"unquantized ({lm_head})"
        return ComponentRecipe("decoder", "int8", "static-qdq", params, lm_head,
                               "W8A8 static QDQ (symmetric, per-channel weights) calibrated on real prefill and "
                               "decode activations" + head_notes.get(lm_head, ", LM head W8A8 like the rest"))
    if precision == "int4":
        if int4_format == "qdq":
            from edgevlm.quant.int4_qdq import TOOL

            params: dict[str, Any] = {
                "tool": TOOL + " (edgevlm's own blocked INT4 quantizer: no installed library writes the form "
                               "TensorRT accepts)",
                "bits": 4, "block_size": block_size, "symmetric": True, "quant_format": "QDQ",
                "scale": "amax(|block|) / 7 per block of block_size rows (axis 0) and column, float32, strictly "
                         "positive (all-zero block: 1.0)",
                "range": [-7, 7], "zero_point": None, "rounding": "round half to even",
                "partial_blocks": "never written: a matmul whose K is not a multiple of block_size uses the largest "
                                  "allowed block that divides K (recorded in block_size_overrides), else refused",
                "allowed_block_sizes": list(allowed_blocks) if allowed_blocks else "powers of two >= 16",
                "op": "DequantizeLinear(int4 [K, N], scale [K/B, N], axis=0, block_size=B) -> MatMul", "opset": 21}
            method, how = "int4-qdq", "(blocked INT4 DequantizeLinear -> MatMul, scale amax/7, for TensorRT)"
        else:
            params = {
                "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
                "block_size": block_size, "symmetric": True, "quant_format": "QOperator",
                "op": "com.microsoft::MatMulNBits", "accuracy_level": accuracy_level}
            method, how = "matmulnbits-int4", f"(ORT MatMulNBits, accuracy_level {accuracy_level})"
        if lm_head == "int8":
            params["lm_head_bits"] = 8
            if int4_format == "qdq":
                params["lm_head_format"] = ("W8A8 static QDQ of the head node (quantize_static, "
                                            "nodes_to_quantize=[head], calibrated)")
            else:
                params["lm_head_format"] = "com.microsoft::MatMulNBits bits=8"
                params["lm_head_block_size"] = INT8_BLOCK_SIZE
        elif lm_head in ("fp32", "fp16"):
            params["lm_head_format"] = f"unquantized ({lm_head})"
        return ComponentRecipe("decoder", "int4", method, params, lm_head,
                               f"int4 weight-only, block {block_size}, symmetric {how}"
                               + head_notes.get(lm_head, ", LM head W8A8" if lm_head == "int8" and
                                                int4_format == "qdq" else
                                                (", LM head int8" if lm_head == "int8" else "")))
    raise QuantizationError(f"decoder precision '{precision}' is not implemented; use fp32, fp16, int8 or int4")


def recipe_table(targets: tuple[str, ...] = ("cpu", "jetson-orin")) -> list[dict[str, str]]:
    """Rows ``{preset, target, vision, decoder, embedding}`` describing what each preset does per target kind
    (``--help`` text, docs)."""
    from edgevlm.targets import PRECISION_PRESETS, get_target

    rows = []
    for t in targets:
        tgt = get_target(t)
        for preset in PRECISION_PRESETS:
            try:
                plan = plan_quantization(preset, tgt)
            except (QuantizationError, TargetError) as exc:
                rows.append({"preset": preset, "target": tgt.name, "vision": "-", "decoder": "-",
                             "embedding": "-", "error": str(exc).split(";")[0]})
                continue
            fmt = plan.decoder.params.get("quant_format")
            rows.append({"preset": preset, "target": tgt.name,
                         "vision": f"{plan.vision.precision} ({plan.vision.method})",
                         "decoder": f"{plan.decoder.precision} ({plan.decoder.method}{', ' + fmt if fmt else ''})",
                         "embedding": plan.embed_dtype})
    return rows


__all__ = ["ComponentRecipe", "QuantPlan", "plan_quantization", "tolerances_for", "recipe_table", "int8_reduce_range",
           "CALIB_METHODS",
           "INT8_DECODER_MODES", "INT4_FORMATS", "INT4_BLOCK_SIZE", "INT4_ACCURACY_LEVEL"]
