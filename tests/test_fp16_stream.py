"""The streamed fp16 conversion (``edgevlm.quant.fp16.stream_fp16_file``: weights never loaded) writes the graph the
loaded-graph conversion writes: same nodes, attributes, I/O, value_info and initializer values, and ONNX Runtime
gives the same outputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _canonical(path):
    """The graph with every initializer loaded and re-encoded as raw data (external-data offsets and inline vs
    external placement are layout, not content), serialized: equal bytes = the same graph."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    return m.SerializeToString(deterministic=True)


def _copy(src_dir, dst_dir, graph):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in (graph, graph + ".data"):
        shutil.copyfile(src_dir / f, dst_dir / f)


def _ort_outputs(path, seed=0):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feed = {}
    dims = {"batch": 2, "seq": 3, "past_seq": 2, "past_seq + seq": 5}
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(d, 2) for d in i.shape]
        if "int" in i.type:
            feed[i.name] = np.ones(shape, dtype=np.int64) if i.name != "position_ids" else \
                np.broadcast_to(np.arange(shape[-1]) + 2, shape).astype(np.int64)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return s.run(None, feed)


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    from edgevlm.pipeline import export_bundle

    return export_bundle("tiny-ldpnetv2", tmp_path_factory.mktemp("fp16s") / "b", random_init=True,
                         target="jetson-orin-nano", precision="fp32", parity=False, decoder_graph="portable")


@pytest.mark.parametrize("graph", ["vision.onnx", "decoder.onnx"])
@pytest.mark.parametrize("in_place", [True, False])
def test_streamed_equals_loaded_conversion(fp32_bundle, tmp_path, graph, in_place):
    from edgevlm.quant.fp16 import convert_fp16_file_loaded, stream_fp16_file

    _copy(fp32_bundle, tmp_path / "loaded", graph)
    _copy(fp32_bundle, tmp_path / "streamed", graph)
    want = convert_fp16_file_loaded(tmp_path / "loaded" / graph)
    got = stream_fp16_file(tmp_path / "streamed" / graph, in_place_data=in_place)
    assert got.pop("streamed") is True and got.pop("data_in_place") is in_place
    assert got == want                                            # the same recipe details (islands, casts joined)
    assert _canonical(tmp_path / "streamed" / graph) == _canonical(tmp_path / "loaded" / graph)
    m = onnx.load(str(tmp_path / "streamed" / graph), load_external_data=False)
    assert {t.data_type for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} \
        >= {onnx.TensorProto.FLOAT16}
    for a, b in zip(_ort_outputs(tmp_path / "streamed" / graph), _ort_outputs(tmp_path / "loaded" / graph)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert sorted(os.listdir(tmp_path / "streamed")) == [graph, graph + ".data"]    # no temporary left behind


def test_convert_fp16_file_streams_graphs_with_external_data(fp32_bundle, tmp_path):
    from edgevlm.quant.fp16 import convert_fp16_file

    _copy(fp32_bundle, tmp_path, "decoder.onnx")
    info = convert_fp16_file(tmp_path / "decoder.onnx", None)
    assert info["streamed"] is True and info["fp32_islands"]["count"] > 0


def _edge_graph(dir_, embedded=False):
    """x [1, 512] -> LayerNormalization (an fp32 island: its scale and bias stay float32) -> MatMul W [512, 300]
    whose weight holds every value the fp16 cast clamps (tiny, huge, +-inf, 0, -0)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((512, 300)) * 0.02).astype(np.float32)
    w.flat[:12] = [1e-9, -1e-9, 5.9e-8, -5.9e-8, 7e4, -7e4, 65504.0, -65520.0, np.inf, -np.inf, 0.0, -0.0]
    scale = rng.standard_normal(512).astype(np.float32)
    bias = rng.standard_normal(512).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "edge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])],
                          [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (scale, "scale"), (bias, "bias"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    dir_.mkdir(parents=True, exist_ok=True)
    if embedded:
        onnx.save(m, str(dir_ / "g.onnx"))
    else:
        onnx.save(m, str(dir_ / "g.onnx"), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    return dir_ / "g.onnx"


def test_streamed_cast_clamps_like_the_converter_and_keeps_island_weights_fp32(tmp_path):
    from onnx import numpy_helper

    from edgevlm.quant.fp16 import convert_fp16_file_loaded, stream_fp16_file

    loaded = _edge_graph(tmp_path / "a")
    streamed = _edge_graph(tmp_path / "b")
    convert_fp16_file_loaded(loaded)
    stream_fp16_file(streamed)
    assert _canonical(streamed) == _canonical(loaded)
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(streamed)).graph.initializer}
    assert w["W"].dtype == np.float16 and w["scale"].dtype == np.float32 and w["bias"].dtype == np.float32
    assert list(w["W"].flat[:8]) == [np.float16(2**-24), -np.float16(2**-24), np.float16(2**-24),
                                     -np.float16(2**-24), 65504, -65504, 65504, -65504]
    assert np.isposinf(w["W"].flat[8]) and np.isneginf(w["W"].flat[9])
    x = {"x": np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)}
    import onnxruntime as ort

    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0]
            for p in (loaded, streamed))
    assert np.array_equal(a, b, equal_nan=True)


def test_to_float16_matches_onnxruntime_on_every_float32_class():
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from edgevlm.quant.fp16 import to_float16

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-9, 5.95e-8, 5.96e-8, 5.97e-8, 2**-24, 6.1e-5, 1.0, 65503.9,
                        65504.0, 65519.0, 65520.0, 1e5, 3.4e38, np.inf, -np.inf, np.nan], dtype=np.float32)
    a = np.concatenate([special, -special, rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(
        -9, 6, 100_000)]).astype(np.float32)
    want = convert_np_to_float16(a)
    assert to_float16(a).view(np.uint16).tolist() == want.view(np.uint16).tolist()


def test_hard_linked_data_is_never_written_in_place(tmp_path):
    """A data file shared by hard links (bundles link unchanged files) gets a new inode; the other link keeps the
    float32 bytes."""
    from edgevlm.quant.fp16 import stream_fp16_file

    g = _edge_graph(tmp_path / "a")
    os.link(g.with_name("g.onnx.data"), tmp_path / "other.data")
    before = (tmp_path / "other.data").read_bytes()
    info = stream_fp16_file(g)
    assert info["data_in_place"] is False
    assert (tmp_path / "other.data").read_bytes() == before
    assert os.stat(g.with_name("g.onnx.data")).st_nlink == 1


def test_embedded_graph_takes_the_loaded_path(tmp_path):
    from edgevlm.quant.fp16 import convert_fp16_file

    g = _edge_graph(tmp_path / "e", embedded=True)
    info = convert_fp16_file(g)
    assert "streamed" not in info
    assert onnx.load(str(g)).graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
