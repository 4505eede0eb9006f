"""ONNX Runtime session creation for the runtime: providers, thread counts, session options, optimized-graph cache.

Every option below is set on purpose; ``docs/runtime.md`` ("ONNX Runtime session options") has the measurements
behind the defaults. In short, for one batch-1 request at a time on a small CPU:

=====================================  ==========================================================================
option                                 choice and why
=====================================  ==========================================================================
``intra_op_num_threads``               ``threads`` (default: physical cores available to this process). SMT
                                       siblings share the FMA units, so extra logical threads only add sync cost.
``inter_op_num_threads`` = 1           graphs are sequential chains of matmuls; parallelism is inside ops.
``execution_mode`` = SEQUENTIAL        same reason; the parallel executor only adds scheduling overhead.
``graph_optimization_level`` = ALL     constant folding, fusions (attention, GELU, LayerNorm, MatMul+Add) and
                                       the CPU layout (NCHWc) transforms.
``optimized_model_filepath`` cache     opt-in (``optimized_cache=``): the optimized graph is saved once (keyed by
                                       the component's sha256, the ORT version, providers, overrides and the CPU's
                                       ISA flags) and later loads read it with optimizations disabled (ORT's
                                       "offline" mode). Off by default: measured, load time is reading + prepacking
                                       the weights, not graph optimization, and the cache's second copy of the
                                       weights competes with the bundle for the page cache.
``add_free_dimension_override``        the symbolic ``batch`` dim is pinned to 1 (the runtime is batch-1), so
                                       shape inference and kernels see one concrete dim more.
``enable_mem_pattern``                 on for the vision graph (fixed shapes: the planner reuses one arena
                                       layout), off for the decoder (its shapes change every step: a pattern per
                                       shape would be recomputed and kept for nothing).
``enable_cpu_mem_arena``               on for vision; off for the decoder: in ``concat`` KV mode every decode
                                       step allocates presents of a new size, and a BFC arena keeps every size
                                       class it has seen (RSS grows with the longest context served); plain
                                       malloc returns big blocks. Reasoned, not benchmarked at full size
                                       (``decoder_arena=True`` to compare).
``session.intra_op.allow_spinning``    "0" by default (ORT's default is "1"): on the project's shared 2-core
                                       machine spinning workers steal the cores from everything else (and from
                                       the caller thread): measured 1.4-2.2x slower decode, 1.3-1.7x slower
                                       vision with spinning on (docs/runtime.md). ``spinning=True`` saves the futex wake-up
                                       per parallel section on a dedicated device.
``session.set_denormal_as_zero``       "1": denormal floats (tiny activations late in softmax / RMSNorm) hit
                                       slow microcode paths; flushing them changes results by < 1e-38.
``log_severity_level`` = 3             errors only; ORT warns about unused initializers etc. on every load.
=====================================  ==========================================================================

Providers: ``"cpu"`` (default), ``"cuda"``, ``"tensorrt"`` (aliases of the EP names; full EP names and
``(name, options)`` tuples are accepted too). A requested provider ORT does not have raises ``RuntimeBackendError``
naming the installed ones and the package to install. CPU is always appended as the fallback.

Imports onnxruntime lazily (inside functions), never torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from edgevlm.errors import RuntimeBackendError

log = logging.getLogger(__name__)

__all__ = ["preload_request_modules", "BackendOptions", "physical_cores", "core_counts", "resolve_providers", "session_options", "create_session",
           "default_cache_dir", "device_type_for", "import_ort", "cpu_fingerprint", "SessionInfo", "cache_root",
           "cache_home"]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (pip install onnxruntime-gpu; on Jetson the JetPack wheel)",
    "TensorrtExecutionProvider": "onnxruntime-gpu built with TensorRT (the JetPack wheel) and TensorRT itself",
}
#: Initializers at least this big go to the external file of a cached optimized graph.
_EXTERNAL_MIN_BYTES = 1024


def import_ort():
    """``import onnxruntime`` with a typed error naming the fix."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeBackendError("running a bundle needs the 'onnxruntime' package (a core dependency of edgevlm), "
                                  "which is not importable: pip install onnxruntime (or onnxruntime-gpu / the "
                                  "JetPack wheel on a GPU device)") from exc
    return ort


def core_counts() -> tuple[int, int, int | None]:
    """``(logical, usable, physical)``: logical CPUs, those this process's affinity mask allows, physical cores
    (None when psutil is missing)."""
    logical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    phys = None
    try:
        import psutil

        phys = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return logical, allowed, phys


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once; affinity masks respected)."""
    logical, allowed, phys = core_counts()
    phys = phys or logical
    smt = max(1, logical // phys)
    return max(1, min(phys, allowed // smt if allowed >= smt else allowed))


def cpu_fingerprint() -> str:
    """CPU model + ISA flags: an optimized graph (NCHWc layouts, kernel choices) is valid only for the same CPU."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":
                    break                                  # first processor block is enough
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_home() -> Path:
    """``$EDGEVLM_CACHE``, else ``$XDG_CACHE_HOME/edgevlm``, else ``~/.cache/edgevlm``."""
    base = os.environ.get("EDGEVLM_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "edgevlm"


def default_cache_dir() -> Path:
    """Where ``optimized_cache="auto"`` keeps optimized graphs: ``cache_home() / "ort"``."""
    return cache_home() / "ort"


@dataclass
class BackendOptions:
    """How to create ORT sessions. ``None`` fields take the documented defaults.

    Args:
        threads: intra-op threads (default: physical cores).
        providers: execution providers in priority order (default: CPU only).
        optimized_cache: keep ORT-optimized graphs for later loads: ``"auto"`` (``default_cache_dir()``), a
            directory, or ``None`` (default: off; on this project's machine the cache did not shorten loads, see
            docs/runtime.md).
        spinning: allow intra-op worker threads to spin between parallel sections (default off).
        profile_dir: write an ORT profile (JSON trace) per session into this directory.
        graph_optimization_level: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
        decoder_arena: use ORT's BFC arena for the decoder (default off; see module docstring).
        save_prepacked: also store the kernels' prepacked weight layouts in the optimized-graph cache
            (``session.save_external_prepacked_constant_initializers``), so a cached load maps them instead of
            repacking; costs a second copy of the weights on disk.
        native_decode: ``"auto"`` (default): decode steps run on the native kernel (``edgevlm.runtime.native``)
            when the bundle has a ``native_decode`` plan, the providers are CPU only and this machine can build
            it, else on ONNX Runtime; ``"on"``: the same but an error when it cannot; ``"off"``: ONNX Runtime.
        native_kv: what the native kernel's attention reads: ``"float16"`` (default; an fp16 copy of the KV cache,
            half the KV bytes per step, as llama.cpp's default cache) or ``"float32"`` (the ONNX Runtime buffers,
            bit-for-bit the cache the prefill wrote).
        backend: which decoder / vision backend ``Session`` and ``open_decoder`` use: ``"auto"`` (default:
            TensorRT engines when usable here, else native where it runs, else ONNX Runtime), ``"ort"``,
            ``"native"`` or ``"tensorrt"`` (``edgevlm.runtime.decoders``).
    """

    threads: int | None = None
    providers: Sequence[Any] | None = None
    optimized_cache: str | os.PathLike | bool | None = None
    spinning: bool = False
    profile_dir: str | os.PathLike | None = None
    graph_optimization_level: str = "all"
    decoder_arena: bool = False
    save_prepacked: bool = False
    native_decode: str = "auto"
    native_kv: str = "float16"
    backend: str = "auto"
    extra_config: dict[str, str] = field(default_factory=dict)

    @property
    def resolved_threads(self) -> int:
        if self.threads is None:
            return physical_cores()
        if int(self.threads) < 1:
            raise RuntimeBackendError(f"threads must be >= 1, got {self.threads}")
        return int(self.threads)


@dataclass
class SessionInfo:
    """What happened when a session was created (reported in ``Session.load_info``)."""

    component: str
    seconds: float
    providers: list[str]
    cache: str                     # "hit", "miss" (written now), "off"
    model_path: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_providers(requested: Sequence[Any] | None) -> list[Any]:
    """Map aliases to EP names, check ORT has them, append CPU as the fallback."""
    ort = import_ort()
    available = ort.get_available_providers()
    if not requested:
        return ["CPUExecutionProvider"]
    out: list[Any] = []
    for item in requested:
        name, opts = (item if isinstance(item, (tuple, list)) else (item, None))
        full = PROVIDER_ALIASES.get(str(name).lower(), str(name))
        if full not in available:
            pkg = _PROVIDER_PACKAGES.get(full, "an onnxruntime build that includes it")
            raise RuntimeBackendError(
                f"execution provider '{name}' ({full}) is not available in this onnxruntime "
                f"{ort.__version__}; available: {', '.join(available)}. Install {pkg}, or run on the CPU "
                f"(providers=['cpu'] / --provider cpu)")
        out.append((full, dict(opts)) if opts else full)
    if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in out]:
        out.append("CPUExecutionProvider")
    return out


def device_type_for(providers: Sequence[Any]) -> str:
    """Where ORT-allocated outputs (the KV cache) should live: ``"cuda"`` under CUDA/TensorRT, else ``"cpu"``."""
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
           "disable": "ORT_DISABLE_ALL"}


def session_options(kind: str, opts: BackendOptions, *, free_dims: dict[str, int] | None = None,
                    optimized_out: Path | None = None, preoptimized: bool = False):
    """``SessionOptions`` for a component. ``kind``: ``"vision"`` (fixed shapes) or ``"decoder"`` (dynamic)."""
    ort = import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.resolved_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if opts.graph_optimization_level not in _LEVELS:
        raise RuntimeBackendError(f"graph_optimization_level '{opts.graph_optimization_level}' unknown; known: "
                                  f"{', '.join(_LEVELS)}")
    level = "disable" if preoptimized else opts.graph_optimization_level
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    dynamic = kind == "decoder"
    so.enable_mem_pattern = not dynamic
    so.enable_cpu_mem_arena = (not dynamic) or opts.decoder_arena
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    for name, value in (free_dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(value))
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    optimized_out.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(_EXTERNAL_MIN_BYTES))
        if opts.save_prepacked:
            so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    for key, value in opts.extra_config.items():
        so.add_session_config_entry(key, str(value))
    if opts.profile_dir is not None:
        Path(opts.profile_dir).mkdir(parents=True, exist_ok=True)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(opts.profile_dir) / f"ort_{kind}")
    return so


def _cache_key(kind: str, file_hashes: Sequence[str], providers: Sequence[Any], opts: BackendOptions,
               free_dims: dict[str, int] | None) -> str:
    ort = import_ort()
    payload = {"kind": kind, "files": list(file_hashes), "ort": ort.__version__,
               "providers": [p if isinstance(p, str) else [p[0], sorted(p[1].items())] for p in providers],
               "level": opts.graph_optimization_level, "free_dims": sorted((free_dims or {}).items()),
               "cpu": cpu_fingerprint(), "extra": sorted(opts.extra_config.items()),
               "prepacked": opts.save_prepacked, "v": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_root(opts: BackendOptions) -> Path | None:
    """The cache directory ``opts`` selects (``None`` when caching is off)."""
    return _cache_dir(opts)


def _cache_dir(opts: BackendOptions) -> Path | None:
    if opts.optimized_cache in (None, False, "", "off", "none"):
        return None
    if opts.optimized_cache in ("auto", True):
        return default_cache_dir()
    return Path(opts.optimized_cache)  # type: ignore[arg-type]


def create_session(model_path: Path, *, kind: str, component: str, file_hashes: Sequence[str],
                   providers: Sequence[Any], opts: BackendOptions,
                   free_dims: dict[str, int] | None = None) -> tuple[Any, SessionInfo]:
    """Create an ``InferenceSession`` for one bundle component, through the optimized-graph cache when enabled.

    Cache layout: ``<cache>/<key>/model.onnx`` (+ ``model.onnx.data``) and ``<key>/done`` (written last, so an
    interrupted first load is never taken for a valid cache entry). Graphs for the TensorRT EP are not cached
    (TensorRT keeps its own engine cache; an ORT-optimized graph would hide nodes from it).
    """
    ort = import_ort()
    t0 = time.perf_counter()
    names = [p if isinstance(p, str) else p[0] for p in providers]
    cache_root = _cache_dir(opts)
    if "TensorrtExecutionProvider" in names or opts.graph_optimization_level == "disable":
        cache_root = None
    status, load_path, so = "off", model_path, None
    entry_dir = None
    if cache_root is not None:
        entry_dir = cache_root / _cache_key(kind, file_hashes, providers, opts, free_dims)
        cached = entry_dir / "model.onnx"
        if (entry_dir / "done").is_file() and cached.is_file():
            status, load_path = "hit", cached
            so = session_options(kind, opts, free_dims=free_dims, preoptimized=True)
        else:
            try:
                entry_dir.mkdir(parents=True, exist_ok=True)
                for stale in entry_dir.iterdir():
                    stale.unlink()
                status = "miss"
                so = session_options(kind, opts, free_dims=free_dims, optimized_out=cached)
            except OSError as exc:
                log.warning("optimized-graph cache %s is not writable (%s); loading without it", entry_dir, exc)
                status, entry_dir = "off", None
    if so is None:
        so = session_options(kind, opts, free_dims=free_dims)
    try:
        sess = ort.InferenceSession(str(load_path), sess_options=so, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if status == "miss" and entry_dir is not None:
            # writing the optimized graph failed (disk full, permissions): the cache is an optimization only
            log.warning("could not write the optimized graph of '%s' to %s (%s); loading without the cache",
                        component, entry_dir, exc)
            shutil.rmtree(entry_dir, ignore_errors=True)
            return create_session(model_path, kind=kind, component=component, file_hashes=file_hashes,
                                  providers=providers, opts=replace(opts, optimized_cache=None), free_dims=free_dims)
        if status == "hit":
            log.warning("cached optimized graph %s failed to load (%s); rebuilding it", load_path, exc)
            for stale in entry_dir.iterdir():  # type: ignore[union-attr]
                stale.unlink()
            return create_session(model_path, kind=kind, component=component, file_hashes=file_hashes,
                                  providers=providers, opts=opts, free_dims=free_dims)
        raise RuntimeBackendError(f"ONNX Runtime cannot load component '{component}' from '{model_path}' "
                                  f"({type(exc).__name__}: {exc}); check the bundle with `edgevlm inspect` or "
                                  f"re-export it") from exc
    if status == "miss" and entry_dir is not None:
        if (entry_dir / "model.onnx").is_file():
            (entry_dir / "done").write_text(json.dumps({"source": str(model_path), "created": time.time()}))
        else:
            status = "off"
    info = SessionInfo(component=component, seconds=time.perf_counter() - t0,
                       providers=list(sess.get_providers()), cache=status, model_path=str(load_path),
                       options={"threads": opts.resolved_threads, "spinning": opts.spinning,
                                "level": opts.graph_optimization_level, "free_dims": dict(free_dims or {}),
                                "mem_pattern": kind != "decoder",
                                "arena": kind != "decoder" or opts.decoder_arena})
    return sess, info


def preload_request_modules() -> None:
    """Import onnxruntime and what a first request would otherwise import lazily (PIL's PNG/JPEG plugins,
    numpy.random, psutil): ~0.1-0.2 s of module loading that belongs to load time, not to the first request."""
    import numpy.random  # noqa: F401
    from PIL import Image

    from edgevlm.runtime.backends import import_ort

    import_ort()
    Image.preinit()
    try:
        import psutil  # noqa: F401
    except ImportError:
        pass
