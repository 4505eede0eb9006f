"""torch -> ONNX for the bundle's graphs (``torch.onnx.export(dynamo=True)``), plus reading facts back from a graph.

* ``export_vision``: ``MobileVLM.encode_images`` (CLIP tower + projector) -> ``vision.onnx`` (dynamic batch).
* ``export_decoder``: ``LlamaForCausalLM`` with explicit flat past KV (Optimum naming, see ``spec.decoder_spec``),
  last-position logits only (``logits_to_keep=1``: a prefill never computes seq x vocab logits), dynamic
  batch / seq / past_seq. Traced with every dynamic dim >= 2 (torch.export specializes 0 and 1); the graph still
  runs with past_seq = 0 and seq = 1 (checked by the tests).
* ``save_embed_table``: the ``[vocab, D]`` token-embedding table as ``.npy`` (the runtime memory-maps and gathers).

After saving, each graph is post-processed in place (graph proto only; weights stay in the external data file):
graph I/O dims are renamed to the spec's symbolic names and checked (a dim the spec wants dynamic but the exporter
specialized raises ``ExportError``), and non-finite constants (``-inf`` masks; TensorRT fp16 needs finite ones) are
replaced by the dtype's finite extreme. ``graph_io`` / ``op_histogram`` / ``external_data_files`` read the facts the
manifest records, from the saved file, without loading the weights.

    >>> export_vision(model, "out/vision.onnx", opset=20)     # + out/vision.onnx.data
    >>> export_decoder(model, "out/decoder.onnx", opset=20)   # + out/decoder.onnx.data
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgevlm.errors import ConfigError, ExportError
from edgevlm.graphs import spec as S
# graph-file helpers live in edgevlm.graphs.files (shared with quantization); re-exported here
from edgevlm.graphs.files import (_ONNX_DTYPES, STANDARD_DOMAINS, _iter_small_float_tensors, _load,  # noqa: F401
                                  external_data_files, graph_entry, graph_io, nonfinite_constants, op_histogram,
                                  opset_of, uses_contrib_ops)

log = logging.getLogger(__name__)


# ---- torch modules that define the graphs -----------------------------------------------------------------------
def _wrappers():
    """Module classes, defined lazily so that importing this module does not import torch."""
    import torch
    from transformers import DynamicCache

    from edgevlm.model.hf_compat import cache_of, with_cache

    class VisionEncoder(torch.nn.Module):
        """``pixel_values [B, 3, S, S]`` -> ``image_embeds [B, V, D]`` (``MobileVLM.encode_images``)."""

        def __init__(self, vlm) -> None:
            super().__init__()
            self.vlm = vlm

        def forward(self, pixel_values):
            return self.vlm.encode_images(pixel_values)                          # [B, V, D]

    class DecoderWithPast(torch.nn.Module):
        """Flat-tensor decoder step: (embeds, mask, positions, past) -> (last logits, presents)."""

        def __init__(self, llm) -> None:
            super().__init__()
            self.llm = llm

        def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values], config=self.llm.config)
            out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           **with_cache(cache), use_cache=True, logits_to_keep=1)  # logits [B, 1, vocab]
            presents = []
            for layer in cache_of(out).layers:
                presents += [layer.keys, layer.values]                           # [B, H_kv, past + seq, hd]
            return (out.logits, *presents)

    return VisionEncoder, DecoderWithPast


def decoder_module(model):
    """The ``DecoderWithPast`` wrapper around ``model.llm`` (eval, shares the weights)."""
    return _wrappers()[1](model.llm).eval()


def vision_module(model):
    return _wrappers()[0](model).eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision op registration, axis-rename notes, pytree FutureWarnings)."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._onnx_program",
             "torch.onnx", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*TracerWarning.*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def release_exporter_state() -> int:
    """Drop the references onnxscript's rewriter keeps to the last graph it matched.

    The module-level rewrite rules (``onnxscript.rewriter.rules.*``) store the graph, the current node and the last
    match on their matcher (``SimplePatternMatcher._graph`` ...): after an export that graph, and through its
    initializers every weight of the exported model, stays alive. For a 1.7B model that is 7 GB kept until the next
    export. Returns the number of matchers reset.
    """
    import sys

    reset = 0
    seen: set[int] = set()

    def clear(rule: Any) -> None:
        nonlocal reset
        matcher = getattr(rule, "_matcher", None)
        if matcher is None or id(matcher) in seen:
            return
        seen.add(id(matcher))
        state = getattr(matcher, "__dict__", {})
        for attr in ("_graph", "_current_node", "_tracer"):
            if state.get(attr) is not None:
                state[attr] = None
        if "_match" in state:
            try:
                state["_match"] = type(state["_match"])()
            except TypeError:
                state["_match"] = None
        reset += 1

    for name, module in list(sys.modules.items()):
        if not name.startswith("onnxscript.") or module is None:
            continue
        for value in list(vars(module).values()):
            if hasattr(value, "_matcher"):
                clear(value)
            elif hasattr(value, "rules") and isinstance(getattr(value, "rules", None), (list, tuple)):
                for rule in value.rules:
                    clear(rule)
            elif isinstance(value, (list, tuple)) and value and hasattr(value[0], "_matcher"):
                for rule in value:
                    clear(rule)
    return reset


def _check_model(model, *, stored=None) -> None:
    """The vision graph is traced from a float32 model on the CPU; the decoder (``stored``: the language model) may
    keep fp16 / bf16 weights (a released checkpoint's dtype): they are traced as float32 stand-ins and written as
    float32 (``_float32_stand_ins``)."""
    import torch

    ok = (torch.float32,) if stored is None else (torch.float32, torch.float16, torch.bfloat16)
    q = next((stored if stored is not None else model).parameters())
    if q.device.type != "cpu" or q.dtype not in ok:
        raise ConfigError(f"export traces a float32 model on the CPU, got {q.dtype} on {q.device}; call "
                          f"model.float().cpu() first (precision recipes are applied to the exported graphs)")


def _export(module, args: tuple, kwargs: dict | None, path: Path, *, dynamic_shapes, input_names: list[str],
            output_names: list[str], opset: int, external_data: bool, what: str,
            lazy_weights: bool = False) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` to ``path``. ``lazy_weights``: trace the weights as
    ``_float32_stand_ins`` and write each from the module's own tensor as the file is written."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), _quiet_exporter():
            # the stand-ins stay in place until the file is written: the program's initializers hold the module's
            # parameters themselves (float32 copies of small fp16 ones are read at save time)
            with _float32_stand_ins(module) if lazy_weights else contextlib.nullcontext({}) as held:
                program = torch.onnx.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                            input_names=input_names, output_names=output_names, opset_version=opset,
                                            dynamo=True, external_data=external_data, verbose=False, optimize=True)
                if program is None:                           # pragma: no cover - dynamo=True always returns one
                    raise ExportError(f"torch.onnx.export returned no program for the {what}")
                _write_stand_ins_lazily(program, held, what)
                program.save(str(path), external_data=external_data)
                del program
    except ExportError:
        raise
    except (torch.onnx.errors.OnnxExporterError, RuntimeError, ValueError, TypeError, AssertionError,
            NotImplementedError, KeyError, AttributeError, IndexError) as exc:
        # The exporter raises many unrelated types (torch.export / dynamo / onnxscript): report them uniformly.
        raise ExportError(f"exporting the {what} to ONNX failed ({type(exc).__name__}: {str(exc)[:2000]}). "
                          f"Re-run with EDGEVLM_TRACEBACK=1 for the full trace; a torch.export failure usually "
                          f"names the model line it could not trace") from exc
    finally:
        release_exporter_state()


# ---- weights: traced as stand-ins, written one at a time from the model's own tensors ------------------------------
#: 2-D weights with more elements than this are traced as float32 stand-ins that hold no memory (a row expanded with
#: stride 0) and written at save time, one at a time, from the model's tensor (cast to float32, transposed where the
#: exporter folded a Transpose into it). The exporter's optimizer (onnxscript) folds constants this large only
#: through Transpose, and keeps them out of its value-based passes (deduplication stops at 1024 elements), so the
#: graph is the one a float32 export writes, byte for byte (tests/test_export_lazy.py). Equal to
#: ``onnxscript.optimizer``'s constant-folding input limit.
STAND_IN_MIN_ELEMENTS = 8192


@dataclass
class _StandIn:
    """One weight traced as a stand-in: ``source`` is the model's tensor (any float dtype)."""

    name: str
    source: Any
    start: int                                   # address of the stand-in's row, and one past its end
    end: int


@contextlib.contextmanager
def _float32_stand_ins(module, min_elements: int | None = None) -> Iterator[dict[int, _StandIn]]:
    """Trace ``module`` as a float32 module without a float32 copy of its weights: every 2-D parameter with more
    than ``min_elements`` (default ``STAND_IN_MIN_ELEMENTS``) elements gets a stand-in (``torch.arange(cols)``
    expanded over the rows: stride 0, one row of memory; a view of it says whether the exporter transposed it), any
    other non-float32 float parameter or buffer a float32 copy. Yields ``{row address: _StandIn}``; the module's
    own tensors are back on exit, also after an exception. A float32 module gets stand-ins too (its export then holds
    no transposed copy of its weights either)."""
    import torch

    limit = STAND_IN_MIN_ELEMENTS if min_elements is None else min_elements
    held: dict[int, _StandIn] = {}
    restore: list[tuple[Any, Any]] = []
    try:
        for name, p in module.named_parameters():
            if p.ndim == 2 and p.numel() > limit and p.is_floating_point():
                row = torch.arange(p.shape[1], dtype=torch.float32)
                restore.append((p, p.data))
                held[row.data_ptr()] = _StandIn(name, p.data, row.data_ptr(), row.data_ptr() + 4 * p.shape[1])
                p.data = row.expand(p.shape[0], p.shape[1])
            elif p.is_floating_point() and p.dtype != torch.float32:
                restore.append((p, p.data))
                p.data = p.data.to(torch.float32)
        for b in module.buffers():
            if b.is_floating_point() and b.dtype != torch.float32:
                restore.append((b, b.data))
                b.data = b.data.to(torch.float32)
        yield held
    finally:
        for t, data in reversed(restore):
            t.data = data


def _address(tensor: Any) -> tuple[int, tuple[int, ...]] | None:
    """(data address, byte strides) of an onnx_ir tensor backed by a torch tensor or a numpy array, else None."""
    import torch

    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.data_ptr(), tuple(s * raw.element_size() for s in raw.stride())
    if isinstance(raw, np.ndarray):
        return raw.__array_interface__["data"][0], tuple(raw.strides)
    return None


def _write_stand_ins_lazily(program, held: dict[int, _StandIn], what: str) -> int:
    """Point every initializer the exporter made from a stand-in (the weight itself, or the Transpose it folded into
    it) at a lazy tensor that casts (and transposes) the model's weight when the file is written. ``ExportError``
    when a stand-in reached the graph any other way (its values would be the stand-in's). Returns the count."""
    import onnx_ir as ir

    if not held:
        return 0
    try:
        from onnxscript.optimizer import FOLDED_FROM_KEY
    except ImportError:                                   # onnxscript < 0.6 keeps it private
        from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY

    names = {h.name for h in held.values()}
    ranges = sorted((h.start, h.end) for h in held.values())
    swapped = 0
    for graph in program.model.graphs():
        for value in graph.initializers.values():
            cv = value.const_value
            where = _address(cv) if cv is not None else None
            h = held.get(where[0]) if where is not None else None
            if h is not None:
                shape, strides = tuple(cv.shape), where[1]
                src = tuple(h.source.shape)
                if shape == src and strides == (0, 4):
                    transposed = False
                elif shape == src[::-1] and strides == (4, 0):
                    transposed = True
                else:
                    raise ExportError(f"{what}: initializer '{value.name}' is a {shape} view (strides {strides}) of "
                                      f"the traced stand-in for '{h.name}' {src}; only the weight or its transpose "
                                      f"can be written lazily. This is an exporter bug, report it")
                value.const_value = ir.LazyTensor(
                    _lazy_float32(h.source, transposed), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape),
                    name=cv.name, doc_string=cv.doc_string, metadata_props=dict(cv.metadata_props))
                swapped += 1
                continue
            folded = value.meta.get(FOLDED_FROM_KEY, set()) if hasattr(value, "meta") else set()
            inside = where is not None and any(lo <= where[0] < hi for lo, hi in ranges)
            if inside or (names & set(folded)):
                raise ExportError(f"{what}: initializer '{value.name}' was computed from a traced stand-in "
                                  f"({sorted(names & set(folded)) or 'a view'}); this is an exporter bug, report it")
    return swapped


def _lazy_float32(source: Any, transposed: bool):
    """A thunk: ``source`` (any float dtype) as a contiguous float32 onnx_ir tensor, transposed if asked; one
    conversion pass, no second copy."""

    def load():
        import onnx_ir as ir
        import torch

        src = source.detach()
        if src.dtype == torch.float32 and not transposed and src.is_contiguous():
            return ir.tensor(src.numpy())
        view = src.t() if transposed else src
        out = torch.empty(tuple(view.shape), dtype=torch.float32)
        out.copy_(view)
        return ir.tensor(out.numpy())

    return load


@dataclass
class ExportedGraph:
    """A saved graph and what post-processing did to it (``mask_constants_replaced``, ``mask_value``)."""

    path: Path
    report: dict[str, Any]


def export_vision(model, path: str | os.PathLike, *, opset: int = S.DEFAULT_OPSET, external_data: bool = True,
                  batch: int = S.EXAMPLE_BATCH) -> "ExportedGraph":
    """Export ``model.encode_images`` to ``path`` (+ ``path.data``)."""
    _check_model(model)
    S.check_opset(opset)
    cfg = model.cfg
    spec = S.vision_spec(cfg)
    was_training = model.training
    model.eval()
    try:
        _export(vision_module(model), S.vision_example_inputs(cfg, batch), None, Path(path),
                dynamic_shapes=S.vision_dynamic_shapes(), input_names=spec.input_names,
                output_names=spec.output_names, opset=opset, external_data=external_data, what="vision encoder")
    finally:
        model.train(was_training)
    return ExportedGraph(Path(path), finalize_graph(path, spec))


def export_decoder(model, path: str | os.PathLike, *, opset: int = S.DEFAULT_OPSET,
                   external_data: bool = True) -> "ExportedGraph":
    """Export the decoder with explicit past KV to ``path`` (+ ``path.data``). The language model may hold fp16 /
    bf16 weights (a released checkpoint, or a large random-init model built in fp16): the graph is the float32 one
    (its weights cast as they are written, ``_float32_stand_ins``), with no float32 copy of the model."""
    _check_model(model, stored=model.llm)
    S.check_opset(opset)
    cfg = model.cfg
    spec = S.decoder_spec(cfg)
    was_training = model.training
    model.eval()
    try:
        _export(decoder_module(model), (), S.decoder_example_inputs(cfg), Path(path),
                dynamic_shapes=S.decoder_dynamic_shapes(cfg.llm.num_layers), input_names=spec.input_names,
                output_names=spec.output_names, opset=opset, external_data=external_data, what="decoder",
                lazy_weights=True)
    finally:
        model.train(was_training)
    return ExportedGraph(Path(path), finalize_graph(path, spec))


def save_embed_table(model, path: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """Write the ``[vocab, D]`` token-embedding table as ``.npy``; returns its manifest entry (``spec.embed_entry``)."""
    import torch

    if dtype not in ("float32", "float16"):
        raise ConfigError(f"embedding table dtype '{dtype}' unsupported; use float32 or float16")
    with torch.no_grad():
        w = model.llm.get_input_embeddings().weight.detach()
        arr = w.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
    entry = S.embed_entry(model.cfg, dtype, path.name)
    if list(arr.shape) != entry["shape"]:
        raise ExportError(f"embedding table has shape {list(arr.shape)}, expected {entry['shape']} from the config")
    return entry


# ---- graph facts (no weights loaded) ----------------------------------------------------------------------------
# ---- post-processing of the saved graph proto -------------------------------------------------------------------
#: What ``-inf`` / float-lowest mask constants become: finite in fp16 (fp16 lowest + a score would overflow to
#: -inf), and exp(-1e4) underflows to exactly 0 in fp32 and fp16, so fp32 results do not change.
MASK_VALUE = -1.0e4
_EXTREME = 3.0e38                                            # |x| >= this in float32 = finfo.min/max territory


def _sanitize_nonfinite(m) -> int:
    """Replace mask-style constants in inline float tensors: ``-inf`` and float32 lowest (HF's ``finfo.min`` causal
    mask) become ``MASK_VALUE``; ``+inf`` becomes the dtype's finite max. NaN is an error. Returns the count of
    tensors changed. (TensorRT fp16: -inf / finfo.min overflow and fully masked rows give NaN.)"""
    from onnx import numpy_helper

    replaced = 0
    for t in _iter_small_float_tensors(m):
        if t.data_type == 16:
            continue
        a = numpy_helper.to_array(t)
        if not a.size:
            continue
        neg = np.isneginf(a) | (np.isfinite(a) & (a.astype(np.float64) <= -_EXTREME))
        pos = np.isposinf(a)
        if not (neg.any() or pos.any() or np.isnan(a).any()):
            continue
        if np.isnan(a).any():
            raise ExportError(f"the exported graph holds a NaN constant ('{t.name}'); this is an exporter bug, "
                              f"report it with the model name")
        fixed = np.where(neg, MASK_VALUE, np.where(pos, np.finfo(a.dtype).max, a)).astype(a.dtype)
        t.CopyFrom(numpy_helper.from_array(fixed, t.name))
        replaced += 1
    return replaced


def _apply_spec_dims(m, spec: S.ComponentSpec) -> None:
    """Rename the graph I/O's symbolic dims to the spec's names; verify names, order, dtypes and static dims."""
    inits = {i.name for i in m.graph.initializer}
    graph_inputs = [v for v in m.graph.input if v.name not in inits]
    for kind, values, specs in (("input", graph_inputs, spec.inputs), ("output", list(m.graph.output), spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in specs]:
            raise ExportError(f"{spec.name}: exported graph {kind}s are {names}, expected {[t.name for t in specs]}")
        for v, t in zip(values, specs):
            dt = _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?")
            if dt != t.dtype:
                raise ExportError(f"{spec.name}: {kind} '{v.name}' is {dt}, expected {t.dtype}")
            dims = v.type.tensor_type.shape.dim
            if len(dims) != len(t.shape):
                raise ExportError(f"{spec.name}: {kind} '{v.name}' has rank {len(dims)}, expected {len(t.shape)}")
            for d, want in zip(dims, t.shape):
                if isinstance(want, str):
                    if d.HasField("dim_value"):
                        raise ExportError(
                            f"{spec.name}: {kind} '{v.name}' dim '{want}' was specialized to {d.dim_value} by the "
                            f"exporter; it must stay dynamic (example inputs need every dynamic dim >= 2)")
                    d.dim_param = want
                elif d.HasField("dim_value") and d.dim_value != want:
                    raise ExportError(f"{spec.name}: {kind} '{v.name}' has a dim {d.dim_value}, expected {want}")
                elif not d.HasField("dim_value"):
                    d.dim_value = want


def finalize_graph(path: str | os.PathLike, spec: S.ComponentSpec) -> dict[str, Any]:
    """Normalize a saved graph in place: I/O dims to the spec, non-finite constants sanitized. Returns a report."""
    import onnx

    m = _load(path)
    _apply_spec_dims(m, spec)
    replaced = _sanitize_nonfinite(m)
    if replaced:
        log.debug("%s: replaced %d mask constant(s) (-inf / float lowest -> %g; TensorRT fp16 needs finite masks)",
                  spec.file, replaced, MASK_VALUE)
    m.doc_string = f"edgevlm {spec.name} graph"
    onnx.save(m, str(path))                                 # external data references are kept as they are
    return {"mask_constants_replaced": replaced, "mask_value": MASK_VALUE}


__all__ = ["ExportedGraph", "MASK_VALUE", "export_vision", "export_decoder", "save_embed_table", "graph_io", "op_histogram", "uses_contrib_ops",
           "external_data_files", "nonfinite_constants", "finalize_graph", "graph_entry", "decoder_module",
           "vision_module", "opset_of", "STANDARD_DOMAINS"]
