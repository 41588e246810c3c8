"""Static KV cache scales from the model itself: run calibration prompts through the unquantized
step and take each layer's largest |K| and |V| from the cache it wrote (kv_cache.py says why static
and why per layer).

The prompts are token ids drawn at random with a fixed seed, so a build is reproducible and needs
no dataset; they span the positions a prefill chunk covers, so RoPE's rotations are all seen.
Values past the calibrated range saturate when written.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from runtime.batching import Chunk, pack
from runtime.buckets import MAX_LEN, Bucket

from .config import ModelConfig
from .kv_cache import KvQuant, absmax_per_layer, scales_from_absmax
from .mesh import MeshShape, make_mesh
from .model import CacheShape, init_cache, jit_step
from .weights import Layout, place, weight_specs

CALIBRATION_SEED = 0
CALIBRATION_PROMPTS = 8
CALIBRATION_TOKENS = 64
PAGE = 8


def calibration_prompts(vocab_size: int, n: int = CALIBRATION_PROMPTS, length: int = CALIBRATION_TOKENS):
    rng = np.random.default_rng(CALIBRATION_SEED)
    return [rng.integers(0, vocab_size, length).tolist() for _ in range(n)]


def kv_absmax(cfg: ModelConfig, read, dtype: str, prompts=None, weights=None, mesh_shape: MeshShape | None = None):
    """Each layer's largest |K| and |V| (numpy [layers] each) over `prompts` (default: the
    calibration prompts), prefilled in one step of the float step on `mesh_shape` (default 1x1). `weights`: the
    placed weights if the caller has them (else read with `read`)."""
    prompts = prompts or calibration_prompts(cfg.vocab_size)
    mesh_shape = mesh_shape or MeshShape(1, 1)
    mesh = make_mesh(mesh_shape)
    specs = weight_specs(cfg, mesh_shape)
    weights = weights if weights is not None else place(specs, read, mesh, dtype)
    pages_per_seq = -(-max(len(p) for p in prompts) // PAGE)
    cache = CacheShape(1 + len(prompts) * pages_per_seq, PAGE, pages_per_seq)
    tokens = -(-sum(len(p) for p in prompts) // 8) * 8
    groups = [[Chunk(tuple(p), 0, tuple(range(1 + j * pages_per_seq, 1 + (j + 1) * pages_per_seq)))
               for j, p in enumerate(prompts)]] + [[] for _ in range(mesh_shape.dp - 1)]
    step = jit_step(cfg, Bucket(MAX_LEN, tokens, len(prompts), mesh_shape.dp * tokens), mesh, specs, num_logprobs=1)
    kv = init_cache(cfg, Layout.for_mesh(cfg, mesh_shape), mesh, cache, jnp.dtype(dtype))
    _, kv = step(weights, kv, pack(groups, tokens, len(prompts), pages_per_seq))
    return absmax_per_layer(kv)


def calibrate(cfg: ModelConfig, read, dtype: str, kv_dtype: str, per: str = "layer", **kw) -> KvQuant:
    """Static scales for an 8-bit cache of `kv_dtype` (kv_cache.KV_CACHE_DTYPES' values)."""
    k, v = kv_absmax(cfg, read, dtype, **kw)
    return scales_from_absmax(kv_dtype, k, v, per)
