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


# ------------------------------------------------------------------------------- the wire

# What an executable takes from the host: every per-group int32 input flattened into one [D, K]
# array and the float32 ones into one [D, F], beside `num_tokens` and the device-resident
# `prev_tokens`. Each array is one transfer per device, so a step moves 3 arrays, not 11: on 8
# devices that is 24 buffers instead of 88 (the batch's meaning is unchanged; see dp_attention/model.py).
WIRE_INTS = ("tokens", "positions", "seq_index", "feed", "page_table", "last_index", "top_k", "seed")
WIRE_FLOATS = ("temperature", "top_p")
WIRE_APART = ("num_tokens", "prev_tokens")  # passed as they are
# Each wire array is split over DP groups as the inputs it packs are: its sharding is theirs.
WIRE_SHARDED_AS = {"ints": "tokens", "floats": "temperature", "num_tokens": "num_tokens", "prev_tokens": "prev_tokens"}


def wire_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int, int, tuple[int, ...]]]:
    """For each packed input: (wire array, first column, end column, its shape without D), from
    the batch's shapes ([D, ...] per input)."""
    layout = {}
    for wire, names in (("ints", WIRE_INTS), ("floats", WIRE_FLOATS)):
        col = 0
        for name in names:
            per_group = tuple(shapes[name][1:])
            width = int(np.prod(per_group, dtype=np.int64))
            layout[name] = (wire, col, col + width, per_group)
            col += width
    return layout


def wire_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The wire arrays' (shape, dtype), from the batch's shapes."""
    dp = shapes["tokens"][0]
    widths = {"ints": 0, "floats": 0}
    for wire, _, end, _ in wire_layout(shapes).values():
        widths[wire] = max(widths[wire], end)
    return {"ints": ((dp, widths["ints"]), "int32"), "floats": ((dp, widths["floats"]), "float32"),
            "num_tokens": (tuple(shapes["num_tokens"]), "int32"),
            "prev_tokens": (tuple(shapes["prev_tokens"]), "int32")}


# What the host reads back from a shipped step: its four sampled outputs in one replicated int32
# [D, S, 2 + 2N] array, the float32 ones bit for bit (one device-to-host read per step, not four).
SAMPLED = (("tokens", np.int32), ("logprobs", np.float32), ("top_ids", np.int32), ("top_logprobs", np.float32))


def from_sampled(sampled: np.ndarray) -> dict[str, np.ndarray]:
    """The step's {"tokens", "logprobs" [D, S]; "top_ids", "top_logprobs" [D, S, N]} from its
    packed `sampled` output (see dp_attention.model.to_sampled)."""
    n = (sampled.shape[-1] - 2) // 2
    columns = {"tokens": slice(0, 1), "logprobs": slice(1, 2), "top_ids": slice(2, 2 + n), "top_logprobs": slice(2 + n, None)}
    out = {}
    for name, dtype in SAMPLED:
        part = np.ascontiguousarray(sampled[..., columns[name]]).view(dtype)
        out[name] = part[..., 0] if columns[name].stop == columns[name].start + 1 else part
    return out


def advance_ints(ints, num_tokens, layout: dict, xp=np):
    """`ints` one decode step on: every real token one position further, nothing else changed.

    That is the next step's ints whenever the same sequences decode again in the same rows (their
    new tokens come from the carry, `feed`), so the step returns this (`next_ints`), computed on the
    device, and the engine passes it back instead of sending the host's copy when the two are
    equal: a steady decode step then moves nothing from the host. `xp` is numpy on the host and
    jax.numpy inside the step, the same arithmetic on both sides.
    """
    _, start, end, (T,) = layout["positions"]
    real = (xp.arange(T)[None, :] < num_tokens[:, None]).astype(ints.dtype)
    return xp.concatenate([ints[:, :start], ints[:, start:end] + real, ints[:, end:]], axis=1)


def to_wire(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed step's host arrays as the executable takes them (without `prev_tokens`, which
    the engine passes from the device). A batch without `feed` takes no token from the device."""
    dp = batch["tokens"].shape[0]
    if "feed" not in batch:
        batch = batch | {"feed": np.full(np.shape(batch["tokens"]), -1, np.int32)}
    return {"ints": np.concatenate([np.asarray(batch[k], np.int32).reshape(dp, -1) for k in WIRE_INTS], axis=1),
            "floats": np.concatenate([np.asarray(batch[k], np.float32).reshape(dp, -1) for k in WIRE_FLOATS], axis=1),
            "num_tokens": np.asarray(batch["num_tokens"], np.int32)}
