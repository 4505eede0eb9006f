"""FSDP2 (``--shard fsdp``): 2 ranks under torchrun with gloo on the CPU train the tiny preset to the weights one
process reaches on the same global batches; the checkpoint keeps the MobileVLM format. Plus the per-GPU memory
table of docs/training.md (generated, checked against a hand-computed cell).

torch 2.13's ``fully_shard`` runs on CPU/gloo (all-gather and reduce-scatter are emulated there), so this needs no
GPU. fp32, no dropout, same seeds: the 2-rank losses and weights equal the single-process ones up to rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgevlm.config import get_model_config
from edgevlm.errors import ConfigError
from edgevlm.model import load_checkpoint
from edgevlm.train.recipe import make_config, train
from edgevlm.train.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tiny-ldpnetv2", "--batch-size", "8", "--lr", "1e-3", "--bf16", "off", "--threads", "1",
          "--no-progress", "--eval-split", "none"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fsdp") / "data"
    write_dataset(d, train=16, val=0, test=0, image_size=56, tokenizer_vocab=384, progress=False)
    (d.parent / "r.toml").write_text("adam_eps = 1e-6\n")   # damp Adam's 1/|g| on near-zero gradients
    return d


def _torchrun(args: list[str], out: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "edgevlm", "train", *args, "--shard", "fsdp", "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "train_log.json").read_text())


def _single(args: list[str], out: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "edgevlm", "train", *args, "--out", str(out)], env=_env(),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "train_log.json").read_text())


def _same_training(log1: dict, log2: dict, ckpt1: Path, ckpt2: Path) -> None:
    assert [s["tokens"] for s in log2["steps"]] == [s["tokens"] for s in log1["steps"]]      # same global batches
    losses1, losses2 = [s["loss"] for s in log1["steps"]], [s["loss"] for s in log2["steps"]]
    assert all(map(torch.isfinite, torch.tensor(losses2)))
    assert losses2[0] == pytest.approx(losses1[0], rel=1e-6)                                 # the first step
    assert losses2 == pytest.approx(losses1, rel=1e-5)
    one = load_checkpoint(ckpt1)[0].state_dict()
    two = load_checkpoint(ckpt2)[0].state_dict()                                             # strict: same format
    assert one.keys() == two.keys()
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp_two_ranks_equal_one_process_with_accumulation(data, tmp_path):
    """instruct stage (projector + LLM), 2 steps, gradient accumulation 2 (FSDP's no-sync path)."""
    args = COMMON + ["--config", str(data.parent / "r.toml"), "--data", str(data), "--stages", "instruct",
                     "--steps", "2", "--grad-accum", "2"]
    log2 = _torchrun(args, tmp_path / "two")
    res = train(make_config(str(data.parent / "r.toml"), model="tiny-ldpnetv2", data=str(data),
                            stages=["instruct"], steps=2, grad_accum=2, batch_size=8, lr=1e-3, bf16="off",
                            threads=1, progress=False, eval_split="none", out=str(tmp_path / "one")))
    env = log2["environment"]["distributed"]
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    stage = log2["stages"][0]
    assert stage["execution"]["parallel"] == "fsdp" and stage["micro_batch"] == 2
    assert res.log["stages"][0]["execution"]["parallel"] == "single"
    _same_training(res.log, log2, res.checkpoint, tmp_path / "two" / "checkpoint")
    trained = load_checkpoint(tmp_path / "two" / "checkpoint")[0]
    from edgevlm.model import build_model

    init = build_model(get_model_config("tiny-ldpnetv2"), seed=0).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in trained.state_dict().items() if k.startswith("llm."))


@pytest.mark.slow
def test_fsdp_every_stage_kind_and_lora(data, tmp_path):
    """tower (heads in the root unit), vision (trained tower), instruct; then LoRA merged after an FSDP stage."""
    base = COMMON + ["--config", str(data.parent / "r.toml"), "--data", str(data), "--steps", "2"]
    for name, extra in (("stages", ["--stages", "tower", "vision", "instruct"]),
                        ("lora", ["--stages", "instruct", "--lora-r", "4", "--lora-dropout", "0"])):
        log1 = _single(base + extra, tmp_path / f"{name}-one")
        log2 = _torchrun(base + extra, tmp_path / f"{name}-two")
        _same_training(log1, log2, tmp_path / f"{name}-one" / "checkpoint", tmp_path / f"{name}-two" / "checkpoint")
        if name == "stages":
            assert log2["stages"][0]["head_accuracy_train"] == log1["stages"][0]["head_accuracy_train"]


def test_fsdp_config_and_single_process():
    with pytest.raises(ConfigError, match="fsdp"):
        make_config(model="tiny-ldpnetv2", shard="zero3")
    from edgevlm.train import distributed as ddp
    from edgevlm.train.sharding import shard_copy, units

    with pytest.raises(ConfigError, match="torchrun"):
        shard_copy(torch.nn.Linear(2, 2), ddp.DistInfo())
    from edgevlm.model import build_model

    model = build_model(get_model_config("tiny-ldpnetv2"))
    cfg = get_model_config("tiny-ldpnetv2")
    assert len(units(model)) == cfg.llm.num_layers + cfg.vision.num_layers


def test_meta_copy_keeps_structure_and_trainability():
    from edgevlm.model import build_model
    from edgevlm.train.recipe import LossModule, set_trainable
    from edgevlm.train.sharding import meta_copy

    model = build_model(get_model_config("tiny-ldpnetv2"))
    set_trainable(model, ("projector",))
    lm = LossModule(model)
    cp = meta_copy(lm)
    assert [n for n, _ in cp.named_parameters()] == [n for n, _ in lm.named_parameters()]
    assert all(p.is_meta for p in cp.parameters())
    assert [p.requires_grad for p in cp.parameters()] == [p.requires_grad for p in lm.parameters()]
    for (n, b), (_, b0) in zip(cp.named_buffers(), lm.named_buffers()):
        assert not b.is_meta and torch.equal(b, b0), n
    assert all(not p.is_meta for p in lm.parameters())                          # the original is untouched


# ---- memory table -------------------------------------------------------------------------------------------------
def test_memory_estimate_hand_computed_cell():
    """mobilevlm-1.7b, FSDP over 4 GPUs: AdamW states = 8 bytes x (projector + LLM) / 4, by hand."""
    from edgevlm.train.memory import estimate

    d, f, v, L = 2048, 5632, 32000, 24                               # MobileLLaMA-1.4B
    llm = 2 * v * d + L * (4 * d * d + 3 * d * f + 2 * d) + d        # embed + head + layers + final norm
    c, s = 1024, 512                                                 # CLIP-L width; LDP squeeze width (d / 4)
    mlp = c * d + d + d * d + d
    block = 9 * d + 2 * d + (s * d + s) + (d * s + d) + d * d + 2 * d
    proj = mlp + 2 * block
    assert llm == 1_364_297_728 and proj == 18_936_832
    row = estimate(get_model_config("mobilevlm-1.7b"), "fsdp", gpus=4)
    assert row.terms["adamw"] == 8 * (llm + proj) / 4 == 2_766_469_120
    assert row.terms["grads"] == 4 * (llm + proj) / 4
    # the config's counts are the module's (built on the meta device)
    from edgevlm.model.vlm import count_parameters_meta

    meta = count_parameters_meta(get_model_config("mobilevlm-1.7b"))
    assert meta["llm"] == llm and meta["projector"] == proj


def test_docs_memory_table_is_the_generated_one():
    from edgevlm.train.memory import markdown_table, memory_rows

    doc = (ROOT / "docs" / "training.md").read_text()
    table = doc.split("<!-- memory-table:begin -->", 1)[1].split("<!-- memory-table:end -->", 1)[0].strip()
    assert table == markdown_table(memory_rows())
