"""Pack one step's work into the padded arrays an executable takes (numpy only).

A step is, per DP group, a list of chunks: some new tokens of one sequence starting at a position,
with the pages that sequence owns. Prefill is a long chunk at position 0, decode a one-token chunk,
chunked prefill a chunk in the middle. Padding tokens are marked by `num_tokens`; padding
sequences point at page 0, which is never allocated.

A chunk may end with a token the host has not read yet: the one the previous step sampled for that
sequence (`prev_row`, its row in the previous step's outputs). Its place in `tokens` is left 0 and
`feed` tells the executable to take it from the previous step's carry, which never leaves the
device. `prev_tokens` here is a placeholder of the carry's shape; the engine passes its carry.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The wire and the sampled outputs are defined in the contract module the model imports too; the
# old names stay importable from here.
from runtime.contract import (SAMPLED, WIRE_APART, WIRE_FLOATS, WIRE_INTS, WIRE_SHARDED_AS,  # noqa: F401
                              advance_ints, from_sampled, to_wire, wire_layout, wire_shapes)

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed")


@dataclasses.dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...]
    start: int  # position of tokens[0] in its sequence
    pages: tuple[int, ...]  # the sequence's pages, in order
    temperature: float = 0.0  # sampling of the token after the chunk (0: argmax)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    prev_row: int = -1  # >= 0: the last token is the previous step's sample in this row (not in `tokens`)


def pack(groups: list[list[Chunk]], tokens: int, seqs: int, pages_per_seq: int,
         carry_seqs: int | None = None) -> dict[str, np.ndarray]:
    """Arrays for one step. Logits row [g, j] belongs to groups[g][j]. carry_seqs: the carry's
    width (default: seqs)."""
    dp = len(groups)
    out = {
        "tokens": np.zeros((dp, tokens), np.int32),
        "positions": np.zeros((dp, tokens), np.int32),
        "seq_index": np.zeros((dp, tokens), np.int32),
        "num_tokens": np.zeros((dp,), np.int32),
        "page_table": np.zeros((dp, seqs, pages_per_seq), np.int32),
        "last_index": np.zeros((dp, seqs), np.int32),
        "temperature": np.zeros((dp, seqs), np.float32),
        "top_k": np.zeros((dp, seqs), np.int32),
        "top_p": np.ones((dp, seqs), np.float32),
        "seed": np.zeros((dp, seqs), np.int32),
        "feed": np.full((dp, tokens), -1, np.int32),
        "prev_tokens": np.zeros((dp, carry_seqs or seqs), np.int32),
    }
    for g, chunks in enumerate(groups):
        if len(chunks) > seqs:
            raise ValueError(f"group {g} has {len(chunks)} sequences, bucket holds {seqs}")
        n = 0
        for j, c in enumerate(chunks):
            k = len(c.tokens)
            if n + k > tokens:
                raise ValueError(f"group {g} has more than {tokens} tokens, the bucket's limit")
            if len(c.pages) > pages_per_seq:
                raise ValueError(f"a sequence holds {len(c.pages)} pages, at most {pages_per_seq} fit")
            out["tokens"][g, n:n + k] = c.tokens
            out["positions"][g, n:n + k] = np.arange(c.start, c.start + k)
            out["seq_index"][g, n:n + k] = j
            out["page_table"][g, j, :len(c.pages)] = c.pages
            out["last_index"][g, j] = n + k - 1
            for name in SAMPLING_FIELDS:
                out[name][g, j] = getattr(c, name)
            if c.prev_row >= 0:
                out["feed"][g, n + k - 1] = c.prev_row
            n += k
        out["num_tokens"][g] = n
    return out
