"""Apply a per-component precision recipe to a bundle's fp32 graphs, in place, with ONNX Runtime's quantizers.

``apply_precision`` runs inside the bundle's temp directory while the export is being written: after the fp32 graphs,
the embedding table and the tokenizer exist, before parity and the manifest are finalized. Per component it

1. moves the fp32 graph aside (``.quant-fp32/`` inside the bundle dir; removed at the end),
2. writes the quantized graph under the same file name (``vision.onnx`` / ``decoder.onnx`` + ``.onnx.data``; a data
   file that the new graph no longer references is deleted), using
   ``quant_pre_process`` + ``quantize_static`` (static QDQ), ``MatMulNBitsQuantizer`` (int8/int4 weight-only for ORT
   CPU, QOperator), ``edgevlm.quant.int4_qdq`` (blocked INT4 DequantizeLinear for TensorRT), ``quantize_dynamic`` or
   ``convert_float_to_float16`` with the fp32 islands kept fp32 (``edgevlm.quant.fp16``; see
   ``edgevlm.quant.recipes``); on TensorRT >= 11 targets (strongly typed) the float parts of a Q/DQ graph are then
   converted to fp16 tensor types the same way,
3. rewrites ``embed_tokens.npy`` as float16 when the recipe asks for it,
4. checks TensorRT-targeted graphs with ``edgevlm.graphs.trt_compat`` (no contrib ops, symmetric Q/DQ, opset),
5. updates ``manifest["components"][name]`` (precision, recipe details incl. ``layer_precisions``, op histogram,
   contrib_ops flag, opset, I/O) and, with ``report=True``, stores the quantization report (``edgevlm.quant.report``)
   in ``manifest["quantization"]`` (error against fp32 on held-out inputs, sizes before/after) and prints it.

It returns the ``ParityTolerances`` to use for the (looser) post-quantization parity check against PyTorch.

    >>> tol = apply_precision(root, manifest, {"vision": "int8", "embedding": "fp16", "decoder": "int4",
    ...                                        "lm_head": "int4"}, target="cpu", calibration=None)

``quantize_bundle`` does the same to a finished fp32 bundle and writes a new bundle (``edgevlm quantize``-style use,
tests, benchmarks); for TensorRT targets it also writes the engine build plan of the quantized graphs
(``edgevlm.graphs.trt_plan.prepare_tensorrt_bundle``: ``build_plan.json``, ``build_engines.sh``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgevlm.errors import BundleError, DataError, QuantizationError, TargetError
from edgevlm.graphs import spec as S
from edgevlm.quant import recipes as R

log = logging.getLogger(__name__)

SCRATCH_DIR = ".quant-fp32"
GRAPHS = ("vision", "decoder")
DEFAULT_FILES = {"vision": "vision.onnx", "decoder": "decoder.onnx", "embed": "embed_tokens.npy"}
# Calibration memory: ORT's calibrators keep every sample's augmented outputs (inputs/outputs of the quantized op
# types only) until the end. ``CalibMaxIntermediateOutputs`` is not used: in ORT 1.32 the MinMax calibrator clears
# the collected outputs at that count *without* reducing them into ranges (the data is lost).


# ---- small ONNX helpers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers print (histogram calibrators) and log at INFO/WARNING to the root logger for every node:
    keep that out of the user's terminal (the captured stdout goes to this module's debug log)."""
    root = logging.getLogger()
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.preprocess")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    root_level = root.level
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        root.setLevel(root_level)
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if buf.getvalue().strip():
            log.debug("quantizer output:\n%s", buf.getvalue())


def _nbits_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer`` without its import-time ``logging.basicConfig(INFO)``
    reconfiguring the application's root logger."""
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name not in sys.modules:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        import importlib

        importlib.import_module(name)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return sys.modules[name]


def graph_files(path: Path) -> list[Path]:
    """The graph file and every external data file it references (existing ones)."""
    from edgevlm.graphs.files import external_data_files

    files = [path]
    if path.is_file():
        files += [path.parent / f for f in external_data_files(path) if (path.parent / f).is_file()]
    return files


def graph_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in graph_files(path) if f.is_file())


def _remove_graph(path: Path) -> None:
    for f in graph_files(path):
        f.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _move_graph(src: Path, dst: Path) -> None:
    """Move a graph and its external data (same relative names) to ``dst`` (a graph path in another folder)."""
    if src.name != dst.name:
        raise QuantizationError(f"internal: moving {src} to {dst} would break its external data references")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in graph_files(src):
        shutil.move(str(f), str(dst.parent / f.name))


def _prune_opsets(model: Any) -> None:
    """Drop opset imports of domains no node uses (quant_pre_process imports every ORT domain)."""
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def save_graph(model: Any, path: Path) -> None:
    """Save ``model`` at ``path`` with all weights in ``path.name + '.data'`` (old files replaced; an unused data
    file removed)."""
    import onnx

    _prune_opsets(model)
    _remove_graph(path)
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    from edgevlm.graphs.files import external_data_files

    if data.exists() and data.name not in external_data_files(path):
        data.unlink()


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def weight_nodes(model: Any, op_types: tuple[str, ...]) -> list[str]:
    """Names of ``op_types`` nodes whose weight (input 1) is a constant initializer (not activation x activation)."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in op_types and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)]


def find_lm_head(model: Any, logits: str = "logits") -> str:
    """The name of the MatMul/Gemm producing ``logits`` (through at most a few shape/cast ops)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    name = logits
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            return node.name
        if node.op_type not in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Slice", "Transpose", "Add"):
            break
        name = node.input[0]
    raise QuantizationError("cannot find the LM head (the MatMul producing 'logits') in the decoder graph; "
                            "quantize the LM head like the rest of the decoder (drop the lm_head override)")


def qdq_report(model: Any, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Counts of Q/DQ/MatMulNBits nodes and whether every Q/DQ zero point is an all-zero constant. ``model`` may be
    loaded without external data: zero points stored externally are read from ``base_dir`` one by one."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    inits = {i.name: i for i in model.graph.initializer}
    q = dq = nbits = 0
    symmetric = True
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            q += n.op_type == "QuantizeLinear"
            dq += n.op_type == "DequantizeLinear"
            if len(n.input) > 2 and n.input[2]:
                zp = inits.get(n.input[2])
                if zp is not None and uses_external_data(zp):
                    if base_dir is None:
                        symmetric = False
                        continue
                    copy = TensorProto()
                    copy.CopyFrom(zp)
                    load_external_data_for_tensor(copy, str(base_dir))
                    zp = copy
                if zp is None or np.any(numpy_helper.to_array(zp) != 0):
                    symmetric = False
        elif n.op_type == "MatMulNBits":
            nbits += 1
    return {"quantize_linear": q, "dequantize_linear": dq, "matmulnbits": nbits, "zero_points_all_zero": symmetric}


# ---- the quantizers ---------------------------------------------------------------------------------------------
def _fp16(src: Path, dst: Path, block: list[str] | None = None) -> dict[str, Any]:
    """fp16 tensor types (graph I/O float32) with the fp32 islands (RMSNorm, LayerNorm, Softmax) and ``block`` kept
    fp32 in the graph (``edgevlm.quant.fp16.convert_fp16``); ``src`` may be ``dst``."""
    from edgevlm.quant.fp16 import convert_fp16

    model = _load(src)
    with _quiet():
        model, info = convert_fp16(model, source=src, block=block or [])
    save_graph(model, dst)
    return info


def _int4_qdq(src: Path, dst: Path, *, block_size: int, exclude: list[str] | None,
              allowed_blocks: tuple[int, ...] | None, min_scale: float = 0.0) -> dict[str, Any]:
    """Blocked INT4 weight-only DequantizeLinear -> MatMul for every constant-weight MatMul but ``exclude``
    (``edgevlm.quant.int4_qdq``: scale amax/7 > 0, range [-7, 7], no zero point, opset 21)."""
    from edgevlm.quant.int4_qdq import quantize_matmuls_int4

    model = _load(src)
    info = quantize_matmuls_int4(model, block_size=block_size, exclude=exclude or (), allowed_blocks=allowed_blocks,
                                 min_scale=min_scale)
    if not info["nodes_quantized"]:
        raise QuantizationError(f"{src.name}: no MatMul with a constant 2-D weight to quantize to int4")
    save_graph(model, dst)
    return info


def _pre_process(src: Path, work: Path) -> Path:
    from onnxruntime.quantization import quant_pre_process

    out = work / f"{src.stem}.pre.onnx"
    with _quiet():
        quant_pre_process(str(src), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                          external_data_location=out.name + ".data")
    return out


_CALIB = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _static_qdq(src: Path, dst: Path, reader: Any, *, op_types: tuple[str, ...], calib_method: str,
                per_channel: bool, work: Path, include: list[str] | None = None,
                exclude: list[str] | None = None, reduce_range: bool = False,
                lm_head_only: bool = False, quantize_bias: bool = True) -> dict[str, Any]:
    """``quant_pre_process`` + ``quantize_static`` (QDQ, QInt8/QInt8, symmetric) on weight-bearing nodes only;
    ``reduce_range``: 7-bit weights (``recipes.int8_reduce_range``); ``lm_head_only``: the decoder's LM head alone
    (found in the pre-processed graph); ``quantize_bias=False``: biases stay float (TensorRT: no INT32 bias DQ)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = _pre_process(src, work)
    pre_model = onnx.load(str(pre), load_external_data=False)
    nodes = [find_lm_head(pre_model)] if lm_head_only else weight_nodes(pre_model, op_types)
    if include is not None:
        nodes = [n for n in nodes if n in include]
    if exclude:
        nodes = [n for n in nodes if n not in exclude]
    del pre_model
    if not nodes:
        raise QuantizationError(f"{src.name}: no {'/'.join(op_types)} node with constant weights to quantize")
    out = work / f"{src.stem}.qdq.onnx"
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": quantize_bias}
    if calib_method != "minmax":
        # ORT's histogram calibrators stack each tensor's samples with np.asarray, which fails when shapes differ
        # (prefill vs decode samples): feed them one sample per collect_data call (strided calibration).
        extra["CalibStridedMinMax"] = 1
    t0 = time.perf_counter()
    try:
        with _quiet():
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            calibrate_method=getattr(CalibrationMethod, _CALIB[calib_method]),
                            use_external_data_format=True, calibration_providers=["CPUExecutionProvider"],
                            extra_options=extra)
    except ValueError as exc:
        if "No data is collected" in str(exc):
            raise DataError(f"{src.name}: the calibration reader produced no samples; check the calibration "
                            f"source") from exc
        raise QuantizationError(f"{src.name}: static quantization failed ({exc})") from exc
    model = _load(out)
    save_graph(model, dst)
    _remove_graph(out)
    _remove_graph(pre)
    out_info: dict[str, Any] = {"nodes_quantized": len(nodes), "calibration_seconds": round(time.perf_counter() - t0, 3)}
    if lm_head_only:
        out_info["lm_head_node"] = nodes[0]
    return out_info


def _matmulnbits(src: Path, dst: Path, *, bits: int, block_size: int, quant_format: str,
                 accuracy_level: int | None, include: list[str] | None = None,
                 exclude: list[str] | None = None, stream: bool = True) -> dict[str, Any]:
    """MatMulNBits weight-only quantization. QOperator graphs go through the streaming pass (one weight in memory
    at a time, ``edgevlm.quant.nbits_stream``; the same result as ORT's quantizer), anything it does not handle
    through ``MatMulNBitsQuantizer`` on the loaded graph."""
    from onnxruntime.quantization import QuantFormat

    if stream and quant_format == "QOperator":
        from edgevlm.quant.nbits_stream import NotStreamable, quantize_matmulnbits_streaming

        try:
            _remove_graph(dst)
            with _quiet():
                return quantize_matmulnbits_streaming(src, dst, bits=bits, block_size=block_size,
                                                      accuracy_level=accuracy_level, include=include,
                                                      exclude=exclude or ())
        except NotStreamable as exc:
            log.info("%s: %s; quantizing the loaded graph instead", src.name, exc)

    MatMulNBitsQuantizer = _nbits_module().MatMulNBitsQuantizer
    model = _load(src)
    fmt = QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator
    skip = set(exclude or [])
    if include is not None:               # ORT's nodes_to_include *adds* to the op types: exclude everything else
        skip |= set(weight_nodes(model, ("MatMul",))) - set(include)
    with _quiet():
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level if fmt == QuantFormat.QOperator else None,
                                 nodes_to_exclude=sorted(skip), quant_format=fmt, op_types_to_quantize=("MatMul",))
        q.process()
    save_graph(q.model.model, dst)
    return {}


def _dynamic(src: Path, dst: Path, *, per_channel: bool, work: Path, exclude: list[str] | None,
             reduce_range: bool = False, op_types: tuple[str, ...] = ("MatMul",)) -> dict[str, Any]:
    """``quantize_dynamic`` (int8 weights, activation scales at run time) of ``op_types`` with constant weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / f"{src.stem}.dyn.onnx"
    with _quiet():
        quantize_dynamic(str(src), str(out), op_types_to_quantize=list(op_types), per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude or []),
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    model = _load(out)
    save_graph(model, dst)
    n = sum(1 for node in model.graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    del model
    _remove_graph(out)
    return {"nodes_quantized": n}


# ---- the entry point --------------------------------------------------------------------------------------------
def _component_file(manifest: Mapping[str, Any], name: str) -> str:
    entry = (manifest.get("components") or {}).get(name) or {}
    return str(entry.get("file") or DEFAULT_FILES[name])


def _resolve_plan(recipe: Any, target: Any, **kw: Any) -> R.QuantPlan:
    if isinstance(recipe, R.QuantPlan):
        return recipe
    return R.plan_quantization(dict(recipe) if isinstance(recipe, Mapping) else recipe, target, **kw)


def apply_precision(bundle_root: str | os.PathLike, manifest: dict[str, Any],
                    recipe: Mapping[str, str] | str | R.QuantPlan, *, target: Any = None, calibration: Any = None,
                    calib_method: str = "minmax", report: bool = True, calibration_samples: int | None = None,
                    heldout_samples: int | None = None,
                    decode_steps: int | None = None, int8_decoder: str = "auto", int8_vision: str = "auto",
                    int4_format: str = "auto",
                    block_size: int = R.INT4_BLOCK_SIZE, accuracy_level: int = R.INT4_ACCURACY_LEVEL,
                    threads: int | None = None, show: bool = True, console: Any = None,
                    sources: Mapping[str, str | os.PathLike] | None = None) -> S.ParityTolerances:
    """Quantize the bundle's graphs in place and record what was done in ``manifest`` (see the module docstring).

    Args:
        bundle_root: the bundle directory being written (``BundleWriter.root``) or a copy of a finished bundle.
        manifest: the manifest built so far; needs ``model`` (or ``preprocess``), ``prompt``, ``tokenizer`` and
            ``components`` file names where they differ from the defaults. Updated in place: component entries and
            ``manifest["quantization"]``.
        recipe: resolved components ``{vision, embedding, decoder, lm_head} -> precision`` (``Target.recipe()``),
            a precision spec (``"int4,vision=fp16"``) or a ``recipes.QuantPlan``.
        target: the ``Target`` (or name) the bundle is for (default ``cpu``).
        calibration: calibration source: None / "embedded", a folder of images, a LLaVA .json, or a list of
            ``CalibrationItem`` / a ``CalibrationSet``.
        calib_method: ``minmax`` | ``entropy`` | ``percentile`` (static QDQ).
        report: measure the error against fp32 on held-out inputs and store it in ``manifest["quantization"]``.
        calibration_samples / heldout_samples / decode_steps: override ``calibration/embedded.toml``.
        int8_decoder, int8_vision, int4_format, block_size, accuracy_level: see ``recipes.plan_quantization``.
        threads: ONNX Runtime intra-op threads for calibration and the report.
        show: print the report table (rich) when ``report`` is on.
        console: a ``rich.console.Console`` to print to (default: stderr).
        sources: ``{"vision" | "decoder" | "embed": path}``: read that fp32 file from another (finished) bundle
            instead of ``bundle_root``, where the result is written: the streamed rewrite of ``quantize_bundle``
            (no copy of a graph that is about to be replaced; an unchanged graph is copied, since ONNX refuses
            hard-linked external data). The source files are only read.

    Returns:
        The parity tolerances for the post-quantization check (``vision`` for vision.onnx, ``logits``/``kv`` for
        decoder.onnx).
    """
    from edgevlm.graphs.files import graph_entry
    from edgevlm.quant.calibration import (BundleContext, CalibrationSet, CalibrationSpec, VisionCalibrationReader,
                                           calibration_set)
    from edgevlm.targets import get_target

    t_start = time.perf_counter()
    root = Path(bundle_root)
    if not root.is_dir():
        raise BundleError(f"bundle directory '{root}' does not exist")
    tgt = get_target(target if target is not None else "cpu")
    plan = _resolve_plan(recipe, tgt, calib_method=calib_method, int8_decoder=int8_decoder, int8_vision=int8_vision,
                         int4_format=int4_format, block_size=block_size, accuracy_level=accuracy_level)
    src_of = {k: Path(v) for k, v in (sources or {}).items()}
    paths = {name: root / _component_file(manifest, name) for name in GRAPHS}
    for name, p in paths.items():
        if not src_of.get(name, p).is_file():
            raise BundleError(f"{name} graph '{src_of.get(name, p)}' not found: apply_precision runs after the fp32 "
                              f"export")
    embed_path = root / _component_file(manifest, "embed")
    embed_src = src_of.get("embed", embed_path)
    sizes_before = {name: graph_bytes(src_of.get(name, p)) for name, p in paths.items()}
    sizes_before["embed"] = embed_src.stat().st_size if embed_src.is_file() else 0
    spec = CalibrationSpec.load()
    steps = spec.decode_steps if decode_steps is None else int(decode_steps)

    scratch = root / SCRATCH_DIR
    # Graphs that change are moved aside (their fp32 version feeds calibration and the report); others stay put.
    changes = {"vision": plan.vision.method != "none",
               "decoder": plan.decoder.method != "none" or plan.decoder.lm_head_method is not None}
    fp32 = {name: src_of.get(name, scratch / p.name if changes[name] else p) for name, p in paths.items()}
    embed_backup = scratch / ("fp32-" + embed_path.name)
    details: dict[str, dict[str, Any]] = {}
    cset: CalibrationSet | None = None
    try:
        # -- the embedding table first: decoder calibration then sees the rows the runtime will gather
        ref_table = None
        if embed_src.is_file():
            current = np.load(embed_src, mmap_mode="r", allow_pickle=False)
            if str(current.dtype) != plan.embed_dtype and embed_src == embed_path:
                scratch.mkdir(parents=True, exist_ok=True)
                shutil.copy2(embed_path, embed_backup)                # restored if anything below fails
            if str(current.dtype) != plan.embed_dtype:
                if report:
                    ref_table = np.array(current, dtype=np.float32)  # the fp32 reference for the report
            del current
        embed_entry = _convert_embed(embed_path, plan.embed_dtype, manifest, src=embed_src)
        needs_data = plan.needs_calibration or (report and not plan.is_noop)
        ctx = None
        if needs_data:
            if isinstance(calibration, CalibrationSet):
                cset = calibration
            else:
                if heldout_samples is None and sizes_before["decoder"] >= 4 * S.LARGE_MODEL_PARAMS:
                    heldout_samples = spec.heldout_samples_large      # a float32 decoder of >= 1B parameters
                # nothing calibrated (dynamic int8 vision, weight-only decoder): one item; the held-out set counts
                n_cal = calibration_samples if plan.needs_calibration else 1
                cset = calibration_set(calibration, n_cal, heldout_samples=heldout_samples, spec=spec,
                                       image_size=(manifest.get("preprocess") or {}).get("image_size"))
            ctx = BundleContext.from_manifest(root, manifest)
        for name in GRAPHS:
            if name in src_of and not changes[name]:              # unchanged: a copy (ONNX refuses linked data)
                for f in graph_files(src_of[name]):
                    shutil.copy2(f, paths[name].parent / f.name)
                fp32[name] = paths[name]
            elif changes[name] and name not in src_of:
                _move_graph(paths[name], fp32[name])
        work = scratch / "work"
        work.mkdir(parents=True, exist_ok=True)

        # -- vision
        vr = plan.vision
        t0 = time.perf_counter()
        if vr.method == "none":
            info: dict[str, Any] = {}
        elif vr.method == "fp16-cast":
            info = _fp16(fp32["vision"], paths["vision"])
        elif vr.method == "static-qdq":
            assert cset is not None and ctx is not None
            reader = VisionCalibrationReader(cset.items, ctx.preprocess, fp32["vision"])
            info = _static_qdq(fp32["vision"], paths["vision"], reader, op_types=R.WEIGHT_OPS_VISION,
                               calib_method=plan.calib_method, per_channel=bool(vr.params.get("per_channel", True)),
                               work=work, reduce_range=bool(vr.params.get("reduce_range", False)),
                               quantize_bias=bool(vr.params.get("quantize_bias", True)))
            info["calibration_samples"] = len(cset.items)
        elif vr.method == "dynamic":
            info = _dynamic(fp32["vision"], paths["vision"], per_channel=bool(vr.params.get("per_channel", True)),
                            work=work, exclude=None, reduce_range=bool(vr.params.get("reduce_range", False)),
                            op_types=R.WEIGHT_OPS_DYNAMIC)
        else:                                                     # pragma: no cover - plan_quantization guards
            raise QuantizationError(f"vision method '{vr.method}' unknown")
        if vr.fp16_after_quantization:                           # TensorRT >= 11: fp16 tensor types, islands fp32
            info["fp16_tensors"] = _fp16(paths["vision"], paths["vision"])
        info["seconds"] = round(time.perf_counter() - t0, 3)
        details["vision"] = info

        # -- decoder
        t0 = time.perf_counter()
        details["decoder"] = _quantize_decoder(plan, fp32, paths["decoder"], cset, ctx, steps, work, threads)
        details["decoder"]["seconds"] = round(time.perf_counter() - t0, 3)

        # -- TensorRT: standard ops, symmetric Q/DQ, opset
        trt_checks: dict[str, Any] = {}
        if tgt.is_tensorrt:
            trt_checks = _check_tensorrt(paths, tgt)

        # -- manifest entries
        comps = manifest.setdefault("components", {})
        for name in GRAPHS:
            cr = plan.recipe(name)
            model = _load_graph_only(paths[name])
            rec = {**cr.to_dict(), **details[name], **qdq_report(model, paths[name].parent)}
            if cset is not None and cr.needs_calibration:
                rec["calibration"] = {**cset.info["calibration"], "method": plan.calib_method,
                                      **({"decode_steps": steps} if name == "decoder" else {})}
            if name in trt_checks:
                rec["tensorrt_compat"] = trt_checks[name]
            entry = comps.setdefault(name, {})
            keep = {k: v for k, v in entry.items() if k in ("kv_cache", "logits", "visual_tokens", "mask_value",
                                                            "mask_constants_replaced", "position_ids", "flavor",
                                                            "execution_providers", "graph")}
            if isinstance(entry.get("recipe"), dict) and "graph" in entry["recipe"]:
                rec["graph"] = entry["recipe"]["graph"]         # how the fp32 graph was built (gqa decoder)
            entry.update(graph_entry(paths[name], precision=cr.precision, recipe=rec))
            entry.update(keep)
            entry.pop("parity", None)                          # recomputed after quantization by the exporter
            entry.pop("native_decode", None)
            if name == "decoder":
                entry.update(_native_entry(model, _component_file(manifest, name)))
        if embed_entry is not None:
            comps.setdefault("embed", {}).update(embed_entry)
        for name in GRAPHS:
            kv = comps[name].get("kv_cache")
            if kv is not None:
                kv["dtype"] = "float32"                        # keep_io_types / weight-only: KV I/O stays float32

        sizes_after = {name: graph_bytes(p) for name, p in paths.items()}
        sizes_after["embed"] = embed_path.stat().st_size if embed_path.is_file() else 0
        tol = plan.tolerances()
        quant: dict[str, Any] = {
            "recipe": plan.to_dict(), "target": tgt.label, "calib_method": plan.calib_method,
            "calibration": (None if cset is None else cset.info if plan.needs_calibration else
                            {**cset.info, "calibration": {"kind": "none", "num_samples": 0,
                                                          "note": "no component of this recipe is calibrated"}}),
            "sizes": _sizes(sizes_before, sizes_after),
            "parity_tolerances": tol.to_dict(),
            "seconds": None,
        }
        too_big = _report_does_not_fit(fp32["decoder"], fp32["vision"]) if report and not plan.is_noop else None
        if too_big:
            log.warning("quantization report skipped: %s", too_big)
            quant["errors_skipped"] = too_big
        elif report and not plan.is_noop and cset is not None and ctx is not None:
            from edgevlm.quant.report import heldout_errors

            quant["errors"] = heldout_errors(ctx, cset.heldout, fp32_vision=fp32["vision"],
                                             fp32_decoder=fp32["decoder"], vision=paths["vision"],
                                             decoder=paths["decoder"], decode_steps=steps, threads=threads,
                                             ref_embed_table=ref_table, emulate_qdq=tgt.is_tensorrt)
            quant["heldout"] = cset.info["heldout"]
        quant["seconds"] = round(time.perf_counter() - t_start, 3)
        manifest["quantization"] = quant
        if report and show and not plan.is_noop:
            from edgevlm.quant.report import print_report

            print_report(quant, console=console)
        log.info("quantized %s (%s) for %s in %.1f s", root.name, plan.name, tgt.label, quant["seconds"])
        return tol
    except BaseException:
        # Put the fp32 graphs back: the directory stays a consistent fp32 export (the exporter discards it anyway).
        for name in GRAPHS:
            if name in src_of:
                _remove_graph(paths[name])                       # a partial result; the source is untouched
            elif changes[name] and fp32[name].is_file():
                _remove_graph(paths[name])
                _move_graph(fp32[name], paths[name])
        if embed_backup.is_file():
            os.replace(embed_backup, embed_path)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _native_entry(model: Any, graph_file: str) -> dict[str, Any]:
    """``{"native_decode": plan}`` for a quantized GroupQueryAttention decoder the runtime's native kernel can
    run (``edgevlm.graphs.native_plan``), else ``{}`` (the reason is logged)."""
    from edgevlm.graphs.native_plan import NotPlannable, native_decode_plan

    if not any(n.op_type == "MatMulNBits" for n in model.graph.node):
        return {}
    try:
        plan = native_decode_plan(model)
    except NotPlannable as exc:
        log.info("no native_decode plan for %s: %s", graph_file, exc)
        return {}
    folder = Path(graph_file).parent
    if str(folder) not in ("", "."):                 # external data paths are relative to the graph's folder
        def rebase(node: Any) -> None:
            if isinstance(node, dict):
                if "file" in node:
                    node["file"] = (folder / node["file"]).as_posix()
                for v in node.values():
                    rebase(v)
            elif isinstance(node, list):
                for v in node:
                    rebase(v)
        rebase(plan)
    return {"native_decode": plan}


def _load_graph_only(path: Path):
    """The graph proto without its weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _quantize_decoder(plan: R.QuantPlan, fp32: dict[str, Path], dst: Path, cset: Any, ctx: Any, steps: int,
                      work: Path, threads: int | None) -> dict[str, Any]:
    from edgevlm.quant.calibration import DecoderCalibrationReader

    dr = plan.decoder
    src = fp32["decoder"]
    head_method = dr.lm_head_method
    head = None
    if head_method is not None:
        import onnx

        head = find_lm_head(onnx.load(str(src), load_external_data=False))
    info: dict[str, Any] = {"lm_head_node": head} if head else {}

    def reader():
        assert cset is not None and ctx is not None
        return DecoderCalibrationReader(ctx, cset.items, fp32["vision"], src, decode_steps=steps, threads=threads)

    keep_head = [head] if head is not None else None          # the body pass leaves the head to its own pass
    body = dst if head_method in (None, "none", "fp16") else work / "decoder.body.onnx"
    if dr.method == "none" and head_method is None:
        pass                                                      # unchanged (not moved aside)
    elif dr.method == "none":
        raise QuantizationError("an LM head precision other than the decoder's needs a quantized decoder")
    elif dr.method == "fp16-cast":
        info.update(_fp16(src, body, block=keep_head))
    elif dr.method == "static-qdq":
        info.update(_static_qdq(src, body, reader(), op_types=R.WEIGHT_OPS_DECODER, calib_method=plan.calib_method,
                                per_channel=bool(dr.params.get("per_channel", True)), work=work, exclude=keep_head,
                                reduce_range=bool(dr.params.get("reduce_range", False)),
                                quantize_bias=bool(dr.params.get("quantize_bias", True))))
        info["calibration_samples"] = len(cset.items)
    elif dr.method == "matmulnbits-int8":
        info.update(_matmulnbits(src, body, bits=8, block_size=int(dr.params["block_size"]), quant_format="QOperator",
                                 accuracy_level=dr.params.get("accuracy_level"), exclude=keep_head))
    elif dr.method == "dynamic":
        info.update(_dynamic(src, body, per_channel=bool(dr.params.get("per_channel", True)), work=work,
                             exclude=keep_head, reduce_range=bool(dr.params.get("reduce_range", False))))
    elif dr.method == "matmulnbits-int4":
        info.update(_matmulnbits(src, body, bits=4, block_size=int(dr.params["block_size"]),
                                 quant_format=str(dr.params["quant_format"]),
                                 accuracy_level=dr.params.get("accuracy_level"), exclude=keep_head))
    elif dr.method == "int4-qdq":
        from edgevlm.quant.fp16 import FP16_MIN_NORMAL

        start = src
        if head_method == "static-qdq":                          # W8A8 head first (calibrated on the fp32 graph)
            start = work / "decoder.head.onnx"
            h = _static_qdq(src, start, reader(), op_types=R.WEIGHT_OPS_DECODER, calib_method=plan.calib_method,
                            per_channel=bool(dr.params.get("per_channel", True)), work=work, lm_head_only=True,
                            quantize_bias=bool(dr.params.get("quantize_bias", True)))
            info["lm_head_node"] = h["lm_head_node"]
            info["lm_head_quantization"] = {"method": "static-qdq (W8A8)", **h}
            info["calibration_samples"] = len(cset.items)
            body = dst
        allowed = dr.params.get("allowed_block_sizes")
        info.update(_int4_qdq(start, body, block_size=int(dr.params["block_size"]), exclude=keep_head,
                              allowed_blocks=tuple(allowed) if isinstance(allowed, list) else None,
                              min_scale=FP16_MIN_NORMAL if dr.fp16_after_quantization else 0.0))
        if start != src:
            _remove_graph(start)
    else:                                                         # pragma: no cover - plan_quantization guards
        raise QuantizationError(f"decoder method '{dr.method}' unknown")
    if head_method == "matmulnbits-int8":                        # ORT graphs: MatMulNBits 8-bit LM head
        _matmulnbits(body, dst, bits=8, block_size=int(dr.params.get("lm_head_block_size", R.INT8_BLOCK_SIZE)),
                     quant_format="QOperator", accuracy_level=dr.params.get("accuracy_level"), include=[head])
    if body != dst:
        _remove_graph(body)
    if dr.fp16_after_quantization:                              # TensorRT >= 11: fp16 tensor types, islands fp32
        info["fp16_tensors"] = _fp16(dst, dst, block=keep_head if head_method == "none" else None)
    return info


def _convert_embed(path: Path, dtype: str, manifest: dict[str, Any], src: Path | None = None
                   ) -> dict[str, Any] | None:
    """Rewrite the embedding table at ``path`` (read from ``src``, default ``path``) in ``dtype`` when it differs
    (an unchanged table read from elsewhere is linked / copied); returns the updated manifest entry fields."""
    src = path if src is None else src
    if not src.is_file():
        raise BundleError(f"embedding table '{src}' not found: apply_precision runs after the fp32 export")
    table = np.load(src, mmap_mode="r", allow_pickle=False)
    if str(table.dtype) == dtype and src != path:
        _link_or_copy(src, path)
    if str(table.dtype) == dtype:
        return {"dtype": dtype, "precision": {"float32": "fp32", "float16": "fp16"}[dtype]} \
            if (manifest.get("components") or {}).get("embed") else None
    if dtype not in ("float32", "float16"):
        raise QuantizationError(f"embedding table dtype '{dtype}' unsupported; use float16 or float32")
    arr = np.asarray(table, dtype=np.float32)
    if dtype == "float16" and np.abs(arr).max(initial=0.0) > 65504:
        raise QuantizationError(f"embedding table has values beyond the float16 range; keep it fp32 "
                                f"(--precision ...,embedding=fp32)")
    new = np.ascontiguousarray(arr.astype(dtype))
    del table
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, new, allow_pickle=False)
    os.replace(tmp, path)
    return {"dtype": dtype, "precision": {"float32": "fp32", "float16": "fp16"}[dtype],
            "shape": list(new.shape), "file": path.name,
            "note": "stored fp16; the runtime upcasts the gathered rows" if dtype == "float16" else ""}


def _check_tensorrt(paths: Mapping[str, Path], tgt: Any) -> dict[str, Any]:
    """Every TensorRT-targeted graph: trt_compat clean (no contrib ops, opset, symmetric signed Q/DQ)."""
    from edgevlm.graphs.trt_compat import ERROR, check_tensorrt_compat

    out = {}
    for name, p in paths.items():
        issues = check_tensorrt_compat(p, tgt.tensorrt)
        errors = [i for i in issues if i.severity == ERROR]
        if errors:
            lines = "\n".join(f"  - {i}" for i in errors[:20])
            raise TargetError(f"{name}: the quantized graph is not TensorRT {tgt.tensorrt} compatible "
                              f"({len(errors)} problem(s)); this is a recipe bug, report it:\n{lines}")
        out[name] = {"ok": True, "warnings": [str(i) for i in issues]}
    return out


def _sizes(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in before:
        out[k] = {"before_bytes": int(before[k]), "after_bytes": int(after[k]),
                  "ratio": round(after[k] / before[k], 4) if before[k] else None}
    tb, ta = sum(before.values()), sum(after.values())
    out["total"] = {"before_bytes": int(tb), "after_bytes": int(ta), "ratio": round(ta / tb, 4) if tb else None}
    return out


#: The quantization report runs the fp32 graphs in ONNX Runtime, which holds their weights in memory: it is skipped
#: (with the reason in the manifest) when they would take more than this share of the memory available now.
REPORT_MEMORY_SHARE = 0.6


def _report_does_not_fit(fp32_decoder: Path, fp32_vision: Path) -> str | None:
    """Why the held-out report cannot run here (its fp32 graphs exceed ``REPORT_MEMORY_SHARE`` of the available
    memory: mobilevlm-v2-7b's fp32 decoder is 27 GB), else None."""
    import psutil

    need = graph_bytes(fp32_decoder) + graph_bytes(fp32_vision)
    avail = psutil.virtual_memory().available
    if need <= REPORT_MEMORY_SHARE * avail:
        return None
    return (f"the fp32 reference graphs take {need / 2**30:.1f} GiB and this machine has {avail / 2**30:.1f} GiB "
            f"available (the report needs them in ONNX Runtime); measure the error on a larger machine with "
            f"`edgevlm quantize FP32_BUNDLE --precision ...`, or compare answers with `edgevlm run`")


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` at ``dst`` (no second copy of an unchanged graph or tokenizer), else copy it (another file
    system, or links unsupported). Safe because nothing here rewrites a file in place: every graph, table and
    manifest the quantizer changes is unlinked or replaced by rename first (``save_graph``, ``_convert_embed``), so
    the source bundle's bytes never change (tests/test_quant_stage.py checks its hashes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


# ---- whole-bundle convenience ------------------------------------------------------------------------------------
def quantize_bundle(src: str | os.PathLike, out: str | os.PathLike, precision: Mapping[str, str] | str, *,
                    target: Any = None, calibration: Any = None, calib_method: str = "minmax",
                    overwrite: bool = False, report: bool = True, show: bool = False,
                    trt_plan_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Quantize a finished **fp32** bundle into a new bundle ``out`` (written atomically; unchanged files are hard
    links to the source's where possible, listed in ``manifest["quantization"]["linked_files"]``). The new manifest keeps
    the source's parity results under ``components.*.parity_fp32`` (PyTorch parity needs the model; the quantization
    report measures the error against the fp32 graphs instead).

    For a TensorRT target the fp32 bundle's engine build plan is not copied: ``build_plan.json`` and
    ``build_engines.sh`` are written for the quantized graphs (``edgevlm.graphs.trt_plan.prepare_tensorrt_bundle``
    with the resolved recipe: precisions and builder flags, e.g. ``--fp16 --int4`` for int4 on TensorRT 10.3) and
    its return value is ``manifest["tensorrt"]``. ``trt_plan_options``: keyword arguments for
    ``prepare_tensorrt_bundle`` / ``plan_tensorrt_build`` (e.g. ``use_dla``, ``context``, ``workspace_gb``).
    Other keyword arguments go to ``apply_precision``."""
    from edgevlm.bundle import BundleWriter, read_bundle
    from edgevlm.targets import get_target

    b = read_bundle(src)
    m = dict(b.manifest)
    for name in GRAPHS:
        if m["components"][name].get("precision") != "fp32":
            raise QuantizationError(f"bundle '{src}' has a {m['components'][name].get('precision')} {name}; "
                                    f"quantize_bundle starts from an fp32 export (edgevlm export --precision fp32)")
    tgt = get_target(target if target is not None else (m.get("target") or {}).get("name", "cpu"))
    dec_kv = (m["components"]["decoder"].get("kv_cache") or {}).get("mode", "concat")
    if tgt.is_tensorrt and dec_kv != "concat":
        raise TargetError(f"bundle '{src}' has the ONNX Runtime CPU decoder (GroupQueryAttention, kv_cache mode "
                          f"'{dec_kv}'), which TensorRT cannot parse; export the fp32 bundle for a TensorRT target "
                          f"(--target {tgt.name}) or with --decoder-graph portable, then quantize that")
    import copy

    manifest = copy.deepcopy(m)
    # header keys are rewritten by the writer; engines / TensorRT checks / memory plan belong to the fp32 export
    for k in ("files", "schema_version", "format", "toolkit", "created", "updated", "engines", "tensorrt",
              "memory_plan"):
        manifest.pop(k, None)
    for name in GRAPHS:
        par = manifest["components"][name].pop("parity", None)
        if isinstance(par, dict):
            manifest["components"][name]["parity_fp32"] = {k: par.get(k) for k in ("passed", "skipped", "max_abs_diff",
                                                                                   "cosine", "worst_check")
                                                           if k in par}
    from edgevlm.graphs.trt_plan import PLAN_FILE, SCRIPT_FILE

    # the fp32 export's engine build plan describes fp32 graphs (precision fp32, no --fp16/--int8/--int4 flags): a
    # TensorRT target gets a new one for the quantized graphs below, other targets none
    stale = {PLAN_FILE, SCRIPT_FILE}
    # The graphs and the embedding table are read from the source and written once, in place of a copy. ONNX
    # refuses to load external data that has several hard links (a bundle whose decoder is shared with another, e.g.
    # `edgevlm bench`'s token budgets): such a graph is copied, as are all graph files (never linked).
    graphs = {name: graph_files(b.path(_component_file(m, name))) for name in GRAPHS}
    sources: dict[str, Path] = {name: fs[0] for name, fs in graphs.items() if all(f.stat().st_nlink == 1 for f in fs)}
    sources["embed"] = b.path(_component_file(m, "embed"))
    graph_rel = {f.relative_to(b.root).as_posix(): name for name, fs in graphs.items() for f in fs}
    with BundleWriter(out, overwrite=overwrite) as w:
        for rel in b.files:
            if rel in stale or rel == _component_file(m, "embed") or graph_rel.get(rel) in sources:
                continue
            if rel in graph_rel:
                shutil.copy2(b.path(rel), w.path(rel))
            else:
                _link_or_copy(b.path(rel), w.path(rel))
        tol = apply_precision(w.root, manifest, precision, target=tgt, calibration=calibration,
                              calib_method=calib_method, report=report, show=show, sources=sources, **kwargs)
        plan = manifest["quantization"]["recipe"]
        manifest["precision"] = plan["name"]
        manifest["recipe"] = {"name": plan["name"], "components": plan["components"],
                              "embed_dtype": plan["embed_dtype"], "tolerances": tol.to_dict()}
        manifest["target"] = tgt.to_dict()
        if tgt.is_tensorrt:
            from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle

            manifest["tensorrt"] = prepare_tensorrt_bundle(w.root, b.model_config, tgt, plan["components"],
                                                           **dict(trt_plan_options or {}))
        try:             # from the manifest: the KV dtype, buffering and context this bundle's runtime allocates
            from edgevlm import planner

            manifest["memory_plan"] = planner.plan_memory_from_manifest(manifest, model_cfg=b.model_config,
                                                                        target=tgt).to_dict()
        except Exception as exc:  # the plan is informative here; quantization itself succeeded
            log.warning("memory plan for %s not recorded: %s", tgt.label, exc)
        manifest.setdefault("notes", []).append(f"quantized from fp32 bundle '{Path(src).resolve()}' with "
                                                f"edgevlm.quant ({plan['name']})")
        manifest["parity"] = {**(manifest.get("parity") or {}), "quantized_from_fp32": True}
        manifest["quantization"]["linked_files"] = sorted(
            rel for rel in b.files if rel not in stale and w.path(rel).is_file() and os.path.samefile(b.path(rel),
                                                                                                    w.path(rel)))
        w.set_manifest(manifest)
    return Path(out)


__all__ = ["apply_precision", "quantize_bundle", "weight_nodes", "find_lm_head", "qdq_report", "save_graph",
           "graph_bytes", "graph_files", "SCRATCH_DIR"]
