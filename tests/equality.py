"""The reference-equality harness the layout tests share: a layout's loss, metrics and every
parameter's gradient against the plain single-device model's, for the same random weights and
tokens (fp32), on 8 simulated devices."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from msmoe_jax.model import reference_ops
from msmoe_jax.objective import COUNTS, reference_loss_fn
from msmoe_jax.parallel.mesh import Layout, make_mesh, sharding
from msmoe_jax.parallel.strategy import make_grad_fn
from msmoe_jax.state import init_state
from support import tiny_config

# A dense layer and a shared expert, so tensor parallelism of FFNs is covered too.
MODEL = {"dtype": "float32", "num_layers": 2, "num_dense_layers": 1, "num_heads": 8,
         "num_kv_heads": 2, "num_experts": 8, "num_shared_experts": 1, "init_std": 0.1}

# The padded exchange's per-(source, expert) blocks of ~T*k/E = 8 rows, and the all_gather
# dispatch's per-expert buffers when chunked, overflow the default buffer_factor (2) on these
# tiny random batches; 4 keeps them dropless (dropped_frac is compared with the reference's
# 0). The ragged layouts keep the default; test_exchange_buffers.py covers overflow.
A2A = {"dispatch": "all_to_all", "all_to_all": "padded", "buffer_factor": 4.0}
AG = {"dispatch": "all_gather", "buffer_factor": 4.0}
RAGGED = {"dispatch": "all_to_all", "all_to_all": "ragged"}  # emulated exchange on CPU
CAPACITY = {"moe_mode": "capacity", "capacity_factor": 0.6}
# The single-device references, by model, batch and micro-batch split: layouts of one model
# share them (each costs a compile). Capacity runs are not cached (their groups differ).
_REFERENCES: dict = {}


def check_against_reference(parallel: dict, model: dict, train: dict | None = None,
                            kernel: dict | None = None):
    """Loss, metrics and every parameter's gradient of the layout equal the single-device
    reference's (fp32). Returns the compiled parallel step."""
    run = run_with_reference(parallel, model, train, kernel)
    if run.cfg.model.moe_mode == "dropless":  # else the comparison below fails obscurely
        assert float(run.metrics["dropped_frac"]) == 0, "exchange buffers overflowed"
    np.testing.assert_allclose(run.metrics["loss"], run.ref_metrics["loss"], rtol=1e-5)
    for k in run.ref_metrics:
        np.testing.assert_allclose(run.metrics[k], run.ref_metrics[k], rtol=1e-5, atol=1e-7,
                                   err_msg=k)
    if run.cfg.model.moe_mode == "capacity":
        assert float(run.metrics["dropped_frac"]) > 0.05  # the capacity limit is exercised
    for path, g, r in run.grad_pairs():
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=path)
    # Parameters really are laid out as the layout says (sharded where it shards them).
    w = run.params["moe_blocks"]["ffn"]["w_gate"][...]  # [layers, E, d, f]
    assert w.addressable_shards[0].data.shape[1] == 8 // run.layout.sizes["expert"]
    table = run.params["embed"][...]
    group = run.layout.sizes["sequence"] * run.layout.sizes["tensor"]
    split = group if run.layout.vocab_sharded else 1
    assert table.addressable_shards[0].data.shape[0] == table.shape[0] // split
    return run.compiled


class Run(NamedTuple):
    cfg: object
    layout: Layout
    params: object
    compiled: object
    metrics: dict
    grads: object
    ref_metrics: dict
    ref_grads: object

    def grad_pairs(self):
        """(path, parallel gradient, reference gradient) for every parameter."""
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(self.ref_grads)]
        for path, g, r in zip(paths, jax.tree.leaves(self.grads),
                              jax.tree.leaves(self.ref_grads)):
            assert g.shape == r.shape, path
            assert float(jnp.max(jnp.abs(r))) > 0, path
            yield path, np.asarray(g), np.asarray(r)


def run_with_reference(parallel: dict, model: dict, train: dict | None = None,
                       kernel: dict | None = None, compression: dict | None = None) -> Run:
    """The layout's metrics and gradients on 8 devices and the single-device reference's, for
    the same random weights and tokens. With ``train.grad_accum_steps`` = A the reference
    averages A micro-batches: micro-batch j holds rows j*b/(D*A).. of every data shard."""
    cfg = tiny_config(parallel=parallel, model=model, train=train or {}, kernel=kernel or {},
                      compression=compression or {})
    layout = Layout.from_config(cfg, 8)
    mesh = make_mesh(layout)
    graphdef, _, state, specs = init_state(cfg, mesh, layout)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    tokens = jax.random.randint(jax.random.key(1), (b, s + 1), 0, cfg.model.vocab_size)

    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout)
    args = state["params"], jax.device_put(tokens, sharding(mesh, layout.batch))
    compiled = jax.jit(grad_fn).lower(*args).compile()
    metrics, grads = compiled(*args)

    steps, data = cfg.train.grad_accum_steps, layout.sizes["data"]
    # Without capacity groups the reference depends on the model, the batch and the
    # micro-batch split only (the weights come from the seed): layouts share it.
    key = None if cfg.model.moe_mode == "capacity" else (
        repr(cfg.model), repr(cfg.train), cfg.seed, data if steps > 1 else None)
    if key not in _REFERENCES:
        ref_ops = reference_ops("padded")
        if cfg.model.moe_mode == "capacity":
            ref_ops = ref_ops._replace(experts=grouped_reference_experts(
                ref_ops.experts, capacity_groups(layout, mesh, b, s)))
        ref_fn = jax.jit(jax.value_and_grad(reference_loss_fn(cfg.model, graphdef, ref_ops),
                                            has_aux=True))
        params = jax.device_get(state["params"])
        rows = np.arange(b).reshape(data, steps, b // (data * steps)).transpose(1, 0, 2)
        results = [ref_fn(params, tokens[r.reshape(-1)]) for r in rows]
        mean = lambda *xs: sum(xs) / len(xs)
        metrics_of = [m for (_, m), _ in results]
        # Counts add up over the micro-batches; everything else is their mean.
        ref_metrics = {k: (sum if k in COUNTS else lambda xs: mean(*xs))(
            [m[k] for m in metrics_of]) for k in metrics_of[0]}
        ref_grads = jax.tree.map(mean, *[g for _, g in results])
        _REFERENCES[key] = ref_metrics, ref_grads
    ref_metrics, ref_grads = _REFERENCES[key]
    if key is None:
        del _REFERENCES[key]
    return Run(cfg, layout, state["params"], compiled, metrics, grads, ref_metrics, ref_grads)


def capacity_groups(layout: Layout, mesh, batch: int, seq: int) -> np.ndarray:
    """[groups, tokens per group]: the global token ids (b * seq + s) that pool their expert
    capacity, in the order the parallel code ranks them (expert index, expert_tensor index,
    then each device's tokens row-major). Derived here from the shardings alone."""
    ids = jax.device_put(np.arange(batch * seq).reshape(batch, seq), sharding(mesh, layout.tokens))
    block = {s.device: np.asarray(s.data).reshape(-1) for s in ids.addressable_shards}
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def coord(index, view_axis):  # row-major position of a device along a view axis
        c = 0
        for name in layout.axes[view_axis]:
            c = c * sizes[name] + index[mesh.axis_names.index(name)]
        return c

    groups = {}
    for index in np.ndindex(mesh.devices.shape):
        key = (coord(index, "expert"), coord(index, "expert_tensor"))
        groups.setdefault(coord(index, "expert_data"), []).append((key, block[mesh.devices[index]]))
    return np.stack([np.concatenate([b for _, b in sorted(g, key=lambda kb: kb[0])])
                     for _, g in sorted(groups.items())])


def grouped_reference_experts(experts_fn, groups: np.ndarray):
    """The reference experts function applied to each capacity group separately."""

    def experts(x, expert_idx, gates, w, capacity_factor):
        y, dropped = jax.vmap(experts_fn, in_axes=(0, 0, 0, None, None))(
            x[groups], expert_idx[groups], gates[groups], w, capacity_factor)
        y = jnp.zeros_like(x).at[groups.reshape(-1)].set(y.reshape(-1, x.shape[-1]))
        return y, jnp.sum(dropped)

    return experts
