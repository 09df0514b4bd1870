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

    from conftest import tiny_config

    m = tiny_config(model={"num_shared_experts": 1, "num_dense_layers": 1}).model
    parts = useful_flops_per_token(m, 32)
    assert sum(parts.values()) == pytest.approx(train_flops_per_token(m, 32))
    assert parts["experts"] == 6 * (m.num_layers - 1) * m.top_k * 3 * m.d_model * m.moe_d_ff


def test_bytes_and_flops_scale_with_gradient_accumulation():
    """The accumulation loop runs once per micro-batch: with the micro-batch fixed, two of
    them execute twice the expert exchange and the matmuls of one (the loop was counted once)."""
    from conftest import tiny_config
    from msmoe_jax.comms import build_step
    from msmoe_jax.parallel.comm_bytes import collectives
    from msmoe_jax.steptime.model import program_ops

    measured = {}
    for steps in (1, 2):
        cfg = tiny_config(parallel={"data": 2, "sequence": 4, "attention": "ulysses",
                                    "expert_data": 1, "expert": 8},
                          model={"num_experts": 8},
                          train={"batch_size": 8 * steps, "grad_accum_steps": steps})
        _, _, step, state, tokens = build_step(cfg)
        text = step.lower(state, tokens).compile().as_text()
        assert (" while(" in text) == (steps > 1)  # the accumulation loop stays a loop
        found = collectives(text, 8)
        program = program_ops(text, 8, HARDWARE["h100"])
        dispatch = sum(c.bytes for c in found if c.scope == "moe_dispatch")
        measured[steps] = (dispatch, program.total_flops)
    assert measured[2][0] == pytest.approx(2 * measured[1][0], rel=1e-6)
    assert measured[2][1] == pytest.approx(2 * measured[1][1], rel=0.02)

