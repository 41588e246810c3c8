"""bfloat16 KV against an 8-bit KV cache in the same bytes, under KV pressure.

The tiny preset built in bfloat16 on 2x4, twice: `--kv-cache-dtype auto` (bfloat16) and an 8-bit
cache, both with the same `--kv-cache-gib` per device. The budget holds a quarter of the pages the
requests would need at once in bfloat16 (at least the largest request), so the bfloat16 cache runs
few requests at a time and the rest wait or are preempted; the 8-bit cache gets twice the pages in
the same bytes. 64 long-tailed prompts, 24 greedy tokens each, all at once, KV pages on demand.
Steps, wall time (second, warm run), preemptions, and how many generated tokens equal bfloat16's.

    python -m bench.quantized [--kv-cache-dtype int8|fp8_e4m3|fp8_e5m2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import ROOT, write_result
from bench.kv_on_demand import requests

PAGE, DP, TP, NEW_TOKENS = 8, 2, 4, 24


def bf16_page_bytes() -> int:
    """One bfloat16 page of one group on one device of the tiny preset on DPxTP."""
    from dp_attention import MeshShape
    from export.build import BuildConfig
    from export.source import open_model

    mesh = MeshShape(DP, TP)
    return BuildConfig(meshes=(mesh,)).page_bytes(open_model("qwen3-moe-tiny", "bfloat16", weights=False).config, mesh)


def build(name: str, kv_dtype: str, gib: float):
    from runtime.engine import load

    ladder = ROOT / "artifacts" / "bench-kvq-buckets.json"
    ladder.parent.mkdir(parents=True, exist_ok=True)
    ladder.write_text('{"tokens": [4, 8, 16, 32, 64], "max_seqs": 32}')
    out = ROOT / "artifacts" / f"bench-kvq-{name}"
    subprocess.run([sys.executable, "-m", "export", "build", "--mesh", f"{DP}x{TP}", "--dtype", "bfloat16",
                    "--kv-cache-dtype", kv_dtype, "--kv-cache-gib", repr(gib), "--padding-modes", "max_len",
                    "--buckets", str(ladder), "--out", str(out), "--quiet"], cwd=ROOT, check=True)
    return load(out)


def run(engine, prompts, max_new) -> dict:
    for _ in range(2):  # the second run is warm
        engine.reset_cache()
        t0 = time.perf_counter()
        outputs, stats = engine.generate(prompts, max_new)
        seconds = time.perf_counter() - t0
    return {"pages_per_group": engine.num_pages, "seconds": seconds, "steps": stats["steps"],
            "generated_tokens": stats["generated_tokens"], "preemptions": stats["preemptions"],
            "compiles_after_load": stats["compiles_after_load"], "outputs": outputs}


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--kv-cache-dtype", choices=["int8", "fp8_e4m3", "fp8_e5m2"], default="int8")
    kv = args.parse_args(argv).kv_cache_dtype
    prompts = requests()
    max_new = [NEW_TOKENS] * len(prompts)
    need = sum(-(-(len(p) + NEW_TOKENS - 1) // PAGE) for p in prompts)
    largest = max(-(-(len(p) + NEW_TOKENS - 1) // PAGE) for p in prompts)
    pages = max(need // 4 // DP, largest) + 1  # bfloat16 pages per group, + the reserved page 0
    gib = (pages * bf16_page_bytes() + 1) / 2**30  # a byte over, so float rounding can't lose a page
    rows = {"bfloat16": run(build("bf16", "auto", gib), prompts, max_new),
            kv: run(build(kv, kv, gib), prompts, max_new)}
    base, quant = rows["bfloat16"].pop("outputs"), rows[kv].pop("outputs")
    same = sum(a == b for x, y in zip(base, quant) for a, b in zip(x, y))
    first = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(base, quant))
    result = {"requests": len(prompts), "max_new_tokens": NEW_TOKENS, "pages_needed_at_once": need,
              "kv_cache_bytes_per_device": int(gib * 2**30), "runs": rows,
              "steps_ratio": rows["bfloat16"]["steps"] / rows[kv]["steps"],
              "wall_ratio": rows["bfloat16"]["seconds"] / rows[kv]["seconds"],
              "tokens_equal_to_bfloat16": same / sum(map(len, base)),
              "tokens_before_first_difference": first / sum(map(len, base))}
    for name, r in rows.items():
        print(f"{name:9s} {r['pages_per_group']:4d} pages/group  {r['steps']:4d} steps  {r['seconds']:6.2f} s  "
              f"{r['preemptions']:3d} preemptions  {r['generated_tokens']} tokens  compiles {r['compiles_after_load']}")
    print(f"same {result['kv_cache_bytes_per_device']} KV bytes per device: {kv} runs {result['steps_ratio']:.2f}x "
          f"fewer steps (goal >= 1.5), {result['wall_ratio']:.2f}x less wall time; "
          f"{result['tokens_equal_to_bfloat16']:.0%} of tokens equal bfloat16's, "
          f"{result['tokens_before_first_difference']:.0%} before a request's first difference")
    result["goal_met"] = result["steps_ratio"] >= 1.5
    write_result(f"quantized_kv_{kv}", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
