"""MobileVLM's two-stage training recipe (plus a "vision" stage for random-init presets), single-process or DDP.

Stages (``[[stages]]`` tables in a recipe TOML, run in order; ../shared/reference/mobilevlm.md §6):

============  ==============================  ===========  ==============================================
stage preset  trains                          template     role
============  ==============================  ===========  ==============================================
``tower``     vision tower + projector        labels       stage 0, edgevlm only: a small preset starts
                                                           from random weights and has no pre-trained CLIP
                                                           tower; this stage pre-trains one (linear heads
                                                           per question type classify the answers from
                                                           the visual tokens; see ``tower.py``). Needs
                                                           typed QA (the synthetic set). The demo recipe.
``vision``    vision tower + projector + LLM  vicuna_v1    stage 0 alternative for untyped data: the tower
                                                           learns end to end through the LLM (slower).
                                                           Neither is used for the released models, whose
                                                           tower stays frozen.
``align``     projector                       plain        stage 1, feature alignment (MobileVLM V1)
``instruct``  projector + LLM (or LoRA)       vicuna_v1    stage 2, visual instruction tuning
============  ==============================  ===========  ==============================================

A stage table names a preset (``preset = "align"``, or a ``name`` equal to a preset) and may override what it
trains (``train = ["projector", "llm"]`` is MobileVLM V2's stage 1) and its template (``plain`` =
``<image>`` + caption + ``\\n``, caption supervised; ``vicuna_v1`` = the chat template, only the assistant answers
and their ``</s>`` supervised). ``--train-vision-tower`` adds the vision tower to the trainable parts of *every*
stage. The tower's layers past ``mm_vision_select_layer`` (and its ``post_layernorm``) never influence the output;
they are always frozen. Trainable parameter counts per part are logged at every stage start.

Optimisation: AdamW (no weight decay on biases / norms), linear warm-up then cosine decay per stage, gradient
clipping (1.0), a separate learning rate for the projector (V2's ``mm_projector_lr``), bf16 autocast where the
CPU/GPU supports it *and* it is measurably faster (``bf16 = "auto"``), optional LoRA on the LLM's linear layers
(``lora_r > 0``; merged into the weights at the end of the stage, so checkpoints keep MobileVLM's format). The loss
is the sum of token cross-entropies over the *global* batch divided by its number of supervised tokens, so
gradient accumulation, DDP and FSDP (any world size) give the same update as one big batch. Precision: the weights
are fp32 masters (as are gradients and AdamW's moments); bf16 autocast only casts what each op reads; AdamW is
fused on CUDA, foreach elsewhere.

Speed (docs/training.md): global batches grouped by length and micro-batches padded to a few bucketed lengths
(``batching.py``), collated by DataLoader workers into pinned memory and normalized on the device, a mask-free
causal forward for right-padded batches (SDPA's flash kernel), FSDP2 under torchrun with ``shard = "fsdp"``
(``sharding.py``). ``train_log.json`` reports per stage the warm-up and steady-state step times, tokens/s, model
FLOPs per token and MFU (``perf.py``, ``flops.py``); ``profile = true`` writes a torch.profiler trace.

Outputs in ``out``: ``checkpoint/`` (MobileVLM HF format with the tokenizer), ``tokenizer/``, ``train_log.json``
(config, environment, per-step loss / lr / tokens / step time, per-stage summaries with speed, final evaluation),
``eval.json`` (predictions), ``profile/`` with ``profile = true``, and ``data/`` when the synthetic set was
generated. Data, tokenizer and images are validated before
anything is written: bad data raises ``DataError`` and leaves no output directory behind.

    >>> from edgevlm.train.recipe import train
    >>> result = train("configs/train/demo.toml", out="runs/demo")          # flags as keyword overrides
    >>> result.checkpoint, result.eval["accuracy"], result.timings["train_s"]

Command line: ``edgevlm train --config configs/train/demo.toml --out runs/demo``; DDP: see ``distributed.py``;
FSDP: ``sharding.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import ConfigError, DataError, EdgeVLMError
from edgevlm.outputs import check_destination, mark
from edgevlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from edgevlm.train import distributed as ddp
from edgevlm.train.tower import LABELS_TEMPLATE, TowerLoss

log = logging.getLogger(__name__)

PARTS = ("vision", "projector", "llm")
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "tower": {"train": ("vision", "projector"), "template": "labels"},
    "vision": {"train": ("vision", "projector", "llm"), "template": "vicuna_v1"},
    "align": {"train": ("projector",), "template": "plain"},
    "instruct": {"train": ("projector", "llm"), "template": "vicuna_v1"},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16_MODES = ("auto", "on", "off")


class TrainingError(EdgeVLMError):
    """Training cannot go on (the loss diverged to NaN/inf, ...)."""


# ---- configuration ----------------------------------------------------------------------------------------------
@dataclass
class StageConfig:
    """One training stage. ``steps`` (optimizer steps) wins over ``epochs`` when both are set."""

    name: str
    train: tuple[str, ...] = ("projector", "llm")
    template: str = "vicuna_v1"
    epochs: float | None = 1.0
    steps: int | None = None
    lr: float = 2e-5
    projector_lr: float | None = None         # None = lr
    warmup: float = 0.03                      # < 1: fraction of the stage's steps; >= 1: steps
    min_lr_ratio: float = 0.0                 # cosine floor as a fraction of lr
    weight_decay: float | None = None         # None = TrainConfig.weight_decay
    batch_size: int | None = None             # global batch of this stage; None = TrainConfig.batch_size
    lora_r: int = 0                           # > 0: LoRA on the LLM instead of full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        bad = [p for p in self.train if p not in PARTS]
        if bad or not self.train:
            raise ConfigError(f"stage '{self.name}': train = {list(self.train)}; choose parts from "
                              f"{', '.join(PARTS)} (at least one)")
        from edgevlm.train.dataset import TEMPLATE_NAMES
        from edgevlm.train.tower import LABELS_TEMPLATE

        if self.template not in (*TEMPLATE_NAMES, LABELS_TEMPLATE):
            raise ConfigError(f"stage '{self.name}': template '{self.template}' unknown; known: "
                              f"{', '.join((*TEMPLATE_NAMES, LABELS_TEMPLATE))}")
        if self.template == LABELS_TEMPLATE and ("llm" in self.train or self.lora_r):
            raise ConfigError(f"stage '{self.name}': the '{LABELS_TEMPLATE}' objective (tower pre-training) does not "
                              f"involve the LLM; train = [\"vision\", \"projector\"]")
        if self.steps is None and self.epochs is None:
            raise ConfigError(f"stage '{self.name}': set steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"stage '{self.name}': steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"stage '{self.name}': epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or (self.projector_lr is not None and self.projector_lr <= 0):
            raise ConfigError(f"stage '{self.name}': learning rates must be > 0")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"stage '{self.name}': warmup must be >= 0 and min_lr_ratio in [0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"stage '{self.name}': batch_size must be >= 1")
        if self.lora_r < 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"stage '{self.name}': lora_r must be >= 0 and lora_dropout in [0, 1)")
        if self.lora_r and "llm" not in self.train:
            raise ConfigError(f"stage '{self.name}': lora_r = {self.lora_r} but the stage does not train the llm")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageConfig":
        d = dict(d)
        name = str(d.get("name") or d.get("preset") or "")
        preset_name = d.pop("preset", name if name in STAGE_PRESETS else None)
        if not name:
            raise ConfigError(f"a [[stages]] table needs a name (or preset = one of {', '.join(STAGE_PRESETS)})")
        if preset_name is None:
            if "train" not in d:
                raise ConfigError(f"stage '{name}' is no preset ({', '.join(STAGE_PRESETS)}); say what it trains: "
                                  f"train = [\"projector\", \"llm\"]")
            preset: dict[str, Any] = {}
        elif preset_name not in STAGE_PRESETS:
            raise ConfigError(f"stage preset '{preset_name}' unknown; known: {', '.join(STAGE_PRESETS)}")
        else:
            preset = STAGE_PRESETS[preset_name]
        d["name"] = name
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"stage '{name}': unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "steps" in d and "epochs" not in d:
            d["epochs"] = None
        return cls(**{**preset, **d})


def default_stages() -> list[StageConfig]:
    """MobileVLM V1's recipe: align (projector, plain, lr 1e-3) then instruct (projector + LLM, v1, lr 2e-5)."""
    return [StageConfig("align", train=("projector",), template="plain", lr=1e-3),
            StageConfig("instruct", train=("projector", "llm"), template="vicuna_v1", lr=2e-5)]


@dataclass
class TrainConfig:
    """Everything a training run needs. A recipe TOML holds these keys at the top level plus ``[[stages]]``."""

    model: str | None = None                  # registry name (random init) ...
    init: str | None = None                   # ... or a MobileVLM checkpoint directory to start from
    data: str | None = None                   # LLaVA dir: {data}/{train_split}.json, images relative to it
    synthetic: bool = False                   # generate the synthetic shapes set into {out}/data
    synthetic_train: int = 4000
    synthetic_val: int = 0
    synthetic_test: int = 500
    synthetic_seed: int = 0
    synthetic_multi_turn: bool = False        # train split: every question of an image in one conversation
    tokenizer: str | None = None              # tokenizer dir; default: init checkpoint's, {data}/tokenizer, or trained
    train_split: str = "train"
    eval_split: str | None = "test"           # "" / "none" = no final evaluation
    max_samples: int | None = None            # use only the first N training records
    eval_samples: int | None = None
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 16
    out: str = "runs/train"
    overwrite: bool = False
    stages: list[StageConfig] = field(default_factory=default_stages)
    batch_size: int = 64                      # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    threads: int = 0                          # 0 = the cores available to this process / local ranks
    bf16: str = "auto"
    train_vision_tower: bool = False
    save_stage_checkpoints: bool = False
    device: str = "auto"
    progress: bool = True
    # -- speed (batching.py, perf.py, sharding.py)
    shard: str = "ddp"                        # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    group_by_length: int = 8                  # sort runs of N global batches by length (0 = plain shuffle)
    pad_multiple: int | None = None           # LLM sequence padded to a multiple of this; None = 64 CUDA, 8 CPU
    workers: int | None = None                # DataLoader worker processes; None = 2 on CUDA, 0 on CPU
    timing_warmup_steps: int = 5              # steps per stage left out of the steady-state speed figures
    peak_tflops: float | None = None          # dense bf16 peak per GPU for MFU (None = the table in flops.py)
    profile: bool = False                     # torch.profiler trace of a few steady-state steps per stage
    profile_steps: int = 3

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, StageConfig) else StageConfig.from_dict(s) for s in self.stages]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.eval_split in ("", "none", "None"):
            self.eval_split = None
        if not self.stages:
            raise ConfigError("no training stages; add [[stages]] tables (presets: tower, vision, align, instruct)")
        if self.bf16 not in BF16_MODES:
            raise ConfigError(f"bf16 = '{self.bf16}'; choose one of {', '.join(BF16_MODES)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if self.model is None and self.init is None:
            raise ConfigError("say what to train: model = a registry name (random init, e.g. 'demo') or init = a "
                              "MobileVLM checkpoint directory")
        if self.model is not None and self.init is not None:
            raise ConfigError(f"both model ('{self.model}') and init ('{self.init}') are set; keep one (a checkpoint "
                              f"already fixes the architecture)")
        if self.synthetic and self.data is not None:
            raise ConfigError(f"both synthetic = true and data = '{self.data}' are set; keep one")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device '{self.device}'; choose auto, cpu or cuda")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        from edgevlm.train.sharding import check_mode

        check_mode(self.shard)
        if self.group_by_length < 0 or (self.pad_multiple is not None and self.pad_multiple < 1) or \
                (self.workers is not None and self.workers < 0) or self.timing_warmup_steps < 0 or \
                self.profile_steps < 1 or (self.peak_tflops is not None and self.peak_tflops <= 0):
            raise ConfigError("group_by_length, workers and timing_warmup_steps must be >= 0; pad_multiple and "
                              "profile_steps >= 1; peak_tflops > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        for s in d["stages"]:
            s["train"] = list(s["train"])
        return d


#: Per-stage keys a keyword override (CLI flag) sets on every stage.
STAGE_OVERRIDES = ("steps", "epochs", "lr", "projector_lr", "warmup", "lora_r", "lora_alpha", "lora_dropout")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file '{path}' does not exist; see configs/train/*.toml")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc})") from exc


def make_config(config: "TrainConfig | dict[str, Any] | str | os.PathLike | None" = None,
                **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from a recipe file / dict / config plus overrides (``None`` values mean "not given").

    Top-level overrides replace the file's keys. ``steps``, ``epochs``, ``lr``, ``projector_lr``, ``warmup`` and
    ``lora_*`` apply to every stage; ``stages`` may be a list of stage names that selects (and orders) the file's
    stages, or a list of stage dicts / ``StageConfig`` that replaces them."""
    if isinstance(config, TrainConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base = json.loads(json.dumps(config))
    elif config is None:
        base = {}
    else:
        base = load_config_file(config)
    ov = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted((set(base) | set(ov)) - known - set(STAGE_OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} and the "
                          f"per-stage {', '.join(STAGE_OVERRIDES)}")
    stages = base.pop("stages", None)
    stage_ov = {k: ov.pop(k) for k in STAGE_OVERRIDES if k in ov}
    sel = ov.pop("stages", None)
    if sel is not None:
        if all(isinstance(s, str) for s in sel):
            pool = {str(s.get("name") or s.get("preset")): s for s in (stages or [])} if stages else {}
            chosen = []
            for name in sel:
                if name in pool:
                    chosen.append(pool[name])
                elif name in STAGE_PRESETS:
                    chosen.append({"name": name})
                else:
                    raise ConfigError(f"stage '{name}' is neither in the recipe ({', '.join(pool) or 'none'}) nor a "
                                      f"preset ({', '.join(STAGE_PRESETS)})")
            stages = chosen
        else:
            stages = [dataclasses.asdict(s) if isinstance(s, StageConfig) else dict(s) for s in sel]
    # Flags win over the file: data given on the command line replaces the file's synthetic set, and vice versa.
    if "data" in ov and "synthetic" not in ov:
        base.pop("synthetic", None)
    if ov.get("synthetic"):
        base.pop("data", None)
    if "init" in ov:
        base.pop("model", None)
    if "model" in ov:
        base.pop("init", None)
    merged = {**base, **ov}
    stage_dicts = [dataclasses.asdict(s) if isinstance(s, StageConfig) else dict(s) for s in stages] if stages \
        else [dataclasses.asdict(s) for s in default_stages()]
    for s in stage_dicts:
        if "batch_size" in ov:            # a --batch-size flag wins over per-stage batch sizes too
            s["batch_size"] = None
        if "steps" in stage_ov:
            s["epochs"] = None
        if "epochs" in stage_ov:
            s["steps"] = None
        s.update(stage_ov)
    merged["stages"] = [StageConfig.from_dict(s) for s in stage_dicts]
    try:
        return TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad recipe value: {exc}") from exc


# ---- environment / precision ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(threads: int | None = None, info: ddp.DistInfo | None = None) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0],
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    try:
        import psutil

        env["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        env["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    if info is not None:
        env["distributed"] = info.to_dict()
    return env


def _cpu_bf16_supported() -> bool:
    try:
        a = torch.randn(16, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = a @ a.T
        return y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    except (RuntimeError, TypeError):
        return False


def _bf16_speedup(hidden: int, ffn: int, device: torch.device) -> float:
    """fp32 time / bf16-autocast time of an MLP block's forward + backward at the model's width."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(hidden, ffn), nn.SiLU(), nn.Linear(ffn, hidden)).to(device)
    x = torch.randn(2048, hidden, device=device)

    def run(enabled: bool) -> float:
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                y = mlp(x)
            y.float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    run(False), run(True)                     # warm-up
    return run(False) / run(True)


def resolve_bf16(mode: str, device: torch.device, hidden: int, ffn: int) -> tuple[bool, str]:
    """(use bf16 autocast?, why). ``auto``: on only where supported and >= 10% faster at the model's width."""
    if mode == "off":
        return False, "off (requested)"
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_bf16_supported()
    if mode == "on":
        if not supported:
            raise ConfigError(f"bf16 = 'on' but this {device.type.upper()} has no bf16 support; use --bf16 off")
        return True, "on (requested)"
    if not supported:
        return False, "auto: bf16 not supported here"
    if device.type == "cuda":
        return True, "auto: supported on this GPU"
    speedup = _bf16_speedup(hidden, ffn, device)
    if speedup >= 1.1:
        return True, f"auto: supported and {speedup:.2f}x faster than fp32 here"
    return False, f"auto: supported but only {speedup:.2f}x the fp32 speed here"


# ---- model parts ------------------------------------------------------------------------------------------------
def unused_vision_parameters(model: Any) -> list[nn.Parameter]:
    """Tower parameters that never reach the selected hidden state (layers after it, post_layernorm)."""
    clip = model.vision_tower.clip
    vm = clip.vision_model if hasattr(clip, "vision_model") else clip
    mods = list(vm.encoder.layers[model.vision_tower.num_used_layers:]) + [vm.post_layernorm]
    return [p for m in mods for p in m.parameters()]


def part_parameters(model: Any) -> dict[str, list[tuple[str, nn.Parameter]]]:
    return {"vision": list(model.vision_tower.named_parameters()),
            "projector": list(model.mm_projector.named_parameters()),
            "llm": list(model.llm.named_parameters())}


def set_trainable(model: Any, parts: Sequence[str]) -> None:
    """Freeze everything, then unfreeze ``parts`` (minus the tower's unused tail)."""
    model.requires_grad_(False)
    for part, params in part_parameters(model).items():
        if part in parts:
            for _, p in params:
                p.requires_grad_(True)
    for p in unused_vision_parameters(model):
        p.requires_grad_(False)


def parameter_report(model: Any) -> dict[str, dict[str, int]]:
    return {part: {"trainable": sum(p.numel() for _, p in ps if p.requires_grad),
                   "total": sum(p.numel() for _, p in ps)} for part, ps in part_parameters(model).items()}


def add_lora(model: Any, stage: StageConfig) -> Any:
    """Inject LoRA adapters into the LLM's linear layers in place; returns the ``PeftModel`` handle."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from edgevlm.errors import MissingDependency

        raise MissingDependency("peft", "export", "LoRA fine-tuning (lora_r > 0)") from exc
    cfg = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, lora_dropout=stage.lora_dropout,
                     target_modules=list(LORA_TARGETS), bias="none")
    with warnings.catch_warnings():             # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        handle = get_peft_model(model.llm, cfg)  # modifies model.llm in place (LoRA layers wrap its Linears)
    return handle


def merge_lora(model: Any, handle: Any) -> None:
    merged = handle.merge_and_unload()
    model.llm = merged
    model.llm.requires_grad_(False)


class LossModule(nn.Module):
    """``MobileVLM`` -> summed cross-entropy over the supervised tokens of a batch. This is the module DDP wraps.

    The LM head runs only on supervised positions. With ``share_prefix`` (the default), when every row starts
    with the same unsupervised tokens before the image (the Vicuna system prompt: ~half of a stage-2 sequence),
    that prefix runs through the LLM once and its keys/values are broadcast to the batch; gradients flow back
    through the broadcast, so loss and gradients equal the plain forward (tests check it) at ~half the LLM cost.
    """

    def __init__(self, vlm: Any, share_prefix: bool = True, min_prefix: int = 8) -> None:
        super().__init__()
        self.vlm = vlm
        self.share_prefix = share_prefix
        self.min_prefix = min_prefix

    def shared_prefix_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor) -> int:
        """Tokens shared by every row before its image placeholder, unmasked and unsupervised (0 = none)."""
        if not self.share_prefix or input_ids.shape[0] < 2:
            return 0
        first_img = int((input_ids == IMAGE_TOKEN_INDEX).int().argmax(dim=1).min())
        same = (input_ids[:, :first_img] == input_ids[:1, :first_img]).all(dim=0)
        p = int(same.int().cumprod(0).sum()) if first_img else 0
        # The token after the prefix is predicted from the prefix's last hidden state: keep it unsupervised too.
        if p < self.min_prefix or not bool((labels[:, :p + 1] == IGNORE_INDEX).all()) or \
                not bool(attention_mask[:, :p].all()):
            return 0
        return p

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, prefix: int | None = None, right_padded: bool = False) -> torch.Tensor:
        """Summed cross-entropy. ``prefix``: the shared prefix length when the caller computed it on the host
        (``shared_prefix_length`` on the CPU copy of the batch: no device sync); ``right_padded``: every row's
        padding is at its end, so the LLM runs with a plain causal mask (real tokens never attend to the padding
        after them; padded positions carry no loss) and SDPA can take its flash kernel."""
        vlm = self.vlm
        llama = vlm.llm.model
        image_embeds = vlm.encode_images(pixel_values)                          # [B, V, D]
        p = self.shared_prefix_length(input_ids, attention_mask, labels) if prefix is None else prefix
        if p:
            from transformers import DynamicCache

            from edgevlm.model.hf_compat import with_cache

            b = input_ids.shape[0]
            prefix = vlm.embed_tokens(input_ids[:1, :p])                        # [1, p, D]
            pos = torch.arange(p, device=input_ids.device)[None]
            cache = DynamicCache()
            llama(inputs_embeds=prefix, position_ids=pos, **with_cache(cache), use_cache=True)
            shared = DynamicCache()
            for i, layer in enumerate(cache.layers):                           # keys/values [1, H, p, hd]
                shared.update(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1), i)
            s = vlm.splice(input_ids[:, p:], image_embeds, attention_mask[:, p:], labels[:, p:])
            mask = None if right_padded else torch.cat([s.attention_mask.new_ones((b, p)), s.attention_mask], dim=1)
            hidden = llama(inputs_embeds=s.inputs_embeds, attention_mask=mask, position_ids=s.position_ids + p,
                           **with_cache(shared), use_cache=True).last_hidden_state   # [B, T' - p, D]
        else:
            s = vlm.splice(input_ids, image_embeds, attention_mask, labels)
            hidden = llama(inputs_embeds=s.inputs_embeds, attention_mask=None if right_padded else s.attention_mask,
                           position_ids=s.position_ids, use_cache=False).last_hidden_state   # [B, T', D]
        targets = s.labels[:, 1:]                                               # [B, T'-1]
        sel = targets != IGNORE_INDEX
        logits = vlm.llm.lm_head(hidden[:, :-1][sel])                           # [N, vocab]
        return F.cross_entropy(logits.float(), targets[sel], reduction="sum")


# ---- schedule / optimizer ---------------------------------------------------------------------------------------
def lr_lambda(total: int, warmup: float, min_ratio: float):
    warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    warm = min(warm, max(total - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def build_optimizer(model: Any, stage: StageConfig, cfg: TrainConfig, projector: nn.Module | None = None
                    ) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters (``model`` may be a loss module that owns extra heads);
    ``projector`` (default ``model.mm_projector``) gets ``stage.projector_lr``."""
    wd = cfg.weight_decay if stage.weight_decay is None else stage.weight_decay
    proj_ids = {id(p) for p in (projector if projector is not None else model.mm_projector).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in proj_ids, p.ndim >= 2), []).append(p)
    param_groups = []
    for (is_proj, decay), ps in sorted(groups.items()):
        lr = (stage.projector_lr or stage.lr) if is_proj else stage.lr
        param_groups.append({"params": ps, "lr": lr, "weight_decay": wd if decay else 0.0,
                             "name": ("projector" if is_proj else "main") + ("" if decay else "_no_decay")})
    return torch.optim.AdamW(param_groups, lr=stage.lr, betas=cfg.betas, eps=cfg.adam_eps,
                             **optimizer_kernel(param_groups))


def optimizer_kernel(param_groups: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """AdamW's implementation: ``fused`` (one kernel for all parameters) when every parameter is on a CUDA device,
    ``foreach`` (batched per-op kernels) elsewhere. Both give the plain AdamW update on fp32 master weights."""
    devices = {p.device.type for g in param_groups for p in g["params"]}
    return {"fused": True} if devices == {"cuda"} else {"foreach": True}


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    checkpoint: Path | None
    log_path: Path | None
    log: dict[str, Any]
    eval: dict[str, Any] | None
    timings: dict[str, float]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ---- data -------------------------------------------------------------------------------------------------------
def _synthetic_matches(d: Path, cfg: TrainConfig, image_size: int) -> bool:
    try:
        info = json.loads((d / "dataset_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = {k: v for k, v in (("train", cfg.synthetic_train), ("val", cfg.synthetic_val),
                              ("test", cfg.synthetic_test)) if v}
    return info.get("splits") == want and info.get("seed") == cfg.synthetic_seed and \
        info.get("image_size") == image_size and bool(info.get("multi_turn_train")) == cfg.synthetic_multi_turn


def _split_path(data: Path, split: str) -> Path | None:
    for ext in (".json", ".jsonl"):
        if (data / f"{split}{ext}").is_file():
            return data / f"{split}{ext}"
    return None


def _out_is_free(out: Path, overwrite: bool) -> None:
    """``out`` is absent, empty, or an earlier run's folder (marker, ``edgevlm.outputs``) and ``overwrite`` is set
    (checkpoint/, tokenizer/, stages/, data/, train_log.json and eval.json there are replaced)."""
    check_destination(out, "train", overwrite=overwrite)


# ---- the loop ---------------------------------------------------------------------------------------------------
def _stage_module(si: int, stage: StageConfig, cfg: TrainConfig, model: Any, dataset: Any, info: ddp.DistInfo
                  ) -> tuple[nn.Module, Any, dict[str, Any], tuple[str, ...]]:
    """(the stage's loss module over ``model``, its LoRA handle or None, parameter report, trained parts)."""
    parts = tuple(stage.train) + (("vision",) if cfg.train_vision_tower and "vision" not in stage.train else ())
    set_trainable(model, parts)
    lora = None
    if stage.lora_r:
        torch.manual_seed(cfg.seed + 7919 * (si + 1))
        lora = add_lora(model, stage)        # the base LLM weights freeze; only the adapters train
    report: dict[str, Any] = parameter_report(model)
    if lora is not None:
        report["llm"]["lora_adapters"] = sum(p.numel() for n, p in model.llm.named_parameters()
                                             if p.requires_grad and "lora_" in n)
    if stage.template == LABELS_TEMPLATE:     # tower pre-training: heads built (seeded) before the optimizer
        torch.manual_seed(cfg.seed + 7919 * (si + 1))
        heads_dev = torch.device("cpu") if cfg.shard == "fsdp" and info.enabled else info.device
        module: nn.Module = TowerLoss(model, dataset.labels).to(heads_dev)
        report["heads"] = {"trainable": sum(p.numel() for p in module.heads.parameters()),
                           "total": sum(p.numel() for p in module.heads.parameters())}
    else:
        module = LossModule(model)
    return module, lora, report, parts


def _run_stage(si: int, stage: StageConfig, cfg: TrainConfig, model: Any, dataset: Any, info: ddp.DistInfo,
               use_bf16: bool, t_start: float, step_log: list[dict[str, Any]], global_step: int,
               out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from edgevlm.train import batching, perf, sharding
    from edgevlm.train.flops import FlopModel, peak_tflops

    module, lora, report, parts = _stage_module(si, stage, cfg, model, dataset, info)
    labels_stage = stage.template == LABELS_TEMPLATE
    if info.is_main:
        desc = ", ".join(f"{k} {v['trainable']:,}/{v['total']:,}" for k, v in report.items())
        log.info("stage %d/%d '%s' (%s template): trainable parameters %s%s", si + 1, len(cfg.stages), stage.name,
                 stage.template, desc, f" (LoRA r={stage.lora_r})" if lora else "")
    world, accum = info.world_size, cfg.grad_accum
    batch = stage.batch_size or cfg.batch_size
    if batch % (world * accum):
        raise ConfigError(f"stage '{stage.name}': batch_size {batch} is not divisible by world size {world} x "
                          f"grad_accum {accum}; choose a multiple of {world * accum}")
    sampler = batching.GlobalBatches(len(dataset), batch, world, info.rank, accum, cfg.seed + 1000 * si,
                                     lengths=getattr(dataset, "lengths", None), group_by_length=cfg.group_by_length)
    micro, per_epoch = sampler.micro, sampler.per_epoch
    if per_epoch == 0:
        raise ConfigError(f"stage '{stage.name}': the global batch ({batch}) is larger than the training set "
                          f"({len(dataset)} examples); lower batch_size")
    total = stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * per_epoch))
    dev = info.device
    cuda = dev.type == "cuda"
    fsdp = cfg.shard == "fsdp" and info.enabled
    if fsdp:                                  # a sharded copy trains; `module` keeps the plain weights (rank 0)
        if isinstance(module, LossModule):
            # The shared prefix's keys/values reach the main pass through the KV cache, not through a decoder
            # layer's output, so FSDP2 would not re-gather a layer's weights for the prefix's backward.
            module.share_prefix = False
        trained = sharding.shard_copy(module, info, bf16=use_bf16)
        wrapped = trained
    else:
        trained = module
        wrapped = ddp.wrap(module, info)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    opt = build_optimizer(trained, stage, cfg, projector=trained.vlm.mm_projector)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, stage.warmup, stage.min_lr_ratio))
    # -- data: collated off the training thread (workers), pinned, copied asynchronously, normalized on device
    visual = model.cfg.visual_tokens
    pad_multiple = cfg.pad_multiple or (64 if cuda else 8)
    workers = cfg.workers if cfg.workers is not None else (2 if cuda else 0)
    loader = batching.make_loader(dataset, sampler, workers=workers, pin_memory=cuda, pad_multiple=pad_multiple,
                                  extra=visual - 1)
    batches = iter(loader)
    normalize = dataset.images.normalize
    # -- speed accounting
    heads = sum(len(a) for a in dataset.labels.answers.values()) if labels_stage else 0
    fm = FlopModel.for_stage(model.cfg, parts, lora_params=report["llm"].get("lora_adapters", 0),
                             head_outputs=heads)
    peak, peak_source = peak_tflops(torch.cuda.get_device_name(dev) if cuda else None, cfg.peak_tflops)
    prof = None
    if cfg.profile and info.is_main:
        start = min(cfg.timing_warmup_steps, max(total - cfg.profile_steps, 0))
        prof = perf.StepProfiler(out / "profile", f"{si + 1}-{stage.name}", start,
                                 min(cfg.profile_steps, total - start), cuda)
    trained.train()
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    bar = tqdm(total=total, desc=f"stage {si + 1}/{len(cfg.stages)} {stage.name}", unit="step",
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    losses: list[float] = []
    speed: dict[str, list] = {"step_s": [], "tokens": [], "supervised": [], "samples": [], "flops": [], "shapes": []}
    samples = 0
    epoch = 0
    for step in range(total):
        t_step = time.perf_counter()
        epoch = step // per_epoch
        host = [next(batches) for _ in range(accum)]                # this rank's micro-batches, on the host
        counts = [batching.batch_counts(mb, visual, IGNORE_INDEX) for mb in host]
        prefixes = [0 if labels_stage else module.shared_prefix_length(mb["input_ids"], mb["attention_mask"],
                                                                       mb["labels"]) for mb in host]
        flops = sum(fm.step_flops(c["rows"], c["supervised"], c["images"], p) for c, p in zip(counts, prefixes))
        mbs = [batching.to_device(mb, dev, normalize) for mb in host]
        # (labels stage: `supervised` counts labelled answers, so the loss is the mean cross-entropy per answer)
        sums = [float(sum(c["supervised"] for c in counts)), float(sum(sum(c["rows"]) for c in counts)), flops]
        if info.enabled:                      # the global batch's counts (single process: no device round trip)
            sums = ddp.all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=dev), info).tolist()
        n_sup, n_tokens, step_flops = sums
        denom = max(n_sup, 1.0)
        loss_sum = torch.zeros(1, device=dev)
        for k, mb in enumerate(mbs):
            with sharding.no_sync(wrapped, info, last=k == len(mbs) - 1):
                with autocast():
                    ce = wrapped(mb["pixel_values"], mb["labels"]) if labels_stage else \
                        wrapped(mb["input_ids"], mb["pixel_values"], mb["attention_mask"], mb["labels"],
                                prefix=prefixes[k], right_padded=True)
                (ce * (world / denom)).backward()
            loss_sum += ce.detach().float()
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(ddp.all_reduce_sum(loss_sum, info).item()) / denom
        step_s = time.perf_counter() - t_step
        if not math.isfinite(loss):
            raise TrainingError(f"stage '{stage.name}' step {step}: the loss is {loss}; lower the learning rate "
                                f"(now {stage.lr:g}) or turn bf16 off")
        if prof is not None:
            prof.step()
        losses.append(loss)
        samples += batch
        for key, value in (("step_s", step_s), ("tokens", n_tokens), ("supervised", n_sup), ("samples", batch),
                           ("flops", step_flops), ("shapes", tuple(c["shape"] for c in counts))):
            speed[key].append(value)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        lr_main = lrs.get("main", lrs.get("main_no_decay", next(iter(lrs.values()))))
        lr_proj = lrs.get("projector", lrs.get("projector_no_decay"))
        entry = {"step": global_step + step + 1, "stage": stage.name, "stage_step": step + 1, "epoch": epoch,
                 "loss": round(loss, 6), "lr": lr_main, "elapsed_s": round(time.perf_counter() - t_start, 3),
                 "tokens": int(n_sup), "llm_tokens": int(n_tokens), "step_s": round(step_s, 5)}
        if lr_proj is not None and lr_proj != lr_main:
            entry["projector_lr"] = lr_proj
        if gnorm is not None:
            entry["grad_norm"] = round(sharding.local_float(gnorm), 5)
        step_log.append(entry)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_main:.2e}", refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    profiled = prof.close() if prof is not None else None
    del batches, loader                       # stops the DataLoader workers
    head_acc = None
    if labels_stage:                          # what the tower learned, read by its heads (training examples)
        trained.eval()
        rows = list(range(min(len(dataset), 512)))
        mb = {k: v.to(dev) for k, v in dataset.collate(rows).items()}
        with autocast(), sharding.unsharded(trained):
            head_acc = trained.accuracy(mb["pixel_values"], mb["labels"])
    if fsdp:
        sharding.gather_into(trained, module, info)          # rank 0's plain model gets the trained weights
    if lora is not None:
        merge_lora(model, lora)
    opt_kind = "fused" if opt.defaults.get("fused") else "foreach"
    del wrapped, trained, module, opt
    tail = losses[-max(1, min(20, len(losses) // 5)):]
    summary = {"name": stage.name, "train": list(parts), "template": stage.template, "steps": total,
               "epochs": round(total / per_epoch, 3), "steps_per_epoch": per_epoch, "examples": len(dataset),
               "lr": stage.lr, "projector_lr": stage.projector_lr or stage.lr, "warmup": stage.warmup,
               "lora_r": stage.lora_r, "parameters": report, "seconds": round(seconds, 2),
               "samples_per_s": round(samples / max(seconds, 1e-9), 1), "first_loss": losses[0],
               "final_loss": sum(tail) / len(tail), "micro_batch": micro, "grad_accum": accum,
               "global_batch": batch, "dataset": dataset.stats,
               "speed": perf.stage_throughput(speed["step_s"], speed["tokens"], speed["supervised"],
                                              speed["samples"], speed["flops"], cfg.timing_warmup_steps, peak,
                                              peak_source, world, speed["shapes"]),
               "execution": {"parallel": ("fsdp" if fsdp else "ddp") if info.enabled else "single",
                             "optimizer": f"AdamW ({opt_kind})",
                             "pad_multiple": pad_multiple, "group_by_length": cfg.group_by_length,
                             "loader_workers": workers, "pin_memory": cuda}}
    if profiled:
        summary["profile"] = profiled
    if head_acc is not None:
        summary["head_accuracy_train"] = {k: round(v, 4) for k, v in head_acc.items()}
    if info.is_main:
        sp = summary["speed"]
        log.info("stage '%s' done: %d steps in %.1f s (%.0f samples/s), loss %.4f -> %.4f; steady state %.3f s/step, "
                 "%.0f tokens/s%s%s", stage.name, total, seconds, summary["samples_per_s"], summary["first_loss"],
                 summary["final_loss"], sp["step_s_median"], sp["tokens_per_s"],
                 f", MFU {sp['mfu']:.1%}" if sp["mfu"] is not None else "",
                 "" if head_acc is None else "; head accuracy (train) " +
                 ", ".join(f"{k} {v:.1%}" for k, v in head_acc.items()))
    return summary


def train(config: "TrainConfig | dict[str, Any] | str | os.PathLike | None" = None, **overrides: Any) -> TrainResult:
    """Run the recipe. ``config``: a ``TrainConfig``, a dict or a recipe TOML path; keyword overrides win (see
    ``make_config``). Returns paths, the log dict, the final evaluation and timings (``data_s``, ``tokenizer_s``,
    ``train_s``, ``save_s``, ``eval_s``, ``total_s`` = everything but evaluation)."""
    cfg = make_config(config, **overrides)
    info = ddp.setup(cfg.device)
    old_threads = torch.get_num_threads()
    try:
        return _train(cfg, info)
    finally:
        torch.set_num_threads(old_threads)
        ddp.cleanup(info)


def _train(cfg: TrainConfig, info: ddp.DistInfo) -> TrainResult:
    from edgevlm.config import get_model_config
    from edgevlm.model import build_model, load_checkpoint, save_checkpoint
    from edgevlm.train.dataset import ImageCache, VLMDataset
    from edgevlm.train.evaluate import evaluate_records, preprocess_config
    from edgevlm.train.llava_data import load_dataset
    from edgevlm.train.tokenizer import check_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer_on_samples
    from edgevlm.train.tower import LABELS_TEMPLATE, LabelledImages

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    threads = cfg.threads or ddp.default_threads(info)
    torch.set_num_threads(threads)
    out = Path(cfg.out)
    err: EdgeVLMError | None = None
    try:
        _out_is_free(out, cfg.overwrite)
    except ConfigError as exc:
        err = exc
    created_out = not out.exists()
    if ddp.any_rank(err is not None, info):           # every rank checks before any rank writes
        raise err or ConfigError(f"rank 0 cannot use the output directory '{out}'")

    # -- model config (validated before anything is written)
    if cfg.init is not None:
        from edgevlm.model.checkpoint import from_hf_config

        init = Path(cfg.init)
        if not (init / "config.json").is_file():
            from edgevlm.errors import CheckpointError

            raise CheckpointError(f"init checkpoint '{init}' has no config.json; pass a MobileVLM checkpoint dir")
        model_cfg = from_hf_config(json.loads((init / "config.json").read_text()), init)
    else:
        model_cfg = get_model_config(cfg.model)
    pcfg = preprocess_config(model_cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "train")                            # a later run with --overwrite may replace what this one writes

    try:
        # -- data
        t = time.perf_counter()
        if cfg.synthetic or cfg.data is None:
            if not cfg.synthetic and model_cfg.tokenizer != "trained":
                raise ConfigError(f"no training data: pass --data DIR (LLaVA format: DIR/{cfg.train_split}.json), or "
                                  f"--synthetic for the embedded shapes set")
            data_dir = out / "data"
            failed = False
            try:
                if info.is_main and not _synthetic_matches(data_dir, cfg, model_cfg.vision.image_size):
                    from edgevlm.train.synthetic import write_dataset

                    log.info("generating the synthetic dataset into %s", data_dir)
                    write_dataset(data_dir, train=cfg.synthetic_train, val=cfg.synthetic_val,
                                  test=cfg.synthetic_test, seed=cfg.synthetic_seed,
                                  multi_turn=cfg.synthetic_multi_turn,
                                  image_size=model_cfg.vision.image_size, overwrite=True, progress=cfg.progress)
            except BaseException:
                failed = True
                raise
            finally:
                if ddp.any_rank(failed, info) and not failed:     # the other ranks stop too instead of waiting
                    raise DataError("rank 0 failed to generate the synthetic dataset; see its error")
        else:
            data_dir = Path(cfg.data)
            if not data_dir.is_dir():
                raise DataError(f"data directory '{data_dir}' does not exist; pass a LLaVA-format directory with "
                                f"{cfg.train_split}.json (`edgevlm synth --out DIR` writes one) or --synthetic")
        train_file = _split_path(data_dir, cfg.train_split)
        if train_file is None:
            raise DataError(f"'{data_dir}' has no {cfg.train_split}.json / .jsonl; pass the directory that holds the "
                            f"training split (LLaVA format)")
        train_records = load_dataset(train_file, max_samples=cfg.max_samples)
        eval_records = None
        if cfg.eval_split:
            eval_file = _split_path(data_dir, cfg.eval_split)
            if eval_file is None:
                log.warning("no %s split in %s: skipping the final evaluation", cfg.eval_split, data_dir)
            else:
                eval_records = load_dataset(eval_file, max_samples=cfg.eval_samples)
        images = ImageCache([r.image_path for r in train_records], pcfg, progress=cfg.progress and info.is_main)
        eval_images = ImageCache([r.image_path for r in eval_records], pcfg) if eval_records and info.is_main \
            else None
        timings["data_s"] = time.perf_counter() - t

        # -- tokenizer
        t = time.perf_counter()
        tok_src = cfg.tokenizer or (cfg.init if cfg.init is not None else None)
        if tok_src is None and (data_dir / "tokenizer" / "tokenizer.json").is_file():
            tok_src = str(data_dir / "tokenizer")
        if tok_src is not None:
            tokenizer = load_tokenizer(tok_src)
            tok_origin = str(tok_src)
        elif model_cfg.tokenizer == "trained":
            from tokenizers import Tokenizer

            tok_json = None
            if info.is_main:
                tok_json = train_tokenizer_on_samples(train_records, model_cfg.llm.vocab_size).to_str()
            tokenizer = Tokenizer.from_str(ddp.broadcast_object(tok_json, info))
            tok_origin = f"trained on {len(train_records)} training records (vocab <= {model_cfg.llm.vocab_size})"
        else:
            raise ConfigError(f"model '{model_cfg.name}' uses the LLaMA tokenizer; pass --tokenizer DIR (a directory "
                              f"with tokenizer.json / tokenizer.model) or --init a checkpoint that has one")
        if model_cfg.tokenizer == "trained":
            check_tokenizer(tokenizer, model_cfg.llm.vocab_size)
        elif tokenizer.get_vocab_size() > model_cfg.llm.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                              f"{model_cfg.llm.vocab_size}")
        timings["tokenizer_s"] = time.perf_counter() - t

        # -- tokenized datasets, one per template in use (all validation ends here)
        t = time.perf_counter()
        max_text = model_cfg.context_length - model_cfg.visual_tokens + 1
        datasets: dict[str, Any] = {}
        for stage in cfg.stages:
            if stage.template == LABELS_TEMPLATE:
                datasets[stage.template] = LabelledImages(train_records, images, stage.name)
            elif stage.template not in datasets:
                if stage.template == "plain" and not any(r.caption for r in train_records):
                    log.info("stage '%s': records have no captions; the plain template uses their first answers",
                             stage.name)
                datasets[stage.template] = VLMDataset(
                    train_records, tokenizer, pcfg, template=stage.template, bos_token_id=model_cfg.llm.bos_token_id,
                    pad_token_id=model_cfg.llm.pad_token_id, max_length=max_text, images=images)
        timings["data_s"] += time.perf_counter() - t
    except BaseException:
        if created_out and info.is_main and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise

    # -- model
    t = time.perf_counter()
    if cfg.init is not None:
        model, model_cfg = load_checkpoint(cfg.init)
    else:
        model = build_model(model_cfg, seed=cfg.seed)
    fsdp = cfg.shard == "fsdp" and info.enabled
    if cfg.shard == "fsdp" and not info.enabled and info.is_main:
        log.warning("shard = 'fsdp' needs several processes (torchrun --nproc-per-node N); training in one process")
    model.to("cpu" if fsdp else info.device)  # FSDP: the plain model stays on the host, shards go to the device
    use_bf16, bf16_reason = resolve_bf16(cfg.bf16, info.device, model_cfg.llm.hidden_size,
                                         model_cfg.llm.intermediate_size)
    if info.enabled:   # every rank must take the same decision
        use_bf16 = bool(ddp.broadcast_object(use_bf16, info))
    timings["model_s"] = time.perf_counter() - t
    frozen_random = cfg.init is None and not cfg.train_vision_tower and \
        not any("vision" in s.train for s in cfg.stages)
    if frozen_random and info.is_main:
        log.warning("the vision tower is randomly initialised and no stage trains it; add a 'vision' stage or pass "
                    "--train-vision-tower")

    # -- outputs (rank 0)
    tok_dir = out / "tokenizer"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        save_tokenizer(tokenizer, tok_dir, model_max_length=model_cfg.context_length)
    env = environment_info(threads, info)
    run_log: dict[str, Any] = {
        "schema": "edgevlm.train_log/1", "config": cfg.to_dict(), "environment": env,
        "model": {"name": model_cfg.name, "config": model_cfg.to_dict(), "init": cfg.init,
                  "parameters": {k: v["total"] for k, v in parameter_report(model).items()}},
        "data": {"dir": str(data_dir), "train_records": len(train_records),
                 "eval_records": len(eval_records) if eval_records else 0,
                 "templates": {k: v.stats for k, v in datasets.items()}},
        "tokenizer": {"origin": tok_origin, "vocab_size": tokenizer.get_vocab_size()},
        "precision": {"bf16": use_bf16, "reason": bf16_reason, "master_weights": "float32",
                      "autocast": "bfloat16" if use_bf16 else None,
                      "fsdp_param_dtype": "bfloat16" if fsdp and use_bf16 and info.device.type == "cuda" else None},
        "stages": [], "steps": [], "eval": None, "timings": timings,
    }
    log_path = out / "train_log.json"
    if info.is_main:
        log.info("training %s on %d records (%s) with %d thread(s)%s, bf16 %s", model_cfg.name, len(train_records),
                 data_dir, threads, f", DDP world {info.world_size}" if info.enabled else "", bf16_reason)
        _write_json(log_path, run_log)

    # -- stages
    t_train = time.perf_counter()
    global_step = 0
    for si, stage in enumerate(cfg.stages):
        summary = _run_stage(si, stage, cfg, model, datasets[stage.template], info, use_bf16, t_start,
                             run_log["steps"], global_step, out)
        global_step += summary["steps"]
        run_log["stages"].append(summary)
        if info.is_main:
            if cfg.save_stage_checkpoints:
                save_checkpoint(model, out / "stages" / f"{si + 1}-{stage.name}", tokenizer_src=tok_dir,
                                overwrite=True)
            _write_json(log_path, run_log)
    timings["train_s"] = time.perf_counter() - t_train
    model.requires_grad_(False)
    model.eval()

    # -- checkpoint
    t = time.perf_counter()
    ckpt = out / "checkpoint"
    if info.is_main:
        save_checkpoint(model, ckpt, tokenizer_src=tok_dir, overwrite=True)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    # -- evaluation (rank 0, outside total_s)
    result_eval = None
    if eval_records and info.is_main:
        model.to(info.device)                 # (FSDP kept it on the host)
        t = time.perf_counter()
        result_eval = evaluate_records(model, tokenizer, eval_records, batch_size=cfg.eval_batch_size,
                                       max_new_tokens=cfg.eval_max_new_tokens, images=eval_images,
                                       progress=cfg.progress)
        timings["eval_s"] = time.perf_counter() - t
        result_eval["split"] = cfg.eval_split
        _write_json(out / "eval.json", result_eval)
        run_log["eval"] = {k: v for k, v in result_eval.items() if k != "predictions"}
        log.info("eval on %s (%d questions): exact match %.2f%%", cfg.eval_split, result_eval["total"],
                 100 * result_eval["accuracy"])
    run_log["timings"] = {k: round(v, 3) for k, v in timings.items()}
    with contextlib.suppress(OSError):
        run_log["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    if info.is_main:
        _write_json(log_path, run_log)
    ddp.barrier(info)
    return TrainResult(out=out, checkpoint=ckpt if info.is_main else None, log_path=log_path if info.is_main else None,
                       log=run_log, eval=result_eval, timings=timings)


__all__ = ["TrainConfig", "StageConfig", "TrainResult", "TrainingError", "train", "make_config", "load_config_file",
           "STAGE_PRESETS", "PARTS", "set_trainable", "parameter_report", "resolve_bf16", "environment_info",
           "LossModule", "lr_lambda"]
