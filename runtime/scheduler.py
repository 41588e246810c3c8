"""Continuous batching over DP groups (numpy + stdlib; drives an abstract executor).

Three parts, each small enough to hold in one's head:
- the page allocator (`runtime.pages`): which KV pages each request holds, per DP group, and the
  prefix cache through which requests share the pages of a common start;
- the planner (`runtime.planner`): admission, routing to groups, preemption under page
  pressure, the step's work per group and the bucket that serves it;
- the pipeline (here): pack and launch the planned step, read the one before it, hand each
  sampled token to its request, and repeat a steady step on the device.
The executor is anything with the `Executor` shape below, so this runs and is tested without an
artifact.

Pipelining: with an executor that can `dispatch` a step and `fetch` its outputs later (the engine:
JAX dispatch is asynchronous), each `step()` plans and launches step n+1 before it reads step n's
sampled tokens, so the host's planning, packing and transfers overlap the device's work. A sequence
whose newest token is still on the device feeds it from there (`Chunk.prev_row`). Positions, pages
and lengths are all known on the host; only an EOS is learnt a step late, and the one token computed
past it is dropped, so outputs are the same as unpipelined. When nothing changed since the last
step and it fed every runnable request from its own row, the next step is that one again, one
position on: an executor with `dispatch_again` runs it from the inputs already on the device, and
the host neither plans nor packs it (`_launch_again`). A preempted request's output does not
change either: the same tokens are fed at the same positions, and sampling is keyed by (seed,
position).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

import numpy as np

from runtime.batching import Chunk, pack
from runtime.buckets import MODES, Bucket, choose
from runtime.capabilities import Capabilities, capabilities_of
from runtime.pages import PageAllocator
from runtime.planner import Planner, Work
from runtime.sampling import SamplingParams

PADDING_MODES = ("auto",) + MODES
KV_POLICIES = ("on_demand", "reserve")


class RequestError(ValueError):
    """A request (or the call that carries it) the runtime can never serve."""


class Executor(Protocol):
    dp: int
    page_size: int
    num_pages: int  # per group, including the reserved page 0
    pages_per_seq: int
    vocab_size: int
    buckets: list[Bucket]

    capabilities: Capabilities  # optional: what it does beyond `run` (dispatch, fetch, ...; see there)

    def run(self, bucket: Bucket, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"tokens": [dp, seqs] sampled ids, "logprobs": [dp, seqs], ...} for one step."""


@dataclasses.dataclass(eq=False)  # identity: requests are removed from lists by object
class _Request:
    index: int  # position in the caller's prompt list
    prompt: tuple[int, ...]
    max_new: int
    num_pages: int  # the most pages it can ever hold: prompt + max_new - 1 positions
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset = frozenset()  # sampled ids that end it (once it has sampling.min_tokens)
    top_n: int = 0  # top logprobs kept per token
    group: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    written: int = 0  # tokens (prompt, then generated) whose K/V are in the cache or being written
    owed: int = 0  # tokens launched steps are sampling for it that the host has not read (0 to 2)
    owed_row: int = -1  # the newest one's row in its step's outputs
    admitted: int = -1  # admission order: the newest is preempted first
    matched: int = 0  # leading pages taken from the prefix cache, until they are all known written
    registered: int = 0  # leading pages in the prefix cache (-1: no more will be)
    cached_tokens: int = 0  # prompt tokens its last admission took from the prefix cache
    preemptions: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    last_step: int = -1  # last step that served it: decoders are rotated by this
    finish_reason: str | None = None  # "stop" (a stop id, or the caller's stop string), "length", "cancelled"
    tag: object = None  # the caller's handle (a server's request id)

    @property
    def known(self) -> int:
        """Tokens known so far: the prompt, what was generated, and one being sampled."""
        return len(self.prompt) + len(self.generated) + self.owed

    @property
    def complete(self) -> bool:
        """Every token it may generate is sampled or being sampled: nothing left to run."""
        return len(self.generated) + self.owed >= self.max_new

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return self.known - self.written

    @property
    def decoding(self) -> bool:
        return self.pending == 1

    def chunk(self, n: int) -> Chunk:
        """The next n tokens it feeds, with the pages it holds now. A token still being sampled
        is taken on the device from the launched step's outputs (a 0 stands in for it here)."""
        a, b, P = self.written, self.written + n, len(self.prompt)
        owed = int(self.owed > 0 and b == self.known)  # planning sees at most one step in flight
        tokens = self.prompt[a:b] + tuple(self.generated[max(a - P, 0):max(b - P - owed, 0)]) + (0,) * owed
        p = self.sampling
        return Chunk(tokens, a, tuple(self.pages), p.temperature, p.top_k, p.top_p, p.seed,
                     self.owed_row if owed else -1)


class Scheduler:
    """Serves lists of prompts on one executor. Holds the per-group page allocators."""

    def __init__(self, executor: Executor, *, padding_mode: str = "auto",
                 sampling: SamplingParams | None = None, eos_token_id=None, top_logprobs: int = 0,
                 kv: str = "on_demand", pipeline: bool = True, prefix_cache: bool = True):
        if kv not in KV_POLICIES:
            raise RequestError(f"kv {kv!r} is not one of {KV_POLICIES}")
        self.kv = kv
        self.ex = executor
        self.dp = int(executor.dp)
        self.mode = padding_mode
        self.sampling = sampling or SamplingParams()
        # One EOS id, several (a checkpoint's generation_config lists them), or None.
        self.eos_ids = frozenset() if eos_token_id is None else frozenset(
            [int(eos_token_id)] if np.isscalar(eos_token_id) else [int(e) for e in eos_token_id])
        self.top_logprobs = top_logprobs
        self._check_executor()
        self.pages = PageAllocator(self.dp, executor.num_pages, executor.page_size, prefix_cache)
        self.planner = Planner(executor, self.dp, padding_mode, kv, self.pages)
        self.queue: list[_Request] = []
        self.active: list[list[_Request]] = [[] for _ in range(self.dp)]
        self.stats = _Stats()
        self._submitted = 0
        # pipeline=False reads every step before planning the next (a baseline, or for debugging).
        self.caps = capabilities_of(executor)
        self._pipelined = pipeline and self.caps.pipelined
        self._in_flight: _Launch | None = None  # launched, outputs not read yet
        # Steps launched, and how many of them had their outputs read: a multi-process leader
        # learns from the second which steps every process has launched.
        self.launched = self.collected = 0
        # Bumped whenever a request leaves; with the allocator's version (admissions, preemptions,
        # pages) it says whether the batch is still what a step saw: only then can that step be
        # repeated on the device (_launch_again).
        self._retired = 0
        self._repeatable: tuple | None = None  # (bucket, plan, _version()) of the last step, if steady

    # ---- validation -------------------------------------------------------------------------

    def _check_executor(self):
        """Reject a padding mode or bucket set that can't serve even one token."""
        if self.mode not in PADDING_MODES:
            raise RequestError(f"padding_mode {self.mode!r} is not one of {PADDING_MODES}")
        if self.ex.num_pages < 2:
            raise RequestError(f"the cache has {self.ex.num_pages} pages per group; page 0 is "
                               "reserved, so at least 2 are needed")
        one = [1] + [0] * (self.dp - 1)
        if choose(one, one, self.ex.buckets, self.dp, self.mode) is None:
            raise RequestError(f"no {self.mode} bucket can serve a single token; buckets: "
                               f"{sorted(b.name for b in self.ex.buckets)}")
        available = capabilities_of(self.ex).num_logprobs
        if self.top_logprobs and not 0 <= self.top_logprobs <= available:
            raise RequestError(f"{self.top_logprobs} top logprobs asked for; this artifact returns at most "
                               f"{available} per token (built with --logprobs {available})")
        bad = [e for e in self.eos_ids if not 0 <= e < self.ex.vocab_size]
        if bad:
            raise RequestError(f"eos_token_id {bad[0]} is outside [0, {self.ex.vocab_size})")

    @property
    def max_context(self) -> int:
        return self.ex.pages_per_seq * self.ex.page_size

    def _make_requests(self, prompts: Sequence[Sequence[int]], max_new_tokens) -> list[_Request]:
        """Validate every request up front, so a bad one fails the call before any work is done."""
        if len(prompts) == 0:
            raise RequestError("the prompt list is empty; pass at least one non-empty prompt")
        per_request = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple, np.ndarray)) \
            else [max_new_tokens] * len(prompts)
        if len(per_request) != len(prompts):
            raise RequestError(f"{len(per_request)} max_new_tokens values for {len(prompts)} prompts")
        for n in per_request:
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise RequestError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        return [self._make_request(i, p, int(n)) for i, (p, n) in enumerate(zip(prompts, per_request))]

    def _make_request(self, i: int, prompt: Sequence[int], max_new: int,
                      sampling: SamplingParams | None = None, name: str | None = None) -> _Request:
        name = name or f"prompt {i}"
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise RequestError(f"{name} is empty or not a flat list of token ids; "
                               "each prompt needs at least one token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"{name} holds non-integer token ids ({ids.dtype})")
        vocab = self.ex.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise RequestError(f"{name} has token id {int(bad[0])} outside [0, {vocab})")
        if ids.size + max_new > self.max_context:
            raise RequestError(f"{name}: {ids.size} prompt tokens + {max_new} new tokens exceed "
                               f"the max context of {self.max_context} "
                               f"({self.ex.pages_per_seq} pages x {self.ex.page_size})")
        # The last generated token is never fed back, so it takes no cache slot.
        pages = math.ceil((ids.size + max_new - 1) / self.ex.page_size)
        if pages > self.ex.num_pages - 1:
            raise RequestError(f"{name} needs {pages} KV pages but a group's cache has only "
                               f"{self.ex.num_pages - 1} allocatable pages (page 0 is reserved)")
        sampling = sampling or self.sampling.for_request(i)
        if sampling.min_tokens > max_new:
            raise RequestError(f"{name}: min_tokens {sampling.min_tokens} is more than the {max_new} new tokens "
                               "it may have (max_tokens)")
        bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{name}: stop token id {bad[0]} is outside [0, {vocab})")
        stop_ids = (frozenset() if sampling.ignore_eos else self.eos_ids) | frozenset(sampling.stop_token_ids)
        return _Request(i, tuple(int(t) for t in ids), max_new, pages, sampling, stop_ids, self.top_logprobs)

    def _launch(self) -> "_Launch | None":
        """Plan, pack and launch the next step (None when no request can run now). Every chunk is
        credited as written at once; a request whose chunk reaches its last known token owes the
        token this step samples."""
        if self.kv == "on_demand":
            self.stats.preemptions += self.planner.make_room(self.queue, self.active)
        runnable = [[r for r in group if not r.complete and not self.pages.blocked(r)] for group in self.active]
        if not any(runnable):
            return None
        step = self.stats.steps
        outputs = self._launch_again(runnable)
        if outputs is not None:
            bucket, plan = self._repeatable[:2]
        else:
            bucket, plan = self.planner.build(runnable, step)
            groups = [[w.request.chunk(w.n) for w in ws] for ws in plan]
            batch = pack(groups, bucket.tokens, bucket.seqs, self.ex.pages_per_seq)
            outputs = self.ex.dispatch(bucket, batch) if self._pipelined else self.ex.run(bucket, batch)
            # The next step may repeat this one on the device if every runnable request decodes
            # here, each fed from its own row of the step before (so from this step's, next time).
            steady = all(len(ws) == len(rs) for ws, rs in zip(plan, runnable)) and all(
                c.prev_row == j for cs in groups for j, c in enumerate(cs))
            self._repeatable = (bucket, plan, self._version()) if steady and self._pipelined else None
        self.stats.record(bucket, plan, self.dp)
        self.launched += 1
        sampled = []
        for g, ws in enumerate(plan):
            for j, w in enumerate(ws):
                r = w.request
                r.last_step = step
                self.pages.wrote(r, r.written, r.written + w.n)
                r.written += w.n
                if r.written == r.known:  # the chunk ends at its last known token: the next is sampled
                    r.owed, r.owed_row = r.owed + 1, j
                    sampled.append((g, j, r))
        return _Launch(bucket, outputs, sampled)

    def _launch_again(self, runnable: list[list[_Request]]):
        """Launch the last step again, one position on, without planning or packing it (None when
        that is not this step): the executor advances its last inputs on the device. That is the
        step `_build` would plan when the last one fed every runnable request one token from its
        own row and nothing changed since: no request admitted, finished, preempted or given a
        page, each still decoding. The bookkeeping after launch is the same either way."""
        if self._repeatable is None or not self.caps.repeats:
            return None
        bucket, plan, changes = self._repeatable
        if changes != self._version() or any(len(ws) != len(rs) for ws, rs in zip(plan, runnable)) \
                or not all(w.request.decoding and not w.request.complete for ws in plan for w in ws):
            return None
        return self.ex.dispatch_again(bucket)

    def _collect(self, launch: "_Launch") -> list[_Request]:
        """Read a launched step's sampled tokens and hand each to its request. Returns the requests
        that got a token (finished ones have their finish_reason set and are retired)."""
        out = self.ex.fetch(launch.outputs) if self._pipelined else launch.outputs
        self.collected += 1
        want = (self.dp, launch.bucket.seqs)
        if np.shape(out["tokens"]) != want:
            raise RuntimeError(f"executor returned tokens of shape {np.shape(out['tokens'])} for "
                               f"{launch.bucket.name}, expected {want}")
        served = []
        for g, j, r in launch.sampled:
            if r.finish_reason is not None:  # cancelled, or ended by an EOS read after this launch
                continue
            r.owed -= 1
            r.generated.append(int(out["tokens"][g, j]))
            r.logprobs.append(float(out["logprobs"][g, j]))
            if r.top_n:  # converted only for a request that asked
                r.top_logprobs.append([(int(i), float(p)) for i, p in
                                       zip(out["top_ids"][g, j, :r.top_n], out["top_logprobs"][g, j, :r.top_n])])
            if r.generated[-1] in r.stop_ids and len(r.generated) >= r.sampling.min_tokens:
                r.finish_reason = "stop"
            elif len(r.generated) == r.max_new:
                r.finish_reason = "length"
            if r.finish_reason is not None:
                self._retire(r)
            else:
                self.pages.register(r)
            served.append(r)
        return served

    def _version(self) -> tuple[int, int]:
        return self.pages.version, self._retired

    def _retire(self, r: _Request) -> None:
        """Take a finished or cancelled request out of the queue or its group, freeing its pages."""
        self._retired += 1
        if r in self.queue:
            self.queue.remove(r)
        elif r.group >= 0 and r in self.active[r.group]:
            self.active[r.group].remove(r)
            self.pages.release(r)

    # ---- online serving: submit, step, cancel ------------------------------------------------

    def submit(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
               tag=None, top_logprobs: int | None = None) -> _Request:
        """Validate one request and queue it (RequestError if it can never be served).
        `top_logprobs`: how many of the scheduler's top logprobs this request keeps per token
        (default all); each costs host time on every step."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        r = self._make_request(self._submitted, prompt, int(max_new_tokens), sampling, name="the prompt")
        if top_logprobs is not None:
            if not 0 <= top_logprobs <= self.top_logprobs:
                raise RequestError(f"{top_logprobs} top logprobs asked for; this scheduler keeps at most "
                                   f"{self.top_logprobs}")
            r.top_n = int(top_logprobs)
        self._submitted += 1
        r.tag = tag
        self.queue.append(r)
        return r

    def check(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None) -> None:
        """Raise RequestError if this request could never be served (ids, context, pages, stop ids)."""
        self._make_request(-1, prompt, int(max_new_tokens), sampling, name="the prompt")

    def cancel(self, r: _Request, reason: str = "cancelled") -> None:
        """Drop a queued or running request now; its pages are free for the next step (a launched
        step still writing into them is ordered before any step that reuses them). `reason` is
        why: "stop" when the caller found a stop string in its text."""
        self._retire(r)
        if r.finish_reason is None:
            r.finish_reason = reason

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(self.active) or self._in_flight is not None

    @property
    def running(self) -> int:
        return sum(map(len, self.active))

    @property
    def pages_used(self) -> int:
        return self.pages.used

    @property
    def free_pages(self) -> list[list[int]]:
        """Per group, the pages no request holds: free, or cached and idle."""
        return [free + list(idle) for free, idle in zip(self.pages.free, self.pages.idle)]

    @property
    def committed(self) -> list[int]:
        return self.pages.held

    def step(self) -> list[_Request]:
        """Admit what fits, launch the next step, then read the one launched before it (with a
        synchronous executor: the one just launched). Returns the requests that got a token; []
        when no step's outputs were read."""
        self.pages.want(self.queue)
        self.planner.admit(self.queue, self.active)
        self.stats.max_queue = max(self.stats.max_queue, len(self.queue))
        launched = self._launch()
        served = self._collect(self._in_flight) if self._in_flight is not None else []
        self._in_flight = launched if self._pipelined else None
        if launched is not None and not self._pipelined:
            served = self._collect(launched)
        return served

    # ---- the offline loop -------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens, arrivals: Sequence[int] | None = None,
                 record_steps: bool = False) -> tuple[list[list[int]], dict]:
        """Generate for every prompt; outputs in prompt order, plus the run's stats.

        `max_new_tokens` is one count or one per prompt. `arrivals` (optional) gives, per prompt,
        the step at which it arrives: a replayed trace. Steps with nothing to do are skipped, not
        run. `record_steps` adds `step_tokens` (real tokens per group, per step) to the stats: the
        trace that `python -m export build --plan-from` plans buckets from.
        """
        requests = self._make_requests(prompts, max_new_tokens)
        arrivals = [0] * len(requests) if arrivals is None else [int(a) for a in arrivals]
        if len(arrivals) != len(requests):
            raise RequestError(f"{len(arrivals)} arrivals for {len(requests)} prompts")
        pending = sorted(requests, key=lambda r: (arrivals[r.index], r.index))
        self.stats = _Stats(step_tokens=[] if record_steps else None)
        hits, evictions = self.pages.hit_tokens, self.pages.evictions
        clock = 0
        while pending or self.busy:
            while pending and arrivals[pending[0].index] <= clock:
                self.queue.append(pending.pop(0))
            if not self.busy:
                clock = arrivals[pending[0].index]  # idle until the next arrival
                continue
            self.step()
            clock += 1
        self.stats.generated_tokens = sum(len(r.generated) for r in requests)
        self.stats.prompt_tokens = sum(len(r.prompt) for r in requests)
        self.stats.cached_tokens = self.pages.hit_tokens - hits
        self.stats.evictions = self.pages.evictions - evictions
        result = self.stats.as_dict()
        if self.top_logprobs:  # asked for: each token's logprob and its top-N alternatives, per request
            result["logprobs"] = [r.logprobs for r in requests]
            result["top_logprobs"] = [r.top_logprobs for r in requests]
        return [list(r.generated) for r in requests], result


@dataclasses.dataclass(frozen=True)
class _Launch:
    """A step that was launched: what its outputs are owed to."""

    bucket: Bucket
    outputs: object  # the executor's handle (pipelined) or its outputs
    sampled: list  # (group, row, request) for each row whose token is a new one


@dataclasses.dataclass
class _Stats:
    steps: int = 0
    buckets: dict = dataclasses.field(default_factory=dict)
    modes: dict = dataclasses.field(default_factory=lambda: {str(m): 0 for m in MODES})
    real_tokens: int = 0
    padded_tokens: int = 0
    exchange_rows: int = 0
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (a prefix cache hit is not; a re-prefill is)
    prompt_tokens: int = 0  # of the requests served (each counted once)
    cached_tokens: int = 0  # tokens taken from the prefix cache at admissions
    evictions: int = 0  # cached pages evicted to make room
    max_queue: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    step_tokens: list | None = None

    def record(self, bucket: Bucket, plan: list[list[Work]], dp: int) -> None:
        """Account one step; called before the step's requests advance."""
        self.steps += 1
        self.buckets[bucket.name] = self.buckets.get(bucket.name, 0) + 1
        self.modes[str(bucket.mode)] += 1
        self.real_tokens += sum(w.n for ws in plan for w in ws)
        self.padded_tokens += dp * bucket.tokens
        self.exchange_rows += bucket.exchange_rows(dp)
        self.prefill_chunks += sum(w.request.written < len(w.request.prompt) for ws in plan for w in ws)
        self.prefill_tokens += sum(max(0, min(w.request.written + w.n, len(w.request.prompt)) - w.request.written)
                                   for ws in plan for w in ws)
        if self.step_tokens is not None:
            self.step_tokens.append([sum(w.n for w in ws) for ws in plan])

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.step_tokens is None:
            del d["step_tokens"]
        d["padding_efficiency"] = self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        d["prefix_hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return d


def generate(executor: Executor, prompts: Sequence[Sequence[int]], max_new_tokens, *,
             padding_mode: str = "auto", sampling: SamplingParams | None = None,
             eos_token_id: int | None = None, arrivals: Sequence[int] | None = None,
             record_steps: bool = False, top_logprobs: int = 0, kv: str = "on_demand",
             pipeline: bool = True, prefix_cache: bool = True) -> tuple[list[list[int]], dict]:
    """Serve `prompts` on `executor`: outputs (list of new-token lists, in prompt order), stats.

    Stats: steps, buckets {name: count}, modes {max_len, sum_len}, real_tokens, padded_tokens
    (dp * bucket.tokens per step), padding_efficiency, exchange_rows, prefill_chunks, max_queue,
    generated_tokens, prompt_tokens, prefill_tokens (prompt tokens computed), cached_tokens (taken
    from the prefix cache), prefix_hit_rate, evictions (and step_tokens with record_steps; logprobs
    and top_logprobs, per request and token, with top_logprobs=N > 0). `prefix_cache=False` computes
    every prompt from its first token.
    """
    sched = Scheduler(executor, padding_mode=padding_mode, sampling=sampling, eos_token_id=eos_token_id,
                      top_logprobs=top_logprobs, kv=kv, pipeline=pipeline, prefix_cache=prefix_cache)
    return sched.generate(prompts, max_new_tokens, arrivals=arrivals, record_steps=record_steps)
