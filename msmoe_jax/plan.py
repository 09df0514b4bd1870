"""What a config asks of its devices, before anything is compiled or allocated.

    python -m msmoe_jax.plan --config configs/mixtral_8x7b_64xh100.yaml [--devices N]

Prints the layout, the mesh, the parameter counts and the bytes of training state (parameters
and optimizer moments) each device holds, read from abstract shapes and the layout's partition
specs. ``--devices`` defaults to the config's ``parallel.devices`` (else 8), so a cluster
config is checked on a laptop. Activations are not counted: they depend on ``train.remat``,
the micro-batch and XLA's schedule (the compiled peak is in ``benchmarks/compare.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

from msmoe_jax.config import Config, ConfigError, load_config

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


class Plan(NamedTuple):
    devices: int
    describe: str  # the two views
    mesh: dict[str, int]  # mesh axis -> size
    params: int  # parameters in the model
    state_bytes_per_device: int  # parameters + optimizer state held by one device
    largest_replicated: tuple[str, int]  # the biggest parameter every device holds whole


def plan(cfg: Config, devices: int) -> Plan:
    """The plan for ``cfg`` on ``devices`` devices (validated for that count first)."""
    import jax
    from flax import nnx

    from msmoe_jax.model import Transformer
    from msmoe_jax.optim import make_optimizer
    from msmoe_jax.parallel.mesh import Layout
    from msmoe_jax.parallel.strategy import state_specs

    cfg.validate(devices)
    layout = Layout.from_config(cfg, devices)
    sizes = dict(layout.mesh_axes)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)

    def init():
        params = nnx.split(Transformer(cfg.model, nnx.Rngs(cfg.seed)))[1]
        return {"step": jax.numpy.zeros((), "int32"), "params": params,
                "opt_state": optimizer.init(params)}

    shapes = jax.eval_shape(init)
    specs = state_specs(shapes, optimizer, layout)

    def split(spec) -> int:
        axes = [a for entry in spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        return math.prod(sizes[a] for a in axes)

    leaves = jax.tree.leaves(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    per_device = sum(x.size * x.dtype.itemsize // split(s) for x, s in zip(leaves, spec_leaves))
    params = jax.tree.leaves_with_path(shapes["params"])
    param_specs = jax.tree.leaves(specs["params"],
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    replicated = [(jax.tree_util.keystr(p), x.size) for (p, x), s in zip(params, param_specs)
                  if split(s) == 1]
    return Plan(devices, layout.describe(), sizes, sum(x.size for _, x in params), per_device,
                max(replicated, key=lambda r: r[1], default=("", 0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--devices", type=int, help="device count (default: parallel.devices or 8)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        n = args.devices or cfg.parallel.devices or 8
        if args.devices and cfg.parallel.devices not in (None, args.devices):
            cfg.parallel.devices = None  # asked for another count: fit the layout to it
        out = plan(cfg, n)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gib = out.state_bytes_per_device / 2**30
    print(f"{out.devices} devices: {out.describe}")
    print(f"mesh {out.mesh}")
    print(f"{out.params:,} parameters; training state (parameters + optimizer) "
          f"{gib:.1f} GiB per device; largest replicated parameter {out.largest_replicated[0]} "
          f"({out.largest_replicated[1] / 1e6:.1f}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
