"""PyTorch eager vs the edgevlm runtime (ONNX Runtime) on one model: vision ms, prefill tok/s, decode tok/s, load s,
peak RSS, each configuration in its own subprocess, next to the rooflines measured in the same run.

    python benchmarks/runtime_compare.py --model tiny-ldpnetv2                # quick check (seconds)
    python benchmarks/runtime_compare.py                                      # mobilevlm-1.7b shape, random init:
                                                                              # exports a ~7 GB fp32 bundle (minutes)
    python benchmarks/runtime_compare.py --bundle fp32=out/b32 --bundle int4=out/b4 --configs ort
    python benchmarks/runtime_compare.py --model tiny-ldpnetv2 --profile      # + ORT operator profile

Configurations (``--configs``, default all that exist): ``torch-fp32``, ``torch-bf16`` (PyTorch eager, random init,
seed 0: the same weights the bundle was exported from), ``ort-<precision>`` for every ``--bundle PRECISION=PATH``
(fp32 is exported when not given; a precision whose bundle does not exist is skipped with a note). Each ORT bundle is
loaded in separate processes: ``:load-verify-full`` (sha256 of every file), then ``ort-<precision>`` with the
runtime's defaults (hash stamps: nothing re-hashed; no optimized-graph cache; the measured requests run in this one),
``:load-graphcache-cold/warm`` (the opt-in optimized-graph cache, written then read) and ``:load-prepacked-cold/warm``
(the same with prepacked weights saved). Bundles with a ``native_decode`` plan (int4/int8 CPU exports) decode on the
native kernel by default (its attention reading an fp16 copy of the KV cache); ``:ort-decode`` is the same bundle with
every decode step on ONNX Runtime, ``:kv32`` native decode with attention on the fp32 KV buffers.
``--spinning-sweep`` adds ``:spin`` (intra-op spinning on), ``--profile`` adds ``:profile`` (ORT profiler, operator
table per phase, decode on ONNX Runtime).

Every measured request uses a distinct random image (no cache reuse), greedy decoding with EOS ignored (exactly
``--new-tokens`` tokens), after one warm-up request; medians over ``--repeats`` requests.

Rooflines (measured in this run, in the parent before the workers start):
  * memory bandwidth: best of several sums over a 1 GiB float32 array (1 thread and ``--threads`` threads);
    decode tok/s bound = bandwidth / bytes read per token (decoder weights incl. lm_head, not the embedding table,
    + the KV cache at the measured context);
  * matmul throughput: numpy (OpenBLAS), ONNX Runtime MatMul and torch fp32/bf16 GEMM on a prefill-shaped product;
    prefill tok/s bound = GEMM FLOP/s / (2 x decoder body params); vision bound = FLOPs of the tower / GEMM FLOP/s.

Output: a table, ``benchmarks/results/runtime_<model>.json`` (environment block: CPU, cores, RAM, OS, library
versions, bundle hash; rooflines; every configuration; the issue's reference numbers), and one JSON line printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUESTION = "What is in the picture?"                      # MobileVLM §4.5's VLM latency prompt

#: The issue's reference numbers on this machine class (docs: shared/reference/onnx-ort-tensorrt.md §8).
REFERENCE = {
    "llama.cpp MobileLLaMA-1.4B Q4_0": {"decode_tok_s": 31.7, "prefill_tok_s": 85},
    "PyTorch fp32 (1.4B LM)": {"decode_tok_s": 2.6, "prefill_tok_s": 31},
    "PyTorch bf16 (1.4B LM)": {"decode_tok_s": 4.2, "prefill_tok_s": 131},
    "CLIP ViT-L/14-336 encode": {"vision_ms_fp32": 3000, "vision_ms_bf16": 1500},
}
TARGETS = {"int4 decode_tok_s": ">= 28", "prefill_tok_s": ">= 130", "vision_ms": "<= 1500", "load_s": "<= 3"}


# ==== environment, bandwidth / GEMM rooflines, weight bytes per token: shared with `edgevlm bench` =====
from edgevlm.bench.env import bandwidth, environment, gemm_rates, model_costs  # noqa: E402
from edgevlm.bench.sweep import worker_result  # noqa: E402


# ==== workers (one configuration per subprocess) ===================================================================
def _images(n: int, size: int, seed: int = 100) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _peak_rss_mb() -> float:
    """VmHWM (not ru_maxrss: Linux carries that across exec, so a worker would report the parent's peak)."""
    from edgevlm.runtime.timings import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def worker_ort(args) -> dict[str, Any]:
    from edgevlm.runtime import Session

    cache = None if args.cache == "off" else args.cache
    s = Session.from_bundle(args.bundle, threads=args.threads, optimized_cache=cache, verify_hashes=args.verify,
                            hash_stamps=args.stamps,
                            spinning=args.spinning, profile_dir=args.profile_dir,
                            save_prepacked=args.save_prepacked, native_decode=args.native_decode,
                            native_kv=args.native_kv)
    out: dict[str, Any] = {"load_s": s.load_s, "decode_backend": s.decode_backend, "native": s.native_info, "load_breakdown": s.load_breakdown, "sha256": s.verification,
                           "cache": {k: v.cache for k, v in s.session_info.items()},
                           "bundle_sha256": s.bundle.manifest_sha256, "bundle_bytes": s.bundle.total_size,
                           "decoder_bytes": _component_bytes(s.bundle, "decoder"),
                           "kv_mode": s.kv_spec.mode, "rss_after_load_mb": _rss_mb(),
                           "session_options": s.session_info["decoder"].options}
    if args.load_only:
        out["peak_rss_mb"] = _peak_rss_mb()
        return out
    size = s.preprocess_config.image_size
    s.generate(_images(1, size, seed=1)[0], QUESTION, max_new_tokens=2, ignore_eos=True)          # warm-up
    rows, tokens = [], []
    for img in _images(args.repeats, size):
        r = s.generate(img, QUESTION, max_new_tokens=args.new_tokens, ignore_eos=True)
        rows.append(r.timings.to_dict())
        tokens.append(r.tokens)
    out.update(_summary(rows))
    out["tokens_first_request"] = tokens[0]
    if args.profile_dir:
        out["profiles"] = s.end_profiling()
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _component_bytes(bundle, name: str) -> int:
    e = bundle.component(name)
    files = dict.fromkeys([e["file"], *(e.get("external_data") or [])])
    return sum(bundle.files[f]["size"] for f in files if f in bundle.files)


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return 0.0


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("vision_ms", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_ms", "decode_tok_s",
            "decode_token_ms_p50", "decode_token_ms_p95", "sampling_ms", "total_ms", "preprocess_ms", "cpu_ms",
            "decode_cpu_ms_per_token")
    out = {k: _median(rows, k) for k in keys if k in rows[0]}
    out["prompt_tokens"] = rows[0]["prompt_tokens"]
    out["generated_tokens"] = rows[0]["generated_tokens"]
    out["requests"] = rows
    return out


def worker_torch(args) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from edgevlm.bundle import read_bundle
    from edgevlm.model.vlm import build_model
    from edgevlm.preprocess import preprocess
    from edgevlm.prompt import build_prompt, tokenize_prompt

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b = read_bundle(args.bundle, verify_hashes=False)
    cfg = b.model_config
    tok = Tokenizer.from_file(str(b.tokenizer_path))
    prompt = b.prompt
    ids = tokenize_prompt(build_prompt(QUESTION, prompt["template"], system=prompt.get("system")), tok,
                          prompt.get("bos_token_id"))
    t0 = time.perf_counter()
    model = build_model(cfg, seed=0, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    rss_load = _rss_mb()
    from transformers import DynamicCache

    def request(img: np.ndarray, n_new: int) -> tuple[dict[str, Any], list[int]]:
        t_start = time.perf_counter()
        pv = torch.from_numpy(preprocess(img, b.preprocess_config))[None].to(dtype)
        t_pre = time.perf_counter()
        with torch.inference_mode():
            emb = model.encode_images(pv)
            t_vis = time.perf_counter()
            s = model.splice(torch.tensor([ids]), emb)
            cache = DynamicCache()
            out = model.llm(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
            nxt = int(out.logits[0, -1].float().argmax())
            t_pf = time.perf_counter()
            produced, steps = [nxt], []
            n_ctx = s.inputs_embeds.shape[1]
            for _ in range(n_new - 1):
                ts = time.perf_counter()
                e = model.embed_tokens(torch.tensor([[nxt]]))
                out = model.llm(inputs_embeds=e, position_ids=torch.tensor([[n_ctx]]), past_key_values=cache,
                                use_cache=True)
                nxt = int(out.logits[0, -1].float().argmax())
                produced.append(nxt)
                n_ctx += 1
                steps.append(time.perf_counter() - ts)
        t_end = time.perf_counter()
        n_prompt = s.inputs_embeds.shape[1]
        dec = sum(steps)
        row = {"preprocess_ms": (t_pre - t_start) * 1e3, "vision_ms": (t_vis - t_pre) * 1e3,
               "prefill_ms": (t_pf - t_vis) * 1e3, "prompt_tokens": n_prompt,
               "prefill_tok_s": n_prompt / (t_pf - t_vis), "ttft_ms": (t_pf - t_start) * 1e3,
               "decode_ms": dec * 1e3, "decode_tok_s": len(steps) / dec if dec else 0.0,
               "decode_token_ms_p50": float(np.percentile(steps, 50) * 1e3) if steps else 0.0,
               "decode_token_ms_p95": float(np.percentile(steps, 95) * 1e3) if steps else 0.0,
               "total_ms": (t_end - t_start) * 1e3, "generated_tokens": len(produced)}
        return row, produced

    size = b.preprocess_config.image_size
    request(_images(1, size, seed=1)[0], 2)                                                    # warm-up
    rows, tokens = [], []
    for img in _images(args.repeats, size):
        row, produced = request(img, args.new_tokens)
        rows.append(row)
        tokens.append(produced)
    out = {"load_s": load_s, "load_note": "random-init model construction (not a checkpoint read)",
           "rss_after_load_mb": rss_load, **_summary(rows), "tokens_first_request": tokens[0],
           "peak_rss_mb": _peak_rss_mb()}
    return out


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["ort", "torch"])
    p.add_argument("--bundle", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--cache", default="off")
    p.add_argument("--load-only", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--stamps", default=None, help="hash-stamp directory (default: none, every file hashed)")
    p.add_argument("--spinning", action="store_true")
    p.add_argument("--save-prepacked", action="store_true")
    p.add_argument("--profile-dir", default=None)
    p.add_argument("--native-decode", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--native-kv", default="float16", choices=["float16", "float32"])
    args = p.parse_args(argv)
    result = worker_ort(args) if args.worker == "ort" else worker_torch(args)
    print("RESULT " + json.dumps(result))


# ==== profile analysis =============================================================================================
def summarize_profile(path: str, top: int = 8, skip: int = 0) -> dict[str, Any]:
    """Per-op kernel time from an ORT profile, after ``skip`` warm-up runs: the first measured ``model_run`` of a
    session (vision: the encode; decoder: the prefill) and the rest (decoder: the decode steps)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip:]
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]

    def agg(lo: float, hi: float) -> dict[str, Any]:
        per: dict[str, float] = {}
        for e in nodes:
            if lo <= e["ts"] <= hi:
                op = e.get("args", {}).get("op_name", "?")
                per[op] = per.get(op, 0.0) + e["dur"]
        total = sum(per.values())
        ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
        return {"kernel_ms": total / 1e3,
                "ops": [{"op": op, "ms": us / 1e3, "share": us / total if total else 0.0} for op, us in ranked]}

    if not runs:
        return {"file": path, "runs": 0}
    first = runs[0]
    out = {"file": path, "runs": len(runs), "first_run": agg(first["ts"], first["ts"] + first["dur"])}
    if len(runs) > 1:
        out["later_runs"] = agg(runs[1]["ts"], runs[-1]["ts"] + runs[-1]["dur"])
        out["later_runs"]["per_run_ms"] = out["later_runs"]["kernel_ms"] / (len(runs) - 1)
    return out


# ==== parent =======================================================================================================
def run_worker(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t
    res = worker_result(p.stdout, wall)
    if res is not None:
        return res
    return {"error": (p.stderr or p.stdout)[-3000:], "returncode": p.returncode, "worker_wall_s": wall}


def export_fp32(model: str, dest: Path, timeout: float) -> Path:
    """Export a random-init fp32 bundle in a subprocess (keeps the parent's RSS small; parity skipped for speed)."""
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO);"
            "from edgevlm.pipeline import export_bundle;"
            f"export_bundle({model!r}, {str(dest)!r}, random_init=True, parity=False, overwrite=True, seed=0)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"export failed:\n{p.stderr[-3000:]}")
    print(f"exported {model} fp32 bundle to {dest} in {time.perf_counter() - t:.0f} s", flush=True)
    return dest


def roofline_rows(name: str, res: dict[str, Any], costs: dict[str, float], bw: dict[str, float],
                  gemm: dict[str, float]) -> dict[str, Any]:
    if "error" in res or "decode_tok_s" not in res:
        return {}
    ctx = res["prompt_tokens"] + res["generated_tokens"] / 2
    if name.startswith("torch"):
        wbytes = costs["decoder_params_no_embed"] * (2 if name.endswith("bf16") else 4)
        rate = gemm.get("torch_bf16_gflops" if name.endswith("bf16") else "torch_fp32_gflops", 0.0)
    else:
        wbytes = res.get("decoder_bytes") or costs["decoder_params_no_embed"] * 4
        rate = gemm.get("ort_fp32_gflops", gemm.get("numpy_fp32_gflops", 0.0))
    native_kv = (res.get("native") or {}).get("kv_dtype") if res.get("decode_backend") == "native" else None
    kv = costs["kv_bytes_per_token_fp32"] * (0.5 if name.endswith("bf16") or native_kv == "float16" else 1.0) * ctx
    per_token = wbytes + kv
    bound = bw["read_gbs"] * 1e9 / per_token
    prefill_bound = rate * 1e9 / (2 * costs["decoder_body_params"]) if rate else 0.0
    vision_bound_ms = costs["vision_gflops"] / rate * 1e3 if rate else 0.0
    weights_only = bw["read_gbs"] * 1e9 / wbytes              # the formula: weights only, no KV reads
    return {"decode_bytes_per_token": per_token, "decode_kv_bytes_per_token": kv, "decode_bound_tok_s": bound,
            "decode_fraction_of_bound": res["decode_tok_s"] / bound if bound else 0.0,
            "decode_bound_weights_only_tok_s": weights_only,
            "decode_fraction_of_weights_only_bound": res["decode_tok_s"] / weights_only,
            "prefill_bound_tok_s": prefill_bound,
            "prefill_fraction_of_bound": res["prefill_tok_s"] / prefill_bound if prefill_bound else 0.0,
            "vision_bound_ms": vision_bound_ms, "gemm_rate_used_gflops": rate}


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilevlm-1.7b")
    ap.add_argument("--bundle", action="append", default=[], metavar="PRECISION=PATH",
                    help="an existing bundle per precision (fp32 is exported when no --bundle fp32=... is given)")
    ap.add_argument("--configs", default="torch,ort", help="comma list: torch, ort, or exact names")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="where the fp32 bundle is exported (default: a temp dir)")
    ap.add_argument("--keep-bundle", action="store_true", help="keep the exported bundle")
    ap.add_argument("--profile", action="store_true", help="also profile each ORT bundle (operator table)")
    ap.add_argument("--spinning-sweep", action="store_true",
                    help="also measure each ORT bundle with intra-op spinning on (the runtime's default is off)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from edgevlm.config import get_model_config
    from edgevlm.runtime.backends import physical_cores

    cfg = get_model_config(args.model)
    threads = args.threads or physical_cores()
    env = environment(threads)
    print(f"{args.model}: {env['cpu']['model']} ({env['cpu']['cores_physical']} cores, {env['ram_gib']} GiB), "
          f"{threads} threads",
          flush=True)

    costs = model_costs(cfg)
    bw = bandwidth(threads, gib=args.bandwidth_gib)
    c = cfg.llm
    gemm = gemm_rates(threads, m=200, k=max(c.hidden_size, 2048), n=max(c.intermediate_size, 5632))
    print(f"bandwidth {bw['read_gbs']:.1f} GB/s read, {bw['copy_gbs']:.1f} GB/s copy; GEMM " +
          ", ".join(f"{k.removesuffix('_gflops')} {v:.0f}" for k, v in gemm.items() if k.endswith("gflops")) +
          " GFLOP/s", flush=True)

    bundles: dict[str, Path] = {}
    notes: list[str] = []
    given: set[str] = set()
    for item in args.bundle:
        prec, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--bundle wants PRECISION=PATH, got {item!r}")
        given.add(prec)
        if (Path(path) / "manifest.json").is_file():
            bundles[prec] = Path(path)
        else:
            notes.append(f"{prec}: bundle {path} does not exist; skipped")
    for prec in ("int8", "int4"):
        if prec not in given:
            notes.append(f"ort-{prec}: no --bundle {prec}=PATH given (quantized bundles come with the quantization "
                          f"work); skipped")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="runtime_compare_"))
    exported = None
    if "fp32" not in given:
        exported = export_fp32(args.model, work / f"{args.model}-fp32", args.timeout)
        bundles["fp32"] = exported
    if not bundles:
        raise SystemExit("no bundle to measure: " + "; ".join(notes))
    any_bundle = bundles.get("fp32") or next(iter(bundles.values()))   # torch workers read config + tokenizer
    cache_dir = work / "ort-cache"

    wanted = [w.strip() for w in args.configs.split(",") if w.strip()]
    configs: dict[str, list[str]] = {}
    base = ["--threads", str(threads), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if any(w in ("torch", "torch-fp32") for w in wanted):
        configs["torch-fp32"] = ["--worker", "torch", "--bundle", str(any_bundle), "--dtype", "fp32", *base]
    if any(w in ("torch", "torch-bf16") for w in wanted):
        configs["torch-bf16"] = ["--worker", "torch", "--bundle", str(any_bundle), "--dtype", "bf16", *base]
    for prec, path in bundles.items():
        name = f"ort-{prec}"
        if not any(w in ("ort", name) for w in wanted):
            continue
        pc, pp, ps = cache_dir / prec, cache_dir / f"{prec}-prepacked", cache_dir / f"{prec}-stamps"
        for d in (pc, pp, ps):
            shutil.rmtree(d, ignore_errors=True)
        ort_cmd = ["--worker", "ort", "--bundle", str(path), *base]
        # sha256 of every file (no stamps yet: all hashed; stamps written), then the runtime's defaults: stamps
        # (nothing re-hashed), no optimized-graph cache -- the measured requests run in that one
        configs[f"{name}:load-verify-full"] = [*ort_cmd, "--load-only", "--verify", "--stamps", str(ps)]
        configs[name] = [*ort_cmd, "--verify", "--stamps", str(ps)]
        for state in ("cold", "warm"):
            configs[f"{name}:load-graphcache-{state}"] = [*ort_cmd, "--load-only", "--cache", str(pc)]
        for state in ("cold", "warm"):
            configs[f"{name}:load-prepacked-{state}"] = [*ort_cmd, "--load-only", "--cache", str(pp),
                                                         "--save-prepacked"]
        native = "native_decode" in json.loads((Path(path) / "manifest.json").read_text())["components"]["decoder"]
        if native:                    # the same bundle with every decode step on ONNX Runtime (A/B in one run)
            configs[f"{name}:ort-decode"] = [*ort_cmd, "--native-decode", "off"]
            configs[f"{name}:kv32"] = [*ort_cmd, "--native-kv", "float32"]   # native, attention on the fp32 KV
        if args.spinning_sweep:
            configs[f"{name}:spin"] = [*ort_cmd, "--spinning"]
            if native:
                configs[f"{name}:ort-decode:spin"] = [*ort_cmd, "--native-decode", "off", "--spinning"]
        if args.profile:   # ORT's operator profile: decode steps on ORT too, so the table covers every phase
            configs[f"{name}:profile"] = [*ort_cmd, "--repeats", "1", "--profile-dir", str(work / f"profile-{prec}"),
                                          "--native-decode", "off"]

    results: dict[str, Any] = {}
    for name, cmd in configs.items():
        print(f"running {name} ...", flush=True)
        res = run_worker(cmd, args.timeout)
        if "profiles" in res:
            # the warm-up request ran 1 vision run and 2 decoder runs (prefill + 1 step) before the measured one
            res["profile_summary"] = {Path(p).name: summarize_profile(p, skip=1 if "vision" in Path(p).name else 2)
                                      for p in res["profiles"]}
        results[name] = res
        if "error" in res:
            print(f"  {name} failed: {res['error'][-800:]}", flush=True)

    measured = (":spin", ":ort-decode", ":ort-decode:spin", ":kv32")
    roof = {name: roofline_rows(name.split(":")[0], r, costs, bw, gemm) for name, r in results.items()
            if ":" not in name or name.endswith(measured)}
    # -- table
    print()
    hdr = f"{'config':<36}{'load s':>8}{'vision ms':>11}{'prefill t/s':>13}{'decode t/s':>12}{'bound t/s':>11}" \
          f"{'of bound':>10}{'p95 ms':>9}{'peak RSS MiB':>14}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<36} FAILED")
            continue
        rf = roof.get(name, {})
        print(f"{name:<36}{r.get('load_s', 0):>8.2f}{r.get('vision_ms', float('nan')):>11.1f}"
              f"{r.get('prefill_tok_s', float('nan')):>13.1f}{r.get('decode_tok_s', float('nan')):>12.2f}"
              f"{rf.get('decode_bound_tok_s', float('nan')):>11.2f}"
              f"{rf.get('decode_fraction_of_bound', float('nan')) * 100:>9.1f}%"
              f"{r.get('decode_token_ms_p95', float('nan')):>9.1f}"
              f"{r.get('peak_rss_mb', 0):>14.0f}")
    for name, r in results.items():
        for pname, summ in (r.get("profile_summary") or {}).items():
            for part in ("first_run", "later_runs"):
                if part in summ:
                    ops = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in summ[part]["ops"][:4])
                    print(f"profile {name} {pname} {part}: {summ[part]['kernel_ms']:.1f} ms kernels: {ops}")
    for n in notes:
        print("note:", n)

    env["loadavg_end"] = list(os.getloadavg())
    if "fp32" in bundles and "error" not in results.get("ort-fp32", {"error": 1}):
        env["bundle_sha256"] = results["ort-fp32"]["bundle_sha256"]
        env["bundle_bytes"] = results["ort-fp32"]["bundle_bytes"]
    report = {"model": args.model, "random_init": True, "question": QUESTION, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "environment": env, "costs": costs,
              "roofline": {"bandwidth": bw, "gemm": gemm, "per_config": roof}, "results": results,
              "reference": REFERENCE, "targets": TARGETS, "notes": notes}
    out = Path(args.out) if args.out else RESULTS / f"runtime_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    shutil.rmtree(cache_dir, ignore_errors=True)              # optimized graphs: GBs per bundle
    if exported is not None and not args.keep_bundle:
        shutil.rmtree(exported, ignore_errors=True)
    if not args.work_dir and not args.keep_bundle:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"model": args.model, "threads": threads, "bandwidth_gbs": round(bw["read_gbs"], 2),
               "out": str(out)}
    for name, r in results.items():
        if ":" in name and "load" in name and "load_s" in r:
            summary[name] = {"load_s": round(r["load_s"], 3)}
        elif "error" not in r and (":" not in name or name.endswith(measured)):
            summary[name] = {k: round(r[k], 3) for k in ("load_s", "vision_ms", "prefill_tok_s", "decode_tok_s",
                                                         "peak_rss_mb") if k in r}
            if roof.get(name):
                summary[name]["decode_bound_tok_s"] = round(roof[name]["decode_bound_tok_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
