"""The swappable parts of a layer: how attention and the feed-forwards meet the devices.

The model is written for local arrays and calls these functions where the parallel versions
differ from the math: around the attention block (tensor parallelism gathers the sequence and
reduce-scatters the output), in the attention core (Ulysses swaps sequence shards for head
shards), around dense FFNs and shared experts (tensor parallelism), and in the routed experts
(expert parallelism moves tokens to the devices that hold their experts).
``reference_ops`` is the plain single-device version and the numerical reference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from msmoe_jax.model.layers import causal_attention
from msmoe_jax.model.moe import ExpertsFn, local_experts


def identity(x):
    return x


def pass_through(x, positions):
    return x, positions


class LayerOps(NamedTuple):
    # (x [b,s,d], positions [s]) -> the attention block's input and its positions.
    attention_in: Callable = pass_through
    # (q [b,s,h,hd], k [b,s,kv,hd], v [b,s,kv,hd]) -> [b,s,h,hd], causal over the sequence.
    attention: Callable = causal_attention
    # [b,s,d] output projection -> [b,s,d] block output.
    attention_out: Callable = identity
    # [b,s,d] -> [b,s,d] around dense FFNs and shared experts.
    ffn_in: Callable = identity
    ffn_out: Callable = identity
    # (x [T,d], expert_idx [T,k], gates [T,k], ExpertWeights, capacity_factor)
    #   -> (y [T,d], dropped []).
    experts: ExpertsFn = local_experts("padded")
    # jax.checkpoint policy applied to each block (model/remat.py), None: no rematerialisation.
    remat_policy: Callable | None = None


def reference_ops(expert_compute: str = "auto") -> LayerOps:
    return LayerOps(experts=local_experts(expert_compute))
