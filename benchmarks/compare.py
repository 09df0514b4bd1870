"""Our training step against what a user would otherwise write, side by side in one run.

    python benchmarks/compare.py [--config configs/default.yaml] [--steps 5] [--set k=v ...]
                                 [--plot runs/bench/compare.png]

Three steps train the same model on the same devices, batch and tokens:

* ``msmoe (ours)``: the config's folded layout; routing, dispatch and gradient exchange per
  device inside one ``shard_map``.
* ``GSPMD (jit)``: the model as most JAX users write it (the MaxText style): the
  single-device model under ``jax.jit``, parameters and batch carrying sharding annotations
  (batch over all devices, experts split over all devices), and XLA's SPMD partitioner choosing
  every collective.
* ``Megatron TP+EP (ours)``: our own Megatron-style layout: tensor-parallel attention and FFNs
  over all devices (all_gather / reduce-scatter around column/row-parallel GEMMs) and expert
  parallelism over all devices.

The table gives the median step time (compilation excluded) and its ratio to ours, tokens/s,
the compiled program's peak memory per device (XLA's memory analysis: arguments + outputs +
temporaries - donated aliases) and the bytes its collectives send per device per step (read
from the compiled HLO, the only place GSPMD's collectives exist; XLA:CPU widens BF16 ones to
F32). The loss column is the check that they train the same model. A PNG of the ratios is
written beside. On CPU simulated devices share the host's cores: read the ratios, not the
times. Runs unchanged on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msmoe_jax.cli import add_config_args, load_cli_config  # noqa: E402
from msmoe_jax.config import Config, ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def megatron_layout(n: int) -> dict:
    return dict(data=1, sequence=1, tensor=n, attention="tensor", expert_data=1, expert=n,
                expert_tensor=1, dispatch="all_to_all", collective_matmul="off")


def gspmd_step(cfg: Config, devices):
    """(jitted step, state, tokens): the single-device model under plain ``jit``, with the
    shardings of data parallelism x expert parallelism over all devices as annotations."""
    import jax
    import numpy as np
    import optax

    from msmoe_jax.objective import reference_loss_fn
    from msmoe_jax.optim import make_optimizer
    from msmoe_jax.parallel.mesh import REPLICATED, Layout, make_mesh, sharding
    from msmoe_jax.state import init_state

    n = len(devices)
    c = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, data=n, sequence=1, tensor=1, expert_data=1, expert=n, expert_tensor=1))
    layout = Layout.from_config(c, n)
    mesh = make_mesh(layout, devices)
    graphdef, optimizer, state, specs = init_state(c, mesh, layout)
    loss_fn = reference_loss_fn(c.model, graphdef)
    optimizer = make_optimizer(c.optimizer, c.train.steps)

    def step(state, tokens):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], tokens)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    shardings = jax.tree.map(lambda spec: sharding(mesh, spec), specs)
    jitted = jax.jit(step, donate_argnums=0, out_shardings=(shardings, sharding(mesh, REPLICATED)))
    t = c.train
    rng = np.random.default_rng(c.seed)
    tokens = jax.device_put(rng.integers(0, c.model.vocab_size, (t.batch_size, t.seq_len + 1),
                                         np.int32), sharding(mesh, layout.batch))
    return jitted, state, tokens


def peak_bytes(compiled) -> float | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    peak = getattr(m, "peak_memory_in_bytes", 0)
    return peak or (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)


def measure(name, step, state, tokens, steps: int, n: int) -> dict:
    from benchmarks.timing import time_train_step

    r = time_train_step(step, state, tokens, steps, n)
    print(f"  done {name}: {1e3 * r['seconds']:.0f} ms/step", flush=True)
    # The loss of the same first step for every variant: the check that they agree.
    return dict(name=name, compile_s=r["compile_s"], seconds=r["seconds"],
                peak=peak_bytes(r["compiled"]), sent=r["sent"], loss=r["first_loss"])


def plot_path(requested: str) -> Path | None:
    """Where to write the plot: None when none was asked for, or (with a note, before the
    benchmark runs rather than after) when matplotlib is not installed."""
    if not requested:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed, so the plot is skipped (install it with "
              "pip install -e '.[notebooks]')", flush=True)
        return None
    return Path(requested)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = rows[0]
    panels = [("step time", "seconds"), ("peak memory", "peak"), ("collective bytes", "sent")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["name"] for r in rows]
    for ax, (label, key) in zip(axes, panels):
        values = [(r[key] or 0) / (ours[key] or 1) for r in rows]
        ax.bar(range(len(rows)), values, color=["tab:green", "tab:gray", "tab:blue"][:len(rows)])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
        ax.set_title(f"{label} (x ours)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--plot", default="runs/bench/compare.png", help="PNG to write ('' = none)")
    args = p.parse_args(argv)
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    png = plot_path(args.plot)
    import jax

    from msmoe_jax.comms import build_step
    from msmoe_jax.parallel.comm_bytes import human
    from msmoe_jax.parallel.mesh import validate_for

    devices = jax.devices()
    n, t = len(devices), cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    title = (f"{n} {devices[0].platform} devices; d_model {cfg.model.d_model}, "
             f"{cfg.model.num_layers} layers, {cfg.model.num_experts} experts top-"
             f"{cfg.model.top_k}; batch {t.batch_size} x {t.seq_len}; median of {args.steps}")
    print(title)
    variants = [("msmoe (ours)", cfg),
                ("GSPMD (jit)", None),
                ("Megatron TP+EP (ours)", dataclasses.replace(cfg, parallel=dataclasses.replace(
                    cfg.parallel, **megatron_layout(n))))]
    rows = []
    for name, c in variants:
        try:
            if c is None:
                step, state, tokens = gspmd_step(cfg, devices)
            else:
                validate_for(c, n)
                _, _, step, state, tokens = build_step(c, devices, abstract=False)
        except ConfigError as e:
            print(f"skip {name}: {e}")
            continue
        rows.append(measure(name, step, state, tokens, args.steps, n))

    ours = rows[0]
    print(f"\n{'variant':<22} {'ms/step':>9} {'vs ours':>8} {'tokens/s':>10} {'peak mem':>11} "
          f"{'sent/step':>11} {'compile s':>9} {'loss':>7}")
    for r in rows:
        peak = human(r["peak"]) if r["peak"] is not None else "n/a"
        print(f"{r['name']:<22} {1e3 * r['seconds']:>9.0f} {r['seconds'] / ours['seconds']:>7.2f}x "
              f"{tokens_per_step / r['seconds']:>10,.0f} {peak:>11} {human(r['sent']):>11} "
              f"{r['compile_s']:>9.1f} {r['loss']:>7.4f}")
    if png is not None:
        plot(rows, png, title)
        print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
