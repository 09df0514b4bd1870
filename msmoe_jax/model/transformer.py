"""Decoder-only MoE transformer (Flax NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model.layers import Attention, RMSNorm, SwiGLU, dtypes, normal_param
from msmoe_jax.model.moe import MoE
from msmoe_jax.model.ops import LayerOps


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


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, pdt,
                                  ("vocab", "embed"))
        self.blocks = nnx.List(
            [Block(cfg, moe=i >= cfg.num_dense_layers, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.lm_head = (None if cfg.tie_embeddings else
                        normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, pdt,
                                     ("embed", "vocab")))

    def __call__(self, tokens: jax.Array, positions: jax.Array, ops: LayerOps = LayerOps()):
        """tokens: [b, s] int; positions: [s] global positions of these tokens.

        Returns (logits [b, s, vocab] float32, RouterStats stacked over MoE layers with a
        leading [num_moe_layers] axis, or None when there are no MoE layers).
        """
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        all_stats = []
        run = lambda block, x: block(x, positions, ops)
        if ops.remat_policy is not None:
            run = nnx.remat(run, policy=ops.remat_policy)
        for block in self.blocks:
            x, stats = run(block, x)
            if stats is not None:
                all_stats.append(stats)
        x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        with jax.named_scope("lm_head"):
            logits = jnp.einsum("bsd,dv->bsv", x, head.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        stats = jax.tree.map(lambda *a: jnp.stack(a), *all_stats) if all_stats else None
        return logits, stats
