"""Step-time model: a compiled training step as a timeline on a modelled cluster.

Every instruction of the compiled program gets a duration: compute from its matmul FLOPs and
the bytes it moves at the device's rates (a roofline, plus a launch cost); a collective from
its bytes per device, its group and an alpha-beta link model (NVLink inside a node, the
network across nodes). Compute runs on one stream and communication on another, each in the
program's order, and every instruction starts when its stream is free and its operands are
ready. ``overlap=False`` puts everything on one stream (no overlap at all).

Devices are numbered as the program's partition ids (the mesh's row-major order) and
``gpus_per_node`` consecutive ids share a node, so the mesh's last axes are the ones inside
a node.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from msmoe_jax.steptime.hlo import (
    FREE,
    Instr,
    Routing,
    all_arrays,
    bytes_touched,
    collective_payload,
    flatten,
    flop_scope,
    flops,
    parse,
    replica_groups,
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A GPU and its links. Rates are nominal; the efficiencies turn them into what published
    measurements achieved (docs/performance.md, *Calibration*, gives each source)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    mem_bw: float  # HBM bytes/s
    nvlink_bw: float  # bytes/s per device per direction inside a node
    net_bw: float  # bytes/s per device per direction across nodes
    nvlink_alpha: float = 1.5e-6  # seconds per message step
    net_alpha: float = 10e-6
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.80  # achieved / peak on large dense GEMMs
    grouped_efficiency: float = 0.63  # the same for the experts' grouped GEMMs
    mem_efficiency: float = 0.8
    link_efficiency: float = 0.82  # ring collectives (all-gather, reduce-scatter, all-reduce)
    a2a_efficiency: float = 0.73  # all-to-all inside a node, of the NVLink rate
    net_efficiency: float = 0.94  # across nodes, of the NIC's rate
    net_a2a_efficiency: float = 0.86  # all-to-all across nodes, of the NIC's rate
    overlap_slowdown: float = 0.19  # compute that runs beside a collective takes this longer
    launch: float = 2e-6  # per compute kernel

    def scaled(self, **fields) -> Hardware:
        return dataclasses.replace(self, **fields)


HARDWARE = {
    # H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink4 450 GB/s each way,
    # one 400 Gb/s NIC per GPU.
    "h100": Hardware("H100", 989e12, 3.35e12, 450e9, 50e9),
    # H800: the H100 with NVLink cut to 200 GB/s each way (MegaScale-MoE's kind of cluster).
    "h800": Hardware("H800", 989e12, 3.35e12, 200e9, 50e9),
}


def calibrate(hw: Hardware, measured_tflops: float) -> Hardware:
    """``hw`` with its matmul efficiency set from a measured large-GEMM rate (TFLOP/s)."""
    return hw.scaled(matmul_efficiency=measured_tflops * 1e12 / hw.peak_flops)


class Op(NamedTuple):
    name: str
    stream: str  # "compute", "comm", or "none" (bookkeeping: ready when its operands are)
    seconds: float
    deps: tuple[str, ...]
    scope: str = "other"  # hlo.flop_scope for compute, comm_bytes.SCOPES for collectives


class Timeline(NamedTuple):
    step: float  # seconds
    compute: float  # busy time of the compute stream
    comm: float  # busy time of the communication stream
    exposed_comm: float  # step - compute: time the compute stream waits on communication
    starts: dict[str, float]
    ends: dict[str, float]
    exposed_by_scope: dict[str, float] = {}  # compute-stream waits, by the collective waited on


def schedule(ops: list[Op], overlap: bool = True, slowdown: float = 0.0) -> Timeline:
    """Runs ``ops`` (in program order, deps earlier in the list) on a compute and a
    communication stream, each in order; one shared stream when ``overlap`` is False.
    ``slowdown``: a compute op that starts while a collective is in flight takes
    (1 + slowdown) times as long (the SMs and HBM bandwidth the collective uses)."""
    free = {"compute": 0.0, "comm": 0.0}
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    busy = {"compute": 0.0, "comm": 0.0}
    scope_of: dict[str, str] = {}
    exposed: dict[str, float] = {}
    for op in ops:
        ready = max([ends[d] for d in op.deps if d in ends], default=0.0)
        if op.stream == "none":
            starts[op.name] = ends[op.name] = ready
            # A bookkeeping op passes on what it waited for (an async done -> its start).
            waited = [d for d in op.deps if d in scope_of and ends[d] == ready]
            if waited:
                scope_of[op.name] = scope_of[waited[0]]
            continue
        stream = op.stream if overlap else "compute"
        start = max(free[stream], ready)
        seconds = op.seconds
        if stream == "compute" and op.stream == "compute" and free["comm"] > start:
            seconds *= 1 + slowdown
        if stream == "compute" and ready > free["compute"]:  # the compute stream waits
            blockers = [d for d in op.deps if d in scope_of and ends[d] == ready]
            if blockers:
                key = scope_of[blockers[0]]
                exposed[key] = exposed.get(key, 0.0) + ready - free["compute"]
        starts[op.name], ends[op.name] = start, start + seconds
        free[stream] = ends[op.name]
        busy[op.stream] += seconds
        if op.stream == "comm":
            scope_of[op.name] = op.scope
            if not overlap:  # one stream: every collective is exposed
                exposed[op.scope] = exposed.get(op.scope, 0.0) + seconds
    step = max(ends.values(), default=0.0)
    # Communication still running after the last compute op is exposed too.
    tail = [n for n, e in ends.items() if n in scope_of and e > free["compute"]]
    if overlap and tail and step > free["compute"]:
        key = scope_of[max(tail, key=lambda n: ends[n])]
        exposed[key] = exposed.get(key, 0.0) + step - free["compute"]
    return Timeline(step, busy["compute"], busy["comm"], step - busy["compute"], starts, ends,
                    exposed)


def collective_seconds(kind: str, payload: float, group: list[int], hw: Hardware) -> float:
    """alpha-beta time of one collective for one device of ``group``.

    payload: bytes of the result per device (the operand for reduce-scatter is n x that).
    Ring all-gather / reduce-scatter move (n-1)/n of the full buffer in n-1 steps, all-reduce
    twice that; all-to-all sends (n-1)/n of its buffer, to peers inside the node over NVLink
    and to the rest over the network at the same time; a permute sends its buffer once.
    """
    n = len(group)
    if n <= 1:
        return 0.0
    nodes = {d // hw.gpus_per_node for d in group}
    inside = sum(1 for d in group if d // hw.gpus_per_node == group[0] // hw.gpus_per_node)
    nv = hw.nvlink_bw * hw.link_efficiency
    net = hw.net_bw * hw.net_efficiency
    one_node = len(nodes) == 1
    alpha = hw.nvlink_alpha if one_node else hw.net_alpha
    if kind == "collective-permute":
        return alpha + payload / (nv if one_node else net)
    if kind in ("all-to-all", "ragged-all-to-all"):
        intra = payload * (inside - 1) / n
        inter = payload * (n - inside) / n
        return alpha + max(intra / (hw.nvlink_bw * hw.a2a_efficiency),
                           inter / (hw.net_bw * hw.net_a2a_efficiency) if inter else 0.0)
    full = payload * (n if kind == "reduce-scatter" else 1)
    moved = full * (n - 1) / n * (2 if kind == "all-reduce" else 1)
    steps = (n - 1) * (2 if kind == "all-reduce" else 1)
    return steps * alpha + moved / (nv if one_node else net)


class Program(NamedTuple):
    """A compiled step as executed: its ops, and the matmul FLOPs per device by scope."""

    ops: list[Op]
    flops: dict[str, float]  # hlo.flop_scope -> executed matmul FLOPs per device

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def program_ops(hlo_text: str, num_devices: int, hw: Hardware,
                activation_bytes_scale: float = 1.0, routing: Routing = Routing()) -> Program:
    """The compiled program as Ops, one per executed instruction (loops unrolled by their
    trip counts, ``hlo.flatten``), and its matmul FLOPs per scope.

    ``activation_bytes_scale`` multiplies the bytes of collectives outside the gradient
    reductions (0.5 turns f32 activations back into bf16 where XLA:CPU widened them);
    ``routing`` sizes ragged all_to_alls by the rows they carry.
    """
    from msmoe_jax.parallel.comm_bytes import collective_scope

    entry, comps = parse(hlo_text)
    arrays_of = all_arrays(comps)
    shapes = {k: v[0][1] for k, v in arrays_of.items() if v}
    ops: list[Op] = []
    by_scope: dict[str, float] = {}
    for step in flatten(entry, comps):
        instr, deps = step.instr, step.deps
        kind = instr.collective
        if instr.op.endswith("-done") or instr.op in FREE or instr.op in ("while", "call"):
            ops.append(Op(step.name, "none", 0.0, deps))  # an async pair's start carries the time
            continue
        if kind:
            payload: float = collective_payload(instr, arrays_of, routing)
            if _is_activation(instr):
                payload *= activation_bytes_scale
            groups = replica_groups(instr, num_devices)
            group = groups[0] if kind != "collective-permute" else _permute_group(groups, hw)
            scope = collective_scope(instr)
            ops.append(Op(step.name, "comm", collective_seconds(kind, payload, group, hw), deps,
                          scope))
            continue
        f = flops(instr, comps, shapes, routing)
        scope = flop_scope(instr.op_name)
        by_scope[scope] = by_scope.get(scope, 0.0) + f
        moved = bytes_touched(instr, comps, arrays_of)
        rate = hw.grouped_efficiency if scope == "experts" else hw.matmul_efficiency
        seconds = max(f / (hw.peak_flops * rate), moved / (hw.mem_bw * hw.mem_efficiency))
        ops.append(Op(step.name, "compute", seconds + hw.launch, deps, scope))
    return Program(ops, by_scope)


def _is_activation(instr: Instr) -> bool:
    return any(s in instr.op_name for s in ("moe_dispatch", "ulysses", "tensor_attention",
                                            "tensor_ffn"))


def _permute_group(pairs: list[list[int]], hw: Hardware) -> list[int]:
    """A permute's slowest pair decides: two ids on different nodes if any pair crosses."""
    for a, b in pairs:
        if a // hw.gpus_per_node != b // hw.gpus_per_node:
            return [a, b]
    return pairs[0] if pairs else [0]


def model_step(hlo_text: str, num_devices: int, hw: Hardware, overlap: bool = True,
               activation_bytes_scale: float = 1.0,
               routing: Routing = Routing()) -> tuple[Timeline, float]:
    """(Timeline, matmul FLOPs per device) of one compiled step on ``hw``."""
    program = program_ops(hlo_text, num_devices, hw, activation_bytes_scale, routing)
    return schedule(program.ops, overlap, hw.overlap_slowdown), program.total_flops


def mfu(model_flops_per_device: float, step_seconds: float, hw: Hardware) -> float:
    return model_flops_per_device / (step_seconds * hw.peak_flops) if step_seconds else math.nan
