"""The decoder export traces its weights as float32 stand-ins and writes each one from the model's own tensor as the
file is written (``onnx_export._float32_stand_ins``): the graph is byte for byte the one an eager float32 export
writes, also from fp16 weights (a released checkpoint, a large random-init model), with no float32 copy of them."""

from __future__ import annotations

import filecmp

import pytest
import torch

pytest.importorskip("onnx")

from edgevlm.config import get_model_config  # noqa: E402
from edgevlm.model.vlm import build_model  # noqa: E402


def _eager_decoder(model, path):
    """The export as it was: every weight a real float32 tensor while tracing and saving."""
    from edgevlm.exporter import onnx_export as E
    from edgevlm.graphs import spec as S

    cfg = model.cfg
    spec = S.decoder_spec(cfg)
    E._export(E.decoder_module(model), (), S.decoder_example_inputs(cfg), path,
              dynamic_shapes=S.decoder_dynamic_shapes(cfg.llm.num_layers), input_names=spec.input_names,
              output_names=spec.output_names, opset=S.DEFAULT_OPSET, external_data=True, what="decoder",
              lazy_weights=False)
    E.finalize_graph(path, spec)


def _same_files(a, b):
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in ("decoder.onnx", "decoder.onnx.data"))


@pytest.mark.parametrize("min_elements", [0, None])
def test_stand_in_export_is_byte_identical_to_the_eager_export(tmp_path, monkeypatch, min_elements):
    """Every 2-D weight a stand-in (limit 0: the transposed projections too), and the default limit (the tiny
    model's LM head and embedding table)."""
    from edgevlm.exporter import onnx_export as E

    if min_elements is not None:
        monkeypatch.setattr(E, "STAND_IN_MIN_ELEMENTS", min_elements)
    seen = {}
    real = E._write_stand_ins_lazily

    def spy(program, held, what):
        seen["n"] = real(program, held, what)
        return seen["n"]

    monkeypatch.setattr(E, "_write_stand_ins_lazily", spy)
    m = build_model(get_model_config("tiny-ldpnetv2"), seed=0).eval()
    before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    E.export_decoder(m, tmp_path / "lazy" / "decoder.onnx")
    assert seen["n"] >= (14 if min_elements == 0 else 1)
    after = m.llm.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    _eager_decoder(m, tmp_path / "eager" / "decoder.onnx")
    assert _same_files(tmp_path / "lazy", tmp_path / "eager")


def test_fp16_language_model_exports_the_float32_graph_of_its_values(tmp_path, monkeypatch):
    """An fp16 language model writes the graph a float32 model holding the same (fp16) values writes, and keeps its
    fp16 weights."""
    from edgevlm.exporter import onnx_export as E

    monkeypatch.setattr(E, "STAND_IN_MIN_ELEMENTS", 0)
    cfg = get_model_config("tiny-ldpnetv2")
    half = build_model(cfg, seed=0, dtype=torch.float16).eval()
    half.vision_tower.float()
    half.mm_projector.float()
    full = build_model(cfg, seed=0).eval()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    E.export_decoder(half, tmp_path / "half" / "decoder.onnx")
    assert {p.dtype for p in half.llm.parameters()} == {torch.float16}
    _eager_decoder(full, tmp_path / "full" / "decoder.onnx")
    assert _same_files(tmp_path / "half", tmp_path / "full")


def test_stand_ins_are_restored_after_a_failed_export(monkeypatch):
    from edgevlm.exporter import onnx_export as E

    m = build_model(get_model_config("tiny-ldpnetv2"), seed=0, dtype=torch.float16).eval()
    dec = E.decoder_module(m)
    with pytest.raises(RuntimeError, match="boom"), E._float32_stand_ins(dec, 0) as held:
        assert held and all(p.dtype == torch.float32 for p in dec.parameters())
        assert all(p.stride()[0] == 0 for p in dec.parameters() if p.ndim == 2)      # no memory behind them
        raise RuntimeError("boom")
    assert {p.dtype for p in m.llm.parameters()} == {torch.float16}
    assert all(p.is_contiguous() for p in m.llm.parameters())


def _canonical(path):
    """A graph with its initializers loaded and re-encoded as raw data (external-data layout is not content)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    return m.SerializeToString(deterministic=True)


def test_tiny_jetson_fp16_export_is_the_old_pipelines_graphs_and_passes_parity(tmp_path):
    """``edgevlm export --target jetson-orin --precision fp16`` of a tiny model: parity passes, and the graphs are
    what the float32 export + the loaded-graph fp16 conversion (the pipeline before streaming) give."""
    import json
    import shutil

    from edgevlm.pipeline import export_bundle
    from edgevlm.quant.fp16 import convert_fp16_file_loaded

    fp16 = export_bundle("tiny-ldpnetv2", tmp_path / "fp16", random_init=True, target="jetson-orin",
                         precision="fp16", parity=True)
    m = json.loads((fp16 / "manifest.json").read_text())
    assert m["parity"]["passed"] and not m["parity"]["skipped"]
    dec = m["components"]["decoder"]
    assert dec["graph"] == "portable" and dec["recipe"]["streamed"] and dec["recipe"]["fp32_islands"]["count"] > 0
    assert "tensorrt" in m and m["export"]["timings_s"]["tensorrt"] >= 0
    fp32 = export_bundle("tiny-ldpnetv2", tmp_path / "fp32", random_init=True, target="jetson-orin",
                         precision="fp32", parity=False)
    old = tmp_path / "old"
    old.mkdir()
    for graph in ("vision.onnx", "decoder.onnx"):
        for f in (graph, graph + ".data"):
            shutil.copyfile(fp32 / f, old / f)
        convert_fp16_file_loaded(old / graph)
        assert _canonical(fp16 / graph) == _canonical(old / graph), graph


def test_large_model_path_keeps_fp16_weights_through_a_portable_fp16_export(tmp_path, monkeypatch):
    """A model >= LARGE_MODEL_PARAMS (here: the threshold lowered to the tiny model) is built in fp16 and exported
    to the portable graph with no float32 copy of its language model; parity (one sequence) passes at fp16
    tolerances."""
    import json

    from edgevlm.exporter import bundle_export as X
    from edgevlm.exporter import onnx_export as E
    from edgevlm.pipeline import export_bundle

    monkeypatch.setattr(X, "LARGE_MODEL_PARAMS", 0)
    monkeypatch.setattr(E, "STAND_IN_MIN_ELEMENTS", 0)
    seen = {}
    real = E.export_decoder

    def spy(model, *args, **kwargs):
        seen["llm"] = {p.dtype for p in model.llm.parameters()}
        seen["vision"] = {p.device.type for p in model.vision_tower.parameters()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(E, "export_decoder", spy)
    out = export_bundle("tiny-ldpnetv2", tmp_path / "b", random_init=True, target="jetson-orin", precision="fp16",
                        parity=True)
    assert seen["llm"] == {torch.float16} and seen["vision"] == {"meta"}     # vision weights freed before
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"]
    assert m["components"]["decoder"]["parity"]["passed"]
