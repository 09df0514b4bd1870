"""Vocabulary parallelism (parallel/vocab.py) against the single-device reference: the embedding,
the head's nll, and the gradients w.r.t. x, the table and the head (separate and tied) of a
weighted nll, on 8 simulated devices with the vocabulary split over a group of mesh axes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msmoe_jax.model.layers import embed, head_nll
from msmoe_jax.parallel.collectives import total
from msmoe_jax.parallel.vocab import parallel_embed, parallel_head_nll

V, D, B, S = 64, 16, 2, 8

# (mesh, the group the vocabulary is split over); the data axis splits the batch.
CASES = {
    "data2-seq4": ({"data": 2, "seq": 4}, ("seq",)),
    "seq2xt4": ({"data": 1, "seq": 2, "t": 4}, ("seq", "t")),
    "data2-seq2xt2": ({"data": 2, "seq": 2, "t": 2}, ("seq", "t")),
    "data2-no-group": ({"data": 2, "seq": 4}, ()),  # replicated over "seq"
}


def inputs(key=0):
    k = jax.random.split(jax.random.key(key), 6)
    return dict(
        table=jax.random.normal(k[0], (V, D)),
        head=jax.random.normal(k[1], (D, V)) * 0.5,
        x=jax.random.normal(k[2], (B, S, D)),
        tokens=jax.random.randint(k[3], (B, S), 0, V),
        targets=jax.random.randint(k[4], (B, S), 0, V),
        weights=jax.random.uniform(k[5], (B, S)),
    )


def model(embed_fn, nll_fn, table, head, x, tokens, targets, weights, dtype, tied):
    """(embedding, nll, sum(nll * weights)): the stream x plus the tokens' embedding, through
    the head (the table's transpose when tied), so the table gets gradients from both uses."""
    h = embed_fn(table, tokens, dtype)
    w = table.T if tied else head
    nll = nll_fn(x.astype(dtype) + h, w, targets, dtype)
    return h, nll, jnp.sum(nll * weights)


def reference(a, dtype, tied):
    def loss(table, head, x):
        _, _, value = model(embed, head_nll, table, head, x, a["tokens"], a["targets"],
                            a["weights"], dtype, tied)
        return value

    h, nll, _ = model(embed, head_nll, a["table"], a["head"], a["x"], a["tokens"],
                      a["targets"], a["weights"], dtype, tied)
    return h, nll, jax.grad(loss, argnums=(0, 1, 2))(a["table"], a["head"], a["x"])


def make_mesh(shape):
    return jax.make_mesh(tuple(shape.values()), tuple(shape),
                         axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))


def parallel(a, mesh_shape, axes, dtype, tied, check_vma=True):
    mesh = make_mesh(mesh_shape)
    n = int(np.prod([mesh_shape[ax] for ax in axes]))
    group = axes or None
    tok, rows, cols = P("data", group), P(group, None), P(None, group)
    embed_fn, nll_fn = parallel_embed(axes, n), parallel_head_nll(axes, n)

    def per_device(table, head, x, tokens, targets, weights):
        def loss(table, head, x):
            h, nll, value = model(embed_fn, nll_fn, table, head, x, tokens, targets, weights,
                                  dtype, tied)
            # The total over every device that holds different tokens, as objective.py's.
            return total(value, ("data", *axes)), (h, nll)

        grads, (h, nll) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(table, head, x)
        if not check_vma:
            # Untyped, each device has its own tokens' contribution to the (data-replicated)
            # table and head; typed, they are invariant over "data": summed already.
            grads = (*jax.lax.psum(grads[:2], "data"), grads[2])
        return h, nll, grads

    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(rows, cols, tok, tok, tok, tok),
                       out_specs=(tok, tok, (rows, cols, tok)), check_vma=check_vma)
    specs = dict(table=rows, head=cols, x=tok, tokens=tok, targets=tok, weights=tok)
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in a.items()}
    return jax.jit(fn)(placed["table"], placed["head"], placed["x"], placed["tokens"],
                       placed["targets"], placed["weights"])


def check(name, dtype, tied, rtol, atol, check_vma=True):
    mesh_shape, axes = CASES[name]
    a = inputs()
    want_h, want_nll, want_grads = reference(a, dtype, tied)
    h, nll, grads = parallel(a, mesh_shape, axes, dtype, tied, check_vma)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(want_h, np.float32),
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(nll, want_nll, rtol=rtol, atol=atol)
    for label, g, r in zip(("table", "head", "x"), grads, want_grads):
        if tied and label == "head":
            continue  # unused: the head is the table's transpose
        assert float(jnp.max(jnp.abs(r))) > 0, label
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=rtol, atol=atol, err_msg=label)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_matches_single_device(name, tied):
    check(name, jnp.float32, tied, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vocab_parallel_without_the_varying_axes_check(tied):
    """strategy.py runs some layouts with shard_map's check off, where psum's transpose is
    another psum: the vocab functions' gradients must not depend on the typing."""
    check("data2-seq2xt2", jnp.float32, tied, rtol=1e-5, atol=1e-5, check_vma=False)


def test_vocab_parallel_bf16_compute():
    """bf16 embedding rows and head matmuls: the embedding is exact (one non-zero per row);
    the nll and gradients differ only by summation order (partial sums over vocab slices)."""
    check("data2-seq2xt2", jnp.bfloat16, False, rtol=2e-2, atol=2e-2)


def test_no_tokens_by_vocab_array():
    """The largest array of the parallel head is [b, s, V/n]: nothing holds the whole
    vocabulary for all tokens (logits or their gradient)."""
    n, axes = 4, ("seq",)
    mesh = make_mesh({"data": 2, "seq": 4})
    fn = parallel_head_nll(axes, n)

    def per_device(x, w, targets):
        loss = lambda x, w: total(jnp.sum(fn(x, w, targets, jnp.float32)), ("data", "seq"))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    tok = P("data", "seq")
    sm = jax.shard_map(per_device, mesh=mesh, in_specs=(tok, P(None, "seq"), tok),
                       out_specs=(tok, P(None, "seq")))
    a = inputs()
    put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))
    jaxpr = jax.make_jaxpr(sm)(put(a["x"], tok), put(a["head"], P(None, "seq")),
                               put(a["targets"], tok))
    shapes = {tuple(v.aval.shape) for eqn in _eqns(jaxpr.jaxpr) for v in eqn.outvars}
    assert (B // 2, S, V // n) in shapes  # the local logits
    assert not any(len(sh) == 3 and sh[-1] == V for sh in shapes), shapes


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)
