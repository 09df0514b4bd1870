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
from msmoe_jax.steptime.hlo import dependents, flops, parse

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


def tiny_mixtral(path, **overrides):
    """A tiny random transformers Mixtral saved to ``path`` (needs torch and transformers)."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(**{**dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, rope_theta=5000.0,
        rms_norm_eps=1e-5), **overrides})
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def assert_chunks_independent(hlo: str, chunks: int):
    """In the compiled program, no collective of chunk i+1's MoE dispatch (forward or
    backward) depends on chunk i's expert GEMMs.

    The expert GEMMs of a chunk are the instructions with matmul FLOPs between its two
    collectives (dispatch -> GEMMs -> return), found from the graph since XLA drops the
    names of some fused dots.
    """
    entry, comps = parse(hlo)
    shapes = {i.name: i.arrays[0][1] for i in entry if i.arrays}
    reach = dependents(entry)
    gemm = {i.name for i in entry if flops(i, comps, shapes) > 0}
    for phase in ("/", "_bwd/"):
        coll = [[i.name for i in entry if i.collective and "moe_dispatch" in i.op_name
                 and f"chunk{c}{phase}" in i.op_name] for c in range(chunks)]
        for c in range(chunks):
            first = [a for a in coll[c] if any(b in reach[a] for b in coll[c])]
            assert first, (phase, c, coll[c])  # dispatch reaches its return through GEMMs
            gemms = {g for a in first for g in reach[a] & gemm
                     if any(b in reach[g] for b in coll[c])}
            assert gemms, (phase, c)
            if c + 1 < chunks:
                late = [g for g in gemms if any(b in reach[g] for b in coll[c + 1])]
                assert not late, f"chunk {c + 1}'s collectives wait for chunk {c}'s GEMMs {late}"
