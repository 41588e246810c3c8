"""KV pages per DP group: who holds which, and what is free (numpy-free, stdlib only).

Page 0 of every group is reserved (padding rows point at it), so a group of `num_pages` pages has
`num_pages - 1` to hand out. Pages are handed out lowest first and a freed page is reused first
(LIFO), which keeps a busy server's page tables small and stable. `version` moves whenever any
request's pages change: a step can only be repeated on the device while its page tables stay
what they were.
"""

from __future__ import annotations


class PageAllocator:
    def __init__(self, dp: int, num_pages: int, page_size: int):
        self.page_size = page_size
        self.free = [list(range(num_pages - 1, 0, -1)) for _ in range(dp)]
        self.held = [0] * dp  # pages held by requests, per group
        self.version = 0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def available(self, group: int) -> int:
        return len(self.free[group])

    def grow(self, r, total: int) -> None:
        """Give request r (in group r.group) pages until it holds `total`; the caller checked
        that enough are free."""
        self.version += 1
        while len(r.pages) < total:
            r.pages.append(self.free[r.group].pop())
            self.held[r.group] += 1

    def release(self, r) -> None:
        """Every page r holds goes back to its group."""
        self.version += 1
        self.free[r.group].extend(reversed(r.pages))
        self.held[r.group] -= len(r.pages)
        r.pages = []

    @property
    def used(self) -> int:
        return sum(self.held)
