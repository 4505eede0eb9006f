"""Memory planner: hand-computed budgets, verdicts, suggestions, check_fits and the ``edgevlm plan`` CLI."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from edgevlm.cli import main
from edgevlm.config import get_model_config, make_divisible
from edgevlm.errors import ConfigError, TargetError
from edgevlm.planner import check_fits, plan_memory
from edgevlm.targets import get_target

GiB = 2**30


def hand_plan_mobilevlm_17b_int4(memory_gb: float, workspace_gb: float, context: int = 2048) -> dict[str, int]:
    """mobilevlm-1.7b, preset int4 (int8 vision, fp16 embedding, int4 decoder + lm_head), TensorRT on a Jetson,
    computed by hand from the config dims (no planner code)."""
    cfg = get_model_config("mobilevlm-1.7b")
    v, m = cfg.vision, cfg.llm
    # -- vision tower: CLIP ViT-L/14-336, hidden_states[-2] -> 23 of 24 layers, no post_layernorm
    h, i, p, n = v.hidden_size, v.intermediate_size, v.patch_size, v.num_patches          # 1024, 4096, 14, 576
    assert (h, i, p, n, v.num_layers, v.select_layer) == (1024, 4096, 14, 576, 24, -2)
    embeddings = h + h * 3 * p * p + (n + 1) * h          # class embedding + patch conv + position embedding
    pre_ln = 2 * h
    layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)
    tower = embeddings + pre_ln + 23 * layer
    # -- LDP projector (mlp 1024->2048->2048, two depthwise blocks with squeeze-excitation)
    d = m.hidden_size                                                                      # 2048
    se = make_divisible(d // 4, 8)                                                         # 512
    mlp = h * d + d + d * d + d
    block = d * 9 + 2 * d + (se * d + se) + (d * se + d) + d * d + 2 * d
    projector = mlp + 2 * block
    assert projector == cfg.projector_params()
    vision_params = tower + projector
    # -- decoder: 24 LLaMA layers (MHA: kv dim = 16 heads x 128 = 2048) + final norm; lm_head; embedding table
    f, vocab, L = m.intermediate_size, m.vocab_size, m.num_layers                         # 5632, 32000, 24
    kv_dim = m.num_kv_heads * m.head_dim                                                   # 2048
    dec_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d
    decoder_params = L * dec_layer + d
    lm_head_params = vocab * d
    embedding_params = vocab * d
    # -- bytes: int8 = 1 B + fp32 scale per output channel (params / hidden); int4 = 0.5 B + fp16 per 128 weights
    w_vision = vision_params + 4 * math.ceil(vision_params / h)
    w_embedding = 2 * embedding_params
    w_decoder = math.ceil(decoder_params / 2) + 2 * math.ceil(decoder_params / 128)
    w_lm_head = lm_head_params + 4 * math.ceil(lm_head_params / d)     # the int4 preset keeps the LM head int8
    weights = w_vision + w_embedding + w_decoder + w_lm_head
    # -- KV cache: fp16, past + present buffers
    kv = 2 * L * m.num_kv_heads * m.head_dim * 2 * context
    # -- activations: vision (577 tokens) + prefill of the longest prompt (144 visual + 256 text = 400 tokens)
    tokens = n + 1
    act_vision = tokens * (7 * h + 2 * i) * 2 + 2 * v.num_heads * tokens * tokens * 4 + 144 * 4 * d * 2
    s = 144 + 256
    act_prefill = s * (5 * d + 2 * kv_dim + 3 * f) * 2 + 2 * m.num_heads * s * s * 4 + vocab * 4
    overhead = 1 * GiB                                              # CUDA context + TensorRT on a Jetson
    largest = max(w_vision, w_decoder + w_lm_head)                  # the decoder engine
    run = weights + 2 * kv + act_vision + act_prefill + overhead
    load = weights + overhead + largest
    build = overhead + 2 * largest + int(workspace_gb * GiB)
    usable = int((memory_gb - 1.2) * GiB)                           # 1.2 GB carve-outs + headless L4T
    return {"weights.vision": w_vision, "weights.embedding": w_embedding, "weights.decoder": w_decoder,
            "weights.lm_head": w_lm_head, "kv_cache.past": kv, "kv_cache.present": kv,
            "activations.vision": act_vision, "activations.prefill": act_prefill, "run": run, "load": load,
            "build": build, "peak": max(run, load, build), "usable": usable}


@pytest.mark.parametrize("board,memory_gb,workspace_gb,verdict", [
    ("jetson-orin-nano-4gb", 4, 0.5, "does_not_fit"),
    ("jetson-orin-nano-8gb", 8, 1.0, "fits"),
])
def test_mobilevlm_17b_int4_on_orin_nano_matches_hand_computation(board, memory_gb, workspace_gb, verdict):
    expect = hand_plan_mobilevlm_17b_int4(memory_gb, workspace_gb)
    plan = plan_memory(get_model_config("mobilevlm-1.7b"), get_target(board), "int4", context=2048)
    for name in ("weights.vision", "weights.embedding", "weights.decoder", "weights.lm_head", "kv_cache.past",
                 "kv_cache.present", "activations.vision", "activations.prefill"):
        assert plan.item(name) == expect[name], name
    assert plan.phases == {"run": expect["run"], "load": expect["load"], "build": expect["build"]}
    assert plan.peak_bytes == expect["peak"] and plan.usable_bytes == expect["usable"]
    assert plan.verdict == verdict
    if verdict == "does_not_fit":
        assert expect["peak"] > expect["usable"]                  # 2.92 GiB > 2.80 GiB
    else:
        assert expect["peak"] <= 0.9 * expect["usable"]           # 3.31 GiB (build) of 6.80 GiB


def test_check_fits_refuses_with_numbers_and_working_suggestions():
    cfg = get_model_config("mobilevlm-1.7b")
    plan = plan_memory(cfg, "jetson-orin-nano-4gb", "int4", context=2048)
    with pytest.raises(TargetError) as exc:
        check_fits(plan)
    msg = str(exc.value)
    assert "does NOT fit" in msg and "GiB" in msg and "--context" in msg and "jetson-orin-nano-8gb" in msg
    # the suggested context (with a smaller workspace, and/or the int4 LM head when the preset's 8-bit head leaves
    # no context that fits) really fits
    sugg = next(s for s in plan.suggestions if s.startswith("--context") or
                (s.startswith("--precision") and "--context" in s))
    ctx = int(re.search(r"--context (\d+)", sugg).group(1))
    ws = re.search(r"--workspace-gb ([0-9.]+)", sugg)
    prec = sugg.split()[1] if sugg.startswith("--precision") else "int4"
    again = plan_memory(cfg, "jetson-orin-nano-4gb", prec, context=ctx,
                        workspace_gb=float(ws.group(1)) if ws else None)
    assert again.verdict != "does_not_fit" and ctx < 2048
    assert check_fits(plan_memory(cfg, "jetson-orin-nano-8gb", "int4", context=2048)).verdict == "fits"


def test_smaller_precision_at_shorter_context_is_suggested_and_fits():
    """fp16 fits at no context on the Nano 4 GB; the suggestion combines a smaller precision with a context."""
    cfg = get_model_config("mobilevlm-1.7b")
    plan = plan_memory(cfg, "jetson-orin-nano-4gb", "fp16", context=2048)
    assert any(s.startswith("no context fits at fp16") for s in plan.suggestions)
    sugg = next(s for s in plan.suggestions if s.startswith("--precision") and "--context" in s)
    prec, ctx = sugg.split()[1], int(re.search(r"--context (\d+)", sugg).group(1))
    ws = re.search(r"--workspace-gb ([0-9.]+)", sugg)
    again = plan_memory(cfg, "jetson-orin-nano-4gb", prec, context=ctx, workspace_gb=float(ws.group(1)) if ws else None)
    assert again.verdict != "does_not_fit" and ctx < 2048 and ctx % 64 == 0
    assert plan_memory(cfg, "jetson-orin-nano-4gb", prec, context=ctx + 64,
                       workspace_gb=float(ws.group(1)) if ws else None).verdict == "does_not_fit"   # the longest


def test_precision_suggestion_and_near_limit_warning(caplog):
    cfg = get_model_config("mobilevlm-v2-7b")
    plan = plan_memory(cfg, "rtx-4070", "fp16")
    assert plan.verdict == "does_not_fit"
    sugg = next(s for s in plan.suggestions if s.startswith("--precision"))
    preset = sugg.split()[1]
    assert plan_memory(cfg, "rtx-4070", preset).verdict == "fits"
    # near the limit: memory sized so that the peak is 95 % of usable
    small = get_model_config("mobilevlm-1.7b")
    base = plan_memory(small, "cpu", "int4", context=1024)
    t = get_target("cpu", memory_gb=get_target("cpu").os_reserve_gb + base.peak_bytes / 0.95 / GiB)
    near = plan_memory(small, t, "int4", context=1024)
    assert near.verdict == "near_limit"
    with caplog.at_level(logging.WARNING, logger="edgevlm.planner"):
        assert check_fits(near) is near
    assert "near the limit" in caplog.text


def test_budget_scales_as_expected():
    cfg = get_model_config("mobilevlm-1.7b")
    w = {p: plan_memory(cfg, "jetson-orin", p).weights_bytes for p in ("fp32", "fp16", "int8", "int4")}
    assert w["fp32"] > w["fp16"] > w["int8"] > w["int4"]
    p1, p2 = (plan_memory(cfg, "jetson-orin", "int4", context=c) for c in (1024, 2048))
    assert p2.item("kv_cache.past") == 2 * p1.item("kv_cache.past")
    shared = plan_memory(cfg, "jetson-orin", "int4", context=2048, kv_shared_buffer=True)
    assert "kv_cache.present" not in [i.name for i in shared.items]
    cpu = plan_memory(cfg, "cpu", "int4", context=2048)
    assert cpu.kv_dtype == "fp32" and cpu.item("kv_cache.past") == 2 * p2.item("kv_cache.past")
    assert "build" not in cpu.phases                              # no engine build with ONNX Runtime
    gpu = plan_memory(cfg, "rtx-4090", "fp16")
    assert "load.transient" not in [i.name for i in gpu.items]     # discrete GPU: engine bytes sit in host RAM
    b2 = plan_memory(cfg, "jetson-orin", "int4", batch=2)
    assert b2.item("kv_cache.past") == 2 * plan_memory(cfg, "jetson-orin", "int4").item("kv_cache.past")
    json.dumps(b2.to_dict())


def test_planner_rejects_bad_requests():
    cfg = get_model_config("mobilevlm-1.7b")
    with pytest.raises(ConfigError):
        plan_memory(cfg, "jetson-orin", context=8192)             # beyond max_position_embeddings
    with pytest.raises(ConfigError):
        plan_memory(cfg, "jetson-orin", context=100)              # cannot hold the 144 visual tokens
    with pytest.raises(TargetError):
        plan_memory(cfg, "cpu", "fp16")
    with pytest.raises(TargetError):
        plan_memory(cfg, "jetson-orin", "fp8")
    with pytest.raises(ConfigError):
        plan_memory(cfg, "jetson-orin", batch=0)


def test_plan_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "--model", "tiny-ldpnet", "--target", "cpu", "--json-output"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "fits" and data["target"] == "cpu-x86-avx2" and data["items"]
    assert main(["plan", "--model", "mobilevlm-1.7b", "--target", "jetson-orin-nano-4gb", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "weights.decoder" in out and "--context" in out
    assert main(["plan", "--model", "mobilevlm-1.7b", "--target", "jetson-orin-nano-4gb", "--strict"]) == 1
    capsys.readouterr()
    assert main(["plan", "--model", "tiny-ldpnet", "--target", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_targets_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["targets", "--json-output"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"jetson-agx-orin-32gb", "rtx-4090", "cpu-arm64"}
    assert main(["targets"]) == 0
    assert "jetson-orin-nano-4gb" in capsys.readouterr().out
