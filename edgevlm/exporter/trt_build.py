"""Build the TensorRT engines of a bundle from its build plan with the TensorRT Python API (on the device), or
register engines that ``build_engines.sh`` (trtexec) built.

    >>> from edgevlm.exporter.trt_build import build_engines, register_engines
    >>> info = build_engines("bundle_dir")            # reads bundle_dir/build_plan.json, writes engines/*.engine
    >>> info["decoder"]["sha256"], info["decoder"]["device"]
    >>> info = register_engines("bundle_dir", tensorrt="10.3.0")   # engines already on disk (build_engines.sh)

Per engine: ``OnnxParser.parse_from_file`` (so external ``*.onnx.data`` is found next to the graph), one
optimization profile per planned profile, builder flags per TensorRT version (10.x weakly typed: FP16/INT8/INT4/...
as planned; 11.x: ``STRONGLY_TYPED`` network, no precision flags), per-layer fp32 for the plan's ``fp32_layers``
(weak fp16 builds: ``OBEY_PRECISION_CONSTRAINTS``, ``layer.precision`` and float output types of every layer that
``trt_plan.fp32_layer_matches`` a listed ONNX node), DLA core + GPU fallback when planned, a timing cache shared by
all engines of the bundle (loaded if present, saved after each build; a cache from another device or TensorRT that
``set_timing_cache`` refuses is replaced by a fresh one, with a warning), ``build_serialized_network``, and an atomic
write of ``*.engine``. Returns per-engine metadata for the manifest (``engine_metadata``: file, bytes, sha256, the
full TensorRT version, device name and compute capability, build time, profiles).

``tensorrt`` is imported inside ``build_engines`` only; without it: ``MissingDependency``; with it but no usable
GPU (``trt.Builder`` fails: "CUDA initialization failure"): ``RuntimeBackendError`` saying where to run it.
The same build without Python: ``bash bundle_dir/build_engines.sh`` (trtexec), which then runs
``edgevlm register-engines`` (``register_engines``: the same metadata, each engine deserialized once to check it
loads when ``tensorrt`` imports here).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgevlm.errors import BundleError, MissingDependency, RuntimeBackendError
from edgevlm.graphs.trt_plan import PLAN_FILE, SCRIPT_FILE, BuildPlan, EnginePlan, fp32_layer_matches
from edgevlm.precisions import TENSORRT_BUILDER_FLAGS
from edgevlm.targets import parse_trt_version

log = logging.getLogger(__name__)

WHERE_TO_RUN = ("build engines on the target device (e.g. the Jetson board) with `edgevlm build-engine BUNDLE` or "
                f"run the bundle's {SCRIPT_FILE} there")

_FLAG_NAMES = TENSORRT_BUILDER_FLAGS            # precision -> tensorrt.BuilderFlag member (edgevlm.precisions)


def import_tensorrt() -> Any:
    """``import tensorrt`` or ``MissingDependency`` whose message says where engines get built."""
    try:
        import tensorrt as trt
    except ImportError as exc:          # also: the bindings are installed but libnvinfer is not (see reference §4.8)
        err = MissingDependency("tensorrt", "tensorrt", "Building TensorRT engines")
        text = f"{err.args[0]}. Or {WHERE_TO_RUN}. ({exc})"
        err.args, err.msg = (text,), text          # ImportError.__str__ prints .msg
        raise err from None
    return trt


def cuda_device() -> tuple[str, str] | None:
    """(name, compute capability "M.m") of CUDA device 0 through the driver API (libcuda), or None."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    try:
        if cuda.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(), ctypes.c_int()
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)     # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)     # ..._MINOR
    except (AttributeError, OSError):
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_plan(bundle: Path, plan: BuildPlan | Mapping[str, Any] | str | os.PathLike | None) -> BuildPlan:
    if plan is None:
        return BuildPlan.load(bundle / PLAN_FILE)
    if isinstance(plan, BuildPlan):
        return plan
    if isinstance(plan, Mapping):
        return BuildPlan.from_dict(plan)
    return BuildPlan.load(plan)


def build_engines(bundle_dir: str | os.PathLike, plan: BuildPlan | Mapping[str, Any] | str | os.PathLike | None = None,
                  *, only: list[str] | None = None, allow_version_mismatch: bool = False, timing_cache: bool = True,
                  verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Build every engine of ``plan`` (default: ``bundle_dir/build_plan.json``) into the bundle.

    Args:
        bundle_dir: the bundle folder (ONNX paths in the plan are relative to it).
        plan: a ``BuildPlan``, its dict, or a path to its JSON; None = the bundle's ``build_plan.json``.
        only: build just these components (e.g. ``["decoder"]``).
        allow_version_mismatch: build with an installed TensorRT whose minor version differs from the plan's
            (another major version is never accepted: its builder flags differ).
        timing_cache: load and save the plan's timing cache (faster rebuilds).
        verbose: TensorRT INFO logging instead of WARNING.

    Returns:
        ``{component: metadata}`` for the manifest.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} not found")
    bp = _load_plan(bundle, plan)
    trt = import_tensorrt()

    have = parse_trt_version(trt.__version__)
    want = parse_trt_version(bp.tensorrt)
    if have != want:
        msg = (f"the build plan is for TensorRT {bp.tensorrt} ({bp.target}) but TensorRT {trt.__version__} is installed")
        if have[0] != want[0] or not allow_version_mismatch:
            raise RuntimeBackendError(f"{msg}: engines only run with the TensorRT they were built with. Re-export "
                                      f"with --target {bp.target.split('@')[0]}@trt{have[0]}.{have[1]}"
                                      + ("" if have[0] != want[0] else ", or allow the mismatch"))
        log.warning("%s; building anyway (allow_version_mismatch)", msg)
    strong = bp.builder_mode == "strong" or have[0] >= 11

    device = cuda_device()
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:            # "pybind11::init(): factory function returned nullptr" (no CUDA device)
        raise RuntimeBackendError(f"TensorRT cannot initialize CUDA on this machine (no usable NVIDIA GPU/driver): "
                                  f"{WHERE_TO_RUN}. ({exc})") from None
    if device is None:
        device = ("unknown CUDA device", "")
    elif bp.compute_capability and device[1] != bp.compute_capability:
        log.warning("building on %s (SM %s) for target %s (SM %s): the engines will run on this GPU's architecture "
                    "only", device[0], device[1], bp.target, bp.compute_capability)

    cache_path = bundle / bp.timing_cache
    selected = [e for e in bp.engines if only is None or e.component in only]
    if only:
        unknown = sorted(set(only) - {e.component for e in bp.engines})
        if unknown:
            raise BundleError(f"no engine for {', '.join(unknown)} in the plan; engines: "
                              f"{', '.join(e.component for e in bp.engines)}")
    results: dict[str, dict[str, Any]] = {}
    for i, eng in enumerate(selected, 1):
        log.info("[%d/%d] building %s from %s on %s (this can take many minutes)", i, len(selected), eng.engine,
                 eng.onnx, device[0])
        results[eng.component] = _build_one(trt, builder, logger, bundle, eng, strong, cache_path if timing_cache
                                            else None, device, bp)
    return results


def _build_one(trt: Any, builder: Any, logger: Any, bundle: Path, eng: EnginePlan, strong: bool,
               cache_path: Path | None, device: tuple[str, str], bp: BuildPlan) -> dict[str, Any]:
    onnx_path = bundle / eng.onnx
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path} not found: the bundle is incomplete (re-export it)")
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)   # deprecated (always on) in 11
    flags = 1 << int(strongly) if strong and strongly is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for k in range(parser.num_errors):
            e = parser.get_error(k)
            node = getattr(e, "node_name", lambda: "")() or f"node #{e.node()}"
            op = getattr(e, "node_operator", lambda: "")()
            errors.append(f"{node} ({op}): {e.desc()}" if op else f"{node}: {e.desc()}")
        raise RuntimeBackendError(f"TensorRT {trt.__version__} cannot parse {eng.onnx}:\n  - " + "\n  - ".join(errors)
                                  + "\n  (check the graph first with edgevlm.graphs.trt_compat)")
    net_inputs = {network.get_input(k).name: tuple(network.get_input(k).shape) for k in range(network.num_inputs)}
    dynamic = {n for n, s in net_inputs.items() if any(d < 0 for d in s)}

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, eng.workspace_bytes or (1 << 30))
    pinned, unmatched = 0, []
    if not strong:
        for f in eng.precision_flags:
            config.set_flag(getattr(trt.BuilderFlag, _FLAG_NAMES[f]))
        if eng.fp32_layers:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pinned, unmatched = pin_fp32_layers(trt, network, eng.fp32_layers)
            log.info("%s: %d layer(s) pinned to fp32 for %d RMSNorm/LayerNorm/Softmax node(s)", eng.component,
                     pinned, len(eng.fp32_layers) - len(unmatched))
            if unmatched:
                log.warning("%s: %d fp32 node(s) of the plan match no TensorRT layer (the parser renamed or fused "
                            "them; those stay at the builder's choice): %s", eng.component, len(unmatched),
                            ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
    if eng.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(eng.dla_core)
        if eng.allow_gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for prof in eng.profiles:
        planned = set(prof.shapes)
        missing = sorted(dynamic - planned)
        extra = sorted(planned - set(net_inputs))
        if missing or extra:
            raise BundleError(f"{eng.onnx}: the plan's '{prof.name}' profile does not match the graph inputs "
                              f"(dynamic inputs without a range: {missing or 'none'}; planned inputs the graph lacks: "
                              f"{extra or 'none'}): re-plan from the bundle's manifest")
        p = builder.create_optimization_profile()
        for name, rng in prof.shapes.items():
            p.set_shape(name, rng.min, rng.opt, rng.max)
        config.add_optimization_profile(p)

    cache, cache_state = None, "off"
    if cache_path is not None:
        cache, cache_state = _attach_timing_cache(config, cache_path)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise RuntimeBackendError(f"TensorRT failed to build {eng.engine} from {eng.onnx} (see the TensorRT log "
                                  f"above; out of memory on a Jetson: run `edgevlm plan` and lower the workspace or "
                                  f"the context)")
    out = bundle / eng.engine
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, out)
    if cache is not None and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_cache = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp_cache, cache_path)
    log.info("built %s (%.1f MiB) in %.0f s", eng.engine, out.stat().st_size / 2**20, seconds)
    meta = engine_metadata(bundle, eng, bp, tensorrt=trt.__version__, device=device,
                           builder_mode="strong" if strong else "weak", built_by="edgevlm build-engine")
    meta["build_s"] = round(seconds, 2)
    meta["timing_cache"] = cache_state
    if not strong and eng.fp32_layers:
        meta["fp32_layers"] = {"planned": len(eng.fp32_layers), "layers_pinned": pinned,
                               "unmatched": unmatched[:20]}
    return meta


def pin_fp32_layers(trt: Any, network: Any, names: Sequence[str]) -> tuple[int, list[str]]:
    """Set ``precision`` and every float output type to fp32 on each layer of ``network`` that belongs to one of the
    ONNX nodes ``names`` (``trt_plan.fp32_layer_matches``: the node's name or name + ``_<n>``); layers with a
    non-float output (shape / index computations the parser adds) are left alone. Returns (layers pinned, listed
    names that matched no layer). Needs ``OBEY_PRECISION_CONSTRAINTS`` on the builder config to bind."""
    wanted = set(names)
    floats = {getattr(trt, n) for n in ("float32", "float16", "bfloat16") if hasattr(trt, n)}
    matched: set[str] = set()
    pinned = 0
    for k in range(int(network.num_layers)):
        layer = network.get_layer(k)
        node = fp32_layer_matches(str(layer.name), wanted)
        if node is None:
            continue
        matched.add(node)
        outputs = [layer.get_output(j) for j in range(int(layer.num_outputs))]
        if any(o is None or o.dtype not in floats for o in outputs):
            continue
        layer.precision = trt.float32
        for j in range(len(outputs)):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned, [n for n in names if n not in matched]


def _attach_timing_cache(config: Any, path: Path) -> tuple[Any, str]:
    """Give ``config`` the timing cache in ``path`` ("loaded"), a new one when there is no file ("new"), or, when
    TensorRT refuses the file (another device or TensorRT version, or a corrupt file: ``set_timing_cache`` returns
    False or raises), a fresh one ("replaced": the file is overwritten after the build) instead of failing the build.
    Returns (cache or None, state)."""
    data = path.read_bytes() if path.is_file() else b""
    why = ""
    try:
        cache = config.create_timing_cache(data)
        ok = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False
    except (RuntimeError, TypeError, ValueError) as exc:      # pybind11 errors of a corrupt buffer
        cache, ok, why = None, False, f": {exc}"
    if ok:
        return cache, "loaded" if data else "new"
    log.warning("timing cache %s was not accepted by this TensorRT / device (from another GPU or TensorRT version, "
                "or corrupt%s): building with a fresh cache; the file is overwritten after the build", path, why)
    try:
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False:
            return cache, "replaced"
    except (RuntimeError, TypeError, ValueError) as exc:
        log.warning("a fresh timing cache failed too (%s): building without one", exc)
    return None, "off"


def engine_metadata(bundle: Path, eng: EnginePlan, bp: BuildPlan, *, tensorrt: str,
                    device: tuple[str, str] | None, builder_mode: str, built_by: str,
                    built_at: str | None = None) -> dict[str, Any]:
    """The manifest's ``tensorrt.engines[component]`` entry for the engine file of ``eng`` in ``bundle``: file, onnx,
    bytes, sha256, the full TensorRT version, device name + compute capability (None when unknown), target,
    builder mode, precision flags, DLA core, profiles, built_at, built_by."""
    out = bundle / eng.engine
    return {"file": eng.engine, "onnx": eng.onnx, "bytes": out.stat().st_size, "sha256": _sha256(out),
            "tensorrt": str(tensorrt), "device": device[0] if device else None,
            "compute_capability": (device[1] or None) if device else None,
            "target": bp.target, "builder_mode": builder_mode,
            "precision_flags": [] if builder_mode == "strong" else list(eng.precision_flags), "dla_core": eng.dla_core,
            "profiles": [{"name": p.name, "shapes": {k: {"min": list(v.min), "opt": list(v.opt), "max": list(v.max)}
                                                     for k, v in p.shapes.items()}} for p in eng.profiles],
            "built_at": built_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "built_by": built_by}


def register_engines(bundle_dir: str | os.PathLike, plan: BuildPlan | Mapping[str, Any] | str | os.PathLike | None = None,
                     *, tensorrt: str | None = None, built_by: str = "build_engines.sh", validate: bool = True,
                     trt: Any = None) -> dict[str, dict[str, Any]]:
    """Metadata (``engine_metadata``) of every engine of the plan that is on disk, e.g. built by the bundle's
    ``build_engines.sh`` with trtexec: nothing is built.

    Args:
        bundle_dir: the bundle folder.
        plan: the build plan (default: the bundle's ``build_plan.json``).
        tensorrt: the full TensorRT version that built them (``build_engines.sh`` passes trtexec's, e.g.
            ``10.3.0``); default: the installed ``tensorrt`` package's, else the plan's (with a warning).
        built_by: recorded as ``built_by``.
        validate: deserialize each engine with ``tensorrt`` when it imports and can reach a GPU (``validated``:
            true); an engine that does not deserialize is a ``RuntimeBackendError``. Without tensorrt / a GPU,
            or with another TensorRT major.minor than the engines', ``validated`` is false with the reason.
        trt: the ``tensorrt`` module to use (tests pass a fake); default: ``import tensorrt`` if it imports.

    Raises ``BundleError`` when no planned engine is on disk, ``RuntimeBackendError`` for an engine of another
    TensorRT major version than the plan's or one that does not deserialize.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} not found")
    bp = _load_plan(bundle, plan)
    present = [e for e in bp.engines if (bundle / e.engine).is_file()]
    missing = [e.engine for e in bp.engines if e not in present]
    if not present:
        raise BundleError(f"no engine of the build plan is in {bundle} ({', '.join(missing)}): build them first with "
                          f"`bash {bundle / SCRIPT_FILE}` or `edgevlm build-engine {bundle}`")
    if missing:
        log.warning("not built (skipped): %s", ", ".join(missing))
    why_not = ""
    if trt is None and validate:
        try:
            trt = import_tensorrt()
        except MissingDependency:
            why_not = "tensorrt is not importable here"
    version = tensorrt or (getattr(trt, "__version__", None) if trt is not None else None)
    if not version:
        version = bp.tensorrt
        log.warning("the TensorRT version that built the engines is unknown (no --tensorrt, no tensorrt package): "
                    "recording the plan's %s", version)
    have, want = parse_trt_version(str(version)), parse_trt_version(bp.tensorrt)
    if have[0] != want[0]:
        raise RuntimeBackendError(f"the engines were built with TensorRT {version} but the plan is for TensorRT "
                                  f"{bp.tensorrt} (another major version: other builder flags). Re-export with "
                                  f"--target {bp.target.split('@')[0]}@trt{have[0]}.{have[1]} and rebuild")
    if have != want:
        log.warning("the engines were built with TensorRT %s, the plan is for %s", version, bp.tensorrt)
    strong = bp.builder_mode == "strong" or have[0] >= 11
    device = cuda_device()
    runtime = None
    if validate and trt is not None and not why_not:
        if parse_trt_version(str(trt.__version__)) != have:
            why_not = (f"the installed tensorrt is {trt.__version__}, the engines were built with {version}: "
                       f"not deserialized")
        else:
            try:
                runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            except TypeError as exc:        # "factory function returned nullptr": no CUDA device / driver
                why_not = f"TensorRT cannot initialize CUDA here ({exc})"
    elif not validate:
        why_not = "not validated (validate=False)"
    results: dict[str, dict[str, Any]] = {}
    for eng in present:
        path = bundle / eng.engine
        built_at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))
        meta = engine_metadata(bundle, eng, bp, tensorrt=str(version), device=device,
                               builder_mode="strong" if strong else "weak", built_by=built_by, built_at=built_at)
        if runtime is not None:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise RuntimeBackendError(f"{path} does not deserialize with TensorRT {trt.__version__} on this "
                                          f"device (see the TensorRT log): rebuild it here with `bash "
                                          f"{bundle / SCRIPT_FILE}` or `edgevlm build-engine {bundle}`")
            meta["validated"] = True
            profiles = getattr(engine, "num_optimization_profiles", None)
            if isinstance(profiles, int) and profiles != len(eng.profiles):
                log.warning("%s has %d optimization profile(s), the plan %d", eng.engine, profiles,
                            len(eng.profiles))
            del engine
        else:
            meta["validated"] = False
            meta["validation"] = why_not
        results[eng.component] = meta
    return results


__all__ = ["build_engines", "register_engines", "engine_metadata", "pin_fp32_layers", "import_tensorrt",
           "cuda_device", "WHERE_TO_RUN"]
