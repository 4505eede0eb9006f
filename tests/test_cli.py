"""The ``edgevlm`` command: help, models table, typed errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgevlm.cli import build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = _run("--help")
    assert r.returncode == 0
    assert "models" in r.stdout


def test_every_command_has_help_text():
    parser, commands = build_parser()
    assert "models" in commands
    for name in commands:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0


def test_models_table_and_json():
    r = _run("models")
    assert r.returncode == 0
    for name in ("mobilevlm-1.7b", "mobilevlm-v2-7b", "tiny-ldpnet", "demo"):
        assert name in r.stdout
    rows = json.loads(_run("models", "--json-output").stdout)
    v1 = next(r for r in rows if r["name"] == "mobilevlm-1.7b")
    assert v1["params_projector"] == 18_936_832 and v1["visual_tokens"] == 144 and v1["image_size"] == 336


def test_cli_does_not_import_torch_for_models():
    code = ("import sys; from edgevlm.cli import main; main(['models', '--json-output']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_edgevlm_error_is_printed_without_traceback(capsys):
    from edgevlm.cli import models as models_module

    def boom(json_output: bool = False) -> None:
        """Raise a typed error."""
        from edgevlm.config import get_model_config

        get_model_config("nope")

    old = models_module.COMMANDS["models"]
    models_module.COMMANDS["models"] = boom
    try:
        rc = main(["models"])
    finally:
        models_module.COMMANDS["models"] = old
    err = capsys.readouterr().err
    assert rc == 2 and "error: model 'nope' unknown; known:" in err and "Traceback" not in err


def test_engine_verbs_and_dla_flag_are_registered():
    parser, commands = build_parser()
    assert {"build-engine", "register-engines", "verify", "export"} <= set(commands)
    args = parser.parse_args(["register-engines", "b", "--tensorrt", "10.3.0"])
    assert (args.bundle, args.tensorrt, args.validate) == ("b", "10.3.0", True)
    args = parser.parse_args(["export", "--model", "tiny-ldpnet", "--random-init", "--target", "jetson-orin", "--dla"])
    assert args.dla is True
    assert parser.parse_args(["export", "--model", "tiny-ldpnet", "--random-init"]).dla is False   # GPU by default


def test_export_refuses_dla_before_exporting(tmp_path, capsys):
    """--dla needs a DLA core and an fp16/int8 vision graph: a typed error (exit 2) before any work."""
    out = tmp_path / "b"
    assert main(["export", "--model", "tiny-ldpnet", "--random-init", "--target", "jetson-orin-nano-8gb",
                 "--precision", "fp16", "--dla", "--out", str(out)]) == 2
    assert "no DLA core" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-ldpnet", "--random-init", "--target", "jetson-orin", "--precision",
                 "fp32", "--dla", "--out", str(out)]) == 2
    assert "DLA runs only fp16 and int8" in capsys.readouterr().err and not out.exists()
