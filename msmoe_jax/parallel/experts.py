"""Expert-parallel experts functions (inside ``shard_map``), same contract as ``ExpertsFn``.

Each device holds E/n experts (n = ``expert`` devices; expert j*E/n + l is local expert l of
device j), each with 1/m of its FFN width (m = ``expert_tensor`` devices). The tokens that meet
one set of experts (the *EP group*: the expert x expert_tensor devices that share an
expert_data index) are pooled for capacity: an expert takes at most
``expert_capacity(group tokens)`` assignments, first choices before second choices, then in
group order (by expert index, then expert_tensor index, then local token order); that is the
single-device rule applied to the group's tokens in that order. Dropped assignments are counted
once.

Every dispatch is written once as ``Stages`` (route, send, ffn, return, finish; see
``pipeline.py``), so the chunked pipeline runs all of them:

* ``padded``: sort the local assignments by expert into per-expert buffers [E, C, d]
  (``pack``), send block j to device j, run the local experts on what arrived, send back.
* ``ragged``: only the routed rows move (``ragged_all_to_all``; a padded emulation on CPU)
  and the local experts run as grouped GEMMs over rows grouped by expert.
* ``all_gather``: all_gather the group's tokens, run the local experts on the rows routed to
  them, weight by the gates, and reduce-scatter the partial outputs back to their owners. It
  moves T*(n-1) rows instead of ~T*k*(n-1)/n, so it pays when top_k is large.

Dropless buffers hold the balanced load times ``buffer_factor`` (None: the worst case, every
token choosing this device). Rows past a buffer are dropped and counted with the capacity
drops (``dropped``), never silently.

The all_to_all dispatches take Megatron's order with expert_tensor m > 1: each device sends
only its own tokens over the ``expert`` axes (every row crosses the network once), the m
devices of an expert all_gather what they received (inside the node), each computes its slice
of the FFN width, and the partial outputs are reduce-scattered back before the return exchange.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from msmoe_jax.model.moe import (
    ExpertWeights,
    GroupedDot,
    SortedAssignments,
    expert_capacity,
    expert_ffn,
    grouped_swiglu,
    pack,
    sort_by_expert,
    unpack,
)
from msmoe_jax.model.moe import combine as combine_slots
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel.collective_matmul import gather_apply_scatter
from msmoe_jax.parallel.pipeline import Stages, chunked, compose


class Group(NamedTuple):
    """A device's expert group: ``expert`` axes (n devices, E/n experts each) and
    ``expert_tensor`` axes (m devices, 1/m of each expert's FFN width)."""

    expert: C.Axes
    n: int
    tensor: C.Axes
    m: int

    @property
    def axes(self) -> C.Axes:
        """All of the group's axes, in group order (expert index, then expert_tensor)."""
        return self.expert + self.tensor


class Wires(NamedTuple):
    """How each kind of expert traffic travels (``C.EXACT`` or ``fp8.wire()``): tokens out,
    results back, and the expert_tensor gathers/scatters."""

    dispatch: C.Wire = C.EXACT
    combine: C.Wire = C.EXACT
    tensor: C.Wire = C.EXACT


def bounded(balanced: float, worst: int, factor: float | None) -> int:
    """Rows of a dropless buffer: the balanced load x ``factor`` (None: ``worst``), within
    [1, worst]."""
    if factor is None:
        return worst
    return max(1, min(worst, math.ceil(factor * balanced)))


def group_rank(expert_idx: jax.Array, s, num_experts: int, axes: C.Axes) -> jax.Array:
    """Rank of each sorted assignment among all the EP group's assignments to its expert, in
    (slot, device, token) order. expert_idx: [T, k] local; returns [A] (A = T * k)."""
    k = expert_idx.shape[1]
    counts = jnp.zeros((k, num_experts), jnp.int32).at[s.slot, s.expert].add(1)  # [k, E]
    every = C.gather(counts[None], axes, axis=0)  # [n, k, E]
    before_device = (jnp.cumsum(every, axis=0) - every)[C.index(axes)]  # [k, E]
    total = jnp.sum(every, axis=0)
    before_slot = jnp.cumsum(total, axis=0) - total  # [k, E]: earlier slots, all devices
    local_before_slot = jnp.cumsum(counts, axis=0) - counts
    within = s.rank - local_before_slot[s.slot, s.expert]  # rank within (slot, expert) here
    return before_slot[s.slot, s.expert] + before_device[s.slot, s.expert] + within


def route_local(expert_idx, num_experts: int, g: Group, capacity_factor):
    """Sorts this device's [T, k] assignments by expert and decides which fit the EP group's
    capacity. Returns (SortedAssignments, keep [A], capacity or None when dropless)."""
    t, k = expert_idx.shape
    s = sort_by_expert(expert_idx, num_experts)
    if capacity_factor is None:
        return s, jnp.ones_like(s.rank, bool), None
    capacity = expert_capacity(t * g.n * g.m, k, num_experts, capacity_factor)
    return s, group_rank(expert_idx, s, num_experts, g.axes) < capacity, capacity


def run_stages(stages: Stages, chunks: int, x, expert_idx, gates, w):
    """(y [T, d], dropped []) of the stages, chunked with the hand-written backward when
    ``chunks`` > 1."""
    if chunks == 1:
        plan = stages.route(expert_idx)
        return compose(stages, x, plan, gates, w), stages.dropped(plan)
    y, plans = chunked(stages, chunks, x, expert_idx, gates, w)
    return y, sum(stages.dropped(p) for p in plans)


def rows_at(a: jax.Array, perm: jax.Array) -> jax.Array:
    """a[perm] for a permutation ``perm`` of a's rows, without negative-index wrapping: the
    wrap's broadcast constant is an operand the chunks' gathers would share, and XLA:GPU then
    fuses them into one multi-output fusion, which makes every chunk's GEMMs wait for every
    chunk's exchange."""
    return a.at[perm].get(mode="promise_in_bounds", unique_indices=True,
                          wrap_negative_indices=False)


def _dropped(plan) -> jax.Array:
    return jnp.sum(~plan.keep).astype(jnp.float32)


def experts_fn(make_stages, chunks: int):
    """ExpertsFn running ``make_stages(e_local, capacity_factor)``."""

    @jax.named_scope("moe_dispatch")
    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        return run_stages(make_stages(w.w_gate.shape[0], capacity_factor), chunks, x,
                          expert_idx, gates, w)

    return experts


# -- padded all_to_all ------------------------------------------------------------------------

class PaddedPlan(NamedTuple):
    s: SortedAssignments
    keep: jax.Array  # [A] kept assignments (capacity and buffer)


def padded_stages(g: Group, wires: Wires, e_local: int, capacity_factor,
                  buffer_factor: float | None) -> Stages:
    """Per-expert buffers of C rows per source device: the capacity, or when dropless the
    balanced load T*k/E x ``buffer_factor``."""
    n, m, num_experts = g.n, g.m, e_local * g.n

    def rows(t: int, k: int) -> int:
        if capacity_factor is not None:
            return min(t, expert_capacity(t * n * m, k, num_experts, capacity_factor))
        return bounded(t * k / num_experts, t, buffer_factor)

    def route(expert_idx):
        t, k = expert_idx.shape
        s, keep, _ = route_local(expert_idx, num_experts, g, capacity_factor)
        return PaddedPlan(s, keep & (s.rank < rows(t, k)))

    def send(x, plan):
        c = rows(x.shape[0], plan.s.token.shape[0] // x.shape[0])
        # Block j to device j; ``pack`` copies each token's row into its experts' buffers.
        recv = wires.dispatch.exchange(x, g.expert, lambda a, p: pack(a, *p, c), plan)
        with jax.named_scope("expert_tensor"):
            recv = wires.tensor.gather(recv, g.tensor, 0)  # [m * n * E/n, C, d]
        return recv.reshape(m, n, e_local, c, -1).transpose(2, 0, 1, 3, 4).reshape(
            e_local, m * n * c, -1)  # [E/n, m*n*C, d]

    def ret(out, plan):
        c = out.shape[1] // (m * n)
        out = out.reshape(e_local, m, n, c, -1).transpose(1, 2, 0, 3, 4).reshape(
            m * num_experts, c, -1)
        with jax.named_scope("expert_tensor"):  # summed over the width slices
            out = wires.tensor.reduce_scatter(out, g.tensor, 0)
        return wires.combine.exchange(out, g.expert)  # [E, C, d]: my tokens' rows

    def finish(back, gates, plan):
        return unpack(back, plan.s, plan.keep, gates)

    return Stages(route, send, ret, finish, _dropped)


# -- ragged all_to_all ------------------------------------------------------------------------

class RaggedPlan(NamedTuple):
    s: SortedAssignments
    keep: jax.Array  # [A] kept assignments (capacity and receive buffers)
    rows: jax.Array  # [A] send buffer: x[rows], kept rows grouped by destination
    unorder: jax.Array  # [A] send-buffer row of each sorted assignment
    there: tuple  # (input_offsets, send_sizes, output_offsets, recv_sizes) [n] each
    back: tuple  # its transpose
    regroup: jax.Array  # [m*O] received (and expert_tensor-gathered) rows by local expert
    unregroup: jax.Array  # [m*O] its inverse
    sizes: jax.Array  # [E/n] rows per local expert


def receive_rows(g: Group, e_local: int, t: int, k: int, capacity_factor,
                 buffer_factor: float | None) -> int:
    """Rows of a device's ragged receive buffer (before the expert_tensor gather), for t local
    tokens routed to k experts each: the balanced load t*k x ``buffer_factor`` (dropless; None:
    the worst case, every token of every source choosing this device's experts) or what its
    experts' capacity takes."""
    worst = g.n * t * min(k, e_local)
    if capacity_factor is not None:
        return min(worst, e_local * expert_capacity(t * g.n * g.m, k, e_local * g.n,
                                                    capacity_factor))
    return bounded(t * k, worst, buffer_factor)


def ragged_stages(g: Group, wires: Wires, e_local: int, capacity_factor,
                  buffer_factor: float | None, move, dot: GroupedDot) -> Stages:
    """Only routed rows move. Each device's receive buffer holds O rows: the balanced load T*k
    x ``buffer_factor`` (dropless) or what its experts' capacity allows; sources fill it in
    device order and rows past its end are dropped."""
    n, m, num_experts = g.n, g.m, e_local * g.n
    recv_rows = lambda t, k: receive_rows(g, e_local, t, k, capacity_factor, buffer_factor)

    def route(expert_idx):
        t, k = expert_idx.shape
        a, o = t * k, recv_rows(t, k)
        s, keep, _ = route_local(expert_idx, num_experts, g, capacity_factor)
        kept = jnp.zeros((num_experts,), jnp.int32).at[s.expert].add(keep.astype(jnp.int32))
        # Every device's kept rows per expert: [source, plane, destination, local expert],
        # where a plane is an expert_tensor index (exchanges run within a plane).
        every = C.gather(kept[None], g.axes, axis=0).reshape(n, m, n, e_local)
        sizes = every.sum(-1)  # [src, plane, dst]
        place = jnp.cumsum(sizes, axis=0) - sizes  # where src's rows land at dst
        allowed = jnp.clip(o - place, 0, sizes)  # what fits in dst's buffer
        start = jnp.cumsum(sizes, axis=2) - sizes  # src's send-buffer offset for dst
        me, plane = C.index(g.expert), C.index(g.tensor)
        # Send buffer: kept rows by expert (so by destination); a chunk's tail may not fit.
        order = jnp.argsort(jnp.where(keep, s.expert, num_experts), stable=True)
        dst = jnp.minimum(s.expert[order] // e_local, n - 1)
        fits = keep[order] & (jnp.arange(a) - start[me, plane, dst] < allowed[me, plane, dst])
        unorder = jnp.argsort(order)
        there = (start[me, plane], allowed[me, plane], place[me, plane],
                 allowed[:, plane, me])
        back = (place[:, plane, me], allowed[:, plane, me], start[:, plane, me],
                allowed[me, plane])
        # Rows that arrived, per (plane, source, local expert): each chunk is by local expert
        # and keeps its first ``allowed`` rows.
        mine = every[:, :, me, :]  # [src, plane, E/n]
        before = jnp.cumsum(mine, axis=-1) - mine
        got = jnp.clip(allowed[:, :, me][..., None] - before, 0, mine).transpose(1, 0, 2)
        ends = jnp.cumsum(got.reshape(m, n * e_local), axis=1)  # [plane, src*E/n]
        q = jnp.arange(o)
        segment = jax.vmap(lambda e: jnp.searchsorted(e, q, side="right"))(ends)  # [m, O]
        local = jnp.where(q[None] < ends[:, -1:], segment % e_local, e_local).reshape(-1)
        regroup = jnp.argsort(local, stable=True)  # padding rows last
        return RaggedPlan(s, fits[unorder], s.token[order], unorder, there, back, regroup,
                          jnp.argsort(regroup), got.sum((0, 1)))

    def send(x, plan):
        o = recv_rows(x.shape[0], plan.rows.shape[0] // x.shape[0])
        recv = wires.dispatch.ragged(x, plan.there, plan.back, o, move, g.expert,
                                     lambda a, r: a[r], plan.rows)  # [O, d]
        with jax.named_scope("expert_tensor"):
            recv = wires.tensor.gather(recv, g.tensor, 0)
        return rows_at(recv, plan.regroup)  # [m*O, d] by local expert

    def ffn(rows, w, plan):
        return grouped_swiglu(rows, w, plan.sizes, dot)

    def ret(out, plan):
        with jax.named_scope("expert_tensor"):
            out = wires.tensor.reduce_scatter(rows_at(out, plan.unregroup), g.tensor, 0)
        return wires.combine.ragged(out, plan.back, plan.there, plan.rows.shape[0], move,
                                    g.expert)  # [A, d] in send-buffer order

    def finish(back, gates, plan):
        return combine_slots(rows_at(back, plan.unorder), plan.keep, plan.s, gates)

    return Stages(route, send, ret, finish, _dropped, ffn)


# -- all_gather -------------------------------------------------------------------------------

class GatherPlan(NamedTuple):
    s: SortedAssignments  # of the group's assignments
    keep: jax.Array  # [A_group] kept here (this device's experts, within the buffer)
    first: jax.Array  # [] this device's first expert
    dropped: jax.Array  # [] drops of this device's experts


def all_gather_stages(g: Group, wires: Wires, e_local: int, capacity_factor,
                      buffer_factor: float | None) -> Stages:
    """The group's tokens gathered; per local expert a buffer of the capacity, or when
    dropless the balanced load x ``buffer_factor``."""
    num_experts = e_local * g.n

    def rows(t: int, k: int) -> int:
        if capacity_factor is None:
            return bounded(t * k / num_experts, t, buffer_factor)
        return expert_capacity(t, k, num_experts, capacity_factor)

    def route(expert_idx):
        expert_idx = C.gather(expert_idx, g.axes, axis=0)
        return assign(expert_idx, g.expert, e_local, num_experts, rows(*expert_idx.shape))

    def send(x, plan):
        t = x.shape[0] * g.n * g.m
        return pack(wires.dispatch.gather(x, g.axes, 0), plan.s, plan.keep,
                    rows(t, plan.s.token.shape[0] // t), plan.first, e_local)

    def finish(out, gates, plan):
        y = unpack(out, plan.s, plan.keep, C.gather(gates, g.axes, axis=0), plan.first)
        return wires.combine.reduce_scatter(y, g.axes, 0)

    # The m devices of an expert_tensor group count the same drops.
    dropped = lambda plan: plan.dropped.astype(jnp.float32) / g.m
    return Stages(route, send, lambda out, plan: out, finish, dropped, recompute_send=True)


def assign(expert_idx, expert_axes: C.Axes, e_local: int, num_experts: int, cap: int):
    """Sorts [T, k] assignments by expert and keeps those to this device's experts within
    ``cap`` rows per expert."""
    s = sort_by_expert(expert_idx, num_experts)
    first = C.index(expert_axes) * e_local
    keep = (s.expert >= first) & (s.expert < first + e_local) & (s.rank < cap)
    counts = jax.lax.dynamic_slice_in_dim(s.counts, first, e_local)
    return GatherPlan(s, keep, first, jnp.sum(jnp.maximum(counts - cap, 0)))


def experts_all_gather(g: Group, wires: Wires, chunks: int = 1, ring: str = "off",
                       buffer_factor: float | None = None):
    """ExpertsFn with all_gather / reduce-scatter dispatch over the EP group.

    ``ring`` ("ring"/"bidirectional") runs it as a collective matmul in dropless mode: each
    arriving block of tokens meets the local experts while the next block and the partial
    sums travel. Capacity mode pools the whole group's tokens first, so it gathers in one go.
    """
    stages = lambda e, cf: all_gather_stages(g, wires, e, cf, buffer_factor)
    pooled = experts_fn(stages, chunks)

    def local_block(rows, w):
        """The local experts' gate-weighted outputs for one block of the group's tokens (the
        ring's step): rows = (x [B, d], expert_idx [B, k], gates [B, k]) -> [B, d] partial."""
        x, expert_idx, gates = rows
        e_local = w.w_gate.shape[0]
        plan = assign(expert_idx, g.expert, e_local, e_local * g.n, x.shape[0])
        out = expert_ffn(pack(x, plan.s, plan.keep, x.shape[0], plan.first, e_local), w)
        return unpack(out, plan.s, plan.keep, gates, plan.first)

    @jax.named_scope("moe_dispatch")
    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        if ring != "off" and capacity_factor is None:
            y = gather_apply_scatter(lambda rows: local_block(rows, w), (x, expert_idx, gates),
                                     g.axes, g.n * g.m, axis=0,
                                     bidirectional=ring == "bidirectional")
            return y, jnp.zeros((), jnp.float32)
        return pooled(x, expert_idx, gates, w, capacity_factor)

    return experts


def experts_padded_all_to_all(g: Group, wires: Wires, chunks: int = 1,
                              buffer_factor: float | None = None):
    """ExpertsFn with the padded all_to_all dispatch (runs on every backend)."""
    return experts_fn(lambda e, cf: padded_stages(g, wires, e, cf, buffer_factor), chunks)


def experts_ragged_all_to_all(g: Group, wires: Wires, chunks: int = 1,
                              buffer_factor: float | None = None,
                              move=C.ragged_exchange, dot: GroupedDot = jax.lax.ragged_dot):
    """ExpertsFn with the ragged all_to_all dispatch. ``move`` is ``C.ragged_exchange`` on
    GPU, or its padded emulation (``C.ragged_exchange_padded``) where the backend lacks
    ``ragged_all_to_all``; ``dot`` the grouped GEMM (``jax.lax.ragged_dot`` or the Pallas
    kernel's)."""
    return experts_fn(
        lambda e, cf: ragged_stages(g, wires, e, cf, buffer_factor, move, dot), chunks)
