"""Vision-language projectors: LDP v1 (``ldpnet``), LDPv2 (``ldpnetv2``) and LLaVA-1.5's ``mlp2x_gelu``.

Module trees mirror MobileVLM's released code so that ``state_dict()`` keys equal the checkpoint's
(``model.mm_projector.`` + key). LDP v1 follows the code, not the paper's Eq. 3: each inverted-residual block is
depthwise conv -> channel LayerNorm -> Hardswish -> squeeze-excitation (Hardsigmoid gate) -> pointwise conv ->
channel LayerNorm, with the residual only on the stride-1 block. torchvision/timm are not dependencies: the few
layers they provide are re-created here with the same parameter names. Facts: reference/mobilevlm.md §2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import ModelConfig, make_divisible
from edgevlm.errors import ConfigError


class LayerNorm2d(nn.LayerNorm):
    """timm ``LayerNormAct2d(act_layer=None)``: LayerNorm over channels of an NCHW map (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, C, H, W]
        x = x.permute(0, 2, 3, 1)                                 # [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)                              # [B, C, H, W]


class SqueezeExcitation(nn.Module):
    """torchvision ``SqueezeExcitation(scale_activation=nn.Hardsigmoid)``: keys ``fc1``, ``fc2``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, C, H, W]
        s = x.mean(dim=(2, 3), keepdim=True)                      # [B, C, 1, 1]
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    """torchvision ``InvertedResidual`` with expand ratio 1 (no expand conv), kernel 3, HS activation, SE.

    ``block.0`` = [dw conv, LN, Hardswish]; ``block.1`` = SE; ``block.2`` = [pw conv, LN].
    """

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        se = make_divisible(dim // 4, 8)
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False), LayerNorm2d(dim), nn.Hardswish()),
            SqueezeExcitation(dim, se),
            nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), LayerNorm2d(dim)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, D, H, W] -> [B, D, H/s, W/s]
        y = self.block(x)
        return x + y if self.use_res_connect else y


class LDPBlock(nn.Module):
    """Keys ``mlp.{1,3}`` and ``mb_block.{1,2}`` (index 0 of both Sequentials is an Identity, as released)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, N, C]
        b, n, _ = x.shape
        h = math.isqrt(n)
        x = self.mlp(x)                                           # [B, N, D]
        x = x.permute(0, 2, 1).reshape(b, -1, h, h)               # [B, D, h, h]
        x = self.mb_block(x)                                      # [B, D, ceil(h/2), ceil(h/2)]
        return x.flatten(2).permute(0, 2, 1)                      # [B, N', D]


class LDPNetProjector(nn.Module):
    """MobileVLM v1 LDP: 576 -> 144 tokens. Checkpoint keys ``mm_projector.model.*``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.model = LDPBlock(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    """Average-pool the token grid to ``side x side`` (== 2x2 / stride 2 for 24 -> 12)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, N, D]
        b, n, d = x.shape
        h = math.isqrt(n)
        x = x.permute(0, 2, 1).reshape(b, d, h, h)                # [B, D, h, h]
        if h % self.side == 0:                                    # exact windows: plain avg_pool (TensorRT/DLA friendly)
            k = h // self.side
            x = F.avg_pool2d(x, k, k)
        else:
            x = F.adaptive_avg_pool2d(x, (self.side, self.side))
        return x.flatten(2).transpose(1, 2)                       # [B, side^2, D]


class PosInjectLayer(nn.Module):
    """PEG (Twins): depthwise 3x3 conv with bias, added back. Keys ``peg.0``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, N, D]
        b, n, d = x.shape
        h = math.isqrt(n)
        feat = x.transpose(1, 2).reshape(b, d, h, h)              # [B, D, h, h]
        x = self.peg(feat) + feat
        return x.flatten(2).transpose(1, 2)                       # [B, N, D]


class LDPNetV2Projector(nn.Module):
    """MobileVLM V2 LDPv2: MLP -> average pool -> PEG. Keys ``mlp.mlp.{0,2}``, ``peg.peg.0``."""

    def __init__(self, in_dim: int, out_dim: int, out_tokens: int) -> None:
        super().__init__()
        self.mlp = FeatureIRLayer(in_dim, out_dim)
        self.dwn = TokenDownLayer(math.isqrt(out_tokens))
        self.peg = PosInjectLayer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, N, C]
        return self.peg(self.dwn(self.mlp(x)))                    # [B, N', D]


def build_projector(cfg: ModelConfig) -> nn.Module:
    c, d = cfg.vision.hidden_size, cfg.llm.hidden_size
    if cfg.projector_type == "ldpnet":
        return LDPNetProjector(c, d)
    if cfg.projector_type == "ldpnetv2":
        return LDPNetV2Projector(c, d, cfg.visual_tokens)
    if cfg.projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
    raise ConfigError(f"unknown projector type '{cfg.projector_type}'; known: ldpnet, ldpnetv2, mlp2x_gelu")
