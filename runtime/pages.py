"""KV pages per DP group: who holds which, what is free, and the prefix cache (stdlib only).

Page 0 of every group is reserved (padding rows point at it), so a group of `num_pages` pages has
`num_pages - 1` to hand out. Pages are handed out lowest first and a freed page is reused first
(LIFO), which keeps a busy server's page tables small and stable. `version` moves whenever any
request's pages change: a step can only be repeated on the device while its page tables stay
what they were.

The prefix cache (per group, page-granular) lets requests that start with the same tokens share
the K/V pages of that start instead of computing it again:

- A full page is keyed by (its parent page, its tokens), the parent being the cached page of the
  same sequence before it (0 for the first): a radix tree over pages, where a key names a page's
  tokens and, through its parent, every token before them. Keys compare exactly (no hashes that
  could collide), and every process of a multi-process server builds the same tree.
- A request registers its pages as soon as their tokens are known and certain to be written
  (every known token but the last is fed), so a request arriving while a shared prompt is still
  being prefilled shares it too: it holds the pages at once and is `blocked` until their writer's
  step has been launched (steps run in order on the device, so a later step reads what was
  written). Without this, a burst of requests with one system prompt would each compute it.
- Pages are shared by reference: `holders[page]` lists the requests holding it. A page nobody
  holds stays cached, `idle`, until a request needs a page and none is free; then the least
  recently used idle page is evicted, but not before one a queued request would take. A holder of
  a page also holds its parent, and pages are released last first, so the least recently used
  idle page is always a leaf of the tree.
- Releasing (a finish, a preemption, a cancel) drops references, never a page another request
  holds. A page released before its writer wrote it is handed to one of its other holders, which
  computes it (and the pages after it) itself; a page nobody else holds is dropped from the cache.
- A request never matches the page holding its last known token: that token is always computed,
  so its logits (and the next token) come from this request's own step.
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class Hit:
    """What a group's cache holds of a request's tokens: `pages` leading pages, `idle` of which
    no request holds now (taking them uses up that many available pages)."""

    pages: tuple[int, ...] = ()
    idle: int = 0


class PageAllocator:
    def __init__(self, dp: int, num_pages: int, page_size: int, prefix_cache: bool = True):
        self.page_size = page_size
        self.caching = prefix_cache
        self.free = [list(range(num_pages - 1, 0, -1)) for _ in range(dp)]
        self.held = [0] * dp  # distinct pages held by requests, per group
        self.version = 0
        self.holders: list[dict[int, list]] = [{} for _ in range(dp)]  # page -> requests holding it
        self.index: list[dict[tuple, int]] = [{} for _ in range(dp)]  # (parent page, tokens) -> page
        self.key: list[dict[int, tuple]] = [{} for _ in range(dp)]  # cached page -> its key
        self.ready: list[set[int]] = [set() for _ in range(dp)]  # cached pages whose writing step was launched
        self.idle: list[collections.OrderedDict] = [collections.OrderedDict() for _ in range(dp)]  # LRU first
        self.evictions = 0
        self.hit_tokens = 0  # tokens requests took from the cache at admission
        self._waiting: list = []  # the first queued requests, as of the last `want`
        self._wanted: list[set[int]] | None = None  # per group, idle pages they would take (computed on need)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def available(self, group: int) -> int:
        """Pages a request could be given now: free ones and cached ones nobody holds."""
        return len(self.free[group]) + len(self.idle[group])

    @property
    def used(self) -> int:
        return sum(self.held)

    @property
    def cached(self) -> int:
        """Pages in the prefix cache, held or idle, over all groups."""
        return sum(map(len, self.key))

    # ---- admission ---------------------------------------------------------------------------

    def lookup(self, group: int, r) -> Hit:
        """The longest run of r's leading pages that group's cache holds (never the page of r's
        last known token)."""
        if not self.caching:
            return Hit()
        ps, known = self.page_size, len(r.prompt) + len(r.generated)
        index, pages, parent = self.index[group], [], 0
        for i in range((known - 1) // ps):
            page = index.get((parent, _page_tokens(r, i, ps)))
            if page is None:
                break
            pages.append(page)
            parent = page
        return Hit(tuple(pages), sum(p in self.idle[group] for p in pages))

    def admit(self, r, group: int, hit: Hit, total: int) -> None:
        """r joins `group`: it takes the hit's pages (its K/V up to there are not computed again),
        then free pages until it holds `total`, and registers what it will write. The caller
        checked that enough are available."""
        g, ps = group, self.page_size
        r.group = g
        for page in hit.pages:
            self.idle[g].pop(page, None)
            self._hold(g, page, r)
        r.pages = list(hit.pages)
        r.written = r.matched = r.registered = len(hit.pages)
        r.written *= ps
        r.cached_tokens = min(r.written, len(r.prompt))
        self.hit_tokens += r.written
        self.grow(r, total)
        self.register(r)

    def blocked(self, r) -> bool:
        """True while a page r took from the cache has not been written yet (its writer's step
        is not launched): r cannot run before it is."""
        if not r.matched:
            return False
        ready, key = self.ready[r.group], self.key[r.group]
        upto = min(r.matched, r.written // self.page_size)
        if all(p in ready or p not in key for p in r.pages[:upto]):
            r.matched = 0  # all written: nothing to check again
            return False
        return True

    # ---- growth, writing, registration ---------------------------------------------------------

    def grow(self, r, total: int) -> None:
        """Give request r (in group r.group) pages until it holds `total`, evicting the least
        recently used idle cached pages when none is free; the caller checked that enough are
        available."""
        g = r.group
        self.version += 1
        while len(r.pages) < total:
            if self.free[g]:
                page = self.free[g].pop()
            else:
                page = self._victim(g)
                del self.idle[g][page]
                self._forget(g, page)
                self.evictions += 1
            self._hold(g, page, r)
            r.pages.append(page)

    def wrote(self, r, start: int, end: int) -> None:
        """r's positions [start, end) are being written by a launched step: the cached pages that
        completes are ready for others to read."""
        if not self.caching:
            return
        ps, key, ready = self.page_size, self.key[r.group], self.ready[r.group]
        for i in range(start // ps, end // ps):
            if r.pages[i] in key:
                ready.add(r.pages[i])

    def register(self, r) -> None:
        """Cache r's pages whose tokens are all known and certain to be written (all known tokens
        but the last), in order. A page whose key another page has (computed twice, e.g. by two
        requests in different steps) ends r's registration: a cached page's parent must be one
        its holders hold."""
        if not self.caching or r.registered < 0 or r.group < 0:  # not in a group: preempted
            return
        ps = self.page_size
        known = len(r.prompt) + len(r.generated)
        last = min((known - 1) // ps, len(r.pages))
        if last <= r.registered:
            return
        g = r.group
        for i in range(r.registered, last):
            page, parent = r.pages[i], r.pages[i - 1] if i else 0
            k = (parent, _page_tokens(r, i, ps))
            if k in self.index[g]:
                r.registered = -1
                return
            self.index[g][k], self.key[g][page] = page, k
            if (i + 1) * ps <= r.written:
                self.ready[g].add(page)
            r.registered = i + 1

    # ---- release -----------------------------------------------------------------------------

    def release(self, r) -> None:
        """Drop r's references, last page first. A page nobody holds any more stays cached (idle)
        if it was written, else is freed; a page others still hold that nobody will write now is
        handed to its earliest admitted holder, which computes it from its start."""
        g, ps = r.group, self.page_size
        self.version += 1
        for i in range(len(r.pages) - 1, -1, -1):
            page = r.pages[i]
            holders = self.holders[g][page]
            holders.remove(r)
            if holders:
                if page in self.key[g] and page not in self.ready[g] and \
                        not any(h.written < (i + 1) * ps for h in holders):
                    heir = min(holders, key=lambda h: h.admitted)  # blocked: all it has was a hit
                    self.hit_tokens -= heir.written - i * ps
                    heir.written = i * ps
                    heir.cached_tokens = min(heir.cached_tokens, heir.written)
                continue
            del self.holders[g][page]
            self.held[g] -= 1
            if page in self.ready[g]:
                self.idle[g][page] = None  # most recently used: after its children
            else:
                self._forget(g, page)
                self.free[g].append(page)
        r.pages = []
        r.matched = r.registered = 0

    # ---- internals ---------------------------------------------------------------------------

    def want(self, queue, first: int = 32) -> None:
        """Note the first queued requests: the idle pages they would take if admitted now are
        evicted last. A multi-turn conversation's next turn waits in the queue with its previous
        turns' pages idle: plain LRU would evict exactly those first, as they went idle earliest.
        Which pages they are is worked out only when a page must be evicted (rarely)."""
        if self.caching:
            self._waiting, self._wanted = queue[:first], None

    def _victim(self, g: int) -> int:
        """The least recently used idle page no queued request wants (else the least recently
        used). A wanted page's parent is wanted too, so this is a leaf of the tree either way."""
        if self._wanted is None:
            self._wanted = [{p for r in self._waiting for p in self.lookup(h, r).pages} for h in range(len(self.idle))]
        wanted = self._wanted[g]
        return next((p for p in self.idle[g] if p not in wanted), None) or next(iter(self.idle[g]))

    def _hold(self, g: int, page: int, r) -> None:
        holders = self.holders[g].setdefault(page, [])
        if not holders:
            self.held[g] += 1
        holders.append(r)

    def _forget(self, g: int, page: int) -> None:
        """Take a page out of the cache (evicted, or dropped before it was written)."""
        k = self.key[g].pop(page, None)
        if k is not None:
            del self.index[g][k]
        self.ready[g].discard(page)


def _page_tokens(r, i: int, ps: int) -> tuple[int, ...]:
    """The tokens of r's page i, from its prompt and what it generated (known to the host)."""
    a, b, n = i * ps, (i + 1) * ps, len(r.prompt)
    if b <= n:
        return r.prompt[a:b]
    return r.prompt[a:n] + tuple(r.generated[max(a - n, 0):b - n])
