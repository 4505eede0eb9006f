"""Training examples: LLaVA records -> token ids + loss labels + cached pixel values, and batch collation.

Two templates, as in MobileVLM's ``train.py``:

* ``"vicuna_v1"`` (stage 2, instruction tuning): the conversation rendered by ``edgevlm.prompt.build_conversation``
  (``"<system> USER: <image>\\n<question> ASSISTANT: <answer></s>"``). Only the assistant answers carry loss,
  each including its ``</s>`` (EOS); BOS, the system prompt, the questions, the role tags and the image
  placeholder are labelled ``IGNORE_INDEX``.
* ``"plain"`` (stage 1, feature alignment): ``"<image>" + caption + "\\n"``; the image part (BOS + placeholder) is
  masked and the caption (with its ``"\\n"`` terminator, as LLaVA's ``preprocess_plain``) is supervised. Records
  without a caption use their first answer, which is what LLaVA's plain format does with caption-as-answer data.

Token ids are produced exactly as ``edgevlm.prompt.tokenize_prompt`` produces them at inference: the text on each
side of ``<image>`` is encoded separately (BOS once, one ``IMAGE_TOKEN_INDEX`` = -200 between the chunks). Labels
are assigned from the tokenizer's character offsets: a token is supervised iff it starts inside an answer span.

Pixel values are computed once per distinct image and kept in memory as ``uint8`` canvases (resized and cropped
exactly like ``edgevlm.preprocess.preprocess``); a batch is normalized on the fly, bit-identical to ``preprocess``.

    >>> ds = VLMDataset(records, tokenizer, PreprocessConfig(image_size=112), template="vicuna_v1")
    >>> batch = ds.collate(range(8))        # input_ids / labels / attention_mask [8, T], pixel_values [8, 3, S, S]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from edgevlm.errors import ConfigError, DataError, ImageError
from edgevlm.preprocess import PreprocessConfig, expand2square, load_image
from edgevlm.preprocess import _center_crop, _resize_shortest  # noqa: PLC2701  (shared, bit-identical pipeline)
from edgevlm.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, build_conversation

log = logging.getLogger(__name__)

PLAIN = "plain"
TEMPLATE_NAMES = (PLAIN, "vicuna_v1")


@dataclass
class Example:
    input_ids: list[int]          # text ids with exactly one IMAGE_TOKEN_INDEX
    labels: list[int]             # same length; IGNORE_INDEX where no loss is taken

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _encode_with_spans(text: str, spans: Sequence[tuple[int, int]], tokenizer: Any,
                       bos_token_id: int | None) -> Example:
    """Chunk-wise tokenization of ``text`` (split on ``<image>``) with labels on tokens starting inside ``spans``."""
    ids: list[int] = []
    labels: list[int] = []
    if bos_token_id is not None:
        ids.append(bos_token_id)
        labels.append(IGNORE_INDEX)
    pos = 0
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            pos += len(IMAGE_PLACEHOLDER)
        if chunk:
            enc = tokenizer.encode(chunk, add_special_tokens=False)
            for tid, (start, _end) in zip(enc.ids, enc.offsets):
                at = pos + start
                supervised = any(s <= at < e for s, e in spans)
                ids.append(tid)
                labels.append(tid if supervised else IGNORE_INDEX)
        pos += len(chunk)
    return Example(ids, labels)


def encode_conversation(turns: Sequence[tuple[str, str]], tokenizer: Any, bos_token_id: int | None,
                        template_name: str = "vicuna_v1", system: str | None = None) -> Example:
    """Stage-2 example: the rendered conversation; loss on each answer and its ``</s>``."""
    text, spans = build_conversation(turns, template_name, system)
    n_img = text.count(IMAGE_PLACEHOLDER)
    if n_img != 1:
        raise DataError(f"a training conversation needs exactly one '{IMAGE_PLACEHOLDER}' placeholder, found "
                        f"{n_img} in {text[:120]!r}; put '{IMAGE_PLACEHOLDER}\\n' before the first question")
    return _encode_with_spans(text, spans, tokenizer, bos_token_id)


def encode_plain(caption: str, tokenizer: Any, bos_token_id: int | None) -> Example:
    """Stage-1 example: ``<image>`` + caption + ``"\\n"``; loss on the caption and its ``"\\n"``."""
    if IMAGE_PLACEHOLDER in caption:
        caption = caption.replace(IMAGE_PLACEHOLDER, "").strip()
    text = IMAGE_PLACEHOLDER + caption + "\n"
    return _encode_with_spans(text, [(len(IMAGE_PLACEHOLDER), len(text))], tokenizer, bos_token_id)


def record_caption(record: Any) -> str:
    """The stage-1 target of a record: its caption, else its first answer."""
    cap = getattr(record, "caption", None)
    return cap if cap else record.turns[0][1]


def encode_record(record: Any, tokenizer: Any, bos_token_id: int | None, template: str = "vicuna_v1",
                  max_length: int | None = None) -> Example:
    """One ``llava_data.LlavaRecord`` (or anything with ``turns`` / ``caption``) -> ``Example``."""
    if template == PLAIN:
        ex = encode_plain(record_caption(record), tokenizer, bos_token_id)
    elif template in TEMPLATE_NAMES:
        ex = encode_conversation(record.turns, tokenizer, bos_token_id, template)
    else:
        raise ConfigError(f"training template '{template}' unknown; known: {', '.join(TEMPLATE_NAMES)}")
    if max_length is not None and len(ex.input_ids) > max_length:
        cut = max_length
        if IMAGE_TOKEN_INDEX not in ex.input_ids[:cut]:
            raise DataError(f"record '{getattr(record, 'id', '?')}': the image placeholder is beyond the "
                            f"{max_length}-token text budget; shorten the system prompt / question")
        ex = Example(ex.input_ids[:cut], ex.labels[:cut])
    return ex


# ---- images -----------------------------------------------------------------------------------------------------
def image_canvas(image: Any, cfg: PreprocessConfig) -> np.ndarray:
    """``preprocess`` up to (not including) the float conversion: ``[S, S, 3]`` uint8."""
    img = load_image(image)
    if cfg.aspect_ratio == "pad":
        img = expand2square(img, cfg.pad_color)
    img = _resize_shortest(img, cfg.image_size, cfg.resample)
    return np.array(_center_crop(np.asarray(img), cfg.image_size), dtype=np.uint8, order="C")   # [S, S, 3]


class Normalizer:
    """uint8 canvases ``[B, S, S, 3]`` -> pixel values ``[B, 3, S, S]`` float32, the same arithmetic as
    ``preprocess`` (multiply by float32(1/255), subtract the mean, divide by the std, all in float32)."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.scale = torch.tensor(np.float32(cfg.rescale_factor))
        self.mean = torch.tensor(np.asarray(cfg.mean, np.float32))
        self.std = torch.tensor(np.asarray(cfg.std, np.float32))

        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, canvases: torch.Tensor) -> torch.Tensor:
        """On the canvases' device (the training loop normalizes on the GPU)."""
        dev = canvases.device
        if dev not in self._on:
            self._on[dev] = tuple(t.to(dev) for t in (self.scale, self.mean, self.std))
        scale, mean, std = self._on[dev]
        x = canvases.to(torch.float32) * scale                              # [B, S, S, 3]
        x = (x - mean) / std
        return x.permute(0, 3, 1, 2).contiguous()                           # [B, 3, S, S]


class ImageCache:
    """Every distinct image of a record list, decoded and resized once: ``canvases [N, S, S, 3]`` uint8.

    ``workers`` threads decode and resize (default: the usable cores, at most 8; Pillow releases the GIL while it
    decodes and resamples); each canvas depends on its file only, so the cache does not depend on ``workers``."""

    def __init__(self, paths: Sequence[str | Path], cfg: PreprocessConfig, progress: bool = False,
                 workers: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        from edgevlm.train.synthetic import usable_cores

        self.cfg = cfg
        self.index: dict[str, int] = {}
        unique: list[str] = []
        for p in paths:
            key = str(p)
            if key not in self.index:
                self.index[key] = len(unique)
                unique.append(key)
        s = cfg.image_size
        # Rows are copied by numpy: torch's intra-op thread pool made each ~300 KB row copy slow on a busy machine.
        canvases = np.empty((len(unique), s, s, 3), dtype=np.uint8)

        def load(i: int) -> None:
            try:
                canvases[i] = image_canvas(unique[i], cfg)
            except ImageError as exc:
                raise DataError(f"training image unusable: {exc}") from exc

        workers = min(8, usable_cores()) if workers is None else max(1, workers)
        with tqdm(total=len(unique), desc="preprocessing images", unit="img", disable=not progress,
                  leave=False) as bar:
            if workers == 1 or len(unique) < 64:
                for i in range(len(unique)):
                    load(i)
                    bar.update(1)
            else:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images") as pool:
                    for _ in pool.map(load, range(len(unique))):      # the first error is raised here
                        bar.update(1)
        self.canvases = torch.from_numpy(canvases)                          # [N, S, S, 3] uint8, shared memory
        self.normalize = Normalizer(cfg)

    def __len__(self) -> int:
        return self.canvases.shape[0]

    def pixel_values(self, rows: Sequence[int]) -> torch.Tensor:
        return self.normalize(self.canvases[list(rows)])                    # [B, 3, S, S]


# ---- dataset ----------------------------------------------------------------------------------------------------
class VLMDataset(Dataset):
    """Tokenized examples + an image cache. ``ds[i]`` is a dict; ``ds.collate(indices)`` builds a padded batch."""

    def __init__(self, records: Sequence[Any], tokenizer: Any, preprocess_cfg: PreprocessConfig,
                 template: str = "vicuna_v1", bos_token_id: int | None = 1, pad_token_id: int = 0,
                 max_length: int | None = None, images: ImageCache | None = None, progress: bool = False) -> None:
        if not records:
            raise DataError("the dataset is empty; nothing to train on")
        self.records = list(records)
        self.template = template
        self.pad_token_id = pad_token_id
        self.examples = [encode_record(r, tokenizer, bos_token_id, template, max_length) for r in self.records]
        self.images = images or ImageCache([r.image_path for r in self.records], preprocess_cfg, progress)
        self.image_rows = [self.images.index[str(r.image_path)] for r in self.records]
        n_sup = [e.num_supervised for e in self.examples]
        if not any(n_sup):
            raise DataError(f"no example has a supervised token with the '{template}' template (empty answers?)")
        self.stats = {"examples": len(self.examples), "images": len(self.images),
                      "mean_text_tokens": float(np.mean([len(e.input_ids) for e in self.examples])),
                      "max_text_tokens": max(len(e.input_ids) for e in self.examples),
                      "mean_supervised_tokens": float(np.mean(n_sup))}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.examples[i]
        return {"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels),
                "pixel_values": self.images.pixel_values([self.image_rows[i]])[0]}

    @property
    def lengths(self) -> list[int]:
        """Text tokens per example (the image placeholder counted once)."""
        return [len(e.input_ids) for e in self.examples]

    def collate(self, indices: Iterable[int], pad_to: int | None = None,
                raw_pixels: bool = False) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids``/``labels``/``attention_mask`` ``[B, T]`` (``T`` = the longest row, or
        ``pad_to`` when larger), ``pixel_values [B,3,S,S]`` float32, or with ``raw_pixels`` the uint8 ``canvases
        [B,S,S,3]`` (to normalize on the training device)."""
        idx = list(indices)
        exs = [self.examples[i] for i in idx]
        t = max(max(len(e.input_ids) for e in exs), pad_to or 0)
        ids = torch.full((len(exs), t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(exs), t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(exs), t), dtype=torch.long)
        for row, e in enumerate(exs):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        rows = [self.image_rows[i] for i in idx]
        pixels = {"canvases": self.images.canvases[rows]} if raw_pixels else \
            {"pixel_values": self.images.pixel_values(rows)}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, **pixels}


__all__ = ["Example", "VLMDataset", "ImageCache", "Normalizer", "encode_conversation", "encode_plain",
           "encode_record", "image_canvas", "record_caption", "PLAIN", "TEMPLATE_NAMES"]
