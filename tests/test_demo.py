"""`edgevlm demo --fast` end to end (marked slow: several minutes on 2 cores; run with `pytest -m slow`)."""

from __future__ import annotations

import json

import pytest

from edgevlm.bundle import read_bundle

pytestmark = pytest.mark.slow


def test_fast_demo_writes_every_artifact(tmp_path):
    from edgevlm.demo import run_demo

    summary = run_demo(tmp_path / "demo", fast=True, overwrite=True)
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert saved["stages"].keys() >= {"train", "export", "quantize", "accuracy", "answers", "latency", "bench"}
    for precision, path in summary["bundles"].items():
        assert read_bundle(path).manifest["model"]["name"] == "demo"
        acc = summary["accuracy"][precision]
        assert acc["total"] > 0 and 0.0 <= acc["accuracy"] <= 1.0
    assert (tmp_path / "demo" / "bench" / "report.json").is_file()
    assert summary["latency"]["total_ms"] > 0
