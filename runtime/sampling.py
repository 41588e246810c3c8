"""Token sampling for the scheduler (numpy only).

Greedy (temperature 0) is the default because it is what the numerics tests compare against HF.
Stochastic sampling is deterministic for a seed, and independent of how the scheduler batches:
each request draws from its own Generator spawned from the one seed of a generate call, so
MAX_LEN, SUM_LEN, any bucket choice and any DP width produce the same tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Softmax of logits/temperature, cut to top-k, then to the top-p nucleus, renormalised.

    Works on one row [vocab]. float64 so that tiny probabilities don't round the nucleus away.
    """
    z = np.asarray(logits, np.float64) / params.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    # Descending order; stable so ties keep the lower token id first, as argmax does.
    order = np.argsort(-probs, kind="stable")
    keep = len(order)
    if params.top_k:
        keep = min(keep, int(params.top_k))
    if params.top_p < 1.0:
        kept = probs[order[:keep]]
        cum = np.cumsum(kept) / kept.sum()
        # Smallest prefix whose mass reaches top_p; always at least the most likely token.
        keep = min(keep, int(np.searchsorted(cum, params.top_p)) + 1)
    out = np.zeros_like(probs)
    out[order[:keep]] = probs[order[:keep]]
    return out / out.sum()


class Sampler:
    """Picks the next token of each request; one random stream per request (see module doc)."""

    def __init__(self, params: SamplingParams | None, num_requests: int):
        self.params = params or SamplingParams()
        streams = np.random.SeedSequence(int(self.params.seed)).spawn(num_requests)
        self._rngs = [np.random.default_rng(s) for s in streams]

    def sample(self, logits: np.ndarray, request: int) -> int:
        """Next token of request `request` from its logits row [vocab]."""
        if self.params.greedy:
            return int(np.argmax(logits))
        probs = filtered_probs(logits, self.params)
        # Inverse CDF over the kept tokens with one uniform draw per token.
        kept = np.flatnonzero(probs)
        cdf = np.cumsum(probs[kept])
        i = int(np.searchsorted(cdf, self._rngs[request].random() * cdf[-1], side="right"))
        return int(kept[min(i, len(kept) - 1)])
