"""The native decode kernel (edgevlm.runtime.native) against numpy references and against ONNX Runtime on the same
bundle: the quantizer writes the plan, the kernel's matrix-vector product is the MatMulNBits arithmetic, a session
decoding natively gives ONNX Runtime's tokens, and every way to get it wrong is a typed error."""

from __future__ import annotations

import ctypes
import json
import os
import shutil

import numpy as np
import pytest

from fixtures_bundles import QUESTION, make_image, tiny_bundle

from edgevlm.errors import BundleError, ConfigError
from edgevlm.runtime.native import NativeUnavailable, availability, plan_reason

SMALL = {"calibration_samples": 3, "heldout_samples": 2, "decode_steps": 2}
_Q: dict[str, object] = {}


def _fallback_checked(tmp_path_factory=None) -> None:
    """The kernel tests run where the kernel runs. Elsewhere (a CPU with none of its paths, no prebuilt variant and
    no compiler, ``EDGEVLM_CPU_MASK``) they assert what holds there instead, then skip with the reason (``-ra``):
    ``availability()`` names a reason true of this machine, ``load()`` raises it, and a session on a plan-carrying
    bundle decodes with ONNX Runtime and says why while ``native_decode='on'`` refuses."""
    reason = availability()
    if reason is None:
        return
    from edgevlm.runtime.native import build

    flags = build.cpu_flags()
    if "lacks" in reason:
        path = "neon-dotprod" if build._machine() == "aarch64" else "avx2"
        missing = [f for f in build.ISA_FLAGS[path] if f not in flags]
        assert missing and f"lacks {', '.join(missing)}" in reason
    elif "compiler" in reason:
        assert build.isa_path(flags) is not None and build.find_compiler() is None
        assert build.prebuilt_variant(flags) is None
    elif build.BUILD_ENV in reason:
        assert build.build_mode() == "prebuilt" and build.prebuilt_variant(flags) is None
    else:
        assert "x86-64 and ARM64 Linux only" in reason and build._machine() is None
    with pytest.raises(NativeUnavailable, match=reason.split(" (")[0]):
        build.load()
    if tmp_path_factory is not None:
        from edgevlm.runtime import Session

        path = _quantized(tmp_path_factory, "int4")
        s = Session.from_bundle(path, threads=1, hash_stamps=None)
        assert s.decode_backend == "onnxruntime" and s.native_info["reason"] == reason
        with pytest.raises(NativeUnavailable, match="native_decode='on' but"):
            Session.from_bundle(path, threads=1, hash_stamps=None, native_decode="on")
    pytest.skip(f"native kernel unavailable here ({reason}); checked the ONNX Runtime fallback instead")


@pytest.fixture(params=["native", "avx2"])
def kernel_path(request, monkeypatch):
    """Run the test on this CPU's own path, then on the AVX2 path: where the CPU has AVX-512 and AVX2 + FMA + F16C,
    ``EDGEVLM_CPU_MASK=avx512`` makes the build choose (and compile, with ``-mno-avx512f``) the AVX2 path natively.
    Elsewhere (an AVX2-only CPU, or the mask already set, as under qemu in tests/test_isa_emulated.py) the first run
    already is the AVX2 path."""
    from edgevlm.runtime import cpuinfo
    from edgevlm.runtime.native import build

    if request.param == "avx2":
        raw = cpuinfo.raw_cpu_flags()
        if os.environ.get(cpuinfo.MASK_ENV) or build.isa_path(set(raw)) != "avx512-vnni" or \
                build.isa_path(set(raw) - {f for f in raw if f.startswith("avx512")}) != "avx2":
            pytest.skip("the AVX2 path is this CPU's own path here (or neither runs): covered by the 'native' run")
        monkeypatch.setenv(cpuinfo.MASK_ENV, "avx512")
        assert build.isa_path() == "avx2"
    return request.param


def _quantized(tmp_path_factory, precision: str):
    pytest.importorskip("onnxruntime_genai")
    from edgevlm.quant.apply import quantize_bundle

    if precision not in _Q:
        src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
        out = tmp_path_factory.mktemp(f"native-{precision}") / "bundle"
        quantize_bundle(src, out, precision, target="cpu", show=False, **SMALL)
        _Q[precision] = out
    return _Q[precision]


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


# ---- the plan ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8)])
def test_quantized_cpu_bundle_carries_a_native_plan(tmp_path_factory, precision, bits):
    path = _quantized(tmp_path_factory, precision)
    plan = _manifest(path)["components"]["decoder"]["native_decode"]
    assert plan["version"] == 1 and len(plan["layers"]) == 2
    assert (plan["hidden"], plan["num_heads"], plan["kv_heads"], plan["head_dim"]) == (64, 4, 4, 16)
    assert plan["intermediate"] == 128 and plan["vocab"] == 384 and plan["rotary_half"] == 8
    layer = plan["layers"][0]
    assert layer["qkv"]["N"] == 3 * 64 and layer["gate_up"]["N"] == 2 * 128 and layer["up"] is None
    assert {layer[k]["bits"] for k in ("qkv", "o", "gate_up", "down")} == {bits}
    assert plan["lm_head"]["bits"] == 8 and plan["lm_head"]["N"] == 384
    assert layer["past_key"] == "past_key_values.0.key"
    assert layer["qkv"]["weight"]["file"] == "decoder.onnx.data"


def test_fp32_bundle_has_no_plan_and_decodes_with_onnxruntime(tmp_path_factory):
    from edgevlm.runtime import Session

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    assert "native_decode" not in _manifest(src)["components"]["decoder"]
    s = Session.from_bundle(src, threads=1, hash_stamps=None)
    assert s.decode_backend == "onnxruntime" and "no native_decode plan" in s.native_info["reason"]
    with pytest.raises(NativeUnavailable, match="native_decode='on' but the bundle has no native_decode plan"):
        Session.from_bundle(src, threads=1, hash_stamps=None, native_decode="on")
    with pytest.raises(ConfigError, match="native_decode must be one of"):
        Session.from_bundle(src, threads=1, hash_stamps=None, native_decode="fast")


def test_plan_reason_names_what_the_kernel_cannot_run(tmp_path_factory):
    from edgevlm.runtime.kv_cache import KVSpec

    path = _quantized(tmp_path_factory, "int4")
    m = _manifest(path)
    plan, spec = m["components"]["decoder"]["native_decode"], KVSpec.from_manifest(m["components"]["decoder"]
                                                                                       ["kv_cache"])
    assert plan_reason(plan, spec) is None
    bad = json.loads(json.dumps(plan))
    bad["layers"][1]["down"]["block_size"] = 32
    assert "4-bit block 32" in plan_reason(bad, spec)
    assert "version 9" in plan_reason({**plan, "version": 9}, spec)
    assert "KV inputs" in plan_reason({**plan, "layers": plan["layers"][::-1]}, spec)


# ---- the kernel --------------------------------------------------------------------------------------------------
def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, nb, blk] integer codes -> MatMulNBits bytes (4-bit: element 2j low nibble, 2j+1 high nibble)."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q


def _quant_x(x: np.ndarray, blk: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activation quantization in numpy: int8 per block, scale max|x| / 127, round half to even."""
    xp = np.zeros(nb * blk, np.float32)
    xp[:x.size] = x
    xb = xp.reshape(nb, blk)
    amax = np.abs(xb).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.float32)
    return q, (amax / np.float32(127)).astype(np.float32)


def _gemv_case(rng, bits: int, blk: int, K: int, N: int, with_zp: bool):
    """Random MatMulNBits weights ``[N, K]`` (``bits`` 4 / 8, blocks of ``blk``, optional zero points) and an input:
    ``(case, want, dense)``: the kernel's inputs (``B`` packed, ``scales``, ``zp`` bytes or None, ``x``, dims), the
    exact quantized result (int8 activations per block) and the dequantized fp32 weights (also used by the ARM64
    harness tests, tests/test_native_arm.py)."""
    nb = -(-K // blk)
    top = 15 if bits == 4 else 255
    codes = rng.integers(0, top + 1, (N, nb, blk))
    scales = rng.uniform(0.01, 0.1, (N, nb)).astype(np.float32)
    zbytes = None
    if with_zp:
        zps = rng.integers(0, top + 1, (N, nb))
        if bits == 4:
            zpad = np.zeros((N, 2 * ((nb + 1) // 2)), np.uint8)
            zpad[:, :nb] = zps
            zbytes = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)
        else:
            zbytes = zps.astype(np.uint8)
    else:
        zps = np.full((N, nb), 8 if bits == 4 else 128)
    x = rng.standard_normal(K).astype(np.float32)
    qx, sx = _quant_x(x, blk, nb)
    w = (codes - zps[..., None]).astype(np.float64)                       # [N, nb, blk]
    want = (np.einsum("nbk,bk->nb", w, qx.astype(np.float64)) * scales * sx[None, :]).sum(axis=1)
    dense = ((codes - zps[..., None]) * scales[..., None]).reshape(N, -1)[:, :K]
    return ({"B": _pack(codes, bits), "scales": scales, "zp": zbytes, "x": x, "N": N, "K": K, "blk": blk,
             "bits": bits}, want, dense)


@pytest.mark.parametrize("bits,blk,K,with_zp", [(4, 128, 200, False), (4, 256, 512, True), (4, 128, 64, True),
                                                (8, 64, 200, False), (8, 128, 256, True)])
def test_gemv_is_the_matmulnbits_arithmetic(bits, blk, K, with_zp, kernel_path):
    _fallback_checked()
    from edgevlm.runtime.native import build
    from edgevlm.runtime.native.engine import _Linear

    lib = build.load()
    assert build.loaded_isa(lib) == build.isa_path()
    rng = np.random.default_rng(bits * 1000 + blk + K)
    N, nb = 37, -(-K // blk)
    case, want, dense = _gemv_case(rng, bits, blk, K, N, with_zp)
    B, scales, zbytes, x = np.ascontiguousarray(case["B"]), case["scales"], case["zp"], case["x"]
    lin = _Linear(B.ctypes.data, scales.ctypes.data, zbytes.ctypes.data if zbytes is not None else None, N, K, blk,
                  bits)
    y = np.zeros(N, np.float32)
    xq, xs, xc = np.zeros(nb * blk, np.int8), np.zeros(nb, np.float32), np.zeros(nb, np.float32)
    lib.evlm_gemv.argtypes = [ctypes.POINTER(_Linear)] + [ctypes.c_void_p] * 5 + [ctypes.c_int]
    lib.evlm_gemv(ctypes.byref(lin), x.ctypes.data, y.ctypes.data, xq.ctypes.data, xs.ctypes.data, xc.ctypes.data,
                  2)
    # exactly the quantized arithmetic (int8 activations per block)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    # and close to the fp32 product of the dequantized weights
    ref = dense @ x
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_row_scheduler_covers_every_row_once_at_any_thread_count():
    """Work stealing moves chunks between threads, never the arithmetic of a row: every thread count gives the
    single-thread result bit for bit, and no row is left unwritten (y starts as NaN on every call). More threads
    than cores (here) means preempted owners, i.e. the stealing paths run."""
    _fallback_checked()
    from edgevlm.runtime.native import build
    from edgevlm.runtime.native.engine import _Linear

    lib = build.load()
    lib.evlm_gemv.argtypes = [ctypes.POINTER(_Linear)] + [ctypes.c_void_p] * 5 + [ctypes.c_int]
    rng = np.random.default_rng(7)
    for bits, N, K in ((4, 3001, 512), (8, 517, 1024)):
        blk = 128
        nb = K // blk
        B = np.ascontiguousarray(_pack(rng.integers(0, 2**bits, (N, nb, blk)), bits))
        scales = rng.uniform(0.01, 0.1, (N, nb)).astype(np.float32)
        lin = _Linear(B.ctypes.data, scales.ctypes.data, None, N, K, blk, bits)
        x = rng.standard_normal(K).astype(np.float32)
        xq, xs, xc = np.zeros(K, np.int8), np.zeros(nb, np.float32), np.zeros(nb, np.float32)

        def gemv(threads):
            y = np.full(N, np.nan, np.float32)
            lib.evlm_gemv(ctypes.byref(lin), x.ctypes.data, y.ctypes.data, xq.ctypes.data, xs.ctypes.data,
                          xc.ctypes.data, threads)
            return y

        want = gemv(1)
        assert np.isfinite(want).all()
        for threads in (2, 3, 7, 16):
            for _ in range(5):
                np.testing.assert_array_equal(gemv(threads), want)


def test_native_step_is_the_same_at_any_thread_count(tmp_path_factory):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session

    path = _quantized(tmp_path_factory, "int4")
    img = make_image(6)
    runs = []
    for threads in (1, 2, 5):
        s = Session.from_bundle(path, threads=threads, hash_stamps=None, native_decode="on")
        r = s.generate(img, QUESTION, max_new_tokens=12, ignore_eos=True)
        runs.append((r.tokens, s.last_logits.copy()))
    for tokens, logits in runs[1:]:
        assert tokens == runs[0][0]
        np.testing.assert_array_equal(logits, runs[0][1])


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_native_decode_gives_onnxruntimes_tokens(tmp_path_factory, precision, kernel_path):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session
    from edgevlm.runtime.native import isa_path

    path = _quantized(tmp_path_factory, precision)
    nat = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="on")
    ort = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="off")
    assert nat.decode_backend == "native" and ort.decode_backend == "onnxruntime"
    assert nat.native_info["isa"] == isa_path() and isa_path() in ("avx512-vnni", "avx2", "neon-dotprod")
    assert nat.native_info["build"] in ("prebuilt", "compiled on demand")
    if kernel_path == "avx2":
        assert nat.native_info["isa"] == "avx2"
    img = make_image(3)
    a = nat.generate(img, QUESTION, max_new_tokens=24, ignore_eos=True)
    b = ort.generate(img, QUESTION, max_new_tokens=24, ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens) == 24
    assert a.timings.decode_backend == "native" and b.timings.decode_backend == "onnxruntime"
    la, lb = nat.last_logits, ort.last_logits
    assert np.abs(la - lb).max() < 0.05 * np.abs(lb).max()
    # the KV rows the native steps wrote are the ones ONNX Runtime writes for the same tokens
    n = a.timings.prompt_tokens + len(a.tokens) - 1
    ka, kb = nat.kv._buffers[0].numpy()[0, :, :n], ort.kv._buffers[0].numpy()[0, :, :n]
    assert np.abs(ka - kb).max() < 0.05 * np.abs(kb).max()
    # sampling and a second request on the same buffers
    s1 = nat.generate(img, QUESTION, max_new_tokens=8, temperature=0.8, seed=1)
    s2 = ort.generate(img, QUESTION, max_new_tokens=8, temperature=0.8, seed=1)
    assert s1.tokens == s2.tokens


def test_fp16_cache_holds_the_fp32_rows_and_fp32_mode_reads_onnxruntimes_buffers(tmp_path_factory):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session

    path = _quantized(tmp_path_factory, "int4")
    h = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="on")
    f = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="on", native_kv="float32")
    o = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="off")
    assert h.native_info["kv_dtype"] == "float16" and f.native_info["kv_dtype"] == "float32"
    img = make_image(5)
    a, b, c = (s.generate(img, QUESTION, max_new_tokens=16, ignore_eos=True) for s in (h, f, o))
    assert a.tokens == b.tokens == c.tokens
    # every row the prefill and the steps wrote is in the fp16 copy, rounded to nearest (numpy's float16 cast)
    n = a.timings.prompt_tokens + len(a.tokens) - 1
    kv16 = h.native._kv16
    for layer in (0, 1):
        for j in (0, 1):
            rows32 = h.kv._buffers[2 * layer + j].numpy()[0, :, :n]
            np.testing.assert_array_equal(kv16[layer, j, :, :n], rows32.astype(np.float16))
            assert not kv16[layer, j, :, n:].any()
    assert f.native._kv16 is None
    # both close to ONNX Runtime's logits
    err16, err32 = (np.abs(s.last_logits - o.last_logits).max() for s in (h, f))
    scale = np.abs(o.last_logits).max()
    assert err32 < 0.05 * scale and err16 < 0.05 * scale
    with pytest.raises(ConfigError, match="native_kv must be one of"):
        Session.from_bundle(path, threads=1, hash_stamps=None, native_kv="int8")


def test_native_decode_stops_at_the_context(tmp_path_factory):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session

    s = Session.from_bundle(_quantized(tmp_path_factory, "int4"), threads=1, hash_stamps=None, native_decode="on")
    r = s.generate(make_image(4), QUESTION, max_new_tokens=10_000, ignore_eos=True)
    assert r.finish_reason == "context_full"
    assert r.timings.prompt_tokens + len(r.tokens) - 1 == s.context_length
    with pytest.raises(ValueError, match="outside the KV buffer"):
        s.native.step(s.embed_table[5], s.context_length, s._logits_row)


def test_tampered_plan_is_a_bundle_error(tmp_path_factory, tmp_path):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session

    dst = tmp_path / "b"
    shutil.copytree(_quantized(tmp_path_factory, "int4"), dst)
    m = _manifest(dst)
    ref = m["components"]["decoder"]["native_decode"]["layers"][1]["o"]["weight"]
    ref["offset"] = (dst / "decoder.onnx.data").stat().st_size - 8
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="does not fit 'decoder.onnx.data'"):
        Session.from_bundle(dst, threads=1, hash_stamps=None)
    ref["offset"], ref["file"] = 0, "../outside.data"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="native_decode"):
        Session.from_bundle(dst, threads=1, hash_stamps=None)


def test_availability_names_what_is_missing(monkeypatch, tmp_path, tmp_path_factory):
    from edgevlm.runtime import Session
    from edgevlm.runtime.native import build

    monkeypatch.setattr(build.platform, "system", lambda: "Linux")
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse4_2", "fma"})
    assert "lacks avx2, f16c (the native decode kernel needs AVX-512 VNNI, or AVX2" in build.availability()
    assert build.isa_path() is None
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert build.isa_path() == "avx2" and "-mno-avx512f" in build.cflags()
    monkeypatch.setattr(build, "cpu_flags", lambda: set(build.REQUIRED_FLAGS) | {"avx2", "f16c"})
    assert build.isa_path() == "avx512-vnni" and "-mno-avx512f" not in build.cflags()
    monkeypatch.setenv(build.MARCH_ENV, "znver3")
    assert "-march=znver3" in build.cflags() and "-march=native" not in build.cflags()
    monkeypatch.delenv(build.MARCH_ENV)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    monkeypatch.setattr(build, "library_path", lambda: tmp_path / "absent.so")
    monkeypatch.setattr(build, "prebuilt_variant", lambda *a, **k: None)    # an install without prebuilt variants
    assert "no C compiler found" in build.availability()
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        build.load()
    # a session on a plan-carrying bundle falls back to ONNX Runtime and says why; "on" refuses
    path = _quantized(tmp_path_factory, "int4")
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    assert s.decode_backend == "onnxruntime" and "no C compiler" in s.native_info["reason"]
    with pytest.raises(NativeUnavailable, match="native_decode='on' but no C compiler"):
        Session.from_bundle(path, threads=1, hash_stamps=None, native_decode="on")
    # ARM64: the NEON + dot product path, or a refusal naming the missing flag
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(build, "cpu_flags", lambda: {"fp", "asimd", "atomics", "asimddp"})
    assert build.isa_path() == "neon-dotprod" and "-mno-avx512f" not in build.cflags()
    monkeypatch.setattr(build, "cpu_flags", lambda: {"fp", "asimd", "atomics"})
    assert build.isa_path() is None
    assert "lacks asimddp (the native decode kernel needs ARM64 NEON with the dot product" in build.availability()
    monkeypatch.setattr(build.platform, "machine", lambda: "riscv64")
    assert "x86-64 and ARM64 Linux only (this is Linux riscv64)" in build.availability()


def test_cpu_mask_hides_flags_from_the_runtimes_dispatch(monkeypatch, tmp_path_factory):
    """EDGEVLM_CPU_MASK=avx512 makes this CPU look AVX2-only to edgevlm's own dispatch (on every machine: where the
    CPU has no AVX-512 there is nothing to hide and the answer is the same)."""
    from edgevlm.runtime import Session, cpuinfo

    raw = cpuinfo.raw_cpu_flags()
    monkeypatch.setenv(cpuinfo.MASK_ENV, "avx512, amx")
    flags = cpuinfo.cpu_flags()
    assert not any(f.startswith(("avx512", "amx")) for f in flags) and flags <= raw
    assert flags | cpuinfo.masked_flags() == set(raw)
    if cpuinfo.is_x86():
        assert cpuinfo.has_int8_dot() == ("avx_vnni" in raw or "avx_vnni_int8" in raw)
    from edgevlm.runtime.native import build

    reason = availability()
    s = Session.from_bundle(_quantized(tmp_path_factory, "int4"), threads=1, hash_stamps=None)
    if build.isa_path() == "avx2":                     # AVX-512 hidden: the kernel's AVX2 path runs
        assert reason is None and s.decode_backend == "native" and s.native_info["isa"] == "avx2"
    else:
        assert reason is not None and s.decode_backend == "onnxruntime" and s.native_info["reason"] == reason
    monkeypatch.setenv(cpuinfo.MASK_ENV, "vnni")
    assert not cpuinfo.has_int8_dot() and cpuinfo.int8_saturates() == cpuinfo.is_x86()


def test_bench_environment_records_hidden_flags(monkeypatch):
    from edgevlm.bench.env import cpu_info
    from edgevlm.runtime import cpuinfo

    monkeypatch.delenv(cpuinfo.MASK_ENV, raising=False)
    assert "isa_hidden" not in cpu_info()
    monkeypatch.setenv(cpuinfo.MASK_ENV, "avx512")
    hidden = cpu_info().get("isa_hidden")
    raw = cpuinfo.raw_cpu_flags()
    if any(f.startswith("avx512") for f in raw):
        assert hidden["by"] == cpuinfo.MASK_ENV and "avx512f" in hidden["flags"]
    else:
        assert hidden is None                          # an AVX2-only CPU has nothing to hide


# ---- the weights are read in place (issue 17, item 6) ------------------------------------------------------------
def _maps() -> list[tuple[int, int, str, str]]:
    """``/proc/self/maps`` as (start, end, permissions, path)."""
    out = []
    for line in open("/proc/self/maps", encoding="ascii", errors="replace"):
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def _weight_pointers(dec) -> tuple[list[int], int]:
    """Every weight pointer the kernel reads from the bundle's data file (each matmul's blob, scales and zero points,
    the LM head's included), and the bytes of the plan's inline tensors (tiny ones ONNX keeps in the graph)."""
    m, plan, ptrs, inline = dec._model, dec.plan, [], 0
    pairs = [(m.head, plan["lm_head"])] + [(getattr(m.layers[i], f), plan["layers"][i][f])
                                           for i in range(m.num_layers) for f in ("qkv", "o", "gate_up", "down")]
    for lin, lp in pairs:
        for ptr, ref in ((lin.B, lp["weight"]), (lin.scales, lp["scales"]), (lin.zp, lp.get("zero_points"))):
            if ref is None:
                assert not ptr
            elif "inline" in ref:
                inline += 4 * len(ref["inline"]) if ref["dtype"] == "float32" else len(ref["inline"])
            else:
                ptrs.append(ptr)
    return ptrs, inline


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_native_weights_are_a_read_only_shared_mapping_of_the_bundle(tmp_path_factory, precision):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session
    from edgevlm.runtime.native import NativeDecoder

    path = _quantized(tmp_path_factory, precision)
    s = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="on")
    o = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="off")
    dec = s.native
    assert isinstance(dec, NativeDecoder)
    data = str((path / "decoder.onnx.data").resolve())
    maps = _maps()
    ptrs, inline = _weight_pointers(dec)
    assert len(ptrs) >= 1 + 2 * 4                          # at least every blob
    for p in ptrs:
        where = [(perm, name) for lo, hi, perm, name in maps if lo <= p < hi]
        # inside the bundle's file, mapped read-only and shared: the page cache's pages, no private or anonymous copy
        assert where == [("r--s", data)], (hex(p), where)
    (info,) = dec.mappings()
    assert info["file"] == "decoder.onnx.data" and info["bytes"] == (path / "decoder.onnx.data").stat().st_size
    # private bytes: the inline tensors and the norms / rotary tables, nothing of the matmuls' file data
    assert dec.copied_weight_bytes < 64 * 1024 and inline <= dec.copied_weight_bytes
    # and it decodes ONNX Runtime's tokens from those pages (the request of the token test above: greedy argmax on a
    # random tiny model has near-ties, so another image can part at a tie on some exports)
    img = make_image(3)
    a = s.generate(img, QUESTION, max_new_tokens=24, ignore_eos=True)
    b = o.generate(img, QUESTION, max_new_tokens=24, ignore_eos=True)
    assert a.timings.decode_backend == "native" and a.tokens == b.tokens


def test_closed_native_decoder_unmaps_its_weights_and_refuses_to_step(tmp_path_factory):
    _fallback_checked(tmp_path_factory)
    from edgevlm.runtime import Session

    path = _quantized(tmp_path_factory, "int4")
    s = Session.from_bundle(path, threads=1, hash_stamps=None, native_decode="on")
    dec = s.native
    (info,) = dec.mappings()
    lo = info["address"]
    dec.close()
    dec.close()                                            # idempotent
    assert not any(a <= lo < b for a, b, _, _ in _maps())
    with pytest.raises(RuntimeError, match="close"):
        dec.step(s.embed_table[5], 0, s._logits_row)
    with pytest.raises(RuntimeError, match="close"):
        dec.bind([0] * (2 * dec._model.num_layers), 8)


def test_weight_mapping_refaults_small_folio_page_cache_once(tmp_path, monkeypatch):
    """A file whose cached pages are mostly small folios (written moments ago) but partly huge is dropped from the
    page cache and mapped again, once; a file system with no huge folios at all (0 PMD-mapped) is left alone."""
    import os

    from edgevlm.runtime.native import engine

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS (the weights are mapped without the retry)")
    f = tmp_path / "w.data"
    f.write_bytes(bytes(range(256)) * 64)
    for first, retried in ((1, True), (0, False), (None, False)):
        calls: list[int] = []
        pmd = iter([first, 16384])
        monkeypatch.setattr(engine, "_pmd_bytes", lambda mm: next(pmd))
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(advice))
        t = engine._Tensors(tmp_path)
        arr = t.get({"name": "w", "file": "w.data", "offset": 256, "length": 512, "dtype": "uint8",
                     "shape": [512]}, "uint8")
        assert calls == ([os.POSIX_FADV_DONTNEED] if retried else [])
        assert arr.tobytes() == (bytes(range(256)) * 3)[:512] and not arr.flags.writeable
        t.close()
