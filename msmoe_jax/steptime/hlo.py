"""A compiled XLA program as a graph: the entry computation's instructions in schedule order,
their operands, result shapes, FLOPs, bytes touched and (for collectives) the device groups.

Read from ``compiled.as_text()`` (post-optimisation HLO, scheduled): a fusion's FLOPs are the
dots inside it; its bytes are what it reads and writes in memory (operands + results).
``flatten`` runs the program as executed: ``while`` loops (gradient accumulation, scans)
unrolled by their trip counts and calls inlined, so FLOPs and bytes count every iteration.
Collective groups are read in the explicit (``{{0,1},{2,3}}``), iota (``[2,2]<=[4]``) and
mesh (``mesh['a'=2,'b'=4] {'b'}``, jax 0.11) forms.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
# Bookkeeping that costs nothing at run time (or waits on something else that does).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}

_LINE = re.compile(r"^\s*(?P<root>ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                   r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


@dataclasses.dataclass
class Instr:
    name: str
    op: str  # HLO opcode, "-start"/"-done" suffixes kept
    arrays: list[tuple[str, tuple[int, ...]]]  # result arrays (dtype, shape)
    operands: list[str]
    attrs: str
    op_name: str  # metadata op_name (JAX's name stack), "" if none
    calls: list[str]
    root: bool = False  # the computation's ROOT
    args: str = ""  # the text between the parentheses (a constant's literal)
    shape: str = ""  # the result's shape text

    @property
    def result_bytes(self) -> int:
        return sum(DTYPE_BYTES[d] * math.prod(s) for d, s in self.arrays)

    @property
    def collective(self) -> str | None:
        base = self.op.removesuffix("-start")
        return base if base in COLLECTIVES and not self.op.endswith("-done") else None


def arrays_in(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every (dtype, shape) array written in an HLO shape text, e.g. ``(f32[2,3], s32[])``."""
    return [(d, tuple(int(x) for x in dims.split(",") if x))
            for d, dims in _ARRAY.findall(text) if d in DTYPE_BYTES]


def _split_args(rest: str) -> tuple[str, str]:
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def parse(text: str) -> tuple[list[Instr], dict[str, list[Instr]]]:
    """(entry instructions in order, {computation name: instructions})."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = comps.setdefault(head.group(2), [])
            if head.group(1):
                entry = head.group(2)
            continue
        m = _LINE.match(line)
        if not m or current is None:
            continue
        args, attrs = _split_args(m.group("rest"))
        name = re.search(r'op_name="([^"]*)"', attrs)
        current.append(Instr(
            m.group("name"), m.group("op"), arrays_in(m.group("shape")),
            re.findall(r"%([\w.\-]+)", args), attrs, name.group(1) if name else "",
            _CALLS.findall(attrs) + re.findall(r"%([\w.\-]+)", " ".join(
                re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", attrs))),
            bool(m.group("root")), args, m.group("shape")))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    # Fusions often carry no name: take their dot's (or root's).
    for instr in (i for body in comps.values() for i in body):
        if not instr.op_name and instr.calls:
            body = comps.get(instr.calls[0], [])
            named = [i for i in body if i.op == "dot" and i.op_name] or [
                i for i in reversed(body) if i.op_name]
            instr.op_name = named[0].op_name if named else ""
    # Some collectives (ragged all_to_all) carry none either: take their operands'.
    for body in comps.values():
        by_name = {i.name: i for i in body}
        for instr in body:
            if not instr.op_name:
                names = [by_name[o].op_name for o in instr.operands
                         if o in by_name and by_name[o].op_name]
                instr.op_name = names[0] if names else ""
    return comps[entry], comps


def dot_flops(instr: Instr, shapes: dict[str, tuple[int, ...]]) -> float:
    """2 x (result elements) x (contracted elements) of a dot."""
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    lhs = shapes.get(instr.operands[0]) if instr.operands else None
    if lhs is None:
        return 0.0
    contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
    out = math.prod(instr.arrays[0][1]) if instr.arrays else 0
    return 2.0 * out * contracted


def flops(instr: Instr, comps: dict[str, list[Instr]], shapes: dict,
          routing: Routing | None = None) -> float:
    """Matmul FLOPs of an instruction, looking inside the computations it calls (fusions);
    other arithmetic is counted as memory traffic, not FLOPs. The Pallas grouped GEMMs are
    modelled (``kernel_flops``) under ``routing``."""
    if instr.op == "dot":
        return dot_flops(instr, shapes)
    if instr.op == "custom-call":
        return kernel_flops(instr, shapes, routing or Routing())
    total = 0.0
    for callee in instr.calls:
        body = comps.get(callee, [])
        inner = {i.name: i.arrays[0][1] for i in body if i.arrays}
        total += sum(flops(i, comps, inner, routing) for i in body)
    return total


def replica_groups(instr: Instr, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (partition ids), from explicit or iota groups; a
    collective-permute gives its source-target pairs."""
    a = instr.attrs
    if instr.op.startswith("collective-permute"):
        m = re.search(r"source_target_pairs=\{(.*?)\}\}", a)
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{?(\d+,\d+)", m.group(1))] \
            if m else [list(range(num_devices))]
    m = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", a)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}",
                                                                        m.group(1))]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", a)
    if m:  # jax 0.11: the mesh's axes, then those the group spans
        axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
        names, sizes = [n for n, _ in axes], [int(v) for _, v in axes]
        spans = [names.index(x) for x in re.findall(r"'([^']+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in spans]
        width = math.prod(sizes[i] for i in spans)
        return ids.transpose(rest + spans).reshape(-1, width).tolist()
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", a)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    return [list(range(num_devices))]


def collective_arrays(instr: Instr) -> list[tuple[str, tuple[int, ...]]]:
    """The collective's results. An async start returns (operands, results[, context]) as a
    tuple: its results are the second element. An all-reduce-start returns its results alone
    (several when XLA combined them), or, in jax 0.11's XLA, ((operands), results...)."""
    if instr.op.endswith("-start") and instr.shape.startswith("("):
        parts = _top_level(instr.shape.strip()[1:-1])
        if instr.op != "all-reduce-start" and len(parts) >= 2:
            return arrays_in(parts[1])
        if instr.op == "all-reduce-start" and len(parts) >= 2 and parts[0].strip()[:1] == "(":
            return arrays_in(",".join(parts[1:]))
    return instr.arrays


def _top_level(text: str) -> list[str]:
    """The comma-separated elements of a tuple's inside, nested tuples and dims kept whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


@dataclasses.dataclass(frozen=True)
class Routing:
    """How routed rows spread, for costing what the HLO cannot say: ``ragged-all-to-all`` by
    the rows it carries rather than its buffer (``skew`` = the busiest device's rows / the
    balanced share; 1.0: balanced routing), and the project's Pallas grouped GEMMs (opaque
    Triton custom calls) by the routed rows of their buffers: ``fill`` = buffer rows per
    routed row at balanced routing (``parallel.buffer_factor`` for the ragged exchange's
    receive buffer, 1.0 where the buffer holds exactly the routed rows), ``tile_rows`` the
    kernel's row tile (``kernel.block_m``)."""

    skew: float = 1.0
    fill: float = 1.0
    tile_rows: int = 128


_KERNEL = re.compile(r'name = "(grouped_gemm(?:_wgrad)?)"')  # msmoe_jax/kernels/grouped_gemm.py


def kernel_flops(instr: Instr, shapes: dict[str, tuple[int, ...]],
                 routing: Routing = Routing()) -> float:
    """Modelled FLOPs of a Pallas grouped-GEMM custom call or a cuDNN fused-attention one
    (causal; see below), 0 for any other instruction.

    The kernels' row tiles cover only each group's rows (``kernels/grouped_gemm.py``): the
    routed rows R (the buffer's rows / ``routing.fill``, times ``routing.skew``), split evenly
    over the G groups, each rounded out to whole tiles: ``grouped_gemm`` runs a tile once per
    group it touches (group g starts at row g*R/G), ``grouped_gemm_wgrad`` ceil(rows/tile)
    tiles per group. Then 2 x rows x K x N. ``grouped_gemm``: result [R_buf, N], left operand
    (second to last) [., K], weights (last) [G, ., .]; ``grouped_gemm_wgrad``: result
    [G, K, N], buffer rows from operand 2."""
    fmha = re.search(r'custom_call_target="__cudnn\$fmha\w*?(Backward)?"', instr.attrs)
    if fmha and instr.arrays:
        # cuDNN flash attention, causal: result [b, h, s, hd] (out, or dq). The forward's
        # two GEMMs over the unmasked half: 2 x b x h x s^2 x hd; the backward's five
        # (scores recomputed, dV, dP, dQ, dK): 5 x that.
        b, h, seq, hd = instr.arrays[0][1]
        return (5.0 if fmha.group(1) else 2.0) * b * h * seq * seq * hd
    if "__gpu$xla.gpu.triton" not in instr.attrs or not instr.arrays:
        return 0.0
    kind = _KERNEL.search(instr.attrs)
    maybe = [shapes.get(o) for o in instr.operands]
    ops = [o for o in maybe if o is not None]
    if kind is None or len(ops) < len(maybe):
        return 0.0
    out = instr.arrays[0][1]
    if kind.group(1) == "grouped_gemm":
        buffer, k, n, groups = out[0], ops[-2][1], out[1], ops[-1][0]
    else:
        buffer, k, n, groups = ops[2][0], out[1], out[2], out[0]
    tile = routing.tile_rows
    size = min(buffer, buffer / routing.fill * routing.skew) / groups  # rows per group
    if kind.group(1) == "grouped_gemm":
        tiles = sum(math.ceil((g * size % tile + size) / tile) for g in range(groups))
    else:
        tiles = groups * math.ceil(size / tile)
    return 2.0 * min(buffer, tiles * tile) * k * n


def collective_payload(instr: Instr, arrays_of: dict | None = None,
                       routing: Routing = Routing()) -> int:
    """Bytes of the collective's data per device: its result, except a ragged all_to_all,
    whose result is its whole landing buffer: that carries the rows of the smaller of its
    send and landing buffers (every routed row once, when balanced; the other is sized for
    the worst case), times ``routing.skew``, never more than the larger. With skew, this is
    the busiest device's traffic: the rows it receives (dispatch) or sends (combine), which
    may exceed its own result buffer on the sending side."""
    arrays = collective_arrays(instr)
    full = sum(DTYPE_BYTES[d] * math.prod(s) for d, s in arrays)
    if instr.collective != "ragged-all-to-all" or not arrays_of or not instr.operands:
        return full
    sent = arrays_of.get(instr.operands[0])
    if not sent or not arrays or not arrays[0][1] or not sent[0][1]:
        return full
    out_rows, in_rows = arrays[0][1][0], sent[0][1][0]
    rows = min(min(out_rows, in_rows) * routing.skew, max(out_rows, in_rows))
    return round(full * rows / out_rows)


def trip_count(instr: Instr, comps: dict[str, list[Instr]]) -> int:
    """Iterations of a ``while``: XLA's known_trip_count, else the bound its condition compares
    the counter against (``i < N`` from 0), else 1."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
    for i in comps.get(cond.group(1), []) if cond else []:
        if i.op == "constant" and i.args.strip().isdigit():
            return int(i.args)
    return 1


class Step(NamedTuple):
    """One executed instruction: ``name`` unique across iterations, ``deps`` the executed
    names it waits on."""

    name: str
    instr: Instr
    deps: tuple[str, ...]


def flatten(instrs: list[Instr], comps: dict[str, list[Instr]], prefix: str = "",
            params: tuple[str, ...] = ()) -> list[Step]:
    """The computation as executed, in order: each ``while`` body repeated by its trip count
    (an iteration waits on the previous one's result), ``call``s inlined; ``params``: what
    the computation's parameters wait on."""
    names: dict[str, str] = {}
    out: list[Step] = []
    for instr in instrs:
        deps = tuple(names[o] for o in instr.operands if o in names)
        name = prefix + instr.name
        if instr.op == "parameter":
            deps = params
        body = _loop_body(instr)
        if body is not None and body in comps:
            root = next((i.name for i in comps[body] if i.root), comps[body][-1].name)
            for it in range(trip_count(instr, comps) if instr.op == "while" else 1):
                out.extend(flatten(comps[body], comps, f"{name}#{it}/", deps))
                deps = (f"{name}#{it}/{root}",)  # the next iteration waits on this one's result
        names[instr.name] = name
        out.append(Step(name, instr, deps))
    return out


def _loop_body(instr: Instr) -> str | None:
    if instr.op == "while":
        m = re.search(r"body=%?([\w.\-]+)", instr.attrs)
        return m.group(1) if m else None
    if instr.op == "call":
        m = re.search(r"to_apply=%?([\w.\-]+)", instr.attrs)
        return m.group(1) if m else None
    return None


def _bytes(arrays) -> int:
    return sum(DTYPE_BYTES[d] * math.prod(x) for d, x in arrays)


def bytes_touched(instr: Instr, comps: dict[str, list[Instr]], arrays_of: dict) -> int:
    """Bytes an instruction reads and writes in memory: its operands and results, except that
    a dynamic-slice reads only its slice and a dynamic-update-slice of a buffer it is given
    updates it in place, touching only the update (what a scan over stacked layers does with
    their parameters, gradients and saved activations each iteration), inside a fusion too.
    An async ``fusion-start``'s result tuple (operands, result, context) counts its result."""
    body = (comps.get(instr.calls[0]) if instr.op in ("fusion", "fusion-start") and instr.calls
            else None)
    fused = body is not None
    if body is None:  # the instruction itself, with its operands as its parameters
        body, params = [instr], {o: k for k, o in enumerate(instr.operands)}
        size = lambda name: _bytes(arrays_of.get(name, ()))
        outputs = [instr]
    else:
        params = {i.name: int(i.args) for i in body if i.op == "parameter" and i.args.isdigit()}
        size = lambda name: _bytes(next((i.arrays for i in body if i.name == name), ()))
        root = next((i for i in body if i.root), body[-1])
        byname = {i.name: i for i in body}
        outputs = ([byname[o] for o in root.operands if o in byname] if root.op == "tuple"
                   else [root])
    uses: dict[str, list[tuple[Instr, int]]] = {}
    for i in body:
        for pos, o in enumerate(i.operands):
            uses.setdefault(o, []).append((i, pos))
    read = 0
    for k, name in enumerate(instr.operands):
        full = _bytes(arrays_of.get(name, ()))
        param = next((p for p, j in params.items() if j == k), None) if fused else name
        used = uses.get(param, []) if param is not None else []
        sliced = used and all(i.op in ("dynamic-slice", "dynamic-update-slice") and pos == 0
                              for i, pos in used)
        read += (sum(i.result_bytes if i.op == "dynamic-slice" else 0 for i, _ in used)
                 if sliced else full)
    write = 0
    for out in outputs:
        in_place = (out.op == "dynamic-update-slice" and len(out.operands) > 1
                    and out.operands[0] in params)
        write += size(out.operands[1]) if in_place else out.result_bytes
    return read + write


def all_arrays(comps: dict[str, list[Instr]]) -> dict[str, list]:
    """name -> result arrays of every instruction of the module (names are module-unique)."""
    return {i.name: i.arrays for body in comps.values() for i in body}


# Where an instruction belongs, from JAX's name stack (``jax.named_scope`` in the model and
# the parallel code): the first scope in this list that its op_name contains.
NAME_ORDER = ("experts", "moe_dispatch", "router", "shared_expert", "attention", "ulysses",
               "ffn", "lm_head")
SCOPE_NAMES = {"moe_dispatch": "experts", "ulysses": "attention", "shared_expert": "ffn"}


def flop_scope(op_name: str) -> str:
    """attention, router, experts, ffn (dense and shared experts), lm_head or other."""
    found = next((s for s in NAME_ORDER if s in op_name), "other")
    return SCOPE_NAMES.get(found, found)


def dependents(instrs: list[Instr]) -> dict[str, set[str]]:
    """Transitive users: name -> every instruction reachable from it."""
    users: dict[str, list[str]] = {i.name: [] for i in instrs}
    for i in instrs:
        for o in i.operands:
            if o in users:
                users[o].append(i.name)
    reach: dict[str, set[str]] = {}
    for i in reversed(instrs):  # schedule order is topological
        s: set[str] = set()
        for u in users[i.name]:
            s.add(u)
            s |= reach[u]
        reach[i.name] = s
    return reach
