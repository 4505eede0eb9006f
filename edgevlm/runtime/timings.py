"""Per-request timing record, MobileVLM's Eq. 4 decomposition, and memory high-water marks (stdlib + psutil).

One request = load (once per Session) -> preprocess -> vision encode -> prefill -> decode (DESIGN.md §5).
``RequestTimings`` holds the measured parts; ``eq4_terms`` lays them out as MobileVLM's Eq. 4::

    total ≈ load + Tks_in / v_prompt + Tks_out / v_sample + (Tks_out - 1) / v_decode + others

where ``others`` = preprocess + tokenize + vision + detokenize/stop checks + whatever is left. The first output token
comes out of the prefill logits, so ``Tks_out`` tokens take ``Tks_out - 1`` decoder steps.

Definitions (all wall-clock, ``time.perf_counter``):

* ``preprocess_ms``: image decode + pad/resize/normalize. ``tokenize_ms``: prompt template + tokenization + checks.
* ``vision_ms``: the vision graph (tower + projector).
* ``prefill_ms``: embedding gather + image splice + the decoder run over the prompt (visual + text tokens).
* ``cached_tokens``: prompt tokens whose KV rows were kept from the previous request (prompt-prefix reuse,
  ``edgevlm.runtime.caches``), not recomputed; ``prefill_tok_s`` is over the tokens actually prefilled
  (``prompt_tokens - cached_tokens``, llama-server's ``prompt_n``). ``image_cache_hit``: the image embeddings came
  from the image-embedding cache (``vision_ms`` is then the hash + lookup).
* ``ttft_ms``: request start -> first token selected (= preprocess + tokenize + vision + prefill + first sampling).
* ``decode_ms``: the decoder steps after the first token (embedding row + binding + run), ``decode_steps`` of them;
  ``decode_token_ms_p50/p95`` are over those steps.
* ``sampling_ms``: every token selection. ``detokenize_ms``: incremental decoding, stop-string checks, stream
  callbacks. ``other_ms``: ``total_ms`` minus all the parts (never negative: the parts are disjoint intervals).
* ``cpu_ms``: process CPU time (all threads) during the request; ``decode_cpu_ms_per_token`` the same over the
  decode steps. With spinning off this is the work done, robust to other processes competing for the cores (wall
  time is not), so it is the number to compare across runs on a shared machine.
* ``vision_backend`` / ``decoder_backend``: which ``VisionEncoder`` / ``Decoder`` ran (``edgevlm.runtime.decoders``);
  ``decode_backend`` is the older coarse name (``"onnxruntime"``, ``"native"`` or ``"tensorrt"``).
* ``peak_rss_mb``: the process's resident-set high-water mark (Linux ``VmHWM``; ``getrusage`` elsewhere) after the
  request: it includes the model load, so it is the number to compare against a device's RAM.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RequestTimings", "peak_rss_bytes", "current_rss_bytes", "percentile", "eq4_terms", "format_eq4_table",
           "Clock"]


def peak_rss_bytes() -> int:
    """The process's peak resident set size (high-water mark) in bytes.

    Linux: ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this process image). ``ru_maxrss`` is the
    fallback only: Linux carries it across ``exec``, so a process spawned by a big parent (``subprocess`` uses
    vfork) would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024                           # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)     # Linux reports KiB, macOS bytes
    except (ImportError, OSError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", 0) or info.rss)            # Windows has peak_wset
    except ImportError:
        return 0


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) without numpy; 0.0 for an empty list."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Clock:
    """Accumulates named intervals: ``with clock("vision"): ...`` or ``clock.add("x", seconds)``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> "Clock":
        self._name = name
        return self

    def __enter__(self) -> "Clock":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.add(self._name or "?", time.perf_counter() - self._t0)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def ms(self, name: str) -> float:
        return self.totals.get(name, 0.0) * 1e3


@dataclass
class RequestTimings:
    load_s: float = 0.0
    preprocess_ms: float = 0.0
    tokenize_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    text_tokens: int = 0
    prefill_tok_s: float = 0.0
    cached_tokens: int = 0
    image_cache_hit: bool = False             # every image's embeddings came from the cache
    images: int = 1                           # images spliced into the prompt (visual_tokens counts all of them)
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0
    decode_tok_s: float = 0.0
    decode_token_ms_p50: float = 0.0
    decode_token_ms_p95: float = 0.0
    sampling_ms: float = 0.0
    sample_tok_s: float = 0.0
    detokenize_ms: float = 0.0
    other_ms: float = 0.0
    total_ms: float = 0.0
    cpu_ms: float = 0.0
    decode_cpu_ms_per_token: float = 0.0
    peak_rss_mb: float = 0.0
    rss_mb: float = 0.0
    threads: int = 0
    decode_backend: str = "onnxruntime"       # coarse, kept for old readers: "onnxruntime" | "native" | "tensorrt"
    vision_backend: str = ""                  # VisionEncoder.backend: "onnxruntime-cpu" | "onnxruntime-cuda" | ...
    decoder_backend: str = ""                 # Decoder.backend: "onnxruntime-cpu" | ... | "native" | "tensorrt"
    load_breakdown: dict[str, float] = field(default_factory=dict)

    def parts_ms(self) -> dict[str, float]:
        """The disjoint parts of ``total_ms`` (``other_ms`` included): they sum to ``total_ms``."""
        return {"preprocess": self.preprocess_ms, "tokenize": self.tokenize_ms, "vision": self.vision_ms,
                "prefill": self.prefill_ms, "decode": self.decode_ms, "sampling": self.sampling_ms,
                "detokenize": self.detokenize_ms, "other": self.other_ms}

    def finalize(self, total_s: float, step_ms: list[float]) -> "RequestTimings":
        """Fill the derived fields from the measured parts and the per-step decode times."""
        self.total_ms = total_s * 1e3
        measured = (self.preprocess_ms + self.tokenize_ms + self.vision_ms + self.prefill_ms + self.decode_ms
                    + self.sampling_ms + self.detokenize_ms)
        self.other_ms = max(0.0, self.total_ms - measured)
        computed = max(0, self.prompt_tokens - self.cached_tokens)
        self.prefill_tok_s = computed / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0
        self.decode_steps = len(step_ms)
        self.decode_tok_s = self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0
        self.sample_tok_s = self.generated_tokens / (self.sampling_ms / 1e3) if self.sampling_ms > 0 else 0.0
        self.decode_token_ms_p50 = percentile(step_ms, 50)
        self.decode_token_ms_p95 = percentile(step_ms, 95)
        self.peak_rss_mb = peak_rss_bytes() / 2**20
        self.rss_mb = current_rss_bytes() / 2**20
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


def eq4_terms(t: RequestTimings) -> list[dict[str, Any]]:
    """Eq. 4's terms with their values in seconds (``formula`` is the readable form)."""
    others = t.preprocess_ms + t.tokenize_ms + t.vision_ms + t.detokenize_ms + t.other_ms
    rows = [
        {"term": "load", "formula": "Load (once per Session)", "seconds": t.load_s},
        {"term": "prompt", "formula": f"Tks_in / v_prompt = {t.prompt_tokens - t.cached_tokens} / "
                                      f"{t.prefill_tok_s:.1f} tok/s"
                                      + (f" ({t.cached_tokens} cached)" if t.cached_tokens else ""),
         "seconds": t.prefill_ms / 1e3},
        {"term": "sample", "formula": f"Tks_out / v_sample = {t.generated_tokens} / {t.sample_tok_s:.0f} tok/s",
         "seconds": t.sampling_ms / 1e3},
        {"term": "decode", "formula": f"(Tks_out - 1) / v_decode = {t.decode_steps} / {t.decode_tok_s:.1f} tok/s",
         "seconds": t.decode_ms / 1e3},
        {"term": "others", "formula": (f"preprocess {t.preprocess_ms:.1f} + tokenize {t.tokenize_ms:.1f} + vision "
                                       f"{t.vision_ms:.1f} + detok {t.detokenize_ms:.1f} + rest {t.other_ms:.1f} ms"),
         "seconds": others / 1e3},
    ]
    return rows


def format_eq4_table(t: RequestTimings) -> str:
    """A plain-text Eq. 4 table (the CLI renders the same rows with rich when it can)."""
    rows = eq4_terms(t)
    lines = [f"{'term':<8} {'seconds':>9}  formula"]
    for r in rows:
        lines.append(f"{r['term']:<8} {r['seconds']:>9.4f}  {r['formula']}")
    predicted = sum(r["seconds"] for r in rows)
    lines.append(f"{'sum':<8} {predicted:>9.4f}  sum of the terms")
    lines.append(f"{'measured':<8} {t.load_s + t.total_ms / 1e3:>9.4f}  load + request wall time "
                 f"({t.total_ms:.1f} ms)")
    return "\n".join(lines)
