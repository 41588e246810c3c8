"""Matmul FLOPs of a compiled XLA executable, counting loop bodies per trip.

Why this exists: ``compiled.cost_analysis()["flops"]`` visits the body of a
``while`` (what ``lax.scan`` and ``lax.fori_loop`` lower to) exactly once, so a
48-layer scan is reported as one layer. This module reads the optimized HLO
text (``jax.jit(f).lower(...).compile().as_text()``) and rolls costs up the call
graph from the ENTRY computation, multiplying each loop body by the
``known_trip_count`` XLA attaches to the ``while`` in its ``backend_config``.

Only ``dot`` and ``convolution`` are counted: they dominate a transformer's
FLOPs, and their cost follows from shapes alone. The optimized text prints
operands by name only, so shapes come from a per-computation name -> type map.

Known limits: matmuls lowered to a ``custom-call`` (e.g. cuBLAS on GPU) are not
counted; a convolution is counted as if every window position were valid
(padding and dilation are ignored, so it is an upper bound).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["matmul_flops", "matmul_flops_report", "collective_bytes"]

# `ENTRY %main.4 (x: f32[2]) -> f32[2] {` or `%region_0.2 (...) -> (...) {`
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
# `  ROOT %name = <type> op(operands), attrs`
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_ARRAY_TYPE = re.compile(r"^(\w+)\[([^\]]*)\](\{[^}]*\})?")
_OPCODE = re.compile(r"^\s*([\w-]+)\(")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_TRIP_COUNT = re.compile(r'known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"?(\d+)')


@dataclass
class _Instr:
    """One HLO instruction: its result type text, opcode, operand names and attributes."""

    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str  # attribute text with string literals blanked out
    trip_count: int | None = None


@dataclass
class _Computation:
    name: str
    instrs: list[_Instr] = field(default_factory=list)
    shapes: dict[str, str] = field(default_factory=dict)  # instruction name -> type text


# --------------------------------------------------------------------------- parsing


def _balanced_end(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 80]!r}")


def _split_type(rhs: str) -> tuple[str, str]:
    """Split `TYPE rest` where TYPE is an array type (with layout) or a tuple `( ... )`."""
    if rhs.startswith("("):
        end = _balanced_end(rhs, 0)
        return rhs[:end], rhs[end:]
    m = _ARRAY_TYPE.match(rhs)
    if not m:  # token[], opaque or something new: keep going, it has no dims we need
        head, _, rest = rhs.partition(" ")
        return head, " " + rest
    return m.group(0), rhs[m.end():]


def _parse_instr(name: str, rhs: str) -> _Instr:
    """Parse the right-hand side of `%name = TYPE opcode(operands), attrs`."""
    type_text, rest = _split_type(rhs)
    m = _OPCODE.match(rest)
    if not m:
        return _Instr(name, type_text, "", [], rest)
    open_paren = m.end() - 1
    close = _balanced_end(rest, open_paren)
    operands = re.findall(r"%([^\s,()]+)", rest[open_paren:close])
    attrs_raw = rest[close:]
    trip = _TRIP_COUNT.search(attrs_raw)
    return _Instr(
        name=name,
        type=type_text,
        opcode=m.group(1),
        operands=operands,
        attrs=_STRING.sub('""', attrs_raw),
        trip_count=int(trip.group(1)) if trip else None,
    )


def _parse_module(hlo_text: str) -> tuple[dict[str, _Computation], str]:
    """All computations of the module by name, and the ENTRY computation's name."""
    comps: dict[str, _Computation] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = comps.setdefault(header.group(2), _Computation(header.group(2)))
                if header.group(1):
                    entry = current.name
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            instr = _parse_instr(m.group(1), m.group(2).strip())
            current.instrs.append(instr)
            current.shapes[instr.name] = instr.type
    if entry is None:
        raise ValueError("no ENTRY computation found; pass compiled.as_text() of an HLO module")
    return comps, entry


# --------------------------------------------------------------------------- costs


def _dims(type_text: str) -> list[int] | None:
    """Dimension sizes of an array type (`<=N` dynamic bounds taken as N); None for tuples."""
    m = _ARRAY_TYPE.match(type_text)
    if not m or type_text.startswith("("):
        return None
    body = m.group(2).strip()
    return [int(d.strip().lstrip("<=")) for d in body.split(",")] if body else []


def _int_list(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def _dot_flops(instr: _Instr, shapes: dict[str, str]) -> float:
    """2 * |result| * prod(lhs contracting sizes): one multiply-add per term."""
    out = _dims(instr.type)
    lhs = _dims(shapes.get(instr.operands[0], "")) if instr.operands else None
    if out is None or lhs is None:
        return 0.0
    contracting = math.prod(lhs[d] for d in _int_list(instr.attrs, "lhs_contracting_dims"))
    return 2.0 * math.prod(out) * contracting


def _conv_flops(instr: _Instr, shapes: dict[str, str]) -> float:
    """2 * |result| * (kernel elements per output feature) = spatial window * input features/group."""
    out = _dims(instr.type)
    kernel = _dims(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->\w+", instr.attrs)
    if out is None or kernel is None or not labels or "o" not in labels.group(1):
        return 0.0
    out_features = kernel[labels.group(1).index("o")]
    return 2.0 * math.prod(out) * math.prod(kernel) / max(out_features, 1)


def _called(instr: _Instr) -> list[tuple[str, str]]:
    """(role, computation) pairs this instruction executes; scalar reducers are left out."""
    attrs = instr.attrs
    found = [("calls", c) for c in re.findall(r"\bcalls=%?([^\s,}]+)", attrs)]
    if instr.opcode == "call":
        found += [("call", c) for c in re.findall(r"\bto_apply=%?([^\s,}]+)", attrs)]
    for key in ("body", "condition"):
        found += [(key, c) for c in re.findall(rf"\b{key}=%?([^\s,}}]+)", attrs)]
    branches = re.search(r"\bbranch_computations=\{([^}]*)\}", attrs)
    if branches:
        found += [("branch", c.strip().lstrip("%")) for c in branches.group(1).split(",")]
    found += [("branch", c) for c in re.findall(r"\b(?:true|false)_computation=%?([^\s,}]+)", attrs)]
    return found


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
# Bytes a ring moves per device, as a multiple of the (n-1)/n share of the buffer.
_RING = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0}


def _group_size(attrs: str) -> int:
    """Devices per replica group: `{{0,1},{2,3}}`, `[2,4]<=[8]` or `mesh['a'=2,'b'=4] {'a'}`."""
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip(" '"), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip(" '")] for a in m.group(2).split(",") if a.strip())
    return 1


def _collective_bytes(instr: _Instr, shapes: dict[str, str]) -> float:
    """Bytes one device sends for a collective, as a ring moves them: an all-gather's result and
    a reduce-scatter's operand once, an all-reduce's buffer twice, each times (n-1)/n."""
    op = instr.opcode.removesuffix("-start")
    if op not in _RING:
        return 0.0
    typed = shapes.get(instr.operands[0], "") if op == "reduce-scatter" and instr.operands else instr.type
    arrays = re.findall(r"(\w+)\[([\d,]*)\]", typed)
    if op == "all-gather" and instr.opcode.endswith("-start"):
        arrays = arrays[len(arrays) // 2:]  # (operands, results): the results
    size = sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
    n = _group_size(instr.attrs)
    return _RING[op] * size * (n - 1) / n if n > 1 else 0.0


def _matmul_cost(instr: _Instr, shapes: dict[str, str]) -> float:
    own = {"dot": _dot_flops, "convolution": _conv_flops}.get(instr.opcode)
    return own(instr, shapes) if own else 0.0


class _Walker:
    """Rolls a per-instruction cost up the call graph, memoized per computation."""

    def __init__(self, comps: dict[str, _Computation], cost=_matmul_cost):
        self.comps = comps
        self.cost = cost
        self.memo: dict[str, float] = {}
        self.loops: dict[str, int | None] = {}  # every while reached, in visit order

    def computation(self, name: str) -> float:
        if name not in self.memo:
            self.memo[name] = 0.0  # guards against a malformed recursive graph
            comp = self.comps[name]
            self.memo[name] = sum(self.instruction(i, comp.shapes) for i in comp.instrs)
        return self.memo[name]

    def instruction(self, instr: _Instr, shapes: dict[str, str]) -> float:
        total = self.cost(instr, shapes)
        if instr.opcode == "while":
            self.loops.setdefault(instr.name, instr.trip_count)
        trips = instr.trip_count or 1  # unknown: count the body once, as XLA does
        branch_costs = []
        for role, callee in _called(instr):
            cost = self.computation(callee)
            if role == "branch":
                branch_costs.append(cost)
            elif role in ("body", "condition"):
                total += trips * cost
            else:
                total += cost
        return total + max(branch_costs, default=0.0)


# --------------------------------------------------------------------------- API


def matmul_flops_report(hlo_text: str) -> dict:
    """FLOPs of every dot/convolution reachable from ENTRY, loop bodies times their trip count.

    Returns ``{"flops": float, "while_loops": [{"name", "trip_count"}], "unknown_trip_counts": int}``.
    A loop without ``known_trip_count`` is counted once (``trip_count`` None) and tallied in
    ``unknown_trip_counts`` so callers can tell the total is then a lower bound. For a
    ``conditional`` the most expensive branch is taken (worst case per step).
    """
    return costs(hlo_text)[0]


def matmul_flops(hlo_text: str) -> float:
    """Total dot/convolution FLOPs of an optimized HLO module, respecting loop trip counts."""
    return matmul_flops_report(hlo_text)["flops"]


def costs(hlo_text: str) -> tuple[dict, float]:
    """(matmul_flops_report, bytes one device sends through collectives in one run, loop bodies times
    their trip count), from one parse of the module: a build reads both for every executable, and
    parsing is most of either."""
    comps, entry = _parse_module(hlo_text)
    walker = _Walker(comps)
    flops = walker.computation(entry)
    loops = [{"name": n, "trip_count": t} for n, t in walker.loops.items()]
    report = {"flops": flops, "while_loops": loops,
              "unknown_trip_counts": sum(loop["trip_count"] is None for loop in loops)}
    return report, _Walker(comps, _collective_bytes).computation(entry)
