"""Quantization recipes: every recipe yields a bundle the runtime executes; TensorRT-targeted graphs hold no contrib
ops and only symmetric (zero point 0) Q/DQ; unsupported combinations raise typed errors that name the fix; the
report and the task-level checks measure what they claim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgevlm.errors import ConfigError, QuantizationError, TargetError
from tests.fixtures_bundles import make_image, tiny_bundle

onnx = pytest.importorskip("onnx")

SMALL = {"calibration_samples": 3, "heldout_samples": 2, "decode_steps": 2}

# (precision, target, extra options): every recipe and format the exporter can be asked for.
RECIPES = [
    ("fp32", "cpu", {}),
    ("int8", "cpu", {}),                                             # dynamic int8 vision + MatMulNBits 8-bit decoder
    ("int8", "cpu", {"int8_decoder": "dynamic"}),                    # quantize_dynamic decoder
    ("int8", "cpu", {"int8_decoder": "qdq", "calib_method": "entropy"}),
    ("int4", "cpu", {}),                                             # dynamic int8 vision + MatMulNBits int4
    ("int4", "cpu", {"int8_vision": "static", "calib_method": "percentile"}),   # calibrated QDQ vision on CPU
    ("int4,lm_head=int8", "cpu", {}),
    ("int4,lm_head=fp32", "cpu", {}),
    ("int4", "cpu", {"int4_format": "qdq"}),                         # the TensorRT form also runs on ORT CPU
    ("fp16", "jetson-orin", {}),
    ("int8", "jetson-orin", {}),                                     # W8A8 QDQ decoder
    ("int4", "jetson-orin", {}),                                     # blocked INT4 DQ decoder (opset 21), fp16 head
    ("int4,lm_head=int8", "jetson-orin", {}),                        # ... with a W8A8 head
    ("int4,vision=fp16", "rtx-4090", {}),                            # TensorRT 11: fp16 tensors around the Q/DQ
]
TRT_TARGETS = ("jetson-orin", "rtx-4090")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    return path


_OUT: dict[str, Path] = {}


def _portable(tmp_path_factory) -> Path:
    """The fp32 bundle with the portable (Optimum, standard-ops) decoder: what TensorRT targets quantize."""
    return tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")[0]


def _quantized(fp32_bundle, tmp_path_factory, precision, target, opts):
    from edgevlm.quant.apply import quantize_bundle

    key = f"{precision}|{target}|{sorted(opts.items())}"
    if key not in _OUT:
        out = tmp_path_factory.mktemp("quant") / "bundle"
        src = _portable(tmp_path_factory) if target in TRT_TARGETS else fp32_bundle
        quantize_bundle(src, out, precision, target=target, show=False, **SMALL, **opts)
        _OUT[key] = out
    return _OUT[key]


def _nodes(path):
    m = onnx.load(str(path), load_external_data=False)
    return m, list(m.graph.node)


def _zero_points_all_zero(path) -> tuple[int, list[str]]:
    """Walk the graph: every QuantizeLinear/DequantizeLinear zero point (when present) is an all-zero constant and
    every scale is > 0 (TensorRT's parser: "Scale coefficients must all be positive")."""
    from onnx import numpy_helper

    m = onnx.load(str(path))                                       # with external data
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    bad, n_qdq = [], 0
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n_qdq += 1
            if len(n.input) > 2 and n.input[2]:
                t = inits.get(n.input[2]) or consts.get(n.input[2])
                if t is None or np.any(numpy_helper.to_array(t) != 0):
                    bad.append(n.name)
            scale = inits.get(n.input[1]) or consts.get(n.input[1])
            if scale is None or not (numpy_helper.to_array(scale) > 0).all():
                bad.append(f"{n.name} (scale)")
    return n_qdq, bad


# ---- every recipe runs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,target,opts", RECIPES, ids=[f"{p}-{t}-{'-'.join(map(str, o.values())) or 'default'}"
                                                               for p, t, o in RECIPES])
def test_recipe_yields_a_bundle_the_runtime_executes(fp32_bundle, tmp_path_factory, precision, target, opts):
    from edgevlm.bundle import read_bundle
    from edgevlm.quant.recipes import plan_quantization
    from edgevlm.runtime import Session

    out = _quantized(fp32_bundle, tmp_path_factory, precision, target, opts)
    b = read_bundle(out)                                            # validates files and hashes
    plan = plan_quantization(precision, target, **{k: v for k, v in opts.items()})
    m = b.manifest
    for name in ("vision", "decoder"):
        assert m["components"][name]["precision"] == plan.components[name]
        assert m["components"][name]["recipe"]["method"] == plan.recipe(name).method
    emb = np.load(b.path(m["components"]["embed"]["file"]), mmap_mode="r")
    assert str(emb.dtype) == plan.embed_dtype == m["components"]["embed"]["dtype"]
    assert not (out / ".quant-fp32").exists()
    # every file in the folder is listed (no leftover external data of the fp32 graphs)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert on_disk == set(m["files"])
    s = Session.from_bundle(out, threads=1, optimized_cache=None)
    r = s.generate(make_image(3), "What shape is shown?", max_new_tokens=3, ignore_eos=True)
    assert len(r.tokens) == 3 and all(0 <= t < s.vocab_size for t in r.tokens)
    if not plan.is_noop:
        q = m["quantization"]
        assert q["errors"]["heldout_samples"] == q["errors"]["vision"]["outputs"] == SMALL["heldout_samples"]
        assert q["errors"]["decoder"]["top1_agreement"] is not None
        assert q["sizes"]["total"]["after_bytes"] < q["sizes"]["total"]["before_bytes"]


@pytest.mark.parametrize("precision,target,opts", [r for r in RECIPES if r[1] in TRT_TARGETS],
                         ids=[f"{p}-{t}" for p, t, _ in RECIPES if t in TRT_TARGETS])
def test_tensorrt_recipes_are_standard_ops_and_symmetric(fp32_bundle, tmp_path_factory, precision, target, opts):
    from edgevlm.graphs.trt_compat import ERROR, check_tensorrt_compat
    from edgevlm.targets import get_target

    out = _quantized(fp32_bundle, tmp_path_factory, precision, target, opts)
    trt = get_target(target).tensorrt
    for name in ("vision.onnx", "decoder.onnx"):
        m, nodes = _nodes(out / name)
        contrib = [f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")]
        assert not contrib, (name, contrib)
        assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger") for n in nodes)
        n_qdq, bad = _zero_points_all_zero(out / name)
        assert not bad, (name, bad)
        errors = [i for i in check_tensorrt_compat(out / name, trt) if i.severity == ERROR]
        assert not errors, errors
        if "int8" in precision or "int4" in precision:
            assert n_qdq > 0 if name == "vision.onnx" and "vision=fp16" not in precision else True
    dec, nodes = _nodes(out / "decoder.onnx")
    if "int4" in precision:
        blocked = [n for n in nodes if n.op_type == "DequantizeLinear"
                   and any(a.name == "block_size" and a.i > 0 for a in n.attribute)]
        assert blocked, "int4 for TensorRT must be blocked INT4 DequantizeLinear"
        assert max(o.version for o in dec.opset_import if o.domain in ("", "ai.onnx")) == 21


def test_ort_cpu_int4_uses_matmulnbits_and_the_checker_sees_it(fp32_bundle, tmp_path_factory):
    """The CPU recipe is the contrib op (fast on ORT CPU) - and the TensorRT check above would reject it."""
    from edgevlm.graphs.trt_compat import ERROR, check_tensorrt_compat

    out = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", {})
    _, nodes = _nodes(out / "decoder.onnx")
    nbits = [n for n in nodes if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    assert len(nbits) == 9                           # GroupQueryAttention graph: 2 layers x (qkv, o, gate+up, down)
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)       # + lm_head
    assert bits == [4] * 8 + [8]                                  # the int4 preset keeps the LM head 8-bit
    _, fp32_nodes = _nodes(fp32_bundle / "decoder.onnx")
    assert not any(n.op_type == "MatMul" for n in nodes) and sum(n.op_type == "MatMul" for n in fp32_nodes) == 9
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == 2    # the graph kept its attention ops
    assert json.loads((out / "manifest.json").read_text())["components"]["decoder"]["contrib_ops"] is True
    assert any(i.code == "domain" for i in check_tensorrt_compat(out / "decoder.onnx", "10.3") if i.severity == ERROR)


def test_lm_head_int8_under_int4_decoder(fp32_bundle, tmp_path_factory):
    out = _quantized(fp32_bundle, tmp_path_factory, "int4,lm_head=int8", "cpu", {})
    m, nodes = _nodes(out / "decoder.onnx")
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()).count(8) == 1 and sorted(bits.values()).count(4) == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["decoder"]["recipe"]["lm_head"] == "int8"


def test_report_errors_are_small_for_int8(fp32_bundle, tmp_path_factory):
    out = _quantized(fp32_bundle, tmp_path_factory, "int8", "jetson-orin", {})
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["errors"]["vision"]["cosine_min"] > 0.99
    assert q["errors"]["decoder"]["cosine_min"] > 0.99
    assert 0 < q["errors"]["vision"]["mean_abs"] <= q["errors"]["vision"]["max_abs"]
    assert q["calibration"]["calibration"]["num_samples"] == SMALL["calibration_samples"]
    assert q["sizes"]["vision"]["ratio"] < 0.6                       # int8 weights


@pytest.mark.parametrize("target,reduce_range", [("cpu-x86-avx2", True), ("cpu-x86-avx512-vnni", False),
                                                  ("cpu-arm64", False), ("jetson-orin", False)])
def test_int8_weights_are_7_bit_where_the_cpu_kernels_saturate(target, reduce_range):
    """x86 CPU targets without VNNI get 7-bit int8 weights (ORT's u8s8 vpmaddubsw path saturates otherwise); VNNI,
    ARM dot product and TensorRT keep all 8 bits."""
    from edgevlm.quant.recipes import plan_quantization

    plan = plan_quantization("int8", target, int8_decoder="qdq")
    assert plan.vision.params["reduce_range"] is reduce_range
    assert plan.decoder.params["reduce_range"] is reduce_range
    if target.startswith("cpu"):
        assert plan_quantization("int8", target, int8_decoder="dynamic").decoder.params["reduce_range"] is reduce_range


@pytest.mark.parametrize("opts", [{}, {"int8_vision": "static", "calib_method": "percentile"}],
                         ids=["dynamic", "static"])
def test_int8_vision_accuracy_holds_on_this_cpu(fp32_bundle, tmp_path_factory, opts):
    """The default CPU target (cpu = cpu-x86-avx2, 7-bit weights) keeps the 0.99 bar on any x86 CPU, with or
    without VNNI (run it under `qemu-x86_64 -cpu EPYC-Milan` to see an AVX2-only CPU on a VNNI machine), for the
    dynamic (default) and the calibrated static int8 vision; the report records how the quantized graphs ran."""
    out = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", opts)
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert m["components"]["vision"]["recipe"]["reduce_range"] is True
    assert m["components"]["vision"]["recipe"]["method"] == ("static-qdq" if opts else "dynamic")
    assert q["errors"]["vision"]["cosine_min"] > 0.99
    assert q["errors"]["quantized_graphs_run_as"].startswith("ONNX Runtime's CPU kernels")
    trt = json.loads((_quantized(fp32_bundle, tmp_path_factory, "int8", "jetson-orin", {}) / "manifest.json")
                     .read_text())["quantization"]["errors"]
    assert trt["quantized_graphs_run_as"].startswith("Q/DQ as float ops")


# ---- apply_precision mid-export (partial manifest, the exporter's postprocess stage) -------------------------------
def test_apply_precision_on_a_partial_manifest(fp32_bundle, tmp_path):
    from edgevlm.quant.apply import apply_precision
    from edgevlm.quant.recipes import plan_quantization

    root = tmp_path / "root"
    shutil.copytree(fp32_bundle, root)
    full = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").unlink()
    partial = {k: full[k] for k in ("model", "preprocess", "prompt", "tokenizer", "visual_tokens")}
    partial["components"] = {"embed": dict(full["components"]["embed"])}
    tol = apply_precision(root, partial, {"vision": "int8", "embedding": "fp16", "decoder": "int4", "lm_head": "int4"},
                          target="cpu", show=False, **SMALL)
    assert tol == plan_quantization("int4", "cpu").tolerances()
    assert tol.logits.max_abs > 1e-4                                 # looser than fp32 parity
    comps = partial["components"]
    assert comps["decoder"]["precision"] == "int4" and comps["decoder"]["contrib_ops"] is True
    assert comps["decoder"]["recipe"]["block_size"] == 128 and comps["decoder"]["recipe"]["accuracy_level"] == 4
    assert comps["vision"]["recipe"]["method"] == "dynamic" and comps["vision"]["opset"] == 20
    assert "calibration" not in comps["vision"]["recipe"]                # dynamic: nothing calibrated
    assert comps["embed"]["dtype"] == "float16"
    assert "com.microsoft::MatMulNBits" in comps["decoder"]["op_histogram"]
    assert partial["quantization"]["errors"]["end_to_end"]["positions"] >= SMALL["heldout_samples"]
    files = {p.name for p in root.iterdir()}
    assert ".quant-fp32" not in files
    for entry in (comps["vision"], comps["decoder"]):
        for f in entry["external_data"]:
            assert (root / f).is_file()


def test_user_folder_calibration_end_to_end(tmp_path_factory, tmp_path):
    from edgevlm.quant.apply import quantize_bundle
    from tests.fixtures_bundles import write_png

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        write_png(imgs / f"{i}.png", seed=10 + i)
    out = quantize_bundle(_portable(tmp_path_factory), tmp_path / "q", "int8", target="jetson-orin",
                          calibration=imgs, show=False,
                          calibration_samples=2, heldout_samples=2, decode_steps=1)
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["calibration"]["calibration"]["kind"] == "folder" and q["calibration"]["heldout"]["kind"] == "folder"


# ---- unsupported combinations -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,target,opts,error,fix", [
    ("fp8", "jetson-orin", {}, TargetError, "use int8"),
    ("int4,vision=fp8", "jetson-orin-nano", {}, TargetError, "Ada/Hopper"),
    ("int4,vision=int4", "cpu", {}, QuantizationError, "use int8 or fp16 for vision"),
    ("int4,vision=int4", "jetson-orin", {}, QuantizationError, "use int8 or fp16 for vision"),
    ("fp16", "cpu", {}, TargetError, "use fp32, int8 or int4"),
    ("int8,decoder=fp16", "cpu-arm64", {}, TargetError, "use fp32, int8 or int4"),
    ("int4", "jetson-orin", {"int4_format": "matmulnbits"}, QuantizationError, "int4_format='qdq'"),
    ("int8", "rtx-4090", {"int8_decoder": "weight-only"}, QuantizationError, "int8_decoder='qdq'"),
    ("int8", "jetson-orin", {"int8_decoder": "dynamic"}, QuantizationError, "TensorRT rejects"),
    ("fp8", "rtx-4090", {}, QuantizationError, "use int8"),
    ("bf16", "jetson-orin", {}, QuantizationError, "use fp16"),
    ("int8,lm_head=int4", "cpu", {}, QuantizationError, "lm_head"),
    ("int4,embedding=int8", "cpu", {}, QuantizationError, "embedding=fp16"),
    ("int4", "cpu", {"calib_method": "mse"}, QuantizationError, "minmax"),
    ("int4", "cpu", {"block_size": 48}, QuantizationError, "power of two"),
    ("int4", "jetson-orin", {"block_size": 32}, QuantizationError, "64 and 128"),
    ("int4,lm_head=fp16", "cpu", {}, TargetError, "use fp32, int8 or int4"),
    ("int5", "cpu", {}, ConfigError, "presets"),
])
def test_unsupported_combinations_name_the_fix(precision, target, opts, error, fix):
    from edgevlm.quant.recipes import plan_quantization

    with pytest.raises(error) as e:
        plan_quantization(precision, target, **opts)
    assert fix in str(e.value), str(e.value)


def test_apply_precision_refuses_before_touching_the_bundle(fp32_bundle, tmp_path):
    from edgevlm.quant.apply import apply_precision

    root = tmp_path / "root"
    shutil.copytree(fp32_bundle, root)
    before = sorted(p.name for p in root.iterdir())
    manifest = json.loads((root / "manifest.json").read_text())
    with pytest.raises(QuantizationError):
        apply_precision(root, manifest, "int4", target="jetson-orin", int4_format="matmulnbits", show=False)
    assert sorted(p.name for p in root.iterdir()) == before


def test_recipe_table_covers_every_preset():
    from edgevlm.quant.recipes import recipe_table
    from edgevlm.targets import PRECISION_PRESETS

    rows = recipe_table(("cpu", "jetson-orin"))
    assert {(r["preset"], r["target"]) for r in rows} == {(p, t) for p in PRECISION_PRESETS
                                                          for t in ("cpu-x86-avx2", "jetson-agx-orin-32gb")}
    cpu_fp16 = next(r for r in rows if r["preset"] == "fp16" and r["target"] == "cpu-x86-avx2")
    assert "error" in cpu_fp16


# ---- task-level checks ----------------------------------------------------------------------------------------------
def test_task_accuracy_and_agreement_on_a_tiny_split(fp32_bundle, tmp_path_factory, tmp_path):
    from edgevlm.quant.report import task_accuracy, teacher_forced_agreement
    from edgevlm.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", train=0, val=0, test=4, image_size=56)
    acc = task_accuracy(fp32_bundle, data, "test", limit=3, max_new_tokens=4, threads=1, predictions=True)
    assert acc["total"] == 3 and 0.0 <= acc["accuracy"] <= 1.0 and len(acc["predictions"]) == 3
    same = teacher_forced_agreement(fp32_bundle, fp32_bundle, data, "test", threads=1)
    assert same["top1_agreement"] == 1.0 and same["cosine_min"] > 0.999999 and same["positions"] >= 4
    q = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", {})
    other = teacher_forced_agreement(fp32_bundle, q, data, "test", threads=1)
    assert other["positions"] == same["positions"] and other["max_abs"] > 0


def test_normalize_answer_matches_the_training_evaluator():
    pytest.importorskip("torch")
    from edgevlm.quant.report import normalize_answer
    from edgevlm.train.evaluate import normalize_answer as train_normalize

    for text in (" Red.", "top left", "3", "Circle .", "", "a."):
        assert normalize_answer(text) == train_normalize(text)


def test_a_failed_quantization_leaves_the_fp32_export(fp32_bundle, tmp_path, monkeypatch):
    from edgevlm.quant import apply as A

    root = tmp_path / "root"
    shutil.copytree(fp32_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    digest = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise QuantizationError("injected failure")

    monkeypatch.setattr(A, "_matmulnbits", boom)
    with pytest.raises(QuantizationError, match="injected"):
        A.apply_precision(root, manifest, "int4", target="cpu", show=False, **SMALL)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == digest
    assert not (root / A.SCRATCH_DIR).exists()


def test_cpu_int8_vision_is_dynamic_unless_asked(fp32_bundle, tmp_path_factory):
    """CPU targets quantize the vision tower dynamically (no calibration pass, int8 weights, per-image activation
    scales: DynamicQuantizeLinear + MatMulInteger); ``int8_vision="static"`` gives the calibrated Q/DQ graph, and
    TensorRT targets refuse dynamic (TensorRT rejects MatMulInteger)."""
    from edgevlm.errors import QuantizationError
    from edgevlm.quant.recipes import plan_quantization

    out = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", {})
    m, nodes = _nodes(out / "vision.onnx")
    ops = {n.op_type for n in nodes}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops
    inits = {i.name for i in m.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in nodes)    # every weight MatMul quantized
    rec = json.loads((out / "manifest.json").read_text())["components"]["vision"]["recipe"]
    assert rec["method"] == "dynamic" and rec["nodes_quantized"] == sum(n.op_type == "MatMulInteger" for n in nodes)
    static = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", {"int8_vision": "static",
                                                                        "calib_method": "percentile"})
    assert "QuantizeLinear" in {n.op_type for n in _nodes(static / "vision.onnx")[1]}
    assert plan_quantization("int8", "jetson-orin").vision.method == "static-qdq"
    with pytest.raises(QuantizationError, match="int8_vision='static'"):
        plan_quantization("int8", "jetson-orin", int8_vision="dynamic")
    with pytest.raises(QuantizationError, match="unknown"):
        plan_quantization("int8", "cpu", int8_vision="fast")


@pytest.mark.parametrize("precision,head", [("int8", "w8a8"), ("int4,lm_head=int8", "w8a8"), ("int4", "float")])
def test_tensorrt_lm_head_is_w8a8_or_float(fp32_bundle, tmp_path_factory, precision, head):
    """TensorRT has no weight-only INT8 (its weight-only mode is INT4): an int8 LM head is W8A8 static QDQ (activation
    Q/DQ + per-channel INT8 weight DQ); the int4 preset keeps it float (fp16 on the device)."""
    from onnx import numpy_helper

    out = _quantized(fp32_bundle, tmp_path_factory, precision, "jetson-orin", {})
    m = onnx.load(str(out / "decoder.onnx"))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    head_node = producers["logits"]
    while head_node.op_type != "MatMul":                          # walk back through reshapes / casts
        head_node = producers[head_node.input[0]]
    act, weight = producers.get(head_node.input[0]), producers.get(head_node.input[1])
    manifest = json.loads((out / "manifest.json").read_text())
    if head == "float":
        assert head_node.input[1] in inits and inits[head_node.input[1]].data_type == onnx.TensorProto.FLOAT
        assert manifest["recipe"]["components"]["lm_head"] == "fp16"
        return
    assert act.op_type == "DequantizeLinear" and producers[act.input[0]].op_type == "QuantizeLinear"
    assert weight.op_type == "DequantizeLinear" and inits[weight.input[0]].data_type == onnx.TensorProto.INT8
    assert not numpy_helper.to_array(inits[weight.input[2]]).any()
    assert manifest["recipe"]["components"]["lm_head"] == "int8"


def test_session_warns_when_an_8_bit_int8_graph_meets_a_cpu_without_vnni(fp32_bundle, tmp_path_factory,
                                                                         monkeypatch):
    """A bundle quantized for a VNNI CPU (full 8-bit weights), loaded where int8 saturates (here: VNNI hidden by
    EDGEVLM_CPU_MASK), says so and names the fix; the default CPU target's 7-bit bundle does not."""
    from edgevlm.runtime import Session
    from edgevlm.runtime.cpuinfo import MASK_ENV, is_x86

    vnni = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu-x86-avx512-vnni", {})
    avx2 = _quantized(fp32_bundle, tmp_path_factory, "int4", "cpu", {})
    monkeypatch.setenv(MASK_ENV, "vnni")
    s = Session.from_bundle(vnni, threads=1, hash_stamps=None, native_decode="off")
    if is_x86():
        assert s.int8_warning and "cpu-x86-avx2" in s.int8_warning and "no VNNI" in s.int8_warning
    else:
        assert s.int8_warning is None
    assert Session.from_bundle(avx2, threads=1, hash_stamps=None, native_decode="off").int8_warning is None
    monkeypatch.delenv(MASK_ENV)
    from edgevlm.runtime.cpuinfo import int8_saturates

    s = Session.from_bundle(vnni, threads=1, hash_stamps=None, native_decode="off")
    assert (s.int8_warning is not None) == int8_saturates()


def test_large_models_get_the_smaller_held_out_set(fp32_bundle, tmp_path, monkeypatch):
    """A float32 decoder of >= LARGE_MODEL_PARAMS parameters gets calibration/embedded.toml's heldout_samples_large
    items in the report by default (each costs float32 passes of both graphs); an explicit count still wins."""
    from edgevlm.graphs import spec as S
    from edgevlm.quant.apply import quantize_bundle
    from edgevlm.quant.calibration import CalibrationSpec

    large = CalibrationSpec.load().heldout_samples_large
    assert 1 <= large < CalibrationSpec.load().heldout_samples
    dec_bytes = sum(p.stat().st_size for p in fp32_bundle.glob("decoder.onnx*"))
    monkeypatch.setattr(S, "LARGE_MODEL_PARAMS", dec_bytes // 4)          # this tiny decoder now counts as large
    out = quantize_bundle(fp32_bundle, tmp_path / "q", "int4", target="cpu", show=False, calibration_samples=2)
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["errors"]["heldout_samples"] == large
    assert q["calibration"]["calibration"]["kind"] == "none"              # the int4 CPU recipe calibrates nothing
    out2 = quantize_bundle(fp32_bundle, tmp_path / "q2", "int4", target="cpu", show=False, heldout_samples=2)
    assert json.loads((out2 / "manifest.json").read_text())["quantization"]["errors"]["heldout_samples"] == 2
