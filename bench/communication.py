"""5. Communication: bytes each device moves per step for the MoE exchange, chosen mode vs the other.

The trace is replayed on the default artifact's buckets (auto mode). For each step, the bucket the
runtime chose and the cheapest bucket of the other mode that holds the same batch are both costed
with a ring model per device, per MoE layer, both directions:
  MAX_LEN  all-gather over data (D-1)*T*H, reduce-scatter over data (D-1)*T*H,
           all-reduce over tensor 2*(tp-1)/tp*T*H
  SUM_LEN  all-reduce over data 2*(D-1)/D*G*H, all-reduce over data x tensor 2*(D*tp-1)/(D*tp)*G*H
(times bytes per element and MoE layers). Reported: totals over the trace and the share of steps
where the chosen mode was the cheaper (or equal).
"""

import numpy as np

from bench.common import ARTIFACT, ensure_artifact, make_trace, write_result
from bench.padding import PaddingOnly
from runtime import format as fmt
from runtime.buckets import MAX_LEN, SUM_LEN, Bucket, choose
from runtime.scheduler import generate


def step_bytes(bucket: Bucket, dp: int, tp: int, hidden: int, layers: int, itemsize: int) -> float:
    if bucket.mode == MAX_LEN:
        rows = 2 * (dp - 1) * bucket.tokens + 2 * (tp - 1) / tp * bucket.tokens
    else:
        n = dp * tp
        rows = 2 * (dp - 1) / dp * bucket.global_len + 2 * (n - 1) / n * bucket.global_len
    return rows * hidden * itemsize * layers


class Recording(PaddingOnly):
    def __init__(self, buckets):
        super().__init__(buckets)
        self.steps = []

    def run(self, bucket, batch):
        seqs = (batch["page_table"][:, :, 0] != 0).sum(axis=1)
        self.steps.append((bucket, batch["num_tokens"].tolist(), seqs.tolist()))
        return super().run(bucket, batch)


def main():
    ensure_artifact()
    m = fmt.read_manifest(ARTIFACT)
    model = m["model"]
    dp, tp = m["meshes"][0]["shape"]
    moe_layers = sum(1 for i in range(model["num_layers"]) if i not in model["mlp_only_layers"]
                     and (i + 1) % model["decoder_sparse_step"] == 0)
    itemsize = np.dtype(m["dtype"]).itemsize
    buckets = [Bucket.from_json(e["bucket"]) for e in m["executables"]]
    trace = make_trace()
    ex = Recording(buckets)
    generate(ex, trace["prompts"], trace["max_new_tokens"], arrivals=trace["arrivals"])
    cost = lambda b: step_bytes(b, dp, tp, model["hidden_size"], moe_layers, itemsize)  # noqa: E731
    chosen_total = chosen_comparable = other_total = 0.0
    cheaper = comparable = 0
    for bucket, tokens, seqs in ex.steps:
        other_mode = SUM_LEN if bucket.mode == MAX_LEN else MAX_LEN
        other = choose(tokens, seqs, buckets, dp, other_mode)
        chosen_total += cost(bucket)
        if other is None:  # the other mode has no bucket that holds this batch
            continue
        comparable += 1
        chosen_comparable += cost(bucket)
        other_total += cost(other)
        cheaper += cost(bucket) <= cost(other)
    result = {"steps": len(ex.steps), "comparable_steps": comparable, "chosen_cheaper_or_equal": cheaper,
              "share_chosen_cheaper": cheaper / max(comparable, 1),
              "chosen_bytes_total": chosen_total, "chosen_bytes_on_comparable": chosen_comparable,
              "other_bytes_on_comparable": other_total,
              "modes": {mode: sum(b.mode == mode for b, _, _ in ex.steps) for mode in (MAX_LEN, SUM_LEN)}}
    print(f"{len(ex.steps)} steps ({result['modes']}); the other mode could serve {comparable} of them")
    print(f"chosen mode cheaper or equal on {cheaper}/{comparable} = {result['share_chosen_cheaper']:.1%} of steps")
    print(f"bytes per device over those steps: chosen {chosen_comparable / 2**20:.2f} MiB, "
          f"other {other_total / 2**20:.2f} MiB (all steps, chosen: {chosen_total / 2**20:.2f} MiB)")
    write_result("communication", result)


if __name__ == "__main__":
    main()
