"""Compare two bench reports and flag regressions larger than the measured spread: ``edgevlm bench --compare A B``.

    >>> from edgevlm.bench.compare import compare_reports
    >>> res = compare_reports(load_report("base.json"), load_report("new.json"))
    >>> res["regressions"]          # [{config, metric, a, b, change, threshold}, ...]

Configurations are matched by (model, visual tokens, precision, threads, backend, text tokens, output tokens), not by
bundle path or hash (a re-export of the same model must still compare). For each matched configuration and metric:

==================  ==========  ==========================================================================
metric              better      spread used
==================  ==========  ==========================================================================
``total_ms``        lower       (max - min) / median of the configuration's requests
``vision_ms``       lower       same
``prefill_tok_s``   higher      same
``decode_tok_s``    higher      same
``load_s``          lower       one load per session: only the floor applies
==================  ==========  ==========================================================================

B is a **regression** when it is worse than A by a relative amount ``> max(spread_A, spread_B, floor)`` (floor
default 3%): a difference the run-to-run spread cannot explain. Improvements beyond the same threshold are listed
too. The CLI prints the table and exits 1 when a regression is found (``--fail-on-regression``, on by default).
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare_reports", "format_comparison", "COMPARED_METRICS", "DEFAULT_FLOOR"]

DEFAULT_FLOOR = 0.03
#: metric -> True when higher is better
COMPARED_METRICS: dict[str, bool] = {"total_ms": False, "vision_ms": False, "prefill_tok_s": True,
                                     "decode_tok_s": True, "load_s": False}


def _key(c: dict[str, Any]) -> tuple:
    from edgevlm.bench.sweep import ALIASES          # reports before the backend interface said "ort-cpu" (= auto)

    backend = ALIASES.get(c.get("backend"), c.get("backend"))
    return (c.get("model"), c.get("visual_tokens"), c.get("precision"), c.get("threads"), backend,
            c.get("text_tokens"), c.get("output_tokens"))


def _key_str(k: tuple) -> str:
    model, v, prec, threads, backend, p, o = k
    return f"{model} V{v} {prec} t{threads} {backend} p{p} o{o}"


def _value(c: dict[str, Any], metric: str) -> tuple[float | None, float]:
    """(median, relative spread) of ``metric`` in configuration ``c``."""
    if metric == "load_s":
        v = c.get("load_s")
        return (float(v) if v is not None else None), 0.0
    st = (c.get("stats") or {}).get(metric) or {}
    med = st.get("median")
    spread = st.get("spread")
    if spread is None and med and st.get("max") is not None and st.get("min") is not None:
        spread = (st["max"] - st["min"]) / med
    return (float(med) if med is not None else None), float(spread or 0.0)


def compare_reports(a: dict[str, Any], b: dict[str, Any], *, floor: float = DEFAULT_FLOOR,
                    metrics: dict[str, bool] | None = None) -> dict[str, Any]:
    """Rows for every matched (configuration, metric), the regressions / improvements among them, and the
    configurations present on one side only."""
    metrics = metrics or COMPARED_METRICS
    ca = {_key(c): c for c in a.get("configurations", [])}
    cb = {_key(c): c for c in b.get("configurations", [])}
    rows: list[dict[str, Any]] = []
    for k in [k for k in ca if k in cb]:
        for metric, higher_better in metrics.items():
            va, sa = _value(ca[k], metric)
            vb, sb = _value(cb[k], metric)
            if va is None or vb is None or va <= 0:
                continue
            change = (vb - va) / va                              # relative change of B against A
            worse = -change if higher_better else change         # > 0: B is worse
            threshold = max(sa, sb, floor)
            status = "regression" if worse > threshold else "improvement" if -worse > threshold else "ok"
            rows.append({"config": _key_str(k), "metric": metric, "a": va, "b": vb, "change": change,
                         "worse_by": worse, "spread_a": sa, "spread_b": sb, "threshold": threshold,
                         "status": status})
    return {"rows": rows, "regressions": [r for r in rows if r["status"] == "regression"],
            "improvements": [r for r in rows if r["status"] == "improvement"],
            "only_in_a": [_key_str(k) for k in ca if k not in cb], "only_in_b": [_key_str(k) for k in cb if k not in ca],
            "floor": floor, "matched": len([k for k in ca if k in cb])}


def format_comparison(res: dict[str, Any], *, all_rows: bool = False) -> str:
    """A plain-text table (regressions and improvements; every row with ``all_rows``)."""
    rows = res["rows"] if all_rows else [r for r in res["rows"] if r["status"] != "ok"]
    lines = [f"matched configurations: {res['matched']}; regressions: {len(res['regressions'])}; improvements: "
             f"{len(res['improvements'])} (threshold = max(spread A, spread B, floor {res['floor'] * 100:.0f}%))"]
    if rows:
        w = max(len(r["config"]) for r in rows)
        lines.append(f"{'configuration':<{w}}  {'metric':<14}{'A':>12}{'B':>12}{'change':>9}{'threshold':>11}  status")
        for r in rows:
            lines.append(f"{r['config']:<{w}}  {r['metric']:<14}{r['a']:>12.3f}{r['b']:>12.3f}"
                         f"{r['change'] * 100:>8.1f}%{r['threshold'] * 100:>10.1f}%  {r['status'].upper() if r['status'] == 'regression' else r['status']}")
    for side in ("only_in_a", "only_in_b"):
        if res[side]:
            lines.append(f"{side.replace('_', ' ')}: " + "; ".join(res[side]))
    return "\n".join(lines)
