"""Layer-by-layer gradient accumulation (parallel/layer_grads.py) against plain scan autodiff:
the same gradients, no stacked copy of the parameters among the residuals, and one
parameter-sized buffer fewer in a compiled accumulation loop. The model-level equality
(scanned blocks, micro-batches, every layout kind) is in test_compression and test_zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msmoe_jax.parallel.layer_grads import accumulating_scan

L, D, ROWS = 6, 32, 4


def body_of(policy):
    positions = jnp.arange(ROWS, dtype=jnp.float32)  # closed over, as the model's are

    def body(x, layer):
        h = jnp.tanh(x @ layer["w"] + layer["b"] + positions[:, None])
        return h, jnp.sum(h ** 2)

    return jax.checkpoint(body, policy=policy, prevent_cse=False)


def inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    xs = {"w": jax.random.normal(k[0], (L, D, D)) / np.sqrt(D),
          "b": jax.random.normal(k[1], (L, D))}
    return xs, jax.random.normal(k[2], (ROWS, D))


def loss(y, stats):
    return jnp.sum(y ** 3) + jnp.sum(stats * jnp.arange(1.0, L + 1))


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.dots_saveable,
                                    jax.checkpoint_policies.nothing_saveable])
def test_the_accumulator_gets_the_scan_gradient_added(policy):
    body = body_of(policy)
    xs, x = inputs()
    acc = jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape), xs)
    ref_xs, ref_x = jax.grad(lambda xs, x: loss(*jax.lax.scan(body, x, xs)), (0, 1))(xs, x)
    got_xs, got_acc, got_x = jax.jit(jax.grad(
        lambda xs, acc, x: loss(*accumulating_scan(body, x, xs, acc)), (0, 1, 2)))(xs, acc, x)
    np.testing.assert_allclose(got_x, ref_x, rtol=1e-5, atol=1e-6)
    for k in xs:
        np.testing.assert_allclose(got_acc[k], acc[k] + ref_xs[k], rtol=1e-5, atol=1e-6)
        assert not np.any(got_xs[k])  # the parameters themselves get nothing
    y, stats = accumulating_scan(body, x, xs, acc)
    ref_y, ref_stats = jax.lax.scan(body, x, xs)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(stats, ref_stats)


def test_the_parameters_are_not_among_the_stacked_residuals():
    body = body_of(jax.checkpoint_policies.dots_saveable)
    xs, x = inputs()
    acc = jax.tree.map(jnp.zeros_like, xs)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda xs, acc, x: loss(*accumulating_scan(body, x, xs, acc)), (0, 1)))(xs, acc, x)
    forward = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    shapes = [tuple(v.aval.shape) for v in forward.outvars]
    # The input rows and the saved dot per layer, the per-layer stats and the closed-over
    # positions; no [L, D, D] or [L, D] copy of the parameters.
    assert (L, ROWS, D) in shapes
    assert (L, D, D) not in shapes and (L, D) not in shapes, shapes


def test_accumulation_needs_one_parameter_sized_buffer_fewer():
    """Two micro-batches accumulated into an FP32 accumulator, compiled on the CPU: plain scan
    autodiff holds the micro-batch's stacked gradient beside the accumulator; accumulating
    inside the backward does not."""
    big = 512  # parameters dominate: [L, big, big] FP32
    xs = {"w": jnp.zeros((L, big, big)), "b": jnp.zeros((L, big))}
    xb = jnp.zeros((2, ROWS, big))

    def body_big(x, layer):
        return jnp.tanh(x @ layer["w"] + layer["b"]), jnp.sum(x)

    body_big = jax.checkpoint(body_big, policy=jax.checkpoint_policies.nothing_saveable)

    def plain(xs, xb):
        def micro(acc, x):
            g = jax.grad(lambda xs: loss(*jax.lax.scan(body_big, x, xs)))(xs)
            return jax.tree.map(jnp.add, acc, g), None
        return jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, xs), xb)[0]

    def layerwise(xs, xb):
        def micro(acc, x):
            return jax.grad(lambda acc: loss(*accumulating_scan(body_big, x, xs, acc)))(acc), None
        return jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, xs), xb)[0]

    compiled = {f.__name__: jax.jit(f).lower(xs, xb).compile() for f in (plain, layerwise)}
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    stacked = L * big * big * 4
    assert temp["plain"] - temp["layerwise"] >= 0.9 * stacked, temp
    xs = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape) / big, xs)
    xb = jax.random.normal(jax.random.key(4), xb.shape)
    for k, want in compiled["plain"](xs, xb).items():
        np.testing.assert_allclose(compiled["layerwise"](xs, xb)[k], want, rtol=1e-5, atol=1e-6)
