"""Eight simulated CPU devices for every test; must run before JAX is imported."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates the suite: programs compiled again (the same step in several CLI runs,
# processes and tests) come from a compilation cache that lives as long as the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="msmoe-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from msmoe_jax.config import config_from_dict  # noqa: E402
from msmoe_jax.parallel.mesh import validate_for  # noqa: E402

assert jax.device_count() == 8, "conftest must run before JAX is initialised"


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
    import yaml
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def run_cli(*args, env=None, timeout=300):
    """Runs train.py in a fresh process (8 simulated CPU devices) and returns the result."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=str(ROOT))


def read_metrics(run_dir):
    import json
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
