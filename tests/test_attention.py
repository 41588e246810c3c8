"""The native backend's tiled attention, and its C++ kernel for decoders, against the ragged kernel's
own reference, on random ragged batches: every tile size and block size must give each real token
the same output, whatever mix of chunked prefill and decode a group holds, and padding rows must
come out zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from dp_attention.attention import NativeAttentionBackend, PagedBatch, q_tile_rows, query_tiles
from runtime import cpu_kernel

NQ, NKV, HD, PAGE, PAGES_PER_SEQ, NUM_PAGES, LAYERS = 4, 2, 8, 4, 8, 48, 2


def ragged_batch(rng, tokens: int, seqs: int, chunk_lens: list[int]):
    """Sequences with `chunk_lens` new tokens each, at random positions, on distinct pages."""
    positions, seq_index, valid = np.zeros(tokens, np.int32), np.zeros(tokens, np.int32), np.zeros(tokens, bool)
    page_table = np.zeros((seqs, PAGES_PER_SEQ), np.int32)
    free = list(rng.permutation(np.arange(1, NUM_PAGES)))
    kv_lens, row = [], 0
    for j, n in enumerate(chunk_lens):
        start = int(rng.integers(0, PAGES_PER_SEQ * PAGE - n + 1))
        used = -(-(start + n) // PAGE)
        page_table[j, :used] = [free.pop() for _ in range(used)]
        positions[row:row + n], seq_index[row:row + n], valid[row:row + n] = np.arange(start, start + n), j, True
        kv_lens.append(start + n)
        row += n
    return PagedBatch(*map(jnp.asarray, (positions, seq_index, valid, page_table))), kv_lens


def reference(q, kv, layer, batch: PagedBatch, kv_lens):
    """The kernel package's reference over the same cache and metadata."""
    counts = np.bincount(np.asarray(batch.seq_index)[np.asarray(batch.valid)], minlength=len(kv_lens))[:len(kv_lens)]
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    n = len(kv_lens)
    out = ref_ragged_paged_attention(q, kv[layer], jnp.asarray(kv_lens, jnp.int32), batch.page_table[:n],
                                     jnp.asarray(cu), jnp.asarray([n], jnp.int32), sm_scale=HD ** -0.5)
    return np.asarray(out)


@settings(max_examples=16, deadline=None)
@given(st.data())
def test_tiled_attention_equals_the_kernel_reference(data):
    seqs = data.draw(st.integers(1, 5), label="seqs")
    chunk_lens = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=seqs), label="chunks")
    tokens = data.draw(st.sampled_from([t for t in (8, 16, 32, 64) if t >= sum(chunk_lens)]), label="tokens")
    q_tile = data.draw(st.sampled_from([None, 1, 2, 4, 8]), label="q_tile")
    block_tokens = data.draw(st.sampled_from([PAGE, 2 * PAGE, PAGES_PER_SEQ * PAGE]), label="block_tokens")
    kernel = data.draw(st.booleans(), label="kernel")  # the decoders' rows through the C++ kernel
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    batch, kv_lens = ragged_batch(rng, tokens, seqs, chunk_lens)
    q = jnp.asarray(rng.standard_normal((tokens, NQ, HD)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.standard_normal((tokens, NKV, HD)), jnp.float32) for _ in range(2))
    kv = jnp.asarray(rng.standard_normal((LAYERS, NUM_PAGES, PAGE, 2 * NKV, HD)), jnp.float32)

    backend = NativeAttentionBackend(block_tokens=block_tokens, q_tile=q_tile, kernel=kernel)
    cpu_kernel.register()  # what the runtime does before it compiles an executable that calls it
    attend = jax.jit(lambda q, k, v, kv, fields: backend.attend(q, k, v, kv, 1, PagedBatch(*fields)))
    out, kv = attend(q, k_new, v_new, kv, (batch.positions, batch.seq_index, batch.valid, batch.page_table))
    real = int(sum(chunk_lens))
    np.testing.assert_allclose(np.asarray(out)[:real], reference(q, kv, 1, batch, kv_lens)[:real], atol=2e-5, rtol=0)
    assert not np.asarray(out)[real:].any()  # padding rows: zero, never NaN


@pytest.mark.parametrize("chunk_lens,tokens,rows", [([5, 1, 9], 16, 4), ([1] * 8, 8, 1), ([16], 16, 4)])
def test_each_real_row_is_in_exactly_one_tile(chunk_lens, tokens, rows):
    batch, _ = ragged_batch(np.random.default_rng(0), tokens, 8, chunk_lens)
    tiles = query_tiles(batch, tokens, rows)
    covered = np.asarray(tiles.rows)[np.asarray(tiles.real)]
    assert sorted(covered.tolist()) == list(range(sum(chunk_lens)))
    seq_of_row = np.asarray(batch.seq_index)
    for t in range(tiles.rows.shape[0]):
        in_tile = np.asarray(tiles.rows[t])[np.asarray(tiles.real[t])]
        assert (seq_of_row[in_tile] == int(tiles.seq[t])).all()


def test_decoders_and_chunks_tile_apart():
    """A step mixing decoders with prefill chunks tiles each set on its own: one-row tiles for the
    decoders, wider ones for the chunks, every real row in exactly one of the two."""
    chunk_lens = [5, 1, 9, 1, 1]
    batch, _ = ragged_batch(np.random.default_rng(1), 32, 8, chunk_lens)
    single = np.zeros(8, bool)
    single[[1, 3, 4]] = True
    ones = query_tiles(batch, 32, 1, jnp.asarray(single), most=8)
    wide = query_tiles(batch, 32, 4, jnp.asarray(~single))
    rows = lambda t: np.asarray(t.rows)[np.asarray(t.real)].tolist()  # noqa: E731
    assert sorted(rows(ones)) == [5, 15, 16] and ones.rows.shape == (8, 1)
    assert sorted(rows(wide)) == list(range(5)) + list(range(6, 15))


def test_tile_rows_follow_the_bucket():
    assert q_tile_rows(64, 64) == 1  # all decode: a tile per token
    assert q_tile_rows(256, 8) == 16  # prefill-shaped: capped
    assert q_tile_rows(64, 8) == 8
    assert q_tile_rows(128, 64) == 8  # a prefill rung that also holds many decoders
