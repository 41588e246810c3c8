"""How far a lossy model (quantized weights or KV cache) sits from HF float32, position by position.

The goldens' `positions` hold HF float32's top token, its margin over the second and its
log-probability at every position of each prompt followed by its greedy tokens. A model is fed the
same tokens one per step (teacher forcing: every position sees HF's history, so one early
disagreement does not derail the rest) and judged where HF is sure.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from runtime.batching import Chunk

SURE_MARGIN = 0.1  # HF's top-1 over top-2 logit margin past which a lossy model must pick the same token


@dataclasses.dataclass(frozen=True)
class Agreement:
    positions: int  # positions where HF's margin exceeds SURE_MARGIN
    disagreements: list[tuple[int, int, int, int]]  # (prompt, position, HF's token, ours) where HF is sure
    mean_abs_logprob_error: float  # over every position, of the token HF chooses


def teacher_forced_logits(driver, golden) -> list[np.ndarray]:
    """[len(tokens), vocab] logits of `driver` (a tests.driver.StepDriver, fresh cache) at every
    position of each golden sequence, the four sequences side by side in one DP group, one token
    each per step."""
    seqs = [row["tokens"] for row in golden["positions"]]
    ps = driver.cache_shape.page_size
    pages = [driver.alloc(0, -(-len(s) // ps)) for s in seqs]
    out = [[] for _ in seqs]
    for pos in range(max(len(s) for s in seqs)):
        live = [j for j, s in enumerate(seqs) if pos < len(s)]
        groups = [[Chunk((seqs[j][pos],), pos, pages[j]) for j in live]] + [[] for _ in range(driver.shape.dp - 1)]
        logits = driver.step(groups, tokens=8, seqs=len(seqs))[0]
        for j, row in zip(live, logits):
            out[j].append(np.asarray(row, np.float64))
    return [np.stack(rows) for rows in out]


def agreement(golden, logits: list[np.ndarray]) -> Agreement:
    sure, wrong, errors = 0, [], []
    for p, (row, ours) in enumerate(zip(golden["positions"], logits)):
        logprobs = ours - ours.max(axis=1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(axis=1, keepdims=True))
        for i, (top, margin, hf_logprob) in enumerate(zip(row["top1"], row["margin"], row["logprob"])):
            errors.append(abs(logprobs[i, top] - hf_logprob))
            if margin > SURE_MARGIN:
                sure += 1
                if int(np.argmax(ours[i])) != top:
                    wrong.append((p, i, top, int(np.argmax(ours[i]))))
    return Agreement(sure, wrong, float(np.mean(errors)))
