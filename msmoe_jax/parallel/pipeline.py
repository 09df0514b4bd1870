"""Chunked MoE pipelines with a hand-scheduled backward (MegaScale-MoE's macro modules).

An expert-parallel experts function is five stages (``Stages``):

    plan = route(expert_idx)             bookkeeping on integers (sort by expert, ...)
    recv = send(x, plan)                 dispatch: linear in x, holds the collective
    out  = ffn(recv, w, plan)            the local experts' GEMMs
    back = ret(out, plan)                return: linear in out, holds the collective
    y    = finish(back, gates, plan)     gate-weighted combine (+ its collective, if any)

``compose`` runs them once (autodiff does the backward). ``chunked`` splits the tokens into C
chunks and runs the stages per chunk, so nothing ties chunk i+1's dispatch to chunk i's GEMMs
and the scheduler can overlap them. Its backward is written by hand (``jax.custom_vjp``):

* per chunk, the transposed return collective, the data-gradient GEMMs and the transposed
  dispatch collective, with no dependence between chunks;
* the SwiGLU input is recomputed from the stored dispatched rows (not stored), next to the
  gradient's return collective;
* with ``recompute_send`` (the all_gather dispatch) only the local tokens are stored and the
  all_gather is redone, instead of storing the gathered rows;
* the weight-gradient GEMMs of all chunks come last, free to fill the gaps the collectives
  leave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from msmoe_jax.model.moe import ExpertWeights, expert_ffn
from msmoe_jax.model.remat import MOE_COMBINED, MOE_DISPATCHED, tag


class Stages(NamedTuple):
    route: Callable  # (expert_idx [T, k]) -> plan (pytree of integer/bool arrays)
    send: Callable  # (x [T, d], plan) -> recv (expert rows); linear in x
    ret: Callable  # (out, plan) -> back; linear in out
    finish: Callable  # (back, gates [T, k], plan) -> y [T, d]
    dropped: Callable  # (plan) -> [] assignments dropped by capacity (float32)
    ffn: Callable = lambda recv, w, plan: expert_ffn(recv, w)  # (recv, weights, plan) -> out
    recompute_send: bool = False  # store x and redo ``send`` in the backward


def compose(stages: Stages, x, plan, gates, w: ExpertWeights):
    """The stages run once on all tokens (plan = ``route(expert_idx)``): [T, d] -> [T, d]."""
    back = stages.ret(stages.ffn(stages.send(x, plan), w, plan), plan)
    return stages.finish(back, gates, plan)


def chunked(stages: Stages, chunks: int, x, expert_idx, gates, w: ExpertWeights):
    """``compose`` on ``chunks`` slices of the tokens, with the hand-scheduled backward.
    x: [T, d]; expert_idx, gates: [T, k]; T divisible by chunks. Returns (y [T, d], the
    chunks' plans)."""
    split = lambda a: tuple(jnp.split(a, chunks, axis=0))
    plans = []
    for i, idx in enumerate(split(expert_idx)):
        with jax.named_scope(f"chunk{i}"):
            plans.append(stages.route(idx))
    ys = _make_pipeline(stages)(tuple(plans), split(x), split(gates), w)
    return jnp.concatenate(ys, axis=0), plans


def _transpose(linear_fn, like):
    """The transpose of ``linear_fn`` (cotangent of its output -> cotangent of its input; for
    a collective, the transposed collective). ``like`` is any array of the input's type (shape,
    dtype and device variance): a linear function's VJP does not depend on the point, and its
    forward value is unused and removed by the compiler."""
    _, vjp = jax.vjp(linear_fn, like)
    return lambda ct: vjp(ct)[0]


def _forward(stages, plans, xs, gs, w):
    recvs, backs, ys = [], [], []
    for i, (plan, x, g) in enumerate(zip(plans, xs, gs)):
        with jax.named_scope(f"chunk{i}"):
            recv = stages.send(x, plan)
            back = stages.ret(stages.ffn(recv, w, plan), plan)
            ys.append(stages.finish(back, g, plan))
        recvs.append(recv)
        backs.append(back)
    return tuple(ys), recvs, backs


def _make_pipeline(stages: Stages):
    @jax.custom_vjp
    def pipeline(plans, xs, gs, w):
        return _forward(stages, plans, xs, gs, w)[0]

    def fwd(plans, xs, gs, w):
        ys, recvs, backs = _forward(stages, plans, xs, gs, w)
        kept = xs if stages.recompute_send else tuple(tag(r, MOE_DISPATCHED) for r in recvs)
        backs = tuple(tag(b, MOE_COMBINED) for b in backs)
        return ys, (plans, kept, backs, gs, w)

    def bwd(res, dys):
        plans, kept, backs, gs, w = res
        dxs, dgs, recvs, douts = [], [], [], []
        for i, (plan, saved, back, g, dy) in enumerate(zip(plans, kept, backs, gs, dys)):
            with jax.named_scope(f"chunk{i}_bwd"):
                send = lambda x, plan=plan: stages.send(x, plan)
                recv = send(saved) if stages.recompute_send else saved
                _, finish_vjp = jax.vjp(lambda b, g, plan=plan: stages.finish(b, g, plan),
                                        back, g)
                dback, dg = finish_vjp(dy)
                # The experts keep their rows' shape and dtype, so recv stands in for out.
                dout = _transpose(lambda o, plan=plan: stages.ret(o, plan), recv)(dback)
                # Data gradient only: recomputes the SwiGLU input from the dispatched rows.
                _, ffn_vjp = jax.vjp(lambda r, plan=plan: stages.ffn(r, w, plan), recv)
                drecv, = ffn_vjp(dout)
                dxs.append(_transpose(send, dy)(drecv))  # x has y's type
                dgs.append(dg)
                recvs.append(recv)
                douts.append(dout)
        # Weight gradients last, summed over chunks (in float32).
        dw = None
        for i, (plan, recv, dout) in enumerate(zip(plans, recvs, douts)):
            with jax.named_scope(f"chunk{i}_wgrad"):
                _, w_vjp = jax.vjp(lambda w, recv=recv, plan=plan: stages.ffn(recv, w, plan), w)
                g, = w_vjp(dout)
            g = jax.tree.map(lambda a: a.astype(jnp.float32), g)
            dw = g if dw is None else jax.tree.map(jnp.add, dw, g)
        dw = jax.tree.map(lambda a, ref: a.astype(ref.dtype), dw, w)
        plan_ct = jax.tree.map(lambda _: None, plans)
        return plan_ct, tuple(dxs), tuple(dgs), dw

    pipeline.defvjp(fwd, bwd)
    return pipeline

