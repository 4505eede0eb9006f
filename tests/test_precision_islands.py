"""precision_islands: the nodes an fp16 graph keeps in fp32, found in hand-built graphs of each pattern."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

from edgevlm.graphs.precision_islands import fp32_islands, island_nodes  # noqa: E402


def _graph(nodes, inits):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    return h.make_model(g)


def _rms(exponent_via_cast: bool):
    two = "two" if not exponent_via_cast else "two_f"
    nodes = ([h.make_node("Cast", ["two16"], ["two_f"], to=T.FLOAT, name="cast_two")] if exponent_via_cast else [])
    nodes += [h.make_node("Pow", ["x", two], ["p"], name="pow"),
              h.make_node("ReduceMean", ["p", "ax"], ["m"], name="mean"),
              h.make_node("Add", ["m", "eps"], ["a"], name="add_eps"),
              h.make_node("Sqrt", ["a"], ["s"], name="sqrt"),
              h.make_node("Reciprocal", ["s"], ["r"], name="rsqrt"),
              h.make_node("Mul", ["x", "r"], ["n"], name="normalize"),
              h.make_node("Mul", ["w", "n"], ["y"], name="weight")]
    inits = [nh.from_array(np.array(2, np.float16 if exponent_via_cast else np.float32),
                           "two16" if exponent_via_cast else "two"),
             nh.from_array(np.array([-1], np.int64), "ax"), nh.from_array(np.array(1e-6, np.float32), "eps"),
             nh.from_array(np.ones(4, np.float32), "w")]
    return _graph(nodes, inits)


@pytest.mark.parametrize("via_cast", [False, True])
def test_rmsnorm_chain_is_found_with_a_plain_or_cast_exponent(via_cast):
    islands = fp32_islands(_rms(via_cast))
    assert islands["rmsnorm"] == [["pow", "mean", "add_eps", "sqrt", "rsqrt", "normalize"]]
    assert "weight" not in island_nodes(_rms(via_cast))          # sees normalized values: stays fp16


def test_decomposed_layernorm_layernorm_op_and_softmax():
    nodes = [h.make_node("ReduceMean", ["x", "ax"], ["mu"], name="mu"),
             h.make_node("Sub", ["x", "mu"], ["xc"], name="center"),
             h.make_node("Pow", ["xc", "two"], ["p"], name="pow"),
             h.make_node("ReduceMean", ["p", "ax"], ["var"], name="var"),
             h.make_node("Add", ["var", "eps"], ["a"], name="add_eps"),
             h.make_node("Sqrt", ["a"], ["s"], name="sqrt"),
             h.make_node("Div", ["xc", "s"], ["ln"], name="div"),
             h.make_node("LayerNormalization", ["ln", "w", "b"], ["ln2"], name="ln_op", axis=-1),
             h.make_node("Softmax", ["ln2"], ["y"], name="softmax", axis=-1)]
    inits = [nh.from_array(np.array([-1], np.int64), "ax"), nh.from_array(np.array(2, np.float32), "two"),
             nh.from_array(np.array(1e-5, np.float32), "eps"), nh.from_array(np.ones(4, np.float32), "w"),
             nh.from_array(np.zeros(4, np.float32), "b")]
    islands = fp32_islands(_graph(nodes, inits))
    assert islands["layernorm"] == [["mu", "center", "pow", "var", "add_eps", "sqrt", "div"], ["ln_op"]]
    assert islands["softmax"] == [["softmax"]] and islands["rmsnorm"] == []


def test_a_square_that_is_not_a_norm_is_not_an_island():
    nodes = [h.make_node("Pow", ["x", "two"], ["p"], name="pow"), h.make_node("Add", ["p", "x"], ["y"], name="add")]
    assert island_nodes(_graph(nodes, [nh.from_array(np.array(2, np.float32), "two")])) == []
