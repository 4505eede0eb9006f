"""Sharded data parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``), for models whose gradients and
AdamW states do not fit one GPU under DDP.

Selected by ``shard = "fsdp"`` in the recipe (``--shard fsdp``) under torchrun; the default, ``"ddp"``, replicates
the model (``distributed.wrap``). With FSDP every rank holds ``1 / world`` of each parameter, gradient and AdamW
state; a layer's full parameters exist only while it runs (all-gathered before its forward and backward, gradients
reduce-scattered after its backward). FSDP units: every LLaMA decoder layer, every CLIP encoder layer, then the
root module (embeddings, LM head, projector, norms, the tower heads of the ``tower`` stage).

One stage, in ``recipe._run_stage``::

    sharded = shard_copy(module, info, bf16=...)   # meta-device copy of the stage's loss module -> fully_shard ->
                                                    # local shards allocated -> rank 0's weights broadcast
    ... forward / backward / AdamW on ``sharded`` (gradient accumulation: ``no_sync``) ...
    gather_into(sharded, module, info)             # full state dict on rank 0 (CPU): the plain module gets it

``module`` (the plain, unsharded model) stays on the CPU of every rank and is never wrapped, so LoRA merging,
checkpoint saving (the MobileVLM HF format, on rank 0) and the next stage work as without FSDP. Only rank 0's copy is
current after a stage; the next stage broadcasts it again. On CUDA with bf16, parameters are all-gathered and
computed in bf16 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) while the sharded master
weights, gradients and AdamW states stay fp32; elsewhere everything stays fp32 (autocast as without FSDP).

On CPUs the process group is gloo (torch 2.13's FSDP2 runs on it: ``tests/test_fsdp.py``); on GPUs nccl.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

import torch
from torch import nn

from edgevlm.errors import ConfigError
from edgevlm.train import distributed as ddp

log = logging.getLogger(__name__)

SHARD_MODES = ("ddp", "fsdp")
#: Classes that become FSDP units of their own (by class name: transformers' LLaMA and CLIP layers).
UNIT_CLASSES = ("LlamaDecoderLayer", "CLIPEncoderLayer")


def check_mode(mode: str) -> None:
    if mode not in SHARD_MODES:
        raise ConfigError(f"shard = '{mode}'; choose one of {', '.join(SHARD_MODES)} (fsdp: FSDP2 under torchrun)")


def units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own, in module order."""
    return [m for m in module.modules() if type(m).__name__ in UNIT_CLASSES]


def meta_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters live on the meta device (no memory); buffers and other
    tensors are copied. ``requires_grad`` is kept."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def shard_copy(module: nn.Module, info: ddp.DistInfo, bf16: bool = False) -> nn.Module:
    """An FSDP2-sharded copy of ``module`` on ``info.device`` holding rank 0's weights (collective: every rank
    calls it). ``module`` itself is left untouched."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not info.enabled:
        raise ConfigError("shard = 'fsdp' needs several processes; launch with torchrun --nproc-per-node N")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 and info.device.type == "cuda" else MixedPrecisionPolicy()
    full = module.state_dict() if info.is_main else {}           # references to rank 0's tensors, no copies
    sharded = meta_copy(module)
    unit_list = units(sharded)
    for unit in unit_list:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=info.device)                          # allocates this rank's shards only
    with torch.no_grad():
        bufs = dict(module.named_buffers())                       # persistent or not: none is sharded
        for name, buf in sharded.named_buffers():
            buf.copy_(bufs[name])
    set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    n_units = len(unit_list)
    if info.is_main:
        log.info("FSDP2: %d units + root over %d ranks (%s)%s", n_units, info.world_size, info.device.type,
                 ", bf16 parameters / fp32 reduction" if mp.param_dtype is not None else "")
    return sharded


def gather_into(sharded: nn.Module, module: nn.Module, info: ddp.DistInfo) -> None:
    """Full state dict of ``sharded`` gathered on rank 0's CPU and loaded into ``module`` there (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        module.load_state_dict(full, strict=True)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, info: ddp.DistInfo, last: bool) -> Iterator[None]:
    """Gradient accumulation: skip the gradient reduction unless this is the ``last`` micro-batch of the step
    (DDP: ``no_sync``; FSDP2: ``set_requires_gradient_sync``)."""
    if last or not info.enabled:
        yield
    elif is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """The root's parameters all-gathered outside a forward (e.g. for the tower heads' accuracy); the units gather
    theirs as they run. A no-op for an unsharded module."""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def local_float(t: torch.Tensor) -> float:
    """A scalar as a float, gathering it first when it is a DTensor (``clip_grad_norm_`` over sharded grads)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


__all__ = ["SHARD_MODES", "UNIT_CLASSES", "check_mode", "units", "meta_copy", "shard_copy", "gather_into",
           "is_sharded", "no_sync", "unsharded", "local_float"]
