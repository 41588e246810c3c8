"""The engine loop over the fake paged-cache executor: failures reach every request, no cancel is
lost, and the multi-process step channel keeps every record a lagging follower still needs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.distributed import StepChannel
from runtime.engine_loop import EngineFailed, EngineLoop, TokenEvent, follow
from runtime.sampling import SamplingParams
from test_scheduler import PipelinedFake, random_prompts, reference


class Inbox:
    """A request's events as the loop thread hands them over."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if not isinstance(ev, TokenEvent) or ev.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [e.token for e in self.events if isinstance(e, TokenEvent)]


class FailingFake(PipelinedFake):
    """Its device breaks at the n-th step read."""

    def __init__(self, fail_at, **kw):
        super().__init__(**kw)
        self.fail_at, self.reads = fail_at, 0

    def fetch(self, handle):
        self.reads += 1
        if self.reads == self.fail_at:
            raise RuntimeError("device lost")
        return super().fetch(handle)


def test_a_failing_step_ends_every_request_and_refuses_new_ones():
    loop = EngineLoop(FailingFake(fail_at=6), max_queue=64)
    failures = []
    loop.on_failure = failures.append
    inboxes = [Inbox() for _ in range(12)]
    for i, inbox in enumerate(inboxes):
        loop.submit([1 + i] * (3 + i), 40, SamplingParams(), inbox)
    loop.start()
    t0 = time.perf_counter()
    for inbox in inboxes:
        assert inbox.done.wait(10), "a request never heard of the failure"
    took = time.perf_counter() - t0
    for inbox in inboxes:
        assert isinstance(inbox.events[-1], EngineFailed) and "RuntimeError: device lost" in str(inbox.events[-1])
    assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
    with pytest.raises(EngineFailed, match="device lost"):
        loop.submit([1, 2], 4, SamplingParams(), Inbox())
    assert took < 10


def test_a_cancel_between_admission_and_the_cancel_pass_is_not_lost():
    """The loop drains new requests, then cancels. A request submitted and cancelled between the
    two passes is seen by the cancel pass before it is admitted; it must still never run."""
    ex = PipelinedFake()
    loop = EngineLoop(ex)
    loop._admit_new()  # the loop's admission pass finds nothing...
    inbox = Inbox()
    h = loop.submit([5, 6, 7], 8, SamplingParams(), inbox)  # ...the request arrives
    loop.cancel(h)  # and its client leaves at once
    loop._apply_cancels()  # the cancel pass: not admitted yet
    loop._admit_new()  # the next admission pass
    assert h.done and h.request is None and not loop.scheduler.busy
    assert loop.stats.finished == {"cancelled": 1} and inbox.events == []


def test_stop_string_finishes_count_as_stop():
    ex = PipelinedFake()
    loop = EngineLoop(ex)
    inbox = Inbox()
    h = loop.submit([5, 6, 7], 30, SamplingParams(), inbox)
    loop._admit_new()
    loop._step()
    loop._step()
    loop.cancel(h, "stop")
    loop._apply_cancels()
    assert loop.stats.finished == {"stop": 1} and loop.scheduler.pages_used == 0


# ------------------------------------------------------------------------------------ multi-process

class Store:
    """The coordination service's key-value store, in memory. Reading a key that was deleted is
    the bug this guards against: the real store would make the reader wait forever."""

    def __init__(self):
        self.kv, self.deleted, self.cond = {}, set(), threading.Condition()

    def key_value_set(self, key, value):
        with self.cond:
            self.kv[key] = value
            self.cond.notify_all()

    def key_value_delete(self, key):
        with self.cond:
            del self.kv[key]
            self.deleted.add(key)

    def blocking_key_value_get(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.kv or key in self.deleted, timeout_ms / 1e3):
                raise RuntimeError("DEADLINE_EXCEEDED")
            if key in self.deleted:
                raise AssertionError(f"{key} was deleted before this follower read it")
            return self.kv[key]


class Devices:
    """Steps that span processes: a step's outputs exist only once every process launched it."""

    def __init__(self, n):
        self.launched, self.cond = [0] * n, threading.Condition()

    def launch(self, p):
        with self.cond:
            self.launched[p] += 1
            self.cond.notify_all()
            return self.launched[p]

    def wait_all(self, step):
        with self.cond:
            assert self.cond.wait_for(lambda: min(self.launched) >= step, 30), "a process never launched a step"


class CoupledFake(PipelinedFake):
    def __init__(self, devices, p, **kw):
        super().__init__(**kw)
        self.devices, self.p = devices, p

    def dispatch(self, bucket, batch):
        handle = super().dispatch(bucket, batch)
        handle["step"] = self.devices.launch(self.p)
        return handle

    def dispatch_again(self, bucket):
        return super().dispatch_again(bucket)  # through dispatch: counted there

    def fetch(self, handle):
        self.devices.wait_all(handle["step"])
        return super().fetch(handle)


class SlowChannel(StepChannel):
    """A follower that reads every record late."""

    def receive(self, n):
        time.sleep(0.02)
        return super().receive(n)


class Bursts:
    """Bursts of requests, each submitted the moment the one before it has finished (from the
    loop thread's own callback, so the leader goes straight from a step that launched nothing to
    one that waits for nobody), except where `gap_before` asks for an idle pause."""

    def __init__(self, loop, bursts, gap_before):
        self.loop, self.bursts, self.gap_before = loop, bursts, gap_before
        self.inboxes, self.prompts, self.open = [], [], 0
        self.lock, self.paused, self.finished = threading.Lock(), threading.Event(), threading.Event()
        self.next = 0

    def submit_next(self):
        burst, self.next = self.bursts[self.next], self.next + 1
        self.open = len(burst)
        for k, p in enumerate(burst):
            inbox = Inbox()
            self.inboxes.append(inbox)
            self.prompts.append(p)
            h = self.loop.submit(p, 6, SamplingParams(), lambda ev, inbox=inbox: self.on_event(inbox, ev))
            if k == 0 and self.next % 2 == 0:
                self.loop.cancel(h)  # dropped before admission
                self.open -= 1
                inbox.cancelled = True

    def on_event(self, inbox, ev):
        inbox(ev)
        if inbox.done.is_set():
            self.open -= 1
            if self.open == 0:
                if self.next == len(self.bursts):
                    self.finished.set()
                elif self.next in self.gap_before:
                    self.paused.set()
                else:
                    self.submit_next()


def test_a_lagging_follower_never_loses_a_record():
    """Bursts of requests, back to back or after an idle gap, cancels among them, and a follower
    that reads every record late: it runs the leader's very steps, and every record it still
    needed was there. Deleting record n-2 when publishing record n fails here: a step after an
    idle moment launches without waiting for anyone, so the leader can publish two records while
    the follower has not yet read the one before them."""
    store, devices = Store(), Devices(2)
    leader_ex, follower_ex = CoupledFake(devices, 0), CoupledFake(devices, 1)
    loop = EngineLoop(leader_ex, channel=StepChannel(store))
    result = {}
    follower = threading.Thread(target=lambda: result.update(steps=follow(follower_ex, SlowChannel(store))))
    follower.start()
    loop.start()
    rng = np.random.default_rng(3)
    bursts = Bursts(loop, [random_prompts(rng, 3, 1, 12) for _ in range(6)], gap_before={3})
    bursts.submit_next()
    assert bursts.paused.wait(60)
    time.sleep(0.2)  # idle: nothing is published
    bursts.submit_next()
    assert bursts.finished.wait(60)
    loop.stop(timeout=30)
    follower.join(60)
    assert not follower.is_alive() and result["steps"] == loop.stats.steps
    assert len(leader_ex.batches) == len(follower_ex.batches)
    for a, b in zip(leader_ex.batches, follower_ex.batches):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for inbox, p in zip(bursts.inboxes, bursts.prompts):
        assert inbox.tokens == ([] if getattr(inbox, "cancelled", False) else reference([p], 6)[0])
    assert len(store.kv) <= 3  # records are deleted as the followers are proven past them
