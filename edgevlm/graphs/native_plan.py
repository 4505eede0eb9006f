"""The ``native_decode`` plan of a quantized GroupQueryAttention decoder: where each weight the native decode kernel
needs lies in the bundle's files, and the graph attributes it must honour.

The runtime's native decode step (``edgevlm.runtime.native``) reads the decoder's MatMulNBits blobs in place,
memory-mapped from ``decoder.onnx.data``, and shares the KV buffers with the ONNX Runtime session that ran the
prefill. The runtime must not import onnx, so the exporter, which has onnx, walks the graph once and records in the
manifest (``components.decoder.native_decode``)::

    {"version": 1, "hidden": D, "num_heads": H, "kv_heads": Hkv, "head_dim": d, "intermediate": I, "vocab": V,
     "epsilon": 1e-6, "scale": 0.088, "rotary_half": d/2, "max_positions": P,
     "cos_cache": REF, "sin_cache": REF, "final_norm": REF, "lm_head": LIN,
     "layers": [{"input_norm": REF, "post_attention_norm": REF, "qkv": LIN, "o": LIN,
                 "gate_up": LIN, "up": LIN | null, "down": LIN,
                 "past_key": "past_key_values.0.key", "past_value": "past_key_values.0.value"}, ...]}
    REF = {"name", "dtype", "shape", "file", "offset", "length"}   (external data)
        | {"name", "dtype", "shape", "inline": [...]}                 (small tensors stored in the graph)
    LIN = {"node", "N", "K", "bits", "block_size", "weight": REF, "scales": REF, "zero_points": REF | null}

The walk follows the structure of the builder's decoder (``ort_decoder``), not node names: input norm ->
packed-QKV MatMulNBits -> GroupQueryAttention (rotary on, not interleaved, no window, no softcap) -> o_proj
MatMulNBits -> SkipSimplifiedLayerNormalization -> gate/up MatMulNBits (fused + Split, or two) -> SiLU * up ->
down MatMulNBits -> the next skip norm; final norm -> lm_head MatMulNBits -> ``logits``. A graph that differs
anywhere gets no plan (``plan_or_reason`` says where), and the runtime decodes it with ONNX Runtime.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PLAN_VERSION", "native_decode_plan", "plan_or_reason", "NotPlannable"]

PLAN_VERSION = 1


class NotPlannable(Exception):
    """The graph is not the structure the native kernel implements (internal; becomes a reason string)."""


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    def __init__(self, model: Any) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def prod(self, tensor: str, op: str | tuple[str, ...], where: str) -> Any:
        ops = (op,) if isinstance(op, str) else op
        n = self.producer.get(tensor)
        if n is None or n.op_type not in ops:
            raise NotPlannable(f"{where}: '{tensor}' is produced by {n.op_type if n is not None else 'nothing'}, "
                               f"expected {'/'.join(ops)}")
        return n

    def cons(self, tensor: str, op: str, where: str, count: int | None = 1) -> list[Any]:
        found = [n for n in self.consumers.get(tensor, []) if n.op_type == op]
        if count is not None and len(found) != count:
            raise NotPlannable(f"{where}: '{tensor}' feeds {len(found)} {op} node(s), expected {count}")
        return found


def _ref(g: _Graph, name: str, where: str) -> dict[str, Any]:
    from onnx import TensorProto, helper, numpy_helper

    t = g.inits.get(name)
    if t is None:
        raise NotPlannable(f"{where}: '{name}' is not an initializer")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    ref: dict[str, Any] = {"name": name, "dtype": dtype.name, "shape": [int(d) for d in t.dims]}
    if t.data_location == TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        nbytes = int(np.prod(ref["shape"], dtype=np.int64)) * dtype.itemsize
        ref.update(file=ext["location"], offset=int(ext.get("offset", 0)), length=int(ext.get("length", nbytes)))
        if ref["length"] != nbytes:
            raise NotPlannable(f"{where}: '{name}' has {ref['length']} external bytes for shape {ref['shape']}")
    else:
        ref["inline"] = numpy_helper.to_array(t).ravel().tolist()
    return ref


def _linear(g: _Graph, node: Any, where: str) -> dict[str, Any]:
    a = _attrs(node)
    bits, blk, n, k = int(a.get("bits", 4)), int(a["block_size"]), int(a["N"]), int(a["K"])
    ins = list(node.input) + [""] * (6 - len(node.input))
    if ins[4] or ins[5]:
        raise NotPlannable(f"{where}: {node.name} has a g_idx or bias input")
    lin = {"node": node.name, "N": n, "K": k, "bits": bits, "block_size": blk,
           "weight": _ref(g, ins[1], where), "scales": _ref(g, ins[2], where),
           "zero_points": _ref(g, ins[3], where) if ins[3] else None}
    nb = -(-k // blk)
    if lin["weight"]["dtype"] != "uint8" or lin["weight"]["shape"] != [n, nb, blk * bits // 8]:
        raise NotPlannable(f"{where}: {node.name} weight is {lin['weight']['dtype']} {lin['weight']['shape']}, "
                           f"expected uint8 {[n, nb, blk * bits // 8]}")
    if lin["scales"]["dtype"] != "float32" or int(np.prod(lin["scales"]["shape"])) != n * nb:
        raise NotPlannable(f"{where}: {node.name} scales are {lin['scales']['dtype']} {lin['scales']['shape']}")
    return lin


def _norm_weight(g: _Graph, node: Any, where: str) -> tuple[dict[str, Any], float]:
    idx = 1 if node.op_type == "SimplifiedLayerNormalization" else 2
    return _ref(g, node.input[idx], where), float(_attrs(node).get("epsilon", 1e-5))


def native_decode_plan(model: Any) -> dict[str, Any]:
    """The plan of an in-memory decoder ``ModelProto`` (loaded without external data); raises ``NotPlannable``."""
    g = _Graph(model)
    gqas = [n for n in g.nodes if n.op_type == "GroupQueryAttention"]
    if not gqas:
        raise NotPlannable("no GroupQueryAttention node (a portable/concat decoder)")
    layers: list[dict[str, Any]] = []
    eps = scale = None
    cos = sin = None
    dims: dict[str, int] = {}
    last_skip = None
    for i, gqa in enumerate(gqas):
        where = f"layer {i}"
        a = _attrs(gqa)
        if int(a.get("do_rotary", 0)) != 1 or int(a.get("rotary_interleaved", 0)) != 0 or \
                int(a.get("local_window_size", -1)) != -1 or float(a.get("softcap", 0.0)) != 0.0:
            raise NotPlannable(f"{where}: GroupQueryAttention attributes {a} are not rotary-half, full-window")
        ins = list(gqa.input) + [""] * (12 - len(gqa.input))
        if ins[1] or ins[2] or any(ins[9:]):
            raise NotPlannable(f"{where}: GroupQueryAttention takes separate K/V or extra inputs")
        heads, kvh = int(a["num_heads"]), int(a.get("kv_num_heads", a["num_heads"]))
        qkv = g.prod(ins[0], "MatMulNBits", where)
        ln1_node = g.prod(qkv.input[0], ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"), where)
        if i > 0 and ln1_node is not last_skip:
            raise NotPlannable(f"{where}: the input norm is not fed by the previous layer's down projection")
        ln1, e = _norm_weight(g, ln1_node, where)
        (o,) = g.cons(gqa.output[0], "MatMulNBits", where)
        (post,) = g.cons(o.output[0], "SkipSimplifiedLayerNormalization", where)
        mms = g.cons(post.output[0], "MatMulNBits", where, count=None)
        up = None
        if len(mms) == 1:
            gate_up = mms[0]
            (split,) = g.cons(gate_up.output[0], "Split", where)
            gate_out = split.output[0]
            up_out = split.output[1]
        elif len(mms) == 2:
            gate_up, up = (mms if g.cons(mms[0].output[0], "Sigmoid", where, None) else mms[::-1])
            gate_out, up_out = gate_up.output[0], up.output[0]
        else:
            raise NotPlannable(f"{where}: the MLP norm feeds {len(mms)} MatMulNBits nodes")
        (sig,) = g.cons(gate_out, "Sigmoid", where)
        silu = [n for n in g.cons(sig.output[0], "Mul", where) if gate_out in n.input]
        if not silu:
            raise NotPlannable(f"{where}: the gate activation is not x * sigmoid(x)")
        (mul,) = g.cons(silu[0].output[0], "Mul", where)
        if up_out not in mul.input:
            raise NotPlannable(f"{where}: SiLU(gate) is not multiplied by the up projection")
        (down,) = g.cons(mul.output[0], "MatMulNBits", where)
        residual = post.output[3] if len(post.output) > 3 and post.output[3] else None
        if residual is None:
            raise NotPlannable(f"{where}: the post-attention norm does not output the residual sum")
        nxt = [n for n in g.cons(down.output[0], "SkipSimplifiedLayerNormalization", where)
               if residual in n.input]
        if len(nxt) != 1:
            raise NotPlannable(f"{where}: the down projection does not feed the next skip norm with the residual")
        last_skip = nxt[0]
        if eps is None:
            eps, scale = e, float(a.get("scale", 0.0))
            cos, sin = _ref(g, ins[7], where), _ref(g, ins[8], where)
            hd = cos["shape"][1] * 2 if cos["shape"] else 0
            n_qkv, hidden = (int(_attrs(qkv)[k]) for k in ("N", "K"))
            head_dim = n_qkv // (heads + 2 * kvh)
            dims = {"hidden": hidden, "num_heads": heads, "kv_heads": kvh, "head_dim": head_dim,
                    "rotary_half": hd // 2, "max_positions": int(cos["shape"][0])}
        if (heads, kvh) != (dims["num_heads"], dims["kv_heads"]):
            raise NotPlannable(f"{where}: head counts differ between layers")
        lyr = {"input_norm": ln1, "post_attention_norm": _norm_weight(g, post, where)[0],
               "qkv": _linear(g, qkv, where), "o": _linear(g, o, where), "gate_up": _linear(g, gate_up, where),
               "up": _linear(g, up, where) if up is not None else None, "down": _linear(g, down, where),
               "past_key": ins[3], "past_value": ins[4]}
        layers.append(lyr)
    assert last_skip is not None and eps is not None
    final_norm, _ = _norm_weight(g, last_skip, "final norm")
    head = None
    frontier = [last_skip.output[0]]
    for _ in range(4):                                    # Gather / Unsqueeze (last position) then the head
        nxt_nodes = [n for t in frontier for n in g.consumers.get(t, [])]
        heads_found = [n for n in nxt_nodes if n.op_type == "MatMulNBits"]
        if heads_found:
            head = heads_found[0]
            break
        if any(n.op_type not in ("Gather", "Unsqueeze", "Slice", "Reshape") for n in nxt_nodes):
            break
        frontier = [o for n in nxt_nodes for o in n.output]
    if head is None or "logits" not in head.output:
        raise NotPlannable("the final norm does not feed a MatMulNBits lm_head writing 'logits'")
    head_lin = _linear(g, head, "lm_head")
    first = layers[0]
    inter = first["down"]["K"]
    gu_n = first["gate_up"]["N"]
    if gu_n != (inter if first["up"] is not None else 2 * inter):
        raise NotPlannable(f"layer 0: gate/up rows {gu_n} do not match the down projection's K {inter}")
    expect_qkv = (dims["num_heads"] + 2 * dims["kv_heads"]) * dims["head_dim"]
    if first["qkv"]["N"] != expect_qkv or dims["rotary_half"] * 2 > dims["head_dim"]:
        raise NotPlannable(f"layer 0: packed QKV has {first['qkv']['N']} rows, expected {expect_qkv}")
    return {"version": PLAN_VERSION, **dims, "intermediate": inter, "vocab": head_lin["N"], "epsilon": eps,
            "scale": scale or 1.0 / float(np.sqrt(dims["head_dim"])), "cos_cache": cos, "sin_cache": sin,
            "final_norm": final_norm, "lm_head": head_lin, "layers": layers}


def plan_or_reason(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(plan, None)`` for a decoder graph file the native kernel implements, else ``(None, reason)``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        return native_decode_plan(model), None
    except NotPlannable as exc:
        return None, str(exc)
