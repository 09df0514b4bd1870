"""Every parallel layout against the single-device reference: loss, metrics and the gradient
of every parameter (fp32, random weights and tokens), on 8 simulated devices (equality.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equality import A2A, AG, CAPACITY, MODEL, RAGGED, check_against_reference
from msmoe_jax.parallel.mesh import Layout, make_mesh, sharding
from msmoe_jax.parallel.strategy import make_grad_fn
from msmoe_jax.state import init_state
from support import tiny_config

LAYOUTS = {
    "data8": ({"data": 8}, {}),
    "data8-ragged-tied-top1": ({"data": 8}, {"expert_compute": "ragged_dot", "top_k": 1,
                                             "tie_embeddings": True, "renormalize_topk": False}),
    "seq8": ({"data": 1, "sequence": 8}, {}),
    # The vocabulary split over the attention group, with a tied head.
    "seq8-kv8-tied-vocab": ({"data": 1, "sequence": 8, "vocab": "sharded"},
                            {"num_kv_heads": 8, "tie_embeddings": True}),
    "ep8-a2a": ({"expert_data": 1, "expert": 8, **A2A}, {}),
    "ep8-a2a-capacity": ({"expert_data": 1, "expert": 8, **A2A}, CAPACITY),
    "seq4xdata2-ep8-a2a": ({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **A2A}, {}),
    "seq4xdata2-ep8-gather": ({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **AG},
                              {}),
    "tp2xseq2xdata2-ep4xed2-a2a-vocab": (
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4, **A2A,
         "vocab": "sharded"}, {}),
    "tp2xseq2xdata2-ep4xed2-a2a-capacity": (
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4, **A2A},
        CAPACITY),
    "tp2xseq2xdata2-tpattn-ep4xed2-gather-capacity": (
        {"data": 2, "sequence": 2, "tensor": 2, "attention": "tensor", "expert_data": 2,
         "expert": 4, **AG}, CAPACITY),
    "tp8-tpattn-etp8-vocab": ({"data": 1, "tensor": 8, "attention": "tensor", "expert_data": 1,
                               "expert_tensor": 8, "vocab": "sharded", "buffer_factor": 4.0},
                              {}),
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


# The quick check (-m "not slow") keeps one layout of each kind of exchange.
QUICK = {"data8", "tp8-tpattn-etp8-vocab", "data8-ep4xetp2-ragged"}


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in LAYOUTS])
def test_layout_matches_single_device(name):
    parallel, model = LAYOUTS[name]
    check_against_reference(parallel, {**MODEL, **model})


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
    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", IMPORTED)
def test_imported_model_switches_match_single_device(name):
    parallel, model = IMPORTED[name]
    check_against_reference(parallel, {**MODEL, **model})
