"""Will an artifact fit the TPU it is built for? Per device: weights + KV cache + executable temp.

Weights and the KV cache follow exactly from shapes and shardings, so a build that cannot fit is
refused before anything is exported. Temp is what a compiled executable needs beside its arguments:
measured where the build compiles the executables, otherwise (a TPU build on a CPU machine, whose
Pallas kernels compile only on a TPU) estimated from the largest bucket's biggest live buffers, the
MoE layer's (see `estimate_temp_bytes`).
"""

from __future__ import annotations

import math

from runtime import format as fmt

from .errors import BuildError

GiB = 2**30
# --tpu-generation -> HBM per chip
HBM_BYTES = {"v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


def per_device_bytes(shape, spec, mesh_sizes: dict[str, int], itemsize: int) -> int:
    """Bytes of one device's shard of an array of `shape` laid out by `spec` (a manifest Spec)."""
    n = itemsize
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n *= -(-dim // math.prod(mesh_sizes[a] for a in axes))
    return n


def itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}[dtype]


def weight_bytes(mesh: fmt.MeshEntry) -> int:
    sizes = dict(zip(mesh.axes, mesh.shape))
    return sum(per_device_bytes(w.shape, w.spec, sizes, itemsize(w.dtype)) for w in mesh.weights.values())


def kv_bytes(mesh: fmt.MeshEntry, dtype: str) -> int:
    return per_device_bytes(mesh.cache_shape, mesh.cache_spec, dict(zip(mesh.axes, mesh.shape)), itemsize(dtype))


def estimate_temp_bytes(cfg, mesh: fmt.MeshEntry, bucket, dtype: str) -> int:
    """The largest bucket's MoE layer, the step's biggest live set: the gathered tokens and the
    float32 partial sums [G, H], the expert inputs [M, H] and float32 outputs [M, H] (M = G * top-k,
    every pair, the worst routing), the gate and up outputs and their product [M, I_local], and the logits of
    every sequence [S, V] in float32 (sampling keeps a few copies). A lower bound for XLA's temp,
    which also holds the layer loop's carries and fusion buffers."""
    lay = mesh.experts
    G, H, k, b = bucket.global_len, cfg.hidden_size, cfg.experts_per_token, itemsize(dtype)
    M = G * k
    width = lay.local_width if lay else 0
    moe = G * H * (b + 4) + M * H * (b + 4) + M * width * 3 * b
    logits = 3 * bucket.seqs * cfg.vocab_size * 4
    return moe + logits


def fit(generation: str, mesh: fmt.MeshEntry, dtype: str, temp: int, measured: bool, pages_per_group: int
        ) -> fmt.HbmEntry:
    """The mesh's per-device memory on `generation`; raises BuildError in one line when it does not fit."""
    capacity = HBM_BYTES[generation]
    weights, kv = weight_bytes(mesh), kv_bytes(mesh, dtype)
    page = -(-kv // pages_per_group)
    max_pages = max(0, (capacity - weights - temp) // page)
    entry = fmt.HbmEntry(generation=generation, capacity_bytes=capacity, weight_bytes=weights, kv_bytes=kv,
                         temp_bytes=temp, temp_measured=measured, page_bytes=page, max_pages_per_group=int(max_pages))
    if entry.headroom_bytes < 0:
        raise BuildError(refusal(entry, mesh.name))
    return entry


def refusal(e: fmt.HbmEntry, mesh: str) -> str:
    """One line: how much is needed, what the chip has, what to change."""
    needs = (f"needs {e.used_bytes / GiB:.1f} GiB per device (weights {e.weight_bytes / GiB:.1f}, KV cache "
             f"{e.kv_bytes / GiB:.1f}, temp {'' if e.temp_measured else '~'}{e.temp_bytes / GiB:.1f}) on mesh {mesh}, "
             f"a {e.generation} chip has {e.capacity_bytes / GiB:.0f} GiB")
    if e.max_pages_per_group >= 2:  # page 0 is reserved: two pages serve one page of tokens
        return f"{needs}; try --pages-per-group {e.max_pages_per_group} or a larger mesh"
    return f"{needs}; the weights alone leave no room for a KV cache: try a larger mesh"


def describe(e: fmt.HbmEntry) -> str:
    """The inspect line."""
    return (f"HBM per device on {e.generation}: weights {e.weight_bytes / GiB:.2f} + KV {e.kv_bytes / GiB:.2f} + "
            f"temp {'' if e.temp_measured else '~'}{e.temp_bytes / GiB:.2f} = {e.used_bytes / GiB:.2f} of "
            f"{e.capacity_bytes / GiB:.0f} GiB, headroom {e.headroom_bytes / GiB:.2f} GiB; "
            f"up to {e.max_pages_per_group} pages per group fit")
