"""5. Communication: bytes each device sends per step, the chosen executable vs the other mode's.

The trace is replayed on the default artifact's buckets (auto mode, choosing as the runtime does,
by each executable's measured cost). Every executable's cost is what its compiled HLO moves: the
build reads each collective's operand or result size from the compiled module, weights it as a
ring moves it (all-gather and reduce-scatter (n-1)/n, all-reduce 2(n-1)/n of the buffer), and
counts loop bodies by their trip count (`collective_bytes` in the manifest). For each step the
chosen executable and the cheapest executable of the other mode that holds the same batch are
compared. Reported: bytes per device per step (mean), totals, and the share of steps where the
chosen one moved no more.
"""

from bench.common import ARTIFACT, ensure_artifact, make_trace, write_result
from bench.padding import PaddingOnly
from runtime import format as fmt
from runtime.buckets import MAX_LEN, SUM_LEN, choose
from runtime.scheduler import generate


class Recording(PaddingOnly):
    def __init__(self, buckets, cost):
        super().__init__(buckets)
        self.bucket_cost = cost
        self.steps = []

    def run(self, bucket, batch):
        seqs = (batch["page_table"][:, :, 0] != 0).sum(axis=1)
        self.steps.append((bucket, batch["num_tokens"].tolist(), seqs.tolist()))
        return super().run(bucket, batch)


def main():
    ensure_artifact()
    m = fmt.read_manifest(ARTIFACT)
    dp = m.meshes[0].dp
    measured = {e.bucket: e.cost.collective_bytes for e in m.executables}
    buckets = list(measured)
    trace = make_trace()
    ex = Recording(buckets, measured)
    generate(ex, trace["prompts"], trace["max_new_tokens"], arrivals=trace["arrivals"])
    cost = measured.__getitem__
    chosen_total = chosen_comparable = other_total = 0.0
    cheaper = comparable = 0
    for bucket, tokens, seqs in ex.steps:
        other_mode = SUM_LEN if bucket.mode == MAX_LEN else MAX_LEN
        other = choose(tokens, seqs, buckets, dp, other_mode, measured)
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
              "chosen_bytes_per_step": chosen_comparable / max(comparable, 1),
              "other_bytes_per_step": other_total / max(comparable, 1),
              "modes": {str(mode): sum(b.mode == mode for b, _, _ in ex.steps) for mode in (MAX_LEN, SUM_LEN)}}
    print(f"{len(ex.steps)} steps ({result['modes']}); the other mode could serve {comparable} of them")
    print(f"chosen mode cheaper or equal on {cheaper}/{comparable} = {result['share_chosen_cheaper']:.1%} of steps")
    print(f"bytes per device per step (mean over those steps): chosen {result['chosen_bytes_per_step'] / 1024:.1f} KiB, "
          f"other {result['other_bytes_per_step'] / 1024:.1f} KiB; totals {chosen_comparable / 2**20:.2f} vs "
          f"{other_total / 2**20:.2f} MiB (all steps, chosen: {chosen_total / 2**20:.2f} MiB)")
    write_result("communication", result)


if __name__ == "__main__":
    main()
