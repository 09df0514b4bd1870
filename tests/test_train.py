"""A short training run: the loss falls and the step compiles exactly once."""

import json

import numpy as np

from conftest import tiny_config
from msmoe_jax.trainer import train


def test_short_run_learns_and_compiles_once(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 25, "log_every": 1},
                      optimizer={"lr": 1e-2, "warmup_steps": 3})
    out = train(cfg)
    losses = [r["loss"] for r in out["history"]]
    assert len(losses) == 25
    assert out["traces"] == 1, f"train step traced {out['traces']} times"
    # Byte-level text starts at ~ln(256) = 5.5 and a working model gets well below it quickly.
    assert losses[0] > 5.0
    assert np.mean(losses[-3:]) < losses[0] - 1.5, losses
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert {"step", "loss", "ce", "aux_loss", "z_loss", "dropped_frac", "tokens_per_sec",
            "mfu", "lr", "grad_norm"} <= set(records[-1])
    assert records[-1]["tokens_per_sec"] > 0
