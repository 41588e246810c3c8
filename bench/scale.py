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

Expert layouts (`--layouts`, no compiling: shapes, FLOPs and bytes follow from the layout): per
(config, mesh, layout), at 512 tokens per group in bfloat16 as a TPU runs it (megablox gmm):

- each device's expert matmuls, [rows, H] x [local experts, H, local width] and back, and the share
  of their 128-lane tiles that hold real columns;
- expert FLOPs per device for the worst routing the static shapes allow (every pair on this device's
  experts) and for uniform routing (every expert the same number of pairs), counted as the kernel
  runs them: whole row tiles, a group that starts inside a tile costs that tile again; against the
  minimum, pairs * 6HI / devices; the same for a random routing (each token's experts drawn at
  random) on its busiest device; the matrix unit's time against the minimum (uniform FLOPs over the
  lane fill: a 96-column matmul occupies 128 lanes); and the whole step's uniform FLOPs against its
  analytic minimum (attention, projections and lm_head taken at their minimum);
- bytes each device moves per step: the collectives (the DP gather in and the float32 reduce out
  around each MoE layer, the tensor-parallel sums, the logits), and from HBM its expert weights and
  the expert activations (gathered rows, gate/up outputs and h, float32 down outputs: every row of
  the worst-case buffer);
- HBM per device on each TPU generation: weights, KV cache (4,096 context, 16-token pages, 8,192 pages
  per group), the largest bucket's estimated temp (export.hbm), and the most pages per group that fit.

Quantized weights (`--quantized`, no compiling: bytes follow from shapes): per (config, mesh), each
device's weight bytes in bfloat16, with `--quantize int8` (scales included, embedding and lm_head
in bfloat16) and with `--quantize-lm-head` too, and on v5e/v5p/v6e what HBM is left for the KV cache
beside the weights and the largest bucket's estimated temp (export.hbm), in GiB and in tokens per
device of a bfloat16 cache; `weight_bytes_per_device` is the figure to combine with a cache's bytes
per token. `--measure-temp` also compiles Qwen3-30B-A3B (4 layers, float32, 2x4, 64 tokens per
group) unquantized and int8, to show the int8 step adds no whole-stack temp.

    python -m bench.scale [--quick | --layouts | --quantized [--measure-temp]]
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
    quantize: str = "none"
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
    out = work / (model_dir.name + f"-{case.dtype}-{case.quantize}-{case.mesh}")
    # The portable step (native attention): a CPU kernel's FLOPs and scratch are not in the HLO counted here.
    build(BuildConfig(model=str(model_dir), meshes=(parse_mesh(case.mesh),), out=out, dtype=case.dtype,
                      quantize=case.quantize, attention="native",
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
            "quantize": case.quantize,
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


LAYOUT_CASES = [("qwen3-30b-a3b", "2x4"), ("qwen3-30b-a3b", "4x8"), ("qwen3-235b-a22b", "4x8"),
                ("qwen3-235b-a22b", "8x8")]
LAYOUT_GOALS = {"uniform_flops_ratio": 1.2}


def gmm_row_tiles(counts, first: int, local: int, tm: int) -> int:
    """Row tiles megablox gmm runs for experts [first, first + local) of a sorted routing with
    `counts` pairs per expert: each non-empty group from its start rounded down to its end rounded up."""
    import numpy as np

    ends = np.cumsum(counts)
    starts = ends - counts
    tiles = (-(-ends // tm) * tm - starts // tm * tm) // tm
    return int(np.where(np.asarray(counts) > 0, tiles, 0)[first:first + local].sum())


def layout_row(config: str, mesh: str, layout: str | None, tokens: int = 512, dtype: str = "bfloat16",
               generation: str = "v5e") -> dict:
    import numpy as np

    from dp_attention import load_hf_config, parse_mesh
    from dp_attention.model import gmm_tiling
    from dp_attention.weights import ExpertLayout

    cfg = load_hf_config(CONFIGS / config)
    shape = parse_mesh(mesh)
    lay = ExpertLayout.choose(cfg, shape, layout)
    dp, tp, devices = shape.dp, shape.tp, shape.num_devices
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.experts_per_token
    b = 2 if dtype == "bfloat16" else 4
    G = dp * tokens
    M = G * k
    tm, _, _ = gmm_tiling(M, H, lay.local_width, generation, lay.experts)
    rows = -(-M // tm) * tm
    per_row = 2 * 3 * H * lay.local_width  # gate, up, down
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    worst_tiles = rows // tm + lay.local_experts - 1  # every pair local, each group starting mid-tile
    uniform = np.full(lay.experts, 0)
    uniform[:E] = M // E + (np.arange(E) < M % E)
    uniform_tiles = max(gmm_row_tiles(uniform, s * lay.local_experts, lay.local_experts, tm) for s in range(lay.shards))
    rng = np.random.default_rng(0)  # each token's k experts drawn at random, distinct: a routing without skew
    drawn = np.argsort(rng.random((G, E)), axis=1)[:, :k].reshape(-1)
    sampled = np.bincount(drawn, minlength=lay.experts)
    random_tiles = max(gmm_row_tiles(sampled, s * lay.local_experts, lay.local_experts, tm) for s in range(lay.shards))
    expert_min = M * 6 * H * I / devices * moe_layers
    step_min = minimum_flops(cfg, tokens, 64, dp, devices, 4096)
    uniform_flops = uniform_tiles * tm * per_row * moe_layers
    tensor_sum = lambda n: 2 * (tp - 1) / tp * n  # noqa: E731  ring all-reduce, bytes sent per device
    collectives = moe_layers * ((dp - 1) * tokens * H * b + (dp - 1) / dp * G * H * 4 + tensor_sum(tokens * H * 4)) \
        + cfg.num_layers * tensor_sum(tokens * H * b) + (tp - 1) * 64 * cfg.vocab_size / tp * 4
    expert_weights = moe_layers * 3 * lay.local_experts * H * lay.local_width * b
    activations = moe_layers * (rows * H * b + rows * lay.local_width * 3 * b + rows * H * 4)
    row = {"config": config, "mesh": mesh, "layout": lay.name, "tokens_per_group": tokens, "dtype": dtype,
           "local_experts": lay.local_experts, "local_width": lay.local_width,
           "matmuls": [f"[{rows}, {H}] x [{lay.local_experts}, {H}, {lay.local_width}]",
                       f"[{rows}, {lay.local_width}] x [{lay.local_experts}, {lay.local_width}, {H}]"],
           "gmm_tiling": [[tm, *gmm_tiling(rows, H, lay.local_width, generation)[1:]],
                          [tm, *gmm_tiling(rows, lay.local_width, H, generation)[1:]]],
           "lane_fill": lay.lane_fill() * lay.lane_fill(H),
           "expert_flops_worst": worst_tiles * tm * per_row * moe_layers, "expert_flops_uniform": uniform_flops,
           "expert_flops_min": expert_min, "uniform_expert_ratio": uniform_flops / expert_min,
           "uniform_mxu_ratio": uniform_flops / expert_min / (lay.lane_fill() * lay.lane_fill(H)),
           "expert_flops_random": random_tiles * tm * per_row * moe_layers,
           "random_expert_ratio": random_tiles * tm * per_row * moe_layers / expert_min,
           "uniform_step_ratio": (step_min - expert_min + uniform_flops) / step_min,
           "collective_bytes": collectives, "expert_weight_bytes": expert_weights,
           "expert_activation_bytes": activations, "hbm": hbm_rows(config, shape, lay.name, dtype)}
    return row


def hbm_rows(config: str, shape, layout: str, dtype: str) -> dict:
    """Per TPU generation: weights, KV cache and estimated temp per device, and the pages that fit."""
    from export import hbm
    from export.build import BuildConfig, _mesh_entry
    from export.errors import BuildError
    from export.source import open_model
    from runtime.buckets import Bucket

    source = open_model(str(CONFIGS / config), dtype, weights=False)
    cfg = BuildConfig(model=str(CONFIGS / config), meshes=(shape,), platforms=("tpu",), dtype=dtype,
                      max_context=4096, page_size=16, pages_per_group=8192, expert_layout=layout)
    entry = _mesh_entry(None, cfg, source, shape, False, cfg.cache(), set(), None)
    temp = hbm.estimate_temp_bytes(source.config, entry, Bucket("max_len", 512, 64, shape.dp * 512), dtype)
    out = {}
    for generation in hbm.HBM_BYTES:
        try:
            e = hbm.fit(generation, entry, dtype, temp, False, cfg.pages_per_group)
        except BuildError:
            e = None
        weights, kv = hbm.weight_bytes(entry), hbm.kv_bytes(entry, dtype)
        page = -(-kv // cfg.pages_per_group)
        out[generation] = {"weights": weights, "kv": kv, "temp_estimate": temp, "fits": e is not None,
                           "max_pages_per_group": max(0, (hbm.HBM_BYTES[generation] - weights - temp) // page)}
    return out


QUANTIZED_SCHEMES = {"bfloat16": ("none", False), "int8": ("int8", False), "int8 + lm_head": ("int8", True)}
QUANTIZED_GOALS = {"int8_over_bf16": 0.52, "kv_tokens_30b_v5e": 2.0}


def _mesh_entry_for(config: str, mesh: str, quantize: str = "none", lm_head: bool = False, dtype: str = "bfloat16"):
    """The manifest's mesh entry a TPU build of `config` would write (shapes, dtypes, shardings; no
    weights read), with the README's serving cache: 4,096 context, 16-token pages, 8,192 pages."""
    from dp_attention import parse_mesh
    from export.build import BuildConfig, _mesh_entry
    from export.source import open_model

    shape = parse_mesh(mesh)
    source = open_model(str(CONFIGS / config), dtype, weights=False)
    cfg = BuildConfig(model=str(CONFIGS / config), meshes=(shape,), platforms=("tpu",), dtype=dtype,
                      max_context=4096, page_size=16, pages_per_group=8192, quantize=quantize,
                      quantize_lm_head=lm_head)
    return source.config, _mesh_entry(None, cfg, source, shape, False, cfg.cache(), set(), None), cfg


def weight_bytes_per_device(config: str, mesh: str, quantize: str = "none", lm_head: bool = False,
                            dtype: str = "bfloat16") -> int:
    """Bytes of weights one device holds (scales included): subtract from a chip's HBM, with temp,
    to size a KV cache of any dtype."""
    from export import hbm

    return hbm.weight_bytes(_mesh_entry_for(config, mesh, quantize, lm_head, dtype)[1])


def quantized_row(config: str, mesh: str) -> dict:
    """Weight bytes per device per scheme, and the HBM left for a KV cache on each TPU generation."""
    from export import hbm
    from runtime.buckets import Bucket

    row = {"config": config, "mesh": mesh, "schemes": {}}
    for name, (quantize, lm_head) in QUANTIZED_SCHEMES.items():
        model, entry, cfg = _mesh_entry_for(config, mesh, quantize, lm_head)
        weights = hbm.weight_bytes(entry)
        temp = hbm.estimate_temp_bytes(model, entry, Bucket("max_len", 512, 64, entry.dp * 512), "bfloat16")
        kv_per_token = hbm.kv_bytes(entry, "bfloat16") / (cfg.pages_per_group * cfg.page_size)  # per device
        left = {g: max(0, cap - weights - temp) for g, cap in hbm.HBM_BYTES.items()}
        row["schemes"][name] = {"weight_bytes": weights, "temp_estimate": temp, "kv_left_bytes": left,
                                "bf16_kv_tokens": {g: int(b // kv_per_token) for g, b in left.items()},
                                "bf16_kv_bytes_per_token": kv_per_token}
    base = row["schemes"]["bfloat16"]["weight_bytes"]
    for s in row["schemes"].values():
        s["ratio_to_bf16"] = s["weight_bytes"] / base
    return row


def quantized_main(measure_temp: bool) -> dict:
    rows = []
    for config, mesh in LAYOUT_CASES:
        r = quantized_row(config, mesh)
        rows.append(r)
        for name, s in r["schemes"].items():
            left = ", ".join(f"{g} {b / GiB:5.2f} GiB ({s['bf16_kv_tokens'][g]:,} tok)" for g, b in s["kv_left_bytes"].items())
            print(f"{config:16s} {mesh} {name:15s} weights {s['weight_bytes'] / GiB:6.2f} GiB/device "
                  f"({s['ratio_to_bf16']:.3f}x bf16)  left for KV: {left}", flush=True)
    ratios = [r["schemes"]["int8 + lm_head"]["ratio_to_bf16"] for r in rows]
    ratios_head = [r["schemes"]["int8"]["ratio_to_bf16"] for r in rows]
    pick = lambda c, m: next(r for r in rows if r["config"] == c and r["mesh"] == m)["schemes"]  # noqa: E731
    a30, a235 = pick("qwen3-30b-a3b", "2x4"), pick("qwen3-235b-a22b", "4x8")
    kv_gain = a30["int8"]["kv_left_bytes"]["v5e"] / max(1, a30["bfloat16"]["kv_left_bytes"]["v5e"])
    checks = {
        "int8 weight bytes / bf16 (embedding, lm_head int8 too)": {
            "figure": " / ".join(f"{x:.3f}" for x in ratios), "goal": "<= 0.52",
            "met": max(ratios) <= QUANTIZED_GOALS["int8_over_bf16"]},
        "int8 weight bytes / bf16 (embedding, lm_head bf16)": {
            "figure": " / ".join(f"{x:.3f}" for x in ratios_head), "goal": "(for comparison)", "met": True},
        "235B-A22B 4x8 v5e: HBM left for KV beside int8 weights": {
            "figure": f"{a235['int8']['kv_left_bytes']['v5e'] / GiB:.2f} GiB (bf16 weights: "
                      f"{a235['bfloat16']['kv_left_bytes']['v5e'] / GiB:.2f})",
            "goal": ">= 4 GiB", "met": a235["int8"]["kv_left_bytes"]["v5e"] >= 4 * GiB},
        # The goal is for int8 weights with an 8-bit cache; the cache's half of it is the KV dtype's.
        "30B-A3B 2x4 v5e: KV room, int8 / bf16 weights (same cache dtype)": {
            "figure": f"{kv_gain:.2f}x", "goal": f"x (bf16 / cache bytes per token) >= 2: "
                                                f"{kv_gain * 2:.2f}x with an 8-bit cache",
            "met": kv_gain * 2 >= QUANTIZED_GOALS["kv_tokens_30b_v5e"]},
    }
    for name, c in checks.items():
        print(f"{name}: {c['figure']}  goal {c['goal']}  {'met' if c['met'] else 'NOT met'}")
    temp = []
    if measure_temp:
        with tempfile.TemporaryDirectory(prefix="scale-q-") as tmp:
            for q in ("none", "int8"):
                temp += measure(Case("qwen3-30b-a3b", "2x4", "float32", layers=4, tokens=(64,), quantize=q), Path(tmp))
    return {"rows": rows, "checks": checks, "temp": temp}


KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "fp8_e5m2")
KV_CASES = (("qwen3-30b-a3b", "2x4"), ("qwen3-30b-a3b", "4x2"), ("qwen3-235b-a22b", "4x8"))


def kv_bytes_per_token(config: str, mesh: str, dtype: str = "bfloat16", attention: str = "fa") -> dict[str, int]:
    """Per --kv-cache-dtype ("auto": `dtype`), the KV cache bytes one token takes on one device:
    every layer's K and V of the kv heads that device holds (head_dim padded to 128 lanes for fa)."""
    from dp_attention import parse_mesh
    from export.build import BuildConfig
    from export.source import open_model

    model = open_model(str(CONFIGS / config), dtype, weights=False).config
    shape = parse_mesh(mesh)
    out = {}
    for kv in KV_CACHE_DTYPES:
        cfg = BuildConfig(meshes=(shape,), platforms=("tpu",), attention=attention, kv_cache_dtype=kv, page_size=16)
        out[kv] = cfg.page_bytes(model, shape) // cfg.page_size
    return out


def kv_heads_per_device(config: str, mesh: str) -> int:
    """The fa kernel reads an 8-bit cache two kv heads at a time: it needs an even number here."""
    from dp_attention import Layout, parse_mesh
    from export.source import open_model

    shape = parse_mesh(mesh)
    model = open_model(str(CONFIGS / config), "bfloat16", weights=False).config
    return Layout.for_mesh(model, shape).kv_heads // shape.tp


def kv_main() -> dict:
    rows = []
    for config, mesh in KV_CASES:
        per, heads = kv_bytes_per_token(config, mesh), kv_heads_per_device(config, mesh)
        rows.append({"config": config, "mesh": mesh, "dtype": "bfloat16", "kv_bytes_per_token": per,
                     "kv_heads_per_device": heads, "fa_reads_8bit": heads % 2 == 0})
        print(f"{config:16s} {mesh}  KV bytes per token per device: "
              + ", ".join(f"{k} {v} ({v / per['auto']:.2f}x)" for k, v in per.items())
              + f"; {heads} kv heads per device: fa {'reads' if heads % 2 == 0 else 'cannot read'} an 8-bit cache")
    return {"rows": rows}


def layouts_main() -> dict:
    rows = []
    for config, mesh in LAYOUT_CASES:
        for layout in dict.fromkeys([None, "width"]):  # the chosen one, then the old one for comparison
            r = layout_row(config, mesh, layout)
            if rows and (r["config"], r["mesh"], r["layout"]) == (rows[-1]["config"], rows[-1]["mesh"], rows[-1]["layout"]):
                continue
            rows.append(r)
            fits = ", ".join(f"{g} {'fits' if h['fits'] else 'NO'} ({h['max_pages_per_group']} pages)"
                             for g, h in r["hbm"].items())
            print(f"{config:16s} {mesh} {r['layout']:9s} {r['local_experts']:3d} x {r['local_width']:4d}  "
                  f"fill {r['lane_fill']:.2f}  expert GFLOP worst {r['expert_flops_worst'] / 1e9:8.1f} uniform "
                  f"{r['expert_flops_uniform'] / 1e9:7.1f} ({r['uniform_expert_ratio']:.2f}x min, random "
                  f"{r['random_expert_ratio']:.2f}x on the busiest device; MXU time {r['uniform_mxu_ratio']:.2f}x; step "
                  f"{r['uniform_step_ratio']:.2f}x)  collectives {r['collective_bytes'] / 2**20:6.0f} MiB  "
                  f"expert weights {r['expert_weight_bytes'] / 2**30:.2f} GiB  activations "
                  f"{r['expert_activation_bytes'] / 2**30:.2f} GiB  | weights "
                  f"{r['hbm']['v5e']['weights'] / 2**30:.1f} GiB, KV {r['hbm']['v5e']['kv'] / 2**30:.1f} GiB: {fits}",
                  flush=True)
    chosen = [r for r in rows if r["layout"] == layout_row(r["config"], r["mesh"], None)["layout"]]
    checks = {
        "128-lane aligned (chosen layouts)": {"figure": ", ".join(f"{r['config'].split('-')[1]} {r['mesh']}: "
                                                                  f"{r['local_width']}" for r in chosen),
                                             "goal": "local width % 128 == 0",
                                             "met": all(r["local_width"] % 128 == 0 for r in chosen)},
        "uniform step FLOPs / minimum at 512 tokens/group": {
            "figure": " / ".join(f"{r['uniform_step_ratio']:.3f}" for r in chosen), "goal": "<= 1.2",
            "met": all(r["uniform_step_ratio"] <= LAYOUT_GOALS["uniform_flops_ratio"] for r in chosen)},
    }
    for name, c in checks.items():
        print(f"{name}: {c['figure']}  goal {c['goal']}  {'met' if c['met'] else 'NOT met'}")
    return {"rows": rows, "checks": checks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30B only, float32 only")
    p.add_argument("--layouts", action="store_true", help="only the expert-layout table (no compiling)")
    p.add_argument("--quantized", action="store_true", help="only the int8 weight-bytes and HBM table")
    p.add_argument("--measure-temp", action="store_true", help="with --quantized: compile 4 layers of 30B both ways")
    p.add_argument("--kv", action="store_true", help="only KV bytes per token per device for each --kv-cache-dtype")
    args = p.parse_args(argv)
    if args.quantized:
        write_result("scale_quantized", quantized_main(args.measure_temp))
        return 0
    if args.kv:
        write_result("scale_kv", kv_main())
        return 0
    if args.layouts:
        write_result("scale_layouts", layouts_main())
        return 0
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
