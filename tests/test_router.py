"""Router gating and its auxiliary losses against their formulas on hand-checkable inputs."""

import jax.numpy as jnp
import numpy as np

from msmoe_jax.model.moe import load_balancing_loss, route_topk, router_z_loss


def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts, top-1. Probabilities chosen so the softmax of log(p) is p.
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    gates, idx, stats = route_topk(jnp.log(p), k=1, renormalize=False)
    np.testing.assert_array_equal(idx[:, 0], [0, 0, 0, 1])
    np.testing.assert_allclose(gates[:, 0], [0.9, 0.8, 0.6, 0.7], rtol=1e-6)
    # f = [3/4, 1/4]; P = mean probs = [0.65, 0.35]; aux = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    aux = load_balancing_loss(stats.expert_counts, stats.prob_sum, stats.tokens, top_k=1)
    np.testing.assert_allclose(aux, 1.15, rtol=1e-6)


def test_load_balancing_loss_uniform_is_one_and_topk_normalised():
    logits = jnp.zeros((8, 4))  # uniform probabilities; ties broken by top_k
    _, idx, stats = route_topk(logits, k=2, renormalize=True)
    assert int(stats.expert_counts.sum()) == 16
    # Perfectly balanced counts: 4 per expert -> aux = 4 * sum(0.25 * 0.25) = 0.25 * ...
    balanced = load_balancing_loss(jnp.full((4,), 4.0), stats.prob_sum, stats.tokens, top_k=2)
    np.testing.assert_allclose(balanced, 1.0, rtol=1e-6)


def test_router_z_loss_by_hand():
    # logits = log(p) + c_t has logsumexp exactly c_t.
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    c = np.array([1.5, -2.0])
    _, _, stats = route_topk(jnp.log(p) + c[:, None], k=2, renormalize=True)
    np.testing.assert_allclose(router_z_loss(stats.z_sum, stats.tokens),
                               (1.5 ** 2 + 2.0 ** 2) / 2, rtol=1e-5)


def test_topk_renormalisation():
    p = np.array([[0.5, 0.3, 0.2]])
    g_raw, idx, _ = route_topk(jnp.log(p), k=2, renormalize=False)
    g_norm, _, _ = route_topk(jnp.log(p), k=2, renormalize=True)
    np.testing.assert_array_equal(idx, [[0, 1]])
    np.testing.assert_allclose(g_raw, [[0.5, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(g_norm, [[0.625, 0.375]], rtol=1e-6)
