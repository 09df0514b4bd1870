#!/usr/bin/env python
"""Train an MoE language model: ``python train.py --config configs/default.yaml [--set k=v ...]``.

With no arguments it trains the default config (a tiny MoE model on 8 simulated CPU devices).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msmoe_jax.cli import add_config_args, load_cli_config
from msmoe_jax.config import ConfigError

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "default.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a Mixture-of-Experts language model with msmoe-jax.",
        epilog="Example: python train.py --config configs/default.yaml --set model.num_experts=16 "
               "--set train.steps=50. Every config key is listed in README.md.")
    add_config_args(p, DEFAULT_CONFIG)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without training")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
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
    from msmoe_jax.trainer import train

    try:
        cfg.validate(device_count=jax.device_count())
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
