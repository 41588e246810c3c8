"""Compare a step's sampled outputs with expected ones, and replay an artifact's golden probes.

Executables return token ids and log-probabilities, never logits, so that is what is compared: the
ids must be equal, and the logprob of each chosen token and the top-N logprobs close. A different
greedy id is accepted only at a near-tie: where the expected outputs rank the other id within the
tolerance of their own choice (float summation order may break a tie either way).
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from . import format as fmt

TOLERANCE = {"float32": 2e-5, "bfloat16": 5e-2}
# An 8-bit KV cache turns a difference of one rounding in K or V (the reference's summation order,
# another platform's) into a whole quantization step wherever a value sits near a boundary: a
# difference of the cache's precision, not of the build dtype's.
KV_TOLERANCE = {"int8": 0.25, "float8_e4m3fn": 0.25, "float8_e5m2": 0.25}
OUTPUT_NAMES = ("tokens", "logprobs", "top_ids", "top_logprobs")


def tolerance(dtype: str, kv_dtype: str | None = None) -> float:
    """How far two runs of the same step may differ: by the build dtype, or by an 8-bit KV cache."""
    return max(TOLERANCE.get(dtype, TOLERANCE["float32"]), KV_TOLERANCE.get(kv_dtype, 0.0))


def compare_outputs(got: dict, expected: dict, num_seqs, greedy, tol: float) -> tuple[float, str]:
    """(worst |logprob difference| over real sequences, "" or why they disagree).

    num_seqs [dp]: real sequences per group; greedy [dp, S] bool: which sequences took the argmax.
    """
    worst, why = 0.0, ""
    for g, n in enumerate(np.asarray(num_seqs)):
        for j in range(int(n)):
            a, b = int(got["tokens"][g, j]), int(expected["tokens"][g, j])
            worst = max(worst, float(np.abs(got["top_logprobs"][g, j] - expected["top_logprobs"][g, j]).max()))
            if a == b:
                worst = max(worst, abs(float(got["logprobs"][g, j]) - float(expected["logprobs"][g, j])))
                continue
            ranked = list(expected["top_ids"][g, j])
            near_tie = greedy[g, j] and a in ranked and \
                float(expected["top_logprobs"][g, j][0] - expected["top_logprobs"][g, j][ranked.index(a)]) <= tol
            if not near_tie and not why:
                why = f"group {g} sequence {j}: token {a}, expected {b}"
    if not why and worst > tol:
        why = f"max |logprob difference| {worst:.3g} > {tol:g}"
    return worst, why


def verify(engine) -> list[dict]:
    """One row per executable: bucket, max |difference| on real rows, ok."""
    rows = []
    tol = tolerance(engine.manifest.dtype, engine.manifest.kv_dtype)
    for bucket in engine.buckets:
        entry = engine.entries[bucket]
        if entry.probe is None:
            rows.append({"bucket": bucket.name, "error": None, "ok": False, "why": "no probe in the artifact"})
            continue
        probe = load_file(fmt.resolve(engine.root, entry.probe))
        expected = {k: probe.pop(f"expected_{k}") for k in OUTPUT_NAMES}
        num_seqs = probe.pop("num_seqs")
        got = engine.run(bucket, probe)
        err, why = compare_outputs(got, expected, num_seqs, probe["temperature"] == 0, tol)
        rows.append({"bucket": bucket.name, "error": err, "ok": not why, "why": why})
    return rows
