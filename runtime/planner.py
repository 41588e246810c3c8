"""What the next step runs: admission, routing to DP groups, page pressure, bucket choice, sizing.

The planner decides; it launches nothing and reads nothing back (that is the scheduler's
pipeline). It sees requests through the few fields the scheduler keeps on them (pages, written,
pending, decoding, complete, admitted, last_step) and moves them between the queue and the groups.

- KV on demand (the default): a request is admitted when a group has the pages its known tokens
  need now, and takes a page more whenever its next token starts one (decoders in its group that
  will soon want one take theirs at the same step, so page tables change together, about once
  every page_size steps, and steady decode steps send no input). When a group runs out, its
  newest request is preempted: its pages are freed and it goes back to the head of the queue, to
  be prefilled again (prompt and the tokens generated so far) when pages free up. `kv="reserve"`
  instead allocates prompt + max_new_tokens - 1 positions at admission and never preempts.
- Admission is FIFO: the head of the queue waits until some group can hold it, later requests
  wait behind it, so a large request can't be starved by small ones.
- A new request goes to the group where the tokens left to feed, its own uncached ones plus those
  pending there, are fewest (then the fewest pages held, then the lowest index): the cost that
  reuses a prefix cached in one group and keeps groups balanced in tokens per step.
"""

from __future__ import annotations

import dataclasses
import math

from runtime.buckets import SUM_LEN, Bucket, choose
from runtime.capabilities import capabilities_of
from runtime.pages import PageAllocator


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one step may hold: per group tokens and sequences, and tokens over all groups."""

    tokens: int
    seqs: int
    total: int


@dataclasses.dataclass(frozen=True)
class Work:
    request: object
    n: int  # tokens it feeds this step, from request.written on


class Planner:
    def __init__(self, executor, dp: int, mode: str, kv: str, pages: PageAllocator):
        self.ex, self.dp, self.mode, self.kv, self.pages = executor, dp, mode, kv, pages
        # Fixed for the planner's life (executor and mode don't change).
        self.allowed = [b for b in executor.buckets if mode == "auto" or b.mode == mode]
        self.limits = self._make_limits()
        self._admissions = 0

    def _make_limits(self) -> list[Limits]:
        """Step limits to try, in order: the largest bucket's per-group sizes first, then, should
        no bucket hold that step (forced mode, SUM_LEN row cap, ragged ladders), each allowed
        bucket's own limits, which hold it by construction."""
        first = Limits(max(b.tokens for b in self.allowed), max(b.seqs for b in self.allowed), math.inf)
        each = [Limits(b.tokens, b.seqs, b.global_len if b.mode == SUM_LEN else math.inf)
                for b in sorted(self.allowed, key=lambda b: (-b.tokens, -b.seqs, -b.global_len))]
        return list(dict.fromkeys([first] + each))

    # ---- admission and page pressure -------------------------------------------------------

    def admit(self, queue: list, active: list[list]) -> None:
        """Move requests from the head of the queue into groups while some group holds them.

        A group takes at most as many requests as the largest bucket has sequences: more would
        hold pages without being able to run, starving requests that could.
        """
        max_seqs = max(b.seqs for b in self.allowed)
        while queue and not queue[0].owed:  # a preempted request is re-prefilled once its token is read
            r = queue[0]
            options = [o for g in range(self.dp) if len(active[g]) < max_seqs
                       for o in [self._option(r, g, active[g])] if o is not None]
            if not options:
                return
            _, g, hit, total = min(options)
            r.admitted = self._admissions
            self._admissions += 1
            self.pages.admit(r, g, hit, total)
            active[g].append(queue.pop(0))

    def _option(self, r, g: int, group: list):
        """(cost, group, cache hit, pages to hold) for r in group g, or None if it does not fit.

        The routing cost: the tokens g would have to feed after taking r, i.e. r's tokens that
        g's prefix cache does not hold plus the work already pending there; then the pages g
        holds, then the group's index. Every term is the scheduler's own state, so every process
        of a multi-process server routes alike. Preferring the smallest total both reuses cached
        prefixes (a hit lowers r's share) and levels prefill across groups (a group that only
        decodes has little pending, so new prompts go there).
        """
        hit = self.pages.lookup(g, r)
        total = r.num_pages if self.kv == "reserve" else self.pages.pages_for(r.known)
        headroom = 0 if self.kv == "reserve" else self._headroom(group)
        if self.pages.available(g) < total - len(hit.pages) + hit.idle + headroom:
            return None
        uncached = r.known - len(hit.pages) * self.pages.page_size
        cost = uncached + sum(x.pending for x in group)
        return (cost, self.pages.held[g], g), g, hit, total

    def _headroom(self, group: list) -> int:
        """On demand: the pages a group's running requests will take within the next page_size
        tokens, left free at admission (admitting into a group that must preempt at once only
        wastes a prefill). A request that may sample at most page_size more tokens is not
        counted: within those steps it ends and frees every page it holds, more than the one it
        could still take. Counting one page for every running request instead held admissions
        back whenever the group's requests were out of step with each other (their ends free
        pages one request at a time): on the sleeping device, 256 streams of 32 tokens on the
        default pool took 120 steps arriving at once and 128-138 arriving over 10-100 ms; now
        117-121 for all of them, with as many preemptions."""
        ps, pages_for = self.pages.page_size, self.pages.pages_for
        return sum(max(0, pages_for(r.known + ps) - len(r.pages)) for r in group
                   if r.max_new - len(r.generated) - r.owed > ps)  # tokens it may still sample

    def make_room(self, queue: list, active: list[list]) -> int:
        """Before planning (KV on demand): every decoder gets the page its next token needs, and a
        group where no request can write another token makes room, by preempting its newest
        requests. A request alone in its group always fits (checked at submission). Returns how
        many were preempted."""
        ps, preempted = self.pages.page_size, 0
        for g in range(self.dp):
            while True:
                group = [r for r in active[g] if not r.complete]
                starved = [r for r in group if r.decoding and len(r.pages) * ps <= r.written]
                stuck = bool(group) and not self.pages.available(g) and all(
                    len(r.pages) * ps <= r.written for r in group)
                if len(starved) <= self.pages.available(g) and not stuck:
                    break
                self._preempt(max(group, key=lambda r: r.admitted), queue, active)  # group is non-empty
                preempted += 1
            for r in starved:
                self.pages.grow(r, len(r.pages) + 1)
            if starved:  # the page tables change this step anyway: top up every decoder that will
                # want a page within the next page_size tokens, from pages nobody else needs now,
                # so that the tables then stay unchanged for page_size steps and a steady decode
                # step sends nothing from the host (see Engine.dispatch).
                for r in sorted(group, key=lambda r: r.admitted):
                    if not self.pages.available(g):
                        break
                    if r.decoding and len(r.pages) * ps - r.written < ps and len(r.pages) < r.num_pages:
                        self.pages.grow(r, len(r.pages) + 1)
        return preempted

    def _preempt(self, r, queue: list, active: list[list]) -> None:
        """Free a running request's pages and queue it first, to be prefilled again from scratch."""
        active[r.group].remove(r)
        self.pages.release(r)
        r.group, r.written = -1, 0
        r.preemptions += 1
        queue.insert(0, r)

    # ---- one step ---------------------------------------------------------------------------

    def plan(self, active: list[list], lim: Limits, step: int) -> list[list[Work]]:
        """What each group serves this step, within `lim` and the pages it can have.

        Decoders go first (one token each, least recently served first, so all progress when a
        forced bucket holds fewer sequences); prefills then fill the remaining token budget in
        arrival order, each up to what its pages and the group's free pages can hold. The group
        order rotates by step so a shared SUM_LEN row cap is fair.
        """
        ps = self.pages.page_size
        plan: list[list[Work]] = [[] for _ in range(self.dp)]
        used = [0] * self.dp
        free = [self.pages.available(g) for g in range(self.dp)]
        budget = lim.total
        order = [(step + k) % self.dp for k in range(self.dp)]
        for g in order:
            for r in sorted((r for r in active[g] if r.decoding), key=lambda r: (r.last_step, r.index)):
                if len(plan[g]) >= lim.seqs or used[g] >= lim.tokens or budget < 1:
                    break
                plan[g].append(Work(r, 1))
                used[g] += 1
                budget -= 1
        for g in order:
            for r in sorted((r for r in active[g] if not r.decoding), key=lambda r: r.admitted):
                room = min(lim.tokens - used[g], budget, r.pending, len(r.pages) * ps - r.written + free[g] * ps)
                if len(plan[g]) >= lim.seqs or room < 1:
                    continue
                plan[g].append(Work(r, room))
                free[g] -= max(0, self.pages.pages_for(r.written + room) - len(r.pages))
                used[g] += room
                budget -= room
        return plan

    def build(self, active: list[list], step: int) -> tuple[Bucket, list[list[Work]]]:
        """The step's work and the bucket that serves it; then the pages its chunks write into.

        The largest bucket's limits are tried first, then each bucket's own (one of them holds any
        step). When the executor reports each executable's measured step time and the step has
        prefill work to size, every bucket's limits are tried and the plan with the least time
        per real token wins: bucket first, then filled, so a prefill tail of 40 tokens runs in a
        32-token bucket with 8 left for the next step rather than padded to 64.
        """
        caps = capabilities_of(self.ex)
        seconds = caps.step_seconds
        best, best_score = None, math.inf
        for lim in self.limits:
            plan = self.plan(active, lim, step)
            real = sum(w.n for ws in plan for w in ws)
            if real == 0:
                continue
            bucket = choose([sum(w.n for w in ws) for ws in plan], [len(ws) for ws in plan], self.ex.buckets,
                            self.dp, self.mode, caps.bucket_cost)
            if bucket is None:
                continue
            prefill = any(not w.request.decoding for ws in plan for w in ws)
            if best is not None and not prefill:
                # Limits that leave every prefill out: its time per token looks best while decoders
                # fill the step, so it would win step after step and prefill would never run.
                break
            score = seconds[bucket] / real if seconds and bucket in seconds else math.inf
            if best is None or score < best_score:
                best, best_score = (bucket, plan), score
            if not seconds or not prefill:
                break  # nothing to weigh, or only decoders: a smaller bucket can only hold fewer
        if best is None:  # unreachable: the scheduler checked one token fits, and each bucket's limits fit it
            raise RuntimeError("no bucket can serve any pending work")
        bucket, plan = best
        for w in (w for ws in plan for w in ws):
            self.pages.grow(w.request, self.pages.pages_for(w.request.written + w.n))
        return bucket, plan
