"""Training batches: global batches grouped by length, padded lengths rounded to a few buckets, and the DataLoader
that collates them off the training thread.

**Global batches.** Every epoch is a permutation of the examples seeded with ``seed + epoch`` (the same on every
rank). It is cut into *global* batches of ``batch`` examples (the last partial one dropped). With
``group_by_length = G > 0`` the permutation is first cut into runs of ``G`` global batches, each run is sorted by
length and re-cut, and the batches of the epoch are shuffled again (seeded): a batch then holds examples of similar
length (little padding) while the order of batches stays random. A global batch is a set of examples that depends
only on the seed, the epoch, ``batch``, ``G`` and the lengths, never on the world size or gradient accumulation, so
``recipe``'s loss normalisation (the summed token cross-entropy over the global batch divided by its supervised
tokens) still gives the update of one big batch.

**Micro-batches.** A global batch is sorted by length and cut into ``world x accum`` micro-batches of
``batch / (world x accum)``; rank ``r`` takes micro-batches ``k * world + r`` for accumulation steps ``k``.

**Buckets.** A micro-batch is right-padded to a bucketed length: the smallest ``T >= max length`` such that the
LLM sequence after the image splice (``T + visual_tokens - 1``) is a multiple of ``pad_multiple``. The number of
distinct tensor shapes (each costs a warm-up on a GPU: kernel selection, allocator growth) is then about
``(longest - shortest) / pad_multiple + 1``.

**Loading.** ``make_loader`` returns a ``torch.utils.data.DataLoader`` over ``BatchView`` (one item = one collated
micro-batch) with ``workers`` processes (0 = in the training process), ``pin_memory`` on CUDA and pixels left as
``uint8`` canvases; ``to_device`` copies a batch with ``non_blocking=True`` and normalizes the pixels on the device
(a quarter of the bytes of float32 pixel values cross the bus).

    >>> sampler = GlobalBatches(len(ds), batch=64, world=1, rank=0, accum=2, seed=0, lengths=ds.lengths)
    >>> loader = make_loader(ds, sampler, workers=2, pin_memory=True, pad_multiple=64, extra=visual_tokens - 1)
    >>> mb = to_device(next(iter(loader)), torch.device("cuda"), ds.images.normalize)
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from edgevlm.errors import ConfigError


def pad_length(n: int, multiple: int, extra: int = 0) -> int:
    """The smallest ``T >= n`` with ``(T + extra) % multiple == 0`` (``multiple`` <= 1: ``n``)."""
    if multiple <= 1:
        return n
    return n + (-(n + extra)) % multiple


class GlobalBatches(Sampler):
    """Endless iterator of this rank's micro-batches (lists of example indices), ``accum`` per optimizer step."""

    def __init__(self, n: int, batch: int, world: int = 1, rank: int = 0, accum: int = 1, seed: int = 0,
                 lengths: Sequence[int] | None = None, group_by_length: int = 0) -> None:
        if batch % (world * accum):
            raise ConfigError(f"batch_size {batch} is not divisible by world size {world} x grad_accum {accum}; "
                              f"choose a multiple of {world * accum}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.batch, self.world, self.rank, self.accum = n, batch, world, rank, accum
        self.micro = batch // (world * accum)
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.group = group_by_length if lengths is not None else 0
        self.per_epoch = n // batch                    # optimizer steps per epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (identical on every rank)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()[: self.per_epoch * self.batch]
        if self.group > 0:
            assert self.lengths is not None
            lens = self.lengths
            run = self.group * self.batch
            regrouped: list[int] = []
            for s in range(0, len(perm), run):
                regrouped += sorted(perm[s:s + run], key=lambda i: lens[i])   # stable: ties keep their order
            batches = [regrouped[b * self.batch:(b + 1) * self.batch] for b in range(self.per_epoch)]
            order = torch.randperm(len(batches), generator=g).tolist()
            return [batches[i] for i in order]
        return [perm[b * self.batch:(b + 1) * self.batch] for b in range(self.per_epoch)]

    def micro_batches(self, global_batch: Sequence[int]) -> list[list[int]]:
        """This rank's ``accum`` micro-batches of a global batch (sorted by length when lengths are known)."""
        rows = sorted(global_batch, key=lambda i: self.lengths[i]) if self.lengths is not None \
            else list(global_batch)
        m = self.micro
        chunks = [rows[c * m:(c + 1) * m] for c in range(self.world * self.accum)]
        return [chunks[k * self.world + self.rank] for k in range(self.accum)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            for gb in self.global_batches(epoch):
                yield from self.micro_batches(gb)
            epoch += 1


class BatchView(Dataset):
    """``view[indices]`` = ``dataset.collate(indices, ...)``: a DataLoader item is a whole micro-batch, collated
    in a worker process. Text batches are padded to ``pad_length(max length, pad_multiple, extra)`` and carry
    their pixels as ``uint8`` canvases (``raw_pixels``)."""

    def __init__(self, dataset: Any, pad_multiple: int = 1, extra: int = 0, raw_pixels: bool = True) -> None:
        self.dataset = dataset
        self.pad_multiple, self.extra, self.raw_pixels = pad_multiple, extra, raw_pixels
        self.lengths = getattr(dataset, "lengths", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = list(indices)
        kw: dict[str, Any] = {"raw_pixels": self.raw_pixels}
        if self.lengths is not None:
            kw["pad_to"] = pad_length(max(self.lengths[i] for i in idx), self.pad_multiple, self.extra)
        return self.dataset.collate(idx, **kw)


def make_loader(dataset: Any, sampler: GlobalBatches, workers: int = 0, pin_memory: bool = False,
                pad_multiple: int = 1, extra: int = 0, prefetch: int = 4) -> DataLoader:
    """A DataLoader yielding this rank's collated micro-batches forever (see ``GlobalBatches``)."""
    return DataLoader(BatchView(dataset, pad_multiple, extra), sampler=sampler, batch_size=None,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=prefetch if workers > 0 else None)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, normalize: Any | None = None
              ) -> dict[str, torch.Tensor]:
    """Copy a collated batch to ``device`` (asynchronously from pinned memory); ``canvases`` (uint8
    ``[B, S, S, 3]``) become ``pixel_values`` (``[B, 3, S, S]`` float32) through ``normalize`` on the device."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "canvases" in out:
        if normalize is None:
            raise ValueError("a batch of uint8 canvases needs the image normalizer")
        out["pixel_values"] = normalize(out.pop("canvases"))
    return out


def batch_counts(batch: dict[str, torch.Tensor], visual_tokens: int, ignore_index: int) -> dict[str, Any]:
    """Host-side counts of a collated text batch (no device sync): real LLM tokens per row after the splice
    (text + visual), supervised tokens, images and the padded shape."""
    if "attention_mask" not in batch:                                   # the tower stage: images only
        n = int(batch["labels"].shape[0])
        return {"rows": [], "supervised": int((batch["labels"] != ignore_index).sum()), "images": n,
                "shape": (n,)}
    text = batch["attention_mask"].sum(dim=1).tolist()
    return {"rows": [t + visual_tokens - 1 for t in text],
            "supervised": int((batch["labels"] != ignore_index).sum()), "images": int(batch["input_ids"].shape[0]),
            "shape": tuple(batch["input_ids"].shape)}


__all__ = ["pad_length", "GlobalBatches", "BatchView", "make_loader", "to_device", "batch_counts"]
