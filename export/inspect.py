"""`python -m export inspect DIR [--json]`: what an artifact holds, for people and for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime import format as fmt


def describe(root: Path) -> dict:
    m = fmt.read_manifest(root)
    return {
        "format_version": m["format_version"],
        "model": m["model"],
        "dtype": m["dtype"],
        "platforms": m["platforms"],
        "jax_version": m["jax_version"],
        "jaxlib_version": m.get("jaxlib_version"),
        "cache": m.get("cache"),
        "meshes": [{"name": x["name"], "shape": x["shape"], "devices": x["devices"],
                    "compiled_here": x["compiled_here"]} for x in m["meshes"]],
        "executables": [{k: e.get(k) for k in ("mesh", "mode", "bucket", "file", "sha256", "compiled_here",
                                               "compile_seconds", "cost", "probe")} for e in m["executables"]],
        "weights_included": m.get("weights_included", True),
        "logprobs": m.get("logprobs"),
        "tf_savedmodel": (m.get("tf_savedmodel") or {}).get("signatures"),
        "fastload": {p: {"jax_version": s["jax_version"], "files": len(s["files"])}
                     for p, s in (m.get("fastload") or {}).items()},
        "files": len(m["files"]),
        "bytes": sum((root / f).stat().st_size for f in m["files"] if (root / f).is_file()),
    }


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _cost_columns(cost: dict | None) -> str:
    """Per-device memory and FLOPs of an executable compiled at build time ("" if it wasn't)."""
    if not cost or "temp_bytes" not in cost:
        return ""
    return (f"{'':14s} {_bytes(cost['argument_bytes']):>10s} {_bytes(cost['temp_bytes']):>10s} "
            f"{_bytes(cost['output_bytes']):>10s} {cost['flops'] / 1e9:9.2f}")


def inspect_main(directory: str, as_json: bool) -> int:
    try:
        d = describe(Path(directory))
    except fmt.ArtifactError as e:
        print(f"python -m export inspect: error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(d, indent=1))
        return 0
    model = d["model"]
    print(f"{directory}: {model['name']} ({model['num_layers']} layers, {model['num_experts']} experts, "
          f"vocab {model['vocab_size']}), {d['dtype']}, format v{d['format_version']}, jax {d['jax_version']}")
    print(f"platforms: {', '.join(d['platforms'])}; {d['files']} files, {d['bytes'] / 2**20:.1f} MiB; "
          f"fast-load: {', '.join(d['fastload']) or 'none'}; top-{d['logprobs']} logprobs"
          + ("" if d["weights_included"] else "; executables only (no weights: cannot serve)"))
    for mesh in d["meshes"]:
        ex = [e for e in d["executables"] if e["mesh"] == mesh["name"]]
        print(f"mesh {mesh['name']} ({mesh['devices']} devices, "
              f"{'compiled here' if mesh['compiled_here'] else 'exported only'}): {len(ex)} executables")
        if any(e.get("cost") for e in ex):
            print(f"  {'per device:':>56s} {'arguments':>10s} {'temp':>10s} {'outputs':>10s} {'GFLOP':>9s}")
        for e in ex:
            b = e["bucket"]
            print(f"  {e['mode']:8s} tokens {b['tokens']:4d} seqs {b['seqs']:3d} global {b['global_len']:5d}"
                  + _cost_columns(e.get("cost")))
    return 0
