"""Export failures and TensorRT-targeted bundles: atomicity (nothing at the destination after a failure), typed
errors for bad arguments, parity failures, checkpoints, and the standard-ops-only guarantee for TensorRT targets.

One real export (tiny-ldpnetv2 for a TensorRT target, shared with test_export.py) is checked here; the other exports
replace the two slow torch->ONNX steps by copies of its graphs (``fast_exports``), so each takes about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgevlm.bundle import read_bundle  # noqa: E402
from edgevlm.errors import (BundleError, CheckpointError, ConfigError, ExportMismatch,  # noqa: E402
                            TargetError)
from edgevlm.exporter import onnx_export as E  # noqa: E402
from edgevlm.pipeline import export_bundle  # noqa: E402

MODEL = "tiny-ldpnetv2"
TRT_TARGET = "jetson-orin-nano"
#: Standard ONNX ops a TensorRT 10.x parser takes and that our fp32 graphs may contain.
ALLOWED_OPS = {
    "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "Div", "Equal", "Erf", "Expand",
    "Flatten", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "HardSigmoid",
    "HardSwish", "Identity", "IsNaN", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mul",
    "Neg", "Not", "Or", "Pow", "Range", "Reciprocal", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Sin",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Trilu", "Unsqueeze",
    "Where", "AveragePool", "GlobalAveragePool", "Clip", "ScatterND", "CumSum",
}


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.tmp-")
                  or p.name.startswith(f".{dest.name}.old-"))


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """The tiny random-init bundle exported for a TensorRT target (shared with test_export.py: one export)."""
    from test_export import TARGETS, export_tiny

    assert TARGETS[MODEL] == TRT_TARGET
    return export_tiny(tmp_path_factory, MODEL)[0]


@pytest.fixture
def fast_exports(monkeypatch, trt_bundle):
    """Replace the torch->ONNX steps by copies of the shared bundle's graphs (same model: MODEL, seed 0)."""
    src = trt_bundle

    def copier(name):
        def fake(model, path, *, opset=20, **kwargs):
            path = Path(path)
            shutil.copyfile(src / f"{name}.onnx", path)
            shutil.copyfile(src / f"{name}.onnx.data", path.with_name(path.name + ".data"))
            return E.ExportedGraph(path, {"mask_constants_replaced": 1, "mask_value": E.MASK_VALUE})
        return fake

    monkeypatch.setattr(E, "export_vision", copier("vision"))
    monkeypatch.setattr(E, "export_decoder", copier("decoder"))
    return monkeypatch


# ---- TensorRT-targeted bundle -----------------------------------------------------------------------------------
def test_cli_export_says_random_init(fast_exports, tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--model", MODEL, "--random-init", "--target", TRT_TARGET, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM-INIT" in printed and "(random-init)" in printed and str(out) in printed
    assert main(["export", "--model", MODEL, "--random-init", "--out", str(out), "--overwrite", "--json-output",
                 "--skip-parity"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["random_init"] is True and summary["tokenizer_stand_in"] is True
    assert summary["target"] == "cpu-x86-avx2" and summary["parity"] == {"vision": None, "decoder": None}
    from edgevlm.cli.export import default_out

    assert default_out(MODEL, None, True, "cpu-x86-avx2", "fp32").name == f"{MODEL}-random-init-cpu-x86-avx2-fp32"


def test_tensorrt_bundle_has_only_standard_ops(trt_bundle):
    import onnx

    out = trt_bundle
    b = read_bundle(out)
    m = b.manifest
    assert m["target"]["backend"] == "tensorrt" and m["tensorrt"]["compat_warnings"] == {}
    assert {m["tensorrt"]["plan_file"], m["tensorrt"]["script"]} <= set(m["files"])
    assert m["memory_plan"]["verdict"] == "fits"
    for name in ("vision", "decoder"):
        comp = m["components"][name]
        assert comp["opset"] <= m["target"]["opset_max"] and comp["contrib_ops"] is False
        model = onnx.load(str(b.component_path(name)), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ops = {n.op_type for n in model.graph.node}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
        assert E.nonfinite_constants(model) == []
    try:
        from edgevlm.graphs.trt_compat import check_tensorrt_compat
    except ImportError:  # pragma: no cover - trt_compat ships with edgevlm
        return
    for name in ("vision", "decoder"):
        issues = check_tensorrt_compat(b.component_path(name), "10.3")
        assert [i for i in issues if i.severity == "error"] == []
        assert not [i for i in issues if "mask" in str(i)], issues                # finite mask constants


def test_allowlist_check_catches_a_contrib_op(trt_bundle, tmp_path):
    """The checks above can fail: a com.microsoft node is reported (by trt_compat and by the domain check)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(trt_bundle / "vision.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("FastGelu", ["image_embeds"], ["fg"], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert "com.microsoft::FastGelu" in E.op_histogram(model) and E.uses_contrib_ops(model)
    from edgevlm.graphs.trt_compat import assert_tensorrt_compat

    with pytest.raises(TargetError, match="FastGelu"):
        assert_tensorrt_compat(model, "10.3")


def test_opset_above_target_maximum_is_refused(tmp_path):
    with pytest.raises(TargetError, match="opset 21"):
        export_bundle(MODEL, tmp_path / "b", random_init=True, target=TRT_TARGET, opset=21)
    with pytest.raises(ConfigError, match="opset 17"):
        export_bundle(MODEL, tmp_path / "b", random_init=True, opset=17)
    assert not (tmp_path / "b").exists()


# ---- atomicity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["portable", "gqa"])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(fast_exports, tmp_path, exc, graph):
    import edgevlm.exporter.bundle_export as BE

    def fail(*args, **kwargs):
        raise exc

    if graph == "gqa":
        pytest.importorskip("onnxruntime_genai")
        fast_exports.setattr(BE, "_export_gqa_decoder", fail)
    else:
        fast_exports.setattr(E, "export_decoder", fail)      # vision.onnx is already in the temp dir by then
    dest = tmp_path / "bundles" / "b"
    with pytest.raises(type(exc)):
        export_bundle(MODEL, dest, random_init=True, decoder_graph=graph)
    assert not dest.exists() and _leftovers(dest) == []


def test_parity_failure_raises_export_mismatch_and_leaves_nothing(fast_exports, tmp_path):
    dest = tmp_path / "b"
    with pytest.raises(ExportMismatch) as e:                 # graphs of the seed-0 model, PyTorch model of seed 1
        export_bundle(MODEL, dest, random_init=True, seed=1)
    assert e.value.max_abs_diff > e.value.tolerance and "max |diff|" in str(e.value)
    assert not dest.exists() and _leftovers(dest) == []


def test_fast_export_then_overwrite_rules(fast_exports, tmp_path):
    dest = tmp_path / "b"
    export_bundle(MODEL, dest, random_init=True)              # the copied graphs pass parity: same model
    assert read_bundle(dest).manifest["components"]["decoder"]["parity"]["passed"]
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(MODEL, dest, random_init=True)
    export_bundle(MODEL, dest, random_init=True, overwrite=True, parity=False)
    m = read_bundle(dest).manifest
    assert m["components"]["vision"]["parity"]["skipped"] is True and m["parity"]["skipped"] is True
    not_bundle = tmp_path / "data"
    not_bundle.mkdir()
    (not_bundle / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an edgevlm bundle"):
        export_bundle(MODEL, not_bundle, random_init=True, overwrite=True)
    assert (not_bundle / "keep.txt").read_text() == "mine" and _leftovers(dest) == []


# ---- arguments --------------------------------------------------------------------------------------------------
def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_bundle(None, tmp_path / "b", checkpoint=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        export_bundle(None, tmp_path / "b", checkpoint=tmp_path / "empty")
    assert not (tmp_path / "b").exists()


def test_source_arguments_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint"):
        export_bundle(MODEL, tmp_path / "b")                                       # neither
    with pytest.raises(ConfigError, match="exactly one"):
        export_bundle(MODEL, tmp_path / "b", random_init=True, checkpoint=tmp_path)
    with pytest.raises(ConfigError, match="unknown; known: .*tiny-ldpnet"):
        export_bundle("mobilevlm-9b", tmp_path / "b", random_init=True)
    with pytest.raises(ConfigError, match="target 'nano' unknown"):
        export_bundle(MODEL, tmp_path / "b", random_init=True, target="nano")


@pytest.mark.parametrize("args, message", [
    (["--model", MODEL], "exactly one of --checkpoint"),
    (["--model", MODEL, "--random-init", "--checkpoint", "x"], "exactly one of --checkpoint"),
    (["--model", "nope", "--random-init"], "model 'nope' unknown"),
    (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
    (["--random-init"], "needs --model"),
])
def test_cli_errors_exit_2_with_message(capsys, tmp_path, args, message):
    from edgevlm.cli import main

    assert main(["export", *args, "--out", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, edgevlm.cli.export, edgevlm.exporter.bundle_export; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_export_ships_its_tokenizer(fast_exports, trt_bundle, tmp_path):
    from edgevlm.config import get_model_config
    from edgevlm.model import build_model, save_checkpoint

    model = build_model(get_model_config(MODEL), seed=0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_src=trt_bundle / "tokenizer")
    dest = export_bundle(None, tmp_path / "b", checkpoint=ckpt)
    m = read_bundle(dest).manifest
    assert m["model"]["random_init"] is False and m["model"]["source"] == str(ckpt.resolve())
    assert m["tokenizer"]["stand_in"] is False and "tokenizer/tokenizer_config.json" in m["tokenizer"]["files"]
    assert (dest / "tokenizer" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert m["components"]["decoder"]["parity"]["passed"] and not any("random-init" in n for n in m["notes"])
    with pytest.raises(ConfigError, match="does not describe checkpoint"):
        export_bundle("tiny-ldpnet", tmp_path / "b2", checkpoint=ckpt)
    assert not (tmp_path / "b2").exists()
