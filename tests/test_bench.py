"""``edgevlm bench``: a sweep over 4 visual-token budgets x 2 precisions of the tiny preset runs end to end and its
report is complete and internally consistent (never its speed); the Eq. 4 fit recovers known rates and fails on data
it cannot explain; ``--compare`` exits 1 on a regression beyond the spread and 0 within it; the bench is torch-free."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevlm.errors import ConfigError, PromptError
from tests.fixtures_bundles import tiny_bundle

BUDGETS = "16,9,4,1"                       # mlp2x_gelu (4x4 grid), pooled ldpnetv2 @9, ldpnetv2 (base), @1
PRECISIONS = ("fp32", "int4")
PROMPTS = [6, 14]
OUTPUTS = [2, 5]
REPEATS = 2
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Budget bundles derived from the shared tiny-ldpnetv2 fixture bundle + their int4 versions, benchmarked."""
    pytest.importorskip("onnx")
    from edgevlm.bench.budgets import build_budget_bundles
    from edgevlm.bench.sweep import SweepSpec
    from edgevlm.cli.bench import run_bench

    base, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    root = tmp_path_factory.mktemp("bench")
    built = build_budget_bundles("tiny-ldpnetv2", root / "bundles", BUDGETS, precisions=",".join(PRECISIONS),
                                 random_init=True, base_bundle=base)
    spec = SweepSpec(bundles=[str(p) for p in built.bundles], prompt_tokens=PROMPTS, output_tokens=OUTPUTS,
                     threads=[1], warmup=1, repeats=REPEATS, isolate=False, cache=str(root / "ort-cache"))
    report = run_bench(spec, charts=True, roofline=True, bandwidth_gib=0.02, out=root / "out",
                       command="pytest tests/test_bench.py")
    return {"report": report, "out": root / "out", "built": built, "base": base, "spec": spec}


# ---- the sweep's report ---------------------------------------------------------------------------------------------
def test_report_schema_and_environment(sweep):
    from edgevlm.bench.report import SCHEMA, SCHEMA_VERSION, load_report
    from edgevlm.bundle import read_bundle

    rep = load_report(sweep["out"] / "report.json")            # the file on disk, not the in-memory dict
    assert rep["schema"] == SCHEMA and rep["schema_version"] == SCHEMA_VERSION
    for key in ("created", "edgevlm_version", "command", "environment", "spec", "roofline", "bundles", "sessions",
                "configurations", "fits", "family_fits", "summary", "workload", "notes", "charts"):
        assert key in rep, key
    env = rep["environment"]
    for key in ("cpu", "ram_gib", "os", "python", "versions", "loadavg_start", "loadavg_end", "bundles", "threads"):
        assert key in env, key
    assert env["cpu"]["model"] and env["cpu"]["cores_logical"] >= 1
    for lib in ("numpy", "onnxruntime", "tokenizers", "edgevlm"):
        assert lib in env["versions"], lib
    hashes = {b["path"]: b["manifest_sha256"] for b in env["bundles"]}
    for b in rep["bundles"]:
        assert hashes[b["path"]] == b["manifest_sha256"] == read_bundle(b["path"], verify_hashes=False).manifest_sha256
    assert rep["roofline"]["bandwidth"]["read_gbs"] > 0
    assert rep["spec"]["repeats"] == REPEATS and rep["spec"]["prompt_tokens"] == PROMPTS


def test_every_configuration_is_present_with_its_budget(sweep):
    rep = sweep["report"]
    assert len(rep["bundles"]) == 4 * len(PRECISIONS)
    assert {b["visual_tokens"] for b in rep["bundles"]} == {16, 9, 4, 1}
    assert {b["precision"] for b in rep["bundles"]} == set(PRECISIONS)
    assert len(rep["sessions"]) == len(rep["bundles"]) and not any("error" in s for s in rep["sessions"])
    want = {(b["path"], p, o) for b in rep["bundles"] for p in PROMPTS for o in OUTPUTS}
    got = {(c["bundle"], c["text_tokens"], c["output_tokens"]) for c in rep["configurations"]}
    assert got == want
    from edgevlm.bundle import read_bundle

    for c in rep["configurations"]:
        v = read_bundle(c["bundle"], verify_hashes=False).visual_tokens
        assert c["visual_tokens"] == v
        assert c["prompt_tokens"] == v + c["text_tokens"]
        assert len(c["requests"]) == REPEATS
        for r in c["requests"]:
            assert r["visual_tokens"] == v and r["text_tokens"] == c["text_tokens"]
            assert r["prompt_tokens"] == c["prompt_tokens"]
            assert r["generated_tokens"] == c["output_tokens"] and r["finish_reason"] == "max_new_tokens"


def test_parts_never_exceed_the_total_and_rates_are_tokens_over_seconds(sweep):
    for c in sweep["report"]["configurations"]:
        for r in c["requests"]:
            parts = (r["preprocess_ms"] + r["tokenize_ms"] + r["vision_ms"] + r["prefill_ms"] + r["decode_ms"]
                     + r["sampling_ms"] + r["detokenize_ms"])
            assert parts <= r["total_ms"] + 1e-3
            assert parts + r["other_ms"] == pytest.approx(r["total_ms"], abs=1e-2)
            assert r["ttft_ms"] <= r["total_ms"] + 1e-3
            assert r["prefill_ms"] <= r["ttft_ms"] + 1e-3
            assert r["prefill_tok_s"] == pytest.approx(r["prompt_tokens"] / (r["prefill_ms"] / 1e3), rel=1e-3)
            assert r["decode_steps"] == r["generated_tokens"] - 1
            if r["decode_steps"]:
                # records hold ms rounded to 1e-4: on the tiny bundles a native step is tens of microseconds
                rel = 1e-3 + 1e-4 / r["decode_ms"]
                assert r["decode_tok_s"] == pytest.approx(r["decode_steps"] / (r["decode_ms"] / 1e3), rel=rel)
                assert r["decode_token_ms_p50"] <= r["decode_token_ms_p95"] + 1e-6
            assert r["peak_rss_mb"] > 0
        for metric, st in c["stats"].items():
            assert st["n"] == REPEATS, metric
            assert st["min"] <= st["median"] <= st["max"] and st["iqr"] >= 0 and st["spread"] >= 0


def test_every_measured_request_had_its_own_image(sweep):
    rep = sweep["report"]
    tags = [r["image"] for c in rep["configurations"] for r in c["requests"]]
    tags += [w["image"] for s in rep["sessions"] for w in s["warmup"]]
    assert len(tags) == len(set(tags))
    assert rep["workload"]["all_distinct"] and rep["workload"]["distinct_images"] == len(tags)


def test_eq4_fit_per_session_is_present_and_finite(sweep):
    rep = sweep["report"]
    assert {f["session"] for f in rep["fits"]} == {s["id"] for s in rep["sessions"]}
    for f in rep["fits"]:
        co = f["coefficients"]
        for k in ("a_s_per_prompt_token", "b_s_per_output_token", "c_s"):
            assert co[k] is not None and math.isfinite(co[k]), (f["session"], k)
        assert f["measured"]["v_prompt"] > 0 and f["measured"]["v_decode"] > 0
        assert len(f["fitted"]) == len(PROMPTS) * len(OUTPUTS)
        held = f["heldout"]["points"]
        assert len(held) == 1 and held[0]["tks_out"] == max(OUTPUTS)
        assert math.isfinite(held[0]["predicted_s"]) and math.isfinite(held[0]["rel_error"])
        assert held[0]["measured_with_load_s"] > held[0]["measured_s"]
        assert len(f["loo"]["points"]) == len(f["fitted"])
    # budgets sharing one decoder are also fitted together (fp32: the derived bundles hard-link the base's decoder)
    fam = [f for f in rep["family_fits"] if f["precisions"] == ["fp32"]]
    assert fam and len(fam[0]["bundles"]) == 4
    assert rep["summary"]["eq4"]["heldout_max_rel_error"] is not None


def test_charts_and_markdown_are_written(sweep):
    out = sweep["out"]
    rep = sweep["report"]
    from edgevlm.bench.report import CHART_FILES

    assert sorted(rep["charts"]) == sorted(CHART_FILES)
    for name in CHART_FILES:
        assert (out / name).read_bytes()[:8] == PNG, name
    md = (out / "report.md").read_text()
    for s in rep["sessions"]:
        assert s["bundle_label"] in md
    assert "Eq. 4" in md and "held-out" in md


def test_derived_budgets_share_the_decoder_file(sweep):
    from edgevlm.bundle import read_bundle

    base = read_bundle(sweep["base"], verify_hashes=False)
    derived = [p for p in sweep["built"].bundles if "fp32" in p.name and p != Path(sweep["base"])]
    assert len(derived) == 3
    for p in derived:
        b = read_bundle(p, verify_hashes=True)                   # hashes still match after linking
        assert b.manifest["derived"]["base_manifest_sha256"] == base.manifest_sha256
        dec = b.component("decoder")["file"]
        assert b.files[dec]["sha256"] == base.files[dec]["sha256"]
        assert os.path.samefile(b.path(dec), base.path(dec))     # a hard link, not a copy
        assert b.files["vision.onnx"]["sha256"] != base.files["vision.onnx"]["sha256"]


def test_quantized_budgets_share_one_quantized_decoder(sweep):
    """int4 with an fp32 vision graph (MobileVLM's latency setup): the base is quantized once; the other budgets link
    its int4 decoder and their own fp32 bundle's vision graph (nothing exported or quantized twice)."""
    from edgevlm.bench.budgets import build_budget_bundles
    from edgevlm.bundle import read_bundle

    out = sweep["built"].bundles[0].parent
    res = build_budget_bundles("tiny-ldpnetv2", out, BUDGETS, precisions="int4,vision=fp32", random_init=True,
                               base_bundle=sweep["base"])
    assert len(res.bundles) == 4
    bs = [read_bundle(p, verify_hashes=True) for p in res.bundles]
    assert {b.visual_tokens for b in bs} == {16, 9, 4, 1}
    qbase = next(b for b in bs if b.visual_tokens == 4)
    for b in bs:
        assert b.component("decoder")["precision"] == "int4" and b.component("vision")["precision"] == "fp32"
        assert os.path.samefile(b.path("decoder.onnx.data"), qbase.path("decoder.onnx.data"))
        if b is not qbase:
            fp32_twin = next(p for p in sweep["built"].bundles if read_bundle(p, verify_hashes=False).visual_tokens
                             == b.visual_tokens and "fp32" in p.name)
            assert os.path.samefile(b.path("vision.onnx"), Path(fp32_twin) / "vision.onnx")


# ---- budgets, workloads ---------------------------------------------------------------------------------------------
def test_budget_configs_of_the_full_size_shape():
    from edgevlm.bench.budgets import budget_config, parse_budgets, parse_precisions
    from edgevlm.config import get_model_config

    base = get_model_config("mobilevlm-v2-1.7b")
    got = {s.label: (c.name, c.projector_type, c.visual_tokens)
           for s in parse_budgets("576,ldp:144,144,64,36") for c in [budget_config(base, s)]}
    assert got == {"576": ("mobilevlm-1.7b-mlp", "mlp2x_gelu", 576), "ldpnet:144": ("mobilevlm-1.7b", "ldpnet", 144),
                   "144": ("mobilevlm-v2-1.7b", "ldpnetv2", 144),
                   "64": ("mobilevlm-v2-1.7b@64", "ldpnetv2", 64), "36": ("mobilevlm-v2-1.7b@36", "ldpnetv2", 36)}
    with pytest.raises(ConfigError, match="square"):
        budget_config(base, parse_budgets("50")[0])
    with pytest.raises(ConfigError, match="projector"):
        parse_budgets("conv:4")
    assert parse_precisions("fp32,int4,vision=fp32") == ["fp32", "int4,vision=fp32"]


def test_prompts_hit_the_exact_text_token_count(sweep):
    from edgevlm.bench.workload import ImageStream, fit_prompt
    from edgevlm.runtime import Session

    s = Session.from_bundle(sweep["base"], threads=1, optimized_cache=None)
    for n in (3, 7, 20, 41):
        prompt, got = fit_prompt(s, n)
        assert got == n
        _, _, length = s.tokenize(prompt, raw_prompt=True)
        assert length - s.visual_tokens == n
    with pytest.raises(PromptError, match="below"):
        fit_prompt(s, 1)
    imgs = ImageStream((30, 20), seed=3)
    arrays = [imgs.next()[0] for _ in range(5)]
    assert arrays[0].shape == (20, 30, 3) and len(set(imgs.tags)) == 5


# ---- Eq. 4 fit on synthetic data ------------------------------------------------------------------------------------
def _points(fn):
    pts = []
    for tin in (40, 100, 200):
        for tout in (8, 32):
            pts.append({"id": f"p{tin}-o{tout}", "tks_in": tin, "tks_out": tout, "total_s": fn(tin, tout),
                        "load_s": 1.5})
    return pts


def test_eq4_fit_recovers_known_rates_and_predicts_held_out_points():
    from edgevlm.bench.fit import fit_eq4

    f = fit_eq4(_points(lambda i, o: i / 400 + o / 20 + 0.7), {"v_prompt": 400.0, "v_decode": 20.0})
    assert f["v_prompt_fit"] == pytest.approx(400) and f["v_decode_fit"] == pytest.approx(20)
    assert f["c_fit_s"] == pytest.approx(0.7)
    assert f["heldout"]["points"][0]["id"] == "p200-o32"
    assert f["heldout"]["max_rel_error"] < 1e-9 and f["heldout"]["passes"]
    assert f["v_prompt_fit_over_measured"] == pytest.approx(1.0)


def test_eq4_fit_fails_on_data_it_cannot_explain():
    from edgevlm.bench.fit import fit_eq4

    # decode slowing down with the context (an Tks_in x Tks_out interaction Eq. 4 does not have): the fit on the
    # smaller configurations under-predicts the largest one
    f = fit_eq4(_points(lambda i, o: i / 400 + o / 20 + i * o / 2000 + 0.1))
    assert f["heldout"]["max_rel_error"] > 0.10 and f["heldout"]["passes"] is False


def test_eq4_fit_names_what_the_sweep_cannot_separate():
    from edgevlm.bench.fit import fit_eq4

    f = fit_eq4([{"id": "a", "tks_in": 50, "tks_out": 8, "total_s": 1.0},
                 {"id": "b", "tks_in": 50, "tks_out": 32, "total_s": 2.0}])
    assert f["v_prompt_fit"] is None and any("Tks_in does not vary" in n for n in f["notes"])


# ---- compare --------------------------------------------------------------------------------------------------------
def _report(decode_tok_s: float, spread: float, total_ms: float = 1000.0) -> dict:
    from edgevlm.bench.report import SCHEMA, SCHEMA_VERSION

    def st(med):
        return {"median": med, "min": med * (1 - spread / 2), "max": med * (1 + spread / 2), "spread": spread, "n": 3}

    cfg = {"id": "S1-p16-o16", "model": "m", "visual_tokens": 144, "precision": "int4", "threads": 2,
           "backend": "ort-cpu", "text_tokens": 16, "output_tokens": 16, "load_s": 2.0,
           "stats": {"total_ms": st(total_ms), "vision_ms": st(300.0), "prefill_tok_s": st(100.0),
                     "decode_tok_s": st(decode_tok_s)}}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "configurations": [cfg]}


def _write(tmp_path, name, rep) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(rep))
    return str(p)


def test_compare_flags_a_regression_beyond_the_spread(tmp_path, capsys):
    from edgevlm.cli import main

    a = _write(tmp_path, "a.json", _report(decode_tok_s=20.0, spread=0.04))
    b = _write(tmp_path, "b.json", _report(decode_tok_s=16.0, spread=0.05))           # 20% slower decode
    assert main(["bench", "--compare", a, b]) == 1
    out = capsys.readouterr()
    assert "decode_tok_s" in out.out and "REGRESSION" in out.out and "decode_tok_s" in out.err
    assert main(["bench", "--compare", a, b, "--no-fail-on-regression"]) == 0


def test_compare_within_the_spread_passes(tmp_path, capsys):
    from edgevlm.bench.compare import compare_reports
    from edgevlm.cli import main

    a = _write(tmp_path, "a.json", _report(decode_tok_s=20.0, spread=0.10))
    b = _write(tmp_path, "b.json", _report(decode_tok_s=18.5, spread=0.10, total_ms=1040.0))   # -7.5%, +4%: noise
    assert main(["bench", "--compare", a, b]) == 0
    assert "regressions: 0" in capsys.readouterr().out
    res = compare_reports(json.loads(Path(a).read_text()), json.loads(Path(b).read_text()))
    assert res["matched"] == 1 and not res["regressions"]
    # an improvement beyond the spread is reported, not flagged
    c = _write(tmp_path, "c.json", _report(decode_tok_s=30.0, spread=0.05))
    assert main(["bench", "--compare", a, c]) == 0
    assert "improvement" in capsys.readouterr().out


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    from edgevlm.cli import main

    a = _write(tmp_path, "a.json", _report(20.0, 0.05))
    bad = _write(tmp_path, "bad.json", {"hello": 1})
    assert main(["bench", "--compare", a, bad]) == 2
    assert "not an edgevlm bench report" in capsys.readouterr().err


# ---- CLI + isolation + torch-free -----------------------------------------------------------------------------------
def test_cli_runs_an_isolated_session(sweep, tmp_path, capsys):
    """The default path: each session in its own worker process; the report lands in --out."""
    from edgevlm.cli import main

    rc = main(["bench", str(sweep["base"]), "--prompt-tokens", "5", "--output-tokens", "2", "4", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "o"), "--no-charts", "--no-roofline",
               "--cache-dir", str(tmp_path / "cache"), "--backend", "ort", "auto", "ort-cuda"])
    assert rc == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [s["backend"] for s in rep["sessions"]] == ["ort", "auto"]
    for s in rep["sessions"]:
        assert "error" not in s and s["pid"] != os.getpid() and s["first_load_s"] > 0 and s["load_s"] > 0
        assert s["decoder_backend"] == "onnxruntime-cpu"              # fp32: no native plan, no engines
    assert len(rep["configurations"]) == 4 and rep["command"].startswith("edgevlm bench")
    assert rep["backend_agreement"][0]["identical"] and [k["backend"] for k in rep["skipped"]] == ["ort-cuda"]
    out = capsys.readouterr().out                      # a table, the Eq. 4 verdict and the report's paths; no JSON
    assert "Eq. 4 fit:" in out and "report: " in out and not any(ln.lstrip().startswith("{")
                                                                 for ln in out.splitlines())
    assert "greedy tokens ort / auto" in out and "identical" in out and "note: backend ort-cuda skipped" in out


def test_bench_modules_do_not_import_torch():
    code = ("import sys\n"
            "import edgevlm.bench.env, edgevlm.bench.workload, edgevlm.bench.sweep, edgevlm.bench.fit\n"
            "import edgevlm.bench.report, edgevlm.bench.compare, edgevlm.bench.budgets, edgevlm.cli.bench\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "from edgevlm.bench.env import environment\n"
            "env = environment(threads=1)\n"
            "assert 'torch' not in env['versions'] and 'torch' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# ---- backends: one sweep compares the backends of one bundle ---------------------------------------------------------
def _native_bundle(sweep) -> Path:
    """An int4 bundle of the sweep (it carries a native_decode plan)."""
    for p in sweep["built"].bundles:
        m = json.loads((Path(p) / "manifest.json").read_text())
        if "native_decode" in m["components"]["decoder"]:
            return Path(p)
    pytest.skip("no bundle of the sweep carries a native_decode plan")


def _backend_sweep(bundles, backends):
    from edgevlm.bench.report import build_report
    from edgevlm.bench.sweep import SweepSpec, run_sweep

    spec = SweepSpec(bundles=[str(b) for b in bundles], prompt_tokens=[6], output_tokens=[4], threads=[1], warmup=0,
                     repeats=2, backends=backends, isolate=False, cache=None, prime=False)
    raw = run_sweep(spec)
    return raw, build_report(raw, spec, command="pytest")


def test_sweep_compares_backends_with_identical_greedy_tokens(sweep, tmp_path):
    """ORT and the native kernel (and auto) on one int4 bundle: one session per backend, rows labelled by backend
    and by what ran vision / the decoder, same images, identical greedy tokens request by request."""
    from edgevlm.bench.report import markdown
    from edgevlm.runtime.native import availability

    if availability() is not None:
        pytest.skip(f"native kernel unavailable here: {availability()}")
    bundle = _native_bundle(sweep)
    raw, rep = _backend_sweep([bundle], ["ort", "native", "auto"])
    assert [s["backend"] for s in rep["sessions"]] == ["ort", "native", "auto"]
    assert all("error" not in s for s in rep["sessions"]), [s.get("error") for s in rep["sessions"]]
    by = {s["backend"]: s for s in rep["sessions"]}
    assert by["ort"]["decoder_backend"] == "onnxruntime-cpu" and by["native"]["decoder_backend"] == "native"
    assert by["auto"]["decoder_backend"] == "native"                # no engines here: auto picks native
    assert all(s["vision_backend"] == "onnxruntime-cpu" for s in rep["sessions"])
    rows = {r["backend"]: r for r in rep["summary"]["rows"]}
    assert set(rows) == {"ort", "native", "auto"} and rows["native"]["decoder_backend"] == "native"
    tokens = {c["backend"]: [(r["image"], r["tokens"]) for r in c["requests"]] for c in rep["configurations"]}
    assert tokens["ort"] == tokens["native"] == tokens["auto"] and len(tokens["ort"]) == 2
    (agree,) = rep["backend_agreement"]
    assert agree["identical"] and agree["requests_compared"] == 2 and agree["backends"] == ["ort", "native", "auto"]
    md = markdown(rep)
    assert "native (onnxruntime-cpu / native)" in md and "ort (onnxruntime-cpu / onnxruntime-cpu)" in md
    assert "identical over 2 requests" in md


def test_unavailable_backends_are_skipped_with_the_reason(sweep, tmp_path, monkeypatch):
    """No CUDA provider, no tensorrt package, a bundle without a native plan: skipped with the reason, not failed."""
    import importlib.abc

    class NoTensorrt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorrt":
                raise ImportError("No module named 'tensorrt' (blocked by the test)")
            return None

    for mod in [m for m in sys.modules if m.split(".")[0] == "tensorrt"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [NoTensorrt(), *sys.meta_path])
    raw, rep = _backend_sweep([sweep["base"]], ["ort", "ort-cuda", "tensorrt", "native"])
    assert [s["backend"] for s in rep["sessions"]] == ["ort"] and "error" not in rep["sessions"][0]
    skipped = {k["backend"]: k for k in rep["skipped"]}
    assert set(skipped) == {"ort-cuda", "tensorrt", "native"}
    assert "CUDAExecutionProvider" in skipped["ort-cuda"]["reason"]
    assert "tensorrt" in skipped["tensorrt"]["reason"]
    assert "native" in skipped["native"]["reason"]                  # no plan in an fp32 bundle (or no kernel here)
    assert sum("skipped" in n for n in rep["notes"]) == 3
    with pytest.raises(ConfigError, match="none of the requested backends"):
        _backend_sweep([sweep["base"]], ["ort-cuda"])
    with pytest.raises(ConfigError, match="unknown"):
        _backend_sweep([sweep["base"]], ["onnx"])
    from edgevlm.bench.sweep import SweepSpec

    spec = SweepSpec(bundles=["b"], backends=["ort-cpu", "auto"])   # the older name = auto on a CPU
    spec.validate()
    assert spec.backends == ["auto"]


def test_sweep_runs_tensorrt_engines_and_auto_picks_them(tmp_path_factory, monkeypatch):
    """A bundle for a TensorRT target with (fake) engines registered: ort, tensorrt and auto in one sweep; tensorrt
    and auto run vision and decoder on the engines with ORT's greedy tokens; native (no plan: fp32) is skipped."""
    pytest.importorskip("onnx")
    from edgevlm.pipeline import export_bundle
    from tests.fake_tensorrt import install_fake_tensorrt

    out = tmp_path_factory.mktemp("bench_trt") / "tiny-orin"
    bundle = export_bundle("tiny-ldpnetv2", out, random_init=True, target="jetson-orin-nano-8gb", precision="fp32",
                           parity=False)
    root = install_fake_tensorrt(monkeypatch, bundle)
    raw, rep = _backend_sweep([root], ["ort", "tensorrt", "auto", "native"])
    assert all("error" not in s for s in rep["sessions"]), [s.get("error") for s in rep["sessions"]]
    by = {s["backend"]: s for s in rep["sessions"]}
    assert set(by) == {"ort", "tensorrt", "auto"}
    assert (by["ort"]["vision_backend"], by["ort"]["decoder_backend"]) == ("onnxruntime-cpu", "onnxruntime-cpu")
    for name in ("tensorrt", "auto"):
        assert (by[name]["vision_backend"], by[name]["decoder_backend"]) == ("tensorrt", "tensorrt"), name
    (agree,) = rep["backend_agreement"]
    assert agree["identical"] and agree["requests_compared"] == 2, agree
    assert [k["backend"] for k in rep["skipped"]] == ["native"]
