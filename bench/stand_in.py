"""A mesh's serving as it would run with a core for each of its devices.

On a machine with fewer cores than the mesh has devices (the 2x4 mesh's 8 virtual CPU devices on a
2-core machine), every step runs its devices' programs in turns on the shared cores, and the
serving figures measured there describe the machine as much as the system. This takes the machine
out in two parts:

1. `measure`: the real generation of a workload on the mesh, each step run alone (not pipelined),
   timing for each bucket the step's wall time and the process's CPU time. A step's CPU time over
   its devices is what one device's share of it costs on a core of its own, for devices that share
   the work evenly (a mesh's do: heads and experts split alike), with their waits in the
   collectives as these cores spent them: an upper bound rather than a lower one.
2. `python -m bench.fake_device TABLE.json ...` serves with the sleeping device taking that long
   for each bucket's step, and no host CPU: the real server, scheduler and HTTP side, on a host
   whose devices run at once.

    python -m bench.stand_in ARTIFACT --mesh 2x4 --out TABLE.json   # the prompts of bench/peer.py

It runs in a process with the CPU devices `python -m runtime --mesh M` would give that mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def measure(engine, prompts, max_tokens: int, rounds: int = 2) -> dict:
    """{"mesh", "devices", "buckets": {name: {"steps", "wall_ms", "cpu_ms", "device_ms"}}} for a
    loaded engine over `rounds` greedy generations of the workload (medians per step); buckets the
    workload never ran are timed on their build probe, greedy too."""
    from export.probes import make_probe
    from runtime.scheduler import generate

    devices = engine.mesh.devices.size
    samples: dict[str, list[tuple[float, float]]] = {}

    def timed_run(bucket, batch):
        wall, cpu = time.perf_counter(), time.process_time()
        out = type(engine).run(engine, bucket, batch)
        samples.setdefault(bucket.name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        return out

    generate(engine, prompts[:4], 4, pipeline=False, prefix_cache=False)  # first-call costs, untimed
    engine.run = timed_run  # this instance only, until the end
    try:
        for _ in range(rounds):
            engine.reset_cache()
            generate(engine, prompts, max_tokens, pipeline=False, prefix_cache=False)
        for bucket in (b for b in engine.buckets if b.name not in samples):
            _, batch = make_probe(bucket, engine.dp, engine.vocab_size, engine.page_size, engine.pages_per_seq)
            batch["temperature"][:] = 0  # greedy, as the workload: a sampled row sorts the vocabulary
            for _ in range(5):
                timed_run(bucket, batch)
    finally:
        del engine.run
        engine.reset_cache()
    table = {}
    for name, runs in sorted(samples.items()):
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        table[name] = {"steps": len(runs), "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                       "device_ms": cpu * 1e3 / devices}
    return {"mesh": engine.mesh_entry.name, "devices": devices, "buckets": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stand_in", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--out", required=True, help="where the table goes (JSON)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from runtime.format import read_manifest

    devices = read_manifest(args.artifact).cpu_devices_for(args.mesh)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")  # before JAX loads
    from bench.peer_checkpoint import make_prompts
    from runtime.engine import load

    engine = load(args.artifact, mesh=args.mesh)
    table = measure(engine, make_prompts(args.prompts, 16, 256, args.seed), args.max_tokens)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    for name, row in table["buckets"].items():
        print(f"  {name:28s} {row['steps']:4d} steps  wall {row['wall_ms']:6.1f} ms  CPU {row['cpu_ms']:6.1f} ms"
              f"  per device {row['device_ms']:5.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
