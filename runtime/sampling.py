"""Sampling parameters of a request (numpy only); the sampling itself runs inside the executable.

Greedy (temperature 0) is the default because it is what the numerics tests compare against HF.
Stochastic sampling is deterministic for a seed and independent of how the scheduler batches: the
executable derives each token's randomness from the request's seed and the token's position, so
MAX_LEN, SUM_LEN, any bucket choice and any mesh produce the same tokens.
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
        if int(self.seed) != self.seed or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_request(self, index: int) -> "SamplingParams":
        """Request `index` of a call draws from seed + index, so one seed gives every request its own
        stream; the executable folds it with each token's position."""
        return dataclasses.replace(self, seed=(int(self.seed) + index) % 2**31)
