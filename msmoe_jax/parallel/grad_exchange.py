"""Summing gradients over the devices that hold copies of a parameter (inside ``shard_map``).

A parameter's *replica axes* are the mesh axes its PartitionSpec does not shard it over:
every device along them holds the same values and computes its own gradient contribution
from its own tokens. ``compression.gradients`` picks how the contributions are summed:

* ``fp32``: ``psum`` in FP32 (XLA's all-reduce: a reduce-scatter then an all_gather).
* ``bf16_a2a`` (MegaScale-MoE): cast the FP32 gradient to BF16, split it into n shards and
  ``all_to_all`` them, so device i receives every replica's piece of shard i, sum those n
  pieces in FP32, and ``all_gather`` the reduced shard in BF16. Each contribution is rounded
  once and the reduced shard once; no BF16 addition happens, unlike a BF16 ring
  reduce-scatter, which rounds the running sum at every hop. Bytes per element sent:
  2 x (n-1)/n x 2 against the FP32 all-reduce's 2 x (n-1)/n x 4.

Leaves with the same replica axes travel as one flat buffer (one all_to_all and one
all_gather per group of axes, whatever the number of parameters).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from msmoe_jax.parallel import collectives as C


def replica_axes(spec: P, mesh_axes: tuple[str, ...]) -> C.Axes:
    """Mesh axes (in mesh order) that ``spec`` does not shard over."""
    used = {a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    return tuple(a for a in mesh_axes if a not in used)


def vary_replicas(params, specs, mesh_axes: tuple[str, ...]):
    """Each leaf marked varying over its replica axes (no data moves): the gradient w.r.t.
    the result is this device's contribution alone."""
    return jax.tree.map(lambda p, s: C.vary(p, replica_axes(s, mesh_axes)), params, specs)


def bf16_a2a_sum(flat: jax.Array, axes: C.Axes) -> jax.Array:
    """Sum over ``axes`` of a flat FP32 vector [L] -> [L] FP32, sent as BF16 (see above)."""
    n = math.prod(jax.lax.axis_size(a) for a in axes)
    length = flat.shape[0]
    m = -(-length // n)
    pieces = jnp.pad(flat, (0, n * m - length)).astype(jnp.bfloat16).reshape(n, m)
    received = C.exchange(pieces, axes)  # row i: device i's piece of my shard
    shard = jnp.sum(received.astype(jnp.float32), axis=0)  # [m]
    full = C.gather(shard.astype(jnp.bfloat16), axes, axis=0)  # [n * m]
    return full[:length].astype(jnp.float32)


def exchange_gradients(grads, specs, mesh_axes: tuple[str, ...], sizes: dict[str, int],
                       mode: str):
    """Sums every leaf of ``grads`` over its replica axes; ``mode`` is "fp32" or "bf16_a2a".
    grads: this device's contributions, laid out like ``specs``; returns the same tree."""
    leaves, treedef = jax.tree.flatten(grads)
    spec_leaves = treedef.flatten_up_to(specs)  # type: ignore[attr-defined]
    groups: dict[C.Axes, list[int]] = {}
    for i, spec in enumerate(spec_leaves):
        axes = replica_axes(spec, mesh_axes)
        if axes:
            groups.setdefault(axes, []).append(i)
    out = list(leaves)
    with jax.named_scope("grad_exchange"):
        for axes, idx in groups.items():
            # A psum over devices that are all one (a size-1 mesh axis) moves nothing but
            # types the result as replicated, which shard_map's out_specs need.
            if mode == "fp32" or math.prod(sizes[a] for a in axes) == 1:
                summed = jax.lax.psum([leaves[i] for i in idx], axes)
                for i, g in zip(idx, summed):
                    out[i] = g
                continue
            flat = jnp.concatenate([leaves[i].astype(jnp.float32).reshape(-1) for i in idx])
            flat = bf16_a2a_sum(flat, axes)
            start = 0
            for i in idx:
                size = leaves[i].size
                out[i] = flat[start:start + size].reshape(leaves[i].shape).astype(
                    leaves[i].dtype)
                start += size
    return jax.tree.unflatten(treedef, out)


def scattered_dim(spec: P, zero: P) -> int | None:
    """The dimension ``zero`` (``strategy.zero_spec`` of ``spec``) adds replica axes to."""
    for d, entry in enumerate(zero):
        before = spec[d] if d < len(spec) else None
        if entry != before:
            return d
    return None


def scatter_sum(g: jax.Array, d: int, axes: C.Axes, sizes: dict[str, int],
                mode: str) -> jax.Array:
    """The sum of ``g`` over ``axes``, of which this device keeps its part of dimension ``d``
    (split over the axes of size > 1, in mesh order): a reduce-scatter, FP32 (``psum_scatter``)
    or, for ``bf16_a2a``, BF16 pieces all_to_all'd and summed in FP32 (no all_gather after)."""
    trivial = tuple(a for a in axes if sizes[a] == 1)
    split = tuple(a for a in axes if sizes[a] > 1)
    if trivial:  # types the result as replicated over the size-1 axes (moves nothing)
        g = jax.lax.psum(g, trivial)
    if mode == "fp32":
        return jax.lax.psum_scatter(g, split, scatter_dimension=d, tiled=True)
    n = math.prod(sizes[a] for a in split)
    moved = jnp.moveaxis(g, d, 0)
    pieces = moved.reshape(n, moved.shape[0] // n, *moved.shape[1:])
    received = C.exchange(pieces.astype(jnp.bfloat16), split)  # piece j of each
    shard = jnp.sum(received.astype(jnp.float32), axis=0)
    return jnp.moveaxis(shard, 0, d).astype(g.dtype)


def scatter_gradients(grads, specs, zero_specs, mesh_axes: tuple[str, ...],
                      sizes: dict[str, int], mode: str):
    """ZeRO: each leaf summed over its replica axes into the replica's own part (the layout of
    ``zero_specs``) instead of everywhere (``scatter_sum``). Leaves whose ``zero_spec`` adds
    nothing are summed as ``exchange_gradients`` does."""
    leaves, treedef = jax.tree.flatten(grads)
    spec_leaves = treedef.flatten_up_to(specs)  # type: ignore[attr-defined]
    zero_leaves = treedef.flatten_up_to(zero_specs)  # type: ignore[attr-defined]
    out = list(leaves)
    whole = []
    with jax.named_scope("grad_exchange"):
        for i, (g, spec, zero) in enumerate(zip(leaves, spec_leaves, zero_leaves)):
            d = scattered_dim(spec, zero)
            if d is None:
                whole.append(i)
                continue
            out[i] = scatter_sum(g, d, replica_axes(spec, mesh_axes), sizes, mode)
    if whole:
        rest = exchange_gradients([leaves[i] for i in whole], [spec_leaves[i] for i in whole],
                                  mesh_axes, sizes, mode)
        for i, g in zip(whole, rest):
            out[i] = g
    return jax.tree.unflatten(treedef, out)
