"""The bench report: JSON (schema in docs/bench.md), Markdown and PNG charts.

    >>> from edgevlm.bench.report import build_report, write_report
    >>> report = build_report(raw, spec, environment=env, roofline=roof, command="edgevlm bench ...")
    >>> paths = write_report(report, "bench-out")     # report.json, report.md, latency_breakdown.png, ...

``build_report`` turns the sweep's raw sessions (``edgevlm.bench.sweep.run_sweep``) into: ``bundles`` (what was
measured: hashes, budgets, precisions), ``sessions`` (one per bundle x threads x backend: load, cache state, warm-up
requests, peak RSS), ``configurations`` (one per session x prompt tokens x output tokens: every request and the
median / min / max / IQR / spread of each metric, plus the roofline bounds), ``fits`` (Eq. 4 per session with
held-out predictions, ``edgevlm.bench.fit``), ``family_fits`` (across budgets sharing a decoder), ``summary``,
``skipped`` (backends that could not run, with the reason) and ``backend_agreement`` (per bundle x threads measured
on several backends: whether their greedy tokens were identical request by request; the backends of one bundle see
the same images). Sessions, configurations and summary rows carry ``backend`` (the sweep's name) and
``vision_backend`` / ``decoder_backend`` (what the Session actually ran).
``eq4_verdict(report)`` is the fit's two-line console summary (``edgevlm bench`` and ``edgevlm demo`` print it).

Charts need matplotlib (``pip install 'edgevlm[bench]'``); it is imported only when charts are written, and a
missing matplotlib skips them with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from edgevlm.bench.fit import TOLERANCE, fit_eq4, fit_family
from edgevlm.bench.sweep import METRICS, summarize

log = logging.getLogger(__name__)

__all__ = ["SCHEMA", "SCHEMA_VERSION", "build_report", "write_report", "write_json", "write_markdown",
           "write_charts", "throughput_figure", "bundle_record", "load_report", "eq4_verdict", "CHART_FILES",
           "backend_agreement", "backend_label"]

SCHEMA = "edgevlm.bench.report"
SCHEMA_VERSION = 1
CHART_FILES = ("latency_breakdown.png", "throughput.png", "eq4_fit.png")
#: the stacked parts of a request (they sum to total_ms: "other" = tokenize + sampling + detokenize + unmeasured)
PARTS = (("preprocess", "preprocess_ms"), ("vision", "vision_ms"), ("prefill", "prefill_ms"),
         ("decode", "decode_ms"), ("other", "overhead_ms"))


# ---- bundles -------------------------------------------------------------------------------------------------------
def _component_bytes(bundle: Any, name: str) -> int:
    e = bundle.component(name)
    files = dict.fromkeys([e["file"], *(e.get("external_data") or []), *(e.get("files") or [])])
    return sum(bundle.files[f]["size"] for f in files if f in bundle.files)


def bundle_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a report says about a bundle (no hashing: the manifest's own hash identifies it)."""
    from edgevlm.bundle import read_bundle

    b = read_bundle(path, verify_hashes=False)
    m = b.manifest
    cfg = b.model_config
    dec = b.component("decoder")
    comps = {k: v.get("precision") for k, v in m["components"].items() if isinstance(v, dict)}
    return {"path": str(path), "name": Path(path).name, "manifest_sha256": b.manifest_sha256,
            "model": cfg.name, "projector": cfg.projector_type, "visual_tokens": b.visual_tokens,
            "precision": m.get("precision"), "components": comps, "random_init": b.random_init,
            "size_bytes": b.total_size, "decoder_bytes": _component_bytes(b, "decoder"),
            "vision_bytes": _component_bytes(b, "vision"),
            "decoder_sha256": (b.files.get(dec["file"]) or {}).get("sha256"),
            "kv_dtype": (dec.get("kv_cache") or {}).get("dtype", "float32"),
            "target": (m.get("target") or {}).get("name"), "derived_from": (m.get("derived") or {}).get("base"),
            "llm": cfg.llm.name or f"{cfg.llm.hidden_size}x{cfg.llm.num_layers}",
            "vision_tower": cfg.vision.name}


def _labels(bundles: list[dict[str, Any]]) -> None:
    for b in bundles:
        b["label"] = f"{b['visual_tokens']} {b['projector']} {b['precision']}"
    seen: dict[str, int] = {}
    for b in bundles:
        seen[b["label"]] = seen.get(b["label"], 0) + 1
    for b in bundles:
        if seen[b["label"]] > 1:
            b["label"] = f"{b['label']} ({b['model']})"


# ---- rooflines -----------------------------------------------------------------------------------------------------
def _roofline(cfg_rec: dict[str, Any], bundle: dict[str, Any], costs: dict[str, Any] | None,
              roof: dict[str, Any] | None, native: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode / prefill / vision bounds for one configuration. ``native``: the session's ``native_info`` (the
    native kernel's attention may read an fp16 copy of the KV cache: the bytes actually read are what count)."""
    if not roof or not costs:
        return {}
    bw = (roof.get("bandwidth") or {}).get("read_gbs")
    gemm = roof.get("gemm") or {}
    rate = gemm.get("ort_fp32_gflops") or gemm.get("numpy_fp32_gflops")
    out: dict[str, Any] = {}
    kv_dtype = (native or {}).get("kv_dtype") if (native or {}).get("backend") == "native" else None
    kv_scale = {"float16": 0.5, "bfloat16": 0.5}.get(kv_dtype or bundle.get("kv_dtype", "float32"), 1.0)
    ctx = cfg_rec["prompt_tokens"] + cfg_rec["output_tokens"] / 2
    if bw:
        per_tok = bundle["decoder_bytes"] + costs["kv_bytes_per_token_fp32"] * kv_scale * ctx
        bound = bw * 1e9 / per_tok
        dec = cfg_rec["stats"]["decode_tok_s"].get("median")
        out.update({"decode_bytes_per_token": per_tok, "decode_bound_tok_s": bound,
                    "decode_fraction_of_bound": dec / bound if dec else None})
    if rate:
        pb = rate * 1e9 / (2 * costs["decoder_body_params"])
        pf = cfg_rec["stats"]["prefill_tok_s"].get("median")
        vb = costs["vision_gflops"] / rate * 1e3
        vm = cfg_rec["stats"]["vision_ms"].get("median")
        out.update({"prefill_bound_tok_s": pb, "prefill_fraction_of_bound": pf / pb if pf else None,
                    "vision_bound_ms": vb, "vision_fraction_of_bound": vb / vm if vm else None,
                    "gemm_gflops_used": rate,
                    "note": "prefill/vision bounds assume fp32 GEMM throughput (int8/int4 kernels can exceed them)"})
    return out


# ---- the report ----------------------------------------------------------------------------------------------------
def _med(cfg_rec: dict[str, Any], metric: str) -> float | None:
    return (cfg_rec["stats"].get(metric) or {}).get("median")


def build_report(raw: dict[str, Any], spec: Any, *, environment: dict[str, Any] | None = None,
                 roofline: dict[str, Any] | None = None, command: str | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report dict (schema: docs/bench.md)."""
    from edgevlm import __version__
    from edgevlm.bench.env import loadavg, model_costs

    sessions_raw = raw["sessions"]
    paths = list(dict.fromkeys(s["bundle"] for s in sessions_raw))
    bundles = [bundle_record(p) for p in paths]
    _labels(bundles)
    by_path = {b["path"]: b for b in bundles}
    costs: dict[str, dict[str, Any]] = {}
    for b in bundles:
        from edgevlm.bundle import read_bundle

        costs[b["path"]] = model_costs(read_bundle(b["path"], verify_hashes=False).model_config)

    sessions: list[dict[str, Any]] = []
    configurations: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    tags: list[str] = []
    per_session_distinct = True
    for i, s in enumerate(sessions_raw):
        sid = f"S{i + 1}"
        b = by_path[s["bundle"]]
        srec = {k: v for k, v in s.items() if k not in ("configurations", "image_tags")}
        srec.update({"id": sid, "bundle_label": b["label"], "visual_tokens": b["visual_tokens"],
                     "precision": b["precision"]})
        if "error" in s:
            sessions.append(srec)
            continue
        mine_tags = s.get("image_tags", [])
        per_session_distinct &= len(mine_tags) == len(set(mine_tags))
        tags += mine_tags
        ids = []
        for c in s["configurations"]:
            cid = f"{sid}-p{c['text_tokens']}-o{c['output_tokens']}"
            reqs = c["requests"]
            stats = {m: summarize([r[m] for r in reqs if m in r]) for m in METRICS}
            crec = {"id": cid, "session": sid, "bundle": b["path"], "bundle_label": b["label"], "model": b["model"],
                    "projector": b["projector"], "visual_tokens": b["visual_tokens"], "precision": b["precision"],
                    "manifest_sha256": b["manifest_sha256"], "threads": s["threads"], "backend": s["backend"],
                    "vision_backend": s.get("vision_backend"), "decoder_backend": s.get("decoder_backend"),
                    "prompt_tokens_requested": c["prompt_tokens_requested"], "text_tokens": c["text_tokens"],
                    "prompt_tokens": b["visual_tokens"] + c["text_tokens"], "output_tokens": c["output_tokens"],
                    "prompt": c["prompt"], "load_s": s["load_s"], "requests": reqs, "stats": stats}
            crec["roofline"] = _roofline(crec, b, costs[b["path"]], roofline, s.get("native_decode"))
            configurations.append(crec)
            ids.append(cid)
        srec["configurations"] = ids
        sessions.append(srec)
        mine = [c for c in configurations if c["session"] == sid]
        points = [{"id": c["id"], "tks_in": c["prompt_tokens"], "tks_out": c["output_tokens"],
                   "total_s": _med(c, "total_ms") / 1e3, "load_s": s["load_s"]} for c in mine]
        fixed = [(_med(c, "preprocess_ms") or 0) + (_med(c, "tokenize_ms") or 0) + (_med(c, "vision_ms") or 0)
                 for c in mine]
        measured = {"v_prompt": statistics.median(_med(c, "prefill_tok_s") for c in mine) if mine else None,
                    "v_decode": statistics.median(_med(c, "decode_tok_s") for c in mine) if mine else None,
                    "constant_s": statistics.median(fixed) / 1e3 if fixed else None,
                    "vision_s": statistics.median(_med(c, "vision_ms") for c in mine) / 1e3 if mine else None,
                    "load_s": s["load_s"]}
        fit = fit_eq4(points, measured) if points else {"error": "no configurations"}
        fit.update({"session": sid, "bundle": b["path"], "bundle_label": b["label"], "threads": s["threads"],
                    "backend": s["backend"], "visual_tokens": b["visual_tokens"], "precision": b["precision"]})
        fits.append(fit)

    # -- family fits: sessions sharing a decoder file (same hash), threads and backend, over >= 2 budgets
    families: dict[tuple, list[dict[str, Any]]] = {}
    for c in configurations:
        b = by_path[c["bundle"]]
        key = (b["decoder_sha256"], c["threads"], c["backend"])
        families.setdefault(key, []).append(c)
    family_fits = []
    for (dsha, threads, backend), cs in families.items():
        if len({c["visual_tokens"] for c in cs}) < 2:
            continue
        pts = [{"id": c["id"], "bundle": c["bundle_label"], "tks_in": c["prompt_tokens"], "tks_out": c["output_tokens"],
                "total_s": _med(c, "total_ms") / 1e3, "vision_s": _med(c, "vision_ms") / 1e3} for c in cs]
        ff = fit_family(pts)
        ff.update({"decoder_sha256": dsha, "threads": threads, "backend": backend,
                   "precisions": sorted({c["precision"] for c in cs})})
        family_fits.append(ff)

    summary = _summary(sessions, configurations, fits)
    notes = list(raw.get("notes", []))
    if not per_session_distinct:
        notes.append("WARNING: some requests of one session shared an image (the workload's images were not distinct)")
    agreement = backend_agreement(configurations)
    for a in agreement:
        if not a["identical"]:
            notes.append(f"WARNING: greedy tokens differ between backends {', '.join(a['backends'])} on "
                         f"{a['bundle_label']} (threads {a['threads']}): {a['first_mismatch']}")
    env = dict(environment or {})
    env["loadavg_end"] = loadavg()
    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "edgevlm_version": __version__, "command": command, "environment": env,
        "spec": spec.to_dict() if hasattr(spec, "to_dict") else dict(spec), "backends": raw.get("backends", []),
        "roofline": roofline or {}, "bundles": bundles, "sessions": sessions, "configurations": configurations,
        "fits": fits, "family_fits": family_fits, "summary": summary,
        "workload": {"requests": len(tags), "distinct_images": len(set(tags)), "all_distinct": per_session_distinct,
                     "images_shared_across_backends": len({s["backend"] for s in sessions_raw}) > 1,
                     "prompt_mode": getattr(spec, "prompt_mode", None)},
        "skipped": list(raw.get("skipped", [])), "backend_agreement": agreement,
        "notes": notes, "charts": [],
    }
    if extra:
        report.update(extra)
    return report


def backend_agreement(configurations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (bundle, threads) measured on >= 2 backends: were the generated tokens identical for every request they
    share (same image, prompt and output tokens)? ``[{"bundle", "bundle_label", "threads", "backends",
    "requests_compared", "identical", "first_mismatch"}]``."""
    groups: dict[tuple, dict[str, dict[tuple, list[int]]]] = {}
    labels: dict[tuple, str] = {}
    for c in configurations:
        key = (c["bundle"], c["threads"])
        labels[key] = c["bundle_label"]
        runs = groups.setdefault(key, {}).setdefault(c["backend"], {})
        for r in c["requests"]:
            if "tokens" in r:
                runs[(r["image"], c["text_tokens"], c["output_tokens"])] = r["tokens"]
    out = []
    for key, by_backend in groups.items():
        if len(by_backend) < 2:
            continue
        names = list(by_backend)
        shared = set.intersection(*(set(v) for v in by_backend.values()))
        mismatch = None
        for req in sorted(shared):
            ref = by_backend[names[0]][req]
            for other in names[1:]:
                got = by_backend[other][req]
                if got != ref and mismatch is None:
                    at = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), min(len(ref), len(got)))
                    mismatch = (f"image {req[0]}, p{req[1]} o{req[2]}: {names[0]} vs {other} differ at token {at} "
                                f"({ref[at:at + 3]} vs {got[at:at + 3]})")
        out.append({"bundle": key[0], "bundle_label": labels[key], "threads": key[1], "backends": names,
                    "requests_compared": len(shared), "identical": mismatch is None and bool(shared),
                    "first_mismatch": mismatch})
    return out


def _summary(sessions: list[dict[str, Any]], configurations: list[dict[str, Any]],
             fits: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for s in sessions:
        if "error" in s:
            rows.append({"session": s["id"], "bundle_label": s["bundle_label"], "error": s["error"][:300]})
            continue
        cs = [c for c in configurations if c["session"] == s["id"]]
        if not cs:
            continue
        ref = max(cs, key=lambda c: (c["text_tokens"], c["output_tokens"]))
        fit = next((f for f in fits if f.get("session") == s["id"]), {})
        rows.append({
            "session": s["id"], "bundle_label": s["bundle_label"], "visual_tokens": s["visual_tokens"],
            "precision": s["precision"], "threads": s["threads"], "backend": s["backend"],
            "vision_backend": s.get("vision_backend"), "decoder_backend": s.get("decoder_backend"),
            "load_s": s["load_s"],
            "vision_ms": statistics.median(_med(c, "vision_ms") for c in cs),
            "prefill_tok_s": statistics.median(_med(c, "prefill_tok_s") for c in cs),
            "decode_tok_s": statistics.median(_med(c, "decode_tok_s") for c in cs),
            "decode_token_ms_p95": statistics.median(_med(c, "decode_token_ms_p95") for c in cs),
            "reference": {"id": ref["id"], "prompt_tokens": ref["prompt_tokens"], "output_tokens": ref["output_tokens"],
                          "total_ms": _med(ref, "total_ms"), "ttft_ms": _med(ref, "ttft_ms"),
                          "total_spread": ref["stats"]["total_ms"].get("spread")},
            "peak_rss_mb": s.get("peak_rss_mb"),
            "loadavg_start": (s.get("loadavg_start") or [None])[0], "loadavg_end": (s.get("loadavg_end") or [None])[0],
            "eq4_heldout_rel_error": (fit.get("heldout") or {}).get("max_rel_error"),
            "eq4_loo_max_rel_error": (fit.get("loo") or {}).get("max_rel_error"),
            "v_prompt_fit": fit.get("v_prompt_fit"), "v_decode_fit": fit.get("v_decode_fit")})
    held = [r["eq4_heldout_rel_error"] for r in rows if r.get("eq4_heldout_rel_error") is not None]
    loo = [r["eq4_loo_max_rel_error"] for r in rows if r.get("eq4_loo_max_rel_error") is not None]
    return {"rows": rows,
            "eq4": {"heldout_max_rel_error": max(held) if held else None,
                    "loo_max_rel_error": max(loo) if loo else None, "tolerance": TOLERANCE,
                    "passes": (max(held) <= TOLERANCE) if held else None}}


# ---- console verdict -------------------------------------------------------------------------------------------------
def _rate_text(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _rates(values: list[float | None]) -> str:
    vs = [v for v in values if v is not None and math.isfinite(v)]
    if not vs:
        return "n/a"
    lo, hi = min(vs), max(vs)
    return f"{_rate_text(lo)} tok/s" if _rate_text(lo) == _rate_text(hi) else f"{_rate_text(lo)}-{_rate_text(hi)} tok/s"


def eq4_verdict(report: dict[str, Any]) -> str:
    """Two plain-text lines (no markup) on MobileVLM's Eq. 4 fit of a bench report, for a console:

        Eq. 4 fit: PASS, predicts the held-out configuration (largest Tks_in x Tks_out) within 3.5% (bar 10%)
          fitted v_prompt 101 tok/s (measured 112 tok/s), v_decode 4.42 tok/s (measured 4.38 tok/s); 1 session

    Several sessions: the worst held-out error, the range of the fitted rates and, with budgets sharing a decoder,
    the worst leave-one-budget-out error. FAIL beyond the bar; n/a when the sweep is too small to hold a
    configuration out (>= 2 prompt and >= 2 output lengths are needed). ``edgevlm bench`` and ``edgevlm demo``
    print it.
    """
    summary = report.get("summary") or {}
    eq = summary.get("eq4") or {}
    rows = [r for r in summary.get("rows", []) if "error" not in r]
    tol = eq.get("tolerance", TOLERANCE)
    err = eq.get("heldout_max_rel_error")
    n = len(rows)
    sessions = f"{n} session" + ("" if n == 1 else "s")
    what = ("the held-out configuration" if n == 1 else "each session's held-out configuration") + \
        " (largest Tks_in x Tks_out)"
    bar = f"bar {tol * 100:g}%"
    if not rows:
        first = "Eq. 4 fit: n/a, no session completed"
    elif err is None:
        first = ("Eq. 4 fit: n/a, too few configurations to hold one out and predict it; sweep >= 2 prompt and >= 2 "
                 "output lengths")
    elif eq.get("passes"):
        first = f"Eq. 4 fit: PASS, predicts {what} within {_pct(err)} ({bar})"
    else:
        first = f"Eq. 4 fit: FAIL, predicts {what} only within {_pct(err)} ({bar})"
    if not rows:
        return first
    vp = _rates([r.get("v_prompt_fit") for r in rows])
    vd = _rates([r.get("v_decode_fit") for r in rows])
    if n == 1:
        mp, md = _rates([rows[0].get("prefill_tok_s")]), _rates([rows[0].get("decode_tok_s")])
        second = f"  fitted v_prompt {vp} (measured {mp}), v_decode {vd} (measured {md}); {sessions}"
    else:
        second = f"  fitted v_prompt {vp}, v_decode {vd} over {sessions}"
    fam = [f["leave_one_bundle_out"]["max_rel_error"] for f in report.get("family_fits") or []
           if (f.get("leave_one_bundle_out") or {}).get("max_rel_error") is not None]
    if fam:
        second += f"; leave-one-budget-out max error {_pct(max(fam))}"
    return first + "\n" + second


# ---- writers ---------------------------------------------------------------------------------------------------------
def load_report(path: str | os.PathLike) -> dict[str, Any]:
    from edgevlm.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read bench report '{path}': {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ConfigError(f"'{path}' is not an edgevlm bench report (schema {SCHEMA!r} expected)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"bench report '{path}' has schema version {data.get('schema_version')}; this edgevlm "
                          f"reads {SCHEMA_VERSION}")
    return data


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):                       # numpy scalars
        return _clean(obj.item())
    return obj


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    return p


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def backend_label(row: dict[str, Any]) -> str:
    """``native (onnxruntime-cpu / native)``: the sweep's backend name, then what ran vision / the decoder."""
    v, d = row.get("vision_backend"), row.get("decoder_backend")
    return f"{row.get('backend')} ({v or '?'} / {d or '?'})" if (v or d) else str(row.get("backend"))


def markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    cpu = env.get("cpu", {})
    lines = [f"# edgevlm bench report", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += [f"- created {report['created']}, edgevlm {report['edgevlm_version']}",
              f"- CPU: {cpu.get('model', '?')} ({cpu.get('cores_physical')} physical / {cpu.get('cores_logical')} "
              f"logical cores, usable {cpu.get('cores_usable')}; ISA {', '.join(cpu.get('isa', []))}), RAM "
              f"{env.get('ram_gib', '?')} GiB, {env.get('os', '?')}",
              f"- versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()),
              f"- load average: start {env.get('loadavg_start')}, end {env.get('loadavg_end')}"]
    if env.get("gpu"):
        lines.append("- GPU: " + "; ".join(f"{g.get('name')} (driver {g.get('driver_version')})" for g in env["gpu"]))
    if env.get("jetson"):
        j = env["jetson"]
        lines.append(f"- Jetson: {j.get('model')}, power mode: {(j.get('nvpmodel') or '?').splitlines()[0]}")
    roof = report.get("roofline") or {}
    if roof.get("bandwidth"):
        bw = roof["bandwidth"]
        g = roof.get("gemm") or {}
        lines.append(f"- measured in this run: memory read bandwidth {bw.get('read_gbs', 0):.1f} GB/s, fp32 GEMM "
                     + ", ".join(f"{k.removesuffix('_gflops')} {v:.0f} GFLOP/s" for k, v in g.items()
                                 if k.endswith("gflops")))
    spec = report.get("spec", {})
    lines += [f"- sweep: prompt tokens {spec.get('prompt_tokens')} (text, mode {spec.get('prompt_mode')}), output "
              f"tokens {spec.get('output_tokens')}, threads {spec.get('threads')}, backends {report.get('backends')}, "
              f"{spec.get('warmup')} warm-up + {spec.get('repeats')} measured requests per configuration, distinct "
              f"image per request ({report.get('workload', {}).get('distinct_images')} images), EOS ignored", ""]

    lines += ["## Summary (per session; medians over its configurations)", "",
              "| bundle | backend (vision / decoder) | V | threads | load s | vision ms | prefill tok/s | "
              "decode tok/s | p95 ms/tok | total ms @ (Tks_in, Tks_out) | spread | peak RSS MiB | Eq.4 held-out err | "
              "load avg (1 min) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in report["summary"]["rows"]:
        if "error" in r:
            lines.append(f"| {r['bundle_label']} | {r.get('backend', '')} | | | failed: {r['error'][:80]} |")
            continue
        ref = r["reference"]
        lines.append(f"| {r['bundle_label']} | {backend_label(r)} | {r['visual_tokens']} | {r['threads']} | "
                     f"{_f(r['load_s'], 2)} | {_f(r['vision_ms'])} | {_f(r['prefill_tok_s'])} | "
                     f"{_f(r['decode_tok_s'], 2)} | "
                     f"{_f(r['decode_token_ms_p95'])} | {_f(ref['total_ms'], 0)} @ ({ref['prompt_tokens']}, "
                     f"{ref['output_tokens']}) | {_pct(ref['total_spread'])} | {_f(r['peak_rss_mb'], 0)} | "
                     f"{_pct(r['eq4_heldout_rel_error'])} | {_f(r.get('loadavg_start'))} -> {_f(r.get('loadavg_end'))} |")
    if report.get("backend_agreement"):
        lines += ["", "Greedy tokens across backends (same images, prompts and output tokens):", ""]
        for a in report["backend_agreement"]:
            verdict = "identical" if a["identical"] else f"DIFFER ({a['first_mismatch']})"
            lines.append(f"- {a['bundle_label']} t{a['threads']}: {' / '.join(a['backends'])}: {verdict} over "
                         f"{a['requests_compared']} requests")
    if report.get("skipped"):
        lines += ["", "Skipped backends:", ""]
        for k in report["skipped"]:
            where = f" for {Path(k['bundle']).name}" if k.get("bundle") else ""
            lines.append(f"- {k['backend']}{where}: {k['reason']}")
    eq = report["summary"]["eq4"]
    lines += ["", f"Eq. 4 held-out prediction (largest prompt x output combination predicted from the others): max "
                  f"relative error {_pct(eq['heldout_max_rel_error'])} (leave-one-out max "
                  f"{_pct(eq['loo_max_rel_error'])}); bar {_pct(eq['tolerance'])}: "
                  f"{'PASS' if eq['passes'] else 'FAIL' if eq['passes'] is not None else 'n/a'}", ""]

    lines += ["## Configurations (medians; spread = (max - min) / median of total)", "",
              "| config | bundle | backend | Tks_in (V + text) | Tks_out | preprocess | vision | prefill ms | "
              "prefill tok/s | TTFT ms | decode ms | decode tok/s | p50 / p95 ms/tok | total ms | spread | "
              "decode bound tok/s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in report["configurations"]:
        m = lambda k: _med(c, k)  # noqa: E731
        rf = c.get("roofline") or {}
        lines.append(f"| {c['id']} | {c['bundle_label']} | {backend_label(c)} | {c['prompt_tokens']} "
                     f"({c['visual_tokens']} + {c['text_tokens']}) | {c['output_tokens']} | {_f(m('preprocess_ms'))} | "
                     f"{_f(m('vision_ms'))} | "
                     f"{_f(m('prefill_ms'))} | {_f(m('prefill_tok_s'))} | {_f(m('ttft_ms'))} | {_f(m('decode_ms'))} | "
                     f"{_f(m('decode_tok_s'), 2)} | {_f(m('decode_token_ms_p50'))} / {_f(m('decode_token_ms_p95'))} | "
                     f"{_f(m('total_ms'))} | {_pct(c['stats']['total_ms'].get('spread'))} | "
                     f"{_f(rf.get('decode_bound_tok_s'), 1)} |")

    lines += ["", "## Eq. 4 fits (per session): total_s = Tks_in / v_prompt + Tks_out / v_decode + c", "",
              "| session | bundle | threads | v_prompt fit / measured | v_decode fit / measured | c fit s (vision + "
              "preprocess measured) | R² | held-out: predicted vs measured s (err) | LOO max err |",
              "|---|---|---:|---|---|---|---:|---|---:|"]
    for f in report["fits"]:
        if "error" in f:
            continue
        ms = f.get("measured") or {}
        hp = (f.get("heldout") or {}).get("points") or []
        held = "; ".join(f"({p['tks_in']}, {p['tks_out']}): {p['predicted_s']:.3f} vs {p['measured_s']:.3f} "
                         f"({_pct(p['rel_error'])})" for p in hp) or "-"
        r2 = f["coefficients"].get("r2")
        lines.append(f"| {f['session']} | {f['bundle_label']} | {f['threads']} | {_f(f['v_prompt_fit'])} / "
                     f"{_f(ms.get('v_prompt'))} | {_f(f['v_decode_fit'], 2)} / {_f(ms.get('v_decode'), 2)} | "
                     f"{_f(f['c_fit_s'], 3)} ({_f(ms.get('constant_s'), 3)}) | {_f(r2, 4)} | {held} | "
                     f"{_pct((f.get('loo') or {}).get('max_rel_error'))} |")
    if report.get("family_fits"):
        lines += ["", "## Eq. 4 across budgets sharing a decoder (total - vision; leave-one-bundle-out)", "",
                  "| precisions | threads | v_prompt fit | v_decode fit | c s | bundles | max err | mean err |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for f in report["family_fits"]:
            lo = f["leave_one_bundle_out"]
            lines.append(f"| {', '.join(str(p) for p in f['precisions'])} | {f['threads']} | {_f(f['v_prompt_fit'])} | "
                         f"{_f(f['v_decode_fit'], 2)} | {_f(f['c_fit_s'], 3)} | {len(f['bundles'])} | "
                         f"{_pct(lo['max_rel_error'])} | {_pct(lo['mean_rel_error'])} |")
    lines += ["", "## Bundles", "", "| label | model | visual tokens | precision | size MB | decoder MB | manifest sha256 |",
              "|---|---|---:|---|---:|---:|---|"]
    for b in report["bundles"]:
        lines.append(f"| {b['label']} | {b['model']} | {b['visual_tokens']} | {b['precision']} | "
                     f"{b['size_bytes'] / 1e6:.1f} | {b['decoder_bytes'] / 1e6:.1f} | `{b['manifest_sha256'][:16]}` |")
    if report.get("charts"):
        lines += ["", "## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in report["charts"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(markdown(report))
    return p


# ---- charts ----------------------------------------------------------------------------------------------------------
def _corners(configs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    ps = sorted({c["text_tokens"] for c in configs})
    os_ = sorted({c["output_tokens"] for c in configs})
    pick_p = sorted({ps[0], ps[-1]}) if ps else []
    pick_o = sorted({os_[0], os_[-1]}) if os_ else []
    return [(p, o) for p in pick_p for o in pick_o]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(*xs: Any) -> bool:
    return all(_finite(x) and x > 0 for x in xs)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def throughput_figure(report: dict[str, Any]) -> Any:
    """The ``throughput.png`` figure: prefill tok/s against Tks_in (left) and decode tok/s against the mean decode
    context (right), one colour and marker per precision x threads (x backend) group in both panels. The decode
    panel draws each configuration's memory-bandwidth bound (``roofline.decode_bound_tok_s``) as a hollow marker of
    its group's colour wherever the report has a finite bound, and says so in its title and legend only then (a
    run with ``--no-roofline`` has none). Returns the matplotlib ``Figure`` (needs matplotlib)."""
    plt = _pyplot()
    if plt is None:
        from edgevlm.errors import MissingDependency

        raise MissingDependency("throughput_figure needs matplotlib: pip install 'edgevlm[bench]'")
    configs = report["configurations"]
    multi_backend = len({c["backend"] for c in configs}) > 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        key = f"{c['precision']} t{c['threads']}" + (f" {c['backend']}" if multi_backend else "")
        groups.setdefault(key, []).append(c)
    markers = "osD^v<>ph*"
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    drew_bound = False
    for gi, (key, cs) in enumerate(sorted(groups.items())):
        cs = sorted(cs, key=lambda c: c["prompt_tokens"])
        style = {"marker": markers[gi % len(markers)], "color": palette[gi % len(palette)], "linestyle": "none"}
        pre = [(c["prompt_tokens"], _med(c, "prefill_tok_s")) for c in cs]
        pre = [xy for xy in pre if _finite(xy[1])]
        if pre:
            a1.plot(*zip(*pre), label=key, alpha=0.8, **style)
        ctx = {c["id"]: c["prompt_tokens"] + c["output_tokens"] / 2 for c in cs}
        dec = [(ctx[c["id"]], _med(c, "decode_tok_s")) for c in cs]
        dec = [xy for xy in dec if _finite(xy[1])]
        if dec:
            a2.plot(*zip(*dec), label=key, alpha=0.8, **style)
        bound = [(ctx[c["id"]], (c.get("roofline") or {}).get("decode_bound_tok_s")) for c in cs]
        bound = [xy for xy in bound if _finite(xy[1])]          # a missing or non-finite bound is not drawn
        if bound:
            a2.plot(*zip(*bound), mfc="none", alpha=0.6, label=f"{key} bandwidth bound", **style)
            drew_bound = True
    a1.set_xlabel("Tks_in = visual + text tokens")
    a1.set_ylabel("prefill tok/s (median)")
    a1.set_title("prefill throughput", fontsize=10)
    a2.set_xlabel("mean decode context (Tks_in + Tks_out / 2)")
    a2.set_ylabel("decode tok/s (median)")
    a2.set_title("decode throughput" + (" (hollow: memory-bandwidth roofline)" if drew_bound
                                        else " (no roofline measured in this run)"), fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def write_charts(report: dict[str, Any], out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """``latency_breakdown.png`` (stacked parts per session at the sweep's corner configurations), ``throughput.png``
    (prefill tok/s against Tks_in, decode tok/s against the mean decode context, with the bandwidth roofline) and
    ``eq4_fit.png`` (predicted against measured request totals). Every legend entry is an artist with data drawn on
    the axes (``throughput_figure``). Returns the paths ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: charts skipped (pip install 'edgevlm[bench]')", stacklevel=2)
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = report["configurations"]
    if not configs:
        return []
    sessions = sorted((s for s in report["sessions"] if "error" not in s),
                      key=lambda s: (str(s["precision"]), -int(s["visual_tokens"]), s["threads"], s["backend"]))
    multi_threads = len({s["threads"] for s in sessions}) > 1
    multi_backend = len({s["backend"] for s in sessions}) > 1

    def slabel(s: dict[str, Any]) -> str:
        lab = s["bundle_label"]
        if multi_threads:
            lab += f"\n{s['threads']} thr"
        if multi_backend:
            lab += f"\n{s['backend']}"
        return lab

    paths: list[Path] = []
    colors = {"preprocess": "#9e9e9e", "vision": "#4c72b0", "prefill": "#dd8452", "decode": "#55a868",
              "other": "#c44e52"}
    # -- 1. stacked latency decomposition
    corners = _corners(configs)
    n = len(corners)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 1.1 * len(sessions) + 2) * cols, 4.2 * rows), squeeze=False)
    for k, (p, o) in enumerate(corners):
        ax = axes[k // cols][k % cols]
        xs, bottoms = [], []
        seg: dict[str, list[float]] = {name: [] for name, _ in PARTS}
        for s in sessions:
            c = next((c for c in configs if c["session"] == s["id"] and c["text_tokens"] == p
                      and c["output_tokens"] == o), None)
            if c is None:
                continue
            xs.append(slabel(s))
            for name, key in PARTS:
                seg[name].append((_med(c, key) or 0.0) / 1e3)
        bottoms = [0.0] * len(xs)
        for name, _ in PARTS:
            ax.bar(range(len(xs)), seg[name], bottom=bottoms, color=colors[name], label=name)
            bottoms = [b + v for b, v in zip(bottoms, seg[name])]
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds per request (median)")
        ax.set_title(f"{p} text tokens + visual, {o} output tokens", fontsize=10)
        if k == 0:
            ax.legend(fontsize=8)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Latency decomposition per visual-token budget (load excluded)", fontsize=11)
    fig.tight_layout()
    p1 = out / f"{prefix}latency_breakdown.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    paths.append(p1)

    # -- 2. throughput against tokens
    fig = throughput_figure(report)
    p2 = out / f"{prefix}throughput.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    paths.append(p2)

    # -- 3. Eq. 4 predicted vs measured (log axes: only positive values can be drawn, so only they are plotted)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    fit_xy: list[tuple[float, float]] = []
    held_xy: list[tuple[float, float]] = []
    for f in report["fits"]:
        if "error" in f:
            continue
        fit_xy += [(p["measured_s"], p["predicted_s"]) for p in f["fitted"]]
        held_xy += [(p["measured_s"], p["predicted_s"]) for p in (f.get("heldout") or {}).get("points") or []]
    fit_xy = [xy for xy in fit_xy if _positive(*xy)]
    held_xy = [xy for xy in held_xy if _positive(*xy)]
    if fit_xy:
        ax.plot(*zip(*fit_xy), "o", alpha=0.35, color="#4c72b0", label="in-sample fit")
    if held_xy:
        ax.plot(*zip(*held_xy), "x", color="#c44e52", ms=9, mew=2, label="held out (largest Tks_in x Tks_out)")
    allv = [v for xy in fit_xy + held_xy for v in xy]
    if allv:
        lo, hi = min(allv) * 0.9, max(allv) * 1.1
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * (1 - TOLERANCE), hi * (1 - TOLERANCE)],
                        [lo * (1 + TOLERANCE), hi * (1 + TOLERANCE)], color="grey", alpha=0.15,
                        label=f"±{TOLERANCE * 100:g}%")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured request total (s)")
    ax.set_ylabel("Eq. 4 predicted (s)")
    ax.set_title("Eq. 4 fit per session: predicted vs measured", fontsize=10)
    if allv:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    p3 = out / f"{prefix}eq4_fit.png"
    fig.savefig(p3, dpi=110)
    plt.close(fig)
    paths.append(p3)
    return paths


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, *, name: str = "report",
                 charts: bool = True) -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and the charts into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "" if name == "report" else f"{name}_"
    chart_paths = write_charts(report, out, prefix=prefix) if charts else []
    report["charts"] = [p.name for p in chart_paths]
    paths = {"json": write_json(report, out / f"{name}.json"), "markdown": write_markdown(report, out / f"{name}.md")}
    for p in chart_paths:
        paths[p.stem] = p
    return paths
