"""What a run reports: per-layer expert loads and drops in metrics.jsonl, TensorBoard events,
and a profiler trace."""

import numpy as np
import pytest

from msmoe_jax.trainer import train
from support import read_metrics, run_cli, tiny_config


@pytest.mark.slow
def test_expert_loads_tensorboard_and_profile(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 4, "log_every": 1},
                      model={"num_layers": 3, "num_dense_layers": 1, "moe_mode": "capacity",
                             "capacity_factor": 1.0},
                      run={"tensorboard": True, "profile_steps": 2})
    train(cfg)
    m, t = cfg.model, cfg.train
    assignments = t.batch_size * t.seq_len * m.top_k
    for record in read_metrics(tmp_path / "run"):
        loads = np.asarray(record["expert_tokens"])
        dropped = np.asarray(record["dropped_tokens"])
        assert loads.shape == (2, m.num_experts) and dropped.shape == (2,)  # the 2 MoE layers
        np.testing.assert_allclose(loads.sum(axis=1), assignments)  # counted before drops
        np.testing.assert_allclose(dropped.sum() / (2 * assignments), record["dropped_frac"],
                                   rtol=1e-5)
    assert any(r["dropped_frac"] > 0 for r in read_metrics(tmp_path / "run"))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))


def test_profile_flag_sets_profile_steps():
    r = run_cli("--profile", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "profile_steps: 3" in r.stdout
    r = run_cli("--profile", "5", "--print-config")
    assert "profile_steps: 5" in r.stdout


def test_half_given_process_flags_are_refused():
    r = run_cli("--coordinator", "127.0.0.1:1234", "--set", "train.steps=1")
    assert r.returncode == 2
    assert "--num-processes, --process-id: needed as well" in r.stderr
