"""Checkpoints: kill and resume reproduces the run; restore onto another mesh; no partial steps."""

import shutil

import jax
import numpy as np
import pytest

from msmoe_jax.checkpoint import Checkpointer, CheckpointError
from msmoe_jax.parallel.mesh import Layout, make_mesh
from msmoe_jax.state import init_state
from msmoe_jax.trainer import train
from support import read_metrics, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 9, "log_every": 1},
                      checkpoint={"every": 3, "keep": 2})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    full, broken = tmp_path / "full", tmp_path / "broken"

    r = run_cli("--config", config, "--set", f"run.dir={full}")
    assert r.returncode == 0, r.stderr

    r = run_cli("--config", config, "--set", f"run.dir={broken}", kill_after=7)
    assert r.returncode == -9, (r.returncode, r.stderr)  # SIGKILL: no cleanup, no final save
    assert [m["step"] for m in read_metrics(broken)] == list(range(1, 8))

    r = run_cli("--config", config, "--set", f"run.dir={broken}")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and ("at step 6" in r.stdout or "at step 3" in r.stdout)

    expected, resumed = read_metrics(full), read_metrics(broken)
    assert [m["step"] for m in resumed] == list(range(1, 10))  # redone steps replace old ones
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in expected],
                               rtol=1e-6)


def test_restore_onto_a_different_layout_and_mesh(tmp_path):
    """Saved under a folded layout on 8 devices (Ulysses attention, expert parallelism),
    restored exactly under another on 4 devices (tensor-parallel attention, experts split
    differently), and training continues with the same losses."""
    model = {"dtype": "float32"}
    cfg8 = tiny_config(tmp_path, model=model, train={"steps": 4},
                       parallel={"data": 2, "sequence": 4, "expert_data": 2, "expert": 4},
                       checkpoint={"every": 2, "keep": 3, "async_save": False})
    out8 = train(cfg8)
    trained = jax.device_get(out8["state"])

    devices4 = jax.devices()[:4]
    cfg4 = tiny_config(tmp_path, model=model, train={"steps": 4},
                       parallel={"data": 2, "tensor": 2, "attention": "tensor",
                                 "expert_data": 1, "expert": 2, "expert_tensor": 2},
                       checkpoint={"every": 2, "keep": 3}, device_count=4)
    layout4 = Layout.from_config(cfg4, 4)
    mesh4 = make_mesh(layout4, devices4)
    _, _, target, _ = init_state(cfg4, mesh4, layout4, abstract=True)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2, 3)
    restored, data_state = ckpt.restore(4, target)
    ckpt.close()
    assert int(restored["step"]) == 4 and data_state
    for got, want, like in zip(jax.tree.leaves(restored), jax.tree.leaves(trained),
                               jax.tree.leaves(target)):
        assert got.sharding == like.sharding
        np.testing.assert_array_equal(np.asarray(got), want)
    w_up = restored["params"]["moe_blocks"]["ffn"]["w_up"][...]  # [L, E, d, f]: expert x etp
    assert w_up.addressable_shards[0].data.shape[1:] == (2, 32, 16)

    # Continue under the 4-device layout from step 2: the 8-device run's losses (fp32).
    run4 = tmp_path / "run4"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "2", run4 / "checkpoints" / "2")
    cfg4.run.dir = str(run4)
    out4 = train(cfg4, devices=devices4)
    assert out4["start_step"] == 2
    np.testing.assert_allclose([r["loss"] for r in out4["history"]],
                               [r["loss"] for r in out8["history"][2:]], rtol=2e-5)


def test_partial_checkpoint_is_ignored(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 2}, checkpoint={"every": 2})
    train(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    # What a save killed half-way leaves behind: an uncommitted temporary step directory.
    (ckpt_dir / "7.orbax-checkpoint-tmp-1700000000").mkdir()
    (ckpt_dir / "7.orbax-checkpoint-tmp-1700000000" / "junk").write_text("partial")
    assert Checkpointer(ckpt_dir, 2, 2).latest_step() == 2


def test_checkpoints_with_one_entry_per_layer_are_refused_by_name(tmp_path):
    """Checkpoints written before the blocks were stacked (params.blocks.N) are refused with
    one message saying why, on resume and as init_from/export sources."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from msmoe_jax.convert import ConversionError, restore_params

    cfg = tiny_config(tmp_path)
    layout = Layout.from_config(cfg, 1)
    mesh = make_mesh(layout, jax.devices()[:1])
    _, _, target, _ = init_state(cfg, mesh, layout, abstract=True)
    old = {"step": jnp.zeros((), jnp.int32),
           "params": {"blocks": {"0": {"attn": {"wq": {"value": jnp.ones((64, 4, 16))}}}}}}
    ckpt = Checkpointer(tmp_path / "ckpts", 1, 2, async_save=False)
    ckpt.save(3, old, {"next_window": 0, "seq_len": 16}, force=True)
    with pytest.raises(CheckpointError, match="its layers are stored one by one"):
        ckpt.restore(3, target)
    ckpt.close()
    with ocp.StandardCheckpointer() as c:
        c.save(tmp_path / "imported" / "params", old["params"])
    with pytest.raises(ConversionError, match="its layers are stored one by one"):
        restore_params(tmp_path / "imported", cfg, mesh, layout)
    with pytest.raises(ConversionError, match="its layers are stored one by one"):
        restore_params(tmp_path / "ckpts" / "3", cfg, mesh, layout)
