"""The Pallas grouped GEMM (interpret mode on CPU) against ``jax.lax.ragged_dot`` and the
padded reference: outputs and the gradients of lhs, rhs and the row scales; fused permutation
against unfused; the whole model with kernel.grouped_gemm=pallas against the reference; the GPU
(Triton) lowering of every kernel, which needs no GPU; and, with the CUDA PJRT plugin
(``msmoe_jax.h100``), their compilation for H100 through XLA:GPU's Triton pipeline, which
checks what lowering does not (Triton's own verifier, PTX generation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equality import MODEL, RAGGED, check_against_reference
from msmoe_jax import h100
from msmoe_jax.config import ConfigError
from msmoe_jax.kernels.experts import fused_experts, pallas_dot
from msmoe_jax.kernels.grouped_gemm import Tiles, gmm, grouped_matmul, tgmm, work_items
from msmoe_jax.model.moe import ExpertWeights, experts_padded, grouped_experts
from support import tiny_config

HIGHEST = jax.lax.Precision.HIGHEST
SMALL = Tiles(bm=16, bn=16, bk=16)
# Ragged groups: empty ones (first, middle, last), a group inside one tile, groups straddling
# tile boundaries; their sum (61) leaves padding rows (up to 70) that must come out zero.
SIZES = np.array([0, 13, 0, 30, 1, 17, 0], np.int32)
ROWS, K, N = 70, 40, 24  # K, N not multiples of the tiles (padded inside)


def random(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def test_work_items_cover_every_row_once():
    group, tile, start, end = (np.asarray(a) for a in work_items(jnp.asarray(SIZES), ROWS, 16))
    covered = np.zeros(ROWS, int)
    for g, t in zip(group, tile):
        rows = np.arange(t * 16, t * 16 + 16)
        covered[rows[(rows >= start[g]) & (rows < end[g])]] += 1
    np.testing.assert_array_equal(covered, 1)  # groups and the padding group, no overlaps


@pytest.mark.slow
@pytest.mark.parametrize("gather", [False, True], ids=["plain", "gather-scatter-scale"])
def test_grouped_matmul_matches_ragged_dot(gather):
    """Outputs and the gradients of lhs, rhs (and scale) on ragged and empty groups."""
    sizes = jnp.asarray(SIZES)
    g = len(SIZES)
    rhs = random(1, (g, K, N))
    dy = random(2, (ROWS, N))
    if gather:  # rows read by index (with repeats), written to a permutation, scaled
        lhs = random(0, (50, K))
        src = jax.random.randint(jax.random.key(3), (ROWS,), 0, 50)
        dst = jax.random.permutation(jax.random.key(4), ROWS).astype(jnp.int32)
        scale = jax.random.uniform(jax.random.key(5), (ROWS,), minval=0.1)

        def ours(lhs, rhs, scale):
            return grouped_matmul(lhs, rhs, sizes, src, dst, scale, None, None, SMALL, True)

        def ref(lhs, rhs, scale):
            out = jax.lax.ragged_dot(lhs[src], rhs, sizes, precision=HIGHEST) * scale[:, None]
            return jnp.zeros((ROWS, N)).at[dst].set(out)

        args = (lhs, rhs, scale)
    else:
        lhs = random(0, (ROWS, K))
        ours = lambda lhs, rhs: grouped_matmul(lhs, rhs, sizes, tiles=SMALL, interpret=True)
        ref = lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs, sizes, precision=HIGHEST)
        args = (lhs, rhs)
    y, vjp = jax.vjp(ours, *args)
    y_ref, vjp_ref = jax.vjp(ref, *args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if not gather:
        assert not np.any(np.asarray(y)[SIZES.sum():])  # padding rows are zeros
    for name, a, b in zip(["lhs", "rhs", "scale"], vjp(dy), vjp_ref(dy)):
        assert float(jnp.max(jnp.abs(b))) > 0, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
    # The empty groups' weight gradient is exactly zero, not left uninitialised.
    assert not np.any(np.asarray(vjp(dy)[1])[SIZES == 0])


@pytest.mark.slow
def test_bf16_inputs_accumulate_in_float32():
    """bf16 in, fp32 accumulate: within bf16 rounding of the output, against an fp32 product
    of the same bf16 values (a bf16 accumulation over K=512 would be far worse)."""
    sizes = jnp.asarray([100, 0, 156], jnp.int32)
    lhs, rhs = random(0, (256, 512), jnp.bfloat16), random(1, (3, 512, 64), jnp.bfloat16)
    out = gmm(lhs, rhs, sizes, tiles=Tiles(bm=32, bn=32, bk=64), interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes,
                             precision=HIGHEST)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2 ** -7, atol=0.05)
    dw = tgmm(lhs, out, sizes, tiles=Tiles(bm=32, bn=32, bk=64), interpret=True)
    assert dw.dtype == jnp.float32


def _moe_inputs(t=40, d=24, f=40, e=6, k=2):
    keys = jax.random.split(jax.random.key(7), 5)
    w = ExpertWeights(*(0.3 * jax.random.normal(kk, s) for kk, s in
                        zip(keys[:3], [(e, d, f), (e, d, f), (e, f, d)])))
    probs = jax.nn.softmax(2 * jax.random.normal(keys[3], (t, e)))
    gates, idx = jax.lax.top_k(probs, k)
    return random(8, (t, d)), idx.astype(jnp.int32), gates, w


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_fused_permutation_matches_unfused_and_padded(capacity_factor):
    """Permute-in-prologue / gate-weighted un-permute-in-epilogue against the same kernel fed
    XLA-permuted rows and against the padded einsum: outputs, drops, and gradients of x, the
    three expert weights and the gates."""
    x, idx, gates, w = _moe_inputs()
    fns = {"padded": experts_padded,
           "unfused": grouped_experts(pallas_dot(SMALL, interpret=True)),
           "fused": fused_experts(SMALL, interpret=True)}
    results = {}
    for name, fn in fns.items():
        def loss(x, w, gates, fn=fn):
            y, dropped = fn(x, idx, gates, w, capacity_factor)
            return jnp.sum(jnp.sin(y)), dropped
        results[name] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, gates)
    (ref_loss, ref_dropped), ref_grads = results["padded"]
    if capacity_factor:
        assert float(ref_dropped) > 0
    for name in ("unfused", "fused"):
        (loss, dropped), grads = results[name]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert float(dropped) == float(ref_dropped)
        for i, (a, b) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))):
            assert float(jnp.max(jnp.abs(b))) > 0
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} grad {i}")


KERNEL = {"grouped_gemm": "pallas", "block_m": 16, "block_n": 16, "block_k": 16}


@pytest.mark.parametrize("parallel,fuse", [
    ({"data": 8}, True),
    ({"expert_data": 1, "expert": 4, "expert_tensor": 2, **RAGGED, "chunks": 2}, False),
], ids=["data8-fused", "data8-ep4xetp2-ragged-chunks2"])
@pytest.mark.slow
def test_model_with_pallas_kernel_matches_reference(parallel, fuse):
    """The whole model (loss, metrics, every gradient) with kernel.grouped_gemm=pallas equals
    the single-device reference, without and with expert parallelism (the ragged exchange in
    Megatron's order over expert_tensor devices, in the chunked pipeline)."""
    compiled = check_against_reference(parallel, {**MODEL, "expert_compute": "ragged_dot"},
                                       kernel={**KERNEL, "fuse_permute": fuse})
    assert "grouped_gemm" in compiled.as_text()  # the kernel really ran (interpreted)


TRITON = "__gpu$xla.gpu.triton"  # XLA:GPU's custom call of a Triton kernel
# The GPU that Pallas' Triton lowering targets without one: jax 0.11 reads it from the abstract
# mesh's device (or the default device, a CPU here), jax 0.10 does not need it.
H100_ABSTRACT = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


def _fused_experts_loss(tiles):
    fn = fused_experts(tiles, interpret=False)
    return lambda x, w, g, idx: jnp.sum(jnp.sin(fn(x, idx, g, w, None)[0].astype(jnp.float32)))


def _bf16_moe_inputs():
    x, idx, gates, w = _moe_inputs(t=64, d=64, f=128, e=4)
    return x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), w), gates, idx


@pytest.mark.slow
def test_triton_lowering_of_fused_experts_forward_and_backward():
    """The GPU path lowers to Triton kernels without a GPU or the CUDA plugin: all five kernels
    of the fused experts' forward and backward (jax.export for CUDA), in bf16."""
    x, w, gates, idx = _bf16_moe_inputs()
    grad = jax.grad(_fused_experts_loss(Tiles(bm=64, bn=64, bk=32)), argnums=(0, 1, 2))
    with jax.sharding.use_abstract_mesh(H100_ABSTRACT):
        exported = jax.export.export(
            jax.jit(grad), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(
                x, w, gates, idx)
    text = exported.mlir_module()
    # forward: gate, up, down; backward: 3 data-gradient GEMMs and 3 weight-gradient GEMMs.
    assert text.count(f"@{TRITON}") >= 8, text.count(f"@{TRITON}")


@pytest.fixture(scope="module")
def h100_mesh():
    """A one-device mesh of a compile-only H100 (needs the CUDA PJRT plugin)."""
    if not h100.available():
        pytest.skip(h100.INSTALL_HINT)
    return jax.make_mesh((1,), ("x",), devices=h100.devices(1))


def _compile_for_h100(fn, mesh, *args) -> str:
    """The optimised HLO of ``jit(fn)`` compiled for the mesh's H100 from ``args``' shapes.
    Under ``jax.set_mesh``: jax 0.11's Pallas Triton lowering takes the GPU to target from the
    mesh (not from the arguments' shardings), jax 0.10 takes it from the arguments."""
    on_gpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_gpu), args)
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*specs).compile().as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("gather", [False, True], ids=["plain", "gather-scatter-scale"])
def test_grouped_matmul_compiles_for_h100(h100_mesh, gather, dtype):
    """The forward kernel, the data-gradient kernel (transposed weights) and the weight-gradient
    kernel compile for H100 through Triton (the loop bounds once failed Triton's verifier,
    which lowering alone does not run), with and without row gather, scatter and scales."""
    tiles = Tiles(bm=16, bn=32, bk=16)
    g, rows = 4, 64
    lhs, rhs = random(0, (48 if gather else rows, K), dtype), random(1, (g, K, N), dtype)
    sizes = jnp.asarray([20, 0, 30, 7], jnp.int32)
    if gather:
        src = jax.random.randint(jax.random.key(3), (rows,), 0, 48)
        dst = jax.random.permutation(jax.random.key(4), rows).astype(jnp.int32)
        scale = jax.random.uniform(jax.random.key(5), (rows,), minval=0.1)

        def loss(lhs, rhs, scale, sizes, src, dst):
            y = grouped_matmul(lhs, rhs, sizes, src, dst, scale, None, jnp.float32, tiles, False)
            return jnp.sum(jnp.sin(y))

        args = (lhs, rhs, scale, sizes, src, dst)
        argnums = (0, 1, 2)
    else:
        def loss(lhs, rhs, sizes):
            y = grouped_matmul(lhs, rhs, sizes, tiles=tiles, interpret=False)
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))

        args = (lhs, rhs, sizes)
        argnums = (0, 1)
    text = _compile_for_h100(jax.value_and_grad(loss, argnums=argnums), h100_mesh, *args)
    assert text.count(f'custom_call_target="{TRITON}"') == 3  # forward, data grad, weight grad


def test_fused_experts_compile_for_h100(h100_mesh):
    """The fused experts' forward (gate, up, down) and backward (3 data- and 3 weight-gradient
    GEMMs) compile for H100 in bf16, the permutation and gate-weighted scatter included."""
    x, w, gates, idx = _bf16_moe_inputs()
    step = jax.value_and_grad(_fused_experts_loss(Tiles(bm=64, bn=64, bk=32)), argnums=(0, 1, 2))
    text = _compile_for_h100(step, h100_mesh, x, w, gates, idx)
    assert text.count(f'custom_call_target="{TRITON}"') == 9


@pytest.mark.parametrize("parallel,fuse", [
    ({"data": 8}, True),
    ({"expert_data": 2, "expert": 4, **RAGGED}, False),
], ids=["data8-fused", "ep4xed2-ragged"])
@pytest.mark.slow
def test_model_gpu_path_lowers_for_cuda(h100_mesh, parallel, fuse):
    """The compiled-kernel path (no interpreter) of a whole bf16 train step on 8 compile-only
    H100s (``strategy`` picks the GPU paths from the mesh's devices) traces under shard_map's
    varying-axes check, lowers and compiles: 3 forward + 6 backward Triton kernels per MoE
    layer. This checks the kernels' typing inside shard_map, which the interpreted runs
    (check_vma off) do not, and XLA:GPU's compilation of them with the collectives."""
    # Without train.py's XLA:GPU overlap flags: the kernels do not depend on them, and jax 0.11
    # has no xla_gpu_enable_pipelined_{all_gather,reduce_scatter,all_reduce} options.
    cfg = tiny_config(parallel=parallel, kernel={**KERNEL, "fuse_permute": fuse},
                      model={**MODEL, "dtype": "bfloat16", "expert_compute": "ragged_dot"},
                      run={"gpu_overlap_flags": False})
    text = h100.compile_step(cfg, 8).text
    moe_layers = MODEL["num_layers"] - MODEL["num_dense_layers"]
    assert text.count(f'custom_call_target="{TRITON}"') == 9 * moe_layers


def test_config_refuses_pallas_where_it_cannot_run():
    with pytest.raises(ConfigError, match="kernel.grouped_gemm"):
        tiny_config(kernel={"grouped_gemm": "pallas"}, model={"expert_compute": "padded"})
    with pytest.raises(ConfigError, match="kernel.grouped_gemm"):
        tiny_config(kernel={"grouped_gemm": "pallas"},
                    parallel={"expert_data": 2, "expert": 4, "dispatch": "all_gather"})
    with pytest.raises(ConfigError, match="kernel.block_m"):
        tiny_config(kernel={"block_m": 24})


@pytest.mark.slow
def test_benchmark_smoke_run(capsys):
    """benchmarks/grouped_gemm.py runs end to end on tiny shapes (no timing assertions)."""
    import importlib.util

    from support import ROOT

    spec = importlib.util.spec_from_file_location("bench_gg", ROOT / "benchmarks/grouped_gemm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--routing", "skewed"])
    out = capsys.readouterr().out
    for impl in ("pallas (ours)", "ragged_dot", "dense dot", "fused (ours)", "unfused, pallas"):
        assert impl in out, impl
