"""The compiled training step: gradients (the parallel strategy), the optimizer update, and a
guard that leaves the state untouched when the loss or the gradients are not finite."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from msmoe_jax.config import Config
from msmoe_jax.optim import lr_schedule
from msmoe_jax.parallel.mesh import REPLICATED, Layout, sharding
from msmoe_jax.parallel.strategy import make_grad_fn, zero_specs


def make_train_step(cfg: Config, graphdef, optimizer, mesh: Mesh, layout: Layout, specs,
                    on_trace: Callable | None = None):
    """A jitted ``step(state, tokens) -> (state, metrics)``; ``on_trace`` runs at each trace.
    The new state keeps the layout of ``specs``.

    ``metrics["finite"]`` says whether the loss and the gradient norm were finite. When they
    were not, the step is not applied: the state comes back unchanged (its ``step`` too). The
    select fuses into the optimizer's elementwise update, so the guard costs no extra pass."""
    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout)
    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)

    def step(state, tokens):
        if on_trace is not None:
            on_trace()
        metrics, grads = grad_fn(state["params"], tokens)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        if cfg.parallel.zero:  # each device computes the update of its moments' part only
            updates = jax.lax.with_sharding_constraint(
                updates, jax.tree.map(lambda s: sharding(mesh, s),
                                      zero_specs(updates, specs["params"], layout)))
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, dict(metrics, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite)

    state_shardings = jax.tree.map(lambda spec: sharding(mesh, spec), specs)
    return jax.jit(step, donate_argnums=0,
                   out_shardings=(state_shardings, sharding(mesh, REPLICATED)))
