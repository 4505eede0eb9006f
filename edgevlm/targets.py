"""Hardware target profiles: one TOML file per target in ``export/targets/`` (stdlib ``tomllib``; no torch, no onnx).

A target says what a device has (memory, bandwidth, compute capability, DLA cores), which software stack it runs
(JetPack / TensorRT / ONNX opset limit, or ONNX Runtime on a CPU), which precisions it supports and which precision
recipe to use by default. The memory planner (``edgevlm.planner``), the TensorRT build plan
(``edgevlm.graphs.trt_plan``) and ``edgevlm targets`` read it.

    >>> from edgevlm.targets import get_target
    >>> t = get_target("jetson-orin")          # alias of jetson-agx-orin-32gb, the MobileVLM paper's board
    >>> t.name, t.tensorrt, t.supports("fp8")
    ('jetson-agx-orin-32gb', '10.3', False)

Names are exact (aliases are listed in each TOML file; ``cpu@64gb`` overrides the memory size); an unknown name raises ``ConfigError`` listing the known
ones. Aliases: ``jetson-orin`` = Jetson AGX Orin 32 GB, the board the MobileVLM paper measured on (so benchmarks
compare with its numbers); ``jetson-orin-nano`` = Orin Nano 8 GB (the developer kit); ``jetson-agx-orin`` = AGX Orin
64 GB (the current AGX dev kit); ``cpu`` = x86-64 AVX2.

Software overrides: Jetson profiles describe JetPack 6.2 (TensorRT 10.3, weakly typed builds allowed, ONNX opset
<= 20). A suffix selects another stack without another file: ``jetson-agx-orin-32gb@jp7.2`` (JetPack 7.2,
TensorRT 11.4, strongly typed only) or ``rtx-4090@trt10.16`` (desktop TensorRT 10.x instead of the default 11.4).
The same is available as ``get_target(name, jetpack=..., tensorrt=...)``.

Field meanings (TOML keys = ``Target`` attributes):
    kind: ``jetson`` | ``gpu`` | ``cpu``; memory_kind: ``unified`` (Jetson: CPU and GPU share it) | ``discrete``
    (VRAM) | ``host`` (CPU RAM); memory_gb: as marketed (= GiB of DRAM, the planner uses 2**30 bytes);
    os_reserve_gb: taken by firmware carve-outs / the OS before our process starts; usable_fraction: applied after
    the reserve; runtime_overhead_gb: CUDA context + TensorRT libraries (GPU) or interpreter + ORT (CPU);
    workspace_gb: TensorRT builder workspace; build_on_device: engines are built where they run (always true for
    TensorRT: engines are tied to the TensorRT version and GPU architecture).
"""

from __future__ import annotations

import difflib
import functools
import logging
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from edgevlm.errors import ConfigError, TargetError
# the precision registry (re-exported: targets validate their precision lists and resolve recipes with it)
from edgevlm.precisions import (COMPONENTS, PRECISION_PRESETS, PRECISIONS, PRESET_ORDER, TENSORRT_PRESETS,  # noqa: F401
                                presets_for)
from edgevlm.resources import data_dir

log = logging.getLogger(__name__)

#: the installed wheel's edgevlm/_data/targets, else the source tree's export/targets (edgevlm.resources)
TARGETS_DIR = data_dir("targets")

KINDS = ("jetson", "gpu", "cpu")
MEMORY_KINDS = ("unified", "discrete", "host")
BACKENDS = ("tensorrt", "onnxruntime-cpu")
# Highest default-domain ONNX opset the TensorRT ONNX parser handles, by (major, minor) it was raised in.
# 10.0: "opset 9 to 20" (onnx-tensorrt docs/operators.md); 22 from 10.9, 24 from 10.13; 11.x: 25 (TensorRT ONNX opset
# guide). INT4 blocked DequantizeLinear needs opset 21: trt_compat accepts it on 10.x as the one exception.
TRT_OPSET_MAX: tuple[tuple[tuple[int, int], int], ...] = (((10, 0), 20), ((10, 9), 22), ((10, 13), 24), ((11, 0), 25))

# JetPack -> software stack (reference/onnx-ort-tensorrt.md §4.6). JetPack 6.0 shipped TensorRT 8.6 (unsupported).
JETPACK_STACKS: dict[str, dict[str, str | None]] = {
    "6.1": {"tensorrt": "10.3", "cuda": "12.6"},
    "6.2": {"tensorrt": "10.3", "cuda": "12.6"},
    "7.2": {"tensorrt": "11.4", "cuda": None},
}

_REQUIRED = ("name", "description", "kind", "backend", "memory_gb", "memory_kind", "memory_bandwidth_gbs",
             "precisions", "default_recipe", "max_context", "opset_max")


def parse_trt_version(version: str) -> tuple[int, int]:
    """``"10.3"`` / ``"10.3.0.30"`` / ``"11.4"`` -> (major, minor)."""
    parts = str(version).strip().lstrip("v").split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1] not in ("", "x") else 0
    except ValueError:
        raise ConfigError(f"TensorRT version '{version}' is not of the form MAJOR.MINOR (e.g. 10.3)") from None
    return major, minor


def trt_opset_max(version: str) -> int:
    """Highest default-domain ONNX opset the TensorRT ONNX parser of ``version`` accepts."""
    v = parse_trt_version(version)
    if v < (10, 0):
        raise TargetError(f"TensorRT {version} is not supported: edgevlm needs TensorRT >= 10.0 "
                          f"(JetPack 6.1+ ships 10.3)")
    best = 0
    for since, opset in TRT_OPSET_MAX:
        if v >= since:
            best = opset
    return best


def trt_builder_mode(version: str) -> str:
    """``"weak"`` for TensorRT 10.x (precision flags --fp16/--int8 allowed), ``"strong"`` for 11+ (only mode left)."""
    return "weak" if parse_trt_version(version)[0] == 10 else "strong"


@dataclass(frozen=True)
class Target:
    """One hardware target (see the module docstring for the fields)."""

    name: str
    description: str
    kind: str
    backend: str
    memory_gb: float
    memory_kind: str
    memory_bandwidth_gbs: float
    precisions: tuple[str, ...]
    default_recipe: str
    max_context: int
    opset_max: int
    os_reserve_gb: float = 0.0
    usable_fraction: float = 1.0
    runtime_overhead_gb: float = 0.5
    compute_capability: str | None = None
    jetpack: str | None = None
    tensorrt: str | None = None
    cuda: str | None = None
    dla_cores: int = 0
    workspace_gb: float = 0.0
    build_on_device: bool = False
    cpu_features: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    source: str = ""                     # the TOML file it came from
    overrides: tuple[str, ...] = field(default=())   # e.g. ("jp7.2",) when a software suffix was applied

    # ---- derived facts -----------------------------------------------------------------------------------------
    @property
    def usable_bytes(self) -> int:
        """Memory this process may use: (memory - OS reserve) x usable_fraction, in bytes."""
        return int((self.memory_gb - self.os_reserve_gb) * self.usable_fraction * 2**30)

    @property
    def is_tensorrt(self) -> bool:
        return self.backend == "tensorrt"

    @property
    def kv_dtype(self) -> str:
        """KV-cache dtype of the bundles exported for this target: fp32 everywhere. The graphs keep float32 KV I/O
        (``keep_io_types``; ORT CPU computes attention in fp32, and the TensorRT runner binds the engines' float32
        past/present tensors), so the planner (``edgevlm.planner``) counts 4 bytes per KV element on every target."""
        return "fp32"

    @property
    def builder_mode(self) -> str | None:
        return trt_builder_mode(self.tensorrt) if self.tensorrt else None

    def supports(self, precision: str | Mapping[str, str]) -> bool:
        """True if ``precision`` (a precision name, a preset name or a per-component dict) runs on this target."""
        try:
            self.recipe(precision)
        except (ConfigError, TargetError):
            return False
        return True

    def recipe(self, precision: str | Mapping[str, str] | None = None) -> dict[str, str]:
        """Resolve a precision spec to ``{component: precision}`` and check it against this target.

        Accepted: ``None`` (the target's default recipe), a preset name (``fp32``, ``fp16``, ``int8``, ``int4``;
        TensorRT targets resolve them with ``TENSORRT_PRESETS``: the int4 preset's LM head is fp16 there),
        ``"int4,vision=fp16"`` (a preset with per-component overrides), or a dict ``{"vision": "fp16", ...}`` whose
        missing components come from ``dict["base"]`` or the target's default recipe. A plain precision name that is
        not a preset (``bf16``, ``fp8``) applies to every component.
        """
        comp = _resolve_recipe(precision, self.default_recipe, tensorrt=self.is_tensorrt)
        bad = []
        for c, p in comp.items():
            # The embedding table is a host-side gather: fp16/fp32 storage works on every backend.
            if c == "embedding" and p in ("fp16", "fp32"):
                continue
            if p not in self.precisions:
                bad.append(f"{c}={p}")
        if bad:
            raise TargetError(f"target '{self.name}' does not support {', '.join(bad)}; it supports "
                              f"{', '.join(self.precisions)}"
                              + (" (fp8 needs an Ada/Hopper GPU)" if any(b.endswith("fp8") for b in bad) else ""))
        return comp

    def with_software(self, *, jetpack: str | None = None, tensorrt: str | None = None) -> "Target":
        """The same hardware with another JetPack / TensorRT (recomputes opset limit and builder mode)."""
        t = self
        tags = list(self.overrides)
        if jetpack is not None:
            if self.kind != "jetson":
                raise ConfigError(f"target '{self.name}' is not a Jetson: a JetPack version does not apply")
            jp = str(jetpack).removeprefix("jp").removeprefix("jetpack")
            if jp not in JETPACK_STACKS:
                raise ConfigError(f"JetPack '{jetpack}' unknown; known: {', '.join(JETPACK_STACKS)} "
                                  f"(JetPack 6.0 shipped TensorRT 8.6, which edgevlm does not support)")
            stack = JETPACK_STACKS[jp]
            notes = list(t.notes)
            dla = t.dla_cores
            if jp.startswith("7"):
                if "agx" not in t.name:
                    log.warning("JetPack %s on %s: TensorRT 11.4.1 documents JetPack 7.2.2+ for AGX Orin only; "
                                "support on Orin NX/Nano is not verified", jp, t.name)
                    notes.append(f"JetPack {jp} support on this module is not verified; DLA disabled in this profile.")
                    dla = 0
                else:
                    notes.append("DLA returned in TensorRT 11.4.1 on AGX Orin with JetPack 7.2.2+.")
            t = replace(t, jetpack=jp, tensorrt=stack["tensorrt"], cuda=stack["cuda"], dla_cores=dla,
                        notes=tuple(notes))
            tags.append(f"jp{jp}")
        if tensorrt is not None:
            if not self.is_tensorrt:
                raise ConfigError(f"target '{self.name}' runs {self.backend}: a TensorRT version does not apply")
            trt = str(tensorrt).removeprefix("trt").removeprefix("tensorrt")
            trt_opset_max(trt)                                   # validates
            if t.kind == "jetson" and parse_trt_version(trt)[0] >= 11 and (t.jetpack or "6").startswith("6"):
                raise ConfigError(f"TensorRT {trt} does not run on JetPack {t.jetpack}: Orin on JetPack 6 stays on "
                                  f"TensorRT 10.x; use '{self.name}@jp7.2' for TensorRT 11")
            t = replace(t, tensorrt=trt)
            tags.append(f"trt{trt}")
        if t.tensorrt:
            t = replace(t, opset_max=trt_opset_max(t.tensorrt))
        return replace(t, overrides=tuple(tags))

    def with_memory(self, memory_gb: float) -> "Target":
        """The same target with another memory size (CPU hosts vary; ``edgevlm plan --memory-gb``)."""
        if memory_gb <= self.os_reserve_gb:
            raise ConfigError(f"--memory-gb {memory_gb} is not more than the OS reserve ({self.os_reserve_gb} GB) "
                              f"of '{self.name}'")
        return replace(self, memory_gb=float(memory_gb), overrides=self.overrides + (f"{memory_gb:g}gb",))

    @property
    def label(self) -> str:
        """Name plus applied overrides, e.g. ``jetson-agx-orin-32gb@jp7.2``."""
        return self.name + "".join("@" + o for o in self.overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["label"] = self.label
        d["usable_bytes"] = self.usable_bytes
        d["builder_mode"] = self.builder_mode
        return d


def _resolve_recipe(precision: str | Mapping[str, str] | None, default: str, *,
                    tensorrt: bool = False) -> dict[str, str]:
    presets = presets_for(tensorrt)
    if precision is None or precision == "":
        precision = default
    overrides: dict[str, str] = {}
    if isinstance(precision, Mapping):
        overrides = {str(k): str(v) for k, v in precision.items()}
        base = overrides.pop("base", default)
    else:
        text = str(precision).strip()
        parts = [p.strip() for p in text.split(",") if p.strip()]
        base = default
        for p in parts:
            if "=" in p:
                k, _, v = p.partition("=")
                overrides[k.strip()] = v.strip()
            else:
                base = p
    if base in presets:
        comp = dict(presets[base])
    elif base in PRECISIONS:
        comp = {c: base for c in COMPONENTS}
    else:
        raise ConfigError(f"precision '{base}' unknown; presets: {', '.join(PRECISION_PRESETS)}; per component: "
                          f"{', '.join(PRECISIONS)} (e.g. 'int4,vision=fp16' or {{'vision': 'fp16'}})")
    for k, v in overrides.items():
        if k == "projector":                         # the projector is part of the vision graph
            k = "vision"
        if k not in COMPONENTS:
            raise ConfigError(f"precision override for unknown component '{k}'; components: {', '.join(COMPONENTS)}")
        if v not in PRECISIONS:
            raise ConfigError(f"precision '{v}' for {k} unknown; known: {', '.join(PRECISIONS)}")
        comp[k] = v
    return comp


def recipe_name(recipe: Mapping[str, str], *, tensorrt: bool = False) -> str:
    """A short name for a resolved recipe: the preset it equals, else ``preset,comp=prec`` or ``comp=prec,...``
    (``tensorrt``: against the presets as TensorRT targets resolve them, ``TENSORRT_PRESETS``)."""
    presets = presets_for(tensorrt)
    for name, preset in presets.items():
        if dict(recipe) == preset:
            return name
    # fewest differences; on a tie the preset with the same decoder precision ("int4,lm_head=int8", not
    # "int8,decoder=int4")
    best = min(presets, key=lambda n: (sum(presets[n][c] != recipe.get(c) for c in COMPONENTS),
                                       presets[n]["decoder"] != recipe.get("decoder")))
    diff = [f"{c}={recipe[c]}" for c in COMPONENTS if presets[best][c] != recipe.get(c)]
    return ",".join([best, *diff])


# ---- loading ------------------------------------------------------------------------------------------------------
def _load_file(path: Path) -> Target:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"target file {path}: invalid TOML: {exc}") from None
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"target file {path}: missing key(s) {', '.join(missing)}")
    known = set(Target.__dataclass_fields__) - {"source", "overrides"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"target file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if data["name"] != path.stem:
        raise ConfigError(f"target file {path}: name '{data['name']}' must equal the file name '{path.stem}'")
    for key, allowed in (("kind", KINDS), ("memory_kind", MEMORY_KINDS), ("backend", BACKENDS)):
        if data[key] not in allowed:
            raise ConfigError(f"target file {path}: {key} '{data[key]}' unknown; known: {', '.join(allowed)}")
    for key in ("precisions", "aliases", "notes", "cpu_features"):
        if key in data:
            data[key] = tuple(data[key])
    bad = [p for p in data["precisions"] if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"target file {path}: unknown precision(s) {', '.join(bad)}; known: {', '.join(PRECISIONS)}")
    if data["backend"] == "tensorrt":
        for key in ("tensorrt", "compute_capability"):
            if not data.get(key):
                raise ConfigError(f"target file {path}: a TensorRT target needs '{key}'")
        expect = trt_opset_max(data["tensorrt"])
        if data["opset_max"] != expect:
            raise ConfigError(f"target file {path}: opset_max {data['opset_max']} disagrees with TensorRT "
                              f"{data['tensorrt']} (max opset {expect})")
    if "fp8" in data["precisions"] and float(data.get("compute_capability") or 0) < 8.9:
        raise ConfigError(f"target file {path}: fp8 needs compute capability >= 8.9 (Ada/Hopper)")
    for key in ("memory_gb", "os_reserve_gb", "runtime_overhead_gb", "memory_bandwidth_gbs", "workspace_gb",
                "usable_fraction"):
        if key in data:
            data[key] = float(data[key])
    target = Target(source=str(path), **data)
    target.recipe(target.default_recipe)            # the default recipe must run on the target
    return target


@functools.lru_cache(maxsize=4)
def _load_all(directory: str) -> tuple[dict[str, Target], dict[str, str]]:
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"target folder {folder} not found (a wheel carries it as edgevlm/_data/targets, a checkout as "
                          f"export/targets: reinstall edgevlm)")
    targets: dict[str, Target] = {}
    aliases: dict[str, str] = {}
    loaded = [_load_file(path) for path in sorted(folder.glob("*.toml"))]
    # Listing order: Jetson, desktop GPUs, CPUs; biggest memory (then bandwidth) first within a kind.
    for t in sorted(loaded, key=lambda t: (KINDS.index(t.kind), -t.memory_gb, -t.memory_bandwidth_gbs, t.name)):
        targets[t.name] = t
    for t in targets.values():
        for a in t.aliases:
            if a in targets or a in aliases:
                raise ConfigError(f"target alias '{a}' ({t.source}) is already a target name or another alias")
            aliases[a] = t.name
    return targets, aliases


def _registry(directory: Path | None = None) -> tuple[dict[str, Target], dict[str, str]]:
    return _load_all(str(directory or TARGETS_DIR))


def target_names(*, include_aliases: bool = False) -> list[str]:
    """Names of all target profiles (file order), optionally followed by the aliases."""
    targets, aliases = _registry()
    return list(targets) + (list(aliases) if include_aliases else [])


def target_aliases() -> dict[str, str]:
    """``{alias: target name}``."""
    return dict(_registry()[1])


def get_target(name: str | Target, *, jetpack: str | None = None, tensorrt: str | None = None,
               memory_gb: float | None = None) -> Target:
    """Exact-name (or alias) lookup. ``NAME@jp7.2`` / ``NAME@trt10.16`` select another software stack.

    Raises ``ConfigError`` listing the known names (and aliases) when the name is unknown.
    """
    if isinstance(name, Target):
        target = name
        suffixes: list[str] = []
    else:
        base, *suffixes = str(name).strip().split("@")
        targets, aliases = _registry()
        key = aliases.get(base, base)
        if key not in targets:
            close = difflib.get_close_matches(base, list(targets) + list(aliases), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            alias_txt = ", ".join(f"{a} -> {t}" for a, t in aliases.items())
            raise ConfigError(f"target '{base}' unknown{hint}; known: {', '.join(targets)}; aliases: {alias_txt}")
        target = targets[key]
    for s in suffixes:
        s = s.strip().lower()
        if s.startswith(("jp", "jetpack")):
            jetpack = jetpack or s
        elif s.startswith(("trt", "tensorrt")):
            tensorrt = tensorrt or s
        elif s.endswith("gb") and s[:-2].replace(".", "", 1).isdigit():
            memory_gb = memory_gb if memory_gb is not None else float(s[:-2])
        else:
            raise ConfigError(f"target suffix '@{s}' unknown: use @jp<JetPack version> (e.g. @jp7.2), "
                              f"@trt<TensorRT version> (e.g. @trt10.16) or @<memory>gb (e.g. @64gb, CPU hosts)")
    if jetpack is not None or tensorrt is not None:
        target = target.with_software(jetpack=jetpack, tensorrt=tensorrt)
    if memory_gb is not None:
        target = target.with_memory(memory_gb)
    return target


__all__ = ["Target", "get_target", "target_names", "target_aliases", "PRECISION_PRESETS", "TENSORRT_PRESETS",
           "presets_for", "PRESET_ORDER",
           "PRECISIONS", "COMPONENTS", "TARGETS_DIR", "trt_opset_max", "trt_builder_mode", "parse_trt_version",
           "recipe_name", "JETPACK_STACKS"]
