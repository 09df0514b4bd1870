"""The train state: {step, params, opt_state} laid out on the mesh, fresh, abstract (a restore
target) or from given parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from msmoe_jax.config import Config
from msmoe_jax.model import Transformer
from msmoe_jax.optim import make_optimizer
from msmoe_jax.parallel.mesh import Layout, sharding
from msmoe_jax.parallel.strategy import state_specs


def init_state(cfg: Config, mesh: Mesh, layout: Layout, abstract: bool = False):
    """(graphdef, optimizer, state, specs): state = {step, params, opt_state} laid out on the
    mesh as ``specs`` (PartitionSpecs of the same structure) say.

    ``abstract=True`` gives ShapeDtypeStructs with the mesh's shardings instead of arrays: the
    target for restoring a checkpoint without first materialising a fresh model.
    """
    create = lambda: nnx.split(Transformer(cfg.model, nnx.Rngs(cfg.seed)))
    graphdef, _ = nnx.eval_shape(create)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)

    def init():
        params = create()[1]
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params)}

    shapes = jax.eval_shape(init)
    specs = state_specs(shapes, optimizer, layout, cfg.parallel.zero)
    shardings = jax.tree.map(lambda spec: sharding(mesh, spec), specs)
    if abstract:
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             shapes, shardings)
    else:
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, optimizer, state, specs


def state_from_params(params, optimizer: optax.GradientTransformation, mesh: Mesh, specs):
    """The train state at step 0 for given parameters: a fresh optimizer state beside them."""
    def init(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params)}
    shardings = jax.tree.map(lambda spec: sharding(mesh, spec), specs)
    return jax.jit(init, out_shardings=shardings)(params)
