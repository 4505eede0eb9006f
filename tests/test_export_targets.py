"""`edgevlm export --target T` for every target profile (tiny preset): the bundle validates, carries the target and
the recipe, and TensorRT targets get a build plan and trtexec script that are right for their TensorRT version
(weakly typed flags on 10.x, strongly typed on 11.x, DLA only where present).

The default suite exports fp32 for every target (seconds each); ``-m slow`` repeats it with each target's default
recipe (int8 vision + int4 decoder on Orin and CPUs, fp16 on the big GPUs), which adds calibration and
quantization per target."""

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
    plan = json.loads((out / "build_plan.json").read_text())
    script = (out / "build_engines.sh").read_text()
    assert plan["tensorrt"] == target.tensorrt and m["tensorrt"]["plan_file"] == "build_plan.json"
    assert "build_plan.json" in b.files and "build_engines.sh" in b.files
    assert f'WANT="{target.tensorrt}"' in script
    if target.tensorrt.startswith("10."):
        assert "--stronglyTyped" not in script
        assert ("--fp16" in script) == (precision != "fp32")
    else:
        assert "--stronglyTyped" in script and "--fp16" not in script and "--int8" not in script
    dla_precision = m["recipe"]["components"]["vision"] in ("fp16", "int8")      # DLA runs fp16 / int8 only
    assert ("--useDLACore=0" in script) == (target.dla_cores > 0 and dla_precision)


@pytest.mark.parametrize("name", target_names())
def test_fp32_export_for_every_target(tmp_path, name):
    _check_export(tmp_path, name, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", target_names())
def test_default_recipe_export_for_every_target(tmp_path, name):
    _check_export(tmp_path, name, None)
