"""Native decode for quantized CPU bundles: one C kernel (``decode.c``: AVX-512 VNNI, AVX2 + FMA, or ARM64 NEON +
dot product, and OpenMP) that runs a whole decode step over the decoder's MatMulNBits weights in place and shares the
KV buffers with ONNX Runtime, which still runs the prefill. ``variants`` lists the libraries ``setup.py`` prebuilds;
``build`` loads the one this CPU runs (else compiles the kernel on demand, cached); ``engine.NativeDecoder`` drives
it from the manifest's ``native_decode`` plan. See docs/runtime.md ("Native decode").

Never imports torch or onnx.
"""

from edgevlm.runtime.native.build import NativeUnavailable, availability, isa_path
from edgevlm.runtime.native.engine import KV_DTYPES, NativeDecoder, plan_reason

__all__ = ["KV_DTYPES", "NativeDecoder", "NativeUnavailable", "availability", "isa_path", "plan_reason"]
