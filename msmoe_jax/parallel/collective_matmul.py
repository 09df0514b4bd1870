"""Collective matmuls: an all_gather or reduce-scatter fused with the computation beside it as
a ring of ``ppermute`` steps, so each step's transfer overlaps the previous step's compute.

``fn`` is any row-wise function along ``axis`` (output row i depends only on input row i:
a projection, a SwiGLU, routed experts in dropless mode), taking and returning pytrees of
arrays with the rows on ``axis``. Over the ring of n devices (``axes``, row-major):

* ``gather_apply``: fn(all_gather(x)) with n-1 transfers of one block, each overlapped with
  fn on the block that arrived before it.
* ``apply_scatter``: reduce_scatter(fn(x)); a partial sum travels the ring and every device
  adds fn of the block the sum is collecting, while the previous sum is in flight.
* ``gather_apply_scatter``: reduce_scatter(fn(all_gather(x))) as one ring carrying both the
  gathered block and the partial sum (the all_gather dispatch of experts).

``bidirectional=True`` splits each block's rows in halves that travel in opposite directions,
using both directions of every link (each step moves half a block); it falls back to one
direction when a block has an odd number of rows. The backward is JAX's transpose of the
ring: a ring in the opposite direction, with the same independence between steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from msmoe_jax.parallel.collectives import Axes, index


def shift(x, axes: Axes, n: int, step: int):
    """Sends every leaf of ``x`` to the device ``step`` places on in the ring (pytree, same
    shapes before and after)."""
    perm = [(i, (i + step) % n) for i in range(n)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axes, perm), x)


def _rows(x, start, size: int, axis: int):
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis), x)


def _split_halves(x, axis: int, blocks: int):
    """Rows of each of ``blocks`` blocks split in halves -> (first halves, second halves),
    each [..., blocks * m / 2, ...]."""
    def half(a, which):
        shape = a.shape
        m = shape[axis] // blocks
        a = a.reshape(shape[:axis] + (blocks, 2, m // 2) + shape[axis + 1:])
        a = jax.lax.index_in_dim(a, which, axis + 1, keepdims=False)
        return a.reshape(shape[:axis] + (blocks * (m // 2),) + shape[axis + 1:])
    return jax.tree.map(lambda a: half(a, 0), x), jax.tree.map(lambda a: half(a, 1), x)


def _join_halves(a, b, axis: int, blocks: int):
    """Inverse of ``_split_halves``."""
    def join(p, q):
        shape = p.shape
        h = shape[axis] // blocks
        p = p.reshape(shape[:axis] + (blocks, 1, h) + shape[axis + 1:])
        q = q.reshape(shape[:axis] + (blocks, 1, h) + shape[axis + 1:])
        j = jnp.concatenate([p, q], axis=axis + 1)
        return j.reshape(shape[:axis] + (blocks * 2 * h,) + shape[axis + 1:])
    return jax.tree.map(join, a, b)


def _bidirectional(x, axis: int, blocks: int, bidirectional: bool) -> bool:
    rows = jax.tree.leaves(x)[0].shape[axis] // blocks
    return bidirectional and rows % 2 == 0


def gather_apply(fn: Callable, x, axes: Axes, n: int, axis: int, bidirectional: bool = False):
    """fn(all_gather(x)): x [..., m, ...] local rows -> fn's outputs on [..., n*m, ...] rows."""
    if n == 1:
        return fn(x)
    if _bidirectional(x, axis, 1, bidirectional):
        a, b = _split_halves(x, axis, 1)
        ya, yb = _gather_ring(fn, a, axes, n, axis, +1), _gather_ring(fn, b, axes, n, axis, -1)
        return _join_halves(ya, yb, axis, n)
    return _gather_ring(fn, x, axes, n, axis, +1)


def _gather_ring(fn, x, axes, n, axis, step):
    me = index(axes)
    m = jax.tree.leaves(x)[0].shape[axis]
    out, chunk = None, x
    for t in range(n):
        if t:
            chunk = shift(chunk, axes, n, step)  # now block me - t*step
        y = fn(chunk)
        if out is None:
            out = jax.tree.map(lambda a: jnp.zeros(a.shape[:axis] + (n * a.shape[axis],)
                                                   + a.shape[axis + 1:], a.dtype), y)
        start = ((me - t * step) % n) * m
        out = jax.tree.map(lambda o, a: jax.lax.dynamic_update_slice_in_dim(o, a, start, axis),
                           out, y)
    return out


def apply_scatter(fn: Callable, x, axes: Axes, n: int, axis: int, bidirectional: bool = False):
    """reduce_scatter(fn(x)) over the group: x [..., n*m, ...] -> fn's outputs summed over the
    group, this device's block [..., m, ...]."""
    if n == 1:
        return fn(x)
    if _bidirectional(x, axis, n, bidirectional):
        a, b = _split_halves(x, axis, n)
        ya, yb = _scatter_ring(fn, a, axes, n, axis, +1), _scatter_ring(fn, b, axes, n, axis, -1)
        return _join_halves(ya, yb, axis, 1)
    return _scatter_ring(fn, x, axes, n, axis, +1)


def _scatter_ring(fn, x, axes, n, axis, step):
    me = index(axes)
    m = jax.tree.leaves(x)[0].shape[axis] // n
    acc = None
    for t in range(n):
        block = (me - (t + 1) * step) % n  # the sum arriving next collects this block
        y = fn(_rows(x, block * m, m, axis))
        acc = y if acc is None else jax.tree.map(jnp.add, shift(acc, axes, n, step), y)
    return acc


def gather_apply_scatter(fn: Callable, x, axes: Axes, n: int, axis: int = 0,
                         bidirectional: bool = False):
    """reduce_scatter(fn(all_gather(x))): x [..., m, ...] local rows -> [..., m, ...], the sum
    over the group of fn's outputs for this device's rows."""
    if n == 1:
        return fn(x)
    if _bidirectional(x, axis, 1, bidirectional):
        a, b = _split_halves(x, axis, 1)
        ya = _gather_scatter_ring(fn, a, axes, n, +1)
        yb = _gather_scatter_ring(fn, b, axes, n, -1)
        return _join_halves(ya, yb, axis, 1)
    return _gather_scatter_ring(fn, x, axes, n, +1)


def _gather_scatter_ring(fn, x, axes, n, step):
    acc, chunk = None, x
    for t in range(n):
        if t < n - 1:
            chunk = shift(chunk, axes, n, step)  # block me - (t+1)*step: the one acc collects
        y = fn(chunk if t < n - 1 else x)
        acc = y if acc is None else jax.tree.map(jnp.add, shift(acc, axes, n, step), y)
    return acc
