"""Two artifacts of one checkpoint on the same workload, in one process, rounds alternating.

    python -m bench.ab ARTIFACT_A ARTIFACT_B [--mesh 1x1] [--rounds 3]

The workload is bench/peer.py's (64 token-id prompts of 16-256 tokens, 64 greedy tokens each, EOS
ignored): what a change to the build (a bucket ladder, an option) does to the same generation.
Both engines are loaded first; each round then runs A and B one after the other, so a machine
shared with other work slows both alike. Reports per run wall time, process CPU time and steps;
then B / A for the best of each (CPU time is the steadier figure on a busy machine) and whether
every token is identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the baseline artifact")
    p.add_argument("b", help="the artifact compared with it")
    p.add_argument("--mesh", default="1x1", help="the mesh both load (default 1x1)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    args = p.parse_args(argv)

    from bench.peer_checkpoint import make_prompts
    from runtime.engine import load

    engines = {name: load(path, mesh=args.mesh) for name, path in (("A", args.a), ("B", args.b))}
    for name, e in engines.items():
        info = e.load_info
        print(f"{name}: {info.executables} executables, fast-load hits {info.fast_load_hits}")
    prompts = make_prompts()
    runs, outputs = {"A": [], "B": []}, {}
    for r in range(args.rounds):
        for name, e in engines.items():
            e.reset_cache()
            cpu, wall = time.process_time(), time.perf_counter()
            outputs[name], stats = e.generate(prompts, args.max_tokens, prefix_cache=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append((wall, cpu))
            print(f"round {r} {name}: {wall:.2f} s, {cpu:.2f} CPU s, {stats['steps']} steps, "
                  f"compiles {stats['compiles_after_load']}, load average {os.getloadavg()[0]:.1f}")
    tokens = len(prompts) * args.max_tokens
    best = {n: (min(w for w, _ in v), min(c for _, c in v)) for n, v in runs.items()}
    for n, (w, c) in best.items():
        print(f"{n} best: {tokens / w:.0f} tok/s, {tokens / c:.0f} tok/CPU-s")
    print(f"B / A: wall {best['B'][0] / best['A'][0]:.3f}, CPU {best['B'][1] / best['A'][1]:.3f}; "
          f"tokens identical: {outputs['A'] == outputs['B']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
