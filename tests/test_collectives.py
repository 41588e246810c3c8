"""The compiled step contains exactly the collectives the design calls for, per layer and mode."""

import collections

import jax
import jax.numpy as jnp
import pytest

from dp_attention import (PRESETS, Bucket, CacheShape, DpPaddingMode, Layout, MeshShape, batch_shapes,
                          cache_shape, jit_step, make_mesh, weight_specs)
from export.build import COLLECTIVE
from dp_attention.model import REPLICATED_OUTPUTS
from export.hlo_cost import matmul_flops

CFG = PRESETS["qwen3-moe-tiny"]
CACHE = CacheShape(num_pages=8, page_size=8, pages_per_seq=4)


def compiled(mode, global_len, dense_reference=False, tokens=8, expert_layout=None):
    shape = MeshShape(2, 4)
    specs = weight_specs(CFG, shape, expert_layout)
    bucket = Bucket(mode, tokens, 2, global_len)
    weights = {k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in specs.items()}
    cache = cache_shape(CFG, Layout.for_mesh(CFG, shape), 2, CACHE, jnp.float32)
    step = jit_step(CFG, bucket, make_mesh(shape), specs, dense_reference=dense_reference)
    return step.lower(weights, cache, batch_shapes(2, bucket, CACHE)).compile()


def count(text):
    return collections.Counter(COLLECTIVE.findall(text))


@pytest.mark.parametrize("mode,global_len,per_moe_layer,layout", [
    # MAX_LEN: all-gather across "data" in, reduce-scatter across "data" + all-reduce over "tensor" out.
    (DpPaddingMode.MAX_LEN, 16, {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1}, None),
    # SUM_LEN: all-reduce across "data" in, all-reduce over the whole mesh out.
    (DpPaddingMode.SUM_LEN, 8, {"all-reduce": 2}, None),
    # Every expert layout exchanges the same: tokens gathered in, partial sums reduced out.
    (DpPaddingMode.MAX_LEN, 16, {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1}, "width"),
    (DpPaddingMode.SUM_LEN, 8, {"all-reduce": 2}, "ep-tensor"),
])
def test_collectives_per_layer(mode, global_len, per_moe_layer, layout):
    """Counted in the program text, where the layer scan's body holds one layer: attention once, and
    (the preset mixes layer kinds) the MoE and the dense MLP once each, in the two branches of the
    cond that picks a layer's MLP."""
    moe = sum(CFG.is_moe_layer(i) for i in range(CFG.num_layers))
    dense = CFG.num_layers - moe
    assert moe >= 1 and dense >= 1  # the preset exercises both kinds of layer
    expected = collections.Counter()
    expected["all-reduce"] += 1  # o_proj, tensor parallel
    expected["all-reduce"] += 1  # dense MLP down-projection
    for op, n in per_moe_layer.items():
        expected[op] += n
    # Once per step: the vocab-sharded logits over "tensor", then each sampled output to every group.
    expected["all-gather"] += 1 + len(REPLICATED_OUTPUTS)  # the carry stays with its group
    text = compiled(mode, global_len, expert_layout=layout).as_text()
    assert count(text) == expected
    assert " conditional(" in text


def test_sparse_experts_do_less_work_than_dense():
    """The grouped path's FLOPs (loops counted by trip count) track tokens x top-k, not x experts."""
    # 128 global tokens, top-2 of 32 experts, every expert on every device: the dense path runs every
    # token through all 32 experts (4096 rows), the grouped one at most 2*128 pairs plus one padding
    # row per expert (288 rows). (With experts split over devices, the dense path runs only a
    # device's experts, and the loop's bound covers every pair landing there.)
    sparse = matmul_flops(compiled(DpPaddingMode.MAX_LEN, 128, tokens=64, expert_layout="width").as_text())
    dense = matmul_flops(compiled(DpPaddingMode.MAX_LEN, 128, dense_reference=True, tokens=64,
                                  expert_layout="width").as_text())
    assert sparse < 0.5 * dense


@pytest.mark.parametrize("mode,global_len", [(DpPaddingMode.MAX_LEN, 16), (DpPaddingMode.SUM_LEN, 8)])
def test_packed_inputs_unpack_without_moving_data(mode, global_len):
    """The shipped step takes its batch packed (runtime.batching.to_wire); each device slices its
    own group's row, so unpacking adds no collective. Its sampled outputs go to every group as one
    array, so it gathers them once instead of once per output; computing next_ints moves nothing."""
    from dp_attention.model import jit_wire_step
    from runtime.batching import wire_shapes

    shape = MeshShape(2, 4)
    specs = weight_specs(CFG, shape)
    bucket = Bucket(mode, 8, 2, global_len)
    weights = {k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in specs.items()}
    cache = cache_shape(CFG, Layout.for_mesh(CFG, shape), 2, CACHE, jnp.float32)
    wire = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d))
            for k, (s, d) in wire_shapes({k: v.shape for k, v in batch_shapes(2, bucket, CACHE).items()}).items()}
    packed = jit_wire_step(CFG, bucket, make_mesh(shape), specs, CACHE, bucket.seqs).lower(weights, cache, wire)
    expected = count(compiled(mode, global_len).as_text())
    expected["all-gather"] -= len(REPLICATED_OUTPUTS) - 1
    assert count(packed.compile().as_text()) == expected
