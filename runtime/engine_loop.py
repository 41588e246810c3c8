"""One thread owns the engine: it admits requests as they come, steps, and hands tokens back.

The HTTP side never touches the scheduler or the devices. It submits a request with a callback and
may cancel it; the loop thread drains both inboxes before every step, so a request joins the very
next step after it arrives (continuous batching with online admission), and a cancelled request's
KV pages are free for that step. Callbacks run on the loop thread: they must only hand data over
(e.g. `asyncio.AbstractEventLoop.call_soon_threadsafe`).

When the engine fails, nothing waits on it in silence: every open request gets an `EngineFailed`
event, later submissions raise it, and `on_failure` tells the owner (the server ends itself).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

from .capabilities import capabilities_of
from .sampling import SamplingParams
from .scheduler import RequestError, Scheduler


class QueueFull(Exception):
    """More requests are waiting than the server accepts (HTTP 429)."""


class EngineFailed(Exception):
    """The engine loop stopped on an error; no request will be served any more (HTTP 503/500)."""


@dataclasses.dataclass
class TokenEvent:
    token: int
    logprob: float
    top: list[tuple[int, float]]
    finish_reason: str | None  # set on the last event of a request
    # Prompt tokens whose K/V came from the prefix cache instead of being computed (the OpenAI
    # usage.prompt_tokens_details.cached_tokens); set on the first event of a request, 0 after.
    cached_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Handle:
    """A submitted request as the HTTP side sees it."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    on_event: Callable[[TokenEvent | Exception], None]
    top_logprobs: int = 0
    request: object = None  # the scheduler's, once admitted by the loop
    done: bool = False
    # Set by the HTTP side before it queues the cancel: a handle not yet admitted when the cancel
    # pass runs is dropped at admission instead, so no cancel is lost between the two.
    cancel_reason: str | None = None


@dataclasses.dataclass
class LoopStats:
    steps: int = 0
    step_seconds: list = dataclasses.field(default_factory=list)  # since the last drain by metrics
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict = dataclasses.field(default_factory=dict)  # finish_reason -> count

    def finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1


class EngineLoop:
    def __init__(self, engine, *, padding_mode: str = "auto", eos_ids: Sequence[int] = (), max_queue: int = 256,
                 channel=None, prefix_cache: bool = True):
        self.engine = engine
        self.scheduler = make_scheduler(engine, padding_mode, eos_ids, prefix_cache)
        self.channel = channel  # multi-process: where the other processes learn what to apply before each step
        self._events: list[dict] = []  # applied here since the last published record
        self._record_of_launch: collections.deque = collections.deque()  # (launch number, record number)
        self.max_queue = max_queue
        self.stats = LoopStats()
        self._inbox: queue.Queue = queue.Queue()
        self._cancels: queue.Queue = queue.Queue()
        self._waiting = 0  # submitted, not yet admitted by the scheduler (guarded by _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        # Called on the loop thread after each round of callbacks (a step's tokens, refused
        # submissions): a consumer that batches its hand-overs flushes them here, once per step.
        self.after_callbacks: Callable[[], None] = lambda: None
        # Called on the loop thread once, after every open request has heard of the failure.
        self.on_failure: Callable[[BaseException], None] = lambda e: None

    # ---------------------------------------------------------------- the HTTP side

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: SamplingParams, on_event,
               top_logprobs: int = 0) -> Handle:
        handle = Handle(tuple(prompt), max_tokens, sampling, on_event, top_logprobs)
        with self._lock:  # the loop fails under this lock too: a handle is either failed there or refused here
            if self.error is not None:
                raise EngineFailed(describe(self.error))
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self._waiting += 1
            self._inbox.put(handle)
        self._wake.set()
        return handle

    def cancel(self, handle: Handle, reason: str = "cancelled") -> None:
        """End a request early: "cancelled" (its client left) or "stop" (a stop string was found)."""
        if not handle.done and handle.cancel_reason is None:
            handle.cancel_reason = reason
            self._cancels.put(handle)
            self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.channel is not None and self.error is None:
            self.channel.publish(self.stats.steps, {"stop": True})

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running: in the inbox or the scheduler's queue."""
        return self._waiting + len(self.scheduler.queue)

    @property
    def failed(self) -> bool:
        return self.error is not None

    # ---------------------------------------------------------------- the loop thread

    def _admit_new(self) -> None:
        for h in _drain(self._inbox):
            with self._lock:
                self._waiting -= 1
            if h.cancel_reason is not None:  # cancelled before it was admitted
                self._finish_unadmitted(h)
                continue
            self._record({"op": "submit", "prompt": list(h.prompt), "max_tokens": h.max_tokens,
                          "sampling": dataclasses.asdict(h.sampling), "top_logprobs": h.top_logprobs})
            try:
                h.request = self.scheduler.submit(h.prompt, h.max_tokens, h.sampling, tag=h,
                                                  top_logprobs=h.top_logprobs)
                self.stats.prompt_tokens += len(h.prompt)
            except RequestError as e:
                h.done = True
                h.on_event(e)

    def _finish_unadmitted(self, h: Handle) -> None:
        h.done = True
        self.stats.finish(h.cancel_reason)

    def _apply_cancels(self) -> None:
        for h in _drain(self._cancels):
            if h.request is None or h.done:
                continue  # not admitted yet: admission drops it (its cancel_reason is set)
            self._record({"op": "cancel", "index": h.request.index, "reason": h.cancel_reason})
            self.scheduler.cancel(h.request, h.cancel_reason)
            h.done = True
            self.stats.finish(h.cancel_reason)

    def _record(self, event: dict) -> None:
        """Keep what the other processes must replay (nothing to keep when serving alone)."""
        if self.channel is not None:
            self._events.append(event)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit_new()
                self._apply_cancels()
                self.after_callbacks()
                if not self.scheduler.busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
                self.after_callbacks()
        except BaseException as e:  # noqa: BLE001 - the engine failed: every open request hears of it
            self._fail(e)

    def _step(self) -> None:
        record = self.stats.steps
        if self.channel is not None:
            self.channel.publish(record, {"events": self._events})
            self._events = []
        launched = self.scheduler.launched
        t0 = time.perf_counter()
        served = self.scheduler.step()
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - t0)
        if self.channel is not None:
            self._release_records(record, launched)
        for r in served:
            self._deliver(r)

    def _release_records(self, record: int, launched_before: int) -> None:
        """Delete the step records every process has read. A step whose outputs were read ran on
        every process's devices (its collectives span them all), so each process had read the
        record published before it was launched, and every earlier one. A step-call that launched
        nothing proves nothing, which is why deleting by count alone would not be safe."""
        if self.scheduler.launched > launched_before:
            self._record_of_launch.append((self.scheduler.launched, record))
        read = None
        while self._record_of_launch and self._record_of_launch[0][0] <= self.scheduler.collected:
            read = self._record_of_launch.popleft()[1]
        if read is not None:
            self.channel.release(read)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.error = e
            pending = list(_drain(self._inbox))
            self._waiting = 0
        failure = EngineFailed(describe(e))
        for h in self._open_handles() + pending:
            if not h.done:
                h.done = True
                h.on_event(failure)
        self.after_callbacks()
        self.on_failure(e)

    def _deliver(self, r) -> None:
        h: Handle = r.tag
        if h.done:
            return
        self.stats.generated_tokens += 1
        top = r.top_logprobs[-1] if r.top_logprobs else []
        if r.finish_reason is not None:
            h.done = True
            self.stats.finish(r.finish_reason)
        cached = r.cached_tokens if len(r.generated) == 1 else 0
        h.on_event(TokenEvent(r.generated[-1], r.logprobs[-1], top, r.finish_reason, cached))

    def _open_handles(self) -> list[Handle]:
        hs = [r.tag for r in self.scheduler.queue] + [r.tag for g in self.scheduler.active for r in g]
        return [h for h in hs if not h.done]


def describe(e: BaseException) -> str:
    return f"the engine failed: {type(e).__name__}: {e}"


def _drain(q: queue.Queue):
    """Everything in a queue now, without waiting."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def make_scheduler(engine, padding_mode: str, eos_ids: Sequence[int], prefix_cache: bool = True) -> Scheduler:
    """The serving scheduler; every process of a multi-process server builds the same one (the
    prefix cache and routing are part of its state, so they must be on or off on all alike)."""
    return Scheduler(engine, padding_mode=padding_mode, eos_token_id=list(eos_ids) or None,
                     top_logprobs=capabilities_of(engine).num_logprobs, prefix_cache=prefix_cache)


def follow(engine, channel, *, padding_mode: str = "auto", eos_ids: Sequence[int] = (),
           prefix_cache: bool = True) -> int:
    """A process other than the leader: apply the leader's records and step with it, until told to
    stop. Returns the number of steps run."""
    scheduler = make_scheduler(engine, padding_mode, eos_ids, prefix_cache)
    requests = {}
    n = 0
    while True:
        record = channel.receive(n)
        if record.get("stop"):
            return n
        for ev in record["events"]:
            if ev["op"] == "submit":
                try:
                    r = scheduler.submit(ev["prompt"], ev["max_tokens"], SamplingParams(**ev["sampling"]),
                                         top_logprobs=ev.get("top_logprobs"))
                    requests[r.index] = r
                except RequestError:
                    pass  # refused by the leader alike
            elif ev["index"] in requests:
                scheduler.cancel(requests.pop(ev["index"]), ev.get("reason", "cancelled"))
        if scheduler.busy:
            for r in scheduler.step():
                if r.finish_reason is not None:
                    requests.pop(r.index, None)
        n += 1
