"""The collective-bytes tool: parsing HLO, and the paper's SP+EP vs TP+TP claim on a model."""

import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config, write_config
from msmoe_jax.comms import reference_layouts, step_collectives
from msmoe_jax.parallel.comm_bytes import by_scope, collectives


def test_hlo_parsing_sizes_and_groups():
    text = "\n".join([
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


def test_sp_ep_moves_fewer_bytes_than_tp_tp():
    """Ulysses attention sends about a quarter of tensor-parallel attention's bytes at n = 8
    (4 x (n-1)/n x T x d against 2 x (n-1) x T x d per layer), and the whole step less."""
    cfg = tiny_config(model={"num_heads": 8, "num_kv_heads": 8, "num_experts": 8,
                             "dtype": "float32"})
    by_layout = {}
    for name in ("SP+EP", "TP+TP"):
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, **reference_layouts(8)[name]))
        _, found = step_collectives(c.validate(8))
        by_layout[name] = by_scope(found)
    sp, tp = by_layout["SP+EP"], by_layout["TP+TP"]
    assert "tensor_attention" not in sp and "ulysses" not in tp
    assert sp["ulysses"] / tp["tensor_attention"] == pytest.approx(0.25, rel=0.05)
    assert sum(sp.values()) < sum(tp.values())


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
    assert r.returncode == 2 and r.stderr.startswith("error: parallel.expert_data")
