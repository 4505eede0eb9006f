"""Distributed data parallel (DDP) helpers for ``edgevlm train``.

Launch with torchrun; the environment it sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) is all the recipe needs::

    torchrun --standalone --nproc-per-node 2 -m edgevlm train --config configs/train/demo.toml
    torchrun --standalone --nproc-per-node 2 $(which edgevlm) train --config configs/train/demo.toml

The process group uses ``gloo`` on CPU and ``nccl`` on CUDA (one GPU per local rank). Every rank reads the data and
builds the model with the same seed; the global batch is split evenly (per-rank micro-batch = global batch /
(world size x gradient accumulation)); ``DistributedDataParallel`` averages gradients; only rank 0 writes files,
logs and shows a progress bar. Without ``WORLD_SIZE`` > 1 every helper here is a no-op, so the same code path runs
single-process. ``--shard fsdp`` shards parameters, gradients and optimizer states instead of replicating them
(FSDP2, ``sharding.py``); the process group and the batches are the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from edgevlm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "local_world_size": self.local_world_size,
                "backend": self.backend, "device": str(self.device)}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read the torchrun environment; initialise the process group when ``WORLD_SIZE`` > 1.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)
    if world <= 1:
        return info
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1}; launch with torchrun")
    backend = "nccl" if use_cuda else "gloo"
    info.backend = backend
    if dist.is_initialized():
        return info
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch with "
                              f"`torchrun --standalone --nproc-per-node {world} -m edgevlm train ...`")
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": dev} if use_cuda else {}))
    info.initialized_here = True
    log.info("DDP: rank %d/%d, backend %s, device %s", rank, world, backend, dev)
    return info


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        info.initialized_here = False


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (in place; returns it). A no-op single-process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; e.g. the trained tokenizer's JSON)."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.backend == "nccl" else None)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. to stop all ranks after one fails)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    return bool(all_reduce_sum(t, info).item() > 0)


def wrap(module: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` over the trainable parameters of ``module`` (frozen ones are not registered)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters, broadcast_buffers=False,
               gradient_as_bucket_view=True)    # .grad views into the all-reduce buckets: no second gradient copy


def default_threads(info: DistInfo) -> int:
    """Intra-op threads per process: the usable cores divided among the local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, info.local_world_size))


__all__ = ["DistInfo", "setup", "cleanup", "barrier", "all_reduce_sum", "broadcast_object", "any_rank", "wrap",
           "default_threads"]
