"""3. Trace replay: a fixed seeded trace through the runtime against jit-on-demand.

runtime      load the artifact (fast-load), then serve the trace: nothing compiles after load
on-demand    the same scheduler and step, jitted in-process for each exact new shape as it appears
precompiled  what a jit server does: the step jitted and compiled for the artifact's buckets at
             start (several at a time), then the trace; once without and once with JAX's
             persistent compilation cache already filled by an earlier start
Same requests, same arrivals, same outputs; total wall time, compilations, tokens per second.
Also writes bench/results/trace.json (the trace) and trace_steps.json (per-step tokens per group,
the input of `python -m export build --plan-from`).
"""

import json
import tempfile
import time
from pathlib import Path

from bench.common import ARTIFACT, RESULTS, JitExecutor, ensure_artifact, make_trace, write_result
from runtime.engine import compilation_cache_at, load
from runtime.scheduler import generate


def main():
    ensure_artifact()
    trace = make_trace()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trace.json").write_text(json.dumps(trace) + "\n")
    run = dict(arrivals=trace["arrivals"])

    t0 = time.perf_counter()
    engine = load(ARTIFACT)
    loaded = time.perf_counter()
    outputs, stats = engine.generate(trace["prompts"], trace["max_new_tokens"], record_steps=True, **run)
    done = time.perf_counter()
    (RESULTS / "trace_steps.json").write_text(json.dumps({"steps": stats.pop("step_tokens")}) + "\n")
    tokens = stats["generated_tokens"]
    runtime = {"load_s": loaded - t0, "serve_s": done - loaded, "total_s": done - t0,
               "compiles_after_load": stats["compiles_after_load"], "steps": stats["steps"],
               "tokens_per_s": tokens / (done - t0), "padding_efficiency": stats["padding_efficiency"]}
    print(f"runtime    load {runtime['load_s']:6.1f} s  serve {runtime['serve_s']:6.1f} s  "
          f"compiles {runtime['compiles_after_load']}  {runtime['tokens_per_s']:7.1f} tok/s")

    t0 = time.perf_counter()
    baseline = JitExecutor(ARTIFACT, warm=False)
    ready = time.perf_counter()
    base_outputs, base_stats = generate(baseline, trace["prompts"], trace["max_new_tokens"], **run)
    done = time.perf_counter()
    on_demand = {"load_s": ready - t0, "serve_s": done - ready, "total_s": done - t0,
                 "compiles": baseline.compiles, "steps": base_stats["steps"],
                 "tokens_per_s": base_stats["generated_tokens"] / (done - t0)}
    print(f"on-demand  load {on_demand['load_s']:6.1f} s  serve {on_demand['serve_s']:6.1f} s  "
          f"compiles {on_demand['compiles']}  {on_demand['tokens_per_s']:7.1f} tok/s")
    same = sum(a == b for a, b in zip(outputs, base_outputs))
    speedup = on_demand["total_s"] / runtime["total_s"]
    print(f"speed-up {speedup:.1f}x total; {same}/{len(outputs)} requests with identical tokens")
    precompiled = replay_precompiled(trace, run, None, "precompiled")
    cache = tempfile.mkdtemp(prefix="jit-cache-")
    replay_precompiled(trace, run, cache, "(filling JAX's cache)")
    cached = replay_precompiled(trace, run, cache, "precompiled, JAX cache warm")
    for name, row in (("precompiled", precompiled), ("precompiled_cached", cached)):
        row["speedup_of_runtime"] = row["total_s"] / runtime["total_s"]
        row["identical_outputs"] = sum(a == b for a, b in zip(outputs, row.pop("outputs")))
        print(f"runtime vs {name}: {row['speedup_of_runtime']:.1f}x total, {row['identical_outputs']}/{len(outputs)} "
              "identical")
    write_result("trace_replay", {"requests": len(trace["prompts"]), "generated_tokens": tokens,
                                  "runtime": runtime, "on_demand": on_demand, "speedup_total": speedup,
                                  "identical_outputs": same, "precompiled": precompiled,
                                  "precompiled_jax_cache_warm": cached})


def replay_precompiled(trace, run, cache_dir, label):
    """A jit server's start (weights, then every bucket compiled) and the trace, timed together."""
    with compilation_cache_at(Path(cache_dir) if cache_dir else None, write=True):
        t0 = time.perf_counter()
        server = JitExecutor(ARTIFACT, warm=True)
        ready = time.perf_counter()
        outputs, stats = generate(server, trace["prompts"], trace["max_new_tokens"], **run)
        done = time.perf_counter()
    row = {"load_s": ready - t0, "serve_s": done - ready, "total_s": done - t0, "compiles": server.compiles,
           "tokens_per_s": stats["generated_tokens"] / (done - t0), "outputs": outputs}
    print(f"{label:28s} load {row['load_s']:6.1f} s  serve {row['serve_s']:6.1f} s  "
          f"compiles after start {row['compiles']}  {row['tokens_per_s']:7.1f} tok/s")
    return row


if __name__ == "__main__":
    main()
