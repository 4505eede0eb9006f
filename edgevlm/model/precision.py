"""Running a model held in fp16 / bf16 as if it were float32, one module's weights at a time.

A released MobileVLM checkpoint is stored in fp16; holding it as float32 doubles its memory (mobilevlm-1.7b: 3.4 ->
6.8 GB; mobilevlm-v2-7b: 14 -> 28 GB, more than a 24 GiB workstation has). The exporter keeps the language model
in its stored dtype: the ONNX Runtime decoder builder casts each weight to float32 as it writes it, and the PyTorch
parity reference runs under ``float32_forward``: every module with weights gets them as float32 just before its
forward; the stored tensor is put back just after, so the reference computes exactly what a float32 model
with those weights computes while only one module's float32 copy exists at a time.

    >>> with float32_forward(vlm.llm):
    ...     logits = vlm.llm(inputs_embeds=emb.float()).logits      # float32 math, fp16 storage
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["float32_forward", "stored_dtype", "is_reduced_precision"]


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point parameters (the first one; float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_reduced_precision(module: nn.Module) -> bool:
    return stored_dtype(module) in (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def float32_forward(module: nn.Module) -> Iterator[nn.Module]:
    """Forward hooks that give each submodule float32 weights for the duration of its own forward (see the module
    docstring). A no-op for a float32 module. The hooks are removed and every weight is back in its stored dtype on
    exit, also after an exception."""
    owners = [m for m in module.modules()
              if any(p.is_floating_point() and p.dtype != torch.float32 for p in m.parameters(recurse=False))]
    if not owners:
        yield module
        return
    stored: dict[int, dict[str, torch.Tensor]] = {}

    def up(m: nn.Module, *_args) -> None:
        keep = stored.setdefault(id(m), {})
        for name, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                keep[name] = p.data                           # the stored tensor itself: restored, not re-cast
                p.data = p.data.to(torch.float32)

    def down(m: nn.Module, *_args) -> None:
        for name, original in stored.pop(id(m), {}).items():
            getattr(m, name).data = original

    handles = []
    try:
        for m in owners:
            handles.append(m.register_forward_pre_hook(up))
            handles.append(m.register_forward_hook(down))
        yield module
    finally:
        for h in handles:
            h.remove()
        for m in owners:                                      # an exception between pre and post hook
            down(m)
