"""Decoder-only MoE transformer (Flax NNX).

The blocks of each kind (the leading dense-FFN blocks, then the MoE blocks) are one stacked
``Block`` whose parameters carry a leading ``layers`` axis, and run under ``jax.lax.scan``:
the compiled program holds one block of each kind, so compile time does not grow with depth.
``LayerOps.scan_layers=False`` runs the same parameters in a Python loop (one copy per layer
in the program), for comparing schedules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model.layers import Attention, RMSNorm, SwiGLU, dtypes, normal_param
from msmoe_jax.model.moe import MoE
from msmoe_jax.model.ops import LayerOps

LAYERS = "layers"  # the logical axis of stacked blocks (never sharded)
STACKED = ("dense_blocks", "moe_blocks")  # the attributes holding stacked blocks


def is_stacked(path) -> bool:
    """Whether a parameter's tree path (``jax.tree_util``) is inside the stacked blocks."""
    return bool(path) and getattr(path[0], "key", None) in STACKED


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense SwiGLU or an MoE feed-forward."""

    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
        _, pdt = dtypes(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.ffn = MoE(cfg, rngs) if moe else SwiGLU(cfg, cfg.d_ff, rngs)
        self.is_moe = moe

    def __call__(self, x, positions, ops: LayerOps):
        # Named scopes only label the compiled program (steptime/report.py reads them).
        with jax.named_scope("attention"):
            x = x + self.attn(self.attn_norm(x), positions, ops)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h, ops)
            return x + y, stats
        with jax.named_scope("ffn"):
            return x + self.ffn(h, ops), None


def stacked_blocks(cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> Block | None:
    """``count`` blocks as one ``Block`` whose parameters have a leading ``layers`` axis, each
    layer initialised from its own key; None when ``count`` is 0. The blocks are built under
    ``jax.vmap``, so initialisation is traced once whatever the depth."""
    if not count:
        return None
    keys = jax.random.split(rngs.params(), count)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, moe, nnx.Rngs(params=0))))
    states = jax.vmap(lambda k: nnx.state(Block(cfg, moe, nnx.Rngs(params=k))))(keys)
    is_var = lambda x: isinstance(x, nnx.Variable)
    stacked = jax.tree.map(lambda v: v.replace(axes=(LAYERS, *v.axes)), states, is_leaf=is_var)
    return nnx.merge(graphdef, stacked)


def run_blocks(name: str, blocks: Block | None, x, positions, ops: LayerOps):
    """x through the stacked ``blocks`` (the model's attribute ``name``) in order -> (x, router
    stats stacked over the blocks, or None for dense blocks). Each layer's parameters pass
    through ``ops.gather`` (ZeRO-3 all-gathers them there) inside the remat boundary."""
    if blocks is None:
        return x, None
    graphdef, state = nnx.split(blocks)

    def one(x, layer):
        return nnx.merge(graphdef, ops.gather(f"['{name}']", layer))(x, positions, ops)

    if ops.remat_policy is not None:
        # Inside scan the loop already keeps the recompute apart: no CSE barriers needed.
        one = jax.checkpoint(one, policy=ops.remat_policy, prevent_cse=not ops.scan_layers)
    if ops.scan_layers:
        return ops.scan_blocks(name, one, x, state)
    count = jax.tree.leaves(state)[0].shape[0]
    outs = []
    for i in range(count):
        x, stats = one(x, jax.tree.map(lambda a, i=i: a[i], state))
        outs.append(stats)
    stats = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, stats


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, pdt,
                                  ("vocab", "embed"))
        dense = cfg.num_dense_layers
        self.dense_blocks = stacked_blocks(cfg, False, dense, rngs)
        self.moe_blocks = stacked_blocks(cfg, True, cfg.num_layers - dense, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.lm_head = (None if cfg.tie_embeddings else
                        normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, pdt,
                                     ("embed", "vocab")))

    def hidden(self, tokens: jax.Array, positions: jax.Array, ops: LayerOps):
        """tokens [b, s] -> (final-norm hidden states [b, s, d], router stats as ``__call__``)."""
        x = ops.embed(self.embed[...], tokens, self.dtype)
        x, _ = run_blocks("dense_blocks", self.dense_blocks, x, positions, ops)
        x, stats = run_blocks("moe_blocks", self.moe_blocks, x, positions, ops)
        return self.final_norm(x), stats

    def head(self) -> jax.Array:
        """The LM head [d, V]: the embedding's transpose when tied."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 ops: LayerOps = LayerOps()):
        """tokens: [b, s] int; positions: [s] global positions of these tokens. With the
        single-device ops (a sharded vocabulary's head holds a slice of the logits only: the
        parallel loss goes through ``nll``).

        Returns (logits [b, s, V] float32, router stats: a RouterStats whose fields have a
        leading [num_moe_layers] axis, or None when there are no MoE layers).
        """
        x, stats = self.hidden(tokens, positions, ops)
        with jax.named_scope("lm_head"):
            logits = jnp.einsum("bsd,dv->bsv", x, self.head().astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return logits, stats

    def nll(self, tokens: jax.Array, targets: jax.Array, positions: jax.Array, ops: LayerOps):
        """-log p(targets) [b, s] float32 and the router stats, through ``ops.head_nll`` (which
        never holds [tokens, V] logits when the vocabulary is split over devices)."""
        x, stats = self.hidden(tokens, positions, ops)
        with jax.named_scope("lm_head"):
            return ops.head_nll(x, self.head(), targets, self.dtype), stats
