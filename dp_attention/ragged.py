"""The `fa` attention backend: the Pallas ragged paged attention kernel for TPU, per device.

The kernel (jax.experimental.pallas.ops.tpu.ragged_paged_attention) takes one group's tokens as
ragged sequences: q [T, heads, hd] with sequence i's tokens at q[cu_q_lens[i]:cu_q_lens[i+1]], its
keys in the pages page_indices[i] of kv_pages [pages, page_size, 2*kv_heads, hd] (K and V
interleaved on the head axis), kv_lens[i] of them, the last q tokens being the newest; num_seqs [1]
sequences are real. Our batch packs each sequence's chunk contiguously, in sequence order, so that
metadata follows from positions, seq_index and last_index without the host sending more.

The stacked cache [layers, pages, ...] is handed to the kernel whole, viewed as [layers * pages,
...], with this layer's page indices offset by layer * pages: no copy of a layer's cache per step.

The kernel runs only on TPU. jax 0.10.2's TPU interpreter (`pltpu.force_tpu_interpret_mode()`)
cannot run it on CPU: the kernel views its VMEM KV buffer through a reshaped ref
(`async_copy.wait().reshape(pages * page_size * heads, head_dim)`) before its strided loads, and the
interpreter's ref reads only understand index transforms (`interpret/utils.py` `to_range` fails with
"'ReshapeTransform' object has no attribute 'indices'"). `ragged_paged_attention_reference` is a
jittable pure-JAX function with the kernel's exact signature and semantics; the CPU tests run the fa
backend on it, fed by the same metadata builder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .attention import PagedBatch, pad_head_dim, write_kv

LANES = 128  # the kernel's head_dim must be a multiple of this: the fa cache pads head_dim up to it

# --tpu-generation -> the device_kind jax reports there (the kernel's lowering reads it).
TPU_DEVICE_KINDS = {"v5e": "TPU v5 lite", "v5p": "TPU v5p", "v6e": "TPU v6 lite"}


@dataclasses.dataclass(frozen=True)
class RaggedMetadata:
    kv_lens: jax.Array  # [S] int32
    page_indices: jax.Array  # [S, pages_per_seq] int32
    cu_q_lens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [1] int32


def ragged_metadata(batch: PagedBatch, last_index: jax.Array) -> RaggedMetadata:
    """The kernel's view of one group's packed batch. Sequence j's tokens end at last_index[j]."""
    S = batch.page_table.shape[0]
    num_seqs = jnp.where(jnp.any(batch.valid), jnp.max(jnp.where(batch.valid, batch.seq_index, -1)) + 1, 0)
    real = jnp.arange(S) < num_seqs
    ends = jnp.where(real, last_index + 1, 0)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), lax.cummax(ends.astype(jnp.int32))])
    kv_lens = jnp.where(real, batch.positions[last_index] + 1, 0).astype(jnp.int32)
    return RaggedMetadata(kv_lens, batch.page_table.astype(jnp.int32), cu, num_seqs.astype(jnp.int32)[None])


def ragged_paged_attention_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                                     sm_scale: float = 1.0, k_scale: float | None = None,
                                     v_scale: float | None = None, num_kv_pages_per_block: int | None = None,
                                     num_queries_per_block: int | None = None):
    """The kernel's semantics in plain JAX (jittable; block sizes accepted and ignored).

    Each token attends causally to its sequence's first kv_len - (tokens after it in its chunk)
    positions. Tokens past cu_q_lens[num_seqs] belong to no sequence: their output is zero. With a
    k_scale / v_scale, K / V are read as (float32 value * scale) in q's dtype, as the kernel does.
    """
    del num_kv_pages_per_block, num_queries_per_block
    T, nq, hd = q.shape
    _, page_size, two_kv, _ = kv_pages.shape
    nkv = two_kv // 2
    t = jnp.arange(T)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, page_indices.shape[0] - 1)
    real = t < cu_q_lens[num_seqs[0]]
    position = kv_lens[seq] - (cu_q_lens[seq + 1] - t)  # of this token in its sequence
    pages = page_indices[seq]  # [T, pages_per_seq]
    ctx = pages.shape[1] * page_size
    kv = kv_pages[pages].reshape(T, ctx, nkv, 2, hd)
    keys, values = kv[..., 0, :], kv[..., 1, :]
    if k_scale is not None:
        keys = (keys.astype(jnp.float32) * k_scale).astype(q.dtype)
    if v_scale is not None:
        values = (values.astype(jnp.float32) * v_scale).astype(q.dtype)
    qg = q.reshape(T, nkv, nq // nkv, hd)
    s = jnp.einsum("tkgd,tckd->tkgc", qg, keys, preferred_element_type=jnp.float32) * sm_scale
    seen = jnp.arange(ctx)[None, :] <= position[:, None]
    s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("tkgc,tckd->tkgd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return jnp.where(real[:, None, None], out.reshape(T, nq, hd), 0).astype(q.dtype)


def block_sizes(generation: str | None, q_dtype, kv_dtype, q_heads: int, kv_heads: int, head_dim: int,
                page_size: int, tokens: int, pages_per_seq: int) -> tuple[int, int]:
    """(num_kv_pages_per_block, num_queries_per_block) from the kernel's tuned table for the target
    TPU generation, looked up explicitly: the kernel's own lookup reads the devices of this machine."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel, tuned_block_sizes as tuned

    heads_blk, kv_blk = kernel.get_min_heads_per_blk(q_heads, 2 * kv_heads, q_dtype, kv_dtype)
    key = tuned.simplify_key((q_dtype, kv_dtype, heads_blk, kv_blk // 2, head_dim, page_size, tokens, pages_per_seq))
    name = " ".join(TPU_DEVICE_KINDS.get(generation or "", "TPU v5 lite").split()[:2])  # "TPU v5", "TPU v6"
    bkv, bq = tuned.TUNED_BLOCK_SIZES.get(name, {}).get(key, (128, 32))
    return min(pages_per_seq, bkv), min(tokens, bq)


class FlashAttentionBackend:
    """Ragged paged attention over the stacked cache; `kernel` is the Pallas kernel on TPU, or the
    reference for tests. `quant` (a kv_cache.KvQuant): an 8-bit cache, whose per-layer scales are
    applied outside the kernel (to q and to the output, see kv_cache.py); the kernel gets scales of
    1.0, which make it convert the 8-bit values to q's dtype (exact: bfloat16 holds every int8 and
    fp8 value)."""

    def __init__(self, kernel, last_index: jax.Array, blocks: tuple[int, int], quant=None):
        self.kernel, self.last_index, self.blocks, self.quant = kernel, last_index, blocks, quant

    def attend(self, q, k_new, v_new, kv, layer, batch: PagedBatch):
        kv = write_kv(kv, layer, batch, k_new, v_new, self.quant)
        L, P, page_size, two_kv, cache_hd = kv.shape
        hd = q.shape[-1]
        meta = ragged_metadata(batch, self.last_index)
        if self.quant is None:
            q_in, scales = q.astype(kv.dtype), {}
        else:
            k_scale, v_scale = self.quant.scales(layer)
            q_in, scales = (q.astype(jnp.float32) * k_scale).astype(q.dtype), {"k_scale": 1.0, "v_scale": 1.0}
        out = self.kernel(pad_head_dim(q_in, cache_hd), kv.reshape(L * P, page_size, two_kv, cache_hd),
                          meta.kv_lens, meta.page_indices + layer * P, meta.cu_q_lens, meta.num_seqs,
                          sm_scale=hd ** -0.5, num_kv_pages_per_block=self.blocks[0],
                          num_queries_per_block=self.blocks[1], **scales)
        out = out[..., :hd] if self.quant is None else out[..., :hd].astype(jnp.float32) * v_scale
        return jnp.where(batch.valid[:, None, None], out, 0).astype(q.dtype), kv


def tpu_kernel():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention
