"""3. Trace replay: a fixed seeded trace through the runtime against jit-on-demand.

runtime    load the artifact (fast-load), then serve the trace: nothing compiles after load
on-demand  the same scheduler and step, jitted in-process for each exact new shape as it appears
Same requests, same arrivals, same outputs; total wall time, compilations, tokens per second.
Also writes bench/results/trace.json (the trace) and trace_steps.json (per-step tokens per group,
the input of `python -m export build --plan-from`).
"""

import json
import time

from bench.common import ARTIFACT, RESULTS, JitExecutor, ensure_artifact, make_trace, write_result
from runtime.engine import load
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
    write_result("trace_replay", {"requests": len(trace["prompts"]), "generated_tokens": tokens,
                                  "runtime": runtime, "on_demand": on_demand, "speedup_total": speedup,
                                  "identical_outputs": same})


if __name__ == "__main__":
    main()
