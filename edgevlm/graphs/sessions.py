"""ONNX Runtime on bare graph files: a quiet CPU session and the decoder interface on a decoder graph.

The graphs of an export or a quantization in progress have no manifest yet; parity (``edgevlm.exporter.parity``),
calibration and the quantization report (``edgevlm.quant``) run them through these. No torch.

    >>> from edgevlm.graphs.sessions import graph_decoder, ort_session
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import BundleError

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def ort_session(path: str | os.PathLike, threads: int | None = None, *, emulate_qdq: bool = False):
    """A plain ONNX Runtime CPU session (quiet).

    ``emulate_qdq``: keep QuantizeLinear / DequantizeLinear as separate float ops instead of fusing them into ORT's
    int8 kernels (``session.disable_quant_qdq``), so a Q/DQ graph computes the exact quantized arithmetic, as
    TensorRT's int8 kernels do. The fused x86 kernels would add the saturation of ``vpmaddubsw`` on CPUs without
    VNNI (``edgevlm.quant.recipes.int8_reduce_range``), which a GPU does not have.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if emulate_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


@dataclass
class _GraphAsBundle:
    """The part of a ``Bundle`` that ``OrtDecoder`` reads (one component's manifest entry, its path, no hashes), for
    a bare decoder graph: the fp32 / quantized graphs of an export in progress have no manifest yet."""

    path: Path
    entry: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str) -> dict[str, Any]:
        return self.entry

    def component_path(self, name: str) -> Path:
        return self.path


def graph_decoder(path: str | os.PathLike, threads: int | None = None, *, emulate_qdq: bool = False,
                  max_context: int = 2048):
    """The decoder interface (``edgevlm.runtime.decoders.OrtDecoder``: ``prefill`` / ``step`` / ``kv_arrays``, its
    own KV cache, batch 1) on a bare decoder graph file, its I/O contract read from the graph itself (Optimum names,
    ``KVSpec.from_graph_inputs``: concat or shared-buffer graphs). ONNX Runtime on the CPU; ``emulate_qdq`` as in
    ``ort_session``; ``max_context``: KV capacity in tokens (shared-buffer graphs allocate it)."""
    from edgevlm.graphs.files import graph_io
    from edgevlm.runtime.backends import BackendOptions
    from edgevlm.runtime.decoders import DecoderIO, OrtDecoder
    from edgevlm.runtime.kv_cache import KVSpec

    path = Path(path)
    ins, outs = graph_io(path)
    shapes = {e["name"]: list(e["shape"]) for e in ins}
    dtypes = {e["name"]: e["dtype"] for e in ins + outs}
    for name in ("inputs_embeds", "attention_mask", "past_key_values.0.key"):
        if name not in shapes:
            raise BundleError(f"decoder graph {path} has no '{name}' input; it is not an edgevlm decoder")
    spec = KVSpec.from_graph_inputs(shapes, dtype=np.dtype(_NP[dtypes["past_key_values.0.key"]]))
    present = set(spec.present_names())
    logits = [e for e in outs if e["name"] not in present]
    if len(logits) != 1:
        raise BundleError(f"decoder graph {path}: expected one logits output besides the presents, got "
                          f"{[e['name'] for e in logits]}")
    lshape, eshape = list(logits[0]["shape"]), shapes["inputs_embeds"]
    if not isinstance(lshape[-1], int) or not isinstance(eshape[-1], int):
        raise BundleError(f"decoder graph {path}: vocab and hidden size must be static dims "
                          f"(logits {lshape}, inputs_embeds {eshape})")
    np_of = lambda name: np.dtype(_NP.get(dtypes.get(name, "int64"), np.int64))  # noqa: E731
    io = DecoderIO(kv_spec=spec, has_positions="position_ids" in shapes, logits_name=logits[0]["name"],
                   logits_last_only=len(lshape) == 3 and lshape[1] == 1, embeds_dtype=np_of("inputs_embeds"),
                   mask_dtype=np_of("attention_mask"), pos_dtype=np_of("position_ids"),
                   logits_dtype=np_of(logits[0]["name"]), hidden_size=int(eshape[-1]), vocab_size=int(lshape[-1]),
                   max_context=int(max_context))
    entry = {"file": path.name, "inputs": ins, "outputs": outs}
    opts = BackendOptions(threads=threads, optimized_cache=None,
                          extra_config={"session.disable_quant_qdq": "1"} if emulate_qdq else {})
    return OrtDecoder(_GraphAsBundle(path, entry), opts, max_context=int(max_context), io=io)  # type: ignore[arg-type]


__all__ = ["ort_session", "graph_decoder"]
