"""The ``tower`` stage: supervised pre-training of a random-init vision tower (+ projector) on labelled QA.

MobileVLM never trains its vision tower: CLIP ViT-L/14-336 arrives pre-trained (contrastively, on 400M image-text
pairs) and stays frozen. A small preset built from random weights has no such tower, and teaching one through a
random LLM (end to end, the ``vision`` stage) is slow: the gradient reaches the tower only once the LLM has learned
to look at the visual tokens. This stage plays the part of CLIP's pre-training instead, on what the data offers:
*typed* question/answer pairs (``question_type`` per record, or ``question_types`` per turn for multi-turn
records; the synthetic set writes both). For every question type, a linear head reads the flattened projector
output ``[B, V * D]`` and classifies the answer among that type's answers in the training split; the loss is the
sum of the heads' cross-entropies. The heads are discarded after the stage (the checkpoint keeps MobileVLM's
format); the tower and the projector keep what they learned, and the ``instruct`` stage teaches the LLM to read
them (tower frozen, as in MobileVLM).

Untyped data (most user data) cannot drive this stage: it raises ``ConfigError`` saying so. Start such runs from a
checkpoint with a trained tower (``--init``) or use the end-to-end ``vision`` stage.

    >>> labels = AttributeLabels.from_records(records)          # types, per-type answers, [N, T] label matrix
    >>> loss_module = TowerLoss(model, labels)                  # forward(pixel_values, labels) -> summed CE
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import ConfigError
from edgevlm.prompt import IGNORE_INDEX

#: The stage template that selects this objective instead of a text template.
LABELS_TEMPLATE = "labels"


def record_typed_answers(record: Any) -> list[tuple[str, str]] | None:
    """``[(question_type, answer), ...]`` of a LLaVA record, or None when its turns are not typed."""
    answers = [a for _, a in record.turns]
    types = record.extra.get("question_types") if getattr(record, "extra", None) else None
    if types is None and record.question_type not in (None, "multi"):
        types = [record.question_type] + [None] * (len(answers) - 1)   # only the first turn is typed
    if types is None or len(types) != len(answers):
        return None
    pairs = [(str(t), a.strip().lower()) for t, a in zip(types, answers) if t is not None]
    return pairs or None


@dataclass
class AttributeLabels:
    """Per record and question type, the index of the answer among that type's answers (``IGNORE_INDEX`` = not
    asked). ``types``: question types in first-seen order; ``answers[t]``: that type's answers, sorted."""

    types: list[str]
    answers: dict[str, list[str]]
    matrix: torch.Tensor                      # [N, T] long

    @classmethod
    def from_records(cls, records: Sequence[Any], stage: str = "tower") -> "AttributeLabels":
        typed = [record_typed_answers(r) for r in records]
        missing = sum(t is None for t in typed)
        if missing:
            first = next(r for r, t in zip(records, typed) if t is None)
            raise ConfigError(
                f"stage '{stage}' pre-trains the vision tower on typed answers, but {missing} of {len(records)} "
                f"records have no question type (e.g. record '{first.id}'; records need 'question_type', or "
                f"'question_types' with one entry per turn, as the synthetic set writes). Use the end-to-end "
                f"'vision' stage, or start from a checkpoint with a trained tower (--init)")
        types: list[str] = []
        vocab: dict[str, set[str]] = {}
        for pairs in typed:
            for t, a in pairs or ():
                if t not in vocab:
                    types.append(t)
                    vocab[t] = set()
                vocab[t].add(a)
        answers = {t: sorted(vocab[t]) for t in types}
        index = {t: {a: i for i, a in enumerate(answers[t])} for t in types}
        matrix = torch.full((len(records), len(types)), IGNORE_INDEX, dtype=torch.long)
        for row, pairs in enumerate(typed):
            for t, a in pairs or ():
                matrix[row, types.index(t)] = index[t][a]
        return cls(types, answers, matrix)

    @property
    def num_labels(self) -> int:
        return int((self.matrix != IGNORE_INDEX).sum())


class AttributeHeads(nn.Module):
    """One linear classifier per question type over the flattened visual tokens ``[B, V * D]``."""

    def __init__(self, labels: AttributeLabels, visual_tokens: int, hidden: int) -> None:
        super().__init__()
        self.types = list(labels.types)
        self.heads = nn.ModuleList(nn.Linear(visual_tokens * hidden, len(labels.answers[t])) for t in self.types)

    def forward(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        flat = image_embeds.flatten(1)                                         # [B, V * D]
        return [h(flat) for h in self.heads]                                   # T x [B, answers_t]


class TowerLoss(nn.Module):
    """``(pixel_values [B, 3, S, S], labels [B, T])`` -> summed cross-entropy of the heads (the module DDP wraps).
    Owns the heads, so they train with the tower and projector and disappear with this module."""

    def __init__(self, vlm: Any, labels: AttributeLabels) -> None:
        super().__init__()
        self.vlm = vlm
        self.heads = AttributeHeads(labels, vlm.cfg.visual_tokens, vlm.cfg.llm.hidden_size)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.heads(self.vlm.encode_images(pixel_values))              # T x [B, answers_t]
        # Every head stays in the graph even when no row of this (micro-)batch asks its question type (its loss is
        # then 0 with zero gradients): DDP requires every trainable parameter to take part in every step.
        return sum(F.cross_entropy(lg.float(), labels[:, t], ignore_index=IGNORE_INDEX, reduction="sum")
                   for t, lg in enumerate(logits))

    @torch.no_grad()
    def accuracy(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per-type head accuracy on a labelled batch (a quick check of what the tower learned)."""
        logits = self.heads(self.vlm.encode_images(pixel_values))
        out = {}
        for t, (name, lg) in enumerate(zip(self.heads.types, logits)):
            y = labels[:, t]
            m = y != IGNORE_INDEX
            if bool(m.any()):
                out[name] = float((lg[m].argmax(-1) == y[m]).float().mean())
        return out


class LabelledImages:
    """The ``tower`` stage's dataset: images (from the shared ``ImageCache``) and their attribute labels."""

    def __init__(self, records: Sequence[Any], images: Any, stage: str = "tower") -> None:
        self.labels = AttributeLabels.from_records(records, stage)
        self.images = images
        self.image_rows = [images.index[str(r.image_path)] for r in records]
        self.stats = {"examples": len(records), "images": len(images), "labels": self.labels.num_labels,
                      "question_types": {t: len(a) for t, a in self.labels.answers.items()}}

    def __len__(self) -> int:
        return len(self.image_rows)

    def collate(self, indices: Sequence[int], raw_pixels: bool = False) -> dict[str, torch.Tensor]:
        """``pixel_values [B, 3, S, S]`` float32 (or with ``raw_pixels`` the uint8 ``canvases [B, S, S, 3]``) and
        ``labels [B, T]``."""
        idx = list(indices)
        rows = [self.image_rows[i] for i in idx]
        pixels = {"canvases": self.images.canvases[rows]} if raw_pixels else \
            {"pixel_values": self.images.pixel_values(rows)}
        return {**pixels, "labels": self.labels.matrix[idx]}


__all__ = ["AttributeLabels", "AttributeHeads", "TowerLoss", "LabelledImages", "LABELS_TEMPLATE",
           "record_typed_answers"]
