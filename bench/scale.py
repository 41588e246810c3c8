"""What one step costs at real size: Qwen3-30B-A3B and Qwen3-235B-A22B built from config.json alone.

Each configuration goes through the real build (`export build --executables-only`): exported from
abstract shapes, deserialized and compiled for this machine's 8 CPU devices, and its cost recorded
in the manifest. Reported per bucket, per device:

- temp bytes (XLA's memory_analysis: everything but arguments, outputs and code);
- FLOPs of every dot, each loop counted by its trip count (XLA's own cost_analysis counts a scanned
  layer once), against the analytic minimum for the bucket:
      per token and layer  2H(nq+2nkv)hd + 2 nq hd H          (q, k, v, o projections)
                         + 4 nq hd C                           (attention over the whole context C)
                         + 2HE + 6kHI   (MoE layer)  or  6 H Id (dense layer)
      plus 2HV per sequence (lm_head); all divided by the number of devices;
- bytes the step returns per sequence besides the (donated, aliased) KV cache;
- export (lower + serialize) and compile seconds, and export size, for 8 layers against 48.

XLA:CPU has no bfloat16 matmul or scatter: it converts operands to float32 and hoists those
conversions out of the layer loop, so a bfloat16 compile here measures that emulation (whole
weight stacks in float32) rather than the model. Both dtypes are reported; the float32 build, which
runs natively here, is the bound for a backend with native bfloat16 (every buffer the same shape at
half the bytes).

    python -m bench.scale [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import RESULTS, ROOT, write_result  # noqa: E402
from runtime.batching import wire_shapes  # noqa: E402
from runtime.format import read_manifest  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"
GiB, MiB = 2**30, 2**20
GOALS = {"temp_512": 2 * GiB, "temp_64": 512 * MiB, "flops_ratio": 1.5, "out_per_seq": 1024,
         "export_size_ratio": 1.5, "compile_ratio": 2.0}


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    mesh: str
    dtype: str
    layers: int | None = None  # None: the config's own depth
    tokens: tuple[int, ...] = (64, 512)
    seqs: int = 64
    max_context: int = 4096
    page_size: int = 16
    pages_per_group: int = 8192


def minimum_flops(cfg, tokens: int, seqs: int, dp: int, devices: int, context: int) -> float:
    """The analytic minimum of one step (see the module docstring), per device."""
    H, hd, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    attention = 2 * H * (nq + 2 * nkv) * hd + 2 * nq * hd * H + 4 * nq * hd * context
    moe = 2 * H * cfg.num_experts + 6 * cfg.experts_per_token * H * cfg.moe_intermediate_size
    dense = 6 * H * cfg.intermediate_size
    per_token = sum(attention + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.num_layers))
    return (dp * tokens * per_token + dp * seqs * 2 * H * cfg.vocab_size) / devices


def build_case(case: Case, work: Path) -> dict:
    """One executables-only build through the real builder; its manifest and a config copy."""
    from dp_attention import load_hf_config, parse_mesh
    from export.build import BuildConfig, build

    src = json.loads((CONFIGS / case.config / "config.json").read_text())
    if case.layers is not None:
        src["num_hidden_layers"] = case.layers
    model_dir = work / f"{case.config}-{case.layers or src['num_hidden_layers']}L"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(src))
    out = work / (model_dir.name + f"-{case.dtype}-{case.mesh}")
    build(BuildConfig(model=str(model_dir), meshes=(parse_mesh(case.mesh),), out=out, dtype=case.dtype,
                      modes=("max_len",), token_ladder=case.tokens, max_seqs=case.seqs, page_size=case.page_size,
                      max_context=case.max_context, pages_per_group=case.pages_per_group, jobs=1, fast_load=False,
                      executables_only=True))
    return read_manifest(out), load_hf_config(model_dir), out


def measure(case: Case, work: Path) -> list[dict]:
    manifest, cfg, out = build_case(case, work)
    mesh = manifest.meshes[0]
    dp, devices = mesh.dp, mesh.devices
    cache_bytes = 1
    for n in mesh.cache_shape:
        cache_bytes *= n
    cache_bytes = cache_bytes * (2 if case.dtype == "bfloat16" else 4) // devices
    rows = []
    for e in manifest.executables:
        b, cost = e.bucket, e.cost
        minimum = minimum_flops(cfg, b.tokens, b.seqs, dp, devices, case.max_context)
        # Outputs per device: the cache shard, one group's row of the device-resident carry and
        # next_ints (int32), and the replicated `sampled`, which every host reads.
        wire = wire_shapes({k: tuple(v) for k, v in e.batch_shapes.items()})
        resident = 4 * (wire["ints"][0][1] + wire["prev_tokens"][0][1])
        returned = cost.output_bytes - cache_bytes - resident
        rows.append({
            "config": case.config, "layers": cfg.num_layers, "mesh": case.mesh, "dtype": case.dtype,
            "tokens_per_group": b.tokens, "seqs_per_group": b.seqs,
            "temp_bytes": cost.temp_bytes, "argument_bytes": cost.argument_bytes,
            "flops": cost.flops, "min_flops": minimum, "flops_ratio": cost.flops / minimum,
            "xla_cost_analysis_flops": cost.xla_flops,
            "bytes_out_per_seq": returned / (dp * b.seqs),
            "export_seconds": e.export_seconds, "compile_seconds": e.compile_seconds,
            "export_bytes": (out / e.file).stat().st_size,
        })
        r = rows[-1]
        print(f"{case.config:16s} {cfg.num_layers:3d}L {case.dtype:8s} {case.mesh} T={b.tokens:4d}: "
              f"temp {r['temp_bytes'] / GiB:6.2f} GiB  flops {r['flops']:.3e} = {r['flops_ratio']:.2f}x min  "
              f"out/seq {r['bytes_out_per_seq']:.0f} B  export {r['export_seconds']:.1f}s "
              f"compile {r['compile_seconds']:.1f}s  {r['export_bytes'] / 1024:.0f} KiB", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30B only, float32 only")
    args = p.parse_args(argv)
    cases = [Case("qwen3-30b-a3b", "2x4", "float32"), Case("qwen3-30b-a3b", "2x4", "float32", layers=8)]
    if not args.quick:
        cases += [Case("qwen3-30b-a3b", "2x4", "bfloat16"), Case("qwen3-30b-a3b", "2x4", "bfloat16", layers=8),
                  Case("qwen3-235b-a22b", "2x4", "float32"), Case("qwen3-235b-a22b", "2x4", "bfloat16")]
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        rows = [r for case in cases for r in measure(case, Path(tmp))]
        tpu = [] if args.quick else tpu_exports(Path(tmp))
    result = {"rows": rows, "tpu_exports": tpu, "goals": GOALS, "checks": checks(rows)}
    for name, c in result["checks"].items():
        print(f"{name}: {c['figure']}  goal {c['goal']}  {'met' if c['met'] else 'NOT met'}")
    write_result("scale", result)
    plot(rows)
    return 0


def tpu_exports(work: Path) -> list[dict]:
    """Qwen3-30B-A3B for a TPU v5e fleet (4x8, bfloat16, the fa kernel), exported on this machine:
    how long each export takes, its size, and that it holds the Pallas kernel."""
    import jax

    from dp_attention import parse_mesh
    from export.build import BuildConfig, build

    out = work / "tpu-30b-4x8"
    t0 = time.perf_counter()
    build(BuildConfig(model=str(CONFIGS / "qwen3-30b-a3b"), meshes=(parse_mesh("4x8"),), out=out, dtype="bfloat16",
                      platforms=("tpu",), tpu_generation="v5e", modes=("max_len",), token_ladder=(64, 512),
                      max_seqs=64, page_size=16, max_context=4096, pages_per_group=8192, executables_only=True))
    total = time.perf_counter() - t0
    rows = []
    for e in read_manifest(out).executables:
        exported = jax.export.deserialize(bytearray((out / e.file).read_bytes()))
        text = exported.mlir_module()
        rows.append({"bucket": e.to_json()["bucket"], "export_seconds": e.export_seconds,
                     "bytes": (out / e.file).stat().st_size, "platforms": list(exported.platforms),
                     "pallas_kernel": "tpu_custom_call" in text, "ragged_dot": "ragged_dot" in text})
        print(f"tpu v5e 4x8 T={e.bucket.tokens:4d}: export {e.export_seconds:.1f}s "
              f"{rows[-1]['bytes'] / 1024:.0f} KiB  Pallas kernel {rows[-1]['pallas_kernel']}  "
              f"ragged_dot {rows[-1]['ragged_dot']}")
    print(f"tpu build in all: {total:.1f} s")
    return rows


def checks(rows) -> dict:
    """The issue's goals, on Qwen3-30B-A3B float32 (the native-precision bound, see the docstring)."""
    def row(layers, tokens, dtype="float32"):
        return next(r for r in rows if r["config"] == "qwen3-30b-a3b" and r["layers"] == layers
                    and r["tokens_per_group"] == tokens and r["dtype"] == dtype)

    full = {t: row(48, t) for t in (64, 512)}
    short = {t: row(8, t) for t in (64, 512)}
    export_ratio = max(full[t]["export_bytes"] / short[t]["export_bytes"] for t in full)
    compile_ratio = max(full[t]["compile_seconds"] / short[t]["compile_seconds"] for t in full)
    return {
        "temp at 512 tokens/group": {"figure": f"{full[512]['temp_bytes'] / GiB:.2f} GiB", "goal": "<= 2 GiB",
                                     "met": full[512]["temp_bytes"] <= GOALS["temp_512"]},
        "temp at 64 tokens/group": {"figure": f"{full[64]['temp_bytes'] / MiB:.0f} MiB", "goal": "<= 512 MiB",
                                    "met": full[64]["temp_bytes"] <= GOALS["temp_64"]},
        "FLOPs / minimum": {"figure": " / ".join(f"{full[t]['flops_ratio']:.2f}" for t in full), "goal": "<= 1.5",
                            "met": max(full[t]["flops_ratio"] for t in full) <= GOALS["flops_ratio"]},
        "bytes out per sequence": {"figure": f"{max(full[t]['bytes_out_per_seq'] for t in full):.0f} B",
                                   "goal": "<= 1 KiB",
                                   "met": max(full[t]["bytes_out_per_seq"] for t in full) <= GOALS["out_per_seq"]},
        "export size 48 / 8 layers": {"figure": f"{export_ratio:.2f}", "goal": "<= 1.5",
                                      "met": export_ratio <= GOALS["export_size_ratio"]},
        "compile 48 / 8 layers": {"figure": f"{compile_ratio:.2f}", "goal": "<= 2",
                                  "met": compile_ratio <= GOALS["compile_ratio"]},
    }


def plot(rows):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["layers"] in (48, 94)]
    short = {"float32": "f32", "bfloat16": "bf16 (CPU emulation)"}
    labels = [f"{r['config'].split('-')[1]} {short[r['dtype']]}\nT={r['tokens_per_group']}" for r in full]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(range(len(full)), [r["temp_bytes"] / GiB for r in full], color="tab:blue")
    a.axhline(2, color="grey", linestyle=":", label="2 GiB goal (512 tokens/group)")
    a.axhline(0.5, color="grey", linestyle="--", label="512 MiB goal (64 tokens/group)")
    a.set_yscale("log")
    a.set_ylabel("temp per device (GiB, log)")
    a.set_xticks(range(len(full)), labels, fontsize=7)
    a.legend(fontsize=7)
    b.bar(range(len(full)), [r["flops_ratio"] for r in full], color="tab:green")
    b.axhline(1.5, color="grey", linestyle=":", label="1.5x goal")
    b.set_ylabel("FLOPs per device / analytic minimum")
    b.set_xticks(range(len(full)), labels, fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle("One step at real size, mesh 2x4, 4,096 context (float32 = native bound; bf16 = CPU emulation)")
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)
    print(f"wrote {RESULTS / 'scale.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
