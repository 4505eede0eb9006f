"""``edgevlm verify`` and ``edgevlm build-engine`` on tiny fp32 bundles: a CPU-target bundle and a TensorRT-target
(``jetson-orin``) bundle pass; a decoder with a ``com.microsoft`` op (hash fixed, so only the TensorRT check can
see it) and a tampered file fail with the check named; build-engine names the fix without TensorRT or on a CPU
bundle, and records engines in the manifest (with a stand-in builder); verify runs without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from edgevlm.bundle import read_bundle, update_manifest
from edgevlm.cli import main
from edgevlm.exporter.verify import engine_tolerance, verify_bundle
from fixtures_bundles import tiny_bundle


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")[0]          # shared with the runtime tests


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    from edgevlm.pipeline import export_bundle

    out = tmp_path_factory.mktemp("verify") / "tiny-orin"
    return export_bundle("tiny-ldpnetv2", out, random_init=True, target="jetson-orin", precision="fp32", parity=False)


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _statuses(report):
    return {c.name: c.status for c in report.checks}


def test_verify_passes_on_a_cpu_bundle(cpu_bundle):
    report = verify_bundle(cpu_bundle, samples=2, seed=0)
    st = _statuses(report)
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    for name in ("manifest", "sha256", "onnx:vision", "embed", "onnx:decoder", "run:vision", "run:decoder",
                 "run:kv-consistency"):
        assert st[name] == "pass", (name, report.check(name).detail)
    assert st["tensorrt"] == "skip" and not any(n.startswith("trt:") for n in st)
    assert report.check("run:kv-consistency").data["cosine"] > 0.9999


def test_verify_passes_on_a_tensorrt_bundle(trt_bundle, capsys):
    report = verify_bundle(trt_bundle, samples=1)
    st = _statuses(report)
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    for name in ("trt:compat:vision", "trt:compat:decoder", "trt:build-plan", "trt:build-script"):
        assert st[name] == "pass", (name, report.check(name).detail)
    assert st["engines"] == "skip" and "edgevlm build-engine" in report.check("engines").detail

    assert main(["verify", str(trt_bundle), "--json-output", "--samples", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["counts"]["fail"] == 0


def test_verify_fails_on_engines_on_disk_that_are_not_registered(trt_bundle, tmp_path):
    """build_engines.sh run where edgevlm is not on PATH leaves engines the manifest does not know: verify says so
    and names `edgevlm register-engines` (issue 21)."""
    bad = _copy(trt_bundle, tmp_path)
    (bad / "engines").mkdir()
    (bad / "engines" / "decoder.engine").write_bytes(b"an engine trtexec wrote")
    report = verify_bundle(bad, samples=1)
    check = report.check("engines")
    assert not report.passed and check.status == "fail"
    assert "engines/decoder.engine" in check.detail and "edgevlm register-engines" in check.detail


def test_verify_fails_on_a_contrib_op_in_a_tensorrt_bundle(trt_bundle, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    bad = _copy(trt_bundle, tmp_path)
    path = bad / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)            # weights stay in decoder.onnx.data
    for node in model.graph.node:
        for i, out in enumerate(node.output):
            if out == "logits":
                node.output[i] = "logits_pre_gelu"
    model.graph.node.append(helper.make_node("Gelu", ["logits_pre_gelu"], ["logits"], domain="com.microsoft",
                                             name="contrib_gelu"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    update_manifest(bad, lambda m: None, new_files=["decoder.onnx"])   # hashes fixed: only the compat check sees it

    report = verify_bundle(bad, samples=1)
    st = _statuses(report)
    assert not report.passed and [c.name for c in report.failures] == ["trt:compat:decoder"]
    assert st["sha256"] == st["onnx:decoder"] == st["run:decoder"] == st["trt:compat:vision"] == "pass"
    detail = report.check("trt:compat:decoder").detail
    assert "com.microsoft" in detail and "contrib_gelu" in detail

    assert main(["verify", str(bad), "--samples", "1"]) == 1
    out = capsys.readouterr().out
    assert "trt:compat:decoder" in out and "FAILED" in out


def test_verify_fails_on_a_tampered_file(cpu_bundle, tmp_path, capsys):
    bad = _copy(cpu_bundle, tmp_path)
    data = bad / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                          # same size: only the hash can tell
    data.write_bytes(bytes(raw))
    report = verify_bundle(bad, samples=1)
    assert [c.name for c in report.failures] == ["sha256"]
    assert "vision.onnx.data" in report.check("sha256").detail
    assert _statuses(report)["manifest"] == "pass"                    # the other checks still ran
    assert main(["verify", str(bad), "--samples", "1"]) == 1
    assert "sha256" in capsys.readouterr().out


def test_build_engine_needs_a_tensorrt_target(cpu_bundle, capsys):
    assert main(["build-engine", str(cpu_bundle)]) == 2
    err = capsys.readouterr().err
    assert "build_plan.json" in err and "--target jetson-orin" in err


def test_build_engine_without_tensorrt_says_where_to_run(trt_bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(trt_bundle), "--only", "decoder"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'edgevlm[tensorrt]'" in err and "edgevlm build-engine BUNDLE" in err


def test_build_engine_records_engines_and_verify_skips_them_here(trt_bundle, tmp_path, monkeypatch, capsys):
    """A stand-in for ``trt_build.build_engines`` (no TensorRT here) writes engine files; build-engine must record
    them (hashed) and verify must list them, then skip the comparison with a pointer to the device."""
    import edgevlm.exporter.trt_build as trt_build
    from edgevlm.graphs.trt_plan import BuildPlan

    b = _copy(trt_bundle, tmp_path)
    calls = []

    def fake_build(bundle_dir, plan=None, *, only=None, allow_version_mismatch=False, timing_cache=True,
                   verbose=False):
        calls.append(dict(only=only, timing_cache=timing_cache, allow=allow_version_mismatch))
        bp = BuildPlan.load(bundle_dir)
        out = {}
        for e in bp.engines:
            if only and e.component not in only:
                continue
            p = bundle_dir / e.engine
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(f"fake {e.component} engine".encode())
            out[e.component] = {"file": e.engine, "onnx": e.onnx, "bytes": p.stat().st_size,
                                "sha256": trt_build._sha256(p), "tensorrt": "10.3.0.30", "device": "Orin",
                                "compute_capability": "8.7", "build_s": 1.0,
                                "profiles": [{"name": pr.name, "shapes": {}} for pr in e.profiles]}
        return out

    monkeypatch.setattr(trt_build, "build_engines", fake_build)
    import edgevlm.runtime.trt_backend as tb                           # deterministic on a GPU box too
    monkeypatch.setattr(tb, "tensorrt_available", lambda: (False, "no TensorRT in this test"))
    assert main(["build-engine", str(b), "--only", "decoder", "--no-timing-cache"]) == 0
    assert calls[-1] == {"only": ["decoder"], "timing_cache": False, "allow": False}
    assert main(["build-engine", str(b)]) == 0
    capsys.readouterr()
    bundle = read_bundle(b)                                            # validates sizes + sha256 of the engines
    engines = bundle.manifest["tensorrt"]["engines"]
    assert set(engines) == {"vision", "decoder"}
    assert engines["decoder"]["profiles"][1]["name"] == "decode"
    assert bundle.files["engines/decoder.engine"]["sha256"] == engines["decoder"]["sha256"]

    report = verify_bundle(b, samples=1)
    st = _statuses(report)
    assert report.passed and st["engine:decoder:file"] == st["engine:vision:file"] == "pass"
    assert st["engine:decoder"] == "skip" and "run `edgevlm verify` on the device" in report.check(
        "engine:decoder").detail
    required = verify_bundle(b, samples=1, engines="require")
    assert {c.name for c in required.failures} == {"engine:vision", "engine:decoder"}

    (b / "engines" / "decoder.engine").write_bytes(b"fake decoder enginX")   # same size, other bytes
    assert [c.name for c in verify_bundle(b, samples=1, engines="skip").failures] == ["sha256"]


def test_engine_tolerances_loosen_with_the_engine_precision():
    comp = {"precision": "fp32", "parity": {"tolerances": {"logits": {"max_abs": 1e-4, "relative": False,
                                                                       "min_cosine": 0.99999}}}}
    fp32 = engine_tolerance(comp, {"precision_flags": []}, "logits")
    fp16 = engine_tolerance(comp, {"precision_flags": ["fp16"]}, "logits")
    int8 = engine_tolerance(comp, {"precision_flags": ["fp16", "int8"]}, "logits")
    assert 1e-4 < fp32.max_abs < fp16.max_abs <= int8.max_abs               # TF32 < fp16 < int8
    assert fp32.min_cosine > fp16.min_cosine > int8.min_cosine


def test_verify_runs_without_torch(trt_bundle, tmp_path):
    code = textwrap.dedent(f"""
        import sys, json, importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnxscript"):
                    raise ImportError(f"{{name}} is blocked (device install)")
                return None
        sys.meta_path.insert(0, _Block())
        import edgevlm.exporter.verify, edgevlm.cli.engine, edgevlm.runtime.trt_backend
        from edgevlm.exporter.verify import verify_bundle
        r = verify_bundle({str(trt_bundle)!r}, samples=1)
        print(json.dumps({{"passed": r.passed, "failures": [c.name for c in r.failures],
                          "bundle_export": "edgevlm.exporter.bundle_export" in sys.modules,
                          "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"passed": True, "failures": [], "bundle_export": False, "heavy": []}


def test_verify_compares_engines_through_the_decoder_loop(trt_bundle, tmp_path, monkeypatch):
    """With (fake) TensorRT here, ``engine:decoder`` runs the engine's ``TrtDecoderRunner`` through the same
    decoder loop as ``run:decoder`` runs ONNX Runtime (prefill, one step, KV checks): the fake engines execute the
    bundle's own graphs, so both agree to float rounding; every fake device buffer is freed afterwards."""
    import sys

    from tests.fake_tensorrt import install_fake_tensorrt

    b = install_fake_tensorrt(monkeypatch, _copy(trt_bundle, tmp_path))
    report = verify_bundle(b, samples=1, engines="require")
    st = _statuses(report)
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    assert st["engine:vision"] == st["engine:decoder"] == st["engine:decoder:file"] == "pass"
    data = report.check("engine:decoder").data
    assert set(data) == {"prefill logits", "decode logits"}
    assert all(d["max_abs_diff"] <= 1e-4 and d["cosine"] > 0.99999 for d in data.values()), data
    assert "TensorRT vs ONNX Runtime" in report.check("engine:decoder").detail
    assert sys.modules["tensorrt"].cudart.mem == {}                    # runner, engine and stream all released


def test_verify_skips_a_graph_that_cannot_fit_this_machine(cpu_bundle, monkeypatch):
    """A graph whose CPU session would not fit (e.g. a 7B fp16 decoder, whose fp16 weights get float32 copies on the
    CPU provider) is a skipped check naming the memory, not a bad_alloc failure; the run check is skipped with it."""
    import psutil

    class _Mem:
        available = 1024                                   # bytes: nothing fits

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Mem())
    report = verify_bundle(cpu_bundle, samples=1, seed=0)
    st = _statuses(report)
    assert st["onnx:decoder"] == "skip" and st["run:decoder"] == "skip"
    msg = next(c.detail for c in report.checks if c.name == "onnx:decoder")
    assert "GiB" in msg and "available" in msg
