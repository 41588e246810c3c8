"""The Qwen3-MoE forward step with DP attention, as Hugging Face transformers defines the model.

One step serves prefill, decode and mixed batches. Shapes (D groups, T tokens and S sequences per
group, fixed by the executable's bucket; N log-probabilities per sequence, fixed per artifact):

  batch["tokens"], ["positions"], ["seq_index"]   [D, T] int32   ragged tokens, padded per group
  batch["num_tokens"]                              [D]    int32   real tokens per group (replicated)
  batch["page_table"]                              [D, S, pages_per_seq] int32
  batch["last_index"]                              [D, S] int32   row of each sequence's last token
  batch["temperature"], ["top_p"]                  [D, S] float32 sampling, per sequence
  batch["top_k"], ["seed"]                         [D, S] int32
  batch["feed"]                                    [D, T] int32   >= 0: take this token from prev_tokens[row]
  batch["prev_tokens"]                             [D, C] int32   the previous step's "carry"
  kv                                               [D, layers, pages, page_size, 2*kv_heads, head_dim]
  -> {"tokens", "logprobs" [D, S]; "top_ids", "top_logprobs" [D, S, N]; "carry" [D, C]} and the updated
     kv (donate it).

"carry" is this step's sampled tokens padded to C (the widest bucket's S), left on the device: the
next step can take a sequence's new token from it (`feed`) without the host having read it, so the
host can plan and launch step n+1 while step n runs.

The whole step is one `shard_map` over ("data", "tensor"), so every collective is written out: a
psum over "tensor" after o_proj and the dense MLP (tensor parallel), the DP gather / scatter around
each MoE layer, and one all-gather over "tensor" of the vocab-sharded logits, which are sampled on
the device. Layers run under `lax.scan`, grouped by layer kind, so depth costs no compile time.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from runtime import cpu_kernel
from runtime.contract import SAMPLED, WIRE_APART, Bucket, advance_ints, wire_layout

from .attention import NativeAttentionBackend, PagedBatch
from .ragged import LANES, FlashAttentionBackend, block_sizes, tpu_kernel
from .config import ModelConfig
from .kv_cache import KvQuant
from .dp_attention import DpAttentionBackend, DpAttentionMetadata
from .sampling import SAMPLING_INPUTS, sample
from .weights import SCALE, Layout

DEFAULT_LOGPROBS = 8
ALL_DEVICES = ("data", "tensor")


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """KV cache geometry, fixed per artifact. Page 0 of each group is reserved (see attention.py)."""

    num_pages: int  # per group, including the reserved page
    page_size: int
    pages_per_seq: int

    @property
    def max_context(self) -> int:
        return self.pages_per_seq * self.page_size


# ------------------------------------------------------------------------------- weights as a pytree

@partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A weight-only int8 weight: int8 values and float32 per-output-channel scales, the scales' shape
    the weight's with 1 on the contracted axes (weights.quantized_specs). Indexing leading
    (non-contracted) axes indexes both, so a layer or an expert slices as a plain array does."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    def __getitem__(self, index):
        return QArray(self.q[index], self.scale[index])

    def dequantize(self, dtype):
        """q * scale in float32, then `dtype`: the operand the plain reference computes with."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def _output_scale(w: QArray, contracted: int):
    """The scales as they multiply the matmul output: the leading `contracted` size-1 axes dropped."""
    return w.scale.reshape(w.scale.shape[contracted:])


def qeinsum(spec: str, x, w, contracted: int = 1):
    """einsum(spec, x, w); for an int8 w, its values in x's dtype and the per-column scale applied to
    the float32 output. The scale commutes with the contraction, so partial sums over a contracted
    axis split across devices still add up. w's contracted axes lead (all our projections)."""
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w)
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * _output_scale(w, contracted)).astype(x.dtype)


def qdot(x, w):
    """x @ w for a 2-D w, int8 or not (see qeinsum)."""
    if not isinstance(w, QArray):
        return x @ w
    return qeinsum("...h,hi->...i", x, w)


def embed_lookup(embed, ids, dtype):
    """Rows of the embedding; an int8 one holds one scale per row."""
    if not isinstance(embed, QArray):
        return embed[ids]
    return embed[ids].dequantize(dtype)


@partial(jax.tree_util.register_dataclass, data_fields=["attn_norm", "mlp_norm", "q_norm", "k_norm",
                                                         "q_proj", "k_proj", "v_proj", "o_proj"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Every layer's attention and norms, stacked on a leading layer axis."""

    attn_norm: jax.Array  # [L, H]
    mlp_norm: jax.Array  # [L, H]
    q_norm: jax.Array  # [L, hd]
    k_norm: jax.Array  # [L, hd]
    q_proj: jax.Array  # [L, H, nq, hd]    heads over "tensor"
    k_proj: jax.Array  # [L, H, nkv, hd]
    v_proj: jax.Array  # [L, H, nkv, hd]
    o_proj: jax.Array  # [L, nq, hd, H]


@partial(jax.tree_util.register_dataclass, data_fields=["router", "gate", "up", "down"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class MoeWeights:
    """The MoE layers' router and experts; experts and their columns split over the devices as the
    expert layout says (weights.ExpertLayout): a device holds its local experts' columns."""

    router: jax.Array  # [Lm, H, E]
    gate: jax.Array  # [Lm, E, H, I]    E over the layout's expert axes, I over its width axes
    up: jax.Array  # [Lm, E, H, I]
    down: jax.Array  # [Lm, E, I, H]


@partial(jax.tree_util.register_dataclass, data_fields=["gate", "up", "down"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseWeights:
    """The dense-MLP layers (mlp_only_layers / decoder_sparse_step), width over "tensor"."""

    gate: jax.Array  # [Ld, H, Id]
    up: jax.Array  # [Ld, H, Id]
    down: jax.Array  # [Ld, Id, H]


@partial(jax.tree_util.register_dataclass,
         data_fields=["embed", "final_norm", "lm_head", "layers", "moe", "dense"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: jax.Array  # [V, H]
    final_norm: jax.Array  # [H]
    lm_head: jax.Array  # [H, V] vocab over "tensor"
    layers: LayerWeights
    moe: MoeWeights | None
    dense: DenseWeights | None

    @staticmethod
    def from_flat(flat: dict) -> "Weights":
        """From the flat {"layers.q_proj": ...} dict that executables take (plain dicts need no
        pytree registration to load, so the runtime stays free of this module). An int8 weight
        `w` comes with `w.scale` (weights.SCALE) and becomes a QArray."""
        def get(name):
            return QArray(flat[name], flat[name + SCALE]) if name + SCALE in flat else flat[name]

        group = lambda cls, prefix: (cls(**{f.name: get(f"{prefix}.{f.name}") for f in dataclasses.fields(cls)})  # noqa: E731
                                     if f"{prefix}.{dataclasses.fields(cls)[0].name}" in flat else None)
        return Weights(get("embed"), flat["final_norm"], get("lm_head"), group(LayerWeights, "layers"),
                       group(MoeWeights, "moe"), group(DenseWeights, "dense"))


def layer(stack, i):
    """Layer i of a stacked weight group."""
    return jax.tree.map(lambda a: a[i], stack)


# ------------------------------------------------------------------------------- specs & shapes

BATCH_SPECS = {
    "tokens": P("data", None),
    "positions": P("data", None),
    "seq_index": P("data", None),
    "num_tokens": P(),
    "page_table": P("data", None, None),
    "last_index": P("data", None),
    "temperature": P("data", None),
    "top_k": P("data", None),
    "top_p": P("data", None),
    "seed": P("data", None),
    "feed": P("data", None),
    "prev_tokens": P("data", None),
}
BATCH_DTYPES = {"temperature": jnp.float32, "top_p": jnp.float32}  # the rest int32
CACHE_SPEC = P("data", None, None, None, "tensor", None)
OUTPUT_SPECS = {"tokens": P("data", None), "logprobs": P("data", None),
                "top_ids": P("data", None, None), "top_logprobs": P("data", None, None),
                "carry": P("data", None)}
# Inputs that bring the previous step's sampled tokens from the device: a caller without a previous
# step (a probe, a stateless server) passes feed = -1 everywhere and any prev_tokens.
FEED_INPUTS = ("feed", "prev_tokens")
REPLICATED_OUTPUTS = ("tokens", "logprobs", "top_ids", "top_logprobs")  # what the host reads


def batch_shapes(dp: int, bucket: Bucket, cache: CacheShape, carry_seqs: int | None = None
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """carry_seqs: the carry's width C, the same for every executable of a mesh (default S)."""
    T, S = bucket.tokens, bucket.seqs
    shapes = {"tokens": (dp, T), "positions": (dp, T), "seq_index": (dp, T), "num_tokens": (dp,),
              "page_table": (dp, S, cache.pages_per_seq), "last_index": (dp, S), "feed": (dp, T),
              "prev_tokens": (dp, carry_seqs or S)}
    shapes |= {k: (dp, S) for k in SAMPLING_INPUTS}
    return {k: jax.ShapeDtypeStruct(v, BATCH_DTYPES.get(k, jnp.int32)) for k, v in shapes.items()}


def cache_shape(cfg: ModelConfig, layout: Layout, dp: int, cache: CacheShape, dtype,
                attention: str = "native") -> jax.ShapeDtypeStruct:
    """The fa kernel reads whole 128-lane head dims: its cache pads head_dim up (zeros, exact)."""
    hd = -(-cfg.head_dim // LANES) * LANES if attention == "fa" else cfg.head_dim
    shape = (dp, cfg.num_layers, cache.num_pages, cache.page_size, 2 * layout.kv_heads, hd)
    return jax.ShapeDtypeStruct(shape, dtype)


def init_cache(cfg: ModelConfig, layout: Layout, mesh, cache: CacheShape, dtype, attention: str = "native") -> jax.Array:
    s = cache_shape(cfg, layout, mesh.shape["data"], cache, dtype, attention)
    return jnp.zeros(s.shape, s.dtype, device=NamedSharding(mesh, CACHE_SPEC))


# ------------------------------------------------------------------------------- layers (per device)

def rms_norm(x, weight, eps):
    """HF Qwen3MoeRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope(x, positions, theta):
    """NeoX rotate-half RoPE. x [T, heads, hd], positions [T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_block(cfg, w: LayerWeights, x, kv, index, batch: PagedBatch, backend):
    """x [T, H] (replicated in the group) -> [T, H]; this device computes its share of the heads."""
    with jax.named_scope("projections"):
        q = qeinsum("th,hnd->tnd", x, w.q_proj)
        k = qeinsum("th,hnd->tnd", x, w.k_proj)
        v = qeinsum("th,hnd->tnd", x, w.v_proj)
    q = rope(rms_norm(q, w.q_norm, cfg.rms_norm_eps), batch.positions, cfg.rope_theta)
    k = rope(rms_norm(k, w.k_norm, cfg.rms_norm_eps), batch.positions, cfg.rope_theta)
    with jax.named_scope("attention"):
        out, kv = backend.attend(q, k, v, kv, index, batch)
    with jax.named_scope("projections"):
        partial_out = qeinsum("tnd,ndh->th", out, w.o_proj, contracted=2)
    return lax.psum(partial_out, "tensor"), kv


def dense_mlp(w: DenseWeights, x):
    """SwiGLU with the intermediate width split over "tensor"."""
    with jax.named_scope("projections"):
        out = qdot(jax.nn.silu(qdot(x, w.gate)) * qdot(x, w.up), w.down)
    return lax.psum(out, "tensor")


def route(cfg: ModelConfig, router_w, x):
    """HF router: softmax over all experts in float32, top-k, optional renormalisation."""
    logits = (x @ router_w).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts


# ------------------------------------------------------------------------------- experts (per device)
# A device holds some experts (its local ones: the layout's expert shards) on some of their
# intermediate columns (its width shard), and computes every routed (token, expert) pair of the
# global batch whose expert is local, on those columns: with routing spread evenly, work per device =
# pairs * 6HI / devices whatever the layout. Pairs are sorted by expert; the partial sums over
# experts and columns are completed, in float32, by the DP scatter.

@partial(jax.tree_util.register_dataclass, data_fields=["token", "weight", "counts"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RoutedPairs:
    """The (token, expert) pairs of a batch, sorted by expert; invalid pairs sort last."""

    token: jax.Array  # [M] the token of each sorted pair
    weight: jax.Array  # [M] its routing weight (0 for invalid pairs)
    counts: jax.Array  # [E] pairs per expert

    @property
    def starts(self) -> jax.Array:
        return jnp.cumsum(self.counts) - self.counts


def sort_pairs(cfg: ModelConfig, router_w, x, valid) -> RoutedPairs:
    N = x.shape[0]
    E, k = router_w.shape[-1], cfg.experts_per_token
    weights, experts = route(cfg, router_w, x)
    pair_token = jnp.arange(N * k) // k
    key = jnp.where(valid[pair_token], experts.reshape(-1), E)
    order = stable_order(key, E + 1)
    counts = jnp.zeros(E + 1, jnp.int32).at[key].add(1)[:E]
    weight = jnp.where(key < E, weights.reshape(-1), 0)[order]
    return RoutedPairs(pair_token[order], weight, counts)


COUNTING_SORT_BUCKETS = 32  # up to this many keys a counting sort beats XLA:CPU's argsort (4,096 pairs:
# 0.21 against 0.47 ms; 129 keys over 8,192 pairs: 1.8 against 1.1 ms)


def stable_order(key, buckets: int):
    """jnp.argsort(key, stable=True) for integer keys in [0, buckets). With few buckets, by counting:
    a pair's place is the pairs of smaller keys plus the earlier pairs of its own, O(pairs x
    buckets) adds instead of a comparison sort, which XLA:CPU runs slowly (and every device of a
    mesh sorts all of a step's pairs)."""
    if buckets > COUNTING_SORT_BUCKETS:
        return jnp.argsort(key, stable=True)
    onehot = (key[:, None] == jnp.arange(buckets)).astype(jnp.int32)  # [M, buckets]
    before_mine = jnp.cumsum(onehot, axis=0) - onehot  # earlier pairs of each key
    counts = onehot.sum(axis=0)
    place = (jnp.cumsum(counts) - counts)[key] + jnp.take_along_axis(before_mine, key[:, None], axis=1)[:, 0]
    return jnp.zeros_like(key).at[place].set(jnp.arange(key.shape[0], dtype=key.dtype), unique_indices=True)


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Where this device's experts sit among all of them: the mesh axes that split the experts
    (none: every device holds every expert) and how many shards they make."""

    axes: tuple[str, ...] = ()
    shards: int = 1

    @staticmethod
    def from_spec(gate_spec, mesh) -> "ExpertShard":
        """From the stacked gate weight's PartitionSpec [layers, E, H, I]."""
        axes = gate_spec[1] if len(gate_spec) > 1 else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = 1
        for a in axes:
            shards *= mesh.shape[a]
        return ExpertShard(axes, shards)

    def first_expert(self, local_experts: int) -> jax.Array:
        """The global index of this device's first expert (inside the step's shard_map)."""
        if not self.axes:
            return jnp.int32(0)
        return (lax.axis_index(self.axes) * local_experts).astype(jnp.int32)


def padded_counts(pairs: RoutedPairs, total: int) -> jax.Array:
    """Pairs per expert over the padded expert count (padded experts get none)."""
    return jnp.pad(pairs.counts, (0, total - pairs.counts.shape[0])).astype(jnp.int32)


def local_pairs(pairs: RoutedPairs, first, local: int, total: int) -> RoutedPairs:
    """The pairs of experts [first, first + local) of `total`, moved to the front and renumbered from
    0; the rest keep their rows but weigh 0, so a worst routing (every pair local) still fits."""
    counts = padded_counts(pairs, total)
    mine = lax.dynamic_slice(counts, (first,), (local,))
    start = (jnp.cumsum(counts) - counts)[first]
    token, weight = jnp.roll(pairs.token, -start), jnp.roll(pairs.weight, -start)
    weight = jnp.where(jnp.arange(token.shape[0]) < jnp.sum(mine), weight, 0)
    return RoutedPairs(token, weight, mine)


def rows_per_tile(pairs: int, experts: int) -> int:
    """Rows per tile of the CPU loop: a power of two near half an expert's average share of the
    pairs. Each iteration costs far more in loop overhead than its FLOPs on a CPU, so a tile may
    run half empty; an expert wastes less than one tile, at most a quarter of the pairs on average."""
    share = pairs / max(1, min(experts, pairs))
    m = 1
    while m < 64 and 2 * m <= share / 2:
        m *= 2
    return m


def experts_by_expert(stack: MoeWeights, index, x, pairs: RoutedPairs):
    """CPU: a loop over the experts that have pairs, and inside it over their rows, a tile at a time.

    Each expert's weights are read from the layer stack once per expert: slicing the whole layer
    first, or once per tile, copies megabytes a step (XLA:CPU materialises a dynamic slice that feeds
    a loop or a dot). The loops' trip counts are the real ones, so any routing fits the shapes."""
    N, H = x.shape
    M, E = pairs.token.shape[0], pairs.counts.shape[0]
    m = rows_per_tile(M, E)
    starts = pairs.starts

    def expert(e, y):
        gate, up, down = stack.gate[index, e], stack.up[index, e], stack.down[index, e]
        first, count = starts[e], pairs.counts[e]

        def tile(carry):
            t, y = carry
            row = first + t * m + jnp.arange(m)
            ok = row < first + count
            row = jnp.minimum(row, M - 1)
            token = pairs.token[row]
            xt = x[token]  # [m, H]
            h = jax.nn.silu(qdot(xt, gate)) * qdot(xt, up)  # [m, I/devices]
            out = qdot(h, down) * jnp.where(ok, pairs.weight[row], 0)[:, None]
            return t + 1, y.at[token].add(out)

        return lax.while_loop(lambda carry: carry[0] * m < count, tile, (jnp.int32(0), y))[1]

    return lax.fori_loop(0, E, expert, jnp.zeros((N, H), x.dtype))


def experts_ragged(w: MoeWeights, x, pairs: RoutedPairs):
    """TPU inside a multi-platform export, where the Pallas kernel cannot sit beside a CPU branch:
    grouped matmuls over the sorted local pairs (`lax.ragged_dot`, native there)."""
    N, H = x.shape
    xs = x[pairs.token]
    sizes = pairs.counts.astype(jnp.int32)
    group = row_groups(sizes, 0, xs.shape[0], sizes.shape[0])

    def grouped(lhs, rhs):
        if not isinstance(rhs, QArray):
            return lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
        out = lax.ragged_dot(lhs, rhs.q.astype(lhs.dtype), sizes, preferred_element_type=jnp.float32)
        return out * rhs.scale[group, 0]

    h = jax.nn.silu(grouped(xs, w.gate)) * grouped(xs, w.up)
    out = grouped(h.astype(x.dtype), w.down)
    real = jnp.arange(xs.shape[0]) < jnp.sum(sizes)
    out = jnp.where(real[:, None], out * pairs.weight[:, None], 0)
    return jnp.zeros((N, H), jnp.float32).at[pairs.token].add(out)


def row_groups(counts, first, rows: int, local: int):
    """For each of `rows` rows sorted by expert (counts per expert, over every expert), its expert
    among the `local` ones from `first`, clipped into range: which scales an int8 expert's output
    rows take. Rows of other experts get a neighbour's, and are masked out after."""
    ends = jnp.cumsum(counts)
    expert = jnp.searchsorted(ends, jnp.arange(rows), side="right")
    return jnp.clip(expert - first, 0, local - 1)


# Rows per grouped-matmul tile, at most: the matrix unit is 128 rows tall (256 on v6e).
GMM_ROWS = {"v5e": 128, "v5p": 128, "v6e": 256}


def gmm_tiling(m: int, k: int, n: int, generation: str | None, groups: int = 1) -> tuple[int, int, int]:
    """(rows, contraction, columns) tile of megablox gmm for an [m, k] x [k, n] problem over `groups`
    experts. Rows: a group that starts inside a tile costs that whole tile again, and under random
    routing an expert's rows scatter around its even share, so a tile a quarter of that share (a
    power of two, from 16 to the unit's height) keeps the waste near a quarter of the rows.
    Lanes: the whole dimension when it is not a multiple of 128 (a block must be one or the other),
    else the largest of 512 / 256 / 128 that divides it."""
    def lanes(d):
        if d % LANES:
            return d
        return next(t for t in (512, 256, 128) if d % t == 0)

    share = max(1, m // max(1, groups) // 4)
    tm = min(GMM_ROWS.get(generation or "v5e", 128), max(16, 1 << (share.bit_length() - 1)))
    return tm, lanes(k), lanes(n)


def experts_gmm(w: MoeWeights, x, pairs: RoutedPairs, first, total: int, generation: str | None = None,
                interpret: bool = False):
    """TPU: the megablox grouped matmul over the globally sorted pairs; `group_offset` makes it
    compute only this device's experts' rows (the rest are zero). Float32 accumulation, float32
    partial sums.

    pairs: every expert's pairs, sorted by expert (sort_pairs); first: this device's first expert;
    total: the padded expert count, of which w holds w.gate.shape[0] from `first`."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # TPU exports only: keeps CPU imports light

    N, H = x.shape
    local, _, width = w.gate.shape
    counts = padded_counts(pairs, total)
    tm, _, _ = gmm_tiling(pairs.token.shape[0], H, width, generation, total)
    rows = -(-pairs.token.shape[0] // tm) * tm  # gmm wants whole row tiles
    token = jnp.pad(pairs.token, (0, rows - pairs.token.shape[0]))
    weight = jnp.pad(pairs.weight, (0, rows - pairs.token.shape[0]))
    offset = None if local == total else jnp.asarray(first, jnp.int32)

    group = row_groups(counts, first, rows, local) if isinstance(w.gate, QArray) else None

    def grouped(lhs, rhs, dtype):  # accumulates in float32 inside the kernel, stores `dtype`
        if isinstance(rhs, QArray):  # the kernel takes one dtype: int8 values in lhs's, scales on its rows
            out = grouped(lhs, rhs.q.astype(lhs.dtype), jnp.float32)
            return (out * rhs.scale[group, 0]).astype(dtype)
        return gmm(lhs, rhs, counts, preferred_element_type=dtype, group_offset=offset, interpret=interpret,
                   tiling=(tm,) + gmm_tiling(rows, *rhs.shape[1:], generation, total)[1:])

    xs = x[token]
    # gate and up stored in the activations' dtype, as HF's Linear layers return them (half the bytes
    # of float32 over every row of the worst-case buffer); the expert outputs in float32, summed so.
    h = jax.nn.silu(grouped(xs, w.gate, x.dtype)) * grouped(xs, w.up, x.dtype)
    out = grouped(h, w.down, jnp.float32)  # [rows, H]
    start = (jnp.cumsum(counts) - counts)[first]
    row = jnp.arange(rows)
    mine = (row >= start) & (row < start + lax.dynamic_slice(counts, (first,), (local,)).sum())
    out = jnp.where(mine[:, None], out * weight[:, None].astype(jnp.float32), 0)  # unwritten rows may be anything
    return jnp.zeros((N, H), jnp.float32).at[token].add(out)


EXPERT_KERNELS = ("tiles", "cpu", "gmm", "gmm-interpret", "by-platform")


def experts_cpu_kernel(stack: MoeWeights, index, x, pairs: RoutedPairs):
    """CPU: experts_by_expert's sums from the C++ kernel (runtime.cpu_kernel), which reads each
    pair's token row and each expert's weights in place and shares chunks of pairs among the host's
    cores. float32 weights only (an int8 stack takes the loop)."""
    cpu_kernel.prepare()  # built meanwhile; registered before compiling (runtime.cpu_kernel.register)
    call = jax.ffi.ffi_call(cpu_kernel.EXPERTS, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x, stack.gate, stack.up, stack.down, jnp.asarray(index, jnp.int32).reshape(1), pairs.token,
                pairs.weight.astype(jnp.float32), pairs.counts.astype(jnp.int32))


def routed_experts(shard: ExpertShard, kernel: str, generation: str | None, cfg: ModelConfig, stack: MoeWeights,
                   index, x, valid):
    """This device's share (its experts, its columns) of every routed pair over the global tokens
    x [N, H] -> float32 [N, H] partial sums.

    kernel: "tiles" (the CPU loop), "cpu" (the C++ kernel; an int8 stack takes the loop), "gmm" (the
    Pallas TPU kernel), "gmm-interpret" (the same kernel interpreted, tests on CPU) or "by-platform" (ragged_dot on TPU, tiles elsewhere: multi-platform
    exports). `stack` holds every MoE layer; `index` picks this one (the CPU loop slices each
    expert from the stack, never the whole layer)."""
    with jax.named_scope("experts"):
        pairs = sort_pairs(cfg, stack.router[index], x, valid)
        local = stack.gate.shape[1]
        total = local * shard.shards
        first = shard.first_expert(local)
        if kernel in ("gmm", "gmm-interpret"):
            return experts_gmm(layer(stack, index), x, pairs, first, total, generation, interpret=kernel == "gmm-interpret")
        mine = local_pairs(pairs, first, local, total)
        # The CPU loop sees float32 tokens, so it computes and accumulates in float32 (XLA:CPU
        # computes a bfloat16 dot on float32 copies anyway).
        if kernel == "cpu" and not isinstance(stack.gate, QArray) and stack.gate.dtype == jnp.float32:
            return experts_cpu_kernel(stack, index, x.astype(jnp.float32), mine)
        if kernel in ("tiles", "cpu"):
            return experts_by_expert(stack, index, x.astype(jnp.float32), mine)
        return lax.platform_dependent(
            stack, index, x, mine,
            tpu=lambda stack, index, x, p: experts_ragged(layer(stack, index), x, p),
            default=lambda stack, index, x, p: experts_by_expert(stack, index, x.astype(jnp.float32), p))


def dense_experts(shard: ExpertShard, cfg: ModelConfig, stack: MoeWeights, index, x, valid):
    """Reference only: every local expert on every token (FLOPs grow with N * experts); int8 experts
    dequantized whole, as the plain reference of the quantization computes."""
    w = layer(stack, index)
    w = jax.tree.map(lambda a: a.dequantize(x.dtype) if isinstance(a, QArray) else a, w,
                     is_leaf=lambda a: isinstance(a, QArray))
    weights, experts = route(cfg, w.router, x)
    E = w.gate.shape[0]
    onehot = (experts[..., None] == shard.first_expert(E) + jnp.arange(E)).astype(x.dtype)  # [N, k, E]
    coef = jnp.einsum("nk,nke->ne", weights, onehot) * valid[:, None].astype(x.dtype)
    h = jax.nn.silu(jnp.einsum("nh,ehi->nei", x, w.gate)) * jnp.einsum("nh,ehi->nei", x, w.up)
    return jnp.einsum("nei,eih,ne->nh", h, w.down, coef, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------- the layer scan

def run_layers(cfg: ModelConfig, w: Weights, x, kv, paged: PagedBatch, backend, experts_fn,
               unroll_mixed: bool = False):
    """Every decoder layer in one scan; the cache is the carry, written in place.

    A model that mixes dense-MLP and MoE layers picks each layer's MLP with a cond, so attention
    and each MLP kind are traced and compiled once however the kinds interleave (unrolling a
    pattern such as MoE, dense, MoE would compile attention three times). All-MoE models, the real
    sizes, have no cond. `unroll_mixed`: a mixed model's layers unrolled instead, each with its own
    MLP and no cond (for expert kernels that must not sit inside one)."""
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
    moe_index = jnp.array([sum(kinds[:i]) for i in range(len(kinds))], jnp.int32)  # position in the MoE stack
    dense_index = jnp.arange(len(kinds), dtype=jnp.int32) - moe_index  # and in the dense stack
    is_moe = jnp.array(kinds)
    valid = backend.global_valid()

    def moe_mlp(h, i):
        g = backend.gather(h)
        return backend.scatter(experts_fn(cfg, w.moe, moe_index[i], g, valid)).astype(h.dtype)  # f32 sum

    def dense(h, i):
        return dense_mlp(layer(w.dense, dense_index[i]), h)

    def one_layer(x, kv, i, mlp):
        lw = layer(w.layers, i)
        h, kv = attention_block(cfg, lw, rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), kv, i, paged, backend)
        x = x + h
        return x + mlp(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps), i), kv

    if unroll_mixed and any(kinds) and not all(kinds):
        for i in range(cfg.num_layers):
            x, kv = one_layer(x, kv, i, moe_mlp if kinds[i] else dense)
        return x, kv
    mlp = moe_mlp if all(kinds) else dense if not any(kinds) else (
        lambda h, i: lax.cond(is_moe[i], moe_mlp, dense, h, i))
    (x, kv), _ = lax.scan(lambda carry, i: (one_layer(*carry, i, mlp), None), (x, kv), jnp.arange(cfg.num_layers))
    return x, kv


# ------------------------------------------------------------------------------- the step

ATTENTION_BACKENDS = ("native", "fa", "cpu")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a step is built, beyond its bucket.

    attention: "native" (pure JAX, runs everywhere), "cpu" (the native tiles in a C++ kernel, CPU
    only, float32 caches; runtime.cpu_kernel) or "fa" (the Pallas ragged paged attention kernel, TPU only;
    `fa_kernel` swaps in another function of the kernel's signature, e.g. the pure-JAX reference
    for tests). tpu_generation picks the kernel's tuned block sizes.
    """

    dense_reference: bool = False  # all-experts MoE: the test and build reference, never served
    num_logprobs: int = DEFAULT_LOGPROBS
    with_logits: bool = False  # also return the last-token logits: tests and the reference only
    attention: str = "native"
    tpu_generation: str | None = None
    fa_kernel: object = None
    experts: str = "tiles"  # the expert kernel, one of EXPERT_KERNELS (see routed_experts, device_step)
    kv_quant: KvQuant | None = None  # an 8-bit KV cache and its scales; None: the cache is in the build dtype

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.experts not in EXPERT_KERNELS:
            raise ValueError(f"experts {self.experts!r} is not one of {EXPERT_KERNELS}")

    def base_backend(self, q_heads: int, dtype, kv, batch: PagedBatch, last_index):
        """The attention the DP wrapper wraps, for this device's shapes."""
        want = jnp.dtype(self.kv_quant.dtype) if self.kv_quant is not None else None
        if (want is not None and kv.dtype != want) or (want is None and kv.dtype.itemsize == 1):
            raise ValueError(f"KV cache of dtype {kv.dtype} but the step was built for "
                             f"{want or 'a cache in the build dtype'}: pass kv_quant for an 8-bit cache, and a "
                             f"cache of its dtype")
        if self.attention in ("native", "cpu"):
            return NativeAttentionBackend(quant=self.kv_quant, kernel=self.attention == "cpu")
        _, _, page_size, two_kv, hd = kv.shape
        tokens, pages_per_seq = batch.positions.shape[0], batch.page_table.shape[1]
        blocks = block_sizes(self.tpu_generation, dtype, kv.dtype, q_heads, two_kv // 2, hd, page_size, tokens,
                             pages_per_seq)
        return FlashAttentionBackend(self.fa_kernel or tpu_kernel(), last_index, blocks, self.kv_quant)


def device_step(cfg: ModelConfig, bucket: Bucket, opts: StepOptions, shard: ExpertShard, flat_weights, kv, batch):
    """Runs on one device: weights are its shards, kv and batch its group's (data axis of size 1)."""
    w = Weights.from_flat(flat_weights)
    b = {k: (v if k == "num_tokens" else v[0]) for k, v in batch.items()}
    T = bucket.tokens
    valid = jnp.arange(T) < b["num_tokens"][lax.axis_index("data")]
    paged = PagedBatch(positions=jnp.where(valid, b["positions"], 0), seq_index=jnp.where(valid, b["seq_index"], 0),
                       valid=valid, page_table=b["page_table"])
    meta = DpAttentionMetadata(bucket.mode, lax.axis_size("data"), T, bucket.global_len, b["num_tokens"])
    fed = b["prev_tokens"][jnp.clip(b["feed"], 0, b["prev_tokens"].shape[0] - 1)]
    x = embed_lookup(w.embed, jnp.where(b["feed"] >= 0, fed, b["tokens"]), w.final_norm.dtype)
    kv = kv[0]
    base = opts.base_backend(w.layers.q_proj.shape[2], x.dtype, kv, paged, b["last_index"])
    backend = DpAttentionBackend(base, meta)
    experts_fn = (partial(dense_experts, shard) if opts.dense_reference
                  else partial(routed_experts, shard, opts.experts, opts.tpu_generation))
    # A multi-platform export chooses its expert kernel with lax.platform_dependent, whose TPU branch
    # (ragged_dot) XLA:CPU can drop only where the platform constant reaches it: not inside a cond.
    x, kv = run_layers(cfg, w, x, kv, paged, backend, experts_fn, unroll_mixed=opts.experts == "by-platform")

    last = rms_norm(x[b["last_index"]], w.final_norm, cfg.rms_norm_eps)  # [S, H]
    with jax.named_scope("projections"):
        logits = qdot(last, w.lm_head)
    position = paged.positions[b["last_index"]] + 1  # of the token being sampled
    params = {k: b[k] for k in SAMPLING_INPUTS}
    S, tp = logits.shape[0], lax.axis_size("tensor")
    if tp > 1 and S % tp == 0 and not opts.with_logits:
        # The group's tensor devices each sample a tp-th of its sequences, not all of them: the
        # vocabulary shards trade places with the sequences' (one all-to-all of the logits'
        # size, as the all-gather below moves), and the small sampled outputs are gathered back.
        logits = lax.all_to_all(logits, "tensor", 0, 1, tiled=True).astype(jnp.float32)  # [S/tp, V]
        mine = lax.axis_index("tensor") * (S // tp) + jnp.arange(S // tp)
        logits = jnp.where(jnp.arange(logits.shape[1]) < cfg.vocab_size, logits, -jnp.inf)
        with jax.named_scope("sampling"):
            out = sample(logits, {k: v[mine] for k, v in params.items()}, position[mine], opts.num_logprobs)
        out = {k: lax.all_gather(v, "tensor", axis=0, tiled=True) for k, v in out.items()}
    else:
        logits = lax.all_gather(logits, "tensor", axis=1, tiled=True).astype(jnp.float32)
        logits = jnp.where(jnp.arange(logits.shape[1]) < cfg.vocab_size, logits, -jnp.inf)
        with jax.named_scope("sampling"):
            out = sample(logits, params, position, opts.num_logprobs)
    if opts.with_logits:
        out["logits"] = logits[:, :cfg.vocab_size]
    carry = b["prev_tokens"].shape[0]
    out["carry"] = jnp.zeros((carry,), jnp.int32).at[:min(carry, out["tokens"].shape[0])].set(out["tokens"][:carry])
    return {k: v[None] for k, v in out.items()}, kv[None]


def make_step(cfg: ModelConfig, bucket: Bucket, mesh, weight_specs: dict, **options):
    """The step for one bucket as a function of (weights, kv, batch) -> (outputs, kv).

    `mesh` may be an AbstractMesh: exporting for a fleet needs no devices. `options` are
    StepOptions' fields.
    """
    opts = StepOptions(**options)
    w_specs = {k: s.spec for k, s in weight_specs.items()}
    out_specs = dict(OUTPUT_SPECS) | ({"logits": P("data", None, None)} if opts.with_logits else {})
    shard = ExpertShard.from_spec(w_specs["moe.gate"], mesh) if "moe.gate" in w_specs else ExpertShard()
    return jax.shard_map(
        partial(device_step, cfg, bucket, opts, shard),
        mesh=mesh,
        in_specs=(w_specs, CACHE_SPEC, BATCH_SPECS),
        out_specs=(out_specs, CACHE_SPEC),
        check_vma=False,
    )


def _jit(fn, mesh, weight_specs: dict, batch_specs: dict, with_logits: bool,
         replicated: tuple[str, ...] = REPLICATED_OUTPUTS, resident: tuple[str, ...] = ()):
    """jit (weights, kv, batch) -> (outputs, kv) with the cache donated, inputs and outputs pinned.
    `replicated`: the outputs every host reads; `resident`: further outputs that stay split over
    groups, like the carry."""
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    # Outputs replicated: every host of a multi-host mesh reads every group's sampled tokens, so all
    # of them can take the same scheduling decisions (a few bytes per sequence). The carry stays
    # with its group, where the next step reads it.
    outputs = {k: ns(P()) for k in replicated + ("logits",) * with_logits}
    outputs |= {k: ns(P("data", None)) for k in ("carry",) + resident}
    return jax.jit(fn, in_shardings=({k: ns(s.spec) for k, s in weight_specs.items()}, ns(CACHE_SPEC),
                                     {k: ns(s) for k, s in batch_specs.items()}),
                   out_shardings=(outputs, ns(CACHE_SPEC)), donate_argnums=(1,))


def jit_step(cfg: ModelConfig, bucket: Bucket, mesh, weight_specs: dict, **options):
    """The step on the unpacked batch (tests and the build's reference)."""
    return _jit(make_step(cfg, bucket, mesh, weight_specs, **options), mesh, weight_specs, BATCH_SPECS,
                bool(options.get("with_logits")))


WIRE_SPECS = {"ints": P("data", None), "floats": P("data", None), "num_tokens": P(), "prev_tokens": P("data", None)}


def from_wire(wire: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The batch back from its wire arrays: column slices of arrays split over groups, so each
    device slices its own group's row and nothing moves between devices."""
    dp = shapes["tokens"][0]
    batch = {k: wire[k] for k in WIRE_APART}
    for name, (array, start, end, per_group) in wire_layout(shapes).items():
        batch[name] = wire[array][:, start:end].reshape((dp,) + per_group)
    return batch


def jit_wire_step(cfg: ModelConfig, bucket: Bucket, mesh, weight_specs: dict, cache: CacheShape, carry_seqs: int,
                  **options):
    """The step as an artifact ships it: (weights, kv, wire) -> (outputs, kv), the batch packed
    into a few arrays (runtime.batching.to_wire), so a step is a few host-to-device transfers.
    Its sampled outputs come back as one array, `sampled` (to_sampled), and it also returns
    `next_ints` [D, K], left on the device: its ints one decode step on
    (runtime.batching.advance_ints), which a steady decode step takes instead of a transfer."""
    shapes = {k: v.shape for k, v in batch_shapes(mesh.shape["data"], bucket, cache, carry_seqs).items()}
    layout = wire_layout(shapes)
    step = make_step(cfg, bucket, mesh, weight_specs, **options)

    def wire_step(weights, kv, wire):
        outputs, kv = step(weights, kv, from_wire(wire, shapes))
        outputs = {k: v for k, v in outputs.items() if k not in REPLICATED_OUTPUTS} | {"sampled": to_sampled(outputs)}
        outputs["next_ints"] = advance_ints(wire["ints"], wire["num_tokens"], layout, jnp)
        return outputs, kv

    return _jit(wire_step, mesh, weight_specs, WIRE_SPECS, bool(options.get("with_logits")), replicated=("sampled",),
                resident=("next_ints",))


def to_sampled(outputs: dict) -> jax.Array:
    """The four sampled outputs as one int32 [D, S, 2 + 2N] array, floats bit for bit (as ints, so
    no float handling can touch them), in the order of runtime.batching.SAMPLED (read back with
    from_sampled): the host reads one array."""
    def column(x):
        x = x[..., None] if x.ndim == 2 else x
        return lax.bitcast_convert_type(x, jnp.int32) if x.dtype == jnp.float32 else x

    return jnp.concatenate([column(outputs[name]) for name, _ in SAMPLED], axis=-1)
