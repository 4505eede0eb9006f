"""Token selection in numpy: greedy, temperature, top-k, top-p, seeded. Same semantics as the PyTorch reference
``edgevlm.model.vlm.select_token`` (the random stream differs: numpy's PCG64, not torch's Philox/MT).

    >>> from edgevlm.runtime.sampling import Sampler, SamplingParams
    >>> s = Sampler(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=0))
    >>> token = s(logits)            # logits: [vocab] float32

Semantics (identical to ``select_token``):

* ``temperature <= 0``: greedy ``argmax`` (the first maximum on ties, like ``torch.argmax``).
* otherwise ``logits / temperature``; ``top_k > 0`` keeps the logits ``>=`` the k-th largest (ties at the k-th
  value are all kept); softmax; ``top_p < 1`` keeps the smallest prefix of the probability-sorted tokens whose
  mass *before* each token is ``< top_p`` (so the top token is always kept), renormalized; then one draw.
* ``seed``: the same seed gives the same tokens for the same logits. ``seed=None`` draws fresh OS entropy
  (the PyTorch reference uses seed 0 when none is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.errors import ConfigError

__all__ = ["SamplingParams", "Sampler", "select_token", "filtered_probs"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ConfigError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a sampled token is drawn from (temperature, top-k, top-p applied), float64 ``[vocab]``."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(params.temperature)
    if params.top_k > 0:
        k = min(int(params.top_k), x.size)
        kth = np.partition(x, x.size - k)[x.size - k]
        x = np.where(x < kth, np.float32(-np.inf), x)
    x = x.astype(np.float64)
    x -= x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = (np.cumsum(sorted_p) - sorted_p) < params.top_p
        kept = np.zeros_like(probs)
        kept[order[keep]] = sorted_p[keep]
        probs = kept / kept.sum()
    return probs


def select_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None) -> int:
    """One token from one row of logits ``[vocab]``."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = filtered_probs(logits, params)
    rng = rng if rng is not None else np.random.default_rng()
    cdf = np.cumsum(probs)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    idx = min(idx, probs.size - 1)
    while probs[idx] == 0.0 and idx > 0:              # rounding at the top end of the cdf: step back onto mass
        idx -= 1
    return idx


class Sampler:
    """A ``SamplingParams`` plus its random stream (one per request)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        return select_token(logits, self.params, self.rng)
