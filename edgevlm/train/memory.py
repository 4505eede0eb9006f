"""Per-GPU training memory of MobileVLM's instruct stage under DDP, FSDP2 and LoRA, from the model configs.

The estimate behind the table in ``docs/training.md`` (``benchmarks/train_memory_table.py`` prints it). The stage
trains the projector and the LLM (or LoRA adapters plus the projector); the CLIP tower is frozen. As the recipe
runs it: fp32 master weights, bf16 autocast (FSDP on CUDA: bf16 parameters all-gathered), fp32 gradients and
AdamW's two fp32 moments, no activation checkpointing, SDPA attention (no ``T x T`` scores kept). Per GPU:

=================  ============================================================================================
term               bytes
=================  ============================================================================================
weights            ``4 * N_all`` (DDP, LoRA: every rank holds all fp32 weights; LoRA adds ``4 * N_lora``);
                   FSDP over ``n`` GPUs: ``4 * N_all / n``
working copies     DDP / LoRA: the bf16 casts autocast keeps from forward to backward, ``2 * (N_proj + N_llm -
                   N_embed)`` (+ ``2 * N_lora``); FSDP: the root's gathered bf16 parameters (embeddings, LM head,
                   projector, norms; held through forward and backward) ``2 * N_root`` plus two decoder layers
                   in flight (the running one and the prefetched one), each ``2 * N_layer`` gathered bf16
                   parameters and ``4 * N_layer`` unsharded fp32 gradients before their reduce-scatter
gradients          ``4 * N_train`` (FSDP: ``/ n``); ``N_train`` = projector + LLM (LoRA: projector + adapters)
AdamW              ``8 * N_train`` (FSDP: ``/ n``)
activations        ``b * T * L * (34 d + 8 f)`` (see below) ``+ b * S * 10 v`` (logits at the ``S`` supervised
                   positions: bf16 logits, their fp32 copy for the loss, its gradient)
=================  ============================================================================================

Activations per token and decoder layer (``d`` width, ``f`` MLP width), what autograd keeps for the backward: each
RMSNorm keeps its fp32 input and normalized output (``2 * 8d``), the q/k/v projections their bf16 input casts
(``6d``), SDPA its q, k, v and output (``8d``), the gate/up projections their inputs (``4d``), SiLU and the product
its inputs and the down projection its input (``4 * 2f``): ``34 d + 8 f`` bytes. ``N_embed`` is the input embedding
(looked up, never cast). Not counted: the CUDA context and allocator slack (~0.5-1 GiB), the frozen tower's
transient forward activations, LoRA's adapter activations (~``r`` per adapter and token).

    >>> rows = memory_rows(micro_batch=16, text_tokens=196)      # list of MemoryRow (bytes per term)
    >>> print(markdown_table(rows))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevlm.config import ModelConfig, get_model_config

GIB = 2 ** 30
#: The models of the table (the released 1.7B / 3B shapes and the V2 7B).
TABLE_MODELS = ("mobilevlm-1.7b", "mobilevlm-3b", "mobilevlm-v2-7b")
#: LoRA on every linear layer of the LLM, as MobileVLM / LLaVA's LoRA recipe (rank 128, alpha 256).
LORA_RANK = 128


@dataclass(frozen=True)
class MemoryRow:
    model: str
    setup: str                                # "DDP", "FSDP x4", "LoRA r=128 (DDP)"
    terms: dict[str, float] = field(default_factory=dict)    # bytes per term

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def lora_params(cfg: ModelConfig, rank: int = LORA_RANK) -> int:
    """Adapter parameters: ``r * (in + out)`` for q, k, v, o, gate, up and down of every decoder layer."""
    m = cfg.llm
    d, f, kv = m.hidden_size, m.intermediate_size, m.num_kv_heads * m.head_dim
    per_layer = rank * ((d + d) + (d + kv) * 2 + (d + d) + (d + f) * 2 + (f + d))
    return m.num_layers * per_layer


def _sizes(cfg: ModelConfig) -> dict[str, int]:
    m = cfg.llm
    parts = cfg.num_params()
    kv = m.num_kv_heads * m.head_dim
    layer = 2 * m.hidden_size ** 2 + 2 * m.hidden_size * kv + 3 * m.hidden_size * m.intermediate_size \
        + 2 * m.hidden_size
    embed = m.vocab_size * m.hidden_size
    return {"all": parts["total"], "projector": parts["projector"], "llm": parts["llm"], "embed": embed,
            "layer": layer, "root": parts["llm"] - m.num_layers * layer + parts["projector"]}


def activation_bytes(cfg: ModelConfig, micro_batch: int, tokens: int, supervised: int) -> float:
    m = cfg.llm
    per_token_layer = 34 * m.hidden_size + 8 * m.intermediate_size
    return micro_batch * tokens * m.num_layers * per_token_layer + micro_batch * supervised * 10 * m.vocab_size


def estimate(cfg: ModelConfig, setup: str, gpus: int = 1, micro_batch: int = 16, text_tokens: int = 196,
             supervised: int = 32, rank: int = LORA_RANK) -> MemoryRow:
    """Bytes per GPU for ``setup`` in ``("ddp", "fsdp", "lora")`` (``gpus`` matters for FSDP only)."""
    n = _sizes(cfg)
    tokens = text_tokens + cfg.visual_tokens - 1
    act = activation_bytes(cfg, micro_batch, tokens, supervised)
    if setup == "ddp":
        train = n["projector"] + n["llm"]
        terms = {"weights": 4 * n["all"], "working": 2 * (n["projector"] + n["llm"] - n["embed"]),
                 "grads": 4 * train, "adamw": 8 * train, "activations": act}
        label = "DDP"
    elif setup == "fsdp":
        train = n["projector"] + n["llm"]
        terms = {"weights": 4 * n["all"] / gpus, "working": 2 * n["root"] + 2 * (2 + 4) * n["layer"],
                 "grads": 4 * train / gpus, "adamw": 8 * train / gpus, "activations": act}
        label = f"FSDP x{gpus}"
    elif setup == "lora":
        lo = lora_params(cfg, rank)
        train = n["projector"] + lo
        terms = {"weights": 4 * (n["all"] + lo), "working": 2 * (n["projector"] + n["llm"] - n["embed"] + lo),
                 "grads": 4 * train, "adamw": 8 * train, "activations": act}
        label = f"LoRA r={rank} (DDP)"
    else:
        raise ValueError(f"setup '{setup}'; choose ddp, fsdp or lora")
    return MemoryRow(cfg.name, label, terms)


def memory_rows(models: tuple[str, ...] = TABLE_MODELS, fsdp_gpus: tuple[int, ...] = (2, 4, 8),
                micro_batch: int = 16, text_tokens: int = 196, supervised: int = 32) -> list[MemoryRow]:
    rows = []
    for name in models:
        cfg = get_model_config(name)
        kw = {"micro_batch": micro_batch, "text_tokens": text_tokens, "supervised": supervised}
        rows.append(estimate(cfg, "ddp", **kw))
        rows += [estimate(cfg, "fsdp", gpus=g, **kw) for g in fsdp_gpus]
        rows.append(estimate(cfg, "lora", **kw))
    return rows


def markdown_table(rows: list[MemoryRow]) -> str:
    """GiB per GPU, one row per (model, setup)."""
    head = ("| model | setup | weights | working copies | gradients | AdamW | activations | total |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        t = r.terms
        cells = [t["weights"], t["working"], t["grads"], t["adamw"], t["activations"], r.total]
        lines.append(f"| {r.model} | {r.setup} | " + " | ".join(f"{c / GIB:.1f}" for c in cells) + " |")
    return "\n".join(lines)


__all__ = ["MemoryRow", "estimate", "memory_rows", "markdown_table", "lora_params", "activation_bytes",
           "TABLE_MODELS", "LORA_RANK", "GIB"]
