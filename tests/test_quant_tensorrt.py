"""Quantized bundles a TensorRT build accepts and runs right (issue 21, quantization side): blocked INT4 weights with
positive scales (edgevlm's own quantizer, not ORT's QDQ mode that writes scale = amax / -8), no partial blocks, block
sizes TensorRT supports; fp16 graphs keep RMSNorm / LayerNorm / Softmax in fp32; TensorRT >= 11 (strongly typed) gets
fp16 tensor types around its Q/DQ layers; no weight-only INT8 LM head on TensorRT (TensorRT has none); the quantized
bundle's engine build plan describes the quantized graphs. Hand-built graphs where possible; one shared portable fp32
bundle (module scope) for the bundle-level checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from edgevlm.errors import QuantizationError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SMALL = {"calibration_samples": 2, "heldout_samples": 1, "decode_steps": 1}


# ---- hand-built graphs -----------------------------------------------------------------------------------------------
def _matmul_model(w: np.ndarray, opset: int = 20):
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, feeds, optimize: bool = False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:                       # per-op arithmetic, as TensorRT's layers run it (no ORT fusions)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _weights(k: int = 256, n: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:128, 0] = np.abs(w[:128, 0])           # a block whose largest-magnitude value is positive
    w[5, 0] = 0.3
    w[:128, 1] = -np.abs(w[:128, 1])          # ... and one where it is negative
    w[128:, 2] = 0.0                          # an all-zero block
    return w


def test_int4_weights_have_positive_scales_and_dequantize_right():
    """ORT's MatMulNBitsQuantizer(QDQ) wrote scale = amax / -8 for half the blocks; TensorRT's parser refuses
    non-positive scales. edgevlm's quantizer: scale = amax / 7 > 0, q in [-7, 7], no zero point, opset 21."""
    from edgevlm.quant.int4_qdq import dequantize_int4, quantize_matmuls_int4

    w = _weights()
    model = _matmul_model(w)
    info = quantize_matmuls_int4(model, block_size=128, allowed_blocks=(64, 128))
    assert info["nodes_quantized"] == 1 and info["block_size_overrides"] == {} and info["zero_blocks"] == 1
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    dq, mm = model.graph.node
    assert (dq.op_type, mm.op_type) == ("DequantizeLinear", "MatMul") and mm.input[1] == dq.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 128} and len(dq.input) == 2           # no zero point
    q_t, s_t = inits[dq.input[0]], inits[dq.input[1]]
    assert q_t.data_type == TensorProto.INT4 and list(q_t.dims) == [256, 48]
    assert s_t.data_type == TensorProto.FLOAT and list(s_t.dims) == [2, 48]
    q, s = numpy_helper.to_array(q_t).astype(np.int8), numpy_helper.to_array(s_t)
    assert (s > 0).all() and s[1, 2] == 1.0                                          # zero block: scale 1, q 0
    assert q.min() >= -7 and q.max() <= 7 and not q[128:, 2].any()
    np.testing.assert_allclose(s[:, 0], np.abs(w.reshape(2, 128, 48)).max(axis=1)[:, 0] / 7, rtol=1e-6)
    assert q[5, 0] == 7                                                              # the positive max maps to +7
    assert "w" not in inits                                                          # the fp32 weight is gone
    assert max(o.version for o in model.opset_import if o.domain == "") == 21 and model.ir_version >= 10
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    (y,) = _run(model, {"x": x})
    np.testing.assert_allclose(y, x @ dequantize_int4(q, s), rtol=1e-5, atol=1e-5)
    err = np.abs(dequantize_int4(q, s) - w)
    assert (err <= np.repeat(s, 128, axis=0) / 2 + 1e-7).all()                       # round to nearest
    (y_opt,) = _run(model, {"x": x}, optimize=True)                                  # ORT fuses DQ + MatMul
    np.testing.assert_allclose(y_opt, y, atol=0.05)


def test_int4_blocks_are_whole_and_tensorrt_sizes():
    """TensorRT infers the block size as K / scale rows (a partial last block is misread) and supports 64 and 128:
    K = 64 under block 128 uses 64; K = 96 has no whole TensorRT block and is refused, naming the fix."""
    from edgevlm.quant.int4_qdq import effective_block_size, quantize_matmuls_int4
    from edgevlm.quant.recipes import plan_quantization

    model = _matmul_model(_weights(64, 16))
    info = quantize_matmuls_int4(model, block_size=128, allowed_blocks=(64, 128))
    assert info["block_size_overrides"] == {"mm": 64}
    dq = model.graph.node[0]
    assert {a.name: a.i for a in dq.attribute}["block_size"] == 64
    assert list(next(i for i in model.graph.initializer if i.name == dq.input[1]).dims) == [1, 16]
    assert effective_block_size(384, 128, (64, 128)) == 128 and effective_block_size(192, 128, (64, 128)) == 64
    with pytest.raises(QuantizationError, match="partial last block") as e:
        quantize_matmuls_int4(_matmul_model(_weights(96, 16)), block_size=128, allowed_blocks=(64, 128))
    assert "block size" in str(e.value) and "64, 128" in str(e.value)
    with pytest.raises(QuantizationError, match="64 and 128"):
        plan_quantization("int4", "jetson-orin", block_size=32)
    with pytest.raises(QuantizationError, match="64 and 128"):
        plan_quantization("int4", "rtx-4090", block_size=256)
    assert plan_quantization("int4", "jetson-orin", block_size=64).decoder.params["block_size"] == 64
    assert plan_quantization("int4", "cpu", block_size=32).decoder.params["block_size"] == 32      # ORT CPU: any
    with pytest.raises(QuantizationError) as e:
        plan_quantization("int4", "cpu", block_size=48)
    assert "128, the default" in str(e.value) and "32, the default" not in str(e.value)


def _rmsnorm_softmax_model(d: int = 16):
    """LLaMA RMSNorm (Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul), weight, projection, Softmax."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
             helper.make_node("Reciprocal", ["rms"], ["inv"], name="recip"),
             helper.make_node("Mul", ["x", "inv"], ["xn"], name="norm"),
             helper.make_node("Mul", ["xn", "gamma"], ["xg"], name="gain"),
             helper.make_node("MatMul", ["xg", "w"], ["scores"], name="proj"),
             helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", d])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, "s", d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _sort(model) -> None:
    """Topological node order (convert_float_to_float16 appends its casts at the end)."""
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    todo, order = list(model.graph.node), []
    while todo:
        ready = [n for n in todo if all(i in known for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            order.append(n)
            todo.remove(n)
            known.update(n.output)
    del model.graph.node[:]
    model.graph.node.extend(order)


def test_fp16_graph_keeps_rmsnorm_and_softmax_fp32(tmp_path):
    """x**2 overflows fp16 for |x| > 256: the fp16 recipe keeps the RMSNorm chain (and Softmax) fp32 in the graph,
    with no fp16 round trip between the island's nodes; residual values ~1000 give the fp32 result."""
    from edgevlm.quant.apply import _fp16, save_graph

    model = _rmsnorm_softmax_model()
    src, dst = tmp_path / "src" / "g.onnx", tmp_path / "dst" / "g.onnx"
    src.parent.mkdir()
    dst.parent.mkdir()
    save_graph(copy.deepcopy(model), src)
    info = _fp16(src, dst)
    x = (np.random.default_rng(2).standard_normal((1, 4, 16)) * 1000).astype(np.float32)
    (ref,) = _run(model, {"x": x})
    converted = onnx.load(str(dst))
    onnx.checker.check_model(converted, full_check=True)
    (got,) = _run(converted, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=2e-3)
    typed = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
    types.update({i.name: i.data_type for i in typed.graph.initializer})
    island = {"pow", "mean", "add_eps", "sqrt", "recip", "norm", "softmax"}
    for n in typed.graph.node:
        if n.name in island:
            floats = [types[t] for t in [*n.input, *n.output] if t and types[t] != TensorProto.INT64]
            assert floats and all(t == TensorProto.FLOAT for t in floats), n.name
        elif n.name in ("gain", "proj"):
            assert types[n.output[0]] == TensorProto.FLOAT16, n.name
    assert info["fp32_islands"] == {"count": 7, "kinds": {"rmsnorm": 1, "softmax": 1}, "where": "kept fp32 in the graph"}
    # Each op in its declared dtype (ONNX's reference evaluator; ORT's CPU provider would insert fp32 casts around
    # fp16 ops it has no kernel for and hide the overflow that TensorRT's fp16 layers hit).
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    (emulated,) = ReferenceEvaluator(converted).run(None, {"x": x})
    np.testing.assert_allclose(emulated, ref, atol=2e-3)
    plain = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)   # no fp32 islands: x**2 overflows
    _sort(plain)
    with np.errstate(all="ignore"):
        (bad,) = ReferenceEvaluator(plain).run(None, {"x": x})
    assert not np.allclose(bad, ref, atol=0.05)


def test_tensorrt_presets_have_no_weight_only_int8_head():
    """TensorRT's weight-only quantization is INT4 only: its int4 preset keeps the LM head float (fp16); an explicit
    lm_head=int8 is W8A8; CPU targets keep the MatMulNBits 8-bit head."""
    from edgevlm.quant.recipes import plan_quantization
    from edgevlm.targets import PRECISION_PRESETS, get_target, recipe_name

    orin, cpu = get_target("jetson-orin"), get_target("cpu")
    assert orin.recipe(None) == {**PRECISION_PRESETS["int4"], "lm_head": "fp16"}
    assert cpu.recipe(None) == PRECISION_PRESETS["int4"]
    assert recipe_name(orin.recipe("int4"), tensorrt=True) == "int4"
    assert recipe_name(orin.recipe("int4,lm_head=int8"), tensorrt=True) == "int4,lm_head=int8"
    p = plan_quantization("int4", "jetson-orin")
    assert (p.name, p.decoder.method, p.decoder.lm_head_method) == ("int4", "int4-qdq", "fp16")
    assert p.decoder.params["tool"].startswith("edgevlm.quant.int4_qdq") and p.decoder.params["range"] == [-7, 7]
    assert "amax(|block|) / 7" in p.decoder.params["scale"]
    h = plan_quantization("int4,lm_head=int8", "jetson-orin").decoder
    assert h.lm_head_method == "static-qdq" and h.needs_calibration and "W8A8" in h.to_dict()["lm_head_format"]
    assert plan_quantization("int8", "jetson-orin").decoder.lm_head_method is None       # W8A8 like the rest
    c = plan_quantization("int4", "cpu").decoder
    assert (c.method, c.lm_head_method) == ("matmulnbits-int4", "matmulnbits-int8")
    with pytest.raises(Exception, match="fp16"):
        plan_quantization("int4,lm_head=fp16", "cpu")
    lp = plan_quantization("int4", "rtx-4090").decoder.layer_precisions()
    assert lp == {"matmul_weights": "int4", "matmul_compute": "fp16", "lm_head": "fp16", "norms": "fp32 (kept fp32 "
                  "in the graph)", "softmax": "fp32 (kept fp32 in the graph)", "other": "fp16"}
    lp = p.decoder.layer_precisions()
    assert lp["matmul_compute"] == lp["other"] == lp["lm_head"] == "fp16 (builder flag)"
    assert lp["norms"] == "fp32 (per-layer constraint in the build plan)"


# ---- bundles ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The tiny portable (standard-ops) fp32 bundle with the fp32 engine build plan a ``--target jetson-orin
    --precision fp32`` export writes (precision fp32, no builder flags)."""
    import shutil

    from edgevlm.bundle import read_bundle, update_manifest
    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle
    from tests.fixtures_bundles import tiny_bundle

    src = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")[0]
    out = tmp_path_factory.mktemp("fp32trt") / "bundle"
    shutil.copytree(src, out)
    entry = prepare_tensorrt_bundle(out, read_bundle(out).model_config, "jetson-orin", "fp32")
    update_manifest(out, lambda m: m.__setitem__("tensorrt", entry), new_files=[entry["plan_file"], entry["script"]])
    return out


_Q: dict[str, Path] = {}


@pytest.fixture(scope="module")
def quantized(portable, tmp_path_factory):
    from edgevlm.quant.apply import quantize_bundle

    def get(precision: str, target: str) -> Path:
        key = f"{precision}@{target}"
        if key not in _Q:
            out = tmp_path_factory.mktemp("qtrt") / "bundle"
            quantize_bundle(portable, out, precision, target=target, show=False, **SMALL)
            _Q[key] = out
        return _Q[key]
    return get


def _graph(path: Path):
    m = onnx.load(str(path))
    return m, {i.name: i for i in m.graph.initializer}, {o: n for n in m.graph.node for o in n.output}


def _scales(path: Path) -> list[np.ndarray]:
    m, inits, _ = _graph(path)
    return [numpy_helper.to_array(inits[n.input[1]]) for n in m.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits]


def _head(m, producers):
    node = producers["logits"]
    while node.op_type != "MatMul":
        node = producers[node.input[0]]
    return node


@pytest.mark.parametrize("precision,target", [("int4", "jetson-orin"), ("int4", "rtx-4090"),
                                              ("int4,lm_head=int8", "jetson-orin")])
def test_tensorrt_int4_bundle_parses(quantized, precision, target):
    """Every Q/DQ scale > 0, INT4 weights blocked with whole blocks, trt_compat clean, runs on ORT."""
    from edgevlm.graphs.trt_compat import ERROR, check_tensorrt_compat
    from edgevlm.runtime import Session
    from edgevlm.targets import get_target
    from tests.fixtures_bundles import make_image

    out = quantized(precision, target)
    for name in ("vision.onnx", "decoder.onnx"):
        scales = _scales(out / name)
        assert scales and all((s > 0).all() and np.isfinite(s).all() for s in scales), name
        m, inits, _ = _graph(out / name)
        dq_types = {inits[n.input[0]].data_type for n in m.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in inits}
        assert dq_types <= {TensorProto.INT8, TensorProto.INT4}, (name, dq_types)   # no INT32 bias DQ
        assert not [i for i in check_tensorrt_compat(out / name, get_target(target).tensorrt) if i.severity == ERROR]
    m, inits, _ = _graph(out / "decoder.onnx")
    blocked = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].data_type == TensorProto.INT4]
    assert len(blocked) == 14
    for n in blocked:
        b = {a.name: a.i for a in n.attribute}["block_size"]
        k = inits[n.input[0]].dims[0]
        assert b in (64, 128) and k % b == 0 and inits[n.input[1]].dims[0] == k // b and len(n.input) == 2
    rec = json.loads((out / "manifest.json").read_text())["components"]["decoder"]["recipe"]
    assert rec["method"] == "int4-qdq" and rec["nodes_quantized"] == 14 and rec["scale_min"] > 0
    s = Session.from_bundle(out, threads=1, optimized_cache=None)
    r = s.generate(make_image(3), "What shape is shown?", max_new_tokens=2, ignore_eos=True)
    assert len(r.tokens) == 2


def test_tensorrt_lm_head_is_fp16_or_w8a8(quantized):
    """int4 preset on TensorRT: the head is an unquantized float MatMul (recipe says fp16); lm_head=int8: W8A8 Q/DQ on
    both inputs (no weight-only INT8 DQ, which TensorRT does not document); W8A8 decoder: the head like the rest."""
    out = quantized("int4", "jetson-orin")
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"] == "int4" and man["recipe"]["components"]["lm_head"] == "fp16"
    rec = man["components"]["decoder"]["recipe"]
    assert rec["lm_head"] == "fp16" and rec["lm_head_method"] == "fp16"
    assert rec["layer_precisions"]["lm_head"] == "fp16 (builder flag)"
    m, inits, prod = _graph(out / "decoder.onnx")
    head = _head(m, prod)
    assert head.input[1] in inits and inits[head.input[1]].data_type == TensorProto.FLOAT
    for precision in ("int4,lm_head=int8", "int8"):
        m, inits, prod = _graph(quantized(precision, "jetson-orin") / "decoder.onnx")
        head = _head(m, prod)
        act, weight = prod[head.input[0]], prod[head.input[1]]
        assert act.op_type == "DequantizeLinear" and prod[act.input[0]].op_type == "QuantizeLinear", precision
        assert weight.op_type == "DequantizeLinear" and inits[weight.input[0]].data_type == TensorProto.INT8
    rec = json.loads((quantized("int4,lm_head=int8", "jetson-orin") / "manifest.json").read_text())[
        "components"]["decoder"]["recipe"]
    assert rec["lm_head_method"] == "static-qdq" and rec["lm_head_quantization"]["nodes_quantized"] == 1


def test_tensorrt_11_quantized_graphs_have_fp16_tensors(quantized):
    """TensorRT 11 builds strongly typed: the Q/DQ graph's float tensors are fp16 (DQ scales fp16 -> fp16 weights,
    fp16 MatMuls), the islands fp32, graph I/O fp32; ORT still runs it (the Session test above)."""
    out = quantized("int4", "rtx-4090")
    man = json.loads((out / "manifest.json").read_text())
    for name, kinds in (("decoder", {"rmsnorm", "softmax"}), ("vision", {"layernorm", "softmax"})):
        m = onnx.load(str(out / f"{name}.onnx"))
        typed = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input,
                                                                  *typed.graph.output]}
        inits = {i.name: i for i in m.graph.initializer}
        assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
                   for v in [*m.graph.input, *m.graph.output])
        dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in dqs)
        assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in dqs)
        mms = [n for n in m.graph.node if n.op_type in ("MatMul", "Conv")]
        assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in mms), name
        rec = man["components"][name]["recipe"]
        isl = rec["fp16_tensors"]["fp32_islands"]
        assert set(isl["kinds"]) == kinds and isl["count"] > 0 and isl["where"] == "kept fp32 in the graph"
        assert rec["float_types"] == "fp16" and rec["layer_precisions"]["other"] == "fp16"
        assert rec["layer_precisions"]["norms"] == "fp32 (kept fp32 in the graph)"
        for n in m.graph.node:
            if n.op_type in ("Softmax", "ReduceMean", "Pow", "LayerNormalization"):
                assert types.get(n.output[0], TensorProto.FLOAT) == TensorProto.FLOAT, n.name


def test_fp16_bundle_records_its_fp32_islands(quantized):
    out = quantized("fp16", "jetson-orin")
    rec = json.loads((out / "manifest.json").read_text())["components"]["decoder"]["recipe"]
    assert rec["fp32_islands"]["kinds"] == {"rmsnorm": 5, "softmax": 2}                # 2 layers x 2 norms + final
    assert rec["fp32_islands"]["where"] == "kept fp32 in the graph" and rec["island_casts_joined"] > 0
    m = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    pows = [n for n in m.graph.node if n.op_type == "Pow"]
    casts = {n.output[0]: n for n in m.graph.node if n.op_type == "Cast"}
    mean_inputs = [n.input[0] for n in m.graph.node if n.op_type == "ReduceMean"]
    # x**2 goes straight to ReduceMean in fp32 (no Cast between the island's nodes)
    assert pows and all(p.output[0] in mean_inputs and p.output[0] not in casts for p in pows)


@pytest.mark.parametrize("precision,flags", [("int4", "--fp16 --int4"), ("int8", "--fp16 --int8")])
def test_quantized_bundle_build_plan_is_for_the_quantized_graphs(quantized, portable, precision, flags):
    """The fp32 export's build plan (precision fp32, no flags) is replaced by one for the quantized graphs."""
    fp32_plan = json.loads((portable / "build_plan.json").read_text())
    assert all(not e["precision_flags"] for e in fp32_plan["engines"])
    out = quantized(precision, "jetson-orin")
    plan = json.loads((out / "build_plan.json").read_text())
    dec = next(e for e in plan["engines"] if e["component"] == "decoder")
    assert precision.split(",")[0] in dec["precisions"] and "fp32" not in dec["precisions"]
    assert " ".join(f"--{f}" for f in dec["precision_flags"]) == flags
    script = (out / "build_engines.sh").read_text()
    assert flags.split()[-1] in script
    man = json.loads((out / "manifest.json").read_text())
    assert man["tensorrt"]["plan_file"] == "build_plan.json" and man["tensorrt"]["plan"] == plan
    assert {"build_plan.json", "build_engines.sh"} <= set(man["files"])


def test_quantize_bundle_passes_trt_plan_options(portable, tmp_path, monkeypatch):
    from edgevlm.graphs import trt_plan
    from edgevlm.quant.apply import quantize_bundle

    seen = {}
    real = trt_plan.prepare_tensorrt_bundle

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(trt_plan, "prepare_tensorrt_bundle", spy)
    out = quantize_bundle(portable, tmp_path / "q", "fp16", target="jetson-orin", report=False, show=False,
                          trt_plan_options={"workspace_gb": 0.5})
    assert seen == {"workspace_gb": 0.5}
    assert "--memPoolSize=workspace:512" in (out / "build_engines.sh").read_text()
    cpu = quantize_bundle(portable, tmp_path / "cpu", "int8", target="cpu", report=False, show=False, **SMALL)
    assert not (cpu / "build_plan.json").exists() and "tensorrt" not in json.loads(
        (cpu / "manifest.json").read_text())


def test_fp16_tensors_keep_qdq_scales_normal_and_positive():
    """Converting a Q/DQ graph to fp16 tensors (TensorRT >= 11): a scale below fp16's smallest normal number would turn
    subnormal (or 0: TensorRT refuses it); it is lifted, and an int8 weight re-quantized with the lifted scale."""
    from edgevlm.quant.fp16 import FP16_MIN_NORMAL, convert_fp16

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 4)) * 1e-4).astype(np.float32)
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)                       # ~3e-6 < 6.1e-5
    w_q = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "a_s"), numpy_helper.from_array(np.int8(0), "a_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["wd"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    converted, info = convert_fp16(copy.deepcopy(model))
    assert info["qdq_scales_floored"] == {"weights": 4, "activations": 1}
    scales = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    assert scales["w_s"].dtype == np.float16 and (scales["w_s"].astype(np.float32) >= FP16_MIN_NORMAL * 0.999).all()
    assert scales["a_s"].astype(np.float32) >= FP16_MIN_NORMAL * 0.999
    w_new = scales["w_q"].astype(np.float32) * scales["w_s"].astype(np.float32)
    assert np.abs(w_new - w).max() <= FP16_MIN_NORMAL / 2 + 1e-9                     # re-quantized, not rescaled
    x = np.full((2, 8), 0.5, np.float32)
    (y,) = _run(converted, {"x": x})
    assert np.isfinite(y).all()
