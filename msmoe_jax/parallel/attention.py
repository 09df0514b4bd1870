"""Attention and dense FFNs across the sequence split (inside ``shard_map``).

Between layers every device holds ``[b, s/n, d]``: a slice of the sequence, n = sequence x
tensor devices (the attention group). Two ways to run attention on it:

* Ulysses (DeepSpeed-Ulysses, as in MegaScale-MoE): Q/K/V for the local slice with replicated
  weights, one all_to_all to ``[b, s, h/n, hd]``, causal attention on full sequences for the
  local heads, one all_to_all back to ``[b, s/n, h, hd]``, output projection locally.
* Tensor (Megatron with sequence parallelism): all_gather the slice to ``[b, s, d]``,
  column-parallel Q/K/V for the local heads, row-parallel output projection, reduce-scatter
  back to ``[b, s/n, d]``.

Dense FFNs and shared experts are tensor-parallel over the ``tensor`` axis the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msmoe_jax.model.layers import causal_attention
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel.collective_matmul import apply_scatter, gather_apply


def ulysses_attention(axes: C.Axes, n: int, chunks: int = 1, implementation: str = "xla"):
    """Attention core for sequence shards. q: [b, s/n, h, hd]; k, v: [b, s/n, kv, hd]
    -> [b, s/n, h, hd]. Needs h % n == 0 and kv dividing or divisible by n.
    ``implementation``: the local attention's, as ``causal_attention``'s.

    ``chunks`` > 1 splits the heads into that many groups, each exchanged and attended on its
    own, so one group's all_to_alls overlap another's attention (needs h and the KV heads,
    repeated where fewer, divisible by n x chunks)."""
    groups = n * chunks

    def attention(q, k, v):
        kv = k.shape[2]
        if kv % groups:  # fewer KV heads than groups: repeat so each group gets its own
            k, v = jnp.repeat(k, groups // kv, axis=2), jnp.repeat(v, groups // kv, axis=2)
        split = lambda a: jnp.split(a, chunks, axis=2)
        outs = []
        for i, (qc, kc, vc) in enumerate(zip(split(q), split(k), split(v))):
            with jax.named_scope(f"ulysses/chunk{i}"):
                qc, kc, vc = (C.seq_to_heads(a, axes) for a in (qc, kc, vc))
                outs.append(C.heads_to_seq(causal_attention(qc, kc, vc, implementation), axes))
        return jnp.concatenate(outs, axis=2)

    return attention


def tensor_attention(axes: C.Axes, n: int, kv_sharded: bool, implementation: str = "xla"):
    """Attention core for local heads on full sequences. q: [b, s, h/n, hd]; k, v hold kv/n
    local heads when ``kv_sharded``, else all kv heads (replicated weights, kv < n), of which
    this device's query heads use one. ``implementation`` as ``causal_attention``'s."""

    def attention(q, k, v):
        if not kv_sharded and n > 1:
            head = C.index(axes) * k.shape[2] // n
            k = jax.lax.dynamic_slice_in_dim(k, head, 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, head, 1, axis=2)
        return causal_attention(q, k, v, implementation)

    return attention


def gather_sequence(axes: C.Axes, n: int, ring: str = "off", wire: C.Wire = C.EXACT):
    """Entry of a tensor-parallel attention block: (x [b, s/n, d], positions [s/n], project)
    -> (project(x gathered to [b, s, d]), positions [s]). ``ring`` ("ring"/"bidirectional")
    fuses the all_gather into the projection as a collective matmul."""

    def attention_in(x, positions, project):
        with jax.named_scope("tensor_attention"):
            return (gather_then(axes, n, ring, wire)(project, x),
                    C.gather(positions, axes, axis=0))

    return attention_in


def gather_then(axes: C.Axes, n: int, ring: str = "off", wire: C.Wire = C.EXACT):
    """(fn, x [b, s/n, ...]) -> fn(x gathered to [b, s, ...]); fn row-wise along s."""

    def apply(fn, x):
        if ring == "off":
            return fn(wire.gather(x, axes, 1))
        return gather_apply(fn, x, axes, n, axis=1, bidirectional=ring == "bidirectional")

    return apply


def then_scatter(axes: C.Axes, n: int, ring: str = "off", wire: C.Wire = C.EXACT):
    """(fn, x [b, s, ...]) -> fn(x) [b, s, d] partial sums reduce-scattered to [b, s/n, d]
    (exit of a tensor-parallel block); fn row-wise along s."""

    def apply(fn, x):
        if ring == "off":
            return wire.reduce_scatter(fn(x), axes, 1)
        return apply_scatter(fn, x, axes, n, axis=1, bidirectional=ring == "bidirectional")

    return apply


def scoped(op, scope: str):
    """``op(fn, x)`` run inside a named scope (so its collectives are attributed to it)."""

    def apply(fn, x):
        with jax.named_scope(scope):
            return op(fn, x)

    return apply
