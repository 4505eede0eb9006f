"""Quantization is its own stage: ``edgevlm.exporter`` and ``edgevlm.quant`` never import each other (``edgevlm.pipeline``
composes them), every precision is defined in ``edgevlm.precisions``, and ``edgevlm quantize`` turns a float bundle
into a quantized one with the unchanged files hard-linked, the source untouched."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from edgevlm.errors import ConfigError

PKG = Path(__file__).resolve().parents[1] / "edgevlm"
PRECISION_NAMES = {"fp32", "fp16", "bf16", "fp8", "int8", "int4"}


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in the file names (function-level ones included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in sorted((PKG / package).rglob("*.py")):
        for mod in _imports(f):
            if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(PKG.parent)} imports {mod}")
    return bad


def test_exporter_and_quant_do_not_import_each_other():
    assert _offenders("exporter", ("edgevlm.quant", "edgevlm.pipeline")) == []
    assert _offenders("quant", ("edgevlm.exporter", "edgevlm.pipeline")) == []


def test_shared_graph_code_imports_neither_stage():
    assert _offenders("graphs", ("edgevlm.exporter", "edgevlm.quant", "edgevlm.pipeline")) == []
    for f in sorted((PKG / "graphs").glob("*.py")):                  # torch only inside export-time helpers
        top = ast.parse(f.read_text()).body
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not [m for m in names if m.split(".")[0] == "torch"], f
    mods = _imports(PKG / "precisions.py")
    assert not [m for m in mods if m.startswith(("edgevlm.exporter", "edgevlm.quant", "torch", "onnx"))]


def test_the_checker_sees_lazy_imports(tmp_path):
    """The AST scan finds an import inside a function (how the old exporter reached into quant)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from edgevlm.quant.fp16 import convert_fp16\n    return convert_fp16\n")
    assert "edgevlm.quant.fp16" in _imports(f)


# Collections of precision names that are not presets or per-precision facts: a ranking inside one function, the
# planner's dtype-name aliases (``float16`` -> ``fp16``) and a table's note column.
_NOT_REGISTRIES = {("graphs/trt_plan.py", "order"), ("planner.py", "_KV_DTYPES"), ("quant/recipes.py", "head_notes")}


def test_every_precision_table_is_defined_in_the_registry():
    """No module but ``edgevlm/precisions.py`` writes a literal table keyed by (or listing) precision names."""
    found = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            val = node.value
            if not isinstance(val, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                continue
            elts = val.keys if isinstance(val, ast.Dict) else val.elts
            names = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(names & PRECISION_NAMES) >= 2:
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                found.append((rel, ast.unparse(target)))
    strays = [x for x in found if x[0] != "precisions.py" and x not in _NOT_REGISTRIES]
    assert strays == []
    assert ("precisions.py", "PRECISION_PRESETS") in found          # the scan does see the registry itself


def test_registry_is_what_targets_and_recipes_use():
    from edgevlm import precisions, targets
    from edgevlm.quant import recipes

    assert targets.PRECISION_PRESETS is precisions.PRECISION_PRESETS
    assert targets.TENSORRT_PRESETS is precisions.TENSORRT_PRESETS
    assert recipes.tolerances_for is precisions.tolerances_for
    assert precisions.is_quantized(precisions.PRECISION_PRESETS["int4"])
    assert not precisions.is_quantized(precisions.PRECISION_PRESETS["fp16"])
    tol = precisions.tolerances_for({"vision": "int8", "decoder": "int4", "lm_head": "int8"})
    assert tol.logits == precisions.INT4_LOGITS_TOLERANCE and tol.vision == precisions.INT8_VISION_TOLERANCE


def test_exporter_alone_refuses_quantized_and_hookless_precisions(tmp_path):
    from edgevlm.exporter.bundle_export import export_bundle as exporter_only

    with pytest.raises(ConfigError, match="quantization stage.*edgevlm quantize"):
        exporter_only("tiny-ldpnetv2", tmp_path / "q", random_init=True, precision="int4")
    with pytest.raises(ConfigError, match="conversion hook"):
        exporter_only("tiny-ldpnetv2", tmp_path / "h", random_init=True, precision="fp16", target="rtx-4090")
    assert not (tmp_path / "q").exists() and not (tmp_path / "h").exists()


def test_quantize_cli_links_unchanged_files_and_leaves_the_source_intact(tmp_path_factory, tmp_path, capsys):
    from edgevlm.bundle import read_bundle
    from edgevlm.cli import main
    from tests.fixtures_bundles import tiny_bundle

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    before = read_bundle(src, verify_hashes=True).manifest["files"]
    out = tmp_path / "int4"
    rc = main(["quantize", str(src), "--precision", "int4", "--out", str(out), "--no-report", "--json-output"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["precision"] == "int4" and summary["bundle"] == str(out)
    b = read_bundle(out, verify_hashes=True)
    assert b.manifest["components"]["decoder"]["precision"] == "int4"
    linked = b.manifest["quantization"]["linked_files"]
    assert "tokenizer/tokenizer.json" in linked                      # unchanged: the same inode, no copy
    assert os.path.samefile(src / "tokenizer" / "tokenizer.json", out / "tokenizer" / "tokenizer.json")
    for rewritten in ("decoder.onnx", "vision.onnx", "embed_tokens.npy"):
        assert rewritten not in linked and not os.path.samefile(src / rewritten, out / rewritten)
    after = read_bundle(src, verify_hashes=True).manifest["files"]   # the source's bytes did not change
    assert after == before


def test_quantize_cli_refuses_a_quantized_source(tmp_path_factory, tmp_path):
    from edgevlm.cli import main
    from edgevlm.errors import QuantizationError
    from tests.fixtures_bundles import tiny_bundle

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    q = tmp_path / "q8"
    assert main(["quantize", str(src), "--precision", "int8", "--out", str(q), "--no-report"]) == 0
    with pytest.raises(QuantizationError, match="starts from an fp32 export"):
        from edgevlm.pipeline import quantize_bundle

        quantize_bundle(q, tmp_path / "again", "int4", report=False)
    assert not (tmp_path / "again").exists()


def test_report_is_skipped_with_its_reason_when_the_fp32_graphs_do_not_fit(tmp_path_factory, tmp_path, monkeypatch):
    """The held-out report runs the fp32 graphs in ONNX Runtime: where they would not fit (7B fp32 decoder on a
    24 GiB machine) the quantized bundle is still written, the manifest says why the error was not measured."""
    from edgevlm.bundle import read_bundle
    from edgevlm.pipeline import quantize_bundle
    from edgevlm.quant import apply as A
    from tests.fixtures_bundles import tiny_bundle

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    monkeypatch.setattr(A, "REPORT_MEMORY_SHARE", 1e-9)
    out = quantize_bundle(src, tmp_path / "q", "int4", report=True, heldout_samples=1, calibration_samples=1)
    q = read_bundle(out).manifest["quantization"]
    assert "errors" not in q and "GiB available" in q["errors_skipped"]
    monkeypatch.setattr(A, "REPORT_MEMORY_SHARE", 0.6)
    out = quantize_bundle(src, tmp_path / "q2", "int4", report=True, heldout_samples=1, calibration_samples=1)
    q = read_bundle(out).manifest["quantization"]
    assert "errors_skipped" not in q and q["errors"]["heldout_samples"] == 1
