"""MobileVLM's Eq. 4 fitted to a sweep by least squares (numpy), with held-out predictions.

Eq. 4 (mobilevlm.md §4.1): ``Total = Load + Tks_in / v_prompt + Tks_out / v_sample + Tks_out / v_decode + Others``.
For one configuration group (one bundle x threads x backend: one Session, so one ``load``) the bench fits the
per-request wall time

    total_s ≈ Tks_in / v_prompt + Tks_out / v_decode + c

over the sweep's (Tks_in, Tks_out, median total) points, where Tks_in = visual + text tokens, Tks_out = generated
tokens, ``1 / v_decode`` absorbs sampling and detokenization per token (Eq. 4's ``Tks_out / v_sample``), and ``c``
holds everything per request that does not scale with tokens (preprocess, vision encode, tokenize, the one decode
step the first token does not need). With the load: ``load_s + total_s``.

Validation: the fit must *predict* configurations it did not see. ``heldout`` fits on all points but the largest
(Tks_in, Tks_out) combination and predicts it (extrapolation, the hard case); ``loo`` predicts each point from a fit
on the others. The relative error ``|predicted - measured| / measured`` is reported for every held-out point; the
acceptance bar is 10%.

``fit_family`` pools sessions that share the decoder (same decoder file hash, threads, backend) across visual-token
budgets: ``total_s - vision_s ≈ Tks_in / v_prompt + Tks_out / v_decode + c`` with Tks_in spanning the budgets, and
predicts each budget's totals from a fit on the other budgets (leave-one-bundle-out; the held-out bundle's measured
vision time is added back as Eq. 4's "others").
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["fit_eq4", "fit_family", "lstsq_eq4", "TOLERANCE"]

TOLERANCE = 0.10          # acceptance bar on held-out relative error


def _design(tin: np.ndarray, tout: np.ndarray, use_in: bool, use_out: bool) -> np.ndarray:
    cols = []
    if use_in:
        cols.append(tin)
    if use_out:
        cols.append(tout)
    cols.append(np.ones_like(tin))
    return np.stack(cols, axis=1)


def lstsq_eq4(tin: Sequence[float], tout: Sequence[float], total: Sequence[float], *, use_in: bool | None = None,
              use_out: bool | None = None) -> dict[str, Any]:
    """Least squares ``total ≈ a·tin + b·tout + c``. A variable that does not vary in the points is left out (its
    coefficient None: it cannot be told apart from ``c``). Returns a, b, c, rank, residual RMS, R²."""
    x_in = np.asarray(tin, dtype=np.float64)
    x_out = np.asarray(tout, dtype=np.float64)
    y = np.asarray(total, dtype=np.float64)
    use_in = bool(np.ptp(x_in) > 0) if use_in is None else use_in
    use_out = bool(np.ptp(x_out) > 0) if use_out is None else use_out
    A = _design(x_in, x_out, use_in, use_out)
    coef, _, rank, _ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    i = 0
    a = b = None
    if use_in:
        a, i = float(coef[i]), i + 1
    if use_out:
        b, i = float(coef[i]), i + 1
    c = float(coef[i])
    return {"a_s_per_prompt_token": a, "b_s_per_output_token": b, "c_s": c, "rank": int(rank),
            "params": A.shape[1], "points": len(y), "use_in": use_in, "use_out": use_out,
            "rms_s": math.sqrt(ss_res / len(y)) if len(y) else 0.0,
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None}


def _predict(fit: dict[str, Any], tin: float, tout: float) -> float:
    y = fit["c_s"]
    if fit["a_s_per_prompt_token"] is not None:
        y += fit["a_s_per_prompt_token"] * tin
    if fit["b_s_per_output_token"] is not None:
        y += fit["b_s_per_output_token"] * tout
    return float(y)


def _rate(coef: float | None) -> float | None:
    return 1.0 / coef if coef is not None and coef > 0 else None


def _holdout(points: list[dict[str, Any]], held: list[int], key: str = "total_s",
             use: tuple[bool, bool] | None = None, add: str | None = None) -> list[dict[str, Any]] | None:
    """Fit on the points not in ``held`` and predict the held ones; None when the rest cannot determine the model."""
    rest = [p for i, p in enumerate(points) if i not in held]
    use_in, use_out = use if use else (None, None)
    if not rest:
        return None
    f = lstsq_eq4([p["tks_in"] for p in rest], [p["tks_out"] for p in rest], [p[key] for p in rest],
                  use_in=use_in, use_out=use_out)
    if f["rank"] < f["params"] or len(rest) < f["params"]:
        return None
    out = []
    for i in held:
        p = points[i]
        pred = _predict(f, p["tks_in"], p["tks_out"]) + (p[add] if add else 0.0)
        meas = p[key] + (p[add] if add else 0.0)
        row = {"id": p["id"], "tks_in": p["tks_in"], "tks_out": p["tks_out"], "measured_s": meas,
               "predicted_s": pred, "rel_error": abs(pred - meas) / meas if meas else None}
        if "load_s" in p:
            m2, p2 = meas + p["load_s"], pred + p["load_s"]
            row.update({"measured_with_load_s": m2, "predicted_with_load_s": p2,
                        "rel_error_with_load": abs(p2 - m2) / m2 if m2 else None})
        out.append(row)
    return out


def _errors(rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not rows:
        return {"points": [], "max_rel_error": None, "mean_rel_error": None, "passes": None}
    errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
    mx = max(errs) if errs else None
    return {"points": rows, "max_rel_error": mx, "mean_rel_error": sum(errs) / len(errs) if errs else None,
            "passes": (mx <= TOLERANCE) if mx is not None else None, "tolerance": TOLERANCE}


def fit_eq4(points: list[dict[str, Any]], measured: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Eq. 4 for one configuration group. ``points``: ``{"id", "tks_in", "tks_out", "total_s", "load_s"?}`` (median
    request totals). ``measured``: the group's measured ``v_prompt`` / ``v_decode`` (tok/s) and ``constant_s``
    (median per-request time outside prefill + decode) to compare the fitted values with."""
    if not points:
        return {"error": "no points"}
    f = lstsq_eq4([p["tks_in"] for p in points], [p["tks_out"] for p in points], [p["total_s"] for p in points])
    out: dict[str, Any] = {
        "model": "total_s = Tks_in / v_prompt + Tks_out / v_decode + c",
        "coefficients": f, "v_prompt_fit": _rate(f["a_s_per_prompt_token"]),
        "v_decode_fit": _rate(f["b_s_per_output_token"]), "c_fit_s": f["c_s"],
        "fitted": [{"id": p["id"], "tks_in": p["tks_in"], "tks_out": p["tks_out"], "measured_s": p["total_s"],
                    "predicted_s": _predict(f, p["tks_in"], p["tks_out"])} for p in points],
        "underdetermined": f["rank"] < f["params"] or len(points) < f["params"],
    }
    notes = []
    if not f["use_in"]:
        notes.append("Tks_in does not vary in this group: v_prompt cannot be separated from c")
    if not f["use_out"]:
        notes.append("Tks_out does not vary in this group: v_decode cannot be separated from c")
    if measured:
        out["measured"] = dict(measured)
        for k, fit_k in (("v_prompt", "v_prompt_fit"), ("v_decode", "v_decode_fit")):
            mv, fv = measured.get(k), out[fit_k]
            out[f"{k}_fit_over_measured"] = fv / mv if (mv and fv) else None
    # the largest prompt x output combination held out
    use = (f["use_in"], f["use_out"])
    largest = max(range(len(points)), key=lambda i: (points[i]["tks_in"] + points[i]["tks_out"],
                                                      points[i]["tks_out"]))
    held = _holdout(points, [largest], use=use)
    out["heldout"] = {"method": "largest (Tks_in, Tks_out) held out, fit on the rest", **_errors(held)}
    loo_rows: list[dict[str, Any]] = []
    for i in range(len(points)):
        r = _holdout(points, [i], use=use)
        if r:
            loo_rows += r
    out["loo"] = {"method": "leave-one-configuration-out", **_errors(loo_rows)}
    if held is None:
        notes.append(f"too few configurations ({len(points)}) to hold one out and still determine "
                     f"{f['params']} coefficients; sweep >= 2 prompt and >= 2 output lengths")
    out["notes"] = notes
    return out


def fit_family(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled fit over budgets sharing one decoder. ``points``: ``{"id", "bundle", "tks_in", "tks_out", "total_s",
    "vision_s"}``; fits ``total_s - vision_s`` and predicts each bundle from the others."""
    for p in points:
        p["lm_s"] = p["total_s"] - p["vision_s"]
    f = lstsq_eq4([p["tks_in"] for p in points], [p["tks_out"] for p in points], [p["lm_s"] for p in points])
    out: dict[str, Any] = {"model": "total_s - vision_s = Tks_in / v_prompt + Tks_out / v_decode + c",
                           "coefficients": f, "v_prompt_fit": _rate(f["a_s_per_prompt_token"]),
                           "v_decode_fit": _rate(f["b_s_per_output_token"]), "c_fit_s": f["c_s"],
                           "bundles": sorted({p["bundle"] for p in points})}
    rows: list[dict[str, Any]] = []
    use = (f["use_in"], f["use_out"])
    for b in out["bundles"]:
        held = [i for i, p in enumerate(points) if p["bundle"] == b]
        r = _holdout(points, held, key="lm_s", use=use, add="vision_s")
        if r:
            for row in r:
                row["bundle"] = b
            rows += r
    out["leave_one_bundle_out"] = {"method": "each bundle's totals predicted from a fit on the other bundles "
                                             "(+ its measured vision time)", **_errors(rows)}
    return out
