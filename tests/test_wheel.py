"""The device install is real: a wheel built from the repository (not an editable install) carries everything the
device side reads, and runs ``edgevlm targets``, ``plan`` and ``run`` with torch blocked.

The wheel is built from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``: no network, no stale
``build/`` of a concurrent build), installed with ``pip install --no-deps --target``, and run by an interpreter started
with ``-S`` (no site: the editable install's finder is not loaded) whose path is the install folder + the venv's
site-packages (numpy, onnxruntime, tokenizers), from a working directory outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from fixtures_bundles import QUESTION, tiny_bundle, write_png

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxscript", "safetensors")

# a meta-path finder that makes the heavy packages unimportable, then `python -m edgevlm ARGS`
PRELUDE = textwrap.dedent(f"""
    import sys, importlib.abc, runpy
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"{{name}} is not installed (blocked by test_wheel)")
            return None
    sys.meta_path.insert(0, _Block())
    import edgevlm
    print("EDGEVLM_FILE=" + edgevlm.__file__, file=sys.stderr)
    sys.argv = ["edgevlm", *sys.argv[1:]]
    runpy.run_module("edgevlm", run_name="__main__", alter_sys=True)
""")


def _pip(*args: str, cwd: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"})
    assert p.returncode == 0, f"pip {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, install_dir)``: the repository's wheel, installed into a bare folder."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (f"setuptools {setuptools.__version__} cannot build this pyproject.toml without build "
                         f"isolation; install the dev extra (pip install -e '.[dev]': setuptools>=77)")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build", "dist")
    for name in ("edgevlm", "export", "calibration"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _pip("wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), cwd=src)
    (wheel,) = sorted((root / "dist").glob("edgevlm-*.whl"))
    target = root / "site"
    _pip("install", "--no-deps", "--target", str(target), "-q", str(wheel), cwd=root)
    return wheel, target


def _env(target: Path, cache: Path) -> dict[str, str]:
    """The install folder first, then the venv's site-packages (the dependencies); run with ``python -S``."""
    paths = [str(target)] + list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=os.pathsep.join(paths), EDGEVLM_CACHE=str(cache), COLUMNS="200")
    return env


def _edgevlm(target: Path, *argv: str, cwd: Path, cache: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**_env(target, cache), **extra_env}
    p = subprocess.run([sys.executable, "-S", "-c", PRELUDE, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    origin = [line for line in p.stderr.splitlines() if line.startswith("EDGEVLM_FILE=")]
    assert origin and Path(origin[0].split("=", 1)[1]).is_relative_to(target), \
        f"edgevlm was not imported from the wheel's install folder {target}:\n{p.stderr[-3000:]}"
    return p


def test_package_list_covers_the_tree():
    """pyproject lists the packages explicitly (two are mapped data folders): every package in the tree is listed."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "edgevlm").rglob("__init__.py")
            if "__pycache__" not in p.parts}
    assert tree - listed == set(), f"packages missing from pyproject.toml [tool.setuptools] packages: {tree - listed}"
    mapped = conf["package-dir"]
    assert listed - tree == set(mapped), listed - tree
    assert all((REPO / folder).is_dir() for folder in mapped.values())


def test_wheel_carries_the_device_data(installed, tmp_path):
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    targets = sorted(p.name for p in (REPO / "export" / "targets").glob("*.toml"))
    assert targets and all(f"edgevlm/_data/targets/{n}" in names for n in targets), sorted(names)
    assert "edgevlm/_data/calibration/embedded.toml" in names
    for c in sorted((REPO / "edgevlm" / "runtime" / "native").glob("*.c")):
        assert f"edgevlm/runtime/native/{c.name}" in names
    # the installed package finds its own copies (not the source tree's)
    code = textwrap.dedent("""
        from edgevlm.targets import TARGETS_DIR
        from edgevlm.resources import data_dir
        from edgevlm.runtime.native import build
        print(TARGETS_DIR); print(data_dir("calibration")); print(build.SOURCE)
    """)
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=_env(target, tmp_path / "cache"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for line in p.stdout.split():
        assert Path(line).is_relative_to(target) and Path(line).exists(), p.stdout


def _variants_here() -> list[str]:
    """The prebuilt kernel variants a wheel built on this machine carries (setup.py; none without a compiler)."""
    from edgevlm.runtime.native import build, variants

    if build._machine() is None or build.find_compiler() is None:
        return []
    return [v.filename for v in variants.variants_for(build.platform.machine())]


def test_wheel_carries_the_prebuilt_kernel_and_loads_it_without_compiling(installed, tmp_path):
    """The wheel is a platform wheel with one native-kernel library per variant for this machine, and the installed
    package loads the one this CPU runs with no compiler at all (CC points nowhere, on-demand builds refused)."""
    from edgevlm.runtime.native import availability

    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("edgevlm/runtime/native/") and
                     n.endswith(".so"))
    assert shipped == sorted(_variants_here()), shipped
    if not shipped:
        pytest.skip("no C compiler here: the wheel carries no prebuilt kernel (checked that it has none)")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    if availability() is not None:
        pytest.skip(f"the native kernel cannot run on this CPU ({availability()})")
    code = textwrap.dedent("""
        from edgevlm.runtime.native import build
        k = build.load_kernel()
        print(k.build); print(k.isa); print(k.path)
    """)
    env = {**_env(target, tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc"), "EDGEVLM_NATIVE_BUILD": "prebuilt"}
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    kind, isa, path = p.stdout.split()
    from edgevlm.runtime.native import isa_path

    assert kind == "prebuilt" and isa == isa_path() and Path(path).is_relative_to(target), p.stdout
    assert not (tmp_path / "cache" / "native").exists()


def test_targets_and_plan_from_the_wheel(installed, tmp_path):
    _, target = installed
    p = _edgevlm(target, "targets", cwd=tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("jetson-orin-nano-8gb", "jetson-agx-orin-32gb", "rtx-4090", "cpu-x86-avx2"):
        assert name in p.stdout
    p = _edgevlm(target, "plan", "--model", "mobilevlm-1.7b", "--target", "jetson-orin-nano-8gb", "--precision",
                 "int4", cwd=tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mobilevlm-1.7b on jetson-orin-nano-8gb" in p.stdout and "kv_cache" in p.stdout


def test_run_a_quantized_bundle_from_the_wheel_on_its_prebuilt_kernel(installed, tmp_path_factory, tmp_path):
    from edgevlm.runtime.native import availability, isa_path
    from test_native import _quantized

    if not _variants_here() or availability() is not None:
        pytest.skip("no prebuilt native kernel for this machine")
    _, target = installed
    bundle = _quantized(tmp_path_factory, "int4")
    img = write_png(tmp_path / "img.png")
    p = _edgevlm(target, "run", str(bundle), "--image", str(img), "--prompt", QUESTION, "--max-new-tokens", "4",
                 "--threads", "1", "--json-output", cwd=tmp_path, cache=tmp_path / "cache",
                 CC=str(tmp_path / "no-such-cc"), EDGEVLM_NATIVE_BUILD="prebuilt")
    assert p.returncode == 0, f"edgevlm run from the wheel failed:\n{p.stderr[-3000:]}"
    info = json.loads(p.stdout.strip().splitlines()[-1])["load_info"]["native_decode"]
    assert (info["backend"], info["build"], info["isa"]) == ("native", "prebuilt", isa_path()), info


def test_run_a_bundle_from_the_wheel(installed, tmp_path_factory, tmp_path):
    _, target = installed
    bundle, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    img = write_png(tmp_path / "img.png")
    p = _edgevlm(target, "run", str(bundle), "--image", str(img), "--prompt", QUESTION, "--max-new-tokens", "4",
                 "--threads", "1", "--json-output", cwd=tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 0, f"edgevlm run from the wheel failed:\n{p.stderr[-3000:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["tokens"] and out["model"] == "tiny-ldpnetv2" and out["timings"]["total_ms"] > 0
