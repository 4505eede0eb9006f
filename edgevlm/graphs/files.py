"""ONNX graph files as the bundle records them: I/O, op histograms, opsets, external data, the manifest entry.

Shared by the export stage (``edgevlm.exporter``), the quantization stage (``edgevlm.quant``), ``verify`` and the
TensorRT checks; reads graph protos without their weights (``load_external_data=False``). No torch.

    >>> from edgevlm.graphs.files import graph_io, graph_entry, external_data_files
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: ONNX domains that are standard (not contrib ops).
STANDARD_DOMAINS = ("", "ai.onnx")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16", 17: "float8e4m3fn",
                21: "uint4", 22: "int4"}



def onnx_dtype_name(elem_type: int) -> str:
    """ONNX ``TensorProto`` element type -> numpy-style name (``float32``, ``int4`` ...); unknown ones as the number."""
    return _ONNX_DTYPES.get(elem_type, str(elem_type))


def _load(path: str | os.PathLike):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _dims(value_info) -> list[int | str]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def _io_entry(value_info) -> dict[str, Any]:
    et = value_info.type.tensor_type.elem_type
    return {"name": value_info.name, "dtype": _ONNX_DTYPES.get(et, str(et)), "shape": _dims(value_info)}


def graph_io(path_or_model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(inputs, outputs)``: every graph I/O as ``{"name", "dtype", "shape"}`` read back from the ONNX file."""
    m = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    inits = {i.name for i in m.graph.initializer}
    return ([_io_entry(v) for v in m.graph.input if v.name not in inits], [_io_entry(v) for v in m.graph.output])


def _all_nodes(graph) -> Iterator[Any]:
    import onnx

    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def op_histogram(path_or_model) -> dict[str, int]:
    """``{op: count}`` over all nodes (subgraphs included); non-standard ops are written ``domain::Op``."""
    m = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    c: Counter[str] = Counter()
    for n in _all_nodes(m.graph):
        c[n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}::{n.op_type}"] += 1
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def uses_contrib_ops(path_or_model) -> bool:
    return any("::" in op for op in op_histogram(path_or_model))


def opset_of(path_or_model) -> int:
    m = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    return max((o.version for o in m.opset_import if o.domain in STANDARD_DOMAINS), default=0)


def external_data_files(path_or_model) -> list[str]:
    """Relative locations of the external data files the graph references."""
    from onnx.external_data_helper import _get_all_tensors

    m = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    files = set()
    for t in _get_all_tensors(m):
        if t.data_location == 1:                              # TensorProto.EXTERNAL
            for kv in t.external_data:
                if kv.key == "location":
                    files.add(kv.value)
    return sorted(files)


def _iter_small_float_tensors(m) -> Iterator[Any]:
    """Inline float tensors of the graph: initializers (not external) and Constant/attribute tensors."""
    import onnx

    def from_graph(g):
        for t in g.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                yield t
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from from_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from from_graph(sub)

    for t in from_graph(m.graph):
        if t.data_type in (1, 10, 11, 16):                   # float32, float16, float64, bfloat16
            yield t


def nonfinite_constants(path_or_model) -> list[str]:
    """Names of inline constants holding inf / nan (TensorRT fp16 needs finite mask constants)."""
    from onnx import numpy_helper

    m = _load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    bad = []
    for t in _iter_small_float_tensors(m):
        if t.data_type == 16:
            continue
        a = numpy_helper.to_array(t)
        if a.size and not np.isfinite(a).all():
            bad.append(t.name or "<constant>")
    return bad


def graph_entry(path: str | os.PathLike, *, precision: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of an ONNX component (file/external data paths relative to the graph's directory)."""
    m = _load(path)
    inputs, outputs = graph_io(m)
    ops = op_histogram(m)
    return {"file": Path(path).name, "kind": "onnx", "external_data": external_data_files(m),
            "opset": opset_of(m), "ir_version": int(m.ir_version), "precision": precision, "recipe": recipe,
            "inputs": inputs, "outputs": outputs, "contrib_ops": any("::" in op for op in ops),
            "domains": sorted({o.domain or "ai.onnx" for o in m.opset_import}),
            "nonfinite_constants": len(nonfinite_constants(m)), "op_histogram": ops,
            "num_nodes": sum(ops.values())}


__all__ = ["STANDARD_DOMAINS", "graph_io", "op_histogram", "uses_contrib_ops", "opset_of", "external_data_files",
           "nonfinite_constants", "graph_entry", "onnx_dtype_name"]
