"""DP attention: each data-parallel group attends over its own requests; MoE layers see all tokens.

Attention is local to a group (its own requests, its own KV cache, heads split over "tensor"). The
MoE layer's experts are spread over every device, so before it the groups' tokens are gathered across
"data", and after it each group takes its own rows back. Two ways to do that, per batch:

  MAX_LEN  every group pads to the token bucket T and `all_gather`s into a [D*T, H] buffer; group g
           owns rows [g*T, g*T + n_g). Back: reduce-scatter over "data".
  SUM_LEN  group g writes its n_g rows at offset sum_{h<g} n_h of a zeroed [S, H] buffer and a `psum`
           over "data" fills it. Back: psum, then each group slices its rows.

An all-reduce moves about twice its buffer, so MAX_LEN wins when `sum_len * 2 > max_len * dp`.
These functions run inside `shard_map` over the ("data", "tensor") mesh: arrays are per-device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from runtime.contract import PaddingMode as DpPaddingMode


@dataclasses.dataclass(frozen=True)
class DpAttentionMetadata:
    """What the gather and the way back need to know about one batch, on one device.

    `tokens_per_group` (T) and `global_len` are static: they are the executable's bucket. For
    MAX_LEN, global_len == dp * T. `num_tokens` is every group's real count (replicated), so any
    device can tell which global rows are real without another collective.
    """

    mode: DpPaddingMode
    dp: int
    tokens_per_group: int
    global_len: int
    num_tokens: jax.Array  # [dp] int32

    @property
    def group(self) -> jax.Array:
        return lax.axis_index("data")

    @property
    def my_count(self) -> jax.Array:
        return self.num_tokens[self.group]

    @property
    def my_offset(self) -> jax.Array:
        """Where this group's rows start in the global buffer."""
        if self.mode == DpPaddingMode.MAX_LEN:
            return self.group * self.tokens_per_group
        return jnp.cumsum(self.num_tokens)[self.group] - self.my_count

    def global_valid(self) -> jax.Array:
        """[global_len] bool: rows of the global buffer that hold a real token."""
        rows = jnp.arange(self.global_len)
        if self.mode == DpPaddingMode.MAX_LEN:
            return rows % self.tokens_per_group < self.num_tokens[rows // self.tokens_per_group]
        return rows < jnp.sum(self.num_tokens)


def gather_tokens(x: jax.Array, meta: DpAttentionMetadata) -> jax.Array:
    """[T, H] this group's tokens -> [global_len, H] every group's tokens."""
    if meta.mode == DpPaddingMode.MAX_LEN:
        return lax.all_gather(x, "data", axis=0, tiled=True)
    # Scatter with out-of-range rows dropped: padding rows (i >= n_g) must not land in another
    # group's place, and a clamped dynamic_update_slice near the end would shift real rows.
    i = jnp.arange(x.shape[0])
    rows = jnp.where(i < meta.my_count, meta.my_offset + i, meta.global_len)
    buf = jnp.zeros((meta.global_len, x.shape[1]), x.dtype).at[rows].set(x, mode="drop")
    return lax.psum(buf, "data")


def scatter_tokens(partial: jax.Array, meta: DpAttentionMetadata) -> jax.Array:
    """[global_len, H] this device's partial expert sums -> [T, H] this group's finished rows."""
    if meta.mode == DpPaddingMode.MAX_LEN:
        mine = lax.psum_scatter(partial, "data", scatter_dimension=0, tiled=True)
        return lax.psum(mine, "tensor")
    total = lax.psum(partial, ("data", "tensor"))
    rows = jnp.clip(meta.my_offset + jnp.arange(meta.tokens_per_group), 0, meta.global_len - 1)
    return total[rows]


class DpAttentionBackend:
    """Wraps a base attention backend: attention stays the base's, per group; adds the MoE exchange."""

    def __init__(self, base, meta: DpAttentionMetadata):
        self.base = base
        self.meta = meta

    def attend(self, *args, **kwargs):
        return self.base.attend(*args, **kwargs)

    def gather(self, x: jax.Array) -> jax.Array:
        return gather_tokens(x, self.meta)

    def scatter(self, partial: jax.Array) -> jax.Array:
        return scatter_tokens(partial, self.meta)

    def global_valid(self) -> jax.Array:
        return self.meta.global_valid()
