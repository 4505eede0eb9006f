"""TensorRT build plans: optimization profiles, builder flags per TensorRT version, ``build_plan.json`` and a
``build_engines.sh`` of trtexec commands to run on the device. Torch-free, onnx-free (pure data).

    >>> from edgevlm.config import get_model_config
    >>> from edgevlm.targets import get_target
    >>> from edgevlm.exporter.trt_plan import plan_tensorrt_build, write_build_files
    >>> plan = plan_tensorrt_build(get_model_config("mobilevlm-1.7b"), get_target("jetson-orin"))
    >>> write_build_files("bundle_dir", plan)      # bundle_dir/build_plan.json + bundle_dir/build_engines.sh
    >>> entry = prepare_tensorrt_bundle("bundle_dir", cfg, "jetson-orin")   # compat check + plan + files (export)

Inputs: the bundle's graphs as ``EngineComponent``s (name, ONNX file, inputs with symbolic dims, the precisions
inside the graph). ``standard_components`` gives edgevlm's own (vision.onnx, decoder.onnx with Optimum I/O:
``inputs_embeds [batch, seq, D]``, ``attention_mask [batch, past_seq + seq]``, ``position_ids [batch, seq]``,
``past_key_values.{i}.key|value [batch, kv_heads, past_seq, head_dim]``); ``components_from_manifest`` and
``EngineComponent.from_spec`` read other descriptions. The embedding table is gathered on the host: no engine.

Optimization profiles (symbolic dims: batch, seq, past (past_seq), total (past_seq + seq)):
- decoder profile 0 ``prefill``: seq 1 .. P (P = longest prompt incl. visual tokens, ``planner.max_prompt_tokens``),
  opt = visual tokens + 64 (``planner.typical_prompt_tokens``); past 0..0 (zero-length past, Optimum style:
  TensorRT supports empty tensors, but this is unverified on a device (reference §8); ``prefill_past_max`` > 0
  allows multi-turn / chunked prefill);
- decoder profile 1 ``decode``: seq 1; past 1 .. context - 1, opt = opt prompt + 128;
- vision: batch 1 .. max_batch; on a DLA target the vision graph (static shapes, fp16/int8) goes to DLA core 0 with
  GPU fallback (ViT attention/LayerNorm fall back to the GPU; DLA needs min = opt = max, so batch is fixed).
Builder mode: TensorRT 10.x ``weak`` (precision flags ``--fp16``, ``--int8`` for int8 Q/DQ, ``--int4`` for blocked
INT4 weights, ``--bf16``, ``--fp8``); 11.x ``strong`` (``--stronglyTyped``, no precision flags: the ONNX graph's
dtypes are the precision, so the exporter must write fp16 graphs for fp16 layers). Several profiles use trtexec's
``--profile=N --minShapes=... --optShapes=... --maxShapes=...`` groups (TensorRT >= 10.x sampleOptions.cpp).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from edgevlm.config import ModelConfig
from edgevlm.errors import BundleError, ConfigError, TargetError
from edgevlm.outputs import umask
from edgevlm.planner import default_context, max_prompt_tokens, typical_prompt_tokens
from edgevlm.targets import Target, get_target, parse_trt_version, recipe_name, trt_builder_mode

PLAN_SCHEMA = 1
PLAN_FILE = "build_plan.json"
SCRIPT_FILE = "build_engines.sh"
DEFAULT_ENGINE_DIR = "engines"
DECODE_OPT_EXTRA = 128           # opt past length of the decode profile = opt prompt + this (mid-answer)

Dim = int | str

# Symbolic dim names, normalized (lower case, no spaces), by meaning.
_SYMBOLS = {
    "batch": {"batch", "batch_size", "b", "n", "num_images"},
    "seq": {"seq", "seq_len", "seq_length", "sequence", "sequence_length", "s", "num_tokens", "tokens"},
    "past": {"past", "past_seq", "past_len", "past_length", "past_seq_len", "past_sequence_length", "cache_len",
             "past_key_values_length"},
    "total": {"total", "total_seq", "total_len", "total_length", "total_seq_len", "total_sequence_length", "kv_len",
              "attn_len"},
}
_KIND_OF = {name: kind for kind, names in _SYMBOLS.items() for name in names}

# Weakly typed (TensorRT 10.x) builder flags a component precision needs (fp16 for the layers Q/DQ leaves float).
_WEAK_FLAGS = {"fp32": (), "fp16": ("fp16",), "bf16": ("bf16",), "int8": ("fp16", "int8"), "int4": ("fp16", "int4"),
               "fp8": ("fp16", "fp8")}
_FLAG_ORDER = ("fp16", "bf16", "int8", "int4", "fp8")
DLA_PRECISIONS = ("fp16", "int8")


# ---- inputs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphInput:
    """One graph input: name, dims (int = static, str = symbolic), dtype (numpy spelling)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


@dataclass(frozen=True)
class EngineComponent:
    """A graph to build an engine from: name, ONNX file (relative to the bundle), inputs and the precisions inside it."""

    name: str
    onnx: str
    inputs: tuple[GraphInput, ...]
    precisions: tuple[str, ...] = ("fp16",)
    role: str = ""          # "vision" | "decoder" | "" (from the name when empty)

    @property
    def kind(self) -> str:
        return self.role or ("vision" if self.name.startswith("vision") else
                             "decoder" if self.name.startswith("decoder") else self.name)

    @classmethod
    def from_spec(cls, spec: Any, precisions: Sequence[str] = ("fp16",)) -> "EngineComponent":
        """From an object with ``name``, ``file`` (or ``onnx``) and ``inputs`` of (``name``, ``shape``, ``dtype``),
        e.g. ``edgevlm.exporter.spec.ComponentSpec``."""
        file = getattr(spec, "file", None) or getattr(spec, "onnx")
        inputs = tuple(GraphInput(t.name, tuple(getattr(t, "shape", None) or getattr(t, "dims")),
                                  getattr(t, "dtype", "float32")) for t in spec.inputs)
        return cls(spec.name, file, inputs, tuple(precisions))


def standard_components(cfg: ModelConfig, recipe: Mapping[str, str]) -> list[EngineComponent]:
    """edgevlm's bundle graphs (names and dims as ``edgevlm.exporter.spec``): vision.onnx and decoder.onnx."""
    s, c = cfg.vision.image_size, cfg.llm
    vision = EngineComponent("vision", "vision.onnx", (GraphInput("pixel_values", ("batch", 3, s, s)),),
                             (recipe["vision"],), "vision")
    kv_shape: tuple[Dim, ...] = ("batch", c.num_kv_heads, "past_seq", c.head_dim)
    inputs = [GraphInput("inputs_embeds", ("batch", "seq", c.hidden_size)),
              GraphInput("attention_mask", ("batch", "past_seq + seq"), "int64"),
              GraphInput("position_ids", ("batch", "seq"), "int64")]
    for i in range(c.num_layers):
        inputs += [GraphInput(f"past_key_values.{i}.key", kv_shape), GraphInput(f"past_key_values.{i}.value", kv_shape)]
    decoder = EngineComponent("decoder", "decoder.onnx", tuple(inputs),
                              tuple(dict.fromkeys((recipe["decoder"], recipe["lm_head"]))), "decoder")
    return [vision, decoder]


def components_from_manifest(manifest: Mapping[str, Any]) -> list[EngineComponent]:
    """Engine components from a manifest-like dict: ``{"components": {name: {"file": ..., "inputs": [...],
    "precision": ...}}}`` (inputs as ``[{"name", "shape"|"dims", "dtype"}]`` or ``{name: dims}``). Entries without
    an ``.onnx`` file (the embedding table) are skipped."""
    comps = manifest.get("components", manifest)
    out = []
    for name, entry in comps.items():
        if not isinstance(entry, Mapping):
            continue
        file = entry.get("file") or entry.get("onnx")
        if not file or not str(file).endswith(".onnx"):
            continue
        raw = entry.get("inputs")
        if raw is None:
            raise BundleError(f"manifest component '{name}' lists no inputs: cannot plan its optimization profiles")
        if isinstance(raw, Mapping):
            inputs = tuple(GraphInput(k, tuple(v)) for k, v in raw.items())
        else:
            inputs = tuple(GraphInput(i["name"], tuple(i.get("shape", i.get("dims", ()))), i.get("dtype", "float32"))
                           for i in raw)
        prec = entry.get("precision", "fp16")
        if isinstance(prec, Mapping):
            precs = tuple(dict.fromkeys(str(v) for v in prec.values()))
        elif isinstance(prec, (list, tuple)):
            precs = tuple(prec)
        else:
            precs = (str(prec),)
        out.append(EngineComponent(name, str(file), inputs, precs, entry.get("role", "")))
    if not out:
        raise BundleError("the manifest lists no ONNX component to build an engine from")
    return out


# ---- outputs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]          # dynamic inputs only, in graph input order


@dataclass(frozen=True)
class EnginePlan:
    component: str
    onnx: str
    engine: str
    precisions: tuple[str, ...]
    precision_flags: tuple[str, ...]       # weakly typed builder flags (empty when strongly typed)
    profiles: tuple[Profile, ...]
    dla_core: int | None = None
    allow_gpu_fallback: bool = False
    workspace_bytes: int = 0


@dataclass(frozen=True)
class BuildPlan:
    target: str
    tensorrt: str
    builder_mode: str                      # "weak" | "strong"
    compute_capability: str | None
    jetpack: str | None
    model: str
    precision: str
    context: int
    max_prompt_tokens: int
    opt_prompt_tokens: int
    max_batch: int
    engine_dir: str
    timing_cache: str
    engines: tuple[EnginePlan, ...]
    notes: tuple[str, ...] = ()
    schema: int = PLAN_SCHEMA

    def engine(self, component: str) -> EnginePlan:
        for e in self.engines:
            if e.component == component:
                return e
        raise KeyError(f"no engine for '{component}' in the plan; engines: {[e.component for e in self.engines]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for e in d["engines"]:
            for p in e["profiles"]:
                p["shapes"] = {k: {"min": list(v["min"]), "opt": list(v["opt"]), "max": list(v["max"])}
                               for k, v in p["shapes"].items()}
            e["precisions"], e["precision_flags"] = list(e["precisions"]), list(e["precision_flags"])
            e["profiles"] = list(e["profiles"])
            e["trtexec"] = trtexec_args(_engine_from_dict(e), self)
        d["engines"], d["notes"] = list(d["engines"]), list(d["notes"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildPlan":
        if d.get("schema") != PLAN_SCHEMA:
            raise BundleError(f"build plan schema {d.get('schema')} is not {PLAN_SCHEMA}: re-plan with this edgevlm")
        d = dict(d)
        engines = tuple(_engine_from_dict(e) for e in d.pop("engines"))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(engines=engines, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BuildPlan":
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILE
        if not p.is_file():
            raise BundleError(f"build plan {p} not found: create it with `edgevlm export --target ...`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BundleError(f"build plan {p} is malformed: {exc}") from None


def _engine_from_dict(e: Mapping[str, Any]) -> EnginePlan:
    profiles = tuple(Profile(p["name"], {k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                         for k, v in p["shapes"].items()}) for p in e["profiles"])
    return EnginePlan(e["component"], e["onnx"], e["engine"], tuple(e["precisions"]), tuple(e["precision_flags"]),
                      profiles, e.get("dla_core"), bool(e.get("allow_gpu_fallback")), int(e.get("workspace_bytes", 0)))


# ---- planning -----------------------------------------------------------------------------------------------------
def _dim_kind(sym: str, where: str) -> list[str]:
    terms = [t.strip().lower() for t in sym.split("+")]
    kinds = []
    for t in terms:
        if t not in _KIND_OF:
            raise ConfigError(f"{where}: symbolic dim '{sym}' is not known; name dims one of "
                              + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in _SYMBOLS.items())
                              + " (or sums such as 'past_seq + seq')")
        kinds.append(_KIND_OF[t])
    return kinds


def _resolve(inp: GraphInput, values: Mapping[str, tuple[int, int, int]], where: str) -> ShapeRange:
    mins, opts, maxs = [], [], []
    for d in inp.shape:
        if isinstance(d, int):
            lo = op = hi = d
        else:
            kinds = _dim_kind(d, f"{where} input '{inp.name}'")
            if kinds == ["total"]:
                kinds = ["past", "seq"]
            missing = [k for k in kinds if k not in values]
            if missing:
                raise ConfigError(f"{where} input '{inp.name}': dim '{d}' needs '{missing[0]}', which this graph's "
                                  f"profiles do not define")
            lo, op, hi = (sum(values[k][i] for k in kinds) for i in range(3))
        mins.append(lo)
        opts.append(op)
        maxs.append(hi)
    return ShapeRange(tuple(mins), tuple(opts), tuple(maxs))


def _kinds_used(comp: EngineComponent) -> set[str]:
    used: set[str] = set()
    for inp in comp.inputs:
        for d in inp.shape:
            if isinstance(d, str):
                used.update(_dim_kind(d, f"{comp.name} input '{inp.name}'"))
    return used


def plan_tensorrt_build(model_cfg: ModelConfig, target: Target | str, precision: Mapping[str, str] | str | None = None,
                        *, components: Iterable[EngineComponent] | None = None, context: int | None = None,
                        prompt_tokens: int | None = None, opt_prompt_tokens: int | None = None, max_batch: int = 1,
                        use_dla: bool | None = None, builder_mode: str = "auto", prefill_past_max: int = 0,
                        workspace_gb: float | None = None, engine_dir: str = DEFAULT_ENGINE_DIR) -> BuildPlan:
    """The TensorRT build plan for a bundle on ``target``.

    Args:
        model_cfg: the bundle's model (visual tokens, context, dims of the standard components).
        target: a TensorRT ``Target`` or its name.
        precision: the bundle's recipe (preset name, ``"int4,vision=fp16"`` or a dict); None = target default.
            Ignored for components given explicitly (they carry their own precisions).
        components: the graphs to build (default: ``standard_components``).
        context: KV length the decode profile covers (default: min(model max, target max_context)).
        prompt_tokens: longest prompt incl. visual tokens (default ``planner.max_prompt_tokens``).
        opt_prompt_tokens: prefill opt shape (default visual tokens + 64).
        max_batch: largest batch of every profile.
        use_dla: put the vision graph on DLA core 0 (None = when the target has DLA and the graph can go there).
        builder_mode: "auto" (weak for TensorRT 10.x, strong for 11.x), "weak" or "strong".
        prefill_past_max: largest past length the prefill profile accepts (0 = fresh prompts only).
        workspace_gb: builder workspace (memPoolSize) per engine; None = ``target.workspace_gb``.
        engine_dir: folder (relative to the bundle) for engines and the timing cache.
    """
    if isinstance(target, str):
        target = get_target(target)
    if not target.is_tensorrt or not target.tensorrt:
        raise TargetError(f"target '{target.label}' runs {target.backend}: there are no TensorRT engines to plan")
    recipe = target.recipe(precision)
    comps = list(components) if components is not None else standard_components(model_cfg, recipe)
    version = target.tensorrt
    mode = trt_builder_mode(version) if builder_mode == "auto" else builder_mode
    if mode not in ("weak", "strong"):
        raise ConfigError(f"builder_mode '{builder_mode}' unknown; use auto, weak or strong")
    if mode == "weak" and parse_trt_version(version)[0] >= 11:
        raise ConfigError(f"TensorRT {version} builds strongly typed networks only (weak typing was removed in 11.0)")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")

    ctx = default_context(model_cfg, target) if context is None else int(context)
    if ctx < 2:
        raise ConfigError(f"context {ctx} is too short for a decode profile")
    p_max = max_prompt_tokens(model_cfg, ctx) if prompt_tokens is None else min(int(prompt_tokens), ctx)
    p_opt = typical_prompt_tokens(model_cfg, p_max) if opt_prompt_tokens is None else min(int(opt_prompt_tokens), p_max)
    if prefill_past_max < 0 or prefill_past_max > ctx - 1:
        raise ConfigError(f"prefill_past_max {prefill_past_max} must be in 0..{ctx - 1}")
    batch = (1, 1, max_batch)
    decode_opt = min(ctx - 1, p_opt + DECODE_OPT_EXTRA)
    notes: list[str] = []
    workspace = int((target.workspace_gb if workspace_gb is None else workspace_gb) * 2**30)
    engines = []
    used_dla = False
    for comp in comps:
        where = f"component '{comp.name}'"
        kinds = _kinds_used(comp)
        bad = [p for p in comp.precisions if p not in target.precisions]
        if bad:
            raise TargetError(f"{where}: target '{target.label}' does not support {', '.join(bad)}; it supports "
                              f"{', '.join(target.precisions)}")
        # DLA: static-shape vision/projector graph at fp16/int8 on a target with DLA cores.
        dla_ok = (target.dla_cores > 0 and comp.kind == "vision" and kinds <= {"batch"}
                  and all(p in DLA_PRECISIONS for p in comp.precisions))
        if use_dla and comp.kind == "vision" and not dla_ok:
            raise ConfigError(f"{where} cannot go on DLA: target '{target.label}' has {target.dla_cores} DLA core(s); "
                              f"DLA needs static shapes and fp16/int8 (precisions {', '.join(comp.precisions)})")
        dla = dla_ok and use_dla is not False
        b = (max_batch,) * 3 if dla else batch
        if "past" in kinds:
            profiles = [("prefill", {"batch": b, "seq": (1, p_opt, p_max), "past": (0, 0, prefill_past_max)}),
                        ("decode", {"batch": b, "seq": (1, 1, 1), "past": (1, decode_opt, ctx - 1)})]
        elif "seq" in kinds:
            profiles = [("tokens", {"batch": b, "seq": (1, p_opt, p_max)})]
        else:
            profiles = [("static" if dla else "default", {"batch": b})]
        built = tuple(Profile(name, {i.name: _resolve(i, vals, where) for i in comp.inputs if i.dynamic})
                      for name, vals in profiles)
        if mode == "weak":
            wanted = {f for p in comp.precisions for f in _WEAK_FLAGS[p]}
            flags = tuple(f for f in _FLAG_ORDER if f in wanted)
            if "fp8" in flags and "int8" in flags:
                raise ConfigError(f"{where}: fp8 and int8 cannot be enabled together in one TensorRT build")
        else:
            flags = ()
        engines.append(EnginePlan(comp.name, comp.onnx, f"{engine_dir}/{comp.name}.engine", tuple(comp.precisions),
                                  flags, built, 0 if dla else None, dla, workspace))
        used_dla |= dla
    if "past" in set().union(*(_kinds_used(c) for c in comps)):
        notes.append("the prefill profile has past_seq 0..0 (zero-length past tensors): TensorRT supports empty "
                     "tensors, but this path is unverified on a device")
    if used_dla:
        notes.append("vision on DLA core 0 with GPU fallback: ViT attention/LayerNorm fall back to the GPU; compare "
                     "with use_dla=False in `edgevlm bench` before keeping it")
    if mode == "strong" and any(p != "fp32" for c in comps for p in c.precisions):
        notes.append("strongly typed build: the ONNX dtypes are the precision; the graphs must be exported in fp16 "
                     "(or converted with modelopt.onnx.autocast) with explicit Q/DQ for int8/int4")
    if target.kind == "jetson":
        notes.append("build on the board itself: engines are tied to the TensorRT version and the GPU")
    return BuildPlan(target=target.label, tensorrt=version, builder_mode=mode,
                     compute_capability=target.compute_capability, jetpack=target.jetpack, model=model_cfg.name,
                     precision=recipe_name(recipe) if components is None else ",".join(
                         dict.fromkeys(p for c in comps for p in c.precisions)),
                     context=ctx, max_prompt_tokens=p_max, opt_prompt_tokens=p_opt, max_batch=max_batch,
                     engine_dir=engine_dir, timing_cache=f"{engine_dir}/timing.cache", engines=tuple(engines),
                     notes=tuple(notes))


# ---- trtexec ------------------------------------------------------------------------------------------------------
def shape_string(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """trtexec shape spec: ``name:AxBxC,name2:...``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def parse_shape_string(spec: str) -> dict[str, tuple[int, ...]]:
    """Inverse of ``shape_string`` (splits each entry on its last ':', like trtexec)."""
    out = {}
    for part in spec.split(","):
        name, _, dims = part.rpartition(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def trtexec_args(engine: EnginePlan, plan: BuildPlan) -> list[str]:
    """trtexec arguments (without the program) that build ``engine`` as planned."""
    args = [f"--onnx={engine.onnx}", f"--saveEngine={engine.engine}"]
    if plan.builder_mode == "strong":
        args.append("--stronglyTyped")
    else:
        args += [f"--{f}" for f in engine.precision_flags]
    profiles = [p for p in engine.profiles if p.shapes]
    for i, prof in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={i}")
        for which in ("min", "opt", "max"):
            args.append(f"--{which}Shapes=" + shape_string({k: getattr(v, which) for k, v in prof.shapes.items()}))
    if engine.dla_core is not None:
        args.append(f"--useDLACore={engine.dla_core}")
        if engine.allow_gpu_fallback:
            args.append("--allowGPUFallback")
    if engine.workspace_bytes:
        args.append(f"--memPoolSize=workspace:{max(1, engine.workspace_bytes // 2**20)}")   # MiB
    args += [f"--timingCacheFile={plan.timing_cache}", "--skipInference"]
    return args


_SCRIPT_HEAD = r"""#!/usr/bin/env bash
# Build the TensorRT engines of this bundle ON THE TARGET DEVICE ({target}).
# Generated by edgevlm from {plan_file} (model {model}, precision {precision}, TensorRT {trt}, {mode}ly typed).
# Engines are tied to the TensorRT version and the GPU: build them where they will run.
# Usage: bash {script} [extra trtexec flags]    (TRTEXEC=/path/to/trtexec to pick a binary;
#        EDGEVLM_ALLOW_TRT_MISMATCH=1 to build with another TensorRT {major}.x minor version anyway)
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${{TRTEXEC:-trtexec}}"
if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  for candidate in /usr/src/tensorrt/bin/trtexec /usr/local/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do
    if [ -x "$candidate" ]; then TRTEXEC="$candidate"; break; fi
  done
fi
if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  echo "error: trtexec not found. On a Jetson it ships with JetPack at /usr/src/tensorrt/bin/trtexec" >&2
  echo "       (sudo apt install nvidia-jetpack); on a desktop install TensorRT {trt} and put trtexec on PATH," >&2
  echo "       or set TRTEXEC=/path/to/trtexec. Alternatively: edgevlm build-engine <bundle> (Python API)." >&2
  exit 1
fi

WANT="{trt}"
RAW="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
if [ -z "$RAW" ]; then
  RAW="$(python3 -c 'import tensorrt as t; a, b = t.__version__.split(".")[:2]; print(int(a) * 10000 + int(b) * 100)' 2>/dev/null || true)"
fi
if [ -z "$RAW" ]; then
  echo "warning: could not read the TensorRT version of $TRTEXEC; the plan expects TensorRT $WANT" >&2
else
  HAVE="$((RAW / 10000)).$(((RAW / 100) % 100))"
  if [ "${{HAVE%%.*}}" != "${{WANT%%.*}}" ]; then
    echo "error: this plan is for TensorRT $WANT but $TRTEXEC is TensorRT $HAVE: the builder flags differ between" >&2
    echo "       major versions. Re-export for this device (edgevlm export --target {target_base}@trt$HAVE ...)." >&2
    exit 1
  fi
  if [ "$HAVE" != "$WANT" ]; then
    if [ "${{EDGEVLM_ALLOW_TRT_MISMATCH:-0}}" != "1" ]; then
      echo "error: this plan is for TensorRT $WANT but $TRTEXEC is TensorRT $HAVE. Engines only run with the" >&2
      echo "       TensorRT they were built with: re-export with --target {target_base}@trt$HAVE, or set" >&2
      echo "       EDGEVLM_ALLOW_TRT_MISMATCH=1 to build with $HAVE anyway." >&2
      exit 1
    fi
    echo "warning: building with TensorRT $HAVE (plan: $WANT) because EDGEVLM_ALLOW_TRT_MISMATCH=1" >&2
  fi
fi

for f in {onnx_files}; do
  if [ ! -f "$f" ]; then echo "error: $f not found next to this script: run it inside the bundle folder" >&2; exit 1; fi
done
mkdir -p {engine_dir}
"""


def build_engines_script(plan: BuildPlan) -> str:
    """The ``build_engines.sh`` text: checks trtexec and its TensorRT version, then one trtexec call per engine."""
    q = shlex.quote
    head = _SCRIPT_HEAD.format(target=plan.target, target_base=plan.target.split("@")[0], plan_file=PLAN_FILE,
                               model=plan.model, precision=plan.precision, trt=plan.tensorrt, mode=plan.builder_mode,
                               script=SCRIPT_FILE, major=plan.tensorrt.split(".")[0],
                               onnx_files=" ".join(q(e.onnx) for e in plan.engines), engine_dir=q(plan.engine_dir))
    body = []
    for e in plan.engines:
        where = f"DLA core {e.dla_core} + GPU fallback" if e.dla_core is not None else "GPU"
        body.append(f'\necho "== building {e.engine} from {e.onnx} ({where}; this can take many minutes) =="')
        args = " \\\n    ".join(q(a) for a in trtexec_args(e, plan))
        body.append(f'"$TRTEXEC" \\\n    {args} \\\n    "$@"')
    engines = " ".join(q(e.engine) for e in plan.engines)
    tail = (f"\nif command -v sha256sum >/dev/null 2>&1; then sha256sum {engines} > {q(plan.engine_dir)}/SHA256SUMS; fi"
            f'\necho "done: {len(plan.engines)} engine(s) in {plan.engine_dir}/ (TensorRT {plan.tensorrt}, '
            f'{plan.target})"\n')
    return head + "\n".join(body) + "\n" + tail


def write_build_files(bundle_dir: str | os.PathLike, plan: BuildPlan) -> tuple[Path, Path]:
    """Write ``build_plan.json`` and an executable ``build_engines.sh`` into ``bundle_dir`` (atomically)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} not found")
    out = []
    for name, text, mode in ((PLAN_FILE, plan.to_json() + "\n", 0o644), (SCRIPT_FILE, build_engines_script(plan), 0o755)):
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode & ~umask())
        os.replace(tmp, root / name)
        out.append(root / name)
    return out[0], out[1]


def prepare_tensorrt_bundle(bundle_dir: str | os.PathLike, model_cfg: ModelConfig, target: Target | str,
                            precision: Mapping[str, str] | str | None = None, *,
                            components: Iterable[EngineComponent] | None = None, check: bool = True,
                            **plan_kwargs: Any) -> dict[str, Any]:
    """What ``edgevlm export --target T`` runs for a TensorRT target once the ONNX graphs are in ``bundle_dir``.

    1. ``trt_compat.assert_tensorrt_compat`` on every graph (raises ``TargetError`` naming each offending node);
    2. ``plan_tensorrt_build`` (profiles, flags, DLA, workspace);
    3. ``write_build_files`` (``build_plan.json`` + ``build_engines.sh``).

    Returns the manifest's ``tensorrt`` entry: ``{"plan": <plan dict>, "plan_file", "script", "compat_warnings",
    "engines": {}}`` (``engines`` is filled by ``edgevlm build-engine`` with ``trt_build.build_engines``' metadata).
    """
    if isinstance(target, str):
        target = get_target(target)
    plan = plan_tensorrt_build(model_cfg, target, precision, components=components, **plan_kwargs)
    warnings: dict[str, list[dict[str, str]]] = {}
    root = Path(bundle_dir)
    if check:
        from edgevlm.exporter.trt_compat import assert_tensorrt_compat

        for e in plan.engines:
            path = root / e.onnx
            if not path.is_file():
                raise BundleError(f"{path} not found: write the ONNX graphs before planning their engines")
            found = assert_tensorrt_compat(path, plan.tensorrt, component=e.component)
            if found:
                warnings[e.component] = [w.to_dict() for w in found]
    plan_path, script_path = write_build_files(root, plan)
    return {"plan": plan.to_dict(), "plan_file": plan_path.name, "script": script_path.name,
            "compat_warnings": warnings, "engines": {}}


__all__ = ["prepare_tensorrt_bundle", "GraphInput", "EngineComponent", "ShapeRange", "Profile", "EnginePlan", "BuildPlan", "plan_tensorrt_build",
           "standard_components", "components_from_manifest", "trtexec_args", "build_engines_script",
           "write_build_files", "shape_string", "parse_shape_string", "PLAN_FILE", "SCRIPT_FILE"]
