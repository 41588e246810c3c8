"""Prefix cache on against off, on real executables, in one command.

The default model and mesh (2x4) built with a longer context C (`--max-context`, default 1024)
and a pool of 8 full-context sequences per DP group, once, into artifacts/prefix-bench-C: the
default artifact's 256 tokens hold a chat history too short to show what a cache is for. Three
workloads, greedy, sized by C, each served by the scheduler's online loop (submit, step) with the
cache on and off, alternately, `--repeats` times (figures are medians over the repeats):

shared_system  64 requests at once, all starting with one system prompt of 3C/4 tokens (768) and
               each ending with its own C/32 to 3C/32 tokens (32 to 96); 16 new tokens each.
multi_turn     16 conversations of 8 turns: each turn's prompt is the previous turn's prompt, its
               answer (C/32 = 32 tokens) and a new user message (32 to 96 tokens), about 736
               tokens by the last turn; a conversation's next turn is submitted the moment its
               previous answer is complete. The pool holds all 16 conversations, as a server's
               pool is sized to hold its running conversations.
trace          the long-tailed seeded trace of bench/common.py (48 requests, Poisson arrivals in
               steps), no shared prefixes: the cache must cost nothing there.

Reported per run: prompt tokens computed (prefill), TTFT p50/p99 (submission to first token read,
wall time), output tokens per second, hit rate (prompt tokens taken from the cache / prompt
tokens), DP padding efficiency (real / padded tokens over all steps), compiles after load; and
whether the tokens are identical with the cache on and off. Ratios are medians over the repeats of
the ratio within each back-to-back pair (off, then on). For the trace, also the scheduler's own
host time with the cache on and off on a stand-in executor (no device work, so no load noise from
the device side): what the cache costs where it finds nothing.

    python -m bench.prefix [--repeats 3] [--max-context 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, make_trace, write_result

VOCAB = 500
NEW_TOKENS = 16  # per request of the shared-system workload
CONVERSATIONS, TURNS = 16, 8
PAGES_PER_CONTEXT = 8  # the benchmark artifact's pool, per group, in full-context sequences
PAGE_SIZE = 8


# ---------------------------------------------------------------------------------- workloads
# Sizes scale with the artifact's context C, so that prompts fill it as real ones would.

def shared_system(context: int, n: int = 64, seed: int = 0) -> dict:
    """n requests at once: one system prompt of 3C/4 tokens, then each its own C/32 to 3C/32."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, VOCAB, 3 * context // 4).tolist()
    own = rng.integers(context // 32, 3 * context // 32 + 1, n)
    prompts = [system + rng.integers(0, VOCAB, int(k)).tolist() for k in own]
    return {"first": [(p, NEW_TOKENS, 0) for p in prompts]}


def multi_turn(context: int, seed: int = 1) -> dict:
    """Conversations of TURNS turns: user messages of C/32 to 3C/32 tokens, answers of C/32, so
    the last turn's prompt holds about 3/4 of the context (about 736 tokens at C = 1024)."""
    rng = np.random.default_rng(seed)
    users = [[rng.integers(0, VOCAB, int(rng.integers(context // 32, 3 * context // 32 + 1))).tolist()
              for _ in range(TURNS)] for _ in range(CONVERSATIONS)]
    answer = context // 32
    return {"first": [(u[0], answer, 0) for u in users], "users": users, "answer": answer}


def trace(context: int) -> dict:
    t = make_trace(max_context=context)
    return {"first": list(zip(t["prompts"], t["max_new_tokens"], t["arrivals"]))}


def max_context(engine) -> int:
    return engine.pages_per_seq * engine.page_size


def stand_in(engine):
    """An executor with the engine's buckets and cache geometry that does no device work."""
    from bench.padding import PaddingOnly

    ex = PaddingOnly(engine.buckets)
    ex.num_pages, ex.pages_per_seq, ex.page_size = engine.num_pages, engine.pages_per_seq, engine.page_size
    return ex


def ensure_bench_artifact(context: int) -> Path:
    """The default model and mesh with a longer context and a pool of PAGES_PER_CONTEXT full-context
    sequences per group (a no-op when current): the default artifact's 256 tokens leave a chat
    history too short for its prefill to matter beside its decode steps."""
    out = ROOT / "artifacts" / f"prefix-bench-{context}"
    pages = PAGES_PER_CONTEXT * context // PAGE_SIZE + 1  # page 0 is reserved
    subprocess.run([sys.executable, "-m", "export", "build", "--mesh", "2x4", "--max-context", str(context),
                    "--page-size", str(PAGE_SIZE), "--pages-per-group", str(pages), "--out", str(out), "--quiet"],
                   cwd=ROOT, check=True)
    return out


WORKLOADS = {"shared_system": shared_system, "multi_turn": multi_turn, "trace": trace}


# ---------------------------------------------------------------------------------- one run

def serve(engine, workload: dict, prefix_cache: bool) -> dict:
    """Serve a workload online; a conversation's next turn (if the workload has turns) is its
    previous prompt, the answer and the next user message, submitted when the answer is read."""
    from runtime.scheduler import Scheduler

    engine.reset_cache()
    compiles = engine.compiles_after_load
    sched = Scheduler(engine, prefix_cache=prefix_cache)
    arrivals = sorted(((a, i, p, n) for i, (p, n, a) in enumerate(workload["first"])), key=lambda x: (x[0], x[1]))
    users = workload.get("users")
    submitted, first, requests, conversation = {}, {}, [], {}
    step, t0 = 0, time.perf_counter()

    def submit(prompt, max_new, conv):
        r = sched.submit(prompt, max_new)
        submitted[r], conversation[r] = time.perf_counter(), conv
        requests.append(r)

    while arrivals or sched.busy:
        while arrivals and arrivals[0][0] <= step:
            _, i, p, n = arrivals.pop(0)
            submit(p, n, (i, 0))
        if not sched.busy:
            step = arrivals[0][0]
            continue
        served = sched.step()
        step += 1
        now = time.perf_counter()
        for r in served:
            first.setdefault(r, now)
            c, turn = conversation[r]
            if r.finish_reason is not None and users is not None and turn + 1 < len(users[c]):
                submit(list(r.prompt) + r.generated + users[c][turn + 1], workload["answer"], (c, turn + 1))
    wall = time.perf_counter() - t0
    s = sched.stats
    ttft = np.array([first[r] - submitted[r] for r in requests])
    prompt_tokens = sum(len(r.prompt) for r in requests)
    return {"wall_s": wall, "requests": len(requests), "prompt_tokens": prompt_tokens,
            "prefill_tokens": s.prefill_tokens, "cached_tokens": sched.pages.hit_tokens,
            "hit_rate": sched.pages.hit_tokens / prompt_tokens, "evictions": sched.pages.evictions,
            "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3), "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
            "output_tokens": sum(len(r.generated) for r in requests),
            "tokens_per_s": sum(len(r.generated) for r in requests) / wall, "steps": s.steps,
            "padding_efficiency": s.real_tokens / s.padded_tokens, "preemptions": s.preemptions,
            "compiles_after_load": engine.compiles_after_load - compiles,
            "outputs": [list(r.generated) for r in sorted(requests, key=conversation.get)]}


def median_run(runs: list[dict]) -> dict:
    """Medians of the timed figures; the schedule's own figures are the same in every run."""
    out = dict(runs[0])
    for k in ("wall_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s"):
        out[k] = float(np.median([r[k] for r in runs]))
        out[k + "_runs"] = [round(r[k], 4) for r in runs]
    out["identical_across_repeats"] = all(r["outputs"] == runs[0]["outputs"] for r in runs)
    return out


def compare(engine, name: str, repeats: int) -> dict:
    workload = WORKLOADS[name](max_context(engine))
    runs = {True: [], False: []}
    for _ in range(repeats):
        for on in (False, True):
            runs[on].append(serve(engine, workload, on))
    on, off = median_run(runs[True]), median_run(runs[False])
    # Each repeat runs off then on back to back: the ratio within a pair shares the machine's load
    # of the moment, so the median of paired ratios is steadier than a ratio of medians.
    paired = lambda f: float(np.median([f(a, b) for a, b in zip(runs[True], runs[False])]))  # noqa: E731
    row = {"on": on, "off": off, "identical_tokens": on["outputs"] == off["outputs"],
           "prefill_ratio": on["prefill_tokens"] / off["prefill_tokens"],
           "ttft_p50_speedup": paired(lambda a, b: b["ttft_p50_ms"] / a["ttft_p50_ms"]),
           "ttft_p99_speedup": paired(lambda a, b: b["ttft_p99_ms"] / a["ttft_p99_ms"]),
           "throughput_ratio": paired(lambda a, b: a["tokens_per_s"] / b["tokens_per_s"]),
           "throughput_ratio_runs": [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                                     for a, b in zip(runs[True], runs[False])]}
    for side in ("on", "off"):
        del row[side]["outputs"]
    print(f"{name:14s} prefill {on['prefill_tokens']:6d} vs {off['prefill_tokens']:6d} tokens "
          f"({row['prefill_ratio']:.2f}x); TTFT p50 {on['ttft_p50_ms']:7.1f} vs {off['ttft_p50_ms']:7.1f} ms "
          f"({row['ttft_p50_speedup']:.2f}x), p99 {on['ttft_p99_ms']:7.1f} vs {off['ttft_p99_ms']:7.1f} ms "
          f"({row['ttft_p99_speedup']:.2f}x); {on['tokens_per_s']:6.1f} vs {off['tokens_per_s']:6.1f} tok/s "
          f"({row['throughput_ratio']:.2f}x); hit rate {on['hit_rate']:.2f}; padding efficiency "
          f"{on['padding_efficiency']:.3f} vs {off['padding_efficiency']:.3f}; steps {on['steps']} vs {off['steps']}; "
          f"identical tokens {row['identical_tokens']}; "
          f"compiles {on['compiles_after_load'] + off['compiles_after_load']}",
          flush=True)
    return row


def host_cost(name: str, engine, repeats: int) -> dict:
    """The scheduler's own time (planning, routing, cache lookups, packing) over a workload, on a
    stand-in executor that does no device work: what the cache costs the host, apart from the
    device's step times and the machine's load. Fastest of the repeats."""
    from runtime.scheduler import generate

    w = WORKLOADS[name](max_context(engine))
    prompts, max_new, arrivals = (list(x) for x in zip(*w["first"]))
    seconds = {}
    for on in (False, True):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(stand_in(engine), prompts, max_new, arrivals=arrivals, prefix_cache=on)
            times.append(time.perf_counter() - t0)
        seconds[on] = min(times)
    print(f"{name:14s} host time of the scheduler alone (no device work): {seconds[True] * 1e3:.1f} vs "
          f"{seconds[False] * 1e3:.1f} ms ({seconds[True] / seconds[False]:.3f}x)", flush=True)
    return {"on_s": seconds[True], "off_s": seconds[False], "ratio": seconds[True] / seconds[False]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per workload and setting (default 3)")
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--no-sizing", action="store_true",
                   help="plan steps without the build's measured step times (largest bucket's limits first): "
                        "times measured on a loaded machine skew how prefill steps are sized")
    p.add_argument("--max-context", type=int, default=1024,
                   help="context of the benchmark artifact (built once, then reused); workloads scale with it "
                        "(default 1024)")
    p.add_argument("--result", default="prefix", help="results name (bench/results/NAME.json and .png)")
    args = p.parse_args()
    from runtime.engine import load

    engine = load(ensure_bench_artifact(args.max_context))
    if args.no_sizing:
        engine.step_seconds = None
    load_avg = os.getloadavg()
    results = {name: compare(engine, name, args.repeats) for name in args.workloads}
    if "trace" in args.workloads:
        results["trace"]["host_only"] = host_cost("trace", engine, max(args.repeats, 5))
    results["load_average_1_5_15"] = [load_avg, list(os.getloadavg())]
    results["repeats"], results["sized_by_step_time"] = args.repeats, not args.no_sizing
    write_result(args.result, results)
    plot(results, args.workloads, args.result)


def plot(results: dict, names: list[str], name: str = "prefix") -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("prefill_tokens", "prompt tokens computed"), ("ttft_p50_ms", "TTFT p50 (ms)"),
               ("tokens_per_s", "output tokens / s"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    x = np.arange(len(names))
    for ax, (key, label) in zip(axes, metrics):
        for k, side in enumerate(("off", "on")):
            ax.bar(x + (k - 0.5) * 0.38, [results[n][side][key] for n in names], 0.38, label=f"cache {side}")
        ax.set_xticks(x, [n.replace("_", "\n") for n in names])
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("Prefix cache on vs off (tiny artifact, 2x4 CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(f"wrote {RESULTS / name}.png")


if __name__ == "__main__":
    main()
