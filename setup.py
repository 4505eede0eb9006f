"""Build hook: the native decode kernel's prebuilt variants, compiled when the package is built or installed.

Everything else about the package is in pyproject.toml. Here: one optional extension per variant of
``edgevlm/runtime/native/decode.c`` for the machine the wheel is for (``edgevlm/runtime/native/variants.py``: on
x86-64 an AVX-512 VNNI and an AVX2 + FMA + F16C library, on ARM64 a NEON + dot product one), each a plain shared
library (no ``PyInit``: ``edgevlm.runtime.native.build`` loads it with ctypes and picks the one the CPU runs).
Each is compiled with the C compiler setuptools finds (``$CC`` or Python's), ``-O3 -fopenmp`` and the variant's ISA
flags, into its own object folder. A variant that does not compile (no compiler, no OpenMP, an old compiler without
the ISA flags) is skipped with a warning and the install goes on: the runtime then compiles the kernel on demand, or
decodes with ONNX Runtime.

    pip install -e .                                 # variants land in edgevlm/runtime/native/ (the source tree)
    pip wheel . --no-deps --no-build-isolation       # ... in the wheel (a platform wheel)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = "edgevlm/runtime/native"
#: build_ext compiles with Python's own CFLAGS first (``-fwrapv`` among them, in CPython's builds); after them, this
#: makes the variants' code the on-demand build's (signed overflow is undefined, as gcc assumes by default)
UNDO_PYTHON_CFLAGS = ("-fno-wrapv",)


def _variants_module():
    """``variants.py`` loaded by path: edgevlm's own imports (numpy...) need not be installed at build time."""
    spec = importlib.util.spec_from_file_location("_edgevlm_native_variants", HERE / NATIVE / "variants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


variants = _variants_module()


class KernelVariant(Extension):
    """One prebuilt variant of decode.c: a ctypes-loaded shared library, not a Python extension module."""

    def __init__(self, variant) -> None:
        sha = variants.source_sha(HERE / NATIVE / "decode.c")
        super().__init__(f"edgevlm.runtime.native.{variant.stem}", sources=[f"{NATIVE}/decode.c"],
                         define_macros=[("EVLM_SOURCE_SHA", f'"{sha}"')],
                         extra_compile_args=[*variants.COMMON_CFLAGS, *variant.cflags, *UNDO_PYTHON_CFLAGS],
                         extra_link_args=["-fopenmp"], libraries=list(variants.LIBRARIES), optional=True)
        self.variant = variant


class build_kernel_variants(build_ext):
    """``build_ext`` for ``KernelVariant``: a plain ``.so`` name (no Python ABI tag: it has no Python in it) and one
    object folder per variant (they share decode.c, so the default folder would hand one variant's object to the
    next)."""

    def get_ext_filename(self, fullname: str) -> str:
        ext = self.ext_map.get(fullname)
        if isinstance(ext, KernelVariant):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, KernelVariant):
            return super().build_extension(ext)
        objects = self.compiler.compile(ext.sources, output_dir=os.path.join(self.build_temp, ext.variant.stem),
                                        macros=ext.define_macros, extra_postargs=ext.extra_compile_args,
                                        depends=ext.depends)
        self.compiler.link_shared_object(objects, self.get_ext_fullpath(ext.name), libraries=ext.libraries,
                                         extra_postargs=ext.extra_link_args, target_lang="c")
        return None


def kernel_variants() -> list[KernelVariant]:
    """The variants for the platform the wheel is built for (none off Linux: the kernel is Linux-only)."""
    plat = sysconfig.get_platform()                       # e.g. linux-x86_64, linux-aarch64
    if not plat.startswith("linux"):
        return []
    return [KernelVariant(v) for v in variants.variants_for(plat.split("-", 1)[1])]


setup(ext_modules=kernel_variants(), cmdclass={"build_ext": build_kernel_variants})
