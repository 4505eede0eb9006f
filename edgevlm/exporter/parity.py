"""Parity validation: ONNX Runtime (CPU provider) against PyTorch on fresh random inputs, after every export.

Two halves, so that the full-size PyTorch model can be freed before ONNX Runtime loads the graphs (peak memory =
max of the two, not the sum):

1. ``vision_reference`` / ``decoder_reference`` run PyTorch and keep the inputs and expected outputs (small arrays).
2. ``check_vision`` / ``check_decoder`` run the saved graphs and compare.

Checks (each records max |diff|, cosine, the applied limit and pass/fail):

* vision: random pixel values, batch 2 (batch 1 for models of >= 1B parameters) -> ``image_embeds``.
* decoder, per batch size (1 and 2; 1 alone for models of >= 1B parameters): prefill of ``prompt_len`` random embeddings from an empty cache
  (``prefill_b{B}``, logits + the valid rows of the KV cache), then ``decode_steps`` single-token steps
  (``decode_b{B}_step{k}``) on ONNX Runtime's *own* KV cache from the previous step (so the KV round trip is
  exercised), the next token being PyTorch's greedy choice; the KV cache after the last step is compared too
  (``present_b{B}_final``). The graph runs through the decoder interface (``edgevlm.runtime.decoders``, the code
  the runtime serves with: IOBinding, the manifest's KV mode), which is batch 1: each row of a batch-B reference is
  its own sequence, the rows stacked back for the comparison. (The graph's batch dimension itself is exercised by
  ``tests/test_export.py``; the runtime decodes at batch 1.)

Tolerances come from ``spec.ParityTolerances`` (fp32 defaults in ``spec.FP32_TOLERANCES``; quantized recipes pass
looser ones). A failure raises ``ExportMismatch`` naming the worst check and its numbers.

    >>> refs = decoder_reference(model, seed=0)
    >>> result = check_decoder("bundle/decoder.onnx", refs, FP32_TOLERANCES)
    >>> result.raise_if_failed(); result.to_dict()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgevlm.errors import ExportMismatch, RuntimeBackendError
from edgevlm.graphs import spec as S

DEFAULT_PROMPT_LEN = 16
DEFAULT_DECODE_STEPS = 3
DEFAULT_BATCHES = (1, 2)
PROVIDER = "CPUExecutionProvider"


class CosineMismatch(ExportMismatch):
    """The maximum difference is within its limit but the cosine similarity is below its threshold."""

    def __init__(self, component: str, check: str, max_abs_diff: float, tolerance: float, cosine: float,
                 min_cosine: float) -> None:
        super().__init__(component, check, max_abs_diff, tolerance, cosine)
        self.min_cosine = min_cosine
        self.args = (f"{component}: ONNX Runtime output differs from PyTorch on '{check}': cosine {cosine:.6f} < "
                     f"{min_cosine:.6f} (max |diff| {max_abs_diff:.3e}, limit {tolerance:.1e}). Re-export with "
                     f"--precision fp32 to isolate a quantization error, or report the graph with `edgevlm inspect`.",)

    def __str__(self) -> str:
        return self.args[0]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class CheckResult:
    component: str
    check: str
    output: str
    max_abs_diff: float
    cosine: float
    limit: float
    min_cosine: float | None
    enforced: bool
    shape: list[int]
    reference_absmax: float

    @property
    def passed(self) -> bool:
        if not self.enforced:
            return True
        ok = math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.limit
        if self.min_cosine is not None:
            ok = ok and self.cosine >= self.min_cosine
        return ok

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "output": self.output, "max_abs_diff": _finite(self.max_abs_diff),
                "cosine": _finite(self.cosine), "tolerance": self.limit, "min_cosine": self.min_cosine,
                "enforced": self.enforced, "passed": self.passed, "shape": self.shape,
                "reference_absmax": _finite(self.reference_absmax)}

    def error(self) -> ExportMismatch:
        if math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.limit and self.min_cosine is not None:
            return CosineMismatch(self.component, self.check, self.max_abs_diff, self.limit, self.cosine,
                                  self.min_cosine)
        return ExportMismatch(self.component, self.check, self.max_abs_diff, self.limit, self.cosine)


@dataclass
class ComponentParity:
    component: str
    checks: list[CheckResult] = field(default_factory=list)
    tolerances: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def worst(self) -> CheckResult | None:
        failed = [c for c in self.checks if not c.passed]
        pool = failed or self.checks
        if not pool:
            return None
        return max(pool, key=lambda c: (c.max_abs_diff / c.limit) if c.limit > 0 else math.inf)

    def raise_if_failed(self) -> None:
        for c in self.checks:
            if not c.passed:
                raise (self.worst() or c).error()

    def to_dict(self) -> dict[str, Any]:
        import onnxruntime as ort

        enforced = [c for c in self.checks if c.enforced]
        w = self.worst()
        return {"passed": self.passed, "provider": PROVIDER, "onnxruntime": ort.__version__,
                "max_abs_diff": _finite(max((c.max_abs_diff for c in enforced), default=0.0)),
                "cosine": _finite(min((c.cosine for c in enforced), default=1.0)),
                "tolerance": w.limit if w else None, "worst_check": w.check if w else None,
                "tolerances": self.tolerances, "seconds": round(self.seconds, 3),
                "checks": [c.to_dict() for c in self.checks]}


def compare(component: str, check: str, output: str, got: np.ndarray, want: np.ndarray,
            tol: S.Tolerance | None) -> CheckResult:
    """One comparison. ``tol = None`` records the numbers without enforcing them."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return CheckResult(component, check, output, math.inf, 0.0, tol.limit(0) if tol else math.inf,
                           tol.min_cosine if tol else None, True, list(got.shape), 0.0)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if diff.size and not np.isfinite(diff).all():
        max_diff = math.inf
    ref_max = float(np.abs(want).max()) if want.size else 0.0
    limit = tol.limit(ref_max) if tol else math.inf
    return CheckResult(component, check, output, max_diff, S.cosine(got, want), limit,
                       tol.min_cosine if tol else None, tol is not None, list(got.shape), ref_max)


# ---- ONNX Runtime -----------------------------------------------------------------------------------------------
def ort_session(path: str | os.PathLike, *, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session for a saved graph (external data is found beside it)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:                                # pragma: no cover - core dependency
        raise RuntimeBackendError("onnxruntime is not installed; pip install onnxruntime") from exc
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=[PROVIDER])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types, all Exception subclasses
        raise RuntimeBackendError(f"ONNX Runtime cannot load '{path}' ({type(exc).__name__}: {exc})") from exc


# ---- references (PyTorch side) ----------------------------------------------------------------------------------
@dataclass
class VisionReference:
    pixel_values: np.ndarray                 # [B, 3, S, S]
    image_embeds: np.ndarray                 # [B, V, D]


@dataclass
class DecoderReference:
    batch: int
    prefill_embeds: np.ndarray               # [B, T, D]
    prefill_logits: np.ndarray               # [B, 1, vocab]
    prefill_presents: list[np.ndarray]       # 2L x [B, H, T, hd]
    step_embeds: list[np.ndarray]            # per step [B, 1, D]
    step_logits: list[np.ndarray]            # per step [B, 1, vocab]
    final_presents: list[np.ndarray]         # 2L x [B, H, T + steps, hd]


def vision_reference(model, *, batch: int = 2, seed: int = 0) -> VisionReference:
    import torch

    s = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, s, s, generator=g)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model.encode_images(x)
    finally:
        model.train(was)
    return VisionReference(x.numpy(), y.float().numpy())


def _flat_presents(cache) -> list[np.ndarray]:
    out = []
    for layer in cache.layers:
        out += [layer.keys.float().numpy().copy(), layer.values.float().numpy().copy()]
    return out


def decoder_reference(model, *, batches: Sequence[int] = DEFAULT_BATCHES, prompt_len: int = DEFAULT_PROMPT_LEN,
                      decode_steps: int = DEFAULT_DECODE_STEPS, seed: int = 0) -> list[DecoderReference]:
    """PyTorch reference runs (HF ``DynamicCache`` path, not the export wrapper): one per batch size."""
    import torch
    from transformers import DynamicCache

    from edgevlm.model.hf_compat import cache_of, with_cache

    cfg = model.cfg
    d = cfg.llm.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    table = model.llm.get_input_embeddings().weight
    refs = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                # Text-like rows (embedding rows of random ids) around an image-like block (unit-scale noise).
                ids = torch.randint(0, cfg.llm.vocab_size, (b, prompt_len), generator=g)
                emb = table[ids].float().clone()                                       # [B, T, D]
                lo, hi = prompt_len // 4, max(prompt_len // 4 + 1, (3 * prompt_len) // 4)
                emb[:, lo:hi] = torch.randn(b, hi - lo, d, generator=g)
                mask = torch.ones(b, prompt_len, dtype=torch.long)
                pos = torch.arange(prompt_len).expand(b, prompt_len).contiguous()
                cache = DynamicCache(config=model.llm.config)
                out = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, **with_cache(cache),
                                use_cache=True, logits_to_keep=1)
                prefill_logits = out.logits.float().numpy().copy()
                prefill_presents = _flat_presents(cache_of(out))
                step_embeds, step_logits = [], []
                n = prompt_len
                logits = out.logits
                for _ in range(decode_steps):
                    nxt = logits[:, -1].argmax(-1)                                      # [B]
                    e = model.embed_tokens(nxt[:, None]).float()                        # [B, 1, D]
                    mask = torch.ones(b, n + 1, dtype=torch.long)
                    pos = torch.full((b, 1), n, dtype=torch.long)
                    out = model.llm(inputs_embeds=e, attention_mask=mask, position_ids=pos,
                                    **with_cache(cache_of(out)), use_cache=True, logits_to_keep=1)
                    logits = out.logits
                    step_embeds.append(e.numpy().copy())
                    step_logits.append(logits.float().numpy().copy())
                    n += 1
                refs.append(DecoderReference(b, emb.numpy().copy(), prefill_logits, prefill_presents, step_embeds,
                                             step_logits, _flat_presents(cache_of(out))))
    finally:
        model.train(was)
    return refs


# ---- checks (ONNX Runtime side) ---------------------------------------------------------------------------------
def check_vision(path: str | os.PathLike, ref: VisionReference, tolerances: S.ParityTolerances,
                 session=None) -> ComponentParity:
    import time

    t0 = time.perf_counter()
    sess = session or ort_session(path)
    got = sess.run([S.VISION_OUTPUT], {S.VISION_INPUT: ref.pixel_values})[0]
    res = ComponentParity("vision", tolerances={"vision": tolerances.vision.to_dict()})
    res.checks.append(compare("vision", f"vision_b{ref.pixel_values.shape[0]}", S.VISION_OUTPUT, got,
                              ref.image_embeds, tolerances.vision))
    res.seconds = time.perf_counter() - t0
    return res


def _worst_kv(component: str, check: str, got: list[np.ndarray], want: list[np.ndarray], names: list[str],
              tol: S.Tolerance | None) -> CheckResult:
    results = [compare(component, check, n, g, w, tol) for n, g, w in zip(names, got, want)]
    worst = max(results, key=lambda r: (not r.passed, r.max_abs_diff / r.limit if r.limit > 0 else math.inf))
    worst.cosine = min(r.cosine for r in results)
    worst.output = "present.*" if all(r.passed for r in results) else worst.output
    return worst


def check_decoder(path: str | os.PathLike, refs: Sequence[DecoderReference], tolerances: S.ParityTolerances,
                  decoder: Any = None) -> ComponentParity:
    """The graph at ``path`` through the decoder interface (``edgevlm.graphs.sessions.graph_decoder`` ->
    ``edgevlm.runtime.decoders.OrtDecoder``; or ``decoder``, any ``Decoder``) against the PyTorch references. The
    interface runs batch 1: each row of a batch-B reference is one sequence (prefill, then the steps on the
    decoder's own KV cache); the rows' logits and KV (``kv_arrays``) are stacked back to ``[B, ...]`` and compared
    as one check per reference, named as before (``prefill_b{B}``, ``present_b{B}_prefill``,
    ``decode_b{B}_step{k}``, ``present_b{B}_final``)."""
    import time

    t0 = time.perf_counter()
    owned = decoder is None
    if owned:
        from edgevlm.graphs.sessions import graph_decoder

        capacity = max((r.prefill_embeds.shape[1] + len(r.step_embeds) for r in refs), default=1)
        decoder = graph_decoder(path, max_context=capacity)
    res = ComponentParity("decoder", tolerances=tolerances.to_dict())
    try:
        for ref in refs:
            b = ref.prefill_embeds.shape[0]
            prefill, steps = [], [[] for _ in ref.step_embeds]          # per row: [vocab]; per step, per row
            kv_prefill, kv_final = [], []                              # per row: 2L x [1, H, n, hd]
            for r in range(b):
                prefill.append(np.array(decoder.prefill(ref.prefill_embeds[r:r + 1].astype(np.float32)), np.float32))
                kv_prefill.append(decoder.kv_arrays())
                for k, emb in enumerate(ref.step_embeds):
                    steps[k].append(np.array(decoder.step(emb[r, 0].astype(np.float32)), np.float32))  # own KV
                kv_final.append(decoder.kv_arrays())
            names = [f"present.{i}.{kv}" for i in range(len(kv_prefill[0]) // 2) for kv in ("key", "value")]
            stack = lambda rows: [np.concatenate(t, axis=0) for t in zip(*rows)]  # noqa: E731 - rows -> [B, ...]
            res.checks.append(compare("decoder", f"prefill_b{b}", "logits", np.stack(prefill)[:, None],
                                      ref.prefill_logits, tolerances.logits))
            res.checks.append(_worst_kv("decoder", f"present_b{b}_prefill", stack(kv_prefill), ref.prefill_presents,
                                        names, tolerances.kv))
            for k, (rows, want) in enumerate(zip(steps, ref.step_logits), start=1):
                res.checks.append(compare("decoder", f"decode_b{b}_step{k}", "logits", np.stack(rows)[:, None], want,
                                          tolerances.logits))
            if ref.step_embeds:
                res.checks.append(_worst_kv("decoder", f"present_b{b}_final", stack(kv_final), ref.final_presents,
                                            names, tolerances.kv))
    finally:
        if owned:
            decoder.close()
    res.seconds = time.perf_counter() - t0
    return res


__all__ = ["CheckResult", "ComponentParity", "CosineMismatch", "VisionReference", "DecoderReference", "compare",
           "ort_session", "vision_reference", "decoder_reference", "check_vision", "check_decoder",
           "DEFAULT_PROMPT_LEN", "DEFAULT_DECODE_STEPS", "DEFAULT_BATCHES"]
