"""What this CPU can do, as the runtime's own dispatch sees it: ISA flags, with a mask to test the other paths.

The flags come from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM). ``EDGEVLM_CPU_MASK`` hides flags
from edgevlm's *own* decisions (the native decode kernel, the int8-saturation warning; ``edgevlm bench``'s
environment block records what was hidden), so the code paths of a CPU without AVX-512 or VNNI can be exercised on one that has them:

    EDGEVLM_CPU_MASK=avx512 pytest tests/test_native.py       # as on an AVX2-only CPU (AMD Zen 3, Intel client)
    EDGEVLM_CPU_MASK=vnni edgevlm run BUNDLE ...               # AVX-512 without VNNI (Skylake-SP)

Entries are flag names or groups: ``avx512`` (every ``avx512*`` flag), ``vnni`` (``avx512_vnni``, ``avx_vnni``,
``avx_vnni_int8``), ``amx`` (every ``amx*`` flag). The mask cannot change what ONNX Runtime or PyTorch pick: their
kernels read CPUID themselves. To run those as another CPU would, use an emulator, e.g. ``qemu-x86_64 -cpu
EPYC-Milan python -m pytest ...`` (Debian's qemu-user; docs/runtime.md "Other CPUs").

Torch-free, stdlib only.
"""

from __future__ import annotations

import os
import platform

__all__ = ["MASK_ENV", "cpu_flags", "raw_cpu_flags", "masked_flags", "is_x86", "has_int8_dot", "int8_saturates"]

MASK_ENV = "EDGEVLM_CPU_MASK"
_VNNI = frozenset({"avx512_vnni", "avx_vnni", "avx_vnni_int8"})


def raw_cpu_flags() -> frozenset[str]:
    """ISA flags of the first CPU in /proc/cpuinfo, unmasked (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def masked_flags(flags: frozenset[str] | set[str] | None = None) -> set[str]:
    """The flags ``EDGEVLM_CPU_MASK`` hides from ``flags`` (default: this CPU's)."""
    flags = raw_cpu_flags() if flags is None else flags
    hidden: set[str] = set()
    for entry in os.environ.get(MASK_ENV, "").replace(",", " ").split():
        entry = entry.strip().lower()
        if entry == "avx512":
            hidden |= {f for f in flags if f.startswith("avx512")}
        elif entry == "vnni":
            hidden |= _VNNI & set(flags)
        elif entry == "amx":
            hidden |= {f for f in flags if f.startswith("amx")}
        else:
            hidden.add(entry)
    return hidden & set(flags)


def cpu_flags() -> set[str]:
    """This CPU's ISA flags minus those ``EDGEVLM_CPU_MASK`` hides."""
    flags = raw_cpu_flags()
    return set(flags) - masked_flags(flags)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def has_int8_dot(flags: set[str] | None = None) -> bool:
    """An int8 dot-product instruction without intermediate saturation: VNNI on x86 (AVX-512 VNNI or AVX-VNNI),
    ``asimddp`` on ARM."""
    flags = cpu_flags() if flags is None else flags
    return bool(_VNNI & flags) or "asimddp" in flags


def int8_saturates(flags: set[str] | None = None) -> bool:
    """True on an x86 CPU without VNNI: ONNX Runtime's u8 x s8 int8 GEMMs use ``vpmaddubsw`` there, which adds two
    u8 x s8 products into a saturating int16 (255 x 127 x 2 > 32767). 7-bit weights (``reduce_range``) avoid it."""
    return is_x86() and not has_int8_dot(flags)
