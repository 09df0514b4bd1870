"""ZeRO stages 1 (the AdamW moments split over each parameter's replica devices) and 3 (the
parameters too, gathered where used). Training steps equal the unsharded ones (fp32), the
state really is split, and checkpoints restore across stages and meshes both ways."""

import jax
import numpy as np
import pytest

from equality import A2A, AG, MODEL, RAGGED
from msmoe_jax.parallel.mesh import Layout, make_mesh, sharding
from msmoe_jax.parallel.strategy import make_grad_fn, zero_spec
from msmoe_jax.state import init_state
from msmoe_jax.step import make_train_step
from msmoe_jax.trainer import train
from support import tiny_config

P = jax.sharding.PartitionSpec

LAYOUTS = {
    "data8": {"data": 8},
    "seq4xdata2-ulysses-ep8-a2a": {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
                                   **A2A},
    "tp2xseq2xdata2-tpattn-ep4xed2-gather": {
        "data": 2, "sequence": 2, "tensor": 2, "attention": "tensor", "expert_data": 2,
        "expert": 4, **AG},
    "data8-ep4xetp2-ragged": {"expert_data": 1, "expert": 4, "expert_tensor": 2, **RAGGED},
}
# Micro-batches (ZeRO-3 gathers and reduce-scatters in each) and remat (gathered parameters
# are not saved: the backward gathers them again) on some layouts.
TRAIN = {"seq4xdata2-ulysses-ep8-a2a": {"grad_accum_steps": 2, "remat": "selective"}}
QUICK = {"data8"}
# The BF16 gradient exchange: all_to_all of BF16 pieces, FP32 sums, then (zero 0) an
# all_gather or (zero 1) nothing, each device keeping its own part.
BF16 = {"tp2xseq2xdata2-tpattn-ep4xed2-gather"}


def test_zero_spec_splits_the_largest_dimension_its_replicas_divide():
    sizes = {"a": 2, "b": 4, "c": 1}
    assert zero_spec(P(None, "a"), (64, 6), sizes) == P(("b",), "a")  # 6 is not a multiple of 8
    assert zero_spec(P(None, None), (8, 64), sizes) == P(None, ("a", "b"))
    assert zero_spec(P("a", None), (16, 3), sizes) == P(("a", "b"), None)  # 16 / (2 * 4)
    assert zero_spec(P(None), (6,), sizes) == P(None)  # nothing divides: stays replicated
    assert zero_spec(P("a", "b"), (8, 8), sizes) == P("a", "b")  # no replicas left
    assert zero_spec(P(None, None), (64, 8), sizes, fixed=1) == P(None, ("a", "b"))  # layers


def run_steps(cfg, steps=3):
    """Losses of ``steps`` training steps on fixed random batches, and the final state."""
    layout = Layout.from_config(cfg, 8)
    mesh = make_mesh(layout, jax.devices())
    graphdef, optimizer, state, specs = init_state(cfg, mesh, layout)
    step = make_train_step(cfg, graphdef, optimizer, mesh, layout, specs)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    losses = []
    for i in range(steps):
        tokens = jax.random.randint(jax.random.key(i), (b, s + 1), 0, cfg.model.vocab_size)
        state, metrics = step(state, jax.device_put(tokens, sharding(mesh, layout.batch)))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in LAYOUTS] + [pytest.param(f"{n}+bf16", marks=pytest.mark.slow)
                                                       for n in sorted(BF16)])
def test_zero_steps_equal_the_unsharded_optimizer(name):
    """Three AdamW steps under zero=1 (gradients reduce-scattered into each replica's part,
    moments split, the update all-gathered), zero=3 (parameters split too, all-gathered per
    layer where used, the gathers' backward reduce-scattering the gradients) and zero=0 on
    the same layout: the same losses and the same parameters and moments after them (fp32),
    with the split state held 1/replicas per device."""
    model = {**MODEL, "num_shared_experts": 0}
    optimizer = {"lr": 3e-3, "warmup_steps": 0}
    layout, bf16 = name.removesuffix("+bf16"), name.endswith("+bf16")
    compression = {"gradients": "bf16_a2a" if bf16 else "fp32"}
    # BF16 exchange: one step, compared through the first moment (0.1 x the gradient). The
    # exchanges round differently (zero 0 all_gathers the summed gradient in BF16, zero 1
    # keeps its FP32 sum, zero 3 rounds each micro-batch's contribution), and Adam's update
    # turns rounding of near-zero gradients into whole steps, so later steps and parameters
    # are compared in FP32 only.
    steps = 1 if bf16 else 3
    runs = {z: run_steps(tiny_config(parallel={**LAYOUTS[layout], "zero": z}, model=model,
                                     optimizer=optimizer, compression=compression,
                                     train=TRAIN.get(layout, {})), steps)
            for z in (0, 1, 3)}
    loss0, state0 = runs[0]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(state0)]
    for z in (1, 3):
        loss, state = runs[z]
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=f"zero {z}")
        for path, a, b in zip(paths, jax.tree.leaves(state0), jax.tree.leaves(state)):
            a, b = np.asarray(a), np.asarray(b)
            if bf16:
                if ".mu[" in path:  # within BF16 rounding of the gradient (2^-8 relative)
                    np.testing.assert_allclose(b, a, rtol=2e-2, atol=1e-2 * np.abs(a).max(),
                                               err_msg=f"zero {z}: {path}")
                continue
            # Parameters move ~lr per step (1e-5 is 1/300 of that); the moments are compared
            # at their own scale (the second moments are ~1e-3 g^2).
            atol = 1e-5 if path.startswith("['params']") else 1e-5 * np.abs(a).max()
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=f"zero {z}: {path}")
        assert int(state["step"]) == steps  # every step was applied (finite)

    # Each device holds 1/replicas of what zero 0 replicates.
    def held(state, part, whole):
        pairs = zip(jax.tree.leaves(state[part]), jax.tree.leaves(whole[part]))
        return sum(x.addressable_shards[0].data.size for x, w in pairs
                   if w.addressable_shards[0].data.size == w.size)

    for part, stages in (("opt_state", (1, 3)), ("params", (3,))):
        for z in stages:
            assert held(runs[z][1], part, state0) < 0.6 * held(state0, part, state0), (part, z)


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(1, 3), (3, 0)])
def test_checkpoints_restore_across_zero_stages_and_meshes(tmp_path, first, second):
    """Saved under one stage and layout, resumed under the other stage on another layout:
    the losses continue as the uninterrupted run's."""
    model = {**MODEL, "num_shared_experts": 0}
    common = dict(model=model, optimizer={"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
                  checkpoint={"every": 2, "async_save": False})
    full = train(tiny_config(tmp_path / "full", parallel={"data": 8, "zero": first},
                             train={"steps": 4}, **common))
    train(tiny_config(tmp_path / "split", parallel={"data": 8, "zero": first},
                      train={"steps": 2}, **common))
    resumed = train(tiny_config(
        tmp_path / "split", parallel={"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
                                      **A2A, "zero": second},
        train={"steps": 4}, **common))
    assert resumed["start_step"] == 2
    np.testing.assert_allclose([r["loss"] for r in resumed["history"]],
                               [r["loss"] for r in full["history"][2:]], rtol=1e-5)


@pytest.mark.slow
def test_zero3_gathers_in_bf16_give_zero0s_gradients():
    """ZeRO-3 in BF16 compute (matrices gathered in BF16) over three scanned MoE layers, a
    sharded and tied vocabulary and a batch of few distinct tokens (each embedding row's
    gradient sums ~50 tokens' rows): the gradients equal zero 0's up to FP32 summation order,
    every parameter's, the embedding's too (it is gathered in FP32 so that its rows are
    summed in FP32, as zero 0 sums them)."""
    model = {**MODEL, "dtype": "bfloat16", "num_layers": 4, "tie_embeddings": True,
             "num_shared_experts": 0}
    parallel = {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **A2A,
                "vocab": "sharded"}
    grads = {}
    for z in (0, 3):
        cfg = tiny_config(parallel={**parallel, "zero": z}, model=model)
        layout = Layout.from_config(cfg, 8)
        mesh = make_mesh(layout, jax.devices())
        graphdef, _, state, _ = init_state(cfg, mesh, layout)
        b, s = cfg.train.batch_size, cfg.train.seq_len
        tokens = jax.random.randint(jax.random.key(0), (b, s + 1), 0, 5)
        _, g = jax.jit(make_grad_fn(cfg, graphdef, mesh, layout))(
            state["params"], jax.device_put(tokens, sharding(mesh, layout.batch)))
        grads[z] = g
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(grads[0])]
    for path, a, b in zip(paths, jax.tree.leaves(grads[0]), jax.tree.leaves(grads[3])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max(), err_msg=path)
