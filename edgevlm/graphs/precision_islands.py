"""Which nodes of a graph must compute in fp32 when the rest runs in fp16: the "fp32 islands" of an fp16 graph.

    >>> from edgevlm.graphs.precision_islands import fp32_islands, island_nodes
    >>> islands = fp32_islands(model)        # {"rmsnorm": [[node, ...], ...], "layernorm": [...], "softmax": [...]}
    >>> names = island_nodes(model)          # every node name above, flattened, graph order

Why: fp16's largest finite value is 65504. A norm squares its input before averaging: a real LLaMA residual stream
carries activations of a few hundred to a few thousand (the "massive activations" of Sun et al. 2024), and any
|x| > 256 squares past 65504 -> inf -> the norm returns 0 or NaN for the whole row. Softmax exponentiates; a
reduction over thousands of fp16 terms loses the small ones. TensorRT's own guidance is the same: its builder warns
"Running layernorm after self-attention in FP16 may cause overflow ... force the normalization layers to FP32"
(TensorRT 10 developer guide, "Reduced precision"), and ModelOpt's fp16 AutoCast keeps these ops in fp32.

Patterns (torch.onnx exports of edgevlm's models; names are ONNX node names):

* ``rmsnorm`` (LLaMA ``RMSNorm``): ``Pow(x, 2)`` (or ``Mul(x, x)``) -> ``ReduceMean`` -> ``Add(eps)`` -> ``Sqrt`` ->
  ``Reciprocal`` (or ``Div(1, .)``) -> ``Mul(x, .)``; the island is those nodes (the weight ``Mul`` after them sees
  normalized values and stays fp16);
* ``layernorm``: a ``LayerNormalization`` node (opset >= 17 exports), or the decomposed form ``ReduceMean`` ->
  ``Sub`` -> ``Pow`` -> ``ReduceMean`` -> ``Add`` -> ``Sqrt`` -> ``Div`` (found from its ``Pow``);
* ``softmax``: ``Softmax`` / ``LogSoftmax`` nodes.

Used by the fp16 conversion (``edgevlm.quant.apply``: ``node_block_list``), the TensorRT rule book
(``edgevlm.graphs.trt_compat``: "fp32 islands in fp16 graphs") and the build plan (``edgevlm.graphs.trt_plan``:
per-layer fp32 precision for weakly typed builds, where TensorRT may otherwise pick fp16 for any layer).
Only ``onnx`` protos are read; no weights are loaded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

__all__ = ["fp32_islands", "island_nodes", "ISLAND_KINDS"]

ISLAND_KINDS = ("rmsnorm", "layernorm", "softmax")
_REDUCE = {"ReduceMean", "ReduceSum"}


def _maps(nodes: Iterable[Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producers: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in nodes:
        for o in n.output:
            if o:
                producers[o] = n
        for i in n.input:
            if i:
                consumers[i].append(n)
    return producers, consumers


def _only(consumers: dict[str, list[Any]], node: Any, ops: set[str]) -> Any | None:
    """The single consumer of ``node``'s first output whose op is in ``ops`` (None if there is not exactly one)."""
    found = [c for c in consumers.get(node.output[0], []) if c.op_type in ops]
    return found[0] if len(found) == 1 else None


def _is_square(node: Any, constants: dict[str, float]) -> bool:
    if node.op_type == "Pow":
        return constants.get(node.input[1]) == 2.0
    return node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]


def _scalar_constants(model: Any) -> dict[str, float]:
    """Names of one-element float constants (initializers and Constant nodes) -> value (for ``Pow``'s exponent)."""
    from onnx import numpy_helper

    out: dict[str, float] = {}
    tensors = [(i.name, i) for i in model.graph.initializer]
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    tensors.append((n.output[0], a.t))
                elif a.name == "value_float":
                    out[n.output[0]] = float(a.f)
    for name, t in tensors:
        if t.data_location == 1 or len(t.dims) > 1 or (len(t.dims) == 1 and t.dims[0] != 1):
            continue                                                # external data / not a scalar
        try:
            out[name] = float(numpy_helper.to_array(t).reshape(-1)[0])
        except (ValueError, TypeError, IndexError):
            continue
    # through Cast / Identity: an fp16-converted graph feeds Pow its exponent as Cast(fp16 2.0 -> float)
    for n in model.graph.node:                                      # graph order: producers come first
        if n.op_type in ("Cast", "Identity") and n.input and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def _norm_chain(square: Any, producers: dict[str, Any], consumers: dict[str, list[Any]]) -> tuple[str, list[Any]] | None:
    """From ``x**2`` forward to the node that applies the normalization: (kind, nodes) or None."""
    x = square.input[0]
    chain = [square]
    reduce_ = _only(consumers, square, _REDUCE)
    if reduce_ is None:
        return None
    chain.append(reduce_)
    node = reduce_
    add = _only(consumers, node, {"Add"})
    if add is not None:                                             # + eps
        chain.append(add)
        node = add
    sqrt = _only(consumers, node, {"Sqrt"})
    if sqrt is None:
        return None
    chain.append(sqrt)
    recip = _only(consumers, sqrt, {"Reciprocal"})
    if recip is not None:
        chain.append(recip)
        apply = _only(consumers, recip, {"Mul"})
    else:
        apply = _only(consumers, sqrt, {"Div"})
    if apply is None:
        return None
    chain.append(apply)
    # layernorm: x is (input - ReduceMean(input)); rmsnorm: x is the input itself
    sub = producers.get(x)
    if sub is not None and sub.op_type == "Sub":
        mean = producers.get(sub.input[1])
        if mean is not None and mean.op_type in _REDUCE and mean.input[0] == sub.input[0]:
            return "layernorm", [mean, sub, *chain]
    if apply.op_type == "Mul" and x not in apply.input:
        return None
    return "rmsnorm", chain


def fp32_islands(model: Any) -> dict[str, list[list[str]]]:
    """``{kind: [[node name, ...] per occurrence]}`` for every kind in ``ISLAND_KINDS`` (main graph only; unnamed
    nodes are skipped: the fp16 converter and TensorRT's layer names both go by node name)."""
    nodes = list(model.graph.node)
    producers, consumers = _maps(nodes)
    constants = _scalar_constants(model)
    out: dict[str, list[list[str]]] = {k: [] for k in ISLAND_KINDS}
    taken: set[str] = set()
    for n in nodes:
        if not n.name or n.name in taken:
            continue
        if n.op_type == "LayerNormalization":
            out["layernorm"].append([n.name])
            taken.add(n.name)
        elif n.op_type in ("Softmax", "LogSoftmax"):
            out["softmax"].append([n.name])
            taken.add(n.name)
        elif _is_square(n, constants):
            found = _norm_chain(n, producers, consumers)
            if found is not None and all(m.name for m in found[1]):
                kind, chain = found
                names = [m.name for m in chain]
                out[kind].append(names)
                taken.update(names)
    return out


def island_nodes(model: Any, kinds: Iterable[str] = ISLAND_KINDS) -> list[str]:
    """Every island node name of ``kinds``, in graph order, each once."""
    islands = fp32_islands(model)
    wanted = {name for k in kinds for group in islands.get(k, []) for name in group}
    return [n.name for n in model.graph.node if n.name in wanted]
