"""Checkpoint I/O in the released MobileVLM format: key names, every key consumed, round trips, typed errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgevlm.config import get_model_config
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.model import build_model, load_checkpoint, save_checkpoint
from edgevlm.model.checkpoint import to_hf_config

# The projector keys exactly as MobileVLM's released code names them (reference/mobilevlm.md §2).
LDP_KEYS = ["model.mlp.1.weight", "model.mlp.1.bias", "model.mlp.3.weight", "model.mlp.3.bias"] + [
    f"model.mb_block.{k}.block.{s}" for k in (1, 2) for s in (
        "0.0.weight", "0.1.weight", "0.1.bias", "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias",
        "2.0.weight", "2.1.weight", "2.1.bias")]
LDPV2_KEYS = ["mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias", "peg.peg.0.weight",
              "peg.peg.0.bias"]
MLP_KEYS = ["0.weight", "0.bias", "2.weight", "2.bias"]
PROJ_KEYS = {"tiny-ldpnet": LDP_KEYS, "tiny-ldpnetv2": LDPV2_KEYS, "tiny-mlp2x_gelu": MLP_KEYS}


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """Rename a model's tensors to the released names with an independent, explicit mapping."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision_tower.clip."):
            name = "model.vision_tower.vision_tower.vision_model." + k.split("vision_tower.clip.", 1)[1]
        elif k.startswith("mm_projector."):
            name = "model.mm_projector." + k.split("mm_projector.", 1)[1]
        elif k.startswith("llm.lm_head."):
            name = "lm_head." + k.split("llm.lm_head.", 1)[1]
        else:
            name = "model." + k.split("llm.model.", 1)[1]
        out[name] = v.clone().contiguous()
    return out


def write_released_checkpoint(model, path: Path, fmt: str = "safetensors", shards: int = 1, extra=None) -> Path:
    path.mkdir(parents=True)
    cfg = to_hf_config(model.cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    sd = released_state_dict(model)
    sd.update(extra or {})
    keys = sorted(sd)
    parts = [keys[i::shards] for i in range(shards)]
    if fmt == "safetensors":
        names = ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                                                           for i in range(shards)]
        for n, ks in zip(names, parts):
            save_file({k: sd[k] for k in ks}, str(path / n))
        index = "model.safetensors.index.json"
    else:
        names = ["pytorch_model.bin"] if shards == 1 else [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
                                                           for i in range(shards)]
        for n, ks in zip(names, parts):
            torch.save({k: sd[k] for k in ks}, str(path / n))
        index = "pytorch_model.bin.index.json"
    if shards > 1:
        (path / index).write_text(json.dumps({"weight_map": {k: names[i] for i, ks in enumerate(parts) for k in ks}}))
    return path


def _outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(1, 3, 56, 56, generator=g)
    ids = torch.tensor([[1, 5, 6, -200, 7, 8]])
    with torch.no_grad():
        return model(ids, px).logits


def assert_same_model(loaded, model) -> None:
    """``loaded`` is ``model``: exact by construction, then within float32 rounding as loaded.

    1. Every tensor (parameters and buffers, non-persistent ones included) is bit-identical, under the same name.
    2. Outputs are bit-identical once both models' tensors sit in fresh allocations (``copy.deepcopy``): PyTorch's
       CPU kernels choose their vector code paths by pointer alignment, and a tensor read from safetensors is
       16-byte aligned where the allocator gives 64, so the same weights can be summed in another order.
    3. The loaded model as it is (safetensors-backed tensors) gives the same outputs within float32 reordering
       error: a dot product of K terms reordered differs by at most ~K * 2**-24 * sum|a_i * b_i|; with K <= 128 and
       unit-scale activations that is <= 1e-5 (measured: <= 1.8e-7 on AVX2 and AVX-512 machines), i.e. torch's
       float32 defaults (atol 1e-5, rtol 1.3e-6).
    """
    sa, sb = loaded.state_dict(), model.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(loaded.named_buffers()), dict(model.named_buffers())
    assert sorted(ba) == sorted(bb)
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k
    torch.testing.assert_close(_outputs(copy.deepcopy(loaded)), _outputs(copy.deepcopy(model)), atol=0, rtol=0)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("name", list(PROJ_KEYS))
def test_released_format_loads_with_every_key_consumed(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(get_model_config(name)).eval()
    sd = released_state_dict(model)
    proj = sorted(k.removeprefix("model.mm_projector.") for k in sd if k.startswith("model.mm_projector."))
    assert proj == sorted(PROJ_KEYS[name])
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.1.") for k in sd)
    ckpt = write_released_checkpoint(model, tmp_path / "ckpt",
                                     extra={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    loaded, cfg = load_checkpoint(ckpt)
    assert cfg.projector_type == model.cfg.projector_type
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert_same_model(loaded, model)


@pytest.mark.parametrize("fmt,shards", [("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_sharded_and_bin_checkpoints(tmp_path, fmt, shards):
    model = build_model(get_model_config("tiny-ldpnetv2")).eval()
    ckpt = write_released_checkpoint(model, tmp_path / "c", fmt, shards)
    loaded, _ = load_checkpoint(ckpt)
    assert_same_model(loaded, model)


@pytest.mark.parametrize("name", list(PROJ_KEYS))
def test_save_then_load_gives_identical_outputs(tmp_path, name):
    model = build_model(get_model_config(name), seed=3).eval()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = save_checkpoint(model, tmp_path / "saved", tokenizer_src=tok)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "mobilevlm"
    loaded, cfg = load_checkpoint(out)
    assert cfg == model.cfg
    assert_same_model(loaded, model)


def test_save_shards_large_models(tmp_path):
    model = build_model(get_model_config("tiny-ldpnet"))
    out = save_checkpoint(model, tmp_path / "s", max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    loaded, _ = load_checkpoint(out)
    assert_same_model(loaded, model.eval())


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    model = build_model(get_model_config("tiny-ldpnet"))
    ckpt = write_released_checkpoint(model, tmp_path / "c")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(ckpt)


def test_missing_unexpected_and_misshapen_tensors_are_listed(tmp_path):
    model = build_model(get_model_config("tiny-ldpnet"))
    sd = released_state_dict(model)
    sd.pop("model.mm_projector.model.mb_block.2.block.1.fc1.bias")
    sd["model.mm_projector.extra.weight"] = torch.zeros(2)
    sd["lm_head.weight"] = torch.zeros(3, 3)
    ckpt = tmp_path / "bad"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(to_hf_config(model.cfg)))
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert "mb_block.2.block.1.fc1.bias" in msg and "extra.weight" in msg and "lm_head.weight (3, 3)" in msg
    assert e.value.missing and e.value.unexpected and e.value.mismatched


def test_unknown_projector_and_corrupt_weights(tmp_path):
    model = build_model(get_model_config("tiny-ldpnet"))
    ckpt = write_released_checkpoint(model, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "qformer"}))
    with pytest.raises(ConfigError, match="unknown projector type 'qformer'"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


def test_released_config_without_edgevlm_block_means_clip_l14_336():
    from edgevlm.model.checkpoint import from_hf_config

    hf = to_hf_config(get_model_config("mobilevlm-v2-1.7b"))
    hf.pop("edgevlm")
    hf["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    cfg = from_hf_config(hf, name="x")
    ref = get_model_config("mobilevlm-v2-1.7b")
    from dataclasses import replace

    assert cfg.vision == ref.vision and replace(cfg.llm, name=ref.llm.name) == ref.llm and cfg.visual_tokens == 144


class _RunsCode:
    """Unpickling this would run ``write_marker(path)``: the payload of a malicious pytorch_model.bin."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pickle code ran"))


def test_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    from edgevlm.cli import main

    model = build_model(get_model_config("tiny-ldpnet"))
    ckpt = write_released_checkpoint(model, tmp_path / "c", fmt="bin")
    marker = tmp_path / "pwned.txt"
    sd = released_state_dict(model)
    sd["model.norm.weight"] = _RunsCode(marker)
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="contains pickled Python code") as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert "(it references " in msg and "safetensors" in msg and "never runs code" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__     # torch's advice is not chained on
    assert not marker.exists()
    # the CLI: exit 2, one error line, no traceback, still nothing ran
    rc = main(["export", "--model", "tiny-ldpnet", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "pickled Python code" in err[0]
    assert "Traceback" not in "\n".join(err) and not marker.exists() and not (tmp_path / "b").exists()
    # a pickle of plain values that is not a state dict is a typed error too
    torch.save({"model.norm.weight": "not a tensor"}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(ckpt)
    torch.save([torch.ones(2)], ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(ckpt)
