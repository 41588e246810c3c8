"""`python -m export inspect DIR [--json]`: what an artifact holds, for people and for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime import format as fmt

from .hbm import describe as hbm_line

EXECUTABLE_KEYS = ("mesh", "mode", "bucket", "file", "sha256", "compiled_here", "compile_seconds", "cost", "probe")


def describe(root: Path, m: fmt.Manifest | None = None) -> dict:
    """The --json view: a stable summary for scripts, not the manifest itself."""
    m = m or fmt.read_manifest(root)
    return {
        "format_version": m.format_version,
        "model": m.model.to_json(),
        "dtype": m.dtype,
        "platforms": list(m.platforms),
        "jax_version": m.jax_version,
        "jaxlib_version": m.jaxlib_version,
        "cache": m.cache.to_json(),
        "kv_cache": m.kv_cache.to_json() if m.kv_cache else {"dtype": m.dtype},
        "meshes": [_mesh_json(x) for x in m.meshes],
        "executables": [{k: e.to_json().get(k) for k in EXECUTABLE_KEYS} for e in m.executables],
        "weights_included": m.weights_included,
        "weight_quantization": m.weight_quantization.to_json() if m.weight_quantization else None,
        "logprobs": m.logprobs,
        "attention": m.attention,
        "tf_savedmodel": list(m.tf_savedmodel.signatures) if m.tf_savedmodel else None,
        "fastload": {p: {"jax_version": s.jax_version, "files": len(s.files)} for p, s in m.fastload.items()},
        "files": len(m.files),
        "bytes": _artifact_bytes(root, m),
    }


def _mesh_json(x: fmt.MeshEntry) -> dict:
    """A mesh's shape; its expert layout and its fit in HBM where it has them."""
    d = {"name": x.name, "shape": list(x.shape), "devices": x.devices, "compiled_here": x.compiled_here}
    if x.experts is not None:
        d["expert_layout"] = x.experts.to_json()
    if x.hbm is not None:
        d["hbm"] = x.hbm.to_json() | {"headroom_bytes": x.hbm.headroom_bytes}
    return d


def _artifact_bytes(root: Path, m: fmt.Manifest) -> int:
    return sum((root / f).stat().st_size for f in m.files if (root / f).is_file())


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _cost_columns(cost: fmt.Cost | None) -> str:
    """Per-device memory and FLOPs of an executable compiled at build time ("" if it wasn't)."""
    if cost is None or cost.temp_bytes is None:
        return ""
    return (f"{'':14s} {_bytes(cost.argument_bytes):>10s} {_bytes(cost.temp_bytes):>10s} "
            f"{_bytes(cost.output_bytes):>10s} {cost.flops / 1e9:9.2f}")


def _scales(scales) -> str:
    return f"{min(scales):.3g}..{max(scales):.3g}" if len(set(scales)) > 1 else f"{scales[0]:.3g}"


def _print(directory: str, m: fmt.Manifest) -> None:
    model = m.model
    print(f"{directory}: {model.name} ({model.num_layers} layers, {model.num_experts} experts, "
          f"vocab {model.vocab_size}), {m.dtype}, format v{m.format_version}, jax {m.jax_version}")
    print(f"platforms: {', '.join(m.platforms)}; {len(m.files)} files, "
          f"{_artifact_bytes(Path(directory), m) / 2**20:.1f} MiB; "
          f"fast-load: {', '.join(m.fastload) or 'none'}; top-{m.logprobs} logprobs"
          + ("" if m.weights_included else "; executables only (no weights: cannot serve)"))
    if (q := m.weight_quantization) is not None:
        print(f"weights: {q.dtype} {q.granularity} ({len(q.weights)} weights, embedding and lm_head "
              f"{q.dtype if q.lm_head else m.dtype})")
    print(f"attention: {m.attention}" + {
        "cpu": " (attention and unquantized experts in the package's C++ CPU kernels: a serving host needs a C++ "
               "compiler)",
        "fa": f" (the Pallas TPU kernel, for {m.tpu_device_kind or 'its TPU'})",
        "native": " (pure JAX)"}.get(m.attention, ""))
    kv = m.kv_cache
    print(f"KV cache: {m.cache.num_pages} pages of {m.cache.page_size} tokens per group, {m.kv_dtype}"
          + ("" if kv is None else f", per-layer scales K {_scales(kv.k_scale)} V {_scales(kv.v_scale)} "
                                   f"({kv.calibration})"))
    for mesh in m.meshes:
        ex = m.executables_of(mesh.name)
        print(f"mesh {mesh.name} ({mesh.devices} devices, "
              f"{'compiled here' if mesh.compiled_here else 'exported only'}): {len(ex)} executables")
        if (lay := mesh.experts) is not None:
            over = lambda axes: "+".join(axes) or "none"  # noqa: E731
            print(f"  experts: layout {lay.name}, {lay.local_experts} experts x {lay.local_width} columns per device "
                  f"(experts over {over(lay.expert_axes)}, width over {over(lay.width_axes)})")
        if mesh.hbm is not None:
            print(f"  {hbm_line(mesh.hbm)}")
        if any(e.cost for e in ex):
            print(f"  {'per device:':>56s} {'arguments':>10s} {'temp':>10s} {'outputs':>10s} {'GFLOP':>9s}")
        for e in ex:
            b = e.bucket
            print(f"  {e.mode:8s} tokens {b.tokens:4d} seqs {b.seqs:3d} global {b.global_len:5d}"
                  + _cost_columns(e.cost))


def inspect_main(directory: str, as_json: bool) -> int:
    try:
        m = fmt.read_manifest(Path(directory))
        if as_json:
            print(json.dumps(describe(Path(directory), m), indent=1))
        else:
            _print(directory, m)
    except fmt.ArtifactError as e:
        print(f"python -m export inspect: error: {e}", file=sys.stderr)
        return 2
    return 0
