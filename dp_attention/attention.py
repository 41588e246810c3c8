"""The `native` attention backend: pure-JAX attention over a paged KV cache, on one device's shard.

The cache of all layers on one device is one array [layers, num_pages, page_size, 2 * kv_heads,
head_dim], K and V interleaved on the head axis (K of head j at 2j, V at 2j+1: the layout the TPU
ragged paged attention kernel reads). It is the layer scan's carry, so each layer's new K/V are
scattered into it in place. A sequence owns the pages listed in its page table row; position p lives
at (page_table[p // page_size], p % page_size). Page 0 is never handed out: padding tokens write
there, so they can't touch a real sequence. Keys are read back for positions <= the query's
position only, so stale data left in a page by an earlier sequence is never seen.

Attention walks the context in blocks of pages with an online softmax, so its memory is one block
per token, not the whole maximum context, and blocks past the group's furthest position are skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

TRASH_PAGE = 0
BLOCK_TOKENS = 512  # context positions per attention block (rounded to whole pages)


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """Per-device view of one group's batch (T padded tokens, S padded sequences)."""

    positions: jax.Array  # [T] int32
    seq_index: jax.Array  # [T] int32, the token's sequence slot in this group
    valid: jax.Array  # [T] bool
    page_table: jax.Array  # [S, pages_per_seq] int32


def interleave(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [T, kv, hd] -> [T, 2*kv, hd] with K of head j at 2j and V at 2j+1."""
    T, nkv, hd = k.shape
    return jnp.stack([k, v], axis=2).reshape(T, 2 * nkv, hd)


def pad_head_dim(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad the last axis to `size` (the fa cache's lane-aligned head_dim): exact for attention,
    zero dimensions add nothing to q.k and give zero output columns."""
    return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def write_kv(kv: jax.Array, layer, batch: PagedBatch, k_new: jax.Array, v_new: jax.Array) -> jax.Array:
    """Scatter this step's K/V of one layer into the stacked cache (in place when kv is donated)."""
    page_size = kv.shape[2]
    pages_per_seq = batch.page_table.shape[1]
    page_no = jnp.clip(batch.positions // page_size, 0, pages_per_seq - 1)
    page = jnp.where(batch.valid, batch.page_table[batch.seq_index, page_no], TRASH_PAGE)
    offset = jnp.where(batch.valid, batch.positions % page_size, 0)
    new = pad_head_dim(interleave(k_new, v_new), kv.shape[-1])
    return kv.at[layer, page, offset].set(new.astype(kv.dtype))


class NativeAttentionBackend:
    def __init__(self, block_tokens: int = BLOCK_TOKENS):
        self.block_tokens = block_tokens

    def attend(self, q, k_new, v_new, kv, layer, batch: PagedBatch):
        """q [T, nq, hd], k_new/v_new [T, nkv, hd] -> (out [T, nq, hd], kv with this layer written)."""
        kv = write_kv(kv, layer, batch, k_new, v_new)
        _, _, page_size, two_kv, cache_hd = kv.shape
        nkv = two_kv // 2
        T, nq, hd = q.shape
        pages = batch.page_table[batch.seq_index]  # [T, pages_per_seq]
        block = max(1, min(pages.shape[1], self.block_tokens // page_size))  # pages per block
        num_blocks = -(-pages.shape[1] // block)
        pages = jnp.pad(pages, ((0, 0), (0, num_blocks * block - pages.shape[1])))  # past the end: masked
        qg = q.reshape(T, nkv, nq // nkv, hd).astype(jnp.float32) * (hd ** -0.5)  # q head j uses kv head j // g
        furthest = jnp.max(jnp.where(batch.valid, batch.positions, 0))
        width = block * page_size

        def visit(b, carry):
            m, l, acc = carry
            blk = lax.dynamic_slice_in_dim(pages, b * block, block, axis=1)  # [T, block]
            kvb = kv[layer, blk].reshape(T, width, nkv, 2, cache_hd)[..., :hd]  # [T, width, kv, 2, hd]
            keys, values = kvb[..., 0, :], kvb[..., 1, :]
            s = jnp.einsum("tkgd,tckd->tkgc", qg, keys, preferred_element_type=jnp.float32)
            seen = b * width + jnp.arange(width) <= batch.positions[:, None]  # [T, width]
            s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            l = l * scale + p.sum(axis=-1)
            acc = acc * scale[..., None] + jnp.einsum("tkgc,tckd->tkgd", p.astype(values.dtype), values,
                                                      preferred_element_type=jnp.float32)
            return m_new, l, acc

        def step(b, carry):  # blocks past every token's position hold nothing anyone may see
            return lax.cond(b * width <= furthest, visit, lambda b, c: c, b, carry)

        g = nq // nkv
        init = (jnp.full((T, nkv, g), -1e30, jnp.float32), jnp.zeros((T, nkv, g), jnp.float32),
                jnp.zeros((T, nkv, g, hd), jnp.float32))
        _, l, acc = lax.fori_loop(0, num_blocks, step, init)
        out = (acc / l[..., None]).astype(q.dtype)
        return out.reshape(T, nq, hd), kv
