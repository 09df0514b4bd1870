"""ZeRO stage 3 inside ``shard_map``: parameters held in parts, all-gathered where they are used.

With ``parallel.zero: 3`` every parameter is held as the optimizer state of stage 1 is: split
over its replica devices (``strategy.zero_spec``). The model all-gathers a parameter just before
use, in the compute dtype for matrices (BF16 on the wire when training in BF16), one layer at a
time for the stacked blocks (``LayerOps.gather``, called inside the layer's remat boundary, so
that the gathered copy is freed after the layer and gathered again for its backward). The
gather's transpose is the gradient reduce-scatter (``grad_exchange.scatter_sum``, FP32 or
``bf16_a2a``): each device receives its own part's gradient, summed over the replicas, and
nothing is all-reduced after.

Traffic: one all-gather per use in the forward and one in the backward (when remat frees the
gathered copy), and one reduce-scatter, per micro-batch; stage 1 moves only the reduce-scatter
and one all-gather per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from msmoe_jax.model.transformer import is_stacked
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel.grad_exchange import replica_axes, scatter_sum, scattered_dim

GATHERED = "zero_gathered"  # checkpoint_name of gathered parameters: remat never saves them
SCOPE = "zero_gather"  # labels the gathers and their reduce-scatters (parallel/comm_bytes.py)
# Matrices gathered in their own dtype (see ``splits``), by path without the ``.value``.
FULL = ("['embed']", "['moe_blocks']['ffn']['router']", "['dense_blocks']['ffn']['router']")


class Split(NamedTuple):
    """How one held parameter is split: dimension ``dim`` (of the array as used: one layer's
    slice for stacked blocks) over the mesh ``axes``, gathered in ``dtype``."""
    dim: int
    axes: C.Axes
    dtype: Any  # on the wire and in use
    held: Any  # the parameter's own dtype (its gradient's)
    stacked: bool  # a stacked block's parameter: gathered one layer at a time


def splits(params, specs, zero, mesh_axes: tuple[str, ...], sizes: dict[str, int],
           compute_dtype) -> dict[str, Split]:
    """The split of every parameter that ``zero`` (``strategy.zero_specs``) splits beyond its
    layout ``specs``, by its path (``jax.tree_util.keystr``). Matrices travel in
    ``compute_dtype`` where it is the narrower; vectors (norm scales, biases) and the router,
    which the model uses in FP32, in their own dtype, and so does the embedding, whose
    gradient sums the rows of every token and would be summed in the gathered dtype."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = {}
    up_to = treedef.flatten_up_to  # type: ignore[attr-defined]
    for (path, p), spec, z in zip(flat, up_to(specs), up_to(zero)):
        d = scattered_dim(spec, z)
        if d is None:
            continue
        key = jax.tree_util.keystr(path)
        stacked = is_stacked(path)
        narrow = (p.ndim - stacked >= 2 and key.split(".")[0] not in FULL
                  and jnp.dtype(compute_dtype).itemsize < p.dtype.itemsize)
        axes = tuple(a for a in replica_axes(spec, mesh_axes) if sizes[a] > 1)
        out[key] = Split(d - stacked, axes, jnp.dtype(compute_dtype) if narrow else p.dtype,
                         p.dtype, stacked)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gather_part(x: jax.Array, split: Split, sizes: tuple[tuple[str, int], ...], mode: str):
    """This device's part ``x`` -> the whole parameter in ``split.dtype``; the backward
    reduce-scatters the gradient over the replicas into the part (``mode``: "fp32" or
    "bf16_a2a", as ``compression.gradients``)."""
    with jax.named_scope(SCOPE):
        return C.gather(x.astype(split.dtype), split.axes, split.dim)


def _gather_fwd(x, split, sizes, mode):
    return gather_part(x, split, sizes, mode), None


def _gather_bwd(split, sizes, mode, _, g):
    with jax.named_scope(SCOPE):
        part = scatter_sum(g.astype(jnp.float32), split.dim, split.axes, dict(sizes), mode)
    return (part.astype(split.held),)


gather_part.defvjp(_gather_fwd, _gather_bwd)


def gatherer(parts: dict[str, Split], sizes: dict[str, int], mode: str) -> Callable:
    """``LayerOps.gather``: ``fn(prefix, tree)`` -> ``tree`` with its split parameters whole.
    ``prefix`` "" takes the model's own parameters (leaving the stacked blocks, which have
    theirs gathered layer by layer); ``"['moe_blocks']"`` one layer's slice of those blocks."""
    items = tuple(sizes.items())

    def gather(prefix: str, tree):
        def one(path, x):
            split = parts.get(prefix + jax.tree_util.keystr(path))
            if split is None or split.stacked != bool(prefix):
                return x
            return jax.ad_checkpoint.checkpoint_name(gather_part(x, split, items, mode),
                                                     GATHERED)

        return jax.tree_util.tree_map_with_path(one, tree)

    return gather
