"""Executed vs useful work and the modelled step time of a config's training step.

    python -m msmoe_jax.steptime --config configs/mixtral_8x7b_64xh100.yaml
    python -m msmoe_jax.steptime --config configs/default.yaml --target cpu --skew 2

See ``msmoe_jax/steptime/report.py``. ``--target h100`` (the default when the CUDA plugin of
``.[h100-compile]`` is installed) compiles for H100s; ``cpu`` for simulated CPU devices.
"""

from __future__ import annotations

import argparse
import sys

from msmoe_jax.h100 import platforms_for_compiling


def main(argv=None) -> int:
    platforms_for_compiling()
    from msmoe_jax.cli import simulate_cpu_devices
    from msmoe_jax.plan import add_device_config_args, load_device_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_config_args(p)
    p.add_argument("--target", choices=("auto", "h100", "cpu"), default="auto",
                   help="which compiled program to read (auto: h100 when the plugin is there)")
    p.add_argument("--hardware", choices=("h100", "h800"), default="h100",
                   help="the modelled cluster (steptime.model.HARDWARE)")
    p.add_argument("--skew", type=float, default=1.0,
                   help="busiest device's routed rows / the balanced share, for ragged "
                        "all_to_alls (default 1: balanced routing)")
    p.add_argument("--max-layers", type=int, default=8,
                   help="deeper models are compiled at two smaller depths and extrapolated")
    args = p.parse_args(argv)

    from msmoe_jax.config import ConfigError
    from msmoe_jax.parallel.mesh import validate_for

    try:
        cfg, n = load_device_config(args)
        validate_for(cfg, n)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from msmoe_jax import h100

    target = args.target
    if target == "auto":
        target = "h100" if h100.available() else "cpu"
    elif target == "h100" and not h100.available():
        print(f"error: {h100.INSTALL_HINT}", file=sys.stderr)
        return 2
    if target == "cpu":
        simulate_cpu_devices(n)
        import jax

        if jax.device_count() < n:
            print(f"error: {n} devices asked for, {jax.device_count()} simulated (set XLA_FLAGS="
                  f"--xla_force_host_platform_device_count={n} before starting)",
                  file=sys.stderr)
            return 2
    from msmoe_jax.steptime.hlo import Routing
    from msmoe_jax.steptime.report import analyse, compile_texts, format_report

    texts = compile_texts(cfg, n, target, args.max_layers)
    print(format_report(analyse(cfg, n, texts, args.hardware, target, Routing(args.skew))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
