"""The Python side of tests/native_harness.c: compile it (for this machine, or cross-compiled for ARM64 to run under
qemu-aarch64), write its inputs from a bundle's ``native_decode`` plan the way ``edgevlm.runtime.native.engine``
resolves them, and read its outputs back.

A spec is whitespace-separated text (see native_harness.c); tensors are ``file offset`` pairs into the listed files:
the bundle's own data file at the plan's offsets (as the engine maps it), and ``extra.bin`` for what the engine
would copy (inline tensors, fp32 tables at offsets that are not a multiple of 4) and for the harness's inputs (the KV
state after ONNX Runtime's prefill, the fp32 embedding table). Paths must not contain whitespace.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.runtime.native.variants import SOURCE, source_sha

HARNESS = Path(__file__).with_name("native_harness.c")
ARM_CC = "aarch64-linux-gnu-gcc"
ARM_FLAGS = ("-O2", "-march=armv8.2-a+dotprod")
ARM_SYSROOT = "/usr/aarch64-linux-gnu"                 # Debian's cross libraries (dynamic fallback: qemu -L)


def compile_harness(cc: str, out: Path, flags: Sequence[str], static: bool = False) -> subprocess.CompletedProcess:
    """``cc FLAGS -fopenmp native_harness.c (+ decode.c, #included) -o out -lm``."""
    cmd = [cc, *flags, "-fopenmp", "-std=gnu11", f"-I{SOURCE.parent}", f'-DEVLM_SOURCE_SHA="{source_sha()}"',
           str(HARNESS), "-o", str(out), "-lm"]
    if static:
        cmd.insert(1, "-static")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def cross_compile_arm(out: Path) -> tuple[list[str], str | None]:
    """The harness for ARM64 (NEON + dot product) and the qemu-aarch64 command prefix to run it; ``(None, reason)``
    when the cross compiler or qemu-aarch64 is missing."""
    qemu = shutil.which("qemu-aarch64")
    if shutil.which(ARM_CC) is None or qemu is None:
        missing = " and ".join(n for n, p in ((ARM_CC, shutil.which(ARM_CC)), ("qemu-aarch64", qemu)) if p is None)
        return [], (f"{missing} not found (apt-get install gcc-aarch64-linux-gnu qemu-user; .ci/run installs "
                    f"them)")
    models = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout.split()
    cpu = "cortex-a76" if "cortex-a76" in models else "max"   # ARMv8.2 + dotprod, as the Orin's Cortex-A78AE
    p = compile_harness(ARM_CC, out, ARM_FLAGS, static=True)
    if p.returncode == 0:
        return [qemu, "-cpu", cpu], None
    p2 = compile_harness(ARM_CC, out, ARM_FLAGS)             # no static libgomp: run against the cross libraries
    assert p2.returncode == 0, f"cross-compiling the harness failed:\n{p.stderr[-3000:]}\n{p2.stderr[-3000:]}"
    return [qemu, "-cpu", cpu, "-L", ARM_SYSROOT], None


def run(prefix: Sequence[str], exe: Path, spec: Path, out: Path, timeout: int = 600) -> int:
    """Run the harness; returns the ISA code it printed (``evlm_isa()``)."""
    p = subprocess.run([*prefix, str(exe), str(spec), str(out)], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"native_harness exit {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return int(p.stdout.split("isa", 1)[1].split()[0])


class _Blob:
    """``extra.bin``: arrays appended at 64-byte offsets."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> int:
        pad = -self.size % 64
        self.parts.append(b"\0" * pad)
        off = self.size + pad
        data = np.ascontiguousarray(arr).tobytes()
        self.parts.append(data)
        self.size = off + len(data)
        return off

    def write(self, path: Path) -> None:
        path.write_bytes(b"".join(self.parts) or b"\0")


def _check_path(p: Path) -> str:
    s = str(p.resolve())
    assert not any(c.isspace() for c in s), f"harness paths cannot contain whitespace: {s}"
    return s


def _linear_line(ref_of, lin: Mapping[str, Any] | None, label: str = "linear") -> str:
    n, k, blk, bits = int(lin["N"]), int(lin["K"]), int(lin["block_size"]), int(lin["bits"])
    refs = [ref_of(lin["weight"], "uint8"), ref_of(lin["scales"], "float32"),
            ref_of(lin.get("zero_points"), "uint8") if lin.get("zero_points") is not None else "-1 0"]
    return f"{label} {' '.join(refs)} {n} {k} {blk} {bits}"


def write_gemv(tmp: Path, cases: Sequence[Mapping[str, Any]], threads: int) -> Path:
    """A gemv spec: each case ``{"B", "scales", "zp" (or None), "x", "N", "K", "blk", "bits"}``."""
    blob = _Blob()
    lines = ["evlm-harness 1", "mode gemv", f"threads {threads}", "files 1", _check_path(tmp / "gemv.bin"),
             f"cases {len(cases)}"]
    for c in cases:
        b, s = blob.add(c["B"]), blob.add(c["scales"])
        z = f"0 {blob.add(c['zp'])}" if c.get("zp") is not None else "-1 0"
        lines.append(f"linear 0 {b} 0 {s} {z} {c['N']} {c['K']} {c['blk']} {c['bits']}")
        lines.append(f"x 0 {blob.add(np.asarray(c['x'], np.float32))}")
    blob.write(tmp / "gemv.bin")
    spec = tmp / "gemv.spec"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def write_decode(tmp: Path, bundle: Path, plan: Mapping[str, Any], kv: np.ndarray, prompt_len: int, first: int,
                 steps: int, embed_table: np.ndarray, *, threads: int = 2, kv16: bool = True) -> Path:
    """A decode spec for ``plan`` (the manifest's ``native_decode``): ``kv`` fp32 ``[layers, 2, kv_heads, max_len,
    head_dim]`` holding the prefill's rows ``[0, prompt_len)``; ``first``: the token the prefill's logits gave."""
    blob = _Blob()
    files = [_check_path(tmp / "extra.bin")]
    index: dict[str, int] = {}

    def ref_of(ref: Mapping[str, Any], dtype: str) -> str:
        assert ref.get("dtype") == dtype, (ref.get("name"), ref.get("dtype"), dtype)
        if "inline" in ref:
            return f"0 {blob.add(np.asarray(ref['inline'], dtype))}"
        off = int(ref["offset"])
        if off % np.dtype(dtype).itemsize:                 # the engine copies these, so does the harness
            data = np.fromfile(bundle / ref["file"], np.uint8, count=int(ref["length"]), offset=off)
            return f"0 {blob.add(data)}"
        path = _check_path(bundle / ref["file"])
        if path not in index:
            index[path] = len(files)
            files.append(path)
        return f"{index[path]} {off}"

    L, kvh, max_len, hd = kv.shape[0], kv.shape[2], kv.shape[3], kv.shape[4]
    assert kv.shape[1] == 2 and L == len(plan["layers"]) and kv.dtype == np.float32
    lines = [f"dims {L} {plan['hidden']} {plan['num_heads']} {kvh} {hd} {plan['intermediate']} {plan['vocab']} "
             f"{max_len} {plan['rotary_half']} {plan['max_positions']}",
             f"eps {float(plan['epsilon'])!r} scale {float(plan['scale'])!r}",
             f"cos {ref_of(plan['cos_cache'], 'float32')}", f"sin {ref_of(plan['sin_cache'], 'float32')}",
             f"final_norm {ref_of(plan['final_norm'], 'float32')}", _linear_line(ref_of, plan["lm_head"])]
    for lp in plan["layers"]:
        lines += [f"ln1 {ref_of(lp['input_norm'], 'float32')}", f"ln2 {ref_of(lp['post_attention_norm'], 'float32')}",
                  _linear_line(ref_of, lp["qkv"]), _linear_line(ref_of, lp["o"]), _linear_line(ref_of, lp["gate_up"]),
                  _linear_line(ref_of, lp["up"], "up linear") if lp["up"] is not None else "no_up",
                  _linear_line(ref_of, lp["down"])]
    lines += [f"kv 0 {blob.add(kv)}", f"kv16 {int(kv16)}", f"prompt {prompt_len}",
              f"embed 0 {blob.add(np.asarray(embed_table, np.float32))}", f"first {first}", f"steps {steps}"]
    blob.write(tmp / "extra.bin")
    head = ["evlm-harness 1", "mode decode", f"threads {threads}", f"files {len(files)}", *files]
    spec = tmp / "decode.spec"
    spec.write_text("\n".join(head + lines) + "\n")
    return spec


def read_gemv(out: Path, rows: Sequence[int]) -> list[np.ndarray]:
    y = np.fromfile(out, np.float32)
    assert y.size == sum(rows), (y.size, rows)
    return np.split(y, np.cumsum(rows)[:-1])


def read_decode(out: Path, kv_shape: tuple[int, ...], vocab: int, kv16: bool) -> dict[str, Any]:
    """``{"isa", "tokens", "logits", "kv", "kv16"}`` from a decode run's output."""
    raw = out.read_bytes()
    steps, isa = (int(v) for v in np.frombuffer(raw, np.int32, count=2))
    o = 8
    tokens = np.frombuffer(raw, np.int32, count=steps, offset=o).tolist()
    o += 4 * steps
    logits = np.frombuffer(raw, np.float32, count=vocab, offset=o)
    o += 4 * vocab
    n = int(np.prod(kv_shape))
    kv = np.frombuffer(raw, np.float32, count=n, offset=o).reshape(kv_shape)
    o += 4 * n
    k16 = np.frombuffer(raw, np.float16, count=n, offset=o).reshape(kv_shape) if kv16 else None
    o += 2 * n if kv16 else 0
    assert o == len(raw), (o, len(raw))
    return {"isa": isa, "tokens": tokens, "logits": logits, "kv": kv, "kv16": k16}
