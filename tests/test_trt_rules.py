"""The TensorRT rule book (docs/tensorrt.md): one test per rule, each feeding a small hand-built ONNX graph (or build
plan) that breaks exactly that rule, next to a clean one that passes; and ``edgevlm verify`` failing a bundle on a
graph rule (negative Q/DQ scales) and on a plan rule (context), with the rule named. No TensorRT needed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

from edgevlm.errors import TargetError  # noqa: E402
from edgevlm.graphs.trt_compat import (ERROR, RULES, WARNING, assert_tensorrt_compat,  # noqa: E402
                                         check_build_plan, check_tensorrt_compat)

ROOT = Path(__file__).resolve().parents[1]


# ---- graph builders -------------------------------------------------------------------------------------------------
def model(nodes, inits=(), opset=20, inputs=None, outputs=None):
    inputs = inputs if inputs is not None else [h.make_tensor_value_info("x", T.FLOAT, ["batch", 128])]
    outputs = outputs if outputs is not None else [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8])]
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=10)


def int4_graph(K=128, N=8, block=64, scales=None, axis=0, wtype=T.INT4, scale_shape=None):
    """x [batch, K] @ DQ(w_q [K, N] INT4, per-block scales [ceil(K/block), N], axis, block_size) -> y."""
    w = h.make_tensor("w_q", wtype, [K, N], (np.arange(K * N) % 7 - 3).astype(np.int8).tolist())
    shape = scale_shape or ((-(-K // block), N) if axis == 0 else (K, -(-N // block)))
    s = nh.from_array(np.full(shape, 0.01, np.float32) if scales is None else np.asarray(scales), "w_scale")
    nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq_w", axis=axis, block_size=block),
             h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return model(nodes, [w, s], opset=21, inputs=[h.make_tensor_value_info("x", T.FLOAT, ["batch", K])])


def int8_weight_graph(scale=None, axis=1, values=None, zero_point=None, attrs=None, K=8, N=16, opset=20):
    """x [batch, K] @ DQ(w_q [K, N] INT8, per-channel scale [N] (axis 1) or a scalar) -> y [batch, N]."""
    vals = values if values is not None else (np.arange(K * N) % 255 - 127).astype(np.int8).reshape(K, N)
    s = np.full((N,), 0.02, np.float32) if scale is None else np.asarray(scale)
    inits = [nh.from_array(np.asarray(vals, np.int8), "w_q"), nh.from_array(s, "w_scale")]
    ins = ["w_q", "w_scale"]
    if zero_point is not None:
        inits.append(nh.from_array(np.asarray(zero_point, np.int8), "w_zp"))
        ins.append("w_zp")
    kw = dict(attrs if attrs is not None else ({"axis": axis} if s.size > 1 else {}))
    nodes = [h.make_node("DequantizeLinear", ins, ["w"], name="dq_w", **kw),
             h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return model(nodes, inits, opset=opset, inputs=[h.make_tensor_value_info("x", T.FLOAT, ["batch", K])],
                 outputs=[h.make_tensor_value_info("y", T.FLOAT, ["batch", N])])


def act_qdq_graph(scale_input=False, qtype=None, opset=None):
    """y = DQ(Q(x, s, zp), s, zp) on an activation: symmetric INT8 by default."""
    inits = [nh.from_array(np.array(0, np.int8), "zp")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8])]
    if scale_input:
        inputs.append(h.make_tensor_value_info("s", T.FLOAT, []))
    else:
        inits.append(nh.from_array(np.array(0.05, np.float32), "s"))
    q_kw = {}
    if qtype is not None:                                       # quantize to another type: output_dtype, no zp
        q_kw["output_dtype"] = qtype
        nodes = [h.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q_x", **q_kw),
                 h.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq_x")]
    else:
        nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q_x"),
                 h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq_x")]
    return model(nodes, inits, opset=opset or (21 if qtype else 20), inputs=inputs,   # output_dtype: opset 21
                 outputs=[h.make_tensor_value_info("y", T.FLOAT, ["batch", 8])])


def rmsnorm_graph(island_fp32: bool, eps=1e-6):
    """An fp16 graph: RMSNorm(x) -> Mul(norm weight) -> MatMul(fp16 weight). ``island_fp32`` puts the RMSNorm chain
    (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) in float32 between Casts, as the fp16 conversion must."""
    H = 8
    npt = np.float32 if island_fp32 else np.float16
    inits = [nh.from_array(np.array(2.0, npt), "two"), nh.from_array(np.array(eps, npt), "eps"),
             nh.from_array(np.array([-1], np.int64), "axes"),
             nh.from_array(np.ones(H, np.float16), "norm_w"), nh.from_array(np.eye(H, dtype=np.float16), "w")]
    nodes = []
    xin = "x"
    if island_fp32:
        nodes.append(h.make_node("Cast", ["x"], ["xf"], name="cast_in", to=T.FLOAT))
        xin = "xf"
    nodes += [h.make_node("Pow", [xin, "two"], ["sq"], name="pow"),
              h.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
              h.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
              h.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
              h.make_node("Reciprocal", ["rms"], ["inv"], name="recip"),
              h.make_node("Mul", [xin, "inv"], ["normed"], name="mul_norm")]
    out = "normed"
    if island_fp32:
        nodes.append(h.make_node("Cast", ["normed"], ["normed16"], name="cast_out", to=T.FLOAT16))
        out = "normed16"
    nodes += [h.make_node("Mul", [out, "norm_w"], ["scaled"], name="mul_weight"),
              h.make_node("MatMul", ["scaled", "w"], ["y"], name="mm")]
    return model(nodes, inits, opset=20, inputs=[h.make_tensor_value_info("x", T.FLOAT16, ["batch", H])],
                 outputs=[h.make_tensor_value_info("y", T.FLOAT16, ["batch", H])])


def codes(issues, severity=None):
    return {i.code for i in issues if severity is None or i.severity == severity}


def errors(issues):
    return [i for i in issues if i.severity == ERROR]


# ---- clean graphs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.3", "11.4"])
def test_clean_graphs_pass(version):
    for m in (int4_graph(block=64), int4_graph(block=128), int4_graph(K=64, block=128),   # K < block: one block
              int8_weight_graph(), act_qdq_graph(), rmsnorm_graph(island_fp32=True)):
        issues = check_tensorrt_compat(m, version)
        assert codes(issues) <= {"opset"}, [str(i) for i in issues]          # opset 21 on 10.3: the INT4 warning
        assert errors(issues) == []


def test_every_rule_is_in_the_rule_book_with_a_test():
    """docs/tensorrt.md lists every code of ``trt_compat.RULES`` with a source and a test that exists."""
    book = (ROOT / "docs" / "tensorrt.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\|[^|]*\|\s*`([a-z0-9-]+)`\s*\|[^|]*\|[^|]*\|\s*(.*?)\s*\|$",
                                                      book, re.M)}
    assert set(RULES) <= set(rows), sorted(set(RULES) - set(rows))
    sources = "".join((ROOT / "tests" / f).read_text() for f in ("test_trt_rules.py", "test_trt_compat.py"))
    for code, tests in rows.items():
        names = re.findall(r"`(test_[a-z0-9_]+)`", tests)
        assert names, f"rule {code} names no test"
        for name in names:
            assert f"def {name}(" in sources, f"rule {code}: test {name} does not exist"


# ---- Q/DQ scales ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, word", [(-0.01, "negative"), (0.0, "zero"), (np.nan, "NaN"), (np.inf, "inf")])
def test_scale_not_finite_positive_is_an_error(bad, word):
    scales = np.full((2, 8), 0.01, np.float32)
    scales[0, :3] = bad
    for version in ("10.3", "11.4"):
        errs = errors(check_tensorrt_compat(int4_graph(scales=scales), version))
        assert [(e.node, e.op, e.code) for e in errs] == [("dq_w", "DequantizeLinear", "qdq-scale-positive")]
        msg = errs[0].message
        assert "3 of 16" in msg and f"3 {word}" in msg and "w_scale" in msg
        assert "amax/7 for int4, amax/127 for int8" in msg
    with pytest.raises(TargetError, match=r"dq_w \(DequantizeLinear\) \[qdq-scale-positive\]"):
        assert_tensorrt_compat(int4_graph(scales=scales), "10.3", component="decoder")


def test_negative_fp16_int8_scale_is_an_error():
    m = int8_weight_graph(scale=np.full(16, -0.02, np.float16))
    errs = errors(check_tensorrt_compat(m, "10.3"))
    assert [(e.node, e.code) for e in errs] == [("dq_w", "qdq-scale-positive")]
    assert "16 of 16" in errs[0].message and "16 negative" in errs[0].message


def test_runtime_scale_is_an_error_and_folded_constant_a_warning():
    errs = errors(check_tensorrt_compat(act_qdq_graph(scale_input=True), "10.3"))
    assert {(e.node, e.code) for e in errs} == {("q_x", "qdq-scale-constant"), ("dq_x", "qdq-scale-constant")}
    assert "not a constant" in errs[0].message
    # a scale computed from constants (Mul of two initializers) is foldable: a warning to fold it
    m = int8_weight_graph(scale=np.float32(0.02))
    m.graph.node[0].input[1] = "s_folded"
    m.graph.node.insert(0, h.make_node("Mul", ["w_scale", "w_scale"], ["s_folded"], name="fold_me"))
    issues = check_tensorrt_compat(m, "10.3")
    assert [(i.severity, i.node, i.code) for i in issues] == [(WARNING, "dq_w", "qdq-scale-constant")]


def test_scale_dtype_must_be_float():
    m = int8_weight_graph(scale=np.float64(0.02))
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(m, "10.3"))] == [("dq_w", "qdq-scale-dtype")]


# ---- zero points, signedness ----------------------------------------------------------------------------------------
def test_nonzero_zero_point_is_an_error():
    m = int8_weight_graph(scale=np.float32(0.02), zero_point=np.int8(2))
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(m, "10.3"))] == [("dq_w", "asymmetric-qdq")]


def test_unsigned_weight_is_an_error():
    m = int8_weight_graph(scale=np.float32(0.02))
    m.graph.initializer[0].CopyFrom(nh.from_array(np.zeros((8, 16), np.uint8), "w_q"))
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(m, "10.3"))] == [("dq_w", "unsigned-qdq")]


def test_int32_bias_dequantize_is_an_error():
    m = int8_weight_graph(scale=np.float32(0.02))
    m.graph.initializer[0].CopyFrom(nh.from_array(np.zeros((8, 16), np.int32), "w_q"))
    errs = errors(check_tensorrt_compat(m, "10.3"))
    assert [(e.node, e.code) for e in errs] == [("dq_w", "qdq-wide-type")] and "QuantizeBias=False" in errs[0].message


# ---- axes, blocks ---------------------------------------------------------------------------------------------------
def test_per_channel_axis_must_match_the_scale():
    rows = int8_weight_graph(scale=np.full(8, 0.02, np.float32), attrs={"axis": 0})   # 8 scales for axis 0 of 8
    assert check_tensorrt_compat(rows, "10.3") == []
    wrong = int8_weight_graph(scale=np.full(8, 0.02, np.float32), attrs={"axis": 1})   # 8 scales, axis 1 has 16
    errs = errors(check_tensorrt_compat(wrong, "10.3"))
    assert [(e.node, e.code) for e in errs] == [("dq_w", "qdq-axis")] and "8 per-channel scales" in errs[0].message
    out_of_range = int8_weight_graph(attrs={"axis": 2})
    assert [e.code for e in errors(check_tensorrt_compat(out_of_range, "10.3"))] == ["qdq-axis"]
    two_d = int8_weight_graph(scale=np.full((8, 16), 0.02, np.float32), attrs={"axis": 1})   # no block_size
    assert [e.code for e in errors(check_tensorrt_compat(two_d, "10.3"))] == ["qdq-axis"]


def test_per_channel_without_axis_warns_on_10x():
    m = int8_weight_graph(attrs={})                                          # ONNX default axis 1 (16 scales)
    issues = check_tensorrt_compat(m, "10.3")
    assert [(i.severity, i.code) for i in issues] == [(WARNING, "qdq-axis-implicit")]
    assert check_tensorrt_compat(m, "11.4") == []


def test_blocked_dequantize_shape_rules():
    cases = {
        "int8 blocks": int4_graph(wtype=T.INT8),                             # blocks are for INT4 (and FP4)
        "3-D weight": None,
        "second axis differs": int4_graph(scale_shape=(2, 4)),               # scale [2, 4] for a [128, 8] weight
        "wrong block count": int4_graph(scale_shape=(4, 8)),                 # 128 / 64 = 2 blocks, not 4
        "ragged last block": int4_graph(K=192, block=128),                   # TensorRT would infer blocks of 96
        "block not an integer": int4_graph(K=704, block=128),                # 704 / 6 scale rows
    }
    w3 = h.make_tensor("w_q", T.INT4, [2, 128, 8], np.zeros(2 * 128 * 8, np.int8).tolist())
    s3 = nh.from_array(np.full((2, 2, 8), 0.01, np.float32), "w_scale")
    cases["3-D weight"] = model([h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq_w", axis=1,
                                             block_size=64),
                                 h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [w3, s3], opset=21)
    for what, m in cases.items():
        errs = errors(check_tensorrt_compat(m, "10.3"))
        assert [(e.node, e.code) for e in errs] == [("dq_w", "qdq-block")], (what, [str(e) for e in errs])
    q = act_qdq_graph()
    for n in q.graph.node:
        n.attribute.append(h.make_attribute("block_size", 64))
    assert "qdq-block" in codes(errors(check_tensorrt_compat(q, "10.3")))     # blocked QuantizeLinear


@pytest.mark.parametrize("K, block", [(64, 32), (256, 256), (128, 16)])
def test_int4_block_size_must_be_64_or_128(K, block):
    errs = errors(check_tensorrt_compat(int4_graph(K=K, block=block), "10.3"))
    assert [(e.node, e.code) for e in errs] == [("dq_w", "qdq-block-size")]
    assert "64 or 128" in errs[0].message


def test_int4_is_weight_only():
    q4 = act_qdq_graph(qtype=T.INT4)                                         # QuantizeLinear of an activation to INT4
    errs = errors(check_tensorrt_compat(q4, "10.3"))
    assert ("q_x", "int4-activation") in {(e.node, e.code) for e in errs}
    dq = model([h.make_node("DequantizeLinear", ["a4", "s"], ["y"], name="dq_act", axis=0, block_size=64)],
               [nh.from_array(np.full((1, 8), 0.1, np.float32), "s")],
               opset=21, inputs=[h.make_tensor_value_info("a4", T.INT4, [64, 8])])
    issues = check_tensorrt_compat(dq, "10.3")
    assert ("dq_act", "int4-activation") in {(e.node, e.code) for e in errors(issues)}


def test_int4_weight_needs_an_even_last_dimension():
    m = int4_graph(N=7)
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(m, "10.3"))] == [("dq_w", "int4-odd")]


def test_dequantize_output_type_must_be_float():
    m = int8_weight_graph(scale=np.float32(0.02), attrs={"output_dtype": T.INT32})
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(m, "10.3"))] == [("dq_w", "dq-output-type")]


def test_int8_weight_with_minus_128_is_a_warning():
    vals = np.zeros((8, 16), np.int8)
    vals[0, 0] = -128
    issues = check_tensorrt_compat(int8_weight_graph(values=vals), "10.3")
    assert [(i.severity, i.node, i.code) for i in issues] == [(WARNING, "dq_w", "int8-weight-range")]


# ---- I/O types, casts -----------------------------------------------------------------------------------------------
def test_io_dtypes():
    ident = [h.make_node("Identity", ["x"], ["y"], name="id")]
    for et in (T.FLOAT, T.FLOAT16, T.BFLOAT16, T.INT32, T.INT64, T.BOOL, T.UINT8):
        m = model(ident, inputs=[h.make_tensor_value_info("x", et, [2])], outputs=[h.make_tensor_value_info("y", et, [2])])
        assert check_tensorrt_compat(m, "10.3") == [], T.DataType.Name(et)
    for et, sev in ((T.DOUBLE, ERROR), (T.INT16, ERROR), (T.UINT16, ERROR), (T.UINT64, ERROR), (T.STRING, ERROR),
                    (T.INT4, ERROR), (T.COMPLEX64, ERROR), (T.INT8, WARNING)):
        m = model(ident, inputs=[h.make_tensor_value_info("x", et, [2])], outputs=[h.make_tensor_value_info("y", et, [2])])
        issues = check_tensorrt_compat(m, "10.3")
        assert {(i.severity, i.node, i.code) for i in issues} == {(sev, "x", "io-dtype"), (sev, "y", "io-dtype")}, \
            T.DataType.Name(et)


def test_cast_to_a_type_tensorrt_lacks_is_an_error():
    for to, want in ((T.INT16, (ERROR, "unsupported-cast")), (T.FLOAT8E4M3FN, (ERROR, "unsupported-cast")),
                     (T.DOUBLE, (WARNING, "double"))):
        m = model([h.make_node("Cast", ["x"], ["c"], name="cast", to=to),
                   h.make_node("Cast", ["c"], ["y"], name="back", to=T.FLOAT)])
        assert [(i.severity, i.code) for i in check_tensorrt_compat(m, "10.3")] == [want]


# ---- other ops -------------------------------------------------------------------------------------------------------
def test_scatternd_at_opset_18_warns_before_10_9():
    idx = nh.from_array(np.zeros((1, 1), np.int64), "idx")
    upd = nh.from_array(np.zeros((1, 128), np.float32), "upd")
    m = model([h.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="kv_update")], [idx, upd], opset=18)
    assert [(i.severity, i.code) for i in check_tensorrt_compat(m, "10.3")] == [(WARNING, "scatternd-opset")]
    assert check_tensorrt_compat(m, "10.9") == []


def test_runtime_axes_are_a_warning():
    m = model([h.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")],
              inputs=[h.make_tensor_value_info("x", T.FLOAT, ["batch", 128]),
                      h.make_tensor_value_info("axes", T.INT64, [1])], opset=18)
    assert [(i.severity, i.node, i.code) for i in check_tensorrt_compat(m, "10.3")] == [(WARNING, "mean",
                                                                                           "dynamic-axes")]
    m.graph.initializer.append(nh.from_array(np.array([-1], np.int64), "axes"))
    del m.graph.input[1]
    assert check_tensorrt_compat(m, "10.3") == []


def test_data_dependent_shape_is_a_warning():
    m = model([h.make_node("NonZero", ["x"], ["y"], name="nz")],
              outputs=[h.make_tensor_value_info("y", T.INT64, [2, "n"])])
    assert [(i.severity, i.code) for i in check_tensorrt_compat(m, "10.3")] == [(WARNING, "data-dependent")]


# ---- fp32 islands ---------------------------------------------------------------------------------------------------
def test_fp16_norm_in_a_strongly_typed_graph_is_an_error():
    bad = rmsnorm_graph(island_fp32=False)
    errs = errors(check_tensorrt_compat(bad, "11.4"))
    assert {e.code for e in errs} == {"fp16-island"}
    assert {e.node for e in errs} == {"pow", "mean", "add_eps", "sqrt", "recip", "mul_norm"}
    assert "FLOAT16" in errs[0].message and "float32" in errs[0].message
    # TensorRT 10 weakly typed: the graph's types are not obeyed (the build plan's fp32_layers rule covers it) ...
    assert errors(check_tensorrt_compat(bad, "10.3")) == []
    # ... unless the 10.x build is strongly typed
    assert {e.code for e in errors(check_tensorrt_compat(bad, "10.3", strongly_typed=True))} == {"fp16-island"}
    assert check_tensorrt_compat(rmsnorm_graph(island_fp32=True), "11.4") == []
    # LayerNormalization computes in its stash_type (float32 by default: setComputePrecision) whatever its I/O type
    ln = rmsnorm_graph(island_fp32=True)
    ln.graph.initializer.extend([nh.from_array(np.ones(8, np.float16), "ln_w"), nh.from_array(np.zeros(8, np.float16),
                                                                                              "ln_b")])
    ln.graph.node.insert(0, h.make_node("LayerNormalization", ["x0", "ln_w", "ln_b"], ["x"], name="ln", axis=-1))
    ln.graph.input[0].name = "x0"
    assert check_tensorrt_compat(ln, "11.4") == []
    ln.graph.node[0].attribute.append(h.make_attribute("stash_type", T.FLOAT16))
    assert [(e.node, e.code) for e in errors(check_tensorrt_compat(ln, "11.4"))] == [("ln", "fp16-island")]


# ---- build plans ----------------------------------------------------------------------------------------------------
def _plan_setup(precision="fp32", target="jetson-orin"):
    from edgevlm.config import get_model_config
    from edgevlm.graphs.trt_plan import plan_tensorrt_build, standard_components
    from edgevlm.targets import get_target

    cfg = get_model_config("tiny-ldpnetv2")
    plan = plan_tensorrt_build(cfg, target, precision)
    graphs = {c.name: {i.name: list(i.shape) for i in c.inputs}
              for c in standard_components(cfg, get_target(target).recipe(precision))}
    manifest = {"components": {"decoder": {"kv_cache": {"max_positions": cfg.context_length}}},
                "memory_plan": {"context": plan.context}}
    return plan, graphs, manifest


def _edit(plan, fn):
    d = json.loads(plan.to_json())
    fn(d)
    return d


def _profile(d, engine, name):
    e = next(e for e in d["engines"] if e["component"] == engine)
    return next(p for p in e["profiles"] if p["name"] == name)["shapes"]


def test_clean_plan_passes():
    for target in ("jetson-orin", "rtx-4090"):
        plan, graphs, manifest = _plan_setup("fp32", target)
        assert check_build_plan(plan, graphs, manifest) == []
        assert check_build_plan(plan.to_dict(), graphs, manifest) == []          # build_plan.json form


def test_plan_profiles_cover_every_dynamic_input():
    plan, graphs, manifest = _plan_setup()
    missing = _edit(plan, lambda d: _profile(d, "decoder", "decode").pop("position_ids"))
    issues = check_build_plan(missing, graphs, manifest)
    assert [(i.severity, i.node, i.code) for i in issues] == [(ERROR, "decoder/decode", "profile-input")]
    assert "position_ids" in issues[0].message
    extra = _edit(plan, lambda d: _profile(d, "vision", "default").update(
        bogus={"min": [1], "opt": [1], "max": [1]}))
    assert codes(check_build_plan(extra, graphs, manifest)) == {"profile-input"}


def test_plan_ranges_are_ordered_and_static_dims_fixed():
    plan, graphs, manifest = _plan_setup()

    def swap(d):
        r = _profile(d, "decoder", "prefill")["inputs_embeds"]
        r["min"][1], r["max"][1] = r["max"][1], r["min"][1]
    issues = check_build_plan(_edit(plan, swap), graphs, manifest)
    assert "profile-range" in codes(issues, ERROR)

    def static(d):
        _profile(d, "decoder", "prefill")["inputs_embeds"]["max"][2] = 65      # hidden is static 64
    issues = check_build_plan(_edit(plan, static), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("decoder/prefill", "profile-range")]
    assert "static 64" in issues[0].message


def test_plan_profiles_cover_the_kv_cache_shapes():
    plan, graphs, manifest = _plan_setup()
    ctx = plan.context

    def short_past(d):                                   # decode past 1..ctx-2: the last decode step is out of range
        for n, r in _profile(d, "decoder", "decode").items():
            if n.startswith("past_key_values"):
                r["max"][2] = ctx - 2
    issues = check_build_plan(_edit(plan, short_past), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("decoder/decode", "profile-kv")]
    assert f"1..{ctx - 1}" in issues[0].message

    def short_prompt(d):                                 # prefill seq up to max_prompt - 1
        for n, r in _profile(d, "decoder", "prefill").items():
            if n != "attention_mask" and not n.startswith("past"):
                r["max"][1] -= 1
                r["opt"][1] = min(r["opt"][1], r["max"][1])
    issues = check_build_plan(_edit(plan, short_prompt), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("decoder/prefill", "profile-kv")]
    assert "max_prompt_tokens" in issues[0].message

    def short_mask(d):                                   # the mask cannot hold past + seq = ctx in decode
        r = _profile(d, "decoder", "decode")["attention_mask"]
        r["max"][1] = ctx - 1
        r["opt"][1] = min(r["opt"][1], ctx - 1)
    issues = check_build_plan(_edit(plan, short_mask), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("decoder/decode", "profile-kv")]
    assert "attention_mask" in issues[0].message

    def no_empty_cache(d):                               # prefill past 1..1: a fresh prompt cannot run
        for n, r in _profile(d, "decoder", "prefill").items():
            if n.startswith("past"):
                r["min"][2] = r["opt"][2] = r["max"][2] = 1
            if n == "attention_mask":
                r["min"][1] += 1
                r["opt"][1] += 1
                r["max"][1] += 1
    issues = check_build_plan(_edit(plan, no_empty_cache), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("decoder/prefill", "profile-kv")]
    assert "past 0" in issues[0].message


def test_plan_context_is_the_manifests_kv_capacity():
    plan, graphs, manifest = _plan_setup()
    manifest["memory_plan"]["context"] = plan.context // 2
    issues = check_build_plan(plan, graphs, manifest)
    assert [(i.severity, i.code) for i in issues] == [(ERROR, "profile-context")]
    assert "memory_plan.context" in issues[0].message
    manifest["components"]["decoder"]["kv_cache"]["max_length"] = plan.context       # max_length wins
    assert check_build_plan(plan, graphs, manifest) == []


def test_weak_fp16_plan_pins_the_fp32_islands():
    from edgevlm.graphs import trt_plan
    from edgevlm.graphs.precision_islands import island_nodes
    from edgevlm.graphs.trt_plan import EngineComponent, GraphInput, plan_tensorrt_build

    g = rmsnorm_graph(island_fp32=False)
    comp = EngineComponent("decoder", "decoder.onnx", (GraphInput("x", ("batch", 8), "float16"),), ("fp16",),
                           "embed")
    from edgevlm.config import get_model_config
    plan = plan_tensorrt_build(get_model_config("tiny-ldpnetv2"), "jetson-orin", components=[comp])
    assert plan.builder_mode == "weak" and "fp16" in plan.engine("decoder").precision_flags
    islands = island_nodes(g)
    assert islands == ["pow", "mean", "add_eps", "sqrt", "recip", "mul_norm"]
    unpinned = _edit(plan, lambda d: d["engines"][0].__setitem__("fp32_layers", []))
    issues = check_build_plan(unpinned, {"decoder": g})
    field = "fp32_layers" in getattr(trt_plan.EnginePlan, "__dataclass_fields__", {})
    assert [(i.severity, i.node, i.code) for i in issues] == [(ERROR if field else WARNING, "decoder", "fp32-layers")]
    assert "6 of 6" in issues[0].message
    pinned = _edit(plan, lambda d: d["engines"][0].__setitem__("fp32_layers", islands))
    assert check_build_plan(pinned, {"decoder": g}) == []
    strong = _edit(plan, lambda d: (d.update(builder_mode="strong", tensorrt="11.4"),
                                    d["engines"][0].__setitem__("precision_flags", [])))
    assert check_build_plan(strong, {"decoder": g}) == []                  # strong: the graph's types decide


def test_builder_mode_matches_the_tensorrt_version():
    plan, graphs, manifest = _plan_setup()
    weak11 = _edit(plan, lambda d: d.update(tensorrt="11.4"))
    assert [(i.node, i.code) for i in check_build_plan(weak11, graphs, manifest)] == [("<plan>", "builder-mode")]
    plan, graphs, manifest = _plan_setup("fp32", "rtx-4090")
    flags = _edit(plan, lambda d: d["engines"][0].__setitem__("precision_flags", ["fp16"]))
    assert codes(check_build_plan(flags, graphs, manifest)) == {"builder-mode"}


def test_dla_engine_needs_static_shapes():
    plan, graphs, manifest = _plan_setup("fp16")

    def to_dla(d):
        e = next(e for e in d["engines"] if e["component"] == "vision")
        e["dla_core"], e["allow_gpu_fallback"] = 0, True
        e["profiles"][0]["shapes"]["pixel_values"]["max"][0] = 2               # batch 1..2: dynamic
    issues = check_build_plan(_edit(plan, to_dla), graphs, manifest)
    assert [(i.node, i.code) for i in issues] == [("vision/default", "dla-static")]
    assert "min = opt = max" in issues[0].message


# ---- verify fails on a hard rule ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orin_bundle(tmp_path_factory):
    from edgevlm.pipeline import export_bundle

    out = tmp_path_factory.mktemp("rules") / "tiny-orin"
    return export_bundle("tiny-ldpnetv2", out, random_init=True, target="jetson-orin", precision="fp32", parity=False)


def _negative_scale_lm_head(path: Path) -> str:
    """Route the LM head's weight through a per-channel INT8 DequantizeLinear whose scales are negative (what ORT's
    symmetric int4 QDQ writes: absmax / -8); ONNX Runtime computes the same logits, TensorRT rejects the graph."""
    m = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}
    lm = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits][-1]
    w = nh.to_array(inits[lm.input[1]]).astype(np.float32)
    scale = -np.abs(w).max(axis=0) / 127.0                                   # negative per-column scales
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    m.graph.initializer.extend([nh.from_array(q, "lm_w_q"), nh.from_array(scale.astype(np.float32), "lm_w_scale")])
    m.graph.node.insert(0, h.make_node("DequantizeLinear", ["lm_w_q", "lm_w_scale"], ["lm_w_dq"], name="lm_head_dq",
                                       axis=1))
    lm.input[1] = "lm_w_dq"
    (path.parent / (path.name + ".data")).unlink()                           # onnx.save appends to an existing file
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return "lm_head_dq"


def test_verify_fails_on_negative_scales(orin_bundle, tmp_path, capsys):
    from edgevlm.bundle import update_manifest
    from edgevlm.cli import main
    from edgevlm.exporter.verify import verify_bundle

    assert check_build_plan(orin_bundle) == []                               # the exported plan is clean
    bad = tmp_path / "neg"
    shutil.copytree(orin_bundle, bad)
    node = _negative_scale_lm_head(bad / "decoder.onnx")
    update_manifest(bad, lambda m: None, new_files=["decoder.onnx", "decoder.onnx.data"])   # hashes fixed
    report = verify_bundle(bad, samples=1)
    st = {c.name: c.status for c in report.checks}
    assert [c.name for c in report.failures] == ["trt:compat:decoder"], [(c.name, c.detail) for c in report.failures]
    assert st["sha256"] == st["run:decoder"] == st["run:kv-consistency"] == "pass"   # ORT is fine with it
    check = report.check("trt:compat:decoder")
    assert "qdq-scale-positive" in check.detail and node in check.detail and "amax/127" in check.detail
    assert check.data["rules"] == ["qdq-scale-positive"]
    assert main(["verify", str(bad), "--samples", "1"]) == 1
    assert "trt:compat:decoder" in capsys.readouterr().out


def test_verify_fails_on_a_plan_rule(orin_bundle, tmp_path):
    from edgevlm.bundle import update_manifest
    from edgevlm.exporter.verify import verify_bundle

    bad = tmp_path / "ctx"
    shutil.copytree(orin_bundle, bad)
    update_manifest(bad, lambda m: m["memory_plan"].update(context=m["memory_plan"]["context"] // 2))
    report = verify_bundle(bad, samples=1)
    assert [c.name for c in report.failures] == ["trt:build-plan"], [(c.name, c.detail) for c in report.failures]
    check = report.check("trt:build-plan")
    assert "profile-context" in check.detail and check.data["rules"] == ["profile-context"]
