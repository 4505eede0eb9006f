"""The quantization report: how far a quantized bundle is from fp32, measured on real held-out inputs.

Per component (stored in ``manifest["quantization"]["errors"]`` by ``apply_precision`` and printed as a table):

* ``vision``: image embeddings of held-out images, quantized vs fp32 vision graph: cosine (mean / min over images),
  max |diff|, mean |diff|.
* ``decoder``: the decoder alone (both fed the fp32 vision graph's image embeddings): logits of the prefill's last
  position and of each teacher-forced decode step (the reference answer's tokens, or the fp32 model's greedy tokens
  when there is no answer), each decoder on its own KV cache: cosine, max/mean |diff| and top-1 agreement.
* ``end_to_end``: the whole quantized pipeline (quantized vision -> quantized decoder) against the fp32 pipeline.

Sizes on disk before/after are recorded by ``apply_precision`` (``manifest["quantization"]["sizes"]``).

Task-level checks on finished bundles (the demo and ``benchmarks/quant_accuracy.py`` use them):

* ``task_accuracy(bundle, data_dir, split="test")``: exact match through the runtime (``edgevlm.runtime.Session``,
  greedy), overall and per question type.
* ``teacher_forced_agreement(ref_bundle, bundle, data_dir)``: top-1 agreement of the logits over every answer
  position of the split (teacher forcing with the reference answers), each bundle with its own vision graph and
  embedding table.

Every decoder here runs through the decoder interface (``edgevlm.runtime.decoders``: ``prefill`` / ``step``, its own
KV cache): the graphs of an export in progress via ``edgevlm.quant.calibration.graph_decoder``, finished bundles via
``open_decoder(bundle, "ort")``.

Torch-free (numpy + onnxruntime + tokenizers).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.errors import DataError

log = logging.getLogger(__name__)


# ---- metrics ----------------------------------------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0 or not (math.isfinite(nx) and math.isfinite(ny)):
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


class ErrorStats:
    """Running error statistics of candidate vs reference arrays (one ``add`` per compared output)."""

    def __init__(self) -> None:
        self.cos: list[float] = []
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.agree = 0
        self.positions = 0

    def add(self, ref: np.ndarray, got: np.ndarray, *, top1: bool = False) -> None:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        d = np.abs(ref - got)
        self.cos.append(_cos(ref, got))
        self.max_abs = max(self.max_abs, float(d.max()) if d.size else 0.0)
        self.abs_sum += float(d.sum())
        self.count += int(d.size)
        if top1:
            self.positions += 1
            self.agree += int(int(np.argmax(ref)) == int(np.argmax(got)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cosine_mean": float(np.mean(self.cos)) if self.cos else None,
                               "cosine_min": float(np.min(self.cos)) if self.cos else None,
                               "max_abs": self.max_abs if math.isfinite(self.max_abs) else None,
                               "mean_abs": self.abs_sum / self.count if self.count else None,
                               "outputs": len(self.cos)}
        if self.positions:
            out["top1_agreement"] = self.agree / self.positions
            out["positions"] = self.positions
        return out


# ---- decoders driven through the decoder interface ---------------------------------------------------------------
def _sequence(dec: Any, embeds: np.ndarray, ctx: Any, tokens: Sequence[int] | None, steps: int,
              eos_id: int | None) -> tuple[list[np.ndarray], list[int]]:
    """One request on a ``Decoder`` (``edgevlm.runtime.decoders``): prefill ``embeds``, then up to ``steps`` decode
    steps fed ``tokens`` (or, when None, the decoder's own greedy tokens until ``eos_id``). Returns the logits of
    every position (copies, ``[vocab]`` each) and the tokens fed."""
    logits = [np.array(dec.prefill(embeds), np.float32)]
    fed: list[int] = []
    for k in range(steps):
        tok = int(tokens[k]) if tokens is not None else int(np.argmax(logits[-1]))
        if tokens is None and tok == eos_id:
            break
        fed.append(tok)
        logits.append(np.array(dec.step(ctx.embed([tok])[0]), np.float32))
    return logits, fed


def heldout_errors(ctx: Any, items: Sequence[Any], *, fp32_vision: Path, fp32_decoder: Path, vision: Path,
                   decoder: Path, decode_steps: int = 4, threads: int | None = None,
                   ref_embed_table: np.ndarray | None = None, emulate_qdq: bool = False) -> dict[str, Any]:
    """Error of the quantized graphs against the fp32 graphs on held-out items (see the module docstring).

    ``ctx`` is the quantized bundle's ``BundleContext`` (its embedding table is the one the runtime gathers from);
    ``ref_embed_table`` the fp32 table when the recipe changed it (default: the same table). ``emulate_qdq``
    (TensorRT bundles): run the quantized graphs' Q/DQ as float ops, i.e. the exact int8 arithmetic TensorRT runs,
    not this CPU's fused ONNX Runtime kernels (``edgevlm.quant.calibration.ort_session``).
    """
    from edgevlm.quant.calibration import graph_decoder, ort_session
    from edgevlm.runtime.cpuinfo import has_int8_dot

    if not items:
        raise DataError("the held-out set is empty: the quantization report needs at least one image")
    t0 = time.perf_counter()
    ref_ctx = dataclasses.replace(ctx, embed_table=ref_embed_table) if ref_embed_table is not None else ctx
    same_vision = Path(fp32_vision) == Path(vision)
    vstats, dstats, estats = ErrorStats(), ErrorStats(), ErrorStats()
    # In three passes, so only one decoder's weights are in memory at a time (mobilevlm-1.7b: the fp32 decoder
    # alone is 5.6 GB in ONNX Runtime): vision (both graphs), then the fp32 decoder over every item (logits kept:
    # a few [vocab] rows per item), then the quantized decoder fed the same tokens.
    v_ref = ort_session(fp32_vision, threads)
    v_q = v_ref if same_vision else ort_session(vision, threads, emulate_qdq=emulate_qdq)
    vin = v_ref.get_inputs()[0].name
    images = []
    for item in items:
        px = ctx.pixel_values(item.image)
        img_ref = np.asarray(v_ref.run(None, {vin: px})[0], np.float32)
        img_q = img_ref if same_vision else np.asarray(v_q.run(None, {vin: px})[0], np.float32)
        vstats.add(img_ref, img_q)
        images.append((img_ref, img_q))
    del v_ref, v_q
    longest = max(len(ctx.prompt_ids(it.question)) for it in items) + ctx.visual_tokens
    answer = max((len(ctx.continuation_ids(it.question, it.answer)) for it in items if it.answer is not None),
                 default=0)
    capacity = longest + max(int(decode_steps), answer) + 1
    # decode steps in the report: the whole teacher-forced answer (short) or ``decode_steps`` greedy tokens
    steps = max(1, int(decode_steps))
    plans = []                                   # per item: prompt ids, the two reference runs
    d_ref = graph_decoder(fp32_decoder, threads, max_context=capacity)
    try:
        for item, (img_ref, _) in zip(items, images):
            ids = ctx.prompt_ids(item.question)
            teacher = list(ctx.continuation_ids(item.question, item.answer)) if item.answer is not None else None
            n = max(steps, len(teacher) - 1) if teacher is not None else steps
            embeds = ref_ctx.splice(ids, img_ref)
            decoder_run = _sequence(d_ref, embeds, ref_ctx, teacher, n if teacher is None else
                                    min(n, len(teacher) - 1), ctx.eos_id)
            if teacher is not None:              # the end-to-end reference has the same inputs: the same run
                e2e_run = decoder_run
            else:
                tokens = decoder_run[1] + [ctx.eos_id or 0]
                e2e_run = _sequence(d_ref, embeds, ref_ctx, tokens, min(n, len(tokens) - 1), ctx.eos_id)
            plans.append((ids, decoder_run, e2e_run))
    finally:
        d_ref.close()
    del d_ref
    d_q = graph_decoder(decoder, threads, emulate_qdq=emulate_qdq, max_context=capacity)
    try:
        for (ids, (ref_logits, fed), (e2e_logits, e2e_fed)), (img_ref, img_q) in zip(plans, images):
            cand, _ = _sequence(d_q, ctx.splice(ids, img_ref), ctx, fed, len(fed), ctx.eos_id)
            for a, b in zip(ref_logits, cand):
                dstats.add(a, b, top1=True)
            cand, _ = _sequence(d_q, ctx.splice(ids, img_q), ctx, e2e_fed, len(e2e_fed), ctx.eos_id)
            for a, b in zip(e2e_logits, cand):
                estats.add(a, b, top1=True)
    finally:
        d_q.close()
    return {"vision": vstats.to_dict(), "decoder": dstats.to_dict(), "end_to_end": estats.to_dict(),
            "heldout_samples": len(items), "seconds": round(time.perf_counter() - t0, 3),
            "quantized_graphs_run_as": ("Q/DQ as float ops (the exact int8 arithmetic of the target's TensorRT "
                                        "kernels)" if emulate_qdq else "ONNX Runtime's CPU kernels on this host"),
            "host_int8_dot": has_int8_dot(),
            "decoder_inputs": "fp32 vision embeddings (isolates the decoder)",
            "end_to_end_inputs": "each pipeline's own vision graph and embedding table",
            "positions": "prefill last position + teacher-forced answer tokens (greedy fp32 tokens without answers)"}


# ---- printing ---------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _hsize(n: int) -> str:
    for unit, div in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n}B"


def report_table(quant: Mapping[str, Any]):
    """A ``rich.table.Table`` of a ``manifest["quantization"]`` block (fits an 80-column terminal)."""
    from rich.table import Table

    recipe = quant.get("recipe") or {}
    errors = quant.get("errors") or {}
    sizes = quant.get("sizes") or {}
    held = errors.get("heldout_samples")
    calib = (quant.get("calibration") or {}).get("calibration") or {}
    title = (f"quantization {recipe.get('name', '?')} for {quant.get('target', '?')}: error vs fp32"
             + (f" on {held} held-out images" if held else "")
             + (" (nothing calibrated)" if calib.get("kind") == "none"
                else f" (calibration {quant.get('calib_method', '?')})"))
    t = Table(title=title, title_justify="left", pad_edge=False)
    for col, just in (("part", "left"), ("recipe", "left"), ("cos mean/min", "right"), ("max|d|", "right"),
                      ("mean|d|", "right"), ("top-1", "right"), ("size", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    short = {"static-qdq": "QDQ", "matmulnbits-int4": "NBits", "matmulnbits-int8": "NBits", "fp16-cast": "cast",
             "dynamic": "dyn", "none": ""}
    rows = [("vision", "vision", "vision"), ("decoder", "decoder", "decoder"), ("e2e", "end_to_end", None),
            ("embed", None, "embed"), ("total", None, "total")]
    for label, ekey, skey in rows:
        e = errors.get(ekey, {}) if ekey else {}
        if skey in ("vision", "decoder"):
            r = recipe.get(skey) or {}
            method = f"{r.get('precision', '?')} {short.get(r.get('method', ''), r.get('method', ''))}".strip()
            if r.get("quant_format") == "QDQ" and r.get("method") == "matmulnbits-int4":
                method = f"{r.get('precision')} DQ"
            if skey == "decoder" and r.get("lm_head") not in (None, r.get("precision")):
                method += f" head {r.get('lm_head')}"
        elif skey == "embed":
            method = {"float16": "fp16", "float32": "fp32"}.get(recipe.get("embed_dtype"), "-")
        else:
            method = ""
        s = sizes.get(skey, {}) if skey else {}
        size = f"{_hsize(s['before_bytes'])}>{_hsize(s['after_bytes'])}" if s else ""
        cos = f"{_fmt(e.get('cosine_mean'), '.4f')}/{_fmt(e.get('cosine_min'), '.4f')}" if e else ""
        top1 = f"{e['top1_agreement'] * 100:.1f}%" if e.get("top1_agreement") is not None else ""
        t.add_row(label, method, cos, _fmt(e.get("max_abs"), ".1e") if e else "",
                  _fmt(e.get("mean_abs"), ".1e") if e else "", top1, size)
    return t


def print_report(quant: Mapping[str, Any], console: Any = None) -> None:
    """Print the report table (to stderr unless a ``rich.console.Console`` is given)."""
    from edgevlm.console import make_console

    (console or make_console(stderr=True)).print(report_table(quant))


# ---- task-level checks on finished bundles ------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Same as ``edgevlm.train.evaluate.normalize_answer`` (which imports torch): strip, lower, drop one final '.'."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _records(data_dir: str | os.PathLike, split: str, limit: int | None):
    from edgevlm.train.llava_data import load_dataset

    data = Path(data_dir)
    if data.is_file():
        path = data
    else:
        path = next((data / f"{split}{ext}" for ext in (".json", ".jsonl") if (data / f"{split}{ext}").is_file()),
                    None)
        if path is None:
            raise DataError(f"'{data}' has no {split}.json or {split}.jsonl; pass a dataset directory written by "
                            f"`edgevlm synth --out DIR` (or a LLaVA .json file) and an existing split")
    return load_dataset(path, max_samples=limit)


def task_accuracy(bundle_path: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                  limit: int | None = None, *, max_new_tokens: int = 16, threads: int | None = None,
                  predictions: bool = False, progress: bool = False) -> dict[str, Any]:
    """Exact-match accuracy of a bundle on ``data_dir``'s ``split`` through the runtime (greedy, one request at a
    time). Returns ``{accuracy, correct, total, per_type, seconds, bundle, split}`` (+ ``predictions``)."""
    from edgevlm.runtime import Session

    records = _records(data_dir, split, limit)
    sess = Session.from_bundle(bundle_path, threads=threads, optimized_cache=None)
    t0 = time.perf_counter()
    per_type: dict[str, list[int]] = {}
    preds = []
    from tqdm.auto import tqdm

    for r in tqdm(records, desc=f"exact match {Path(bundle_path).name}", unit="q", disable=not progress,
                  leave=False):
        res = sess.generate(r.image_path, r.question, max_new_tokens=max_new_tokens)
        ok = normalize_answer(res.text) == normalize_answer(r.answer)
        c = per_type.setdefault(r.question_type or "all", [0, 0])
        c[0] += int(ok)
        c[1] += 1
        if predictions:
            preds.append({"id": r.id, "answer": r.answer, "prediction": res.text, "correct": ok})
    correct = sum(c for c, _ in per_type.values())
    out: dict[str, Any] = {"accuracy": correct / len(records), "correct": correct, "total": len(records),
                           "per_type": {k: {"accuracy": c / n, "correct": c, "total": n}
                                        for k, (c, n) in sorted(per_type.items())},
                           "seconds": round(time.perf_counter() - t0, 3), "bundle": str(bundle_path),
                           "split": split, "max_new_tokens": max_new_tokens}
    if predictions:
        out["predictions"] = preds
    return out


def _pipeline(bundle_path: str | os.PathLike, threads: int | None):
    from edgevlm.bundle import read_bundle
    from edgevlm.quant.calibration import BundleContext, ort_session
    from edgevlm.runtime.backends import BackendOptions
    from edgevlm.runtime.decoders import open_decoder

    b = read_bundle(bundle_path)
    ctx = BundleContext.from_manifest(b.root, b.manifest)
    decoder = open_decoder(b, "ort", BackendOptions(threads=threads))            # the decoder interface
    return ctx, ort_session(b.component_path("vision"), threads), decoder


def teacher_forced_agreement(ref_bundle: str | os.PathLike, bundle: str | os.PathLike, data_dir: str | os.PathLike,
                             split: str = "test", limit: int | None = None, *, threads: int | None = None,
                             progress: bool = False, near_tie_margin: float = 0.1) -> dict[str, Any]:
    """Top-1 agreement of ``bundle`` with ``ref_bundle`` (fp32) over every answer position of the split, teacher
    forced with the reference answers (prefill predicts the first answer token, each step the next, EOS included).
    Also the logits error statistics, each bundle's teacher-forced token accuracy against the answers, and the
    agreement split by whether the fp32 top-2 logit margin is below ``near_tie_margin`` (a near tie: the model
    hesitates, and any perturbation can flip the top-1 token) or not (decisive positions)."""
    from tqdm.auto import tqdm

    from edgevlm.quant.calibration import CalibrationItem

    records = _records(data_dir, split, limit)
    ref_ctx, ref_v, ref_d = _pipeline(ref_bundle, threads)
    ctx, v, d = _pipeline(bundle, threads)
    vin = ref_v.get_inputs()[0].name
    stats = ErrorStats()
    hits_ref = hits = total = 0
    near_ties = near_agree = 0
    t0 = time.perf_counter()
    for r in tqdm(records, desc="teacher-forced agreement", unit="q", disable=not progress, leave=False):
        item = CalibrationItem(r.id, r.image_path, r.question, r.answer)
        px = ref_ctx.pixel_values(item.image)
        img_ref = np.asarray(ref_v.run(None, {vin: px})[0], np.float32)
        img = np.asarray(v.run(None, {v.get_inputs()[0].name: px})[0], np.float32)
        ids = ref_ctx.prompt_ids(item.question)
        teacher = list(ref_ctx.continuation_ids(item.question, item.answer))
        a, b = ref_d.prefill(ref_ctx.splice(ids, img_ref)), d.prefill(ctx.splice(ids, img))
        for k, tok in enumerate(teacher):
            stats.add(a, b, top1=True)
            top2 = np.partition(a, -2)[-2:]
            if float(top2[1] - top2[0]) < near_tie_margin:
                near_ties += 1
                near_agree += int(int(np.argmax(a)) == int(np.argmax(b)))
            hits_ref += int(int(np.argmax(a)) == tok)
            hits += int(int(np.argmax(b)) == tok)
            total += 1
            if k + 1 < len(teacher):
                a, b = ref_d.step(ref_ctx.embed([tok])[0]), d.step(ctx.embed([tok])[0])
    ref_d.close()
    d.close()
    out = stats.to_dict()
    decisive = total - near_ties
    out.update({"near_tie_margin": near_tie_margin, "near_tie_positions": near_ties,
                "top1_agreement_near_ties": near_agree / near_ties if near_ties else None,
                "top1_agreement_decisive": ((stats.agree - near_agree) / decisive) if decisive else None})
    out.update({"records": len(records), "positions": total, "reference_token_accuracy": hits_ref / max(total, 1),
                "token_accuracy": hits / max(total, 1), "seconds": round(time.perf_counter() - t0, 3),
                "split": split, "ref_bundle": str(ref_bundle), "bundle": str(bundle)})
    return out


__all__ = ["ErrorStats", "heldout_errors", "report_table", "print_report", "task_accuracy",
           "teacher_forced_agreement", "normalize_answer"]
