"""Training objective: next-token cross-entropy plus the router's auxiliary losses.

``loss_terms`` works on whatever slice of the batch it is given and takes a ``reduce`` function
that sums token-level statistics over the whole batch: the identity on one device, a ``psum``
over the batch axes inside ``shard_map``. Means are taken only after that sum, so every layout
computes the single-device loss exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model import LayerOps, load_balancing_loss, reference_ops, router_z_loss
from msmoe_jax.model.ops import identity


def loss_terms(graphdef: nnx.GraphDef, params, inputs: jax.Array, targets: jax.Array,
               positions: jax.Array, cfg: ModelConfig, ops: LayerOps,
               reduce: Callable = identity):
    """inputs, targets: [b, s] token ids (targets are the next tokens); positions: [s] global
    positions of these tokens.

    Returns (loss [], metrics dict of scalars), identical on every device after ``reduce``.
    """
    model = nnx.merge(graphdef, params)
    nll, stats = model.nll(inputs, targets, positions, ops)
    sums = {"nll": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32)}
    if stats is not None:
        sums["router"] = stats
    sums = reduce(sums)
    ce = sums["nll"] / sums["tokens"]
    metrics = {"ce": ce}
    loss = ce
    if stats is not None:
        r = sums["router"]
        aux = jnp.mean(load_balancing_loss(r.expert_counts, r.prob_sum, r.tokens, cfg.top_k))
        z = jnp.mean(router_z_loss(r.z_sum, r.tokens))
        loss = loss + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        metrics.update(
            aux_loss=aux, z_loss=z,
            dropped_frac=jnp.sum(r.dropped) / jnp.sum(r.tokens * cfg.top_k),
            # Per MoE layer: assignments each expert received [L, E], and those dropped [L].
            expert_tokens=r.expert_counts, dropped_tokens=r.dropped,
        )
    metrics["loss"] = loss
    return loss, metrics


# Metrics that count over the step's tokens: summed over micro-batches, not averaged.
COUNTS = ("expert_tokens", "dropped_tokens")


def reference_loss_fn(cfg: ModelConfig, graphdef: nnx.GraphDef, ops: LayerOps | None = None):
    """The single-device objective: ``fn(params, tokens [b, s + 1]) -> (loss, metrics)``."""
    ops = reference_ops(cfg.expert_compute) if ops is None else ops

    def fn(params, tokens):
        positions = jnp.arange(tokens.shape[1] - 1)
        return loss_terms(graphdef, params, tokens[:, :-1], tokens[:, 1:], positions, cfg, ops)

    return fn
