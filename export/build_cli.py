"""`build` after argument parsing: turn flags into a BuildConfig, run, map errors to one line + exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from dp_attention import ConfigError, MeshError, WeightError, parse_mesh
from runtime.buckets import MODES, ladder_from_trace

from .build import BuildConfig, build
from .errors import BuildError
from .progress import Reporter
from .tf_savedmodel import mesh_error as savedmodel_mesh_error


class UsageError(ValueError):
    pass


def _ladders(args) -> dict:
    if args.buckets:
        try:
            d = json.loads(Path(args.buckets).read_text())
            out = {"token_ladder": tuple(int(t) for t in d["tokens"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--buckets {args.buckets}: expected JSON with a 'tokens' list ({e})") from None
        if "max_seqs" in d:
            out["max_seqs"] = int(d["max_seqs"])
        if "sums" in d:
            out["sum_ladder"] = tuple(int(g) for g in d["sums"])
        if "max_step_tokens" in d:
            out["max_step_tokens"] = int(d["max_step_tokens"])
        return out
    if args.plan_from:
        try:
            steps = json.loads(Path(args.plan_from).read_text())["steps"]
            tokens = [max(s) for s in steps]
            sums = [sum(s) for s in steps]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--plan-from {args.plan_from}: expected JSON {{'steps': [[tokens per group]]}} ({e})") from None
        return {"token_ladder": tuple(ladder_from_trace(tokens, args.max_buckets)),
                "sum_ladder": tuple(ladder_from_trace(sums, args.max_buckets))}
    return {}


def _config(args, meshes) -> BuildConfig:
    shapes = tuple(parse_mesh(m) for m in meshes)
    modes = tuple(m.strip() for m in args.padding_modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--padding-modes {args.padding_modes!r}: expected a comma-separated subset of {','.join(MODES)}")
    platforms = tuple(p.strip() for p in (args.platform or jax.default_backend()).split(",") if p.strip())
    bad = [p for p in platforms if p not in ("cpu", "tpu", "cuda", "rocm")]
    if bad or not platforms:
        raise UsageError(f"--platform {args.platform!r}: expected a comma-separated subset of cpu,tpu,cuda,rocm")
    if args.tf_savedmodel and savedmodel_mesh_error(shapes):
        raise UsageError(savedmodel_mesh_error(shapes))
    for name in ("max_context", "page_size", "pages_per_group", "jobs", "logprobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return BuildConfig(model=args.model, meshes=shapes, out=Path(args.out) if args.out else None,
                       platforms=platforms, dtype=args.dtype, modes=modes, page_size=args.page_size,
                       max_context=args.max_context, pages_per_group=args.pages_per_group, jobs=args.jobs,
                       fast_load=not args.no_fast_load, tf_savedmodel=args.tf_savedmodel, logprobs=args.logprobs,
                       executables_only=args.executables_only, attention=args.attention,
                       tpu_generation=args.tpu_generation, kv_cache_dtype=args.kv_cache_dtype,
                       kv_cache_bytes=_gib(args.kv_cache_gib),
                       expert_layout=None if args.expert_layout == "auto" else args.expert_layout,
                       quantize=args.quantize, quantize_lm_head=args.quantize_lm_head, **_ladders(args))


def _gib(value: float | None) -> int | None:
    if value is None:
        return None
    if not value > 0:
        raise UsageError(f"--kv-cache-gib must be positive, got {value}")
    return int(value * 2**30)


def run_build(args, meshes) -> int:
    try:
        cfg = _config(args, meshes)
        build(cfg, Reporter(quiet=args.quiet))
    except (UsageError, MeshError, ConfigError, WeightError, BuildError) as e:
        print(f"python -m export build: error: {e}", file=sys.stderr)
        return 2
    return 0
