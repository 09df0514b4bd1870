"""Multi-process training on one machine: two train.py processes with 4 simulated CPU devices
each (gloo collectives between them) form the default config's 8-device mesh.

They train to the losses of one process with 8 devices, write one metrics file and a
checkpoint that a single process resumes; a killed process stops the other within a bounded
time instead of leaving it in a collective forever.
"""

import os
import socket
import subprocess
import time

import numpy as np
import pytest

from msmoe_jax.config import load_config
from msmoe_jax.trainer import train
from support import ROOT, read_metrics, train_command

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

DEFAULT = ROOT / "configs" / "default.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(run_dir, *overrides, kill_after: dict[int, int] | None = None):
    """Starts the two processes of one run; returns them (stdout/stderr to files in run_dir)."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The tests' own 8-device flag must not reach the children: each has 4 devices.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in range(2):
        args = [*train_command((kill_after or {}).get(pid)), "--config", str(DEFAULT),
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(pid), "--set", "run.cpu_devices=4",
                "--set", f"run.dir={run_dir}", "--set", "run.progress=lines",
                *[a for o in overrides for a in ("--set", o)]]
        out = open(run_dir / f"process{pid}.log", "w")
        procs.append(subprocess.Popen(args, env=env, cwd=str(ROOT), stdout=out,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs, run_dir, timeout=300):
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(run_dir / f"process{i}.log").read_text() for i in range(len(procs))]
    return codes, logs


def test_two_processes_train_like_one(tmp_path):
    # A flat learning rate after warm-up, so the 4-step and 6-step runs share a schedule.
    common = ["train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false",
              "optimizer.warmup_steps=2", "optimizer.min_lr_ratio=1.0"]
    two = tmp_path / "two"
    codes, logs = wait_all(start_processes(two, "train.steps=4", *common), two)
    assert codes == [0, 0], logs
    assert "over 8 cpu devices in 2 processes" in logs[0]
    assert "step      1" not in logs[1], "only process 0 logs"
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]

    # The same run in this process (8 devices), and the two-process checkpoint resumed here.
    overrides = [o for o in common if "checkpoint.every" not in o]
    one = load_config(DEFAULT, ["train.steps=6", "checkpoint.every=0", "run.progress=lines",
                                f"run.dir={tmp_path / 'one'}", *overrides])
    ref = [r["loss"] for r in train(one)["history"]]
    resumed = load_config(DEFAULT, ["train.steps=6", "run.progress=lines", f"run.dir={two}",
                                    *common])
    out = train(resumed)
    assert out["start_step"] == 4

    losses = [r["loss"] for r in read_metrics(two)]
    assert [r["step"] for r in read_metrics(two)] == list(range(1, 7))
    print("two processes (1-4) then one resumed (5-6):", losses, "\none process:", ref)
    np.testing.assert_allclose(losses, ref, rtol=2e-4)
    assert losses[-1] < losses[0] - 0.5


def test_killed_process_stops_the_other(tmp_path):
    run = tmp_path / "killed"
    t0 = time.monotonic()
    procs = start_processes(run, "train.steps=500", "train.log_every=1", "checkpoint.every=0",
                            "distributed.heartbeat_timeout_s=10", kill_after={1: 2})
    codes, logs = wait_all(procs, run, timeout=240)
    elapsed = time.monotonic() - t0
    assert codes[1] == -9, logs[1]  # killed itself after step 2
    assert codes[0] not in (0, None), logs[0]
    assert "step      2" in logs[0] and "step    500" not in logs[0]
    assert "another task died" in logs[0] or "heartbeat" in logs[0], logs[0][-3000:]
    print(f"the surviving process stopped {elapsed:.0f}s after the start, code {codes[0]}")


def test_process_settings_from_flags_environment_or_cluster():
    import argparse

    import pytest

    from msmoe_jax.distributed import DistributedError, ProcessSpec, resolve

    flags = lambda **kw: argparse.Namespace(**{"coordinator": None, "num_processes": None,
                                               "process_id": None, **kw})
    assert resolve(flags(), {}) == ProcessSpec()
    assert not resolve(flags(), {}).multi_process
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert resolve(flags(), env) == ProcessSpec("h0:1234", 4, 2)
    assert resolve(flags(process_id=3), env) == ProcessSpec("h0:1234", 4, 3)  # flags win
    assert resolve(flags(), {"SLURM_NTASKS": "16"}) == ProcessSpec(cluster="SLURM")
    assert not resolve(flags(), {"SLURM_NTASKS": "1"}).multi_process
    assert resolve(flags(), {"OMPI_COMM_WORLD_SIZE": "2"}).cluster == "Open MPI"
    with pytest.raises(DistributedError, match="--process-id: must be in 0..3"):
        resolve(flags(process_id=4), env)
    with pytest.raises(DistributedError, match="--coordinator: expected HOST:PORT"):
        resolve(flags(coordinator="h0", num_processes=2, process_id=0), {})
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES: expected an integer"):
        resolve(flags(), {"JAX_NUM_PROCESSES": "two"})
