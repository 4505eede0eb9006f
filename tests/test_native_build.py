"""The native kernel's install-time build and run-time dispatch (edgevlm.runtime.native.build, setup.py): setup.py
compiles one library per variant for this machine (and skips them, without failing, where there is no compiler); the
loader picks the best prebuilt variant the CPU runs (EDGEVLM_CPU_MASK honoured) and loads it without a compiler;
a stale, foreign or other-ABI library is refused with the reason and the on-demand build takes over;
EDGEVLM_NATIVE_BUILD forces either; ``edgevlm run`` says which kernel ran."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_bundles import QUESTION, make_image, write_png
from test_native import _quantized

from edgevlm.runtime import cpuinfo
from edgevlm.runtime.native import NativeUnavailable, build, variants

REPO = Path(__file__).resolve().parents[1]
ZEN4 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                  "avx512_vnni"})
ARM = frozenset({"fp", "asimd", "atomics", "asimddp", "asimdrdm"})


def _setup_build_ext(out: Path, **env: str) -> subprocess.CompletedProcess:
    """``python setup.py build_ext`` into ``out`` (lib/ and tmp/), from the repository."""
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"),
                           "--build-temp", str(out / "tmp")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    """The folder setup.py's build_ext puts this machine's variants in (each checked to be there)."""
    if build._machine() is None:
        pytest.skip("no variants are built off x86-64 / ARM64 Linux")
    if build.find_compiler() is None:
        pytest.skip("no C compiler: setup.py skips every variant (test_setup_without_a_compiler_skips_the_variants)")
    out = tmp_path_factory.mktemp("setup-build")
    p = _setup_build_ext(out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    folder = out / "lib" / "edgevlm" / "runtime" / "native"
    built = sorted(f.name for f in folder.glob("*.so"))
    assert built == sorted(v.filename for v in variants.variants_for(build.platform.machine())), (built, p.stderr)
    return folder


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No loaded-library memo, an empty on-demand cache, the default build mode. ``EDGEVLM_CPU_MASK`` stays: under
    emulation (tests/test_isa_emulated.py) it hides the AVX-512 the emulated CPU lacks."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(build.BUILD_ENV, raising=False)
    monkeypatch.delenv(build.MARCH_ENV, raising=False)


def test_setup_without_a_compiler_skips_the_variants(tmp_path):
    p = _setup_build_ext(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert not list((tmp_path / "lib").rglob("*.so"))
    for v in variants.variants_for(build.platform.machine()):
        assert f'building extension "edgevlm.runtime.native.{v.stem}" failed' in p.stdout + p.stderr


def test_prebuilt_variant_is_chosen_by_cpu_flags(monkeypatch, tmp_path, fresh):
    monkeypatch.setattr(build, "PREBUILT_DIR", tmp_path)
    for v in variants.VARIANTS:
        (tmp_path / v.filename).write_bytes(b"")
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpuinfo, "raw_cpu_flags", lambda: ZEN4)
    monkeypatch.delenv(cpuinfo.MASK_ENV, raising=False)
    assert build.prebuilt_variant().isa == "avx512-vnni"
    monkeypatch.setenv(cpuinfo.MASK_ENV, "avx512")                       # as on an AVX2-only CPU
    assert build.prebuilt_variant().isa == "avx2" and build.isa_path() == "avx2"
    monkeypatch.setenv(cpuinfo.MASK_ENV, "f16c")
    assert build.prebuilt_variant() is None                               # AVX-512 VNNI needs F16C too (-mf16c)
    monkeypatch.delenv(cpuinfo.MASK_ENV)
    (tmp_path / variants.VARIANTS[0].filename).unlink()
    assert build.prebuilt_variant().isa == "avx2"                         # the next one whose file is there
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpuinfo, "raw_cpu_flags", lambda: ARM)
    assert build.prebuilt_variant().isa == "neon-dotprod" and build.isa_path() == "neon-dotprod"
    monkeypatch.setenv(cpuinfo.MASK_ENV, "atomics")                      # -march=armv8.2-a emits LSE atomics
    assert build.prebuilt_variant() is None and build.isa_path() == "neon-dotprod"


def test_prebuilt_variant_loads_without_a_compiler(prebuilt, monkeypatch, tmp_path_factory, fresh):
    monkeypatch.setattr(build, "PREBUILT_DIR", prebuilt)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv(build.BUILD_ENV, "prebuilt")
    k = build.load_kernel()
    assert k.build == "prebuilt" and k.isa == build.isa_path() and k.path.parent == prebuilt and k.note is None
    assert not (Path(os.environ["EDGEVLM_CACHE"]) / "native").exists()    # nothing compiled
    if build.isa_path() == "avx512-vnni":                                   # the AVX2 variant too, AVX-512 hidden
        monkeypatch.setenv(cpuinfo.MASK_ENV, "avx512")
        assert build.load_kernel().isa == "avx2"
        monkeypatch.delenv(cpuinfo.MASK_ENV)
    from edgevlm.runtime import Session

    path = _quantized(tmp_path_factory, "int4")
    nat = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="on")
    ort = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="off")
    assert nat.native_info["build"] == "prebuilt" and nat.native_info["isa"] == build.isa_path()
    a = nat.generate(make_image(3), QUESTION, max_new_tokens=12, ignore_eos=True)
    b = ort.generate(make_image(3), QUESTION, max_new_tokens=12, ignore_eos=True)
    assert a.tokens == b.tokens and a.timings.decode_backend == "native"


def test_stale_prebuilt_is_refused_and_compiled_on_demand(prebuilt, monkeypatch, tmp_path, fresh):
    """A prebuilt library compiled from another decode.c (an editable install whose source changed) is not used:
    ``prebuilt`` refuses with the reason, ``auto`` compiles the source on demand and says why."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    src = tmp_path / "src" / "decode.c"
    src.parent.mkdir()
    src.write_text(build.SOURCE.read_text() + "\n/* edited after the install */\n")
    monkeypatch.setattr(build, "SOURCE", src)
    monkeypatch.setattr(build, "PREBUILT_DIR", prebuilt)
    monkeypatch.setenv(build.BUILD_ENV, "prebuilt")
    with pytest.raises(NativeUnavailable, match="was compiled from another decode.c"):
        build.load_kernel()
    monkeypatch.setenv(build.BUILD_ENV, "auto")
    k = build.load_kernel()
    assert k.build == "compiled on demand" and "another decode.c" in k.note
    assert k.path.parent == Path(os.environ["EDGEVLM_CACHE"]) / "native" and k.isa == build.isa_path()
    k.lib.evlm_source_sha.restype = ctypes.c_char_p
    assert k.lib.evlm_source_sha().decode() == variants.source_sha(src)


@pytest.mark.skipif(build._machine() != "x86_64", reason="x86-64 variants")
def test_foreign_isa_or_abi_is_refused(prebuilt, monkeypatch, tmp_path, fresh):
    """A library under a variant's name that was built for another path, or for another ABI, is refused by name
    (only its constant functions are called: safe on any x86-64 CPU)."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    avx512 = next(v for v in variants.VARIANTS if v.isa == "avx512-vnni")
    shutil.copy(prebuilt / "_decode_avx2.so", tmp_path / avx512.filename)
    monkeypatch.setattr(build, "PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(cpuinfo, "raw_cpu_flags", lambda: ZEN4)
    monkeypatch.delenv(cpuinfo.MASK_ENV, raising=False)
    monkeypatch.setenv(build.BUILD_ENV, "prebuilt")
    with pytest.raises(NativeUnavailable, match="built for the avx2 path but this CPU runs the avx512-vnni path"):
        build.load_kernel()
    stub, other = tmp_path / "stub.c", tmp_path / "abi3"                # another folder: dlopen memoizes paths
    stub.write_text("int evlm_abi_version(void) { return 3; }\n")
    other.mkdir()
    subprocess.run([build.find_compiler(), "-shared", "-fPIC", str(stub), "-o", str(other / avx512.filename)],
                   check=True, timeout=120)
    monkeypatch.setattr(build, "PREBUILT_DIR", other)
    with pytest.raises(NativeUnavailable, match="has ABI 3, this edgevlm needs 4; reinstall edgevlm"):
        build.load_kernel()


def test_build_mode_forces_the_on_demand_build(prebuilt, monkeypatch, fresh):
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(build, "PREBUILT_DIR", prebuilt)
    assert build.build_mode() == "auto" and build.load_kernel().build == "prebuilt"
    monkeypatch.setenv(build.BUILD_ENV, "native")
    k = build.load_kernel()
    assert k.build == "compiled on demand" and k.note is None and k.isa == build.isa_path()
    monkeypatch.setenv(build.BUILD_ENV, "fast")
    with pytest.raises(NativeUnavailable, match="EDGEVLM_NATIVE_BUILD='fast' is not one of auto, native, prebuilt"):
        build.availability()
    monkeypatch.delenv(build.BUILD_ENV)
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v3")
    assert build.build_mode() == "native"
    monkeypatch.delenv(build.MARCH_ENV)
    monkeypatch.setattr(build, "PREBUILT_DIR", prebuilt.parent)             # no variants there
    monkeypatch.setenv(build.BUILD_ENV, "prebuilt")
    assert "EDGEVLM_NATIVE_BUILD=prebuilt but no prebuilt variant" in build.availability()


def test_run_says_which_kernel_ran(monkeypatch, tmp_path_factory, tmp_path, capsys, fresh):
    """``edgevlm run`` names the ISA path and the build in its decoder line and decode row (and in --json-output's
    load_info.native_decode)."""
    from edgevlm.cli import main
    from edgevlm.runtime.native import availability

    if availability() is not None:
        pytest.skip(f"native kernel unavailable here ({availability()})")
    path = _quantized(tmp_path_factory, "int4")
    img = write_png(tmp_path / "img.png")
    args = ["run", str(path), "--image", str(img), "--prompt", QUESTION, "--max-new-tokens", "3", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    kind = "prebuilt" if build.prebuilt_variant() is not None else "compiled on demand"
    label = f"native ({build.isa_path()}, {kind}, float16 KV)"
    assert f"decoder: {label}" in out
    assert any(line.lstrip().startswith("decode") and label in line for line in out.splitlines()), out
    assert main([*args, "--json-output"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["load_info"]["native_decode"]
    assert (info["backend"], info["isa"], info["build"]) == ("native", build.isa_path(), kind)
