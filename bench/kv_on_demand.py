"""KV on demand against reserve-at-admission, with a pool a quarter of what the requests reserve.

64 long-tailed prompts, greedy, all at once, in two workloads:

every_token  24 new tokens each, all of them generated: max_new_tokens is exactly what each request
             uses, the case where reserving costs least (the worst case for on demand).
early_stop   max_new_tokens 64 (less where the context ends first), and an EOS ends most requests
             well before it, as in chat traffic where max_tokens is a cap. The tiny model's weights
             are random, so it has no EOS of its own: the benchmark names as EOS the fewest ids
             that end its greedy outputs (from an unstopped run) at a mean of at most 40% of
             the cap. Both policies serve the same requests with the same EOS ids.

Reserve-at-admission holds pages for prompt + max_new_tokens from the moment a request starts, so
few run at once; on demand, requests hold only what they have written and the newest is preempted
(and prefilled again later) when a group runs out. Per workload, the artifact's pool is a quarter
of the pages its requests would reserve. Wall time, tokens per second, steps, preemptions, and
whether the tokens are identical.

    python -m bench.kv_on_demand
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from bench.common import ROOT, write_result

PAGE, DP, MAX_CONTEXT = 8, 2, 256


def requests(n: int = 64, seed: int = 3):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(24), 0.9, n).astype(int), 1, 200)
    return [rng.integers(0, 500, int(k)).tolist() for k in lengths]


def build(name: str, prompts, max_new: list[int]):
    """An artifact whose per-group pool holds a quarter of what the requests reserve (at least
    the largest request, so every request fits alone); up to 32 sequences per group, so that the
    pool, not the executables' sequence slots, limits how many requests run at once."""
    from runtime.engine import load

    reserve = sum(-(-(len(p) + n - 1) // PAGE) for p, n in zip(prompts, max_new))
    largest = max(-(-(len(p) + n - 1) // PAGE) for p, n in zip(prompts, max_new))
    pool = max(reserve // 4 // DP, largest) + 1  # per group, + the reserved page 0
    ladder = ROOT / "artifacts" / "bench-kv-buckets.json"
    ladder.parent.mkdir(parents=True, exist_ok=True)
    ladder.write_text('{"tokens": [4, 8, 16, 32, 64], "max_seqs": 32}')
    out = ROOT / "artifacts" / f"bench-kv-{name}"
    subprocess.run([sys.executable, "-m", "export", "build", "--mesh", f"{DP}x4", "--pages-per-group", str(pool),
                    "--buckets", str(ladder), "--out", str(out), "--quiet"], cwd=ROOT, check=True)
    return load(out), reserve, pool - 1


def pick_eos(outputs: list[list[int]], cap: int) -> list[int]:
    """The fewest ids that, as EOS, end the unstopped outputs at a mean of <= 40% of the cap:
    greedily, each time the id that shortens the mean most."""
    def lengths(eos):
        return np.array([next((i + 1 for i, t in enumerate(o) if t in eos), len(o)) for o in outputs])

    eos: set[int] = set()
    vocab = sorted({t for o in outputs for t in o})
    while lengths(eos).mean() > 0.4 * cap:
        eos.add(min((t for t in vocab if t not in eos), key=lambda t: lengths(eos | {t}).mean()))
    return sorted(eos)


def compare(engine, prompts, max_new, eos) -> dict:
    rows = {}
    for kv in ("reserve", "on_demand", "reserve", "on_demand"):  # twice each: the second runs are warm
        engine.reset_cache()
        t0 = time.perf_counter()
        outputs, stats = engine.generate(prompts, max_new, kv=kv, eos_token_id=eos)
        seconds = time.perf_counter() - t0
        rows[kv] = {"seconds": seconds, "tokens_per_s": stats["generated_tokens"] / seconds, "steps": stats["steps"],
                    "generated_tokens": stats["generated_tokens"], "preemptions": stats["preemptions"],
                    "padding_efficiency": stats["padding_efficiency"],
                    "compiles_after_load": stats["compiles_after_load"], "outputs": outputs}
    same = rows["reserve"].pop("outputs") == rows["on_demand"].pop("outputs")
    return {"runs": rows, "identical_tokens": same,
            "throughput_ratio": rows["on_demand"]["tokens_per_s"] / rows["reserve"]["tokens_per_s"]}


def report(name: str, result: dict) -> None:
    for kv, r in result["runs"].items():
        print(f"{name:12s} {kv:10s} {r['seconds']:6.2f} s  {r['tokens_per_s']:7.1f} tok/s  {r['steps']:4d} steps  "
              f"{r['generated_tokens']:5d} tokens  {r['preemptions']:3d} preemptions  "
              f"padding efficiency {r['padding_efficiency']:.2f}  compiles {r['compiles_after_load']}")
    print(f"{name:12s} pool {result['pool_pages_per_group']} pages per group ({DP * result['pool_pages_per_group']} "
          f"in all) for {result['reserved_pages']} reserved: on demand / reserve = "
          f"{result['throughput_ratio']:.2f}x (goal >= 1.5), identical tokens: {result['identical_tokens']}")


def main() -> int:
    prompts = requests()
    results = {}

    every = [24] * len(prompts)
    engine, reserve, pool = build("every-token", prompts, every)
    results["every_token"] = {"max_new_tokens": 24, "reserved_pages": reserve, "pool_pages_per_group": pool,
                              **compare(engine, prompts, every, None)}
    report("every_token", results["every_token"])

    cap = [min(64, MAX_CONTEXT - len(p)) for p in prompts]
    engine, reserve, pool = build("early-stop", prompts, cap)
    unstopped, _ = engine.generate(prompts, cap)
    eos = pick_eos(unstopped, 64)
    lengths = [next((i + 1 for i, t in enumerate(o) if t in eos), len(o)) for o in unstopped]
    results["early_stop"] = {"max_new_tokens": 64, "eos_ids": eos, "reserved_pages": reserve,
                             "pool_pages_per_group": pool,
                             "output_lengths": {"median": float(np.median(lengths)), "mean": float(np.mean(lengths)),
                                                "at_cap": float(np.mean([n == c for n, c in zip(lengths, cap)]))},
                             **compare(engine, prompts, cap, eos)}
    ol = results["early_stop"]["output_lengths"]
    print(f"early_stop   EOS ids {eos}: output lengths median {ol['median']:.0f}, mean {ol['mean']:.1f}, "
          f"{ol['at_cap']:.0%} reach max_new_tokens")
    report("early_stop", results["early_stop"])
    results["goal_met"] = {k: r["throughput_ratio"] >= 1.5 and r["identical_tokens"] for k, r in results.items()}
    write_result("kv_on_demand", {"requests": len(prompts), **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
