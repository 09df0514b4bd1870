"""Helpers the tests share: a tiny config, the train.py CLI in a subprocess, metrics files.
(JAX's device flags are set by conftest.py, which pytest loads first.)"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from msmoe_jax.config import config_from_dict
from msmoe_jax.parallel.mesh import validate_for

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path=None, device_count=8, **sections):
    """A small config for tests: ``tiny_config(tmp, model={'top_k': 1})``."""
    raw = {
        "seed": 0,
        "model": {"d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "num_experts": 4, "top_k": 2, "moe_d_ff": 32, "d_ff": 64},
        "train": {"steps": 8, "batch_size": 8, "seq_len": 32, "log_every": 1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every": 0},
        "data": {"max_bytes": 400_000},
        "run": {"dir": str(tmp_path / "run") if tmp_path else "runs/test", "progress": "lines"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return validate_for(config_from_dict(raw), device_count)


def write_config(cfg, path):
    """Writes a Config as YAML for train.py; returns the path."""
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def train_command(kill_after: int | None = None) -> list[str]:
    """The command line of train.py, or of train_with_faults.py that SIGKILLs the process
    right after step ``kill_after``."""
    if kill_after is None:
        return [sys.executable, str(ROOT / "train.py")]
    return [sys.executable, str(ROOT / "tests" / "train_with_faults.py"), "--kill-after",
            str(kill_after)]


def run_cli(*args, env=None, timeout=300, kill_after: int | None = None):
    """Runs train.py in a fresh process (8 simulated CPU devices) and returns the result."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*train_command(kill_after), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=str(ROOT))


def read_metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_script(path):
    """A script of the repository (train.py, benchmarks/x.py) as a module, by path."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
