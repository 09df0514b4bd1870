"""The collective-bytes tool: parsing HLO, and the paper's SP+EP vs TP+TP claim on a model."""

import dataclasses
import subprocess
import sys

import pytest

from msmoe_jax.comms import reference_layouts, step_collectives
from msmoe_jax.parallel.comm_bytes import by_scope, collectives
from msmoe_jax.parallel.mesh import validate_for
from msmoe_jax.steptime.hlo import Routing, collective_payload, flatten, parse, replica_groups
from support import ROOT, tiny_config, write_config


def entry(*lines, extra=""):
    """An HLO module whose entry computation holds ``lines`` (plus computations ``extra``)."""
    return "\n".join([extra, "ENTRY %main (p: f32[8]) -> f32[8] {", *lines, "}"])


def test_hlo_parsing_sizes_and_groups():
    text = entry(*[
        '  %a = f32[16,8]{1,0} all-reduce(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, '
        'to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/psum"}',
        '  %b = (bf16[4,2]{1,0}, bf16[4,2]{1,0}) all-to-all(%y, %z), replica_groups=[1,8]<=[8], '
        'metadata={op_name="jit(step)/moe_dispatch/all_to_all"}',
        '  %c = f32[32]{0} all-gather(%w), replica_groups={{0,1}}, dimensions={0}',
        '  %d = f32[8]{0} reduce-scatter(%v), replica_groups={{0,1,2,3,4,5,6,7}}',
        '  %e = (f32[8]{0}, f32[64]{0}) all-gather-start(%u), replica_groups={{0,1,2,3,4,5,6,7}}',
        '  %f = f32[64]{0} all-gather-done(%e)',
    ])
    a, b, c, d, e = collectives(text, 8)
    assert (a.op, a.group, a.scope, a.bytes) == ("all-reduce", 4, "other", 16 * 8 * 4 * 2 * 3 / 4)
    assert (b.op, b.group, b.scope, b.bytes) == ("all-to-all", 8, "moe_dispatch", 2 * 16 * 7 / 8)
    assert (c.group, c.bytes) == (2, 32 * 4 / 2)
    assert d.bytes == 8 * 4 * 7  # sends 7/8 of an operand 8x its result
    assert (e.op, e.shapes, e.bytes) == ("all-gather", ((64,),), 64 * 4 * 7 / 8)


def test_both_replica_group_forms():
    """jax 0.10 prints explicit or iota groups; jax 0.11 names the mesh axes a group spans."""
    forms = {
        "explicit": "replica_groups={{0,1,2,3},{4,5,6,7}}",
        "iota": "replica_groups=[2,4]<=[8]",
        "mesh": "replica_groups=mesh['a'=2,'b'=4] {'b'}",
    }
    for form, groups in forms.items():
        instr = parse(entry(f"  %x = bf16[64,8]{{1,0}} all-to-all(%p), {groups}"))[0][0]
        assert replica_groups(instr, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]], form
    # Groups over the first axis, and over both (order of the listed axes kept row-major).
    over_a = parse(entry("  %x = f32[8] all-reduce(%p), replica_groups=mesh['a'=2,'b'=4] {'a'}"))
    assert replica_groups(over_a[0][0], 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    both = parse(entry("  %x = f32[8] all-reduce(%p), replica_groups=mesh['a'=2,'b'=4] {'a','b'}"))
    assert replica_groups(both[0][0], 8) == [list(range(8))]
    # As jax 0.11 names the axes of shard_map's folded views.
    folded = parse(entry("  %x = f32[8] all-reduce(%p), replica_groups=mesh['data:expert'=2,"
                         "'sequence:expert'=4] {'sequence:expert'}"))
    assert replica_groups(folded[0][0], 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # The Ulysses all_to_all over 4 of 8 devices is costed over 4, not 8.
    (c,) = collectives(entry(f"  %x = bf16[64,8]{{1,0}} all-to-all(%p), {forms['mesh']}"), 8)
    assert c.group == 4 and c.bytes == 64 * 8 * 2 * 3 / 4


LOOP = """
%body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[16]{0} get-tuple-element(%t), index=1
  %w = f32[16]{0} all-reduce(%v), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %r = (s32[], f32[16]{0}) tuple(%i, %w)
}

%cond (t: (s32[], f32[16])) -> pred[] {
  %t.1 = (s32[], f32[16]{0}) parameter(0)
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%t.1, %c), direction=LT
}
"""


def test_loops_count_every_iteration():
    """A collective inside a while body is executed once per iteration: XLA's known trip
    count, or the bound of the loop condition."""
    known = entry('  %l = (s32[], f32[16]{0}) while(%p), condition=%cond, body=%body, '
                  'backend_config={"known_trip_count":{"n":"3"}}', extra=LOOP)
    assert len(collectives(known, 8)) == 3
    from_condition = entry("  %l = (s32[], f32[16]{0}) while(%p), condition=%cond, body=%body",
                           extra=LOOP)
    found = collectives(from_condition, 8)
    assert len(found) == 5 and found[0].bytes == 16 * 4 * 2 * 7 / 8
    # The step-time model runs the iterations one after the other.
    steps = flatten(*parse(known))
    reduces = [s for s in steps if s.instr.op == "all-reduce"]
    assert [s.name for s in reduces] == ["l#0/w", "l#1/w", "l#2/w"]
    assert reduces[1].deps == ("l#1/v",)
    assert [s.deps for s in steps if s.name == "l#1/t"] == [("l#0/r",)]


def test_ragged_all_to_all_costed_by_the_rows_it_carries():
    """The landing buffer is sized for the worst case (here 4x the routed rows); the bytes are
    the routed rows', times the routing's skew, never more than the buffer."""
    text = entry("  %send = bf16[100,8]{1,0} parameter(0)",
                 "  %out = bf16[400,8]{1,0} parameter(1)",
                 "  %x = bf16[400,8]{1,0} ragged-all-to-all(%send, %out, %a, %b, %c, %d), "
                 "replica_groups={{0,1,2,3,4,5,6,7}}")
    (balanced,) = collectives(text, 8)
    assert balanced.bytes == 100 * 8 * 2 * 7 / 8
    (skewed,) = collectives(text, 8, Routing(skew=2.0))
    assert skewed.bytes == 2 * balanced.bytes
    (worst,) = collectives(text, 8, Routing(skew=10.0))
    assert worst.bytes == 400 * 8 * 2 * 7 / 8


@pytest.mark.slow
def test_sp_ep_moves_fewer_bytes_than_tp_tp():
    """Ulysses attention sends about a quarter of tensor-parallel attention's bytes at n = 8
    (4 x (n-1)/n x T x d against 2 x (n-1) x T x d per layer), and the whole step less."""
    cfg = tiny_config(model={"num_heads": 8, "num_kv_heads": 8, "num_experts": 8,
                             "dtype": "float32"})
    by_layout = {}
    for name in ("SP+EP", "TP+TP"):
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, **reference_layouts(8)[name]))
        _, found = step_collectives(validate_for(c, 8))
        by_layout[name] = by_scope(found)
    sp, tp = by_layout["SP+EP"], by_layout["TP+TP"]
    assert "tensor_attention" not in sp and "ulysses" not in tp
    assert sp["ulysses"] / tp["tensor_attention"] == pytest.approx(0.25, rel=0.05)
    assert sum(sp.values()) < sum(tp.values())


@pytest.mark.slow
def test_comms_cli(tmp_path):
    cfg = tiny_config(tmp_path, model={"num_experts": 8})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.comms", "--config", str(config),
                        "--set", "parallel.sequence=4", "--set", "parallel.data=2",
                        "--set", "parallel.expert=8", "--set", "parallel.expert_data=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "data 2 x sequence 4" in r.stdout
    assert "ulysses" in r.stdout and "moe_dispatch" in r.stdout and "total" in r.stdout
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.comms", "--config", str(config),
                        "--set", "parallel.expert=3"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "\nerror: parallel.expert_data" in "\n" + r.stderr


NESTED = LOOP.replace("%body", "%inner").replace("%cond", "%inner_cond") + """
%outer (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %o = (s32[], f32[16]{0}) parameter(0)
  %in = (s32[], f32[16]{0}) while(%o), condition=%inner_cond, body=%inner, backend_config={"known_trip_count":{"n":"2"}}
  %x = f32[16]{0} get-tuple-element(%in), index=1
  %y = f32[16]{0} all-gather(%x), replica_groups={{0,1}}, dimensions={0}
  %j = s32[] get-tuple-element(%in), index=0
  ROOT %out = (s32[], f32[16]{0}) tuple(%j, %y)
}
"""


def test_nested_loops_run_in_order():
    """A loop inside a loop body: 3 outer x 2 inner iterations, and each outer iteration waits
    on the previous one's ROOT (not on a step of its inner loop)."""
    text = entry('  %l = (s32[], f32[16]{0}) while(%p), condition=%inner_cond, body=%outer, '
                 'backend_config={"known_trip_count":{"n":"3"}}', extra=NESTED)
    found = collectives(text, 8)
    assert [c.op for c in found].count("all-reduce") == 6
    assert [c.op for c in found].count("all-gather") == 3
    steps = {s.name: s for s in flatten(*parse(text))}
    assert steps["l#1/o"].deps == ("l#0/out",)
    assert steps["l#1/in#0/t"].deps == ("l#1/o",)
    assert steps["l#1/x"].deps == ("l#1/in",) and steps["l#1/in"].deps == ("l#1/in#1/r",)


def test_deep_programs_add_the_blocks_they_did_not_compile():
    from msmoe_jax.comms import more_blocks
    from msmoe_jax.parallel.comm_bytes import Collective

    grad = Collective("all-reduce", "grad_exchange", ((4,),), 8, 28.0)
    a2a = Collective("all-to-all", "moe_dispatch", ((8,),), 8, 14.0)
    two, four = [grad, a2a, a2a], [grad, a2a, a2a, a2a, a2a]  # a block: 1 exchange
    assert sorted(c.op for c in more_blocks(two, four, 3)) == ["all-reduce"] + ["all-to-all"] * 10


def test_async_all_reduce_counts_its_results_once():
    """jax 0.11's XLA types an all-reduce-start ((operands), results): the operands are not
    moved twice. The older form (results alone, combined) keeps every result."""
    new = parse(entry(
        "%a = f32[1000]{0} parameter(0)",
        "%s = ((f32[1000]{0}), f32[1000]{0}) all-reduce-start(%a), channel_id=1, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add",
        "ROOT %d = f32[1000]{0} all-reduce-done(%s)"))[0]
    old = parse(entry(
        "%a = f32[1000]{0} parameter(0)",
        "%b = f32[24]{0} parameter(1)",
        "%s = (f32[1000]{0}, f32[24]{0}) all-reduce-start(%a, %b), channel_id=1, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add",
        "ROOT %d = (f32[1000]{0}, f32[24]{0}) all-reduce-done(%s)"))[0]
    start = lambda instrs: next(i for i in instrs if i.op == "all-reduce-start")
    assert collective_payload(start(new)) == 4000
    assert collective_payload(start(old)) == 4096
