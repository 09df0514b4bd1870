"""Collectives used inside ``shard_map``: small pure functions over a group of mesh axes.

``axes`` is a tuple of mesh axis names (a view axis, see ``mesh.py``); devices in the group are
ordered row-major over it, the same order PartitionSpecs use. ``n`` is the group's size. With
an empty tuple every function is the identity, so callers need no special case for size 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

Axes = tuple[str, ...]


def seq_to_heads(x: jax.Array, axes: Axes) -> jax.Array:
    """Ulysses forward exchange: [b, s/n, h, d] -> [b, s, h/n, d]."""
    if not axes:
        return x
    return jax.lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x: jax.Array, axes: Axes) -> jax.Array:
    """Ulysses backward exchange: [b, s, h/n, d] -> [b, s/n, h, d]."""
    if not axes:
        return x
    return jax.lax.all_to_all(x, axes, split_axis=1, concat_axis=2, tiled=True)


def gather(x: jax.Array, axes: Axes, axis: int) -> jax.Array:
    """all_gather along ``axis``: [..., m, ...] -> [..., n*m, ...] (shard i at block i)."""
    if not axes:
        return x
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True)


def reduce_scatter(x: jax.Array, axes: Axes, axis: int) -> jax.Array:
    """Sum over the group, then keep block i along ``axis``: [..., n*m, ...] -> [..., m, ...]."""
    if not axes:
        return x
    return jax.lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True)


def exchange(x: jax.Array, axes: Axes) -> jax.Array:
    """Expert-parallel all_to_all along axis 0: [n*m, ...] -> [n*m, ...].

    Block j of the input (rows j*m..(j+1)*m) goes to device j; block j of the output came
    from device j.
    """
    if not axes:
        return x
    return jax.lax.all_to_all(x, axes, split_axis=0, concat_axis=0, tiled=True)


def index(axes: Axes) -> jax.Array:
    """This device's position in the group (0 for an empty group)."""
    if not axes:
        return jax.numpy.zeros((), jax.numpy.int32)
    return jax.lax.axis_index(axes)


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                    axes: Axes):
    """``jax.lax.ragged_all_to_all`` over ``axes`` (GPU): rows
    operand[input_offsets[j] : + send_sizes[j]] go to device j, landing at its
    output[output_offsets[j] : ...]; recv_sizes[i] rows arrive from device i.
    operand: [A, d]; output: [O, d] (initial contents kept where nothing lands) -> [O, d].
    ``output`` must be a ``landing`` buffer (see there)."""
    check_landing(output, operand, axes, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axes)


def ragged_exchange_padded(operand, output, input_offsets, send_sizes, output_offsets,
                           recv_sizes, axes: Axes):
    """The contract of ``ragged_exchange`` built from a padded all_to_all, for backends without
    ``ragged_all_to_all`` (CPU): each device's chunk for device j is padded to A rows, so it
    moves n*A rows whatever the sizes. Differentiable like any JAX code. It keeps the
    primitive's typing contract (the result is typed as ``output``): it refuses the buffers
    the primitive would mistype, so CPU tests catch them."""
    check_landing(output, operand, axes, input_offsets, send_sizes, output_offsets, recv_sizes)
    a, d = operand.shape
    n = send_sizes.shape[0]
    r = jax.numpy.arange(a)
    rows = jax.numpy.clip(input_offsets[:, None] + r[None, :], 0, a - 1)  # [n, A]
    buf = jax.numpy.where((r[None, :] < send_sizes[:, None])[..., None], operand[rows], 0)
    recv = exchange(buf.reshape(n * a, d), axes).reshape(n, a, d)  # block i from device i
    where = exchange(output_offsets, axes)  # where device i put its chunk in my output
    dest = jax.numpy.where(r[None, :] < recv_sizes[:, None], where[:, None] + r[None, :],
                           output.shape[0])  # out of range: dropped by the scatter
    return output.at[dest.reshape(-1)].set(recv.reshape(n * a, d), mode="drop")


def landing(rows: int, operand, axes: Axes, *plan) -> jax.Array:
    """A zero [rows, d] buffer for a ragged exchange of ``operand`` over ``axes``.

    ``ragged_all_to_all`` types its result exactly as its ``output`` operand. A buffer made
    with ``jnp.zeros`` is invariant across the devices, so the received rows (different on
    every device) would be typed invariant, and autodiff would all-reduce their cotangents
    over the mesh, summing unrelated tokens' gradients. This buffer varies over the group,
    the operand's axes and the plan's (offsets and sizes)."""
    zeros = jax.numpy.zeros((rows, operand.shape[1]), operand.dtype)
    return vary(zeros, _landing_axes(operand, axes, plan))


def _landing_axes(operand, axes: Axes, plan) -> Axes:
    found = set(axes) | varying_axes(operand)
    for a in plan:
        found |= varying_axes(a)
    return tuple(sorted(found))


def check_landing(output, operand, axes: Axes, *plan) -> None:
    """Refuses an ``output`` buffer that would type the exchanged rows wrongly (see
    ``landing``). Inactive with shard_map's varying-axes check off (nothing is typed)."""
    if not varying_axes(operand):  # check off, or nothing varies: no typing to get wrong
        return
    missing = set(_landing_axes(operand, axes, plan)) - varying_axes(output)
    if missing:
        raise TypeError(
            f"ragged exchange over {axes}: the output buffer is invariant over "
            f"{sorted(missing)}, so ragged_all_to_all would type the received rows invariant "
            "and autodiff would sum their gradients over those devices; make it with "
            "collectives.landing()")


def exchange_rows(x, axes: Axes, select=None, plan=()):
    """``exchange(select(x, plan), axes)``: ``select`` copies rows of x into the send buffer
    (e.g. ``pack`` into per-expert buffers; default: x as is)."""
    return exchange(x if select is None else select(x, plan), axes)


def ragged_rows(x, there, back, out_rows: int, move, axes: Axes, select=None, plan=None):
    """The rows ``select(x, plan)`` (default x) [A, d] moved by ``move`` (``ragged_exchange``
    or its padded emulation) into a zero buffer [out_rows, d]; ``there`` = (input_offsets,
    send_sizes, output_offsets, recv_sizes). The backward sends the cotangent's rows back
    along ``back`` (the move's transpose), which the caller knows already: autodiff of
    ``ragged_all_to_all`` would first exchange the offsets with an extra all_to_all."""
    select = select or (lambda a, _: a)
    in_rows = jax.eval_shape(select, x, plan).shape[0]
    forth = lambda w, p: move(w, landing(out_rows, w, axes, *p[1]), *p[1], axes)
    back_ = lambda w, p: move(w, landing(in_rows, w, axes, *p[2]), *p[2], axes)
    return moved_along(x, (plan, there, back), lambda a, p: select(a, p[0]), forth, back_)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def moved_along(x, plan, select, move, move_back):
    """``move(select(x, plan), plan)`` for a linear ``move`` whose transpose is ``move_back``
    (same signature); plan: integer/bool arrays."""
    return move(select(x, plan), plan)


def _moved_along_fwd(x, plan, select, move, move_back):
    return moved_along(x, plan, select, move, move_back), (x, plan)


def _moved_along_bwd(select, move, move_back, res, ct):
    x, plan = res
    _, select_vjp = jax.vjp(lambda a: select(a, plan), x)  # sums a row's copies
    return select_vjp(move_back(ct, plan))[0], no_grad(plan)


moved_along.defvjp(_moved_along_fwd, _moved_along_bwd)


def no_grad(tree):
    """float0 zeros: the cotangent of integer/bool arrays."""
    return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), tree)


class Wire(NamedTuple):
    """The row-moving collectives one kind of traffic uses, with the signatures of
    ``exchange_rows``, ``gather``, ``reduce_scatter`` and ``ragged_rows`` above. ``EXACT``
    sends the compute dtype; ``fp8.wire()`` sends E4M3 rows with per-row scales."""

    exchange: Callable
    gather: Callable
    reduce_scatter: Callable
    ragged: Callable


EXACT = Wire(exchange_rows, gather, reduce_scatter, ragged_rows)


def varying_axes(x) -> frozenset:
    """Mesh axes ``x`` varies over inside ``shard_map`` (empty outside; jax 0.10 keeps them in
    the aval's manual axis type, older versions in ``vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def vary(x: jax.Array, axes: Axes) -> jax.Array:
    """Marks x as varying over ``axes`` (shard_map's varying-axes typing; no data moves), so
    that differentiating w.r.t. it gives each device's own contribution, not their sum."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def total(tree, axes: Axes):
    """psum over ``axes`` whose backward passes the (replicated) cotangent through unchanged:
    the gradient w.r.t. each device's summand is the gradient w.r.t. the sum. That is psum's
    transpose under shard_map's varying-axes typing; written out, it also holds with the
    check off (where JAX transposes psum to another psum, n times too much)."""
    return _psum_passing_grad(jax.tree.map(lambda a: vary(a, axes), tree), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_passing_grad(tree, axes: Axes):
    return jax.lax.psum(tree, axes)


_psum_passing_grad.defvjp(
    lambda tree, axes: (_psum_passing_grad(tree, axes), None),
    lambda axes, _, ct: (jax.tree.map(lambda c: vary(c, axes), ct),))
