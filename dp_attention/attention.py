"""The `native` attention backend: pure-JAX attention over a paged KV cache, on one device's shard.

The cache of one layer on one device is [num_pages, page_size, kv_heads_local, head_dim]. A sequence
owns the pages listed in its page table row; position p lives at (page_table[p // page_size],
p % page_size). Page 0 is never handed out: padding tokens write there, so they can't touch a real
sequence. Keys are read back for positions <= the query's position only, so stale data left in a
page by an earlier sequence is never seen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TRASH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """Per-device view of one group's batch (T padded tokens, S padded sequences)."""

    positions: jax.Array  # [T] int32
    seq_index: jax.Array  # [T] int32, the token's sequence slot in this group
    valid: jax.Array  # [T] bool
    page_table: jax.Array  # [S, pages_per_seq] int32


class NativeAttentionBackend:
    def attend(self, q, k_new, v_new, k_cache, v_cache, batch: PagedBatch):
        """q [T, nq, hd], k_new/v_new [T, nkv, hd] -> (out [T, nq, hd], k_cache, v_cache)."""
        num_pages, page_size, nkv, hd = k_cache.shape
        slots = _slots(batch, page_size)
        k_cache = _write(k_cache, slots, k_new)
        v_cache = _write(v_cache, slots, v_new)

        pages = batch.page_table[batch.seq_index]  # [T, pages_per_seq]
        ctx = pages.shape[1] * page_size
        kv_slots = (pages[:, :, None] * page_size + jnp.arange(page_size)).reshape(-1, ctx)  # [T, C]
        keys = k_cache.reshape(num_pages * page_size, nkv, hd)[kv_slots]  # [T, C, nkv, hd]
        values = v_cache.reshape(num_pages * page_size, nkv, hd)[kv_slots]

        T, nq, _ = q.shape
        qg = q.reshape(T, nkv, nq // nkv, hd)  # q head j uses kv head j // (nq // nkv)
        scores = jnp.einsum("tkgd,tckd->tkgc", qg, keys, preferred_element_type=jnp.float32)
        scores = scores * (hd ** -0.5)
        visible = jnp.arange(ctx)[None, :] <= batch.positions[:, None]  # [T, C]
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("tkgc,tckd->tkgd", probs, values)
        return out.reshape(T, nq, hd), k_cache, v_cache


def _slots(batch: PagedBatch, page_size: int) -> jax.Array:
    pages_per_seq = batch.page_table.shape[1]
    page_no = jnp.clip(batch.positions // page_size, 0, pages_per_seq - 1)
    page = batch.page_table[batch.seq_index, page_no]
    real = page * page_size + batch.positions % page_size
    return jnp.where(batch.valid, real, TRASH_PAGE * page_size)


def _write(cache, slots, new):
    num_pages, page_size, nkv, hd = cache.shape
    flat = cache.reshape(num_pages * page_size, nkv, hd).at[slots].set(new.astype(cache.dtype))
    return flat.reshape(cache.shape)
