"""Blocked INT4 weight-only quantization in the form TensorRT accepts (edgevlm's own quantizer, numpy + onnx).

For each ``MatMul`` whose weight ``W [K, N]`` is a constant initializer::

    W [K, N] fp32  ->  q [K, N] INT4 (initializer, range [-7, 7])  +  scale [K / B, N] fp32 (initializer, > 0)
                       DequantizeLinear(q, scale, axis=0, block_size=B) -> W' [K, N] -> MatMul(x, W')

with, per block of ``B`` rows of one column, ``scale = amax(|block|) / 7`` and ``q = clip(round(W / scale), -7, 7)``
(round half to even). No zero point (symmetric); the default-domain opset becomes 21 (blocked DequantizeLinear),
IR version >= 10. This is the convention of NVIDIA's Model Optimizer (``modelopt.onnx.quantization`` int4 RTN) and of
TensorRT's INT4 weight-only quantization ("Working with Quantized Types": symmetric, per-block scales, block sizes
{64, 128}).

Why not ONNX Runtime's ``MatMulNBitsQuantizer(quant_format=QDQ)``: its symmetric mode divides the block's
largest-magnitude value by -8 when that value is positive (the [-8, 7] range used asymmetrically), so about half the
scales are negative; TensorRT's ONNX parser refuses any non-positive DequantizeLinear scale ("Scale coefficients must
all be positive", onnx-tensorrt ``QuantDequantLinearHelper``).

Partial blocks: ONNX allows ``K % B != 0`` (the last block shorter), but TensorRT's parser does not read the
``block_size`` attribute: it infers the block size as ``K / scale.shape[0]`` and requires the division to be exact
(onnx-tensorrt ``QuantDequantLinearHelper``: "Only a single blocking dimension is allowed", "Inferred block size is not
an integer"), so a partial last block would be read with the wrong block size or refused. This quantizer writes none:
a matmul whose ``K`` is not a multiple of ``B`` uses the largest allowed block size below ``B`` that divides ``K``
(e.g. ``K = 64`` with ``B = 128`` -> 64; recorded per node in ``block_size_overrides``) and raises
``QuantizationError`` when there is none.

    >>> info = quantize_matmuls_int4(model, block_size=128, exclude=["lm_head_node"], allowed_blocks=(64, 128))
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from edgevlm.errors import QuantizationError

__all__ = ["quantize_matmuls_int4", "quantize_weight_int4", "dequantize_int4", "effective_block_size",
           "TENSORRT_INT4_BLOCK_SIZES", "INT4_QMAX", "TOOL"]

#: Block sizes TensorRT supports for INT4 weight-only quantization (TensorRT "Quantization Schemes": {64, 128}).
TENSORRT_INT4_BLOCK_SIZES = (64, 128)
#: Symmetric INT4 range used: [-7, 7] (scale = amax / 7; -8 is never written, so q = -round(-W / s) holds exactly).
INT4_QMAX = 7
TOOL = "edgevlm.quant.int4_qdq.quantize_matmuls_int4"
#: Scale of an all-zero block (any positive value dequantizes its zeros exactly; TensorRT refuses 0).
ZERO_BLOCK_SCALE = 1.0


def effective_block_size(k: int, block_size: int, allowed: Sequence[int] | None = None) -> int:
    """The block size used for a weight with ``k`` rows: ``block_size`` when it divides ``k``, else the largest
    allowed size below it that does (``allowed``: TensorRT's {64, 128}; None = powers of two >= 16)."""
    if k % block_size == 0:
        return block_size
    sizes = sorted(allowed) if allowed else [1 << p for p in range(4, max(5, block_size.bit_length()))]
    fits = [b for b in sizes if b < block_size and k % b == 0]
    if fits:
        return fits[-1]
    raise QuantizationError(
        f"a weight with K = {k} input rows has no whole INT4 block of {block_size}"
        + (f" or {', '.join(map(str, [b for b in sizes if b < block_size]))}" if any(b < block_size for b in sizes)
           else "")
        + ": a partial last block is misread by TensorRT's parser (it infers the block size as K / scale rows); "
          "pick a block size that divides K (block_size=..., TensorRT supports "
          f"{', '.join(map(str, TENSORRT_INT4_BLOCK_SIZES))}) or quantize this decoder to int8 or fp16 "
          "(--precision int8)")


def quantize_weight_int4(w: np.ndarray, block: int, *, min_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 [K, N] in [-7, 7], scale float32 [K / block, N] > 0)`` for ``w [K, N]`` (``K % block == 0``).
    ``min_scale`` floors every scale (e.g. float16's smallest normal number when the scales become fp16)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if k % block:
        raise QuantizationError(f"internal: K = {k} is not a multiple of the block size {block}")
    blocks = w.reshape(k // block, block, n)                                       # [K/B, B, N]
    amax = np.abs(blocks).max(axis=1)                                              # [K/B, N]
    scale = (amax / np.float32(INT4_QMAX)).astype(np.float32)
    scale = np.where(amax > 0, np.maximum(scale, np.float32(min_scale)), np.float32(ZERO_BLOCK_SCALE))
    scale = scale.astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -INT4_QMAX, INT4_QMAX).astype(np.int8).reshape(k, n)
    return q, scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q [K, N] * scale [K / B, N]`` (block along K) as float32: what ``DequantizeLinear(axis=0, block_size=B)``
    computes."""
    k, n = q.shape
    block = k // scale.shape[0]
    return (q.astype(np.float32).reshape(-1, block, n) * scale[:, None, :]).reshape(k, n)


def _int4_tensor(q: np.ndarray, name: str) -> Any:
    """An ONNX INT4 initializer (two values per byte) from int8 values in [-8, 7]."""
    from onnx import TensorProto, helper

    try:
        import ml_dtypes

        from onnx import numpy_helper

        return numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    except ImportError:                                            # pragma: no cover - ml_dtypes ships with onnx
        return helper.make_tensor(name, TensorProto.INT4, list(q.shape), q.reshape(-1).tolist())


def quantize_matmuls_int4(model: Any, *, block_size: int, nodes: Iterable[str] | None = None,
                          exclude: Iterable[str] = (), allowed_blocks: Sequence[int] | None = None,
                          min_scale: float = 0.0) -> dict[str, Any]:
    """Quantize ``model``'s constant-weight MatMuls (all of them, or only ``nodes``; never ``exclude``) in place.

    ``model`` must be loaded with its external data. ``allowed_blocks``: block sizes allowed for ``block_size`` and
    its fallbacks (TensorRT targets: ``TENSORRT_INT4_BLOCK_SIZES``; ``block_size`` outside it raises
    ``QuantizationError``). Returns what was done: nodes quantized, per-node block-size overrides, scale range,
    largest weight error.
    """
    from onnx import helper, numpy_helper

    if allowed_blocks is not None and block_size not in allowed_blocks:
        raise QuantizationError(f"INT4 block size {block_size} is not supported by TensorRT's INT4 weight-only "
                                f"quantization; use one of {', '.join(map(str, allowed_blocks))} (block_size=128, "
                                f"the default)")
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    skip = set(exclude)
    wanted = None if nodes is None else set(nodes)
    done: dict[str, str] = {}                       # weight initializer -> its DequantizeLinear output
    new_nodes: list[tuple[Any, Any]] = []           # (MatMul node, DQ node to insert before it)
    overrides: dict[str, int] = {}
    skipped: list[str] = []
    quantized: list[str] = []
    err_max, s_min, s_max, zero_blocks = 0.0, float("inf"), 0.0, 0
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.name in skip or (wanted is not None and node.name not in wanted):
            continue
        wname = node.input[1]
        if wname in done:
            node.input[1] = done[wname]
            quantized.append(node.name)
            continue
        w = numpy_helper.to_array(inits[wname])
        if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
            skipped.append(node.name)
            continue
        k, n = w.shape
        block = effective_block_size(k, block_size, allowed_blocks)
        if block != block_size:
            overrides[node.name] = block
        q, scale = quantize_weight_int4(w, block, min_scale=min_scale)
        err_max = max(err_max, float(np.abs(dequantize_int4(q, scale) - w.astype(np.float32)).max(initial=0.0)))
        s_min, s_max = min(s_min, float(scale.min())), max(s_max, float(scale.max()))
        zero_blocks += int((np.abs(w.reshape(k // block, block, n)).max(axis=1) == 0).sum())
        q_name, s_name, out = wname + "_DQ_Q4", wname + "_DQ_scales", wname + "_DQ_Q4_output"
        g.initializer.extend([_int4_tensor(q, q_name), numpy_helper.from_array(scale, s_name)])
        dq = helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=(node.name or wname) + "_DQ_Q4",
                              axis=0, block_size=block)
        new_nodes.append((node, dq))
        node.input[1] = out
        done[wname] = out
        quantized.append(node.name)
    # insert each DequantizeLinear right before its (first) MatMul: the graph stays topologically sorted
    for mm, dq in new_nodes:
        idx = list(g.node).index(mm)
        g.node.insert(idx, dq)
    still_used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for wname in done:
        if wname not in still_used and wname in inits:
            g.initializer.remove(inits[wname])
    if quantized:
        _require_opset(model, 21)
    return {"tool": TOOL, "nodes_quantized": len(quantized), "block_size": block_size,
            "block_size_overrides": overrides, "scale": "amax(|block|) / 7, strictly positive (an all-zero block: "
                                                         f"{ZERO_BLOCK_SCALE})",
            "range": [-INT4_QMAX, INT4_QMAX], "zero_point": None,
            "scale_min": s_min if quantized else None, "scale_max": s_max if quantized else None,
            "zero_blocks": zero_blocks, "weight_max_abs_error": err_max, "not_2d_skipped": skipped}


def _require_opset(model: Any, version: int) -> None:
    """Raise the default-domain opset import to ``version`` (blocked DequantizeLinear and INT4 need 21; the ops in an
    opset-20 export keep their meaning at 21) and the IR version to 10."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            o.version = version
    if model.ir_version < 10:
        model.ir_version = 10
