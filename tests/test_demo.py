"""`edgevlm demo --fast` end to end: every stage, ~1 minute on 2 cores (measured 64 s on an idle machine)."""

from __future__ import annotations

import json

import pytest

from edgevlm.bundle import read_bundle


def chance_accuracy(data_dir, per_type: dict) -> float:
    """Exact match of uniform guessing among each question type's answers, weighted like the evaluated split."""
    vocab = json.loads((data_dir / "dataset_info.json").read_text())["answer_vocabulary"]
    total = sum(v["total"] for v in per_type.values())
    return sum(v["total"] / len(vocab[t]) for t, v in per_type.items()) / total


@pytest.mark.timeout(900)
def test_fast_demo_writes_every_artifact(tmp_path):
    """... with the umask's file modes (0644 / 0755 under 022; tempfile's 0600 / 0700 nowhere), its marker, and
    the load average measured before the work."""
    from edgevlm.demo import run_demo
    from edgevlm.outputs import kind_of
    from tests.test_outputs import assert_umask_modes, umask

    with umask(0o022):
        summary = run_demo(tmp_path / "demo", fast=True, overwrite=True)
    assert_umask_modes(tmp_path / "demo", 0o022)
    assert kind_of(tmp_path / "demo") == "demo" and kind_of(tmp_path / "demo" / "train") == "train"
    env = summary["environment"]
    assert env["loadavg_start"] and env["loadavg_end"] and len(env["loadavg_start"]) == 3
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert saved["stages"].keys() >= {"train", "export", "quantize", "accuracy", "answers", "latency", "bench"}
    for precision, path in summary["bundles"].items():
        assert read_bundle(path).manifest["model"]["name"] == "demo"
        acc = summary["accuracy"][precision]
        assert acc["total"] > 0 and 0.0 <= acc["accuracy"] <= 1.0
        # the model learned the task: well above guessing (measured ~73 % against ~29 % chance)
        chance = chance_accuracy(tmp_path / "demo" / "train" / "data", acc["per_type"])
        assert acc["accuracy"] > 1.5 * chance, (precision, acc["accuracy"], chance)
    assert (tmp_path / "demo" / "bench" / "report.json").is_file()
    assert summary["latency"]["total_ms"] > 0
