"""1. Cold start: process start to first token on the default artifact.

(a) runtime with the fast-load section, (b) runtime compiling the portable exports at load,
(c) a plain `jax.jit` server that warms up the same buckets at startup, compiling several at a
time as (b) does, three ways: with no persistent compilation cache, with JAX's persistent cache
empty (a fresh directory every run), and with that cache already filled (what a jit server gets on
its second start on the same host). Each is a fresh process, timed from launch to its exit after
printing the first token; the median of a few runs is kept.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ARTIFACT, ROOT, ensure_artifact, write_result

PROMPT = "1,2,3,4,5"


def timed(cmd, cache_dir: str | None = None) -> float:
    env = dict(os.environ)
    if cache_dir is not None:  # JAX's own persistent compilation cache, every compilation kept
        env |= {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ensure_artifact()
    runtime = [sys.executable, "-m", "runtime", "generate", str(ARTIFACT), "--prompt-ids", PROMPT,
               "--max-new-tokens", "1", "--json"]
    jit = [sys.executable, "-m", "bench.jit_server", PROMPT]
    warm_cache = tempfile.mkdtemp(prefix="jit-cache-")
    timed(jit, warm_cache)  # fill it once
    cases = {"a_fast_load": (runtime, None), "b_compile_exports_at_load": (runtime + ["--no-fast-load"], None),
             "c_jit_warmup": (jit, None), "c_jit_warmup_empty_cache": (jit, "fresh"),
             "c_jit_warmup_warm_cache": (jit, warm_cache)}
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift on the machine hits every case alike
        for name, (cmd, cache) in cases.items():
            seconds[name].append(timed(cmd, tempfile.mkdtemp(prefix="jit-cache-") if cache == "fresh" else cache))
            print(f"{name:28s} {seconds[name][-1]:6.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    ratios = {"c_over_a": med["c_jit_warmup"] / med["a_fast_load"],
              "c_over_b": med["c_jit_warmup"] / med["b_compile_exports_at_load"],
              "c_warm_cache_over_a": med["c_jit_warmup_warm_cache"] / med["a_fast_load"]}
    for name, v in med.items():
        print(f"median {name:28s} {v:6.2f} s")
    print(f"(c)/(a) = {ratios['c_over_a']:.2f}   (c)/(b) = {ratios['c_over_b']:.2f}   "
          f"(c, JAX cache warm)/(a) = {ratios['c_warm_cache_over_a']:.2f}")
    write_result("cold_start", {"seconds": seconds, "median_seconds": med, "ratios": ratios,
                                "executables": len(list((ARTIFACT / "exec").rglob("*.jax")))})


if __name__ == "__main__":
    main()
