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
        "tf_savedmodel": (m.get("tf_savedmodel") or {}).get("signatures"),
        "fastload": {p: {"jax_version": s["jax_version"], "files": len(s["files"])}
                     for p, s in (m.get("fastload") or {}).items()},
        "files": len(m["files"]),
        "bytes": sum((root / f).stat().st_size for f in m["files"] if (root / f).is_file()),
    }


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
          f"fast-load: {', '.join(d['fastload']) or 'none'}")
    for mesh in d["meshes"]:
        ex = [e for e in d["executables"] if e["mesh"] == mesh["name"]]
        print(f"mesh {mesh['name']} ({mesh['devices']} devices, "
              f"{'compiled here' if mesh['compiled_here'] else 'exported only'}): {len(ex)} executables")
        for e in ex:
            b = e["bucket"]
            cost = e.get("cost") or {}
            extra = f"  flops {cost['flops']:.3g}  {cost['collectives']}" if cost else ""
            print(f"  {e['mode']:8s} tokens {b['tokens']:4d} seqs {b['seqs']:3d} global {b['global_len']:5d}{extra}")
    return 0
