"""Load the native decode kernel (``decode.c``) for this CPU: a prebuilt variant from the package, else one compiled
on demand and cached.

The kernel is plain C with three code paths, AVX-512 VNNI, AVX2 + FMA (+ F16C) and ARM64 NEON + dot product, and
OpenMP; the compiler's ISA macros pick the path. ``isa_path()`` names the one this CPU runs: ``"avx512-vnni"`` where
it has AVX-512 VNNI, else ``"avx2"`` where it has AVX2 + FMA + F16C (x86-64), ``"neon-dotprod"`` where it has NEON
with the dot product (``asimddp``, ARM64).

Dispatch, in order (``load_kernel()``):

1. **Prebuilt.** ``setup.py`` compiles one shared library per variant when the package is built or installed
   (``variants.VARIANTS``: explicit ISA flags, ``-O3 -fopenmp``), next to this file. The first variant whose
   ``/proc/cpuinfo`` flags this CPU has (as ``EDGEVLM_CPU_MASK`` leaves them, see ``edgevlm.runtime.cpuinfo``) and
   whose file is there is loaded, after checking its ABI version, its ISA path and that it was compiled from the
   ``decode.c`` beside it (an editable install whose source changed since gets a fresh build instead). A variant
   that fails a check is reported (logged, and in ``Kernel.note``) and skipped.
2. **Compiled on demand** (the fallback): ``-O3 -march=native -fopenmp`` with the system C compiler (``$CC``, else
   cc / gcc / clang), the way llama.cpp builds by default, into ``cache_home()/native/`` under a name keyed by the
   sha256 of the source and the flags, and by the CPU fingerprint (so a cached build also serves a machine without a
   compiler). It is written to a temporary name and renamed, so concurrent loads never see a half-written file.
   Where AVX-512 is there but hidden by ``EDGEVLM_CPU_MASK`` the build adds ``-mno-avx512f``, so the AVX2 path
   really runs. ``EDGEVLM_NATIVE_MARCH`` (e.g. ``znver3``) replaces ``-march=native`` and implies this step.

``EDGEVLM_NATIVE_BUILD`` overrides the order: ``auto`` (default, as above), ``native`` (always the on-demand
``-march=native`` build: for benchmarks), ``prebuilt`` (a prebuilt variant or nothing: never run a compiler).

``availability()`` says whether the kernel can run here and, if not, why: not x86-64 / ARM64 Linux, none of the
paths' CPU flags (or hidden by ``EDGEVLM_CPU_MASK``), or no prebuilt variant for this CPU and no C compiler.
``load_kernel()`` raises ``NativeUnavailable`` with that reason (or the compiler's error). The runtime then falls back
to ONNX Runtime for decode (``native="auto"``) or reports the error (``native="on"``).

Never imports torch (device side).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import RuntimeBackendError
from edgevlm.runtime.cpuinfo import MASK_ENV, cpu_flags, masked_flags
from edgevlm.runtime.native.variants import SOURCE, Variant, source_sha, variants_for

__all__ = ["NativeUnavailable", "Kernel", "SOURCE", "CFLAGS", "REQUIRED_FLAGS", "ISA_FLAGS", "MARCH_ENV", "BUILD_ENV",
           "BUILD_MODES", "PREBUILT_DIR", "cpu_flags", "find_compiler", "isa_path", "cflags", "build_mode",
           "prebuilt_variant", "availability", "load_kernel", "load", "library_path", "loaded_isa"]

log = logging.getLogger(__name__)

#: the on-demand build's flags
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
#: /proc/cpuinfo flags each code path's intrinsics need, in order of preference (x86-64, then ARM64).
ISA_FLAGS = {"avx512-vnni": ("avx512f", "avx512bw", "avx512_vnni", "fma"),
             "avx2": ("avx2", "fma", "f16c"),
             "neon-dotprod": ("asimd", "asimddp")}
#: the flags of the preferred x86 (AVX-512 VNNI) path; the AVX2 path needs ``ISA_FLAGS["avx2"]``.
REQUIRED_FLAGS = ISA_FLAGS["avx512-vnni"]
#: replaces ``-march=native`` (e.g. ``znver3``, ``haswell``) in the on-demand build, which it implies: for benchmarks.
MARCH_ENV = "EDGEVLM_NATIVE_MARCH"
#: ``auto`` | ``native`` | ``prebuilt``: see the module docstring.
BUILD_ENV = "EDGEVLM_NATIVE_BUILD"
BUILD_MODES = ("auto", "native", "prebuilt")
#: where setup.py puts the prebuilt variants (the package folder: the wheel's, or the source tree's for ``pip
#: install -e``)
PREBUILT_DIR = Path(__file__).parent
PREBUILT, ON_DEMAND = "prebuilt", "compiled on demand"
_ISA_CODES = {1: "avx512-vnni", 2: "avx2", 3: "neon-dotprod"}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_ABI = 4
_lock = threading.Lock()
_loaded: dict[str, "Kernel"] = {}


class NativeUnavailable(RuntimeBackendError):
    """The native decode kernel cannot run on this machine (the message says why and what to do)."""


@dataclass(frozen=True)
class Kernel:
    """A loaded kernel library: which ISA path it runs, how it was built (``"prebuilt"`` or ``"compiled on
    demand"``), its file, and why a prebuilt variant was passed over (``note``, or None)."""

    lib: ctypes.CDLL
    isa: str
    build: str
    path: Path
    note: str | None = None


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


def _machine() -> str | None:
    """``"x86_64"`` / ``"aarch64"`` on Linux, else None (the kernel runs nowhere else)."""
    if platform.system() != "Linux":
        return None
    return _MACHINES.get(platform.machine().lower())


def isa_path(flags: set[str] | None = None) -> str | None:
    """The kernel's code path for these flags (default: this CPU's, as ``EDGEVLM_CPU_MASK`` leaves them):
    ``"avx512-vnni"``, ``"avx2"``, ``"neon-dotprod"``, or None (none runs)."""
    flags = cpu_flags() if flags is None else flags
    for name, need in ISA_FLAGS.items():
        if all(f in flags for f in need):
            return name
    return None


def build_mode() -> str:
    """``EDGEVLM_NATIVE_BUILD`` (``auto`` when unset); ``EDGEVLM_NATIVE_MARCH`` implies ``native``."""
    mode = os.environ.get(BUILD_ENV, "").strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise NativeUnavailable(f"{BUILD_ENV}={mode!r} is not one of {', '.join(BUILD_MODES)}; unset it (auto: a "
                                f"prebuilt variant, else compile on demand)")
    if mode == "auto" and os.environ.get(MARCH_ENV, "").strip():
        return "native"
    return mode


def prebuilt_variant(flags: set[str] | None = None) -> Variant | None:
    """The preferred prebuilt variant this CPU runs (flags as ``EDGEVLM_CPU_MASK`` leaves them) and whose library is
    in ``PREBUILT_DIR``; None when there is none."""
    flags = cpu_flags() if flags is None else flags
    for v in variants_for(platform.machine()):
        if all(f in flags for f in v.cpu_flags) and (PREBUILT_DIR / v.filename).is_file():
            return v
    return None


def cflags() -> tuple[str, ...]:
    """The on-demand build's compiler flags for this machine's path: ``CFLAGS``, ``-march`` from
    ``EDGEVLM_NATIVE_MARCH`` if set, and ``-mno-avx512f`` where the AVX2 path is chosen (so a CPU whose AVX-512 is
    hidden builds the AVX2 path)."""
    flags = list(CFLAGS)
    march = os.environ.get(MARCH_ENV, "").strip()
    if march:
        flags[flags.index("-march=native")] = f"-march={march}"
    if isa_path() == "avx2":
        flags.append("-mno-avx512f")
    return tuple(flags)


def _lacks(flags: set[str], machine: str) -> str:
    hidden_by = masked_flags()
    if machine == "aarch64":
        missing = [f for f in ISA_FLAGS["neon-dotprod"] if f not in flags]
        need = "ARM64 NEON with the dot product (asimddp: ARMv8.2-A+dotprod, e.g. Cortex-A76/A78, Neoverse N1)"
        hidden = sorted(set(missing) & hidden_by)
    else:
        missing = [f for f in ISA_FLAGS["avx2"] if f not in flags]
        missing512 = [f for f in REQUIRED_FLAGS if f not in flags]
        need = "AVX-512 VNNI, or AVX2 + FMA + F16C"
        hidden = sorted((set(missing) | set(missing512)) & hidden_by)
    masked = f"; {', '.join(hidden)} hidden by {MASK_ENV}" if hidden else ""
    return f"this CPU lacks {', '.join(missing)} (the native decode kernel needs {need}{masked})"


def availability() -> str | None:
    """``None`` when the kernel can be loaded (or built) and run here, else the reason it cannot."""
    machine = _machine()
    if machine is None:
        return (f"the native decode kernel runs on x86-64 and ARM64 Linux only (this is {platform.system()} "
                f"{platform.machine()})")
    flags = cpu_flags()
    if isa_path(flags) is None:
        return _lacks(flags, machine)
    mode = build_mode()
    if mode != "native" and prebuilt_variant(flags) is not None:
        return None
    if mode == "prebuilt":
        return (f"{BUILD_ENV}=prebuilt but no prebuilt variant of the native decode kernel for this CPU is installed "
                f"in {PREBUILT_DIR} (reinstall edgevlm where a C compiler is present, or unset {BUILD_ENV})")
    if find_compiler() is None and not library_path().is_file():
        return ("no C compiler found (install gcc, or set CC) to build the native decode kernel, and no prebuilt "
                "variant of it for this CPU is installed (reinstall edgevlm where a C compiler is present)")
    return None


def _cache_dir() -> Path:
    from edgevlm.runtime.backends import cache_home

    return cache_home() / "native"


def library_path() -> Path:
    """Where the on-demand build for this source, these flags and this CPU is (or will be) cached."""
    from edgevlm.runtime.backends import cpu_fingerprint

    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(cflags()).encode())
    return _cache_dir() / f"evlm-decode-{key.hexdigest()[:16]}-{cpu_fingerprint()}.so"


def _compile(cc: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        sha = f'-DEVLM_SOURCE_SHA="{source_sha(SOURCE)}"'
        p = subprocess.run([cc, *cflags(), sha, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise NativeUnavailable(f"compiling the native decode kernel with {cc} failed (exit {p.returncode}): "
                                    f"{(p.stderr or p.stdout).strip()[-800:]}; decode runs on ONNX Runtime "
                                    f"(pass native='off' to skip the attempt)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, want_isa: str | None, build: str, note: str | None = None) -> Kernel:
    """dlopen ``path`` and check it: ABI version, ISA path (unless ``want_isa`` is None), source hash (prebuilt)."""
    known = _loaded.get(str(path))
    if known is not None:
        return known
    fix = "reinstall edgevlm" if build == PREBUILT else "delete it to rebuild"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"the native decode kernel '{path}' cannot be loaded ({exc}); {fix}, or pass "
                                f"native='off'") from exc
    abi = int(lib.evlm_abi_version())
    if abi != _ABI:
        raise NativeUnavailable(f"the native decode kernel '{path}' has ABI {abi}, this edgevlm needs {_ABI}; {fix}")
    isa = loaded_isa(lib)
    if want_isa is not None and isa != want_isa:
        raise NativeUnavailable(f"the native decode kernel '{path}' was built for the {isa} path but this CPU "
                                f"runs the {want_isa} path; {fix}")
    lib.evlm_source_sha.restype = ctypes.c_char_p
    built_from = (lib.evlm_source_sha() or b"").decode("ascii", "replace")
    if build == PREBUILT and SOURCE.is_file() and built_from != source_sha(SOURCE):
        raise NativeUnavailable(f"the prebuilt native decode kernel '{path}' was compiled from another decode.c "
                                f"(sha256 {built_from}, the source beside it is {source_sha(SOURCE)}); reinstall "
                                f"edgevlm (pip install -e . rebuilds it)")
    kernel = Kernel(lib, isa, build, path, note)
    _loaded[str(path)] = kernel
    return kernel


def load_kernel() -> Kernel:
    """The kernel for this CPU: the best prebuilt variant, else the on-demand build (compiled on first use, then
    cached); ``NativeUnavailable`` if none can run here."""
    reason = availability()
    if reason:
        raise NativeUnavailable(reason)
    mode = build_mode()
    with _lock:
        note = None
        variant = prebuilt_variant() if mode != "native" else None
        if variant is not None:
            try:
                return _open(PREBUILT_DIR / variant.filename, variant.isa, PREBUILT)
            except NativeUnavailable as exc:
                if mode == "prebuilt":
                    raise
                note = str(exc)
                log.warning("%s; compiling the kernel on demand instead", exc)
        path = library_path()
        if not path.is_file():
            cc = find_compiler()
            if cc is None:
                raise NativeUnavailable("no C compiler found (install gcc, or set CC) to build the native decode "
                                        "kernel" + (f" ({note})" if note else ""))
            _compile(cc, path)
        want = None if os.environ.get(MARCH_ENV, "").strip() else isa_path()
        kernel = _open(path, want, ON_DEMAND)
        return Kernel(kernel.lib, kernel.isa, kernel.build, kernel.path, note) if note else kernel


def load() -> ctypes.CDLL:
    """The kernel library for this machine (``load_kernel().lib``)."""
    return load_kernel().lib


def loaded_isa(lib: ctypes.CDLL) -> str:
    """The code path a loaded kernel was compiled with: ``"avx512-vnni"``, ``"avx2"`` or ``"neon-dotprod"``."""
    lib.evlm_isa.restype = ctypes.c_int
    return _ISA_CODES.get(int(lib.evlm_isa()), "unknown")
