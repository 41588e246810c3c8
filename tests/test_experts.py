"""The grouped (sparse) expert path equals the all-experts reference; odd expert counts still work."""

import numpy as np
import pytest

from dp_attention import PRESETS, DpPaddingMode, Layout, MeshShape, load_hf_config
from driver import StepDriver
from runtime.batching import Chunk


def test_grouped_experts_equal_dense_reference():
    rng = np.random.default_rng(0)
    vocab = PRESETS["qwen3-moe-tiny"].vocab_size
    prompts = [tuple(rng.integers(0, vocab, n).tolist()) for n in (23, 7, 30, 1)]
    results = []
    for dense in (False, True):
        d = StepDriver("qwen3-moe-tiny", MeshShape(2, 4), dense_reference=dense)
        groups = [[Chunk(prompts[0], 0, d.alloc(0, 4)), Chunk(prompts[1], 0, d.alloc(0, 4))],
                  [Chunk(prompts[2], 0, d.alloc(1, 4)), Chunk(prompts[3], 0, d.alloc(1, 4))]]
        results.append(np.array(d.step(groups, DpPaddingMode.MAX_LEN)))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_expert_width_not_divisible_by_devices_is_padded(golden_dir):
    """Zero columns are exact: a 3x1 mesh (width 32 -> 33) gives the logits of 2x4 (width 32 / 8)."""
    cfg = load_hf_config(golden_dir / "hf-tiny-a")
    assert cfg.moe_intermediate_size == 32
    assert Layout.for_mesh(cfg, MeshShape(3, 1)).expert_width == 33
    assert Layout.for_mesh(cfg, MeshShape(2, 4)).expert_width == 32
    prompts = [[5, 9, 2, 7], [11, 3]]
    logits = []
    for shape in (MeshShape(3, 1), MeshShape(2, 4)):
        d = StepDriver(str(golden_dir / "hf-tiny-a"), shape)
        first, _ = d.generate([prompts] + [[] for _ in range(shape.dp - 1)], new_tokens=1)
        logits.append(np.array(first[0]))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=0)


class _Routing:
    experts_per_token = 2
    norm_topk_prob = True


@pytest.mark.parametrize("skew", ["uniform", "one expert", "two experts"])
def test_the_cpu_expert_loop_equals_every_expert_on_every_token(skew):
    """Any routing fits the loop's shapes: all pairs on one expert, empty experts, padding rows."""
    import jax
    import jax.numpy as jnp

    from dp_attention.model import MoeWeights, dense_experts, experts_by_expert, sort_pairs

    rng = np.random.default_rng(1)
    L, E, H, I, N = 2, 6, 16, 8, 24
    router = rng.normal(size=(L, H, E))
    if skew != "uniform":
        favoured = [3] if skew == "one expert" else [0, 5]
        router[:, :, favoured] += 50.0  # every token's top 2 land on the favoured experts
    stack = MoeWeights(*(jnp.asarray(a, jnp.float32) for a in (
        router, rng.normal(size=(L, E, H, I)), rng.normal(size=(L, E, H, I)), rng.normal(size=(L, E, I, H)))))
    x = jnp.asarray(np.abs(rng.normal(size=(N, H))), jnp.float32)  # positive: the favoured win
    valid = jnp.arange(N) < N - 5  # padding rows route nowhere
    for index in range(L):
        pairs = sort_pairs(_Routing, stack.router[index], x, valid)
        if skew == "one expert":
            assert int(pairs.counts[3]) == N - 5 and int(jnp.sum(pairs.counts == 0)) >= 1
        got = jax.jit(experts_by_expert)(stack, index, x, pairs)
        want = dense_experts(_Routing, stack, index, x, valid)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-4)
