"""Compile and load the native decode kernel (``decode.c``) for this CPU, cached.

The kernel is plain C with two code paths, AVX-512 VNNI and AVX2 + FMA (+ F16C), and OpenMP. It is compiled on the
machine that runs it (``-O3 -march=native -fopenmp``), the way llama.cpp builds by default, because the right code
depends on the exact CPU; the compiler's ISA macros pick the path. ``isa_path()`` names the one that runs here:
``"avx512-vnni"`` where the CPU has AVX-512 VNNI, else ``"avx2"`` where it has AVX2 + FMA + F16C. Where AVX-512 is
there but hidden by ``EDGEVLM_CPU_MASK`` the build adds ``-mno-avx512f``, so the AVX2 path really runs (and can be
tested and timed on an AVX-512 machine). ``EDGEVLM_NATIVE_MARCH`` (e.g. ``znver3``) replaces ``-march=native``, for
benchmarks. The shared library lands in ``cache_home()/native/`` under a name keyed by the sha256 of the source and the
flags, and by the CPU fingerprint (so a cached build also serves a machine without a compiler). It is written to a temporary name and renamed, so concurrent loads never
see a half-written file. Later loads reuse it: one ``dlopen``, no compile.

``availability()`` says whether the kernel can run here and, if not, why: not x86-64 Linux, neither AVX-512 VNNI nor
AVX2 + FMA + F16C (or hidden by ``EDGEVLM_CPU_MASK``, see ``edgevlm.runtime.cpuinfo``), no C compiler, or the
compile failed. ``load()``
raises ``NativeUnavailable`` with that reason. The runtime then falls back to ONNX Runtime for decode
(``native="auto"``) or reports the error (``native="on"``).

Never imports torch (device side).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from edgevlm.errors import RuntimeBackendError
from edgevlm.runtime.cpuinfo import MASK_ENV, cpu_flags, masked_flags

__all__ = ["NativeUnavailable", "SOURCE", "CFLAGS", "REQUIRED_FLAGS", "ISA_FLAGS", "MARCH_ENV", "cpu_flags",
           "find_compiler", "isa_path", "cflags", "availability", "load", "library_path", "loaded_isa"]

SOURCE = Path(__file__).with_name("decode.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
#: /proc/cpuinfo flags each code path's intrinsics need, in order of preference.
ISA_FLAGS = {"avx512-vnni": ("avx512f", "avx512bw", "avx512_vnni", "fma"),
             "avx2": ("avx2", "fma", "f16c")}
#: the flags of the preferred (AVX-512 VNNI) path; the AVX2 path needs ``ISA_FLAGS["avx2"]``.
REQUIRED_FLAGS = ISA_FLAGS["avx512-vnni"]
#: replaces ``-march=native`` (e.g. ``znver3``, ``haswell``): to build and time the other path on one machine.
MARCH_ENV = "EDGEVLM_NATIVE_MARCH"
_ISA_CODES = {1: "avx512-vnni", 2: "avx2"}
_ABI = 3
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class NativeUnavailable(RuntimeBackendError):
    """The native decode kernel cannot run on this machine (the message says why and what to do)."""


def find_compiler() -> str | None:
    """``$CC``, else the first of cc / gcc / clang on PATH."""
    env = os.environ.get("CC")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def isa_path(flags: set[str] | None = None) -> str | None:
    """The kernel's code path for these flags (default: this CPU's, as ``EDGEVLM_CPU_MASK`` leaves them):
    ``"avx512-vnni"``, ``"avx2"``, or None (neither runs)."""
    flags = cpu_flags() if flags is None else flags
    for name, need in ISA_FLAGS.items():
        if all(f in flags for f in need):
            return name
    return None


def cflags() -> tuple[str, ...]:
    """The compiler flags for this machine's path: ``CFLAGS``, ``-march`` from ``EDGEVLM_NATIVE_MARCH`` if set, and
    ``-mno-avx512f`` where the AVX2 path is chosen (so a CPU whose AVX-512 is hidden builds the AVX2 path)."""
    flags = list(CFLAGS)
    march = os.environ.get(MARCH_ENV, "").strip()
    if march:
        flags[flags.index("-march=native")] = f"-march={march}"
    if isa_path() == "avx2":
        flags.append("-mno-avx512f")
    return tuple(flags)


def availability() -> str | None:
    """``None`` when the kernel can be built and run here, else the reason it cannot."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native decode kernel is x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    flags = cpu_flags()
    if isa_path(flags) is None:
        missing = [f for f in ISA_FLAGS["avx2"] if f not in flags]
        missing512 = [f for f in REQUIRED_FLAGS if f not in flags]
        hidden = sorted((set(missing) | set(missing512)) & masked_flags())
        masked = f"; {', '.join(hidden)} hidden by {MASK_ENV}" if hidden else ""
        return (f"this CPU lacks {', '.join(missing)} (the native decode kernel needs AVX-512 VNNI, or AVX2 + FMA + "
                f"F16C{masked})")
    if find_compiler() is None and not library_path().is_file():
        return "no C compiler found (install gcc, or set CC) to build the native decode kernel"
    return None


def _cache_dir() -> Path:
    from edgevlm.runtime.backends import cache_home

    return cache_home() / "native"


def library_path() -> Path:
    """Where the library for this source, these flags and this CPU is (or will be) cached."""
    from edgevlm.runtime.backends import cpu_fingerprint

    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(cflags()).encode())
    return _cache_dir() / f"evlm-decode-{key.hexdigest()[:16]}-{cpu_fingerprint()}.so"


def _compile(cc: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        p = subprocess.run([cc, *cflags(), str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise NativeUnavailable(f"compiling the native decode kernel with {cc} failed (exit {p.returncode}): "
                                    f"{(p.stderr or p.stdout).strip()[-800:]}; decode runs on ONNX Runtime "
                                    f"(pass native='off' to skip the attempt)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL:
    """The compiled kernel for this machine (built on first use, then cached); ``NativeUnavailable`` if it cannot
    run here."""
    reason = availability()
    if reason:
        raise NativeUnavailable(reason)
    cc = find_compiler()
    with _lock:
        path = library_path()
        if str(path) in _loaded:
            return _loaded[str(path)]
        if not path.is_file():
            if cc is None:
                raise NativeUnavailable("no C compiler found (install gcc, or set CC) to build the native decode "
                                        "kernel")
            _compile(cc, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeUnavailable(f"the native decode kernel '{path}' cannot be loaded ({exc}); delete it to "
                                    f"rebuild, or pass native='off'") from exc
        if lib.evlm_abi_version() != _ABI:
            raise NativeUnavailable(f"the native decode kernel '{path}' has ABI {lib.evlm_abi_version()}, this "
                                    f"edgevlm needs {_ABI}; delete it to rebuild")
        isa = loaded_isa(lib)
        if isa != isa_path() and not os.environ.get(MARCH_ENV, "").strip():
            raise NativeUnavailable(f"the native decode kernel '{path}' was built for the {isa} path but this CPU "
                                    f"runs the {isa_path()} path; delete it to rebuild")
        _loaded[str(path)] = lib
        return lib


def loaded_isa(lib: ctypes.CDLL) -> str:
    """The code path a loaded kernel was compiled with: ``"avx512-vnni"`` or ``"avx2"``."""
    lib.evlm_isa.restype = ctypes.c_int
    return _ISA_CODES.get(int(lib.evlm_isa()), "unknown")
