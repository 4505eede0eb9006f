"""``edgevlm verify BUNDLE``: is this bundle sound, and do its engines agree with its ONNX graphs? Torch-free: it
runs on the device (numpy + ONNX Runtime; ``onnx`` for the TensorRT graph check; TensorRT + cuda-python for the
engine comparison when present).

    >>> from edgevlm.exporter.verify import verify_bundle
    >>> report = verify_bundle("out/bundle-orin", samples=2, seed=0)
    >>> report.passed, [c.name for c in report.failures]

    edgevlm verify out/bundle-orin [--json-output] [--samples 2] [--seed 0] [--engines auto|skip|require]

Checks (each a row: name, status pass / warn / skip / fail, detail):

* ``manifest``, ``sha256``: ``read_bundle`` (schema, paths, sizes) and every file's hash;
* ``onnx:<component>``: each ONNX graph loads in ONNX Runtime (CPU EP) and its I/O names, dtypes and dims match
  the manifest (a static dim must be equal, a symbolic one symbolic); ``embed``: the table's shape and dtype;
* ``run:vision``: random pixel values -> ``[1, V, D]``, finite; ``run:decoder``: the decoder through the decoder
  interface (``edgevlm.runtime.decoders``, ONNX Runtime: the code the runtime serves with, KV cache per the
  manifest's ``kv_cache`` block): a prefill of the image embeddings plus random text rows from an empty cache, then
  one decode step on the cache it wrote -> logits ``[vocab]`` and KV tensors (``kv_arrays``) of the right shapes,
  finite; ``run:kv-consistency``: the decode step's logits equal a prefill of all T + 1 tokens (the KV cache carries
  the context); ``--samples`` random inputs each;
* TensorRT targets: ``trt:compat:<component>`` (``trt_compat.check_tensorrt_compat`` for the target's TensorRT and
  the plan's builder mode: every graph rule of the rule book, docs/tensorrt.md; an error-level rule fails, warnings
  are listed), ``trt:build-plan`` (``build_plan.json`` loads, matches the manifest's copy, the target's TensorRT
  version, and ``trt_compat.check_build_plan``: profiles cover every dynamic input and the KV-cache shapes, the
  planned context is the manifest's, fp32 layers pinned in weakly typed fp16 builds; error-level rules fail),
  ``trt:build-script``
  (``build_engines.sh`` builds every planned engine with the plan's trtexec arguments and version check);
* ``engine:<component>``: for engines recorded in ``manifest["tensorrt"]["engines"]`` (by ``edgevlm
  build-engine``): the file is hash-listed; with TensorRT + a GPU here each engine runs on the same inputs as ONNX
  Runtime (the decoder engine's ``TrtDecoderRunner`` through the same decoder loop as ``run:decoder``, KV checks
  included) and is compared (max |diff|, cosine) against the component's parity tolerance, loosened for TF32 /
  fp16 / int8 engines. Without them: "skipped: no TensorRT/GPU here; run `edgevlm verify` on the device".

`edgevlm verify` exits 1 when a check fails (an unreadable bundle is a failed `manifest` check).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgevlm.errors import BundleError, EdgeVLMError, MissingDependency

log = logging.getLogger(__name__)

__all__ = ["Check", "VerifyReport", "verify_bundle", "print_report", "engine_tolerance", "ENGINE_MODES"]

PASS, WARN, SKIP, FAIL = "pass", "warn", "skip", "fail"
ENGINE_MODES = ("auto", "skip", "require")
ON_DEVICE = "run `edgevlm verify` on the device"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}
_TEXT_TOKENS = 8                     # random text rows appended to the image embeddings in the decoder run


@dataclass
class Check:
    name: str
    status: str                      # pass | warn | skip | fail
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "data": self.data}


@dataclass
class VerifyReport:
    """Every check's result. ``passed`` is False when any check failed (warnings and skips do not fail)."""

    bundle: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check '{name}'; checks: {', '.join(c.name for c in self.checks)}")

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, SKIP, FAIL)}

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "passed": self.passed, "counts": self.counts(),
                "seconds": round(self.seconds, 3), "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


# ---- helpers --------------------------------------------------------------------------------------------------------
def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        raise BundleError("bfloat16 graph I/O cannot be fed from numpy; export with float32/float16 I/O")
    return np.dtype(name)


def _stats(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, cosine, max |ref|) in float64."""
    from edgevlm.graphs.spec import cosine

    r, g = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff = float(np.max(np.abs(r - g))) if r.size else 0.0
    return diff, cosine(r, g), float(np.max(np.abs(r))) if r.size else 0.0


def _short(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; ... ({len(items) - limit} more)" if len(items) > limit else "")


def _plan_key(plan) -> str:
    """A plan's content independent of dict key order (manifest.json is written with sorted keys, which reorders
    the profile shapes) and without the derived trtexec arguments."""
    d = plan.to_dict()
    for e in d["engines"]:
        e.pop("trtexec", None)
    return json.dumps(d, sort_keys=True)


def engine_tolerance(component: Mapping[str, Any], engine: Mapping[str, Any], kind: str):
    """The ``spec.Tolerance`` an engine output must meet against ONNX Runtime: the component's parity tolerance
    (manifest ``parity.tolerances[kind]``, else the precision default), loosened for the engine's arithmetic:
    fp32 engines may use TF32 (TensorRT's default on Ampere+), fp16/bf16 engines round every layer, int8/int4/fp8
    engines are judged by cosine."""
    from edgevlm.graphs.spec import FP16_TOLERANCES, FP32_TOLERANCES, Tolerance

    base = None
    tol = (component.get("parity") or {}).get("tolerances") if isinstance(component.get("parity"), Mapping) else None
    if isinstance(tol, Mapping) and isinstance(tol.get(kind), Mapping):
        t = tol[kind]
        base = Tolerance(float(t.get("max_abs", 1e-4)), bool(t.get("relative", False)), t.get("min_cosine"))
    precs = {str(p) for p in (engine.get("precision_flags") or [])}
    prec = component.get("precision", "fp32")
    precs |= set(prec.values()) if isinstance(prec, Mapping) else {str(prec)}
    ref16 = FP16_TOLERANCES.vision if kind == "vision" else FP16_TOLERANCES.logits
    ref32 = FP32_TOLERANCES.vision if kind == "vision" else FP32_TOLERANCES.logits
    base = base or (ref16 if precs & {"fp16", "bf16"} else ref32)
    if precs & {"int8", "int4", "fp8", "fp4"}:
        return Tolerance(max(base.max_abs, 0.5), True, 0.98)
    if precs & {"fp16", "bf16"}:
        return Tolerance(max(base.max_abs, ref16.max_abs * 2), True,
                         min(base.min_cosine or 1.0, 0.998))
    return Tolerance(max(base.max_abs * 10, 1e-3), True, min(base.min_cosine or 1.0, 0.9999))


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str
    shape: list[Any]


class _GraphIO:
    """A graph's I/O (``get_inputs`` / ``get_outputs`` like an ``InferenceSession``) once its session is dropped."""

    def __init__(self, sess: Any) -> None:
        self._io = [[_Arg(a.name, a.type, list(a.shape or [])) for a in args]
                    for args in (sess.get_inputs(), sess.get_outputs())]

    def get_inputs(self) -> list[_Arg]:
        return self._io[0]

    def get_outputs(self) -> list[_Arg]:
        return self._io[1]


def _check_kv(logits: np.ndarray, pasts: list[np.ndarray], kv: Any, length: int, vocab: int, what: str) -> None:
    """After a run: logits ``[vocab]``, the cache's past tensors ``kv.shape(length)`` each, all finite."""
    if list(logits.shape) != [vocab]:
        raise BundleError(f"{what}: logits {list(logits.shape)}, expected [{vocab}]")
    names = kv.past_names()
    if len(pasts) != len(names):
        raise BundleError(f"{what}: the KV cache holds {len(pasts)} tensors, expected {len(names)}")
    for name, p in zip(names, pasts):
        if list(p.shape) != kv.shape(length):
            raise BundleError(f"{what}: {name} {list(p.shape)}, expected {kv.shape(length)}")
    bad = [n for n, a in zip(["logits", *names], [logits, *pasts]) if not np.all(np.isfinite(a))]
    if bad:
        raise BundleError(f"{what}: non-finite values in {', '.join(bad)} (fp16 overflow or -inf masks?)")


def _prefill_and_step(decoder: Any, embeds: np.ndarray, next_embed: Any, kv: Any, vocab: int,
                      what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one decoder loop verify runs on every backend (a ``Decoder`` of ``edgevlm.runtime.decoders``: ONNX
    Runtime for ``run:decoder``, the TensorRT runner for ``engine:decoder``): a prefill of ``embeds [1, T, D]``
    from an empty cache, then one step fed ``next_embed`` (``[1, 1, D]``, or a function of the prefill's logits
    giving it); logits and KV cache checked after each (``_check_kv``). Returns copies of both logits rows and the
    embedding fed."""
    t = embeds.shape[1]
    prefill = np.array(decoder.prefill(embeds), np.float32)                           # [vocab]
    _check_kv(prefill, decoder.kv_arrays(), kv, t, vocab, f"prefill ({what})")
    nxt = next_embed(prefill) if callable(next_embed) else next_embed
    step = np.array(decoder.step(np.asarray(nxt).reshape(-1)), np.float32)            # [vocab]
    _check_kv(step, decoder.kv_arrays(), kv, t + 1, vocab, f"decode step ({what})")
    return prefill, step, nxt


class _Verifier:
    def __init__(self, path: Path, samples: int, seed: int, engines: str, threads: int | None) -> None:
        self.path, self.samples, self.seed, self.engines = path, samples, seed, engines
        self.threads = threads or max(1, min(2, os.cpu_count() or 1))
        self.report = VerifyReport(str(path))
        self.bundle: Any = None
        self.sessions: dict[str, Any] = {}
        self.sample: dict[str, Any] = {}        # first sample's inputs/outputs, reused by the engine comparison
        self.table: Any = None                  # the embedding table (memory-mapped), when it loads

    def add(self, name: str, status: str, detail: str = "", **data: Any) -> Check:
        c = Check(name, status, detail, data)
        self.report.checks.append(c)
        log.debug("%s: %s %s", name, status, detail)
        return c

    def guard(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one check; an exception becomes a failed check with its message (a verifier reports, it does not
        stop at the first problem)."""
        try:
            return fn()
        except MissingDependency as exc:
            hint = f" (pip install {exc.package} is enough for this check)" if exc.package == "onnx" else ""
            self.add(name, SKIP, f"skipped: {exc}{hint}")
        except Exception as exc:  # noqa: BLE001 - ORT/onnx raise their own types; each becomes a failed row
            msg = str(exc) if isinstance(exc, EdgeVLMError) else f"{type(exc).__name__}: {exc}"
            self.add(name, FAIL, msg)
        return None

    # -- (a) bundle ------------------------------------------------------------------------------------------------
    def read(self) -> bool:
        from edgevlm.bundle import read_bundle

        try:
            self.bundle = read_bundle(self.path, verify_hashes=True)
        except BundleError as exc:
            try:
                self.bundle = read_bundle(self.path, verify_hashes=False)
            except BundleError as exc2:
                self.add("manifest", FAIL, str(exc2))
                return False
            self.add("manifest", PASS, self._summary())
            self.add("sha256", FAIL, str(exc))
            return True
        self.add("manifest", PASS, self._summary())
        self.add("sha256", PASS, f"all {len(self.bundle.files)} files match the manifest")
        return True

    def _summary(self) -> str:
        b = self.bundle
        tgt = b.manifest.get("target") or {}
        return (f"schema {b.schema_version}, model {b.model_config.name}, target {tgt.get('name', '?')} "
                f"({tgt.get('backend', '?')}), {len(b.files)} files, {b.total_size / 2**20:.1f} MiB")

    # -- (b) graphs load, I/O matches ------------------------------------------------------------------------------
    def load_graphs(self) -> None:
        from edgevlm.bundle import load_embedding_table

        comps = self.bundle.manifest["components"]
        order = [n for n in ("vision", "embed", "decoder") if n in comps] + [n for n in comps
                                                                            if n not in ("vision", "embed", "decoder")]
        for name, entry in ((n, comps[n]) for n in order):
            kind = entry.get("kind", "table" if str(entry.get("file", "")).endswith(".npy") else "onnx")
            if kind == "table":
                self.guard("embed" if name == "embed" else f"table:{name}", lambda n=name: self._table(n))
            elif str(entry.get("file", "")).endswith(".onnx"):
                self.guard(f"onnx:{name}", lambda n=name, e=entry: self._session(n, e))
        self.table = None
        if "embed" in self.bundle.manifest["components"]:
            try:
                self.table = load_embedding_table(self.bundle)
            except BundleError:
                self.table = None

    def _table(self, name: str) -> None:
        from edgevlm.bundle import load_embedding_table

        t = load_embedding_table(self.bundle, name)
        cfg = self.bundle.model_config
        want = (cfg.llm.vocab_size, cfg.llm.hidden_size)
        if tuple(t.shape) != want:
            raise BundleError(f"embedding table is {list(t.shape)}, the model needs {list(want)} (vocab, hidden)")
        self.add("embed" if name == "embed" else f"table:{name}", PASS, f"{t.dtype} {list(t.shape)}")

    def _cpu_session_bytes(self, name: str, entry: Mapping[str, Any]) -> tuple[int, int]:
        """(estimated bytes ONNX Runtime's CPU session of ``name`` holds, bytes available now). fp16 graphs cost
        about three times their weights there: the CPU provider runs most fp16 ops through float32, so each fp16
        weight gets a float32 copy next to it; other graphs about their size."""
        import psutil

        path = self.bundle.component_path(name)
        files = [path] + [path.parent / f for f in entry.get("external_data") or []]
        size = sum(f.stat().st_size for f in files if f.is_file())
        factor = 3.0 if entry.get("precision") == "fp16" else 1.25
        return int(size * factor), int(psutil.virtual_memory().available)

    def _session(self, name: str, entry: Mapping[str, Any]) -> None:
        from edgevlm.runtime.backends import import_ort

        need, avail = self._cpu_session_bytes(name, entry)
        if need > 0.9 * avail:
            self.add(f"onnx:{name}", SKIP, f"skipped: ONNX Runtime on this CPU would need ~{need / 2**30:.1f} GiB for "
                     f"the {entry.get('precision', '?')} {name} graph ({avail / 2**30:.1f} GiB available"
                     + ("; fp16 weights get float32 copies on the CPU provider" if entry.get("precision") == "fp16"
                        else "") + "); verify it on the target device (TensorRT engine checks) or on a machine "
                     "with more memory")
            return
        ort = import_ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(self.bundle.component_path(name)), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - t0
        problems = []
        for direction, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            declared = {i["name"]: i for i in entry.get(direction) or [] if isinstance(i, Mapping) and "name" in i}
            got = {a.name: a for a in actual}
            for n in sorted(set(got) - set(declared)):
                problems.append(f"graph {direction[:-1]} '{n}' is not in the manifest")
            for n in sorted(set(declared) - set(got)):
                problems.append(f"manifest {direction[:-1]} '{n}' is not in the graph")
            for n in set(got) & set(declared):
                a, d = got[n], declared[n]
                dt = _ORT_TYPES.get(a.type, a.type)
                if d.get("dtype") and d["dtype"] != dt:
                    problems.append(f"'{n}': graph dtype {dt}, manifest {d['dtype']}")
                shape, want = list(a.shape or []), list(d.get("shape") or [])
                if len(shape) != len(want):
                    problems.append(f"'{n}': graph rank {len(shape)} {shape}, manifest {want}")
                    continue
                for k, (g, m) in enumerate(zip(shape, want)):
                    if isinstance(m, int) and g != m:
                        problems.append(f"'{n}' dim {k}: graph {g}, manifest {m}")
                    elif isinstance(m, str) and isinstance(g, int):
                        problems.append(f"'{n}' dim {k}: graph has the static size {g}, manifest says '{m}'")
        # the decoder runs through the decoder interface (its own session): keep only this one's I/O facts
        self.sessions[name] = _GraphIO(sess) if name == "decoder" else sess
        n_in, n_out = len(sess.get_inputs()), len(sess.get_outputs())
        if problems:
            self.add(f"onnx:{name}", FAIL, "I/O differs from the manifest: " + _short(problems)
                     + " (re-export the bundle)", problems=problems)
        else:
            self.add(f"onnx:{name}", PASS, f"loads in ONNX Runtime (CPU, {seconds:.2f} s); {n_in} inputs / {n_out} "
                     f"outputs match the manifest (names, dtypes, dims)")

    # -- (c) run ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        if "vision" in self.sessions:
            self.guard("run:vision", self._run_vision)
        else:
            self.add("run:vision", SKIP, "skipped: the vision graph did not load")
        if "decoder" in self.sessions:
            self.guard("run:decoder", self._run_decoder)
        else:
            self.add("run:decoder", SKIP, "skipped: the decoder graph did not load")

    def _io(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.sessions[name]
        return {i.name: i for i in s.get_inputs()}, {o.name: o for o in s.get_outputs()}

    def _pixels(self, rng: np.random.Generator) -> np.ndarray:
        ins, _ = self._io("vision")
        (name, info), = ins.items()
        s = self.bundle.model_config.vision.image_size
        return rng.standard_normal((1, 3, s, s)).astype(_np_dtype(_ORT_TYPES.get(info.type, "float32")))

    def _run_vision(self) -> None:
        sess = self.sessions["vision"]
        ins, outs = self._io("vision")
        if len(ins) != 1 or len(outs) != 1:
            raise BundleError(f"the vision graph must have one input and one output, got {list(ins)} -> {list(outs)}")
        cfg = self.bundle.model_config
        want = [1, self.bundle.visual_tokens, cfg.llm.hidden_size]
        for i in range(self.samples):
            pv = self._pixels(np.random.default_rng(self.seed + i))
            out = sess.run(None, {next(iter(ins)): pv})[0]
            if list(out.shape) != want:
                raise BundleError(f"vision output {list(out.shape)}, expected {want} ([1, visual tokens, hidden])")
            if not np.all(np.isfinite(out)):
                raise BundleError(f"vision output has {int(np.sum(~np.isfinite(out)))} non-finite values (sample {i})")
            if i == 0:
                self.sample.update(pixel_values=pv, image_embeds=out)
        self.add("run:vision", PASS, f"{self.samples} random image(s) -> {want}, finite")

    def _embed_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        cfg = self.bundle.model_config
        if self.table is not None:
            ids = rng.integers(0, self.table.shape[0], n)
            return np.asarray(self.table[ids], np.float32)
        return (rng.standard_normal((n, cfg.llm.hidden_size)) * 0.02).astype(np.float32)

    def _run_decoder(self) -> None:
        from edgevlm.runtime.backends import BackendOptions
        from edgevlm.runtime.decoders import open_decoder
        from edgevlm.runtime.kv_cache import KVSpec

        cfg = self.bundle.model_config
        entry = self.bundle.component("decoder")
        kv = KVSpec.from_manifest(entry.get("kv_cache"))
        ctx = int(cfg.context_length)
        vocab = int(cfg.llm.vocab_size)
        v = self.bundle.visual_tokens
        t = v + max(1, min(_TEXT_TOKENS, ctx - 2 - v))                # image rows + random text rows
        if t + 1 > ctx:
            raise BundleError(f"the model context ({ctx}) is too short for a prefill of {t} + 1 tokens")
        last_only = entry.get("logits") == "last_position"
        worst_diff, worst_cos, worst_rel = 0.0, 1.0, 0.0
        # the bundle's decoder through the decoder interface (ONNX Runtime, CPU), capacity T + 1
        with open_decoder(self.bundle, "ort", BackendOptions(threads=self.threads), max_context=t + 1) as dec:
            for i in range(self.samples):
                rng = np.random.default_rng(self.seed + 1000 + i)
                vision_ok = "image_embeds" in self.sample           # else: random rows stand in for the image
                if i == 0 or not vision_ok:
                    img = (self.sample["image_embeds"] if vision_ok else self._embed_rows(rng, v)[None])
                else:
                    img = self.sessions["vision"].run(None, {next(iter(self._io("vision")[0])): self._pixels(rng)})[0]
                parts = [img[0].astype(np.float32), self._embed_rows(rng, t - img.shape[1])]
                embeds = np.concatenate(parts)[None]                              # [1, T, D]

                def next_embed(logits: np.ndarray) -> np.ndarray:                 # [1, 1, D] of the greedy token
                    tok = int(np.argmax(logits))
                    return (np.asarray(self.table[min(tok, self.table.shape[0] - 1)], np.float32)[None, None]
                            if self.table is not None else self._embed_rows(rng, 1)[None])

                # prefill from an empty cache, then one decode step on the cache it wrote
                prefill, step, nxt = _prefill_and_step(dec, embeds, next_embed, kv, vocab, f"sample {i}")
                # the same context in one prefill
                full = np.array(dec.prefill(np.concatenate([embeds, nxt], axis=1)), np.float32)
                diff, cos, absmax = _stats(full, step)
                rel = diff / max(1.0, absmax)
                worst_diff, worst_cos, worst_rel = max(worst_diff, diff), min(worst_cos, cos), max(worst_rel, rel)
                if i == 0:
                    self.sample.update(embeds=embeds, next_embed=nxt, prefill_logits=prefill, decode_logits=step)
        self.add("run:decoder", PASS, f"{self.samples} sample(s) through the decoder interface (ONNX Runtime): "
                 f"prefill of {t} tokens (empty cache) + one decode step on its KV cache; logits [{vocab}] per run "
                 f"(graph: {'last position only' if last_only else 'every position'}), KV cache "
                 + (f"{kv.shape(t)} -> {kv.shape(t + 1)}" if kv.mode == "concat" else
                    f"in one shared {kv.shape(t + 1)} buffer") + ", finite")
        precision = entry.get("precision", "fp32")
        fp32 = precision == "fp32" or (isinstance(precision, Mapping) and set(precision.values()) == {"fp32"})
        ok = worst_cos >= (0.9999 if fp32 else 0.99) and (worst_rel <= 1e-3 or not fp32)
        self.add("run:kv-consistency", PASS if ok else FAIL,
                 f"decode-step logits vs a prefill of all {t + 1} tokens: max |diff| {worst_diff:.2e}, cosine "
                 f"{worst_cos:.6f}" + ("" if ok else " - the KV cache does not carry the context (check the "
                                       "present/past wiring of the graph)"),
                 max_abs_diff=worst_diff, cosine=worst_cos)

    # -- (d) TensorRT graph + plan checks ---------------------------------------------------------------------------
    def is_tensorrt(self) -> bool:
        m = self.bundle.manifest
        tgt = m.get("target") or {}
        return tgt.get("backend") == "tensorrt" or "tensorrt" in m or (self.bundle.root / "build_plan.json").exists()

    def tensorrt(self) -> None:
        from edgevlm.graphs.trt_plan import PLAN_FILE, BuildPlan

        m = self.bundle.manifest
        tgt = m.get("target") or {}
        plan = None
        try:
            plan = BuildPlan.load(self.bundle.root / PLAN_FILE)
        except BundleError as exc:
            self.add("trt:build-plan", FAIL, f"{exc} (re-export the bundle with --target {tgt.get('name', '...')})")
        version = str(tgt.get("tensorrt") or (plan.tensorrt if plan else "") or "")
        comps = [n for n in self.sessions] + [n for n, e in m["components"].items()
                                              if str(e.get("file", "")).endswith(".onnx") and n not in self.sessions]
        strong = (plan.builder_mode == "strong") if plan is not None else None
        for name in comps:
            self.guard(f"trt:compat:{name}", lambda n=name: self._compat(n, version, strong))
        if plan is not None:
            self.guard("trt:build-plan", lambda: self._plan(plan, version))
            self.guard("trt:build-script", lambda: self._script(plan))
        self._engines(plan)

    def _compat(self, name: str, version: str, strongly_typed: bool | None = None) -> None:
        from edgevlm.graphs.trt_compat import ERROR, check_tensorrt_compat

        if not version:
            raise BundleError("the manifest's target names no TensorRT version")
        issues = check_tensorrt_compat(self.bundle.component_path(name), version, strongly_typed=strongly_typed)
        errors = [i for i in issues if i.severity == ERROR]
        warnings = [i for i in issues if i.severity != ERROR]
        data = {"errors": [str(i) for i in errors], "warnings": [str(i) for i in warnings],
                "rules": sorted({i.code for i in issues})}
        if errors:
            rules = ", ".join(sorted({i.code for i in errors}))
            self.add(f"trt:compat:{name}", FAIL, f"TensorRT {version} rule(s) broken [{rules}]: "
                     + _short([str(i) for i in errors], 4) + " (re-export for the TensorRT target; rule book: "
                     "docs/tensorrt.md)", **data)
        elif warnings:
            self.add(f"trt:compat:{name}", WARN, f"parsable by TensorRT {version}, {len(warnings)} warning(s): "
                     + _short([str(i) for i in warnings], 4), **data)
        else:
            self.add(f"trt:compat:{name}", PASS, f"standard ONNX ops only; opset, Q/DQ, I/O types and precision "
                     f"fine for TensorRT {version}")

    def _plan(self, plan, version: str) -> None:
        from edgevlm.graphs.trt_compat import ERROR, check_build_plan
        from edgevlm.graphs.trt_plan import PLAN_FILE, BuildPlan, components_from_manifest
        from edgevlm.targets import parse_trt_version

        m = self.bundle.manifest
        tgt = m.get("target") or {}
        problems: list[str] = []
        if PLAN_FILE not in self.bundle.files:
            problems.append(f"{PLAN_FILE} is not listed in the manifest's files (not hash-protected)")
        if version and parse_trt_version(plan.tensorrt) != parse_trt_version(version):
            problems.append(f"the plan is for TensorRT {plan.tensorrt}, the manifest's target for {version}")
        label = tgt.get("label") or tgt.get("name")
        if label and plan.target != label and plan.target.split("@")[0] != tgt.get("name"):
            problems.append(f"the plan is for target '{plan.target}', the manifest's for '{label}'")
        copy = (m.get("tensorrt") or {}).get("plan")
        if isinstance(copy, Mapping):
            try:
                if _plan_key(BuildPlan.from_dict(copy)) != _plan_key(plan):
                    problems.append(f"{PLAN_FILE} differs from the manifest's copy (tensorrt.plan)")
            except (BundleError, KeyError, TypeError) as exc:
                problems.append(f"the manifest's tensorrt.plan is malformed ({exc})")
        comps = {c.name: c for c in components_from_manifest(m)}
        for e in plan.engines:
            comp = comps.get(e.component)
            if comp is None:
                problems.append(f"engine '{e.component}' has no ONNX component in the manifest")
                continue
            if e.onnx != comp.onnx:
                problems.append(f"engine '{e.component}' builds {e.onnx}, the manifest's graph is {comp.onnx}")
        graphs: dict[str, Any] = {}                     # graph files (with onnx) give fp32-layers its island nodes
        have_onnx = importlib.util.find_spec("onnx") is not None
        for e in plan.engines:
            path = self.bundle.root / e.onnx
            if have_onnx and path.is_file():
                graphs[e.component] = path
            elif e.component in self.sessions:
                graphs[e.component] = {i.name: list(i.shape or []) for i in self.sessions[e.component].get_inputs()}
            elif e.component in comps:
                graphs[e.component] = {i.name: list(i.shape) for i in comps[e.component].inputs}
        issues = check_build_plan(plan, graphs, m)
        problems += [f"{i} [{i.code}]" for i in issues if i.severity == ERROR]
        warnings = [f"{i} [{i.code}]" for i in issues if i.severity != ERROR]
        planned = {e.component for e in plan.engines}
        for name in ("vision", "decoder"):
            if name in comps and name not in planned:
                problems.append(f"no engine planned for the '{name}' graph")
        rules = sorted({i.code for i in issues})
        if problems:
            self.add("trt:build-plan", FAIL, _short(problems) + " (re-export the bundle for its target; rule book: "
                     "docs/tensorrt.md)", problems=problems, warnings=warnings, rules=rules)
        elif warnings:
            self.add("trt:build-plan", WARN, f"{PLAN_FILE}: {len(warnings)} warning(s): " + _short(warnings, 4),
                     warnings=warnings, rules=rules)
        else:
            self.add("trt:build-plan", PASS, f"{PLAN_FILE}: {len(plan.engines)} engine(s) for TensorRT {plan.tensorrt} "
                     f"({plan.builder_mode}ly typed, {plan.target}); profiles cover the graphs' inputs and the "
                     f"KV-cache shapes, context {plan.context}")

    def _script(self, plan) -> None:
        from edgevlm.graphs.trt_plan import SCRIPT_FILE, trtexec_args

        path = self.bundle.root / SCRIPT_FILE
        if not path.is_file():
            raise BundleError(f"{SCRIPT_FILE} is missing (re-export the bundle for its target)")
        text = path.read_text(encoding="utf-8", errors="replace")
        problems = []
        if SCRIPT_FILE not in self.bundle.files:
            problems.append(f"{SCRIPT_FILE} is not listed in the manifest's files (not hash-protected)")
        if f'WANT="{plan.tensorrt}"' not in text:
            problems.append(f"it does not check for TensorRT {plan.tensorrt}")
        for e in plan.engines:
            missing = [a for a in trtexec_args(e, plan) if shlex.quote(a) not in text]
            if missing:
                problems.append(f"the {e.component} build lacks {', '.join(missing[:3])}")
        if problems:
            self.add("trt:build-script", FAIL, _short(problems) + " (re-export to regenerate it)", problems=problems)
        else:
            self.add("trt:build-script", PASS, f"{SCRIPT_FILE}: trtexec builds of "
                     f"{', '.join(e.engine for e in plan.engines)} match the plan")

    # -- (e) engines -----------------------------------------------------------------------------------------------
    def _engines(self, plan) -> None:
        from edgevlm.targets import parse_trt_version

        entries = ((self.bundle.manifest.get("tensorrt") or {}).get("engines") or {})
        on_disk = [e.engine for e in (plan.engines if plan is not None else ())
                   if (self.bundle.root / e.engine).is_file() and e.component not in entries]
        if on_disk:                      # built by build_engines.sh where edgevlm was not on PATH: not registered
            self.add("engines", FAIL, f"{', '.join(on_disk)} exist but are not registered in the manifest (built by "
                     f"build_engines.sh without edgevlm on PATH?): run `edgevlm register-engines "
                     f"{self.bundle.root}` on the device that built them")
            return
        if not entries:
            self.add("engines", FAIL if self.engines == "require" else SKIP, "no engines built yet: build them on the device with `edgevlm build-engine "
                     "BUNDLE`, then " + ON_DEVICE)
            return
        for comp, e in entries.items():
            problems, notes = [], []
            f = e.get("file") if isinstance(e, Mapping) else None
            if not f or f not in self.bundle.files:
                problems.append(f"engine file {f!r} is not listed in the manifest's files (no hash)")
            elif e.get("sha256") and e["sha256"] != self.bundle.files[f]["sha256"]:
                problems.append(f"its sha256 differs from the files entry for {f}")
            if plan is not None and e.get("tensorrt") and \
                    parse_trt_version(str(e["tensorrt"])) != parse_trt_version(plan.tensorrt):
                notes.append(f"built with TensorRT {e['tensorrt']}, planned for {plan.tensorrt}")
            status = FAIL if problems else (WARN if notes else PASS)
            self.add(f"engine:{comp}:file", status, _short(problems + notes) if problems or notes else
                     f"{f}: {e.get('bytes', 0) / 2**20:.1f} MiB, TensorRT {e.get('tensorrt', '?')}, "
                     f"{e.get('device', '?')} (SM {e.get('compute_capability', '?')})")
        if self.engines == "skip":
            for comp in entries:
                self.add(f"engine:{comp}", SKIP, "skipped (--engines skip)")
            return
        from edgevlm.runtime.trt_backend import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            status = FAIL if self.engines == "require" else SKIP
            for comp in entries:
                self.add(f"engine:{comp}", status, f"skipped: no TensorRT/GPU here ({why}); {ON_DEVICE}")
            return
        for comp in entries:
            self.guard(f"engine:{comp}", lambda c=comp: self._compare_engine(c, entries[c]))

    def _compare_engine(self, comp: str, entry: Mapping[str, Any]) -> None:
        """Run one engine on the first sample's inputs and compare with ONNX Runtime."""
        from edgevlm.runtime.trt_backend import (TrtDecoderRunner, TrtEngine, TrtVisionRunner, _check,
                                                 check_engine_entry, device_properties, import_cudart,
                                                 import_tensorrt)

        trt, cudart = import_tensorrt(), import_cudart()
        check_engine_entry(comp, entry, trt.__version__, device_properties(cudart))
        names = [p.get("name") for p in entry.get("profiles", []) if isinstance(p, Mapping)]
        engine = TrtEngine.load(self.bundle.path(entry["file"]), name=f"{comp} engine", profile_names=names or None,
                                trt=trt)
        stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        component = self.bundle.component(comp)
        results = []
        try:
            if comp == "vision":
                if "pixel_values" not in self.sample:
                    raise BundleError("the ONNX vision run failed, nothing to compare with")
                runner = TrtVisionRunner(engine, input_name=component["inputs"][0]["name"],
                                         output_name=component["outputs"][0]["name"], stream=stream, cudart=cudart)
                try:
                    got = runner.encode(self.sample["pixel_values"])
                finally:
                    runner.close()
                results.append(("image_embeds", self.sample["image_embeds"], got, "vision"))
            elif comp == "decoder":
                if "embeds" not in self.sample:
                    raise BundleError("the ONNX decoder run failed, nothing to compare with")
                from edgevlm.runtime.kv_cache import KVSpec

                kv = KVSpec.from_manifest(component.get("kv_cache"))
                runner = TrtDecoderRunner(engine, kv, stream=stream, cudart=cudart)      # a Decoder
                try:                    # the loop run:decoder ran on ONNX Runtime, on the same inputs
                    got_p, got_d, _ = _prefill_and_step(runner, self.sample["embeds"], self.sample["next_embed"], kv,
                                                        int(self.bundle.model_config.llm.vocab_size), "TensorRT")
                finally:
                    runner.close()
                results.append(("prefill logits", self.sample["prefill_logits"], got_p, "logits"))
                results.append(("decode logits", self.sample["decode_logits"], got_d, "logits"))
            else:
                self.add(f"engine:{comp}", SKIP, f"no comparison defined for component '{comp}'")
                return
        finally:
            engine.close()
            _check(cudart, cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
        parts, failed, data = [], False, {}
        for label, ref, got, kind in results:
            tol = engine_tolerance(component, entry, kind)
            diff, cos, absmax = _stats(ref, got)
            limit = tol.limit(absmax)
            bad = not np.all(np.isfinite(got)) or diff > limit or (tol.min_cosine is not None and cos < tol.min_cosine)
            failed |= bad
            parts.append(f"{label}: max |diff| {diff:.2e} (limit {limit:.1e}), cosine {cos:.6f}"
                         + (f" (min {tol.min_cosine})" if tol.min_cosine is not None else "")
                         + (" FAIL" if bad else ""))
            data[label] = {"max_abs_diff": diff, "cosine": cos, "limit": limit, "min_cosine": tol.min_cosine}
        self.add(f"engine:{comp}", FAIL if failed else PASS, "TensorRT vs ONNX Runtime: " + "; ".join(parts), **data)


def verify_bundle(path: str | os.PathLike, *, samples: int = 2, seed: int = 0, engines: str = "auto",
                  threads: int | None = None) -> VerifyReport:
    """Check a bundle end to end (see the module docstring); never raises for a failed check (it is a row of the
    report), only for bad arguments.

    Args:
        path: the bundle directory.
        samples: random inputs per run check.
        seed: seed of the random inputs.
        engines: ``"auto"`` (compare engines with ONNX Runtime where TensorRT and a GPU are present, else skip),
            ``"skip"``, or ``"require"`` (fail when they cannot run here).
        threads: ONNX Runtime intra-op threads (default: min(2, cores)).
    """
    if engines not in ENGINE_MODES:
        raise BundleError(f"engines='{engines}' unknown; use one of {', '.join(ENGINE_MODES)}")
    if int(samples) < 1:
        raise BundleError(f"samples must be >= 1, got {samples}")
    t0 = time.perf_counter()
    v = _Verifier(Path(path), int(samples), int(seed), engines, threads)
    if v.read():
        v.load_graphs()
        v.run()
        if v.is_tensorrt():
            v.tensorrt()
        else:
            tgt = v.bundle.manifest.get("target") or {}
            v.add("tensorrt", SKIP, f"not a TensorRT target ({tgt.get('name', 'cpu')}, "
                  f"{tgt.get('backend', 'onnxruntime')}): no engine checks")
    v.report.seconds = time.perf_counter() - t0
    return v.report


_STYLE = {PASS: "green", WARN: "yellow", SKIP: "dim", FAIL: "bold red"}


def print_report(report: VerifyReport, console: Any = None) -> None:
    """A rich table (check, status, detail) and a one-line verdict."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from edgevlm.console import make_console

    console = console or make_console()
    table = Table(title=Text(f"edgevlm verify {report.bundle}", style="bold"), box=box.SIMPLE, title_justify="left")
    table.add_column("check", style="cyan", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, Text(c.status.upper(), style=_STYLE.get(c.status, "")), Text(c.detail))
    console.print(table)
    n = report.counts()
    verdict = (Text("PASSED", style="bold green") if report.passed else
               Text(f"FAILED: {', '.join(c.name for c in report.failures)}", style="bold red"))
    console.print(Text.assemble(verdict, f"  ({n[PASS]} passed, {n[WARN]} warnings, {n[SKIP]} skipped, "
                                         f"{n[FAIL]} failed; {report.seconds:.1f} s)"))
