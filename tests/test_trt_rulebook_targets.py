"""Issue 21's acceptance: for every TensorRT target and each of fp16 / int8 / int4, a tiny export passes the rule
book: ``trt_compat.check_tensorrt_compat`` for the target's TensorRT version and builder mode on every graph, and
``trt_compat.check_build_plan`` on the bundle's build plan (profiles, KV coverage, context, fp32 layers, DLA).

Default suite: the graphs depend on the builder mode, not on the board (weakly typed TensorRT 10.x: fp32 tensor types
with builder flags; strongly typed 11.x: fp16 tensor types around the Q/DQ). So one tiny fp32 export per mode
(``jetson-orin-nano-8gb`` on 10.3, ``rtx-4090`` on 11.4) is brought to each precision exactly as ``edgevlm export``
does it (fp16: the exporter's fp16 post-processing of the fp32 graphs; int8 / int4: ``quantize_bundle`` of the fp32
bundle, what ``export_bundle`` runs for quantized recipes), and every TensorRT target of that mode - plus the
``@jp7.2`` / ``@trt10.16`` stacks and a ``--dla`` plan on the boards with DLA - plans its build on a copy
(``prepare_tensorrt_bundle``: compat check for its TensorRT version, plan, script) and passes both rule sets.
``-m slow`` runs the real ``export_bundle`` for every target x precision instead.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("onnx")

from edgevlm.graphs.trt_compat import ERROR, check_build_plan, check_tensorrt_compat  # noqa: E402
from edgevlm.targets import get_target, target_names  # noqa: E402

PRECISIONS = ("fp16", "int8", "int4")
TRT_TARGETS = [n for n in target_names() if get_target(n).is_tensorrt]
#: Other software stacks of the same boards (``targets.py``: JetPack 7.2 -> TensorRT 11.4, desktop TensorRT 10.16).
STACKS = ["jetson-agx-orin-32gb@jp7.2", "rtx-4090@trt10.16"]
REPRESENTATIVE = {"weak": "jetson-orin-nano-8gb", "strong": "rtx-4090"}


def _mode(name: str) -> str:
    return get_target(name).builder_mode


def _errors(issues) -> list[str]:
    return [str(i) for i in issues if i.severity == ERROR]


def _assert_rule_book(bundle, target_name: str, manifest=None) -> None:
    import json

    tgt = get_target(target_name)
    strong = tgt.builder_mode == "strong"
    for graph in ("vision.onnx", "decoder.onnx"):
        errs = _errors(check_tensorrt_compat(bundle / graph, tgt.tensorrt, strongly_typed=strong))
        assert not errs, f"{target_name} {graph}: {errs}"
    manifest = manifest or json.loads((bundle / "manifest.json").read_text())
    errs = _errors(check_build_plan(bundle / "build_plan.json", bundle, manifest))
    assert not errs, f"{target_name} build plan: {errs}"


@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory):
    """{(builder mode, precision): bundle folder} built the way ``edgevlm export`` builds them."""
    from edgevlm.pipeline import export_bundle
    from edgevlm.quant.fp16 import convert_fp16_file
    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle
    from edgevlm.quant.apply import quantize_bundle

    root = tmp_path_factory.mktemp("rulebook")
    out = {}
    for mode, name in REPRESENTATIVE.items():
        tgt = get_target(name)
        fp32 = export_bundle("tiny-ldpnetv2", root / f"{mode}-fp32", random_init=True, target=name,
                             precision="fp32", parity=False)
        for precision in ("int8", "int4"):
            out[mode, precision] = quantize_bundle(fp32, root / f"{mode}-{precision}", precision, target=name,
                                                   report=False)
        fp16 = root / f"{mode}-fp16"                 # the exporter's fp16 stage on the fp32 graphs, then its plan
        shutil.copytree(fp32, fp16)
        for graph in ("vision.onnx", "decoder.onnx"):
            convert_fp16_file(fp16 / graph, None)
        prepare_tensorrt_bundle(fp16, _model_cfg(fp32), tgt, "fp16")
        out[mode, "fp16"] = fp16
    return out


_CFGS: dict = {}


def _model_cfg(bundle):
    """The bundle's model config (read once: a copy whose plan was rewritten no longer matches its hashes)."""
    from edgevlm.bundle import read_bundle

    if "cfg" not in _CFGS:
        _CFGS["cfg"] = read_bundle(bundle).model_config
    return _CFGS["cfg"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", TRT_TARGETS + STACKS)
def test_every_tensorrt_target_passes_the_rule_book(family_bundles, tmp_path, name, precision):
    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle

    tgt = get_target(name)
    src = family_bundles[_mode(name), precision]
    copy = tmp_path / "bundle"
    shutil.copytree(src, copy)
    components = tgt.recipe(precision)
    entry = prepare_tensorrt_bundle(copy, _model_cfg(src), tgt, components)      # compat (raises) + plan + script
    plan = entry["plan"]
    assert plan["tensorrt"] == tgt.tensorrt and plan["builder_mode"] == tgt.builder_mode
    assert all(e["dla_core"] is None for e in plan["engines"])                      # DLA is opt-in
    _assert_rule_book(copy, name)
    if tgt.dla_cores and components["vision"] in ("fp16", "int8"):                # --dla: still by the book
        entry = prepare_tensorrt_bundle(copy, _model_cfg(src), tgt, components, use_dla=True)
        assert entry["plan"]["engines"][0]["dla_core"] == 0
        _assert_rule_book(copy, name)


def test_the_family_bundles_are_what_the_modes_need(family_bundles):
    """The strongly typed family carries fp16 tensor types (TensorRT 11 obeys them); the weak one keeps fp32 types
    and pins the fp32 islands in its plan instead."""
    import json

    import onnx

    for (mode, precision), bundle in family_bundles.items():
        dec = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
        halves = [i for i in dec.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
        assert bool(halves) == (mode == "strong" or precision == "fp16"), (mode, precision)
        plan = json.loads((bundle / "build_plan.json").read_text())
        pinned = [e for e in plan["engines"] if e["fp32_layers"]]
        assert bool(pinned) == (mode == "weak"), (mode, precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", TRT_TARGETS + STACKS)
def test_every_tensorrt_target_exports_by_the_rule_book(tmp_path, name, precision):
    from edgevlm.pipeline import export_bundle

    out = export_bundle("tiny-ldpnetv2", tmp_path / "b", random_init=True, target=name, precision=precision)
    _assert_rule_book(out, name)
