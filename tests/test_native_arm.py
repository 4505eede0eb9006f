"""The native decode kernel without Python, through tests/native_harness.c: on this machine (default suite: checks
the harness itself, on whichever x86 path this CPU compiles), and cross-compiled for ARM64 NEON + dot product
(``aarch64-linux-gnu-gcc -march=armv8.2-a+dotprod``) under ``qemu-aarch64 -cpu cortex-a76`` (marked ``isa``: ``make
test-isa``; skipped with the reason where the cross compiler or qemu-aarch64 is missing).

The harness gets what the ctypes engine would give the kernel: the bundle's weight file at the ``native_decode``
plan's offsets, the KV state after ONNX Runtime's prefill and the embedding table. Its greedy tokens must be ONNX
Runtime's, its last logits and KV rows close to them, its fp16 KV copy the rounding of its fp32 rows; its
matrix-vector products must be the exact MatMulNBits integer arithmetic (4-bit and 8-bit, blocks 64-256, with and
without zero points, K not a multiple of the block, thousands of rows over several threads).
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess

import numpy as np
import pytest

import native_harness as nh
from fixtures_bundles import QUESTION, make_image
from test_native import _gemv_case, _quantized

from edgevlm.runtime import cpuinfo
from edgevlm.runtime.native import build

ISA_CODES = {"avx512-vnni": 1, "avx2": 2, "neon-dotprod": 3}
STEPS = 23                                   # the request of test_native's token test: 24 tokens, 23 native steps


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    """``(command prefix, executable, expected ISA code)`` for the harness compiled for this CPU (-march=native)."""
    if build._machine() is None:
        pytest.skip(f"the native kernel runs on x86-64 / ARM64 Linux only (this is {platform.machine()})")
    isa = build.isa_path(set(cpuinfo.raw_cpu_flags()))
    if isa is None:
        pytest.skip("this CPU runs none of the native kernel's paths")
    cc = build.find_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("harness-host") / "native_harness"
    p = nh.compile_harness(cc, exe, ("-O2", "-march=native"))
    assert p.returncode == 0, p.stderr[-3000:]
    return [], exe, ISA_CODES[isa]


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness-arm64") / "native_harness"
    prefix, reason = nh.cross_compile_arm(exe)
    if reason:
        pytest.skip(reason)
    return prefix, exe, ISA_CODES["neon-dotprod"]


@pytest.fixture(params=[pytest.param("host", id="host"),
                        pytest.param("arm", id="arm64-qemu", marks=[pytest.mark.isa, pytest.mark.timeout(600)])])
def harness(request):
    return request.getfixturevalue(f"{request.param}_harness")


def test_harness_gemv_is_the_matmulnbits_arithmetic(harness, tmp_path):
    prefix, exe, isa = harness
    rng = np.random.default_rng(19)
    shapes = [(4, 128, 200, 37, False), (4, 256, 512, 37, True), (4, 128, 64, 37, True), (8, 64, 200, 37, False),
              (8, 128, 256, 37, True), (4, 128, 512, 3001, False), (8, 128, 1024, 517, True)]
    cases, wants, _ = zip(*(_gemv_case(rng, *s) for s in shapes))
    spec = nh.write_gemv(tmp_path, cases, threads=3)
    assert nh.run(prefix, exe, spec, tmp_path / "y.bin") == isa
    for y, want, c in zip(nh.read_gemv(tmp_path / "y.bin", [c["N"] for c in cases]), wants, cases):
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3 * np.abs(want).max(),
                                   err_msg=f"{c['bits']}-bit blk {c['blk']} K {c['K']} N {c['N']}")


_REFS: dict[str, dict] = {}


def _onnxruntime_reference(tmp_path_factory, precision: str) -> dict:
    """ONNX Runtime's greedy request on the quantized tiny bundle: its tokens, last logits, KV rows, and the KV state
    right after its prefill (rows [0, P): later steps only write rows >= P)."""
    if precision not in _REFS:
        from edgevlm.runtime import Session

        path = _quantized(tmp_path_factory, precision)
        s = Session.from_bundle(path, threads=2, hash_stamps=None, native_decode="off")
        r = s.generate(make_image(3), QUESTION, max_new_tokens=STEPS + 1, ignore_eos=True)
        plan = json.loads((path / "manifest.json").read_text())["components"]["decoder"]["native_decode"]
        P, n = r.timings.prompt_tokens, len(r.tokens)
        assert n == STEPS + 1
        layers, kvh, hd = len(plan["layers"]), int(plan["kv_heads"]), int(plan["head_dim"])
        rows = np.zeros((layers, 2, kvh, P + STEPS, hd), np.float32)
        for i in range(2 * layers):
            rows[i // 2, i % 2] = s.kv._buffers[i].numpy()[0, :, :P + STEPS]
        prefill = rows.copy()
        prefill[:, :, :, P:] = 0
        _REFS[precision] = {"path": path, "plan": plan, "P": P, "tokens": list(r.tokens),
                            "logits": np.array(s.last_logits, np.float32), "kv": rows, "prefill": prefill,
                            "embed": np.asarray(s.embed_table, np.float32)}
    return _REFS[precision]


@pytest.mark.parametrize("precision,kv16", [("int4", True), ("int8", True), ("int4", False)],
                         ids=["int4", "int8", "int4-fp32kv"])
def test_harness_decode_gives_onnxruntimes_tokens(harness, tmp_path_factory, tmp_path, precision, kv16):
    pytest.importorskip("onnxruntime_genai")
    prefix, exe, isa = harness
    ref = _onnxruntime_reference(tmp_path_factory, precision)
    P, plan = ref["P"], ref["plan"]
    spec = nh.write_decode(tmp_path, ref["path"], plan, ref["prefill"], P, ref["tokens"][0], STEPS, ref["embed"],
                           threads=2, kv16=kv16)
    assert nh.run(prefix, exe, spec, tmp_path / "out.bin") == isa
    out = nh.read_decode(tmp_path / "out.bin", ref["kv"].shape, int(plan["vocab"]), kv16)
    assert out["isa"] == isa
    assert out["tokens"] == ref["tokens"][1:]
    scale = np.abs(ref["logits"]).max()
    assert np.abs(out["logits"] - ref["logits"]).max() < 0.05 * scale
    kv, want = out["kv"], ref["kv"]
    np.testing.assert_array_equal(kv[:, :, :, :P], want[:, :, :, :P])       # the prefill's rows, untouched
    assert np.abs(kv - want).max() < 0.05 * np.abs(want).max()             # the rows the steps wrote
    if kv16:                                                                # fp16 copy: every row, rounded
        np.testing.assert_array_equal(out["kv16"], kv.astype(np.float16))


@pytest.mark.isa
def test_arm_harness_runs_the_dot_product(arm_harness, tmp_path):
    """The ARM64 build really executes sdot (there is no scalar path to fall back on): on an emulated A64FX (ARMv8.2
    with LSE atomics but without the dot product) it starts, reports the NEON path, and dies of SIGILL in its first
    matrix-vector product."""
    prefix, exe, _ = arm_harness
    models = subprocess.run([prefix[0], "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout.split()
    if "a64fx" not in models:
        pytest.skip("this qemu-aarch64 models no A64FX (an ARMv8.2 CPU without the dot product)")
    rng = np.random.default_rng(3)
    case, _, _ = _gemv_case(rng, 4, 128, 256, 8, False)
    spec = nh.write_gemv(tmp_path, [case], threads=1)
    p = subprocess.run([prefix[0], "-cpu", "a64fx", *prefix[3:], str(exe), str(spec), str(tmp_path / "y.bin")],
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["isa", "3"], p.stdout
    assert p.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (p.returncode, p.stderr[-2000:])
