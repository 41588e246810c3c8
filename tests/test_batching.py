"""The packed batch an executable takes from the host unpacks to exactly the batch packed."""

import numpy as np

from dp_attention.model import from_wire
from runtime.batching import Chunk, pack, to_wire, wire_shapes


def test_wire_round_trip_is_exact():
    rng = np.random.default_rng(0)
    groups = [[Chunk(tuple(rng.integers(0, 500, 5).tolist()), 3, (1, 2), 0.7, 5, 0.9, 11, prev_row=1),
               Chunk((9,), 40, (3, 4, 5, 6), seed=2)],
              [],
              [Chunk(tuple(range(8)), 0, (7,), 1.3, 0, 0.5, 99)]]
    batch = pack(groups, tokens=8, seqs=3, pages_per_seq=6, carry_seqs=4)
    wire = to_wire(batch)
    shapes = {k: v.shape for k, v in batch.items()}
    assert {k: (v.shape, str(v.dtype)) for k, v in wire.items()} == \
        {k: v for k, v in wire_shapes(shapes).items() if k != "prev_tokens"}
    back = from_wire(wire | {"prev_tokens": batch["prev_tokens"]}, shapes)
    assert back.keys() == batch.keys()
    for k in batch:
        np.testing.assert_array_equal(back[k], batch[k], err_msg=k)
        assert back[k].dtype == batch[k].dtype, k
    assert batch["feed"][0, 4] == 1 and (batch["feed"] == -1).sum() == batch["feed"].size - 1


def test_advance_predicts_the_next_decode_step():
    """A decode step's ints one position on are the next decode step's when the same sequences
    decode in the same rows with the same pages; the device computes the same arithmetic."""
    import jax.numpy as jnp

    from runtime.batching import advance_ints, wire_layout

    def step(pos, pages=(1, 2)):
        groups = [[Chunk((0,), pos, pages, prev_row=0), Chunk((0,), pos + 5, (3,), 0.5, seed=4, prev_row=1)],
                  [Chunk((0,), pos + 2, (4, 5), prev_row=0)]]
        return pack(groups, tokens=4, seqs=2, pages_per_seq=3, carry_seqs=2)

    now, later = step(9), step(10)
    layout = wire_layout({k: v.shape for k, v in now.items()})
    ints = to_wire(now)["ints"]
    ahead = advance_ints(ints, now["num_tokens"], layout)
    np.testing.assert_array_equal(ahead, to_wire(later)["ints"])
    np.testing.assert_array_equal(np.asarray(advance_ints(jnp.asarray(ints), jnp.asarray(now["num_tokens"]),
                                                          layout, jnp)), ahead)
    assert not np.array_equal(ahead, to_wire(step(10, pages=(1, 2, 6)))["ints"])  # a new page: sent


def test_sampled_outputs_round_trip_bit_for_bit():
    """The step packs its four sampled outputs into one int32 array (floats bit for bit); the
    host unpacks exactly what was packed, odd float bit patterns included."""
    import jax.numpy as jnp

    from dp_attention.model import to_sampled
    from runtime.batching import from_sampled

    rng = np.random.default_rng(5)
    outputs = {"tokens": rng.integers(0, 2**31 - 1, (2, 3)).astype(np.int32),
               "logprobs": -rng.random((2, 3)).astype(np.float32),
               "top_ids": rng.integers(0, 2**31 - 1, (2, 3, 4)).astype(np.int32),
               "top_logprobs": -rng.random((2, 3, 4)).astype(np.float32)}
    outputs["logprobs"][0, 0] = -np.inf  # a token outside top-p after the cut, and a denormal
    outputs["top_logprobs"][1, 2, 3] = np.float32(-1e-45)
    back = from_sampled(np.asarray(to_sampled({k: jnp.asarray(v) for k, v in outputs.items()})))
    assert back.keys() == outputs.keys()
    for k, v in outputs.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
