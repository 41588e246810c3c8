"""The grouped (sparse) expert paths equal the all-experts reference in every expert layout; the
TPU kernel (megablox gmm, interpreted here) equals the CPU loop; odd expert counts still work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dp_attention import PRESETS, DpPaddingMode, Layout, MeshShape, load_hf_config, make_mesh
from dp_attention.model import ExpertShard, MoeWeights, RoutedPairs, experts_by_expert, experts_gmm, local_pairs
from dp_attention.weights import EXPERT_LAYOUTS, ExpertLayout
from driver import StepDriver
from runtime.batching import Chunk


@pytest.mark.parametrize("layout", list(EXPERT_LAYOUTS))
def test_grouped_experts_equal_dense_reference(layout):
    rng = np.random.default_rng(0)
    vocab = PRESETS["qwen3-moe-tiny"].vocab_size
    prompts = [tuple(rng.integers(0, vocab, n).tolist()) for n in (23, 7, 30, 1)]
    results = []
    for dense in (False, True):
        d = StepDriver("qwen3-moe-tiny", MeshShape(2, 4), dense_reference=dense, expert_layout=layout)
        groups = [[Chunk(prompts[0], 0, d.alloc(0, 4)), Chunk(prompts[1], 0, d.alloc(0, 4))],
                  [Chunk(prompts[2], 0, d.alloc(1, 4)), Chunk(prompts[3], 0, d.alloc(1, 4))]]
        results.append(np.array(d.step(groups, DpPaddingMode.MAX_LEN)))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_layouts_give_the_same_logits(golden_dir):
    """Experts padded (12 over 8 shards), width padded, or both: zero padding is exact."""
    prompts = [[5, 9, 2, 7], [11, 3]]
    logits = {}
    for shape, layout in [(MeshShape(2, 4), "width"), (MeshShape(2, 4), "ep"), (MeshShape(2, 4), "ep-data"),
                          (MeshShape(3, 1), "width"), (MeshShape(3, 1), "ep-data")]:
        d = StepDriver(str(golden_dir / "hf-tiny-a"), shape, expert_layout=layout)
        first, _ = d.generate([prompts] + [[] for _ in range(shape.dp - 1)], new_tokens=1)
        logits[(str(shape), layout)] = np.array(first[0])
    ref = logits[("2x4", "width")]
    for key, got in logits.items():
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=str(key))


def test_layout_fills_lanes_where_any_layout_can(golden_dir):
    """Real configs: every per-device expert matmul dimension a multiple of 128 on the meshes they are
    served on, with the fewest expert shards that achieve it; a forced layout is taken as asked."""
    import json
    from pathlib import Path

    from dp_attention import from_hf_dict

    configs = Path(__file__).resolve().parent.parent / "bench" / "configs"
    load = lambda n: from_hf_dict(json.loads((configs / n / "config.json").read_text()), n)  # noqa: E731
    a30, a235 = load("qwen3-30b-a3b"), load("qwen3-235b-a22b")
    for cfg, mesh in [(a30, MeshShape(2, 4)), (a30, MeshShape(4, 8)), (a235, MeshShape(4, 8)), (a235, MeshShape(8, 8))]:
        lay = ExpertLayout.choose(cfg, mesh)
        assert lay.local_width % 128 == 0 and cfg.hidden_size % 128 == 0, (cfg.name, mesh, lay)
        assert lay.local_experts * lay.shards == cfg.num_experts and lay.local_width * (mesh.num_devices // lay.shards) \
            == cfg.moe_intermediate_size
        fewer = [ExpertLayout.make(cfg, mesh, n) for n in EXPERT_LAYOUTS]
        assert not any(o.shards < lay.shards and o.local_width % 128 == 0 for o in fewer)
    assert ExpertLayout.choose(a30, MeshShape(2, 4)).name == "ep-tensor"  # 32 experts x 384 columns
    assert ExpertLayout.choose(a30, MeshShape(2, 4), "width").local_width == 96
    tiny = load_hf_config(golden_dir / "hf-tiny-a")
    assert Layout.for_mesh(tiny, MeshShape(3, 1), "width").expert_width == 33
    with pytest.raises(ValueError, match="expert layout 'diagonal' is not one of width, ep-data, ep-tensor, ep"):
        ExpertLayout.choose(tiny, MeshShape(2, 4), "diagonal")


# ----------------------------------------------------------------------------- the TPU kernel


def _random_routing(rng, tokens, experts, k, skew):
    """A routing with empty experts and overfull ones: `skew` of the pairs go to experts 0..2."""
    hot = rng.random((tokens, k)) < skew
    choice = np.where(hot, rng.integers(0, 3, (tokens, k)), rng.integers(0, experts, (tokens, k)))
    choice[:, :] = np.where(choice == experts - 2, experts - 1, choice)  # expert E-2 always empty
    return choice


def _sorted(choice, weights, valid, experts):
    """RoutedPairs as sort_pairs builds them, from a given routing."""
    n, k = choice.shape
    token = np.repeat(np.arange(n), k)
    key = np.where(valid[token], choice.reshape(-1), experts)
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=experts + 1)[:experts]
    weight = np.where(key < experts, weights.reshape(-1), 0)[order]
    return RoutedPairs(jnp.asarray(token[order], jnp.int32), jnp.asarray(weight, jnp.float32),
                       jnp.asarray(counts, jnp.int32))


@pytest.mark.parametrize("layout", list(EXPERT_LAYOUTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gmm_kernel_equals_cpu_loop_per_device(layout, seed):
    """Each device's partial sums from megablox gmm (interpreted) equal the CPU loop's on the same
    local pairs, float32, on a 2x4 mesh in every layout; experts padded 10 -> a multiple of the shards."""
    rng = np.random.default_rng(seed)
    E, H, I, N, k = 10, 64, 48, 40, 3
    mesh_shape = MeshShape(2, 4)

    class Cfg:
        num_experts, moe_intermediate_size = E, I

    lay = ExpertLayout.make(Cfg, mesh_shape, layout)
    mesh = make_mesh(mesh_shape)
    gate_spec, down_spec = lay.specs()
    w = {n: rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])
         for n, s in [("gate", (lay.experts, H, lay.width)), ("up", (lay.experts, H, lay.width)),
                      ("down", (lay.experts, lay.width, H))]}
    for a in w.values():  # padded experts and columns are zero in real weights
        a[E:] = 0
    w["gate"][:, :, I:] = w["up"][:, :, I:] = w["down"][:, I:, :] = 0
    x = rng.standard_normal((N, H)).astype(np.float32)
    valid = np.arange(N) < N - 5  # padding rows route nowhere
    choice = _random_routing(rng, N, E, k, skew=0.6)
    pairs = _sorted(choice, rng.random((N, k)), valid, E)
    shard = ExpertShard.from_spec(P(None, *gate_spec), mesh)

    def device(gate, up, down, x, pairs):
        mw = MoeWeights(None, gate, up, down)
        local = gate.shape[0]
        first = shard.first_expert(local)
        stack = MoeWeights(None, gate[None], up[None], down[None])  # a one-layer stack
        by_tile = experts_by_expert(stack, 0, x, local_pairs(pairs, first, local, lay.experts))
        by_gmm = experts_gmm(mw, x, pairs, first, lay.experts, interpret=True)
        return by_tile[None, None], by_gmm[None, None]

    ns = lambda s: NamedSharding(mesh, s)  # noqa: E731
    specs = (gate_spec, gate_spec, down_spec, P(), P())
    fn = jax.jit(jax.shard_map(device, mesh=mesh, in_specs=specs, out_specs=(P("data", "tensor"),) * 2,
                               check_vma=False))
    args = [jax.device_put(w["gate"], ns(gate_spec)), jax.device_put(w["up"], ns(gate_spec)),
            jax.device_put(w["down"], ns(down_spec)), jnp.asarray(x), pairs]
    by_tile, by_gmm = (np.asarray(a) for a in fn(*args))
    assert np.abs(by_tile).max() > 0.1  # some device computed something
    np.testing.assert_allclose(by_gmm, by_tile, atol=1e-5, rtol=0)
    # and the devices' sum is the whole MoE layer
    h = jax.nn.silu(np.einsum("nh,ehi->nei", x, w["gate"])) * np.einsum("nh,ehi->nei", x, w["up"])
    onehot = (choice[..., None] == np.arange(lay.experts)).astype(np.float32)
    token_w = np.asarray(pairs.weight)[np.argsort(np.argsort(np.where(valid[np.repeat(np.arange(N), k)],
                                                                       choice.reshape(-1), E), kind="stable"))]
    coef = np.einsum("nk,nke->ne", token_w.reshape(N, k), onehot) * valid[:, None]
    want = np.einsum("nei,eih,ne->nh", h, w["down"], coef)
    np.testing.assert_allclose(by_gmm.sum(axis=(0, 1)), want, atol=1e-4, rtol=0)


class _Routing:
    experts_per_token = 2
    norm_topk_prob = True


@pytest.mark.parametrize("kernel,I", [("tiles", 8), ("cpu", 8), ("cpu", 40)])
@pytest.mark.parametrize("skew", ["uniform", "one expert", "two experts"])
def test_the_cpu_expert_loop_equals_every_expert_on_every_token(skew, kernel, I):
    """Any routing fits the loop's shapes: all pairs on one expert (more than one chunk of the C++
    kernel's), empty experts, padding rows; widths under one vector and past whole vectors."""
    from dp_attention.model import dense_experts, experts_by_expert, experts_cpu_kernel, sort_pairs
    from runtime import cpu_kernel

    cpu_kernel.register()  # what the runtime does before it compiles an executable that calls it
    rng = np.random.default_rng(1)
    L, E, H, N = 2, 6, 16, 48
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
        got = jax.jit(experts_by_expert if kernel == "tiles" else experts_cpu_kernel)(stack, index, x, pairs)
        want = dense_experts(ExpertShard(), _Routing, stack, index, x, valid)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("pairs,buckets,spread", [(1, 5, "random"), (96, 17, "random"), (96, 17, "one key"),
                                                  (4096, 17, "random"), (300, 129, "random")])
def test_pairs_sort_as_a_stable_argsort_does(pairs, buckets, spread):
    """The counting sort of routed pairs (few experts) and the argsort it stands in for (many)
    give the same permutation: ties keep their order, so every expert's rows are its tokens in order."""
    from dp_attention.model import stable_order

    rng = np.random.default_rng(pairs + buckets)
    key = rng.integers(0, buckets, pairs) if spread == "random" else np.full(pairs, buckets - 1)
    got = jax.jit(stable_order, static_argnums=1)(jnp.asarray(key, jnp.int32), buckets)
    assert np.asarray(got).tolist() == np.argsort(key, kind="stable").tolist()
