"""TensorRT build plans: optimization profiles, builder flags per TensorRT version, per-layer fp32 constraints, DLA
placement, ``build_plan.json`` and a ``build_engines.sh`` of trtexec commands to run on the device. Torch-free;
``plan_tensorrt_build`` is pure data, ``prepare_tensorrt_bundle`` / ``graph_facts`` read the ONNX graphs (graph
only, no weights).

    >>> from edgevlm.config import get_model_config
    >>> from edgevlm.targets import get_target
    >>> from edgevlm.graphs.trt_plan import plan_tensorrt_build, write_build_files
    >>> plan = plan_tensorrt_build(get_model_config("mobilevlm-1.7b"), get_target("jetson-orin"))
    >>> write_build_files("bundle_dir", plan)      # bundle_dir/build_plan.json + bundle_dir/build_engines.sh
    >>> entry = prepare_tensorrt_bundle("bundle_dir", cfg, "jetson-orin")   # compat check + plan + files (export)

Inputs: the bundle's graphs as ``EngineComponent``s (name, ONNX file, inputs with symbolic dims, the precisions
inside the graph). ``standard_components`` gives edgevlm's own (vision.onnx, decoder.onnx with Optimum I/O:
``inputs_embeds [batch, seq, D]``, ``attention_mask [batch, past_seq + seq]``, ``position_ids [batch, seq]``,
``past_key_values.{i}.key|value [batch, kv_heads, past_seq, head_dim]``); ``components_from_manifest`` and
``EngineComponent.from_spec`` read other descriptions. The embedding table is gathered on the host: no engine.
``GraphFacts`` (from ``graph_facts``, what ``prepare_tensorrt_bundle`` passes as ``graphs=``) adds what only the
graph knows: the fp32 islands, the weight and float dtypes, the ops DLA cannot run.

Optimization profiles (symbolic dims: batch, seq, past (past_seq), total (past_seq + seq)):
- decoder profile 0 ``prefill``: seq 1 .. P (P = longest prompt incl. visual tokens, ``planner.max_prompt_tokens``),
  opt = visual tokens + 64 (``planner.typical_prompt_tokens``); past 0..0 (zero-length past, Optimum style:
  TensorRT supports empty tensors, but this is unverified on a device (reference §8); ``prefill_past_max`` > 0
  allows multi-turn / chunked prefill);
- decoder profile 1 ``decode``: seq 1; past 1 .. context - 1, opt = opt prompt + 128;
- vision: batch 1 .. max_batch, on the GPU.

DLA is opt-in (``use_dla=True``, ``edgevlm export --dla``): the vision graph (static shapes, fp16/int8) goes to DLA
core 0 with GPU fallback. Most ViT ops have no DLA layer (``DLA_OPS``: LayerNormalization, Gelu/Erf, ReduceMean,
Sqrt, activation x activation MatMul, ...), so they fall back to the GPU and each fallback boundary costs a copy;
the plan lists them per op type (``EnginePlan.dla_fallback_ops``). Measure against the GPU-only default before
keeping it. DLA needs min = opt = max, so the batch is fixed.

Builder mode: TensorRT 10.x ``weak`` (precision flags ``--fp16``, ``--int8`` for int8 Q/DQ, ``--int4`` for blocked
INT4 weights, ``--bf16``, ``--fp8``); 11.x ``strong`` (``--stronglyTyped``, no precision flags: the ONNX graph's
dtypes are the precision, so the exporter must write fp16 graphs for fp16 layers). Several profiles use trtexec's
``--profile=N --minShapes=... --optShapes=... --maxShapes=...`` groups (TensorRT >= 10.x sampleOptions.cpp).

Per-layer fp32 (weak mode with ``--fp16``): the flag lets TensorRT run any layer in fp16, including the RMSNorm /
LayerNorm / Softmax "fp32 islands" (``precision_islands.island_nodes``), where fp16 overflows. The plan lists
those ONNX node names per engine (``EnginePlan.fp32_layers``); trtexec gets ``--precisionConstraints=obey
--layerPrecisions=<name>:fp32,... --layerOutputTypes=<name>:fp32,...`` (TensorRT 10 trtexec matches these names
exactly against the layer names; the ONNX parser names a node's layer after the node), and ``trt_build`` sets
``OBEY_PRECISION_CONSTRAINTS`` and pins the matching layers (``fp32_layer_matches``: the node's own name, or that
name + ``_<n>`` for the further layers the parser creates for one node). Strongly typed builds need nothing: the
graph's dtypes decide. ``EnginePlan.layer_precisions`` states, per layer class, what the build will run.

``build_engines.sh`` ends by registering the engines it built in the manifest (``edgevlm register-engines .
--tensorrt <full version>``) when edgevlm is installed on the device, else prints that command.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from edgevlm.config import ModelConfig
from edgevlm.errors import BundleError, ConfigError, TargetError
from edgevlm.outputs import umask
from edgevlm.precisions import DLA_PRECISIONS, TENSORRT_FLAG_ORDER, TENSORRT_WEAK_FLAGS
from edgevlm.planner import default_context, max_prompt_tokens, typical_prompt_tokens
from edgevlm.targets import Target, get_target, parse_trt_version, recipe_name, trt_builder_mode

PLAN_SCHEMA = 1
PLAN_FILE = "build_plan.json"
SCRIPT_FILE = "build_engines.sh"
DEFAULT_ENGINE_DIR = "engines"
DECODE_OPT_EXTRA = 128           # opt past length of the decode profile = opt prompt + this (mid-answer)

Dim = int | str

# Symbolic dim names, normalized (lower case, no spaces), by meaning.
_SYMBOLS = {
    "batch": {"batch", "batch_size", "b", "n", "num_images"},
    "seq": {"seq", "seq_len", "seq_length", "sequence", "sequence_length", "s", "num_tokens", "tokens"},
    "past": {"past", "past_seq", "past_len", "past_length", "past_seq_len", "past_sequence_length", "cache_len",
             "past_key_values_length"},
    "total": {"total", "total_seq", "total_len", "total_length", "total_seq_len", "total_sequence_length", "kv_len",
              "attn_len"},
}
_KIND_OF = {name: kind for kind, names in _SYMBOLS.items() for name in names}
#: symbolic dim name -> batch | seq | past | total (also read by ``trt_compat``'s plan rules)
DIM_KIND_OF = _KIND_OF

# Weakly typed (TensorRT 10.x) builder flags per precision, and the DLA's precisions: ``edgevlm.precisions``.
_WEAK_FLAGS = TENSORRT_WEAK_FLAGS
_FLAG_ORDER = TENSORRT_FLAG_ORDER


# ---- inputs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphInput:
    """One graph input: name, dims (int = static, str = symbolic), dtype (numpy spelling)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


@dataclass(frozen=True)
class EngineComponent:
    """A graph to build an engine from: name, ONNX file (relative to the bundle), inputs and the precisions inside it."""

    name: str
    onnx: str
    inputs: tuple[GraphInput, ...]
    precisions: tuple[str, ...] = ("fp16",)
    role: str = ""          # "vision" | "decoder" | "" (from the name when empty)

    @property
    def kind(self) -> str:
        return self.role or ("vision" if self.name.startswith("vision") else
                             "decoder" if self.name.startswith("decoder") else self.name)

    @classmethod
    def from_spec(cls, spec: Any, precisions: Sequence[str] = ("fp16",)) -> "EngineComponent":
        """From an object with ``name``, ``file`` (or ``onnx``) and ``inputs`` of (``name``, ``shape``, ``dtype``),
        e.g. ``edgevlm.graphs.spec.ComponentSpec``."""
        file = getattr(spec, "file", None) or getattr(spec, "onnx")
        inputs = tuple(GraphInput(t.name, tuple(getattr(t, "shape", None) or getattr(t, "dims")),
                                  getattr(t, "dtype", "float32")) for t in spec.inputs)
        return cls(spec.name, file, inputs, tuple(precisions))


def standard_components(cfg: ModelConfig, recipe: Mapping[str, str]) -> list[EngineComponent]:
    """edgevlm's bundle graphs (names and dims as ``edgevlm.graphs.spec``): vision.onnx and decoder.onnx."""
    s, c = cfg.vision.image_size, cfg.llm
    vision = EngineComponent("vision", "vision.onnx", (GraphInput("pixel_values", ("batch", 3, s, s)),),
                             (recipe["vision"],), "vision")
    kv_shape: tuple[Dim, ...] = ("batch", c.num_kv_heads, "past_seq", c.head_dim)
    inputs = [GraphInput("inputs_embeds", ("batch", "seq", c.hidden_size)),
              GraphInput("attention_mask", ("batch", "past_seq + seq"), "int64"),
              GraphInput("position_ids", ("batch", "seq"), "int64")]
    for i in range(c.num_layers):
        inputs += [GraphInput(f"past_key_values.{i}.key", kv_shape), GraphInput(f"past_key_values.{i}.value", kv_shape)]
    decoder = EngineComponent("decoder", "decoder.onnx", tuple(inputs),
                              tuple(dict.fromkeys((recipe["decoder"], recipe["lm_head"]))), "decoder")
    return [vision, decoder]


def components_from_manifest(manifest: Mapping[str, Any]) -> list[EngineComponent]:
    """Engine components from a manifest-like dict: ``{"components": {name: {"file": ..., "inputs": [...],
    "precision": ...}}}`` (inputs as ``[{"name", "shape"|"dims", "dtype"}]`` or ``{name: dims}``). Entries without
    an ``.onnx`` file (the embedding table) are skipped."""
    comps = manifest.get("components", manifest)
    out = []
    for name, entry in comps.items():
        if not isinstance(entry, Mapping):
            continue
        file = entry.get("file") or entry.get("onnx")
        if not file or not str(file).endswith(".onnx"):
            continue
        raw = entry.get("inputs")
        if raw is None:
            raise BundleError(f"manifest component '{name}' lists no inputs: cannot plan its optimization profiles")
        if isinstance(raw, Mapping):
            inputs = tuple(GraphInput(k, tuple(v)) for k, v in raw.items())
        else:
            inputs = tuple(GraphInput(i["name"], tuple(i.get("shape", i.get("dims", ()))), i.get("dtype", "float32"))
                           for i in raw)
        prec = entry.get("precision", "fp16")
        if isinstance(prec, Mapping):
            precs = tuple(dict.fromkeys(str(v) for v in prec.values()))
        elif isinstance(prec, (list, tuple)):
            precs = tuple(prec)
        else:
            precs = (str(prec),)
        out.append(EngineComponent(name, str(file), inputs, precs, entry.get("role", "")))
    if not out:
        raise BundleError("the manifest lists no ONNX component to build an engine from")
    return out


# ---- what only the graph knows (read by prepare_tensorrt_bundle; graph only, no weights) -------------------------
#: ONNX op type -> the TensorRT layer that runs it on DLA, from NVIDIA's "DLA Supported Layers and Restrictions"
#: (TensorRT 10 developer guide, table "DLA Layer Support Summary":
#: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html) and the
#: ISoftMaxLayer DLA constraints of the C++ API. DLA runs FP16 / INT8 only. Every op type not listed has no DLA
#: layer and runs on the GPU (with ``GPU_FALLBACK``), e.g. LayerNormalization, Gelu / Erf, ReduceMean, Sqrt,
#: Reciprocal, HardSwish / HardSigmoid, Gather, Expand, Where, Cast. The per-layer restrictions (2 spatial dims,
#: kernel / channel limits, channel-axis Concat, static Slice / Shuffle) are not modelled: a listed op can still fall
#: back, so the histogram is a lower bound. Q/DQ (explicit int8) on DLA is unverified (reference §4.6).
DLA_OPS: dict[str, str] = {
    "Conv": "Convolution (2D; kernel 1-32, stride 1-8, channels <= 8192)",
    "ConvTranspose": "Deconvolution (2D; no grouped / dilated; padding 0)",
    "MatMul": "Fully Connected (constant weights only)",
    "Gemm": "Fully Connected (constant weights only)",
    "Relu": "Activation (ReLU)", "Sigmoid": "Activation (Sigmoid)", "Tanh": "Activation (TanH)",
    "Clip": "Activation (Clipped ReLU)", "LeakyRelu": "Activation (Leaky ReLU)",
    "PRelu": "Parametric ReLU (slope a build-time constant)",
    "MaxPool": "Pooling (max)", "AveragePool": "Pooling (average)", "GlobalMaxPool": "Pooling (max)",
    "GlobalAveragePool": "Pooling (average)",
    "BatchNormalization": "Scale",
    "Add": "ElementWise (Sum)", "Sub": "ElementWise (Sub)", "Mul": "ElementWise (Product) / Scale",
    "Div": "ElementWise (Div)", "Pow": "ElementWise (Pow)", "Max": "ElementWise (Max)", "Min": "ElementWise (Min)",
    "Equal": "Comparison (INT8 only)", "Greater": "Comparison (INT8 only)", "Less": "Comparison (INT8 only)",
    "Concat": "Concatenation (channel axis only)",
    "Resize": "Resize", "Upsample": "Resize",
    "Softmax": "SoftMax (axis <= 1024 when another non-batch dim > 1)",
    "Slice": "Slice (static)",
    "Reshape": "Shuffle", "Transpose": "Shuffle", "Flatten": "Shuffle", "Squeeze": "Shuffle",
    "Unsqueeze": "Shuffle",
    "LRN": "LRN", "Abs": "Unary (Abs)", "ReduceMax": "Reduce (max)",
}
#: Nodes that make no layer of their own (folded into their consumers or, with DLA's static shapes, into constants).
DLA_NO_LAYER = frozenset({"Constant", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear", "Shape"})
MATMUL_ACT = "MatMul (activation x activation)"
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze"}
_ONNX_TYPES = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64", 3: "int8", 2: "uint8", 22: "int4", 21: "uint4",
               17: "fp8", 18: "fp8", 19: "fp8", 20: "fp8"}


@dataclass(frozen=True)
class GraphFacts:
    """What the plan needs from an ONNX graph (``graph_facts``): its fp32 islands (RMSNorm chains, LayerNorm,
    Softmax node names, ``precision_islands.island_nodes``), the storage types of the weights of its MatMul / Gemm /
    Conv nodes (``"int4"``, ``"int8"``, ``"fp16"``, ``"fp32"``), the dtype its float layers compute in and the one at
    the islands' inputs (``"fp16"`` / ``"fp32"`` / ``"mixed"`` / ``"unknown"``), and the nodes DLA has no layer for."""

    islands: tuple[str, ...] = ()
    weight_types: tuple[str, ...] = ()
    float_type: str = "unknown"
    island_type: str = "unknown"
    dla_fallback: dict[str, int] = field(default_factory=dict)
    nodes: int = 0


def _load_graph(model_or_path: Any) -> Any:
    if isinstance(model_or_path, (str, os.PathLike)):
        import onnx

        return onnx.load(str(model_or_path), load_external_data=False)
    return model_or_path


def _summary(types: Iterable[str]) -> str:
    found = sorted({t for t in types if t in ("fp16", "fp32", "bf16")})
    return found[0] if len(found) == 1 else ("mixed" if found else "unknown")


def dla_fallback_ops(model: Any) -> dict[str, int]:
    """``{op type: count}`` of the nodes of ``model`` (a ModelProto or a path) that have no DLA layer (``DLA_OPS``);
    a MatMul / Gemm whose second input is not a constant (an initializer, possibly through DequantizeLinear /
    Transpose / Cast / Reshape) counts as ``MATMUL_ACT``. Sorted by count, then name."""
    g = _load_graph(model).graph
    consts = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}

    def constant(name: str, depth: int = 0) -> bool:
        if name in consts:
            return True
        n = producer.get(name)
        if n is None or depth > 8:
            return False
        return n.op_type == "Constant" or (n.op_type in _PASS_THROUGH and bool(n.input)
                                           and constant(n.input[0], depth + 1))

    out: Counter[str] = Counter()
    for n in g.node:
        if n.op_type in DLA_NO_LAYER:
            continue
        if n.op_type in ("MatMul", "Gemm"):
            if len(n.input) < 2 or not constant(n.input[1]):
                out[MATMUL_ACT] += 1
        elif n.op_type not in DLA_OPS or n.domain not in ("", "ai.onnx"):
            out[n.op_type] += 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def graph_facts(model: Any) -> GraphFacts:
    """``GraphFacts`` of an ONNX graph (a ModelProto or a path: loaded without its external weights)."""
    from edgevlm.graphs.precision_islands import island_nodes

    m = _load_graph(model)
    g = m.graph
    import onnx

    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False).graph
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):    # best effort: value_info still helps
        inferred = g
    for v in (*inferred.input, *inferred.output, *inferred.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    inits = {i.name for i in g.initializer}
    for i in g.initializer:
        types[i.name] = i.data_type
    producer = {o: n for n in g.node for o in n.output if o}

    def weight_type(name: str, depth: int = 0) -> str | None:
        n = producer.get(name)
        if n is not None and depth < 8:
            if n.op_type == "DequantizeLinear":
                src = n.input[0]
                return _ONNX_TYPES.get(types.get(src, 0)) or weight_type(src, depth + 1)
            if n.op_type in _PASS_THROUGH and n.input:
                return weight_type(n.input[0], depth + 1)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        return _ONNX_TYPES.get(a.t.data_type)
            return None
        if name in inits:
            return _ONNX_TYPES.get(types.get(name, 0))
        return None

    weights: list[str] = []
    float_types: list[str] = []
    islands = tuple(island_nodes(m))
    isl = set(islands)
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1:
            w = weight_type(n.input[1])
            if w is not None:
                weights.append(w)
            if n.output and n.output[0] in types:
                float_types.append(_ONNX_TYPES.get(types[n.output[0]], ""))
    island_types = [_ONNX_TYPES.get(types.get(n.input[0], 0), "") for n in g.node if n.name in isl and n.input]
    order = ("int4", "int8", "fp8", "fp16", "bf16", "fp32")
    return GraphFacts(islands=islands, weight_types=tuple(t for t in order if t in set(weights)),
                      float_type=_summary(float_types), island_type=_summary(island_types),
                      dla_fallback=dla_fallback_ops(m), nodes=len(g.node))


def _layer_precisions(mode: str, flags: Sequence[str], precisions: Sequence[str], fp32_layers: Sequence[str],
                      facts: GraphFacts | None) -> dict[str, str]:
    """What the build runs each class of layers in (see ``EnginePlan.layer_precisions``)."""
    quant = [t for t in (facts.weight_types if facts else ()) if t in ("int4", "int8", "fp8")] or \
        [p for p in ("int4", "int8", "fp8") if p in precisions]
    out: dict[str, str] = {}
    if mode == "weak":
        flt = ("fp16 (builder flag)" if "fp16" in flags else "bf16 (builder flag)" if "bf16" in flags else "fp32")
        floats = facts is not None and any(t in ("fp16", "bf16", "fp32") for t in facts.weight_types)
        out["matmul_weights"] = ((" + ".join(quant) + (f"; unquantized ones {flt}" if floats else ""))
                                 if quant else flt)
        out["float layers"] = flt
        if fp32_layers:
            out["norms/softmax"] = f"fp32 (per-layer constraint, {len(fp32_layers)} layers)"
        elif "fp16" in flags:
            out["norms/softmax"] = ("fp16 (builder flag; no RMSNorm/LayerNorm/Softmax found in the graph)" if facts
                                    else "fp16 (builder flag; graph not read: no per-layer constraints)")
        else:
            out["norms/softmax"] = flt
        return out
    if facts is None:
        out["matmul_weights"] = " + ".join(quant) if quant else "as the ONNX graph's dtypes"
        out["float layers"] = out["norms/softmax"] = "as the ONNX graph's dtypes (strongly typed; graph not read)"
        return out
    w = [t for t in facts.weight_types]
    out["matmul_weights"] = " + ".join(w) if w else facts.float_type
    out["float layers"] = f"{facts.float_type} (graph dtypes)"
    out["norms/softmax"] = (f"{facts.island_type} (graph dtypes)" if facts.islands
                            else "none in the graph")
    return out


def fp32_layer_matches(layer_name: str, node_names: Iterable[str] | set[str]) -> str | None:
    """The listed ONNX node a TensorRT layer belongs to, or None: the layer's name is the node name (the ONNX
    parser names a node's first layer after it) or the node name + ``_<n>`` (onnx-tensorrt's
    ``ImporterContext::registerLayer`` makes further layers of one node unique with ``_`` + a counter). A node that
    is not listed but is named like a listed one + ``_<n>`` would be pinned too: fp32 is the safe side."""
    names = node_names if isinstance(node_names, (set, frozenset)) else set(node_names)
    if layer_name in names:
        return layer_name
    base, sep, tail = layer_name.rpartition("_")
    if sep and tail.isdigit() and base in names:
        return base
    return None


# ---- outputs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]          # dynamic inputs only, in graph input order


@dataclass(frozen=True)
class EnginePlan:
    component: str
    onnx: str
    engine: str
    precisions: tuple[str, ...]
    precision_flags: tuple[str, ...]       # weakly typed builder flags (empty when strongly typed)
    profiles: tuple[Profile, ...]
    dla_core: int | None = None
    allow_gpu_fallback: bool = False
    workspace_bytes: int = 0
    #: ONNX node names whose layers must compute and output fp32 (weak builds with --fp16; empty otherwise)
    fp32_layers: tuple[str, ...] = ()
    #: layer class -> what precision the build runs it in, e.g. {"matmul_weights": "int4", "float layers":
    #: "fp16 (builder flag)", "norms/softmax": "fp32 (per-layer constraint, 12 layers)"}
    layer_precisions: dict[str, str] = field(default_factory=dict)
    #: DLA engines: op type -> nodes of the graph that have no DLA layer and run on the GPU (``DLA_OPS``)
    dla_fallback_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildPlan:
    target: str
    tensorrt: str
    builder_mode: str                      # "weak" | "strong"
    compute_capability: str | None
    jetpack: str | None
    model: str
    precision: str
    context: int
    max_prompt_tokens: int
    opt_prompt_tokens: int
    max_batch: int
    engine_dir: str
    timing_cache: str
    engines: tuple[EnginePlan, ...]
    notes: tuple[str, ...] = ()
    schema: int = PLAN_SCHEMA

    def engine(self, component: str) -> EnginePlan:
        for e in self.engines:
            if e.component == component:
                return e
        raise KeyError(f"no engine for '{component}' in the plan; engines: {[e.component for e in self.engines]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for e in d["engines"]:
            for p in e["profiles"]:
                p["shapes"] = {k: {"min": list(v["min"]), "opt": list(v["opt"]), "max": list(v["max"])}
                               for k, v in p["shapes"].items()}
            e["precisions"], e["precision_flags"] = list(e["precisions"]), list(e["precision_flags"])
            e["fp32_layers"] = list(e["fp32_layers"])
            e["profiles"] = list(e["profiles"])
            e["trtexec"] = trtexec_args(_engine_from_dict(e), self)
        d["engines"], d["notes"] = list(d["engines"]), list(d["notes"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildPlan":
        if d.get("schema") != PLAN_SCHEMA:
            raise BundleError(f"build plan schema {d.get('schema')} is not {PLAN_SCHEMA}: re-plan with this edgevlm")
        d = dict(d)
        engines = tuple(_engine_from_dict(e) for e in d.pop("engines"))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(engines=engines, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BuildPlan":
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILE
        if not p.is_file():
            raise BundleError(f"build plan {p} not found: create it with `edgevlm export --target ...`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BundleError(f"build plan {p} is malformed: {exc}") from None


def _engine_from_dict(e: Mapping[str, Any]) -> EnginePlan:
    profiles = tuple(Profile(p["name"], {k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                         for k, v in p["shapes"].items()}) for p in e["profiles"])
    return EnginePlan(e["component"], e["onnx"], e["engine"], tuple(e["precisions"]), tuple(e["precision_flags"]),
                      profiles, e.get("dla_core"), bool(e.get("allow_gpu_fallback")), int(e.get("workspace_bytes", 0)),
                      tuple(e.get("fp32_layers", ())), {str(k): str(v) for k, v in e.get("layer_precisions", {}).items()},
                      {str(k): int(v) for k, v in e.get("dla_fallback_ops", {}).items()})


# ---- planning -----------------------------------------------------------------------------------------------------
def _dim_kind(sym: str, where: str) -> list[str]:
    terms = [t.strip().lower() for t in sym.split("+")]
    kinds = []
    for t in terms:
        if t not in _KIND_OF:
            raise ConfigError(f"{where}: symbolic dim '{sym}' is not known; name dims one of "
                              + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in _SYMBOLS.items())
                              + " (or sums such as 'past_seq + seq')")
        kinds.append(_KIND_OF[t])
    return kinds


def _resolve(inp: GraphInput, values: Mapping[str, tuple[int, int, int]], where: str) -> ShapeRange:
    mins, opts, maxs = [], [], []
    for d in inp.shape:
        if isinstance(d, int):
            lo = op = hi = d
        else:
            kinds = _dim_kind(d, f"{where} input '{inp.name}'")
            if kinds == ["total"]:
                kinds = ["past", "seq"]
            missing = [k for k in kinds if k not in values]
            if missing:
                raise ConfigError(f"{where} input '{inp.name}': dim '{d}' needs '{missing[0]}', which this graph's "
                                  f"profiles do not define")
            lo, op, hi = (sum(values[k][i] for k in kinds) for i in range(3))
        mins.append(lo)
        opts.append(op)
        maxs.append(hi)
    return ShapeRange(tuple(mins), tuple(opts), tuple(maxs))


def _kinds_used(comp: EngineComponent) -> set[str]:
    used: set[str] = set()
    for inp in comp.inputs:
        for d in inp.shape:
            if isinstance(d, str):
                used.update(_dim_kind(d, f"{comp.name} input '{inp.name}'"))
    return used


def plan_tensorrt_build(model_cfg: ModelConfig, target: Target | str, precision: Mapping[str, str] | str | None = None,
                        *, components: Iterable[EngineComponent] | None = None, context: int | None = None,
                        prompt_tokens: int | None = None, opt_prompt_tokens: int | None = None, max_batch: int = 1,
                        use_dla: bool = False, builder_mode: str = "auto", prefill_past_max: int = 0,
                        workspace_gb: float | None = None, engine_dir: str = DEFAULT_ENGINE_DIR,
                        graphs: Mapping[str, GraphFacts] | None = None) -> BuildPlan:
    """The TensorRT build plan for a bundle on ``target``.

    Args:
        model_cfg: the bundle's model (visual tokens, context, dims of the standard components).
        target: a TensorRT ``Target`` or its name.
        precision: the bundle's recipe (preset name, ``"int4,vision=fp16"`` or a dict); None = target default.
            Ignored for components given explicitly (they carry their own precisions).
        components: the graphs to build (default: ``standard_components``).
        context: KV length the decode profile covers (default: min(model max, target max_context)).
        prompt_tokens: longest prompt incl. visual tokens (default ``planner.max_prompt_tokens``).
        opt_prompt_tokens: prefill opt shape (default visual tokens + 64).
        max_batch: largest batch of every profile.
        use_dla: put the vision graph on DLA core 0 with GPU fallback (opt-in: most ViT ops fall back to the GPU,
            see ``DLA_OPS``); ``ConfigError`` when the target has no DLA core, the vision precision is not fp16 /
            int8 or its shapes are not static.
        builder_mode: "auto" (weak for TensorRT 10.x, strong for 11.x), "weak" or "strong".
        prefill_past_max: largest past length the prefill profile accepts (0 = fresh prompts only).
        workspace_gb: builder workspace (memPoolSize) per engine; None = ``target.workspace_gb``.
        engine_dir: folder (relative to the bundle) for engines and the timing cache.
        graphs: ``{component: GraphFacts}`` read from the graphs (``graph_facts``; ``prepare_tensorrt_bundle``
            passes them): the fp32 layers of weak fp16 builds, the layer precisions, the DLA fallback ops.
    """
    if isinstance(target, str):
        target = get_target(target)
    if not target.is_tensorrt or not target.tensorrt:
        raise TargetError(f"target '{target.label}' runs {target.backend}: there are no TensorRT engines to plan")
    recipe = target.recipe(precision)
    comps = list(components) if components is not None else standard_components(model_cfg, recipe)
    version = target.tensorrt
    mode = trt_builder_mode(version) if builder_mode == "auto" else builder_mode
    if mode not in ("weak", "strong"):
        raise ConfigError(f"builder_mode '{builder_mode}' unknown; use auto, weak or strong")
    if mode == "weak" and parse_trt_version(version)[0] >= 11:
        raise ConfigError(f"TensorRT {version} builds strongly typed networks only (weak typing was removed in 11.0)")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")

    ctx = default_context(model_cfg, target) if context is None else int(context)
    if ctx < 2:
        raise ConfigError(f"context {ctx} is too short for a decode profile")
    p_max = max_prompt_tokens(model_cfg, ctx) if prompt_tokens is None else min(int(prompt_tokens), ctx)
    p_opt = typical_prompt_tokens(model_cfg, p_max) if opt_prompt_tokens is None else min(int(opt_prompt_tokens), p_max)
    if prefill_past_max < 0 or prefill_past_max > ctx - 1:
        raise ConfigError(f"prefill_past_max {prefill_past_max} must be in 0..{ctx - 1}")
    batch = (1, 1, max_batch)
    decode_opt = min(ctx - 1, p_opt + DECODE_OPT_EXTRA)
    notes: list[str] = []
    workspace = int((target.workspace_gb if workspace_gb is None else workspace_gb) * 2**30)
    graphs = graphs or {}
    engines = []
    used_dla: list[EnginePlan] = []
    if use_dla and not any(c.kind == "vision" for c in comps):
        raise ConfigError("use_dla: there is no vision graph to put on DLA (components: "
                          + ", ".join(c.name for c in comps) + ")")
    for comp in comps:
        where = f"component '{comp.name}'"
        kinds = _kinds_used(comp)
        bad = [p for p in comp.precisions if p not in target.precisions]
        if bad:
            raise TargetError(f"{where}: target '{target.label}' does not support {', '.join(bad)}; it supports "
                              f"{', '.join(target.precisions)}")
        # DLA (opt-in): the static-shape vision graph at fp16/int8 on a target with DLA cores.
        dla = bool(use_dla) and comp.kind == "vision"
        if dla:
            check_dla(target, comp.precisions, where=where)
            if not kinds <= {"batch"}:
                raise ConfigError(f"{where} cannot go on DLA: DLA needs static shapes, but its inputs have dynamic "
                                  f"dims besides the batch ({', '.join(sorted(kinds - {'batch'}))})")
        b = (max_batch,) * 3 if dla else batch
        if "past" in kinds:
            profiles = [("prefill", {"batch": b, "seq": (1, p_opt, p_max), "past": (0, 0, prefill_past_max)}),
                        ("decode", {"batch": b, "seq": (1, 1, 1), "past": (1, decode_opt, ctx - 1)})]
        elif "seq" in kinds:
            profiles = [("tokens", {"batch": b, "seq": (1, p_opt, p_max)})]
        else:
            profiles = [("static" if dla else "default", {"batch": b})]
        built = tuple(Profile(name, {i.name: _resolve(i, vals, where) for i in comp.inputs if i.dynamic})
                      for name, vals in profiles)
        if mode == "weak":
            wanted = {f for p in comp.precisions for f in _WEAK_FLAGS[p]}
            flags = tuple(f for f in _FLAG_ORDER if f in wanted)
            if "fp8" in flags and "int8" in flags:
                raise ConfigError(f"{where}: fp8 and int8 cannot be enabled together in one TensorRT build")
        else:
            flags = ()
        facts = graphs.get(comp.name)
        fp32 = tuple(facts.islands) if facts is not None and mode == "weak" and "fp16" in flags else ()
        fallback = dict(facts.dla_fallback) if facts is not None and dla else {}
        eng = EnginePlan(comp.name, comp.onnx, f"{engine_dir}/{comp.name}.engine", tuple(comp.precisions),
                         flags, built, 0 if dla else None, dla, workspace, fp32,
                         _layer_precisions(mode, flags, comp.precisions, fp32, facts), fallback)
        engines.append(eng)
        if dla:
            used_dla.append(eng)
    if "past" in set().union(*(_kinds_used(c) for c in comps)):
        notes.append("the prefill profile has past_seq 0..0 (zero-length past tensors): TensorRT supports empty "
                     "tensors, but this path is unverified on a device")
    for eng in used_dla:
        facts = graphs.get(eng.component)
        if facts is None:
            what = "the ops without a DLA layer (graph not read) fall back to the GPU"
        elif eng.dla_fallback_ops:
            n = sum(eng.dla_fallback_ops.values())
            what = (f"{n} of {facts.nodes} nodes have no DLA layer and fall back to the GPU: "
                    + dla_fallback_text(eng.dla_fallback_ops))
        else:
            what = "every op has a DLA layer (per-layer restrictions may still send some to the GPU)"
        notes.append(f"{eng.component} on DLA core {eng.dla_core} with GPU fallback (--dla): {what}; Q/DQ on DLA is "
                     f"unverified; compare with the GPU-only build in `edgevlm bench` before keeping it")
    if any(e.fp32_layers for e in engines):
        notes.append("weakly typed fp16 build: RMSNorm/LayerNorm/Softmax layers are pinned to fp32 "
                     "(--precisionConstraints=obey, fp32_layers per engine)")
    if mode == "strong" and any(p != "fp32" for c in comps for p in c.precisions):
        notes.append("strongly typed build: the ONNX dtypes are the precision; the graphs must be exported in fp16 "
                     "(or converted with modelopt.onnx.autocast) with explicit Q/DQ for int8/int4")
    if target.kind == "jetson":
        notes.append("build on the board itself: engines are tied to the TensorRT version and the GPU")
    return BuildPlan(target=target.label, tensorrt=version, builder_mode=mode,
                     compute_capability=target.compute_capability, jetpack=target.jetpack, model=model_cfg.name,
                     precision=recipe_name(recipe, tensorrt=True) if components is None else ",".join(
                         dict.fromkeys(p for c in comps for p in c.precisions)),
                     context=ctx, max_prompt_tokens=p_max, opt_prompt_tokens=p_opt, max_batch=max_batch,
                     engine_dir=engine_dir, timing_cache=f"{engine_dir}/timing.cache", engines=tuple(engines),
                     notes=tuple(notes))


def check_dla(target: Target | str, vision_precisions: Sequence[str] | str, *, where: str = "the vision graph") -> None:
    """``ConfigError`` unless ``target`` has a DLA core and every precision of the vision graph runs on DLA
    (fp16 / int8 only)."""
    if isinstance(target, str):
        target = get_target(target)
    precs = (vision_precisions,) if isinstance(vision_precisions, str) else tuple(vision_precisions)
    if not target.is_tensorrt or target.dla_cores < 1:
        from edgevlm.targets import target_names

        with_dla = [n for n in target_names() if get_target(n).dla_cores > 0]
        raise ConfigError(f"--dla: target '{target.label}' has no DLA core (targets with DLA: {', '.join(with_dla)}); "
                          f"drop --dla to build for the GPU")
    bad = [p for p in precs if p not in DLA_PRECISIONS]
    if bad:
        raise ConfigError(f"--dla: {where} is {', '.join(precs)}, but DLA runs only {' and '.join(DLA_PRECISIONS)}; "
                          f"export with e.g. --precision int4,vision=fp16 (or vision=int8), or drop --dla")


def dla_fallback_text(ops: Mapping[str, int], limit: int = 8) -> str:
    """``"LayerNormalization x7, Gelu x1, ..."`` (the largest first)."""
    items = list(ops.items())
    text = ", ".join(f"{k} x{v}" for k, v in items[:limit])
    return text + (f", and {len(items) - limit} more op types" if len(items) > limit else "")


# ---- trtexec ------------------------------------------------------------------------------------------------------
def shape_string(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """trtexec shape spec: ``name:AxBxC,name2:...``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def parse_shape_string(spec: str) -> dict[str, tuple[int, ...]]:
    """Inverse of ``shape_string`` (splits each entry on its last ':', like trtexec)."""
    out = {}
    for part in spec.split(","):
        name, _, dims = part.rpartition(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def trtexec_args(engine: EnginePlan, plan: BuildPlan) -> list[str]:
    """trtexec arguments (without the program) that build ``engine`` as planned."""
    args = [f"--onnx={engine.onnx}", f"--saveEngine={engine.engine}"]
    if plan.builder_mode == "strong":
        args.append("--stronglyTyped")
    else:
        args += [f"--{f}" for f in engine.precision_flags]
        # exact layer names (the parser names a node's layer after the node); trtexec splits the spec on ',' and a
        # name on its last ':', so names with ',' or quotes cannot be passed (the Python build pins them anyway)
        names = [n for n in engine.fp32_layers if not any(c in n for c in ",'\"")]
        if names:
            args += ["--precisionConstraints=obey",
                     "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in names),
                     "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in names)]
    profiles = [p for p in engine.profiles if p.shapes]
    for i, prof in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={i}")
        for which in ("min", "opt", "max"):
            args.append(f"--{which}Shapes=" + shape_string({k: getattr(v, which) for k, v in prof.shapes.items()}))
    if engine.dla_core is not None:
        args.append(f"--useDLACore={engine.dla_core}")
        if engine.allow_gpu_fallback:
            args.append("--allowGPUFallback")
    if engine.workspace_bytes:
        args.append(f"--memPoolSize=workspace:{max(1, engine.workspace_bytes // 2**20)}")   # MiB
    args += [f"--timingCacheFile={plan.timing_cache}", "--skipInference"]
    return args


_SCRIPT_HEAD = r"""#!/usr/bin/env bash
# Build the TensorRT engines of this bundle ON THE TARGET DEVICE ({target}).
# Generated by edgevlm from {plan_file} (model {model}, precision {precision}, TensorRT {trt}, {mode}ly typed).
# Engines are tied to the TensorRT version and the GPU: build them where they will run.
# Usage: bash {script} [extra trtexec flags]    (TRTEXEC=/path/to/trtexec to pick a binary;
#        EDGEVLM_ALLOW_TRT_MISMATCH=1 to build with another TensorRT {major}.x minor version anyway)
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${{TRTEXEC:-trtexec}}"
if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  for candidate in /usr/src/tensorrt/bin/trtexec /usr/local/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do
    if [ -x "$candidate" ]; then TRTEXEC="$candidate"; break; fi
  done
fi
if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  echo "error: trtexec not found. On a Jetson it ships with JetPack at /usr/src/tensorrt/bin/trtexec" >&2
  echo "       (sudo apt install nvidia-jetpack); on a desktop install TensorRT {trt} and put trtexec on PATH," >&2
  echo "       or set TRTEXEC=/path/to/trtexec. Alternatively: edgevlm build-engine <bundle> (Python API)." >&2
  exit 1
fi

WANT="{trt}"
HAVE_FULL=""
RAW="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
if [ -n "$RAW" ]; then                                  # e.g. TensorRT v100300 -> 10.3.0
  HAVE_FULL="$((RAW / 10000)).$(((RAW / 100) % 100)).$((RAW % 100))"
else
  HAVE_FULL="$(python3 -c 'import tensorrt as t; print(t.__version__)' 2>/dev/null || true)"
fi
if [ -z "$HAVE_FULL" ]; then
  echo "warning: could not read the TensorRT version of $TRTEXEC; the plan expects TensorRT $WANT" >&2
else
  HAVE="$(printf '%s' "$HAVE_FULL" | cut -d. -f1,2)"
  WANT_MM="$(printf '%s' "$WANT" | cut -d. -f1,2)"
  if [ "${{HAVE%%.*}}" != "${{WANT%%.*}}" ]; then
    echo "error: this plan is for TensorRT $WANT but $TRTEXEC is TensorRT $HAVE_FULL: the builder flags differ between" >&2
    echo "       major versions. Re-export for this device (edgevlm export --target {target_base}@trt$HAVE ...)." >&2
    exit 1
  fi
  if [ "$HAVE" != "$WANT_MM" ]; then
    if [ "${{EDGEVLM_ALLOW_TRT_MISMATCH:-0}}" != "1" ]; then
      echo "error: this plan is for TensorRT $WANT but $TRTEXEC is TensorRT $HAVE_FULL. Engines only run with the" >&2
      echo "       TensorRT they were built with: re-export with --target {target_base}@trt$HAVE, or set" >&2
      echo "       EDGEVLM_ALLOW_TRT_MISMATCH=1 to build with $HAVE anyway." >&2
      exit 1
    fi
    echo "warning: building with TensorRT $HAVE_FULL (plan: $WANT) because EDGEVLM_ALLOW_TRT_MISMATCH=1" >&2
  fi
fi

for f in {onnx_files}; do
  if [ ! -f "$f" ]; then echo "error: $f not found next to this script: run it inside the bundle folder" >&2; exit 1; fi
done
mkdir -p {engine_dir}
"""


# Register the engines in the manifest (file, bytes, sha256, TensorRT version, device) so the runtime finds them.
# EDGEVLM="..." picks the command (e.g. EDGEVLM="python3 -m edgevlm"), EDGEVLM=skip only prints it.
_SCRIPT_REGISTER = r"""
REGISTER_ARGS=(register-engines .)
if [ -n "$HAVE_FULL" ]; then REGISTER_ARGS+=(--tensorrt "$HAVE_FULL"); fi
if [ -z "${EDGEVLM:-}" ]; then
  if command -v edgevlm >/dev/null 2>&1; then EDGEVLM=edgevlm
  elif python3 -c 'import edgevlm' >/dev/null 2>&1; then EDGEVLM="python3 -m edgevlm"
  else EDGEVLM=skip
  fi
fi
if [ "$EDGEVLM" = "skip" ]; then
  echo "edgevlm is not installed here: record the engines in the bundle's manifest (so edgevlm run finds them) with" >&2
  echo "  edgevlm register-engines $(pwd)${HAVE_FULL:+ --tensorrt $HAVE_FULL}" >&2
else
  echo "== registering the engines in manifest.json ($EDGEVLM ${REGISTER_ARGS[*]}) =="
  $EDGEVLM "${REGISTER_ARGS[@]}"
fi
"""


def build_engines_script(plan: BuildPlan) -> str:
    """The ``build_engines.sh`` text: checks trtexec and its TensorRT version (``HAVE_FULL``, e.g. ``10.3.0`` from
    trtexec's ``TensorRT v100300`` banner), one trtexec call per engine, then ``edgevlm register-engines .
    --tensorrt $HAVE_FULL`` (or the command to run, without edgevlm on the device)."""
    q = shlex.quote
    head = _SCRIPT_HEAD.format(target=plan.target, target_base=plan.target.split("@")[0], plan_file=PLAN_FILE,
                               model=plan.model, precision=plan.precision, trt=plan.tensorrt, mode=plan.builder_mode,
                               script=SCRIPT_FILE, major=plan.tensorrt.split(".")[0],
                               onnx_files=" ".join(q(e.onnx) for e in plan.engines), engine_dir=q(plan.engine_dir))
    body = []
    for e in plan.engines:
        where = f"DLA core {e.dla_core} + GPU fallback" if e.dla_core is not None else "GPU"
        body.append(f'\necho "== building {e.engine} from {e.onnx} ({where}; this can take many minutes) =="')
        args = " \\\n    ".join(q(a) for a in trtexec_args(e, plan))
        body.append(f'"$TRTEXEC" \\\n    {args} \\\n    "$@"')
    engines = " ".join(q(e.engine) for e in plan.engines)
    tail = (f"\nif command -v sha256sum >/dev/null 2>&1; then sha256sum {engines} > {q(plan.engine_dir)}/SHA256SUMS; fi"
            f'\necho "done: {len(plan.engines)} engine(s) in {plan.engine_dir}/ (TensorRT ${{HAVE_FULL:-{plan.tensorrt}}}, '
            f'{plan.target})"\n' + _SCRIPT_REGISTER)
    return head + "\n".join(body) + "\n" + tail


def write_build_files(bundle_dir: str | os.PathLike, plan: BuildPlan) -> tuple[Path, Path]:
    """Write ``build_plan.json`` and an executable ``build_engines.sh`` into ``bundle_dir`` (atomically)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} not found")
    out = []
    for name, text, mode in ((PLAN_FILE, plan.to_json() + "\n", 0o644), (SCRIPT_FILE, build_engines_script(plan), 0o755)):
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode & ~umask())
        os.replace(tmp, root / name)
        out.append(root / name)
    return out[0], out[1]


def prepare_tensorrt_bundle(bundle_dir: str | os.PathLike, model_cfg: ModelConfig, target: Target | str,
                            precision: Mapping[str, str] | str | None = None, *,
                            components: Iterable[EngineComponent] | None = None, check: bool = True,
                            **plan_kwargs: Any) -> dict[str, Any]:
    """What ``edgevlm export --target T`` runs for a TensorRT target once the ONNX graphs are in ``bundle_dir``.

    1. ``plan_tensorrt_build`` without the graphs (every planning error before anything is read);
    2. ``trt_compat.assert_tensorrt_compat`` on every graph (raises ``TargetError`` naming each offending node);
    3. ``graph_facts`` of every graph (fp32 islands, dtypes, DLA fallback ops; graph only, no weights) and the
       plan again with them (``graphs=``);
    4. ``write_build_files`` (``build_plan.json`` + ``build_engines.sh``).

    ``plan_kwargs`` go to ``plan_tensorrt_build`` (e.g. ``use_dla=True``, ``context=``). Returns the manifest's
    ``tensorrt`` entry: ``{"plan": <plan dict>, "plan_file", "script", "compat_warnings", "engines": {}}``
    (``engines`` is filled by ``edgevlm build-engine`` / ``edgevlm register-engines``).
    """
    if isinstance(target, str):
        target = get_target(target)
    comps = list(components) if components is not None else None
    plan = plan_tensorrt_build(model_cfg, target, precision, components=comps, **plan_kwargs)
    warnings: dict[str, list[dict[str, str]]] = {}
    root = Path(bundle_dir)
    if check:
        from edgevlm.graphs.trt_compat import assert_tensorrt_compat

        for e in plan.engines:
            path = root / e.onnx
            if not path.is_file():
                raise BundleError(f"{path} not found: write the ONNX graphs before planning their engines")
            found = assert_tensorrt_compat(path, plan.tensorrt, component=e.component)
            if found:
                warnings[e.component] = [w.to_dict() for w in found]
    facts = {e.component: graph_facts(root / e.onnx) for e in plan.engines if (root / e.onnx).is_file()}
    if facts:
        plan = plan_tensorrt_build(model_cfg, target, precision, components=comps, graphs=facts, **plan_kwargs)
    plan_path, script_path = write_build_files(root, plan)
    return {"plan": plan.to_dict(), "plan_file": plan_path.name, "script": script_path.name,
            "compat_warnings": warnings, "engines": {}}


__all__ = ["prepare_tensorrt_bundle", "GraphInput", "EngineComponent", "ShapeRange", "Profile", "EnginePlan",
           "BuildPlan", "GraphFacts", "plan_tensorrt_build", "standard_components", "components_from_manifest",
           "graph_facts", "dla_fallback_ops", "dla_fallback_text", "check_dla", "fp32_layer_matches",
           "trtexec_args", "build_engines_script", "write_build_files", "shape_string", "parse_shape_string",
           "DLA_OPS", "DLA_PRECISIONS", "MATMUL_ACT", "PLAN_FILE", "SCRIPT_FILE"]
