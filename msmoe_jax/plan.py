"""What a config asks of its devices, before anything is compiled or allocated.

    python -m msmoe_jax.plan --config configs/mixtral_8x7b_64xh100.yaml [--devices N]
    python -m msmoe_jax.plan --config configs/mixtral_8x7b_64xh100.yaml --compile

Prints the layout, the mesh, the parameter counts and the bytes of training state (parameters
and optimizer moments) each device holds, read from abstract shapes and the layout's partition
specs. ``--devices`` defaults to the config's ``parallel.devices`` (else 8), so a cluster
config is checked on a laptop.

``--compile`` compiles the training step for that many H100s (``msmoe_jax/h100.py``; needs
``.[h100-compile]``) and adds what only the program knows: gradients, activations and
workspaces, and the peak per device, from XLA:GPU's memory analysis, and whether that fits in
the GPU's memory with headroom. Models run under scan are compiled whole; unrolled ones deeper
than ``--max-layers`` at two smaller depths, extrapolated linearly per layer (the method's
check is in docs/performance.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

from msmoe_jax.config import Config, ConfigError, load_config
from msmoe_jax.h100 import Memory

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


class Plan(NamedTuple):
    devices: int
    describe: str  # the two views
    mesh: dict[str, int]  # mesh axis -> size
    params: int  # parameters in the model
    param_bytes_per_device: int  # parameters held by one device
    state_bytes_per_device: int  # parameters + optimizer state held by one device
    largest_replicated: tuple[str, int]  # the biggest parameter every device holds whole
    grad_bytes_per_device: int  # FP32 gradients one device holds (its part, with zero)
    on_gpu: str  # what the auto choices resolve to on GPUs (parallel/choices.py)
    on_cpu: str  # ... and on CPU devices


def plan(cfg: Config, devices: int) -> Plan:
    """The plan for ``cfg`` on ``devices`` devices (validated for that count first)."""
    import jax
    from flax import nnx

    from msmoe_jax.model import Transformer
    from msmoe_jax.optim import make_optimizer
    from msmoe_jax.parallel.choices import resolve
    from msmoe_jax.parallel.mesh import Layout, validate_for
    from msmoe_jax.parallel.strategy import state_specs, zero_specs

    validate_for(cfg, devices)
    layout = Layout.from_config(cfg, devices)
    sizes = dict(layout.mesh_axes)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)

    def init():
        params = nnx.split(Transformer(cfg.model, nnx.Rngs(cfg.seed)))[1]
        return {"step": jax.numpy.zeros((), "int32"), "params": params,
                "opt_state": optimizer.init(params)}

    shapes = jax.eval_shape(init)
    specs = state_specs(shapes, optimizer, layout, cfg.parallel.zero)

    def split(spec) -> int:
        axes = [a for entry in spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        return math.prod(sizes[a] for a in axes)

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)

    def held(tree, spec_tree, itemsize=None) -> int:
        return sum(x.size * (itemsize or x.dtype.itemsize) // split(s) for x, s in
                   zip(jax.tree.leaves(tree), jax.tree.leaves(spec_tree, is_leaf=is_spec)))

    params = jax.tree.leaves_with_path(shapes["params"])
    param_specs = jax.tree.leaves(specs["params"], is_leaf=is_spec)
    replicated = [(jax.tree_util.keystr(p), x.size) for (p, x), s in zip(params, param_specs)
                  if split(s) == 1]
    return Plan(devices, layout.describe(), sizes, sum(x.size for _, x in params),
                held(shapes["params"], specs["params"]), held(shapes, specs),
                max(replicated, key=lambda r: r[1], default=("", 0)),
                held(shapes["params"], zero_specs(shapes["params"], specs["params"], layout)
                     if cfg.parallel.zero else specs["params"], itemsize=4),
                resolve(cfg, layout, gpu=True).describe(),
                resolve(cfg, layout, gpu=False).describe())


class CompiledMemory(NamedTuple):
    """Per-device bytes of the H100 program (``--compile``)."""

    memory: Memory  # XLA's analysis (extrapolated when ``layers`` has two depths)
    layers: tuple[int, ...]  # the depths compiled
    capacity: int  # bytes of one GPU's memory

    @property
    def fits(self) -> bool:
        return self.memory.peak <= HEADROOM * self.capacity


HEADROOM = 0.9  # fits: the peak within 90% of the GPU's memory (allocator, NCCL, CUDA context)


def compile_plan(cfg: Config, devices: int, max_layers: int = 8, runs=None) -> CompiledMemory:
    """The H100 program's memory for ``cfg``: compiled whole when ``num_layers`` <=
    ``max_layers``, else at two depths (``h100.depths``) and extrapolated per layer. ``runs``: those
    compiles (``h100.Compiled``) when already made."""
    from msmoe_jax import h100

    if runs is None:
        runs = [h100.compile_step(cfg, devices, layers=n) for n in h100.depths(cfg, max_layers)]
    memory = runs[0].memory if len(runs) == 1 else h100.extrapolate(
        runs[0], runs[-1], cfg.model.num_layers)
    return CompiledMemory(memory, tuple(r.layers for r in runs), h100.memory_capacity())


def memory_table(p: Plan, c: CompiledMemory) -> list[tuple[str, float]]:
    """(what, GiB per device) rows of the compiled memory: the state as the plan counts it,
    then the program's temporaries split into the FP32 gradients and the rest."""
    m = c.memory
    gib = lambda b: b / 2**30
    rest = max(m.temporaries - p.grad_bytes_per_device, 0)
    return [("parameters", gib(p.param_bytes_per_device)),
            ("optimizer state", gib(p.state_bytes_per_device - p.param_bytes_per_device)),
            ("gradients (fp32, modelled)", gib(p.grad_bytes_per_device)),
            ("activations + workspace", gib(rest)),
            ("peak (compiled)", gib(m.peak))]


def add_device_config_args(p: argparse.ArgumentParser) -> None:
    """--config, --set and --devices: a config checked for a device count, on any machine."""
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--devices", type=int, help="device count (default: parallel.devices or 8)")


def load_device_config(args) -> tuple[Config, int]:
    """(config, device count) from ``add_device_config_args``' flags; raises ConfigError."""
    cfg = load_config(args.config, args.overrides)
    n = args.devices or cfg.parallel.devices or 8
    if args.devices and cfg.parallel.devices not in (None, args.devices):
        cfg.parallel.devices = None  # asked for another count: fit the layout to it
    return cfg, n


def main(argv=None) -> int:
    from msmoe_jax.h100 import platforms_for_compiling

    platforms_for_compiling()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_config_args(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the step for H100s and report the compiled memory per device")
    p.add_argument("--max-layers", type=int, default=8,
                   help="with --compile: deeper models are compiled at two smaller depths "
                        "and extrapolated (default 8)")
    args = p.parse_args(argv)
    try:
        cfg, n = load_device_config(args)
        out = plan(cfg, n)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gib = out.state_bytes_per_device / 2**30
    print(f"{out.devices} devices: {out.describe}")
    print(f"mesh {out.mesh}")
    print(f"on GPU: {out.on_gpu}")
    print(f"on CPU: {out.on_cpu}")
    print(f"{out.params:,} parameters; training state (parameters + optimizer) "
          f"{gib:.1f} GiB per device; largest replicated parameter {out.largest_replicated[0]} "
          f"({out.largest_replicated[1] / 1e6:.1f}M)")
    if args.compile:
        from msmoe_jax import h100

        try:
            compiled = compile_plan(cfg, n, args.max_layers)
        except (h100.PluginMissing, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        how = (f"compiled with {compiled.layers[0]} layers" if len(compiled.layers) == 1 else
               f"compiled with {' and '.join(map(str, compiled.layers))} layers, extrapolated "
               f"to {cfg.model.num_layers}")
        print(f"H100 program per device ({how}):")
        for what, size in memory_table(out, compiled):
            print(f"  {what:<28} {size:8.2f} GiB")
        cap = compiled.capacity / 2**30
        verdict = "fits" if compiled.fits else "does NOT fit"
        print(f"{verdict} in {cap:.1f} GiB with {1 - HEADROOM:.0%} headroom "
              f"(peak {compiled.memory.peak / compiled.capacity:.0%} of the GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
