"""Expert-parallel experts functions (inside ``shard_map``), same contract as ``ExpertsFn``.

Each device holds E/n experts (n = ``expert`` devices; expert j*E/n + l is local expert l of
device j), each with 1/m of its FFN width (m = ``expert_tensor`` devices). The tokens that meet
one set of experts (the *EP group*: the expert x expert_tensor devices that share an
expert_data index) are pooled for capacity: an expert takes at most
``expert_capacity(group tokens)`` assignments, first choices before second choices, then in
group order (by expert index, then expert_tensor index, then local token order); that is the
single-device rule applied to the group's tokens in that order. Dropped assignments are counted
once per group.

Two dispatch modes:

* ``all_to_all``: sort the local assignments by expert into per-expert buffers [E, C, d]
  (``pack``), send block j to device j, run the local experts on what arrived from every
  device, and send the results back. The padded buffers hold the worst case (C = local tokens
  when dropless), because CPU has no ``ragged_all_to_all``.
* ``all_gather``: all_gather the group's tokens, run the local experts on the rows routed to
  them, weight by the gates, and reduce-scatter the partial outputs back to their owners. It
  moves T*(n-1) rows instead of ~T*k*(n-1)/n, so it pays when top_k is large.

With expert_tensor m > 1 the local tokens are first gathered over the m devices, each computes
its slice of the FFN width, and the partial outputs are reduce-scattered back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msmoe_jax.model.moe import ExpertWeights, GroupedDot, expert_capacity, expert_ffn, pack
from msmoe_jax.model.moe import combine as combine_slots
from msmoe_jax.model.moe import sort_by_expert, unpack
from msmoe_jax.model.remat import MOE_DISPATCHED, tag
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel.collective_matmul import gather_apply_scatter
from msmoe_jax.parallel.pipeline import Stages, chunked, compose


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


def route_in_group(expert_idx, n: int, e_local: int, expert_axes: C.Axes, tensor_axes: C.Axes,
                   capacity_factor):
    """Shared first half of the all_to_all dispatches: gather the assignments over
    expert_tensor, sort them by expert, and decide which fit the EP group's capacity.

    Returns (expert_idx [T, k], SortedAssignments, keep [A], capacity or None) where
    T = local tokens x expert_tensor devices.
    """
    expert_idx = C.gather(expert_idx, tensor_axes, axis=0)
    t, k = expert_idx.shape
    num_experts = e_local * n
    s = sort_by_expert(expert_idx, num_experts)
    if capacity_factor is None:
        return expert_idx, s, jnp.ones_like(s.rank, bool), None
    capacity = expert_capacity(t * n, k, num_experts, capacity_factor)
    keep = group_rank(expert_idx, s, num_experts, expert_axes) < capacity
    return expert_idx, s, keep, capacity


def run_stages(stages: Stages, chunks: int, x, expert_idx, gates, w):
    """(y [T, d], dropped []) of the stages, chunked with the hand-written backward when
    ``chunks`` > 1."""
    if chunks == 1:
        plan = stages.route(expert_idx)
        return compose(stages, x, plan, gates, w), stages.dropped(plan)
    y, plans = chunked(stages, chunks, x, expert_idx, gates, w)
    return y, sum(stages.dropped(p) for p in plans)


def experts_all_to_all(expert_axes: C.Axes, n: int, tensor_axes: C.Axes, m: int,
                       chunks: int = 1, dispatch: C.Wire = C.EXACT, combine: C.Wire = C.EXACT,
                       tensor: C.Wire = C.EXACT):
    """ExpertsFn with all_to_all dispatch over ``expert_axes`` (n devices). The wires say how
    the tokens go out, how the results come back and how expert_tensor gathers/scatters."""

    def stages(e_local: int, capacity_factor) -> Stages:
        num_experts = e_local * n

        def route(expert_idx):
            expert_idx, s, keep, capacity = route_in_group(
                expert_idx, n, e_local, expert_axes, tensor_axes, capacity_factor)
            return s, keep

        def send(x, plan):
            s, keep = plan
            x = tensor.gather(x, tensor_axes, 0)  # [T*m, d]
            c = buffer_rows(s, x.shape[0])
            # Block j from device j; ``pack`` copies each token's row into its experts' buffers.
            recv = dispatch.exchange(x, expert_axes, lambda a, p: pack(a, *p, c), (s, keep))
            return recv.reshape(n, e_local, c, -1).transpose(1, 0, 2, 3).reshape(
                e_local, n * c, -1)  # [E/n, n*C, d]

        def ret(out, plan):
            c = out.shape[1] // n
            out = out.reshape(e_local, n, c, -1).transpose(1, 0, 2, 3).reshape(
                num_experts, c, -1)
            return combine.exchange(out, expert_axes)  # [E, C, d]: my tokens' rows

        def finish(back, gates, plan):
            s, keep = plan
            y = unpack(back, s, keep, C.gather(gates, tensor_axes, axis=0))  # [T*m, d]
            return tensor.reduce_scatter(y, tensor_axes, 0)

        def buffer_rows(s, t):
            """Rows per expert buffer: one device can fill an expert's whole capacity."""
            if capacity_factor is None:
                return t
            k = s.token.shape[0] // t
            return min(t, expert_capacity(t * n, k, num_experts, capacity_factor))

        # The m devices of an expert_tensor group count the same drops.
        dropped = lambda plan: jnp.sum(~plan[1]).astype(jnp.float32) / m
        return Stages(route, send, ret, finish, dropped)

    @jax.named_scope("moe_dispatch")
    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        return run_stages(stages(w.w_gate.shape[0], capacity_factor), chunks, x, expert_idx,
                          gates, w)

    return experts


def experts_all_gather(expert_axes: C.Axes, n: int, tensor_axes: C.Axes, m: int,
                       ring: str = "off", chunks: int = 1, dispatch: C.Wire = C.EXACT,
                       combine: C.Wire = C.EXACT):
    """ExpertsFn with all_gather / reduce-scatter dispatch over the EP group.

    ``ring`` ("ring"/"bidirectional") runs it as a collective matmul in dropless mode: each
    arriving block of tokens meets the local experts while the next block and the partial
    sums travel. Capacity mode pools the whole group's tokens first, so it gathers in one go.
    """
    group = expert_axes + tensor_axes  # gather order: expert index, then expert_tensor index

    def stages(e_local: int, capacity_factor) -> Stages:
        def route(expert_idx):
            expert_idx = C.gather(expert_idx, group, axis=0)
            t, k = expert_idx.shape
            cap = t if capacity_factor is None else expert_capacity(
                t, k, e_local * n, capacity_factor)
            return assign(expert_idx, e_local, cap)

        def send(x, plan):
            s, keep, first, _ = plan
            cap = route_capacity(s, x.shape[0] * n * m)
            return pack(dispatch.gather(x, group, 0), s, keep, cap, first, e_local)

        def route_capacity(s, t):
            if capacity_factor is None:
                return t
            return expert_capacity(t, s.token.shape[0] // t, e_local * n, capacity_factor)

        def finish(out, gates, plan):
            s, keep, first, _ = plan
            y = unpack(out, s, keep, C.gather(gates, group, axis=0), first)
            return combine.reduce_scatter(y, group, 0)

        dropped = lambda plan: plan[3].astype(jnp.float32) / m
        return Stages(route, send, lambda out, plan: out, finish, dropped,
                      recompute_send=True)

    @jax.named_scope("moe_dispatch")
    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        st = stages(w.w_gate.shape[0], capacity_factor)
        if ring != "off" and capacity_factor is None:
            y = gather_apply_scatter(lambda rows: local_block(rows, w), (x, expert_idx, gates),
                                     group, n * m, axis=0, bidirectional=ring == "bidirectional")
            return y, jnp.zeros((), jnp.float32)
        return run_stages(st, chunks, x, expert_idx, gates, w)

    def assign(expert_idx, e_local: int, cap: int):
        """Sorts [T, k] assignments by expert and keeps those to this device's experts within
        ``cap``; plan = (SortedAssignments, keep [A], first local expert, drops here)."""
        s = sort_by_expert(expert_idx, e_local * n)
        first = C.index(expert_axes) * e_local
        keep = (s.expert >= first) & (s.expert < first + e_local) & (s.rank < cap)
        counts = jax.lax.dynamic_slice_in_dim(s.counts, first, e_local)
        return s, keep, first, jnp.sum(jnp.maximum(counts - cap, 0))

    def local_block(rows, w):
        """The local experts' gate-weighted outputs for one block of the group's tokens (the
        ring's step): rows = (x [B, d], expert_idx [B, k], gates [B, k]) -> [B, d] partial."""
        x, expert_idx, gates = rows
        s, keep, first, _ = assign(expert_idx, w.w_gate.shape[0], x.shape[0])
        out = expert_ffn(pack(x, s, keep, x.shape[0], first, w.w_gate.shape[0]), w)
        return unpack(out, s, keep, gates, first)

    return experts


def experts_ragged_all_to_all(expert_axes: C.Axes, n: int, tensor_axes: C.Axes, m: int,
                              ragged_exchange=C.ragged_exchange,
                              dot: GroupedDot = jax.lax.ragged_dot, dispatch: C.Wire = C.EXACT,
                              combine: C.Wire = C.EXACT, tensor: C.Wire = C.EXACT):
    """ExpertsFn with ragged all_to_all dispatch: only routed (and kept) rows move, and the
    local experts run as grouped GEMMs (``ragged_dot``) over rows grouped by expert.

    ``ragged_exchange`` is ``jax.lax.ragged_all_to_all`` on GPU, or the padded emulation
    (``C.ragged_exchange_padded``) where the backend lacks it, which tests this bookkeeping.
    ``dot`` is the grouped GEMM (``jax.lax.ragged_dot`` or the Pallas kernel's).
    """

    @jax.named_scope("moe_dispatch")
    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        e_local = w.w_gate.shape[0]
        num_experts = e_local * n
        x, gates = tensor.gather(x, tensor_axes, 0), C.gather(gates, tensor_axes, axis=0)
        expert_idx, s, keep, capacity = route_in_group(
            expert_idx, n, e_local, expert_axes, tensor_axes, capacity_factor)
        t, k = expert_idx.shape
        most = t * min(k, e_local)  # rows one device can send to another
        if capacity is not None:
            most = min(most, e_local * capacity)
        # Send buffer: kept assignments in expert order (so grouped by destination) first.
        order = jnp.argsort(jnp.where(keep, s.expert, num_experts), stable=True)
        rows = s.token[order]  # send buffer [A, d] = x[rows]
        kept = jnp.zeros((num_experts,), jnp.int32).at[s.expert].add(keep.astype(jnp.int32))
        every = C.gather(kept[None], expert_axes, axis=0)  # [n src, E]
        sizes = every.reshape(n, n, e_local).sum(-1)  # [src, dst] rows
        me = C.index(expert_axes)
        send_sizes, recv_sizes = sizes[me], sizes[:, me]
        send_offsets = jnp.cumsum(send_sizes) - send_sizes
        recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
        place_there = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # my chunk's offset at each dst
        there = (send_offsets, send_sizes, place_there, recv_sizes)
        back_plan = (recv_offsets, recv_sizes, (jnp.cumsum(sizes, axis=1) - sizes)[:, me],
                     send_sizes)  # the transpose of ``there``
        recv = dispatch.ragged(x, there, back_plan, n * most, ragged_exchange, expert_axes,
                               lambda a, r: a[r], rows)
        # Received rows are source-major, then by local expert; regroup them by expert.
        per_src = jax.lax.dynamic_slice_in_dim(every, me * e_local, e_local, axis=1)  # [n, E/n]
        p = jnp.arange(n * most)
        src = jnp.clip(jnp.searchsorted(jnp.cumsum(recv_sizes), p, side="right"), 0, n - 1)
        offset = p - recv_offsets[src]
        local = jnp.sum(offset[:, None] >= jnp.cumsum(per_src, axis=1)[src], axis=1)
        local = jnp.where(p < jnp.sum(recv_sizes), local, e_local)  # padding rows last
        regroup = jnp.argsort(local, stable=True)
        sizes_e = jnp.sum(per_src, axis=0)  # rows per local expert
        xs = tag(recv[regroup], MOE_DISPATCHED)
        h = jax.nn.silu(dot(xs, w.w_gate, sizes_e)) * dot(xs, w.w_up, sizes_e)
        out = jnp.zeros_like(recv).at[regroup].set(dot(h, w.w_down, sizes_e))
        # Back to the senders, into the rows their send buffers had.
        back = combine.ragged(out, back_plan, there, rows.shape[0], ragged_exchange,
                              expert_axes)
        y_sorted = jnp.zeros_like(back).at[order].set(back)  # [A, d] in sorted order
        y = tensor.reduce_scatter(combine_slots(y_sorted, keep, s, gates), tensor_axes, 0)
        return y, jnp.sum(~keep).astype(jnp.float32) / m

    return experts
