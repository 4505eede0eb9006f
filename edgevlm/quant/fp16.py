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

    >>> model, info = convert_fp16(onnx.load("decoder.onnx"), source="decoder.onnx", block=["/lm_head/MatMul"])
    >>> info["fp32_islands"]         # {"count": 14, "kinds": {"rmsnorm": 5, "softmax": 2, ...}, "where": ...}
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

import numpy as np

from edgevlm.errors import QuantizationError

__all__ = ["convert_fp16", "convert_fp16_file", "join_fp32_islands", "toposort", "floor_qdq_scales", "island_summary", "FP16_MIN_NORMAL", "WHERE"]

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


def convert_fp16_file(path: str | os.PathLike, cfg: Any = None) -> dict[str, Any]:
    """Rewrite the saved float32 graph at ``path`` (and its ``.data``) in place as fp16 with ``convert_fp16``: the
    exporter's fp16 conversion hook (``edgevlm.pipeline`` passes it as ``postprocess={"fp16": ...}``). Returns the
    recipe details the manifest records. ``cfg`` (the model config) is accepted for the hook signature, unused."""
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
    return {"converter": "edgevlm.quant.fp16.convert_fp16 (onnxruntime.transformers.float16)", "keep_io_types": True,
            "clamp_constants": 1e4, **info}
