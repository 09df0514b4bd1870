"""Grouped GEMM (one weight matrix per group of consecutive rows) as Pallas kernels.

Rows r of the left operand are grouped by ``group_sizes`` [G] (group 0 first, then group 1,
...; rows past the last group are padding and give zeros). Two kernels cover the forward and
both backward products of a MoE expert layer:

* ``gmm``:  out[dst(r)] = scale[r] * lhs[src(r)] @ rhs[g(r)]           rhs [G, K, N] (or [G, N, K])
* ``tgmm``: out[g]      = sum over rows r of group g of lhs[src(r)]^T (scale[r] * rhs[dst(r)])

``src``/``dst`` are optional row indices (identity when absent). With them the GEMM reads rows
straight from the unpermuted token array (the permutation in the prologue) and writes each
output row, gate-weighted, to its token's place (the un-permutation in the epilogue), so the
expert-sorted copy of the activations is never written to memory.

The kernels use Pallas' Triton lowering (pointer loads with row-index vectors and masks, which
Mosaic GPU's TMA cannot gather on Hopper), accumulate in float32, and run anywhere else in
interpret mode, which is how CI tests their index logic. ``grouped_matmul`` wires them into
``jax.custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from msmoe_jax.parallel.collectives import varying_axes


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16 for the tensor-core dot) and Triton launch options.

    bm: rows per tile (a tile never mixes groups: tiles that straddle a group boundary run
    once per group with the other group's rows masked); bn, bk: output columns and contraction
    step. K and N are zero-padded to whole tiles where they are not multiples.
    """

    bm: int = 128
    bn: int = 128
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {v}")


def interpret_default() -> bool:
    """Compiled kernels on GPU, the interpreter on every other backend."""
    return jax.default_backend() != "gpu"


def _fit(tile: int, dim: int) -> int:
    """The tile for a dimension of size ``dim``: no larger than dim rounded up to 16."""
    return max(16, min(tile, pl.next_power_of_2(dim)))


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def work_items(group_sizes: jax.Array, m: int, bm: int):
    """Row-tile work list of a grouped GEMM over ``m`` rows.

    Each group covers the bm-row tiles its rows touch; a tile shared by two groups appears once
    for each. The padding rows after the last group form one more group (G) whose tiles only
    write zeros. There are at most cdiv(m, bm) + G items; unused slots point at group G + 1,
    which is empty.

    Returns (item_group [W], item_tile [W], group_start [G+2], group_end [G+2]) int32,
    W = cdiv(m, bm) + G.
    """
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    total = ends[-1] if g else jnp.int32(0)
    end = jnp.concatenate([ends, jnp.stack([jnp.int32(m), jnp.int32(0)])])
    start = jnp.concatenate([ends - sizes, jnp.stack([total, jnp.int32(0)])])
    first = start // bm
    ntiles = jnp.where(end > start, (end - 1) // bm - first + 1, 0)
    w = pl.cdiv(m, bm) + g
    item_end = jnp.cumsum(ntiles)
    item = jnp.arange(w, dtype=jnp.int32)
    group = jnp.searchsorted(item_end, item, side="right").astype(jnp.int32)
    group = jnp.minimum(group, g + 1)
    tile = first[group] + item - (item_end - ntiles)[group]
    return group, tile.astype(jnp.int32), start, end


def _out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """Output type of a kernel: inside ``shard_map`` it varies over every axis an input does."""
    varying = frozenset().union(*(varying_axes(a) for a in inputs))
    mat = getattr(jax.typeof(inputs[0]), "mat", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mat)(varying=varying))
    if hasattr(jax.typeof(inputs[0]), "vma"):
        return jax.ShapeDtypeStruct(shape, dtype, vma=varying)  # type: ignore[call-arg]
    return jax.ShapeDtypeStruct(shape, dtype)


def _like(ct, primal):
    """A cotangent typed like its primal: summed over the mesh axes it varies over and the
    primal does not (the transpose of using a replicated operand on per-device data)."""
    if ct is None:
        return None
    extra = varying_axes(ct) - varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _block(rows, start, size):
    """Index of a [len(rows), size] block: the given rows, columns start..start+size. Both are
    index vectors (interpret mode cannot mix a row-index vector with a slice)."""
    return rows[:, None], (start + jnp.arange(size, dtype=jnp.int32))[None, :]


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, src_ref, dst_ref, scale_ref, lhs_ref,
                rhs_ref, out_ref, *, bm, bn, bk, num_groups, transpose_rhs, m_rows, m_in, m_out,
                spare_rows):
    w, j = pl.program_id(0), pl.program_id(1)
    g = group_ref[w]
    rows = tile_ref[w] * bm + jnp.arange(bm, dtype=jnp.int32)
    valid = (rows >= start_ref[g]) & (rows < end_ref[g])
    rows = jnp.clip(rows, 0, m_rows - 1)  # masked lanes still need an in-bounds address
    src = rows if src_ref is None else jnp.clip(plt.load(src_ref.at[rows]), 0, m_in - 1)
    e = jnp.minimum(g, num_groups - 1)
    k_steps = lhs_ref.shape[1] // bk
    precision = _precision(rhs_ref.dtype)

    def step(i, acc):
        ks = pl.ds(i * bk, bk)
        a = plt.load(lhs_ref.at[_block(src, i * bk, bk)], mask=valid[:, None], other=0)
        a = a.astype(rhs_ref.dtype)  # e.g. a float32 cotangent against bf16 weights
        if transpose_rhs:  # rhs [G, N, K]: the data gradient reads the weights transposed
            b = plt.load(rhs_ref.at[e, pl.ds(j * bn, bn), ks])
            return acc + plt.dot(a, b, trans_b=True, precision=precision)
        b = plt.load(rhs_ref.at[e, ks, pl.ds(j * bn, bn)])
        return acc + plt.dot(a, b, precision=precision)

    # Only real groups multiply; the padding group and unused items write zeros / nothing.
    # The trip count's operands are int32 arrays, not Python ints: Pallas' Triton lowering
    # of select_n types weak-typed literals like the predicate (i1), which gives an i1 loop
    # bound that Triton rejects ('scf.for' bounds of different types).
    trips = jnp.where(g < num_groups, jnp.int32(k_steps), jnp.int32(0))
    acc = jax.lax.fori_loop(jnp.int32(0), trips, step, jnp.zeros((bm, bn), jnp.float32))
    if scale_ref is not None:
        acc = acc * plt.load(scale_ref.at[rows], mask=valid, other=0)[:, None]
    dst = rows if dst_ref is None else jnp.clip(plt.load(dst_ref.at[rows]), 0, m_out - 1)
    if spare_rows:  # the interpreter writes masked lanes too: send them to distinct spare rows
        dst = jnp.where(valid, dst, m_out + jnp.arange(bm, dtype=jnp.int32))
    plt.store(out_ref.at[_block(dst, j * bn, bn)], acc.astype(out_ref.dtype), mask=valid[:, None])


def _tgmm_kernel(start_ref, end_ref, src_ref, dst_ref, scale_ref, lhs_ref, rhs_ref, out_ref, *,
                 bm, bn, bk, m_rows, m_lhs, m_rhs):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = start_ref[g], end_ref[g]
    precision = _precision(lhs_ref.dtype)

    def step(t, acc):
        rows = lo + t * bm + jnp.arange(bm, dtype=jnp.int32)
        valid = rows < hi
        rows = jnp.clip(rows, 0, m_rows - 1)
        src = rows if src_ref is None else jnp.clip(plt.load(src_ref.at[rows]), 0, m_lhs - 1)
        dst = rows if dst_ref is None else jnp.clip(plt.load(dst_ref.at[rows]), 0, m_rhs - 1)
        a = plt.load(lhs_ref.at[_block(src, i * bk, bk)], mask=valid[:, None], other=0)
        b = plt.load(rhs_ref.at[_block(dst, j * bn, bn)], mask=valid[:, None], other=0)
        if scale_ref is not None:
            s = plt.load(scale_ref.at[rows], mask=valid, other=0)
            b = b.astype(jnp.float32) * s[:, None]
        b = b.astype(lhs_ref.dtype)
        return acc + plt.dot(a, b, trans_a=True, precision=precision)

    acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, bm), step, jnp.zeros((bk, bn), jnp.float32))
    # Empty groups store their zeros too.
    plt.store(out_ref.at[g, pl.ds(i * bk, bk), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype))


def _optional(*arrays):
    """(pallas inputs, flags of which optional operands are present)."""
    return [a for a in arrays if a is not None], tuple(a is not None for a in arrays)


def _with_optional(kernel, present, fixed):
    """Kernel taking ``fixed`` leading refs, then optional refs (None where absent)."""

    def wrapped(*refs):
        refs = list(refs)
        head, refs = refs[:fixed], refs[fixed:]
        opt = [refs.pop(0) if p else None for p in present]
        return kernel(*head, *opt, *refs)

    return wrapped


def _params(tiles: Tiles):
    return plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, src=None, dst=None,
        scale=None, out_rows: int | None = None, transpose_rhs: bool = False, out_dtype=None,
        tiles: Tiles = Tiles(), interpret: bool | None = None) -> jax.Array:
    """Grouped GEMM, forward kernel (no autodiff; see ``grouped_matmul``).

    lhs: [M_in, K]; rhs: [G, K, N] ([G, N, K] with transpose_rhs); group_sizes: [G] int with
    sum <= R, where R = M_in without ``src`` or len(src). src: [R] rows of lhs to read;
    dst: [R] distinct rows of the output to write (default: row r); scale: [R] float32 row
    weights. Returns [out_rows (default R), N] in out_dtype (default lhs.dtype); output rows
    nobody writes are undefined, so with ``dst`` cover every output row.
    """
    interpret = interpret_default() if interpret is None else interpret
    m_in, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    r = m_in if src is None else src.shape[0]
    m_out = r if out_rows is None else out_rows
    if dst is None and m_out != r:
        raise ValueError(f"gmm: out_rows={out_rows} needs dst (without it row r is written to "
                         f"row r of {r})")
    bm, bn, bk = tiles.bm, _fit(tiles.bn, n), _fit(tiles.bk, k)
    lhs = _pad_to(lhs, 1, bk)
    rhs = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, bk), 1 if transpose_rhs else 2, bn)
    n_pad = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    group, tile, start, end = work_items(group_sizes, r, bm)
    extra, present = _optional(src, dst, scale)
    kernel = functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, num_groups=g,
                               transpose_rhs=transpose_rhs, m_rows=r, m_in=m_in, m_out=m_out,
                               spare_rows=interpret)
    out = pl.pallas_call(
        _with_optional(kernel, present, 4),
        out_shape=_out_struct((m_out + bm * interpret, n_pad), out_dtype or lhs.dtype, lhs, rhs,
                              *extra),
        grid=(group.shape[0], n_pad // bn),
        compiler_params=_params(tiles),
        interpret=interpret,
        name="grouped_gemm",
    )(group, tile, start, end, *extra, lhs, rhs)
    return out[:m_out, :n]


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, src=None, dst=None,
         scale=None, out_dtype=jnp.float32, tiles: Tiles = Tiles(),
         interpret: bool | None = None) -> jax.Array:
    """Grouped transposed GEMM, the weight gradient: out[g] = sum_{r in g} lhs[src r]^T
    (scale[r] * rhs[dst r]).

    lhs: [M_l, K]; rhs: [M_r, N]; src/dst/scale: [R] as in ``gmm`` (R = M_l without src).
    Returns [G, K, N] in out_dtype (float32 by default: the sum over a group's rows); groups
    without rows give zeros.
    """
    interpret = interpret_default() if interpret is None else interpret
    m_l, k = lhs.shape
    m_r, n = rhs.shape
    g = group_sizes.shape[0]
    bm, bn, bk = tiles.bm, _fit(tiles.bn, n), _fit(tiles.bk, k)
    lhs, rhs = _pad_to(lhs, 1, bk), _pad_to(rhs, 1, bn)
    r = m_l if src is None else src.shape[0]
    _, _, start, end = work_items(group_sizes, r, bm)
    extra, present = _optional(src, dst, scale)
    kernel = functools.partial(_tgmm_kernel, bm=bm, bn=bn, bk=bk, m_rows=r, m_lhs=m_l,
                               m_rhs=m_r)
    out = pl.pallas_call(
        _with_optional(kernel, present, 2),
        out_shape=_out_struct((g, lhs.shape[1], rhs.shape[1]), out_dtype, lhs, rhs, *extra),
        grid=(g, lhs.shape[1] // bk, rhs.shape[1] // bn),
        compiler_params=_params(tiles),
        interpret=interpret,
        name="grouped_gemm_wgrad",
    )(start, end, *extra, lhs, rhs)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def grouped_matmul(lhs, rhs, group_sizes, src=None, dst=None, scale=None, out_rows=None,
                   out_dtype=None, tiles: Tiles = Tiles(), interpret: bool | None = None):
    """Differentiable ``gmm``: out[dst(r)] = scale[r] * lhs[src(r)] @ rhs[g(r)].

    Shapes as in ``gmm`` (rhs [G, K, N]). Gradients: lhs by the transposed-weight kernel
    (scatter-added over ``src`` when rows are gathered), rhs by ``tgmm``, scale by the row dot
    of the lhs rows with the data gradient before scaling; the integer operands get none.
    """
    return gmm(lhs, rhs, group_sizes, src=src, dst=dst, scale=scale, out_rows=out_rows,
               out_dtype=out_dtype, tiles=tiles, interpret=interpret)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, src, dst, scale, out_rows, out_dtype, tiles,
                        interpret):
    out = grouped_matmul(lhs, rhs, group_sizes, src, dst, scale, out_rows, out_dtype, tiles,
                         interpret)
    return out, (lhs, rhs, group_sizes, src, dst, scale)


def _grouped_matmul_bwd(out_rows, out_dtype, tiles, interpret, res, dout):
    lhs, rhs, group_sizes, src, dst, scale = res
    # Data gradient per routed row r: dout[dst r] @ rhs[g]^T (before scaling by scale[r]).
    u = gmm(dout, rhs, group_sizes, src=dst, out_rows=None if dst is None else dst.shape[0],
            transpose_rhs=True, out_dtype=jnp.float32, tiles=tiles, interpret=interpret)
    dscale = None
    if scale is not None:
        rows = lhs if src is None else lhs[src]
        dscale = jnp.sum(u * rows.astype(jnp.float32), axis=-1).astype(scale.dtype)
        u = u * scale[:, None]
    if src is None:
        dlhs = u.astype(lhs.dtype)
    else:  # rows gathered in the forward are summed back (XLA scatter-add)
        dlhs = jnp.zeros(lhs.shape, jnp.float32).at[src].add(u).astype(lhs.dtype)
    drhs = tgmm(lhs, dout, group_sizes, src=src, dst=dst, scale=scale, tiles=tiles,
                interpret=interpret).astype(rhs.dtype)
    return _like(dlhs, lhs), _like(drhs, rhs), None, None, None, _like(dscale, scale)


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
