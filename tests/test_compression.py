"""Communication compression: FP8 quantisation and collectives, and the BF16 gradient
exchange, each against the exact (FP32) collective on random data, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from equality import A2A, AG, MODEL, RAGGED, check_against_reference, run_with_reference
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel import fp8
from msmoe_jax.parallel.grad_exchange import bf16_a2a_sum
from msmoe_jax.parallel.mesh import validate_for
from support import tiny_config

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

AXES = ("x",)
MESH = jax.make_mesh((8,), AXES, axis_types=(AxisType.Auto,))
E4M3_EPS = 2.0 ** -4  # half the spacing of E4M3's 3-bit mantissa, relative
E4M3_TINY = 2.0 ** -9  # its smallest subnormal, relative to the scale
BF16_EPS = 2.0 ** -8  # bf16 round-to-nearest (8 significant bits), relative


def with_outliers(key, shape, dtype=jnp.float32):
    """Normal data with a few rows scaled by 1e4 and single outliers of 300x in others."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, shape)
    rows = jax.random.uniform(k2, shape[:-1] + (1,)) < 0.1
    x = jnp.where(rows, x * 1e4, x)
    spikes = jax.random.uniform(k3, shape) < 0.01
    return jnp.where(spikes, x * 300, x).astype(dtype)


def assert_e4m3_close(y, x, scale):
    """Each element within E4M3 rounding: half a mantissa step, or a subnormal step of the
    row's scale for elements far below the row's largest."""
    err = np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64))
    bound = E4M3_EPS * np.abs(np.asarray(x, np.float64)) + E4M3_TINY * np.asarray(scale)
    assert np.all(err <= bound * 1.0001), float(np.max(err / bound))


def test_quantize_round_trip_within_e4m3_error_with_outliers():
    x = with_outliers(jax.random.key(0), (64, 96))
    q, scale = fp8.quantize(x)
    assert q.dtype == fp8.E4M3 and scale.shape == (64, 1)
    y = fp8.dequantize(q, scale, jnp.float32)
    assert_e4m3_close(y, x, scale)
    # Rows whose amax is 1e4 x the others keep their small elements to the row's resolution.
    assert float(jnp.max(jnp.abs(x))) > 1e5
    # The wire format carries exactly the same numbers; zero rows stay zero.
    z = x.at[3].set(0.0)
    w = fp8.encode(z)
    assert w.dtype == jnp.uint8 and w.shape == (64, 96 + fp8.SCALE_BYTES)
    np.testing.assert_array_equal(fp8.decode(w, jnp.float32),
                                  fp8.dequantize(*fp8.quantize(z), jnp.float32))
    np.testing.assert_array_equal(fp8.decode(w, jnp.float32)[3], 0.0)
    np.testing.assert_array_equal(fp8.decode(jnp.zeros_like(w), jnp.float32), 0.0)


def test_quantize_saturates_instead_of_nan():
    # A plain cast of a value past E4M3's range gives NaN: the reason quantize saturates.
    assert bool(jnp.isnan(jnp.float32(1e6).astype(fp8.E4M3)))
    x = jnp.array([[1e6, -2e5, 1e4, 0.0], [-3e38, 1e38, 0.0, 0.0],
                   [jnp.inf, -jnp.inf, 5.0, 1e-30], [0.0, 0.0, 0.0, 0.0],
                   [2e-38, -1e-38, 0.0, 3e-39]], jnp.float32)
    q, scale = fp8.quantize(x)
    y = fp8.dequantize(q, scale, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y[0, :3], [1e6, -2e5, 1e4], rtol=E4M3_EPS)
    np.testing.assert_allclose(y[1, :2], [-3e38, 1e38], rtol=E4M3_EPS)
    np.testing.assert_allclose(y[2, :2], [3.4028235e38, -3.4028235e38], rtol=E4M3_EPS)
    np.testing.assert_array_equal(y[3], 0.0)
    np.testing.assert_allclose(y[4, 0], 2e-38, rtol=0.2)  # finite, few bits left down there
    # bf16 input, bf16 output.
    yb = fp8.decode(fp8.encode(x[:1].astype(jnp.bfloat16)), jnp.bfloat16)
    assert yb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(yb)))


def per_device(fn, x):
    """fn on each device's rows of x (split over the 8 devices), as a global array."""
    spec = P("x")
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=spec, out_specs=spec))(
        jax.device_put(x, NamedSharding(MESH, spec)))


def value_and_vjp(collective, x, ct, **kw):
    """(collective(x), its VJP applied to ct) per device, as global arrays."""

    def fn(x, ct):
        y, vjp = jax.vjp(lambda a: collective(a, AXES, **kw), x)
        return y, vjp(ct)[0]

    spec = P("x")
    sharded = jax.shard_map(fn, mesh=MESH, in_specs=(spec, spec), out_specs=(spec, spec))
    put = lambda a: jax.device_put(a, NamedSharding(MESH, spec))
    return jax.jit(sharded)(put(x), put(ct))


@pytest.mark.parametrize("name", ["exchange", "gather", "reduce_scatter"])
def test_fp8_collectives_match_exact_forward_and_backward(name):
    """Each FP8 collective and its backward against the exact one, on data with outliers.
    Local shapes: exchange [16, 4, 24] -> same; gather [2, 8, 24] axis 1 -> [2, 64, 24];
    reduce_scatter [2, 64, 24] axis 1 -> [2, 8, 24]."""
    shapes = {"exchange": ((128, 4, 24), (128, 4, 24)), "gather": ((16, 8, 24), (16, 64, 24)),
              "reduce_scatter": ((16, 64, 24), (16, 8, 24))}
    kw = {} if name == "exchange" else {"axis": 1}
    in_shape, out_shape = shapes[name]
    x = with_outliers(jax.random.key(1), in_shape)
    ct = with_outliers(jax.random.key(2), out_shape)
    exact = getattr(C, name)
    quant = {"exchange": fp8.exchange, "gather": fp8.gather,
             "reduce_scatter": lambda a, axes, axis: fp8.reduce_scatter(a, axes, axis, 4)}[name]
    y, dx = value_and_vjp(quant, x, ct, **kw)
    y_ref, dx_ref = value_and_vjp(exact, x, ct, **kw)
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape
    # Bound per element: every term that reaches it (several where the collective sums) is
    # off by half an E4M3 step of itself, or a subnormal step of its scale (its row's amax,
    # or for the reduce-scatter's backward its channel's amax over 4 tokens, / 448). The
    # exact collective of those magnitudes sums them to where they land.
    row_max = lambda a: jnp.broadcast_to(jnp.max(jnp.abs(a), -1, keepdims=True), a.shape)

    def group_max(a):
        b, m, d = a.shape
        g = jnp.max(jnp.abs(a).reshape(b, m // 4, 4, d), axis=2, keepdims=True)
        return jnp.broadcast_to(g, (b, m // 4, 4, d)).reshape(a.shape)

    ct_floor = group_max(ct) if name == "reduce_scatter" else row_max(ct)
    y_mag, dx_mag = value_and_vjp(exact, jnp.abs(x), jnp.abs(ct), **kw)
    y_floor, dx_floor = value_and_vjp(exact, row_max(x), ct_floor, **kw)
    for got, ref, mag, floor in ((y, y_ref, y_mag, y_floor), (dx, dx_ref, dx_mag, dx_floor)):
        err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
        bound = E4M3_EPS * np.asarray(mag) + E4M3_TINY / 448 * np.asarray(floor)
        assert np.all(err <= bound * 1.001 + 1e-30), float(np.max(err / (bound + 1e-30)))
        assert float(np.max(err)) > 0  # it really went through FP8
    if name == "reduce_scatter":
        # The backward all_gather's per-channel scales: with a channel_group of 4 tokens, a
        # huge value in one channel leaves the other channels' resolution intact.
        ct = jnp.ones(out_shape).at[:, :, 0].set(1e6)
        _, dx = value_and_vjp(quant, x, ct, **kw)
        np.testing.assert_allclose(dx[:, :, 1:], 1.0, rtol=E4M3_EPS)


def test_fp8_ragged_move_of_copied_rows_matches_exact_forward_and_backward():
    """The FP8 ragged move (padded emulation of ragged_all_to_all on CPU) of rows copied out of
    x (each token row twice, as top-2 routing sends it), against the exact move: forward, and
    the backward that sends the cotangent back and sums each token's copies."""
    n, t, d = 8, 6, 16
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.integers(0, 2, (n, n)), jnp.int32)  # [src, dst] rows, sum <= 2t
    copies = jnp.asarray(rng.permutation(np.repeat(np.arange(t), 2)), jnp.int32)  # [2t]
    out_rows = n * 2 * t

    def move(x, impl):
        me = jax.lax.axis_index("x")
        send, recv = sizes[me], sizes[:, me]
        there = (jnp.cumsum(send) - send, send, (jnp.cumsum(sizes, 0) - sizes)[me], recv)
        back = (jnp.cumsum(recv) - recv, recv, (jnp.cumsum(sizes, 1) - sizes)[:, me], send)
        return impl(x, there, back, out_rows, C.ragged_exchange_padded, AXES,
                    lambda a, r: a[r], copies)

    x = with_outliers(jax.random.key(3), (n * t, d))
    ct = with_outliers(jax.random.key(4), (n * out_rows, d))

    run = lambda impl, ct: value_and_vjp(lambda a, axes: move(a, impl), x, ct)

    (y, dx), (y_ref, dx_ref) = run(fp8.ragged, ct), run(C.ragged_rows, ct)
    assert float(jnp.sum(y_ref != 0)) > 0 and float(jnp.sum(dx_ref != 0)) > 0
    np.testing.assert_array_equal(y == 0, y_ref == 0)  # the same rows moved
    # Bounds as in the test above: the exact move of |.| and of each row's amax sums the
    # rounding of every copy that reaches an element (a token's two copies in the backward).
    row_max = lambda a: jnp.broadcast_to(jnp.max(jnp.abs(a), -1, keepdims=True), a.shape)
    _, dx_mag = run(C.ragged_rows, jnp.abs(ct))
    _, dx_floor = run(C.ragged_rows, row_max(ct))
    y_floor = row_max(y_ref)
    for got, ref, mag, floor in ((y, y_ref, jnp.abs(y_ref), y_floor),
                                 (dx, dx_ref, dx_mag, dx_floor)):
        err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
        bound = E4M3_EPS * np.asarray(mag) + E4M3_TINY / 448 * np.asarray(floor)
        assert np.all(err <= bound * 1.001 + 1e-30), float(np.max(err / (bound + 1e-30)))
        assert float(np.max(err)) > 0


def ring_reduce_scatter_bf16(x, axes, n):
    """What a BF16 ring reduce-scatter (NCCL's) computes: the running sum of a chunk travels
    the ring and is rounded to BF16 at every hop. x: [n*m] -> [m] (chunk i on device i)."""
    i = jax.lax.axis_index(axes)
    chunks = x.astype(jnp.bfloat16).reshape(n, -1)
    partial = chunks[(i - 1) % n]
    for step in range(1, n):
        partial = jax.lax.ppermute(partial, axes, [(j, (j + 1) % n) for j in range(n)])
        partial = partial + chunks[(i - 1 - step) % n]  # a BF16 addition
    return partial.astype(jnp.float32)


def test_bf16_a2a_gradient_sum_matches_fp32_psum_within_bf16_rounding():
    g = jax.random.normal(jax.random.key(5), (8, 1000)) * jnp.exp(
        jax.random.normal(jax.random.key(6), (8, 1000)) * 3)  # magnitudes over decades
    ours = per_device(lambda a: bf16_a2a_sum(a[0], AXES)[None], g)
    exact = per_device(lambda a: jax.lax.psum(a, AXES), g)
    np.testing.assert_array_equal(ours[0], ours[5])  # every replica gets the same gradient
    # One rounding of each contribution plus one of the reduced shard.
    bound = BF16_EPS * (np.sum(np.abs(np.asarray(g)), axis=0) + np.abs(np.asarray(exact[0])))
    err = np.abs(np.asarray(ours[0]) - np.asarray(exact[0]))
    assert np.all(err <= bound * 1.0001)
    assert float(np.max(err)) > 0


def test_bf16_a2a_beats_a_bf16_ring_reduce_scatter_when_values_cancel():
    """Adversarial: on every element two devices hold +-B (B large, exact in BF16) and the
    other six small values; the sum is the small values'. The ring's running sum carries B
    over several hops, so each hop's BF16 rounding at B's scale swallows the small terms; the
    all_to_all rounds each term once and adds in FP32."""
    rng = np.random.default_rng(7)
    small = rng.uniform(0.5, 2.0, (8, 4096)).astype(np.float32)
    small = np.asarray(jnp.asarray(small).astype(jnp.bfloat16).astype(jnp.float32))
    g = small.copy()
    g[0], g[5] = 512.0, -512.0  # the ring adds device 0's B early, device 5's late
    exact = np.sum(g.astype(np.float64), axis=0)
    ours = per_device(lambda a: bf16_a2a_sum(a[0], AXES)[None], g)[0]
    ring = per_device(lambda a: ring_reduce_scatter_bf16(a[0], AXES, 8)[None], g).reshape(-1)
    err_ours = np.abs(np.asarray(ours) - exact)
    err_ring = np.abs(np.asarray(ring) - exact)
    assert np.max(err_ours) <= BF16_EPS * np.max(np.abs(exact)) * 1.0001
    assert np.mean(err_ring) > 20 * np.mean(err_ours), (np.mean(err_ring), np.mean(err_ours))


# -- whole model against the single-device reference ----------------------------------------


def test_gradient_accumulation_matches_the_reference_micro_batches():
    """Two micro-batches accumulated in FP32 and exchanged once equal the mean of the
    reference's two micro-batch gradients (fp32 tolerance)."""
    check_against_reference({"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **A2A},
                            MODEL, train={"grad_accum_steps": 2})


def relative_errors(run):
    return {path: float(np.linalg.norm(g - r) / np.linalg.norm(r))
            for path, g, r in run.grad_pairs()}


def test_bf16_a2a_gradient_exchange_on_the_model():
    """Replicated parameters over 8 and 4 devices, experts over their 2 expert_data copies:
    the forward is untouched and every gradient is the FP32 one within two BF16 roundings."""
    run = run_with_reference(
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4, **A2A}, MODEL,
        compression={"gradients": "bf16_a2a"})
    np.testing.assert_allclose(run.metrics["loss"], run.ref_metrics["loss"], rtol=1e-5)
    worst = 0.0
    for path, g, r in run.grad_pairs():
        err = float(np.max(np.abs(g - r)) / np.max(np.abs(r)))
        assert err <= 2 * BF16_EPS, (path, err)
        worst = max(worst, err)
    assert worst > 1e-6  # the exchange really rounded to BF16


FP8_ALL = {"dispatch": "fp8", "combine": "fp8", "tensor": "fp8", "channel_group": 16}
FP8_LAYOUTS = {
    "seq4xdata2-ep8-a2a-chunks2": {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
                                   "chunks": 2, **A2A},
    "tp2xseq2xdata2-tpattn-ep4xetp2-a2a": {"data": 2, "sequence": 2, "tensor": 2,
                                           "attention": "tensor", "expert_data": 1,
                                           "expert": 4, "expert_tensor": 2, **A2A},
    "data8-ep4xetp2-gather": {"expert_data": 1, "expert": 4, "expert_tensor": 2, **AG},
    "data8-ep2xed2xetp2-ragged": {"expert_data": 2, "expert": 2, "expert_tensor": 2, **RAGGED},
    # The ragged dispatch with the Pallas grouped GEMM (interpreted here).
    "seq4xdata2-ep8-ragged-pallas": {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
                                     **RAGGED},
}


@pytest.mark.parametrize("name", list(FP8_LAYOUTS))
def test_fp8_communication_on_the_model(name):
    """Every switch on (FP8 dispatch, combine and tensor-parallel collectives, both directions;
    BF16 gradient exchange) against the exact single-device reference: loss within 0.1%, each
    gradient within 12%
    (relative L2; a gradient crosses several E4M3 roundings of 3 significant bits, each
    ~2-3% RMS). Routing is top-8 of 8 experts here: with top-2, the FP8 noise of the
    tensor-parallel layers before the router flips near-tied expert choices, a discrete
    change that says nothing about the collectives."""
    kernel = {"grouped_gemm": "pallas"} if name.endswith("pallas") else None
    run = run_with_reference(FP8_LAYOUTS[name], {**MODEL, "top_k": 8}, kernel=kernel,
                             compression={**FP8_ALL, "gradients": "bf16_a2a"})
    loss, ref = float(run.metrics["loss"]), float(run.ref_metrics["loss"])
    errors = relative_errors(run)
    assert abs(loss - ref) <= 1e-3 * ref
    assert loss != ref  # FP8 really is on the path
    assert max(errors.values()) < 0.12, errors
    assert min(errors.values()) > 1e-4, errors


def test_training_with_every_switch_tracks_the_uncompressed_run(tmp_path):
    """12 steps (bf16 compute, 2 micro-batches per step, TP + SP + EP with expert_data
    copies) with every compression switch on against the same run uncompressed, same seed
    and data: every step's loss within 1%, and both learn."""
    from msmoe_jax.trainer import train

    common = dict(
        model={"num_experts": 8, "num_dense_layers": 1},
        parallel={"data": 2, "sequence": 2, "tensor": 2, "expert_data": 2, "expert": 4,
                  "dispatch": "all_to_all"},
        train={"steps": 12, "log_every": 1, "grad_accum_steps": 2},
        optimizer={"lr": 1e-2, "warmup_steps": 2})
    runs = {}
    for name, compression in (("exact", {}), ("compressed", {**FP8_ALL,
                                                              "gradients": "bf16_a2a"})):
        cfg = tiny_config(tmp_path / name, compression=compression, **common)
        runs[name] = np.array([r["loss"] for r in train(cfg)["history"]])
    exact, ours = runs["exact"], runs["compressed"]
    assert len(ours) == 12
    np.testing.assert_allclose(ours, exact, rtol=1e-2)
    assert not np.array_equal(ours, exact)
    assert ours[-1] < ours[0] - 0.5 and exact[-1] < exact[0] - 0.5


def test_compression_halves_the_default_configs_collective_bytes():
    """The default config's program as written: the gradient exchange moves half the bytes
    (BF16 all_to_all + all_gather against an FP32 all-reduce) and the MoE dispatch/combine
    d + 4 bytes per row against 2d in BF16 (1.94x at d = 128)."""
    from msmoe_jax.comms import DEFAULT_CONFIG, compressed, step_collectives
    from msmoe_jax.config import load_config
    from msmoe_jax.parallel.comm_bytes import by_scope

    cfg = validate_for(load_config(DEFAULT_CONFIG), 8)
    assert cfg.compression.gradients == "fp32" and cfg.model.dtype == "bfloat16"
    before = by_scope(step_collectives(cfg, hlo="lowered")[1])
    after = by_scope(step_collectives(compressed(cfg), hlo="lowered")[1])
    d = cfg.model.d_model
    assert before["grad_exchange"] / after["grad_exchange"] == pytest.approx(2.0, rel=0.01)
    assert before["moe_dispatch"] / after["moe_dispatch"] == pytest.approx(
        2 * d / (d + fp8.SCALE_BYTES), rel=0.01)
    assert after["ulysses"] == before["ulysses"]  # not compressed
