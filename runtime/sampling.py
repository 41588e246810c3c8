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
    """temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut.

    The last three decide where a request ends (the host applies them; the device never sees
    them): `ignore_eos` runs past the checkpoint's EOS ids, `stop_token_ids` end it on ids of the
    caller's choosing, and neither may end it before `min_tokens` tokens. Load generators set
    them to fix output lengths.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # hashable, even from JSON
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers, got {list(self.stop_token_ids)}")
        if int(self.min_tokens) != self.min_tokens or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
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
