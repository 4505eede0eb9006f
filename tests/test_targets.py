"""Target profiles (export/targets/*.toml): every file loads, facts per board, aliases, overrides, recipes."""

from __future__ import annotations

import json

import pytest

from edgevlm.config import get_model_config
from edgevlm.errors import ConfigError, TargetError
from edgevlm.planner import plan_memory
from edgevlm.targets import (PRECISION_PRESETS, TARGETS_DIR, TENSORRT_PRESETS, _load_file, get_target, target_aliases,
                             target_names, trt_builder_mode, trt_opset_max)

JETSONS = ["jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb",
           "jetson-orin-nano-8gb", "jetson-orin-nano-4gb"]
GPUS = ["rtx-4090", "rtx-4080", "rtx-4070", "rtx-4060", "rtx-3090", "rtx-3080", "rtx-3060"]
CPUS = ["cpu-x86-avx2", "cpu-x86-avx512-vnni", "cpu-arm64"]


def test_every_file_is_a_target():
    files = sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))
    assert sorted(target_names()) == files
    assert set(files) == set(JETSONS + GPUS + CPUS)


@pytest.mark.parametrize("name", JETSONS + GPUS + CPUS)
def test_target_profile_is_consistent(name):
    t = get_target(name)
    assert t.name == name and t.description and t.source.endswith(f"{name}.toml")
    assert t.usable_bytes > 0 and t.memory_bandwidth_gbs > 0 and t.max_context >= 1024
    assert t.supports(t.default_recipe)
    json.dumps(t.to_dict())                                     # serializable for the manifest
    if t.kind == "jetson":
        assert (t.memory_kind, t.backend, t.compute_capability) == ("unified", "tensorrt", "8.7")
        assert (t.jetpack, t.tensorrt, t.opset_max, t.builder_mode) == ("6.2", "10.3", 20, "weak")
        assert 1.0 <= t.os_reserve_gb <= 1.5 and t.build_on_device
        assert not t.supports("fp8") and t.supports("int4") and t.supports("fp16")
    elif t.kind == "gpu":
        assert (t.memory_kind, t.backend) == ("discrete", "tensorrt")
        assert t.compute_capability in ("8.6", "8.9")
        assert t.supports("fp8") == (t.compute_capability == "8.9")     # fp8: Ada (and Hopper) only
        assert t.opset_max == trt_opset_max(t.tensorrt)
    if t.is_tensorrt:
        assert t.kv_dtype == "fp32"              # the exported graphs' KV I/O: what the runner allocates
    else:
        assert (t.memory_kind, t.backend, t.tensorrt, t.compute_capability) == ("host", "onnxruntime-cpu", None, None)
        assert t.kv_dtype == "fp32" and not t.supports("fp16") and t.supports("int4")


@pytest.mark.parametrize("name", JETSONS + GPUS + CPUS)
def test_every_target_plans_a_tiny_model(name):
    plan = plan_memory(get_model_config("tiny-ldpnet"), get_target(name))
    assert plan.verdict == "fits" and plan.peak_bytes > 0


def test_jetson_facts():
    dla = {n: get_target(n).dla_cores for n in JETSONS}
    assert dla == {"jetson-agx-orin-64gb": 2, "jetson-agx-orin-32gb": 2, "jetson-orin-nx-16gb": 2,
                   "jetson-orin-nx-8gb": 1, "jetson-orin-nano-8gb": 0, "jetson-orin-nano-4gb": 0}
    bw = {n: get_target(n).memory_bandwidth_gbs for n in JETSONS}
    assert bw == {"jetson-agx-orin-64gb": 204.8, "jetson-agx-orin-32gb": 204.8, "jetson-orin-nx-16gb": 102.4,
                  "jetson-orin-nx-8gb": 102.4, "jetson-orin-nano-8gb": 68.0, "jetson-orin-nano-4gb": 34.0}
    assert [get_target(n).memory_gb for n in JETSONS] == [64, 32, 16, 8, 8, 4]


def test_aliases():
    assert get_target("jetson-orin").name == "jetson-agx-orin-32gb"        # the MobileVLM paper's board
    assert get_target("jetson-orin-nano").name == "jetson-orin-nano-8gb"   # the dev kit
    assert get_target("cpu").name == "cpu-x86-avx2"
    aliases = target_aliases()
    assert all(a not in target_names() for a in aliases)
    assert get_target(get_target("rtx4090")) == get_target("rtx-4090")


def test_unknown_target_lists_known_names():
    with pytest.raises(ConfigError) as exc:
        get_target("jetson-orn")
    msg = str(exc.value)
    assert "jetson-orn" in msg and "jetson-agx-orin-32gb" in msg and "cpu-arm64" in msg and "jetson-orin" in msg
    assert "did you mean 'jetson-orin'" in msg


def test_software_overrides():
    jp7 = get_target("jetson-orin@jp7.2")
    assert (jp7.name, jp7.jetpack, jp7.tensorrt, jp7.builder_mode, jp7.opset_max) == (
        "jetson-agx-orin-32gb", "7.2", "11.4", "strong", 25)
    assert jp7.label == "jetson-agx-orin-32gb@jp7.2" and jp7.dla_cores == 2
    assert get_target("jetson-orin-nano-8gb", jetpack="7.2").dla_cores == 0      # unverified there: DLA off
    t10 = get_target("rtx-4090@trt10.16")
    assert (t10.tensorrt, t10.builder_mode, t10.opset_max) == ("10.16", "weak", 24)
    assert get_target("rtx-4090").builder_mode == "strong"
    with pytest.raises(ConfigError):
        get_target("rtx-4090@jp7.2")                    # not a Jetson
    with pytest.raises(ConfigError):
        get_target("cpu@trt10.3")                       # not TensorRT
    with pytest.raises(ConfigError):
        get_target("jetson-orin@trt11.4")               # JetPack 6 stays on TensorRT 10
    with pytest.raises(ConfigError):
        get_target("jetson-orin@jp6.0")                 # TensorRT 8.6
    with pytest.raises(ConfigError):
        get_target("jetson-orin@foo")


def test_trt_version_tables():
    assert [trt_opset_max(v) for v in ("10.3", "10.8", "10.9", "10.13", "11.4")] == [20, 20, 22, 24, 25]
    assert trt_builder_mode("10.3.0.30") == "weak" and trt_builder_mode("11.0") == "strong"
    with pytest.raises(TargetError):
        trt_opset_max("8.6")


def test_recipes():
    t = get_target("jetson-orin")
    assert PRECISION_PRESETS["int4"] == {"vision": "int8", "embedding": "fp16", "decoder": "int4", "lm_head": "int8"}
    # TensorRT has no weight-only INT8: its int4 preset keeps the LM head float (fp16); CPU targets keep it 8-bit
    assert t.recipe(None) == TENSORRT_PRESETS["int4"] == {**PRECISION_PRESETS["int4"], "lm_head": "fp16"}
    assert get_target("cpu").recipe(None) == PRECISION_PRESETS["int4"]
    assert t.recipe("int4,lm_head=int8")["lm_head"] == "int8"
    assert t.recipe("int4,vision=fp16")["vision"] == "fp16"
    assert t.recipe({"vision": "fp16"}) == {**TENSORRT_PRESETS["int4"], "vision": "fp16"}
    assert t.recipe({"base": "fp16", "decoder": "int8"})["decoder"] == "int8"
    assert t.recipe("bf16") == {c: "bf16" for c in PRECISION_PRESETS["fp16"]}
    assert t.recipe("projector=fp16")["vision"] == "fp16"
    with pytest.raises(TargetError, match="fp8"):
        t.recipe("fp8")
    with pytest.raises(ConfigError):
        t.recipe("int3")
    with pytest.raises(ConfigError):
        t.recipe({"tower": "fp16"})
    cpu = get_target("cpu")
    assert cpu.recipe("int8")["embedding"] == "fp16"    # a host-side table: fp16 storage works on a CPU
    assert not cpu.supports("fp16")


def test_memory_override():
    t = get_target("cpu", memory_gb=64)
    assert t.memory_gb == 64 and t.usable_bytes == int((64 - t.os_reserve_gb) * 2**30)
    with pytest.raises(ConfigError):
        get_target("cpu", memory_gb=1)


def test_malformed_target_file_is_rejected(tmp_path):
    src = (TARGETS_DIR / "jetson-orin-nano-8gb.toml").read_text()
    bad = tmp_path / "jetson-orin-nano-8gb.toml"
    bad.write_text(src.replace("opset_max = 20", "opset_max = 23"))
    with pytest.raises(ConfigError, match="opset_max"):
        _load_file(bad)
    bad.write_text(src.replace('kind = "jetson"', 'kind = "fpga"'))
    with pytest.raises(ConfigError, match="kind"):
        _load_file(bad)
    bad.write_text(src + 'colour = "green"\n')
    with pytest.raises(ConfigError, match="colour"):
        _load_file(bad)
