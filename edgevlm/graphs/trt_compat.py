"""Will TensorRT take this bundle? Static checks of the ONNX graphs and the build plan against TensorRT's documented
rules, before anything is built on a device. ``docs/tensorrt.md`` is the rule book: one row per rule (code,
source, test).

    >>> from edgevlm.graphs.trt_compat import check_tensorrt_compat, assert_tensorrt_compat, check_build_plan
    >>> issues = check_tensorrt_compat("bundle/decoder.onnx", "10.3")     # list[Issue], errors and warnings
    >>> assert_tensorrt_compat("bundle/decoder.onnx", "10.3")             # raises TargetError naming every node
    >>> check_build_plan("bundle")                                        # build_plan.json vs graphs + manifest

An ``error`` is a rule TensorRT enforces (the parser or builder rejects the graph or plan, or the engine computes
something else than the ONNX graph); a ``warning`` is a documented risk that needs a look. Every ``Issue`` carries a
stable ``code`` (``RULES`` maps each code to its source). Graph rules (``check_tensorrt_compat``):

- ``domain``, ``unsupported-op``, ``opset``: default ONNX domain only, ops in the version's parser operator list,
  opset <= the version's maximum (20 for 10.0-10.8, 22 from 10.9, 24 from 10.13, 25 for 11.x; opset 21 accepted
  on a max-20 parser as a warning when the model has blocked INT4 DequantizeLinear);
- Q/DQ: ``qdq-scale-positive`` (every scale finite and > 0), ``qdq-scale-constant`` (build-time constant scales),
  ``qdq-scale-dtype``, ``asymmetric-qdq`` / ``unsigned-qdq`` (symmetric signed quantization), ``qdq-axis`` /
  ``qdq-axis-implicit`` (per-channel axis), ``qdq-block`` / ``qdq-block-size`` (blocked INT4 weight DQ: constant
  2-D weight, one blocked axis among the last two, block 64 or 128), ``int4-activation`` (INT4 is weight-only),
  ``int4-odd``, ``dq-output-type``, ``int8-weight-range`` (warning: -128 in an INT8 weight);
- ``io-dtype`` (graph inputs/outputs of a TensorRT I/O type), ``unsupported-cast``, ``double``;
- ``fp16-island`` (strongly typed builds, where the graph's dtypes are the precision: in a graph computing in fp16,
  every RMSNorm / LayerNorm / Softmax node of ``precision_islands`` reads and writes float32);
- ``scatternd-reduction``, ``scatternd-opset``, ``dynamic-axes``, ``data-dependent``, ``infinite-mask``.

Plan rules (``check_build_plan``, on ``build_plan.json`` with the graphs and the manifest): ``profile-input`` /
``profile-range`` (every dynamic input has a min <= opt <= max range in every profile, static dims fixed),
``profile-kv`` (decode covers past 1..context-1, prefill seq 1..max prompt, the mask's total length covers
past + seq), ``profile-context`` (the planned context is the manifest's KV capacity), ``fp32-layers`` (weakly
typed fp16 builds pin the island nodes to fp32), ``builder-mode``, ``dla-static``.

Subgraphs (If/Loop/Scan bodies) and model-local functions are checked too. Issues name the node (name + op_type),
or the engine and profile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from edgevlm.errors import MissingDependency, TargetError
from edgevlm.targets import parse_trt_version, trt_opset_max

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

# onnx-tensorrt docs/operators.md (TensorRT 10.0/10.1): operators marked "Y".
_OPS_10_0 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

# Added by later parsers (onnx-tensorrt CHANGELOG.md). 11.x is assumed to carry everything 10.15 has.
_OPS_ADDED: tuple[tuple[tuple[int, int], frozenset[str]], ...] = (
    ((10, 1), frozenset({"DeformConv"})),
    ((10, 4), frozenset({"BlackmanWindow", "HammingWindow", "HannWindow"})),
    ((10, 5), frozenset({"STFT"})),
    ((10, 14), frozenset({"Attention"})),
    ((10, 15), frozenset({"RotaryEmbedding", "RMSNormalization", "TensorScatter"})),
)

# Ops the parser rejects, with the fix.
_UNSUPPORTED_HINTS = {
    "MatMulInteger": "ORT dynamic quantization output: use QDQ static quantization (quant_format=QDQ) for TensorRT",
    "ConvInteger": "ORT dynamic quantization output: use QDQ static quantization for TensorRT",
    "DynamicQuantizeLinear": "ORT quantize_dynamic output (CPU only): use quantize_static with QuantFormat.QDQ",
    "QLinearMatMul": "QOperator format: re-quantize with quant_format=QuantFormat.QDQ",
    "QLinearConv": "QOperator format: re-quantize with quant_format=QuantFormat.QDQ",
    "SplitToSequence": "sequence ops are not supported: export with static splits",
    "ConcatFromSequence": "sequence ops are not supported: export with a static Concat",
    "BitwiseAnd": "bitwise ops are not supported", "BitwiseOr": "bitwise ops are not supported",
    "BitwiseXor": "bitwise ops are not supported", "BitwiseNot": "bitwise ops are not supported",
    "BitShift": "bitwise ops are not supported",
}
_CONTRIB_HINTS = {
    "MatMulNBits": "ORT int4 QOperator output: use MatMulNBitsQuantizer(quant_format=QuantFormat.QDQ, "
                   "is_symmetric=True) for TensorRT (blocked INT4 DequantizeLinear + MatMul)",
    "GroupQueryAttention": "ORT fused attention: export the TensorRT bundle without ORT transformer fusions",
    "MultiHeadAttention": "ORT fused attention: export the TensorRT bundle without ORT transformer fusions",
    "GatherBlockQuantized": "ORT quantized embedding: keep the embedding table fp16 for TensorRT",
    "SkipLayerNormalization": "ORT fusion: do not run onnxruntime.transformers.optimizer on TensorRT bundles",
    "SkipSimplifiedLayerNormalization": "ORT fusion: do not run onnxruntime.transformers.optimizer on TensorRT bundles",
    "SimplifiedLayerNormalization": "ORT fusion: do not run onnxruntime.transformers.optimizer on TensorRT bundles",
    "RotaryEmbedding": "ORT fusion: do not run onnxruntime.transformers.optimizer on TensorRT bundles",
}
_AXES_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
             "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Squeeze", "Unsqueeze"}
_MASK_CONSUMERS = {"Where", "Add"}
# Ops a mask constant may pass through on its way to Where/Add.
_PASS_THROUGH = {"Cast", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Slice", "Concat", "Identity",
                 "Tile", "Transpose", "Gather"}
_MASK_DEPTH = 4
_MAX_SCAN_ELEMENTS = 1 << 22         # constants larger than this are not scanned for -inf (they are weights)

ERROR, WARNING = "error", "warning"
_MAX_SCALE_ELEMENTS = 1 << 24       # scales are small (K/block x N at most); larger "scales" are not read
_MAX_WEIGHT_ELEMENTS = 1 << 24      # INT8 weights scanned for -128 (the warning-level rule) up to this size

#: INT4 weight-only block sizes TensorRT supports (developer guide, "Working with Quantized Types" > "Quantization
#: Schemes": "INT4 quantization requires per-block scales. The supported block sizes are {64, 128}. The block
#: dimension should be one of the last two dimensions.").
INT4_BLOCK_SIZES = (64, 128)
#: FP4 (NVFP4) blocks: 16 (TensorRT operator docs, DynamicQuantize: "The block size is currently limited to 16").
FP4_BLOCK_SIZES = (16,)

#: Every rule's stable code -> the documentation it comes from (docs/tensorrt.md is the table).
RULES: dict[str, str] = {
    "domain": "onnx-tensorrt docs/operators.md: only the default ONNX domain; custom ops need plugins",
    "unsupported-op": "onnx-tensorrt docs/operators.md (operator list per release) and CHANGELOG.md",
    "opset": "onnx-tensorrt docs/operators.md (opset range); TensorRT 'ONNX Opset Guide' (11.x: 25)",
    "qdq-scale-positive": "TensorRT 10.x API, IQuantizeLayer/IDequantizeLayer: 'All scale coefficients must have "
                          "strictly positive values'; onnx-tensorrt QuantDequantLinearHelper: 'Scale coefficients "
                          "must all be positive'",
    "qdq-scale-constant": "TensorRT operator docs, Quantize/Dequantize: 'The scale tensor must be a build-time "
                          "constant'",
    "qdq-scale-dtype": "TensorRT operator docs, Quantize/Dequantize: scale T1 float16/bfloat16/float32; "
                       "onnx-tensorrt QuantDequantLinearHelper (positivity checked for fp32/fp16/bf16 scales only)",
    "asymmetric-qdq": "TensorRT 10.x API, IDequantizeLayer: 'zeroPt must only contain zero-valued coefficients, "
                      "because only symmetric quantization is supported'",
    "unsigned-qdq": "onnx-tensorrt QuantDequantLinearHelper: notInvalidType(UINT8); 'TensorRT only allows FP8, "
                    "INT8, and INT4 quantization'",
    "qdq-wide-type": "onnx-tensorrt QuantDequantLinearHelper: 'TensorRT only allows FP8, INT8, and INT4 "
                     "quantization' (an INT32 bias DequantizeLinear, as ORT's QuantizeBias writes, is rejected)",
    "qdq-axis": "TensorRT 10.x API, IDequantizeLayer: 'The size of the 1D scale tensor must match the size of the "
                "quantization axis'; onnx-tensorrt: 'The number of scales is not equal to the number of output "
                "channels'",
    "qdq-axis-implicit": "onnx-tensorrt 10.0/10.1 QuantDequantLinearHelper: a missing axis attribute defaults to 0 "
                         "for per-channel scales (ONNX's default is 1; later parsers use 1)",
    "qdq-block": "TensorRT operator docs, Dequantize: block quantization with 'a 2-D tensor ... (supported for "
                 "DataType::kINT4 only)'; IDequantizeLayer: 'scale ... must match the shape of the input, except "
                 "for one dimension (the last or second to last dimension) in which blocking occurs'; "
                 "onnx-tensorrt: 'Only a single blocking dimension is allowed', 'Inferred block size is not an "
                 "integer'",
    "qdq-block-size": "TensorRT developer guide, Working with Quantized Types > Quantization Schemes: 'INT4 "
                      "quantization requires per-block scales. The supported block sizes are {64, 128}'",
    "int4-activation": "TensorRT developer guide, Working with Quantized Types: 'Weight-only quantization is "
                       "supported for INT4' / 'TensorRT only supports INT4 for weight quantization'",
    "int4-odd": "onnx-tensorrt QuantDequantLinearHelper: 'Quantization to INT4 is not supported for tensors with an "
                "odd last dimension' (10.1; later: 'requires an even number of elements')",
    "dq-output-type": "onnx-tensorrt QuantDequantLinearHelper: DequantizeLinear output_dtype must be float, half or "
                      "bfloat16",
    "int8-weight-range": "reference/onnx-ort-tensorrt.md §4.1: INT8 weights in [-127, 127] (symmetric); -128 has no "
                         "positive counterpart",
    "io-dtype": "TensorRT 10.x API, DataType (FLOAT, HALF, BF16, INT8, INT32, INT64, BOOL, UINT8, FP8, INT4, FP4: no "
                "64-bit float, no INT16/UINT16/UINT32/UINT64/string/complex); onnx-tensorrt importInput/convertDtype "
                "(DOUBLE is imported as FLOAT)",
    "unsupported-cast": "TensorRT operator docs, Cast: T1/T2 in bool, uint8, int8, int32, int64, float16, bfloat16, "
                        "float32; onnx-tensorrt Cast importer: 'Unsupported cast!'",
    "double": "onnx-tensorrt convertDtype: DOUBLE is computed as FLOAT",
    "fp16-island": "TensorRT developer guide, Strongly Typed Networks (tensor types follow the graph, builder "
                   "precision flags are not used) and Reduced Precision ('force the normalization layers to FP32'); "
                   "edgevlm.graphs.precision_islands",
    "scatternd-reduction": "onnx-tensorrt docs/operators.md: ScatterND reduction not supported",
    "scatternd-opset": "onnx-tensorrt CHANGELOG (10.9): ScatterND opset-18 import fixed",
    "dynamic-axes": "onnx-tensorrt docs/operators.md: Reduce*/Squeeze/Unsqueeze axes must be an initializer",
    "data-dependent": "TensorRT developer guide, Dynamic Shapes (data-dependent shapes); DLA needs static shapes",
    "infinite-mask": "reference/onnx-ort-tensorrt.md §7 (fp16 overflow of finfo.min masks -> NaN; "
                     "transformers#17306, NVIDIA/TensorRT#1500)",
    "profile-input": "TensorRT 10.x API, IOptimizationProfile: every dynamic input needs min/opt/max dimensions in "
                     "every profile ('A runtime error will be raised if the input tensor dimensions fall outside "
                     "the valid range for this profile')",
    "profile-range": "TensorRT 10.x API, IOptimizationProfile::setDimensions: min <= opt <= max, and a dimension "
                     "that is static in the network must equal it in min, opt and max",
    "profile-kv": "TensorRT 10.x API, IOptimizationProfile (runtime dims outside [min, max] are an error) applied "
                  "to the runtime's KV-cache shapes (edgevlm.runtime.trt_backend: prefill from past 0, decode with "
                  "past 1..context-1, attention_mask of past + seq)",
    "profile-context": "edgevlm bundle contract: the decode profile's KV capacity is the manifest's context "
                       "(kv_cache.max_length / memory_plan.context / kv_cache.max_positions)",
    "fp32-layers": "TensorRT 10 developer guide, Reduced Precision: in weakly typed builds the builder picks each "
                   "layer's precision unless constrained (ILayer::setPrecision + OBEY_PRECISION_CONSTRAINTS, "
                   "trtexec --layerPrecisions); 'force the normalization layers to FP32'",
    "builder-mode": "TensorRT 10.x-to-11.x migration guide: weak typing and precision flags removed in 11.0; "
                    "'Explicit Quantization': precision flags are not required with strong typing and should not "
                    "be specified",
    "dla-static": "TensorRT developer guide, Working with DLA: DLA supports static shapes only (min = opt = max) "
                  "and FP16/INT8",
}


@dataclasses.dataclass(frozen=True)
class Issue:
    """One finding: severity ``error`` (the parser will reject or mis-build the graph) or ``warning``."""

    severity: str
    node: str            # node name (or "<model>" for graph-level issues)
    op: str              # op_type ("" for graph-level issues)
    message: str
    code: str = ""       # stable id: domain, unsupported-op, opset, asymmetric-qdq, unsigned-qdq, ...

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.op else self.node
        return f"[{self.severity}] {where}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def supported_ops(trt_version: str) -> frozenset[str]:
    """Default-domain ops the TensorRT ``trt_version`` ONNX parser imports."""
    v = parse_trt_version(trt_version)
    trt_opset_max(trt_version)                           # rejects < 10.0
    ops = set(_OPS_10_0)
    for since, added in _OPS_ADDED:
        if v >= since or v[0] >= 11:
            ops |= added
    return frozenset(ops)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependency("onnx", "export", "Checking ONNX graphs for TensorRT") from None
    return onnx


def _load(model: Any) -> tuple[Any, Path | None]:
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise TargetError(f"ONNX file {path} not found")
    return onnx.load(str(path), load_external_data=False), path.parent


class _Graphs:
    """Constant lookup and consumer maps over the main graph and its subgraphs (names are global in practice)."""

    def __init__(self, model: Any, base_dir: Path | None) -> None:
        self.onnx = _onnx()
        self.base_dir = base_dir
        self.initializers: dict[str, Any] = {}
        self.constants: dict[str, Any] = {}          # output name -> TensorProto (Constant / ConstantOfShape value)
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        self.producers: dict[str, Any] = {}
        for graph in _walk_graphs(model.graph):
            for init in graph.initializer:
                self.initializers[init.name] = init
            for node in graph.node:
                for name in node.input:
                    if name:
                        self.consumers[name].append(node)
                for name in node.output:
                    self.producers[name] = node
                if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                    t = self._constant_value(node)
                    if t is not None:
                        self.constants[node.output[0]] = t

    def _constant_value(self, node: Any) -> Any:
        helper = self.onnx.helper
        for attr in node.attribute:
            if attr.name == "value":
                return attr.t
            if attr.name == "value_float":
                return helper.make_tensor("v", self.onnx.TensorProto.FLOAT, [], [attr.f])
            if attr.name == "value_floats":
                return helper.make_tensor("v", self.onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
            if attr.name == "value_int":
                return helper.make_tensor("v", self.onnx.TensorProto.INT64, [], [attr.i])
            if attr.name == "value_ints":
                return helper.make_tensor("v", self.onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
        return None

    def tensor(self, name: str) -> Any:
        """The constant TensorProto behind ``name`` (initializer, Constant, Identity of one), or None."""
        for _ in range(4):
            if name in self.initializers:
                return self.initializers[name]
            if name in self.constants:
                return self.constants[name]
            node = self.producers.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def array(self, tensor: Any, *, max_elements: int | None = None):
        """numpy array of a TensorProto (external data loaded from the model folder when needed)."""
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        n = 1
        for d in tensor.dims:
            n *= d
        if max_elements is not None and n > max_elements:
            return None
        if uses_external_data(tensor):
            if self.base_dir is None:
                return None
            copy = self.onnx.TensorProto()
            copy.CopyFrom(tensor)
            try:
                load_external_data_for_tensor(copy, str(self.base_dir))
            except OSError:
                return None
            tensor = copy
        return numpy_helper.to_array(tensor)


def _walk_graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _walk_graphs(attr.g)
            for g in attr.graphs:
                yield from _walk_graphs(g)


def _label(node: Any) -> str:
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "?")
    return f"<unnamed {node.op_type} -> {out}>"


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _default_opset(model: Any) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else 0


def _is_blocked_dq(node: Any, graphs: _Graphs) -> bool:
    if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS:
        return False
    if int(_attr(node, "block_size", 0) or 0) > 0:
        return True
    t = graphs.tensor(node.input[0])
    onnx = graphs.onnx
    return t is not None and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _iter_nodes(model: Any) -> Iterator[tuple[Any, str]]:
    """(node, scope) over the main graph, subgraphs and model-local function bodies reached from them."""
    functions = {(f.domain, f.name): f for f in model.functions}
    seen_functions: set[tuple[str, str]] = set()

    def nodes_of(graph_nodes: Iterable[Any], scope: str) -> Iterator[tuple[Any, str]]:
        for node in graph_nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in seen_functions:
                    seen_functions.add(key)
                    yield from nodes_of(functions[key].node, f"{scope}{node.op_type}/")
                continue
            yield node, scope
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from nodes_of(attr.g.node, f"{scope}{_label(node)}/")
                for g in attr.graphs:
                    yield from nodes_of(g.node, f"{scope}{_label(node)}/")

    yield from nodes_of(model.graph.node, "")




_FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def _tp(name: str) -> int:
    return int(getattr(_onnx().TensorProto, name, -1))


def _type_name(elem_type: int) -> str:
    try:
        return _onnx().TensorProto.DataType.Name(int(elem_type))
    except ValueError:
        return str(elem_type)


class _Types:
    """Element types and shapes of the main graph's tensors: initializers, Constants, inputs/outputs, value_info,
    plus ONNX shape inference when asked (graph only, no weights are read)."""

    def __init__(self, model: Any, graphs: _Graphs) -> None:
        self.model, self.graphs = model, graphs
        self._known: dict[str, tuple[int, list[Any] | None]] | None = None

    def _collect(self, graph: Any, out: dict[str, tuple[int, list[Any] | None]]) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is None or not tt.elem_type:
                continue
            dims = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
                    if tt.HasField("shape") else None)
            out[vi.name] = (tt.elem_type, dims)

    @property
    def known(self) -> dict[str, tuple[int, list[Any] | None]]:
        if self._known is None:
            out: dict[str, tuple[int, list[Any] | None]] = {}
            self._collect(self.model.graph, out)
            try:
                inferred = _onnx().shape_inference.infer_shapes(self.model, check_type=False, strict_mode=False)
                self._collect(inferred.graph, out)
            except Exception as exc:  # noqa: BLE001 - inference is a best effort; value_info stays
                log.debug("shape inference failed: %s", exc)
            for name, t in {**self.graphs.initializers, **self.graphs.constants}.items():
                out[name] = (t.data_type, list(t.dims))
            self._known = out
        return self._known

    def elem(self, name: str) -> int:
        t = self.graphs.tensor(name)
        if t is not None:
            return int(t.data_type)
        return int(self.known.get(name, (0, None))[0])

    def shape(self, name: str) -> list[Any] | None:
        t = self.graphs.tensor(name)
        if t is not None:
            return list(t.dims)
        return self.known.get(name, (0, None))[1]


def _constant_subgraph(graphs: _Graphs, name: str, depth: int = 8) -> bool:
    """True when ``name`` is computed from constants only (initializers / Constant nodes), within ``depth`` hops."""
    if graphs.tensor(name) is not None:
        return True
    node = graphs.producers.get(name)
    if node is None or depth == 0 or node.op_type.startswith("Random") or node.domain not in DEFAULT_DOMAINS:
        return False
    if node.op_type == "ConstantOfShape":
        return not node.input or _constant_subgraph(graphs, node.input[0], depth - 1)
    ins = [i for i in node.input if i]
    return bool(ins) and all(_constant_subgraph(graphs, i, depth - 1) for i in ins)


def check_tensorrt_compat(model: Any, trt_version: str, *, allow_int4_opset21: bool = True,
                          strongly_typed: bool | None = None) -> list[Issue]:
    """Every reason the TensorRT ``trt_version`` ONNX parser or builder would reject (error) or mishandle (warning)
    ``model`` (the graph rules of the module docstring).

    Args:
        model: an ``onnx.ModelProto`` or a path (external data stays on disk; small tensors are read on demand).
        trt_version: e.g. ``"10.3"`` (JetPack 6) or ``"11.4"``.
        allow_int4_opset21: accept opset 21 on a max-20 parser when the model has blocked INT4 DequantizeLinear.
        strongly_typed: the build obeys the graph's dtypes (``fp16-island`` applies); None = TensorRT >= 11 (the only
            mode there). A TensorRT 10 plan built ``--stronglyTyped`` passes True.
    """
    model, base_dir = _load(model)
    ops = supported_ops(trt_version)
    version = parse_trt_version(trt_version)
    strong = version[0] >= 11 if strongly_typed is None else bool(strongly_typed)
    graphs = _Graphs(model, base_dir)
    types = _Types(model, graphs)
    issues: list[Issue] = []
    nodes = list(_iter_nodes(model))

    issues += _rule_opset(model, nodes, graphs, trt_version, allow_int4_opset21)
    issues += _rule_io_dtypes(model)
    opset = _default_opset(model)
    for node, scope in nodes:
        name = scope + _label(node)
        op = node.op_type
        if node.domain not in DEFAULT_DOMAINS:
            issues += _rule_domain(node, name)
            continue
        if op not in ops:
            issues += _rule_supported_op(node, name, trt_version)
            continue
        if op in ("QuantizeLinear", "DequantizeLinear"):
            issues += _check_qdq(node, name, graphs, types, version)
        elif op == "ScatterND":
            issues += _rule_scatternd(node, name, opset, version, trt_version)
        elif op == "GroupNormalization" and opset >= 21 and version < (10, 9):
            issues.append(Issue(ERROR, name, op, "opset-21 GroupNormalization semantics need TensorRT >= 10.9",
                                "unsupported-op"))
        elif op in _AXES_OPS and len(node.input) > 1 and node.input[1]:
            if graphs.tensor(node.input[1]) is None:
                issues.append(Issue(WARNING, name, op, "'axes' is not a constant: TensorRT needs constant axes "
                                    "(fold constants: polygraphy surgeon sanitize --fold-constants)", "dynamic-axes"))
        elif op == "NonZero":
            issues.append(Issue(WARNING, name, op, "data-dependent output shape: slow in TensorRT and not allowed "
                                "in a static-shape DLA graph", "data-dependent"))
        elif op == "Cast":
            issues += _rule_cast(node, name)
    if strong:
        issues += _rule_fp16_islands(model, types, trt_version)
    issues += _check_masks(model, graphs)
    return issues


# ---- graph rules ----------------------------------------------------------------------------------------------------
def _rule_opset(model: Any, nodes: list[tuple[Any, str]], graphs: _Graphs, trt_version: str,
                allow_int4_opset21: bool) -> list[Issue]:
    """``opset``: the default-domain opset must not exceed the parser's maximum (onnx-tensorrt docs/operators.md:
    "opset 9 to 20" for TensorRT 10.0; 22 from 10.9, 24 from 10.13; TensorRT "ONNX Opset Guide": 25 for 11.x). Opset
    21 on a max-20 parser is a warning when the model has blocked INT4 DequantizeLinear (the 10.x parser imports
    ``block_size`` DQ, the one opset-21 feature it handles; reference §4.7)."""
    max_opset = trt_opset_max(trt_version)
    opset = _default_opset(model)
    blocked = [n for n, _ in nodes if _is_blocked_dq(n, graphs)]
    if opset <= max_opset:
        return []
    if allow_int4_opset21 and opset == 21 and max_opset == 20 and blocked:
        return [Issue(WARNING, "<model>", "", f"opset 21 > {max_opset} (TensorRT {trt_version}) accepted for "
                      f"{len(blocked)} blocked INT4 DequantizeLinear node(s) only; verify the parse on the device",
                      "opset")]
    why = (" (opset 21 is accepted only for blocked INT4 DequantizeLinear, and this model has none)"
           if opset == 21 and max_opset == 20 else "")
    return [Issue(ERROR, "<model>", "", f"default-domain opset {opset} exceeds TensorRT {trt_version}'s maximum "
                  f"{max_opset}{why}: re-export with opset {max_opset} (torch.onnx.export(..., opset_version="
                  f"{max_opset}); opset >= 23 also emits Attention/RMSNormalization)", "opset")]


def _rule_domain(node: Any, name: str) -> list[Issue]:
    """``domain``: the TensorRT ONNX parser imports the default ONNX domain only (onnx-tensorrt docs/operators.md);
    ``com.microsoft`` contrib ops (MatMulNBits, GroupQueryAttention, ...) and other custom domains need plugins. A
    custom-domain node that is a model-local function is checked through its body (``_iter_nodes``)."""
    hint = _CONTRIB_HINTS.get(node.op_type, "TensorRT parses only the default ONNX domain (custom ops need plugins)")
    return [Issue(ERROR, name, node.op_type, f"custom-domain op '{node.domain}::{node.op_type}' is not supported by "
                  f"the TensorRT ONNX parser: {hint}", "domain")]


def _rule_supported_op(node: Any, name: str, trt_version: str) -> list[Issue]:
    """``unsupported-op``: every op must be in the TensorRT version's parser operator list (onnx-tensorrt
    docs/operators.md for 10.0, plus the ops later releases added per CHANGELOG.md; ``supported_ops``)."""
    op = node.op_type
    if op in _UNSUPPORTED_HINTS:
        msg = f"not supported by the TensorRT {trt_version} ONNX parser: {_UNSUPPORTED_HINTS[op]}"
    else:
        added = next((f" (added in TensorRT {s[0]}.{s[1]})" for s, a in _OPS_ADDED if op in a), "")
        msg = f"not in the TensorRT {trt_version} ONNX parser's operator list{added}"
    return [Issue(ERROR, name, op, msg, "unsupported-op")]


def _rule_scatternd(node: Any, name: str, opset: int, version: tuple[int, int], trt_version: str) -> list[Issue]:
    """``scatternd-reduction``: ScatterND with a reduction is not supported (onnx-tensorrt docs/operators.md);
    ``scatternd-opset``: ScatterND at opset >= 18 was fixed in the 10.9 parser (CHANGELOG) - a warning before."""
    red = _attr(node, "reduction", b"none")
    red = red.decode() if isinstance(red, bytes) else str(red)
    if red != "none":
        return [Issue(ERROR, name, node.op_type, f"ScatterND reduction='{red}' is not supported by TensorRT: write "
                      f"the update without a reduction", "scatternd-reduction")]
    if opset >= 18 and version < (10, 9):
        return [Issue(WARNING, name, node.op_type, f"ScatterND at opset {opset} was fixed in the 10.9 parser; verify "
                      f"the parse on TensorRT {trt_version}", "scatternd-opset")]
    return []


#: ONNX element types TensorRT network I/O can carry (TensorRT 10.x ``DataType``: FLOAT, HALF, BF16, INT32, INT64,
#: BOOL, UINT8 - the last only to be cast to/from float - and INT8, which represents a *quantized* value).
_IO_OK = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8")


def _rule_io_dtypes(model: Any) -> list[Issue]:
    """``io-dtype``: graph inputs and outputs must be of a type TensorRT network I/O tensors have (TensorRT 10.x API,
    ``DataType``: FLOAT, HALF, BF16, INT8, INT32, INT64, BOOL, UINT8, FP8, INT4, FP4). No 64-bit float: the parser
    imports a DOUBLE input as FLOAT (onnx-tensorrt ``convertDtype``), so the engine's binding would not be the
    manifest's dtype; INT16/UINT16/UINT32/UINT64/string/complex inputs fail the import ("Unsupported ONNX data
    type"); INT4/FP4/FP8 are quantized storage types (INT4 is weight-only), not I/O. INT8 I/O is a warning: TensorRT
    treats it as a quantized value (it needs a scale), feed float instead."""
    onnx = _onnx()
    inits = {i.name for i in model.graph.initializer}
    out: list[Issue] = []
    for direction, values in (("input", [v for v in model.graph.input if v.name not in inits]),
                              ("output", list(model.graph.output))):
        for v in values:
            if not v.type.HasField("tensor_type"):
                out.append(Issue(ERROR, v.name, "", f"graph {direction} '{v.name}' is not a tensor (sequence/map/"
                                 f"optional I/O): TensorRT network I/O are tensors only", "io-dtype"))
                continue
            et = v.type.tensor_type.elem_type
            if not et:
                continue
            tname = _type_name(et)
            if tname in _IO_OK:
                continue
            if et == onnx.TensorProto.INT8:
                out.append(Issue(WARNING, v.name, "", f"graph {direction} '{v.name}' is INT8: TensorRT treats INT8 "
                                 f"I/O as a quantized value that needs a scale; use float32/float16 I/O", "io-dtype"))
            elif et == onnx.TensorProto.DOUBLE:
                out.append(Issue(ERROR, v.name, "", f"graph {direction} '{v.name}' is DOUBLE: TensorRT has no 64-bit "
                                 f"float (the parser makes it a FLOAT binding, so the engine's I/O differs from the "
                                 f"manifest): export float32 I/O", "io-dtype"))
            else:
                out.append(Issue(ERROR, v.name, "", f"graph {direction} '{v.name}' is {tname}: not a TensorRT I/O "
                                 f"type (float32, float16, bfloat16, int32, int64, bool, uint8; int8 quantized): "
                                 f"export it as float32/int64", "io-dtype"))
    return out


_CAST_OK = ("BOOL", "UINT8", "INT8", "INT32", "INT64", "FLOAT16", "BFLOAT16", "FLOAT")


def _rule_cast(node: Any, name: str) -> list[Issue]:
    """``unsupported-cast`` / ``double``: TensorRT's Cast converts between bool, uint8, int8, int32, int64, float16,
    bfloat16 and float32 (TensorRT operator docs, Cast); the parser maps DOUBLE to FLOAT (a warning: computed in
    fp32) and rejects any other target type ("Unsupported cast!", onnx-tensorrt Cast importer), FP8/INT4 included
    ("TRT will reject casts to FP8")."""
    to = _attr(node, "to")
    if to is None:
        return []
    tname = _type_name(to)
    if tname == "DOUBLE":
        return [Issue(WARNING, name, node.op_type, "cast to DOUBLE: TensorRT computes it in FLOAT", "double")]
    if tname in _CAST_OK:
        return []
    return [Issue(ERROR, name, node.op_type, f"cast to {tname}: TensorRT's Cast supports bool, uint8, int8, int32, "
                  f"int64, float16, bfloat16 and float32 only; keep the tensor in one of those (quantize with "
                  f"Q/DQ, not Cast)", "unsupported-cast")]


_COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "Einsum"}


def _rule_fp16_islands(model: Any, types: _Types, trt_version: str) -> list[Issue]:
    """``fp16-island``: a strongly typed TensorRT build obeys the graph's tensor types (TensorRT developer guide,
    "Strongly Typed Networks": types are inferred from the network's inputs and the operators, the builder does not
    change them; TensorRT 11 builds every network this way). So in a graph that computes in fp16 (a MatMul / Gemm /
    Conv reads an fp16 tensor), every fp32-island node (``precision_islands``: the RMSNorm chain, LayerNormalization,
    Softmax) must read and write float32: the developer guide ("Reduced Precision") says to "force the
    normalization layers to FP32" because fp16 overflows there (an activation > 256 squares past 65504). A
    LayerNormalization whose ``stash_type`` is float32 (the ONNX default) is exempt: the parser builds it with
    ``setComputePrecision(stash_type)`` (onnx-tensorrt LayerNormalization importer), so it computes in fp32 whatever
    its I/O type."""
    from edgevlm.graphs.precision_islands import fp32_islands

    onnx = _onnx()
    FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    nodes = list(model.graph.node)
    if not any(n.op_type in _COMPUTE_OPS and any(types.elem(i) == FP16 for i in n.input if i) for n in nodes):
        return []
    kind_of = {name: kind for kind, groups in fp32_islands(model).items() for g in groups for name in g}
    floats = {_tp(t) for t in _FLOAT_TYPES}
    out: list[Issue] = []
    for n in nodes:
        if n.name not in kind_of:
            continue
        if n.op_type == "LayerNormalization" and int(_attr(n, "stash_type", 1)) == FP32:
            continue
        ins = [i for k, i in enumerate(n.input) if i and not (n.op_type == "Pow" and k == 1)]
        bad = [f"{t} ({_type_name(types.elem(t))})" for t in [*ins, *[o for o in n.output if o]]
               if types.elem(t) in floats and types.elem(t) != FP32]
        if bad:
            out.append(Issue(ERROR, n.name, n.op_type, f"{kind_of[n.name]} island node computes in reduced precision "
                             f"in an fp16 graph ({', '.join(bad[:3])}): a strongly typed TensorRT {trt_version} "
                             f"build obeys these types and fp16 overflows in norms/softmax; keep the island in "
                             f"float32 (Cast to float32 before it, back to float16 after: the fp16 conversion's "
                             f"node_block_list = precision_islands.island_nodes)", "fp16-island"))
    return out


# ---- Q/DQ rules -----------------------------------------------------------------------------------------------------
def _check_qdq(node: Any, name: str, graphs: _Graphs, types: _Types, version: tuple[int, int]) -> list[Issue]:
    """All Q/DQ rules for one QuantizeLinear / DequantizeLinear node."""
    out = _rule_qdq_unsigned(node, name, graphs)
    out += _rule_qdq_scale(node, name, graphs)
    out += _rule_qdq_zero_point(node, name, graphs)
    if int(_attr(node, "block_size", 0) or 0) > 0:
        out += _rule_qdq_block(node, name, graphs, types)
    else:
        out += _rule_qdq_axis(node, name, graphs, types, version)
    out += _rule_int4(node, name, graphs, types)
    if node.op_type == "DequantizeLinear":
        out += _rule_dq_output_type(node, name)
        out += _rule_int8_weight_range(node, name, graphs)
    return out


_UNSIGNED = ("UINT8", "UINT4", "UINT16")
_WIDE_QUANT = ("INT16", "INT32", "UINT32")          # legal in ONNX DequantizeLinear, not in TensorRT


def _rule_qdq_unsigned(node: Any, name: str, graphs: _Graphs) -> list[Issue]:
    """``unsigned-qdq``: TensorRT quantizes to signed INT8 / INT4 / FP8 (onnx-tensorrt QuantDequantLinearHelper:
    ``notInvalidType(UINT8)``, "TensorRT only allows FP8, INT8, and INT4 quantization"); a UINT8/UINT4 quantized
    tensor, ``output_dtype`` or zero point is an error."""
    op, out = node.op_type, []
    if op == "DequantizeLinear":
        x = graphs.tensor(node.input[0])
        if x is not None and _type_name(x.data_type) in _UNSIGNED:
            out.append(Issue(ERROR, name, op, f"quantized input is {_type_name(x.data_type)}: TensorRT quantizes to "
                             f"signed INT8/INT4 (use QInt8/QInt4 weights)", "unsigned-qdq"))
        elif x is not None and _type_name(x.data_type) in _WIDE_QUANT:
            out.append(Issue(ERROR, name, op, f"quantized input is {_type_name(x.data_type)}: TensorRT dequantizes "
                             f"only INT8, INT4, FP8 and FP4 (ONNX Runtime's quantize_static writes INT32 biases: "
                             f"keep biases float with extra_options QuantizeBias=False)", "qdq-wide-type"))
    else:
        to = _attr(node, "output_dtype", 0)
        if to and _type_name(to) in _UNSIGNED:
            out.append(Issue(ERROR, name, op, f"output_dtype {_type_name(to)}: TensorRT quantizes to signed "
                             f"INT8/INT4 (use QInt8 activations)", "unsigned-qdq"))
    if len(node.input) > 2 and node.input[2]:
        zp = graphs.tensor(node.input[2])
        if zp is not None and _type_name(zp.data_type) in _UNSIGNED:
            out.append(Issue(ERROR, name, op, f"zero point '{node.input[2]}' is {_type_name(zp.data_type)}: TensorRT "
                             f"quantizes to signed INT8/INT4 with zero point 0 (ActivationSymmetric/WeightSymmetric, "
                             f"QInt8)", "unsigned-qdq"))
    return out


def _rule_qdq_scale(node: Any, name: str, graphs: _Graphs) -> list[Issue]:
    """``qdq-scale-constant`` / ``qdq-scale-dtype`` / ``qdq-scale-positive``. TensorRT's quantization is explicit
    with build-time scales: "The scale tensor must be a build-time constant" (TensorRT operator docs,
    Quantize/Dequantize; activation scales too - there is no run-time calibration in explicit quantization). Scales
    are float32/float16/bfloat16 (operator docs: T1), and "All scale coefficients must have strictly positive
    values" (TensorRT 10.x API, IQuantizeLayer/IDequantizeLayer); the ONNX parser asserts it at import, "Scale
    coefficients must all be positive" (onnx-tensorrt QuantDequantLinearHelper, which also rejects NaN: ``x > 0``
    is false). Infinite scales are rejected here too: they dequantize to inf/NaN."""
    import numpy as np

    op = node.op_type
    if len(node.input) < 2 or not node.input[1]:
        return [Issue(ERROR, name, op, "no scale input: TensorRT needs a constant, positive scale", "qdq-scale-constant")]
    s_name = node.input[1]
    t = graphs.tensor(s_name)
    if t is None:
        if _constant_subgraph(graphs, s_name):
            return [Issue(WARNING, name, op, f"scale '{s_name}' is computed from constants: fold it into an "
                          f"initializer (polygraphy surgeon sanitize --fold-constants) so its values can be checked "
                          f"(TensorRT needs them all > 0)", "qdq-scale-constant")]
        return [Issue(ERROR, name, op, f"scale '{s_name}' is not a constant: TensorRT's explicit quantization needs "
                      f"build-time scales for weights and activations alike; calibrate offline and store the scale "
                      f"as an initializer", "qdq-scale-constant")]
    tname = _type_name(t.data_type)
    if tname not in ("FLOAT", "FLOAT16", "BFLOAT16"):
        return [Issue(ERROR, name, op, f"scale '{s_name}' is {tname}: TensorRT's Q/DQ scales are float32, float16 or "
                      f"bfloat16 (the parser's positivity check fails for any other type)", "qdq-scale-dtype")]
    arr = graphs.array(t, max_elements=_MAX_SCALE_ELEMENTS)
    if arr is None:
        return [Issue(WARNING, name, op, f"scale '{s_name}' could not be read (external data not found or over "
                      f"{_MAX_SCALE_ELEMENTS} values): TensorRT needs every value finite and > 0",
                      "qdq-scale-positive")]
    a = np.asarray(arr).astype(np.float64).reshape(-1)
    if a.size == 0:
        return [Issue(ERROR, name, op, f"scale '{s_name}' is empty: 'Cannot have scale with no coefficients' "
                      f"(TensorRT parser)", "qdq-scale-positive")]
    finite = np.isfinite(a)
    bad = ~(finite & (a > 0))
    n_bad = int(bad.sum())
    if not n_bad:
        return []
    parts = [f"{k} {what}" for k, what in ((int((finite & (a < 0)).sum()), "negative"),
                                           (int((a == 0).sum()), "zero"), (int(np.isnan(a).sum()), "NaN"),
                                           (int(np.isinf(a).sum()), "inf")) if k]
    first = float(a[bad.argmax()])
    x = graphs.tensor(node.input[0])
    hint = (" (onnxruntime's symmetric int4 QDQ writes absmax / -8 with negated weights)"
            if x is not None and _type_name(x.data_type) == "INT4" and (finite & (a < 0)).any() else "")
    return [Issue(ERROR, name, op, f"scale '{s_name}' has {n_bad} of {a.size} value(s) that are not finite and > 0 "
                  f"({', '.join(parts)}; e.g. {first:g}){hint}: TensorRT's parser rejects it ('Scale coefficients must "
                  f"all be positive'); re-quantize with positive scales (amax/7 for int4, amax/127 for int8)",
                  "qdq-scale-positive")]


def _rule_qdq_zero_point(node: Any, name: str, graphs: _Graphs) -> list[Issue]:
    """``asymmetric-qdq``: "zeroPt must only contain zero-valued coefficients, because only symmetric quantization is
    supported" and "The subgraph which terminates with the zeroPt tensor must be a build-time constant containing
    only zeros" (TensorRT 10.x API, IDequantizeLayer; the parser: "TensorRT only supports symmetric quantization")."""
    op = node.op_type
    if len(node.input) < 3 or not node.input[2]:
        return []
    zp_name = node.input[2]
    zp = graphs.tensor(zp_name)
    if zp is None:
        return [Issue(ERROR, name, op, f"zero point '{zp_name}' is not a constant: TensorRT needs a constant zero "
                      f"point of 0 (symmetric quantization)", "asymmetric-qdq")]
    arr = graphs.array(zp, max_elements=_MAX_SCALE_ELEMENTS)
    if arr is None:
        return [Issue(WARNING, name, op, f"zero point '{zp_name}' could not be read (external data not found); "
                      f"TensorRT needs it to be all zeros", "asymmetric-qdq")]
    flat = arr.reshape(-1)
    nonzero = int((flat != 0).sum())
    if not nonzero:
        return []
    first = flat[(flat != 0).argmax()]
    return [Issue(ERROR, name, op, f"asymmetric quantization: zero point '{zp_name}' has {nonzero} non-zero value(s) "
                  f"(e.g. {first}); TensorRT supports symmetric quantization only (zero point 0): re-quantize with "
                  f"ActivationSymmetric=True / WeightSymmetric=True (is_symmetric=True for int4)", "asymmetric-qdq")]


def _norm_axis(axis: int, rank: int) -> int | None:
    a = axis + rank if axis < 0 else axis
    return a if 0 <= a < rank else None


def _rule_qdq_axis(node: Any, name: str, graphs: _Graphs, types: _Types, version: tuple[int, int]) -> list[Issue]:
    """``qdq-axis``: per-tensor scales are scalars, per-channel scales 1-D with one value per element of the
    quantization axis: "The size of the 1D scale tensor must match the size of the quantization axis" (TensorRT 10.x
    API, IDequantizeLayer); the axis must be an axis of the input. A scale of the input's rank without
    ``block_size`` is neither. ``qdq-axis-implicit`` (warning, TensorRT 10.x): a per-channel node without an ``axis``
    attribute means axis 1 in ONNX, but the 10.0/10.1 parser defaults it to 0 for per-channel scales
    (QuantDequantLinearHelper: ``attrs.get("axis", nbDims)`` -> 0); later parsers use 1. Write the axis."""
    op = node.op_type
    s = graphs.tensor(node.input[1]) if len(node.input) > 1 else None
    if s is None:
        return []
    size = 1
    for d in s.dims:
        size *= d
    if size <= 1:
        return []                                                             # per-tensor
    if len(s.dims) != 1:
        return [Issue(ERROR, name, op, f"scale '{node.input[1]}' has shape {list(s.dims)} without block_size: "
                      f"TensorRT takes a scalar (per-tensor), a 1-D scale (per-channel) or a blocked scale with "
                      f"block_size (opset 21)", "qdq-axis")]
    out: list[Issue] = []
    has_axis = any(a.name == "axis" for a in node.attribute)
    axis = int(_attr(node, "axis", 1))
    if not has_axis and version[0] < 11:
        out.append(Issue(WARNING, name, op, "per-channel scale without an explicit 'axis': ONNX means axis 1, the "
                         "TensorRT 10.0/10.1 parser assumes axis 0; write axis=... on the node", "qdq-axis-implicit"))
    shape = types.shape(node.input[0])
    if shape is None:
        return out
    a = _norm_axis(axis, len(shape))
    if a is None:
        out.append(Issue(ERROR, name, op, f"axis {axis} is not an axis of the rank-{len(shape)} input", "qdq-axis"))
    elif isinstance(shape[a], int) and shape[a] > 0 and shape[a] != size:
        out.append(Issue(ERROR, name, op, f"{size} per-channel scales for axis {axis} of size {shape[a]} (input "
                         f"{shape}): 'The number of scales is not equal to the number of output channels' (TensorRT "
                         f"parser); quantize per channel along the axis the scale was computed for", "qdq-axis"))
    return out


def _rule_qdq_block(node: Any, name: str, graphs: _Graphs, types: _Types) -> list[Issue]:
    """``qdq-block`` / ``qdq-block-size``: block quantization (``block_size`` > 0) is for weights only: "a 2-D tensor
    for block quantization (supported for DataType::kINT4 only)" (TensorRT operator docs, Dequantize; FP4 blocks
    came later), a constant weight (INT4 is weight-only); the scale has the input's rank and "must match the shape
    of the input, except for one dimension (the last or second to last dimension) in which blocking occurs"
    (TensorRT 10.x API, IDequantizeLayer). The parser infers the block size from the shapes, input dim / scale dim
    ("Only a single blocking dimension is allowed", "Inferred block size is not an integer"), so a ragged last block
    (K not a multiple of block_size) is misread. The block size TensorRT sees must be one it supports: "INT4
    quantization requires per-block scales. The supported block sizes are {64, 128}" (developer guide, Working with
    Quantized Types > Quantization Schemes); NVFP4 uses 16."""
    op = node.op_type
    bs = int(_attr(node, "block_size", 0) or 0)
    x_name = node.input[0]
    x = graphs.tensor(x_name)
    x_type = _type_name(types.elem(x_name)) if types.elem(x_name) else "?"
    if op == "QuantizeLinear":
        return [Issue(ERROR, name, op, f"blocked QuantizeLinear (block_size {bs}): TensorRT block-quantizes weights "
                      f"only, stored quantized (a DequantizeLinear of an INT4 initializer)", "qdq-block")]
    if x_type not in ("INT4", "FLOAT4E2M1"):
        return [Issue(ERROR, name, op, f"blocked DequantizeLinear of a {x_type} tensor: TensorRT supports block "
                      f"quantization for INT4 weights (and FP4) only; use per-channel scales for INT8",
                      "qdq-block")]
    if x is None:
        return []                                                            # int4-activation names it
    s = graphs.tensor(node.input[1]) if len(node.input) > 1 else None
    xd = list(x.dims)
    if len(xd) != 2:
        return [Issue(ERROR, name, op, f"blocked weight '{x_name}' has shape {xd}: TensorRT block-quantizes 2-D "
                      f"weights", "qdq-block")]
    if s is None:
        return []                                                            # qdq-scale-constant names it
    sd = list(s.dims)
    if len(sd) != len(xd):
        return [Issue(ERROR, name, op, f"blocked scale '{node.input[1]}' has shape {sd}, weight {xd}: the scale must "
                      f"have the weight's rank", "qdq-block")]
    axis = int(_attr(node, "axis", 1))
    a = _norm_axis(axis, len(xd))
    if a is None:
        return [Issue(ERROR, name, op, f"axis {axis} is not an axis of the 2-D weight {xd}", "qdq-block")]
    others = [k for k in range(len(xd)) if k != a and sd[k] != xd[k]]
    if others:
        return [Issue(ERROR, name, op, f"scale {sd} vs weight {xd}: only the blocked axis {a} may differ ('Only a "
                      f"single blocking dimension is allowed')", "qdq-block")]
    K, nb = xd[a], sd[a]
    if nb != -(-K // bs):
        return [Issue(ERROR, name, op, f"scale has {nb} blocks on axis {a} of size {K}, block_size {bs} needs "
                      f"{-(-K // bs)}", "qdq-block")]
    if K % nb:
        return [Issue(ERROR, name, op, f"axis {a} of size {K} is not a multiple of block_size {bs}: TensorRT infers "
                      f"the block from the shapes ({K} / {nb} scale rows is not an integer: 'Inferred block size is "
                      f"not an integer'); use a block size that divides {K}", "qdq-block")]
    eff = K // nb
    if nb > 1 and eff != bs:
        return [Issue(ERROR, name, op, f"axis {a} of size {K} is not a multiple of block_size {bs}: ONNX uses blocks "
                      f"of {bs} with a short last block, TensorRT infers blocks of {eff} from the shapes and "
                      f"dequantizes other elements; use a block size that divides {K}", "qdq-block")]
    allowed = INT4_BLOCK_SIZES if x_type == "INT4" else FP4_BLOCK_SIZES
    if eff not in allowed:
        seen = f"{eff}" + (f" (block_size {bs} on an axis of {K})" if eff != bs else "")
        return [Issue(ERROR, name, op, f"block size {seen} is not one TensorRT supports for {x_type} weights "
                      f"({' or '.join(map(str, allowed))}; developer guide 'Quantization Schemes'): re-quantize with "
                      f"block_size {' or '.join(map(str, allowed))} dividing {K}", "qdq-block-size")]
    return []


def _rule_int4(node: Any, name: str, graphs: _Graphs, types: _Types) -> list[Issue]:
    """``int4-activation``: "TensorRT only supports INT4 for weight quantization" / "Weight-only quantization is
    supported for INT4" (developer guide, Working with Quantized Types): a QuantizeLinear to INT4 or a
    DequantizeLinear of a non-constant INT4 tensor quantizes activations. ``int4-odd``: INT4 is packed two values per
    byte: "Quantization to INT4 is not supported for tensors with an odd last dimension" (onnx-tensorrt 10.1
    QuantDequantLinearHelper; later parsers: an even number of elements)."""
    op, out = node.op_type, []
    x_name = node.input[0]
    if op == "QuantizeLinear":
        q = _attr(node, "output_dtype", 0)
        if not q and len(node.input) > 2 and node.input[2]:
            zp = graphs.tensor(node.input[2])
            q = zp.data_type if zp is not None else types.elem(node.input[2])
        if q and _type_name(q) in ("INT4", "UINT4"):
            out.append(Issue(ERROR, name, op, "QuantizeLinear to INT4 quantizes an activation: TensorRT's INT4 is "
                             "weight-only (blocked DequantizeLinear of an INT4 initializer); keep activations in "
                             "float or INT8", "int4-activation"))
        return out
    x = graphs.tensor(x_name)
    if _type_name(types.elem(x_name)) not in ("INT4", "UINT4"):
        return out
    if x is None:
        out.append(Issue(ERROR, name, op, f"DequantizeLinear of the INT4 tensor '{x_name}', which is computed at run "
                         f"time: TensorRT's INT4 is weight-only (dequantize an INT4 initializer)", "int4-activation"))
        return out
    if x.dims and x.dims[-1] % 2:
        out.append(Issue(ERROR, name, op, f"INT4 weight '{x_name}' {list(x.dims)} has an odd last dimension: TensorRT "
                         f"packs INT4 in pairs ('Quantization to INT4 is not supported for tensors with an odd last "
                         f"dimension')", "int4-odd"))
    return out


def _rule_dq_output_type(node: Any, name: str) -> list[Issue]:
    """``dq-output-type``: a DequantizeLinear's ``output_dtype`` must be float, half or bfloat16 (onnx-tensorrt
    QuantDequantLinearHelper: "Attribute output_dtype specifies an invalid data type for DequantizeLinear"); without
    it the output has the scale's type."""
    to = _attr(node, "output_dtype", 0)
    if not to or _type_name(to) in ("FLOAT", "FLOAT16", "BFLOAT16"):
        return []
    return [Issue(ERROR, name, node.op_type, f"output_dtype {_type_name(to)}: TensorRT dequantizes to float32, "
                  f"float16 or bfloat16", "dq-output-type")]


def _rule_int8_weight_range(node: Any, name: str, graphs: _Graphs) -> list[Issue]:
    """``int8-weight-range`` (warning): TensorRT's symmetric INT8 keeps weights in [-127, 127] (reference §4.1;
    activations use [-128, 127]); a -128 in a weight has no positive counterpart and marks a quantizer that used the
    full asymmetric range (onnxruntime ``reduce_range`` / non-symmetric weights). Weights over 16M values are not
    read."""
    x = graphs.tensor(node.input[0])
    if x is None or _type_name(x.data_type) != "INT8":
        return []
    arr = graphs.array(x, max_elements=_MAX_WEIGHT_ELEMENTS)
    if arr is None or arr.size == 0:
        return []
    n = int((arr == -128).sum())
    if not n:
        return []
    return [Issue(WARNING, name, node.op_type, f"INT8 weight '{node.input[0]}' holds -128 ({n} value(s)): symmetric "
                  f"INT8 weights for TensorRT use [-127, 127] (quantize with WeightSymmetric=True)",
                  "int8-weight-range")]


# ---- masks ---------------------------------------------------------------------------------------------------------
def _is_extreme(graphs: _Graphs, tensor: Any) -> bool:
    import numpy as np

    T = graphs.onnx.TensorProto
    if tensor.data_type not in (T.FLOAT, T.FLOAT16, T.DOUBLE, T.BFLOAT16):
        return False
    arr = graphs.array(tensor, max_elements=_MAX_SCAN_ELEMENTS)
    if arr is None or arr.size == 0:
        return False
    arr = arr.astype(np.float64)
    limit = 65504.0 if tensor.data_type == T.FLOAT16 else 3.0e38
    return bool(np.isinf(arr).any() or (np.abs(arr) >= limit).any())


def _mask_consumers(graphs: _Graphs, tensor_name: str) -> list[Any]:
    """Where/Add nodes ``tensor_name`` reaches directly or through shape/cast ops (at most ``_MASK_DEPTH`` hops)."""
    found, frontier = [], [tensor_name]
    for _ in range(_MASK_DEPTH):
        nxt = []
        for t in frontier:
            for consumer in graphs.consumers.get(t, []):
                if consumer.op_type in _MASK_CONSUMERS:
                    found.append(consumer)
                elif consumer.op_type in _PASS_THROUGH:
                    nxt.extend(o for o in consumer.output if o)
        frontier = nxt
        if not frontier:
            break
    return found


def _check_masks(model: Any, graphs: _Graphs) -> list[Issue]:
    T = graphs.onnx.TensorProto
    # Candidate constants; only those reaching Where/Add are read (weights feeding MatMul never are).
    candidates: list[tuple[str, Any, str]] = [(n, t, f"initializer '{n}'") for n, t in graphs.initializers.items()]
    candidates += [(n, t, f"Constant '{_label(graphs.producers[n])}'") for n, t in graphs.constants.items()]
    for graph in _walk_graphs(model.graph):
        for node in graph.node:
            if node.op_type == "ConstantOfShape":
                value = _attr(node, "value")
                if value is not None and value.data_type in (T.FLOAT, T.FLOAT16):
                    candidates.append((node.output[0], value, f"ConstantOfShape '{_label(node)}'"))
    issues: list[Issue] = []
    reported: set[str] = set()
    for tensor_name, tensor, origin in candidates:
        targets = [c for c in _mask_consumers(graphs, tensor_name) if _label(c) not in reported]
        if not targets or not _is_extreme(graphs, tensor):
            continue
        for consumer in targets:
            reported.add(_label(consumer))
            issues.append(Issue(WARNING, _label(consumer), consumer.op_type,
                                f"{origin} holds -inf / float lowest and feeds this node: use finite mask constants "
                                f"(e.g. -1e4 in fp16, build masks in fp32); fp16 overflows to -inf and a fully "
                                f"masked row gives NaN", "infinite-mask"))
    return issues



def assert_tensorrt_compat(model: Any, trt_version: str, *, allow_int4_opset21: bool = True,
                           component: str = "", strongly_typed: bool | None = None) -> list[Issue]:
    """Raise ``TargetError`` listing every error-level issue (with its rule code); log and return the warnings
    otherwise. Arguments as ``check_tensorrt_compat``."""
    issues = check_tensorrt_compat(model, trt_version, allow_int4_opset21=allow_int4_opset21,
                                   strongly_typed=strongly_typed)
    errors = [i for i in issues if i.severity == ERROR]
    warnings = [i for i in issues if i.severity == WARNING]
    what = component or (str(model) if not hasattr(model, "graph") else (model.graph.name or "model"))
    for w in warnings:
        log.warning("%s: %s", what, w)
    if errors:
        lines = [f"{what}: {len(errors)} problem(s) TensorRT {trt_version} rejects (rule book: docs/tensorrt.md):"]
        lines += [f"  - {e.node} ({e.op}) [{e.code}]: {e.message}" if e.op else f"  - [{e.code}] {e.message}"
                  for e in errors]
        exc = TargetError("\n".join(lines))
        exc.issues = issues  # type: ignore[attr-defined]
        raise exc
    return warnings


# ---- build plan rules -----------------------------------------------------------------------------------------------
def _dim_kind(sym: str) -> str | None:
    """"past_seq" -> "past", "past_seq + seq" -> "total", unknown -> None."""
    from edgevlm.graphs.trt_plan import DIM_KIND_OF       # the planner's names: batch, seq, past, total

    kinds = sorted(DIM_KIND_OF.get(t.strip().lower(), "?") for t in str(sym).split("+"))
    if kinds in (["total"], ["past", "seq"]):
        return "total"
    return kinds[0] if len(kinds) == 1 and kinds[0] != "?" else None


def _graph_io(g: Any) -> tuple[dict[str, list[Any]] | None, Any]:
    """(input name -> dims, ModelProto or None) from a ModelProto, an ONNX path, a {name: dims} mapping or a list of
    objects with ``name`` and ``shape`` (ONNX Runtime inputs, ``trt_plan.GraphInput``)."""
    if g is None:
        return None, None
    onnx = None
    if isinstance(g, (str, os.PathLike)):
        onnx = _onnx()
        path = Path(g)
        if not path.is_file():
            raise TargetError(f"ONNX file {path} not found")
        g = onnx.load(str(path), load_external_data=False)
    if hasattr(g, "graph"):
        inits = {i.name for i in g.graph.initializer}
        dims = {}
        for v in g.graph.input:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return dims, g
    if isinstance(g, Mapping):
        return {str(k): list(v) for k, v in g.items()}, None
    return {str(i.name): ["?" if d is None else d for d in (i.shape or [])] for i in g}, None


def _plan_objects(plan: Any) -> tuple[Any, dict[str, Mapping[str, Any]]]:
    """(BuildPlan, {component: raw engine dict}) from a BuildPlan, its dict or build_plan.json's folder/path."""
    from edgevlm.graphs.trt_plan import BuildPlan

    if isinstance(plan, (str, os.PathLike)):
        plan = BuildPlan.load(plan)
    if isinstance(plan, Mapping):
        raw = {str(e.get("component")): e for e in plan.get("engines", []) if isinstance(e, Mapping)}
        return BuildPlan.from_dict(plan), raw
    return plan, {}


def check_build_plan(plan: Any, graphs: Any = None, manifest: Mapping[str, Any] | None = None) -> list[Issue]:
    """Every reason the build plan would not build, or would build engines the runtime cannot drive (the plan rules
    of the module docstring; ``RULES`` has each code's source).

    Args:
        plan: a ``trt_plan.BuildPlan``, its dict (``build_plan.json``), or a bundle folder / ``build_plan.json``
            path (then ``graphs`` and ``manifest`` default to that bundle's graphs and manifest.json).
        graphs: ``{component: ModelProto | ONNX path | {input: dims} | ONNX Runtime inputs}`` or a bundle folder
            (each engine's ``onnx`` inside it). Without a graph a component's inputs come from the manifest; the
            ``fp32-layers`` rule needs the ModelProto (or path).
        manifest: the bundle's manifest dict (``profile-context``, and the components' inputs as a fallback).
    """
    if isinstance(plan, (str, os.PathLike)):
        root = Path(plan)
        root = root.parent if root.is_file() else root
        if graphs is None:
            graphs = root
        if manifest is None and (root / "manifest.json").is_file():
            import json

            manifest = json.loads((root / "manifest.json").read_text())
    plan, raw = _plan_objects(plan)
    if isinstance(graphs, (str, os.PathLike)):
        root = Path(graphs)
        graphs = {e.component: root / e.onnx for e in plan.engines if (root / e.onnx).is_file()}
    graphs = dict(graphs or {})
    comps = (manifest or {}).get("components") or {}
    issues = _rule_builder_mode(plan)
    issues += _rule_context(plan, manifest)
    for e in plan.engines:
        inputs, model = _graph_io(graphs.get(e.component))
        if inputs is None and isinstance(comps.get(e.component), Mapping):
            declared = comps[e.component].get("inputs") or []
            inputs = {str(i["name"]): list(i.get("shape", i.get("dims", []))) for i in declared
                      if isinstance(i, Mapping) and "name" in i} or None
        if inputs is not None:
            issues += _rule_profile_inputs(e, inputs)
            issues += _rule_profile_ranges(e, inputs)
            issues += _rule_profile_kv(e, inputs, plan)
        issues += _rule_dla(e)
        if model is not None:
            issues += _rule_fp32_layers(plan, e, model, raw.get(e.component, {}))
    return issues


def _rule_builder_mode(plan: Any) -> list[Issue]:
    """``builder-mode``: TensorRT 11 removed weak typing and the precision flags (``--fp16/--int8/--int4/--best``,
    ``BuilderFlag.FP16/INT8``; TensorRT 10.x-to-11.x migration guide), and with strong typing "Precision-control
    build flags are not required and should not be specified" (developer guide, Explicit Quantization)."""
    out = []
    major = parse_trt_version(plan.tensorrt)[0]
    if plan.builder_mode not in ("weak", "strong"):
        out.append(Issue(ERROR, "<plan>", "", f"builder_mode '{plan.builder_mode}' is neither weak nor strong",
                         "builder-mode"))
    elif plan.builder_mode == "weak" and major >= 11:
        out.append(Issue(ERROR, "<plan>", "", f"a weakly typed plan for TensorRT {plan.tensorrt}: weak typing was "
                         f"removed in TensorRT 11.0 (re-export for the target: 11.x plans are strongly typed)",
                         "builder-mode"))
    if plan.builder_mode == "strong":
        for e in plan.engines:
            if e.precision_flags:
                out.append(Issue(ERROR, e.component, "", f"precision flags {list(e.precision_flags)} in a strongly "
                                 f"typed plan: the graph's dtypes are the precision (TensorRT 11 has no such flags)",
                                 "builder-mode"))
    return out


def _manifest_context(manifest: Mapping[str, Any]) -> tuple[int | None, str]:
    dec = ((manifest.get("components") or {}).get("decoder") or {})
    kv = dec.get("kv_cache") if isinstance(dec, Mapping) else None
    kv = kv if isinstance(kv, Mapping) else {}
    for value, where in ((kv.get("max_length"), "components.decoder.kv_cache.max_length"),
                         ((manifest.get("memory_plan") or {}).get("context"), "memory_plan.context"),
                         (kv.get("max_positions"), "components.decoder.kv_cache.max_positions")):
        if isinstance(value, int) and value > 0:
            return value, where
    return None, ""


def _rule_context(plan: Any, manifest: Mapping[str, Any] | None) -> list[Issue]:
    """``profile-context``: the decode profile is built for ``plan.context`` KV positions and the runtime allocates
    the KV cache and the mask for the manifest's context, so the two must be equal (a runtime shape outside the
    profile is an error: IOptimizationProfile); the prompt budget fits in it, and no position is planned beyond the
    model's position table (``kv_cache.max_positions``)."""
    out = []
    if plan.max_prompt_tokens > plan.context:
        out.append(Issue(ERROR, "<plan>", "", f"max_prompt_tokens {plan.max_prompt_tokens} > context {plan.context}",
                         "profile-context"))
    if not manifest:
        return out
    cap, where = _manifest_context(manifest)
    if cap is not None and cap != plan.context:
        out.append(Issue(ERROR, "<plan>", "", f"the plan's context is {plan.context} KV positions, the manifest's "
                         f"{where} is {cap}: the runtime would run shapes the engines' profiles do not cover (or "
                         f"waste memory); re-export so both agree", "profile-context"))
    kv = (((manifest.get("components") or {}).get("decoder") or {}).get("kv_cache") or {})
    mp = kv.get("max_positions") if isinstance(kv, Mapping) else None
    if isinstance(mp, int) and plan.context > mp:
        out.append(Issue(ERROR, "<plan>", "", f"the plan's context {plan.context} exceeds the model's "
                         f"{mp} positions (kv_cache.max_positions)", "profile-context"))
    return out


def _rule_profile_inputs(e: Any, inputs: Mapping[str, list[Any]]) -> list[Issue]:
    """``profile-input``: "users need to specify at least one optimization profile" for a network with dynamic
    inputs, each with min/opt/max dimensions for every dynamic input (TensorRT 10.x API, IOptimizationProfile;
    reference §4.3: every dynamic input needs a range in every profile); a range for a name the graph does not have
    is rejected by trtexec, and a range's rank must be the input's."""
    out = []
    dynamic = [n for n, d in inputs.items() if any(not isinstance(x, int) or x < 0 for x in d)]
    if dynamic and not e.profiles:
        out.append(Issue(ERROR, e.component, "", f"no optimization profile for the dynamic inputs {dynamic}",
                         "profile-input"))
    for prof in e.profiles:
        where = f"{e.component}/{prof.name}"
        extra = sorted(set(prof.shapes) - set(inputs))
        if extra:
            out.append(Issue(ERROR, where, "", f"ranges for {extra}, which are not inputs of the graph "
                             f"({sorted(inputs)})", "profile-input"))
        missing = [n for n in dynamic if n not in prof.shapes]
        if missing:
            out.append(Issue(ERROR, where, "", f"dynamic inputs {missing} have no min/opt/max range in this profile",
                             "profile-input"))
        for n, rng in prof.shapes.items():
            if n in inputs and not len(rng.min) == len(rng.opt) == len(rng.max) == len(inputs[n]):
                out.append(Issue(ERROR, where, "", f"'{n}' range ranks {len(rng.min)}/{len(rng.opt)}/{len(rng.max)} "
                                 f"differ from the graph's {inputs[n]}", "profile-input"))
    return out


def _rule_profile_ranges(e: Any, inputs: Mapping[str, list[Any]]) -> list[Issue]:
    """``profile-range``: IOptimizationProfile::setDimensions needs min <= opt <= max in every dimension (and no
    negative size), and a dimension that is static in the network must be that value in min, opt and max (TensorRT
    10.x API)."""
    out = []
    for prof in e.profiles:
        where = f"{e.component}/{prof.name}"
        for n, rng in prof.shapes.items():
            dims = inputs.get(n)
            if dims is None or not len(rng.min) == len(rng.opt) == len(rng.max) == len(dims):
                continue
            for k, d in enumerate(dims):
                lo, op, hi = rng.min[k], rng.opt[k], rng.max[k]
                if not 0 <= lo <= op <= hi:
                    out.append(Issue(ERROR, where, "", f"'{n}' dim {k} range {lo}/{op}/{hi} is not "
                                     f"0 <= min <= opt <= max", "profile-range"))
                if isinstance(d, int) and d >= 0 and not lo == op == hi == d:
                    out.append(Issue(ERROR, where, "", f"'{n}' dim {k} is static {d} in the graph, planned "
                                     f"{lo}/{op}/{hi}", "profile-range"))
    return out


def _coverage(prof: Any, inputs: Mapping[str, list[Any]]) -> dict[str, tuple[int, int]]:
    """kind (batch/seq/past/total) -> the (min, max) every input of the profile accepts (intersection)."""
    cov: dict[str, tuple[int, int]] = {}
    for n, rng in prof.shapes.items():
        dims = inputs.get(n)
        if dims is None or len(dims) != len(rng.min) or len(rng.max) != len(dims):
            continue
        for k, d in enumerate(dims):
            kind = _dim_kind(d) if isinstance(d, str) else None
            if kind is None:
                continue
            lo, hi = rng.min[k], rng.max[k]
            cov[kind] = (max(cov[kind][0], lo), min(cov[kind][1], hi)) if kind in cov else (lo, hi)
    return cov


def _rule_profile_kv(e: Any, inputs: Mapping[str, list[Any]], plan: Any) -> list[Issue]:
    """``profile-kv``: the runtime drives a KV-cache decoder (``past`` dims) with two shapes families: a prefill of
    1..max_prompt_tokens new tokens from an empty cache (zero-length past) and decode steps of one token on a past of
    1..context-1, each with an ``attention_mask`` of past + seq; "A runtime error will be raised if the input tensor
    dimensions fall outside the valid range for this profile" (TensorRT 10.x API, IOptimizationProfile), so some
    profile must cover each (the one named ``decode`` / ``prefill`` when present), and in every profile the mask's
    total length must cover past + seq."""
    covs = [(p, _coverage(p, inputs)) for p in e.profiles]
    if not any("past" in c for _, c in covs):
        return []
    out, ctx, pmax = [], int(plan.context), int(plan.max_prompt_tokens)

    def pick(name: str, test) -> tuple[Any, dict[str, tuple[int, int]]] | None:
        named = [pc for pc in covs if pc[0].name == name]
        return (named or [pc for pc in covs if test(pc[1])] or [None])[0]

    dec = pick("decode", lambda c: "past" in c and c.get("seq", (1, 1))[1] == 1 and c["past"][1] > 0)
    if dec is None:
        out.append(Issue(ERROR, e.component, "", f"no decode profile: some profile must run one token on a past of "
                         f"1..{ctx - 1}", "profile-kv"))
    else:
        p, c = dec
        past, seq = c.get("past", (0, 0)), c.get("seq", (1, 1))
        if not (past[0] <= 1 and past[1] >= ctx - 1):
            out.append(Issue(ERROR, f"{e.component}/{p.name}", "", f"past length range {past[0]}..{past[1]} does not "
                             f"cover the decode steps' 1..{ctx - 1} (context {ctx})", "profile-kv"))
        if not seq[0] <= 1 <= seq[1]:
            out.append(Issue(ERROR, f"{e.component}/{p.name}", "", f"seq range {seq[0]}..{seq[1]} does not accept "
                             f"the one-token decode step", "profile-kv"))
    pre = pick("prefill", lambda c: c.get("seq", (1, 1))[1] > 1)
    if pre is None:
        out.append(Issue(ERROR, e.component, "", f"no prefill profile: some profile must accept 1..{pmax} prompt "
                         f"tokens on an empty cache", "profile-kv"))
    else:
        p, c = pre
        past, seq = c.get("past", (0, 0)), c.get("seq", (1, 1))
        if not (seq[0] <= 1 and seq[1] >= pmax):
            out.append(Issue(ERROR, f"{e.component}/{p.name}", "", f"seq range {seq[0]}..{seq[1]} does not cover "
                             f"prompts of 1..{pmax} tokens (max_prompt_tokens)", "profile-kv"))
        if past[0] > 0:
            out.append(Issue(ERROR, f"{e.component}/{p.name}", "", f"past length range {past[0]}..{past[1]} does not "
                             f"accept the empty cache (past 0) a prefill starts from", "profile-kv"))
    for p, c in covs:
        if "total" in c and "past" in c and "seq" in c:
            (tlo, thi), (plo, phi), (slo, shi) = c["total"], c["past"], c["seq"]
            if tlo > plo + slo or thi < phi + shi:
                out.append(Issue(ERROR, f"{e.component}/{p.name}", "", f"attention_mask length range {tlo}..{thi} "
                                 f"does not cover past + seq = {plo + slo}..{phi + shi}", "profile-kv"))
    return out


def _rule_dla(e: Any) -> list[Issue]:
    """``dla-static``: DLA runs static shapes only (min = opt = max) at FP16 or INT8 (TensorRT developer guide,
    Working with DLA; reference §4.6)."""
    if e.dla_core is None:
        return []
    out = []
    for prof in e.profiles:
        for n, rng in prof.shapes.items():
            if not tuple(rng.min) == tuple(rng.opt) == tuple(rng.max):
                out.append(Issue(ERROR, f"{e.component}/{prof.name}", "", f"'{n}' range {list(rng.min)}.."
                                 f"{list(rng.max)} on DLA core {e.dla_core}: DLA needs min = opt = max",
                                 "dla-static"))
    bad = [p for p in e.precisions if p not in ("fp16", "int8")]
    if bad:
        out.append(Issue(ERROR, e.component, "", f"precisions {bad} on DLA core {e.dla_core}: DLA runs FP16/INT8 only",
                         "dla-static"))
    return out


def _rule_fp32_layers(plan: Any, e: Any, model: Any, raw: Mapping[str, Any]) -> list[Issue]:
    """``fp32-layers``: a weakly typed build with ``--fp16`` lets TensorRT pick fp16 for any layer unless its
    precision is constrained (TensorRT 10 developer guide, Reduced Precision: ``ILayer::setPrecision`` /
    ``setOutputType`` + ``OBEY_PRECISION_CONSTRAINTS``, trtexec ``--precisionConstraints=obey --layerPrecisions``;
    its builder warns to "force the normalization layers to FP32"), so the plan must list every fp32-island node
    (``precision_islands.island_nodes``) in ``EnginePlan.fp32_layers``. An error where this edgevlm's plans carry
    ``fp32_layers``, a warning for an older plan format."""
    from edgevlm.graphs import trt_plan
    from edgevlm.graphs.precision_islands import island_nodes

    if plan.builder_mode != "weak" or "fp16" not in e.precision_flags:
        return []
    islands = island_nodes(model)
    if not islands:
        return []
    pinned = set(getattr(e, "fp32_layers", None) or raw.get("fp32_layers") or ())
    missing = [n for n in islands if n not in pinned]
    if not missing:
        return []
    known = "fp32_layers" in getattr(trt_plan.EnginePlan, "__dataclass_fields__", {})
    return [Issue(ERROR if known else WARNING, e.component, "", f"{len(missing)} of {len(islands)} fp32-island "
                  f"node(s) (RMSNorm/LayerNorm/Softmax) are not pinned to fp32 in this weakly typed --fp16 build "
                  f"(e.g. {', '.join(missing[:3])}): TensorRT may run them in fp16, where they overflow; re-export "
                  f"with an edgevlm whose plan lists them in fp32_layers", "fp32-layers")]


__all__ = ["Issue", "check_tensorrt_compat", "assert_tensorrt_compat", "check_build_plan", "supported_ops", "RULES",
           "INT4_BLOCK_SIZES", "FP4_BLOCK_SIZES", "ERROR", "WARNING"]
