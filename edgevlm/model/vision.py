"""CLIP vision tower with MobileVLM's feature selection (``hidden_states[select_layer]`` without CLS).

Built on ``transformers.CLIPVisionModel``. Only the layers the selected hidden state needs are run (23 of 24 for
``select_layer=-2``), which is exactly ``CLIPVisionModel(..., output_hidden_states=True).hidden_states[-2]``
without computing the unused last layer; the unused layer's weights stay in the module so checkpoints round-trip.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from edgevlm.config import VisionConfig


def clip_config(v: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                            patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
                            num_channels=3, attn_implementation="sdpa")


class VisionTower(nn.Module):
    """``pixel_values [B, 3, S, S]`` -> patch features ``[B, (S/p)^2, C]``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = CLIPVisionModel(clip_config(cfg))
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k.
        self.num_used_layers = cfg.num_layers + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.clip.vision_model if hasattr(self.clip, "vision_model") else self.clip
        x = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))   # [B, 1+N, C]
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[: self.num_used_layers]:
            x = layer(x, None)
        return x[:, 1:]                                                                    # [B, N, C]
