"""The environment block of a benchmark report and the rooflines measured beside it (numpy + stdlib; no torch).

    >>> from edgevlm.bench.env import environment, bandwidth, gemm_rates, model_costs
    >>> env = environment(threads=2, bundles=["bundles/b144"])    # CPU, cores, RAM, OS, versions, GPU, Jetson, load
    >>> bw = bandwidth(threads=2, gib=0.5)                          # best-of-N read / copy GB/s
    >>> costs = model_costs(cfg)                                    # params and FLOPs the rooflines divide by

A number without its machine cannot be reproduced or refuted (DESIGN.md §6, shared/reference/peers.md §3: power mode
and board variant change results 2-4x, background load changes them too). ``environment`` records: CPU model and ISA
flags, physical / logical / usable cores, RAM, OS and kernel, Python and library versions (numpy, onnxruntime,
tokenizers, pillow, edgevlm; torch only if something already imported it: the bench never imports torch), bundle
hashes (``Bundle.manifest_sha256``), NVIDIA GPU + driver (``nvidia-smi``, guarded), Jetson model / power mode
(``nvpmodel -q``) / clocks (``/sys/devices/.../cur_freq``, ``jetson_clocks --show``) when present, the load average and
thread-related environment variables.

``bandwidth`` / ``gemm_rates`` / ``model_costs`` are the roofline side: decode tok/s is bounded by memory bandwidth /
bytes read per token, prefill by matmul throughput / FLOPs per token. ``benchmarks/runtime_compare.py`` has the same
code inline; it can import it from here.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["environment", "cpu_info", "library_versions", "gpu_info", "jetson_info", "bundle_fingerprints",
           "bandwidth", "gemm_rates", "model_costs", "loadavg"]

_LIBS = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "tokenizers", "pillow", "psutil",
         "matplotlib", "edgevlm", "tensorrt")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS",
                "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "EDGEVLM_CACHE")
_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
        "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "i8mm", "bf16")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout of ``cmd`` or None (missing tool, error, timeout): environment probes never fail the bench."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def cpu_info() -> dict[str, Any]:
    model, flags, hw = platform.processor() or platform.machine(), set(), None
    mhz: list[float] = []
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key in ("model name", "Processor", "cpu model") and val:
            model = val
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
        elif key == "Hardware" and val:
            hw = val
        elif key == "cpu MHz":
            try:
                mhz.append(float(val))
            except ValueError:
                pass
    from edgevlm.runtime.backends import core_counts

    logical, usable, physical = core_counts()
    out = {"model": model, "machine": platform.machine(), "isa": [f for f in _ISA if f in flags],
           "cores_physical": physical, "cores_logical": logical, "cores_usable": usable}
    if hw:
        out["hardware"] = hw
    from edgevlm.runtime.cpuinfo import MASK_ENV, masked_flags

    hidden = masked_flags(frozenset(flags))
    if hidden:                               # a figure measured with flags hidden from edgevlm's dispatch says so
        out["isa_hidden"] = {"by": MASK_ENV, "flags": sorted(hidden)}
    if mhz:
        out["mhz_now"] = [round(min(mhz)), round(max(mhz))]
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.is_file():
        try:
            out["governor"] = gov.read_text().strip()
        except OSError:
            pass
    return out


def _ram() -> dict[str, Any]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"ram_gib": round(vm.total / 2**30, 2), "ram_available_gib": round(vm.available / 2**30, 2)}
    except ImportError:
        try:
            return {"ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)}
        except (ValueError, OSError):
            return {}


def library_versions() -> dict[str, str]:
    """Installed versions (``importlib.metadata``; nothing is imported). torch only when already imported."""
    import importlib.metadata as md

    out: dict[str, str] = {}
    for pkg in _LIBS:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        out["torch"] = str(getattr(sys.modules["torch"], "__version__", "?"))
    if "edgevlm" not in out:
        from edgevlm import __version__

        out["edgevlm"] = __version__
    try:                                               # which BLAS numpy uses (GEMM roofline)
        cfg = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else None
        if isinstance(cfg, dict):
            blas = cfg.get("Build Dependencies", {}).get("blas", {})
            if blas:
                out["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - show_config's format changes between numpy versions; the probe is optional
        pass
    return out


def _ort_providers() -> list[str]:
    if "onnxruntime" not in sys.modules:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return []
    return list(sys.modules["onnxruntime"].get_available_providers())


def gpu_info() -> list[dict[str, Any]] | None:
    """NVIDIA GPUs from ``nvidia-smi`` (None when there is no nvidia-smi or it fails)."""
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,pstate,compute_cap"
    out = _run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"])
    if not out:
        return None
    gpus = []
    keys = q.split(",")
    for line in out.splitlines():
        vals = [v.strip() for v in line.split(",")]
        gpus.append(dict(zip(keys, vals)))
    cuda = _run(["nvidia-smi"])
    if cuda and "CUDA Version" in cuda:
        ver = cuda.split("CUDA Version:")[1].split()[0]
        for g in gpus:
            g["cuda_version"] = ver
    return gpus


def jetson_info() -> dict[str, Any] | None:
    """Jetson model, L4T release, power mode and clocks (None off a Jetson)."""
    model_file = Path("/proc/device-tree/model")
    release = Path("/etc/nv_tegra_release")
    if not release.is_file() and not (model_file.is_file() and "jetson" in model_file.read_bytes().decode(
            errors="replace").lower()):
        return None
    out: dict[str, Any] = {}
    if model_file.is_file():
        out["model"] = model_file.read_bytes().decode(errors="replace").strip("\x00 \n")
    if release.is_file():
        out["l4t"] = release.read_text(errors="replace").splitlines()[0].strip()
    out["nvpmodel"] = _run(["nvpmodel", "-q"])
    out["jetson_clocks"] = _run(["jetson_clocks", "--show"], timeout=10)
    clocks: dict[str, int] = {}
    for pattern in ("/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq", "/sys/devices/gpu.0/devfreq/*/cur_freq",
                    "/sys/devices/platform/*gpu*/devfreq/*/cur_freq", "/sys/devices/platform/*/*gpu*/devfreq/*/cur_freq",
                    "/sys/kernel/debug/bpmp/debug/clk/emc/rate"):
        for p in sorted(glob.glob(pattern))[:16]:
            try:
                clocks[p] = int(Path(p).read_text().strip())
            except (OSError, ValueError):
                pass
    out["cur_freq"] = clocks
    return out


def bundle_fingerprints(bundles: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    from edgevlm.bundle import read_bundle

    out = []
    for p in bundles:
        b = read_bundle(p, verify_hashes=False)
        out.append({"path": str(p), "manifest_sha256": b.manifest_sha256, "model": b.model_config.name,
                    "visual_tokens": b.visual_tokens, "precision": b.manifest.get("precision"),
                    "size_bytes": b.total_size})
    return out


def environment(threads: int | Iterable[int] | None = None, bundles: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """The environment block (see the module docstring)."""
    from edgevlm.runtime.backends import physical_cores

    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_info(), **_ram(),
                           "os": platform.platform(), "kernel": platform.release(),
                           "python": platform.python_version(), "python_impl": platform.python_implementation(),
                           "versions": library_versions(), "ort_providers": _ort_providers(),
                           "gpu": gpu_info(), "jetson": jetson_info(), "loadavg_start": loadavg(),
                           "thread_env": {k: os.environ[k] for k in _THREAD_VARS if k in os.environ},
                           "default_threads": physical_cores()}
    if threads is not None:
        env["threads"] = [threads] if isinstance(threads, int) else list(threads)
    bundles = list(bundles)
    if bundles:
        env["bundles"] = bundle_fingerprints(bundles)
    try:
        json.dumps(env)
    except (TypeError, ValueError):                   # pragma: no cover - every probe returns plain types
        env = json.loads(json.dumps(env, default=str))
    return env


# ==== rooflines ====================================================================================================
def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Best-of-N read bandwidth over a ``gib`` GiB float32 array with 1 and ``threads`` threads, and a copy bandwidth
    (read + write bytes). Two read kernels: ``np.sum`` (pairwise summation, partly compute-bound on one core) and
    ``np.dot(x, x)`` (BLAS: one streaming load per element); ``read_gbs`` is the best of them, the roofline's figure."""
    n = int(gib * 2**30 // 4)
    a = np.ones(n, dtype=np.float32)                       # touched: pages are resident before timing
    kernels = {"sum": np.sum, "dot": lambda c: np.dot(c, c)}

    def best_of(fn, parts: int) -> float:
        chunks = np.array_split(a, parts)
        best = 0.0
        for _ in range(repeats):
            if parts == 1:
                t = time.perf_counter()
                fn(a)
            else:
                ts = [threading.Thread(target=fn, args=(c,)) for c in chunks]
                t = time.perf_counter()
                for th in ts:
                    th.start()
                for th in ts:
                    th.join()
            best = max(best, a.nbytes / (time.perf_counter() - t))
        return best

    rates = {f"{k}_{p}": best_of(fn, p) for k, fn in kernels.items() for p in sorted({1, max(1, threads)})}
    b = np.empty_like(a)
    bestc = 0.0
    for _ in range(max(2, repeats // 2)):
        t = time.perf_counter()
        np.copyto(b, a)
        bestc = max(bestc, 2 * a.nbytes / (time.perf_counter() - t))
    del a, b
    one = max(rates["sum_1"], rates["dot_1"])
    many = max(v for k, v in rates.items() if k.endswith(f"_{max(1, threads)}"))
    return {"read_1thread_gbs": one / 1e9, f"read_{threads}threads_gbs": many / 1e9, "copy_gbs": bestc / 1e9,
            "read_gbs": max(one, many) / 1e9, "by_kernel_gbs": {k: round(v / 1e9, 2) for k, v in rates.items()},
            "array_gib": gib, "repeats": repeats}


def gemm_rates(threads: int, m: int, k: int, n: int, repeats: int = 3, int8: bool = False) -> dict[str, float]:
    """GFLOP/s of an ``[m, k] x [k, n]`` float32 product: numpy (its BLAS, its own thread count) and ONNX Runtime's
    MatMul with ``threads`` intra-op threads (when ``onnx`` is installed to build the one-node graph). Best of N.
    ``int8``: also ``ort_int8_dynamic_gops``, the same product quantized by ``quantize_dynamic`` (int8 per-channel
    weights, activations quantized at run time: ONNX Runtime's DynamicQuantizeMatMul, VNNI / AVX2 / NEON kernels)."""
    flops = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out: dict[str, float] = {"m": m, "k": k, "n": n}

    def best(fn) -> float:
        fn()
        r = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            r = max(r, flops / (time.perf_counter() - t))
        return r / 1e9

    out["numpy_fp32_gflops"] = best(lambda: a @ b)
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
                              initializer=[numpy_helper.from_array(b, "b")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
        model.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out["ort_fp32_gflops"] = best(lambda: sess.run(None, {"a": a}))
        if int8:
            import tempfile

            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory() as tmp:          # the vision tower's int8 op: DynamicQuantizeMatMul
                src, dst = os.path.join(tmp, "f.onnx"), os.path.join(tmp, "q.onnx")
                import onnx

                onnx.save(model, src)
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                                 extra_options={"MatMulConstBOnly": True})
                qsess = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
            out["ort_int8_dynamic_gops"] = best(lambda: qsess.run(None, {"a": a}))
    except ImportError:
        pass
    return out


def model_costs(cfg) -> dict[str, float]:
    """Parameter counts and FLOPs the rooflines divide by (from the ``ModelConfig``; no weights needed)."""
    c = cfg.llm
    p = cfg.num_params()
    embed = c.vocab_size * c.hidden_size
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    body = p["llm"] - embed - lm_head
    v = cfg.vision
    n_tok = v.num_patches + 1
    vision_layers = v.num_layers + cfg.vision.select_layer + 1      # hidden_states[-2]: the last layer is unused
    vision_flops = 2.0 * n_tok * (p["vision"] * vision_layers / v.num_layers) + \
        4.0 * vision_layers * n_tok * n_tok * v.hidden_size + 2.0 * cfg.visual_tokens * p["projector"]
    return {"decoder_params_no_embed": body + lm_head, "decoder_body_params": body, "lm_head_params": lm_head,
            "embed_params": embed, "vision_params": p["vision"], "projector_params": p["projector"],
            "vision_gflops": vision_flops / 1e9,
            "kv_bytes_per_token_fp32": 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4}
