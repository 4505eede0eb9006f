"""MobileVLM in PyTorch: vision tower -> projector -> image splice -> LLaMA decoder, and reference generation.

    >>> from edgevlm.config import get_model_config
    >>> from edgevlm.model import MobileVLM
    >>> model = MobileVLM(get_model_config("tiny-ldpnetv2")).eval()
    >>> out = model(input_ids, pixel_values, attention_mask, labels)      # training forward (loss)
    >>> tokens = model.generate(prompt_ids, pixel_values, max_new_tokens=32)

``input_ids`` hold exactly one ``IMAGE_TOKEN_INDEX`` (-200) per row, where the visual tokens are spliced in
(MobileVLM's ``prepare_inputs_labels_for_multimodal``). Batches are right-padded; padding stays at the end after
the splice. The decoder is ``transformers.LlamaForCausalLM``; this reference generation loop (KV cache through
``DynamicCache``) is what the exported graphs and the runtime are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from edgevlm.config import LLMConfig, ModelConfig
from edgevlm.errors import PromptError
from edgevlm.model.hf_compat import with_cache
from edgevlm.model.projectors import build_projector
from edgevlm.model.vision import VisionTower
from edgevlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def llama_config(c: LLMConfig) -> LlamaConfig:
    return LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, vocab_size=c.vocab_size,
                       max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                       rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, hidden_act="silu",
                       bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                       attention_bias=False, mlp_bias=False, attn_implementation="sdpa")


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor            # [B, T', D]
    attention_mask: torch.Tensor           # [B, T'] (1 = real token)
    position_ids: torch.Tensor             # [B, T']
    labels: torch.Tensor | None            # [B, T'] with IGNORE_INDEX on visual / prompt / pad positions
    image_start: list[int]                 # per row: index of the first visual token


@dataclass
class SamplingConfig:
    temperature: float = 0.0               # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


class MobileVLM(nn.Module):
    """The whole model. Submodules: ``vision_tower``, ``mm_projector``, ``llm`` (``LlamaForCausalLM``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.mm_projector = build_projector(cfg)
        self.llm = LlamaForCausalLM(llama_config(cfg.llm))

    # ---- pieces -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> image embeddings ``[B, visual_tokens, D]``. The tower runs without gradients unless
        one of its parameters is trainable (MobileVLM decorates it with ``torch.no_grad``)."""
        tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
            feats = self.vision_tower(pixel_values)                          # [B, N, C]
        proj_dtype = next(self.mm_projector.parameters()).dtype
        return self.mm_projector(feats.to(proj_dtype))                       # [B, V, D]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)                          # [..., D]

    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> Spliced:
        """Replace the single ``IMAGE_TOKEN_INDEX`` of each row by that row's ``V`` image embeddings."""
        b, t = input_ids.shape                                               # input_ids [B, T]
        v = image_embeds.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_img = input_ids == IMAGE_TOKEN_INDEX
        counts = is_img.sum(dim=1)
        if not bool((counts == 1).all()):
            raise PromptError(f"every sequence needs exactly one image placeholder; found {counts.tolist()}")
        pos = is_img.int().argmax(dim=1).tolist()
        text = self.embed_tokens(input_ids.clamp(min=0))                     # [B, T, D]
        rows_e, rows_m, rows_l = [], [], []
        img_mask = attention_mask.new_ones(v)
        img_lab = input_ids.new_full((v,), IGNORE_INDEX)
        for i, p in enumerate(pos):
            rows_e.append(torch.cat([text[i, :p], image_embeds[i].to(text.dtype), text[i, p + 1:]]))
            rows_m.append(torch.cat([attention_mask[i, :p], img_mask, attention_mask[i, p + 1:]]))
            if labels is not None:
                rows_l.append(torch.cat([labels[i, :p], img_lab, labels[i, p + 1:]]))
        embeds = torch.stack(rows_e)                                         # [B, T + V - 1, D]
        mask = torch.stack(rows_m)                                           # [B, T + V - 1]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)             # right padding: 0..n-1 then frozen
        return Spliced(embeds, mask, position_ids, torch.stack(rows_l) if labels is not None else None, pos)

    # ---- training / scoring -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None):
        """Teacher-forced forward. Returns the HF ``CausalLMOutputWithPast`` (``loss`` when ``labels`` given;
        the loss covers only positions whose label is not ``IGNORE_INDEX``)."""
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        s = self.splice(input_ids, image_embeds, attention_mask, labels)
        out = self.llm(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                       labels=s.labels, use_cache=False)
        out.spliced_labels = s.labels
        return out

    # ---- reference generation (batch 1) -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], pixel_values: torch.Tensor, max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, eos_token_id: int | None = None,
                 stop: Callable[[list[int]], bool] | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy (``temperature == 0``) or sampled generation with a KV cache. ``prompt_ids`` contains one -200."""
        sampling = sampling or SamplingConfig()
        eos = self.cfg.llm.eos_token_id if eos_token_id is None else eos_token_id
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        image_embeds = self.encode_images(pixel_values.to(self.device))     # [1, V, D]
        s = self.splice(ids, image_embeds)
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if sampling.seed is None else sampling.seed)
        cache = DynamicCache()
        out = self.llm(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, **with_cache(cache),
                       use_cache=True, logits_to_keep=1)
        n_ctx = s.inputs_embeds.shape[1]
        produced: list[int] = []
        for _ in range(max_new_tokens):
            nxt = select_token(out.logits[0, -1].float(), sampling, gen)
            produced.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if nxt == eos or (stop is not None and stop(produced)):
                break
            if n_ctx >= self.cfg.context_length:
                break
            emb = self.embed_tokens(torch.tensor([[nxt]], device=self.device))  # [1, 1, D]
            pos = torch.tensor([[n_ctx]], device=self.device)
            out = self.llm(inputs_embeds=emb, position_ids=pos, **with_cache(cache), use_cache=True)
            n_ctx += 1
        return produced


def select_token(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None) -> int:
    """Greedy argmax, or temperature / top-k / top-p sampling on one row of logits ``[V]``."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def build_model(cfg: ModelConfig, seed: int | None = 0, dtype: torch.dtype = torch.float32) -> MobileVLM:
    """A randomly initialised model (``--random-init``); seeded for reproducibility. Built directly in ``dtype``
    (parameters are created and initialised in it: a 7B model in fp16 never exists in float32)."""
    if seed is not None:
        torch.manual_seed(seed)
    if dtype == torch.float32:
        return MobileVLM(cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MobileVLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.llm.model.rotary_emb = LlamaRotaryEmbedding(config=model.llm.config)   # inv_freq in float32, as loaded
    return model


def count_parameters_meta(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per part, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        m = MobileVLM(cfg)
    parts = {"vision": sum(p.numel() for p in m.vision_tower.parameters()),
             "projector": sum(p.numel() for p in m.mm_projector.parameters()),
             "llm": sum(p.numel() for p in m.llm.parameters())}
    parts["total"] = sum(parts.values())
    return parts
