"""DDP on CPU (gloo): 2 processes launched by torchrun give the same weights as 1 process with the same global batch.

Every stage kind (tower: attribute heads; vision: end to end; instruct). Tiny preset, no dropout anywhere (LLaMA and CLIP attention dropout are 0), fp32, same seeds; the per-rank batch is
half the global batch and DistributedSampler hands rank r every second index of the same permutation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edgevlm.model import load_checkpoint
from edgevlm.train.synthetic import write_dataset

ARGS = ["--model", "tiny-ldpnetv2", "--stages", "tower", "vision", "instruct", "--steps", "2", "--batch-size", "8",
        "--lr", "1e-3", "--bf16", "off", "--threads", "1", "--no-progress", "--eval-split", "none"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_two_process_ddp_equals_single_process(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, train=16, val=0, test=0, image_size=56, tokenizer_vocab=384, progress=False)
    recipe = tmp_path / "r.toml"
    recipe.write_text("adam_eps = 1e-6\n")   # damp Adam's 1/|g| on near-zero gradients (rounding noise)
    common = ARGS + ["--config", str(recipe), "--data", str(data)]
    single = subprocess.run([sys.executable, "-m", "edgevlm", "train", *common, "--out", str(tmp_path / "one")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "edgevlm", "train", *common, "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    log1 = json.loads((tmp_path / "one" / "train_log.json").read_text())
    log2 = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert log2["environment"]["distributed"]["world_size"] == 2
    assert log2["environment"]["distributed"]["backend"] == "gloo"
    assert [s["micro_batch"] for s in log2["stages"]] == [4, 4, 4]
    assert [s["tokens"] for s in log1["steps"]] == [s["tokens"] for s in log2["steps"]]     # same global batches
    assert [s["loss"] for s in log2["steps"]] == pytest.approx([s["loss"] for s in log1["steps"]], rel=1e-5)

    one = load_checkpoint(tmp_path / "one" / "checkpoint")[0].state_dict()
    two = load_checkpoint(tmp_path / "two" / "checkpoint")[0].state_dict()
    assert one.keys() == two.keys()
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
