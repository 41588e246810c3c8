"""Buckets: the one place that maps a batch to the executable that serves it.

A bucket fixes every static shape of one executable: `tokens` per group (T), `seqs` per group (S),
and `global_len`, the rows of the MoE exchange buffer (dp*T under MAX_LEN; under SUM_LEN a bucket of
the summed token count). The build planner lists buckets from ladders with `plan`; the runtime
picks among those that exist with `choose`. Both live here so they can't drift apart.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

# Bucket and PaddingMode are defined in the contract module the model imports too; the old names
# stay importable from here.
from runtime.contract import MAX_LEN, MODES, SUM_LEN, Bucket, PaddingMode  # noqa: F401


def seqs_for(tokens: int, max_seqs: int) -> int:
    """Sequences a bucket of `tokens` per group holds: as many as tokens (decode), capped."""
    return min(tokens, max_seqs)


def plan(dp: int, token_ladder: Iterable[int], max_seqs: int, modes: Iterable[str] = MODES,
         sum_ladder: Iterable[int] | None = None, max_step_tokens: int | None = None) -> list[Bucket]:
    """Every (mode, bucket) to build for one mesh.

    MAX_LEN: one bucket per rung T. SUM_LEN: per rung T, one bucket per sum rung G with
    T <= G < dp*T (a larger G is never chosen over MAX_LEN's dp*T rows, and a smaller one can't
    hold a full group). With dp == 1 the two modes coincide, so only MAX_LEN is built.
    `max_step_tokens`: rungs whose step (dp*T rows) would exceed it are left out, so one ladder
    can give a one-group mesh large prefill steps without giving every group of a wider mesh the
    same (a step's cost grows with its rows, wherever they sit).
    """
    tokens = sorted(set(int(t) for t in token_ladder))
    if not tokens or tokens[0] < 1:
        raise ValueError(f"token ladder {tokens} must hold positive sizes")
    if max_step_tokens is not None:
        if dp * tokens[0] > max_step_tokens:
            raise ValueError(f"a step budget of {max_step_tokens} tokens holds no rung of {tokens} on {dp} DP "
                             f"groups (the smallest needs {dp * tokens[0]})")
        tokens = [t for t in tokens if dp * t <= max_step_tokens]
    sums = sorted(set(int(g) for g in (sum_ladder if sum_ladder is not None else tokens)))
    out = []
    for t in tokens:
        s = seqs_for(t, max_seqs)
        if MAX_LEN in modes:
            out.append(Bucket(MAX_LEN, t, s, dp * t))
        if SUM_LEN in modes and dp > 1:
            out += [Bucket(SUM_LEN, t, s, g) for g in sums if t <= g < dp * t]
    return sorted(set(out), key=lambda b: (b.mode, b.tokens, b.global_len))


def choose(token_counts: Sequence[int], seq_counts: Sequence[int], available: Iterable[Bucket],
           dp: int, mode: str = "auto", cost: Mapping[Bucket, float] | None = None) -> Bucket | None:
    """The cheapest available bucket that holds the batch, or None if none does.

    `cost` (bytes each executable's collectives move per step, measured from its compiled HLO at
    build time) decides when every fitting bucket has one: the cheapest, ties to fewer tokens.
    Otherwise `auto` applies the padding rule (MAX_LEN when sum*2 > max*dp) to padded sizes, i.e.
    it compares the buckets that exist: the smallest MAX_LEN bucket against the smallest SUM_LEN one.
    """
    fitting = [b for b in available if b.fits(token_counts, seq_counts)]
    if mode != "auto":
        fitting = [b for b in fitting if b.mode == mode]
    if not fitting:
        return None
    if cost is not None and all(b in cost for b in fitting):
        return min(fitting, key=lambda b: (cost[b], b.tokens, b.global_len, b.seqs, b.mode))
    # Ties go to SUM_LEN: the rule picks MAX_LEN only when it is strictly cheaper.
    return min(fitting, key=lambda b: (b.exchange_rows(dp), b.mode != SUM_LEN, b.tokens, b.seqs))


def ladder_from_trace(values: Sequence[int], max_rungs: int) -> list[int]:
    """At most `max_rungs` sizes that minimise total padding over a recorded trace of sizes.

    Optimal for the trace: dynamic programming over the distinct sizes, where a rung always sits
    on an observed size (moving it up to the next observed size only adds padding).
    """
    vals = sorted(v for v in values if v > 0)
    if not vals:
        raise ValueError("trace holds no positive sizes")
    uniq, counts = [], []
    for v in vals:
        if uniq and uniq[-1] == v:
            counts[-1] += 1
        else:
            uniq.append(v)
            counts.append(1)
    m = len(uniq)
    prefix_n, prefix_sum = [0], [0]
    for u, c in zip(uniq, counts):
        prefix_n.append(prefix_n[-1] + c)
        prefix_sum.append(prefix_sum[-1] + u * c)

    def waste(i, j):  # values uniq[i..j] all padded up to uniq[j]
        return uniq[j] * (prefix_n[j + 1] - prefix_n[i]) - (prefix_sum[j + 1] - prefix_sum[i])

    inf = float("inf")
    k_max = max(1, min(max_rungs, m))
    best = [[inf] * m for _ in range(k_max + 1)]  # best[k][j]: k rungs, the last on uniq[j], covering 0..j
    back = [[-1] * m for _ in range(k_max + 1)]
    for j in range(m):
        best[1][j] = waste(0, j)
    for k in range(2, k_max + 1):
        for j in range(m):
            for i in range(j):
                c = best[k - 1][i] + waste(i + 1, j)
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    k = min(range(1, k_max + 1), key=lambda k: best[k][m - 1])
    rungs, j = [], m - 1
    while j >= 0 and k >= 1:
        rungs.append(uniq[j])
        j, k = back[k][j], k - 1
    return sorted(rungs)
