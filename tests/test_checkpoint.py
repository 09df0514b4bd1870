"""Checkpoints: kill and resume reproduces the run; restore onto another mesh; no partial steps."""

import shutil

import jax
import numpy as np
import pytest

from msmoe_jax.checkpoint import Checkpointer
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
    w_up = restored["params"]["blocks"][0]["ffn"]["w_up"][...]  # [E, d, f] over expert x etp
    assert w_up.addressable_shards[0].data.shape == (2, 32, 16)

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
