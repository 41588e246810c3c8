"""`python -m export warm ARTIFACT`: add a fast-load section for the platform this runs on.

An artifact built on a CPU box for TPU holds portable exports only: every TPU host would compile
them at load. Run `warm` once on one host of the fleet's kind: it compiles every export of each mesh
that fits here, exactly as the runtime's loader does, into a persistent compilation cache, and adds
it to the artifact as `fastload/<platform>/` with its checksums. The rest of the fleet then loads
without compiling. With weights in the artifact it also times each executable's step here
(`step_seconds` for this platform), so the fleet's schedulers size prefill steps by this hardware.
Nothing else in the artifact changes; the manifest is rewritten atomically, last.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import jax

from dp_attention import make_mesh, parse_mesh
from runtime import engine as rt_engine
from runtime import format as fmt

from .probes import step_seconds


def warm(root: Path, jobs: int = 2, log=print) -> fmt.FastLoadEntry:
    """Compile every export that fits this host into `root/fastload/<platform>/`; the new section."""
    manifest = fmt.read_manifest(root)
    fmt.verify_all(root, manifest)
    devices = jax.devices()
    platform = devices[0].platform
    rt_engine.check_platform(root, manifest, devices)
    meshes = [m for m in manifest.meshes if m.devices <= len(devices)]
    if not meshes:
        raise fmt.ArtifactError(f"{root}: no mesh fits this machine's {len(devices)} {platform} devices "
                                f"(meshes: {', '.join(m.name for m in manifest.meshes)})")
    final = root / "fastload" / platform
    staging = root / "fastload" / f".{platform}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        count, timed = 0, {}
        with rt_engine.compilation_cache_at(staging, write=True):
            for entry in meshes:
                engine = rt_engine.Engine(root, manifest, entry, make_mesh(parse_mesh(entry.name), devices))
                t0 = time.perf_counter()
                engine.compile_all(jobs)
                count += len(engine.buckets)
                log(f"mesh {entry.name}: compiled {len(engine.buckets)} executables in "
                    f"{time.perf_counter() - t0:.1f} s")
                timed |= _time_steps(engine, entry.name, manifest, log)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(sorted(f.relative_to(root).as_posix() for f in final.rglob("*") if f.is_file()))
    old = manifest.fastload[platform].files if platform in manifest.fastload else ()
    section = fmt.FastLoadEntry(jax_version=jax.__version__, jaxlib_version=jax.lib.__version__, files=files,
                                meshes=tuple(m.name for m in meshes), executables=count,
                                process_devices=len(devices))
    checksums = {rel: sha for rel, sha in manifest.files.items() if rel not in old}
    executables = tuple(dataclasses.replace(e, step_seconds=(e.step_seconds or {}) | {platform: timed[e.file]})
                        if e.file in timed else e for e in manifest.executables)
    manifest = dataclasses.replace(manifest, fastload=manifest.fastload | {platform: section}, executables=executables,
                                   files=checksums | {rel: fmt.sha256_file(root / rel) for rel in files})
    fmt.write_json_atomic(root / fmt.MANIFEST, manifest.to_json())
    return section


def _time_steps(engine, mesh: str, manifest: fmt.Manifest, log) -> dict[str, float]:
    """Each executable's step time on this platform ({export file: seconds}), which the scheduler
    sizes prefill steps by; an artifact without weights can't run, so it gets none."""
    if not manifest.weights_included:
        return {}
    t0 = time.perf_counter()
    engine.load_weights()
    engine.reset_cache()
    timed = {engine.entries[b].file: step_seconds(engine, b) for b in engine.buckets}
    log(f"mesh {mesh}: timed {len(timed)} steps in {time.perf_counter() - t0:.1f} s")
    return timed


def warm_main(directory: str, jobs: int) -> int:
    try:
        section = warm(Path(directory), jobs)
    except fmt.ArtifactError as e:
        print(f"python -m export warm: error: {e}", file=sys.stderr)
        return 2
    print(f"{directory}: fast-load section for {jax.devices()[0].platform} with {section.executables} "
          f"executables ({len(section.files)} files)")
    return 0
