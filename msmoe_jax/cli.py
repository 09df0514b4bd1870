"""Command-line plumbing shared by train.py and the tools: the config arguments and the
simulated-device switch. Imports no JAX (device flags must be set before JAX starts)."""

from __future__ import annotations

import argparse
import os
import sys

from msmoe_jax.config import Config, ConfigError, load_config


def add_config_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config,
                   help=f"YAML config file (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted name, e.g. model.top_k=2 "
                        "(repeatable; values are parsed as YAML)")


def simulate_cpu_devices(count: int) -> None:
    """Must run before JAX is imported; only affects the CPU platform."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


# XLA flags that let a GPU overlap communication with computation: the latency-hiding scheduler
# orders async collectives around independent compute (the chunked and ring schedules give it
# that independence), and combining thresholds batch the many small gradient collectives into
# large ones. Left out: the pipelined-collective and while-loop double-buffering flags. They
# copy collectives and buffers across the micro-batch loop's iterations: in the Mixtral
# config's program compiled for H100 (2 layers) they took the temporaries from 7.65 to
# 14.89 GiB per GPU (docs/performance.md), and jax 0.11's XLA no longer has the first three.
GPU_OVERLAP_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": "134217728",
    "xla_gpu_all_gather_combine_threshold_bytes": "134217728",
    "xla_gpu_reduce_scatter_combine_threshold_bytes": "67108864",
}


def gpu_overlap_flags() -> list[str]:
    """Adds ``GPU_OVERLAP_FLAGS`` to XLA_FLAGS (before JAX starts), except any flag the user
    already set there, which wins. Returns the flags added. XLA ignores them on CPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in GPU_OVERLAP_FLAGS.items()
             if f"--{name}=" not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


def load_cli_config(args: argparse.Namespace) -> Config | None:
    """Loads ``--config`` with its ``--set`` overrides and sets the simulated device count
    (so JAX must not have started yet). On a config error prints one ``error:`` line to
    stderr and returns None: the caller exits with code 2."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    simulate_cpu_devices(cfg.run.cpu_devices)
    if cfg.run.gpu_overlap_flags:
        gpu_overlap_flags()
    return cfg
