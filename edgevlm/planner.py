"""Memory planner: will this model, at this precision and context, fit on this target? (torch-free)

    >>> from edgevlm.config import get_model_config
    >>> from edgevlm.planner import plan_memory
    >>> from edgevlm.targets import get_target
    >>> plan = plan_memory(get_model_config("mobilevlm-1.7b"), get_target("jetson-orin-nano-8gb"), "int4")
    >>> plan.verdict
    'fits'

CLI: ``edgevlm plan --model mobilevlm-1.7b --target jetson-orin-nano-4gb``. The exporter calls ``check_fits(plan)``,
which raises ``TargetError`` (numbers + suggestions) when the plan does not fit and warns near the limit.

The model (estimates from the config dims, no weights are read; every constant is documented here):

Weights, per component (``targets.COMPONENTS``):
    vision     CLIP tower up to the selected layer (``select_layer=-2`` drops the last layer and post_layernorm,
               which the exported graph does not contain) + projector;
    embedding  vocab x d token table (fp16 in the int8/int4 presets: it is gathered, not multiplied);
    decoder    layers + final norm;
    lm_head    vocab x d; counted even with tied embeddings (the decoder graph carries its own copy).
    Bytes/param: fp32 4, fp16/bf16 2, fp8 1 (per-tensor scale), int8 1 + one fp32 scale per output channel
    (approximated as params / hidden_size channels), int4 0.5 + one fp16 scale per block of ``INT4_BLOCK`` = 128
    weights (edgevlm.quant's block, as ModelOpt AWQ; onnxruntime-genai and llama.cpp use 32). Norms
    and biases are counted at the component precision (< 1 % of parameters).

KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes x context x batch, at the dtype of the decoder
    graph's KV I/O, which is what the runtime allocates: the exporter keeps float32 graph I/O on every target and
    precision (``keep_io_types``; manifest ``components.decoder.kv_cache.dtype = "float32"``), so bytes = 4 (fp32)
    even for fp16 / int8 / int4 decoders on GPUs (``KV_IO_DTYPE``; ``kv_dtype=`` for a graph with other KV I/O).
    Two buffers by default: with Optimum-style I/O the graph reads ``past_key_values.*`` and writes ``present.*``
    (past + new tokens), so the TensorRT runner (``runtime.trt_backend.TrtDecoderRunner``) preallocates two
    max-context device buffers per past tensor and ping-pongs them, and ONNX Runtime holds the past and the new
    present; ``kv_shared_buffer=True`` for an in-place cache such as ORT GroupQueryAttention (one buffer).
    ``plan_memory_from_manifest`` takes all of this (dtype, buffering, context, precision, target) from a bundle's
    manifest; the exporter records that plan in the manifest (``memory_plan``).

Activations (prefill peak, one layer live at a time; S = longest prompt incl. visual tokens, ab = 2 on GPU,
    4 on CPU or fp32):
    decoder  B x [S x (5d + 2 kv_dim + 3 ffn) x ab  +  2 x heads x S^2 x 4 (fp32 scores and probabilities)
             + vocab x 4 (logits of the last position only)];
    vision   B x [N x (7c + 2 ffn_v) x ab  +  2 x heads_v x N^2 x 4]  +  B x T x 4d x ab (projector),
             N = patches + 1, T = visual tokens.
    Both are counted (each TensorRT engine context owns its activation memory).

Runtime overhead: ``target.runtime_overhead_gb`` (CUDA context + TensorRT/cuBLAS libraries on GPUs, about 1 GB on
    Jetson and 0.6 GB of VRAM on desktop cards; interpreter + ONNX Runtime on CPUs, 0.5 GB).

Phases (the verdict uses the largest):
    run    weights + KV cache + activations + overhead;
    load   weights + overhead + a transient second copy of the largest graph's weights (TensorRT engine bytes read
           before deserialization, or ORT graph optimization / prepacking); not on discrete GPUs (host RAM);
    build  TensorRT only, built on the device: overhead + the largest engine's weights held by the ONNX parser
           (unified memory only: on a desktop they sit in host RAM) + the engine being built (the weights again) +
           the builder workspace (``target.workspace_gb``).

Verdict: ``fits`` (peak <= 90 % of usable memory), ``near_limit`` (90-100 %), ``does_not_fit`` (> 100 %), where
usable = (memory - OS reserve) x usable_fraction (``Target.usable_bytes``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from edgevlm.config import ModelConfig
from edgevlm.errors import ConfigError, TargetError
from edgevlm.targets import PRECISION_PRESETS, PRESET_ORDER, Target, get_target, recipe_name, target_names

log = logging.getLogger(__name__)

INT4_BLOCK = 128                # weights per fp16 scale in int4 weight-only quantization (edgevlm.quant's block)
DEFAULT_TEXT_TOKENS = 256       # text budget of the longest prompt (besides the visual tokens)
TYPICAL_TEXT_TOKENS = 64        # text of a typical VQA prompt (TensorRT opt shapes)
NEAR_LIMIT = 0.90               # warn above this fraction of usable memory
KV_BUFFERS = 2                  # past + present (Optimum I/O); 1 with an in-place cache
KV_IO_DTYPE = "fp32"            # the exported decoder graphs' KV I/O dtype (keep_io_types), on every target
_KV_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
              "bfloat16": "bf16"}
GIB = 2**30

VERDICTS = ("fits", "near_limit", "does_not_fit")


# ---- shared prompt-length conventions (also used by exporter.trt_plan for the optimization profiles) ---------------
def max_prompt_tokens(cfg: ModelConfig, context: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> int:
    """Longest prompt (visual + text tokens) the plan must prefill, capped by the context."""
    return min(context, cfg.visual_tokens + text_tokens)


def typical_prompt_tokens(cfg: ModelConfig, max_prompt: int) -> int:
    """A typical prompt (visual tokens + a short question): the TensorRT 'opt' prefill length."""
    return max(1, min(max_prompt, cfg.visual_tokens + TYPICAL_TEXT_TOKENS))


def default_context(cfg: ModelConfig, target: Target) -> int:
    return min(cfg.context_length, target.max_context)


# ---- byte counts --------------------------------------------------------------------------------------------------
def weight_bytes(params: int, precision: str, in_features: int) -> int:
    """Bytes of ``params`` weights stored at ``precision`` (see the module docstring for the formats)."""
    if precision == "fp32":
        return 4 * params
    if precision in ("fp16", "bf16"):
        return 2 * params
    if precision == "fp8":
        return params
    if precision == "int8":
        return params + 4 * math.ceil(params / in_features)
    if precision == "int4":
        return math.ceil(params / 2) + 2 * math.ceil(params / INT4_BLOCK)
    raise ConfigError(f"precision '{precision}' has no storage format in the planner")


def vision_tower_params(cfg: ModelConfig) -> int:
    """Parameters of the CLIP tower the exported vision graph contains (up to ``select_layer``)."""
    v = cfg.vision
    h, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    emb = h + h * 3 * p * p + (v.num_patches + 1) * h            # class embedding, patch conv, positions
    layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)    # q,k,v,o + 2 LayerNorms + fc1 + fc2
    used = v.num_layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
    return emb + 2 * h + used * layer                              # + pre_layrnorm


def component_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per planner component: vision (tower + projector), embedding, decoder, lm_head."""
    m = cfg.llm
    d, f, v = m.hidden_size, m.intermediate_size, m.vocab_size
    kv = m.num_kv_heads * m.head_dim
    layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return {"vision": vision_tower_params(cfg) + cfg.projector_params(), "embedding": v * d,
            "decoder": m.num_layers * layer + d, "lm_head": v * d}


def _in_features(cfg: ModelConfig, component: str) -> int:
    return cfg.vision.hidden_size if component == "vision" else cfg.llm.hidden_size


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str, batch: int = 1) -> int:
    m = cfg.llm
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * (4 if kv_dtype == "fp32" else 2) * batch


def decoder_activation_bytes(cfg: ModelConfig, seq: int, act_bytes: int, batch: int = 1) -> int:
    m = cfg.llm
    d, f, kvd = m.hidden_size, m.intermediate_size, m.num_kv_heads * m.head_dim
    return batch * (seq * (5 * d + 2 * kvd + 3 * f) * act_bytes + 2 * m.num_heads * seq * seq * 4
                    + m.vocab_size * 4)


def vision_activation_bytes(cfg: ModelConfig, act_bytes: int, batch: int = 1) -> int:
    v = cfg.vision
    n = v.num_patches + 1
    return batch * (n * (7 * v.hidden_size + 2 * v.intermediate_size) * act_bytes + 2 * v.num_heads * n * n * 4
                    + cfg.visual_tokens * 4 * cfg.llm.hidden_size * act_bytes)


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    phases: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """An itemized memory budget for one model x target x precision x context, with a verdict."""

    model: str
    target: str
    backend: str
    memory_kind: str
    precision: dict[str, str]
    context: int
    prompt_tokens: int
    batch: int
    kv_dtype: str
    items: tuple[MemoryItem, ...]
    phases: dict[str, int]               # phase -> total bytes
    peak_phase: str
    peak_bytes: int
    usable_bytes: int
    memory_bytes: int
    verdict: str
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def precision_name(self) -> str:
        return recipe_name(self.precision, tensorrt=self.backend == "tensorrt")

    @property
    def utilization(self) -> float:
        return self.peak_bytes / self.usable_bytes if self.usable_bytes > 0 else math.inf

    @property
    def fits(self) -> bool:
        return self.verdict != "does_not_fit"

    @property
    def weights_bytes(self) -> int:
        return sum(i.bytes for i in self.items if i.name.startswith("weights."))

    def item(self, name: str) -> int:
        for i in self.items:
            if i.name == name:
                return i.bytes
        raise KeyError(f"no item '{name}' in the plan; items: {', '.join(i.name for i in self.items)}")

    def summary(self) -> str:
        verdict = {"fits": "fits", "near_limit": "fits, near the limit", "does_not_fit": "does NOT fit"}[self.verdict]
        return (f"{self.model} ({self.precision_name}, context {self.context}, batch {self.batch}) on {self.target}: "
                f"{verdict}: peak {gib(self.peak_bytes)} ({self.peak_phase}) of {gib(self.usable_bytes)} usable "
                f"({self.utilization:.0%})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["items"] = [asdict(i) | {"phases": list(i.phases)} for i in self.items]
        d["suggestions"], d["notes"] = list(self.suggestions), list(self.notes)
        d["precision_name"] = self.precision_name
        d["utilization"] = round(self.utilization, 4)
        d["weights_bytes"] = self.weights_bytes
        return d


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _verdict(peak: int, usable: int) -> str:
    if peak > usable:
        return "does_not_fit"
    return "near_limit" if peak > NEAR_LIMIT * usable else "fits"


def plan_memory(model_cfg: ModelConfig, target: Target | str, precision: Mapping[str, str] | str | None = None,
                context: int | None = None, batch: int = 1, *, prompt_tokens: int | None = None,
                kv_shared_buffer: bool = False, workspace_gb: float | None = None,
                suggest: bool = True, kv_dtype: str | None = None) -> MemoryPlan:
    """Itemized memory budget and verdict (see the module docstring for every formula).

    Args:
        model_cfg: the model (``edgevlm.config.get_model_config(name)``).
        target: a ``Target`` or a target name.
        precision: preset name, ``"int4,vision=fp16"`` or ``{component: precision}``; None = target default.
        context: KV-cache length (prompt + generated tokens); None = min(model max, target max_context).
        batch: sequences decoded together.
        prompt_tokens: longest prompt incl. visual tokens; None = visual tokens + 256, capped by the context.
        kv_shared_buffer: the runtime updates the KV cache in place (one buffer instead of past + present).
        workspace_gb: TensorRT builder workspace; None = ``target.workspace_gb``.
        suggest: compute suggestions (lower precision, shorter context, other targets) when it does not fit.
        kv_dtype: dtype of the decoder graph's KV I/O (fp32 / float32, fp16 / float16, bf16); None =
            ``KV_IO_DTYPE`` (fp32: what the exporter writes for every target).
    """
    if isinstance(target, str):
        target = get_target(target)
    recipe = target.recipe(precision)
    kv_name = KV_IO_DTYPE if kv_dtype is None else _KV_DTYPES.get(str(kv_dtype).lower())
    if kv_name is None:
        raise ConfigError(f"kv_dtype '{kv_dtype}' unknown; use one of {', '.join(sorted(_KV_DTYPES))}")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    ctx = default_context(model_cfg, target) if context is None else int(context)
    notes: list[str] = []
    if ctx > model_cfg.context_length:
        raise ConfigError(f"context {ctx} exceeds {model_cfg.name}'s max_position_embeddings "
                          f"({model_cfg.context_length})")
    if ctx < model_cfg.visual_tokens + 1:
        raise ConfigError(f"context {ctx} cannot hold the {model_cfg.visual_tokens} visual tokens of "
                          f"{model_cfg.name} plus a prompt")
    if ctx > target.max_context:
        notes.append(f"context {ctx} is above the target profile's max_context ({target.max_context})")
    prompt = max_prompt_tokens(model_cfg, ctx) if prompt_tokens is None else min(int(prompt_tokens), ctx)
    if prompt < model_cfg.visual_tokens:
        raise ConfigError(f"prompt_tokens {prompt} is shorter than the {model_cfg.visual_tokens} visual tokens")

    cpu = target.kind == "cpu"
    kv_dtype = kv_name
    dec_ab = 4 if cpu or recipe["decoder"] == "fp32" else 2
    vis_ab = 4 if cpu or recipe["vision"] == "fp32" else 2
    params = component_params(model_cfg)
    w = {c: weight_bytes(params[c], recipe[c], _in_features(model_cfg, c)) for c in params}
    kv_one = kv_bytes_per_token(model_cfg, kv_dtype, batch) * ctx
    buffers = 1 if kv_shared_buffer else KV_BUFFERS
    overhead = int(target.runtime_overhead_gb * GIB)
    w_max = max(w["vision"], w["decoder"] + w["lm_head"])
    largest = "vision" if w["vision"] > w["decoder"] + w["lm_head"] else "decoder"
    ws = int((target.workspace_gb if workspace_gb is None else workspace_gb) * GIB)

    run, load, build = ("run",), ("load",), ("build",)
    items = [
        MemoryItem("weights.vision", w["vision"], run + load,
                   f"{params['vision']:,} params (tower + {model_cfg.projector_type}) @ {recipe['vision']}"),
        MemoryItem("weights.embedding", w["embedding"], run + load,
                   f"{params['embedding']:,} params @ {recipe['embedding']}"),
        MemoryItem("weights.decoder", w["decoder"], run + load,
                   f"{params['decoder']:,} params ({model_cfg.llm.num_layers} layers) @ {recipe['decoder']}"),
        MemoryItem("weights.lm_head", w["lm_head"], run + load, f"{params['lm_head']:,} params @ {recipe['lm_head']}"),
        MemoryItem("kv_cache.past", kv_one, run, f"{kv_dtype} (the graph's KV I/O), {ctx} tokens x batch {batch}"),
    ]
    if buffers == 2:
        items.append(MemoryItem("kv_cache.present", kv_one, run, "second buffer: the graph writes present.* apart "
                                                                 "from past_key_values.* (ping-pong)"))
    items += [
        MemoryItem("activations.vision", vision_activation_bytes(model_cfg, vis_ab, batch), run,
                   f"{model_cfg.vision.num_patches + 1} patches, {'fp32' if vis_ab == 4 else 'fp16'}"),
        MemoryItem("activations.prefill", decoder_activation_bytes(model_cfg, prompt, dec_ab, batch), run,
                   f"{prompt}-token prompt ({model_cfg.visual_tokens} visual), last-position logits"),
        MemoryItem("runtime_overhead", overhead, run + load + (build if target.is_tensorrt else ()),
                   "CUDA context + TensorRT libraries" if target.is_tensorrt else "interpreter + ONNX Runtime"),
    ]
    if target.memory_kind != "discrete":
        items.append(MemoryItem("load.transient", w_max, load,
                                f"second copy of the {largest} weights while loading "
                                + ("(engine bytes before deserialization)" if target.is_tensorrt
                                   else "(graph optimization / prepacking)")))
    if target.is_tensorrt:
        if target.memory_kind == "unified":
            items.append(MemoryItem("build.onnx_weights", w_max, build,
                                    f"{largest} ONNX weights held by the parser (shared memory on a Jetson)"))
        else:
            notes.append(f"the engine build also needs ~{gib(w_max)} of host RAM for the {largest} ONNX weights")
        items.append(MemoryItem("build.engine_weights", w_max, build, f"the {largest} engine being built"))
        items.append(MemoryItem("build.workspace", ws, build, "TensorRT builder workspace (memPoolSize)"))
        if target.build_on_device and target.kind == "jetson":
            notes.append("engines are built on the board: the build phase counts against the same memory")

    phases: dict[str, int] = {}
    for ph in ("run", "load", "build"):
        total = sum(i.bytes for i in items if ph in i.phases)
        if any(ph in i.phases and not i.name == "runtime_overhead" for i in items):
            phases[ph] = total
    peak_phase = max(phases, key=lambda p: phases[p])
    peak = phases[peak_phase]
    usable = target.usable_bytes
    verdict = _verdict(peak, usable)
    plan = MemoryPlan(model=model_cfg.name, target=target.label, backend=target.backend,
                      memory_kind=target.memory_kind, precision=recipe, context=ctx, prompt_tokens=prompt,
                      batch=batch, kv_dtype=kv_dtype, items=tuple(items), phases=phases, peak_phase=peak_phase,
                      peak_bytes=peak, usable_bytes=usable, memory_bytes=int(target.memory_gb * GIB),
                      verdict=verdict, notes=tuple(notes))
    if suggest and verdict != "fits":
        plan = replace(plan, suggestions=tuple(_suggestions(plan, model_cfg, target, recipe, ctx, batch,
                                                            prompt_tokens, kv_shared_buffer, workspace_gb)))
    return plan


def _suggestions(plan: MemoryPlan, cfg: ModelConfig, target: Target, recipe: dict[str, str], ctx: int, batch: int,
                 prompt_tokens: int | None, kv_shared: bool, workspace_gb: float | None) -> list[str]:
    def again(**kw: Any) -> MemoryPlan:
        args: dict[str, Any] = dict(precision=recipe, context=ctx, batch=batch, prompt_tokens=prompt_tokens,
                                    kv_shared_buffer=kv_shared, workspace_gb=workspace_gb, kv_dtype=plan.kv_dtype)
        args.update(kw)
        return plan_memory(cfg, args.pop("target", target), suggest=False, **args)

    out: list[str] = []
    limit = 1.0 if plan.verdict == "does_not_fit" else NEAR_LIMIT
    ok = (lambda p: p.verdict != "does_not_fit") if limit == 1.0 else (lambda p: p.verdict == "fits")
    goal = "fits" if limit == 1.0 else f"stays under {NEAR_LIMIT:.0%}"

    # 1. the largest smaller precision preset that fits (preferably under the near-limit line) at this context
    current = plan.weights_bytes
    # (the smallest: int4 with an int4 LM head, which costs accuracy; see edgevlm/quant/recipes.py)
    specs = [*PRESET_ORDER, "int4,lm_head=int4"]
    candidates = [again(precision=n) for n in specs if target.supports(n) and target.recipe(n) != recipe]
    candidates = [p for p in candidates if p.weights_bytes < current]
    pick = next((p for p in candidates if p.verdict == "fits"), None) or next(
        (p for p in candidates if ok(p)), None)
    if pick is not None:
        out.append(f"--precision {pick.precision_name} {'fits' if pick.verdict == 'fits' else goal}: peak "
                   f"{gib(pick.peak_bytes)} of {gib(pick.usable_bytes)} ({pick.utilization:.0%})")
    # 2. the longest context that fits at this precision; when the engine build blocks even a short context,
    #    also a smaller builder workspace (the build phase does not depend on the context).
    ws_now = target.workspace_gb if workspace_gb is None else workspace_gb
    small_ws = 0.25
    ws_options: list[float | None] = [workspace_gb]
    if target.is_tensorrt and ws_now > small_ws:
        ws_options.append(small_ws)
    lo0 = min(cfg.visual_tokens + 16, ctx)

    def longest_context(ws: float | None, **kw: Any) -> MemoryPlan | None:
        """The plan at the longest context in [lo0, ctx) that is ok (rounded down to 64), or None if none is."""
        if lo0 >= ctx or not ok(again(context=lo0, workspace_gb=ws, **kw)):
            return None
        lo, hi = lo0, ctx - 1
        while lo < hi:                                   # largest c in [lo, hi] with ok(c); ok is monotone in c
            mid = (lo + hi + 1) // 2
            if ok(again(context=mid, workspace_gb=ws, **kw)):
                lo = mid
            else:
                hi = mid - 1
        return again(context=lo - lo % 64 if lo >= 128 + cfg.visual_tokens else lo, workspace_gb=ws, **kw)

    for ws in ws_options:
        ws_text = "" if ws is workspace_gb else f" with a {ws * 1024:.0f} MiB builder workspace (--workspace-gb {ws})"
        if ok(again(workspace_gb=ws)):                  # the workspace alone is enough
            if ws is not workspace_gb:
                p = again(workspace_gb=ws)
                out.append(f"a {ws * 1024:.0f} MiB builder workspace (now {ws_now:g} GiB) {goal}: peak "
                           f"{gib(p.peak_bytes)} ({p.utilization:.0%}); the build may skip some fast tactics")
            break
        p = longest_context(ws)
        if p is None:
            continue
        out.append(f"--context {p.context}{ws_text} {goal} at {plan.precision_name}: peak {gib(p.peak_bytes)} "
                   f"({p.utilization:.0%}); the prompt budget becomes {p.prompt_tokens} tokens")
        break
    else:
        p = again(context=lo0, workspace_gb=ws_options[-1])
        out.append(f"no context fits at {plan.precision_name}: even {lo0} tokens need {gib(p.peak_bytes)} in the "
                   f"{p.peak_phase} phase (weights {gib(p.weights_bytes)}) of {gib(p.usable_bytes)} usable")
        # 2b. a smaller precision at a shorter context (largest such precision first)
        ws = ws_options[-1]
        for cand in candidates:
            p = longest_context(ws, precision=cand.precision)
            if p is None:
                continue
            ws_text = "" if ws is workspace_gb else f" --workspace-gb {ws}"
            out.append(f"--precision {cand.precision_name} --context {p.context}{ws_text} {goal}: peak "
                       f"{gib(p.peak_bytes)} ({p.utilization:.0%}); the prompt budget becomes {p.prompt_tokens} tokens")
            break
    # 3. batch 1
    if batch > 1 and ok(again(batch=1)):
        out.append(f"--batch 1 {goal}")
    # 5. other targets of the same family where it fits as asked
    if plan.verdict == "does_not_fit":
        fits_on = []
        for name in target_names():
            other = get_target(name)
            if (other.name == target.name or other.kind != target.kind
                    or other.usable_bytes <= target.usable_bytes or not other.supports(recipe)):
                continue
            if again(target=other).verdict != "does_not_fit":
                fits_on.append(other)
        fits_on.sort(key=lambda t: t.usable_bytes)
        if fits_on:
            out.append("fits as asked on: " + ", ".join(t.name for t in fits_on[:3]))
    return out


def kv_facts_from_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kv_dtype", "kv_shared_buffer", "context"}`` of a bundle from its manifest: the decoder's
    ``kv_cache.dtype`` and ``mode`` (``shared_buffer``: one in-place buffer of ``max_length``; else past + present),
    and the context the runtime allocates (the TensorRT plan's ``context``, the shared buffer's ``max_length``,
    else None = the planner's default)."""
    dec = ((manifest.get("components") or {}).get("decoder") or {})
    kv = dec.get("kv_cache") or {}
    dtype = _KV_DTYPES.get(str(kv.get("dtype", "float32")).lower())
    if dtype is None:
        raise ConfigError(f"manifest components.decoder.kv_cache.dtype '{kv.get('dtype')}' is not one the planner "
                          f"knows ({', '.join(sorted(_KV_DTYPES))})")
    shared = str(kv.get("mode", "concat")) == "shared_buffer"
    trt_plan = ((manifest.get("tensorrt") or {}).get("plan") or {})
    context = trt_plan.get("context") or (kv.get("max_length") if shared else None)
    return {"kv_dtype": dtype, "kv_shared_buffer": shared, "context": int(context) if context else None}


def plan_memory_from_manifest(manifest: Mapping[str, Any], *, model_cfg: ModelConfig | None = None,
                              target: Target | str | None = None, context: int | None = None, batch: int = 1,
                              workspace_gb: float | None = None, suggest: bool = True) -> MemoryPlan:
    """``plan_memory`` for a bundle, from its manifest: model (``manifest.model``), target, precision recipe, the KV
    cache's dtype and buffering and the context its runtime allocates (``kv_facts_from_manifest``). ``target`` /
    ``context`` override the manifest's (e.g. another board)."""
    if model_cfg is None:
        from edgevlm.bundle import _model_config

        model_cfg = _model_config(dict(manifest["model"]))
    tgt = manifest.get("target") or {}
    if target is None:
        target = tgt.get("label") or tgt.get("name") or "cpu"
    recipe = (manifest.get("recipe") or {}).get("components") or manifest.get("precision")
    facts = kv_facts_from_manifest(manifest)
    ctx = context if context is not None else facts["context"]
    if ctx is not None:
        ctx = min(int(ctx), model_cfg.context_length)
    trt_plan = ((manifest.get("tensorrt") or {}).get("plan") or {})
    prompt = trt_plan.get("max_prompt_tokens") if context is None else None
    return plan_memory(model_cfg, target, recipe, ctx, batch, prompt_tokens=prompt,
                       kv_shared_buffer=facts["kv_shared_buffer"], workspace_gb=workspace_gb, suggest=suggest,
                       kv_dtype=facts["kv_dtype"])


def check_fits(plan: MemoryPlan) -> MemoryPlan:
    """Raise ``TargetError`` (numbers + suggestions) when ``plan`` does not fit; log a warning near the limit."""
    if plan.verdict == "does_not_fit":
        lines = [plan.summary(), "  budget: " + ", ".join(f"{i.name} {gib(i.bytes)}" for i in plan.items
                                                          if plan.peak_phase in i.phases)]
        if plan.suggestions:
            lines.append("  try: " + "; ".join(plan.suggestions))
        lines.append(f"  details: edgevlm plan --model {plan.model} --target {plan.target} "
                     f"--precision {plan.precision_name} --context {plan.context}")
        raise TargetError("\n".join(lines))
    if plan.verdict == "near_limit":
        log.warning("%s%s", plan.summary(), ("; " + "; ".join(plan.suggestions)) if plan.suggestions else "")
    return plan


__all__ = ["MemoryPlan", "MemoryItem", "plan_memory", "plan_memory_from_manifest", "kv_facts_from_manifest",
           "check_fits", "KV_IO_DTYPE", "KV_BUFFERS", "weight_bytes", "component_params",
           "vision_tower_params", "kv_bytes_per_token", "decoder_activation_bytes", "vision_activation_bytes",
           "max_prompt_tokens", "typical_prompt_tokens", "default_context", "INT4_BLOCK", "DEFAULT_TEXT_TOKENS",
           "NEAR_LIMIT", "VERDICTS", "gib"]
