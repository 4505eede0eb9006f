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
from edgevlm.exporter.bundle_export import export_bundle
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
    dla_precision = vision_precision in ("fp16", "int8")      # DLA runs fp16 / int8 only
    assert ("--useDLACore=0" in script) == (target.dla_cores > 0 and dla_precision)


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
    from edgevlm.exporter.trt_plan import prepare_tensorrt_bundle

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
