"""One mesh's executables compiled into a fast-load cache, in a process holding just that mesh's devices.

XLA keys its compilation cache by the host's whole device topology, and on CPU a mesh runs slower
in a process with more virtual devices than it uses (the peer workload's 1x1 steps took 5-35%
longer beside 7 idle devices). The build's own process holds the largest mesh's devices; for each
smaller CPU mesh it runs this module in a child process of that mesh's size (`XLA_FLAGS` set by the
parent), which compiles the mesh's exports exactly as the runtime's loader does, into the same
cache. A runtime that serves that mesh alone then starts a process of its size and compiles
nothing.

`python -m export.mesh_compile ROOT MANIFEST MESH CACHE_DIR JOBS` (the build's, not a user's,
command: ROOT is the artifact being written, MANIFEST its manifest so far).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    root, manifest_path, mesh_name, cache_dir, jobs = Path(argv[0]), Path(argv[1]), argv[2], Path(argv[3]), int(argv[4])
    import jax

    from dp_attention import make_mesh, parse_mesh
    from runtime import engine as rt_engine
    from runtime import format as fmt

    manifest = fmt.Manifest.from_json(json.loads(manifest_path.read_text()), fmt.Where(str(manifest_path)))
    entry = next(m for m in manifest.meshes if m.name == mesh_name)
    if len(jax.devices()) != entry.devices:
        raise SystemExit(f"mesh {mesh_name} needs a process of {entry.devices} devices, this one has "
                         f"{len(jax.devices())}")
    engine = rt_engine.Engine(root, manifest, entry, make_mesh(parse_mesh(mesh_name), jax.devices()))
    with rt_engine.compilation_cache_at(cache_dir, write=True):
        engine.compile_all(jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
