#!/usr/bin/env python
"""Train an MoE language model: ``python train.py --config configs/default.yaml [--set k=v ...]``.

With no arguments it trains the default config (a tiny MoE model on 8 simulated CPU devices).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msmoe_jax import distributed
from msmoe_jax.cli import add_config_args, load_cli_config
from msmoe_jax.config import ConfigError

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "default.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a Mixture-of-Experts language model with msmoe-jax.",
        epilog="Example: python train.py --config configs/default.yaml --set model.num_experts=16 "
               "--set train.steps=50. Every config key is listed in docs/configuration.md.")
    add_config_args(p, DEFAULT_CONFIG)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without training")
    p.add_argument("--profile", nargs="?", type=int, const=3, metavar="STEPS",
                   help="write a JAX profiler trace of STEPS steps (default 3) after the first "
                        "to run.dir/profile (same as --set run.profile_steps=STEPS)")
    distributed.add_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.profile is not None:
        args.overrides.append(f"run.profile_steps={args.profile}")
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    import jax

    from msmoe_jax.checkpoint import CheckpointError
    from msmoe_jax.data import DataError
    from msmoe_jax.parallel.mesh import validate_for
    from msmoe_jax.trainer import train

    try:
        processes = distributed.resolve(args)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        distributed.initialize(processes, cfg.distributed.heartbeat_timeout_s,
                               cfg.distributed.init_timeout_s)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted while joining the multi-process run", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - XLA's runtime errors carry their own text
        print(f"error: could not join the multi-process run as {processes}: "
              f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 1
    try:
        validate_for(cfg, jax.device_count())
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last completed checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
