"""Where a step's time goes: a JAX profiler trace of real steps, summed by what each op computes.

The model names its parts with `jax.named_scope` ("attention", "projections", "experts",
"sampling"); the scope survives `jax.export` into each compiled op's metadata. Every executable is
compiled under its bucket's name (Engine.compile_one), so the trace's events name their executable
and op, and the executable's HLO text maps each op to its scope. Collectives are told by their
opcode, whatever scope they sit in; ops under no scope (embedding, norms, RoPE, residual adds,
the MoE exchange buffers) are "other". Loops and conditionals are containers: only the ops they
run are counted, so nothing is counted twice. "host" is the wall time of the run that no device
op accounts for: planning, packing, transfers and waiting.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

SCOPES = ("attention", "experts", "sampling", "projections")  # first match wins
CATEGORIES = SCOPES + ("collectives", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
CONTAINERS = ("while", "conditional", "call")

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _opcode(rest: str) -> str:
    """The opcode of an HLO instruction from the text after `name = `: skip its type (a token, or
    a parenthesised tuple), then take the word before the operands' parenthesis."""
    i = 0
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        i += 1
    else:
        i = rest.find(" ")
    match = re.match(r"\s*([\w\-]+)\(", rest[i:])
    return match.group(1) if match else ""


def op_categories(hlo_text: str) -> dict[str, str | None]:
    """Each instruction of a compiled module -> its category, or None for a container."""
    out = {}
    for line in hlo_text.splitlines():
        m = _DEFINITION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        opcode = _opcode(rest)
        if opcode in CONTAINERS:
            out[name] = None
            continue
        if any(opcode.startswith(c) for c in COLLECTIVES):
            out[name] = "collectives"
            continue
        scope = _OP_NAME.search(rest)
        path = scope.group(1).split("/") if scope else []
        out[name] = next((s for s in SCOPES if s in path), "other")
    return out


def read_trace(trace_dir: Path) -> list[dict]:
    """The complete events of the newest trace under `trace_dir`."""
    files = sorted(Path(trace_dir).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz (did the profiler run?)")
    with gzip.open(files[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def breakdown(events: list[dict], modules: dict[str, dict[str, str | None]], wall_seconds: float,
              steps: int | None = None) -> dict:
    """Milliseconds per step by category, averaged over devices, from the trace's op events.

    `modules`: compiled module name -> op_categories of its HLO text. `steps`: how many steps the
    run took, when known: the profiler keeps a bounded number of events, so a long run's trace may
    hold only some of its steps ("steps_traced"); device times are then their average, and host
    time is the wall time per step of the whole run less that.
    """
    per_category = collections.Counter()
    runs, devices, unknown = set(), set(), 0
    for e in events:
        args = e.get("args", {})
        module, op = args.get("hlo_module"), args.get("hlo_op")
        if module not in modules or op is None:
            continue
        category = modules[module].get(op, "other" if op not in modules[module] else None)
        unknown += op not in modules[module]
        if category is None:
            continue
        per_category[category] += e.get("dur", 0) / 1e3
        runs.add((module, args.get("run_id")))
        devices.add(args.get("device_ordinal"))
    traced = max(1, len(runs))
    ndev = max(1, len(devices))
    device_ms = {c: per_category[c] / ndev / traced for c in CATEGORIES}
    busy = sum(device_ms.values())
    steps = steps or len(runs)
    host = max(0.0, wall_seconds * 1e3 / max(1, steps) - busy)
    return {"steps": steps, "steps_traced": len(runs), "devices": len(devices), "wall_seconds": wall_seconds,
            "ms_per_step": {**device_ms, "host": host}, "device_ms_per_step": busy,
            "ops_without_category": unknown}


def format_breakdown(result: dict) -> str:
    per_step = result["ms_per_step"]
    total = sum(per_step.values()) or 1.0
    traced = "" if result["steps_traced"] == result["steps"] else f" ({result['steps_traced']} in the trace)"
    lines = [f"{result['steps']} steps{traced} on {result['devices']} devices in {result['wall_seconds']:.2f} s; "
             f"per step (device time averaged over devices):"]
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:12s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    return "\n".join(lines)


def module_name(bucket_name: str) -> str:
    """The compiled module name of a bucket's executable (see Engine.compile_one)."""
    return "jit_" + bucket_name.replace("-", "_")


def profile_run(engine, trace_dir: Path, run) -> tuple[object, dict]:
    """run() under the JAX profiler, its trace written to `trace_dir` (open it in Perfetto or
    TensorBoard); returns run()'s result and the per-step breakdown, also written beside the
    trace as breakdown.json."""
    import time

    import jax

    trace_dir = Path(trace_dir)
    modules = {module_name(b.name): op_categories(c.as_text()) for b, c in engine.compiled.items()
               if hasattr(c, "as_text")}
    jax.profiler.start_trace(str(trace_dir))
    t0 = time.perf_counter()
    try:
        result = run()
    finally:
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
    stats = result[1] if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict) else {}
    summary = breakdown(read_trace(trace_dir), modules, wall, stats.get("steps"))
    (trace_dir / "breakdown.json").write_text(json.dumps(summary, indent=1) + "\n")
    return result, summary
