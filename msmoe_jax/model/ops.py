"""The swappable parts of a layer: how attention and the feed-forwards meet the devices.

The model is written for local arrays and calls these functions where the parallel versions
differ from the math: around the attention block (tensor parallelism gathers the sequence and
reduce-scatters the output), in the attention core (Ulysses swaps sequence shards for head
shards), around dense FFNs and shared experts (tensor parallelism), and in the routed experts
(expert parallelism moves tokens to the devices that hold their experts).
``reference_ops`` is the plain single-device version and the numerical reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from msmoe_jax.model.layers import causal_attention, embed, head_nll
from msmoe_jax.model.moe import ExpertsFn, local_experts


def identity(x):
    return x


def apply(fn, x):
    return fn(x)


def no_gather(name, params):
    return params


def scan_blocks(name, body, x, layers):
    return jax.lax.scan(body, x, layers)


def project_in(x, positions, project):
    return project(x), positions


class LayerOps(NamedTuple):
    # (x [b,s,d], positions [s], project) -> (project(the attention block's input), its
    # positions). ``project`` is row-wise along s (the Q/K/V projections).
    attention_in: Callable = project_in
    # (q [b,s,h,hd], k [b,s,kv,hd], v [b,s,kv,hd]) -> [b,s,h,hd], causal over the sequence.
    attention: Callable = causal_attention
    # (project, o [b,s,h,hd]) -> [b,s,d] block output; ``project`` is the output projection.
    attention_out: Callable = apply
    # (fn, x) around dense FFNs and shared experts: ffn_in(up, x [b,s,d]) -> hidden, then
    # ffn_out(down, hidden) -> [b,s,d]; up and down are row-wise along s.
    ffn_in: Callable = apply
    ffn_out: Callable = apply
    # (x [T,d], expert_idx [T,k], gates [T,k], ExpertWeights, capacity_factor)
    #   -> (y [T,d], dropped []).
    experts: ExpertsFn = local_experts("padded")
    # jax.checkpoint policy applied to each block (model/remat.py), None: no rematerialisation.
    remat_policy: Callable | None = None
    # (table [V, d], tokens [b, s], dtype) -> [b, s, d]: the token embedding.
    embed: Callable = embed
    # (x [b, s, d], head [d, V], targets [b, s], dtype) -> -log p(targets) [b, s] float32: the
    # LM head and the cross-entropy together (split over the vocabulary when it is sharded).
    head_nll: Callable = head_nll
    # (name, a layer's parameters) -> the parameters it computes with; ZeRO-3 all-gathers
    # them here, one layer at a time (``name``: the stacked blocks' path, e.g. "['moe_blocks']").
    gather: Callable = no_gather
    # Run the stacked blocks under jax.lax.scan (one block of each kind in the program) or in
    # a Python loop (one copy per layer).
    scan_layers: bool = True
    # (name, body, x, stacked layers) -> jax.lax.scan(body, x, layers) when scanned; gradient
    # accumulation swaps in a scan whose backward accumulates per layer (parallel/layer_grads).
    scan_blocks: Callable = scan_blocks


def reference_ops(expert_compute: str = "auto") -> LayerOps:
    """The single-device reference; its layers run in a Python loop, so the parallel paths
    (scanned by default) are checked against the unrolled model too."""
    return LayerOps(experts=local_experts(expert_compute), scan_layers=False)
