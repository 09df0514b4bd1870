"""Gradient accumulation layer by layer, inside the backward of the scanned blocks.

With ``train.grad_accum_steps > 1`` a step keeps an FP32 accumulator the size of the
parameters. Differentiating a ``lax.scan`` over stacked layers yields the micro-batch's
gradient of *all* layers as one stacked buffer, which is then added to the accumulator: for
a model whose parameters are not split (experts inside the node, each GPU holding its experts
whole) that is a third parameter-sized FP32 buffer, and it decides whether the step fits.

``accumulating_scan`` runs the same forward scan, but its backward is a reverse scan that
carries the accumulator and adds each layer's gradient into that layer's slice in place; the
cotangent it returns for the accumulator *is* the updated accumulator, and the stacked
parameters get none. Each layer's forward residuals are those its remat policy keeps (the
layer's ``jax.vjp`` pullback, stacked over layers as the plain scan would), except the
layer's parameters, which the backward reads from the stacked parameters instead of copying.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def accumulating_scan(body: Callable, x, xs, acc):
    """``jax.lax.scan(body, x, xs)`` -> (x, ys), differentiable w.r.t. ``acc`` (FP32, the
    structure and shapes of ``xs``) in a special sense: the cotangent of ``acc`` is ``acc``
    plus the gradient w.r.t. ``xs``, and ``xs`` gets no cotangent. ``body(x, layer) -> (x,
    y)`` must close over nothing it should be differentiated w.r.t."""
    meta = {}

    def layer_vjp(x, layer):
        (x, y), pullback = jax.vjp(body, x, layer)
        leaves, meta["tree"] = jax.tree.flatten(pullback)
        own = {id(a): k for k, a in enumerate(jax.tree.leaves(layer))}
        # The residuals that are the layer's own parameters are read back from xs.
        meta["from_xs"] = [own.get(id(r)) for r in leaves]
        saved = [r for r, k in zip(leaves, meta["from_xs"]) if k is None]
        return (x, y), saved

    def pullback_of(layer, saved):
        params, saved = jax.tree.leaves(layer), iter(saved)
        leaves = [next(saved) if k is None else params[k] for k in meta["from_xs"]]
        return jax.tree.unflatten(meta["tree"], leaves)

    @jax.custom_vjp
    def run(xs, acc, x):
        return jax.lax.scan(body, x, xs)

    def fwd(xs, acc, x):
        def step(x, layer):
            (x, y), saved = layer_vjp(x, layer)
            return x, (y, saved)

        x, (ys, saved) = jax.lax.scan(step, x, xs)
        return (x, ys), (xs, acc, saved)

    def bwd(res, cts):
        xs, acc, saved = res
        dx, dys = cts
        count = jax.tree.leaves(xs)[0].shape[0]

        def step(carry, inputs):
            dx, acc = carry
            i, layer, saved, dy = inputs
            dx, dlayer = pullback_of(layer, saved)((dx, dy))
            # In place: the loop carries acc, and each layer updates only its own slice.
            acc = jax.tree.map(lambda a, g: a.at[i].add(g.astype(a.dtype)), acc, dlayer)
            return (dx, acc), None

        (dx, acc), _ = jax.lax.scan(step, (dx, acc), (jnp.arange(count), xs, saved, dys),
                                    reverse=True)
        return None, acc, dx

    run.defvjp(fwd, bwd)
    return run(xs, acc, x)


def accumulate_into(acc) -> Callable:
    """A ``LayerOps.scan_blocks`` that runs each stacked-block kind under ``accumulating_scan``
    with its part of ``acc`` (the accumulator of all parameters, keyed like the model: the
    blocks named ``name`` accumulate into ``acc[name]``)."""
    def scan_blocks(name, body, x, layers):
        part = jax.tree.unflatten(jax.tree.structure(layers), jax.tree.leaves(acc[name]))
        return accumulating_scan(body, x, layers, part)

    return scan_blocks
