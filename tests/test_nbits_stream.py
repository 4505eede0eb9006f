"""The streaming MatMulNBits pass writes what ORT's ``MatMulNBitsQuantizer`` writes, one weight at a time."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


def _load_all(path):
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return m, {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("bits,exclude_head", [(4, False), (8, True)])
def test_streamed_graph_equals_matmulnbitsquantizer(tmp_path_factory, tmp_path, bits, exclude_head):
    from edgevlm.quant.apply import _nbits_module, find_lm_head
    from edgevlm.quant.nbits_stream import quantize_matmulnbits_streaming
    from onnxruntime.quantization import QuantFormat
    from tests.fixtures_bundles import tiny_bundle

    bundle, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")
    src = bundle / "decoder.onnx"
    exclude = (find_lm_head(onnx.load(str(src), load_external_data=False)),) if exclude_head else ()
    q = _nbits_module().MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True,
                                             accuracy_level=4, nodes_to_exclude=list(exclude),
                                             quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    q.process()
    want = q.model.model
    info = quantize_matmulnbits_streaming(src, tmp_path / "decoder.onnx", bits=bits, block_size=32,
                                          accuracy_level=4, exclude=exclude)
    got, got_w = _load_all(tmp_path / "decoder.onnx")
    assert info["nodes_quantized"] == sum(n.op_type == "MatMulNBits" for n in want.graph.node) > 0
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output)) for n in want.graph.node]
    assert [list(n.attribute) for n in got.graph.node] == [list(n.attribute) for n in want.graph.node]
    from onnx import numpy_helper

    want_w = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer
              if t.name in {i for n in want.graph.node for i in n.input}}
    assert set(got_w) == set(want_w)
    for name, arr in want_w.items():
        assert got_w[name].dtype == arr.dtype and np.array_equal(got_w[name], arr), name
    data = tmp_path / "decoder.onnx.data"
    assert data.is_file() and not (tmp_path / "decoder.onnx.data").is_symlink()


def test_streamed_graph_runs_and_matches_in_onnxruntime(tmp_path_factory, tmp_path):
    """Same logits from ORT on the streamed graph as on the quantizer's graph (the data offsets are right)."""
    import onnxruntime as ort

    from edgevlm.quant.apply import _matmulnbits
    from edgevlm.quant.nbits_stream import quantize_matmulnbits_streaming
    from tests.fixtures_bundles import tiny_bundle

    bundle, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    (tmp_path / "src").mkdir()                 # a private copy: other tests hard-link the shared bundle's files,
    for name in ("decoder.onnx", "decoder.onnx.data"):          # which onnx.load (the loaded-graph path) refuses
        shutil.copy(bundle / name, tmp_path / "src" / name)
    src = tmp_path / "src" / "decoder.onnx"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quantize_matmulnbits_streaming(src, tmp_path / "a" / "decoder.onnx", bits=4, block_size=32, accuracy_level=4)
    _matmulnbits(src, tmp_path / "b" / "decoder.onnx", bits=4, block_size=32, quant_format="QOperator",
                 accuracy_level=4, stream=False)
    outs = []
    for d in ("a", "b"):
        s = ort.InferenceSession(str(tmp_path / d / "decoder.onnx"), providers=["CPUExecutionProvider"])
        feed = {}
        rng = np.random.default_rng(0)
        for i in s.get_inputs():
            shape = [1 if not isinstance(x, int) else x for x in i.shape]
            if i.name == "inputs_embeds":
                shape[1] = 4
            if i.name == "attention_mask":
                feed[i.name] = np.ones((1, 4), np.int64)
                continue
            if "int64" in i.type:
                feed[i.name] = np.arange(4, dtype=np.int64)[None]
                continue
            if i.name.startswith("past_key_values"):
                shape[2] = shape[2] if isinstance(i.shape[2], int) else 0
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        outs.append(s.run(None, feed)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_shared_weights_are_not_streamed(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.quant.nbits_stream import NotStreamable, quantize_matmulnbits_streaming

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="a"),
                           helper.make_node("MatMul", ["y", "W"], ["z"], name="b")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])], [w])
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"))
    with pytest.raises(NotStreamable, match="several nodes"):
        quantize_matmulnbits_streaming(tmp_path / "m.onnx", tmp_path / "o.onnx", bits=4, block_size=32,
                                       accuracy_level=4)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.onnx.data").exists()
