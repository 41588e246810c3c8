"""`python -m runtime generate|verify|serve DIR`.

The artifact's manifest is read, and the arguments checked against it, before jax is imported: a
wrong path or flag fails at once rather than after the seconds that import takes, and on a CPU
machine the virtual device count can be set to what the artifact's mesh needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

DEVICE_FLAG = "--xla_force_host_platform_device_count"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids: empty prompt (expected at least one token id)")
    return ids


def _text(flag: str):
    def read(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError("empty prompt (expected some text)")
        return text
    return read


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime", description="Serve an ahead-of-time artifact.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text (or token ids) for one or more prompts")
    g.add_argument("dir", help="the artifact directory")
    prompts = g.add_argument_group("prompts (repeat any of them; text and ids do not mix)")
    prompts.add_argument("--prompt", type=_text("--prompt"), action="append", default=[], metavar="TEXT",
                         help="a text prompt, tokenized as is; prints the generated text")
    prompts.add_argument("--chat", type=_text("--chat"), action="append", default=[], metavar="TEXT",
                         help="a user message, rendered with the checkpoint's chat template; prints the reply")
    prompts.add_argument("--prompt-ids", type=_token_ids, action="append", default=[], metavar="1,2,3",
                         help="a prompt as token ids; prints the generated ids")
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per prompt (default 16)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="text prompts: keep generating past the checkpoint's EOS (token-id prompts always do)")
    g.add_argument("--padding-mode", choices=["auto", "max_len", "sum_len"], default="auto",
                   help="force one DP padding mode (default auto: the cheaper executable per step)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    g.add_argument("--top-k", type=int, default=0, help="0 (the default) disables it")
    g.add_argument("--top-p", type=float, default=1.0, help="1 (the default) disables it")
    g.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i (default 0)")
    g.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="with --json: each token's logprob and its top-N alternatives (N up to the artifact's; "
                        "default 0)")
    g.add_argument("--mesh", default=None, help="which of the artifact's meshes (default: largest that fits)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt from its first token (default: prompts that start alike share the "
                        "K/V pages of that start)")
    g.add_argument("--no-fast-load", action="store_true", help="compile the portable exports even if fast-load fits")
    g.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout: token ids per prompt (and texts), stats")
    g.add_argument("--profile", default=None, metavar="DIR",
                   help="write a JAX profiler trace of the generation to DIR and print where each step's time "
                        "goes (attention, experts, projections, sampling, collectives, other, host)")
    v = sub.add_parser("verify", help="replay the artifact's golden probes")
    v.add_argument("dir", help="the artifact directory")
    v.add_argument("--mesh", default=None, help="which of the artifact's meshes (default: largest that fits)")
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    s.add_argument("dir", help="the artifact directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests beyond this get 429 (default 256)")
    s.add_argument("--padding-mode", choices=["auto", "max_len", "sum_len"], default="auto",
                   help="DP padding mode; auto picks the cheaper executable per step (default auto)")
    s.add_argument("--mesh", default=None, help="which of the artifact's meshes (default: the largest that fits)")
    s.add_argument("--no-fast-load", action="store_true",
                   help="compile the portable exports even if the fast-load section fits (default: use it)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: the artifact's)")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt from its first token (default: prompts that start alike share the "
                        "K/V pages of that start; every process of a multi-process server needs the same setting)")
    for cmd in (g, s):
        cmd.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8_e4m3", "fp8_e5m2"], default="auto",
                         help="the KV cache dtype expected: the artifact's is compiled in (export build "
                              "--kv-cache-dtype), so another is refused with the command that builds it (default "
                              "auto: whatever the artifact holds)")
    for cmd in (g, v, s):
        d = cmd.add_argument_group("multi-process serving (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                   "JAX_PROCESS_ID)")
        d.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address for the coordination service (default: one process)")
        d.add_argument("--num-processes", type=int, default=None,
                       help="processes in all (default 1; required with --coordinator)")
        d.add_argument("--process-id", type=int, default=None,
                       help="this process's index, 0 to N-1 (default: none; required with --coordinator)")
        d.add_argument("--timeout", type=int, default=60, help="seconds to wait for peers (default 60)")
    return p


class _Usage(ValueError):
    pass


@dataclasses.dataclass
class _Checked:
    """What the command line asks for, checked against the artifact's manifest before jax is
    imported (importing it takes seconds; a wrong path or flag should not)."""

    manifest: object  # runtime.format.Manifest
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    tokenizer: object = None  # runtime.tokenizer.TextTokenizer, for text prompts
    sampling: object = None  # runtime.sampling.SamplingParams


def _check(args) -> _Checked:
    from .format import ArtifactError, read_manifest

    try:
        manifest = read_manifest(args.dir)
    except ArtifactError as e:
        raise _Usage(str(e)) from None
    meshes = [m.name for m in manifest.meshes]
    if args.mesh is not None and args.mesh not in meshes:
        raise _Usage(f"--mesh {args.mesh}: the artifact has meshes {', '.join(meshes)}")
    checked = _Checked(manifest)
    if args.command != "generate":
        return checked
    return _check_generate(args, checked)


def _check_generate(args, checked: _Checked) -> _Checked:
    from .sampling import SamplingParams

    manifest, texts = checked.manifest, args.prompt + args.chat
    if not texts and not args.prompt_ids:
        raise _Usage("no prompt: give --prompt TEXT, --chat TEXT or --prompt-ids 1,2,3 (each may be repeated)")
    if texts and args.prompt_ids:
        raise _Usage("text prompts (--prompt, --chat) and --prompt-ids do not mix: use one kind per run")
    if args.max_new_tokens < 1:
        raise _Usage(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.logprobs <= manifest.logprobs:
        raise _Usage(f"--logprobs {args.logprobs}: {args.logprobs} top logprobs asked for; this artifact returns "
                     f"at most {manifest.logprobs} per token")
    try:
        checked.sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise _Usage(str(e)) from None
    if not texts:
        checked.prompts = args.prompt_ids
        return checked
    if not manifest.tokenizer:
        raise _Usage(f"{args.dir}: the artifact has no tokenizer (its checkpoint had no tokenizer.json), so it "
                     "takes token ids only: use --prompt-ids 1,2,3")
    from pathlib import Path

    from .tokenizer import TextTokenizer

    try:
        tokenizer = TextTokenizer.from_dir(Path(args.dir) / "tokenizer")
        if tokenizer is None:
            raise ValueError(f"{Path(args.dir) / 'tokenizer' / 'tokenizer.json'}: missing (listed in the manifest)")
        rendered = [tokenizer.render_chat([{"role": "user", "content": c}]) for c in args.chat]
    except ValueError as e:
        raise _Usage(str(e)) from None
    checked.tokenizer = tokenizer
    checked.prompts = [tokenizer.encode(t) for t in args.prompt + rendered]
    empty = [t for t, ids in zip(args.prompt + args.chat, checked.prompts) if not ids]
    if empty:
        raise _Usage(f"prompt {empty[0]!r} encodes to no tokens")
    return checked


def _set_device_count(manifest, processes: int, mesh: str | None = None) -> None:
    """Virtual CPU devices for this process's share of the artifact's largest mesh; in one process,
    just the asked-for mesh's devices when the build compiled its executables for such a process
    (a mesh runs slower beside virtual devices it does not use)."""
    if DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    need = manifest.cpu_devices_for(mesh if processes == 1 else None)
    per_process = -(-need // processes)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {DEVICE_FLAG}={max(per_process, 1)}").strip()


def _fail(message: str) -> int:
    print(f"python -m runtime: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        checked = _check(args)
    except _Usage as e:
        return _fail(str(e))
    from . import distributed

    try:
        cluster = distributed.Cluster.from_args(args.coordinator, args.num_processes, args.process_id, args.timeout)
    except ValueError as e:
        return _fail(str(e))
    if args.command == "serve" and (args.max_queue < 1 or not 0 < args.port < 65536):
        return _fail(f"--max-queue must be >= 1 and --port in 1..65535, got {args.max_queue} and {args.port}")
    if cluster is not None and not distributed.is_worker():
        return distributed.supervise(argv, cluster)
    _set_device_count(checked.manifest, cluster.num_processes if cluster else 1, getattr(args, "mesh", None))
    if cluster is not None:
        distributed.redirect_results()
        if not _serves_http(args, cluster):  # the HTTP process joins through its engine process
            distributed.initialize(cluster)
    if args.command == "serve":
        return _http(args, cluster)
    return _serve(args, checked, printing=cluster is None or cluster.process_id == 0)


def _serves_http(args, cluster) -> bool:
    return args.command == "serve" and (cluster is None or cluster.process_id == 0)


def _http(args, cluster) -> int:
    """Process 0 serves HTTP, its engine in a process of its own; the others follow that engine's
    schedule step by step."""
    if not _serves_http(args, cluster):
        return _follow(args)
    from . import distributed
    from .server import run

    setup = None if cluster is None else functools.partial(distributed.initialize, cluster)
    return run(args.dir, host=args.host, port=args.port, max_queue=args.max_queue, padding_mode=args.padding_mode,
               mesh=args.mesh, fast_load=not args.no_fast_load, model_name=args.served_model_name,
               multi_process=cluster is not None, setup=setup, prefix_cache=not args.no_prefix_cache,
               kv_cache_dtype=args.kv_cache_dtype)


def _follow(args) -> int:
    from pathlib import Path

    from .distributed import StepChannel
    from .engine import load
    from .engine_loop import follow
    from .format import ArtifactError
    from .tokenizer import TextTokenizer

    try:
        engine = load(args.dir, mesh=args.mesh, fast_load=not args.no_fast_load, kv_cache_dtype=args.kv_cache_dtype)
    except ArtifactError as e:
        return _fail(str(e))
    tokenizer = TextTokenizer.from_dir(Path(args.dir) / "tokenizer")
    follow(engine, StepChannel(), padding_mode=args.padding_mode, eos_ids=tokenizer.eos_ids if tokenizer else (),
           prefix_cache=not args.no_prefix_cache)
    return 0


def _serve(args, checked: _Checked, printing: bool) -> int:
    from .engine import load
    from .format import ArtifactError
    from .scheduler import RequestError

    try:
        if args.command == "generate":
            engine = load(args.dir, mesh=args.mesh, fast_load=not args.no_fast_load,
                          kv_cache_dtype=args.kv_cache_dtype)
            return _generate(args, checked, engine, printing)
        engine = load(args.dir, mesh=args.mesh)
        return _print_verify(engine, printing)
    except (ArtifactError, RequestError, ValueError) as e:
        return _fail(str(e))


def _generate(args, checked: _Checked, engine, printing: bool) -> int:
    """Generate for the checked prompts on a loaded engine; print text, or ids and stats as JSON."""
    eos = () if checked.tokenizer is None or args.ignore_eos else checked.tokenizer.eos_ids
    run = lambda: engine.generate(checked.prompts, args.max_new_tokens, args.padding_mode,  # noqa: E731
                                  checked.sampling, top_logprobs=args.logprobs, eos_token_id=list(eos) or None,
                                  prefix_cache=not args.no_prefix_cache)
    t0 = time.perf_counter()
    if args.profile:
        from .profile import format_breakdown, profile_run

        (outputs, stats), summary = profile_run(engine, args.profile, run)
        stats["profile"] = summary
        if printing:
            print(format_breakdown(summary) + f"\ntrace and breakdown.json in {args.profile}", file=sys.stderr)
    else:
        outputs, stats = run()
    seconds = stats["profile"]["wall_seconds"] if args.profile else time.perf_counter() - t0  # not the trace's saving
    stats["generate_seconds"] = round(seconds, 4)
    stats["output_tokens_per_second"] = round(sum(map(len, outputs)) / seconds, 1) if seconds > 0 else None
    stats["load_seconds"] = round(engine.load_info.seconds, 3)
    stats["fast_load"] = engine.load_info.fast_load
    stats["fast_load_hits"] = engine.load_info.fast_load_hits
    stats["fast_load_note"] = engine.load_info.fast_load_note
    stats["executables"] = engine.load_info.executables
    stats["mesh"] = engine.load_info.mesh
    if not printing:
        return 0
    texts = None if checked.tokenizer is None else [
        checked.tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
    if args.json:
        print(json.dumps({"outputs": outputs, **({"texts": texts} if texts is not None else {}), "stats": stats}))
        return 0
    for i, out in enumerate(outputs):
        print(f"[{i}] {texts[i] if texts is not None else ','.join(map(str, out))}")
    print(f"{stats['generated_tokens']} tokens in {seconds:.2f} s ({stats['output_tokens_per_second']} tokens/s), "
          f"{stats['steps']} steps, padding efficiency {stats['padding_efficiency']:.2f}, modes {stats['modes']}, "
          f"compiles after load {stats['compiles_after_load']}, load {stats['load_seconds']:.1f} s "
          f"({stats['fast_load_hits']}/{stats['executables']} executables from fast-load)", file=sys.stderr)
    if stats["fast_load_hits"] < stats["executables"]:
        print(f"fast-load: {stats['fast_load_note']}", file=sys.stderr)
    return 0


def _print_verify(engine, printing: bool = True) -> int:
    from .verify import verify

    rows = verify(engine)
    if not printing:
        return 0 if rows and all(r["ok"] for r in rows) else 1
    print(f"{'executable':32s} {'max |diff|':>12s}  result")
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.2e}"
        print(f"{r['bucket']:32s} {err:>12s}  {'ok' if r['ok'] else 'FAIL ' + r['why']}")
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad}/{len(rows)} probes match"
          f"; compiles after load: {engine.compiles_after_load}")
    return 0 if bad == 0 and rows else 1
