"""Checkpoint I/O in MobileVLM's released Hugging Face format.

A checkpoint directory holds ``config.json`` (``model_type: "mobilevlm"`` + the ``mm_*`` fields), weights as
``model.safetensors`` / sharded safetensors with ``model.safetensors.index.json`` / ``pytorch_model.bin`` (+ index;
read with ``weights_only=True``), and the tokenizer files. Weight names are the released ones:

    model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight          (LLaMA decoder)
    model.vision_tower.vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}.*   (CLIP)
    model.mm_projector.*   (ldpnet: model.mlp.{1,3}, model.mb_block.{1,2}.block.*; ldpnetv2: mlp.mlp.{0,2},
                            peg.peg.0; mlp2x_gelu: 0, 2)

transformers 5's ``CLIPVisionModel`` has no ``vision_model`` level, so the map adds/strips it. Small presets store
their (non-CLIP-L) vision tower dims under the ``edgevlm`` key of config.json; released configs don't need it.

    >>> model, cfg = load_checkpoint("MobileVLM_V2-1.7B")          # every key consumed, none missing
    >>> save_checkpoint(model, "out/ckpt", tokenizer_src="MobileVLM_V2-1.7B")
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import torch

from edgevlm.config import CLIP_L14_336, LLMConfig, ModelConfig, VisionConfig, get_model_config, model_names
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.model.vlm import MobileVLM
from edgevlm.outputs import check_destination, mark, replace_dir, temp_dir_beside

log = logging.getLogger(__name__)

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJ_PREFIX = "model.mm_projector."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
# Buffers that older transformers saved and that carry no information (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


# ---- key map ----------------------------------------------------------------------------------------------------
def to_checkpoint_key(key: str) -> str:
    """Our module's ``state_dict`` key -> the released checkpoint key."""
    if key.startswith("vision_tower.clip."):
        rest = key[len("vision_tower.clip."):].removeprefix("vision_model.")
        return CLIP_PREFIX + rest
    if key.startswith("mm_projector."):
        return PROJ_PREFIX + key[len("mm_projector."):]
    if key.startswith("llm.model."):
        return "model." + key[len("llm.model."):]
    if key.startswith("llm.lm_head."):
        return key[len("llm."):]
    raise CheckpointError(f"no checkpoint name for module key '{key}'")


def checkpoint_key_map(model: MobileVLM) -> dict[str, str]:
    """{checkpoint key: module key} for every persistent tensor of ``model``."""
    return {to_checkpoint_key(k): k for k in model.state_dict()}


# ---- config.json ------------------------------------------------------------------------------------------------
def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    c, v = cfg.llm, cfg.vision
    d: dict[str, Any] = {
        "model_type": "mobilevlm", "architectures": ["MobileLlamaForCausalLM"],
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "max_sequence_length": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "torch_dtype": dtype, "use_cache": True,
        "mm_vision_tower": v.name, "vision_tower_type": "clip", "mm_hidden_size": v.hidden_size,
        "mm_vision_select_layer": v.select_layer, "mm_vision_select_feature": "patch",
        "mm_projector_type": cfg.projector_type, "image_aspect_ratio": cfg.image_aspect_ratio,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    d["edgevlm"] = {"name": cfg.name, "vision_config": asdict(v), "projector_tokens": cfg.projector_tokens,
                    "tokenizer": cfg.tokenizer, "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
                    "conv_template": cfg.conv_template, "llm_name": c.name, "description": cfg.description,
                    "hf_repo": cfg.hf_repo}
    return d


def _vision_from_hf(d: dict[str, Any], ckpt_dir: Path) -> VisionConfig:
    ext = d.get("edgevlm", {})
    if "vision_config" in ext:
        return VisionConfig(**ext["vision_config"])
    tower = str(d.get("mm_vision_tower", ""))
    select = int(d.get("mm_vision_select_layer", -2))
    if tower.rstrip("/").endswith("clip-vit-large-patch14-336"):
        local = Path(tower) if Path(tower).is_absolute() else ckpt_dir / tower
        if not (local / "config.json").is_file():
            return VisionConfig(**{**asdict(CLIP_L14_336), "select_layer": select})
    local = Path(tower) if Path(tower).is_absolute() else ckpt_dir / tower
    if (local / "config.json").is_file():
        vc = json.loads((local / "config.json").read_text())
        vc = vc.get("vision_config", vc)
        return VisionConfig(image_size=vc["image_size"], patch_size=vc["patch_size"], hidden_size=vc["hidden_size"],
                            num_layers=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"],
                            intermediate_size=vc["intermediate_size"], hidden_act=vc.get("hidden_act", "quick_gelu"),
                            layer_norm_eps=vc.get("layer_norm_eps", 1e-5), select_layer=select, name=tower)
    raise CheckpointError(f"{ckpt_dir}/config.json names vision tower '{tower}', which is neither "
                          f"openai/clip-vit-large-patch14-336 nor a local directory with a config.json; point "
                          f"mm_vision_tower at a local CLIP directory")


def from_hf_config(d: dict[str, Any], ckpt_dir: Path | str = ".", name: str | None = None) -> ModelConfig:
    """Read a MobileVLM ``config.json`` dict into a ``ModelConfig``."""
    ckpt_dir = Path(ckpt_dir)
    if d.get("model_type") not in ("mobilevlm", "mobilellama") and "mm_projector_type" not in d:
        raise CheckpointError(f"{ckpt_dir}/config.json has model_type '{d.get('model_type')}', not 'mobilevlm' "
                              f"(and no mm_projector_type): this is not a MobileVLM checkpoint")
    try:
        llm = LLMConfig(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                        num_heads=d["num_attention_heads"],
                        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                        intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                        max_position_embeddings=d.get("max_sequence_length") or d["max_position_embeddings"],
                        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta") or 10000.0,
                        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                        bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2),
                        pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
                        name=d.get("edgevlm", {}).get("llm_name", ""))
    except KeyError as exc:
        raise CheckpointError(f"{ckpt_dir}/config.json lacks the field {exc}; is it a MobileVLM config?") from exc
    projector = str(d.get("mm_projector_type", "ldpnet"))
    # MobileVLM's build_vision_projector matches by prefix (ldpnetv2 tested before ldpnet).
    for known in ("ldpnetv2", "ldpnet", "mlp2x_gelu"):
        if projector.startswith(known):
            projector = known
            break
    else:
        raise ConfigError(f"{ckpt_dir}/config.json: unknown projector type '{projector}'; known: ldpnet, ldpnetv2, "
                          f"mlp2x_gelu")
    ext = d.get("edgevlm", {})
    kwargs: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if key in ext:
            kwargs[key] = tuple(ext[key])
    cfg = ModelConfig(name=name or ext.get("name") or ckpt_dir.name, vision=_vision_from_hf(d, ckpt_dir), llm=llm,
                      projector_type=projector, projector_tokens=ext.get("projector_tokens"),
                      image_aspect_ratio=d.get("image_aspect_ratio", "pad"),
                      conv_template=ext.get("conv_template", "vicuna_v1"),
                      tokenizer=ext.get("tokenizer", "llama"), description=ext.get("description", ""),
                      hf_repo=ext.get("hf_repo", ""), **kwargs)
    return cfg


def registry_match(cfg: ModelConfig) -> str | None:
    """The registry name whose architecture equals ``cfg`` (ignoring names), if any."""
    for n in model_names():
        r = get_model_config(n)
        if (r.llm.hidden_size, r.llm.num_layers, r.llm.intermediate_size, r.llm.vocab_size, r.projector_type,
                r.vision.hidden_size, r.vision.num_layers, r.vision.image_size) == (
                cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.intermediate_size, cfg.llm.vocab_size,
                cfg.projector_type, cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.image_size):
            return n
    return None


# ---- reading weights --------------------------------------------------------------------------------------------
def _weight_files(ckpt: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc})") from exc
            files = sorted({ckpt / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not in {ckpt}: {', '.join(missing)}; "
                                      f"the download is incomplete")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt / single).is_file():
            return [ckpt / single]
    raise CheckpointError(f"{ckpt} has no weights: expected model.safetensors, pytorch_model.bin or a shard index "
                          f"(model.safetensors.index.json / pytorch_model.bin.index.json)")


def _load_pickled_weights(f: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` through torch's ``weights_only`` unpickler: tensors, containers and plain values
    only, so no code in the file can run. Anything else is refused (``pickle.UnpicklingError``)."""
    obj = torch.load(str(f), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                          # a training checkpoint that wraps the state dict
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{f} holds a {type(obj).__name__}, not a state dict (tensor name -> tensor); pass "
                              f"a Hugging Face checkpoint directory whose weight files map names to tensors")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{f} holds entries that are not tensors ({', '.join(not_tensors[:6])}); pass a "
                              f"Hugging Face checkpoint directory whose weight files map names to tensors")
    return obj


def _pickle_refused(f: Path, exc: Exception) -> CheckpointError:
    """The typed error for a pickle that torch's safe loader refuses: name what it wanted to import, never
    suggest loading it unsafely, say how to get safetensors instead."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"{f} contains pickled Python code{what}, not only tensors; edgevlm loads weights with torch's "
        f"weights_only unpickler and never runs code from a checkpoint. Convert the weights to safetensors where "
        f"they were made (model.save_pretrained(dir, safe_serialization=True)) or download the checkpoint's "
        f"safetensors version where its publisher offers one, and pass that directory")


def read_state_dict(ckpt: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight files, floating-point ones converted to ``dtype`` one tensor at a
    time as they are read (safetensors through ``safe_open``): the peak is the converted state dict plus one tensor,
    not the file's dtype and ``dtype`` side by side (for a released fp16 MobileVLM-1.7B loaded as fp32 that was
    3.4 GB fp16 + 6.8 GB fp32 at once). ``.bin`` files are unpickled whole (torch), then converted per tensor."""
    from safetensors import SafetensorError, safe_open

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(ckpt):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        sd[k] = convert(h.get_tensor(k))
            else:
                for k, v in _load_pickled_weights(f).items():
                    sd[k] = convert(v)
        except pickle.UnpicklingError as exc:
            raise _pickle_refused(f, exc) from None
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
            raise CheckpointError(f"cannot read weights file {f} ({type(exc).__name__}: {exc}); the file is "
                                  f"corrupt or truncated: download it again") from exc
    return sd


def _materialize_buffers(model: MobileVLM) -> None:
    """Recompute the non-persistent buffers that a meta-device construction left empty."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = model.llm.model
    with torch.device("cpu"):
        llama.rotary_emb = LlamaRotaryEmbedding(config=model.llm.config)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError("tensors left unmaterialized after loading", missing=left)


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    name: str | None = None) -> tuple[MobileVLM, ModelConfig]:
    """Load a MobileVLM checkpoint directory. Every checkpoint tensor must be consumed and every model tensor
    present with the right shape, else ``CheckpointError`` lists the offenders. ``dtype=None`` keeps the stored
    dtype (a released fp16 checkpoint stays fp16: half the memory; ``edgevlm.model.precision``)."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory '{ckpt}' does not exist; pass a directory with config.json and "
                              f"weights, or use --random-init for latency work without weights")
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{ckpt}' has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})") from exc
    cfg = from_hf_config(hf, ckpt, name=name)
    sd = read_state_dict(ckpt, dtype)                       # converted tensor by tensor

    with torch.device("meta"):
        model = MobileVLM(cfg)
    key_map = checkpoint_key_map(model)                     # ckpt key -> module key
    expected = model.state_dict()
    unexpected = sorted(k for k in sd if k not in key_map and not k.endswith(IGNORED_SUFFIXES))
    missing = sorted(k for k in key_map if k not in sd)
    mismatched = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(expected[key_map[k]].shape)}"
                        for k in key_map if k in sd and sd[k].shape != expected[key_map[k]].shape)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{ckpt}: the weights do not match the {cfg.projector_type} model described by "
                              f"config.json", missing=missing, unexpected=unexpected, mismatched=mismatched)
    module_sd = {key_map[k]: v for k, v in sd.items() if k in key_map}
    del sd
    model.load_state_dict(module_sd, strict=True, assign=True)
    _materialize_buffers(model)
    model.eval()
    log.info("loaded %s (%s, %d tensors)", ckpt, cfg.projector_type, len(module_sd))
    return model, cfg


# ---- writing ----------------------------------------------------------------------------------------------------
def save_checkpoint(model: MobileVLM, out: str | os.PathLike, *, tokenizer_src: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, max_shard_size: str = "5GB", overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a MobileVLM checkpoint directory (atomically: temp dir beside ``out``, then rename).
    ``tokenizer_src`` is a directory whose tokenizer files are copied. ``overwrite`` replaces only a checkpoint
    this function wrote (its ``.edgevlm-output.json`` marker), never another folder."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out)
    check_destination(out, "checkpoint", overwrite=overwrite, error=CheckpointError, flag="overwrite=True")
    tmp = temp_dir_beside(out)
    try:
        sd = {to_checkpoint_key(k): (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
              for k, v in model.state_dict().items()}
        dtype_name = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(to_hf_config(model.cfg, dtype_name), indent=2))
        split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: sd[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer_src is not None:
            copy_tokenizer_files(Path(tokenizer_src), tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        mark(tmp, "checkpoint")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_tokenizer_files(src: Path, dst: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    copied = []
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)
            copied.append(n)
    if not copied:
        raise CheckpointError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) in '{src}'")
    return copied
