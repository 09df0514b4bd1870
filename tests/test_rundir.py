"""The run directory and what a run refuses to do: save non-finite state, share a directory
with another run, resume a checkpoint of another model, or hang on a coordinator that is not
there. Each failure is one ``error:`` line."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from msmoe_jax import distributed, rundir
from msmoe_jax.checkpoint import Checkpointer
from msmoe_jax.parallel.mesh import Layout, make_mesh
from msmoe_jax.state import init_state
from msmoe_jax.trainer import NonFiniteError, train
from support import load_script, read_metrics, run_cli, tiny_config, write_config


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_non_finite_step_is_never_applied_or_saved(tmp_path, capsys):
    """lr=1e6 makes the loss blow up within a few steps. Finiteness is logged only every 5
    steps but checkpoints are due every 2: the error names the first bad step, no checkpoint
    from it on exists, every saved one is finite, and a rerun with a sane lr resumes from the
    last of them."""
    common = dict(train={"steps": 10, "log_every": 5},
                  checkpoint={"every": 2, "keep": 10, "async_save": False})
    cfg = tiny_config(tmp_path, optimizer={"lr": 1e6, "warmup_steps": 0}, **common)
    with pytest.raises(NonFiniteError, match=r"^step (\d+): the loss or the gradients") as e:
        train(cfg)
    bad = int(str(e.value).split()[1].rstrip(":"))
    assert 1 <= bad < 10
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved and max(saved) < bad, (saved, bad)
    assert f"resumes from the last checkpoint, step {max(saved)}" in str(e.value)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))

    layout = Layout.from_config(cfg, 8)
    mesh = make_mesh(layout, jax.devices())
    _, _, target, _ = init_state(cfg, mesh, layout, abstract=True)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2, 10)
    for step in saved:
        state, _ = ckpt.restore(step, target)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), step
    ckpt.close()

    # The rerun resumes from the last (finite) checkpoint. Whether it then recovers depends on
    # how far the weights had diverged by then; if not, it stops again at a later step.
    capsys.readouterr()
    try:
        train(tiny_config(tmp_path, optimizer={"lr": 1e-4, "warmup_steps": 0}, **common))
    except NonFiniteError as again:
        assert int(str(again).split()[1].rstrip(":")) > max(saved)
    assert f"checkpoints/{max(saved)} at step {max(saved)}" in capsys.readouterr().out


def hold_lock(run_dir):
    """Another process holding the run directory's lock (until killed)."""
    code = ("import sys, time; from pathlib import Path; from msmoe_jax.rundir import RunLock;"
            "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_one_run_per_directory_and_stale_locks_are_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"theirs": true}')
    other = hold_lock(run_dir)
    try:
        with pytest.raises(rundir.RunDirError, match=f"another run is using it \\(process "
                                                     f"{other.pid} on "):
            train(tiny_config(tmp_path, train={"steps": 1}))
        # The refused run wrote nothing.
        assert (run_dir / "config.json").read_text() == '{"theirs": true}'
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    # The holder died without releasing anything: its lock file is still there, the lock not.
    assert json.loads((run_dir / rundir.LOCK).read_text())["pid"] == other.pid
    lock = rundir.RunLock(run_dir)
    lock.release()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_run_dir_that_is_a_file_is_one_error_line(tmp_path, capsys, where):
    train_cli = load_script("train.py")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    path = blocker if where == "file" else blocker / "run"
    config = write_config(tiny_config(tmp_path), tmp_path / "cfg.yaml")
    assert train_cli.main(["--config", str(config), "--set", f"run.dir={path}"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: run.dir={path}: not a directory (it, or a folder above "
                                "it, is a file); choose another run.dir"], err


@pytest.mark.slow
def test_refused_resume_names_the_changed_fields_and_keeps_config_json(tmp_path):
    """A checkpoint of a d_model=32 model, resumed with d_model=64: one error line naming the
    field, no traceback (Orbax's async threads included), and config.json still the saved
    run's."""
    cfg = tiny_config(tmp_path, train={"steps": 2}, checkpoint={"every": 2})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    r = run_cli("--config", config)
    assert r.returncode == 0, r.stderr
    saved = (tmp_path / "run" / "config.json").read_text()

    r = run_cli("--config", config, "--set", "model.d_model=64", "--set", "train.steps=4")
    assert r.returncode == 1, r.stderr
    assert error_lines(r.stderr) == [
        f"error: run.dir={tmp_path / 'run'}: cannot resume from step 2: its checkpoint holds "
        "another model or optimizer state (model.d_model: 32 -> 64, saved -> this config). Set "
        "those fields back, or start afresh with checkpoint.resume=false or another run.dir"], \
        r.stderr
    for noise in ("Traceback", "Event loop is closed", "strict=False"):
        assert noise not in r.stderr, r.stderr
    assert (tmp_path / "run" / "config.json").read_text() == saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waiting_for_the_coordinator_is_bounded_and_reported():
    notes = []
    t0 = time.monotonic()
    with pytest.raises(distributed.DistributedError, match="nothing answered within "
                                                           "distributed.init_timeout_s=1.5s"):
        distributed.wait_for_coordinator(f"127.0.0.1:{free_port()}", 1.5, every_s=0.5,
                                         say=notes.append)
    assert 1.5 <= time.monotonic() - t0 < 10
    assert notes and notes[0].startswith("waiting for the coordinator at 127.0.0.1:")
    with socket.socket() as server:  # something listening: no wait
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 1.0)


@pytest.mark.slow
def test_unresolvable_coordinator_fails_at_once(tmp_path):
    config = write_config(tiny_config(tmp_path), tmp_path / "cfg.yaml")
    t0 = time.monotonic()
    r = run_cli("--config", config, "--coordinator", "nonexistent.invalid:23456",
                "--num-processes", "2", "--process-id", "1", timeout=120)
    assert r.returncode == 1, r.stderr
    assert error_lines(r.stderr) and error_lines(r.stderr)[0].startswith(
        "error: --coordinator nonexistent.invalid:23456: cannot resolve host"), r.stderr
    assert time.monotonic() - t0 < 60


def test_run_lock_is_exclusive_until_released(tmp_path):
    first = rundir.RunLock(tmp_path)
    with pytest.raises(rundir.RunDirError, match=f"another run is using it \\(process "
                                                 f"{os.getpid()} on {socket.gethostname()}"):
        rundir.RunLock(tmp_path)
    first.release()
    rundir.RunLock(tmp_path).release()


def test_coordinator_addresses_are_parsed_before_waiting():
    with pytest.raises(distributed.DistributedError, match="port in 1..65535"):
        distributed.wait_for_coordinator("127.0.0.1:70000", 5)
    with pytest.raises(distributed.DistributedError, match="port in 1..65535"):
        distributed.wait_for_coordinator("127.0.0.1", 5)
    # [IPv6]:port is the form JAX takes: resolved, then waited for (nothing listens here).
    with pytest.raises(distributed.DistributedError, match="nothing answered"):
        distributed.wait_for_coordinator(f"[::1]:{free_port()}", 0.3, say=lambda _: None)


def test_finite_watch_names_the_first_bad_step():
    """Resumed at step 5: steps 6 (finite), 7 and 8 (not): the error names step 7."""
    from jax.sharding import PartitionSpec

    from msmoe_jax.trainer import FiniteWatch

    mesh = jax.make_mesh((8,), ("data",))
    watch = FiniteWatch(mesh, first_step=5)
    watch.check(None)  # nothing bad yet
    for ok in (True, False, False):
        watch.note(jax.device_put(np.bool_(ok), jax.NamedSharding(mesh, PartitionSpec())))
    with pytest.raises(NonFiniteError, match=r"^step 7: .*checkpoints are off"):
        watch.check(None)


def test_a_non_finite_step_leaves_the_state_unchanged(tmp_path):
    """The compiled step with one parameter poisoned: loss not finite, and the state comes
    back as it went in (step counter, parameters, optimizer state)."""
    from msmoe_jax.step import make_train_step

    cfg = tiny_config(tmp_path)
    layout = Layout.from_config(cfg, 8)
    mesh = make_mesh(layout, jax.devices())
    graphdef, optimizer, state, specs = init_state(cfg, mesh, layout)
    leaves, tree = jax.tree.flatten(state["params"])
    leaves[0] = leaves[0] * np.nan
    state = dict(state, params=jax.tree.unflatten(tree, leaves))
    before = jax.device_get(state)
    step = make_train_step(cfg, graphdef, optimizer, mesh, layout, specs)
    tokens = jax.device_put(np.ones((cfg.train.batch_size, cfg.train.seq_len + 1), np.int32),
                            jax.NamedSharding(mesh, layout.batch))
    after, metrics = step(state, tokens)
    assert not bool(metrics["finite"])
    assert int(after["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), before)
