"""Will TensorRT's ONNX parser take this graph? A static check before anything is built on a device.

    >>> from edgevlm.exporter.trt_compat import check_tensorrt_compat, assert_tensorrt_compat
    >>> issues = check_tensorrt_compat("bundle/decoder.onnx", "10.3")     # list[Issue], errors and warnings
    >>> assert_tensorrt_compat("bundle/decoder.onnx", "10.3")             # raises TargetError naming every node

Rules (facts: reference/onnx-ort-tensorrt.md §4.1, §4.7, §7; onnx-tensorrt docs/operators.md and changelog):
- only the default ONNX domain: ``com.microsoft`` contrib ops (MatMulNBits, GroupQueryAttention, ...) and other
  custom domains are errors (a custom-domain node that is a model-local function is checked through its body);
- every op must be in the TensorRT version's parser operator list (``supported_ops``); ops known to be
  unsupported (MatMulInteger, DynamicQuantizeLinear, QLinear*, sequence ops, bitwise ops) name the fix;
- the default-domain opset must not exceed the version's maximum (20 for 10.0-10.8, 22 from 10.9, 24 from 10.13,
  25 for 11.x); opset 21 on a max-20 parser is accepted as a warning when the model has blocked INT4
  DequantizeLinear (``allow_int4_opset21``), the one opset-21 feature the 10.x parser handles;
- Quantize/DequantizeLinear: TensorRT quantization is symmetric and signed: a zero point that is not all zeros is
  an "asymmetric" error, a UINT8/UINT4 zero point or quantized tensor is an error, a zero point that is not a
  constant is an error;
- ScatterND with a ``reduction`` other than "none" is an error;
- a constant holding -inf or float32 lowest (``finfo.min``; fp16 lowest in fp16 tensors) that feeds Where/Add
  (directly or through Cast/Expand/Reshape/... ) is a warning: "use finite mask constants" (fp16 overflow -> NaN);
- ReduceMean/ReduceSum/... with non-constant ``axes`` and some data-dependent ops are warnings.
Subgraphs (If/Loop/Scan bodies) are checked too. Issues name the node (name + op_type).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def check_tensorrt_compat(model: Any, trt_version: str, *, allow_int4_opset21: bool = True) -> list[Issue]:
    """Every reason the TensorRT ``trt_version`` ONNX parser would reject (error) or mishandle (warning) ``model``.

    Args:
        model: an ``onnx.ModelProto`` or a path (external data stays on disk; small tensors are read on demand).
        trt_version: e.g. ``"10.3"`` (JetPack 6) or ``"11.4"``.
        allow_int4_opset21: accept opset 21 on a max-20 parser when the model has blocked INT4 DequantizeLinear.
    """
    model, base_dir = _load(model)
    onnx = _onnx()
    ops = supported_ops(trt_version)
    version = parse_trt_version(trt_version)
    max_opset = trt_opset_max(trt_version)
    graphs = _Graphs(model, base_dir)
    issues: list[Issue] = []
    nodes = list(_iter_nodes(model))

    # ---- opset ----
    opset = _default_opset(model)
    blocked = [n for n, _ in nodes if _is_blocked_dq(n, graphs)]
    if opset > max_opset:
        if allow_int4_opset21 and opset == 21 and max_opset == 20 and blocked:
            issues.append(Issue(WARNING, "<model>", "", f"opset 21 > {max_opset} (TensorRT {trt_version}) accepted "
                                f"for {len(blocked)} blocked INT4 DequantizeLinear node(s) only; verify the parse on "
                                f"the device", "opset"))
        else:
            why = (" (opset 21 is accepted only for blocked INT4 DequantizeLinear, and this model has none)"
                   if opset == 21 and max_opset == 20 else "")
            issues.append(Issue(ERROR, "<model>", "", f"default-domain opset {opset} exceeds TensorRT {trt_version}'s "
                                f"maximum {max_opset}{why}: re-export with opset {max_opset} (torch.onnx.export("
                                f"..., opset_version={max_opset}); opset >= 23 also emits Attention/RMSNormalization)",
                                "opset"))

    # ---- nodes ----
    for node, scope in nodes:
        name = scope + _label(node)
        op = node.op_type
        if node.domain not in DEFAULT_DOMAINS:
            hint = _CONTRIB_HINTS.get(op, "TensorRT parses only the default ONNX domain (custom ops need plugins)")
            issues.append(Issue(ERROR, name, op, f"custom-domain op '{node.domain}::{op}' is not supported by the "
                                f"TensorRT ONNX parser: {hint}", "domain"))
            continue
        if op not in ops:
            if op in _UNSUPPORTED_HINTS:
                msg = f"not supported by the TensorRT {trt_version} ONNX parser: {_UNSUPPORTED_HINTS[op]}"
            else:
                added = next((f" (added in TensorRT {s[0]}.{s[1]})" for s, a in _OPS_ADDED if op in a), "")
                msg = f"not in the TensorRT {trt_version} ONNX parser's operator list{added}"
            issues.append(Issue(ERROR, name, op, msg, "unsupported-op"))
            continue
        if op in ("QuantizeLinear", "DequantizeLinear"):
            issues += _check_qdq(node, name, graphs)
        elif op == "ScatterND":
            red = _attr(node, "reduction", b"none")
            red = red.decode() if isinstance(red, bytes) else str(red)
            if red != "none":
                issues.append(Issue(ERROR, name, op, f"ScatterND reduction='{red}' is not supported by TensorRT: "
                                    f"write the update without a reduction", "scatternd-reduction"))
            elif opset >= 18 and version < (10, 9):
                issues.append(Issue(WARNING, name, op, f"ScatterND at opset {opset} was fixed in the 10.9 parser; "
                                    f"verify the parse on TensorRT {trt_version}", "scatternd-opset"))
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
        elif op == "Cast" and _attr(node, "to") == onnx.TensorProto.DOUBLE:
            issues.append(Issue(WARNING, name, op, "cast to DOUBLE: TensorRT computes it in FLOAT", "double"))

    issues += _check_masks(model, graphs)
    return issues


def _check_qdq(node: Any, name: str, graphs: _Graphs) -> list[Issue]:
    onnx = graphs.onnx
    T = onnx.TensorProto
    op = node.op_type
    out: list[Issue] = []
    unsigned = {T.UINT8: "UINT8", T.UINT4: "UINT4", T.UINT16: "UINT16"}
    if op == "DequantizeLinear":
        x = graphs.tensor(node.input[0])
        if x is not None and x.data_type in unsigned:
            out.append(Issue(ERROR, name, op, f"quantized input is {unsigned[x.data_type]}: TensorRT quantizes to "
                             f"signed INT8/INT4 (use QInt8/QInt4 weights)", "unsigned-qdq"))
    else:
        to = _attr(node, "output_dtype", 0)
        if to in unsigned:
            out.append(Issue(ERROR, name, op, f"output_dtype {unsigned[to]}: TensorRT quantizes to signed "
                             f"INT8/INT4 (use QInt8 activations)", "unsigned-qdq"))
    if len(node.input) < 3 or not node.input[2]:
        return out
    zp_name = node.input[2]
    zp = graphs.tensor(zp_name)
    if zp is None:
        out.append(Issue(ERROR, name, op, f"zero point '{zp_name}' is not a constant: TensorRT needs a constant zero "
                         f"point of 0 (symmetric quantization)", "asymmetric-qdq"))
        return out
    if zp.data_type in unsigned:
        out.append(Issue(ERROR, name, op, f"zero point '{zp_name}' is {unsigned[zp.data_type]}: TensorRT quantizes to "
                         f"signed INT8/INT4 with zero point 0 (ActivationSymmetric/WeightSymmetric, QInt8)",
                         "unsigned-qdq"))
    arr = graphs.array(zp)
    if arr is None:
        out.append(Issue(WARNING, name, op, f"zero point '{zp_name}' could not be read (external data not found); "
                         f"TensorRT needs it to be all zeros", "asymmetric-qdq"))
        return out
    nonzero = int((arr != 0).sum())
    if nonzero:
        first = arr.reshape(-1)[(arr.reshape(-1) != 0).argmax()]
        out.append(Issue(ERROR, name, op, f"asymmetric quantization: zero point '{zp_name}' has {nonzero} non-zero "
                         f"value(s) (e.g. {first}); TensorRT supports symmetric quantization only (zero point 0): "
                         f"re-quantize with ActivationSymmetric=True / WeightSymmetric=True (is_symmetric=True for "
                         f"int4)", "asymmetric-qdq"))
    return out


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
                           component: str = "") -> list[Issue]:
    """Raise ``TargetError`` listing every error-level issue; log and return the warnings otherwise."""
    issues = check_tensorrt_compat(model, trt_version, allow_int4_opset21=allow_int4_opset21)
    errors = [i for i in issues if i.severity == ERROR]
    warnings = [i for i in issues if i.severity == WARNING]
    what = component or (str(model) if not hasattr(model, "graph") else (model.graph.name or "model"))
    for w in warnings:
        log.warning("%s: %s", what, w)
    if errors:
        lines = [f"{what}: {len(errors)} problem(s) TensorRT {trt_version} cannot parse:"]
        lines += [f"  - {e.node} ({e.op}): {e.message}" if e.op else f"  - {e.message}" for e in errors]
        exc = TargetError("\n".join(lines))
        exc.issues = issues  # type: ignore[attr-defined]
        raise exc
    return warnings


__all__ = ["Issue", "check_tensorrt_compat", "assert_tensorrt_compat", "supported_ops", "ERROR", "WARNING"]
