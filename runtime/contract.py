"""The contract between the model's step and the runtime: what both sides must agree on, and
nothing else, so that the model (dp_attention) imports no runtime code but this module (and
runtime.cpu_kernel, the CPU kernels' names and loader), and the runtime no model code at all.

- `Bucket` (and its `PaddingMode`): every static shape of one executable.
- The wire: how a step's host inputs are packed into the few arrays an executable takes
  (`wire_layout`, `wire_shapes`, `to_wire`), and `advance_ints`, the one decode step on of those
  ints that the step computes on the device and the host checks against.
- The sampled outputs' packing (`SAMPLED`, `from_sampled`).

numpy and the standard library only. `runtime.buckets` and `runtime.batching` re-export all of it
under the names they always had.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

import numpy as np


class PaddingMode(enum.StrEnum):
    """How groups' tokens meet in the MoE exchange (see dp_attention/dp_attention.py).

    A str enum so that the spelling in flags, JSON and stats ("max_len") is the member itself:
    equal, hashing alike and formatting alike, with no conversion at any boundary. The model's
    step imports it from here (as DpPaddingMode), so the runtime needs no model code.
    """

    MAX_LEN = "max_len"
    SUM_LEN = "sum_len"


MAX_LEN, SUM_LEN = PaddingMode.MAX_LEN, PaddingMode.SUM_LEN
MODES = tuple(m.value for m in PaddingMode)  # plain strings: what flags and error messages spell


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """Every static shape of one executable: the key the builder plans, the manifest stores, the
    runtime chooses among, and the model's step is traced for."""

    mode: PaddingMode
    tokens: int  # per group (T)
    seqs: int  # per group (S)
    global_len: int  # rows of the MoE exchange buffer: D*T for MAX_LEN, the summed bucket for SUM_LEN

    def __post_init__(self):
        # "max_len" and MAX_LEN already compare equal; one canonical type keeps `is` and repr honest.
        object.__setattr__(self, "mode", PaddingMode(self.mode))

    @property
    def name(self) -> str:
        return f"{self.mode}-t{self.tokens}-s{self.seqs}-g{self.global_len}"

    def fits(self, token_counts: Sequence[int], seq_counts: Sequence[int]) -> bool:
        if max(token_counts) > self.tokens or max(seq_counts) > self.seqs:
            return False
        return self.mode == MAX_LEN or sum(token_counts) <= self.global_len

    def exchange_rows(self, dp: int) -> int:
        """Rows moved by the MoE exchange, all-reduce counted twice: the padding rule's cost."""
        return self.tokens * dp if self.mode == MAX_LEN else 2 * self.global_len


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
