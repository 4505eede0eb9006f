"""Model registry: the exact configurations of the MobileVLM family plus small presets.

Pure Python (no torch): the runtime, the planner and ``edgevlm models`` read it on a device.

    >>> from edgevlm.config import get_model_config
    >>> cfg = get_model_config("mobilevlm-1.7b")
    >>> cfg.visual_tokens, cfg.llm.hidden_size
    (144, 2048)

Names are looked up exactly; an unknown name raises ``ConfigError`` listing the valid ones.
Facts: ../shared/reference/mobilevlm.md §1-§2 (configs, projector layers and weight keys).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgevlm.errors import ConfigError

PROJECTOR_TYPES = ("ldpnet", "ldpnetv2", "mlp2x_gelu")

# CLIP preprocessing constants (openai/clip-vit-large-patch14-336 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (HF ``CLIPVisionConfig`` fields)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2            # hidden_states[-2]: output of the second-to-last encoder layer
    name: str = "openai/clip-vit-large-patch14-336"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def num_params(self) -> int:
        """Parameters of HF ``CLIPVisionModel`` (all layers, post_layernorm included)."""
        h, i, p = self.hidden_size, self.intermediate_size, self.patch_size
        emb = h + h * 3 * p * p + (self.num_patches + 1) * h
        layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)
        return emb + 2 * h + self.num_layers * layer + 2 * h


@dataclass(frozen=True)
class LLMConfig:
    """LLaMA decoder (HF ``LlamaConfig`` fields)."""

    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    intermediate_size: int = 5632
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + head


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible`` (used for the LDP squeeze-excitation width)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class ModelConfig:
    """A whole vision-language model: vision tower + projector + decoder + prompt/preprocessing facts."""

    name: str
    vision: VisionConfig
    llm: LLMConfig
    projector_type: str = "ldpnet"
    # ldpnetv2 only: tokens after the average pool (a square <= grid^2); None = (grid/2)^2 as released.
    projector_tokens: int | None = None
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_aspect_ratio: str = "pad"
    conv_template: str = "vicuna_v1"
    description: str = ""
    hf_repo: str = ""                 # where the released checkpoint lives (for the user to download)
    tokenizer: str = "llama"          # "llama" (SentencePiece from the checkpoint) or "trained" (small presets)

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(f"unknown projector type '{self.projector_type}'; known: {', '.join(PROJECTOR_TYPES)}")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(f"{self.name}: image_size {self.vision.image_size} is not a multiple of "
                              f"patch_size {self.vision.patch_size}")
        if self.projector_tokens is not None:
            if self.projector_type != "ldpnetv2":
                raise ConfigError(f"{self.name}: projector_tokens (a pooled token budget) applies to ldpnetv2 only, "
                                  f"not '{self.projector_type}'")
            side = math.isqrt(self.projector_tokens)
            if side * side != self.projector_tokens or not 1 <= side <= self.vision.grid:
                raise ConfigError(f"{self.name}: projector_tokens {self.projector_tokens} must be a square number "
                                  f"between 1 and {self.vision.num_patches}")

    # ---- derived facts ---------------------------------------------------------------------------------------
    @property
    def visual_tokens(self) -> int:
        g = self.vision.grid
        if self.projector_type == "mlp2x_gelu":
            return g * g
        if self.projector_type == "ldpnet":
            return ((g + 1) // 2) ** 2                 # depthwise 3x3, stride 2, padding 1
        return self.projector_tokens or (g // 2) ** 2

    @property
    def context_length(self) -> int:
        return self.llm.max_position_embeddings

    @property
    def se_channels(self) -> int:
        return make_divisible(self.llm.hidden_size // 4, 8)

    def projector_params(self) -> int:
        c, d = self.vision.hidden_size, self.llm.hidden_size
        mlp = c * d + d + d * d + d
        if self.projector_type == "mlp2x_gelu":
            return mlp
        if self.projector_type == "ldpnetv2":
            return mlp + d * 9 + d
        s = self.se_channels
        block = d * 9 + 2 * d + (s * d + s) + (d * s + d) + d * d + 2 * d
        return mlp + 2 * block

    def num_params(self) -> dict[str, int]:
        parts = {"vision": self.vision.num_params(), "projector": self.projector_params(),
                 "llm": self.llm.num_params()}
        parts["total"] = sum(parts.values())
        return parts

    def with_visual_tokens(self, tokens: int) -> "ModelConfig":
        """The same model with a pooled ldpnetv2 budget (for token-budget sweeps)."""
        if tokens == self.visual_tokens:
            return self
        if self.projector_type != "ldpnetv2":
            raise ConfigError(f"{self.name}: a {tokens}-token budget needs the ldpnetv2 projector (pooling); "
                              f"'{self.projector_type}' always yields {self.visual_tokens} tokens")
        return replace(self, name=f"{self.name}@{tokens}tok", projector_tokens=tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["visual_tokens"] = self.visual_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("visual_tokens", None)
        vision = VisionConfig(**d.pop("vision"))
        llm = LLMConfig(**d.pop("llm"))
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(vision=vision, llm=llm, **d)


# ---- the registry -----------------------------------------------------------------------------------------------
CLIP_L14_336 = VisionConfig()
MOBILELLAMA_1_4B = LLMConfig(name="MobileLLaMA-1.4B-Chat")
MOBILELLAMA_2_7B = LLMConfig(hidden_size=2560, num_layers=32, num_heads=32, num_kv_heads=32,
                             intermediate_size=6912, name="MobileLLaMA-2.7B-Chat")
VICUNA_7B = LLMConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, name="Vicuna-7B-v1.5")

# Small presets: random-init towers for tests and the embedded demo. Their tokenizer is trained on the
# synthetic data (edgevlm.train.tokenizer), so their vocabulary is small.
TINY_VISION = VisionConfig(image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, name="tiny-clip")
TINY_LLM = LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128,
                     vocab_size=384, max_position_embeddings=256, rms_norm_eps=1e-6, name="tiny-llama")
DEMO_VISION = VisionConfig(image_size=112, patch_size=14, hidden_size=128, num_layers=4, num_heads=4,
                           intermediate_size=256, name="demo-clip")
DEMO_LLM = LLMConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=704,
                     vocab_size=512, max_position_embeddings=512, name="demo-llama")

_REGISTRY: dict[str, ModelConfig] = {}


def _register(cfg: ModelConfig) -> None:
    _REGISTRY[cfg.name] = cfg


_register(ModelConfig("mobilevlm-1.7b", CLIP_L14_336, MOBILELLAMA_1_4B, "ldpnet",
                      description="MobileVLM 1.7B: CLIP ViT-L/14-336 + LDP (144 tokens) + MobileLLaMA-1.4B-Chat",
                      hf_repo="mtgv/MobileVLM-1.7B"))
_register(ModelConfig("mobilevlm-3b", CLIP_L14_336, MOBILELLAMA_2_7B, "ldpnet",
                      description="MobileVLM 3B: CLIP ViT-L/14-336 + LDP (144 tokens) + MobileLLaMA-2.7B-Chat",
                      hf_repo="mtgv/MobileVLM-3B"))
_register(ModelConfig("mobilevlm-v2-1.7b", CLIP_L14_336, MOBILELLAMA_1_4B, "ldpnetv2",
                      description="MobileVLM V2 1.7B: CLIP ViT-L/14-336 + LDPv2 (144 tokens) + MobileLLaMA-1.4B-Chat",
                      hf_repo="mtgv/MobileVLM_V2-1.7B"))
_register(ModelConfig("mobilevlm-v2-3b", CLIP_L14_336, MOBILELLAMA_2_7B, "ldpnetv2",
                      description="MobileVLM V2 3B: CLIP ViT-L/14-336 + LDPv2 (144 tokens) + MobileLLaMA-2.7B-Chat",
                      hf_repo="mtgv/MobileVLM_V2-3B"))
_register(ModelConfig("mobilevlm-v2-7b", CLIP_L14_336, VICUNA_7B, "ldpnetv2",
                      description="MobileVLM V2 7B: CLIP ViT-L/14-336 + LDPv2 (144 tokens) + Vicuna-7B v1.5",
                      hf_repo="mtgv/MobileVLM_V2-7B"))
# LLaVA-1.5-style 576-token variant of the 1.7B shape (the paper's MLP ablation), for token-budget sweeps.
_register(ModelConfig("mobilevlm-1.7b-mlp", CLIP_L14_336, MOBILELLAMA_1_4B, "mlp2x_gelu",
                      description="1.7B shape with the LLaVA-1.5 mlp2x_gelu projector (576 tokens; paper Table 7)"))
for _proj in PROJECTOR_TYPES:
    _register(ModelConfig(f"tiny-{_proj}", TINY_VISION, TINY_LLM, _proj, tokenizer="trained",
                          description=f"tiny random preset for tests ({_proj})"))
_register(ModelConfig("demo", DEMO_VISION, DEMO_LLM, "ldpnetv2", tokenizer="trained",
                      description="embedded demo preset: trained from scratch on the synthetic dataset"))


def model_names() -> list[str]:
    return list(_REGISTRY)


def get_model_config(name: str) -> ModelConfig:
    """Exact-name lookup. A ``@N`` suffix (e.g. ``mobilevlm-v2-1.7b@64``) asks for a pooled N-token budget."""
    base, _, tokens = name.partition("@")
    if base not in _REGISTRY:
        raise ConfigError(f"model '{name}' unknown; known: {', '.join(_REGISTRY)}")
    cfg = _REGISTRY[base]
    if tokens:
        tokens = tokens.removesuffix("tok")
        if not tokens.isdigit():
            raise ConfigError(f"'{name}': the part after '@' must be a visual-token count, e.g. {base}@64")
        cfg = cfg.with_visual_tokens(int(tokens))
    return cfg


def format_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


__all__ = ["VisionConfig", "LLMConfig", "ModelConfig", "PROJECTOR_TYPES", "get_model_config", "model_names",
           "make_divisible", "format_count", "CLIP_MEAN", "CLIP_STD", "VICUNA_V1_SYSTEM"]
