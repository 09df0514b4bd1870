"""Data parallelism (shard_map over 8 devices) against the single-device reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from msmoe_jax.model import reference_ops
from msmoe_jax.objective import loss_terms
from msmoe_jax.parallel.mesh import BATCH, make_mesh, sharding
from msmoe_jax.parallel.strategy import make_loss_fn
from msmoe_jax.trainer import init_state


@pytest.mark.parametrize("model", [
    {"dtype": "float32"},
    {"dtype": "float32", "num_dense_layers": 1, "num_shared_experts": 1, "top_k": 1,
     "tie_embeddings": True, "renormalize_topk": False, "expert_compute": "ragged_dot"},
])
def test_dp_loss_and_grads_match_single_device(model):
    cfg = tiny_config(model=model)
    mesh = make_mesh(cfg.parallel)
    graphdef, _, state = init_state(cfg, mesh)
    params = state["params"]
    tokens = jax.random.randint(jax.random.key(0), (cfg.train.batch_size, cfg.train.seq_len + 1),
                                0, cfg.model.vocab_size)

    loss_fn = make_loss_fn(cfg, graphdef, mesh)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, jax.device_put(tokens, sharding(mesh, BATCH)))

    host_params = jax.device_get(params)
    ref_fn = lambda p, t: loss_terms(graphdef, p, t, jnp.arange(cfg.train.seq_len), cfg.model,
                                     reference_ops(cfg.model.expert_compute))
    (ref_loss, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(ref_fn, has_aux=True))(
        host_params, tokens)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(metrics["aux_loss"]) > 0.5  # routed layers exist and contribute
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for g, r in zip(flat, ref_flat):
        assert float(jnp.max(jnp.abs(r))) > 0
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6)
