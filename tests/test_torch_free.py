"""The device side never needs torch: ``import edgevlm.runtime`` leaves torch (and transformers, onnx) out of
``sys.modules``, and ``edgevlm run`` answers in an interpreter where importing them raises ImportError (a meta-path
finder blocks them, as on a device install without the export extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fixtures_bundles import QUESTION, tiny_bundle, write_png

HEAVY = ("torch", "transformers", "onnx", "onnxscript", "safetensors")

BLOCKER = textwrap.dedent(f"""
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        blocked = {HEAVY!r}
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{{name}} is not installed (blocked by test_torch_free)")
            return None
    sys.meta_path.insert(0, _Block())
""")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "EDGEVLM_CACHE": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _loaded_heavy(modules) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_import_runtime_leaves_torch_out(tmp_path):
    code = textwrap.dedent("""
        import sys, json
        import edgevlm.runtime
        from edgevlm.runtime import Session, SamplingParams, BackendOptions
        import edgevlm.runtime.session, edgevlm.runtime.backends, edgevlm.runtime.kv_cache
        import edgevlm.runtime.sampling, edgevlm.runtime.timings, edgevlm.cli.run, edgevlm.bundle
        import edgevlm.runtime.native, edgevlm.runtime.native.engine, edgevlm.runtime.native.build
        print(json.dumps(sorted(sys.modules)))
    """)
    p = _run(code, tmp_path)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert _loaded_heavy(loaded) == [], _loaded_heavy(loaded)


def test_blocker_really_blocks(tmp_path):
    """Guard for the test below: the finder must make ``import torch`` fail in the child."""
    p = _run(BLOCKER + "\nimport torch\n", tmp_path)
    assert p.returncode != 0 and "blocked by test_torch_free" in p.stderr


def test_session_runs_without_torch(tmp_path_factory, tmp_path):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    img = write_png(tmp_path / "img.png")
    code = BLOCKER + textwrap.dedent(f"""
        import json, sys
        from edgevlm.runtime import Session
        s = Session.from_bundle({str(path)!r}, threads=1)
        r = s.generate({str(img)!r}, {QUESTION!r}, max_new_tokens=5)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"tokens": r.tokens, "heavy": heavy, "total_ms": r.timings.total_ms}}))
    """)
    p = _run(code, tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["tokens"] and out["heavy"] == [] and out["total_ms"] > 0


@pytest.mark.parametrize("extra", [[], ["--json-output"], ["--stream"]])
def test_cli_run_without_torch(tmp_path_factory, tmp_path, extra):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    img = write_png(tmp_path / "img.png")
    argv = ["run", str(path), "--image", str(img), "--prompt", QUESTION, "--max-new-tokens", "6", "--threads", "1",
            *extra]
    code = BLOCKER + f"\nfrom edgevlm.cli import main\nsys.exit(main({argv!r}))\n"
    p = _run(code, tmp_path)
    assert p.returncode == 0, f"edgevlm run failed without torch:\n{p.stderr[-3000:]}"
    if "--json-output" in extra:
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["tokens"] and out["timings"]["prefill_tok_s"] > 0 and out["model"] == "tiny-ldpnetv2"
    else:
        assert "Eq. 4" in p.stdout and "Tks_in / v_prompt" in p.stdout and "measured" in p.stdout
        assert "tokens]" in p.stdout
