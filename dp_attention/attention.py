"""The `native` attention backend: pure-JAX attention over a paged KV cache, on one device's shard.

The cache of all layers on one device is one array [layers, num_pages, page_size, 2 * kv_heads,
head_dim], K and V interleaved on the head axis (K of head j at 2j, V at 2j+1: the layout the TPU
ragged paged attention kernel reads). It is the layer scan's carry, so each layer's new K/V are
scattered into it in place. A sequence owns the pages listed in its page table row; position p lives
at (page_table[p // page_size], p % page_size). Page 0 is never handed out: padding tokens write
there, so they can't touch a real sequence. Keys are read back for positions <= the query's
position only, so stale data left in a page by an earlier sequence is never seen.

On CPU this is the serving path, and its cost is reading the KV cache: the pages a query needs are
gathered into a dense block before the dot products. So queries are grouped into tiles: up to
`q_tile` consecutive tokens of one sequence (a batch packs each sequence's tokens contiguously), and
each tile gathers its sequence's pages once. A 256-token prefill chunk reads its context 256 / q_tile
times instead of once per token; a decode token is a tile of its own, also in a step it shares with
prefill chunks (decoders and chunks are tiled apart). Within a tile, a causal mask
per query row. The context is walked in blocks of pages with an online softmax, so memory is one
block per tile; blocks past the furthest tile are skipped, and pages past a tile's own length are
read from the reserved page (one page, hot in cache) instead of the sequence's.

With `kernel=True` (artifacts built with `--attention cpu`) a C++ kernel attends instead
(runtime.cpu_kernel): the same tiles, but each key and value read in place, where the code above
must gather them into a copy first (a decode step's attention is mostly those copies), and the
tiles shared by the host's cores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from runtime import cpu_kernel

TRASH_PAGE = 0
BLOCK_TOKENS = 128  # context positions per attention block (rounded to whole pages)
MAX_Q_TILE = 16  # query rows per tile at most: past this, scores cost more than the reads they save


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """Per-device view of one group's batch (T padded tokens, S padded sequences).

    A sequence's tokens are contiguous rows, in sequence order (runtime.batching.pack).
    """

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


def write_kv(kv: jax.Array, layer, batch: PagedBatch, k_new: jax.Array, v_new: jax.Array, quant=None) -> jax.Array:
    """Scatter this step's K/V of one layer into the stacked cache (in place when kv is donated);
    `quant` (a kv_cache.KvQuant) quantizes them on the way in, with this layer's scales."""
    if quant is not None:
        k_scale, v_scale = quant.scales(layer)
        k_new, v_new = quant.quantize(k_new, k_scale), quant.quantize(v_new, v_scale)
    page_size = kv.shape[2]
    pages_per_seq = batch.page_table.shape[1]
    page_no = jnp.clip(batch.positions // page_size, 0, pages_per_seq - 1)
    page = jnp.where(batch.valid, batch.page_table[batch.seq_index, page_no], TRASH_PAGE)
    offset = jnp.where(batch.valid, batch.positions % page_size, 0)
    new = pad_head_dim(interleave(k_new, v_new), kv.shape[-1])
    return kv.at[layer, page, offset].set(new.astype(kv.dtype))


def q_tile_rows(tokens: int, seqs: int) -> int:
    """Query rows per tile for a bucket of `tokens` and `seqs` per group. 1 when the bucket is
    decode-shaped (tokens <= seqs): a tile per token, no empty rows. Otherwise a power of two, the
    larger of tokens per sequence and tokens / 16, at most MAX_Q_TILE: a prefill chunk then reads
    its context once per 8-16 tokens (decoders sharing the step keep tiles of one row: see
    `attend`). Static: it shapes the executable."""
    if tokens <= seqs:
        return 1
    want = min(MAX_Q_TILE, max(tokens // max(seqs, 1), tokens // 16))
    rows = 1
    while rows * 2 <= want:
        rows *= 2
    return rows


@dataclasses.dataclass(frozen=True)
class QueryTiles:
    """Tiles of up to R consecutive rows of one sequence; at most NT of them (static)."""

    rows: jax.Array  # [NT, R] the row of each tile slot (clipped into range)
    real: jax.Array  # [NT, R] whether that slot holds a real token of the tile's sequence
    seq: jax.Array  # [NT] the tile's sequence slot


def query_tiles(batch: PagedBatch, tokens: int, rows_per_tile: int, only=None, most: int | None = None) -> QueryTiles:
    """Cut each sequence's rows into tiles. A sequence of n tokens makes ceil(n / R) tiles, so
    there are at most T/R + S of them, and never more than T (each holds a real token).
    `only` [S] bool: tile those sequences only; `most`: a smaller static bound on their tiles."""
    S = batch.page_table.shape[0]
    R = rows_per_tile
    count = jnp.zeros(S, jnp.int32).at[batch.seq_index].add(batch.valid.astype(jnp.int32))
    first_row = jnp.cumsum(count) - count
    if only is not None:
        count = jnp.where(only, count, 0)
    tiles = (count + R - 1) // R
    tiles_end = jnp.cumsum(tiles)
    nt = min(tokens, -(-tokens // R) + S, most or tokens)
    t = jnp.arange(nt)
    seq = jnp.minimum(jnp.searchsorted(tiles_end, t, side="right"), S - 1)
    start = first_row[seq] + (t - (tiles_end[seq] - tiles[seq])) * R
    rows = start[:, None] + jnp.arange(R)
    real = (t < tiles_end[-1])[:, None] & (rows < (first_row[seq] + count[seq])[:, None])
    return QueryTiles(jnp.clip(rows, 0, tokens - 1), real, seq)


def _numbers(x):
    """An 8-bit cache's values as float32 (a float cache is read as it is)."""
    return x if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > 1 else x.astype(jnp.float32)


def _attend_tiles(q, pos, pages, kv, layer, block: int, hd: int):
    """One chunk of tiles: q [N, kv, g*R, hd] (a kv head's queries, (g, r) major, pre-scaled),
    pos [N, R] (-1: no query), pages [N, blocks * block] -> [N, kv, g*R, hd]. An 8-bit cache is read
    as float32 numbers: its K scale is already in q, its V scale is the caller's to apply.

    Walks the context a block of pages at a time with an online softmax, as far as the chunk's
    furthest query. Each kv head's keys and values are gathered straight into [N, width, hd], the
    layout the batched dots take, so nothing is transposed."""
    N, nkv, gr, _ = q.shape
    R = pos.shape[1]
    page_size = kv.shape[2]
    width = block * page_size
    keys_needed = jnp.max(pos, axis=1) + 1  # [N]

    def visit(b, carry):
        m, l, acc = carry
        blk = lax.dynamic_slice_in_dim(pages, b * block, block, axis=1)  # [N, block]
        page_start = b * width + jnp.arange(block) * page_size
        blk = jnp.where(page_start[None, :] < keys_needed[:, None], blk, TRASH_PAGE)
        seen = b * width + jnp.arange(width)[None, None, :] <= pos[:, :, None]  # [N, R, width]
        seen = jnp.tile(seen, (1, gr // R, 1))  # rows (g, r)
        out = []
        for h in range(nkv):
            keys = _numbers(kv[layer, blk, :, 2 * h, :hd].reshape(N, width, hd))
            values = _numbers(kv[layer, blk, :, 2 * h + 1, :hd].reshape(N, width, hd))
            s = jnp.einsum("nqd,ncd->nqc", q[:, h], keys, preferred_element_type=jnp.float32)
            s = jnp.where(seen, s, -jnp.inf)
            m_new = jnp.maximum(m[:, h], s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m[:, h] - m_new)
            pv = jnp.einsum("nqc,ncd->nqd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
            out.append((m_new, l[:, h] * scale + p.sum(axis=-1), acc[:, h] * scale[..., None] + pv))
        return tuple(jnp.stack(parts, 1) for parts in zip(*out))

    init = (jnp.full((N, nkv, gr), -1e30, jnp.float32), jnp.zeros((N, nkv, gr), jnp.float32),
            jnp.zeros((N, nkv, gr, hd), jnp.float32))
    blocks = (jnp.max(keys_needed) + width - 1) // width  # blocks past the furthest query: skipped
    _, l, acc = lax.fori_loop(0, blocks, visit, init)
    return acc / jnp.maximum(l, 1e-30)[..., None]  # rows without a query: 0


class NativeAttentionBackend:
    """`q_tile`: query rows per tile (default q_tile_rows of the bucket). Tiles are processed
    `TILE_ROWS_PER_CHUNK // q_tile` at a time, as many chunks as the batch has real tiles, so a
    bucket's worst-case tile count costs nothing when a step holds fewer."""

    TILE_ROWS_PER_CHUNK = 32

    def __init__(self, block_tokens: int = BLOCK_TOKENS, q_tile: int | None = None, quant=None, kernel: bool = False):
        """quant: a kv_cache.KvQuant for an 8-bit cache, None for a cache in the build dtype.
        kernel: every row through the C++ kernel (float32 caches on CPU only; see the module)."""
        if kernel and quant is not None:
            raise ValueError("the CPU attention kernel reads a float32 cache, not an 8-bit one")
        self.block_tokens = block_tokens
        self.q_tile = q_tile
        self.quant = quant
        self.kernel = kernel

    def attend(self, q, k_new, v_new, kv, layer, batch: PagedBatch):
        """q [T, nq, hd], k_new/v_new [T, nkv, hd] -> (out [T, nq, hd], kv with this layer written).

        In a step that mixes prefill chunks with decoders, the decoders (sequences with one token
        here) get tiles of one row and the chunks tiles of `q_tile` rows: a decoder in a tile of
        16 rows would waste 15 rows of arithmetic and take a chunk slot of its own."""
        kv = write_kv(kv, layer, batch, k_new, v_new, self.quant)
        T, nq, hd = q.shape
        S = batch.page_table.shape[0]
        nkv = kv.shape[3] // 2
        qs = q.reshape(T, nkv, nq // nkv, hd).astype(jnp.float32) * (hd ** -0.5)
        if self.quant is not None:  # K's scale rides on the queries, V's on the output (kv_cache.py)
            qs = qs * self.quant.scales(layer)[0]
        if self.kernel:
            return _kernel_attend(qs, kv, layer, batch).astype(q.dtype), kv
        out = jnp.zeros((T, nq, hd), q.dtype)
        R = self.q_tile or q_tile_rows(T, S)
        if R == 1:
            return self._attend(qs, out, kv, layer, batch, query_tiles(batch, T, 1)), kv
        count = jnp.zeros(S, jnp.int32).at[batch.seq_index].add(batch.valid.astype(jnp.int32))
        single = count == 1
        out = self._attend(qs, out, kv, layer, batch, query_tiles(batch, T, 1, single, most=S))
        out = self._attend(qs, out, kv, layer, batch, query_tiles(batch, T, R, ~single))
        return out, kv

    def _attend(self, qs, out, kv, layer, batch: PagedBatch, tiles: QueryTiles):
        """Attend the tiles' queries (qs [T, nkv, g, hd], scaled) and write their rows of out."""
        page_size = kv.shape[2]
        T, nkv, g, hd = qs.shape
        nq = nkv * g
        pages_per_seq = batch.page_table.shape[1]
        NT, R = tiles.rows.shape
        per_chunk = max(1, min(NT, self.TILE_ROWS_PER_CHUNK // R))
        chunks = -(-NT // per_chunk)
        pad = chunks * per_chunk - NT
        rows = jnp.pad(tiles.rows, ((0, pad), (0, 0)))
        real = jnp.pad(tiles.real, ((0, pad), (0, 0)))
        block = max(1, min(pages_per_seq, self.block_tokens // page_size))  # pages per block
        blocks = -(-pages_per_seq // block)
        seq = jnp.pad(tiles.seq, (0, pad))
        pos = jnp.where(real, batch.positions[rows], -1)
        # Longest context first: a chunk walks as far as its furthest query, so tiles of similar
        # reach share chunks and a short sequence does not pay for a long one's blocks.
        order = jnp.argsort(-jnp.max(pos, axis=1), stable=True)
        rows, real, seq, pos = rows[order], real[order], seq[order], pos[order]
        pages = jnp.pad(batch.page_table, ((0, 0), (0, blocks * block - pages_per_seq)))
        pages = pages[seq]  # [chunks * per_chunk, blocks * block]
        v_scale = self.quant.scales(layer)[1] if self.quant is not None else None

        def chunk(c, out):
            take = lambda a: lax.dynamic_slice_in_dim(a, c * per_chunk, per_chunk, axis=0)  # noqa: E731
            r = take(rows)
            qt = qs[r].transpose(0, 2, 3, 1, 4).reshape(per_chunk, nkv, g * R, hd)
            o = _attend_tiles(qt, take(pos), take(pages), kv, layer, block, hd)
            o = o if v_scale is None else o * v_scale
            o = o.reshape(per_chunk, nkv, g, R, hd).transpose(0, 3, 1, 2, 4).reshape(per_chunk * R, nq, hd)
            dest = jnp.where(take(real), r, T).reshape(-1)  # empty slots go nowhere
            return out.at[dest].set(o.astype(out.dtype), mode="drop")

        real_tiles = jnp.sum(jnp.any(tiles.real, axis=1))  # real tiles sort first
        return lax.fori_loop(0, (real_tiles + per_chunk - 1) // per_chunk, chunk, out)


def _kernel_attend(qs, kv, layer, batch: PagedBatch):
    """qs [T, nkv, g, hd] (scaled) -> [T, nkv * g, hd] float32 from the C++ kernel; padding rows are
    zero. It tiles the rows itself (up to 16 consecutive rows of one sequence)."""
    if kv.dtype != jnp.float32:
        raise ValueError(f"the CPU attention kernel reads a float32 KV cache, got {kv.dtype}")
    cpu_kernel.prepare()  # built meanwhile; registered before compiling (runtime.cpu_kernel.register)
    T, nkv, g, hd = qs.shape
    call = jax.ffi.ffi_call(cpu_kernel.ATTENTION, jax.ShapeDtypeStruct((T, nkv * g, hd), jnp.float32))
    return call(qs.reshape(T, nkv * g, hd), kv, jnp.asarray(layer, jnp.int32).reshape(1), batch.positions,
                batch.seq_index, batch.valid, batch.page_table)
