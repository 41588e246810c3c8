"""What an executor can do beyond `run`, as the executor states it.

The scheduler used to find out by looking for methods and attributes (`getattr`), so an executor
that grew a method by accident changed how it was driven, and a reader could not tell from an
executor what the scheduler would do with it. An executor now says it in one record, its
`capabilities`; one that says nothing is a plain synchronous executor (`run` only).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Capabilities:
    # dispatch(bucket, batch) launches a step and returns a handle at once; fetch(handle) waits for
    # its outputs. Then steps are pipelined, and a batch's `feed` entries (>= 0) name rows of the
    # previous dispatched step's sampled tokens.
    pipelined: bool = False
    # dispatch_again(bucket) launches the last dispatched batch again with every real token one
    # position on (None if it cannot), so a steady decode step is neither planned nor packed.
    repeats: bool = False
    num_logprobs: int = 0  # top-N logprobs every step returns
    # {Bucket: bytes its collectives move per step}: what `choose` weighs between buckets.
    bucket_cost: dict | None = None
    # {Bucket: measured seconds of one step}: prefill steps are sized to the least time per real token.
    step_seconds: dict | None = None


PLAIN = Capabilities()


def capabilities_of(executor) -> Capabilities:
    """The executor's stated capabilities (a plain synchronous executor when it states none)."""
    return getattr(executor, "capabilities", PLAIN)
