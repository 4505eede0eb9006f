"""What the CLI verbs print for a user: readable when piped (no escape codes, no wrapped or cut rows), error messages
that name the problem and the fix, help text generated from the registries, the bench's Eq. 4 verdict without stray
JSON, charts whose legends match what is drawn, and one ``--spinning`` default. Tiny bundles; seconds each."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from edgevlm.cli import main
from edgevlm.errors import ImageError, PromptError
from tests.fixtures_bundles import tiny_bundle, write_png

ANSI = re.compile(r"\x1b\[")
# rich decides colour and width from these; a developer's shell or CI may set them
RICH_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "JUPYTER_COLUMNS")


@pytest.fixture(autouse=True)
def _piped_env(monkeypatch):
    for name in RICH_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _line_with(out: str, *parts: str) -> str | None:
    """The first output line that holds every one of ``parts`` (a row that was not wrapped or cut)."""
    return next((line for line in out.splitlines() if all(p in line for p in parts)), None)


def _piped(out: str) -> None:
    assert not ANSI.search(out), "escape codes in piped output"
    assert "…" not in out, "a cell was cut with an ellipsis"


# ---- 1. an image path that is a directory ---------------------------------------------------------------------------
def test_image_directory_is_named_as_a_directory(tmp_path):
    from edgevlm.preprocess import load_image

    write_png(tmp_path / "cat.png")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    msg = str(e.value)
    assert f"'{tmp_path}' is a directory" in msg and "pass an image file" in msg
    assert str(tmp_path / "cat.png") in msg                  # an example from inside the directory
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_run_with_an_image_directory_says_so(bundle, tmp_path, capsys):
    rc, out, err = _cli(capsys, "run", bundle, "--image", tmp_path, "--prompt", "What color is it?")
    assert rc == 2 and not out
    assert f"image path '{tmp_path}' is a directory" in err and "pass an image file" in err
    assert "does not exist" not in err


# ---- 2. the prompt-length message counts --max-new-tokens -----------------------------------------------------------
PROMPT_MSG = re.compile(r"prompt is (\d+) tokens \((\d+) visual \+ (\d+) text\) \+ (\d+) new tokens requested "
                        r"\(--max-new-tokens\) = (\d+), but the context holds (\d+); (.*)")


def _check_arithmetic(msg: str, new_tokens: int) -> tuple[int, int]:
    m = PROMPT_MSG.search(msg)
    assert m, msg
    length, visual, text, new, total, ctx = (int(g) for g in m.groups()[:6])
    assert length == visual + text and new == new_tokens and total == length + new and total > ctx
    fix = m.group(7)
    assert "shorten the prompt" in fix and "--max-new-tokens" in fix
    assert f"shorten the prompt by {total - ctx} tokens" in fix            # the whole request then fits
    return length, ctx


def test_prompt_message_adds_up_with_max_new_tokens():
    from edgevlm.prompt import IMAGE_TOKEN_INDEX, check_prompt_ids

    ids = [1, IMAGE_TOKEN_INDEX] + [5] * 300                   # 4 visual + 301 text (BOS included) = 305 > 256
    with pytest.raises(PromptError) as e:
        check_prompt_ids(ids, visual_tokens=4, context_length=256, max_new_tokens=32)
    length, ctx = _check_arithmetic(str(e.value), 32)
    assert (length, ctx) == (305, 256)
    assert "at least 49 and lower --max-new-tokens" in str(e.value)   # the prompt alone is 49 over
    # a prompt that fits is not an error even when the answer may not (it stops when the context is full)
    assert check_prompt_ids([1, IMAGE_TOKEN_INDEX] + [5] * 200, 4, 256, max_new_tokens=128) == 205


def test_run_prompt_too_long_names_the_requested_new_tokens(bundle, tmp_path, capsys):
    img = write_png(tmp_path / "img.png")
    rc, out, err = _cli(capsys, "run", bundle, "--image", img, "--prompt", "red " * 400, "--max-new-tokens", "7",
                        "--threads", "1")
    assert rc == 2 and err.startswith("error: ")
    _check_arithmetic(err, 7)


# ---- 3. readable when piped ----------------------------------------------------------------------------------------
def test_targets_piped_one_line_per_target(capsys):
    from edgevlm.targets import get_target, target_aliases, target_names

    rc, out, _ = _cli(capsys, "targets")
    assert rc == 0
    _piped(out)
    for name in target_names():
        t = get_target(name)
        row = _line_with(out, f" {name} ", " ".join(t.precisions), f" {t.default_recipe} ", f" {t.max_context}")
        assert row, f"no unwrapped row for {name}:\n{out}"
        for alias, target in target_aliases().items():
            if target == name:
                assert alias in row


def test_run_piped_tables_are_not_wrapped(bundle, tmp_path, capsys):
    img = write_png(tmp_path / "img.png")
    rc, out, _ = _cli(capsys, "run", bundle, "--image", img, "--prompt", "What color is the circle?",
                      "--max-new-tokens", "3", "--threads", "1")
    assert rc == 0
    _piped(out)
    assert _line_with(out, "Eq. 4: total ≈ load + Tks_in / v_prompt", "/ v_decode + others")
    assert _line_with(out, "decode", "steps,", "tok/s, p50", "ms per token")
    assert _line_with(out, "load breakdown:", "read_bundle_s", "optimized-graph cache", "sha256")


def test_inspect_piped_rows_are_not_wrapped(bundle, capsys):
    from edgevlm.bundle import read_bundle

    rc, out, _ = _cli(capsys, "inspect", bundle)
    assert rc == 0
    _piped(out)
    llm = read_bundle(bundle, verify_hashes=False).model_config.llm
    assert _line_with(out, f"{llm.name}: {llm.hidden_size} x {llm.num_layers} layers", f"vocab {llm.vocab_size}",
                      "context")
    assert _line_with(out, "total", "files;", "sha256 of every file verified")


def test_verify_piped_rows_are_not_wrapped(bundle, capsys):
    rc, out, _ = _cli(capsys, "verify", bundle, "--samples", "1")
    assert rc == 0
    _piped(out)
    assert _line_with(out, "onnx:vision", "PASS", "match the manifest (names, dtypes, dims)")
    assert _line_with(out, "PASSED", "passed,", "failed;")


def test_build_engine_piped_row_is_not_wrapped(monkeypatch, capsys):
    import edgevlm.cli.engine as engine_cli

    meta = {"file": "engines/decoder.engine", "bytes": 734 * 2**20, "build_s": 412.0, "tensorrt": "10.3.0.30",
            "device": "NVIDIA Jetson AGX Orin 32GB", "compute_capability": "8.7",
            "profiles": [{"name": "prefill"}, {"name": "decode"}]}
    monkeypatch.setattr(engine_cli, "build_bundle_engines", lambda bundle, **kw: (None, {"decoder": meta}))
    rc, out, _ = _cli(capsys, "build-engine", "some/bundle-orin")
    assert rc == 0
    _piped(out)
    assert _line_with(out, "decoder", "engines/decoder.engine", "734.0", "412", "10.3.0.30",
                      "NVIDIA Jetson AGX Orin 32GB (SM 8.7)", "prefill, decode")
    assert _line_with(out, "recorded in", "tensorrt.engines", "edgevlm verify some/bundle-orin")


def test_print_rows_widens_a_piped_console_to_the_table():
    from rich.table import Table

    from edgevlm.console import PIPED_WIDTH, make_console, print_rows

    buf = io.StringIO()
    console = make_console(file=buf)
    assert console.width == PIPED_WIDTH and not console.is_terminal
    table = Table()
    for col in "abc":
        table.add_column(col)
    table.add_row("A" * 90, "B" * 90, "C" * 90)
    print_rows(console, table)
    assert _line_with(buf.getvalue(), "A" * 90, "B" * 90, "C" * 90)
    assert console.width == PIPED_WIDTH                          # restored afterwards


# ---- 4. --precision help generated from the registry ---------------------------------------------------------------
@pytest.mark.parametrize("verb", ["export", "plan"])
def test_precision_help_says_what_each_preset_does(verb, capsys):
    from edgevlm.targets import PRECISION_PRESETS

    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = {"vision": "vision", "embedding": "embedding", "decoder": "decoder", "lm_head": "LM head"}
    assert "int4 = int8 vision + fp16 embedding + int4 decoder + int8 LM head" in text
    for preset, comps in PRECISION_PRESETS.items():
        if len(set(comps.values())) == 1:
            assert f"{preset} = {next(iter(comps.values()))} everywhere" in text
        else:
            assert f"{preset} = " + " + ".join(f"{p} {names[c]}" for c, p in comps.items()) in text
    if verb == "export":
        assert "int8 / int4 come with quantization" not in text and "quantized" in text


# ---- 5. inspect names the registry model -----------------------------------------------------------------------------
def test_inspect_names_the_registry_model(bundle, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "inspect", bundle, "--no-verify")
    assert rc == 0
    header = out.split("\nmodel")[0]                              # the "bundle" section, before the model section
    assert _line_with(header, "model", "tiny-ldpnetv2 (registry model, random init)")

    renamed = tmp_path / "renamed"
    shutil.copytree(bundle, renamed)
    mpath = renamed / "manifest.json"
    m = json.loads(mpath.read_text())
    m["model"]["name"] = "my-finetune"
    mpath.write_text(json.dumps(m))
    rc, out, _ = _cli(capsys, "inspect", renamed, "--no-verify")
    assert rc == 0
    assert _line_with(out, "my-finetune (not a registry name; architecture of tiny-ldpnetv2")


# ---- 6 + 7. bench: the Eq. 4 verdict, no stray JSON ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(bundle, tmp_path_factory):
    """One tiny in-process bench through the CLI entry point, stdout captured (not a TTY)."""
    out_dir = tmp_path_factory.mktemp("bench_out")
    buf, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        for name in RICH_ENV:                                     # module scope: the autouse fixture is per test
            mp.delenv(name, raising=False)
        rc = main(["bench", str(bundle), "--prompt-tokens", "5", "9", "--output-tokens", "2", "4", "--repeats", "1",
                   "--warmup", "0", "--threads", "1", "--no-isolate", "--no-charts", "--no-roofline",
                   "--out", str(out_dir)])
    return {"rc": rc, "out": buf.getvalue(), "report": json.loads((out_dir / "report.json").read_text())}


def test_bench_prints_the_eq4_verdict(bench_run):
    from edgevlm.bench.report import eq4_verdict

    assert bench_run["rc"] == 0
    verdict = eq4_verdict(bench_run["report"])
    assert verdict in bench_run["out"]
    first, second = verdict.splitlines()
    assert first.startswith("Eq. 4 fit: ") and any(w in first for w in ("PASS", "FAIL"))
    assert "held-out" in first and "bar 10%" in first
    assert "v_prompt" in second and "v_decode" in second


def test_bench_prints_no_json_line(bench_run):
    out = bench_run["out"]
    _piped(out)
    for line in out.splitlines():
        s = line.strip()
        if s.startswith(("{", "[")):
            with pytest.raises(ValueError):
                json.loads(s)
    assert _line_with(out, "report:", "report.json", "report.md")


def _summary_report(errs: list[float | None], rates: list[tuple[float | None, float | None]],
                    family: float | None = None) -> dict:
    held = [e for e in errs if e is not None]
    rows = [{"session": f"S{i + 1}", "bundle_label": "x", "eq4_heldout_rel_error": e, "v_prompt_fit": vp,
             "v_decode_fit": vd, "prefill_tok_s": 140.0, "decode_tok_s": 21.5} for i, (e, (vp, vd))
            in enumerate(zip(errs, rates))]
    rep = {"summary": {"rows": rows, "eq4": {"heldout_max_rel_error": max(held) if held else None,
                                             "tolerance": 0.10, "passes": (max(held) <= 0.10) if held else None}},
           "family_fits": []}
    if family is not None:
        rep["family_fits"] = [{"leave_one_bundle_out": {"max_rel_error": family}}]
    return rep


def test_eq4_verdict_text():
    from edgevlm.bench.report import eq4_verdict

    one = eq4_verdict(_summary_report([0.035], [(101.4, 4.42)]))
    assert one == ("Eq. 4 fit: PASS, predicts the held-out configuration (largest Tks_in x Tks_out) within 3.5% "
                   "(bar 10%)\n  fitted v_prompt 101 tok/s (measured 140 tok/s), v_decode 4.42 tok/s (measured "
                   "21.5 tok/s); 1 session")
    many = eq4_verdict(_summary_report([0.04, 0.12], [(101.0, 4.4), (124.0, 17.6)], family=0.31))
    assert many.startswith("Eq. 4 fit: FAIL, predicts each session's held-out configuration")
    assert "only within 12.0% (bar 10%)" in many
    assert "fitted v_prompt 101-124 tok/s, v_decode 4.40-17.6 tok/s over 2 sessions" in many
    assert "leave-one-budget-out max error 31.0%" in many
    na = eq4_verdict(_summary_report([None], [(None, None)]))
    assert na.startswith("Eq. 4 fit: n/a, too few configurations") and "v_prompt n/a" in na


# ---- 8. charts draw what their legends promise ---------------------------------------------------------------------
def _stats(**medians: float | None) -> dict:
    return {k: {"median": v} for k, v in medians.items()}


def _chart_report(bounds: dict[str, list[float | None]] | None) -> dict:
    configs = []
    for precision, decode in (("fp32", [5.0, 4.8, 4.6]), ("int4", [20.0, 18.0, 16.0])):
        for i, (p, o) in enumerate([(16, 4), (64, 4), (64, 16)]):
            bound = None if bounds is None else bounds[precision][i]
            configs.append({
                "id": f"{precision}-{i}", "session": f"S-{precision}", "precision": precision, "threads": 2,
                "backend": "ort-cpu", "text_tokens": p, "output_tokens": o, "prompt_tokens": 144 + p,
                "stats": _stats(prefill_tok_s=120.0 + i, decode_tok_s=decode[i]),
                "roofline": {} if bound is None and bounds is None else {"decode_bound_tok_s": bound}})
    return {"configurations": configs}


def _finite_xy(line) -> bool:
    xs, ys = line.get_xdata(), line.get_ydata()
    return len(ys) > 0 and all(math.isfinite(float(v)) for v in list(xs) + list(ys))


def test_throughput_chart_legend_matches_the_drawn_roofline():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from edgevlm.bench.report import throughput_figure

    # fp32: one configuration without a bound, one NaN; int4: all bounds present
    fig = throughput_figure(_chart_report({"fp32": [6.0, None, float("nan")], "int4": [38.0, 36.0, 35.0]}))
    try:
        _, decode_ax = fig.axes
        lines = {ln.get_label(): ln for ln in decode_ax.get_lines()}
        legend = [t.get_text() for t in decode_ax.get_legend().get_texts()]
        for label in legend:                                       # every legend entry is drawn, with finite data
            assert label in lines and _finite_xy(lines[label]), label
        assert {"fp32 t2 bandwidth bound", "int4 t2 bandwidth bound"} <= set(legend)
        assert list(lines["fp32 t2 bandwidth bound"].get_ydata()) == [6.0]      # the finite bound only
        assert len(lines["int4 t2 bandwidth bound"].get_ydata()) == 3
        for group in ("fp32 t2", "int4 t2"):                       # a bound wears its group's colour and marker
            assert lines[f"{group} bandwidth bound"].get_color() == lines[group].get_color()
            assert lines[f"{group} bandwidth bound"].get_marker() == lines[group].get_marker()
            assert lines[f"{group} bandwidth bound"].get_markerfacecolor() == "none"
        prefill_ax = fig.axes[0]                                   # the same group, the same colour in both panels
        pre = {ln.get_label(): ln.get_color() for ln in prefill_ax.get_lines()}
        assert pre["int4 t2"] == lines["int4 t2"].get_color()
        assert "hollow" in decode_ax.get_title()
        ymax = decode_ax.get_ylim()[1]
        assert all(y <= ymax for y in lines["int4 t2 bandwidth bound"].get_ydata())   # on the axes
    finally:
        plt.close(fig)


def test_throughput_chart_without_roofline_promises_none():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from edgevlm.bench.report import throughput_figure

    fig = throughput_figure(_chart_report(None))
    try:
        decode_ax = fig.axes[1]
        legend = [t.get_text() for t in decode_ax.get_legend().get_texts()]
        assert legend == ["fp32 t2", "int4 t2"]
        assert "hollow" not in decode_ax.get_title() and "no roofline" in decode_ax.get_title()
        assert all(_finite_xy(ln) for ln in decode_ax.get_lines())
    finally:
        plt.close(fig)


# ---- 9. one --spinning default ---------------------------------------------------------------------------------------
def test_run_and_bench_share_the_spinning_default(capsys):
    from edgevlm.bench.sweep import SweepSpec
    from edgevlm.cli.bench import bench
    from edgevlm.cli.run import run
    from edgevlm.runtime.session import Session

    defaults = {"run": inspect.signature(run).parameters["spinning"].default,
                "bench": inspect.signature(bench).parameters["spinning"].default,
                "Session.from_bundle": inspect.signature(Session.from_bundle).parameters["spinning"].default,
                "SweepSpec": SweepSpec.__dataclass_fields__["spinning"].default}
    assert len(set(defaults.values())) == 1, defaults
    assert defaults["run"] is False                    # robust under contention (docs/runtime.md)
    for verb in ("run", "bench"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--spinning, --no-spinning" in text and "off by default" in text
