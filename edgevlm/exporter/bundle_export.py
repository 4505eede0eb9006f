"""Export a model to a bundle: vision.onnx + embed_tokens.npy + decoder.onnx + tokenizer/ + manifest.json.

One function, ``export_bundle``, runs the stages (each timed, reported to an optional ``progress`` callback):

    model        build (random init, seeded) or load a checkpoint, or take an in-memory ``MobileVLM``
    vision       MobileVLM.encode_images -> vision.onnx (+ .data)            (onnx_export.export_vision)
    decoder      LLaMA with explicit past KV -> decoder.onnx (+ .data): the portable graph (standard ops, Optimum
                 past/present, TensorRT-parsable; onnx_export.export_decoder) or, for ONNX Runtime CPU targets, the
                 GroupQueryAttention graph with one shared past/present KV buffer (ort_decoder.build_ort_decoder);
                 ``decoder_graph`` / ``--decoder-graph`` picks (``resolve_decoder_graph``)
    embed        the token-embedding table -> embed_tokens.npy                (numpy gathers it at run time)
    tokenizer    the checkpoint's tokenizer, or a stand-in trained on the synthetic data (random init)
    reference    PyTorch outputs for the parity inputs; then the PyTorch model is freed (peak RSS = max, not sum)
    postprocess  float precisions other than fp32 (fp16): the conversion hook the caller passes rewrites the
                 saved graphs (``edgevlm.pipeline`` passes ``edgevlm.quant.fp16``'s, which streams: the weights are
                 never loaded); quantized precisions are the quantization stage's (``edgevlm.quant``, composed by
                 ``edgevlm.pipeline``)
    parity       ONNX Runtime CPU vs the PyTorch reference; ``ExportMismatch`` beyond tolerance
    tensorrt     TensorRT targets only: standard-ops / opset / Q-DQ / finite-mask check of every graph, engine build plan
                 (build_plan.json + build_engines.sh; GPU only unless ``dla=True`` / ``--dla``); the memory plan
                 (planner.check_fits) runs before anything, and is recorded from the finished manifest
                 (``planner.plan_memory_from_manifest``: the KV dtype and buffering the bundle really has)
    manifest     written by ``edgevlm.bundle.BundleWriter``: atomic, nothing appears at ``out`` on failure

Memory: the language model stays in its stored dtype (fp16 for a released checkpoint, and for random init of a model
>= ``LARGE_MODEL_PARAMS``); both decoder graphs write each weight cast to float32 as they save it, the vision weights
are freed once vision.onnx and its reference exist, and the PyTorch model is freed before the graphs are converted
or loaded by ONNX Runtime. mobilevlm-v2-7b to an fp16 TensorRT bundle: the fp16 model plus one weight at a time.

    >>> from edgevlm.exporter.bundle_export import export_bundle
    >>> export_bundle("tiny-ldpnetv2", "out/tiny", random_init=True)              # a few seconds
    >>> export_bundle(None, "out/ft", checkpoint="runs/ft/checkpoint")             # config from the checkpoint
    >>> export_bundle(model.cfg, "out/trained", model=model, tokenizer_dir="runs/ft/tokenizer")   # in memory

CLI: ``edgevlm export --model M (--checkpoint DIR | --random-init) --out DIR [--target T] [--precision fp32]``.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from edgevlm.config import ModelConfig, get_model_config
from edgevlm.errors import CheckpointError, ConfigError, TargetError
from edgevlm.graphs import spec as S

log = logging.getLogger(__name__)

DEFAULT_TARGET = "cpu"               # alias of the x86-64 AVX2 CPU profile (ONNX Runtime CPU)
DEFAULT_PRECISION = "fp32"
TOKENIZER_DIR = "tokenizer"
EMBED_FILE = "embed_tokens.npy"
#: Tokenizer files copied from a checkpoint / tokenizer directory when present (tokenizer.json is always written).
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                         "generation_config.json", "tokenizer.model")
STAND_IN_SAMPLES = 1000              # synthetic conversations the stand-in tokenizer is trained on

#: ``--decoder-graph`` choices. ``gqa``: ONNX Runtime contrib ops (GroupQueryAttention with the KV cache written in
#: place into one preallocated buffer, SkipSimplifiedLayerNormalization, rotary inside attention), CPU targets only;
#: ``portable``: standard ONNX ops with Optimum past/present (every target; TensorRT needs it); ``auto``: ``gqa`` on
#: ONNX Runtime CPU targets when onnxruntime-genai (the ``export`` extra) is installed, else ``portable``.
#: Measured (benchmarks/results/runtime_mobilevlm-1.7b.json, mobilevlm-1.7b int4, 2 threads): the portable graph
#: spends 67 % of a decode step in Concat/Transpose of the growing KV cache; the gqa graph none.
DECODER_GRAPHS = ("auto", "gqa", "portable")

#: Stage id -> label, in order (the CLI shows them as a progress bar).
STAGES: dict[str, str] = {
    "model": "build / load model", "vision": "export vision", "decoder": "export decoder",
    "reference_vision": "PyTorch reference (vision)", "embed": "embedding table", "tokenizer": "tokenizer",
    "reference": "PyTorch reference (decoder)",
    "postprocess": "precision recipe", "parity": "parity (ONNX Runtime)", "tensorrt": "TensorRT checks",
    "manifest": "write manifest", "quantize": "quantize (calibrated)",
}

Progress = Callable[[str, str, float | None], None]    # (stage, "start" | "done" | "skip", seconds)


# ---- per-component precision recipes ----------------------------------------------------------------------------
PostProcess = Callable[[Path, ModelConfig], dict[str, Any]]


@dataclass(frozen=True)
class ComponentPrecision:
    """How one graph component is brought to a precision after the fp32 export.

    ``postprocess(onnx_path, cfg)`` rewrites the saved graph in place (weights included) and returns the recipe
    details recorded in the manifest; ``None`` leaves the fp32 graph as it is. ``tolerances`` are the parity limits
    for that precision (``spec.tolerances_for``).
    """

    precision: str
    postprocess: PostProcess | None
    tolerances: S.ParityTolerances
    description: str = ""


def _component(precision: str, postprocess: Mapping[str, PostProcess] | None) -> ComponentPrecision:
    """The exporter's view of one graph precision (``edgevlm.precisions``): fp32 as exported; other float precisions
    through the conversion hook the caller passes (``edgevlm.pipeline`` passes ``edgevlm.quant.fp16``'s); quantized
    ones belong to the quantization stage."""
    from edgevlm.precisions import DESCRIPTIONS, QUANTIZED, TOLERANCES

    if precision in QUANTIZED:
        raise ConfigError(f"{precision} is written by the quantization stage, not the exporter: use "
                          f"edgevlm.pipeline.export_bundle (what `edgevlm export --precision {precision}` runs) or "
                          f"export fp32 and run `edgevlm quantize BUNDLE --precision {precision}`")
    if precision not in TOLERANCES:
        raise ConfigError(f"precision {precision} is not implemented by the exporter; available: fp32, fp16")
    hook = None
    if precision != "fp32":
        hook = (postprocess or {}).get(precision)
        if hook is None:
            raise ConfigError(f"the exporter writes fp32 graphs; {precision} needs its conversion hook "
                              f"(postprocess={{'{precision}': ...}}): use edgevlm.pipeline.export_bundle, which "
                              f"passes it")
    return ComponentPrecision(precision, hook, TOLERANCES[precision], DESCRIPTIONS[precision])


@dataclass
class ExportRecipe:
    """The resolved precision recipe: ``{vision, embedding, decoder, lm_head} -> precision`` plus what applies it."""

    name: str
    components: dict[str, str]
    vision: ComponentPrecision
    decoder: ComponentPrecision
    embed_dtype: str
    tolerances: S.ParityTolerances

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "components": dict(self.components), "embed_dtype": self.embed_dtype,
                "tolerances": self.tolerances.to_dict()}


def resolve_recipe(precision: str | Mapping[str, str], target=None,
                   tolerances: S.ParityTolerances | None = None,
                   postprocess: Mapping[str, PostProcess] | None = None) -> ExportRecipe:
    """Resolve ``precision`` (preset name, ``"fp16,vision=fp32"`` or a dict) for ``target`` (default
    ``DEFAULT_TARGET``; ``TargetError`` if the target lacks it); ``ConfigError`` for a quantized precision (the
    quantization stage writes those) or a float one without its ``postprocess`` hook."""
    from edgevlm.precisions import EMBED_DTYPES
    from edgevlm.targets import recipe_name

    tgt = resolve_target(target)
    comps = tgt.recipe(precision)
    vision, decoder = _component(comps["vision"], postprocess), _component(comps["decoder"], postprocess)
    _component(comps["lm_head"], postprocess)
    if comps["lm_head"] != comps["decoder"]:
        raise ConfigError(f"lm_head={comps['lm_head']} with decoder={comps['decoder']}: the LM head is part of the "
                          f"decoder graph and follows its precision in this exporter")
    if comps["embedding"] not in EMBED_DTYPES:
        raise ConfigError(f"embedding precision '{comps['embedding']}' unsupported; the table is stored as "
                          f"{' or '.join(EMBED_DTYPES)}")
    tol = tolerances or S.ParityTolerances(vision=vision.tolerances.vision, logits=decoder.tolerances.logits,
                                           kv=decoder.tolerances.kv)
    return ExportRecipe(recipe_name(comps, tensorrt=tgt.is_tensorrt), comps, vision, decoder,
                        EMBED_DTYPES[comps["embedding"]], tol)


# ---- targets ----------------------------------------------------------------------------------------------------
def resolve_target(target):
    """A ``edgevlm.targets.Target`` (name, alias or object; None = ``DEFAULT_TARGET``)."""
    from edgevlm.targets import get_target

    return get_target(target if target is not None else DEFAULT_TARGET)


def tensorrt_checks(root: Path, cfg: ModelConfig, target, recipe: ExportRecipe, *,
                    dla: bool = False) -> dict[str, Any]:
    """TensorRT targets, once the graphs are in ``root``: ``edgevlm.graphs.trt_plan.prepare_tensorrt_bundle``
    checks every graph with ``trt_compat.assert_tensorrt_compat`` (standard ONNX ops only, opset, symmetric Q/DQ,
    finite masks; ``TargetError`` naming every offending node), plans the engines (optimization profiles, builder
    flags, per-layer fp32 for weak fp16 builds, the vision graph on DLA only with ``dla=True``) and writes
    ``build_plan.json`` + ``build_engines.sh`` into the bundle. Returns the manifest's ``tensorrt`` entry
    (``engines`` is filled later by ``edgevlm build-engine`` / ``edgevlm register-engines``)."""
    from edgevlm.graphs.trt_plan import prepare_tensorrt_bundle

    entry = prepare_tensorrt_bundle(root, cfg, target, recipe.components, use_dla=dla)
    for e in entry["plan"]["engines"]:
        if e.get("dla_core") is not None:
            log.info("%s on DLA core %s; ops without a DLA layer (GPU fallback): %s", e["component"], e["dla_core"],
                     ", ".join(f"{k} x{v}" for k, v in e.get("dla_fallback_ops", {}).items()) or "none")
    return entry


def check_dla_request(target, recipe_components: Mapping[str, str]) -> None:
    """``--dla`` before anything is exported: the target has a DLA core and the vision precision runs on DLA
    (fp16 / int8); ``ConfigError`` otherwise (``trt_plan.check_dla``)."""
    from edgevlm.graphs.trt_plan import check_dla

    check_dla(target, recipe_components["vision"], where="the vision precision")


def _genai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def resolve_decoder_graph(choice: str, target, recipe: ExportRecipe) -> str:
    """``auto`` / ``gqa`` / ``portable`` (``DECODER_GRAPHS``) -> the decoder graph this export writes."""
    from edgevlm.errors import MissingDependency

    if choice not in DECODER_GRAPHS:
        raise ConfigError(f"unknown decoder graph '{choice}'; choose one of {', '.join(DECODER_GRAPHS)}")
    if choice == "portable":
        return "portable"
    cpu = target.backend == "onnxruntime-cpu"
    fp32 = recipe.decoder.precision == "fp32"
    if choice == "auto":
        return "gqa" if cpu and fp32 and _genai_available() else "portable"
    if not cpu:
        raise TargetError(f"--decoder-graph gqa is an ONNX Runtime CPU graph (com.microsoft contrib ops); target "
                          f"'{target.name}' runs {target.backend}, which needs the portable graph: use "
                          f"--decoder-graph portable (or auto)")
    if not fp32:
        raise ConfigError(f"--decoder-graph gqa is exported in fp32 (and quantized afterwards); decoder precision "
                          f"'{recipe.decoder.precision}' needs --decoder-graph portable")
    if not _genai_available():
        raise MissingDependency("onnxruntime-genai", "export", "The GroupQueryAttention decoder (--decoder-graph gqa)")
    return "gqa"


def _export_gqa_decoder(vlm, root: Path, cfg: ModelConfig):
    """The ORT-CPU decoder (``ort_decoder.build_ort_decoder``, fp32, KV buffer = the model's context) as an
    ``ExportedGraph`` whose report carries the builder's manifest entry."""
    from edgevlm.exporter.onnx_export import ExportedGraph
    from edgevlm.exporter.ort_decoder import build_ort_decoder

    # fuse_gate_up: one matmul of N = 2 x ffn for the MLP's gate and up projections (+ Split): 24 fewer MatMulNBits
    # per decode step on mobilevlm-1.7b. Its speed effect is within run-to-run noise (benchmarks/ort_decoder_bench.py
    # kernel --fuse-gate-up, int4 block 128, 2 threads: 43.6 -> 42.3, 42.5 -> 41.3, 38.4 -> 39.5 ms per pass);
    # the committed runtime results (benchmarks/results/runtime_mobilevlm-1.7b.json) were measured with it.
    # The builder concatenates gate and up eagerly (a second copy of those weights until it writes them): fused
    # only while that copy stays under FUSE_COPY_MAX_BYTES (mobilevlm-1.7b: 1.1 GB fused; mobilevlm-v2-7b: 5.8 GB,
    # two separate MatMulNBits instead, which the native kernel plans too).
    from edgevlm.model.precision import is_reduced_precision

    c = cfg.llm
    fused_copy = 2 * c.intermediate_size * c.hidden_size * c.num_layers * (2 if is_reduced_precision(vlm.llm) else 4)
    entry = build_ort_decoder(vlm.llm, root, precision="fp32", max_context=int(cfg.context_length),
                              fuse_gate_up=fused_copy <= FUSE_COPY_MAX_BYTES)
    return ExportedGraph(root / entry["file"], {"mask_constants_replaced": 0, "mask_value": None,
                                                "builder_entry": entry})


def memory_plan(cfg: ModelConfig, target, recipe: ExportRecipe, graph_kind: str = "portable", *,
                check: bool = True) -> dict[str, Any] | None:
    """``edgevlm.planner.plan_memory`` for the target, with the KV cache this export writes (float32 KV I/O;
    ``gqa``: one shared buffer, ``portable``: past + present); ``check_fits`` raises ``TargetError`` on TensorRT
    targets (where the engine must be built on the device), CPU targets only log a warning. The manifest records the
    plan recomputed from the finished manifest (``planner.plan_memory_from_manifest``)."""
    from edgevlm import planner

    plan = planner.plan_memory(cfg, target, recipe.components, suggest=check, kv_dtype=planner.KV_IO_DTYPE,
                               kv_shared_buffer=graph_kind == "gqa")
    if check and target.is_tensorrt:
        planner.check_fits(plan)
    elif check and plan.verdict != "fits":
        log.warning("%s", plan.summary())
    return plan.to_dict()


# ---- tokenizer --------------------------------------------------------------------------------------------------
_STAND_IN_CACHE: dict[tuple[int, int], str] = {}


def _stand_in_tokenizer(vocab_size: int, seed: int):
    """A BPE trained on the synthetic conversations (cached per process: tests export many tiny bundles)."""
    from tokenizers import Tokenizer

    from edgevlm.train.synthetic import generate_samples
    from edgevlm.train.tokenizer import train_tokenizer_on_samples

    key = (vocab_size, seed)
    if key not in _STAND_IN_CACHE:
        samples = generate_samples(STAND_IN_SAMPLES, split="train", seed=seed, image_size=32)
        _STAND_IN_CACHE[key] = train_tokenizer_on_samples(samples, vocab_size=vocab_size).to_str()
    return Tokenizer.from_str(_STAND_IN_CACHE[key])


def write_tokenizer(dest: Path, cfg: ModelConfig, *, source_dir: str | os.PathLike | None, seed: int = 0,
                    bundle_root: Path | None = None) -> dict[str, Any]:
    """Write the bundle's tokenizer into ``dest`` and return the manifest's ``tokenizer`` entry.

    ``source_dir`` (a checkpoint or tokenizer directory): its ``tokenizer.json`` (or the one converted from a
    SentencePiece ``tokenizer.model``) plus the config files; ``None``: a stand-in trained on the synthetic data
    (``stand_in: true``; for random-init bundles, whose vocabulary has no meaning anyway).
    """
    from edgevlm.train.tokenizer import load_tokenizer, save_tokenizer

    bundle_root = bundle_root or dest.parent
    dest.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        src = Path(source_dir)
        tok = load_tokenizer(src)                             # CheckpointError when there is none
        if (src / "tokenizer.json").is_file():
            shutil.copyfile(src / "tokenizer.json", dest / "tokenizer.json")
        else:
            tok.save(str(dest / "tokenizer.json"))            # converted from tokenizer.model
        for name in TOKENIZER_EXTRA_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
        entry: dict[str, Any] = {"stand_in": False, "source": str(src.resolve())}
    else:
        tok = _stand_in_tokenizer(cfg.llm.vocab_size, seed)
        save_tokenizer(tok, dest, model_max_length=cfg.context_length)
        entry = {"stand_in": True, "source": "stand-in BPE trained on the synthetic data (edgevlm.train.tokenizer)",
                 "note": "random-init / no tokenizer given: token ids carry no meaning beyond the synthetic data"}
    n = tok.get_vocab_size()
    if n > cfg.llm.vocab_size:
        raise CheckpointError(f"the tokenizer has {n} tokens but the model's embedding table has "
                              f"{cfg.llm.vocab_size} rows; ids >= {cfg.llm.vocab_size} would index past it. Use the "
                              f"tokenizer the model was trained with")
    files = sorted(p.relative_to(bundle_root).as_posix() for p in dest.rglob("*") if p.is_file())
    special = {name: tok.token_to_id(tok_str) for name, tok_str in
               (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"))}
    return {"file": (dest / "tokenizer.json").relative_to(bundle_root).as_posix(), "files": files,
            "vocab_size": n, "kind": "tokenizers", "special_token_ids": special, **entry}


# ---- model memory -----------------------------------------------------------------------------------------------
#: Random-init models at least this large are built in fp16 when the ORT decoder builder writes the decoder (it
#: casts per tensor), as a released checkpoint is stored: mobilevlm-1.7b in 3.4 GB instead of 6.8 GB.
LARGE_MODEL_PARAMS = S.LARGE_MODEL_PARAMS


#: largest eager copy of the gate + up weights the decoder builder may make to fuse them (see _export_gqa_decoder)
FUSE_COPY_MAX_BYTES = 2 * 2**30


def _is_large(cfg: ModelConfig) -> bool:
    from edgevlm.model.vlm import count_parameters_meta

    return count_parameters_meta(cfg)["total"] >= LARGE_MODEL_PARAMS


def _drop_vision_weights(vlm) -> None:
    """Free the vision tower and projector once vision.onnx and its reference exist (moved to the meta device)."""
    vlm.vision_tower.to("meta")
    vlm.mm_projector.to("meta")
    release_memory()


# ---- the export -------------------------------------------------------------------------------------------------
@dataclass
class _Stages:
    progress: Progress | None
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        if self.progress:
            self.progress(stage, "start", None)
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.timings[stage] = round(dt, 3)
        log.debug("export: %s done in %.1f s", STAGES.get(stage, stage), dt)
        if self.progress:
            self.progress(stage, "done", dt)
        return out

    def skip(self, stage: str) -> None:
        if self.progress:
            self.progress(stage, "skip", None)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; best effort)."""
    gc.collect()
    if platform.system() == "Linux":
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process and its waited-for children (Linux ``ru_maxrss`` is in KiB)."""
    scale = 1 if platform.system() == "Darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, kids) * scale)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _resolve_source(model_name_or_cfg, checkpoint, random_init: bool, model) -> tuple[ModelConfig | None, str]:
    """Validate the source arguments (cheap, before anything is built). Returns (config or None, kind)."""
    if model is not None:
        if checkpoint is not None:
            raise ConfigError("pass either model= (an in-memory MobileVLM) or checkpoint=, not both")
        cfg = getattr(model, "cfg", None)
        if not isinstance(cfg, ModelConfig):
            raise ConfigError("model= must be an edgevlm.model.MobileVLM (it has no .cfg ModelConfig)")
        named = model_name_or_cfg.name if isinstance(model_name_or_cfg, ModelConfig) else model_name_or_cfg
        if (isinstance(model_name_or_cfg, ModelConfig) and model_name_or_cfg != cfg) or \
                (named is not None and named != cfg.name):
            raise ConfigError(f"model_name_or_cfg ({named}) is not the config of the model passed as model= "
                              f"({cfg.name}); pass None or the model's own config")
        return cfg, "in-memory"
    if checkpoint is not None and random_init:
        raise ConfigError("pass exactly one of --checkpoint DIR (trained weights) and --random-init (random weights "
                          "for latency/memory work), not both")
    if checkpoint is None and not random_init:
        raise ConfigError("no weights: pass --checkpoint DIR (a MobileVLM checkpoint directory) or --random-init "
                          "(random weights, for latency and memory work only)")
    cfg = None
    if model_name_or_cfg is not None:
        cfg = model_name_or_cfg if isinstance(model_name_or_cfg, ModelConfig) else get_model_config(
            str(model_name_or_cfg))
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint directory '{ckpt}' does not exist; pass a directory with config.json "
                                  f"and weights, or use --random-init for latency work without weights")
        if not (ckpt / "config.json").is_file():
            raise CheckpointError(f"'{ckpt}' has no config.json; is it a MobileVLM checkpoint directory?")
        return cfg, "checkpoint"
    if cfg is None:
        raise ConfigError("--random-init needs --model NAME (see `edgevlm models`)")
    return cfg, "random-init"


_ARCH_FIELDS = ("vision", "llm", "projector_type", "projector_tokens")


def _check_same_architecture(named: ModelConfig, loaded: ModelConfig, ckpt: Path) -> None:
    a, b = named.to_dict(), loaded.to_dict()
    diff = [k for k in _ARCH_FIELDS if _strip_names(a[k]) != _strip_names(b[k])]
    if diff:
        raise ConfigError(f"--model {named.name} does not describe checkpoint '{ckpt}' (differs in "
                          f"{', '.join(diff)}); drop --model to take the configuration from the checkpoint")


def _strip_names(v: Any) -> Any:
    return {k: x for k, x in v.items() if k != "name"} if isinstance(v, dict) else v


def export_bundle(model_name_or_cfg: str | ModelConfig | None, out: str | os.PathLike, *,
                  checkpoint: str | os.PathLike | None = None, random_init: bool = False, target=None,
                  precision: str | Mapping[str, str] = DEFAULT_PRECISION, opset: int = S.DEFAULT_OPSET,
                  overwrite: bool = False, parity: bool = True, seed: int = 0,
                  tokenizer_dir: str | os.PathLike | None = None, model=None,
                  tolerances: S.ParityTolerances | None = None, parity_prompt_len: int | None = None,
                  decoder_graph: str = "auto", progress: Progress | None = None, dla: bool = False,
                  check_memory: bool = True, postprocess: Mapping[str, PostProcess] | None = None) -> Path:
    """Export a MobileVLM to a validated bundle directory ``out``; returns its path.

    Args:
        model_name_or_cfg: registry name (``edgevlm models``), a ``ModelConfig``, or None with ``checkpoint``.
        out: bundle directory to create (atomically: a failed export leaves nothing there).
        checkpoint: a MobileVLM checkpoint directory (weights + config.json + tokenizer).
        random_init: random weights (seeded) and a stand-in tokenizer; every output says "random-init".
        target: target profile name (``edgevlm targets``); default ``cpu`` (x86-64 ONNX Runtime CPU).
        precision: ``fp32``, or ``fp16`` with its ``postprocess`` hook (per component: ``"fp16,vision=fp32"``);
            quantized precisions are the quantization stage's (``edgevlm.pipeline.export_bundle`` composes both).
        opset: ONNX opset (18..21, default 20; TensorRT 10.x targets take <= their parser's maximum).
        overwrite: replace an existing bundle at ``out``.
        parity: validate the graphs with ONNX Runtime against PyTorch (``ExportMismatch`` beyond tolerance).
        seed: random-init weights, stand-in tokenizer and parity inputs.
        tokenizer_dir: tokenizer to ship (tokenizer.json or tokenizer.model); default: the checkpoint's, or a
            stand-in for random-init / in-memory models.
        model: an in-memory ``MobileVLM`` to export (e.g. just trained); ``random_init`` then only labels it.
        tolerances: parity tolerances overriding the precision's defaults (``spec.ParityTolerances``).
        parity_prompt_len: prompt length of the decoder parity prefill (default 16).
        decoder_graph: ``auto`` (default), ``gqa`` or ``portable`` (``DECODER_GRAPHS``, ``resolve_decoder_graph``).
        progress: ``progress(stage, event, seconds)`` callback; ``event`` is "start", "done" or "skip".
        dla: TensorRT targets with DLA cores: plan the vision engine on DLA core 0 with GPU fallback (opt-in; the
            plan lists the ops that fall back to the GPU). The vision precision must be fp16 or int8.
        check_memory: refuse (``planner.check_fits``) a bundle that does not fit a TensorRT target; False for the
            fp32 intermediate of a quantized export (checked at its final precision instead).
        postprocess: ``{precision: hook}``: converts a saved fp32 graph in place to that float precision
            (``hook(onnx_path, cfg) -> recipe details``); ``edgevlm.pipeline`` passes ``edgevlm.quant.fp16``'s.
    """
    from edgevlm.bundle import BundleWriter, model_entry, prompt_entry

    t_start = time.perf_counter()
    cfg, kind = _resolve_source(model_name_or_cfg, checkpoint, random_init, model)
    S.check_opset(opset)
    tgt = resolve_target(target)
    if opset > tgt.opset_max:
        raise TargetError(f"opset {opset} is above what target '{tgt.name}' parses (<= {tgt.opset_max}); use "
                          f"--opset {min(tgt.opset_max, S.DEFAULT_OPSET)}")
    recipe = resolve_recipe(precision, tgt, tolerances, postprocess)
    if dla:
        check_dla_request(tgt, recipe.components)
    graph_kind = resolve_decoder_graph(decoder_graph, tgt, recipe)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory '{tokenizer_dir}' does not exist")
    stages = _Stages(progress)
    is_random = bool(random_init) and kind != "checkpoint"
    plan = None
    if cfg is not None:                                      # fail fast before building anything
        plan = memory_plan(cfg, tgt, recipe, graph_kind, check=check_memory)

    with BundleWriter(out, overwrite=overwrite) as w:
        root = w.root

        # -- model. The language model stays in its stored dtype (a released fp16 checkpoint; random init of a
        # model >= LARGE_MODEL_PARAMS is built in fp16 like one): the ORT decoder builder (gqa) casts each weight to
        # float32 as it writes it, the portable export traces float32 stand-ins and writes each weight cast from
        # the model's tensor (onnx_export._float32_stand_ins); the reference runs under float32_forward. No float32
        # copy of the language model exists (mobilevlm-v2-7b: 14 GB held, not 28). The vision part is float32
        # (torch.onnx exports what it is given; 0.3B parameters).
        def build():
            import torch

            if kind == "in-memory":
                return model, cfg
            if kind == "checkpoint":
                from edgevlm.model import load_checkpoint

                m, c = load_checkpoint(checkpoint, dtype=None)
                if cfg is not None:
                    _check_same_architecture(cfg, c, Path(checkpoint))
            else:
                from edgevlm.model import build_model

                torch.manual_seed(seed)
                m, c = build_model(cfg, seed=seed, dtype=torch.float16 if large else torch.float32), cfg
            m.vision_tower.float()
            m.mm_projector.float()
            return m.eval(), c

        large = _is_large(cfg) if cfg is not None else False       # random init always has cfg
        vlm, mcfg = stages.run("model", build)
        large = _is_large(mcfg) if cfg is None else large
        owned = kind != "in-memory"
        if plan is None:
            plan = memory_plan(mcfg, tgt, recipe, graph_kind, check=check_memory)

        from edgevlm.exporter import onnx_export as E

        vis = stages.run("vision", lambda: E.export_vision(vlm, root / "vision.onnx", opset=opset))
        refs_vision = None
        if parity:                                            # now, so the vision weights can go before the decoder
            from edgevlm.exporter import parity as P

            # bounded like the decoder's below: models >= LARGE_MODEL_PARAMS check one image (the runtime encodes
            # one at a time; a second image only re-checks batching, at a CLIP-L pass in PyTorch and one in ORT)
            refs_vision = stages.run("reference_vision",
                                     lambda: P.vision_reference(vlm, batch=1 if large else 2, seed=seed))
        if owned:                                             # the decoder stages read vlm.llm only
            _drop_vision_weights(vlm)
        if graph_kind == "gqa":
            dec = stages.run("decoder", lambda: _export_gqa_decoder(vlm, root, mcfg))
        else:
            dec = stages.run("decoder", lambda: E.export_decoder(vlm, root / "decoder.onnx", opset=opset))
        embed = stages.run("embed", lambda: E.save_embed_table(vlm, root / EMBED_FILE, recipe.embed_dtype))
        tok_src = tokenizer_dir if tokenizer_dir is not None else (checkpoint if kind == "checkpoint" else None)
        tok_entry = stages.run("tokenizer", lambda: write_tokenizer(root / TOKENIZER_DIR, mcfg, source_dir=tok_src,
                                                                    seed=seed, bundle_root=root))

        refs = None
        if parity:
            from edgevlm.exporter import parity as P

            prompt_len = parity_prompt_len or P.DEFAULT_PROMPT_LEN

            def reference():
                from edgevlm.model.precision import float32_forward

                # bounded: models >= LARGE_MODEL_PARAMS check one sequence (the decoder interface runs batch 1
                # anyway: a batch-2 reference only re-checks PyTorch's batching, at 3x the reference time)
                batches = (1,) if large else P.DEFAULT_BATCHES
                with float32_forward(vlm.llm):               # fp16 storage, float32 math, one module at a time
                    return refs_vision, P.decoder_reference(vlm, prompt_len=prompt_len, seed=seed, batches=batches)

            refs = stages.run("reference", reference)
        else:
            stages.skip("reference")
        del vlm                                               # free the PyTorch weights before ORT loads the graphs
        if owned:
            release_memory()

        def postprocess():
            done = {}
            for name, comp, path in (("vision", recipe.vision, vis.path), ("decoder", recipe.decoder, dec.path)):
                details = comp.postprocess(path, mcfg) if comp.postprocess else {}
                done[name] = {"precision": comp.precision, "description": comp.description, **details}
            return done

        post = stages.run("postprocess", postprocess)

        parity_results: dict[str, Any] = {}
        if refs is not None:
            from edgevlm.exporter import parity as P

            def run_parity():
                res_v = P.check_vision(vis.path, refs[0], recipe.tolerances)
                res_v.raise_if_failed()
                res_d = P.check_decoder(dec.path, refs[1], recipe.tolerances)
                res_d.raise_if_failed()
                return {"vision": res_v.to_dict(), "decoder": res_d.to_dict()}

            parity_results = stages.run("parity", run_parity)
        else:
            stages.skip("parity")
        refs = None

        trt_report = None
        if tgt.is_tensorrt:
            trt_report = stages.run("tensorrt", lambda: tensorrt_checks(root, mcfg, tgt, recipe, dla=dla))
        else:
            stages.skip("tensorrt")

        def manifest():
            from edgevlm.preprocess import PreprocessConfig

            skipped = {"skipped": True, "reason": "--skip-parity"}
            comps = {}
            for name, graph, comp in (("vision", vis, recipe.vision), ("decoder", dec, recipe.decoder)):
                entry = E.graph_entry(graph.path, precision=comp.precision, recipe=post[name])
                entry["mask_constants_replaced"] = graph.report["mask_constants_replaced"]
                entry["mask_value"] = graph.report["mask_value"]
                entry["parity"] = parity_results.get(name, skipped)
                comps[name] = entry
            comps["decoder"]["kv_cache"] = S.kv_cache_entry(mcfg, "float32")
            comps["decoder"]["logits"] = "last_position"
            built = dec.report.get("builder_entry")
            if built is not None:                     # the GroupQueryAttention graph: its own KV contract
                comps["decoder"].update({k: built[k] for k in ("kv_cache", "logits", "position_ids", "flavor",
                                                               "execution_providers")})
                comps["decoder"]["recipe"] = {**comps["decoder"]["recipe"], "graph": built["recipe"]}
            comps["decoder"]["graph"] = graph_kind
            comps["vision"]["visual_tokens"] = mcfg.visual_tokens
            embed_c = dict(embed)
            ordered = {"vision": comps["vision"], "embed": embed_c, "decoder": comps["decoder"]}
            source = str(Path(checkpoint).resolve()) if kind == "checkpoint" else kind
            notes = []
            if is_random:
                notes.append(f"random-init: weights are random (seed {seed}); outputs are meaningless, use this "
                             f"bundle for latency and memory work only")
            if tok_entry.get("stand_in"):
                notes.append("tokenizer: a stand-in BPE trained on the synthetic data, not the model's tokenizer")
            if not parity:
                notes.append("parity validation was skipped (--skip-parity)")
            m = {
                "model": model_entry(mcfg, random_init=is_random, source=source),
                "visual_tokens": mcfg.visual_tokens,
                "prompt": prompt_entry(mcfg.conv_template, bos_token_id=mcfg.llm.bos_token_id,
                                       eos_token_id=mcfg.llm.eos_token_id, pad_token_id=mcfg.llm.pad_token_id),
                "preprocess": PreprocessConfig(image_size=mcfg.vision.image_size, mean=mcfg.image_mean,
                                               std=mcfg.image_std, aspect_ratio=mcfg.image_aspect_ratio).to_dict(),
                "tokenizer": tok_entry,
                "components": ordered,
                "precision": recipe.name,
                "recipe": recipe.to_dict(),
                "target": tgt.to_dict(),
                "memory_plan": plan,
                "parity": {"passed": bool(parity_results) and all(r["passed"] for r in parity_results.values()),
                           "skipped": not parity, "seed": seed},
                "export": {"exporter": "torch.onnx.export(dynamo=True)" + (
                           " + onnxruntime-genai model builder (decoder)" if graph_kind == "gqa" else ""),
                       "decoder_graph": graph_kind, "opset": opset, "seed": seed,
                           "source_kind": kind, "versions": _versions(), "python": platform.python_version(),
                           "timings_s": dict(stages.timings), "peak_rss_bytes": peak_rss_bytes()},
                "notes": notes,
            }
            if trt_report is not None:
                m["tensorrt"] = trt_report
            from edgevlm.planner import plan_memory_from_manifest

            # the recorded plan: from what the manifest says (KV dtype / buffering, the engines' context)
            m["memory_plan"] = plan_memory_from_manifest(m, model_cfg=mcfg, target=tgt, suggest=True).to_dict()
            w.set_manifest(m)

        stages.run("manifest", manifest)
        w.manifest["export"]["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    log.info("exported %s%s to %s in %.1f s", mcfg.name, " (random-init)" if is_random else "", out,
             time.perf_counter() - t_start)
    return Path(out)


__all__ = ["export_bundle", "resolve_recipe", "resolve_target", "write_tokenizer", "ComponentPrecision", "ExportRecipe", "tensorrt_checks", "memory_plan",
           "peak_rss_bytes", "STAGES", "DEFAULT_TARGET", "DEFAULT_PRECISION", "EMBED_FILE", "DECODER_GRAPHS",
           "resolve_decoder_graph", "check_dla_request"]
