"""Collectives of a compiled program and the bytes each moves, read from its HLO text.

Bytes are per device and per call, as a ring/pairwise implementation moves them over the
network: all-gather and all-to-all send (n-1)/n of their result/operand, reduce-scatter
(n-1)/n of its operand, all-reduce 2(n-1)/n (reduce-scatter + all-gather), a
collective-permute its whole operand. n is the size of the op's replica group.
"""

from __future__ import annotations

import dataclasses

from msmoe_jax.steptime.hlo import (
    Routing,
    all_arrays,
    collective_arrays,
    collective_payload,
    flatten,
    parse,
    replica_groups,
)

# Named scopes (``jax.named_scope``) that the parallel code puts around its collectives; the
# op_name metadata of the compiled ops (forward and backward) carries them. The first found
# names a collective: "expert_tensor" (the gathers/scatters over expert_tensor devices inside
# a node, around the expert exchange) sits inside "moe_dispatch".
SCOPES = ("ulysses", "tensor_attention", "tensor_ffn", "expert_tensor", "moe_dispatch",
          "grad_exchange", "vocab_parallel", "zero_gather")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    scope: str  # one of SCOPES, or "other" (resharding, losses, routing statistics)
    shapes: tuple[tuple[int, ...], ...]  # the op's results (several when XLA combined ops)
    group: int  # devices per replica group
    bytes: float  # moved per device per call


def scope_of(op_name: str) -> str:
    """The first of SCOPES in a collective's op_name, else "other"."""
    return next((sc for sc in SCOPES if sc in op_name), "other")


def collective_scope(instr) -> str:
    """``scope_of`` a collective (an ``hlo.Instr``). A ragged exchange has no op_name and
    takes its operand's: the return exchange reads the expert_tensor reduce-scatter's result
    but crosses the ``expert`` devices."""
    scope = scope_of(instr.op_name)
    if scope == "expert_tensor" and instr.collective == "ragged-all-to-all":
        return "moe_dispatch"
    return scope


def moved(op: str, payload: float, n: int) -> float:
    """Bytes one device sends for a collective with ``payload`` result bytes over n devices."""
    factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0,
              "reduce-scatter": n - 1.0}.get(op, (n - 1) / n)
    return payload * factor


def collectives(hlo_text: str, num_devices: int, routing: Routing = Routing()) -> list[Collective]:
    """Every collective ``hlo_text`` executes, once per execution: async pairs counted at their
    start, loop bodies once per iteration (``hlo.flatten``). A ragged all_to_all is costed by
    the rows it carries under ``routing`` (``hlo.collective_payload``).

    Sizes come from the result shapes (compiled HLO does not print operand shapes).
    """
    entry, comps = parse(hlo_text)
    arrays_of = all_arrays(comps)
    found = []
    for step in flatten(entry, comps):
        instr = step.instr
        op = instr.collective
        if op is None:
            continue
        groups = replica_groups(instr, num_devices)
        n = len(groups[0]) if op != "collective-permute" else 2
        payload = collective_payload(instr, arrays_of, routing)
        scope = collective_scope(instr)
        shapes = tuple(shape for _, shape in collective_arrays(instr))
        found.append(Collective(op, scope, shapes, n, moved(op, payload, n)))
    return found


def summarize(found: list[Collective]) -> list[tuple[str, str, int, int, float]]:
    """(scope, op, group size, count, bytes) per (scope, op, group), largest first."""
    table: dict[tuple[str, str, int], list] = {}
    for c in found:
        row = table.setdefault((c.scope, c.op, c.group), [0, 0.0])
        row[0] += 1
        row[1] += c.bytes
    rows = [(scope, op, n, count, b) for (scope, op, n), (count, b) in table.items()]
    return sorted(rows, key=lambda r: -r[4])


def by_scope(found: list[Collective]) -> dict[str, float]:
    """Bytes per scope (one of SCOPES or "other")."""
    out: dict[str, float] = {}
    for c in found:
        out[c.scope] = out.get(c.scope, 0.0) + c.bytes
    return out


def human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{b:,.0f} B"
        b /= 1024
    return f"{b}"
