"""Exact-match evaluation of a MobileVLM on held-out LLaVA-format QA (overall and per question type).

Every record's first question is asked with the inference prompt (``edgevlm.prompt.build_prompt``, Vicuna v1,
chunk-wise tokenization) and answered by greedy decoding until ``</s>``. Decoding is batched: the spliced prompt
embeddings are **left**-padded (pad positions masked out; position ids count real tokens only), so the last
column is every row's last prompt token and one decode step serves the whole batch. The result equals
``MobileVLM.generate`` run one request at a time (tests/test_train.py checks it).

A prediction matches when, after ``normalize_answer`` (strip, lower-case, drop one trailing period), it equals
the reference answer.

    >>> from edgevlm.train.evaluate import evaluate_checkpoint
    >>> result = evaluate_checkpoint("runs/demo/checkpoint", "runs/demo/data", split="test")
    >>> result["accuracy"], result["per_type"]["count"]["accuracy"]

Command line: ``edgevlm eval --checkpoint DIR --data DIR [--split test] [--out result.json]``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from edgevlm.errors import DataError
from edgevlm.model.hf_compat import with_cache
from edgevlm.preprocess import PreprocessConfig
from edgevlm.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def preprocess_config(cfg: Any) -> PreprocessConfig:
    """The ``PreprocessConfig`` of a ``ModelConfig``."""
    return PreprocessConfig(image_size=cfg.vision.image_size, mean=tuple(cfg.image_mean), std=tuple(cfg.image_std),
                            aspect_ratio=cfg.image_aspect_ratio)


@torch.no_grad()
def generate_batch(model: Any, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor,
                   max_new_tokens: int = 16, eos_token_id: int | None = None) -> list[list[int]]:
    """Batched greedy decoding. ``prompts``: token lists with one ``IMAGE_TOKEN_INDEX`` each; ``pixel_values``
    ``[B, 3, S, S]``. Returns the generated ids per row (up to and including EOS)."""
    eos = model.cfg.llm.eos_token_id if eos_token_id is None else eos_token_id
    dev = model.device
    b = len(prompts)
    image_embeds = model.encode_images(pixel_values.to(dev))                   # [B, V, D]
    rows = []
    for i, ids in enumerate(prompts):
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=dev)
        p = int((ids_t == IMAGE_TOKEN_INDEX).nonzero()[0])
        text = model.embed_tokens(ids_t.clamp(min=0))                           # [T, D]
        rows.append(torch.cat([text[:p], image_embeds[i].to(text.dtype), text[p + 1:]]))   # [T + V - 1, D]
    length = max(r.shape[0] for r in rows)
    d = rows[0].shape[1]
    embeds = rows[0].new_zeros((b, length, d))                                  # [B, L, D] left-padded
    mask = torch.zeros((b, length), dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        embeds[i, length - r.shape[0]:] = r
        mask[i, length - r.shape[0]:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                           # [B, L]
    cache = DynamicCache()
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **with_cache(cache),
                    use_cache=True, logits_to_keep=1)
    produced: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    next_pos = position_ids[:, -1:] + 1                                         # [B, 1]
    ctx = model.cfg.context_length
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)                              # [B]
        for i in range(b):
            if not done[i]:
                produced[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()) or int(next_pos.max()) >= ctx or step == max_new_tokens - 1:
            break
        emb = model.embed_tokens(nxt[:, None])                                  # [B, 1, D]
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        out = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=next_pos, **with_cache(cache),
                        use_cache=True)
        next_pos = next_pos + 1
    return produced


def _decode(tokenizer: Any, ids: list[int], eos: int) -> str:
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate_records(model: Any, tokenizer: Any, records: Sequence[Any], *, batch_size: int = 64,
                     max_new_tokens: int = 16, images: Any | None = None, progress: bool = False,
                     template_name: str | None = None) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` on ``records`` (``llava_data.LlavaRecord``-like: ``turns``, ``image_path``,
    ``question_type``). ``images`` may be a prebuilt ``dataset.ImageCache`` covering the records."""
    from tqdm.auto import tqdm

    from edgevlm.train.dataset import ImageCache

    if not records:
        raise DataError("nothing to evaluate: the evaluation split is empty")
    cfg = model.cfg
    template_name = template_name or cfg.conv_template
    bos, eos = cfg.llm.bos_token_id, cfg.llm.eos_token_id
    if images is None:
        images = ImageCache([r.image_path for r in records], preprocess_config(cfg), progress=progress)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    predictions = []
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    n_gen = 0
    try:
        bar = tqdm(total=len(records), desc="evaluating", unit="q", disable=not progress, leave=False)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prompts = [tokenize_prompt(build_prompt(r.turns[0][0], template_name), tokenizer, bos) for r in chunk]
            px = images.pixel_values([images.index[str(r.image_path)] for r in chunk])
            outs = generate_batch(model, prompts, px, max_new_tokens=max_new_tokens, eos_token_id=eos)
            for r, ids in zip(chunk, outs):
                n_gen += len(ids)
                pred = _decode(tokenizer, ids, eos)
                ref = r.turns[0][1]
                ok = normalize_answer(pred) == normalize_answer(ref)
                qt = r.question_type or "all"
                per_type[qt][0] += int(ok)
                per_type[qt][1] += 1
                predictions.append({"id": r.id, "question_type": qt, "answer": ref, "prediction": pred,
                                    "correct": ok})
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    correct = sum(p["correct"] for p in predictions)
    return {"accuracy": correct / len(predictions), "correct": correct, "total": len(predictions),
            "per_type": {k: {"accuracy": c / n, "correct": c, "total": n} for k, (c, n) in sorted(per_type.items())},
            "seconds": seconds, "generated_tokens": n_gen, "batch_size": batch_size, "predictions": predictions}


def split_file(data: str | Path, split: str) -> Path:
    """``DIR/{split}.json`` (or ``.jsonl``) for a dataset directory; a file path is returned as is."""
    data = Path(data)
    if data.is_file():
        return data
    for ext in (".json", ".jsonl"):
        if (data / f"{split}{ext}").is_file():
            return data / f"{split}{ext}"
    if not data.exists():
        raise DataError(f"data directory '{data}' does not exist; pass a directory with {split}.json (LLaVA format, "
                        f"e.g. written by `edgevlm synth --out DIR`)")
    raise DataError(f"'{data}' has no {split}.json or {split}.jsonl; choose another --split or data directory")


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str = "test", *, batch_size: int = 64,
                        max_samples: int | None = None, max_new_tokens: int = 16,
                        progress: bool = False) -> dict[str, Any]:
    """Load a checkpoint (and its tokenizer) and evaluate it on ``data``'s ``split``."""
    from edgevlm.model import load_checkpoint
    from edgevlm.train.llava_data import load_dataset
    from edgevlm.train.tokenizer import load_tokenizer

    records = load_dataset(split_file(data, split), max_samples=max_samples)
    model, cfg = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    result = evaluate_records(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              progress=progress)
    result.update({"checkpoint": str(checkpoint), "data": str(data), "split": split, "model": cfg.name})
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"exact match: {result['accuracy'] * 100:.2f}% ({result['correct']}/{result['total']})"]
    for qt, r in result["per_type"].items():
        lines.append(f"  {qt:<10} {r['accuracy'] * 100:6.2f}% ({r['correct']}/{r['total']})")
    lines.append(f"  {result['seconds']:.1f} s, {result['total'] / max(result['seconds'], 1e-9):.0f} questions/s")
    return "\n".join(lines)


__all__ = ["evaluate_records", "evaluate_checkpoint", "generate_batch", "normalize_answer", "format_result",
           "preprocess_config", "split_file"]
