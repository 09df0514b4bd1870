"""Mixture-of-Experts feed-forward: top-k router, its auxiliary losses, and local expert compute.

The block is split so that parallel implementations can replace one piece:

* ``route_topk``: softmax top-k gating plus the per-device statistics the losses need. Losses are
  computed from statistics *summed over all tokens of the global batch*, so a data-parallel run
  psums the statistics first and gets exactly the single-device loss.
* an *experts function* ``(x, expert_idx, gates, weights, capacity) -> (y, dropped)`` that sends
  every token to its experts and combines the results. ``local_experts`` is the single-device
  reference; expert parallelism substitutes one that moves tokens between devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model.layers import SwiGLU, dtypes, normal_param
from msmoe_jax.model.remat import MOE_COMBINED, MOE_DISPATCHED, tag


class RouterStats(NamedTuple):
    """Per-layer routing statistics, summed over this device's tokens (psum them to combine)."""

    expert_counts: jax.Array  # [E] assignments per expert (before capacity drops)
    prob_sum: jax.Array  # [E] sum over tokens of the router probabilities
    z_sum: jax.Array  # [] sum over tokens of logsumexp(logits)^2
    tokens: jax.Array  # [] number of tokens routed
    dropped: jax.Array  # [] assignments dropped by the capacity limit


class ExpertWeights(NamedTuple):
    w_gate: jax.Array  # [E, d, f]
    w_up: jax.Array  # [E, d, f]
    w_down: jax.Array  # [E, f, d]


# (x [T, d], expert_idx [T, k], gates [T, k], weights, capacity_factor or None for dropless)
#   -> (y [T, d], dropped []). The function computes the capacity from the tokens it pools.
ExpertsFn = Callable[[jax.Array, jax.Array, jax.Array, ExpertWeights, "float | None"],
                     tuple[jax.Array, jax.Array]]


def route_topk(logits: jax.Array, k: int, renormalize: bool):
    """Softmax top-k gating.

    logits: [T, E] (any float dtype; computed in float32).
    Returns gates [T, k] float32, expert_idx [T, k] int32 (distinct per token) and the
    RouterStats of these tokens (``dropped`` left at 0 for the experts function to fill).
    """
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    counts = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0)
    stats = RouterStats(
        expert_counts=counts,
        prob_sum=jnp.sum(probs, axis=0),
        z_sum=jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        tokens=jnp.asarray(logits.shape[0], jnp.float32),
        dropped=jnp.zeros((), jnp.float32),
    )
    return gates, idx.astype(jnp.int32), stats


def load_balancing_loss(expert_counts, prob_sum, tokens, top_k: int) -> jax.Array:
    """Switch/GShard auxiliary loss ``E * sum_i f_i * P_i`` (1.0 when routing is uniform).

    f_i = expert_counts_i / (tokens * top_k): fraction of assignments that chose expert i.
    P_i = prob_sum_i / tokens: mean router probability of expert i.
    Shapes: [..., E] statistics and [...] tokens; returns [...].
    """
    num_experts = expert_counts.shape[-1]
    f = expert_counts / (tokens[..., None] * top_k)
    p = prob_sum / tokens[..., None]
    return num_experts * jnp.sum(f * p, axis=-1)


def router_z_loss(z_sum, tokens) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return z_sum / tokens


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert in capacity mode: ceil(cf * tokens * k / E), at most ``tokens``."""
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


class SortedAssignments(NamedTuple):
    """Token-to-expert assignments sorted by expert. A = T * k assignments."""

    token: jax.Array  # [A] source token of the j-th sorted assignment
    slot: jax.Array  # [A] which of the token's k choices it is
    expert: jax.Array  # [A] its expert (non-decreasing)
    rank: jax.Array  # [A] its position among the assignments to that expert
    counts: jax.Array  # [E] assignments per expert
    starts: jax.Array  # [E] first sorted position of each expert
    unsort: jax.Array  # [A] inverse permutation: slot-major assignment a -> sorted position


def sort_by_expert(expert_idx: jax.Array, num_experts: int) -> SortedAssignments:
    """Sorts the [T, k] assignments by expert, stably in slot-major order.

    Slot-major order (all first choices, then all second choices, ...) means that under a
    capacity limit a token's first choice wins over another token's second choice, and within
    a slot earlier tokens win.
    """
    t, k = expert_idx.shape
    flat = expert_idx.T.reshape(-1)  # assignment a = slot * T + token
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]
    counts = jnp.bincount(flat, length=num_experts)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(t * k) - starts[expert]
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(t * k))
    return SortedAssignments(order % t, order // t, expert, rank, counts, starts, unsort)


def pack(x: jax.Array, s: SortedAssignments, keep: jax.Array, cap: int,
         first_expert=0, num_experts: int | None = None) -> jax.Array:
    """Gathers token rows into per-expert buffers: slot c of expert e holds the sorted
    assignment ``starts[e] + c`` if it exists and is kept, else zeros.

    x: [T, d]; keep: [A]. Returns [num_experts, cap, d] for experts ``first_expert + i``
    (default: all experts).
    """
    num_experts = s.counts.shape[0] if num_experts is None else num_experts
    experts = first_expert + jnp.arange(num_experts)
    pos = s.starts[experts][:, None] + jnp.arange(cap)[None, :]  # [E', C]
    pos = jnp.clip(pos, 0, s.token.shape[0] - 1)
    valid = (jnp.arange(cap)[None, :] < s.counts[experts][:, None]) & keep[pos]
    return jnp.where(valid[..., None], x[s.token[pos]], 0)


def expert_ffn(buf: jax.Array, w: ExpertWeights) -> jax.Array:
    """SwiGLU of each expert on its buffer: [E, C, d] -> [E, C, d] (weights [E, d, f])."""
    buf = tag(buf, MOE_DISPATCHED)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w.w_gate)) * jnp.einsum(
        "ecd,edf->ecf", buf, w.w_up)
    return jnp.einsum("ecf,efd->ecd", h, w.w_down)


def unpack(out: jax.Array, s: SortedAssignments, keep: jax.Array, gates: jax.Array,
           first_expert=0) -> jax.Array:
    """Inverse of ``pack`` followed by the gate-weighted sum over each token's k choices.

    out: [E', C, d] buffers of experts ``first_expert + i``; keep: [A] (False for assignments
    not in these buffers or dropped). Returns [T, d].
    """
    e_local = jnp.clip(s.expert - first_expert, 0, out.shape[0] - 1)
    y_sorted = out[e_local, jnp.minimum(s.rank, out.shape[1] - 1)]  # [A, d]
    return combine(y_sorted, keep, s, gates)


def combine(y_sorted: jax.Array, keep: jax.Array, s: SortedAssignments, gates: jax.Array):
    """Un-permutes expert outputs and sums them over the top-k with their gate weights.

    y_sorted: [A, d] outputs in expert-sorted order; keep: [A] (False for dropped);
    gates: [T, k]. Returns [T, d] in y_sorted's dtype (the weighted sum is in float32).
    """
    t, k = gates.shape
    y_sorted = tag(y_sorted, MOE_COMBINED)
    y = jnp.where(keep[:, None], y_sorted, 0)[s.unsort].reshape(k, t, -1)
    return jnp.einsum("ktd,tk->td", y.astype(jnp.float32), gates).astype(y_sorted.dtype)


def local_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None):
    return None if capacity_factor is None else expert_capacity(tokens, top_k, num_experts,
                                                                capacity_factor)


def experts_padded(x, expert_idx, gates, w: ExpertWeights, capacity_factor: float | None):
    """Experts as a dense einsum over per-expert buffers [E, C, d].

    x: [T, d]; expert_idx, gates: [T, k]; capacity_factor None means dropless (C = T, the most
    any expert can receive since a token's k experts are distinct); otherwise the capacity is
    ``expert_capacity`` of these T tokens. Returns (y [T, d], dropped []).
    """
    t, k = expert_idx.shape
    num_experts = w.w_gate.shape[0]
    capacity = local_capacity(t, k, num_experts, capacity_factor)
    cap = t if capacity is None else capacity
    s = sort_by_expert(expert_idx, num_experts)
    keep = s.rank < cap
    out = expert_ffn(pack(x, s, keep, cap), w)
    dropped = jnp.sum(jnp.maximum(s.counts - cap, 0)).astype(jnp.float32)
    return unpack(out, s, keep, gates), dropped


# (lhs [A, K] rows grouped by expert, rhs [E, K, N], group_sizes [E]) -> [A, N]; rows past
# the groups give zeros. jax.lax.ragged_dot, or a kernel (msmoe_jax/kernels).
GroupedDot = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def grouped_experts(dot: GroupedDot = jax.lax.ragged_dot) -> ExpertsFn:
    """Experts as grouped GEMMs (``dot``) over expert-sorted rows.

    Same contract as ``experts_padded``. Under a capacity limit the overflow rows are still
    multiplied (shapes are static) but masked out of the result and counted as dropped.
    """

    def experts(x, expert_idx, gates, w: ExpertWeights, capacity_factor: float | None):
        t, k = expert_idx.shape
        num_experts = w.w_gate.shape[0]
        capacity = local_capacity(t, k, num_experts, capacity_factor)
        s = sort_by_expert(expert_idx, num_experts)
        out = grouped_swiglu(x[s.token], w, s.counts, dot)  # [A, d]
        keep, dropped = capacity_keep(s, capacity)
        return combine(out, keep, s, gates), dropped

    return experts


def grouped_swiglu(xs: jax.Array, w: ExpertWeights, group_sizes: jax.Array,
                   dot: GroupedDot) -> jax.Array:
    """Each expert's SwiGLU on its rows: xs [R, d] grouped by expert (``group_sizes`` [E]
    rows each, padding rows after them give zeros) -> [R, d]."""
    xs = tag(xs, MOE_DISPATCHED)
    gs = group_sizes.astype(jnp.int32)
    h = jax.nn.silu(dot(xs, w.w_gate, gs)) * dot(xs, w.w_up, gs)
    return dot(h, w.w_down, gs)


def capacity_keep(s: SortedAssignments, capacity: int | None):
    """(keep [A], dropped []) of the sorted assignments under ``capacity`` (None: dropless)."""
    if capacity is None:
        return jnp.ones(s.rank.shape, bool), jnp.zeros((), jnp.float32)
    return s.rank < capacity, jnp.sum(jnp.maximum(s.counts - capacity, 0)).astype(jnp.float32)


experts_ragged = grouped_experts()


def local_experts(impl: str = "auto", gpu: bool | None = None) -> ExpertsFn:
    """The single-device experts function; ``auto`` is ragged_dot on GPU, padded elsewhere
    (``ragged_dot`` is several times slower than a dense einsum of the same FLOPs on CPU).
    ``gpu``: whether the devices are GPUs (default: JAX's default backend)."""
    if impl == "auto":
        gpu = jax.default_backend() == "gpu" if gpu is None else gpu
        impl = "ragged_dot" if gpu else "padded"
    return {"padded": experts_padded, "ragged_dot": experts_ragged}[impl]


class MoE(nnx.Module):
    """Routed SwiGLU experts (stacked weights [E, d, f]) plus optional shared experts."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_d_ff
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.router = normal_param(rngs, (d, e), cfg.init_std, pdt, ("embed", "router"))
        self.w_gate = normal_param(rngs, (e, d, f), cfg.init_std, pdt,
                                   ("experts", "embed", "expert_mlp"))
        self.w_up = normal_param(rngs, (e, d, f), cfg.init_std, pdt,
                                 ("experts", "embed", "expert_mlp"))
        self.w_down = normal_param(rngs, (e, f, d), out_std, pdt,
                                   ("experts", "expert_mlp", "embed"))
        self.shared = (SwiGLU(cfg, cfg.num_shared_experts * cfg.resolved_shared_d_ff, rngs)
                       if cfg.num_shared_experts else None)
        self.shared_gate = (normal_param(rngs, (d, 1), cfg.init_std, pdt, ("embed", None))
                            if cfg.shared_expert_gate else None)
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize_topk
        self.capacity_factor = cfg.capacity_factor if cfg.moe_mode == "capacity" else None

    def __call__(self, x: jax.Array, ops) -> tuple[jax.Array, RouterStats]:
        """x: [b, s, d] -> ([b, s, d], RouterStats over these b*s tokens). ``ops``: LayerOps."""
        b, s, d = x.shape
        xt = x.reshape(b * s, d)
        with jax.named_scope("router"):
            logits = xt.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
            gates, idx, stats = route_topk(logits, self.top_k, self.renormalize)
        c = lambda p: p[...].astype(self.dtype)
        weights = ExpertWeights(c(self.w_gate), c(self.w_up), c(self.w_down))
        with jax.named_scope("experts"):
            y, dropped = ops.experts(xt, idx, gates, weights, self.capacity_factor)
        y = y.reshape(b, s, d)
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                shared = self.shared(x, ops)
                if self.shared_gate is not None:
                    shared = shared * jax.nn.sigmoid(
                        x @ self.shared_gate[...].astype(self.dtype))
            y = y + shared
        return y, stats._replace(dropped=dropped)
