"""Modelled step time, exposed communication and MFU of the overlap schedules, from compiled
training steps (nothing runs), plus the compiled peak memory of each remat policy.

    python benchmarks/overlap.py                 # default model (8 devices) + Mixtral-like
    python benchmarks/overlap.py --quick         # default model only

Each row compiles one training step for H100s (msmoe_jax/h100.py, with ``.[h100-compile]``;
else on simulated CPU devices, said in the output) and replays it on a modelled cluster
(msmoe_jax/steptime): H100 nodes of 8 GPUs, NVLink inside, 400 Gb/s per GPU across. The
32-node rows run in a child process (with 256 simulated devices on the CPU fallback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msmoe_jax.cli import simulate_cpu_devices  # noqa: E402
from msmoe_jax.h100 import platforms_for_compiling  # noqa: E402


def compiled_step(cfg, n: int):
    """(HLO text, memory analysis) of cfg's step for n H100s, or on n simulated CPU devices
    when the CUDA plugin is missing."""
    from msmoe_jax import h100

    if h100.available():
        c = h100.compile_step(cfg, n)
        return c.text, c.memory
    from msmoe_jax.comms import build_step

    _, _, step, state, batch = build_step(cfg)
    program = step.lower(state, batch).compile()
    return program.as_text(), program.memory_analysis()

MIXTRAL = dict(vocab_size=32000, d_model=4096, num_layers=2, num_heads=32, num_kv_heads=8,
               d_ff=14336, num_dense_layers=0, num_experts=8, top_k=2, moe_d_ff=14336,
               dtype="bfloat16", param_dtype="float32")


def schedules(n: int, nodes: int) -> dict[str, tuple[dict, bool]]:
    """name -> (parallel fields, overlap). Attention and experts inside a node (size
    n/nodes), data parallelism across nodes."""
    g = n // nodes
    tp = dict(data=nodes, sequence=1, tensor=g, attention="tensor", expert_data=nodes,
              expert=1, expert_tensor=g, chunks=1, collective_matmul="off")
    sp = dict(data=nodes, sequence=g, tensor=1, attention="ulysses", expert_data=nodes,
              expert=g, expert_tensor=1, dispatch="all_to_all", all_to_all="padded",
              collective_matmul="off", chunks=1)
    return {
        "TP+TP, no overlap": (tp, False),
        "TP+TP, overlap": (tp, True),
        "TP+TP, ring collective matmuls": (dict(tp, collective_matmul="bidirectional"), True),
        "SP+EP, no overlap": (sp, False),
        "SP+EP, inter-op overlap": (sp, True),
        "SP+EP, chunked x2 overlap": (dict(sp, chunks=2), True),
        "SP+EP, chunked x4 overlap": (dict(sp, chunks=4), True),
    }


def model_rows(cfg, hw_name: str, nodes: int, rows: list[str] | None = None):
    from msmoe_jax import h100
    from msmoe_jax.flops import train_flops_per_token
    from msmoe_jax.parallel.mesh import validate_for
    from msmoe_jax.steptime.model import HARDWARE, model_step

    n = 8 * nodes
    hw = HARDWARE[hw_name]
    out = []
    # XLA:CPU widens bf16 collectives; the H100 program sends them as written.
    scale = 0.5 if cfg.model.dtype == "bfloat16" and not h100.available() else 1.0
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = train_flops_per_token(cfg.model, cfg.train.seq_len) * tokens / n
    compiled = {}
    for name, (fields, overlap) in schedules(n, nodes).items():
        if rows and name not in rows:
            continue
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **fields))
        key = json.dumps(fields, sort_keys=True)
        if key not in compiled:
            validate_for(c, n)
            compiled[key] = compiled_step(c, n)[0]
        t, _ = model_step(compiled[key], n, hw, overlap, activation_bytes_scale=scale)
        out.append(dict(schedule=name, step_ms=t.step * 1e3, exposed_ms=t.exposed_comm * 1e3,
                        comm_ms=t.comm * 1e3, mfu=model_flops / (t.step * hw.peak_flops)))
        print(f"  {name:<34} {t.step * 1e3:9.2f} ms  exposed {t.exposed_comm * 1e3:8.2f} ms  "
              f"comm {t.comm * 1e3:8.2f} ms  MFU {out[-1]['mfu']:7.2%}", flush=True)
    return out


def remat_rows(cfg):
    from msmoe_jax.parallel.mesh import validate_for

    out = {}
    for policy in ("none", "selective", "full"):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, remat=policy))
        validate_for(c, 8)
        temp = compiled_step(c, 8)[1]
        temp = getattr(temp, "temp_size_in_bytes", getattr(temp, "temporaries", 0))
        out[policy] = temp
        print(f"  remat {policy:<10} compiled temp {temp / 2**20:9.1f} MiB", flush=True)
    return out


def main(argv=None) -> int:
    platforms_for_compiling()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="default model only")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "mixtral:<nodes>" in a child process
    args = p.parse_args(argv)
    if args.child:
        nodes = int(args.child.split(":")[1])
        simulate_cpu_devices(8 * nodes)
        from msmoe_jax.config import config_from_dict
        cfg = config_from_dict({"model": MIXTRAL, "train": {"batch_size": 2 * nodes,
                                                            "seq_len": 4096}})
        print(json.dumps(model_rows(cfg, "h100", nodes)))
        return 0

    simulate_cpu_devices(8)
    from msmoe_jax.config import load_config
    cfg = load_config(ROOT / "configs" / "default.yaml")
    from msmoe_jax import h100

    print("reading the " + ("program compiled for H100" if h100.available() else
                            "CPU program (fallback: install .[h100-compile])"))
    print("default model, 8 devices modelled as one H100 node (8 x H100, NVLink):")
    model_rows(cfg, "h100", 1)
    print("default model, remat policies:")
    remat_rows(cfg)
    if args.quick:
        return 0
    for nodes in (1, 32):
        print(f"Mixtral-8x7B-like (2 of 32 layers), seq 4096, {2 * nodes} sequences, "
              f"{nodes} node(s) x 8 H100:", flush=True)
        r = subprocess.run([sys.executable, __file__, "--child", f"mixtral:{nodes}"],
                           env=dict(os.environ, XLA_FLAGS=""), stdout=subprocess.PIPE,
                           text=True)
        if r.returncode:
            print(f"  failed (exit {r.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
