"""Replay an artifact's golden probes on this machine: the build's outputs, reproduced after load."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from . import format as fmt

TOLERANCE = {"float32": 2e-5, "bfloat16": 5e-2}


def verify(engine) -> list[dict]:
    """One row per executable: bucket, max |difference| on real rows, ok."""
    rows = []
    tol = TOLERANCE.get(engine.manifest["dtype"], 2e-5)
    for bucket in engine.buckets:
        entry = engine.entries[bucket]
        if "probe" not in entry:
            rows.append({"bucket": bucket.name, "error": None, "ok": False, "why": "no probe in the artifact"})
            continue
        probe = load_file(fmt.resolve(engine.root, entry["probe"]))
        expected, num_seqs = probe.pop("expected_logits"), probe.pop("num_seqs")
        got = engine.run(bucket, probe)
        err = max((float(np.abs(got[g, :n] - expected[g, :n]).max()) for g, n in enumerate(num_seqs) if n), default=0.0)
        rows.append({"bucket": bucket.name, "error": err, "ok": err <= tol, "why": "" if err <= tol else f"> {tol:g}"})
    return rows
