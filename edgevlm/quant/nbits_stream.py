"""Weight-only MatMulNBits quantization of a graph that does not fit in memory: one weight at a time.

ONNX Runtime's ``MatMulNBitsQuantizer`` loads the whole float32 graph (mobilevlm-1.7b's decoder: 5.6 GB;
mobilevlm-v2-7b's: 26 GB) before it quantizes. ``quantize_matmulnbits_streaming`` reads the graph without its
weights, and for each ``MatMul`` with a constant weight reads that weight alone (``pread`` of its external-data
range: no mapping, so the file pages do not count as this process's memory), quantizes it with ORT's own node
quantizer (``DefaultWeightOnlyQuantizer.quantize``: the same C++ kernel, node, names and attributes as
``MatMulNBitsQuantizer``), appends the packed weight and scales to the output's external data file and drops the
float copy. Each weight is quantized inside a scratch graph of its own (protobuf keeps the bytes of a message in its
parent's arena until the parent is freed: data set on the big graph would accumulate). Every other initializer is
copied across the same way. Peak memory: the graph structure plus one weight and its quantized form. The result is byte-for-byte the graph ``MatMulNBitsQuantizer(...).process()``
writes (tests/test_nbits_stream.py compares them).

    >>> quantize_matmulnbits_streaming(Path("fp32/decoder.onnx"), Path("int4/decoder.onnx"), bits=4,
    ...                                block_size=128, accuracy_level=4, exclude=["/lm_head/MatMul"])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from edgevlm.errors import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["quantize_matmulnbits_streaming", "NotStreamable"]

#: tensors at least this large start at a 4 KiB boundary of the data file (page-aligned for mmap; the native decode
#: kernel reads aligned weights in place), smaller ones at 64 bytes; tensors under 1 KiB stay inside the graph
_PAGE, _SMALL_ALIGN, _INLINE_MAX, _PAGE_ALIGN_MIN = 4096, 64, 1024, 1 << 20


class NotStreamable(QuantizationError):
    """The graph has a shape this streaming pass does not handle (subgraphs, weights used by several nodes);
    the caller falls back to ``MatMulNBitsQuantizer`` on the loaded graph."""


class _DataReader:
    """Reads the bytes of external-data tensors with positioned reads (one open file per location)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.files: dict[str, int] = {}

    def read(self, t: Any) -> bytes:
        info = {kv.key: kv.value for kv in t.external_data}
        loc = info["location"]
        if loc not in self.files:
            path = (self.base / loc).resolve()
            if self.base.resolve() not in path.parents:
                raise QuantizationError(f"tensor '{t.name}': external data '{loc}' lies outside {self.base}")
            self.files[loc] = os.open(path, os.O_RDONLY)
        offset, length = int(info.get("offset", 0)), int(info["length"])
        data = os.pread(self.files[loc], length, offset)
        if len(data) != length:
            raise QuantizationError(f"tensor '{t.name}': {loc} ends before offset {offset} + {length}; the graph's "
                                    f"data file is truncated")
        return data

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


class _DataWriter:
    """Appends tensor bytes to the output data file and points the tensor at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.pos = 0
        self.written: set[str] = set()

    def externalize(self, t: Any, data: bytes) -> None:
        from onnx import TensorProto

        align = _PAGE if len(data) >= _PAGE_ALIGN_MIN else _SMALL_ALIGN
        pad = (-self.pos) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.pos += pad
        self.f.write(data)
        self.written.add(t.name)
        t.ClearField("raw_data")
        del t.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(self.pos)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
        self.pos += len(data)

    def close(self) -> None:
        self.f.close()


def _raw_bytes(t: Any) -> bytes:
    """A tensor's data as raw little-endian bytes (typed fields converted)."""
    from onnx import numpy_helper

    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def quantize_matmulnbits_streaming(src: Path, dst: Path, *, bits: int, block_size: int, accuracy_level: int | None,
                                   include: Iterable[str] | None = None, exclude: Iterable[str] = ()
                                   ) -> dict[str, Any]:
    """Quantize ``src``'s constant-weight MatMuls (``include`` only, if given; never ``exclude``) to
    ``com.microsoft::MatMulNBits`` (symmetric, ``bits`` 4 or 8, blocks of ``block_size`` along K) into ``dst`` +
    ``dst.name + '.data'``. Returns ``{"nodes_quantized", "streamed": True}``. Raises ``NotStreamable`` for graphs
    with subgraphs or shared weights (nothing is written then)."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise QuantizationError(f"streaming quantization reads {src} while writing {dst}: they must differ")
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise NotStreamable(f"{src.name} has subgraphs")
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    include = None if include is None else set(include)
    skip = set(exclude)
    targets = [n for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
               and (include is None or n.name in include) and n.name not in skip]
    shared = [n.input[1] for n in targets if uses.get(n.input[1], 0) > 1]
    if shared:
        raise NotStreamable(f"{src.name}: weight(s) used by several nodes: {', '.join(shared[:4])}")
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",), bits=bits))
    data_path = dst.with_name(dst.name + ".data")
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader, writer = _DataReader(src.parent), _DataWriter(data_path)
    target_names = {n.name for n in targets}
    new_nodes, done = [], 0
    try:
        for node in list(graph.node):
            if node.name not in target_names:
                new_nodes.append(node)
                continue
            # The weight goes into a graph of its own: protobuf keeps the bytes of every message in its parent's
            # arena until the parent is freed, so data set on (or added to) the big graph would never be released.
            w = inits[node.input[1]]
            scratch = onnx.GraphProto()
            wq = scratch.initializer.add()
            wq.CopyFrom(w)
            if w.data_location == TensorProto.EXTERNAL:          # this weight's bytes, for the quantizer only
                wq.raw_data = reader.read(w)
                del wq.external_data[:]
                wq.data_location = TensorProto.DEFAULT
            out = quantizer.quantize(node, [scratch])
            if len(out) == 1 and out[0] is node:                  # not quantized (e.g. not 2-D): keep it
                new_nodes.append(node)
                continue
            for q in list(scratch.initializer)[1:]:               # packed weight, scales: written, then linked
                if q.ByteSize() > _INLINE_MAX:
                    writer.externalize(q, _raw_bytes(q))
                graph.initializer.add().CopyFrom(q)
            del scratch, wq
            for vi in [v for v in graph.input if v.name == w.name]:   # (old IRs list initializers as inputs)
                graph.input.remove(vi)
            graph.initializer.remove(w)                            # the float weight goes (it held no data)
            del inits[w.name]
            new_nodes.extend(out)
            done += 1
        for t in graph.initializer:                                 # everything else, copied across
            if t.data_location == TensorProto.EXTERNAL and t.name not in writer.written:
                writer.externalize(t, reader.read(t))
            elif t.data_location != TensorProto.EXTERNAL and t.ByteSize() > _INLINE_MAX:
                writer.externalize(t, _raw_bytes(t))
    except BaseException:
        writer.close()
        data_path.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    writer.close()
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    onnx.save_model(model, str(dst))
    log.debug("streamed MatMulNBits (%d-bit, block %d): %d nodes -> %s", bits, block_size, done, dst)
    return {"nodes_quantized": done, "streamed": True}
