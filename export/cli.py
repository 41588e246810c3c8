"""Command line for `python -m export build|inspect|warm`.

Arguments are parsed before jax is imported: on a CPU machine the virtual device count must be set
in XLA_FLAGS first, and it depends on the meshes asked for.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

DEVICE_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="build an artifact")
    b.add_argument("--mesh", action="append", default=None, metavar="DxT",
                   help="D data-parallel attention groups of T devices; repeat for several (default 2x4)")
    b.add_argument("--model", default="qwen3-moe-tiny", help="a preset name or a Hugging Face checkpoint directory")
    b.add_argument("--out", default=None, help="output directory (default artifacts/<model-name>)")
    b.add_argument("--platform", default=None, help="comma-separated: cpu, tpu, cuda (default: this machine's)")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights, activations and KV cache (default: the checkpoint's config.json dtype, float32 "
                        "if it names another)")
    b.add_argument("--padding-modes", default="max_len,sum_len",
                   help="comma-separated DP padding modes to build executables for (default max_len,sum_len)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--buckets", default=None, metavar="FILE",
                   help='JSON {"tokens": [..], "max_seqs": N, "sums": [..], "max_step_tokens": N} (sums optional; '
                        'max_step_tokens: a mesh gets only the rungs whose step, DP groups x tokens, fits it)')
    g.add_argument("--plan-from", default=None, metavar="TRACE",
                   help='a recorded trace, JSON {"steps": [[tokens per group, ...], ...]}')
    b.add_argument("--max-buckets", type=int, default=8, help="token rungs to derive from a trace (default 8)")
    b.add_argument("--max-context", type=int, default=256,
                   help="longest sequence (prompt + generated tokens) the artifact serves (default 256)")
    b.add_argument("--page-size", type=int, default=8, help="tokens per KV cache page (default 8)")
    kv = b.add_mutually_exclusive_group()
    kv.add_argument("--pages-per-group", type=int, default=None,
                    help="KV cache pages per DP group, page 0 reserved: the cache's size (default: the bytes of 160 "
                         "pages in the build dtype, so an 8-bit cache gets more pages)")
    kv.add_argument("--kv-cache-gib", type=float, default=None, metavar="GIB",
                    help="KV cache memory per device: each group gets the pages that fit in it on every mesh")
    b.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8_e4m3", "fp8_e5m2"], default="auto",
                   help="the KV cache's dtype: auto (the build dtype) or 8 bits with static per-layer K and V scales "
                        "calibrated at build, twice the tokens of bfloat16 in the same bytes (default auto)")
    b.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"executables compiled at once (default: CPUs up to 4, here {DEFAULT_JOBS})")
    b.add_argument("--no-fast-load", action="store_true", help="skip the fast-load compilation cache")
    b.add_argument("--logprobs", type=int, default=8, metavar="N",
                   help="top-N log-probabilities every step returns per sequence (default 8)")
    b.add_argument("--attention", choices=["fa", "native", "cpu"], default=None,
                   help="fa: the Pallas ragged paged attention kernel (TPU); native: pure JAX; cpu: attention and "
                        "(unquantized) MoE experts in C++ kernels built with this host's compiler (CPU, float32; "
                        "the serving host needs a C++ compiler too) (default: fa for --platform tpu; cpu for a CPU "
                        "build with a float32 cache where a C++ compiler is found; native otherwise)")
    b.add_argument("--tpu-generation", choices=["v5e", "v5p", "v6e"], default=None,
                   help="the TPU the exports are lowered and tuned for, and whose HBM (v5e 16 GiB, v5p 95 GiB, "
                        "v6e 32 GiB) the build checks they fit (default v5e); the runtime checks it")
    b.add_argument("--expert-layout", choices=["auto", "width", "ep-data", "ep-tensor", "ep"], default="auto",
                   help="how each mesh holds the MoE experts: split over the data and/or tensor axis (ep-*, ep: "
                        "both) with their width over the rest, or every expert on every device with its width "
                        "over all (width); auto: the layout whose per-device matmuls fill 128-lane tiles, with "
                        "the fewest expert shards (default)")
    b.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 attention, expert and dense-MLP projections, one float32 scale "
                        "per output channel computed from the checkpoint; about half the weight bytes of "
                        "bfloat16 (default none)")
    b.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantize: the embedding and lm_head too (else they stay in --dtype)")
    b.add_argument("--executables-only", action="store_true",
                   help="exports from config.json alone (no weights, no probes): to check memory and cost")
    b.add_argument("--tf-savedmodel", action="store_true",
                   help="also write <artifact>/tf_savedmodel/ for TensorFlow Serving (1x1 builds only)")
    b.add_argument("--quiet", action="store_true", help="print errors only: no plan, progress or summary")
    i = sub.add_parser("inspect", help="describe an artifact")
    i.add_argument("dir", help="the artifact directory")
    i.add_argument("--json", action="store_true", help="the manifest's figures as one JSON object")
    w = sub.add_parser("warm", help="compile every export here and add this platform's fast-load section")
    w.add_argument("dir", help="the artifact directory")
    w.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"executables compiled at once (default: CPUs up to 4, here {DEFAULT_JOBS})")
    return p


def _set_device_count(meshes: list[str]) -> None:
    """Enough virtual CPU devices for the largest mesh (at least 8), unless the user chose."""
    if DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    need = max([8] + [int(d) * int(t) for m in meshes for d, t in re.findall(r"(\d+)\s*x\s*(\d+)", m)])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {DEVICE_FLAG}={min(need, 256)}").strip()


def _artifact_meshes(directory: str) -> list[str]:
    from runtime.format import read_manifest  # no jax: the device count must be set before jax is imported

    try:
        return [m.name for m in read_manifest(directory).meshes]
    except Exception:  # the loader reports a bad manifest properly
        return []


def _missing(*modules: str) -> list[str]:
    """The modules of `modules` that are not installed, found without importing them (TensorFlow
    takes seconds to import)."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        import rich  # noqa: F401
    except ImportError:
        print("python -m export: error: building needs the export extra: pip install -e '.[export]'", file=sys.stderr)
        return 2
    if args.command == "build" and args.tf_savedmodel and (missing := _missing("tensorflow", "orbax.export")):
        print(f"python -m export build: error: --tf-savedmodel needs {' and '.join(missing)}, which the export extra "
              "leaves out: pip install -e '.[savedmodel]'", file=sys.stderr)
        return 2
    if args.command == "inspect":
        from .inspect import inspect_main
        return inspect_main(args.dir, args.json)
    if args.command == "warm":
        _set_device_count(_artifact_meshes(args.dir))
        from .warm import warm_main
        return warm_main(args.dir, args.jobs)
    meshes = args.mesh or ["2x4"]
    _set_device_count(meshes)
    from .build_cli import run_build
    return run_build(args, meshes)
