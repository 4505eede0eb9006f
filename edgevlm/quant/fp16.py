"""fp16 tensor types for a graph, with the numerically sensitive ops kept fp32 ("fp32 islands").

``convert_fp16(model, source=path, block=[...])`` runs ONNX Runtime's ``convert_float_to_float16`` (graph I/O stays
float32) with every node of ``edgevlm.graphs.precision_islands.island_nodes`` (RMSNorm chains, LayerNorm, Softmax)
plus ``block`` in its ``node_block_list``, then repairs what that converter does to a *chain* of blocked nodes: it
blocks nodes one at a time and routes every tensor between two blocked nodes through fp16 (``Cast(fp16)`` then
``Cast(fp32)``), so ``x**2`` of an RMSNorm would still overflow fp16 (65504) for |x| > 256 on its way to the
``ReduceMean``. ``join_fp32_islands`` removes those round trips: inside an island every tensor stays float32; only
its inputs and its result cross a ``Cast``.

Used for the fp16 recipe (``fp16-cast``) and, on TensorRT >= 11 targets (strongly typed: the ONNX dtypes are the
precision), for the float parts of int8/int4 Q/DQ graphs (``edgevlm.quant.apply``). For the latter
``floor_qdq_scales`` first lifts every Q/DQ scale below float16's smallest normal number (6.1e-5) to it (weights
re-quantized with the new scale), so no scale turns subnormal or zero in fp16 (TensorRT refuses non-positive
scales).

``convert_fp16_file`` (the exporter's fp16 hook) converts a saved graph with external data without loading its
weights (``stream_fp16_file``): ``convert_fp16`` runs on the graph with empty stand-ins for the external
initializers, then each weight is read with ``pread``, cast (``to_float16``: the converter's clamping) or copied,
and written over the float32 data file where that is safe. mobilevlm-v2-7b's 26 GB float32 decoder converts in a
few hundred MB of memory; the result is tensor-identical to the loaded-graph conversion (tests/test_fp16_stream.py).

    >>> model, info = convert_fp16(onnx.load("decoder.onnx"), source="decoder.onnx", block=["/lm_head/MatMul"])
    >>> info["fp32_islands"]         # {"count": 14, "kinds": {"rmsnorm": 5, "softmax": 2, ...}, "where": ...}
    >>> convert_fp16_file("bundle/decoder.onnx")      # in place, streamed: {"streamed": True, "fp32_islands": ...}
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgevlm.errors import QuantizationError

__all__ = ["convert_fp16", "convert_fp16_file", "convert_fp16_file_loaded", "stream_fp16_file", "to_float16",
           "join_fp32_islands", "toposort", "floor_qdq_scales", "island_summary", "FP16_MIN_NORMAL", "WHERE"]

#: float16's smallest normal number: scales below it lose precision (subnormal) or become 0 in fp16.
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
WHERE = "kept fp32 in the graph"
_TO_FP16 = "_cast_to_fp16_node"           # names convert_float_to_float16 gives its casts
_TO_FP32 = "_cast_to_fp32_node"
_INPUT_CAST = "graph_input_cast"


def island_summary(model: Any, extra: Iterable[str] = ()) -> dict[str, Any]:
    """``{"count", "kinds", "nodes", "where"}`` for the fp32 islands of ``model`` (+ ``extra`` nodes, kind ``other``)."""
    from edgevlm.graphs.precision_islands import fp32_islands

    islands = fp32_islands(model)
    kinds = {k: len(groups) for k, groups in islands.items() if groups}
    names = [n for groups in islands.values() for g in groups for n in g]
    extra = [e for e in extra if e not in set(names)]
    if extra:
        kinds["other"] = len(extra)
    return {"count": len(names) + len(extra), "kinds": kinds, "nodes": names + extra, "where": WHERE}


def _add_value_info(model: Any, source: str | os.PathLike | None) -> None:
    """Type every intermediate tensor (the converter decides where casts go from ``value_info``): shape inference on
    the graph alone (``source`` loaded without weights, or a weightless copy), merged into ``model``."""
    import onnx

    if source is not None:
        shell = onnx.load(str(source), load_external_data=False)
    else:
        shell = onnx.ModelProto()
        shell.CopyFrom(model)
        for t in shell.graph.initializer:                       # weights go; small constants (shapes, axes) stay
            if len(t.raw_data) > 4096:
                t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(shell)
    except Exception as exc:                                     # noqa: BLE001 - onnx raises several kinds
        raise QuantizationError(f"fp16 conversion: ONNX shape inference failed ({exc})") from exc
    known = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.input} \
        | {v.name for v in model.graph.output}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)


def join_fp32_islands(model: Any) -> int:
    """Remove the ``Cast(fp16) -> Cast(fp32)`` round trips ``convert_float_to_float16`` puts between two blocked
    nodes (or between a float32 graph input and a blocked node); returns how many tensors now stay float32."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    joined = 0
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "Cast" or not n.name.endswith(_TO_FP32):
            continue
        up = producers.get(n.input[0])
        if up is None or up.op_type != "Cast" or not (up.name.endswith(_TO_FP16) or up.name.startswith(_INPUT_CAST)):
            continue
        rename[n.output[0]] = up.input[0]                        # the float32 tensor before the round trip
        joined += 1
    if not rename:
        return 0
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    _drop_dead_casts(model)
    return joined


def _drop_dead_casts(model: Any) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            break
        gone = {n.output[0] for n in dead}
        for n in dead:
            g.node.remove(n)
        keep = [v for v in g.value_info if v.name not in gone]
        del g.value_info[:]
        g.value_info.extend(keep)


def toposort(model: Any) -> None:
    """Sort ``model.graph.node`` topologically, in place (the converter appends its casts at the end; ONNX requires
    producers before consumers). Stable: nodes keep their order where the data flow allows."""
    g = model.graph
    nodes = list(g.node)
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    deps = []
    for n in nodes:
        needs = {producer[i] for i in _all_inputs(n) if i not in available and i in producer}
        deps.append(needs)
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    import heapq

    missing = [len(d) for d in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise QuantizationError("fp16 conversion left a cycle in the graph; this is a recipe bug, report it")
    del g.node[:]
    g.node.extend(nodes[k] for k in order)


def _all_inputs(node: Any) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If/Loop bodies) read."""
    names = list(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.initializer} \
                | {i.name for i in sub.input}
            for n in sub.node:
                names += [i for i in _all_inputs(n) if i not in inner]
    return names


def _clean_value_info(model: Any) -> None:
    """Drop ``value_info`` entries of initializers and of names no node produces: the converter retypes every float
    entry to fp16, also those of initializers it keeps float32 (used only by fp32 nodes), which then contradict the
    initializer's type (ONNX shape inference: "Inferred elem type differs from existing elem type")."""
    g = model.graph
    produced = {o for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    keep = [v for v in g.value_info if v.name in produced and v.name not in inits]
    del g.value_info[:]
    g.value_info.extend(keep)


def _expand(scale: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A Q/DQ scale broadcast to the data's ``shape`` (per-tensor, per-axis or blocked along ``axis``)."""
    if scale.size == 1:
        return np.broadcast_to(scale.reshape(()), shape)
    axis = axis % len(shape)
    if block > 0:
        return np.repeat(scale, block, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = scale.size
    return np.broadcast_to(scale.reshape(view), shape)


def floor_qdq_scales(model: Any, floor: float = FP16_MIN_NORMAL) -> dict[str, int]:
    """Lift every Q/DQ scale initializer below ``floor`` to it, in place (``model`` with its weights loaded). A weight
    ``DequantizeLinear`` (integer initializer input, zero point 0) is re-quantized with the lifted scale; an
    activation scale is lifted as is (Q and DQ share it). Returns ``{"weights": n, "activations": n}`` scales
    changed."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    changed = Counter()
    done: set[str] = set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        s_name = n.input[1]
        if s_name in done:
            continue
        s = numpy_helper.to_array(inits[s_name])
        if s.dtype != np.float32 or not (s < floor).any():
            continue
        new_s = np.maximum(s, np.float32(floor)).astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        q_init = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q_init is not None:
            q = numpy_helper.to_array(q_init)
            info = np.iinfo(np.int8) if q.dtype == np.int8 else None
            if info is None:
                raise QuantizationError(f"{n.name}: a {q.dtype} weight scale below {floor:g} cannot be lifted for "
                                        f"fp16; re-quantize that weight")
            axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
            w = q.astype(np.float32) * _expand(s, q.shape, axis, block)
            lo = -info.max                                          # symmetric weights: [-127, 127]
            q2 = np.clip(np.rint(w / _expand(new_s, q.shape, axis, block)), lo, info.max).astype(q.dtype)
            q_init.CopyFrom(numpy_helper.from_array(q2, q_init.name))
            changed["weights"] += int((s < floor).sum())
        else:
            changed["activations"] += int((s < floor).sum())
        inits[s_name].CopyFrom(numpy_helper.from_array(new_s.reshape(s.shape), s_name))
        done.add(s_name)
    return {"weights": changed["weights"], "activations": changed["activations"]}


def _check_scales(model: Any) -> None:
    """Every Q/DQ scale initializer is finite and > 0 in its stored type (TensorRT refuses others)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    bad = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] in inits:
            s = numpy_helper.to_array(inits[n.input[1]])
            if not (np.isfinite(s).all() and (s > 0).all()):
                bad.append(n.name)
    if bad:
        raise QuantizationError(f"{len(bad)} Q/DQ node(s) have a scale that is not finite and > 0 after the fp16 "
                                f"conversion (e.g. {bad[0]}); this is a recipe bug, report it")


def convert_fp16(model: Any, *, source: str | os.PathLike | None = None, block: Iterable[str] = (),
                 islands: bool = True) -> tuple[Any, dict[str, Any]]:
    """fp16 tensor types for ``model`` (weights loaded), graph I/O float32, the fp32 islands (``islands``) and the
    ``block`` nodes float32. ``source``: the file ``model`` was loaded from (shape inference reads it without its
    weights). Returns ``(converted model, info)``; info: ``node_block_list`` (the extra ``block``), ``fp32_islands``
    (count, kinds, node names, "kept fp32 in the graph"), ``island_casts_joined``, ``qdq_scales_floored``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = [b for b in block if b]
    summary = island_summary(model, block) if islands else {"count": len(block), "kinds": {"other": len(block)}
                                                             if block else {}, "nodes": block, "where": WHERE}
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    floored = floor_qdq_scales(model) if has_qdq else {"weights": 0, "activations": 0}
    _add_value_info(model, source)
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         node_block_list=summary["nodes"] or None)
    joined = join_fp32_islands(converted)
    toposort(converted)
    _clean_value_info(converted)
    if has_qdq:
        _check_scales(converted)
    info = {"node_block_list": list(block), "fp32_islands": {k: v for k, v in summary.items() if k != "nodes"},
            "island_casts_joined": joined}
    if has_qdq:
        info["qdq_scales_floored"] = floored
    return converted, info


def convert_fp16_file(path: str | os.PathLike, cfg: Any = None, *, in_place_data: bool = True) -> dict[str, Any]:
    """Rewrite the saved float32 graph at ``path`` (and its external data) in place as fp16 with ``convert_fp16``:
    the exporter's fp16 conversion hook (``edgevlm.pipeline`` passes it as ``postprocess={"fp16": ...}``). Returns
    the recipe details the manifest records. ``cfg`` (the model config) is accepted for the hook signature, unused.

    A graph with external data is converted without loading its weights (``stream_fp16_file``: the graph structure
    plus one weight chunk in memory; mobilevlm-v2-7b's 26 GB float32 decoder in a few hundred MB). The converted
    data are written over the float32 data file (``in_place_data``) when that is safe (one data file, not
    hard-linked elsewhere, the fp16 layout never overtakes what is still to be read), else into a new file that
    replaces it; in place, a failure midway leaves the graph unusable (the exporter converts inside the bundle's
    temporary directory, which a failure discards). A graph without external data goes through the loaded-graph path (``convert_fp16_file_loaded``);
    both give the same nodes and the same initializer values (tests/test_fp16_stream.py)."""
    import onnx
    from pathlib import Path

    path = Path(path)
    shell = onnx.load(str(path), load_external_data=False)
    why = _not_streamable(shell, path.parent)
    del shell
    if why is None:
        return stream_fp16_file(path, in_place_data=in_place_data)
    return convert_fp16_file_loaded(path, cfg)


def convert_fp16_file_loaded(path: str | os.PathLike, cfg: Any = None) -> dict[str, Any]:
    """``convert_fp16_file`` on the loaded graph (weights included: the whole float32 graph and its fp16 copy sit in
    memory): for graphs with embedded data, and the reference the streamed conversion is compared with."""
    import onnx
    from pathlib import Path

    path = Path(path)
    model = onnx.load(str(path))                              # with external data
    model16, info = convert_fp16(model, source=path)
    del model
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()                                         # onnx appends to an existing data file
    onnx.save(model16, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return _recipe(info)


def _recipe(info: dict[str, Any]) -> dict[str, Any]:
    return {"converter": "edgevlm.quant.fp16.convert_fp16 (onnxruntime.transformers.float16)", "keep_io_types": True,
            "clamp_constants": {"max_finite": 65504.0, "min_positive": 5.96e-08}, **info}


# ---- the streamed conversion ------------------------------------------------------------------------------------
#: tensors at least this large start at a 4 KiB boundary of the data file (as ``nbits_stream`` writes them), smaller
#: ones at 64 bytes; initializers under 1 KiB stay inside the graph (``onnx.save``'s ``size_threshold`` of the
#: loaded-graph path)
_PAGE, _SMALL_ALIGN, _INLINE_MAX, _PAGE_ALIGN_MIN = 4096, 64, 1024, 1 << 20
#: float32 values converted per step (a 16 MiB read): bounds the memory of the cast of one large weight
_CHUNK_ELEMENTS = 1 << 22
#: what ``convert_float_to_float16`` is called with (its defaults): the clamping the cast reproduces
_MIN_POSITIVE, _MAX_FINITE = 5.96e-08, 65504.0


def to_float16(a: np.ndarray) -> np.ndarray:
    """float32 -> float16 exactly as ``onnxruntime.transformers.float16.convert_np_to_float16`` (with the defaults
    ``convert_float_to_float16`` uses) casts an initializer: non-zero values closer to 0 than 5.96e-08 become
    +-5.96e-08, finite values beyond +-65504 become +-65504; 0, inf and NaN are kept. The plain cast is the same everywhere
    else, so only the elements that need the clamp go through ORT's function (about 10x faster on weights)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with np.errstate(over="ignore"):                          # beyond 65504: fixed just below
        out = a.astype(np.float16)
    m = np.abs(a)
    fix = ((m < np.float32(_MIN_POSITIVE)) & (m > 0)) | ((m > np.float32(_MAX_FINITE)) & (m < np.inf))
    if fix.any():
        out[fix] = convert_np_to_float16(a[fix], _MIN_POSITIVE, _MAX_FINITE)
    return out


def _ext_info(t: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in t.external_data}


def _not_streamable(model: Any, base: Path) -> str | None:
    """Why ``model`` goes through the loaded-graph path (None: it can be streamed)."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors

    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return "no external data"
    if sum(t.data_location == TensorProto.EXTERNAL for t in _get_all_tensors(model)) != len(external):
        return "external data outside the main graph's initializers"
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "Q/DQ graph (its scales are floored with the weights loaded)"
    for t in external:
        info = _ext_info(t)
        if "location" not in info or "length" not in info:
            return f"tensor '{t.name}' has external data without location / length"
        loc = (base / info["location"]).resolve()
        if base.resolve() not in loc.parents or not loc.is_file():
            return f"tensor '{t.name}': external data '{info['location']}' is not a file beside the graph"
    return None


class _Source:
    """One external float initializer of the source graph: where its bytes are and what it becomes."""

    __slots__ = ("name", "location", "offset", "length", "dims", "data_type", "out_type", "out_length", "out_offset")

    def __init__(self, t: Any) -> None:
        info = _ext_info(t)
        self.name, self.location = t.name, info["location"]
        self.offset, self.length = int(info.get("offset", 0)), int(info["length"])
        self.dims, self.data_type = list(t.dims), int(t.data_type)
        self.out_type, self.out_length, self.out_offset = self.data_type, self.length, -1


def _stand_in(t: Any) -> None:
    """Replace an external initializer by an empty tensor of its type (no data: the converter retypes it, and a
    float one it converts is recognizable by its new type); ``_Source`` remembers the rest."""
    from onnx import TensorProto

    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    del t.dims[:]
    t.dims.append(0)
    t.raw_data = b""


def _align(pos: int, n: int) -> int:
    a = _PAGE if n >= _PAGE_ALIGN_MIN else _SMALL_ALIGN
    return pos + (-pos) % a


def stream_fp16_file(path: str | os.PathLike, *, in_place_data: bool = True) -> dict[str, Any]:
    """``convert_fp16_file`` for a graph with external data, without loading its weights.

    The graph is read without its data; every external initializer is replaced by an empty stand-in (its location,
    offset, length, dims and type remembered) and the weight-less graph goes through ``convert_fp16`` (the same
    ``convert_float_to_float16`` call, islands and repairs as the loaded-graph path: that converter decides which
    initializers become fp16 from the nodes that use them, never from their values). Then the data file is
    written one tensor at a time, in source order, from ``pread`` chunks of the source: cast with ``to_float16``
    (the converter's clamping) where the converter retyped the initializer, copied where it stayed float32 (used by
    fp32 islands only) or is not a float. Offsets: 4 KiB aligned from 1 MiB, 64 bytes below; initializers the
    converter left inline and that are 1 KiB or more move to the data file too (as ``onnx.save`` with
    ``size_threshold=1024`` would). Returns the recipe details (``convert_fp16_file``) plus ``streamed: True``."""
    import onnx
    from onnx import TensorProto

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    why = _not_streamable(model, path.parent)
    if why is not None:
        raise QuantizationError(f"{path.name}: cannot stream the fp16 conversion ({why}); use convert_fp16_file")
    sources: dict[str, _Source] = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            sources[t.name] = _Source(t)
            _stand_in(t)
    model16, info = convert_fp16(model, source=path)
    del model
    inits = {t.name: t for t in model16.graph.initializer}
    ordered = sorted(sources.values(), key=lambda s: (s.location, s.offset))
    for s in ordered:
        t = inits.get(s.name)
        if t is None:                                       # the converter drops no initializer; be safe anyway
            continue
        s.out_type = int(t.data_type)
        if s.out_type != s.data_type:
            if (s.data_type, s.out_type) != (TensorProto.FLOAT, TensorProto.FLOAT16) or s.length % 4:
                raise QuantizationError(f"fp16 conversion retyped '{s.name}' from {s.data_type} to {s.out_type}; "
                                        f"this is a recipe bug, report it")
            s.out_length = s.length // 2
    ordered = [s for s in ordered if s.name in inits]
    inline = [t for t in model16.graph.initializer if t.name not in sources and t.data_location != TensorProto.EXTERNAL
              and t.HasField("raw_data") and len(t.raw_data) >= _INLINE_MAX]
    locations = {s.location for s in ordered}
    src_data = path.parent / next(iter(locations)) if len(locations) == 1 else None
    out_name = path.name + ".data"
    pos = 0
    for s in ordered:
        s.out_offset = _align(pos, s.out_length)
        pos = s.out_offset + s.out_length
    in_place = bool(in_place_data and src_data is not None and src_data.name == out_name
                    and os.stat(src_data).st_nlink == 1 and _overwrite_safe(ordered))
    data_path = path.parent / out_name
    tmp_path = data_path if in_place else path.parent / (out_name + ".fp16-tmp")
    fds: dict[str, int] = {}
    try:
        for loc in locations:
            fds[loc] = os.open(path.parent / loc, os.O_RDWR if in_place else os.O_RDONLY)
        out_fd = fds[src_data.name] if in_place else os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for s in ordered:
                _copy_tensor(fds[s.location], out_fd, s)
            for t in inline:                                   # after every source byte was read
                n = len(t.raw_data)
                offset = _align(pos, n)
                os.pwrite(out_fd, t.raw_data, offset)
                pos = offset + n
                t.ClearField("raw_data")
                _point(t, out_name, offset, n)
            os.ftruncate(out_fd, pos)
        finally:
            if not in_place:
                os.close(out_fd)
    except BaseException:
        if not in_place:
            tmp_path.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    if not in_place:                                           # (other data files the source used are left alone)
        os.replace(tmp_path, data_path)                        # a new inode: hard links elsewhere keep the old data
    for s in ordered:
        t = inits[s.name]
        del t.dims[:]
        t.dims.extend(s.dims)
        t.ClearField("raw_data")
        _point(t, out_name, s.out_offset, s.out_length)
    onnx.save_model(model16, str(path))
    return {**_recipe(info), "streamed": True, "data_in_place": in_place}


def _overwrite_safe(ordered: list[_Source]) -> bool:
    """Writing the fp16 layout over the source file in source order never overwrites a byte still to be read: each
    output starts at or before its source (the write of a chunk then stays behind its read) and ends before the
    next source begins; sources do not overlap."""
    for k, s in enumerate(ordered):
        nxt = ordered[k + 1].offset if k + 1 < len(ordered) else None
        if s.out_offset > s.offset or s.out_length > s.length:
            return False
        if nxt is not None and (s.out_offset + s.out_length > nxt or s.offset + s.length > nxt):
            return False
    return True


def _copy_tensor(src_fd: int, out_fd: int, s: _Source) -> None:
    """One tensor from the source range to its output range, in chunks (cast to fp16 where it was retyped)."""
    cast = s.out_type != s.data_type
    step = _CHUNK_ELEMENTS * 4
    done = written = 0
    while done < s.length:
        n = min(step, s.length - done)
        data = os.pread(src_fd, n, s.offset + done)
        if len(data) != n:
            raise QuantizationError(f"tensor '{s.name}': its data file ends before offset {s.offset + done} + {n}; "
                                    f"the graph's data file is truncated")
        if cast:
            data = to_float16(np.frombuffer(data, dtype="<f4")).tobytes()
        os.pwrite(out_fd, data, s.out_offset + written)
        done += n
        written += len(data)


def _point(t: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL
