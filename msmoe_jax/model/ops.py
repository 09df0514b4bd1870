"""The swappable parts of a layer: how attention and the experts are computed.

The model is written for local arrays and calls these functions for the two pieces whose
parallel versions differ from the math (sequence-parallel attention moves heads and sequence
between devices; expert parallelism moves tokens to the devices that hold their experts).
``reference_ops`` is the plain single-device version and the numerical reference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from msmoe_jax.model.layers import causal_attention
from msmoe_jax.model.moe import ExpertsFn, local_experts


class LayerOps(NamedTuple):
    # (q [b,s,h,d], k [b,s,kv,d], v [b,s,kv,d]) -> [b,s,h,d], causal over the full sequence.
    attention: Callable = causal_attention
    # (x [T,d], expert_idx [T,k], gates [T,k], ExpertWeights, capacity) -> (y [T,d], dropped []).
    experts: ExpertsFn = local_experts("padded")


def reference_ops(expert_compute: str = "auto") -> LayerOps:
    return LayerOps(attention=causal_attention, experts=local_experts(expert_compute))
