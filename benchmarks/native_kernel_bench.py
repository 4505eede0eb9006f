"""How fast the native decode kernel streams a model's decode weights on this machine, per thread count.

No bundle needed: random 4-bit weights (block 128, symmetric, as ``quantize_bundle`` writes them for CPU targets)
with the decoder's shapes: per layer the packed QKV, o, fused gate/up and down projections, plus the 8-bit LM head,
laid out one after another in one huge-page-advised mapping like the runtime's weight arena. One pass is every
matrix-vector product of a decode step in order (no attention, norms or KV cache): the weight-streaming part of a
step, which is what decode speed is made of at batch 1. Each thread count is measured next to two read-bandwidth
references with the same number of threads: a plain AVX-512 streaming read of the same arena by the kernel's OpenMP
threads (``evlm_read_stream``: what this machine's memory gives to this access pattern) and
``edgevlm.bench.env.bandwidth`` (numpy, the figure the runtime benchmarks' rooflines use; it scales with threads
only where numpy releases the GIL around its BLAS call). Writes JSON with the environment.

    python benchmarks/native_kernel_bench.py --model mobilevlm-1.7b --threads 1 2 \\
        --json benchmarks/results/native_kernel_mobilevlm-1.7b.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgevlm.bench.env import bandwidth, environment  # noqa: E402
from edgevlm.config import get_model_config  # noqa: E402
from edgevlm.runtime.native import availability, build  # noqa: E402
from edgevlm.runtime.native.engine import _Linear  # noqa: E402


def shapes(model: str) -> list[tuple[str, int, int, int]]:
    """(name, N, K, bits) of every matmul of one decode step, in order."""
    c = get_model_config(model).llm
    d, f, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_heads
    layer = [("qkv", (c.num_heads + 2 * c.num_kv_heads) * hd, d, 4), ("o", d, c.num_heads * hd, 4),
             ("gate_up", 2 * f, d, 4), ("down", d, f, 4)]
    return [s for _ in range(c.num_layers) for s in layer] + [("lm_head", c.vocab_size, d, 8)]


class Weights:
    """Random MatMulNBits blobs for ``shapes`` in one anonymous MADV_HUGEPAGE mapping (the runtime's arena)."""

    def __init__(self, mats: list[tuple[str, int, int, int]], blk: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes = []
        for _, n, k, bits in mats:
            nb = -(-k // blk)
            sizes.append((n * nb * blk * bits // 8, n * nb * 4))
        total = sum(-(-a // 64) * 64 + -(-b // 64) * 64 for a, b in sizes)
        self.arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.arena.madvise(mmap.MADV_HUGEPAGE)
        self.bytes = sum(a + b for a, b in sizes)
        self.linears: list[_Linear] = []
        self.k_max = max(k for _, _, k, _ in mats)
        off = 0
        base = np.frombuffer(self.arena, np.uint8)
        for (_, n, k, bits), (wb, sb) in zip(mats, sizes):
            w = base[off:off + wb]
            w[:] = rng.integers(0, 256, wb, dtype=np.uint8)
            off += -(-wb // 64) * 64
            s = base[off:off + sb].view(np.float32)
            s[:] = rng.uniform(0.005, 0.02, s.size).astype(np.float32)
            off += -(-sb // 64) * 64
            self.linears.append(_Linear(w.ctypes.data, s.ctypes.data, None, n, k, blk, bits))


def stream_gbs(lib: ctypes.CDLL, wts: Weights, threads: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` plain read of the whole arena with ``threads`` OpenMP threads."""
    lib.evlm_read_stream.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.evlm_read_stream.restype = ctypes.c_uint64
    base = ctypes.addressof(ctypes.c_char.from_buffer(wts.arena))
    n = len(wts.arena) // 64 * 64
    best = 0.0
    for _ in range(repeats + 1):
        t = time.perf_counter()
        lib.evlm_read_stream(base, n, threads)
        best = max(best, n / (time.perf_counter() - t) / 1e9)
    return best


def measure(lib: ctypes.CDLL, wts: Weights, threads: int, passes: int) -> dict[str, Any]:
    lib.evlm_gemv.argtypes = [ctypes.POINTER(_Linear)] + [ctypes.c_void_p] * 5 + [ctypes.c_int]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(wts.k_max).astype(np.float32)
    y = np.zeros(max(lin.N for lin in wts.linears), np.float32)
    kp = -(-wts.k_max // 128) * 128
    xq, xs, xc = np.zeros(kp, np.int8), np.zeros(kp // 128, np.float32), np.zeros(kp // 128, np.float32)
    args = [x.ctypes.data, y.ctypes.data, xq.ctypes.data, xs.ctypes.data, xc.ctypes.data, threads]
    times = []
    for i in range(passes + 1):
        t = time.perf_counter()
        for lin in wts.linears:
            lib.evlm_gemv(ctypes.byref(lin), *args)
        if i:                                                 # pass 0 warms up (page faults, thread pool)
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return {"threads": threads, "pass_ms_median": ms, "pass_ms_min": min(times) * 1e3,
            "gbs_median": wts.bytes / ms / 1e6, "gbs_best": wts.bytes / min(times) / 1e9, "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilevlm-1.7b")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    reason = availability()
    if reason:
        raise SystemExit(f"the native kernel cannot run here: {reason}")
    lib = build.load()
    mats = shapes(args.model)
    t = time.perf_counter()
    wts = Weights(mats)
    print(f"{args.model}: {len(mats)} matmuls, {wts.bytes / 1e6:.0f} MB of int4 weights + 8-bit LM head "
          f"(generated in {time.perf_counter() - t:.1f} s)", flush=True)
    rows = []
    for n in args.threads:
        bw = bandwidth(n)
        r = measure(lib, wts, n, args.passes)
        r["stream_gbs"] = stream_gbs(lib, wts, n)
        r["numpy_read_gbs"] = bw[f"read_{n}threads_gbs"] if n > 1 else bw["read_1thread_gbs"]
        r["fraction_of_stream"] = r["gbs_median"] / r["stream_gbs"]
        r["fraction_of_numpy_read"] = r["gbs_median"] / r["numpy_read_gbs"]
        r["matmul_ceiling_tok_s"] = 1e3 / r["pass_ms_median"]
        rows.append(r)
        print(f"{n:>3} threads: {r['pass_ms_median']:7.2f} ms per pass = {r['gbs_median']:6.1f} GB/s; plain read "
              f"{r['stream_gbs']:.1f} GB/s ({r['fraction_of_stream']:.0%}), numpy read {r['numpy_read_gbs']:.1f} GB/s "
              f"({r['fraction_of_numpy_read']:.0%}); matmuls alone cap decode at {r['matmul_ceiling_tok_s']:.1f} "
              f"tok/s", flush=True)
    out = {"model": args.model, "weight_bytes": wts.bytes, "matmuls": len(mats), "results": rows,
           "environment": environment(args.threads), "kernel": str(build.library_path().name)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({"model": args.model, "gbs": {r["threads"]: round(r["gbs_median"], 2) for r in rows}}))


if __name__ == "__main__":
    main()
