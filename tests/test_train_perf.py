"""Training speed machinery: length-grouped batches and padding buckets, the mask-free causal forward, on-device
pixel normalization, the FLOPs model (against torch's FlopCounterMode), GPU peaks / MFU, the per-stage speed
summary in train_log.json, the profiler trace, the optimizer kernel choice, and the threaded data preparation.

Tiny presets, CPU only; no timing asserts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevlm.config import get_model_config
from edgevlm.model import build_model
from edgevlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from edgevlm.train import batching
from edgevlm.train.dataset import ImageCache, VLMDataset
from edgevlm.train.evaluate import preprocess_config
from edgevlm.train.flops import FlopModel, mfu, peak_tflops
from edgevlm.train.llava_data import load_dataset
from edgevlm.train.perf import stage_throughput
from edgevlm.train.recipe import LossModule, StageConfig, add_lora, optimizer_kernel, set_trainable, train
from edgevlm.train.synthetic import write_dataset
from edgevlm.train.tokenizer import load_tokenizer

MODEL = "tiny-ldpnetv2"
FAST = dict(model=MODEL, batch_size=4, threads=1, bf16="off", progress=False, eval_split="none")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("perf") / "data"
    write_dataset(d, train=16, val=0, test=0, image_size=56, tokenizer_vocab=384, multi_turn=True, progress=False)
    return d


@pytest.fixture(scope="module")
def dataset(data) -> VLMDataset:
    cfg = get_model_config(MODEL)
    return VLMDataset(load_dataset(data / "train.json"), load_tokenizer(data / "tokenizer"), preprocess_config(cfg))


# ---- batches ------------------------------------------------------------------------------------------------------
def test_pad_length_rounds_the_spliced_sequence():
    assert batching.pad_length(70, 8) == 72
    assert batching.pad_length(72, 8) == 72
    assert batching.pad_length(70, 8, extra=3) == 77                # 77 + 3 = 80
    assert batching.pad_length(70, 64, extra=143) == 113            # 113 + 143 = 256
    assert batching.pad_length(70, 1, extra=5) == 70


def _lengths(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(20, 300, n).tolist()


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    n, batch, lens = 200, 16, _lengths(200)
    steps = {}
    for world, accum in ((1, 1), (1, 4), (2, 2), (4, 1), (8, 2)):
        per_rank = [batching.GlobalBatches(n, batch, world, r, accum, seed=3, lengths=lens, group_by_length=4)
                    for r in range(world)]
        iters = [iter(s) for s in per_rank]
        got = []
        for _ in range(2 * per_rank[0].per_epoch):                  # two epochs
            step = []
            for it in iters:
                for _ in range(accum):
                    mb = next(it)
                    assert len(mb) == batch // (world * accum)
                    step += mb
            got.append(sorted(step))
        steps[(world, accum)] = got
    ref = steps[(1, 1)]
    assert all(v == ref for v in steps.values())
    epoch = [i for b in ref[: n // batch] for i in b]
    assert len(epoch) == len(set(epoch)) == (n // batch) * batch       # a permutation, last partial batch dropped
    assert ref[: n // batch] != ref[n // batch:]                       # a new order every epoch


def test_batches_are_deterministic_by_seed():
    lens = _lengths(64)
    a = batching.GlobalBatches(64, 8, seed=1, lengths=lens, group_by_length=2).global_batches(0)
    b = batching.GlobalBatches(64, 8, seed=1, lengths=lens, group_by_length=2).global_batches(0)
    c = batching.GlobalBatches(64, 8, seed=2, lengths=lens, group_by_length=2).global_batches(0)
    assert a == b and a != c


def test_length_grouping_cuts_padding_and_shapes():
    n, batch, lens = 1024, 16, _lengths(1024, seed=5)

    def waste_and_shapes(group: int) -> tuple[int, int]:
        s = batching.GlobalBatches(n, batch, world=1, rank=0, accum=2, seed=0, lengths=lens, group_by_length=group)
        waste, shapes = 0, set()
        for gb in s.global_batches(0):
            for mb in s.micro_batches(gb):
                t = batching.pad_length(max(lens[i] for i in mb), 32, extra=15)
                waste += sum(t - lens[i] for i in mb)
                shapes.add(t)
        return waste, len(shapes)

    plain_waste, _ = waste_and_shapes(0)
    grouped_waste, shapes = waste_and_shapes(8)
    assert grouped_waste < plain_waste / 3
    assert shapes <= (300 - 20) // 32 + 2                              # one per 32-token bucket at most


def test_collate_pads_to_the_bucket_and_device_pixels_equal_pixel_values(dataset):
    rows = [0, 3, 5]
    plain = dataset.collate(rows)
    view = batching.BatchView(dataset, pad_multiple=16, extra=3)
    mb = view[rows]
    t = max(dataset.lengths[i] for i in rows)
    assert mb["input_ids"].shape[1] == batching.pad_length(t, 16, 3) >= t
    assert (mb["input_ids"].shape[1] + 3) % 16 == 0
    assert mb["canvases"].dtype == torch.uint8 and "pixel_values" not in mb
    n = plain["input_ids"].shape[1]
    for k in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(mb[k][:, :n], plain[k])
    assert (mb["labels"][:, n:] == IGNORE_INDEX).all() and (mb["attention_mask"][:, n:] == 0).all()
    dev = batching.to_device(mb, torch.device("cpu"), dataset.images.normalize)
    assert torch.equal(dev["pixel_values"], plain["pixel_values"])            # bit-identical normalization
    counts = batching.batch_counts(mb, visual_tokens=4, ignore_index=IGNORE_INDEX)
    assert counts["rows"] == [len(dataset.examples[i].input_ids) + 3 for i in rows]
    assert counts["supervised"] == sum(dataset.examples[i].num_supervised for i in rows)


@pytest.mark.parametrize("share", [False, True])
def test_right_padded_causal_forward_equals_the_masked_one(dataset, share):
    model = build_model(get_model_config(MODEL))
    batch = batching.BatchView(dataset, pad_multiple=32, extra=3)[[0, 1, 2, 7]]   # padded well past every row
    batch = batching.to_device(batch, torch.device("cpu"), dataset.images.normalize)
    lm = LossModule(model, share_prefix=share)
    prefix = lm.shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert (prefix > 0) == share
    results = []
    for right_padded in (False, True):
        model.zero_grad()
        loss = lm(**batch, prefix=prefix, right_padded=right_padded)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-6, rtol=1e-5)


# ---- FLOPs / MFU --------------------------------------------------------------------------------------------------
def _counted_and_modelled(name: str, parts: tuple[str, ...], lora_r: int = 0) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_model_config(name)
    model = build_model(cfg)
    # Eager attention: its matmuls are visible to the counter (SDPA kernels are not counted on every backend).
    model.llm.config._attn_implementation = "eager"
    model.vision_tower.clip.config._attn_implementation = "eager"
    set_trainable(model, parts)
    n_lora = 0
    if lora_r:
        add_lora(model, StageConfig("s", lora_r=lora_r, lora_dropout=0.0))
        n_lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    lm = LossModule(model)
    b, t = 3, 40
    ids = torch.randint(3, cfg.llm.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    ids[:, :12] = ids[0, :12]                                     # a shared prefix, computed once
    ids[:, 12] = IMAGE_TOKEN_INDEX
    labels = torch.full((b, t), IGNORE_INDEX)
    labels[:, 30:] = ids[:, 30:]
    mask = torch.ones(b, t, dtype=torch.long)
    px = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size)
    prefix = lm.shared_prefix_length(ids, mask, labels)
    assert prefix == 12
    with FlopCounterMode(display=False) as counter:
        lm(ids, px, mask, labels, prefix=prefix, right_padded=True).backward()
    fm = FlopModel.for_stage(cfg, parts, lora_params=n_lora)
    modelled = fm.step_flops([t + cfg.visual_tokens - 1] * b, supervised=int((labels != IGNORE_INDEX).sum()),
                             images=b, prefix=prefix)
    return counter.get_total_flops(), modelled


@pytest.mark.parametrize("name,parts,lora_r", [
    ("tiny-mlp2x_gelu", ("projector", "llm"), 0),
    ("tiny-mlp2x_gelu", ("projector",), 0),                         # frozen LLM, gradients still cross it
    ("tiny-mlp2x_gelu", ("vision", "projector", "llm"), 0),
    ("tiny-mlp2x_gelu", ("projector", "llm"), 4),                   # LoRA: adapter weight gradients only
    ("demo", ("projector", "llm"), 0),                              # ldpnetv2 (pooled tokens)
])
def test_flop_model_matches_torch_flop_counter(name, parts, lora_r):
    counted, modelled = _counted_and_modelled(name, parts, lora_r)
    assert modelled == pytest.approx(counted, rel=0.03)


def test_flop_model_counts_what_each_stage_trains():
    cfg = get_model_config("mobilevlm-1.7b")
    rows, sup = [340] * 16, 16 * 40
    frozen_llm = FlopModel.for_stage(cfg, ("projector",)).step_flops(rows, sup, 16)
    full = FlopModel.for_stage(cfg, ("projector", "llm")).step_flops(rows, sup, 16)
    m = cfg.llm
    layer = 4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.intermediate_size       # MHA: kv width = d
    weight_grads = 2 * m.num_layers * layer * sum(rows) + 2 * m.hidden_size * m.vocab_size * sup
    assert full - frozen_llm == pytest.approx(weight_grads)
    # ~ forward 2N + backward 4N per LLM token: within 6N +- the frozen tower and attention
    per_token = full / sum(rows)
    n_llm = m.num_layers * layer
    assert 6 * n_llm < per_token < 9 * n_llm


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("Orin", None), ("NVIDIA L40", None), (None, None),
])
def test_gpu_peak_table(name, peak):
    assert peak_tflops(name)[0] == peak
    assert peak_tflops(name, override=100.0)[0] == 100.0


def test_stage_throughput_separates_warmup_and_computes_mfu():
    step_s = [2.0, 2.2, 0.5, 0.25, 0.25, 0.3, 0.25]
    flops = [2.5e14] * len(step_s)
    s = stage_throughput(step_s, tokens=[1000] * 7, supervised=[100] * 7, samples=[16] * 7, flops=flops,
                         warmup_steps=2, peak=989.0, peak_source="t", devices=2,
                         shapes=[(16, 96), (16, 128), (16, 96), (16, 96), (16, 128), (16, 96), (16, 96)])
    assert s["warmup_steps"] == 2 and s["warmup_s"] == pytest.approx(4.2)
    assert s["step_s_median"] == pytest.approx(0.25)
    steady = sum(step_s[2:])
    assert s["tokens_per_s"] == pytest.approx(5000 / steady, rel=1e-3)
    assert s["model_flops_per_token"] == 250_000_000_000
    assert s["mfu"] == pytest.approx(5 * 2.5e14 / steady / (2 * 989e12), abs=1e-4)
    assert s["distinct_shapes"] == 2 and s["new_shape_steps"] == [1, 2]
    assert mfu(1e12, 1.0, None) is None
    short = stage_throughput([1.0, 1.0], [1, 1], [1, 1], [1, 1], [1, 1], 5, None, "x", 1, [(1,), (1,)])
    assert short["warmup_steps"] == 0 and short["mfu"] is None                  # too short: all steps steady


def test_optimizer_kernel_is_fused_only_on_cuda():
    class P:
        def __init__(self, kind: str) -> None:
            self.device = torch.device(kind)

    assert optimizer_kernel([{"params": [P("cuda"), P("cuda")]}]) == {"fused": True}
    assert optimizer_kernel([{"params": [P("cpu")]}]) == {"foreach": True}
    assert optimizer_kernel([{"params": [P("cuda")]}, {"params": [P("cpu")]}]) == {"foreach": True}


# ---- the recipe ---------------------------------------------------------------------------------------------------
def test_train_log_reports_speed_per_stage_and_the_profile(data, tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", MODEL, "--data", str(data), "--stages", "tower", "instruct", "--steps", "3",
               "--batch-size", "4", "--grad-accum", "2", "--threads", "1", "--bf16", "off", "--no-progress",
               "--eval-split", "none", "--pad-multiple", "16", "--profile", "--profile-steps", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "profile:" in printed
    log = json.loads((out / "train_log.json").read_text())
    steps = [s for s in log["steps"] if s["stage"] == "instruct"]
    stage = log["stages"][1]
    sp = stage["speed"]
    assert sp["warmup_steps"] == 0 and sp["mfu"] is None and "CPU" in sp["peak_source"]
    assert sp["tokens_per_s"] == pytest.approx(sum(s["llm_tokens"] for s in steps) / sum(s["step_s"] for s in steps),
                                               rel=0.02)
    assert sp["supervised_tokens_per_s"] < sp["tokens_per_s"]
    assert sp["model_flops_per_token"] > 6 * get_model_config(MODEL).llm.num_params() / 10
    assert 1 <= sp["distinct_shapes"] <= 6 and sp["new_shape_steps"][0] == 1
    assert stage["execution"] == {"parallel": "single", "optimizer": "AdamW (foreach)", "pad_multiple": 16,
                                  "group_by_length": 8, "loader_workers": 0, "pin_memory": False}
    assert log["stages"][0]["speed"]["tokens_per_s"] == 0                     # tower stage: images only
    assert log["precision"]["master_weights"] == "float32"
    for name in ("1-tower", "2-instruct"):
        trace = json.loads((out / "profile" / f"{name}.trace.json").read_text())
        assert trace["traceEvents"]
        top = (out / "profile" / f"{name}.top20.txt").read_text()
        assert "Self CPU" in top and "aten::" in top
    assert stage["profile"]["top20"].endswith("2-instruct.top20.txt")


def test_dataloader_workers_give_the_same_training(data, tmp_path):
    kw = dict(FAST, data=str(data), stages=["instruct"], steps=2, lr=1e-3)
    a = train(out=str(tmp_path / "a"), workers=0, **kw)
    b = train(out=str(tmp_path / "b"), workers=2, **kw)
    assert [s["loss"] for s in a.log["steps"]] == [s["loss"] for s in b.log["steps"]]
    assert b.log["stages"][0]["execution"]["loader_workers"] == 2


# ---- data preparation ---------------------------------------------------------------------------------------------
def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".edgevlm-output"}


def test_parallel_synthetic_writer_and_image_cache_match_serial(tmp_path, monkeypatch):
    from edgevlm.train import synthetic

    monkeypatch.setattr(synthetic, "MIN_PARALLEL", 0)
    one = write_dataset(tmp_path / "one", train=24, val=0, test=4, image_size=64, progress=False, workers=1)
    # 24 samples, 2 workers: three chunks of 8 drawn by spawned processes (the test split of 4 stays serial)
    four = write_dataset(tmp_path / "four", train=24, val=0, test=4, image_size=64, progress=False, workers=2)
    assert _tree_digest(one) == _tree_digest(four)
    paths = [r.image_path for r in load_dataset(one / "train.json")] * 3       # > 64 paths: the threaded branch
    cfg = preprocess_config(get_model_config(MODEL))
    serial, threaded = ImageCache(paths, cfg, workers=1), ImageCache(paths, cfg, workers=3)
    assert torch.equal(serial.canvases, threaded.canvases) and len(serial) == 24
