"""The MoE block against a loop-over-experts reference: outputs, gradients, dropped counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msmoe_jax.config import ModelConfig
from msmoe_jax.model import LayerOps
from msmoe_jax.model.moe import MoE, expert_capacity, experts_padded, experts_ragged

IMPLS = {"padded": experts_padded, "ragged_dot": experts_ragged}


def reference_keep(idx: np.ndarray, num_experts: int, capacity: int | None) -> np.ndarray:
    """keep[t, j]: whether token t's j-th choice gets a slot. First choices of all tokens are
    served before second choices; within a choice, earlier tokens first."""
    t, k = idx.shape
    keep = np.ones((t, k), bool)
    if capacity is None:
        return keep
    used = np.zeros(num_experts, int)
    for j in range(k):
        for i in range(t):
            e = idx[i, j]
            keep[i, j] = used[e] < capacity
            used[e] += 1
    return keep


def reference_moe(p, x, top_k, renormalize, idx, keep):
    """Loop over experts; ``idx``/``keep`` fixed (they are piecewise constant in the inputs)."""
    probs = jax.nn.softmax(x @ p["router"], axis=-1)
    gates = jnp.take_along_axis(probs, idx, axis=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdims=True)
    y = jnp.zeros_like(x)
    for e in range(p["w_gate"].shape[0]):
        ffn = (jax.nn.silu(x @ p["w_gate"][e]) * (x @ p["w_up"][e])) @ p["w_down"][e]
        weight = jnp.sum(jnp.where((idx == e) & keep, gates, 0.0), axis=-1)  # [T]
        y = y + weight[:, None] * ffn
    if "shared" in p:
        s = p["shared"]
        y = y + (jax.nn.silu(x @ s["w_gate"]) * (x @ s["w_up"])) @ s["w_down"]
    return y


def moe_params(module: MoE) -> dict:
    p = {k: getattr(module, k)[...] for k in ("router", "w_gate", "w_up", "w_down")}
    if module.shared is not None:
        p["shared"] = {k: getattr(module.shared, k)[...] for k in ("w_gate", "w_up", "w_down")}
    return p


@pytest.mark.parametrize("impl", [pytest.param("padded", marks=pytest.mark.slow), "ragged_dot"])
@pytest.mark.parametrize("mode,shared,renorm", [
    ("dropless", 0, True), ("dropless", 1, False), ("capacity", 0, True), ("capacity", 2, True)])
def test_moe_block_matches_loop_reference(impl, mode, shared, renorm):
    cfg = ModelConfig(d_model=16, moe_d_ff=24, num_experts=6, top_k=3, num_shared_experts=shared,
                      shared_d_ff=8, renormalize_topk=renorm, moe_mode=mode,
                      capacity_factor=0.6, dtype="float32", init_std=0.3)
    module = MoE(cfg, nnx.Rngs(1))
    b, s = 2, 20
    x = jax.random.normal(jax.random.key(2), (b, s, cfg.d_model))
    cot = jax.random.normal(jax.random.key(3), (b, s, cfg.d_model))
    graphdef, state = nnx.split(module)

    def ours(state, x):
        y, stats = nnx.merge(graphdef, state)(x, LayerOps(experts=IMPLS[impl]))
        return jnp.sum(y * cot), (y, stats)

    (_, (y, stats)), (g_state, g_x) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
        state, x)

    p = moe_params(module)
    xt = x.reshape(b * s, -1)
    idx = np.asarray(jax.lax.top_k(jax.nn.softmax(xt @ p["router"]), cfg.top_k)[1])
    cap = (expert_capacity(b * s, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
           if mode == "capacity" else None)
    keep = reference_keep(idx, cfg.num_experts, cap)
    ref = lambda p, xt: jnp.sum(reference_moe(p, xt, cfg.top_k, renorm, idx, keep)
                                * cot.reshape(b * s, -1))
    y_ref = reference_moe(p, xt, cfg.top_k, renorm, idx, keep)
    g_ref_p, g_ref_x = jax.grad(ref, argnums=(0, 1))(p, xt)

    np.testing.assert_allclose(y.reshape(b * s, -1), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x.reshape(b * s, -1), g_ref_x, rtol=1e-4, atol=1e-5)
    got = moe_params(nnx.merge(graphdef, g_state))
    for name in ("router", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(got[name], g_ref_p[name], rtol=1e-4, atol=1e-5, err_msg=name)
    if shared:
        for name in ("w_gate", "w_up", "w_down"):
            np.testing.assert_allclose(got["shared"][name], g_ref_p["shared"][name],
                                       rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(stats.dropped) == float((~keep).sum())
    if mode == "capacity":
        assert (~keep).sum() > 0, "the test should exercise drops"
    np.testing.assert_array_equal(stats.expert_counts, np.bincount(idx.ravel(), minlength=6))


@pytest.mark.slow
def test_bf16_compute_close_to_fp32():
    """bf16 compute with fp32 params stays within bf16 rounding of the fp32 block."""
    base = dict(d_model=32, moe_d_ff=32, num_experts=4, top_k=2, init_std=0.2)
    m32 = MoE(ModelConfig(**base, dtype="float32"), nnx.Rngs(0))
    m16 = MoE(ModelConfig(**base, dtype="bfloat16"), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    y32, _ = m32(x, LayerOps(experts=experts_padded))
    y16, _ = m16(x.astype(jnp.bfloat16), LayerOps(experts=experts_padded))
    assert y16.dtype == jnp.bfloat16 and m16.w_gate[...].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.03 * scale)
