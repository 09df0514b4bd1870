"""Routed experts on the Pallas grouped GEMM: the kernel behind ``kernel.grouped_gemm=pallas``.

``pallas_dot`` is a drop-in ``GroupedDot`` (the unfused path: XLA gathers the expert-sorted
rows, the kernel multiplies them). ``fused_experts`` folds the permutation into the first GEMMs'
prologue (rows are read from the token array by index) and the gate-weighted un-permutation
into the last GEMM's epilogue (each output row, times its gate, is written to its token's
place in slot-major order), so neither the expert-sorted input nor the expert-sorted output
is materialised; the sum over a token's k choices is then a reshape and a float32 add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msmoe_jax.config import KernelConfig
from msmoe_jax.kernels.grouped_gemm import Tiles, grouped_matmul
from msmoe_jax.model.moe import (
    ExpertsFn,
    ExpertWeights,
    GroupedDot,
    capacity_keep,
    grouped_experts,
    local_capacity,
    sort_by_expert,
)


def pallas_dot(tiles: Tiles = Tiles(), interpret: bool | None = None) -> GroupedDot:
    """``jax.lax.ragged_dot``'s contract (lhs [A, K], rhs [E, K, N], sizes [E]) on our kernel."""

    def dot(lhs, rhs, group_sizes):
        return grouped_matmul(lhs, rhs, group_sizes, None, None, None, None, None, tiles,
                              interpret)

    return dot


def fused_experts(tiles: Tiles = Tiles(), interpret: bool | None = None) -> ExpertsFn:
    """ExpertsFn (same contract as ``model.moe.experts_padded``) with the permutation in the
    gate/up GEMMs' prologue and the gate-weighted un-permutation in the down GEMM's epilogue.

    x: [T, d]; expert_idx, gates: [T, k]. Dropped assignments (capacity mode) get weight 0.
    """

    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor):
        t, k = expert_idx.shape
        num_experts = w.w_gate.shape[0]
        s = sort_by_expert(expert_idx, num_experts)
        sizes = s.counts.astype(jnp.int32)
        keep, dropped = capacity_keep(s, local_capacity(t, k, num_experts, capacity_factor))
        up = lambda wt: grouped_matmul(x, wt, sizes, s.token, None, None, None, None, tiles,
                                       interpret)
        h = jax.nn.silu(up(w.w_gate)) * up(w.w_up)  # [A, f], expert-sorted
        weight = jnp.where(keep, gates[s.token, s.slot], 0).astype(jnp.float32)
        place = (s.slot * t + s.token).astype(jnp.int32)  # slot-major: row a = slot * T + token
        y = grouped_matmul(h, w.w_down, sizes, None, place, weight, t * k, jnp.float32, tiles,
                           interpret)
        return jnp.sum(y.reshape(k, t, -1), axis=0).astype(x.dtype), dropped

    return experts


def tiles_of(cfg: KernelConfig) -> Tiles:
    return Tiles(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)


def kernel_experts(cfg: KernelConfig, interpret: bool | None = None) -> ExpertsFn:
    """Local (not expert-parallel) experts on the Pallas kernel, fused or not per ``cfg``."""
    if cfg.fuse_permute:
        return fused_experts(tiles_of(cfg), interpret)
    return grouped_experts(pallas_dot(tiles_of(cfg), interpret))
