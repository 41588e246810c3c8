"""The prefix cache against the paged fake executor: requests that share a start reuse its pages,
and nothing a request sees changes. The fake writes and reads K/V through the page tables and
fails on a shared page being written or read while another row writes it, so a wrong share, a
page read before its writer's step or a page reused while held changes tokens or trips it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler, generate
from test_scheduler import VOCAB, FakeExecutor, PipelinedFake, reference
from test_scheduler_property import alone

SEEDED = SamplingParams(temperature=0.8, seed=11)


def shared_prefix_prompts(rng, n, prefix_len, suffix_hi, systems=1):
    """n prompts, each one of `systems` shared starts of prefix_len tokens and its own suffix."""
    starts = [rng.integers(0, VOCAB - 1, prefix_len).tolist() for _ in range(systems)]
    return [starts[i % systems] + rng.integers(0, VOCAB - 1, int(rng.integers(1, suffix_hi + 1))).tolist()
            for i in range(n)]


def run_both(Fake, prompts, max_new, sampling=None, **fake_kwargs):
    """(outputs, stats) with the cache on, then off, each on its own fake."""
    return [generate(Fake(**fake_kwargs), prompts, max_new, sampling=sampling, prefix_cache=on)
            for on in (True, False)]


@pytest.mark.parametrize("sampling", [None, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("Fake", [FakeExecutor, PipelinedFake], ids=["sync", "pipelined"])
def test_shared_prefix_outputs_equal_cache_off_with_less_prefill(Fake, sampling):
    prompts = shared_prefix_prompts(np.random.default_rng(0), 24, 30, 6, systems=2)
    (on, s_on), (off, s_off) = run_both(Fake, prompts, 5, sampling, dp=2, num_pages=64, ladder=(4, 8, 16))
    assert on == off == reference(prompts, 5, sampling)
    assert s_off["cached_tokens"] == 0 and s_off["prefill_tokens"] == sum(map(len, prompts))
    # Two system prompts of 30 tokens (7 full pages each): at most once per group and system.
    assert s_on["prefill_tokens"] <= sum(map(len, prompts)) - 24 * 28 + 2 * 2 * 28
    assert s_on["cached_tokens"] + s_on["prefill_tokens"] == s_off["prefill_tokens"]


def test_a_prompt_cached_in_full_still_computes_its_last_token(Fake=FakeExecutor):
    prompt = list(range(1, 17))  # exactly four pages of 4
    ex = Fake(dp=1, num_pages=32)
    sched = Scheduler(ex)
    outs, stats = sched.generate([prompt], 3)
    outs2, stats2 = sched.generate([prompt, prompt[:9]], 3)
    assert outs2 == reference([prompt, prompt[:9]], 3) and outs == outs2[:1]
    # Three of the four pages come from the cache, the last token's page is computed; the
    # 9-token prompt takes its two full pages.
    assert stats2["cached_tokens"] == 12 + 8 and stats2["prefill_tokens"] == 4 + 1


@pytest.mark.parametrize("sampling", [None, SEEDED], ids=["greedy", "seeded"])
def test_eviction_pressure_changes_no_token(sampling):
    rng = np.random.default_rng(3)
    prompts = shared_prefix_prompts(rng, 30, 12, 10, systems=6)
    ex = PipelinedFake(dp=2, num_pages=14, ladder=(4, 8))  # 13 pages a group: far fewer than the cache would keep
    sched = Scheduler(ex, sampling=sampling)
    outs, stats = sched.generate(prompts, 6, arrivals=list(range(0, 60, 2)))
    assert outs == reference(prompts, 6, sampling)
    assert stats["evictions"] > 0 and stats["cached_tokens"] > 0
    assert all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)


@pytest.mark.parametrize("sampling", [None, SEEDED], ids=["greedy", "seeded"])
def test_preemption_with_shared_pages_changes_no_token(sampling):
    prompts = shared_prefix_prompts(np.random.default_rng(4), 12, 16, 4)
    on, off = run_both(PipelinedFake, prompts, 20, sampling, dp=2, num_pages=16, ladder=(4, 8))
    assert on[0] == off[0] == reference(prompts, 20, sampling)
    assert on[1]["preemptions"] > 0 and on[1]["cached_tokens"] > 0


def test_the_writer_cancelled_mid_prefill_hands_the_prefix_to_a_waiter():
    """B and C take A's prompt pages while A is still computing them; A is cancelled before it
    wrote them, so one of them computes them, and both still get their own reference tokens."""
    rng = np.random.default_rng(5)
    system = rng.integers(0, VOCAB - 1, 40).tolist()
    a, b, c = (system + rng.integers(0, VOCAB - 1, 3).tolist() for _ in range(3))
    ex = PipelinedFake(dp=1, num_pages=64, ladder=(4, 8))
    sched = Scheduler(ex)
    ra = sched.submit(a, 4)
    sched.step()  # A's first 8 tokens launched
    rb, rc = sched.submit(b, 4), sched.submit(c, 4)
    sched.step()
    assert rb.pages[:9] == rc.pages[:9] == ra.pages[:9] and sched.pages.blocked(rb)
    sched.cancel(ra)
    assert not sched.pages.blocked(rb) or not sched.pages.blocked(rc)  # one of them now writes them
    while sched.busy:
        sched.step()
    assert [rb.generated, rc.generated] == reference([b, c], 4)
    assert all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)


def test_a_request_goes_where_its_prefix_is_cached():
    rng = np.random.default_rng(6)
    first, second = (rng.integers(0, VOCAB - 1, 20).tolist() for _ in range(2))
    ex = FakeExecutor(dp=2, num_pages=32)
    sched = Scheduler(ex)
    sched.generate([first, second], 2)  # first in group 0, second in group 1: both cached there
    again = [sched.submit(second + [1, 2], 2), sched.submit(first + [3], 2)]
    sched.step()
    assert [r.group for r in again] == [1, 0]
    assert [r.cached_tokens for r in again] == [20, 20]


def test_equal_pages_at_other_positions_or_after_other_tokens_are_not_shared():
    """A page is its tokens and everything before them: a run of one token repeated has equal
    pages at different positions, and a page of equal tokens after a different start is another."""
    prompts = [[5] * 20 + [i] for i in range(6)] + [[6] * 4 + [5] * 16 + [i] for i in range(3)]
    ex = PipelinedFake(dp=2)
    sched = Scheduler(ex)
    outs, stats = sched.generate(prompts, 3)
    assert outs == reference(prompts, 3)
    assert stats["cached_tokens"] > 0
    for r in sched.pages.key:  # each cached page once, and under its own parent
        assert len(set(r.values())) == len(r)


def test_no_prefix_cache_shares_nothing():
    prompts = [[5] * 20 + [i] for i in range(6)]
    ex = FakeExecutor(dp=2)
    sched = Scheduler(ex, prefix_cache=False)
    outs, stats = sched.generate(prompts, 3)
    assert outs == reference(prompts, 3)
    assert stats["cached_tokens"] == 0 and sched.pages.cached == 0


# ---- reference counts under random shared-prefix workloads ---------------------------------------

def check_references(sched: Scheduler, ex) -> None:
    """Every held page is held by exactly the running requests whose tables list it; no page is
    both free and held or cached; every page is somewhere; a cached page's parent is cached."""
    pages = sched.pages
    for g in range(ex.dp):
        listed = {}
        for r in sched.active[g]:
            assert len(set(r.pages)) == len(r.pages), "a request lists a page twice"
            for p in r.pages:
                listed.setdefault(p, []).append(r)
        assert {p: sorted(map(id, rs)) for p, rs in listed.items()} == \
               {p: sorted(map(id, rs)) for p, rs in pages.holders[g].items()}, "reference counts drifted"
        assert pages.held[g] == len(listed)
        free, idle = set(pages.free[g]), set(pages.idle[g])
        assert len(free) == len(pages.free[g]), "a page is free twice"
        assert not free & set(listed), "a page is free while a request holds it"
        assert not idle & set(listed), "a held page is also idle"
        assert not free & set(pages.key[g]), "a free page is still cached"
        assert idle <= pages.ready[g] <= set(pages.key[g])
        assert free | idle | set(listed) == set(range(1, ex.num_pages)), "a page leaked"
        for page, (parent, tokens) in pages.key[g].items():
            assert pages.index[g][parent, tokens] == page
            assert parent == 0 or parent in pages.key[g], "a cached page's parent was dropped"
    for r in sched.queue:
        assert not r.pages, "a queued request holds pages"


workload = st.lists(st.tuples(st.integers(0, 3),  # which shared start
                              st.integers(0, 14),  # how much of it
                              st.lists(st.integers(0, VOCAB - 2), max_size=6),  # own suffix
                              st.integers(1, 10),  # max_new
                              st.sampled_from([0.0, 0.8]),
                              st.integers(0, 2),  # steps after submitting it
                              st.integers(-1, 12)),  # cancel the request this many before it (-1: none)
                    min_size=1, max_size=16)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=workload, pipelined=st.booleans(), pages=st.sampled_from([8, 12, 24]),
       starts=st.lists(st.lists(st.integers(0, VOCAB - 2), min_size=14, max_size=14), min_size=4, max_size=4))
def test_reference_counts_under_random_shared_prefix_workloads(ops, pipelined, pages, starts):
    ex = (PipelinedFake if pipelined else FakeExecutor)(dp=2, num_pages=pages, ladder=(4, 8), max_seqs=3)
    sched = Scheduler(ex)
    live = []
    for which, cut, suffix, max_new, temperature, steps, cancel in ops:
        prompt = (starts[which][:cut] + suffix) or [1]
        if -(-(len(prompt) + max_new - 1) // ex.page_size) > ex.num_pages - 1:
            continue
        live.append(sched.submit(prompt, max_new, SamplingParams(temperature, seed=len(live))))
        for _ in range(steps):
            sched.step()
            check_references(sched, ex)
        if 0 <= cancel < len(live) and live[-1 - cancel].finish_reason is None:
            sched.cancel(live[-1 - cancel])
            check_references(sched, ex)
    while sched.busy:
        sched.step()
        check_references(sched, ex)
    for r in live:
        want = alone(r.prompt, r.max_new, r.sampling, [])
        assert r.generated == (want[:len(r.generated)] if r.finish_reason == "cancelled" else want)
    assert sched.pages_used == 0 and not any(sched.pages.holders)
    assert all(sorted(f) == list(range(1, ex.num_pages)) for f in sched.free_pages)


def test_pages_a_queued_request_will_take_are_evicted_last():
    """A conversation's next turn waits behind a large request that needs an evicted page: the
    page evicted is one nobody waits for, though the turn's pages went idle earlier."""
    ex = FakeExecutor(dp=1, num_pages=13)  # 12 pages of 4
    sched = Scheduler(ex)
    x, y = list(range(1, 13)), list(range(21, 33))  # each leaves its 2 full pages before the last token cached
    (x_out,), _ = sched.generate([x], 1)
    sched.generate([y], 1)
    big = [t % 60 for t in range(40, 76)]  # 9 pages: one idle page must go
    turn = x + x_out + [5, 6, 7]
    outs, stats = sched.generate([big, turn], 1)
    assert outs == reference([big, turn], 1)
    assert stats["evictions"] >= 1
    assert stats["cached_tokens"] == 8  # the turn still found both of x's pages
