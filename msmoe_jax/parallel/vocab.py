"""Vocabulary parallelism over the sequence group: small pure functions used inside ``shard_map``.

The embedding table [V, d] and the LM head [d, V] are split over the group's n devices
(``axes``, row-major as in ``collectives``): device i holds vocab rows/columns
[i*V/n, (i+1)*V/n). Tokens stay split over the sequence, [b, s/n] per device. No device ever
holds a [tokens, V] array: the head keeps [b, s, V/n] logits and combines the softmax
statistics over the group. Their single-device references are ``model/layers.py``'s ``embed``
and ``head_nll``.

A tied head is ``table_local.T``: the gradients of both uses sum as for any shared array.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from msmoe_jax.parallel.collectives import Axes, gather, index, reduce_scatter

SCOPE = "vocab_parallel"  # labels the collectives (parallel/comm_bytes.py)


def _local(ids: jax.Array, rows: int, axes: Axes) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (index into this device's vocab range, clipped; whether it is in range)."""
    local = ids - index(axes) * rows
    inside = (local >= 0) & (local < rows)
    return jnp.clip(local, 0, rows - 1), inside


def parallel_embed(axes: Axes, n: int) -> Callable:
    """Returns fn(table_local [V/n, d], tokens_local [b, s/n], dtype=None) -> [b, s/n, d].

    all_gather the ids (int32, small), look up those in this device's range (zero rows
    elsewhere), and reduce-scatter the [b, s, d] partial rows over the sequence. Exactly one
    device contributes a non-zero per row, so the sum is exact in any dtype: the rows are cast
    to ``dtype`` (the compute dtype) before the reduce-scatter, halving its bytes for bf16.
    The backward is the transpose: all_gather the [b, s/n, d] cotangent, scatter-add the
    in-range rows into the table's gradient.
    """

    @jax.named_scope(SCOPE)
    def fn(table_local: jax.Array, tokens_local: jax.Array, dtype=None) -> jax.Array:
        ids = gather(tokens_local, axes, axis=1)  # [b, s]
        local, inside = _local(ids, table_local.shape[0], axes)
        rows = jnp.where(inside[..., None], jnp.take(table_local, local, axis=0), 0)
        out = reduce_scatter(rows.astype(dtype or table_local.dtype), axes, axis=1)
        assert out.shape[1] * n == ids.shape[1], (out.shape, ids.shape, n)
        return out

    return fn


def parallel_head_nll(axes: Axes, n: int) -> Callable:
    """Returns fn(x_local [b, s/n, d], w_local [d, V/n], targets_local [b, s/n], dtype)
    -> nll_local [b, s/n] float32 (``head_nll`` of this device's tokens).

    all_gather x and the targets over the sequence; logits [b, s, V/n] float32 for this
    device's vocab slice; the logsumexp's max (pmax), sum of exps and the target logit
    (reduce-scatter) are combined over the group. Backward: the softmax's gradient is local
    per vocab slice; x's gradient is reduce-scattered (the all_gather's transpose). Right
    with shard_map's varying-axes check on or off (strategy.py turns it off in some cases).
    """

    @jax.named_scope(SCOPE)
    def fn(x_local: jax.Array, w_local: jax.Array, targets_local: jax.Array,
           dtype) -> jax.Array:
        s_local = x_local.shape[1]
        x = gather(x_local, axes, axis=1)  # [b, s, d]
        ids = gather(targets_local, axes, axis=1)  # [b, s]
        assert x.shape[1] == n * s_local, (x.shape, s_local, n)
        logits = jnp.einsum("bsd,dv->bsv", x, w_local.astype(dtype),
                            preferred_element_type=jnp.float32)
        # Any shift gives the same logsumexp; the group's max avoids overflow. Its gradient
        # cancels, so it is a constant: stop_gradient before the pmax (which has no transpose).
        m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        if axes:
            m = jax.lax.pmax(m, axes)  # [b, s], the same on every device of the group
        local, inside = _local(ids, w_local.shape[1], axes)
        target = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]
        # The sum of exps and the target logit (one device holds it) of this device's tokens:
        # one reduce-scatter of [2, b, s] float32. Its transpose, an all_gather, hands every
        # device the statistics' cotangents of all tokens, which its logits' gradient needs.
        # (An all-reduce then a slice of this device's tokens moves twice the bytes, both ways;
        # with ``total``'s pass-through transpose instead, the backward would be wrong with
        # shard_map's varying-axes check off: each device would keep only its tokens'.)
        sumexp, target = reduce_scatter(
            jnp.stack([jnp.sum(jnp.exp(logits - m[..., None]), axis=-1),
                       jnp.where(inside, target, 0.0)]), axes, axis=2)
        m = jax.lax.dynamic_slice_in_dim(m, index(axes) * s_local, s_local, axis=1)
        return m + jnp.log(sumexp) - target

    return fn
