"""Model FLOPs of a training step, the bf16 peak of known GPUs, and model-FLOPs utilisation (MFU).

``6 * N_trainable`` per token is the wrong count here: most of a MobileVLM stage is frozen (the vision tower always
runs, forward only; stage 1 trains only the projector but back-propagates through the whole LLM to reach it).
Every part is counted by what it computes:

* forward: ``2 * N_matmul`` FLOPs per token through every part (vision tower per image, projector per image, the
  LLM per token), plus attention;
* backward: ``2 * N_matmul`` per token for the *activation* gradients of every part a gradient has to cross (a part
  that trains or lies downstream of one that trains: vision -> projector -> LLM; none for an input that needs no
  gradient: the pixels, the projector's input when the tower is frozen), plus ``2 * N_matmul`` per token for the
  *weight* gradients of each part that trains (LoRA: only the adapters). Attention's backward is twice its forward
  wherever activation gradients flow.

Per part (``L`` layers, width ``d``, kv width ``k``, MLP width ``f``, vocabulary ``v``; CLIP: width ``c``, MLP ``i``,
patch ``p``, ``n = patches + 1`` tokens, ``U`` used layers):

=============  ===========================================================  ==============================
part           forward FLOPs                                                counted per
=============  ===========================================================  ==============================
vision tower   ``2 * 3p^2c * patches + U * (2n * (4c^2 + 2ci) + 4n^2 * c)``   image
projector      ``2 * (cd + d^2) * patches`` (the MLP, on every patch) + ``2 *  image
               N_rest * tokens`` (LDP's blocks: on the pooled tokens; LDP
               v1's first block on the patches)
LLM layers     ``2 * L * (2d^2 + 2dk + 3df)`` per token + ``4 * L * d`` per     token / (query, key) pair
               attended (query, key) pair
LM head        ``2 * d * v``, only at supervised positions (the loss module    supervised token
               computes no other logits)
LoRA adapters  ``2 * sum_r r * (in + out)`` per token                          token
tower heads    ``2 * V * d * answers`` (the ``tower`` stage's classifiers)      image
=============  ===========================================================  ==============================

Conventions: tokens are the *real* tokens (text + visual; padding is waste, not model work); attention counts the
whole ``query x key`` rectangle of each row (PaLM's convention, no causal discount); with the shared-prefix forward
(``recipe.LossModule``) the prefix is counted once per micro-batch, because it is computed once (and has no backward
when the LLM is frozen: it is text before the image). Embedding look-ups,
norms, activations and the optimizer are not counted (they are memory-bound and small).

MFU = model FLOPs per second / (GPUs x the GPU's dense bf16 peak), always against the bf16 peak (the recipe trains
with bf16 autocast on GPUs). The peak comes from ``GPU_BF16_PEAK_TFLOPS`` by device name, or ``peak_tflops`` in the
recipe; ``None`` (no MFU) on CPUs, Jetsons and unknown GPUs.

    >>> fm = FlopModel.for_stage(model_cfg, ("projector", "llm"))
    >>> fm.step_flops(row_tokens=[340] * 16, supervised=800, images=16)      # forward + backward of one step
    >>> peak_tflops("NVIDIA H200")
    (989.0, 'NVIDIA H200: 989 TFLOPS dense bf16 (table)')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from edgevlm.config import ModelConfig

#: Dense bf16 tensor-core peak with fp32 accumulation (TFLOPS), by a pattern of ``torch.cuda.get_device_name``.
#: Checked against NVIDIA's datasheets (the numbers *without* structured sparsity). First match wins.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"GH200|H200", 989.0),
    (r"H100", 989.0),                       # SXM5 (the name says "HBM3")
    (r"A100", 312.0),
    (r"RTX 4090", 165.2),                   # Ada: 330 with fp16 accumulation, 165 with fp32 (what torch uses)
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
)


def peak_tflops(device_name: str | None, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOPS or None, where the number comes from)."""
    if override is not None:
        return float(override), f"{override:g} TFLOPS (peak_tflops in the recipe)"
    if not device_name:
        return None, "no GPU: MFU is not reported on CPUs"
    for pattern, tflops in GPU_BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, f"{device_name}: {tflops:g} TFLOPS dense bf16 (table)"
    return None, f"{device_name}: bf16 peak unknown (set peak_tflops in the recipe to get MFU)"


@dataclass(frozen=True)
class FlopModel:
    """The matmul sizes of a model and what a stage trains; ``step_flops`` counts one optimizer step."""

    cfg: ModelConfig
    train_vision: bool = False
    train_projector: bool = False
    train_llm: bool = False
    lora_params: int = 0                    # adapter parameters (all layers); > 0 means LoRA on the LLM
    head_outputs: int = 0                   # tower stage: answers over all heads; 0 = the LLM objective

    @classmethod
    def for_stage(cls, cfg: ModelConfig, parts: Sequence[str], lora_params: int = 0,
                  head_outputs: int = 0) -> "FlopModel":
        return cls(cfg, "vision" in parts, "projector" in parts, "llm" in parts and not lora_params, lora_params,
                   head_outputs)

    # ---- per part ------------------------------------------------------------------------------------------
    def vision_forward(self) -> float:
        """Forward FLOPs of the tower for one image (only the layers up to the selected hidden state run)."""
        v = self.cfg.vision
        n = v.num_patches + 1
        used = v.num_layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
        c, i = v.hidden_size, v.intermediate_size
        layer = 2 * n * (4 * c * c + 2 * c * i) + 4 * n * n * c
        return 2 * 3 * v.patch_size ** 2 * c * v.num_patches + used * layer

    def projector_forward(self) -> float:
        """Forward FLOPs of the projector for one image: its MLP (``c -> d -> d``) runs on every patch; LDP's
        blocks run on the pooled tokens (LDP v1: the first block before the stride-2 one, on the patches)."""
        cfg = self.cfg
        c, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        patches, pooled = cfg.vision.num_patches, cfg.visual_tokens
        mlp = c * d + d * d
        rest = cfg.projector_params() - mlp
        tokens = {"ldpnet": (patches + pooled) / 2, "ldpnetv2": pooled}.get(cfg.projector_type, patches)
        return 2.0 * (mlp * patches + rest * tokens)

    def _first_projector_layer(self) -> float:
        """The projector's first matmul (``c -> d`` per patch): its input gradient exists only for a trained tower."""
        return 2.0 * self.cfg.vision.hidden_size * self.cfg.llm.hidden_size * self.cfg.vision.num_patches

    def _patch_embedding(self) -> float:
        v = self.cfg.vision
        return 2.0 * 3 * v.patch_size ** 2 * v.hidden_size * v.num_patches

    def llm_layer_params(self) -> int:
        m = self.cfg.llm
        kv = m.num_kv_heads * m.head_dim
        return 2 * m.hidden_size ** 2 + 2 * m.hidden_size * kv + 3 * m.hidden_size * m.intermediate_size

    @property
    def _grad_reaches_projector(self) -> bool:
        return self.train_vision or self.train_projector

    @property
    def _grad_reaches_llm(self) -> bool:
        return self._grad_reaches_projector or self.train_llm or self.lora_params > 0

    # ---- a step --------------------------------------------------------------------------------------------
    def step_flops(self, row_tokens: Sequence[int], supervised: int, images: int, prefix: int = 0) -> float:
        """Forward + backward FLOPs of one micro-batch (or of a whole step: sum over its micro-batches).

        ``row_tokens``: real LLM tokens per row (text + visual); ``supervised``: tokens with a loss; ``images``:
        images encoded; ``prefix``: tokens shared by every row and computed once (0 = none)."""
        vis_f = images * self.vision_forward()
        proj_f = images * self.projector_forward()
        total = vis_f                                                          # forward
        if self.train_vision:                  # weight + activation gradients (none for the pixels)
            total += 2 * vis_f - images * self._patch_embedding()
        total += proj_f
        if self.train_projector:
            total += proj_f                                                    # weight gradients
        if self._grad_reaches_projector:                                       # activation gradients
            total += proj_f - (0 if self.train_vision else images * self._first_projector_layer())
        if self.head_outputs:                                                  # the tower stage: no LLM at all
            heads = 2.0 * images * self.cfg.visual_tokens * self.cfg.llm.hidden_size * self.head_outputs
            return total + 3 * heads
        m = self.cfg.llm
        rows = [int(t) for t in row_tokens]
        p = prefix if prefix and len(rows) > 1 else 0
        tokens = sum(rows) - (len(rows) - 1) * p                               # the prefix runs once
        pairs = p * p + sum((t - p) * t for t in rows)                         # (query, key) pairs attended
        dense = 2.0 * m.num_layers * self.llm_layer_params() * tokens
        attn = 4.0 * m.num_layers * m.hidden_size * pairs
        head = 2.0 * m.hidden_size * m.vocab_size * supervised
        lora = 2.0 * self.lora_params * tokens
        fwd = dense + attn + head + lora
        bwd = 0.0
        if self._grad_reaches_llm:                                             # activation gradients
            # The shared prefix is text before the image: with the LLM frozen nothing in it needs a gradient.
            q = 0 if (self.train_llm or self.lora_params) else p
            f = 1.0 - q / tokens if tokens else 0.0
            a = 1.0 - q * q / pairs if pairs else 0.0
            bwd += f * (dense + lora) + 2 * a * attn + head
        if self.train_llm:
            bwd += dense + head                                                # weight gradients
        if self.lora_params:
            bwd += lora
        return total + fwd + bwd


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved model FLOPs / (devices x peak); None without a known peak or time."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (devices * peak * 1e12)


__all__ = ["FlopModel", "GPU_BF16_PEAK_TFLOPS", "peak_tflops", "mfu"]
