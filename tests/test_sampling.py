"""On-device sampling (dp_attention.sampling) against numpy: argmax, the cuts, the distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_attention.sampling import first_argmax, sample

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], np.float32)


@jax.jit
def _sample(logits, temperature, top_k, top_p, seed, position):
    params = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    return sample(logits, params, position, 3)


def draw(logits=LOGITS, n=1, temperature=1.0, top_k=0, top_p=1.0, seeds=None, position=7):
    """n rows of the same logits, one seed each."""
    seeds = np.arange(n) if seeds is None else np.asarray(seeds)
    n = len(seeds)
    out = _sample(jnp.asarray(np.tile(logits, (n, 1))), jnp.full(n, temperature, jnp.float32),
                  jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32), jnp.asarray(seeds, jnp.int32),
                  jnp.full(n, position, jnp.int32))
    return {k: np.asarray(v) for k, v in out.items()}


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_temperature_zero_is_argmax_with_logprobs():
    out = draw(temperature=0.0, n=4)
    assert out["tokens"].tolist() == [1] * 4
    ref = log_softmax(LOGITS)
    np.testing.assert_allclose(out["logprobs"], ref[1], atol=1e-6)
    np.testing.assert_allclose(out["top_logprobs"][0], np.sort(ref)[::-1][:3], atol=1e-6)
    assert out["top_ids"][0].tolist() == [1, 4, 2]
    tie = np.array([0.0, 5.0, 5.0, 1.0, 0.0], np.float32)
    assert draw(tie, temperature=0.0)["tokens"].tolist() == [1]  # ties go to the lower id


def test_first_argmax_is_numpys_argmax():
    """Random rows, ties at the top, rows of -inf and rows with NaN (argmax's answer: the first NaN)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    x[1, [7, 200]] = x[1].max() + 1  # a tie: the lower index
    x[2] = -np.inf
    x[3, [40, 9]] = np.nan
    x[4, :] = 0.0
    x[5, 299] = np.inf
    x[6] = np.round(x[6])  # many ties below the top
    for rows in (x, x[:1], x[:, :1]):
        assert np.asarray(jax.jit(first_argmax)(jnp.asarray(rows))).tolist() == np.argmax(rows, axis=-1).tolist()


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=0.01), dict(top_k=2, top_p=0.5)])
def test_cuts_that_leave_only_the_argmax(kwargs):
    # top-k first, then the nucleus of what is left: token 1 alone holds over half the top-2 mass.
    assert set(draw(n=64, **kwargs)["tokens"].tolist()) == {1}


def test_top_k_keeps_the_k_most_likely():
    tokens = draw(n=300, top_k=3, temperature=2.0)["tokens"]
    assert set(tokens.tolist()) == {1, 2, 4}


def test_frequencies_follow_the_softmax():
    tokens = draw(n=6000, temperature=1.0)["tokens"]
    freq = np.bincount(tokens, minlength=len(LOGITS)) / len(tokens)
    np.testing.assert_allclose(freq, np.exp(log_softmax(LOGITS)), atol=0.025)
    hot = np.bincount(draw(n=6000, temperature=0.5)["tokens"], minlength=5) / 6000
    np.testing.assert_allclose(hot, np.exp(log_softmax(LOGITS / 0.5)), atol=0.025)


def test_a_draw_depends_on_seed_and_position_only():
    a = draw(n=64, seeds=np.arange(64))["tokens"]
    assert a.tolist() == draw(n=64, seeds=np.arange(64))["tokens"].tolist()
    alone = [int(draw(seeds=[s])["tokens"][0]) for s in (5, 17, 40)]
    assert alone == [int(a[5]), int(a[17]), int(a[40])]  # its batch-mates change nothing
    other = draw(n=64, seeds=np.arange(64), position=8)["tokens"]
    assert (a != other).any()


def test_one_seed_over_many_positions_follows_the_softmax():
    """A sequence's draws at consecutive positions are as independent as draws of different seeds."""
    n = 6000
    out = _sample(jnp.asarray(np.tile(LOGITS, (n, 1))), jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.int32),
                  jnp.ones(n, jnp.float32), jnp.full(n, 12345, jnp.int32), jnp.arange(n, dtype=jnp.int32))
    freq = np.bincount(np.asarray(out["tokens"]), minlength=len(LOGITS)) / n
    np.testing.assert_allclose(freq, np.exp(log_softmax(LOGITS)), atol=0.025)
