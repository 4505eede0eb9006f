"""`edgevlm export --target T` for every target profile (tiny preset): the bundle validates, carries the target and
the recipe, and TensorRT targets get a build plan and trtexec script that are right for their TensorRT version
(weakly typed flags on 10.x, strongly typed on 11.x, DLA only where present).

The default suite exports fp32 for every CPU target and for one TensorRT target per kind of graph and build (Orin
with DLA, Orin without, RTX on TensorRT 11: the torch -> ONNX export takes ~8 s each), and gives every other
TensorRT target what its export adds to those graphs (compat checks, build plan, trtexec script) on a copy of its
representative's bundle. ``-m slow`` exports fp32 for every target, and again with each target's default recipe
(int8 vision + int4 decoder on Orin and CPUs, fp16 on the big GPUs), which adds calibration and quantization."""

from __future__ import annotations

import json

import pytest

from edgevlm.bundle import read_bundle
from edgevlm.pipeline import export_bundle
from edgevlm.targets import get_target, target_names


def _check_export(tmp_path, name: str, precision: str | None) -> None:
    target = get_target(name)
    precision = precision or target.default_recipe
    out = export_bundle("tiny-ldpnetv2", tmp_path / name, random_init=True, target=name, precision=precision,
                        parity=False)
    b = read_bundle(out)
    m = b.manifest
    assert m["target"]["name"] == target.name
    assert m["precision"] == precision
    contrib = any(m["components"][c].get("contrib_ops") for c in ("vision", "decoder"))
    if not target.is_tensorrt:
        assert not (out / "build_plan.json").exists()
        return
    assert not contrib, "a TensorRT bundle must hold standard ONNX ops only"
    assert m["tensorrt"]["plan_file"] == "build_plan.json"
    assert "build_plan.json" in b.files and "build_engines.sh" in b.files
    _check_build_files(out, target, precision, m["recipe"]["components"]["vision"])
    _EXPORTED[name] = out


def _check_build_files(out, target, precision: str, vision_precision: str) -> None:
    plan = json.loads((out / "build_plan.json").read_text())
    script = (out / "build_engines.sh").read_text()
    assert plan["tensorrt"] == target.tensorrt and plan["target"] == target.label
    assert f'WANT="{target.tensorrt}"' in script
    if target.tensorrt.startswith("10."):
        assert "--stronglyTyped" not in script
        assert ("--fp16" in script) == (precision != "fp32")
    else:
        assert "--stronglyTyped" in script and "--fp16" not in script and "--int8" not in script
    assert "--useDLACore" not in script                        # DLA is opt-in (edgevlm export --dla)
    weak_fp16 = target.tensorrt.startswith("10.") and vision_precision != "fp32"
    assert all(bool(e["fp32_layers"]) == (weak_fp16 and "fp16" in e["precision_flags"]) for e in plan["engines"])


_EXPORTED: dict[str, object] = {}
#: One TensorRT target per kind of graph and build: TensorRT 10.3 with DLA, 10.3 without, 11.4 (strongly typed).
REPRESENTATIVES = {"jetson-agx-orin-32gb": "dla", "jetson-orin-nano-8gb": "10.3", "rtx-4090": "11.4"}


def _kind(target) -> str:
    return "dla" if target.dla_cores else target.tensorrt


def _default_suite_exports() -> list[str]:
    return [n for n in target_names() if not get_target(n).is_tensorrt] + list(REPRESENTATIVES)


@pytest.mark.parametrize("name", _default_suite_exports())
def test_fp32_export_for_every_kind_of_target(tmp_path_factory, name):
    assert not get_target(name).is_tensorrt or _kind(get_target(name)) == REPRESENTATIVES[name]
    _check_export(tmp_path_factory.mktemp("export"), name, "fp32")


@pytest.mark.parametrize("name", [n for n in target_names() if get_target(n).is_tensorrt and n not in REPRESENTATIVES])
def test_every_tensorrt_target_plans_its_build_on_the_exported_graphs(tmp_path, name):
    """What a TensorRT target's export adds to its graphs (``prepare_tensorrt_bundle``: compat checks, plan, script)
    on a copy of the fp32 bundle of its representative (same TensorRT version, same graphs)."""
    import shutil

    from edgevlm.config import get_model_config
    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle

    target = get_target(name)
    rep = next(r for r, k in REPRESENTATIVES.items() if k == _kind(target))
    if rep not in _EXPORTED:
        _check_export(tmp_path / "rep", rep, "fp32")
    out = tmp_path / name
    shutil.copytree(_EXPORTED[rep], out)
    entry = prepare_tensorrt_bundle(out, get_model_config("tiny-ldpnetv2"), target, "fp32")
    assert entry["plan_file"] == "build_plan.json" and entry["plan"]["target"] == target.label
    _check_build_files(out, target, "fp32", "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", target_names())
def test_fp32_export_for_every_target(tmp_path, name):
    _check_export(tmp_path, name, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", target_names())
def test_default_recipe_export_for_every_target(tmp_path, name):
    _check_export(tmp_path, name, None)


def test_dla_export_lists_the_vision_ops_that_fall_back_to_the_gpu(tmp_path):
    """``edgevlm export --dla`` on an AGX Orin (fp16): the vision engine goes to DLA core 0 and the plan names the
    ViT ops DLA cannot run; the weakly typed fp16 build pins the norms/softmax to fp32; the recorded memory plan is
    the manifest's (float32 KV, the engines' context)."""
    out = export_bundle("tiny-ldpnetv2", tmp_path / "dla", random_init=True, target="jetson-agx-orin-32gb",
                        precision="fp16", parity=False, dla=True)
    m = read_bundle(out).manifest
    engines = {e["component"]: e for e in m["tensorrt"]["plan"]["engines"]}
    vision, decoder = engines["vision"], engines["decoder"]
    assert vision["dla_core"] == 0 and decoder["dla_core"] is None
    assert {"LayerNormalization", "Gelu"} <= set(vision["dla_fallback_ops"])
    assert any("fall back to the GPU" in n and "LayerNormalization x" in n for n in m["tensorrt"]["plan"]["notes"])
    script = (out / "build_engines.sh").read_text()
    assert "--useDLACore=0" in script and "--precisionConstraints=obey" in script
    assert vision["fp32_layers"] and decoder["fp32_layers"]
    assert decoder["layer_precisions"]["norms/softmax"].startswith("fp32 (per-layer constraint")
    mem = m["memory_plan"]
    assert mem["kv_dtype"] == "fp32" and mem["context"] == m["tensorrt"]["plan"]["context"]
    assert "kv_cache.present" in [i["name"] for i in mem["items"]]


def test_quantized_export_is_memory_checked_at_its_own_precision(tmp_path, monkeypatch):
    """An int4 export for a Jetson goes through an fp32 intermediate bundle on the host: only the int4 bundle is
    checked against the board's memory (an fp32 check refused e.g. mobilevlm-1.7b int4 on an Orin Nano 8 GB, where
    fp32 does not fit but int4 does)."""
    from edgevlm import planner

    checked = []
    real = planner.check_fits
    monkeypatch.setattr(planner, "check_fits", lambda plan: checked.append(plan.precision_name) or real(plan))
    out = export_bundle("tiny-ldpnetv2", tmp_path / "q", random_init=True, target="jetson-orin-nano-8gb",
                        precision="int4", parity=False)
    assert checked and all(p != "fp32" for p in checked)
    m = read_bundle(out).manifest
    assert m["memory_plan"]["precision"] == m["recipe"]["components"] and m["memory_plan"]["kv_dtype"] == "fp32"
