"""Collectives of a compiled program and the bytes each moves, read from its HLO text.

Bytes are per device and per call, as a ring/pairwise implementation moves them over the
network: all-gather and all-to-all send (n-1)/n of their result/operand, reduce-scatter
(n-1)/n of its operand, all-reduce 2(n-1)/n (reduce-scatter + all-gather), a
collective-permute its whole operand. n is the size of the op's replica group.
"""

from __future__ import annotations

import dataclasses
import math
import re

from msmoe_jax.steptime.hlo import DTYPE_BYTES, arrays_in

OPS = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
       "collective-permute")
_INSTR = re.compile(r"=\s*(?P<result>.+?)\s+(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\((?P<args>.*)")


# Named scopes (``jax.named_scope``) that the parallel code puts around its collectives; the
# op_name metadata of the compiled ops (forward and backward) carries them.
SCOPES = ("ulysses", "tensor_attention", "tensor_ffn", "moe_dispatch", "grad_exchange")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    scope: str  # one of SCOPES, or "other" (resharding, losses, routing statistics)
    shapes: tuple[tuple[int, ...], ...]  # the op's results (several when XLA combined ops)
    group: int  # devices per replica group
    bytes: float  # moved per device per call


def _group_size(attrs: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)  # iota form: [groups, size]
    if m:
        return int(m.group(1).split(",")[-1])
    return default


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective in ``hlo_text`` (async pairs counted once, at their start).

    Sizes come from the result shapes (compiled HLO does not print operand shapes).
    """
    found = []
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        op, arrays = m.group("op"), arrays_in(m.group("result"))
        if m.group("start"):
            # Async start ops return (operands..., results..., [context scalars]).
            arrays = [a for a in arrays if a[1]]
            arrays = arrays[len(arrays) // 2:]
        n = _group_size(m.group("args"), num_devices)
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0,
                  "reduce-scatter": n - 1.0}.get(op, (n - 1) / n)
        size = sum(DTYPE_BYTES[dtype] * math.prod(shape) for dtype, shape in arrays)
        name = re.search(r'op_name="([^"]*)"', line)
        scope = next((sc for sc in SCOPES if name and sc in name.group(1)), "other")
        found.append(Collective(op, scope, tuple(shape for _, shape in arrays), n,
                                size * factor))
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
