"""Engine building: the clear errors without TensorRT / without a GPU (always run), and a real TensorRT build of a
tiny graph with prefill + decode profiles (marked gpu/tensorrt; skipped where TensorRT or a GPU is missing)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from edgevlm.config import get_model_config
from edgevlm.errors import MissingDependency, RuntimeBackendError
from edgevlm.exporter.trt_build import WHERE_TO_RUN, build_engines
from edgevlm.graphs.trt_plan import (EngineComponent, GraphInput, plan_tensorrt_build, standard_components,
                                       write_build_files)
from edgevlm.targets import get_target

TINY = get_model_config("tiny-ldpnet")


def _bundle_with_plan(tmp_path, target="jetson-orin"):
    plan = plan_tensorrt_build(TINY, target)
    write_build_files(tmp_path, plan)
    return plan


def test_build_engines_without_tensorrt_raises_missing_dependency(tmp_path, monkeypatch):
    _bundle_with_plan(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)         # `import tensorrt` -> ImportError, here and anywhere
    with pytest.raises(MissingDependency) as exc:
        build_engines(tmp_path)
    msg = str(exc.value)
    assert "tensorrt" in msg and "pip install 'edgevlm[tensorrt]'" in msg
    assert "build engines on the target device" in msg and "edgevlm build-engine BUNDLE" in msg
    assert "build_engines.sh" in msg and WHERE_TO_RUN in msg


def _fake_tensorrt(version: str, builder_error: Exception | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, level):
            self.level = level

    class Builder:
        def __init__(self, logger):
            if builder_error is not None:
                raise builder_error

    trt.Logger, trt.Builder = Logger, Builder
    return trt


def test_build_engines_without_a_gpu_says_where_to_run(tmp_path, monkeypatch):
    _bundle_with_plan(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt",
                        _fake_tensorrt("10.3.0.30", TypeError("pybind11::init(): factory function returned nullptr")))
    with pytest.raises(RuntimeBackendError) as exc:
        build_engines(tmp_path)
    assert "no usable NVIDIA GPU" in str(exc.value) and "Jetson" in str(exc.value)


def test_build_engines_refuses_another_tensorrt_version(tmp_path, monkeypatch):
    _bundle_with_plan(tmp_path)                                  # plan: TensorRT 10.3
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.4.0.106"))
    with pytest.raises(RuntimeBackendError, match=r"@trt11\.4"):
        build_engines(tmp_path, allow_version_mismatch=True)    # another major version is never accepted
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.7.0"))
    with pytest.raises(RuntimeBackendError, match="allow the mismatch"):
        build_engines(tmp_path)


def test_build_engines_needs_a_plan(tmp_path):
    from edgevlm.errors import BundleError

    with pytest.raises(BundleError, match="build_plan.json"):
        build_engines(tmp_path)


# ---- on a machine with TensorRT and an NVIDIA GPU ------------------------------------------------------------------
def _tiny_kv_graph(path):
    """inputs_embeds [batch, seq, 8] + past [batch, 2, past_seq, 4] -> logits, present (Concat along seq)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    w = nh.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    shape = nh.from_array(np.array([0, 0, 2, 4], np.int64), "heads_shape")
    nodes = [h.make_node("MatMul", ["inputs_embeds", "w"], ["hidden"], name="proj"),
             h.make_node("Softmax", ["hidden"], ["logits"], name="softmax", axis=-1),
             h.make_node("Reshape", ["hidden", "heads_shape"], ["heads"], name="split_heads"),
             h.make_node("Transpose", ["heads"], ["new_kv"], name="to_bhsd", perm=[0, 2, 1, 3]),
             h.make_node("Concat", ["past_key_values.0.key", "new_kv"], ["present.0.key"], name="append_kv", axis=2)]
    graph = h.make_graph(
        nodes, "tiny_kv",
        [h.make_tensor_value_info("inputs_embeds", T.FLOAT, ["batch", "seq", 8]),
         h.make_tensor_value_info("past_key_values.0.key", T.FLOAT, ["batch", 2, "past_seq", 4])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", 8]),
         h.make_tensor_value_info("present.0.key", T.FLOAT, ["batch", 2, "past_seq + seq", 4])],
        [w, shape])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9), str(path))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_tiny_engine_with_prefill_and_decode_profiles(tmp_path):
    trt = pytest.importorskip("tensorrt")
    _tiny_kv_graph(tmp_path / "decoder.onnx")
    comp = EngineComponent("decoder", "decoder.onnx",
                           (GraphInput("inputs_embeds", ("batch", "seq", 8)),
                            GraphInput("past_key_values.0.key", ("batch", 2, "past_seq", 4))), ("fp16",))
    major, minor = trt.__version__.split(".")[:2]
    target = get_target("rtx-4090", tensorrt=f"{major}.{minor}")
    plan = plan_tensorrt_build(TINY, target, components=[comp], context=64)
    write_build_files(tmp_path, plan)
    try:
        info = build_engines(tmp_path)
    except RuntimeBackendError as exc:
        if "cannot initialize CUDA" in str(exc):
            pytest.skip("TensorRT is installed but no NVIDIA GPU is usable")
        raise
    meta = info["decoder"]
    engine_file = tmp_path / meta["file"]
    assert engine_file.is_file() and meta["bytes"] == engine_file.stat().st_size and len(meta["sha256"]) == 64
    assert meta["tensorrt"] == trt.__version__ and meta["device"] and meta["build_s"] >= 0
    assert (tmp_path / plan.timing_cache).is_file()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_file.read_bytes())
    assert engine is not None and engine.num_optimization_profiles == 2
    prefill = engine.get_tensor_profile_shape("past_key_values.0.key", 0)
    decode = engine.get_tensor_profile_shape("past_key_values.0.key", 1)
    assert tuple(prefill[2]) == (1, 2, 0, 4)                              # zero-length past in the prefill profile
    assert tuple(decode[2]) == (1, 2, 63, 4)
    # a rebuild reuses the timing cache
    again = build_engines(tmp_path)
    assert again["decoder"]["bytes"] > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_standard_components_match_an_exported_tiny_bundle(tmp_path):
    """Export the tiny model with the project's exporter, then build its engines as planned (slow on a GPU box)."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("torch")
    from edgevlm.exporter.onnx_export import export_decoder, export_vision
    from edgevlm.graphs.trt_compat import assert_tensorrt_compat
    from edgevlm.model.vlm import build_model

    import tensorrt as trt

    model = build_model(TINY)
    export_vision(model, tmp_path / "vision.onnx")
    export_decoder(model, tmp_path / "decoder.onnx")
    major, minor = trt.__version__.split(".")[:2]
    target = get_target("rtx-4090", tensorrt=f"{major}.{minor}")
    for name in ("vision", "decoder"):
        assert_tensorrt_compat(tmp_path / f"{name}.onnx", target.tensorrt)
    comps = standard_components(TINY, target.recipe("fp32"))
    plan = plan_tensorrt_build(TINY, target, components=comps)
    write_build_files(tmp_path, plan)
    try:
        info = build_engines(tmp_path)
    except RuntimeBackendError as exc:
        if "cannot initialize CUDA" in str(exc):
            pytest.skip("TensorRT is installed but no NVIDIA GPU is usable")
        raise
    assert set(info) == {"vision", "decoder"}
