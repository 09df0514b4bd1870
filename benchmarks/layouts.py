"""Train-step time of parallel layouts, side by side in one run, relative to data parallelism.

    python benchmarks/layouts.py [--config configs/default.yaml] [--steps 5] [--set k=v ...]

Every layout trains the same model on the same devices, batch and tokens; the table gives the
median step time (compilation excluded), its ratio to pure data parallelism, and the bytes the
compiled step's collectives send per device. On CPU the simulated devices share the host's
cores, so only the ratios mean anything, and they mostly show computation, not communication.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msmoe_jax.cli import add_config_args, load_cli_config  # noqa: E402
from msmoe_jax.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def layouts(cfg, n: int) -> dict[str, dict]:
    from msmoe_jax.comms import reference_layouts
    ref = reference_layouts(n)
    half = n // 2
    return {
        "data": ref["data"],
        "configured": dataclasses.asdict(cfg.parallel),
        f"data 2 x seq {half}, EP {n} gather": dict(
            data=2, sequence=half, tensor=1, attention="ulysses", expert_data=1, expert=n,
            expert_tensor=1, dispatch="all_gather"),
        f"data {n}, EP {n} a2a": dict(data=n, sequence=1, tensor=1, expert_data=1, expert=n,
                                      expert_tensor=1, dispatch="all_to_all"),
        "SP+EP": ref["SP+EP"],
        "TP+TP": ref["TP+TP"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    args = p.parse_args()
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    import jax

    from benchmarks.timing import time_train_step
    from msmoe_jax.comms import build_step
    from msmoe_jax.parallel.comm_bytes import human
    from msmoe_jax.parallel.mesh import validate_for

    n = jax.device_count()
    t = cfg.train
    print(f"{n} {jax.devices()[0].platform} devices; d_model {cfg.model.d_model}, "
          f"{cfg.model.num_layers} layers, {cfg.model.num_experts} experts top-{cfg.model.top_k}; "
          f"batch {t.batch_size} x {t.seq_len}; median of {args.steps} steps")
    rows, base = [], None
    for name, fields in layouts(cfg, n).items():
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **fields))
        try:
            validate_for(c, n)
        except ConfigError as e:
            print(f"skip {name}: {e}")
            continue
        layout, _, step, state, tokens = build_step(c, abstract=False)
        r = time_train_step(step, state, tokens, args.steps, n)
        compile_s, sent, ms = r["compile_s"], r["sent"], 1e3 * r["seconds"]
        base = base or ms
        rows.append((name, layout.describe(), compile_s, ms, ms / base, sent,
                     r["last_loss"]))
        print(f"  done {name}: {ms:.0f} ms/step", flush=True)
    print(f"\n{'layout':<26} {'compile s':>9} {'ms/step':>9} {'vs data':>8} {'sent/step':>11} "
          f"{'loss':>7}")
    for name, _, compile_s, ms, ratio, sent, loss in rows:
        print(f"{name:<26} {compile_s:>9.1f} {ms:>9.0f} {ratio:>7.2f}x {human(sent):>11} "
              f"{loss:>7.4f}")
    print()
    for name, describe, *_ in rows:
        print(f"{name}: {describe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
