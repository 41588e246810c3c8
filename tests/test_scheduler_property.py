"""Online serving as hypothesis interleaves it: submissions, steps, cancels, a KV pool small
enough to preempt, EOS and stop ids, greedy and seeded sampling, pipelined or not. Every request's
tokens must equal an unbatched reference run of it alone (a cancelled one's a prefix of it), and
every page must come back."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler
from test_scheduler import VOCAB, FakeExecutor, PipelinedFake, toy_logits, toy_sample

EOS = 7


def alone(prompt, max_new, s: SamplingParams, eos_ids):
    """One request by itself, token by token, with the scheduler's stop rules."""
    hist, out = list(prompt), []
    stops = (set() if s.ignore_eos else set(eos_ids)) | set(s.stop_token_ids)
    for _ in range(max_new):
        out.append(toy_sample(toy_logits(tuple(hist)), s.temperature, s.top_k, s.top_p, s.seed, len(hist)))
        hist.append(out[-1])
        if out[-1] in stops and len(out) >= s.min_tokens:
            break
    return out


requests = st.tuples(
    st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=14),  # prompt
    st.integers(1, 24),  # max_new
    st.sampled_from([0.0, 0.8]),  # temperature
    st.integers(0, 1000),  # seed
    st.sampled_from([(), (3,), (11, 19)]),  # stop_token_ids
    st.booleans(),  # ignore_eos
    st.integers(0, 4),  # min_tokens
)
submit = st.tuples(st.just("submit"), requests)
ops = st.lists(st.one_of(submit, submit, submit, st.tuples(st.just("step"), st.integers(1, 3)),
                         st.tuples(st.just("cancel"), st.integers(0, 50))), min_size=4, max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, pipelined=st.booleans(), pages=st.sampled_from([6, 8, 12, 40]))
def test_online_interleavings_match_the_unbatched_reference(ops, pipelined, pages):
    ex = (PipelinedFake if pipelined else FakeExecutor)(dp=2, num_pages=pages, ladder=(4, 8), max_seqs=3)
    sched = Scheduler(ex, eos_token_id=EOS)
    live, done = [], []
    for op, arg in ops:
        if op == "submit":
            prompt, max_new, temperature, seed, stop_ids, ignore_eos, min_tokens = arg
            if len(prompt) + max_new > sched.max_context or \
                    -(-(len(prompt) + max_new - 1) // ex.page_size) > ex.num_pages - 1:
                continue  # refused at submission; covered by the request-error tests
            s = SamplingParams(temperature, 0, 1.0, seed, ignore_eos, stop_ids, min(min_tokens, max_new))
            live.append(sched.submit(prompt, max_new, s))
        elif op == "step":
            for _ in range(arg):
                sched.step()
        elif live:
            victim = live[arg % len(live)]
            if victim.finish_reason is None:
                sched.cancel(victim)
    while sched.busy:
        sched.step()
    target(float(sched.stats.preemptions), label="preemptions")  # steer towards a pool under pressure
    for r in live:
        want = alone(r.prompt, r.max_new, r.sampling, [EOS])
        if r.finish_reason == "cancelled":
            assert r.generated == want[:len(r.generated)]
        else:
            assert r.generated == want, (r.prompt, r.sampling)
            assert r.finish_reason == ("length" if len(want) == r.max_new and want[-1] not in
                                       (set() if r.sampling.ignore_eos else {EOS}) | set(r.sampling.stop_token_ids)
                                       else "stop")
    assert sched.pages_used == 0
    assert all(sorted(free) == list(range(1, ex.num_pages)) for free in sched.free_pages)
    assert not sched.queue and not any(sched.active)
