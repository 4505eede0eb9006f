"""Build the bundles of a visual-token-budget sweep from one model: ``edgevlm bench DIR --build-budgets``.

A budget sweep varies only the vision side (tower + projector: 576 tokens with ``mlp2x_gelu``, 144 with LDP / LDPv2,
pooled LDPv2 budgets such as 64 and 36) in front of the *same* decoder. Exporting every budget in full would export
(and, for quantized precisions, quantize) the identical 1.4B decoder again for each budget, so this module:

1. exports the first budget's bundle in full (``export_bundle``, fp32, random init or a checkpoint);
2. derives every other budget from it: ``decoder.onnx`` (+ data), the embedding table and the tokenizer are
   **hard links** to the base bundle's files (same bytes, same sha256, no extra disk; the ORT optimized-graph cache,
   keyed by the file hash, is shared too), and only ``vision.onnx`` is exported for the budget's projector;
3. for a quantized precision whose vision graph stays fp32 (e.g. ``int4,vision=fp32``: MobileVLM's own latency
   setup, "LM 4-bit, vision encoder and projector at original precision"), quantizes the base once
   (``edgevlm.quant.quantize_bundle``) and derives the other budgets from the quantized base the same way (their
   fp32 vision graphs are linked from the fp32 bundles of step 2: nothing is exported twice); a
   precision that also quantizes the vision graph (plain ``int4`` = int8 vision on CPU targets) is applied to each
   derived fp32 bundle (the decoder is quantized once per budget: slower, noted in the result).

Vision weights of a derived budget are those ``build_model(cfg, seed)`` would create (the tower and projector are
built first from the seeded generator), so a derived bundle's vision graph equals a full export's. The decoder is
the base's (random-init: the base config's seeded weights); for latency that is the point: one decoder, many budgets.
Derivation needs ``--random-init`` (a checkpoint has one projector; its budget is exported as is).

Budget specs (``--budgets``): ``N`` picks the registry's projector for N tokens on the model's vision grid
(grid² -> ``mlp2x_gelu``; the base's own count -> the base; otherwise pooled ``ldpnetv2`` @N); ``mlp:N``,
``ldp:N``, ``ldpv2:N`` choose the projector explicitly (e.g. ``576,ldp:144,ldpv2:144,64,36``).

Imports torch (through the exporter) only inside the functions that export.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from edgevlm.config import ModelConfig, get_model_config, model_names
from edgevlm.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["BudgetSpec", "parse_budgets", "parse_precisions", "budget_config", "derive_budget_bundle",
           "build_budget_bundles", "BuildResult"]

_PROJECTOR_ALIASES = {"mlp": "mlp2x_gelu", "mlp2x_gelu": "mlp2x_gelu", "ldp": "ldpnet", "ldpnet": "ldpnet",
                      "ldpv2": "ldpnetv2", "ldpnetv2": "ldpnetv2"}
_HEADER_KEYS = ("files", "schema_version", "format", "toolkit", "created", "updated")


@dataclass(frozen=True)
class BudgetSpec:
    tokens: int
    projector: str | None = None          # None: chosen from the token count

    @property
    def label(self) -> str:
        return f"{self.projector}:{self.tokens}" if self.projector else str(self.tokens)


def parse_budgets(text: str | Sequence[str]) -> list[BudgetSpec]:
    """``"576,ldp:144,ldpv2:144,64,36"`` (or a list of such items) -> specs, in order, duplicates removed."""
    items: list[str] = []
    for part in ([text] if isinstance(text, str) else list(text)):
        items += [p.strip() for p in str(part).split(",") if p.strip()]
    if not items:
        raise ConfigError("--budgets is empty; give visual-token counts such as 576,144,64,36")
    out: list[BudgetSpec] = []
    for item in items:
        proj, _, num = item.rpartition(":")
        if not num.isdigit() or int(num) < 1:
            raise ConfigError(f"budget '{item}' is not a token count; use N or PROJECTOR:N (projectors: "
                              f"{', '.join(sorted(set(_PROJECTOR_ALIASES)))}), e.g. 576,ldp:144,64,36")
        if proj and proj not in _PROJECTOR_ALIASES:
            raise ConfigError(f"budget '{item}': projector '{proj}' unknown; known: "
                              f"{', '.join(sorted(set(_PROJECTOR_ALIASES)))}")
        spec = BudgetSpec(int(num), _PROJECTOR_ALIASES[proj] if proj else None)
        if spec not in out:
            out.append(spec)
    return out


def parse_precisions(values: str | Sequence[str]) -> list[str]:
    """``"fp32,int4"`` / ``["fp32", "int4,vision=fp32"]`` -> ``["fp32", "int4,vision=fp32"]``: a comma item holding
    ``=`` is a per-component override of the item before it."""
    items: list[str] = []
    for part in ([values] if isinstance(values, str) else list(values)):
        items += [p.strip() for p in str(part).split(",") if p.strip()]
    out: list[str] = []
    for item in items:
        if "=" in item:
            if not out:
                raise ConfigError(f"precision override '{item}' has no precision before it (e.g. int4,vision=fp32)")
            out[-1] += "," + item
        else:
            out.append(item)
    if not out:
        raise ConfigError("--precision is empty; e.g. fp32,int4")
    return list(dict.fromkeys(out))


def _registry_match(cfg: ModelConfig) -> str | None:
    """A registry name with the same vision tower, LLM and projector (unpooled), if there is one."""
    for name in model_names():
        r = get_model_config(name)
        if r.vision == cfg.vision and r.llm == cfg.llm and r.projector_type == cfg.projector_type \
                and r.projector_tokens is None:
            return name
    return None


def budget_config(base: ModelConfig, spec: BudgetSpec) -> ModelConfig:
    """The model config of ``base`` (same vision tower and LLM) with the projector for ``spec``."""
    g = base.vision.grid
    n = spec.tokens
    proj = spec.projector
    if proj is None:
        if n == base.visual_tokens:
            return base
        if n == g * g:
            proj = "mlp2x_gelu"
        elif base.projector_type == "ldpnet" and n == ((g + 1) // 2) ** 2:
            proj = "ldpnet"
        else:
            proj = "ldpnetv2"
    if proj == "ldpnetv2":
        side = math.isqrt(n)
        if side * side != n or side > g:
            raise ConfigError(f"budget {n}: a pooled ldpnetv2 budget must be a square number <= {g * g} "
                              f"(grid {g}x{g} of {base.name}); e.g. {', '.join(str(k * k) for k in (g, g // 2, 8, 6) if 0 < k <= g)}")
        default_tokens = (g // 2) ** 2
        unpooled = replace(base, projector_type="ldpnetv2", projector_tokens=None)
        name = _registry_match(unpooled) or f"{base.name}-ldpnetv2"
        cfg = replace(unpooled, name=name)
        if n != default_tokens:
            cfg = replace(cfg, name=f"{name}@{n}", projector_tokens=n)
        return cfg
    cand = replace(base, projector_type=proj, projector_tokens=None)
    if cand.visual_tokens != n:
        raise ConfigError(f"budget {proj}:{n}: the {proj} projector on {base.name}'s {g}x{g} grid yields "
                          f"{cand.visual_tokens} tokens, not {n}")
    return replace(cand, name=_registry_match(cand) or f"{base.name}-{proj}")


# ---- derivation -------------------------------------------------------------------------------------------------
def _vision_files(manifest: dict[str, Any]) -> set[str]:
    e = manifest["components"]["vision"]
    return {e["file"], *(e.get("external_data") or []), *(e.get("files") or [])}


def _link_or_copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _vision_only_model(cfg: ModelConfig, seed: int):
    """A ``MobileVLM`` holding only the vision tower and projector (no 1.4B LLM to allocate): the same weights
    ``build_model(cfg, seed)`` gives them (they are built first from the seeded generator)."""
    import torch
    from torch import nn

    from edgevlm.model.projectors import build_projector
    from edgevlm.model.vision import VisionTower
    from edgevlm.model.vlm import MobileVLM

    class VisionOnly(MobileVLM):
        def __init__(self, c: ModelConfig) -> None:          # noqa: D401  (skips MobileVLM.__init__'s LLM)
            nn.Module.__init__(self)
            self.cfg = c
            self.vision_tower = VisionTower(c.vision)
            self.mm_projector = build_projector(c)

    torch.manual_seed(seed)
    return VisionOnly(cfg).float().eval()


def derive_budget_bundle(base: str | os.PathLike, cfg: ModelConfig | str, out: str | os.PathLike, *, seed: int = 0,
                         overwrite: bool = False, vision_from: str | os.PathLike | None = None) -> Path:
    """A bundle for ``cfg``'s visual-token budget that shares ``base``'s decoder, embedding table and tokenizer (hard
    links) and has its own fp32 vision graph (random init, ``seed``). ``base`` must hold an fp32 vision graph and the
    same vision tower and LLM as ``cfg``. ``vision_from``: a bundle of ``cfg`` whose fp32 vision graph is linked
    instead of exported again (e.g. the fp32 bundle of the same budget when deriving its int4 twin)."""
    from edgevlm.bundle import BundleWriter, model_entry, read_bundle
    from edgevlm.exporter import onnx_export as E

    cfg = get_model_config(cfg) if isinstance(cfg, str) else cfg
    b = read_bundle(base, verify_hashes=False)
    bcfg = b.model_config
    if bcfg.vision != cfg.vision or bcfg.llm != cfg.llm:
        raise ConfigError(f"cannot derive {cfg.name} from bundle '{base}' ({bcfg.name}): the vision tower or the LLM "
                          f"differ; derive budgets only from a bundle of the same model")
    m = b.manifest
    vprec = m["components"]["vision"].get("precision")
    if vprec != "fp32":
        raise ConfigError(f"bundle '{base}' has a {vprec} vision graph; a derived budget exports an fp32 vision graph, "
                          f"so derive from a bundle whose vision is fp32 (e.g. precision int4,vision=fp32) or quantize "
                          f"the derived fp32 bundle instead")
    opset = int((m.get("export") or {}).get("opset") or m["components"]["vision"].get("opset") or 20)
    t0 = time.perf_counter()
    vision_files = _vision_files(m)
    linked: dict[str, str] = {}
    with BundleWriter(out, overwrite=overwrite) as w:
        for rel in b.files:
            if rel in vision_files:
                continue
            linked[rel] = _link_or_copy(b.path(rel), w.path(rel))
        vsrc = read_bundle(vision_from, verify_hashes=False) if vision_from is not None else None
        if vsrc is not None:
            vm = vsrc.model_config
            ventry = vsrc.component("vision")
            if (vm.vision, vm.projector_type, vm.visual_tokens) != (cfg.vision, cfg.projector_type, cfg.visual_tokens) \
                    or ventry.get("precision") != "fp32":
                raise ConfigError(f"vision_from bundle '{vision_from}' does not hold the fp32 vision graph of "
                                  f"{cfg.name}")
            for rel in _vision_files(vsrc.manifest):
                linked[rel] = _link_or_copy(vsrc.path(rel), w.path(rel))
            entry = copy.deepcopy(ventry)
        else:
            model = _vision_only_model(cfg, seed)
            graph = E.export_vision(model, w.root / "vision.onnx", opset=opset)
            del model
            entry = E.graph_entry(graph.path, precision="fp32", recipe={})
            entry["mask_constants_replaced"] = graph.report.get("mask_constants_replaced")
            entry["mask_value"] = graph.report.get("mask_value")
            entry["parity"] = {"skipped": True, "reason": "derived budget bundle (edgevlm.bench.budgets)"}
        entry["visual_tokens"] = cfg.visual_tokens
        manifest = copy.deepcopy(m)
        for k in _HEADER_KEYS:
            manifest.pop(k, None)
        comps = manifest["components"]
        manifest["components"] = {"vision": entry, **{k: v for k, v in comps.items() if k != "vision"}}
        random_init = bool(m["model"].get("random_init", True))
        manifest["model"] = model_entry(cfg, random_init=random_init, source="random-init")
        manifest["visual_tokens"] = cfg.visual_tokens
        for key in ("parity",):
            if isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], "vision_skipped": True}
        manifest["derived"] = {"by": "edgevlm.bench.budgets.derive_budget_bundle", "base": str(Path(base).resolve()),
                               "base_manifest_sha256": b.manifest_sha256, "base_model": bcfg.name,
                               "shared_files": linked, "vision_seed": seed,
                               "vision_from": str(Path(vision_from).resolve()) if vision_from is not None else None,
                               "seconds": round(time.perf_counter() - t0, 3)}
        manifest.setdefault("notes", []).append(
            f"derived from bundle '{Path(base).name}' ({bcfg.name}): decoder, embedding table and tokenizer shared "
            f"(hard links); vision graph exported for {cfg.visual_tokens} visual tokens ({cfg.projector_type}, "
            f"random init seed {seed}); the decoder's weights are the base's")
        w.set_manifest(manifest)
    log.info("derived %s (%d visual tokens) from %s in %.1f s", cfg.name, cfg.visual_tokens, Path(base).name,
             time.perf_counter() - t0)
    return Path(out)


# ---- the whole build --------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    bundles: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bundles": [str(p) for p in self.bundles], "notes": list(self.notes),
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


def _slug(precision: str) -> str:
    return precision.replace(",", "+").replace("=", "-")


def _same_model(bundle: Path, cfg: ModelConfig) -> bool:
    from edgevlm.bundle import read_bundle

    b = read_bundle(bundle, verify_hashes=False)
    c = b.model_config
    return (c.vision, c.llm, c.projector_type, c.visual_tokens) == (cfg.vision, cfg.llm, cfg.projector_type,
                                                                     cfg.visual_tokens)


def _quantize(src: Path, dst: Path, precision: str, target: Any, overwrite: bool) -> Path:
    from edgevlm.quant.apply import quantize_bundle

    return quantize_bundle(src, dst, precision, target=target, overwrite=overwrite, report=False, show=False)


def build_budget_bundles(model: str | ModelConfig, out_dir: str | os.PathLike, budgets: str | Sequence[str], *,
                         precisions: str | Sequence[str] = "fp32", random_init: bool = True,
                         checkpoint: str | os.PathLike | None = None, target: Any = None, seed: int = 0,
                         parity: bool = False, share_decoder: bool = True, overwrite: bool = False,
                         base_bundle: str | os.PathLike | None = None,
                         progress: Callable[[str], None] | None = None, **export_kwargs: Any) -> BuildResult:
    """Export one bundle per (budget, precision) into ``out_dir`` (named ``{model}-{tokens}tok-{projector}-{precision}``)
    and return their paths (budget-major order).

    Args:
        model: the registry name (or config) whose vision tower + LLM every budget shares.
        out_dir: parent directory of the bundles.
        budgets: budget specs (see the module docstring), e.g. ``"576,ldp:144,ldpv2:144,64,36"``.
        precisions: ``"fp32,int4,vision=fp32"`` or a list; fp32 is always built (quantized bundles start from it).
        random_init: random weights (required for derived budgets).
        checkpoint: export the model's own budget from a checkpoint (no derivation: one budget only).
        target: export target (default ``cpu``).
        seed: random-init seed.
        parity: validate the base export against PyTorch (slow on full-size models; derived bundles skip it).
        share_decoder: derive budgets from the base (hard-linked decoder); False exports every budget in full.
        overwrite: replace existing bundles.
        base_bundle: an existing fp32 bundle of the model to derive from instead of exporting the first budget.
        progress: called with a line of text per step.
        export_kwargs: passed to ``export_bundle``.
    """
    from edgevlm.pipeline import export_bundle

    say = progress or (lambda s: log.info("%s", s))
    base_cfg = get_model_config(model) if isinstance(model, str) else model
    specs = parse_budgets(budgets)
    precs = parse_precisions(precisions)
    cfgs = [(s, budget_config(base_cfg, s)) for s in specs]
    if checkpoint is not None and (len(cfgs) > 1 or cfgs[0][1].visual_tokens != base_cfg.visual_tokens):
        raise ConfigError("a checkpoint has one projector, so it yields one budget; use --random-init for a budget "
                          "sweep (latency does not depend on the weights' values)")
    if not random_init and checkpoint is None:
        raise ConfigError("--build-budgets needs --random-init (or --checkpoint DIR for the model's own budget)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = BuildResult()
    t_all = time.perf_counter()

    def name_of(cfg: ModelConfig, prec: str) -> str:
        return f"{cfg.name.replace('@', '-at')}-{cfg.visual_tokens}tok-{cfg.projector_type}-{_slug(prec)}"

    def exists(p: Path) -> bool:
        return (p / "manifest.json").is_file() and not overwrite

    # Order (keeps the peak disk use low): the fp32 base, the quantized bases (quantize_bundle copies the whole fp32
    # bundle before replacing its decoder), then the other budgets (vision graphs + hard links).
    fp32: dict[BudgetSpec, Path] = {}
    base_path: Path | None = Path(base_bundle) if base_bundle else None
    base_spec = next((sp for sp, c in cfgs if base_path is not None and _same_model(base_path, c)), cfgs[0][0])
    ordered = sorted(cfgs, key=lambda sc: sc[0] != base_spec)

    def make_fp32(spec: BudgetSpec, cfg: ModelConfig) -> None:
        nonlocal base_path
        dest = out / name_of(cfg, "fp32")
        fp32[spec] = dest
        t = time.perf_counter()
        if spec == base_spec and base_bundle is not None and _same_model(Path(base_bundle), cfg):
            fp32[spec] = Path(base_bundle)
            say(f"fp32 {cfg.name}: the base bundle itself ({base_bundle})")
        elif exists(dest):
            say(f"fp32 {cfg.name}: exists, kept ({dest})")
        elif share_decoder and base_path is not None:
            say(f"fp32 {cfg.name}: deriving from {base_path.name} (vision export only) ...")
            derive_budget_bundle(base_path, cfg, dest, seed=seed, overwrite=overwrite)
        else:
            say(f"fp32 {cfg.name}: full export ...")
            export_bundle(cfg, dest, random_init=random_init and checkpoint is None, checkpoint=checkpoint,
                          target=target, precision="fp32", parity=parity, seed=seed, overwrite=overwrite,
                          **export_kwargs)
        res.timings_s[f"fp32:{spec.label}"] = time.perf_counter() - t
        if base_path is None:
            base_path = dest

    qbases: dict[str, Path] = {}

    def make_quantized(prec: str, spec: BudgetSpec, cfg: ModelConfig) -> None:
        dest = out / name_of(cfg, prec)
        t = time.perf_counter()
        qbase = qbases.get(prec)
        if exists(dest):
            say(f"{prec} {cfg.name}: exists, kept ({dest})")
        elif qbase is None or not share_decoder:
            say(f"{prec} {cfg.name}: quantizing {fp32[spec].name} ...")
            _quantize(fp32[spec], dest, prec, target, overwrite)
        else:
            from edgevlm.bundle import read_bundle

            vprec = read_bundle(qbase, verify_hashes=False).component("vision").get("precision")
            if vprec == "fp32":
                say(f"{prec} {cfg.name}: deriving from {qbase.name} (shared {prec} decoder, vision of "
                    f"{fp32[spec].name}) ...")
                derive_budget_bundle(qbase, cfg, dest, seed=seed, overwrite=overwrite, vision_from=fp32[spec])
            else:
                say(f"{prec} {cfg.name}: quantizing {fp32[spec].name} (the recipe quantizes the vision graph "
                    f"too, so the decoder is quantized again) ...")
                _quantize(fp32[spec], dest, prec, target, overwrite)
                note = (f"{prec}: the vision graph is quantized ({vprec}), so every budget was quantized from its "
                        f"fp32 bundle (decoder quantized once per budget)")
                if note not in res.notes:
                    res.notes.append(note)
        qbases.setdefault(prec, dest)
        res.timings_s[f"{prec}:{spec.label}"] = time.perf_counter() - t

    quantized = [p for p in precs if p != "fp32"]
    make_fp32(*ordered[0])
    for prec in quantized:
        make_quantized(prec, *ordered[0])
    for spec, cfg in ordered[1:]:
        make_fp32(spec, cfg)
    for prec in quantized:
        for spec, cfg in ordered[1:]:
            make_quantized(prec, spec, cfg)
    if share_decoder and len(cfgs) > 1:
        res.notes.append(f"fp32 budgets share the decoder of {base_path.name} (hard links); only vision graphs were "
                         f"exported per budget")
    for spec, cfg in cfgs:
        for prec in precs:
            res.bundles.append(fp32[spec] if prec == "fp32" else out / name_of(cfg, prec))
    res.timings_s["total"] = time.perf_counter() - t_all
    return res
