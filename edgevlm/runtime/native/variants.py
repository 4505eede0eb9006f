"""The prebuilt variants of the native decode kernel: one shared library per instruction set, compiled from
``decode.c`` when the package is built (``setup.py``) and picked at run time by ``build.py`` from the CPU's flags.

Each variant names the ISA path it compiles (``decode.c``'s ``evlm_isa()``), the machine it is built for, its
compiler flags (explicit ISA flags, not ``-march=native``: the build machine need not be the one that runs it), and
the ``/proc/cpuinfo`` flags a CPU needs to run it: every instruction set the flags let the compiler use, not only the
intrinsics' (``-march=armv8.2-a`` also emits LSE atomics, so ``atomics`` is required). ``VARIANTS`` is in order of
preference. Stdlib only: ``setup.py`` loads this file by path, before edgevlm or its dependencies are importable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Variant", "VARIANTS", "COMMON_CFLAGS", "LIBRARIES", "SOURCE", "source_sha", "variants_for"]

SOURCE = Path(__file__).with_name("decode.c")
#: flags every build of the kernel uses (prebuilt and on demand), before the ISA flags
COMMON_CFLAGS = ("-O3", "-fopenmp", "-std=gnu11", "-fPIC")
LIBRARIES = ("m",)
#: sysconfig.get_platform() machine names -> the kernel's machine names
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Variant:
    isa: str                      # the ISA path: what evlm_isa() reports, and build.isa_path() names
    machine: str                  # "x86_64" or "aarch64"
    cflags: tuple[str, ...]       # ISA and tuning flags, after COMMON_CFLAGS
    cpu_flags: tuple[str, ...]    # /proc/cpuinfo flags a CPU needs to run this library

    @property
    def stem(self) -> str:
        """The extension's module-style name: ``_decode_<isa>`` (file ``_decode_<isa>.so`` beside decode.c)."""
        return "_decode_" + self.isa.replace("-", "_")

    @property
    def filename(self) -> str:
        return self.stem + ".so"


VARIANTS: tuple[Variant, ...] = (
    # Intel Xeon since Cascade Lake, AMD Zen 4 / 5. -mtune=generic measured as fast as -march=native on the Zen 4
    # reference host (docs/runtime.md, "The prebuilt AVX-512 variant keeps the speed of -march=native").
    Variant("avx512-vnni", "x86_64",
            ("-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c", "-mtune=generic"),
            ("avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", "f16c")),
    # AMD Zen 1-3, Intel client cores since Haswell
    Variant("avx2", "x86_64", ("-mavx2", "-mfma", "-mf16c", "-mtune=generic"), ("avx2", "fma", "f16c")),
    # ARMv8.2-A + dot product: Cortex-A78AE (Jetson Orin), A76 / A77 / A78, Neoverse N1 / V1, Apple M-series (Linux)
    Variant("neon-dotprod", "aarch64", ("-march=armv8.2-a+dotprod", "-mtune=generic"),
            ("asimd", "asimddp", "atomics")),
)


def variants_for(machine: str) -> tuple[Variant, ...]:
    """The variants built for (and runnable on) a machine name as ``platform.machine()`` or
    ``sysconfig.get_platform()`` spell it (``x86_64``, ``aarch64``, ``arm64``...)."""
    m = _MACHINES.get(machine.lower())
    return tuple(v for v in VARIANTS if v.machine == m)


def source_sha(path: Path = SOURCE) -> str:
    """The first 16 hex digits of the sha256 of ``decode.c``: compiled into every build (``EVLM_SOURCE_SHA``)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
