"""Continuous batching over DP groups (numpy + stdlib; drives an abstract executor).

Each step: admit waiting requests into groups that have free KV pages, give every group a list of
chunks (decode sequences feed their last token, prefilling ones the next piece of their prompt),
map the step to a ready executable with `buckets.choose`, pack, run, unpad, sample. The executor
is anything with the `Executor` shape below, so this runs and is tested without an artifact.

Policies:
- KV on demand (the default): a request is admitted when a group has the pages its known tokens
  need now, and takes a page more whenever its next token starts one (decoders in its group that
  will soon want one take theirs at the same step, so page tables change together, about once
  every page_size steps, and steady decode steps send no input). When a group runs out, its
  newest request is preempted: its pages are freed and it goes back to the head of the queue, to
  be prefilled again (prompt and the tokens generated so far) when pages free up. Its output does
  not change: the same tokens are fed at the same positions, and sampling is keyed by (seed,
  position). `kv="reserve"` instead allocates prompt + max_new_tokens - 1 positions at admission
  and never preempts.
- Admission is FIFO: the head of the queue waits until some group can hold it, later requests
  wait behind it, so a large request can't be starved by small ones.
- A new request goes to the group with the least work pending (tokens still to feed), then the
  fewest pages held, so groups stay balanced in tokens per step, not only in pages.

Pipelining: with an executor that can `dispatch` a step and `fetch` its outputs later (the engine:
JAX dispatch is asynchronous), each `step()` plans and launches step n+1 before it reads step n's
sampled tokens, so the host's planning, packing and transfers overlap the device's work. A sequence
whose newest token is still on the device feeds it from there (`Chunk.prev_row`). Positions, pages
and lengths are all known on the host; only an EOS is learnt a step late, and the one token computed
past it is dropped, so outputs are the same as unpipelined. When nothing changed since the last
step and it fed every runnable request from its own row, the next step is that one again, one
position on: an executor with `dispatch_again` runs it from the inputs already on the device, and
the host neither plans nor packs it (`_launch_again`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

import numpy as np

from runtime.batching import Chunk, pack
from runtime.buckets import MAX_LEN, MODES, SUM_LEN, Bucket, choose
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

    # Optional: num_logprobs (top-N an executable returns), bucket_cost ({Bucket: bytes its
    # collectives move per step}, what `choose` weighs when present), step_seconds ({Bucket:
    # measured seconds of one step}: prefill steps are sized to the least time per real token).

    def run(self, bucket: Bucket, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"tokens": [dp, seqs] sampled ids, "logprobs": [dp, seqs], ...} for one step."""

    # Optional, together: dispatch(bucket, batch) launches a step and returns a handle at once;
    # fetch(handle) waits for its outputs (as run returns them). Then steps are pipelined, and a
    # batch's `feed` entries (>= 0) name rows of the previous dispatched step's sampled tokens.
    # Optional beside them: dispatch_again(bucket) launches the last dispatched batch again with
    # every real token one position on (None if it cannot), so a steady decode step is neither
    # planned nor packed on the host.


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


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one step may hold: per group tokens and sequences, and tokens over all groups."""

    tokens: int
    seqs: int
    total: int


class Scheduler:
    """Serves lists of prompts on one executor. Holds the per-group page allocators."""

    def __init__(self, executor: Executor, *, padding_mode: str = "auto",
                 sampling: SamplingParams | None = None, eos_token_id=None, top_logprobs: int = 0,
                 kv: str = "on_demand", pipeline: bool = True):
        if kv not in KV_POLICIES:
            raise RequestError(f"kv {kv!r} is not one of {KV_POLICIES}")
        self.kv = kv
        self._admissions = 0
        self.ex = executor
        self.dp = int(executor.dp)
        self.mode = padding_mode
        self.sampling = sampling or SamplingParams()
        self._allowed: list[Bucket] | None = None
        self._limit_list: list[_Limits] | None = None
        # One EOS id, several (a checkpoint's generation_config lists them), or None.
        self.eos_ids = frozenset() if eos_token_id is None else frozenset(
            [int(eos_token_id)] if np.isscalar(eos_token_id) else [int(e) for e in eos_token_id])
        self.top_logprobs = top_logprobs
        self._check_executor()
        # Pages are handed out lowest first; freed pages are reused first (LIFO), never page 0.
        self.free_pages = [list(range(executor.num_pages - 1, 0, -1)) for _ in range(self.dp)]
        self.committed = [0] * self.dp
        self.queue: list[_Request] = []
        self.active: list[list[_Request]] = [[] for _ in range(self.dp)]
        self.stats = _Stats()
        self._submitted = 0
        # pipeline=False reads every step before planning the next (a baseline, or for debugging).
        self._pipelined = pipeline and callable(getattr(executor, "dispatch", None)) \
            and callable(getattr(executor, "fetch", None))
        self._in_flight: _Launch | None = None  # launched, outputs not read yet
        # Steps launched, and how many of them had their outputs read: a multi-process leader
        # learns from the second which steps every process has launched.
        self.launched = self.collected = 0
        # Bumped whenever a request joins or leaves a group or its pages change; a step can only
        # be repeated on the device (_launch_again) while it stays what it was at that step.
        self._changes = 0
        self._repeatable: tuple | None = None  # (bucket, plan, _changes) of the last step, if steady

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
        available = int(getattr(self.ex, "num_logprobs", 0))
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

    # ---- limits -----------------------------------------------------------------------------

    def _allowed_buckets(self) -> list[Bucket]:
        """Fixed for the scheduler's life (executor and mode don't change): computed once."""
        if self._allowed is None:
            self._allowed = [b for b in self.ex.buckets if self.mode == "auto" or b.mode == self.mode]
        return self._allowed

    def _limits(self) -> list[_Limits]:
        if self._limit_list is None:  # fixed for the scheduler's life, like the allowed buckets
            self._limit_list = self._make_limits()
        return self._limit_list

    def _make_limits(self) -> list[_Limits]:
        """Step limits to try, in order: the largest bucket's per-group sizes first, then, should
        no bucket hold that step (forced mode, SUM_LEN row cap, ragged ladders), each allowed
        bucket's own limits, which hold it by construction."""
        allowed = self._allowed_buckets()
        first = _Limits(max(b.tokens for b in allowed), max(b.seqs for b in allowed), math.inf)
        each = [_Limits(b.tokens, b.seqs, b.global_len if b.mode == SUM_LEN else math.inf)
                for b in sorted(allowed, key=lambda b: (-b.tokens, -b.seqs, -b.global_len))]
        return list(dict.fromkeys([first] + each))

    # ---- admission and pages ----------------------------------------------------------------

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.ex.page_size)

    def _admit(self, queue: list[_Request], active: list[list[_Request]]) -> None:
        """Move requests from the head of the queue into groups while some group holds them.

        A group takes at most as many requests as the largest bucket has sequences: more would
        hold pages without being able to run, starving requests that could.
        """
        max_seqs = max(b.seqs for b in self._allowed_buckets())
        while queue and not queue[0].owed:  # a preempted request is re-prefilled once its token is read
            r = queue[0]
            need = r.num_pages if self.kv == "reserve" else self._pages_for(r.known)
            # On demand, leave a page of headroom per running request: each will want one soon, and
            # admitting into a group that must preempt at once only wastes a prefill.
            headroom = (lambda g: 0) if self.kv == "reserve" else (lambda g: len(active[g]))
            fits = [g for g in range(self.dp)
                    if len(self.free_pages[g]) >= need + headroom(g) and len(active[g]) < max_seqs]
            if not fits:
                return
            g = min(fits, key=lambda g: (sum(x.pending for x in active[g]), self.committed[g], g))
            r.group, r.admitted = g, self._admissions
            self._admissions += 1
            self._take_pages(r, need)
            active[g].append(queue.pop(0))

    def _take_pages(self, r: _Request, total: int) -> None:
        """Grow r's pages to `total` (the caller checked they are free)."""
        self._changes += 1
        while len(r.pages) < total:
            r.pages.append(self.free_pages[r.group].pop())
            self.committed[r.group] += 1

    def _release(self, r: _Request) -> None:
        self._changes += 1
        self.free_pages[r.group].extend(reversed(r.pages))
        self.committed[r.group] -= len(r.pages)
        r.pages = []

    def _preempt(self, r: _Request) -> None:
        """Free a running request's pages and queue it first, to be prefilled again from scratch."""
        self.active[r.group].remove(r)
        self._release(r)
        r.group, r.written = -1, 0
        r.preemptions += 1
        self.stats.preemptions += 1
        self.queue.insert(0, r)

    def _make_room(self) -> None:
        """Before planning (KV on demand): every decoder gets the page its next token needs, and a
        group where no request can write another token makes room, by preempting its newest
        requests. A request alone in its group always fits (checked at submission)."""
        ps = self.ex.page_size
        for g in range(self.dp):
            while True:
                group = [r for r in self.active[g] if not r.complete]
                starved = [r for r in group if r.decoding and len(r.pages) * ps <= r.written]
                stuck = bool(group) and not self.free_pages[g] and all(len(r.pages) * ps <= r.written for r in group)
                if len(starved) <= len(self.free_pages[g]) and not stuck:
                    break
                self._preempt(max(group, key=lambda r: r.admitted))  # group is non-empty: starved or stuck
            for r in starved:
                self._take_pages(r, len(r.pages) + 1)
            if starved:  # the page tables change this step anyway: top up every decoder that will
                # want a page within the next page_size tokens, from pages nobody else needs now,
                # so that the tables then stay unchanged for page_size steps and a steady decode
                # step sends nothing from the host (see Engine.dispatch).
                for r in sorted(group, key=lambda r: r.admitted):
                    if not self.free_pages[g]:
                        break
                    if r.decoding and len(r.pages) * ps - r.written < ps and len(r.pages) < r.num_pages:
                        self._take_pages(r, len(r.pages) + 1)

    # ---- one step ---------------------------------------------------------------------------

    def _plan(self, active: list[list[_Request]], lim: _Limits, step: int) -> list[list[_Work]]:
        """What each group serves this step, within `lim` and the pages it can have.

        Decoders go first (one token each, least recently served first, so all progress when a
        forced bucket holds fewer sequences); prefills then fill the remaining token budget in
        arrival order, each up to what its pages and the group's free pages can hold. The group
        order rotates by step so a shared SUM_LEN row cap is fair.
        """
        ps = self.ex.page_size
        plan: list[list[_Work]] = [[] for _ in range(self.dp)]
        used = [0] * self.dp
        free = [len(f) for f in self.free_pages]
        budget = lim.total
        order = [(step + k) % self.dp for k in range(self.dp)]
        for g in order:
            for r in sorted((r for r in active[g] if r.decoding), key=lambda r: (r.last_step, r.index)):
                if len(plan[g]) >= lim.seqs or used[g] >= lim.tokens or budget < 1:
                    break
                plan[g].append(_Work(r, 1))
                used[g] += 1
                budget -= 1
        for g in order:
            for r in sorted((r for r in active[g] if not r.decoding), key=lambda r: r.admitted):
                room = min(lim.tokens - used[g], budget, r.pending, len(r.pages) * ps - r.written + free[g] * ps)
                if len(plan[g]) >= lim.seqs or room < 1:
                    continue
                plan[g].append(_Work(r, room))
                free[g] -= max(0, self._pages_for(r.written + room) - len(r.pages))
                used[g] += room
                budget -= room
        return plan

    def _build(self, active: list[list[_Request]], step: int) -> tuple[Bucket, list[list[_Work]]]:
        """The step's work and the bucket that serves it; then the pages its chunks write into.

        The largest bucket's limits are tried first, then each bucket's own (one of them holds any
        step). When the executor reports each executable's measured step time and the step has
        prefill work to size, every bucket's limits are tried and the plan with the least time
        per real token wins: bucket first, then filled, so a prefill tail of 40 tokens runs in a
        32-token bucket with 8 left for the next step rather than padded to 64.
        """
        seconds = getattr(self.ex, "step_seconds", None)
        best, best_score = None, math.inf
        for lim in self._limits():
            plan = self._plan(active, lim, step)
            real = sum(w.n for ws in plan for w in ws)
            if real == 0:
                continue
            bucket = choose([sum(w.n for w in ws) for ws in plan], [len(ws) for ws in plan], self.ex.buckets,
                            self.dp, self.mode, getattr(self.ex, "bucket_cost", None))
            if bucket is None:
                continue
            score = seconds[bucket] / real if seconds and bucket in seconds else math.inf
            if best is None or score < best_score:
                best, best_score = (bucket, plan), score
            if not seconds or not any(not w.request.decoding for ws in plan for w in ws):
                break  # nothing to weigh, or only decoders: a smaller bucket can only hold fewer
        if best is None:  # unreachable: __init__ checked one token fits, and each bucket's limits fit it
            raise RuntimeError("no bucket can serve any pending work")
        bucket, plan = best
        for w in (w for ws in plan for w in ws):
            self._take_pages(w.request, self._pages_for(w.request.written + w.n))
        return bucket, plan

    def _launch(self) -> "_Launch | None":
        """Plan, pack and launch the next step (None when no request can run now). Every chunk is
        credited as written at once; a request whose chunk reaches its last known token owes the
        token this step samples."""
        if self.kv == "on_demand":
            self._make_room()
        runnable = [[r for r in group if not r.complete] for group in self.active]
        if not any(runnable):
            return None
        step = self.stats.steps
        outputs = self._launch_again(runnable)
        if outputs is not None:
            bucket, plan = self._repeatable[:2]
        else:
            bucket, plan = self._build(runnable, step)
            groups = [[w.request.chunk(w.n) for w in ws] for ws in plan]
            batch = pack(groups, bucket.tokens, bucket.seqs, self.ex.pages_per_seq)
            outputs = self.ex.dispatch(bucket, batch) if self._pipelined else self.ex.run(bucket, batch)
            # The next step may repeat this one on the device if every runnable request decodes
            # here, each fed from its own row of the step before (so from this step's, next time).
            steady = all(len(ws) == len(rs) for ws, rs in zip(plan, runnable)) and all(
                c.prev_row == j for cs in groups for j, c in enumerate(cs))
            self._repeatable = (bucket, plan, self._changes) if steady and self._pipelined else None
        self.stats.record(bucket, plan, self.dp)
        self.launched += 1
        sampled = []
        for g, ws in enumerate(plan):
            for j, w in enumerate(ws):
                r = w.request
                r.last_step = step
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
        again = getattr(self.ex, "dispatch_again", None)
        if self._repeatable is None or again is None:
            return None
        bucket, plan, changes = self._repeatable
        if changes != self._changes or any(len(ws) != len(rs) for ws, rs in zip(plan, runnable)) \
                or not all(w.request.decoding and not w.request.complete for ws in plan for w in ws):
            return None
        return again(bucket)

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
            served.append(r)
        return served

    def _retire(self, r: _Request) -> None:
        """Take a finished or cancelled request out of the queue or its group, freeing its pages."""
        self._changes += 1
        if r in self.queue:
            self.queue.remove(r)
        elif r.group >= 0 and r in self.active[r.group]:
            self.active[r.group].remove(r)
            self._release(r)

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
        return sum(self.committed)

    def step(self) -> list[_Request]:
        """Admit what fits, launch the next step, then read the one launched before it (with a
        synchronous executor: the one just launched). Returns the requests that got a token; []
        when no step's outputs were read."""
        self._admit(self.queue, self.active)
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
        result = self.stats.as_dict()
        if self.top_logprobs:  # asked for: each token's logprob and its top-N alternatives, per request
            result["logprobs"] = [r.logprobs for r in requests]
            result["top_logprobs"] = [r.top_logprobs for r in requests]
        return [list(r.generated) for r in requests], result


@dataclasses.dataclass(frozen=True)
class _Work:
    request: _Request
    n: int  # tokens it feeds this step, from request.written on


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
    max_queue: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    step_tokens: list | None = None

    def record(self, bucket: Bucket, plan: list[list[_Work]], dp: int) -> None:
        """Account one step; called before the step's requests advance."""
        self.steps += 1
        self.buckets[bucket.name] = self.buckets.get(bucket.name, 0) + 1
        self.modes[str(bucket.mode)] += 1
        self.real_tokens += sum(w.n for ws in plan for w in ws)
        self.padded_tokens += dp * bucket.tokens
        self.exchange_rows += bucket.exchange_rows(dp)
        self.prefill_chunks += sum(w.request.written < len(w.request.prompt) for ws in plan for w in ws)
        if self.step_tokens is not None:
            self.step_tokens.append([sum(w.n for w in ws) for ws in plan])

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.step_tokens is None:
            del d["step_tokens"]
        d["padding_efficiency"] = self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return d


def generate(executor: Executor, prompts: Sequence[Sequence[int]], max_new_tokens, *,
             padding_mode: str = "auto", sampling: SamplingParams | None = None,
             eos_token_id: int | None = None, arrivals: Sequence[int] | None = None,
             record_steps: bool = False, top_logprobs: int = 0, kv: str = "on_demand",
             pipeline: bool = True) -> tuple[list[list[int]], dict]:
    """Serve `prompts` on `executor`: outputs (list of new-token lists, in prompt order), stats.

    Stats: steps, buckets {name: count}, modes {max_len, sum_len}, real_tokens, padded_tokens
    (dp * bucket.tokens per step), padding_efficiency, exchange_rows, prefill_chunks, max_queue,
    generated_tokens (and step_tokens with record_steps; logprobs and top_logprobs, per request and
    token, with top_logprobs=N > 0).
    """
    sched = Scheduler(executor, padding_mode=padding_mode, sampling=sampling, eos_token_id=eos_token_id,
                      top_logprobs=top_logprobs, kv=kv, pipeline=pipeline)
    return sched.generate(prompts, max_new_tokens, arrivals=arrivals, record_steps=record_steps)
