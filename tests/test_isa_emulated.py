"""The ISA-sensitive tests on an emulated AVX2-only CPU (AMD Zen 3), whatever CPU runs the suite.

The CPU of the machines that run this project changes from session to session (AVX2-only AMD Zen 3, AVX-512 Zen 4,
AVX-512 + AMX Xeon), and ONNX Runtime, PyTorch and numpy pick their kernels by CPUID: a test can pass on one and
fail on another (int8 saturation without VNNI, alignment-dependent summation order). Here the tests that depend on
the ISA run again under ``qemu-x86_64 -cpu EPYC-Milan`` (Debian's qemu-user: it emulates CPUID and AVX2 / FMA, no
AVX-512), with ``EDGEVLM_CPU_MASK=avx512`` so that edgevlm's own dispatch (which reads /proc/cpuinfo, passed
through from the host) agrees. Marked ``isa``: not in the default suite (emulation is ~5x slower); ``.ci/run``
runs it with ``make test-isa`` after installing qemu-user. The native kernel's ARM64 path runs under qemu-aarch64 in
tests/test_native_arm.py (marked ``isa`` too).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.isa

ROOT = Path(__file__).resolve().parents[1]
CPU_MODEL = "EPYC-Milan"                  # AMD Zen 3: AVX2 + FMA, no AVX-512, no VNNI
#: The tests whose outcome depends on the CPU's vector ISA (int8 kernels, the native kernel's dispatch,
#: alignment-sensitive float reductions).
ISA_TESTS = [
    "tests/test_quant.py::test_report_errors_are_small_for_int8",
    "tests/test_quant.py::test_int8_vision_accuracy_holds_on_this_cpu",
    "tests/test_native.py",
    # setup.py's prebuilt AVX2 variant (explicit -mavx2 -mfma -mf16c, built here) runs on the AVX2-only CPU
    "tests/test_native_build.py::test_prebuilt_variant_loads_without_a_compiler",
    "tests/test_checkpoint.py",
]


def _qemu() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"x86-64 emulation of an x86-64 CPU; this machine is {platform.machine()}")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not found (apt-get install qemu-user; .ci/run installs it)")
    return qemu


def test_emulated_cpu_has_avx2_and_no_avx512():
    qemu = _qemu()
    probe = ("import numpy as np; from numpy._core._multiarray_umath import __cpu_features__ as f; "
             "print(int(f['AVX2']), int(f['FMA3']), int(f['AVX512F']), int(f.get('AVX512VNNI', 0)))")
    out = subprocess.run([qemu, "-cpu", CPU_MODEL, sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1", "0", "0"], out.stdout


def test_compiler_targets_the_emulated_cpu():
    """The native kernel is built with -march=native: under emulation gcc reads the emulated CPUID, so it targets
    AVX2 + FMA + F16C and no AVX-512 (build.py also adds -mno-avx512f where EDGEVLM_CPU_MASK hides it)."""
    qemu = _qemu()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = subprocess.run([qemu, "-cpu", CPU_MODEL, cc, "-march=native", "-dM", "-E", "-"], input="",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    macros = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define ")}
    assert {"__AVX2__", "__FMA__", "__F16C__"} <= macros and "__AVX512F__" not in macros


@pytest.mark.timeout(1500)
def test_native_avx2_path_gives_onnxruntimes_tokens_on_an_avx2_only_cpu(tmp_path):
    """The native decode kernel's AVX2 path, built and run on the emulated CPU, gives ONNX Runtime's greedy tokens
    (int4 and int8): it must run there, not skip to the ONNX Runtime fallback."""
    qemu = _qemu()
    env = {**os.environ, "EDGEVLM_CPU_MASK": "avx512", "EDGEVLM_CACHE": str(tmp_path / "cache")}
    cmd = [qemu, "-cpu", CPU_MODEL, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "--basetemp", str(tmp_path / "t"), "tests/test_native.py::test_native_decode_gives_onnxruntimes_tokens"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    tail = "\n".join(line for line in out.stdout.splitlines() if "TCG doesn't support" not in line)[-6000:]
    assert out.returncode == 0, tail
    assert "2 passed" in tail and " failed" not in tail, tail       # the 'avx2' copies skip: the mask is set


@pytest.mark.timeout(3000)
def test_isa_sensitive_tests_pass_on_an_avx2_only_cpu(tmp_path):
    qemu = _qemu()
    env = {**os.environ, "EDGEVLM_CPU_MASK": "avx512", "EDGEVLM_CACHE": str(tmp_path / "cache")}
    cmd = [qemu, "-cpu", CPU_MODEL, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "--basetemp", str(tmp_path / "t"), *ISA_TESTS]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2900)
    tail = "\n".join(line for line in out.stdout.splitlines() if "TCG doesn't support" not in line)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
