"""Dense building blocks: RMSNorm, rotary embeddings, grouped-query attention and SwiGLU.

Plain math on local arrays. Parameters are stored in ``param_dtype`` and cast to the compute
``dtype`` where they are used; norms and softmax statistics are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model.remat import ATTN_CONTEXT, ATTN_QKV, tag


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype,
                 axes: tuple[str | None, ...]) -> nnx.Param:
    """A normal(0, std) parameter tagged with its logical axes (which the parallel layout maps
    to mesh axes; see ``parallel/mesh.py``)."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def embed(table: jax.Array, tokens: jax.Array, dtype=None) -> jax.Array:
    """table: [V, d]; tokens: [b, s] int -> [b, s, d] (in ``dtype``, default the table's)."""
    return jnp.take(table, tokens, axis=0).astype(dtype or table.dtype)


def head_nll(x: jax.Array, w: jax.Array, targets: jax.Array, dtype) -> jax.Array:
    """x: [b, s, d]; w: [d, V] (the LM head); targets: [b, s] int -> -log p(targets) [b, s]
    float32, from float32 logits."""
    logits = jnp.einsum("bsd,dv->bsv", x, w.astype(dtype), preferred_element_type=jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype)."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Llama/Mixtral).

    x: [b, s, heads, head_dim]; positions: [s] global token positions (so a sequence shard
    passes its own offsets). Returns the same shape and dtype.
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [s, half]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str = "xla") -> jax.Array:
    """Reference attention core on full sequences.

    q: [b, s, heads, d]; k, v: [b, s, kv_heads, d] with kv_heads dividing heads (GQA).
    Returns [b, s, heads, d]. A sequence-parallel implementation replaces this function.

    ``implementation``: "xla" (any backend; materialises the [s, s] scores) or "cudnn"
    (cuDNN flash attention, GPU only: bf16/fp16, head dim a multiple of 8 up to 128, or 256
    on Hopper; takes the fewer KV heads as they are, and skips the masked half).
    """
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"kernel.attention must be 'xla' or 'cudnn', got {implementation!r}")
    q, k, v = (tag(a, ATTN_QKV) for a in (q, k, v))
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE. The attention core is passed in at call time."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.wq = normal_param(rngs, (d, h, hd), cfg.init_std, pdt, ("embed", "heads", "head_dim"))
        self.wk = normal_param(rngs, (d, kv, hd), cfg.init_std, pdt,
                               ("embed", "kv_heads", "head_dim"))
        self.wv = normal_param(rngs, (d, kv, hd), cfg.init_std, pdt,
                               ("embed", "kv_heads", "head_dim"))
        self.wo = normal_param(rngs, (h, hd, d), out_std, pdt, ("heads", "head_dim", "embed"))
        self.rope_theta = cfg.rope_theta
        zeros = lambda n, axis: nnx.Param(jnp.zeros((n, hd), pdt), axes=(axis, "head_dim"))
        self.biases = (nnx.List([zeros(h, "heads"), zeros(kv, "kv_heads"), zeros(kv, "kv_heads")])
                       if cfg.attention_bias else None)
        # "head": one scale per head dimension, shared by the heads; "full": one per channel
        # of all heads together (the norm then spans every head of a token).
        width = {"head": (hd, hd), "full": (h * hd, kv * hd)}.get(cfg.qk_norm)
        self.qk_norm = (nnx.List([RMSNorm(n, cfg.norm_eps, pdt) for n in width])
                        if width else None)

    def __call__(self, x: jax.Array, positions: jax.Array, ops):
        """x: [b, s, d]; positions: [s] -> [b, s, d]. ``ops``: LayerOps."""
        c = lambda p: p[...].astype(self.dtype)

        def project(x):
            qkv = [jnp.einsum("bsd,dhk->bshk", x, c(w)) for w in (self.wq, self.wk, self.wv)]
            if self.biases is not None:
                qkv = [a + c(b) for a, b in zip(qkv, self.biases)]
            if self.qk_norm is not None:
                for i, norm in enumerate(self.qk_norm):
                    a = qkv[i]
                    full = norm.scale.shape[0] != a.shape[-1]  # over all heads of a token
                    a = a.reshape(*a.shape[:2], -1) if full else a
                    qkv[i] = norm(a).reshape(qkv[i].shape)
            return tuple(qkv)

        (q, k, v), positions = ops.attention_in(x, positions, project)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        o = tag(ops.attention(q, k, v), ATTN_CONTEXT)
        return ops.attention_out(lambda o: jnp.einsum("bshk,hkd->bsd", o, c(self.wo)), o)


class SwiGLU(nnx.Module):
    """Dense SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, cfg: ModelConfig, d_ff: int, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.w_gate = normal_param(rngs, (cfg.d_model, d_ff), cfg.init_std, pdt, ("embed", "mlp"))
        self.w_up = normal_param(rngs, (cfg.d_model, d_ff), cfg.init_std, pdt, ("embed", "mlp"))
        self.w_down = normal_param(rngs, (d_ff, cfg.d_model), out_std, pdt, ("mlp", "embed"))

    def up(self, x: jax.Array) -> jax.Array:
        """[..., d] -> [..., d_ff]: the gated activation (row-wise)."""
        c = lambda p: p[...].astype(self.dtype)
        return jax.nn.silu(x @ c(self.w_gate)) * (x @ c(self.w_up))

    def down(self, h: jax.Array) -> jax.Array:
        """[..., d_ff] -> [..., d]."""
        return h @ self.w_down[...].astype(self.dtype)

    def __call__(self, x: jax.Array, ops) -> jax.Array:
        """x: [b, s, d] -> [b, s, d]; ``ops`` (LayerOps) wraps the two halves (tensor
        parallelism gathers before ``up`` and reduce-scatters after ``down``)."""
        return ops.ffn_out(self.down, ops.ffn_in(self.up, x))
