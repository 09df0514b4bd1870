"""FP8 (E4M3) communication: quantisation and the collectives that send it.

Rows are tokens and the last axis their channels. A row goes on the wire as its E4M3 values
plus one FP32 scale, packed into a single uint8 array ``[..., d + 4]`` (``encode``), so payload
and scale travel in one collective and every row-moving collective (all_to_all, all_gather,
ragged_all_to_all) carries them without knowing. Quantisation is saturating: the row's
largest magnitude maps to E4M3's largest finite value (448), so no value overflows to NaN
(E4M3 has no Inf, and a plain cast of a value past 448 gives NaN).

Sums never happen in FP8: a reduce-scatter becomes an FP8 all_to_all of the n blocks followed
by an FP32 sum of what arrived (``reduce_scatter``), as MegaScale-MoE does.

Every collective here has its own backward (``jax.custom_vjp``) that sends the cotangent in
FP8 too, quantised afresh: the exchange's cotangent goes back through the exchange with
per-row scales, the all_gather's through the FP8 reduce-scatter, and the reduce-scatter's
through an all_gather with per-channel scales over groups of tokens (gradients have channel
outliers; ``channel_group`` tokens share each channel's scale). Rounding is treated as the
identity in the backward (straight-through).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from msmoe_jax.parallel import collectives as C

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
SCALE_BYTES = 4
_F32_MAX = float(jnp.finfo(jnp.float32).max)
_F32_TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal: denormal scales flush to 0


def quantize(x: jax.Array, axis: int = -1):
    """x [..., d] -> (q E4M3, scale f32 with ``axis`` kept as size 1); x ~= q * scale.

    One scale per slice along ``axis`` (default: per row). The slice's amax maps to 448;
    all-zero slices get scale 1; infinities saturate to +-448 * scale; scales stay normal
    floats (slices below 448 x the smallest normal keep fewer significant bits)."""
    x = x.astype(jnp.float32)
    amax = jnp.minimum(jnp.max(jnp.abs(x), axis=axis, keepdims=True), _F32_MAX)
    scale = jnp.where(amax > 0, jnp.maximum(amax / E4M3_MAX, _F32_TINY), 1.0)
    return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


def encode(x: jax.Array) -> jax.Array:
    """[..., d] -> uint8 [..., d + 4]: per-row E4M3 values, then the row's FP32 scale."""
    q, scale = quantize(x)
    scale = jax.lax.bitcast_convert_type(scale, jnp.uint8).reshape(*x.shape[:-1], SCALE_BYTES)
    return jnp.concatenate([jax.lax.bitcast_convert_type(q, jnp.uint8), scale], axis=-1)


def decode(w: jax.Array, dtype) -> jax.Array:
    """Inverse of ``encode``: uint8 [..., d + 4] -> [..., d] in ``dtype``. All-zero rows (the
    padding of a buffer) decode to zeros."""
    q = jax.lax.bitcast_convert_type(w[..., :-SCALE_BYTES], E4M3)
    scale = jax.lax.bitcast_convert_type(w[..., -SCALE_BYTES:], jnp.float32)[..., None]
    return dequantize(q, scale, dtype)


# -- collectives ------------------------------------------------------------------------------

def _rows_as_is(x, plan):
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _moved(x, plan, select, move, move_back):
    """move(select(x)) with x's rows encoded once, before ``select`` copies them. plan:
    integer/bool arrays."""
    return decode(move(select(encode(x), plan), plan), x.dtype)


def _moved_fwd(x, plan, select, move, move_back):
    return _moved(x, plan, select, move, move_back), (x, plan)


def _moved_bwd(select, move, move_back, res, ct):
    x, plan = res
    rows = decode(move_back(encode(ct), plan), ct.dtype)  # cotangent of select's output
    _, select_vjp = jax.vjp(lambda a: select(a, plan), x)  # sums a row's copies, unquantised
    return select_vjp(rows)[0], C.no_grad(plan)


_moved.defvjp(_moved_fwd, _moved_bwd)


def exchange(x: jax.Array, axes: C.Axes, select=None, plan=()) -> jax.Array:
    """``C.exchange_rows`` in FP8: per-row scales, x's rows quantised once where they are
    produced (before ``select`` copies them into the padded per-expert buffers, which then hold
    and send encoded rows). Backward: the cotangent goes back through the exchange (its own
    transpose) in FP8 and the copies are summed in the compute dtype."""
    if not axes:
        return C.exchange_rows(x, axes, select, plan)
    move = lambda w, _: C.exchange(w, axes)
    return _moved(x, plan, select or _rows_as_is, move, move)


def _blocks_summed(x: jax.Array, axes: C.Axes, axis: int) -> jax.Array:
    """FP8 all_to_all + FP32 sum: [..., n*m, ..., d] (``axis``) -> [..., m, ..., d]; block i
    along ``axis`` of every device is summed on device i."""
    n = math.prod(jax.lax.axis_size(a) for a in axes)
    w = encode(x)
    shape = w.shape
    w = w.reshape(shape[:axis] + (n, shape[axis] // n) + shape[axis + 1:])
    w = jax.lax.all_to_all(w, axes, split_axis=axis, concat_axis=axis, tiled=True)
    return jnp.sum(decode(w, jnp.float32), axis=axis).astype(x.dtype)


def _gather_channels(x: jax.Array, axes: C.Axes, axis: int, group: int) -> jax.Array:
    """all_gather along ``axis`` in FP8 with one scale per channel (last axis) and group of
    up to ``group`` rows along ``axis``: [..., m, ..., d] -> [..., n*m, ..., d]."""
    x = jnp.moveaxis(x, axis, -2)
    m, d = x.shape[-2:]
    g = max(k for k in range(1, min(group, m) + 1) if m % k == 0)  # groups tile the rows
    q, scale = quantize(x.reshape(*x.shape[:-2], m // g, g, d), axis=-2)
    q, scale = (C.gather(a, axes, axis=a.ndim - 3) for a in (q, scale))
    y = dequantize(q, scale, x.dtype).reshape(*x.shape[:-2], -1, d)
    return jnp.moveaxis(y, -2, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather(x: jax.Array, axes: C.Axes, axis: int) -> jax.Array:
    """``C.gather`` in FP8 with per-row scales: [..., m, ..., d] -> [..., n*m, ..., d]
    (``axis`` is not the last). Backward: the FP8 all_to_all + FP32 sum reduce-scatter."""
    if not axes:
        return x
    return decode(C.gather(encode(x), axes, axis), x.dtype)


gather.defvjp(lambda x, axes, axis: (gather(x, axes, axis), None),
              lambda axes, axis, _, ct: (_blocks_summed(ct, axes, axis) if axes else ct,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def reduce_scatter(x: jax.Array, axes: C.Axes, axis: int, group: int = 128) -> jax.Array:
    """``C.reduce_scatter`` as an FP8 all_to_all with an FP32 sum of the received blocks:
    [..., n*m, ..., d] -> [..., m, ..., d]. Backward: the all_gather of the cotangent in FP8
    with per-channel scales over ``group`` rows."""
    if not axes:
        return x
    return _blocks_summed(x, axes, axis)


reduce_scatter.defvjp(
    lambda x, axes, axis, group: (reduce_scatter(x, axes, axis, group), None),
    lambda axes, axis, group, _, ct: (_gather_channels(ct, axes, axis, group) if axes else ct,))


def ragged(x: jax.Array, there, back, out_rows: int, move, axes: C.Axes, select=None,
           plan=None) -> jax.Array:
    """``C.ragged_rows`` in FP8 with per-row scales, x's rows quantised once before
    ``select`` copies them; the backward sends the cotangent's rows back along ``back`` in
    FP8."""
    select = select or _rows_as_is
    in_rows = jax.eval_shape(select, x, plan).shape[0]
    forth = lambda w, p: move(w, C.landing(out_rows, w, axes, *p[1]), *p[1], axes)
    back_ = lambda w, p: move(w, C.landing(in_rows, w, axes, *p[2]), *p[2], axes)
    return _moved(x, (plan, there, back), lambda a, p: select(a, p[0]), forth, back_)


def wire(channel_group: int = 128) -> C.Wire:
    """The FP8 versions of the row-moving collectives (see ``C.Wire``)."""
    return C.Wire(exchange, gather,
                  lambda x, axes, axis: reduce_scatter(x, axes, axis, channel_group), ragged)
