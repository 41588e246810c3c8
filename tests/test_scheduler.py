"""Continuous-batching scheduler against a fake executor that behaves like a paged KV cache.

The fake writes each real token into its (group, page, slot) through the page table, exactly as a
paged cache would, and computes each row's logits from the tokens stored at positions 0..pos of
that sequence, then samples from them with the row's own sampling inputs, its randomness keyed by
(seed, position) as the real executable's is. Its "model" is a pure function of the full history,
so any wrong position, page, page reuse, chunk boundary, sampling input or unpad order changes the
tokens, and outputs must equal an unbatched reference that feeds each prompt alone.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.buckets import MAX_LEN, SUM_LEN, Bucket, plan
from runtime.capabilities import Capabilities
from runtime.sampling import SamplingParams
from runtime.scheduler import RequestError, Scheduler, generate

VOCAB = 61


@functools.lru_cache(maxsize=None)
def toy_logits(history: tuple[int, ...]) -> np.ndarray:
    """The toy model: logits that depend on every token of the history and its order."""
    seed = zlib.crc32(np.asarray(history, np.int64).tobytes())
    return (np.random.default_rng(seed).standard_normal(VOCAB) * 3).astype(np.float32)


def toy_sample(logits, temperature, top_k, top_p, seed, position) -> int:
    """The toy sampler: argmax at temperature 0, else a draw keyed by (seed, position) alone."""
    if temperature == 0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")[: top_k or None]
    p = np.exp((logits[order] - logits[order[0]]) / temperature)
    p /= p.sum()
    keep = max(1, int(np.sum(np.cumsum(p) - p < top_p)))
    u = np.random.default_rng([seed, position]).random() * p[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(p[:keep]), u, side="right")), keep - 1)])


def reference(prompts, max_new, sampling=None, eos=None):
    """Each prompt alone, token by token, through the same toy model and sampler."""
    sampling = sampling or SamplingParams()
    outs = []
    for i, p in enumerate(prompts):
        hist, out = list(p), []
        s = sampling.for_request(i)
        for _ in range(max_new):
            out.append(toy_sample(toy_logits(tuple(hist)), s.temperature, s.top_k, s.top_p, s.seed, len(hist)))
            hist.append(out[-1])
            if out[-1] == eos:
                break
        outs.append(out)
    return outs


class FakeExecutor:
    """An executor whose logits come from what a paged KV cache would hold."""

    step_seconds = bucket_cost = None  # a test may time the buckets or weigh their collectives

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(step_seconds=self.step_seconds, bucket_cost=self.bucket_cost)

    def __init__(self, dp=4, page_size=4, num_pages=64, pages_per_seq=16, ladder=(4, 8, 16),
                 max_seqs=4, sum_ladder=None, buckets=None, vocab_size=VOCAB):
        self.dp, self.page_size, self.num_pages = dp, page_size, num_pages
        self.pages_per_seq, self.vocab_size = pages_per_seq, vocab_size
        self.buckets = buckets if buckets is not None else plan(dp, ladder, max_seqs, sum_ladder=sum_ladder)
        self.cache = np.full((dp, num_pages, page_size), -1, np.int64)
        # The position each slot was written at: a model's K/V depend on it (RoPE), so a page
        # read at another position than it was written at would be wrong.
        self.written_at = np.full((dp, num_pages, page_size), -1, np.int64)
        self.batches = []

    def run(self, bucket: Bucket, batch: dict) -> dict:
        assert bucket in self.buckets
        assert batch["tokens"].shape == (self.dp, bucket.tokens)
        assert batch["page_table"].shape == (self.dp, bucket.seqs, self.pages_per_seq)
        if bucket.mode == SUM_LEN:
            assert batch["num_tokens"].sum() <= bucket.global_len
        self.batches.append(batch)
        tokens = np.full((self.dp, bucket.seqs), self.vocab_size - 1, np.int32)  # padding rows: unpad bugs leak it
        for g in range(self.dp):
            for j, hist in self._group(g, batch).items():
                params = [batch[k][g, j] for k in ("temperature", "top_k", "top_p", "seed")]
                tokens[g, j] = toy_sample(toy_logits(hist), *params, len(hist))
        return {"tokens": tokens, "logprobs": np.zeros(tokens.shape, np.float32)}

    def _group(self, g, batch) -> dict[int, tuple[int, ...]]:
        """Write group g's real tokens into the cache; return each real row's history."""
        n, ps = batch["num_tokens"][g], self.page_size
        seq, pos, table = batch["seq_index"][g, :n], batch["positions"][g, :n], batch["page_table"][g]
        writer = {}  # (page, slot) -> the row writing it this step
        for t, j, p in zip(batch["tokens"][g, :n], seq, pos):
            page = table[j, p // ps]
            assert page != 0, "a real token was written to the reserved page 0"
            self.cache[g, page, p % ps] = t
            self.written_at[g, page, p % ps] = p
            writer[int(page), int(p % ps)] = int(j)
        rows = int(seq.max()) + 1 if n else 0
        # Sequences may share pages (a prefix cache), but a shared page is read-only: a page two
        # rows hold is never written, and no row reads a slot another row writes in this step.
        owned = [set(table[j][table[j] != 0].tolist()) for j in range(rows)]
        shared = {p for a in range(rows) for b in range(a) for p in owned[a] & owned[b]}
        assert not {page for page, _ in writer} & shared, "a page two live sequences hold was written"
        out = {}
        for j in range(rows):
            li = batch["last_index"][g, j]
            assert seq[li] == j
            slots = [(int(table[j, p // ps]), p % ps) for p in range(pos[li] + 1)]
            assert all(writer.get(s, j) == j for s in slots), "a row read what another row writes in this step"
            hist = tuple(int(self.cache[g, page, slot]) for page, slot in slots)
            assert all(self.written_at[g, page, slot] == p for p, (page, slot) in enumerate(slots)), \
                "a slot was read at another position than it was written at"
            assert -1 not in hist, "a position was read before it was written"
            out[j] = hist
        return out


class PipelinedFake(FakeExecutor):
    """The same fake, launched and read like the engine: `dispatch` returns before the host has
    read anything, and a `feed` entry takes its token from the previous dispatched step's sampled
    tokens, as the device does. The host must leave 0 in a fed token's place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.carry = None
        self.fed = 0  # tokens taken from the previous step's outputs
        self.overlapped = 0  # steps launched while the previous one was unread
        self.repeated = 0  # steps launched with dispatch_again
        self._unread = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(pipelined=True, repeats=True, step_seconds=self.step_seconds,
                            bucket_cost=self.bucket_cost)

    def dispatch(self, bucket: Bucket, batch: dict):
        self.last = (bucket, batch)
        batch = dict(batch, tokens=batch["tokens"].copy())
        for g, i in zip(*np.nonzero(batch["feed"] >= 0)):
            assert batch["tokens"][g, i] == 0, "the host wrote a token it cannot have read yet"
            batch["tokens"][g, i] = self.carry[g, batch["feed"][g, i]]
            self.fed += 1
        out = self.run(bucket, batch)
        self.carry = out["tokens"]
        self.overlapped += self._unread > 0
        self._unread += 1
        return {"outputs": out, "read": False}

    def dispatch_again(self, bucket: Bucket):
        """The last batch again with every real token one position on, as the engine does on the
        device; a wrong repeat writes a wrong position or page, which the cache checks catch."""
        last, batch = self.last
        assert bucket == last, "a repeat must run the last step's bucket"
        positions = batch["positions"].copy()
        for g, n in enumerate(batch["num_tokens"]):
            positions[g, :n] += 1
        self.repeated += 1
        return self.dispatch(bucket, dict(batch, positions=positions))

    def fetch(self, handle):
        assert not handle["read"], "a step's outputs were read twice"
        handle["read"] = True
        self._unread -= 1
        return handle["outputs"]


@pytest.fixture(params=["sync", "pipelined"])
def Fake(request):
    """The fake executor class, run synchronously and pipelined: every test must hold for both."""
    return FakeExecutor if request.param == "sync" else PipelinedFake


def random_prompts(rng, n, lo, hi):
    return [rng.integers(0, VOCAB - 1, rng.integers(lo, hi + 1)).tolist() for _ in range(n)]


def check_stats(stats, outs, ex):
    assert stats["generated_tokens"] == sum(map(len, outs))
    assert sum(stats["buckets"].values()) == stats["steps"] == sum(stats["modes"].values())
    assert stats["steps"] == len(ex.batches)
    assert stats["real_tokens"] == sum(int(b["num_tokens"].sum()) for b in ex.batches)
    assert stats["padded_tokens"] == sum(b["tokens"].size for b in ex.batches)
    assert stats["padding_efficiency"] == pytest.approx(stats["real_tokens"] / stats["padded_tokens"])
    assert 0 < stats["padding_efficiency"] <= 1


def test_many_prompts_uneven_over_groups():
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 23, 1, 30)
    ex = FakeExecutor()
    sched = Scheduler(ex)
    outs, stats = sched.generate(prompts, 6)
    assert outs == reference(prompts, 6)
    check_stats(stats, outs, ex)
    assert stats["generated_tokens"] == 23 * 6
    # Every page came back, and page 0 was never among them.
    assert all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)
    assert sched.committed == [0] * ex.dp


def test_balanced_assignment_in_arrival_order():
    prompts = [[1, 2, 3]] * 4 + [[4] * 9]
    ex = FakeExecutor(dp=4)
    generate(ex, prompts, 2)
    # Four equal requests land one per group; the fifth goes to the lowest-index group.
    assert ex.batches[0]["num_tokens"].tolist() == [12, 3, 3, 3]


def test_chunked_prefill_longer_than_largest_bucket():
    prompt = np.random.default_rng(1).integers(0, VOCAB, 60).tolist()
    ex = FakeExecutor(dp=2, ladder=(4, 16), pages_per_seq=20)
    outs, stats = generate(ex, [prompt, [5, 6]], 5)
    assert outs == reference([prompt, [5, 6]], 5)
    assert stats["prefill_chunks"] >= 1 + 4  # the short prompt, then 60 tokens in chunks of <= 16
    assert max(int(b["num_tokens"].max()) for b in ex.batches) <= 16


def test_small_cache_queues_and_completes_everything():
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, 12, 10, 20)
    # 20 + 4 - 1 positions = 6 pages of 4: a group of 6 allocatable pages holds one request at a time.
    ex = FakeExecutor(dp=2, num_pages=7)
    sched = Scheduler(ex)
    outs, stats = sched.generate(prompts, 4)
    assert outs == reference(prompts, 4)
    assert stats["max_queue"] >= 8
    assert all(len(o) == 4 for o in outs)
    assert all(sorted(f) == list(range(1, 7)) for f in sched.free_pages)


@pytest.mark.parametrize("mode", ["auto", MAX_LEN, SUM_LEN])
def test_padding_modes_and_meshes_agree(mode):
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 9, 1, 40)
    want = reference(prompts, 5)
    # SUM_LEN rungs stop below the biggest T, so forced SUM_LEN must shrink steps to 12 tokens.
    ex = FakeExecutor(dp=4, sum_ladder=(4, 8, 12), pages_per_seq=12)
    outs, stats = generate(ex, prompts, 5, padding_mode=mode)
    assert outs == want
    check_stats(stats, outs, ex)
    if mode != "auto":
        other = SUM_LEN if mode == MAX_LEN else MAX_LEN
        assert stats["modes"][other] == 0 and stats["modes"][mode] == stats["steps"]
    if mode == SUM_LEN:
        assert max(int(b["num_tokens"].sum()) for b in ex.batches) <= 12
    # A 1x1 mesh gives the same tokens.
    assert generate(FakeExecutor(dp=1, pages_per_seq=12), prompts, 5)[0] == want


def test_forced_mode_with_smaller_ladder_shrinks_steps():
    """MAX_LEN exists only up to 4 tokens per group while SUM_LEN goes to 16: forced MAX_LEN
    must serve in small steps, and a bucket mix whose largest T and S differ still works."""
    dp = 2
    buckets = [Bucket(MAX_LEN, 4, 2, 8), Bucket(SUM_LEN, 16, 1, 16), Bucket(SUM_LEN, 2, 4, 3)]
    prompts = random_prompts(np.random.default_rng(4), 5, 3, 20)
    for mode in ("auto", MAX_LEN, SUM_LEN):
        ex = FakeExecutor(dp=dp, buckets=buckets)
        outs, stats = generate(ex, prompts, 3, padding_mode=mode)
        assert outs == reference(prompts, 3), mode
        check_stats(stats, outs, ex)


def test_eos_stops_early(Fake):
    prompts = random_prompts(np.random.default_rng(5), 6, 2, 10)
    full = reference(prompts, 8)
    eos = full[0][2]
    outs, stats = generate(Fake(), prompts, 8, eos_token_id=eos)
    assert outs == reference(prompts, 8, eos=eos)
    assert outs[0][-1] == eos and len(outs[0]) <= 3


def test_sampling_deterministic_per_seed_and_batching_independent(Fake):
    prompts = random_prompts(np.random.default_rng(6), 7, 1, 25)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    outs, _ = generate(Fake(), prompts, 8, sampling=params)
    assert outs == generate(Fake(), prompts, 8, sampling=params)[0]
    assert outs == reference(prompts, 8, sampling=params)
    assert outs == generate(Fake(dp=1), prompts, 8, sampling=params, padding_mode=MAX_LEN)[0]
    other = generate(Fake(), prompts, 8, sampling=SamplingParams(1.0, 20, 0.9, seed=8))[0]
    assert other != outs
    assert outs != reference(prompts, 8)  # not greedy


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompts, max_new, kwargs, match", [
    ([], 4, {}, "prompt list is empty"),
    ([[1, 2], []], 4, {}, "prompt 1 is empty"),
    ([[1, -1]], 4, {}, r"token id -1 outside \[0, 61\)"),
    ([[1, VOCAB]], 4, {}, r"token id 61 outside \[0, 61\)"),
    ([[1.5, 2.0]], 4, {}, "non-integer"),
    ([[1, 2]], 0, {}, "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], "3", {}, "max_new_tokens must be an integer >= 1"),
    ([[1] * 60], 5, {}, "exceed the max context of 64"),  # 16 pages x 4
    ([[1] * 30], 5, dict(num_pages=8), "needs 9 KV pages .* only 7 allocatable"),
    ([[1]], 1, dict(padding_mode="fast"), "padding_mode 'fast' is not one of"),
    ([[1]], 1, dict(dp=1, padding_mode=SUM_LEN), "no sum_len bucket can serve a single token"),
    ([[1]], 1, dict(eos_token_id=99), "eos_token_id 99 is outside"),
])
def test_request_errors(prompts, max_new, kwargs, match):
    ex_args = {k: kwargs.pop(k) for k in ("num_pages", "dp") if k in kwargs}
    ex = FakeExecutor(**ex_args)
    with pytest.raises(RequestError, match=match):
        generate(ex, prompts, max_new, **kwargs)
    assert not ex.batches  # rejected before any work


def test_exactly_full_context_and_cache_is_served():
    """The limits are inclusive: 60 + 4 tokens = 64 context; 63 written positions = 16 pages."""
    ex = FakeExecutor(dp=1, num_pages=17)
    prompt = np.random.default_rng(9).integers(0, VOCAB, 60).tolist()
    assert generate(ex, [prompt], 4)[0] == reference([prompt], 4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batch_compositions(data):
    dp = data.draw(st.sampled_from([1, 2, 3, 4]), "dp")
    page_size = data.draw(st.sampled_from([1, 2, 4, 8]), "page_size")
    ladder = data.draw(st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=3, unique=True))
    max_seqs = data.draw(st.integers(1, 4), "max_seqs")
    mode = data.draw(st.sampled_from(["auto", MAX_LEN, SUM_LEN] if dp > 1 else ["auto", MAX_LEN]))
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=10), "lengths")
    max_new = data.draw(st.integers(1, 6), "max_new")
    seed = data.draw(st.integers(0, 2**16), "seed")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in lengths]
    need = -(-(max(lengths) + max_new - 1) // page_size)
    pages_per_seq = -(-(max(lengths) + max_new) // page_size)
    num_pages = 1 + need * data.draw(st.integers(1, 3), "requests per group")
    fake = data.draw(st.sampled_from([FakeExecutor, PipelinedFake]), "executor")
    ex = fake(dp=dp, page_size=page_size, num_pages=num_pages, pages_per_seq=pages_per_seq,
              ladder=ladder, max_seqs=max_seqs)
    if data.draw(st.booleans(), "measured step times"):  # plans then sized per bucket: same tokens
        ex.step_seconds = {b: data.draw(st.floats(0.5, 2.0)) * (8 + dp * b.tokens) for b in ex.buckets}
    kv = data.draw(st.sampled_from(["on_demand", "reserve"]), "kv")
    sched = Scheduler(ex, padding_mode=mode, kv=kv)
    outs, stats = sched.generate(prompts, max_new)
    assert outs == reference(prompts, max_new)
    check_stats(stats, outs, ex)
    assert all(sorted(f) == list(range(1, num_pages)) for f in sched.free_pages)


def test_trace_replay_with_arrivals_and_per_request_lengths(Fake):
    """Requests arriving over time, each with its own output length, as a replayed trace."""
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 12, 1, 30)
    lengths = [int(n) for n in rng.integers(1, 9, len(prompts))]
    arrivals = sorted(int(a) for a in rng.integers(0, 40, len(prompts)))
    ex = Fake(dp=2)
    outs, stats = generate(ex, prompts, lengths, arrivals=arrivals, record_steps=True)
    for p, n, out in zip(prompts, lengths, outs):
        assert out == reference([p], n)[0]
    assert len(stats["step_tokens"]) == stats["steps"]
    assert sum(map(sum, stats["step_tokens"])) == stats["real_tokens"]
    # Idle time before an arrival is skipped, not stepped through.
    _, late = generate(ex, [[1, 2]], [1], arrivals=[1000])
    assert late["steps"] == 1


def test_per_request_lengths_must_match_prompts():
    with pytest.raises(RequestError, match="2 max_new_tokens values for 3 prompts"):
        generate(FakeExecutor(), [[1], [2], [3]], [1, 2])
    with pytest.raises(RequestError, match="1 arrivals for 2 prompts"):
        generate(FakeExecutor(), [[1], [2]], 1, arrivals=[0])


def test_online_submit_step_cancel(Fake):
    """Requests join while others run, one is cancelled mid-decode: the rest give the offline
    tokens, the cancelled one's pages come back at once, and nothing is left behind."""
    rng = np.random.default_rng(11)
    prompts = random_prompts(rng, 9, 1, 20)
    ex = Fake()
    sched = Scheduler(ex)
    reqs, tokens_seen = [], {}
    for i, p in enumerate(prompts):
        reqs.append(sched.submit(p, 6, SamplingParams().for_request(i), tag=i))
        for r in sched.step():
            tokens_seen.setdefault(r.tag, []).append(r.generated[-1])
    victim = next(r for r in reqs if r.finish_reason is None and r.generated)
    used = sched.pages_used
    sched.cancel(victim)
    assert victim.finish_reason == "cancelled" and sched.pages_used == used - victim.num_pages
    while sched.busy:
        for r in sched.step():
            tokens_seen.setdefault(r.tag, []).append(r.generated[-1])
    want = reference(prompts, 6)
    for r in reqs:
        if r is victim:
            assert r.generated == want[r.tag][:len(r.generated)]
        else:
            assert r.finish_reason == "length" and r.generated == want[r.tag] == tokens_seen[r.tag]
    assert sched.pages_used == 0 and all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)


def test_several_eos_ids_stop_with_reason_stop(Fake):
    prompts = random_prompts(np.random.default_rng(12), 5, 2, 10)
    full = reference(prompts, 8)
    eos = {full[0][1], full[1][3]}
    sched = Scheduler(Fake(), eos_token_id=sorted(eos))
    reqs = [sched.submit(p, 8) for p in prompts]
    while sched.busy:
        sched.step()
    for r, want in zip(reqs, full):
        cut = next((k + 1 for k, t in enumerate(want) if t in eos), len(want))
        assert r.generated == want[:cut]
        assert r.finish_reason == ("stop" if r.generated[-1] in eos else "length")


@pytest.mark.parametrize("sampling", [None, SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=5)])
def test_kv_on_demand_preempts_and_changes_no_token(sampling, Fake):
    """A pool that holds a quarter of what the requests reserve: requests grow page by page, the
    newest are preempted and prefilled again, and every output equals the unpreempted reference."""
    rng = np.random.default_rng(13)
    prompts = random_prompts(rng, 16, 2, 14)
    max_new = [int(n) for n in rng.integers(8, 24, len(prompts))]
    reserve_need = sum(-(-(len(p) + n - 1) // 2) for p, n in zip(prompts, max_new))
    ex = Fake(dp=2, page_size=2, num_pages=1 + reserve_need // 8, pages_per_seq=24, ladder=(4, 8, 16))
    sched = Scheduler(ex, sampling=sampling)
    outs, stats = sched.generate(prompts, max_new)
    assert stats["preemptions"] > 0
    if isinstance(ex, PipelinedFake):  # the overlap really happened, and fed tokens on the device
        assert ex.overlapped > stats["steps"] // 2 and ex.fed > 0
    for i, (p, n) in enumerate(zip(prompts, max_new)):
        want = reference([p], n, sampling and dataclasses.replace(sampling, seed=sampling.seed + i))[0]
        assert outs[i] == want
    assert all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)
    reserved, rstats = generate(Fake(dp=2, page_size=2, num_pages=1 + reserve_need // 8, pages_per_seq=24,
                                             ladder=(4, 8, 16)), prompts, max_new, sampling=sampling, kv="reserve")
    assert reserved == outs and rstats["preemptions"] == 0 and rstats["steps"] > stats["steps"]


@pytest.mark.parametrize("a_new, b_waits", [(2, False), (6, True)])
def test_admission_keeps_pages_only_for_requests_that_go_on(a_new, b_waits):
    """On demand, a group keeps free the pages its running requests will take within the next
    page_size tokens, except for a request that may sample at most page_size more: it ends
    within those steps and frees its pages. So a queued request that fits beside a request about
    to end is admitted at once, not after it; beside one that goes on (and will want a page), it
    waits. Outputs equal the reference either way, and every page comes back."""
    ex = FakeExecutor(dp=1, page_size=4, num_pages=1 + 3, pages_per_seq=4, ladder=(4, 8, 16), max_seqs=4)
    sched = Scheduler(ex)
    prompts = [list(range(1, 8)), [3, 4, 5]]  # 7 tokens (2 pages), then 3 (1 page: the last free one)
    a, b = sched.submit(prompts[0], a_new), sched.submit(prompts[1], 2)
    sched.step()
    assert a.group == 0 and (b.group == -1) == b_waits
    if not b_waits:
        assert b.generated  # prefilled in the same step as a
    while sched.busy:
        sched.step()
    assert [a.generated, b.generated] == [reference(prompts[:1], a_new)[0], reference(prompts[1:], 2)[0]]
    assert sched.pages_used == 0 and sorted(sched.free_pages[0]) == [1, 2, 3]


def test_measured_step_times_size_prefill_to_the_bucket():
    """With each executable's step time known (a fixed cost plus one per padded token), a 40-token
    prompt is prefilled as 32 + 8 tokens, not padded to 64; outputs are unchanged and fewer tokens
    are padded over a long-tailed batch."""
    ladder = (4, 8, 16, 32, 64)
    timed = FakeExecutor(dp=1, ladder=ladder, pages_per_seq=32)
    timed.step_seconds = {b: 8.0 + b.tokens for b in timed.buckets}
    prompt = list(range(1, 41))
    outs, stats = generate(timed, [prompt], 2)
    assert outs == reference([prompt], 2)
    assert [b["tokens"].shape[1] for b in timed.batches] == [32, 8, 4]

    prompts = random_prompts(np.random.default_rng(21), 24, 1, 60)
    untimed = FakeExecutor(dp=2, ladder=ladder, pages_per_seq=32, max_seqs=8)
    timed = FakeExecutor(dp=2, ladder=ladder, pages_per_seq=32, max_seqs=8)
    timed.step_seconds = {b: 8.0 + 2 * b.tokens for b in timed.buckets}
    plain, plain_stats = generate(untimed, prompts, 6)
    sized, sized_stats = generate(timed, prompts, 6)
    assert sized == plain == reference(prompts, 6)
    assert sized_stats["padding_efficiency"] > plain_stats["padding_efficiency"]
    cost = lambda ex: sum(8.0 + 2 * b["tokens"].shape[1] for b in ex.batches)  # noqa: E731
    assert cost(timed) < cost(untimed)


def test_decoders_take_pages_together_so_tables_rarely_change(Fake):
    """On demand, decoders that will soon want a page take it in the step where one of their group
    must: with staggered contexts, page tables then change about once per page_size steps, not
    at every step (a steady decode step then sends nothing from the host), and outputs are unchanged."""
    prompts = [[5 + i] * (1 + i) for i in range(8)]  # every offset within a page
    ex = Fake(dp=2, page_size=4, num_pages=64, pages_per_seq=16, ladder=(4, 8), max_seqs=4)
    outs, stats = generate(ex, prompts, 40)
    assert outs == reference(prompts, 40)
    decode = [b for b in ex.batches if (b["num_tokens"] == 4).all()]
    changed = sum(not np.array_equal(a["page_table"], b["page_table"]) for a, b in zip(decode, decode[1:]))
    assert len(decode) >= 30 and changed <= len(decode) // 4 + 1, (changed, len(decode))
    if isinstance(ex, PipelinedFake):  # most steady steps were repeated without planning
        assert ex.repeated >= len(decode) // 2, (ex.repeated, len(decode))


def test_stop_token_ids_ignore_eos_and_min_tokens(Fake):
    """Per request: stop_token_ids end it like an EOS id, ignore_eos runs past the EOS ids (not
    past its own stop ids), and neither ends it before min_tokens tokens; the tokens themselves
    never change."""
    prompts = random_prompts(np.random.default_rng(21), 4, 2, 10)
    full = reference(prompts, 10)
    eos = full[0][2]
    stop = full[1][1]

    def first(want, ids, at_least=1):
        return next((k + 1 for k, t in enumerate(want) if t in ids and k + 1 >= at_least), len(want))

    cases = [SamplingParams(), SamplingParams(stop_token_ids=(stop,)), SamplingParams(ignore_eos=True),
             SamplingParams(ignore_eos=True, stop_token_ids=(stop,)), SamplingParams(min_tokens=5),
             SamplingParams(stop_token_ids=(stop,), min_tokens=10)]
    for params in cases:
        sched = Scheduler(Fake(), eos_token_id=eos)
        reqs = [sched.submit(p, 10, dataclasses.replace(params, seed=i)) for i, p in enumerate(prompts)]
        while sched.busy:
            sched.step()
        ids = ({stop} if params.stop_token_ids else set()) | (set() if params.ignore_eos else {eos})
        for r, want in zip(reqs, full):
            cut = first(want, ids, params.min_tokens)
            assert r.generated == want[:cut], params
            assert r.finish_reason == ("stop" if cut < 10 or want[9] in ids else "length"), params
        assert sched.pages_used == 0


def test_per_request_stop_rules_are_checked():
    sched = Scheduler(FakeExecutor())
    with pytest.raises(RequestError, match="min_tokens 9 is more than the 8 new tokens"):
        sched.submit([1, 2], 8, SamplingParams(min_tokens=9))
    with pytest.raises(RequestError, match=f"stop token id {VOCAB} is outside"):
        sched.submit([1, 2], 8, SamplingParams(stop_token_ids=(VOCAB,)))
    with pytest.raises(RequestError, match="3 top logprobs asked for; this scheduler keeps at most 0"):
        sched.submit([1, 2], 8, top_logprobs=3)
