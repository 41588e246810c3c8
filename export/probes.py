"""Deterministic probe batches: one per executable, shaped to stress its bucket.

Every sequence starts at position 0, so a probe reads only what it writes and its logits do not
depend on what the KV cache held before: the same probe gives the same answer at build time, at
load time, and after a thousand requests. Groups are deliberately uneven: the first is full, the last
is idle when there are several, and under SUM_LEN the rows end exactly at the buffer's end (the place
where a clamped write would shift rows).
"""

from __future__ import annotations

import time

import numpy as np

from runtime.batching import Chunk, pack
from runtime.buckets import MAX_LEN, Bucket


def group_token_counts(bucket: Bucket, dp: int) -> list[int]:
    T = bucket.tokens
    if bucket.mode == MAX_LEN:
        counts = [T] + [max(1, T // (g + 2)) for g in range(1, dp)]
        if dp > 2:
            counts[-1] = 0
        return counts
    counts, left = [], bucket.global_len  # fill the buffer exactly
    for _ in range(dp):
        counts.append(min(T, left))
        left -= counts[-1]
    if dp > 1 and counts[1] < T and counts[0] > 1:
        counts[0], counts[1] = counts[0] - 1, counts[1] + 1  # vary the groups, keep the sum exact
    return counts


def make_probe(bucket: Bucket, dp: int, vocab: int, page_size: int, pages_per_seq: int, seed: int = 0,
               carry_seqs: int | None = None):
    """(groups of Chunks, packed batch dict) for one bucket; carry_seqs: the executables' carry width."""
    rng = np.random.default_rng([seed, bucket.tokens, bucket.seqs, bucket.global_len, dp])
    groups = []
    for n in group_token_counts(bucket, dp):
        seqs = min(bucket.seqs, n, 3)
        sizes = [n // seqs + (1 if j < n % seqs else 0) for j in range(seqs)] if seqs else []
        chunks, next_page = [], 1
        for j, size in enumerate(sizes):
            pages = -(-size // page_size)
            if pages > pages_per_seq:
                raise ValueError(f"probe for {bucket.name} needs {pages} pages per sequence, only {pages_per_seq}")
            # Every other sequence samples (temperature, top-k, top-p, a seed), the rest are greedy.
            sampling = {} if j % 2 == 0 else {"temperature": 0.8, "top_k": 5 * (j % 4 == 1), "top_p": 0.9,
                                              "seed": int(rng.integers(0, 2**31 - 1))}
            chunks.append(Chunk(tuple(rng.integers(0, vocab, size).tolist()), 0,
                                tuple(range(next_page, next_page + pages)), **sampling))
            next_page += pages
        groups.append(chunks)
    return groups, pack(groups, bucket.tokens, bucket.seqs, pages_per_seq, carry_seqs)


def step_seconds(engine, bucket: Bucket, repeats: int = 9) -> float:
    """Median wall time of one step of a loaded engine on its bucket's probe, as serving runs it
    (transfers included): what the scheduler weighs to size prefill steps."""
    _, batch = make_probe(bucket, engine.dp, engine.vocab_size, engine.page_size, engine.pages_per_seq)
    engine.run(bucket, batch)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run(bucket, batch)
        samples.append(time.perf_counter() - t0)
    return round(float(np.median(samples)), 6)
