"""TensorRT build plans and build_engines.sh for every TensorRT target (no TensorRT needed; a fake trtexec)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edgevlm.config import get_model_config
from edgevlm.errors import BundleError, ConfigError, TargetError
from edgevlm.exporter.trt_plan import (BuildPlan, EngineComponent, GraphInput, build_engines_script,
                                       components_from_manifest, parse_shape_string, plan_tensorrt_build,
                                       standard_components, trtexec_args, write_build_files)
from edgevlm.targets import get_target, target_names

TINY = get_model_config("tiny-ldpnet")
TRT_TARGETS = [n for n in target_names() if get_target(n).is_tensorrt] + ["jetson-orin@jp7.2", "rtx-4090@trt10.16"]


def _groups(args: list[str]) -> list[dict[str, dict[str, tuple[int, ...]]]]:
    """Split trtexec args into profiles: [{"min": {...}, "opt": {...}, "max": {...}}, ...]."""
    groups: list[dict] = []
    for a in args:
        if a.startswith("--profile=") or (a.startswith("--minShapes=") and not any(
                x.startswith("--profile=") for x in args)):
            groups.append({})
        for which in ("min", "opt", "max"):
            if a.startswith(f"--{which}Shapes="):
                groups[-1][which] = parse_shape_string(a.split("=", 1)[1])
    return groups


@pytest.mark.parametrize("name", TRT_TARGETS)
def test_plan_and_script_for_every_tensorrt_target(name):
    target = get_target(name)
    plan = plan_tensorrt_build(TINY, target)
    script = build_engines_script(plan)
    assert plan.tensorrt == target.tensorrt and plan.target == target.label
    assert [e.component for e in plan.engines] == ["vision", "decoder"]
    major = int(target.tensorrt.split(".")[0])
    if major == 10:
        assert plan.builder_mode == "weak"
        assert "--fp16" in script and "--stronglyTyped" not in script
    else:
        assert plan.builder_mode == "strong"
        assert "--stronglyTyped" in script
        for flag in ("--fp16", "--int8", "--int4", "--bf16", "--fp8", "--best"):
            assert flag not in script
    has_dla = target.dla_cores > 0
    assert ("--useDLACore=0" in script) == has_dla and ("--allowGPUFallback" in script) == has_dla
    assert (plan.engine("vision").dla_core == 0) == has_dla and plan.engine("decoder").dla_core is None
    assert f'WANT="{target.tensorrt}"' in script and "trtexec" in script and "--skipInference" in script
    ws_mib = int(target.workspace_gb * 1024)
    assert f"--memPoolSize=workspace:{ws_mib}" in script
    assert BuildPlan.from_dict(json.loads(plan.to_json())) == plan
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)   # syntax check


@pytest.mark.parametrize("name", ["jetson-orin", "rtx-4090"])
def test_shape_strings_parse_back_to_profiles(name):
    plan = plan_tensorrt_build(TINY, name)
    for eng in plan.engines:
        groups = _groups(trtexec_args(eng, plan))
        assert len(groups) == len(eng.profiles)
        for prof, grp in zip(eng.profiles, groups):
            for which in ("min", "opt", "max"):
                assert grp[which] == {k: getattr(v, which) for k, v in prof.shapes.items()}


def test_decoder_profiles_numbers():
    cfg = get_model_config("mobilevlm-1.7b")            # 144 visual tokens, context 2048
    plan = plan_tensorrt_build(cfg, "jetson-orin-nano-8gb", context=2048)
    dec = plan.engine("decoder")
    prefill, decode = dec.profiles
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert plan.max_prompt_tokens == 144 + 256 and plan.opt_prompt_tokens == 144 + 64
    e = prefill.shapes["inputs_embeds"]
    assert (e.min, e.opt, e.max) == ((1, 1, 2048), (1, 208, 2048), (1, 400, 2048))
    k = prefill.shapes["past_key_values.0.key"]
    assert (k.min, k.opt, k.max) == ((1, 16, 0, 128),) * 3                        # zero-length past
    assert prefill.shapes["attention_mask"].max == (1, 400)
    k = decode.shapes["past_key_values.23.value"]
    assert (k.min, k.opt, k.max) == ((1, 16, 1, 128), (1, 16, 208 + 128, 128), (1, 16, 2047, 128))
    m = decode.shapes["attention_mask"]                                          # past + seq
    assert (m.min, m.opt, m.max) == ((1, 2), (1, 337), (1, 2048))
    assert decode.shapes["position_ids"].max == (1, 1)
    assert dec.precision_flags == ("fp16", "int8", "int4") and plan.engine("vision").precision_flags == ("fp16", "int8")
    assert plan.engine("vision").dla_core is None                                  # Orin Nano: no DLA
    assert len(dec.profiles[0].shapes) == 3 + 2 * 24
    assert any("zero-length past" in n for n in plan.notes)
    small = plan_tensorrt_build(cfg, "jetson-orin-nano-4gb", context=1600, workspace_gb=0.25)
    assert "--memPoolSize=workspace:256" in build_engines_script(small)


def test_dla_rules():
    agx = plan_tensorrt_build(TINY, "jetson-orin", max_batch=2)
    vision = agx.engine("vision")
    assert vision.dla_core == 0 and vision.allow_gpu_fallback
    pv = vision.profiles[0].shapes["pixel_values"]
    assert pv.min == pv.opt == pv.max == (2, 3, 56, 56)                          # DLA: static shapes
    off = plan_tensorrt_build(TINY, "jetson-orin", use_dla=False, max_batch=2).engine("vision")
    assert off.dla_core is None and off.profiles[0].shapes["pixel_values"].min == (1, 3, 56, 56)
    assert plan_tensorrt_build(TINY, "jetson-orin", "int4,vision=fp32").engine("vision").dla_core is None
    with pytest.raises(ConfigError, match="DLA"):
        plan_tensorrt_build(TINY, "jetson-orin-nano-8gb", use_dla=True)


def test_plan_errors():
    with pytest.raises(TargetError):
        plan_tensorrt_build(TINY, "cpu")
    with pytest.raises(TargetError):
        plan_tensorrt_build(TINY, "jetson-orin", "fp8")
    with pytest.raises(ConfigError):
        plan_tensorrt_build(TINY, "rtx-4090", builder_mode="weak")           # TensorRT 11: strong only
    bad = EngineComponent("decoder", "decoder.onnx", (GraphInput("x", ("batch", "frames", 8)),))
    with pytest.raises(ConfigError, match="frames"):
        plan_tensorrt_build(TINY, "jetson-orin", components=[bad])
    mixed = EngineComponent("vision", "vision.onnx", (GraphInput("pixel_values", ("batch", 3, 56, 56)),),
                            ("fp8", "int8"))
    with pytest.raises(ConfigError, match="fp8 and int8"):
        plan_tensorrt_build(TINY, "rtx-4090@trt10.16", components=[mixed])


def test_components_from_manifest_and_spec():
    manifest = {"components": {
        "vision": {"file": "vision.onnx", "precision": "fp16",
                   "inputs": [{"name": "pixel_values", "shape": ["batch", 3, 56, 56], "dtype": "float32"}]},
        "embed": {"file": "embed_tokens.npy", "kind": "table"},
        "decoder": {"file": "decoder.onnx", "precision": {"decoder": "int4", "lm_head": "int8"},
                    "inputs": {"inputs_embeds": ["batch", "seq", 64], "attention_mask": ["batch", "total_seq"],
                               "past_key_values.0.key": ["batch", 4, "past_seq", 16]}}}}
    comps = components_from_manifest(manifest)
    assert [c.name for c in comps] == ["vision", "decoder"] and comps[1].precisions == ("int4", "int8")
    plan = plan_tensorrt_build(TINY, "jetson-orin", components=comps)
    assert plan.engine("decoder").precision_flags == ("fp16", "int8", "int4")
    assert plan.engine("decoder").profiles[1].shapes["attention_mask"].max == (1, TINY.context_length)
    with pytest.raises(BundleError):
        components_from_manifest({"components": {"embed": {"file": "embed.npy"}}})
    spec = pytest.importorskip("edgevlm.exporter.spec")
    recipe = get_target("jetson-orin").recipe()
    ours = standard_components(TINY, recipe)
    theirs = [EngineComponent.from_spec(spec.vision_spec(TINY)), EngineComponent.from_spec(spec.decoder_spec(TINY))]
    for a, b in zip(ours, theirs):
        assert [(i.name, i.shape) for i in a.inputs] == [(i.name, i.shape) for i in b.inputs]


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] [b30] # trtexec $*"
for a in "$@"; do
  case "$a" in --saveEngine=*) out="${{a#--saveEngine=}}"; echo engine > "$out";; esac
done
[ "$1" = "--help" ] || echo "$*" >> "$(dirname "$0")/calls.log"
"""


def _bundle(tmp_path: Path, version: int) -> tuple[Path, Path]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in ("vision.onnx", "decoder.onnx"):
        (bundle / f).write_bytes(b"onnx")
    tools = tmp_path / "tools"
    tools.mkdir()
    fake = tools / "trtexec"
    fake.write_text(FAKE_TRTEXEC.format(version=version))
    fake.chmod(0o755)
    return bundle, fake


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_build_script_runs_with_a_fake_trtexec(tmp_path):
    plan = plan_tensorrt_build(TINY, "jetson-orin")
    bundle, fake = _bundle(tmp_path, 100300)
    json_path, script = write_build_files(bundle, plan)
    assert json.loads(json_path.read_text())["tensorrt"] == "10.3" and os.access(script, os.X_OK)
    env = {**os.environ, "TRTEXEC": str(fake)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = (fake.parent / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and all("--help" not in c for c in calls)
    assert shlex.split(calls[1])[:5] == ["--onnx=decoder.onnx", "--saveEngine=engines/decoder.engine", "--fp16",
                                         "--int8", "--int4"]              # int4 body, 8-bit LM head
    assert (bundle / "engines" / "decoder.engine").is_file() and (bundle / "engines" / "vision.engine").is_file()

    # another minor version: refused unless EDGEVLM_ALLOW_TRT_MISMATCH=1; another major: always refused
    fake.write_text(FAKE_TRTEXEC.format(version=100700))
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "TensorRT 10.3" in r.stderr and "TensorRT 10.7" in r.stderr
    r = subprocess.run(["bash", str(script)], env={**env, "EDGEVLM_ALLOW_TRT_MISMATCH": "1"}, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "warning" in r.stderr
    fake.write_text(FAKE_TRTEXEC.format(version=110400))
    r = subprocess.run(["bash", str(script)], env={**env, "EDGEVLM_ALLOW_TRT_MISMATCH": "1"}, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "major" in r.stderr

    # no trtexec at all
    r = subprocess.run(["bash", str(script)], env={**os.environ, "TRTEXEC": str(tmp_path / "nope"),
                                                   "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    if not any(Path(p).is_file() for p in ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec")):
        assert r.returncode == 1 and "trtexec not found" in r.stderr


def test_write_build_files_needs_a_bundle(tmp_path):
    with pytest.raises(BundleError):
        write_build_files(tmp_path / "missing", plan_tensorrt_build(TINY, "jetson-orin"))
    with pytest.raises(BundleError):
        BuildPlan.load(tmp_path)


def test_prepare_tensorrt_bundle_checks_graphs_then_writes_the_plan(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T, helper as h

    from edgevlm.exporter.trt_plan import prepare_tensorrt_bundle

    def save(name, op, domain=""):
        node = h.make_node(op, ["x"], ["y"], name=f"{name}/{op}", domain=domain)
        g = h.make_graph([node], name, [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
        opsets = [h.make_opsetid("", 20)] + ([h.make_opsetid(domain, 1)] if domain else [])
        onnx.save(h.make_model(g, opset_imports=opsets), str(tmp_path / f"{name}.onnx"))

    save("vision", "Relu")
    save("decoder", "GroupQueryAttention", "com.microsoft")
    with pytest.raises(TargetError, match=r"decoder/GroupQueryAttention \(GroupQueryAttention\)"):
        prepare_tensorrt_bundle(tmp_path, TINY, "jetson-orin")
    assert not (tmp_path / "build_plan.json").exists()
    save("decoder", "Softmax")
    entry = prepare_tensorrt_bundle(tmp_path, TINY, "jetson-orin")
    assert entry["plan"]["tensorrt"] == "10.3" and entry["engines"] == {} and entry["compat_warnings"] == {}
    assert (tmp_path / entry["plan_file"]).is_file() and (tmp_path / entry["script"]).is_file()
    assert BuildPlan.load(tmp_path).target == "jetson-agx-orin-32gb"
