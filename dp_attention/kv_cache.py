"""An 8-bit KV cache: what is stored, how it is scaled, and where the scales come from.

Decode is bound by how many sequences' K/V fit in memory, so the cache may hold K and V in one
byte each (`--kv-cache-dtype int8|fp8_e4m3|fp8_e5m2`): twice the tokens of bfloat16 in the same
bytes. A value x is stored as q = quantize(x / scale), read back as q * scale (float32).

Scales are static, one for K and one for V per layer, fixed at build from calibration (the absmax
of each layer's K and V over calibration prompts run through the unquantized step), and written
into the executables: the TPU kernel takes only static python-float scales, and a static scale
costs a step nothing. Values past the calibrated range saturate (clip) rather than overflow.

Why per layer rather than one per tensor: K is RMS-normalised per head but each layer's k_norm
weight sets its range, and V is not normalised at all, so one scale for every layer spends the
int8 grid on the widest layer and leaves the others a fraction of it (fp8 keeps its relative
precision at any scale and cares less). bench/README.md has the measured errors of both. Both are
applied the same way on both backends: K's scale multiplies the queries (q . (s k) = (s q) . k)
and V's the attention output (sum p (s v) = s sum p v), so the TPU kernel, whose scales are python
floats and cannot follow the layer scan's traced index, is handed 1.0 (which still makes it read
the 8-bit cache as numbers) and the per-layer scale rides outside it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# --kv-cache-dtype -> the array dtype, and the largest finite value it holds (the scale maps a
# layer's calibrated absmax onto it). int8 keeps -128 unused so the grid is symmetric.
KV_CACHE_DTYPES = {"int8": "int8", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
KV_CACHE_CHOICES = ("auto",) + tuple(KV_CACHE_DTYPES)
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def cache_dtype(choice: str, build_dtype: str) -> str:
    """The cache array's dtype name for a --kv-cache-dtype choice ("auto": the build dtype)."""
    if choice == "auto":
        return build_dtype
    if choice not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {choice!r}: expected one of {', '.join(KV_CACHE_CHOICES)}")
    return KV_CACHE_DTYPES[choice]


def is_quantized(dtype: str) -> bool:
    return dtype in QMAX


@dataclasses.dataclass(frozen=True)
class KvQuant:
    """A quantized cache: its dtype name and per-layer static scales (tuples, so the step's
    options stay hashable)."""

    dtype: str  # a value of KV_CACHE_DTYPES
    k_scale: tuple[float, ...]  # per layer
    v_scale: tuple[float, ...]

    def __post_init__(self):
        if self.dtype not in QMAX:
            raise ValueError(f"KV cache dtype {self.dtype!r} is not 8-bit: expected one of {', '.join(QMAX)}")
        if len(self.k_scale) != len(self.v_scale) or not all(s > 0 for s in self.k_scale + self.v_scale):
            raise ValueError(f"KV scales must be positive, one K and one V per layer; got {len(self.k_scale)} K "
                             f"and {len(self.v_scale)} V")

    def scales(self, layer):
        """(K scale, V scale) of `layer` (traced inside the layer scan), float32 scalars."""
        return (jnp.asarray(self.k_scale, jnp.float32)[layer], jnp.asarray(self.v_scale, jnp.float32)[layer])

    def quantize(self, x, scale):
        """x (any float) -> the cache dtype: x / scale in float32, rounded to nearest (ties to even),
        saturated at the dtype's largest value."""
        qmax = QMAX[self.dtype]
        y = jnp.clip(x.astype(jnp.float32) / scale, -qmax, qmax)
        if self.dtype == "int8":
            y = jnp.round(y)
        return y.astype(jnp.dtype(self.dtype))


def scales_from_absmax(dtype: str, k_absmax, v_absmax, per: str = "layer") -> KvQuant:
    """Static scales that map each layer's calibrated absmax (per="layer") or the largest over all
    layers (per="tensor") onto the dtype's largest value. A layer that wrote only zeros gets scale 1."""
    k, v = np.asarray(k_absmax, np.float64), np.asarray(v_absmax, np.float64)
    if per == "tensor":
        k, v = np.full_like(k, k.max()), np.full_like(v, v.max())
    elif per != "layer":
        raise ValueError(f"scale granularity {per!r}: expected layer or tensor")
    qmax = QMAX[dtype]
    scale = lambda a: tuple(float(np.float32(x / qmax)) if x > 0 else 1.0 for x in a)
    return KvQuant(dtype, scale(k), scale(v))


def absmax_per_layer(cache) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's largest |K| and |V| in an unquantized cache [dp, layers, pages, page_size,
    2 * kv_heads, head_dim] (K on even heads, V on odd). A fresh cache is zero, so only written
    positions count."""
    a = np.abs(np.asarray(cache, np.float32))
    return a[..., 0::2, :].max(axis=(0, 2, 3, 4, 5)), a[..., 1::2, :].max(axis=(0, 2, 3, 4, 5))
