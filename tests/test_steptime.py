"""The step-time model: hand-checked timelines on toy graphs, and a compiled step read end to end."""

import pytest

from msmoe_jax.steptime.model import HARDWARE, Op, collective_seconds, schedule


def test_two_streams_overlap_independent_work():
    # a (2) -> comm c (3) -> d (1); b (4) independent of c: runs while c is in flight.
    ops = [Op("a", "compute", 2.0, ()), Op("c", "comm", 3.0, ("a",)),
           Op("b", "compute", 4.0, ()), Op("d", "compute", 1.0, ("c", "b"))]
    t = schedule(ops)
    assert t.starts == {"a": 0.0, "c": 2.0, "b": 2.0, "d": 6.0}
    assert t.step == 7.0 and t.compute == 7.0 and t.comm == 3.0 and t.exposed_comm == 0.0
    serial = schedule(ops, overlap=False)
    assert serial.step == 10.0 and serial.exposed_comm == 3.0


def test_dependent_chain_exposes_communication():
    # gemm0 -> a2a0 -> gemm1 with nothing beside the a2a: all of it is exposed.
    ops = [Op("g0", "compute", 1.0, ()), Op("x0", "comm", 2.5, ("g0",)),
           Op("g1", "compute", 1.0, ("x0",)), Op("gte", "none", 0.0, ("x0",))]
    t = schedule(ops)
    assert t.step == 4.5 and t.exposed_comm == 2.5 and t.ends["gte"] == 3.5


def test_chunked_pipeline_hides_all_but_the_first_transfer():
    # Two chunks: dispatch d_i (2) -> gemm g_i (3) -> return r_i (2). Chunk 1's dispatch runs
    # under chunk 0's GEMM, chunk 0's return under chunk 1's GEMM.
    ops = [Op("d0", "comm", 2.0, ()), Op("d1", "comm", 2.0, ()),
           Op("g0", "compute", 3.0, ("d0",)), Op("g1", "compute", 3.0, ("d1",)),
           Op("r0", "comm", 2.0, ("g0",)), Op("r1", "comm", 2.0, ("g1",))]
    t = schedule(ops)
    assert t.ends == {"d0": 2.0, "d1": 4.0, "g0": 5.0, "g1": 8.0, "r0": 7.0, "r1": 10.0}
    assert t.step == 10.0 and t.exposed_comm == 4.0  # first dispatch + last return
    assert schedule(ops, overlap=False).step == 14.0


def test_link_model():
    hw = HARDWARE["h100"].scaled(link_efficiency=1.0, a2a_efficiency=1.0, net_efficiency=1.0,
                                 net_a2a_efficiency=1.0, nvlink_alpha=0.0, net_alpha=0.0)
    mib = 2**20
    # all-gather of 8 MiB results inside a node: 7/8 of 8 MiB over 450 GB/s.
    assert collective_seconds("all-gather", 8 * mib, list(range(8)), hw) == pytest.approx(
        7 / 8 * 8 * mib / 450e9)
    # The same across two nodes is limited by the 50 GB/s network.
    assert collective_seconds("all-gather", 8 * mib, [0, 8], hw) == pytest.approx(
        0.5 * 8 * mib / 50e9)
    # all-to-all over 16 devices on two nodes: 7/16 by NVLink, 8/16 by network, in parallel.
    group = list(range(16))
    assert collective_seconds("all-to-all", 16 * mib, group, hw) == pytest.approx(
        8 * mib / 50e9)
    assert collective_seconds("all-reduce", 8 * mib, list(range(8)), hw) == pytest.approx(
        2 * 7 / 8 * 8 * mib / 450e9)


def test_useful_flops_by_scope_add_up_to_the_model_flops():
    from msmoe_jax.flops import train_flops_per_token
    from msmoe_jax.steptime.report import useful_flops_per_token
    from support import tiny_config

    m = tiny_config(model={"num_shared_experts": 1, "num_dense_layers": 1}).model
    parts = useful_flops_per_token(m, 32)
    assert sum(parts.values()) == pytest.approx(train_flops_per_token(m, 32))
    assert parts["experts"] == 6 * (m.num_layers - 1) * m.top_k * 3 * m.d_model * m.moe_d_ff


def test_bytes_and_flops_scale_with_gradient_accumulation():
    """The accumulation loop runs once per micro-batch: with the micro-batch fixed, two of
    them execute twice the expert exchange and the matmuls of one (the loop was counted once)."""
    from msmoe_jax.comms import build_step
    from msmoe_jax.parallel.comm_bytes import collectives
    from msmoe_jax.steptime.model import program_ops
    from support import tiny_config

    measured, loops = {}, {}
    for steps in (1, 2):
        cfg = tiny_config(parallel={"data": 2, "sequence": 4, "attention": "ulysses",
                                    "expert_data": 1, "expert": 8},
                          model={"num_experts": 8},
                          train={"batch_size": 8 * steps, "grad_accum_steps": steps})
        _, _, step, state, tokens = build_step(cfg)
        text = step.lower(state, tokens).compile().as_text()
        loops[steps] = text.count(" while(")
        found = collectives(text, 8)
        program = program_ops(text, 8, HARDWARE["h100"])
        dispatch = sum(c.bytes for c in found if c.scope == "moe_dispatch")
        measured[steps] = (dispatch, program.total_flops)
    assert loops[2] > loops[1]  # the accumulation loop stays a loop (beside the layer scans)
    assert measured[2][0] == pytest.approx(2 * measured[1][0], rel=1e-6)
    assert measured[2][1] == pytest.approx(2 * measured[1][1], rel=0.02)



KERNELS_HLO = """HloModule m
ENTRY %main (p0: s32[6], p1: s32[6], p2: s32[4], p3: s32[4], x: bf16[1024,64], w: bf16[4,64,32], g: bf16[1024,32], q: bf16[2,256,4,64]) -> f32[4,64,32] {
  %p0 = s32[6]{0} parameter(0)
  %p1 = s32[6]{0} parameter(1)
  %p2 = s32[4]{0} parameter(2)
  %p3 = s32[4]{0} parameter(3)
  %x = bf16[1024,64]{1,0} parameter(4)
  %w = bf16[4,64,32]{2,1,0} parameter(5)
  %g = bf16[1024,32]{1,0} parameter(6)
  %q = bf16[2,256,4,64]{3,2,1,0} parameter(7)
  %fwd = bf16[1024,32]{1,0} custom-call(%p0, %p1, %p2, %p3, %x, %w), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "grouped_gemm", num_warps = 8 : i32}
  %wgrad = f32[4,64,32]{2,1,0} custom-call(%p2, %p3, %x, %g), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "grouped_gemm_wgrad", num_warps = 8 : i32}
  %fa = (bf16[2,4,256,64]{3,1,2,0}, f32[2,4,256]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %fb = (bf16[2,4,256,64]{3,1,2,0}, bf16[2,4,256,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  ROOT %out = f32[4,64,32]{2,1,0} copy(%wgrad)
}
"""


def test_kernel_flops_are_modelled_over_routed_rows_and_causal_half():
    """The opaque custom calls get FLOPs: the Pallas grouped GEMMs over the routed rows of
    their buffer (1024 rows at fill 2 = 512, 4 experts of 128 rows, whole tiles), cuDNN flash
    attention over the causal half (forward 2, backward 5 x b h s^2 hd)."""
    from msmoe_jax.steptime.hlo import Routing, all_arrays, kernel_flops, parse

    entry, comps = parse(KERNELS_HLO)
    shapes = {k: v[0][1] for k, v in all_arrays(comps).items() if v}
    by = {i.name: i for i in entry}
    balanced = Routing(fill=2.0, tile_rows=128)
    assert kernel_flops(by["fwd"], shapes, balanced) == 2 * 512 * 64 * 32
    assert kernel_flops(by["wgrad"], shapes, balanced) == 2 * 512 * 64 * 32
    # 100-row tiles: 128 rows per expert take 2 tiles each in the weight gradient, and the
    # forward's tiles straddle experts (starts 0, 128, 256, 384 -> 2, 2, 2, 3 tiles) -> 900.
    tiles100 = Routing(fill=2.0, tile_rows=100)
    assert kernel_flops(by["wgrad"], shapes, tiles100) == 2 * 800 * 64 * 32
    assert kernel_flops(by["fwd"], shapes, tiles100) == 2 * 900 * 64 * 32
    # Never more than the whole buffer (skew past the fill).
    assert kernel_flops(by["fwd"], shapes, Routing(skew=4.0, fill=2.0)) == 2 * 1024 * 64 * 32
    assert kernel_flops(by["fa"], shapes) == 2 * 2 * 4 * 256 * 256 * 64
    assert kernel_flops(by["fb"], shapes) == 5 * 2 * 4 * 256 * 256 * 64
    assert kernel_flops(by["out"], shapes) == 0


def test_a_scan_over_stacked_layers_touches_one_layer_per_iteration():
    """Memory traffic of a scanned program: each iteration reads its layer's slice of the
    stacked weights and writes its slice of their gradient in place, so the step reads and
    writes the stack a few times, not once per iteration (which would make scanned layers
    look ~layers times as memory-bound as unrolled ones)."""
    import math

    import jax
    import jax.numpy as jnp

    from msmoe_jax.steptime.hlo import FREE, all_arrays, bytes_touched, flatten, parse

    w, x = jnp.zeros((60, 128, 128)), jnp.zeros((8, 128))

    def loss(w, x):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0].sum()

    text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
    entry, comps = parse(text)
    arrays_of = all_arrays(comps)
    run = [s.instr for s in flatten(entry, comps)
           if s.instr.op not in FREE and s.instr.op not in ("while", "call")]
    touched = sum(bytes_touched(i, comps, arrays_of) for i in run)
    whole = sum(i.result_bytes for i in run) + sum(
        sum(4 * math.prod(x) for _, x in arrays_of.get(o, ())) for i in run for o in i.operands)
    # Slices read and written (x2), forward and backward: ~12 stacks, against ~2 per layer
    # when every slice counts its whole stack.
    assert w.nbytes < touched < 20 * w.nbytes < 100 * w.nbytes < whole, (touched, whole)
