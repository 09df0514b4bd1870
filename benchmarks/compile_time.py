"""Compile time of the training step against depth, layers scanned or unrolled, on XLA:CPU
(8 simulated devices) and for 8 H100s (compile-only, no GPU needed), as a markdown table.

    python benchmarks/compile_time.py [--config default.yaml] [--layers 4 16 60]
                                      [--targets cpu h100] [--unrolled-up-to 16]

Each entry is one ``lower`` + ``compile`` of the whole step (forward, backward, optimizer)
with abstract inputs, in a process without a compilation cache, after one untimed warm-up
compile per target (so that JAX's and the plugin's start-up are not counted in the first
row). The H100 column needs ``pip install -e .[h100-compile]``. Unrolled programs grow with
depth, so they are compiled only up to ``--unrolled-up-to`` layers. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from msmoe_jax.h100 import platforms_for_compiling  # noqa: E402


def cpu_seconds(cfg) -> float:
    import jax

    from msmoe_jax.comms import build_step

    t0 = time.perf_counter()
    _, _, step, state, tokens = build_step(cfg, jax.devices()[:8])
    step.lower(state, tokens).compile()
    return time.perf_counter() - t0


def h100_seconds(cfg) -> float:
    from msmoe_jax import h100

    return h100.compile_step(cfg, 8).seconds


def main(argv=None) -> int:
    platforms_for_compiling()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default.yaml")
    p.add_argument("--layers", nargs="*", type=int, default=[4, 16, 60])
    p.add_argument("--targets", nargs="*", choices=("cpu", "h100"), default=["cpu", "h100"])
    p.add_argument("--unrolled-up-to", type=int, default=16, metavar="LAYERS")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import jax

    from msmoe_jax.config import load_config
    from msmoe_jax.h100 import with_layers

    jax.config.update("jax_enable_compilation_cache", False)
    base = load_config(ROOT / "configs" / args.config,
                       ["parallel.devices=null", *args.overrides])
    timers = {"cpu": cpu_seconds, "h100": h100_seconds}
    columns = [(t, scan) for t in args.targets for scan in (True, False)]
    for target in args.targets:  # warm-up, untimed
        timers[target](with_layers(base, 1))
    rows = []
    for layers in args.layers:
        row = [str(layers)]
        for target, scan in columns:
            if not scan and layers > args.unrolled_up_to:
                row.append("")
                continue
            cfg = with_layers(load_config(ROOT / "configs" / args.config, [
                "parallel.devices=null", f"train.scan_layers={str(scan).lower()}",
                *args.overrides]), layers)
            seconds = timers[target](cfg)
            row.append(f"{seconds:.1f}")
            print(f"  {layers} layers, {target}, {'scanned' if scan else 'unrolled'}: "
                  f"{seconds:.1f} s", flush=True)
        rows.append(row)
    names = {(t, s): f"{t.upper() if t == 'cpu' else 'H100'} {'scan' if s else 'unrolled'} (s)"
             for t, s in columns}
    print(f"\n{args.config} on 8 devices ({base.model.num_dense_layers} dense leading layers), "
          "seconds to lower and compile the training step:\n")
    print("| layers | " + " | ".join(names[c] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
