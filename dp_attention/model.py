"""The Qwen3-MoE forward step with DP attention, as Hugging Face transformers defines the model.

One step serves prefill, decode and mixed batches. Shapes (D groups, T tokens and S sequences per
group, fixed by the executable's bucket):

  batch["tokens"], ["positions"], ["seq_index"]   [D, T] int32   ragged tokens, padded per group
  batch["num_tokens"]                              [D]    int32   real tokens per group (replicated)
  batch["page_table"]                              [D, S, pages_per_seq] int32
  batch["last_index"]                              [D, S] int32   row of each sequence's last token
  cache[layer]["k" | "v"]                          [D, pages, page_size, kv_heads, head_dim]
  -> logits [D, S, vocab] for each sequence's last token, and the updated cache (donate it).

The whole step is one `shard_map` over ("data", "tensor"), so every collective is written out: a
psum over "tensor" after o_proj and the dense MLP (tensor parallel), the DP gather / scatter around
each MoE layer, and one all-gather of the vocab-sharded logits at the end.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from .attention import NativeAttentionBackend, PagedBatch
from .config import ModelConfig
from .dp_attention import DpAttentionBackend, DpAttentionMetadata, DpPaddingMode
from .weights import Layout

EXPERT_TILE = 8  # rows per grouped-matmul tile; each tile belongs to one expert


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """KV cache geometry, fixed per artifact. Page 0 of each group is reserved (see attention.py)."""

    num_pages: int  # per group, including the reserved page
    page_size: int
    pages_per_seq: int

    @property
    def max_context(self) -> int:
        return self.pages_per_seq * self.page_size


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Every static shape of one executable."""

    mode: DpPaddingMode
    tokens: int  # per group (T)
    seqs: int  # per group (S)
    global_len: int  # rows of the MoE exchange buffer: D*T for MAX_LEN, the summed bucket for SUM_LEN

    @classmethod
    def like(cls, other) -> "Bucket":
        """From any bucket with the same fields and a mode named "max_len" / "sum_len" (the runtime's)."""
        return cls(DpPaddingMode(other.mode), other.tokens, other.seqs, other.global_len)


# ------------------------------------------------------------------------------- specs & shapes

BATCH_SPECS = {
    "tokens": P("data", None),
    "positions": P("data", None),
    "seq_index": P("data", None),
    "num_tokens": P(),
    "page_table": P("data", None, None),
    "last_index": P("data", None),
}
CACHE_SPEC = P("data", None, None, "tensor", None)


def batch_shapes(dp: int, bucket: Bucket, cache: CacheShape) -> dict[str, jax.ShapeDtypeStruct]:
    T, S = bucket.tokens, bucket.seqs
    shapes = {
        "tokens": (dp, T), "positions": (dp, T), "seq_index": (dp, T), "num_tokens": (dp,),
        "page_table": (dp, S, cache.pages_per_seq), "last_index": (dp, S),
    }
    return {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}


def cache_shapes(cfg: ModelConfig, layout: Layout, dp: int, cache: CacheShape, dtype) -> list[dict]:
    shape = (dp, cache.num_pages, cache.page_size, layout.kv_heads, cfg.head_dim)
    return [{"k": jax.ShapeDtypeStruct(shape, dtype), "v": jax.ShapeDtypeStruct(shape, dtype)}
            for _ in range(cfg.num_layers)]


def init_cache(cfg: ModelConfig, layout: Layout, mesh, cache: CacheShape, dtype) -> list[dict]:
    sharding = NamedSharding(mesh, CACHE_SPEC)
    return [{k: jnp.zeros(s.shape, s.dtype, device=sharding) for k, s in layer.items()}
            for layer in cache_shapes(cfg, layout, mesh.shape["data"], cache, dtype)]


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


def attention_block(cfg, w, x, k_cache, v_cache, batch: PagedBatch, backend):
    """x [T, H] (replicated in the group) -> [T, H]; this device computes its share of the heads."""
    q = jnp.einsum("th,hnd->tnd", x, w["q_proj"])
    k = jnp.einsum("th,hnd->tnd", x, w["k_proj"])
    v = jnp.einsum("th,hnd->tnd", x, w["v_proj"])
    q = rope(rms_norm(q, w["q_norm"], cfg.rms_norm_eps), batch.positions, cfg.rope_theta)
    k = rope(rms_norm(k, w["k_norm"], cfg.rms_norm_eps), batch.positions, cfg.rope_theta)
    out, k_cache, v_cache = backend.attend(q, k, v, k_cache, v_cache, batch)
    partial_out = jnp.einsum("tnd,ndh->th", out, w["o_proj"])
    return lax.psum(partial_out, "tensor"), k_cache, v_cache


def dense_mlp(w, x):
    """SwiGLU with the intermediate width split over "tensor"."""
    h = jax.nn.silu(x @ w["mlp_gate"]) * (x @ w["mlp_up"])
    return lax.psum(h @ w["mlp_down"], "tensor")


def route(cfg: ModelConfig, router_w, x):
    """HF router: softmax over all experts in float32, top-k, optional renormalisation."""
    logits = (x @ router_w).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts


def local_experts(cfg: ModelConfig, w, x, valid):
    """This device's experts over the global tokens x [N, H] -> partial sums [N, H].

    Sparse: only the (token, expert) pairs routed to this device's experts are computed. Pairs are
    sorted by expert and laid out in tiles of EXPERT_TILE rows, each tile owned by one expert, so the
    work is bounded by N * top_k + experts * tile rows, never N * experts.
    """
    N, H = x.shape
    E_local = w["expert_gate"].shape[0]
    k, m = cfg.experts_per_token, EXPERT_TILE
    first = (lax.axis_index("data") * lax.axis_size("tensor") + lax.axis_index("tensor")) * E_local

    weights, experts = route(cfg, w["router"], x)
    pairs = N * k
    pair_token = jnp.arange(pairs) // k
    local_e = experts.reshape(-1) - first
    mine = valid[pair_token] & (local_e >= 0) & (local_e < E_local)
    key = jnp.where(mine, local_e, E_local)

    counts = jnp.zeros(E_local + 1, jnp.int32).at[key].add(1)[:E_local]
    padded = (counts + m - 1) // m * m
    start = jnp.cumsum(counts) - counts  # first sorted position of each expert
    row0 = jnp.cumsum(padded) - padded  # first tile row of each expert
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    rows_total = -(-(pairs + E_local * (m - 1)) // m) * m
    safe_key = jnp.minimum(sorted_key, E_local - 1)
    dest = jnp.where(sorted_key < E_local, row0[safe_key] + jnp.arange(pairs) - start[safe_key], rows_total)

    row_token = jnp.full(rows_total, N, jnp.int32).at[dest].set(pair_token[order], mode="drop")
    row_weight = jnp.zeros(rows_total, x.dtype).at[dest].set(weights.reshape(-1)[order], mode="drop")
    x_rows = jnp.concatenate([x, jnp.zeros((1, H), x.dtype)])[row_token]

    tiles = rows_total // m
    tile_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(tiles) * m, side="right")
    tile_expert = jnp.minimum(tile_expert, E_local - 1)
    xt = x_rows.reshape(tiles, m, H)
    gate = jnp.einsum("tmh,thi->tmi", xt, w["expert_gate"][tile_expert])
    up = jnp.einsum("tmh,thi->tmi", xt, w["expert_up"][tile_expert])
    out = jnp.einsum("tmi,tih->tmh", jax.nn.silu(gate) * up, w["expert_down"][tile_expert])
    out = out.reshape(rows_total, H) * row_weight[:, None]
    return jnp.zeros((N + 1, H), x.dtype).at[row_token].add(out)[:N]


def dense_experts(cfg: ModelConfig, w, x, valid):
    """Reference only: every local expert on every token (FLOPs grow with N * experts)."""
    E_local = w["expert_gate"].shape[0]
    first = (lax.axis_index("data") * lax.axis_size("tensor") + lax.axis_index("tensor")) * E_local
    weights, experts = route(cfg, w["router"], x)
    onehot = (experts[..., None] == first + jnp.arange(E_local)).astype(x.dtype)  # [N, k, E_local]
    coef = jnp.einsum("nk,nke->ne", weights, onehot) * valid[:, None].astype(x.dtype)
    h = jax.nn.silu(jnp.einsum("nh,ehi->nei", x, w["expert_gate"])) * jnp.einsum("nh,ehi->nei", x, w["expert_up"])
    return jnp.einsum("nei,eih,ne->nh", h, w["expert_down"], coef)


# ------------------------------------------------------------------------------- the step

def device_step(cfg: ModelConfig, bucket: Bucket, dense_reference: bool, weights, cache, batch):
    """Runs on one device: weights are its shards, batch is its group's (leading dim 1)."""
    b = {k: (v if k == "num_tokens" else v[0]) for k, v in batch.items()}
    T = bucket.tokens
    valid = jnp.arange(T) < b["num_tokens"][lax.axis_index("data")]
    paged = PagedBatch(positions=jnp.where(valid, b["positions"], 0), seq_index=jnp.where(valid, b["seq_index"], 0),
                       valid=valid, page_table=b["page_table"])
    meta = DpAttentionMetadata(bucket.mode, lax.axis_size("data"), T, bucket.global_len, b["num_tokens"])
    backend = DpAttentionBackend(NativeAttentionBackend(), meta)
    experts_fn = dense_experts if dense_reference else local_experts

    x = weights["embed"][b["tokens"]]
    new_cache = []
    for i in range(cfg.num_layers):
        w = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"layers.{i}.")}
        kc, vc = cache[i]["k"][0], cache[i]["v"][0]
        h, kc, vc = attention_block(cfg, w, rms_norm(x, w["attn_norm"], cfg.rms_norm_eps), kc, vc, paged, backend)
        new_cache.append({"k": kc[None], "v": vc[None]})
        x = x + h
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        if cfg.is_moe_layer(i):
            g = backend.gather(h)
            h = backend.scatter(experts_fn(cfg, w, g, backend.global_valid()))
        else:
            h = dense_mlp(w, h)
        x = x + h

    last = rms_norm(x[b["last_index"]], weights["final_norm"], cfg.rms_norm_eps)  # [S, H]
    logits = lax.all_gather(last @ weights["lm_head"], "tensor", axis=1, tiled=True)
    return logits[None], new_cache


def make_step(cfg: ModelConfig, bucket: Bucket, mesh, weight_specs: dict, dense_reference: bool = False):
    """The step for one bucket as a function of (weights, cache, batch) -> (logits, cache).

    `mesh` may be an AbstractMesh: exporting for a fleet needs no devices.
    """
    w_specs = {k: s.spec for k, s in weight_specs.items()}
    cache_specs = [{"k": CACHE_SPEC, "v": CACHE_SPEC} for _ in range(cfg.num_layers)]
    sharded = jax.shard_map(
        partial(device_step, cfg, bucket, dense_reference),
        mesh=mesh,
        in_specs=(w_specs, cache_specs, BATCH_SPECS),
        out_specs=(P("data", None, None), cache_specs),
        check_vma=False,
    )

    def step(weights, cache, batch):
        logits, cache = sharded(weights, cache, batch)
        return logits[..., : cfg.vocab_size], cache

    return step


def jit_step(cfg: ModelConfig, bucket: Bucket, mesh, weight_specs: dict, dense_reference: bool = False):
    """jit with the cache donated, inputs and outputs pinned to their shardings."""
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    w_sh = {k: ns(s.spec) for k, s in weight_specs.items()}
    c_sh = [{"k": ns(CACHE_SPEC), "v": ns(CACHE_SPEC)} for _ in range(cfg.num_layers)]
    b_sh = {k: ns(s) for k, s in BATCH_SPECS.items()}
    return jax.jit(
        make_step(cfg, bucket, mesh, weight_specs, dense_reference),
        in_shardings=(w_sh, c_sh, b_sh),
        # Logits replicated: every host of a multi-host mesh reads all groups' next-token logits,
        # so all of them can take the same scheduling decisions.
        out_shardings=(ns(P()), c_sh),
        donate_argnums=(1,),
    )
