"""Activation rematerialisation: which activations a layer keeps for its backward.

The layers tag tensors with ``checkpoint_name``; a policy decides which tagged tensors a block
stores, and the backward recomputes the rest from the block's input:

* ``none``: no rematerialisation (every residual autodiff wants is stored).
* ``selective`` (MegaScale-MoE's choice): keep what is expensive to recompute or needed across
  a collective: the attention core's inputs (after the Ulysses all_to_all), its context (the
  output projection's input, after the all_to_all back), the rows the experts received
  (after dispatch) and the rows they returned (after combine). Norms, RoPE, router, SwiGLU
  activations, the FFNs' first GEMMs and all_gathers are recomputed: cheap, or hidden behind
  the gradient's own communication.
* ``full``: keep only each block's input and recompute the whole block.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

ATTN_QKV = "attn_qkv"  # q, k, v as the attention core sees them
ATTN_CONTEXT = "attn_context"  # attention output before the output projection
MOE_DISPATCHED = "moe_dispatched"  # token rows at their experts (input of the expert GEMMs)
MOE_COMBINED = "moe_combined"  # expert outputs back at their tokens' devices, before gating
SELECTIVE = (ATTN_QKV, ATTN_CONTEXT, MOE_DISPATCHED, MOE_COMBINED)

REMAT_POLICIES = ("none", "selective", "full")


def tag(x: jax.Array, name: str) -> jax.Array:
    """Names an activation for the remat policies (the identity otherwise)."""
    return checkpoint_name(x, name)


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for ``train.remat``; None means no rematerialisation."""
    if name == "none":
        return None
    if name == "selective":
        return jax.checkpoint_policies.save_only_these_names(*SELECTIVE)
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"train.remat: must be one of {', '.join(REMAT_POLICIES)}, got {name!r}")
