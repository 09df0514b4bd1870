"""Every parallel layout against the single-device reference: loss, metrics and the gradient
of every parameter (fp32, random weights and tokens), on 8 simulated devices."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
LAYOUTS = {
    "data8": ({"data": 8}, {}),
    "data8-ragged-tied-top1": ({"data": 8}, {"expert_compute": "ragged_dot", "top_k": 1,
                                             "tie_embeddings": True, "renormalize_topk": False}),
    "seq8": ({"data": 1, "sequence": 8}, {}),
    "seq8-kv8": ({"data": 1, "sequence": 8}, {"num_kv_heads": 8}),
    "ep8-a2a": ({"expert_data": 1, "expert": 8, **A2A}, {}),
    "ep8-a2a-capacity": ({"expert_data": 1, "expert": 8, **A2A}, CAPACITY),
    "seq4xdata2-ep8-a2a": ({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **A2A}, {}),
    "seq4xdata2-ep8-gather": ({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **AG},
                              {}),
    "tp2xseq2xdata2-ep4xed2-a2a": (
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4, **A2A}, {}),
    "tp2xseq2xdata2-ep4xed2-a2a-capacity": (
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4, **A2A},
        CAPACITY),
    "tp2xseq2xdata2-tpattn-ep4xed2-gather-capacity": (
        {"data": 2, "sequence": 2, "tensor": 2, "attention": "tensor", "expert_data": 2,
         "expert": 4, **AG}, CAPACITY),
    "tp8-tpattn-etp8": ({"data": 1, "tensor": 8, "attention": "tensor", "expert_data": 1,
                         "expert_tensor": 8}, {}),
    "tp8-tpattn-kv8": ({"data": 1, "tensor": 8, "attention": "tensor"}, {"num_kv_heads": 8}),
    "data8-ep4xetp2-a2a-capacity": ({"expert_data": 1, "expert": 4, "expert_tensor": 2, **A2A},
                                    CAPACITY),
    "data8-ep4xetp2-gather": ({"expert_data": 1, "expert": 4, "expert_tensor": 2, **AG}, {}),
    "seq4xdata2-ep8-ragged": ({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
                               **RAGGED}, {}),
    # Megatron's order: each device sends its own tokens over "expert", then the expert_tensor
    # devices gather what arrived.
    "data8-ep4xetp2-ragged": ({"expert_data": 1, "expert": 4, "expert_tensor": 2, **RAGGED},
                              {}),
    "data8-ep2xed2xetp2-ragged-capacity": (
        {"expert_data": 2, "expert": 2, "expert_tensor": 2, **RAGGED}, CAPACITY),
}


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


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name):
    parallel, model = LAYOUTS[name]
    check_against_reference(parallel, {**MODEL, **model})


def check_against_reference(parallel: dict, model: dict, train: dict | None = None,
                            kernel: dict | None = None):
    """Loss, metrics and every parameter's gradient of the layout equal the single-device
    reference's (fp32). Returns the compiled parallel step."""
    run = run_with_reference(parallel, model, train, kernel)
    np.testing.assert_allclose(run.metrics["loss"], run.ref_metrics["loss"], rtol=1e-5)
    for k in run.ref_metrics:
        np.testing.assert_allclose(run.metrics[k], run.ref_metrics[k], rtol=1e-5, atol=1e-7,
                                   err_msg=k)
    if run.cfg.model.moe_mode == "capacity":
        assert float(run.metrics["dropped_frac"]) > 0.05  # the capacity limit is exercised
    for path, g, r in run.grad_pairs():
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=path)
    # Parameters really are laid out as the layout says (sharded where it shards them).
    w = run.params["blocks"][1]["ffn"]["w_gate"][...]
    assert w.addressable_shards[0].data.shape[0] == 8 // run.layout.sizes["expert"]
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

    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout, specs["params"])
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


_REFERENCES: dict = {}  # reference (metrics, grads) by model, batch and micro-batch split


def test_ragged_all_to_all_path_lowers_with_the_real_primitive(monkeypatch):
    """CPU cannot compile ragged_all_to_all, but the GPU path's program (forward and backward)
    must trace and lower here, so shapes, dtypes and the primitive's AD rules are checked."""
    from msmoe_jax.parallel import collectives as C

    cfg = tiny_config(parallel={"expert_data": 2, "expert": 4, **RAGGED},
                      model={**MODEL, "dtype": "bfloat16"})
    # make_ops picks the emulation on CPU; hand it the GPU primitive instead.
    monkeypatch.setattr(C, "ragged_exchange_padded", C.ragged_exchange)
    text = lower_grad_step(cfg).as_text()
    assert text.count("ragged_all_to_all") >= 4  # dispatch and combine, forward and backward


def test_ragged_exchange_refuses_an_invariant_landing_buffer():
    """ragged_all_to_all types its result as its output buffer: one made with jnp.zeros is
    invariant, and autodiff then all-reduces the received rows' cotangents over the group.
    The CPU emulation refuses such a buffer as the primitive would mistype it, and with a
    ``landing`` buffer its gradient is exact (each device's rows reach only their sender)."""
    from jax.sharding import PartitionSpec as P

    from msmoe_jax.parallel import collectives as C

    mesh = jax.make_mesh((8,), ("e",), axis_types=(jax.sharding.AxisType.Auto,))
    sizes = jnp.ones((8,), jnp.int32)  # one row to every device
    offsets = jnp.arange(8, dtype=jnp.int32)

    def moved(x, make_buffer):
        def per_device(x):
            there = (offsets, sizes, jnp.full((8,), C.index(("e",)), jnp.int32), sizes)
            out = C.ragged_exchange_padded(x, make_buffer(x, there), *there, ("e",))
            return out * (1.0 + C.index(("e",)))  # a per-device weight, to see whose rows
        return jax.shard_map(per_device, mesh=mesh, in_specs=P("e"), out_specs=P("e"))(x)

    x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 4)),
                       jax.sharding.NamedSharding(mesh, P("e")))
    invariant = lambda x, there: jnp.zeros((8, x.shape[1]), x.dtype)
    with pytest.raises(TypeError, match="landing"):
        jax.grad(lambda x: jnp.sum(moved(x, invariant) ** 2))(x)
    landing = lambda x, there: C.landing(8, x, ("e",), *there)
    grad = jax.grad(lambda x: jnp.sum(moved(x, landing) ** 2))(x)
    # Row j of device i lands on device j (at row i), weighted by (1 + j).
    weight = jnp.tile(1.0 + jnp.arange(8.0), 8)[:, None]
    np.testing.assert_allclose(grad, 2 * x * weight ** 2, rtol=1e-6)


def lower_grad_step(cfg, platforms=None):
    """The gradient of the loss for ``cfg`` on 8 devices, traced from abstract parameters and
    tokens and lowered (for ``platforms``, default this backend) without compiling."""
    layout = Layout.from_config(cfg, 8)
    mesh = make_mesh(layout)
    graphdef, _, state, specs = init_state(cfg, mesh, layout, abstract=True)
    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout, specs["params"])
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                  sharding=sharding(mesh, layout.batch))
    traced = jax.jit(grad_fn).trace(state["params"], tokens)
    return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


# The switches of imported models (Qwen2: Q/K/V biases and a gated shared expert; Qwen3:
# per-head Q/K norms; OLMoE: Q/K norms over all heads) under layouts that split heads.
IMPORTED = {
    "qwen2-tp2xseq2xdata2-tpattn": (
        {"data": 2, "sequence": 2, "tensor": 2, "attention": "tensor", "expert_data": 2,
         "expert": 4, **A2A},
        {"attention_bias": True, "shared_expert_gate": True}),
    "qwen3-seq4xdata2-ep8-tpattn": (
        {"data": 2, "sequence": 4, "attention": "tensor", "expert_data": 1, "expert": 8, **A2A},
        {"qk_norm": "head", "num_shared_experts": 0}),
    "olmoe-seq4xdata2-ep8-ulysses": (
        {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **AG},
        {"qk_norm": "full", "num_shared_experts": 0, "renormalize_topk": False}),
}


@pytest.mark.parametrize("name", IMPORTED)
def test_imported_model_switches_match_single_device(name):
    parallel, model = IMPORTED[name]
    check_against_reference(parallel, {**MODEL, **model})
