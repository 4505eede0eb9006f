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
from edgevlm.graphs.trt_plan import (BuildPlan, EngineComponent, GraphInput, build_engines_script,
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
    # DLA is opt-in: the default plan is GPU-only everywhere
    assert "--useDLACore" not in script and "--allowGPUFallback" not in script
    assert plan.engine("vision").dla_core is None and plan.engine("decoder").dla_core is None
    if target.dla_cores > 0:
        dla = plan_tensorrt_build(TINY, target, "int4", use_dla=True)
        dla_script = build_engines_script(dla)
        assert "--useDLACore=0" in dla_script and "--allowGPUFallback" in dla_script
        assert dla.engine("vision").dla_core == 0 and dla.engine("decoder").dla_core is None
    else:
        with pytest.raises(ConfigError, match="no DLA core"):
            plan_tensorrt_build(TINY, target, "int4", use_dla=True)
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
    lm_head_int8 = get_target("jetson-orin-nano-8gb").recipe()["lm_head"] == "int8"
    assert dec.precision_flags == (("fp16", "int8", "int4") if lm_head_int8 else ("fp16", "int4"))
    assert plan.engine("vision").precision_flags == ("fp16", "int8")
    assert plan.engine("vision").dla_core is None                                  # Orin Nano: no DLA
    assert len(dec.profiles[0].shapes) == 3 + 2 * 24
    assert any("zero-length past" in n for n in plan.notes)
    small = plan_tensorrt_build(cfg, "jetson-orin-nano-4gb", context=1600, workspace_gb=0.25)
    assert "--memPoolSize=workspace:256" in build_engines_script(small)


def test_dla_rules():
    default = plan_tensorrt_build(TINY, "jetson-agx-orin-32gb", max_batch=2).engine("vision")
    assert default.dla_core is None and not default.allow_gpu_fallback                # GPU-only by default
    assert default.profiles[0].shapes["pixel_values"].min == (1, 3, 56, 56)
    agx = plan_tensorrt_build(TINY, "jetson-orin", "int4", use_dla=True, max_batch=2)
    vision = agx.engine("vision")
    assert vision.dla_core == 0 and vision.allow_gpu_fallback
    pv = vision.profiles[0].shapes["pixel_values"]
    assert pv.min == pv.opt == pv.max == (2, 3, 56, 56)                          # DLA: static shapes
    assert any("DLA core 0" in n and "graph not read" in n for n in agx.notes)
    for spec in ("int4,vision=fp32", "fp32", "bf16"):                          # DLA runs fp16 / int8 only
        with pytest.raises(ConfigError, match="DLA runs only fp16 and int8"):
            plan_tensorrt_build(TINY, "jetson-orin", spec, use_dla=True)
    assert plan_tensorrt_build(TINY, "jetson-orin", "int4,vision=fp16", use_dla=True).engine("vision").dla_core == 0
    with pytest.raises(ConfigError, match="no DLA core"):
        plan_tensorrt_build(TINY, "jetson-orin-nano-8gb", use_dla=True)
    dyn = EngineComponent("vision", "vision.onnx", (GraphInput("pixel_values", ("batch", 3, "seq", 56)),), ("fp16",))
    with pytest.raises(ConfigError, match="static shapes"):
        plan_tensorrt_build(TINY, "jetson-orin", components=[dyn], use_dla=True)


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
    spec = pytest.importorskip("edgevlm.graphs.spec")
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


FAKE_EDGEVLM = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/edgevlm.log"
"""


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_build_script_runs_with_a_fake_trtexec(tmp_path):
    plan = plan_tensorrt_build(TINY, "jetson-orin")
    bundle, fake = _bundle(tmp_path, 100300)
    json_path, script = write_build_files(bundle, plan)
    assert json.loads(json_path.read_text())["tensorrt"] == "10.3" and os.access(script, os.X_OK)
    edgevlm = fake.parent / "edgevlm"
    edgevlm.write_text(FAKE_EDGEVLM)
    edgevlm.chmod(0o755)
    env = {**os.environ, "TRTEXEC": str(fake), "EDGEVLM": str(edgevlm)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = (fake.parent / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and all("--help" not in c for c in calls)
    flags = plan.engine("decoder").precision_flags                      # int4 body (+ int8 LM head on 10.x)
    assert shlex.split(calls[1])[:2 + len(flags)] == ["--onnx=decoder.onnx", "--saveEngine=engines/decoder.engine",
                                                      *(f"--{f}" for f in flags)]
    assert (bundle / "engines" / "decoder.engine").is_file() and (bundle / "engines" / "vision.engine").is_file()
    # the engines are registered in the manifest with the full version from trtexec's banner (v100300 = 10.3.0)
    assert (fake.parent / "edgevlm.log").read_text().splitlines() == ["register-engines . --tensorrt 10.3.0"]
    assert "TensorRT 10.3.0" in r.stdout
    # without edgevlm on the device: the command to run is printed
    r = subprocess.run(["bash", str(script)], env={**env, "EDGEVLM": "skip"}, capture_output=True, text=True)
    assert r.returncode == 0 and f"edgevlm register-engines {bundle} --tensorrt 10.3.0" in r.stderr
    assert len((fake.parent / "edgevlm.log").read_text().splitlines()) == 1

    # another minor version: refused unless EDGEVLM_ALLOW_TRT_MISMATCH=1; another major: always refused
    fake.write_text(FAKE_TRTEXEC.format(version=100700))
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "TensorRT 10.3" in r.stderr and "TensorRT 10.7" in r.stderr
    r = subprocess.run(["bash", str(script)], env={**env, "EDGEVLM_ALLOW_TRT_MISMATCH": "1"}, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "warning" in r.stderr
    assert (fake.parent / "edgevlm.log").read_text().splitlines()[-1] == "register-engines . --tensorrt 10.7.0"
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

    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle

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


# ---- per-layer fp32, layer precisions, DLA fallback (graphs read by prepare_tensorrt_bundle) ----------------------
def _graphs(tmp_path: Path) -> tuple[Path, Path]:
    """A decoder-like graph (RMSNorm chain -> MatMul with a constant weight -> Softmax) and a ViT-like vision graph
    (Conv patchify -> LayerNormalization -> q/k MatMuls with constant weights -> q.k^T -> Softmax -> Gelu)."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    def init(name, arr):
        return nh.from_array(np.asarray(arr, dtype=np.float32 if np.asarray(arr).dtype.kind == "f" else np.int64),
                             name)

    dec = h.make_graph(
        [h.make_node("Pow", ["x", "two"], ["sq"], name="node_pow_1"),
         h.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="node_mean", keepdims=1),
         h.make_node("Add", ["ms", "eps"], ["mse"], name="node_add_7"),
         h.make_node("Sqrt", ["mse"], ["rms"], name="node_Sqrt_3"),
         h.make_node("Reciprocal", ["rms"], ["inv"], name="node_rsqrt"),
         h.make_node("Mul", ["x", "inv"], ["normed"], name="node_mul_2"),
         h.make_node("Mul", ["normed", "gamma"], ["scaled"], name="node_mul_3"),
         h.make_node("MatMul", ["scaled", "w"], ["proj"], name="node_linear"),
         h.make_node("Softmax", ["proj"], ["y"], name="node_Softmax_9", axis=-1)],
        "decoder", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8])],
        [init("two", 2.0), init("axes", [-1]), init("eps", 1e-6), init("gamma", np.ones(8)),
         init("w", np.eye(8))])
    vis = h.make_graph(
        [h.make_node("Conv", ["px", "cw"], ["patches"], name="node_conv", strides=[4, 4], kernel_shape=[4, 4]),
         h.make_node("Reshape", ["patches", "shape"], ["tok"], name="node_view"),
         h.make_node("LayerNormalization", ["tok", "ln_w", "ln_b"], ["ln"], name="node_layer_norm", axis=-1),
         h.make_node("MatMul", ["ln", "wq"], ["q"], name="node_q"),
         h.make_node("MatMul", ["ln", "wk"], ["k"], name="node_k"),
         h.make_node("Transpose", ["k"], ["kt"], name="node_kt", perm=[0, 2, 1]),
         h.make_node("MatMul", ["q", "kt"], ["scores"], name="node_scores"),
         h.make_node("Softmax", ["scores"], ["probs"], name="node_Softmax_1", axis=-1),
         h.make_node("Gelu", ["probs"], ["out"], name="node_gelu")],
        "vision", [h.make_tensor_value_info("px", T.FLOAT, ["batch", 3, 8, 8])],
        [h.make_tensor_value_info("out", T.FLOAT, ["batch", 4, 4])],
        [init("cw", np.ones((8, 3, 4, 4))), init("shape", [0, 4, 8]), init("ln_w", np.ones(8)),
         init("ln_b", np.zeros(8)), init("wq", np.eye(8)), init("wk", np.eye(8))])
    paths = []
    for g in (vis, dec):
        path = tmp_path / f"{g.name}.onnx"
        onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 20)]), str(path))
        paths.append(path)
    return paths[0], paths[1]


RMS = ["node_pow_1", "node_mean", "node_add_7", "node_Sqrt_3", "node_rsqrt", "node_mul_2"]


def test_weak_fp16_builds_pin_norms_and_softmax_to_fp32(tmp_path):
    from edgevlm.graphs.trt_plan import graph_facts, prepare_tensorrt_bundle

    vis, dec = _graphs(tmp_path)
    facts = {"vision": graph_facts(vis), "decoder": graph_facts(dec)}
    assert list(facts["decoder"].islands) == RMS + ["node_Softmax_9"]
    assert list(facts["vision"].islands) == ["node_layer_norm", "node_Softmax_1"]

    plan = plan_tensorrt_build(TINY, "jetson-orin", "fp16", graphs=facts)         # TensorRT 10.3: weak, --fp16
    e = plan.engine("decoder")
    assert e.precision_flags == ("fp16",) and list(e.fp32_layers) == RMS + ["node_Softmax_9"]
    assert e.layer_precisions == {"matmul_weights": "fp16 (builder flag)", "float layers": "fp16 (builder flag)",
                                  "norms/softmax": "fp32 (per-layer constraint, 7 layers)"}
    args = trtexec_args(e, plan)
    assert "--precisionConstraints=obey" in args
    assert "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in e.fp32_layers) in args
    assert "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in e.fp32_layers) in args
    script = build_engines_script(plan)
    assert shlex.quote("--layerPrecisions=node_layer_norm:fp32,node_Softmax_1:fp32") in script
    assert BuildPlan.from_dict(json.loads(plan.to_json())) == plan                 # serialized in build_plan.json

    # int4 recipe on 10.x: the quantized weights are named, the float layers fp16, the islands fp32
    int4 = plan_tensorrt_build(TINY, "jetson-orin", "int4", graphs=facts).engine("decoder")
    assert int4.layer_precisions["matmul_weights"].startswith("int4")
    assert int4.layer_precisions["norms/softmax"].startswith("fp32 (per-layer constraint")
    # fp32 (no --fp16): nothing to pin; strongly typed (TensorRT 11): the graph's dtypes decide, no constraints
    fp32 = plan_tensorrt_build(TINY, "jetson-orin", "fp32", graphs=facts).engine("decoder")
    assert fp32.fp32_layers == () and "--precisionConstraints=obey" not in trtexec_args(fp32, plan)
    strong = plan_tensorrt_build(TINY, "rtx-4090", "fp16", graphs=facts)
    assert all(x.fp32_layers == () for x in strong.engines)
    assert "--precisionConstraints" not in build_engines_script(strong)
    assert strong.engine("decoder").layer_precisions == {"matmul_weights": "fp32", "float layers": "fp32 (graph dtypes)",
                                                         "norms/softmax": "fp32 (graph dtypes)"}

    # prepare_tensorrt_bundle reads the graphs itself (graph only) and writes the constraints into the files
    entry = prepare_tensorrt_bundle(tmp_path, TINY, "jetson-orin", "fp16", check=False)
    on_disk = BuildPlan.load(tmp_path)
    assert on_disk.engine("decoder").fp32_layers == e.fp32_layers and entry["plan"] == on_disk.to_dict()
    assert "--precisionConstraints=obey" in (tmp_path / "build_engines.sh").read_text()


def test_plans_written_before_the_new_fields_still_load():
    d = json.loads(plan_tensorrt_build(TINY, "jetson-orin").to_json())
    for e in d["engines"]:
        for key in ("fp32_layers", "layer_precisions", "dla_fallback_ops"):
            e.pop(key)
    plan = BuildPlan.from_dict(d)
    assert plan.engine("decoder").fp32_layers == () and plan.engine("decoder").layer_precisions == {}


def test_dla_lists_the_vision_ops_that_fall_back_to_the_gpu(tmp_path):
    from edgevlm.graphs.trt_plan import DLA_OPS, MATMUL_ACT, dla_fallback_ops, graph_facts

    vis, dec = _graphs(tmp_path)
    assert dla_fallback_ops(vis) == {"Gelu": 1, "LayerNormalization": 1, MATMUL_ACT: 1}
    assert "Conv" in DLA_OPS and "LayerNormalization" not in DLA_OPS
    facts = {"vision": graph_facts(vis), "decoder": graph_facts(dec)}
    plan = plan_tensorrt_build(TINY, "jetson-orin", "int4", use_dla=True, graphs=facts)
    v = plan.engine("vision")
    assert v.dla_core == 0 and v.dla_fallback_ops == {"Gelu": 1, "LayerNormalization": 1, MATMUL_ACT: 1}
    assert plan.engine("decoder").dla_fallback_ops == {}
    note = next(n for n in plan.notes if "DLA core 0" in n)
    assert "3 of 9 nodes" in note and "LayerNormalization x1" in note and "Gelu x1" in note
    assert plan_tensorrt_build(TINY, "jetson-orin", "int4", graphs=facts).engine("vision").dla_fallback_ops == {}


def test_fp32_layer_name_matching():
    from edgevlm.graphs.trt_plan import fp32_layer_matches

    names = {"node_add_7", "node_Softmax_9", "norm"}
    assert fp32_layer_matches("node_add_7", names) == "node_add_7"              # the node's own layer
    assert fp32_layer_matches("node_add_7_12", names) == "node_add_7"           # a further layer of that node
    assert fp32_layer_matches("node_add_71", names) is None                     # another node
    assert fp32_layer_matches("node_add", names) is None
    assert fp32_layer_matches("norm_weight", names) is None
    assert fp32_layer_matches("(Unnamed Layer* 3) [Shuffle]", names) is None
