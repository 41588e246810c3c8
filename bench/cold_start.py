"""1. Cold start: process start to first token on the default artifact.

(a) runtime with the fast-load section, (b) runtime compiling the portable exports at load,
(c) a plain `jax.jit` server that warms up the same buckets at startup. Each is a fresh process,
timed from launch to its exit after printing the first token; the median of a few runs is kept.
"""

import argparse
import statistics
import subprocess
import sys
import time

from bench.common import ARTIFACT, ROOT, ensure_artifact, write_result

PROMPT = "1,2,3,4,5"


def timed(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ensure_artifact()
    runtime = [sys.executable, "-m", "runtime", "generate", str(ARTIFACT), "--prompt-ids", PROMPT,
               "--max-new-tokens", "1", "--json"]
    cases = {"a_fast_load": runtime, "b_compile_exports_at_load": runtime + ["--no-fast-load"],
             "c_jit_warmup": [sys.executable, "-m", "bench.jit_server", PROMPT]}
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift on the machine hits every case alike
        for name, cmd in cases.items():
            seconds[name].append(timed(cmd))
            print(f"{name:28s} {seconds[name][-1]:6.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    ratios = {"c_over_a": med["c_jit_warmup"] / med["a_fast_load"],
              "c_over_b": med["c_jit_warmup"] / med["b_compile_exports_at_load"]}
    for name, v in med.items():
        print(f"median {name:28s} {v:6.2f} s")
    print(f"(c)/(a) = {ratios['c_over_a']:.2f}   (c)/(b) = {ratios['c_over_b']:.2f}")
    write_result("cold_start", {"seconds": seconds, "median_seconds": med, "ratios": ratios,
                                "executables": len(list((ARTIFACT / "exec").rglob("*.jax")))})


if __name__ == "__main__":
    main()
