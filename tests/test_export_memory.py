"""The export keeps a released fp16 checkpoint's language model in fp16: the ORT decoder builder casts each weight to
float32 as it writes it, the PyTorch reference computes in float32 one module at a time (``float32_forward``), and
the vision weights are freed once vision.onnx and its reference exist."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.config import get_model_config
from edgevlm.model.precision import float32_forward, stored_dtype
from edgevlm.model.vlm import build_model


def test_float32_forward_matches_a_float32_copy_and_restores_fp16():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    half = torch.nn.Sequential(*[m for m in net]).half()
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})   # the fp16 values, as float32
    x = torch.randn(4, 16)
    with torch.no_grad(), float32_forward(half):
        got = half(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref(x).detach())                  # exactly the float32 math on the same weights
    assert stored_dtype(half) == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())


def test_float32_forward_restores_the_weights_after_an_exception():
    lin = torch.nn.Linear(4, 4).half()
    lin.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), float32_forward(lin):
        lin(torch.randn(1, 4))
    assert lin.weight.dtype == torch.float16


def test_build_model_in_fp16_has_no_float32_copy_and_a_float32_rope():
    m = build_model(get_model_config("tiny-ldpnetv2"), seed=0, dtype=torch.float16)
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    assert m.llm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_fp16_checkpoint_exports_from_fp16_weights_with_float32_graphs(tmp_path, monkeypatch):
    import onnx

    import edgevlm.exporter.ort_decoder as OD
    from edgevlm.exporter.bundle_export import write_tokenizer
    from edgevlm.model.checkpoint import save_checkpoint
    from edgevlm.pipeline import export_bundle

    pytest.importorskip("onnxruntime_genai")
    cfg = get_model_config("tiny-ldpnetv2")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(build_model(cfg, seed=0), ckpt, dtype=torch.float16)      # stored like a released checkpoint
    write_tokenizer(ckpt, cfg, source_dir=None)
    seen = {}
    real = OD.build_ort_decoder

    def spy(llm, *args, **kwargs):
        seen["llm"] = next(llm.parameters()).dtype
        return real(llm, *args, **kwargs)

    monkeypatch.setattr(OD, "build_ort_decoder", spy)
    out = export_bundle(None, tmp_path / "b", checkpoint=ckpt, parity=True)
    assert seen["llm"] == torch.float16                      # never a float32 copy of the language model
    m = json.loads((out / "manifest.json").read_text())
    assert m["components"]["decoder"]["graph"] == "gqa"
    for name in ("vision", "decoder"):
        par = m["components"][name]["parity"]
        assert par["passed"] and par["max_abs_diff"] < 1e-4, par            # the fp32 tolerance
    g = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert {i.data_type for i in g.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT}
    assert {"reference_vision", "reference"} <= set(m["export"]["timings_s"])


def test_read_state_dict_converts_per_tensor(tmp_path):
    from edgevlm.model.checkpoint import read_state_dict, save_checkpoint

    ckpt = save_checkpoint(build_model(get_model_config("tiny-ldpnetv2"), seed=0), tmp_path / "c",
                           dtype=torch.float16)
    sd16 = read_state_dict(ckpt)
    sd32 = read_state_dict(ckpt, torch.float32)
    assert {v.dtype for v in sd16.values() if v.is_floating_point()} == {torch.float16}
    assert {v.dtype for v in sd32.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.equal(sd16[k].float(), sd32[k]) for k in sd16)
