"""Benchmark the ORT-CPU contrib-op decoder (``edgevlm.exporter.ort_decoder``) and hold a minimal driver for it.

The driver (``SharedKVDecoder``) is the reference for the runtime's ``shared_buffer`` KV mode: numpy + onnxruntime
only, IOBinding with one preallocated KV OrtValue per layer and tensor bound to both the past input and the present
output, the attention mask bound as a view of one preallocated array, the logits bound to a preallocated output,
greedy argmax. Positions are not an input (GroupQueryAttention derives them from the attention mask).

Steps (each prints one JSON line last; ``build`` needs torch + onnxruntime-genai, the rest numpy + onnxruntime)::

    # build the mobilevlm-1.7b-shaped decoder (random init) in the background: minutes, several GiB
    nohup .venv/bin/python benchmarks/ort_decoder_bench.py build --model mobilevlm-1.7b --precision int4 \\
        --out /tmp/ortdec/int4 > /tmp/ortdec/build-int4.log 2>&1 &
    # measure: load, prefill (200 tokens), decode (128 tokens), RSS, bandwidth/GEMM rooflines, optional profile
    .venv/bin/python benchmarks/ort_decoder_bench.py measure --decoder /tmp/ortdec/int4 --threads 2 \\
        --json benchmarks/results/ort_decoder_int4.json
    # accuracy_level sweep without rebuilding (rewrites the MatMulNBits attribute into a side graph)
    .venv/bin/python benchmarks/ort_decoder_bench.py measure --decoder /tmp/ortdec/int4 --accuracy-level 0
    # the decode-matmul ceiling: the decoder's 121 MatMulNBits (random weights, M = 1) chained in one graph, no
    # attention / norms; ms per pass = the fastest a decode step can be with ORT's kernel
    .venv/bin/python benchmarks/ort_decoder_bench.py kernel --model mobilevlm-1.7b --block-size 32 128 \
        --threads 1 2 --work-dir /tmp/ortdec/kernel --json benchmarks/results/matmulnbits_ceiling.json

The build writes ``decoder.onnx`` + ``decoder.onnx.data``, ``entry.json`` (the manifest component entry) and
``embed_tokens.npy`` (the embedding table the driver gathers from) into ``--out``. Keep those out of the repository.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------
def session_options(threads: int = 2, *, spinning: bool | None = None, dynamic_block_base: int | None = None,
                    opt_level: str = "all", profile_prefix: str | None = None,
                    config: dict[str, str] | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if dynamic_block_base is not None:
        so.add_session_config_entry("session.dynamic_block_base", str(dynamic_block_base))
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class SharedKVDecoder:
    """Drive a ``kv_cache.mode == "shared_buffer"`` decoder graph (batch 1 by default).

    >>> dec = SharedKVDecoder(session, num_layers=24, kv_heads=16, head_dim=128, max_length=2048)
    >>> logits = dec.prefill(prompt_embeds)          # [1, S, D] float32 -> [vocab] (a copy)
    >>> logits = dec.step(next_embed)                # [1, 1, D] float32 -> [vocab]
    """

    def __init__(self, session: Any, *, num_layers: int, kv_heads: int, head_dim: int, max_length: int,
                 batch: int = 1, vocab: int | None = None,
                 past_key: str = "past_key_values.{i}.key", past_value: str = "past_key_values.{i}.value",
                 present_key: str = "present.{i}.key", present_value: str = "present.{i}.value") -> None:
        import onnxruntime as ort

        self.session, self.batch, self.max_length = session, batch, max_length
        if vocab is None:
            vocab = int(next(o for o in session.get_outputs() if o.name == "logits").shape[-1])
        self.vocab = vocab
        self.binding = session.io_binding()
        shape = [batch, kv_heads, max_length, head_dim]
        self.kv: list[tuple[Any, Any]] = []
        for i in range(num_layers):
            k = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
            self.binding.bind_ortvalue_input(past_key.format(i=i), k)
            self.binding.bind_ortvalue_input(past_value.format(i=i), v)
            self.binding.bind_ortvalue_output(present_key.format(i=i), k)     # same buffer: written in place
            self.binding.bind_ortvalue_output(present_value.format(i=i), v)
            self.kv.append((k, v))
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, vocab], np.float32, "cpu", 0)
        self.binding.bind_ortvalue_output("logits", self.logits)
        self._mask = np.ones((batch, max_length), dtype=np.int64)
        self.length = 0                                   # valid positions in the cache

    def _run(self, embeds: np.ndarray) -> np.ndarray:
        seq = embeds.shape[1]
        total = self.length + seq
        if total > self.max_length:
            raise ValueError(f"sequence of {total} tokens exceeds the KV buffer ({self.max_length})")
        self.binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        mask = self._mask[:, :total] if self.batch == 1 else np.ascontiguousarray(self._mask[:, :total])
        self.binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(self.binding)
        self.length = total
        # OrtValue.numpy() of a CPU tensor shares the bound buffer, which the next run overwrites: copy the row.
        return self.logits.numpy()[:, -1, :].copy()       # [batch, vocab]

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """First call of a request: the buffer's old contents are ignored (positions restart at 0)."""
        self.length = 0
        return self._run(embeds)

    def step(self, embeds: np.ndarray) -> np.ndarray:
        return self._run(embeds)

    def generate(self, prompt_embeds: np.ndarray, table: np.ndarray, max_new_tokens: int,
                 eos_token_id: int | None = None) -> tuple[list[int], dict[str, Any]]:
        """Greedy decoding; returns tokens and timings (prefill_s, per-token decode seconds)."""
        c0, t0 = time.process_time(), time.perf_counter()
        logits = self.prefill(prompt_embeds)
        c1, t1 = time.process_time(), time.perf_counter()
        tokens = [int(np.argmax(logits[0]))]
        steps: list[float] = []
        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            s = time.perf_counter()
            logits = self.step(table[tokens[-1]][None, None, :])
            tokens.append(int(np.argmax(logits[0])))
            steps.append(time.perf_counter() - s)
        # process CPU seconds (all threads): with spinning off, a contention-robust measure of the work done
        return tokens, {"prefill_s": t1 - t0, "decode_steps_s": steps, "prefill_cpu_s": c1 - c0,
                        "decode_cpu_s": time.process_time() - c1}


# ---------------------------------------------------------------------------------------------------------------
# Environment, rooflines
# ---------------------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    cpu = "?"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split()
                         if any(k in f for k in ("avx512", "vnni", "amx", "avx2", "fma"))]
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("numpy", "onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = None
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "ram_bytes": mem,
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "loadavg_start": list(os.getloadavg())}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int = 2) -> dict[str, float]:
    """Best-of-N DRAM bandwidth (GB/s) over ``gib`` GiB (far beyond L3), numpy kernels on 1 and ``threads`` threads.

    ``dot``: float32 dot product of two arrays (BLAS, vectorized: the best pure-read kernel numpy has; counts both
    arrays), ``sum``: float32 sum (often compute-bound), ``copy``: memcpy (counts read + write). The roofline uses
    ``best_read_gbps`` = the best read kernel."""
    n = int(gib * (1 << 30) // 4)
    a = np.full(n, 1.0, dtype=np.float32)
    b = np.full(n, 0.5, dtype=np.float32)
    h = n // 2
    x, y = a[:h], a[h:]                               # dot reads two halves: gib GiB in all
    out: dict[str, float] = {}

    def run(fn, nthreads: int) -> float:
        bounds = [(i * h // nthreads, (i + 1) * h // nthreads) for i in range(nthreads)]
        best = float("inf")
        for _ in range(repeats):
            ts = [threading.Thread(target=fn, args=bd) for bd in bounds]
            s = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - s)
        return best

    def dot(lo: int, hi: int) -> None:
        np.dot(x[lo:hi], y[lo:hi])

    def sum_(lo: int, hi: int) -> None:
        x[lo:hi].sum()
        y[lo:hi].sum()

    def copy(lo: int, hi: int) -> None:
        np.copyto(b[lo:hi], x[lo:hi])
        np.copyto(b[h + lo:h + hi], y[lo:hi])

    for k in sorted({1, threads}):
        out[f"dot_read_gbps_{k}t"] = a.nbytes / run(dot, k) / 1e9
        out[f"sum_read_gbps_{k}t"] = a.nbytes / run(sum_, k) / 1e9
        out[f"copy_gbps_{k}t"] = 2 * a.nbytes / run(copy, k) / 1e9      # read + write
    del a, b, x, y
    out["best_read_gbps"] = max(v for k, v in out.items() if "_read_" in k)
    return out


def measure_gemm(threads: int = 2, m: int = 200, k: int = 2048, n: int = 5632, repeats: int = 5) -> dict[str, Any]:
    """Matmul throughput: numpy fp32 (BLAS) and one ORT MatMulNBits int4 node (accuracy 4 and 0) of the decoder's
    FFN shape with ``m`` rows (the prefill case)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    res: dict[str, Any] = {"shape": [m, k, n]}
    x = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    x @ w
    best = min(_timeit(lambda: x @ w) for _ in range(repeats))
    res["numpy_fp32_gflops"] = 2 * m * k * n / best / 1e9
    bs = 32
    qb = np.random.default_rng(2).integers(0, 255, size=(n, k // bs, bs // 2), dtype=np.uint8)
    sc = np.full((n, k // bs), 0.01, dtype=np.float32)
    for acc in (4, 0):
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=bs, accuracy_level=acc)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [helper.make_tensor("B", TensorProto.UINT8, qb.shape, qb.tobytes(), raw=True),
                               helper.make_tensor("scales", TensorProto.FLOAT, sc.shape, sc.tobytes(), raw=True)])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
        sess = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        sess.run(None, {"A": x})
        best = min(_timeit(lambda: sess.run(None, {"A": x})) for _ in range(repeats))
        res[f"matmulnbits_int4_acc{acc}_gflops"] = 2 * m * k * n / best / 1e9
        one = x[:1]
        sess.run(None, {"A": one})
        best1 = min(_timeit(lambda: sess.run(None, {"A": one})) for _ in range(20))
        res[f"matmulnbits_int4_acc{acc}_m1_gbps"] = (qb.nbytes + sc.nbytes) / best1 / 1e9
    return res


def _timeit(fn) -> float:
    s = time.perf_counter()
    fn()
    return time.perf_counter() - s


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------------
def summarize_profile(path: str) -> dict[str, Any]:
    """Per-op-type share of kernel time in an ORT profile (JSON trace), split into prefill and decode runs.

    A run is a decode step when it takes less than 3x the median run (prefill runs are ~100x longer)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if not runs:
        return {}
    med = statistics.median(r["dur"] for r in runs)
    starts = [r["ts"] for r in runs]
    kind = ["decode" if r["dur"] < 3 * med else "prefill" for r in runs]

    out: dict[str, Any] = {}
    per: dict[str, dict[str, float]] = {"decode": {}, "prefill": {}}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per[kind[i]][op] = per[kind[i]].get(op, 0.0) + e["dur"]
    for k in ("decode", "prefill"):
        n_runs = sum(1 for x in kind if x == k)
        run_us = sum(r["dur"] for r, x in zip(runs, kind) if x == k)
        total = sum(per[k].values())
        if not n_runs:
            continue
        out[k] = {"runs": n_runs, "model_run_us_per_run": round(run_us / n_runs, 1),
                  "kernel_us_per_run": round(total / n_runs, 1),
                  "op_share": {o: round(v / total, 4) for o, v in sorted(per[k].items(), key=lambda kv: -kv[1])},
                  "op_us_per_run": {o: round(v / n_runs, 1) for o, v in sorted(per[k].items(), key=lambda kv: -kv[1])}}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from edgevlm.config import get_model_config
    from edgevlm.exporter.ort_decoder import build_ort_decoder
    from edgevlm.model.vlm import llama_config

    cfg = get_model_config(args.model)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm = LlamaForCausalLM(llama_config(cfg.llm)).eval()          # random init, no vision tower
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embed_tokens.npy", llm.model.embed_tokens.weight.detach().numpy())
    t1 = time.perf_counter()
    entry = build_ort_decoder(llm, out, precision=args.precision, block_size=args.block_size,
                              accuracy_level=args.accuracy_level, max_context=args.max_context,
                              lm_head=args.lm_head, fuse_gate_up=args.fuse_gate_up, work_dir=args.work_dir)
    t2 = time.perf_counter()
    c = cfg.llm
    entry["model_shape"] = {"d": c.hidden_size, "ffn": c.intermediate_size, "vocab": c.vocab_size,
                            "layers": c.num_layers, "kv_dim": c.num_kv_heads * c.head_dim}   # bench only
    (out / "entry.json").write_text(json.dumps(entry, indent=1))
    return {"step": "build", "model": args.model, "out": str(out), "precision": args.precision,
            "lm_head": entry["recipe"].get("lm_head", "fp32"), "block_size": args.block_size,
            "init_s": round(t1 - t0, 2), "build_s": round(t2 - t1, 2), "peak_rss_bytes": peak_rss_bytes(),
            "weights_bytes": entry["weights_bytes"], "decode_bytes_per_token": entry["decode_bytes_per_token"],
            "op_histogram": entry["op_histogram"]}


def _side_graph_with_accuracy(src: Path, level: int) -> Path:
    """Copy of decoder.onnx whose MatMulNBits nodes use ``accuracy_level=level`` (same external data file)."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    dst = src.with_name(f"decoder.acc{level}.onnx")
    onnx.save(m, str(dst))
    return dst


def _load(path: Path, so: Any) -> tuple[Any, float]:
    import onnxruntime as ort

    s = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - s


def cmd_measure(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    d = Path(args.decoder)
    entry = json.loads((d / "entry.json").read_text())
    kv = entry["kv_cache"]
    graph = d / entry["file"]
    if args.accuracy_level is not None:
        graph = _side_graph_with_accuracy(graph, args.accuracy_level)
    env = environment()
    cfg_entries = dict(kv.split("=", 1) for kv in (args.config or []))
    mk = lambda prof=None: session_options(args.threads, spinning=args.spinning,  # noqa: E731
                                            dynamic_block_base=args.dynamic_block_base, opt_level=args.opt_level,
                                            profile_prefix=prof, config=cfg_entries)
    result: dict[str, Any] = {"step": "measure", "decoder": str(d), "graph": graph.name,
                              "precision": entry["precision"], "recipe": entry["recipe"],
                              "threads": args.threads, "spinning": args.spinning,
                              "dynamic_block_base": args.dynamic_block_base, "opt_level": args.opt_level,
                              "session_config": cfg_entries, "environment": env,
                              "weights_bytes": entry["weights_bytes"],
                              "decode_bytes_per_token_weights": entry["decode_bytes_per_token"]}

    # ---- load: cold-ish first load, then repeated loads (page cache warm), then optimized-model variants
    loads = []
    for _ in range(args.load_repeats):
        sess, t = _load(graph, mk())
        loads.append(t)
        del sess
    result["load_s"] = {"first": round(loads[0], 3), "best": round(min(loads), 3),
                        "median": round(statistics.median(loads), 3), "all": [round(x, 3) for x in loads],
                        "loadavg": list(os.getloadavg())}
    if args.load_variants:
        result["load_variants"] = load_variants(graph, mk, d)

    # ---- run
    sess, load_t = _load(graph, mk(str(d / "profile") if args.profile else None))
    rss_after_load = current_rss_bytes()
    table = np.load(d / "embed_tokens.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    vis = (rng.standard_normal((1, args.visual_tokens, table.shape[1])) * 0.02).astype(np.float32)
    text_ids = rng.integers(3, table.shape[0], size=args.prompt_tokens - args.visual_tokens)
    prompt = np.concatenate([vis, np.asarray(table[text_ids])[None]], axis=1)
    dec = SharedKVDecoder(sess, num_layers=kv["num_layers"], kv_heads=kv["num_kv_heads"],
                          head_dim=kv["head_dim"], max_length=min(kv["max_length"], args.max_length))
    # warm-up (a short prompt + a few steps), then measured runs
    dec.generate(prompt[:, :16], table, 4)
    prefills, steps_all, tokens, cpu = [], [], [], []
    for r in range(args.repeats):
        toks, t = dec.generate(prompt, table, args.new_tokens + 1)
        prefills.append(t["prefill_s"])
        steps_all.append(t["decode_steps_s"])
        cpu.append((t["prefill_cpu_s"], t["decode_cpu_s"]))
        tokens = toks
    la = list(os.getloadavg())
    pf = min(prefills)
    best_run = min(steps_all, key=lambda s: statistics.median(s))
    per_tok = sorted(best_run)
    decode_s = sum(best_run)
    result.update({
        "load_s_this_session": round(load_t, 3),
        "prompt_tokens": args.prompt_tokens, "visual_tokens": args.visual_tokens,
        "prefill_s": round(pf, 4), "prefill_tok_s": round(args.prompt_tokens / pf, 2),
        "prefill_s_all": [round(x, 4) for x in prefills],
        "decode_tokens": len(best_run), "decode_s": round(decode_s, 4),
        "decode_tok_s": round(len(best_run) / decode_s, 2),
        "decode_tok_s_all": [round(len(s) / sum(s), 2) for s in steps_all],
        "decode_ms_p50": round(1e3 * per_tok[len(per_tok) // 2], 3),
        "decode_ms_p95": round(1e3 * per_tok[int(0.95 * (len(per_tok) - 1))], 3),
        "decode_ms_min": round(1e3 * per_tok[0], 3),
        "decode_tok_s_from_p50": round(1 / per_tok[len(per_tok) // 2], 2),
        "decode_tok_s_from_min": round(1 / per_tok[0], 2),
        "first_tokens": tokens[:8],
        # CPU seconds per token summed over threads (robust to other processes when spinning is off):
        "decode_cpu_ms_per_token": [round(1e3 * c[1] / len(s), 2) for c, s in zip(cpu, steps_all)],
        "prefill_cpu_s": [round(c[0], 3) for c in cpu],
        "rss_after_load_bytes": rss_after_load, "peak_rss_bytes": peak_rss_bytes(),
        "loadavg_run": la,
    })
    if args.profile:
        prof = sess.end_profiling()
        result["profile_file"] = prof
        result["profile"] = summarize_profile(prof)
    del dec, sess

    # ---- rooflines (same process, after the decoder's RSS was recorded)
    if not args.no_roofline:
        bw = measure_bandwidth(args.bw_gib, threads=args.threads)
        gemm = measure_gemm(args.threads)
        avg_ctx = args.prompt_tokens + args.new_tokens / 2
        kv_bytes = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4 * avg_ctx
        wbytes = entry["decode_bytes_per_token"]
        ceil_w = bw["best_read_gbps"] * 1e9 / wbytes
        ceil_wkv = bw["best_read_gbps"] * 1e9 / (wbytes + kv_bytes)
        flops_tok = 2 * _matmul_params(entry)
        acc = entry["recipe"].get("accuracy_level", 0) if args.accuracy_level is None else args.accuracy_level
        rate = (gemm[f"matmulnbits_int4_acc{4 if acc == 4 else 0}_gflops"] if entry["precision"] != "fp32"
                else gemm["numpy_fp32_gflops"])
        result["roofline"] = {
            "bandwidth": bw, "gemm": gemm,
            "decode_bytes_weights": wbytes, "decode_bytes_kv_avg": int(kv_bytes), "avg_context": avg_ctx,
            "decode_ceiling_tok_s_weights": round(ceil_w, 2),
            "decode_ceiling_tok_s_weights_kv": round(ceil_wkv, 2),
            "decode_fraction_of_ceiling": round(result["decode_tok_s"] / ceil_wkv, 3),
            "decode_fraction_of_weights_only_ceiling": round(result["decode_tok_s"] / ceil_w, 3),
            "prefill_flops_per_token": flops_tok,
            "prefill_gemm_gflops_used": round(rate, 1),
            "prefill_ceiling_tok_s": round(rate * 1e9 / flops_tok, 2),
            "prefill_fraction_of_ceiling": round(result["prefill_tok_s"] / (rate * 1e9 / flops_tok), 3),
            "loadavg": list(os.getloadavg()),
        }
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    return result


def _matmul_params(entry: dict[str, Any]) -> int:
    """Weights of all decoder linears incl. lm_head (from the recipe's model shape in entry.json)."""
    shape = entry.get("model_shape")
    if shape:
        d, f, v, L, kvd = shape["d"], shape["ffn"], shape["vocab"], shape["layers"], shape["kv_dim"]
        return L * (2 * d * d + 2 * d * kvd + 3 * d * f) + v * d
    return 0


def load_variants(graph: Path, mk, d: Path) -> dict[str, Any]:
    """Load time of (a) the graph as built, (b) a saved ORT-optimized ONNX loaded with optimizations disabled,
    (c) the same with prepacked initializers saved externally (memory-mapped at load)."""
    import onnxruntime as ort

    out: dict[str, Any] = {}
    for kind in ("optimized", "optimized_prepacked"):
        target = d / f"{kind}.onnx"
        so = mk()
        so.optimized_model_filepath = str(target)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{kind}.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if kind == "optimized_prepacked":
            so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        s = time.perf_counter()
        sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        save_t = time.perf_counter() - s
        del sess
        times = []
        for _ in range(3):
            so2 = mk()
            so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess, t = _load(target, so2)
            times.append(t)
            del sess
        size = sum(p.stat().st_size for p in d.glob(f"{kind}.onnx*"))
        out[kind] = {"save_s": round(save_t, 3), "load_s": [round(x, 3) for x in times], "bytes_on_disk": size,
                     "loadavg": list(os.getloadavg())}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The decode-matmul ceiling
# ---------------------------------------------------------------------------------------------------------------
def matmul_chain(hidden: int, ffn: int, layers: int, vocab: int, kv_dim: int, *, block_size: int, bits: int,
                 accuracy_level: int, head_bits: int = 8, fuse_gate_up: bool = False,
                 seed: int = 0) -> tuple[Any, int]:
    """One ONNX graph with a LLaMA decoder's weight matmuls as MatMulNBits, in decode order: per layer packed QKV
    (``hidden -> hidden + 2 kv_dim``, sliced back to ``hidden``), O, gate, up (multiplied), down; then the LM head
    (``head_bits``); ``fuse_gate_up``: gate and up as one ``N = 2 ffn`` matmul, split. Random weights, small scales
    (finite activations). Returns (model, weight + scale bytes)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits: list[Any] = [helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
                        helper.make_tensor("s1", TensorProto.INT64, [1], [hidden]),
                        helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    nodes: list[Any] = []
    nbytes = 0

    def mnb(name: str, x: str, k: int, n: int, nbits: int) -> str:
        nonlocal nbytes
        blocks = k // block_size
        q = rng.integers(0, 256, size=(n, blocks, block_size * nbits // 8), dtype=np.uint8)
        sc = (rng.random((n, blocks), dtype=np.float32) * 0.02 / np.sqrt(k)).astype(np.float32)
        inits.extend([helper.make_tensor(f"{name}.q", TensorProto.UINT8, q.shape, q.tobytes(), raw=True),
                      helper.make_tensor(f"{name}.s", TensorProto.FLOAT, sc.shape, sc.tobytes(), raw=True)])
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.q", f"{name}.s"], [f"{name}.y"], name=name,
                                      domain="com.microsoft", K=k, N=n, bits=nbits, block_size=block_size,
                                      accuracy_level=accuracy_level))
        nbytes += q.nbytes + sc.nbytes
        return f"{name}.y"

    h = "x"
    for i in range(layers):
        qkv = mnb(f"l{i}.qkv", h, hidden, hidden + 2 * kv_dim, bits)
        nodes.append(helper.make_node("Slice", [qkv, "s0", "s1", "ax"], [f"l{i}.attn"]))
        o = mnb(f"l{i}.o", f"l{i}.attn", hidden, hidden, bits)
        if fuse_gate_up:
            gu = mnb(f"l{i}.gate_up", o, hidden, 2 * ffn, bits)
            g, u = f"l{i}.g", f"l{i}.u"
            nodes.append(helper.make_node("Split", [gu], [g, u], axis=1, num_outputs=2))
        else:
            g, u = mnb(f"l{i}.gate", o, hidden, ffn, bits), mnb(f"l{i}.up", o, hidden, ffn, bits)
        nodes.append(helper.make_node("Mul", [g, u], [f"l{i}.act"]))
        h = mnb(f"l{i}.down", f"l{i}.act", ffn, hidden, bits)
    y = mnb("lm_head", h, hidden, vocab, head_bits)
    graph = helper.make_graph(nodes, "decode_matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                        [1, hidden])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, nbytes


def cmd_kernel(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from edgevlm.config import get_model_config

    llm = get_model_config(args.model).llm
    kv_dim = llm.num_kv_heads * (llm.hidden_size // llm.num_heads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    rows = []
    combos = [(nb, b, f) for nb in args.bits for b in args.block_size
              for f in ([False, True] if args.fuse_gate_up else [False])]
    for bits, bs, fused in combos:
        model, nbytes = matmul_chain(llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.vocab_size,
                                     kv_dim, block_size=bs, bits=bits, accuracy_level=args.accuracy_level,
                                     fuse_gate_up=fused)
        path = work / f"chain_b{bs}_int{bits}{'_fgu' if fused else ''}.onnx"
        for f in (path, path.with_suffix(".onnx.data")):
            f.unlink(missing_ok=True)
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        del model
        x = np.random.default_rng(1).standard_normal((1, llm.hidden_size), dtype=np.float32)
        for t in args.threads:
            sess = ort.InferenceSession(str(path), session_options(t), providers=["CPUExecutionProvider"])
            for _ in range(3):
                sess.run(None, {"x": x})
            times = []
            for _ in range(args.repeats):
                s0 = time.perf_counter()
                sess.run(None, {"x": x})
                times.append(time.perf_counter() - s0)
            med = statistics.median(times)
            rows.append({"block_size": bs, "fuse_gate_up": fused, "bits": bits, "lm_head_bits": 8,
                         "accuracy_level": args.accuracy_level,
                         "threads": t, "weight_bytes": nbytes, "ms_median": round(med * 1e3, 2),
                         "ms_min": round(min(times) * 1e3, 2), "gbps_median": round(nbytes / med / 1e9, 2),
                         "decode_ceiling_tok_s": round(1 / med, 2), "loadavg": list(os.getloadavg())})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del sess
        for f in (path, path.with_suffix(".onnx.data")):
            f.unlink(missing_ok=True)
    bw = measure_bandwidth(args.bw_gib, threads=max(args.threads))
    env["loadavg_end"] = list(os.getloadavg())
    return {"benchmark": "benchmarks/ort_decoder_bench.py kernel", "model": args.model,
            "what": ("the decoder's weight matmuls alone (MatMulNBits, M = 1, decode order, random weights, LM head "
                     "8-bit), one graph: ms per pass = a lower bound on a decode step with ONNX Runtime's kernel"),
            "environment": env, "bandwidth": bw, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the decoder graph (random init) into --out")
    b.add_argument("--model", default="mobilevlm-1.7b")
    b.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    b.add_argument("--lm-head", default=None, choices=["int4", "int8", "fp32"])
    b.add_argument("--block-size", type=int, default=32)
    b.add_argument("--accuracy-level", type=int, default=4)
    b.add_argument("--max-context", type=int, default=2048)
    b.add_argument("--fuse-gate-up", action="store_true")
    b.add_argument("--out", required=True)
    b.add_argument("--work-dir", default=None)
    m = sub.add_parser("measure", help="load / prefill / decode / RSS / rooflines / profile")
    m.add_argument("--decoder", required=True, help="folder written by `build`")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--spinning", type=int, default=None, choices=[0, 1])
    m.add_argument("--dynamic-block-base", type=int, default=None)
    m.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"])
    m.add_argument("--config", nargs="*", help="extra session config entries KEY=VALUE")
    m.add_argument("--accuracy-level", type=int, default=None, help="rewrite MatMulNBits accuracy_level first")
    m.add_argument("--prompt-tokens", type=int, default=200)
    m.add_argument("--visual-tokens", type=int, default=144)
    m.add_argument("--new-tokens", type=int, default=128)
    m.add_argument("--max-length", type=int, default=512, help="KV buffer length used (<= the graph's max_length)")
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--load-repeats", type=int, default=3)
    m.add_argument("--load-variants", action="store_true")
    m.add_argument("--profile", action="store_true")
    m.add_argument("--no-roofline", action="store_true")
    m.add_argument("--bw-gib", type=float, default=1.0)
    k = sub.add_parser("kernel", help="the decode-matmul ceiling: the decoder's MatMulNBits chained, M = 1")
    k.add_argument("--model", default="mobilevlm-1.7b")
    k.add_argument("--block-size", type=int, nargs="+", default=[128])
    k.add_argument("--bits", type=int, nargs="+", default=[4], choices=[4, 8])
    k.add_argument("--accuracy-level", type=int, default=4)
    k.add_argument("--threads", type=int, nargs="+", default=[2])
    k.add_argument("--repeats", type=int, default=15)
    k.add_argument("--fuse-gate-up", action="store_true", help="also measure gate+up fused into one matmul")
    k.add_argument("--bw-gib", type=float, default=1.0)
    k.add_argument("--work-dir", required=True, help="scratch folder for the graph (about 0.7 GiB at int4)")
    for sp in (b, m, k):
        sp.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    res = {"build": cmd_build, "measure": cmd_measure, "kernel": cmd_kernel}[args.cmd](args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
