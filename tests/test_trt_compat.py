"""TensorRT compatibility checker on small hand-built ONNX graphs (no TensorRT needed)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

from edgevlm.errors import TargetError  # noqa: E402
from edgevlm.graphs.trt_compat import (ERROR, WARNING, assert_tensorrt_compat, check_tensorrt_compat,  # noqa: E402
                                         supported_ops)


def model(nodes, inits=(), opset=20, extra_opsets=(), inputs=None, outputs=None):
    inputs = inputs or [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 8])]
    outputs = outputs or [h.make_tensor_value_info("y", T.FLOAT, None)]
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    ops = [h.make_opsetid("", opset)] + [h.make_opsetid(d, v) for d, v in extra_opsets]
    return h.make_model(g, opset_imports=ops, ir_version=10)


def clean_graph(zero_point=0, opset=20):
    """MatMul + Add + Softmax with a symmetric int8 Q/DQ pair on the weight."""
    w = nh.from_array(np.arange(64, dtype=np.int8).reshape(8, 8), "w_q")
    scale = nh.from_array(np.array(0.02, np.float32), "w_scale")
    zp = nh.from_array(np.array(zero_point, np.int8), "w_zp")
    b = nh.from_array(np.zeros(8, np.float32), "b")
    nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w"),
             h.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             h.make_node("Add", ["mm", "b"], ["logits"], name="add_bias"),
             h.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)]
    return model(nodes, [w, scale, zp, b], opset=opset,
                 outputs=[h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 8])])


def errors(issues):
    return [i for i in issues if i.severity == ERROR]


def test_clean_graph_passes():
    m = clean_graph()
    onnx.checker.check_model(m)
    for version in ("10.3", "11.4"):
        assert check_tensorrt_compat(m, version) == []
        assert assert_tensorrt_compat(m, version) == []


def test_contrib_op_rejected_with_node_name():
    w = nh.from_array(np.zeros((8, 4), np.uint8), "packed")
    s = nh.from_array(np.ones(8, np.float32), "scales")
    node = h.make_node("MatMulNBits", ["x", "packed", "scales"], ["y"], name="layers.0.mlp.up_proj/MatMulNBits",
                       domain="com.microsoft", K=8, N=8, bits=4, block_size=32)
    m = model([node], [w, s], extra_opsets=[("com.microsoft", 1)])
    errs = errors(check_tensorrt_compat(m, "10.3"))
    assert len(errs) == 1
    e = errs[0]
    assert (e.node, e.op, e.code) == ("layers.0.mlp.up_proj/MatMulNBits", "MatMulNBits", "domain")
    assert "com.microsoft" in e.message and "QDQ" in e.message
    with pytest.raises(TargetError) as exc:
        assert_tensorrt_compat(m, "10.3", component="decoder")
    assert "layers.0.mlp.up_proj/MatMulNBits (MatMulNBits)" in str(exc.value)
    assert exc.value.issues == check_tensorrt_compat(m, "10.3")


def test_asymmetric_dequantize_rejected_with_node_name():
    m = clean_graph(zero_point=3)
    errs = errors(check_tensorrt_compat(m, "10.3"))
    assert [(e.node, e.op, e.code) for e in errs] == [("dq_w", "DequantizeLinear", "asymmetric-qdq")]
    assert "zero point 'w_zp'" in errs[0].message and "3" in errs[0].message
    with pytest.raises(TargetError, match=r"dq_w \(DequantizeLinear\)"):
        assert_tensorrt_compat(m, "10.3")


def test_unsigned_and_dynamic_zero_points_rejected():
    zp = nh.from_array(np.array(0, np.uint8), "zp_u8")
    sc = nh.from_array(np.array(0.1, np.float32), "sc")
    nodes = [h.make_node("QuantizeLinear", ["x", "sc", "zp_u8"], ["q"], name="q_act"),
             h.make_node("DequantizeLinear", ["q", "sc", "zp_dyn"], ["y"], name="dq_act")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 8]), h.make_tensor_value_info("zp_dyn", T.UINT8, [])]
    errs = errors(check_tensorrt_compat(model(nodes, [zp, sc], inputs=inputs), "10.3"))
    assert ("q_act", "unsigned-qdq") in [(e.node, e.code) for e in errs]
    assert ("dq_act", "asymmetric-qdq") in [(e.node, e.code) for e in errs]


@pytest.mark.parametrize("opset", [22, 23])
def test_opset_above_trt_10_3_rejected(opset):
    m = clean_graph(opset=opset)
    errs = errors(check_tensorrt_compat(m, "10.3"))
    assert [e.code for e in errs] == ["opset"]
    assert f"opset {opset}" in errs[0].message and "20" in errs[0].message
    assert errors(check_tensorrt_compat(m, "11.4")) == []        # TensorRT 11.x parses up to 25
    with pytest.raises(TargetError, match="opset"):
        assert_tensorrt_compat(m, "10.3")


def blocked_int4_graph(opset=21):
    """A [K=128, N=8] INT4 weight in blocks of 64 along K (block sizes TensorRT supports: 64, 128)."""
    w4 = h.make_tensor("w_q4", T.INT4, [128, 8], np.zeros(128 * 8, np.int8).tolist())
    scales = nh.from_array(np.ones((2, 8), np.float32), "w_scales")
    nodes = [h.make_node("DequantizeLinear", ["w_q4", "w_scales"], ["w"], name="dq_int4", axis=0, block_size=64),
             h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return model(nodes, [w4, scales], opset=opset, inputs=[h.make_tensor_value_info("x", T.FLOAT, ["batch", 128])])


def test_opset_21_allowed_only_for_blocked_int4_dequantize():
    m = blocked_int4_graph()
    issues = check_tensorrt_compat(m, "10.3")
    assert errors(issues) == []
    assert [(i.severity, i.code) for i in issues] == [(WARNING, "opset")]
    assert [e.code for e in errors(check_tensorrt_compat(m, "10.3", allow_int4_opset21=False))] == ["opset"]
    plain = clean_graph(opset=21)                                 # opset 21 without blocked INT4 DQ
    errs = errors(check_tensorrt_compat(plain, "10.3"))
    assert [e.code for e in errs] == ["opset"] and "blocked INT4" in errs[0].message


def test_scatternd_reduction_and_unsupported_ops():
    idx = nh.from_array(np.zeros((1, 1), np.int64), "idx")
    upd = nh.from_array(np.zeros((1, 8), np.float32), "upd")
    nodes = [h.make_node("ScatterND", ["x2", "idx", "upd"], ["s"], name="kv_update", reduction="add"),
             h.make_node("MatMulInteger", ["a", "b"], ["y"], name="mm_int")]
    inputs = [h.make_tensor_value_info(n, t, s) for n, t, s in
              (("x2", T.FLOAT, [4, 8]), ("a", T.INT8, [2, 2]), ("b", T.INT8, [2, 2]))]
    errs = errors(check_tensorrt_compat(model(nodes, [idx, upd], inputs=inputs), "10.3"))
    got = {(e.node, e.code) for e in errs}
    assert got == {("kv_update", "scatternd-reduction"), ("mm_int", "unsupported-op")}
    assert "quantize_static" in next(e.message for e in errs if e.node == "mm_int") or "QDQ" in \
        next(e.message for e in errs if e.node == "mm_int")
    ok = h.make_node("ScatterND", ["x2", "idx", "upd"], ["y"], name="kv_update")     # no reduction: fine
    assert errors(check_tensorrt_compat(model([ok], [idx, upd], inputs=inputs[:1], opset=17), "10.3")) == []


def test_infinite_mask_constant_is_a_warning():
    neg_inf = h.make_node("Constant", [], ["neg_inf"], name="mask_min",
                          value=nh.from_array(np.array(-np.inf, np.float32)))
    lowest = nh.from_array(np.full((1, 1), np.finfo(np.float32).min, np.float32), "mask_lowest")
    nodes = [neg_inf,
             h.make_node("Less", ["x", "zero"], ["is_pad"], name="is_pad"),
             h.make_node("Where", ["is_pad", "neg_inf", "x"], ["masked"], name="apply_mask"),
             h.make_node("Cast", ["mask_lowest"], ["lowest_cast"], name="cast_mask", to=T.FLOAT),
             h.make_node("Add", ["masked", "lowest_cast"], ["y"], name="add_mask")]
    zero = nh.from_array(np.array(0, np.float32), "zero")
    issues = check_tensorrt_compat(model(nodes, [lowest, zero]), "10.3")
    assert errors(issues) == []
    warned = {(i.node, i.code) for i in issues}
    assert warned == {("apply_mask", "infinite-mask"), ("add_mask", "infinite-mask")}
    assert all("finite mask constants" in i.message for i in issues)
    finite = nh.from_array(np.array(-1e4, np.float32), "finite")
    fine = [h.make_node("Where", ["is_pad", "finite", "x"], ["y"], name="apply_mask"),
            h.make_node("Less", ["x", "zero"], ["is_pad"], name="is_pad")]
    assert check_tensorrt_compat(model(fine, [finite, zero]), "10.3") == []


def test_subgraphs_and_local_functions_are_checked():
    inner = h.make_graph([h.make_node("MatMulNBits", ["x", "x"], ["z"], name="inner_nbits", domain="com.microsoft")],
                         "then", [], [h.make_tensor_value_info("z", T.FLOAT, None)])
    other = h.make_graph([h.make_node("Identity", ["x"], ["z2"], name="else_id")], "else", [],
                         [h.make_tensor_value_info("z2", T.FLOAT, None)])
    cond = h.make_node("If", ["c"], ["y"], name="branch", then_branch=inner, else_branch=other)
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 2]), h.make_tensor_value_info("c", T.BOOL, [])]
    errs = errors(check_tensorrt_compat(model([cond], inputs=inputs, extra_opsets=[("com.microsoft", 1)]), "10.3"))
    assert [(e.node, e.op) for e in errs] == [("branch/inner_nbits", "MatMulNBits")]
    # a custom-domain node that is a model-local function is checked through its body (which is fine here)
    fn = h.make_function("local", "Gelu2", ["a"], ["b"], [h.make_node("Sigmoid", ["a"], ["b"], name="sig")],
                         [h.make_opsetid("", 20)])
    m = model([h.make_node("Gelu2", ["x"], ["y"], name="act", domain="local")], extra_opsets=[("local", 1)])
    m.functions.append(fn)
    assert errors(check_tensorrt_compat(m, "10.3")) == []


def test_supported_ops_by_version():
    assert "Attention" not in supported_ops("10.3") and "Attention" in supported_ops("11.4")
    assert "RMSNormalization" in supported_ops("10.15") and "RMSNormalization" not in supported_ops("10.14")
    for op in ("MatMul", "Gemm", "LayerNormalization", "Trilu", "HardSwish", "QuantizeLinear", "ScatterND", "Erf"):
        assert op in supported_ops("10.3")
    attn = h.make_node("Attention", ["x", "x", "x"], ["y"], name="sdpa")
    errs = errors(check_tensorrt_compat(model([attn], opset=23), "10.3"))
    assert {e.code for e in errs} == {"opset", "unsupported-op"}
    assert "added in TensorRT 10.14" in next(e.message for e in errs if e.code == "unsupported-op")


def test_check_from_path_with_external_data(tmp_path):
    m = clean_graph(zero_point=3)
    path = tmp_path / "g.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="g.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "g.onnx.data").is_file()
    errs = errors(check_tensorrt_compat(path, "10.3"))
    assert [(e.node, e.code) for e in errs] == [("dq_w", "asymmetric-qdq")]
    with pytest.raises(TargetError):
        check_tensorrt_compat(tmp_path / "missing.onnx", "10.3")
