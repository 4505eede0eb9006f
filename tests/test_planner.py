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


def hand_plan_mobilevlm_17b_int4(memory_gb: float, workspace_gb: float, context: int = 2048,
                                 lm_head: str = "int8") -> dict[str, int]:
    """mobilevlm-1.7b, preset int4 (int8 vision, fp16 embedding, int4 decoder, ``lm_head`` head), TensorRT on a
    Jetson, computed by hand from the config dims (no planner code)."""
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
    w_lm_head = {"int8": lm_head_params + 4 * math.ceil(lm_head_params / d),     # the LM head int8 or fp16
                 "fp16": 2 * lm_head_params}[lm_head]
    weights = w_vision + w_embedding + w_decoder + w_lm_head
    # -- KV cache: float32 (the exported graphs' KV I/O, which TrtDecoderRunner allocates), past + present buffers
    kv = 2 * L * m.num_kv_heads * m.head_dim * 4 * context
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
    expect = hand_plan_mobilevlm_17b_int4(memory_gb, workspace_gb,
                                          lm_head=get_target(board).recipe("int4")["lm_head"])
    plan = plan_memory(get_model_config("mobilevlm-1.7b"), get_target(board), "int4", context=2048)
    for name in ("weights.vision", "weights.embedding", "weights.decoder", "weights.lm_head", "kv_cache.past",
                 "kv_cache.present", "activations.vision", "activations.prefill"):
        assert plan.item(name) == expect[name], name
    assert plan.phases == {"run": expect["run"], "load": expect["load"], "build": expect["build"]}
    assert plan.peak_bytes == expect["peak"] and plan.usable_bytes == expect["usable"]
    assert plan.verdict == verdict
    if verdict == "does_not_fit":
        assert expect["peak"] > expect["usable"]                  # 3.7 GiB (run) > 2.80 GiB
    else:
        assert expect["peak"] <= 0.9 * expect["usable"]           # 3.7 GiB (run: 1.5 GiB of KV) of 6.80 GiB


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
    plan = plan_memory(cfg, "rtx-4070", "fp16", context=1024)
    assert plan.verdict == "does_not_fit"
    sugg = next(s for s in plan.suggestions if s.startswith("--precision"))
    preset = sugg.split()[1]
    assert plan_memory(cfg, "rtx-4070", preset, context=1024).verdict == "fits"
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
    # every exported graph has float32 KV I/O (keep_io_types): the same KV bytes on a GPU as on a CPU
    assert cpu.kv_dtype == p2.kv_dtype == "fp32" and cpu.item("kv_cache.past") == p2.item("kv_cache.past")
    fp16_io = plan_memory(cfg, "jetson-orin", "int4", context=2048, kv_dtype="float16")
    assert fp16_io.kv_dtype == "fp16" and 2 * fp16_io.item("kv_cache.past") == p2.item("kv_cache.past")
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


# ---- the KV cache the runtime really allocates ------------------------------------------------------------------
def test_kv_cache_of_mobilellama_14b_at_2048_tokens_is_1_5_gib_on_a_jetson():
    """MobileLLaMA-1.4B (mobilevlm-1.7b's LLM: 24 layers x 2048 KV dims), 2048 tokens, float32 KV I/O and two
    ping-pong buffers: 2 x 24 x 2048 x 4 B x 2048 x 2 = 1.5 GiB (an fp16 assumption said 0.75 GiB)."""
    plan = plan_memory(get_model_config("mobilevlm-1.7b"), "jetson-orin-nano-8gb", "int4", context=2048)
    assert plan.kv_dtype == "fp32"
    assert plan.item("kv_cache.past") + plan.item("kv_cache.present") == int(1.5 * GiB)


def _tiny_trt_manifest(target: str = "jetson-orin", precision: str = "int4"):
    from edgevlm.bundle import model_entry
    from edgevlm.graphs.spec import kv_cache_entry
    from edgevlm.graphs.trt_plan import plan_tensorrt_build

    cfg = get_model_config("tiny-ldpnet")
    tgt = get_target(target)
    trt_plan = plan_tensorrt_build(cfg, tgt, precision)
    manifest = {"model": model_entry(cfg, random_init=True, source="random-init"), "target": tgt.to_dict(),
                "precision": precision, "recipe": {"components": tgt.recipe(precision)},
                "components": {"decoder": {"kv_cache": kv_cache_entry(cfg, "float32")}},
                "tensorrt": {"plan": trt_plan.to_dict()}}
    return cfg, trt_plan, manifest


def _fake_engine_getters():
    from test_trt_backend import FakeDecoderEngine

    return FakeDecoderEngine


class _PlannedDecoderEngine:
    """A TensorRT-engine look-alike built from a build plan's decoder engine: float32 embeds / KV / logits, int64
    mask and positions, the planned profiles (what ``build-engine`` would build)."""

    def __init__(self, cfg, engine_plan):
        from test_trt_backend import FLOAT, INPUT, INT64, OUTPUT

        c = cfg.llm
        kv = (-1, c.num_kv_heads, -1, c.head_dim)
        io = [("inputs_embeds", INPUT, FLOAT, (-1, -1, c.hidden_size)), ("attention_mask", INPUT, INT64, (-1, -1)),
              ("position_ids", INPUT, INT64, (-1, -1))]
        for i in range(c.num_layers):
            io += [(f"past_key_values.{i}.key", INPUT, FLOAT, kv), (f"past_key_values.{i}.value", INPUT, FLOAT, kv)]
        io.append(("logits", OUTPUT, FLOAT, (-1, 1, c.vocab_size)))
        for i in range(c.num_layers):
            io += [(f"present.{i}.key", OUTPUT, FLOAT, kv), (f"present.{i}.value", OUTPUT, FLOAT, kv)]
        self.io, self.by_name = io, {t[0]: t for t in io}
        self.num_io_tensors, self.profiles = len(io), engine_plan.profiles
        self.num_optimization_profiles = len(self.profiles)

    _F = _fake_engine_getters()             # the I/O-table getters of test_trt_backend's fake engine
    get_tensor_name, get_tensor_mode = _F.get_tensor_name, _F.get_tensor_mode
    get_tensor_dtype, get_tensor_shape = _F.get_tensor_dtype, _F.get_tensor_shape

    def get_tensor_profile_shape(self, name, i):
        r = self.profiles[i].shapes[name]
        return r.min, r.opt, r.max

    def create_execution_context(self):
        return object()


def test_planner_kv_bytes_equal_what_the_tensorrt_runner_allocates():
    """The planner's KV items for a TensorRT bundle (from its manifest: float32 KV I/O, ping-pong, the plan's
    context) equal the KV device buffers ``TrtDecoderRunner`` allocates for engines built from that plan."""
    from edgevlm.planner import plan_memory_from_manifest
    from edgevlm.runtime import trt_backend as tb
    from edgevlm.runtime.kv_cache import KVSpec
    from test_trt_backend import FakeCudart

    cfg, trt_plan, manifest = _tiny_trt_manifest()
    kv = KVSpec.from_manifest(manifest["components"]["decoder"]["kv_cache"])
    engine = tb.TrtEngine(_PlannedDecoderEngine(cfg, trt_plan.engine("decoder")), name="decoder engine",
                          profile_names=[p.name for p in trt_plan.engine("decoder").profiles])
    runner = tb.TrtDecoderRunner(engine, kv, stream=7, cudart=FakeCudart())
    runner_kv = sum(b.nbytes for pair in runner.d_kv for b in pair)
    plan = plan_memory_from_manifest(manifest)
    assert plan.context == runner.max_context == trt_plan.context
    assert plan.item("kv_cache.past") + plan.item("kv_cache.present") == runner_kv
    assert plan.kv_dtype == "fp32" and plan.target == manifest["target"]["label"]
    # the default plan (no manifest) already tells the same truth for the standard export
    direct = plan_memory(cfg, "jetson-orin", "int4", context=trt_plan.context)
    assert direct.item("kv_cache.past") + direct.item("kv_cache.present") == runner_kv
    runner.close()


def test_plan_from_manifest_reads_the_kv_layout():
    from edgevlm.planner import kv_facts_from_manifest, plan_memory_from_manifest

    cfg, trt_plan, manifest = _tiny_trt_manifest()
    assert kv_facts_from_manifest(manifest) == {"kv_dtype": "fp32", "kv_shared_buffer": False,
                                                "context": trt_plan.context}
    # an ONNX Runtime GroupQueryAttention bundle: one in-place buffer of max_length
    gqa = {**manifest, "target": get_target("cpu").to_dict(), "recipe": {"components": get_target("cpu").recipe("fp32")},
           "tensorrt": None}
    gqa["components"] = {"decoder": {"kv_cache": {**manifest["components"]["decoder"]["kv_cache"],
                                                  "mode": "shared_buffer", "max_length": 128}}}
    p = plan_memory_from_manifest(gqa)
    assert p.context == 128 and "kv_cache.present" not in [i.name for i in p.items]
    assert p.item("kv_cache.past") == 2 * cfg.llm.num_layers * cfg.llm.num_kv_heads * cfg.llm.head_dim * 4 * 128
    half = {**manifest, "components": {"decoder": {"kv_cache": {**manifest["components"]["decoder"]["kv_cache"],
                                                                "dtype": "float16"}}}}
    assert plan_memory_from_manifest(half).kv_dtype == "fp16"
    with pytest.raises(ConfigError):
        plan_memory(cfg, "cpu", kv_dtype="int3")
