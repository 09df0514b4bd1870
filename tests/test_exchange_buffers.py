"""Bounded dropless exchange buffers (``parallel.buffer_factor``) under skewed routing: rows
that do not fit are dropped and counted, never lost silently. The expected drops and outputs
are computed here in numpy from the routing alone, following each exchange's documented fill
order, and compared with the expert-parallel functions on 8 simulated devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msmoe_jax.model.moe import ExpertWeights
from msmoe_jax.observe import OverflowWatch
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel.experts import (
    Group,
    Wires,
    experts_all_gather,
    experts_padded_all_to_all,
    experts_ragged_all_to_all,
)

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

N, T, K, E, D, F = 8, 16, 2, 16, 8, 12  # devices, tokens per device, top-k, experts, widths
FACTOR = 2.0


def skewed_routing(seed=0):
    """[N*T, K] distinct experts per token, half the first choices on expert 0 (device 0)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N * T)])
    hot = rng.random(N * T) < 0.5
    idx[hot, 1] = np.where(idx[hot, 0] == 0, idx[hot, 1], idx[hot, 0])
    idx[hot, 0] = 0
    return idx


def sorted_by_expert(idx):
    """A device's assignments (token, slot) in the exchanges' send order: by expert, then
    slot-major (slot, then token)."""
    t = idx.shape[0]
    pairs = [(idx[i, j], j, i) for j in range(K) for i in range(t)]
    return [(i, j) for _, j, i in sorted(pairs)]


def expected_keep(kind: str, idx):
    """[N*T, K] bool: which assignments each exchange keeps under FACTOR, from the routing."""
    keep = np.zeros(idx.shape, bool)
    e_local = E // N
    if kind == "padded":  # per (source, expert) block of ceil(f * T*K/E) rows, in sort order
        rows = math.ceil(FACTOR * T * K / E)
        for src in range(N):
            local = idx[src * T:(src + 1) * T]
            taken = {}
            for i, j in sorted_by_expert(local):
                e = local[i, j]
                taken[e] = taken.get(e, 0) + 1
                keep[src * T + i, j] = taken[e] <= rows
    elif kind == "ragged":  # per destination ceil(f * T*K) rows, filled source by source
        rows = min(math.ceil(FACTOR * T * K), N * T * min(K, e_local))
        room = [rows] * N
        for src in range(N):
            local = idx[src * T:(src + 1) * T]
            per_dst = {}
            for i, j in sorted_by_expert(local):
                per_dst.setdefault(local[i, j] // e_local, []).append((i, j))
            for dst, assigned in sorted(per_dst.items()):
                fit = min(room[dst], len(assigned))
                room[dst] -= fit
                for i, j in assigned[:fit]:
                    keep[src * T + i, j] = True
    else:  # all_gather: per expert ceil(f * N*T*K/E) rows of the group's tokens, in sort order
        rows = math.ceil(FACTOR * N * T * K / E)
        taken = {}
        for i, j in sorted_by_expert(idx):
            e = idx[i, j]
            taken[e] = taken.get(e, 0) + 1
            keep[i, j] = taken[e] <= rows
    return keep


def expert_outputs(x, idx, gates, w: ExpertWeights, keep):
    """y[t] = sum of the kept choices' gate x SwiGLU expert (float64 numpy)."""
    wg, wu, wd = (np.asarray(a, np.float64) for a in w)
    y = np.zeros_like(x, np.float64)
    for t in range(x.shape[0]):
        for j in range(K):
            if keep[t, j]:
                e = idx[t, j]
                h = x[t] @ wg[e]
                h = h / (1 + np.exp(-h)) * (x[t] @ wu[e])
                y[t] += gates[t, j] * (h @ wd[e])
    return y


def run(kind, x, idx, gates, w):
    mesh = jax.make_mesh((N,), ("e",), axis_types=(jax.sharding.AxisType.Auto,))
    g = Group(("e",), N, (), 1)
    fn = {"padded": lambda: experts_padded_all_to_all(g, Wires(), buffer_factor=FACTOR),
          "ragged": lambda: experts_ragged_all_to_all(g, Wires(), buffer_factor=FACTOR,
                                                      move=C.ragged_exchange_padded),
          "all_gather": lambda: experts_all_gather(g, Wires(), buffer_factor=FACTOR)}[kind]()

    def per_device(x, idx, gates, w):
        y, dropped = fn(x, idx, gates, w, None)
        return y, jax.lax.psum(dropped, "e")[None]

    wspec = ExpertWeights(P("e"), P("e"), P("e"))
    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("e"), P("e"), P("e"), wspec),
                              out_specs=(P("e"), P())))
    y, dropped = f(x, idx, gates, w)
    loss = lambda x, w: jnp.sum(f(x, idx, gates, w)[0] ** 2)
    grads = jax.grad(loss, argnums=(0, 1))(x, w)
    return np.asarray(y), float(dropped[0]), grads


@pytest.mark.parametrize("kind", ["padded", "ragged", "all_gather"])
def test_overflow_is_dropped_and_counted(kind):
    idx = skewed_routing()
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (N * T, D), jnp.float32)
    gates = jax.nn.softmax(jax.random.normal(keys[1], (N * T, K)), axis=-1)
    w = ExpertWeights(*(0.3 * jax.random.normal(k, s) for k, s in
                        zip(keys[2:], [(E, D, F), (E, D, F), (E, F, D)])))
    keep = expected_keep(kind, idx)
    assert 0.05 < 1 - keep.mean() < 0.5  # the skew overflows the buffers, not everything
    y, dropped, grads = run(kind, x, jnp.asarray(idx, jnp.int32), gates, w)
    assert dropped == (~keep).sum()
    want = expert_outputs(np.asarray(x, np.float64), idx, np.asarray(gates, np.float64), w, keep)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_dropless_overflow_warns_past_one_percent():
    class Cfg:  # the fields OverflowWatch reads
        class parallel:
            buffer_factor = 2.0

        class model:
            moe_mode, num_experts = "dropless", 8

    watch = OverflowWatch(Cfg, every=100)
    assert watch.check({"step": 1, "dropped_frac": 0.005}) is None
    msg = watch.check({"step": 2, "dropped_frac": 0.03})
    assert "3.0%" in msg and "parallel.buffer_factor=2.0" in msg
    assert watch.check({"step": 50, "dropped_frac": 0.03}) is None  # not every step
    assert watch.check({"step": 102, "dropped_frac": 0.03})
    Cfg.model.moe_mode = "capacity"  # capacity drops are the configured behaviour
    assert OverflowWatch(Cfg).check({"step": 1, "dropped_frac": 0.3}) is None
