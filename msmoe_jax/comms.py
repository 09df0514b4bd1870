"""Print the collectives of one compiled training step and the bytes each moves.

    python -m msmoe_jax.comms --config configs/default.yaml [--set parallel.sequence=8 ...]
    python -m msmoe_jax.comms --compare   # also data-only, SP+EP and TP+TP on the same devices
    python -m msmoe_jax.comms --compress  # also the same layout with every compression switch

Everything is read from the program's HLO; nothing runs, so large models can be inspected on a
laptop. ``--hlo h100`` (the default when ``.[h100-compile]`` is installed) reads the program
compiled for H100s (``msmoe_jax/h100.py``): XLA:GPU's collectives as a GPU runs them, BF16
and FP8 wires included, ragged all_to_alls costed by the rows they carry (balanced routing).
Otherwise the CPU program is the fallback: ``--hlo compiled`` reads what XLA:CPU will run;
``--hlo lowered`` (the fallback's default) the program as written, before optimisation, since
XLA:CPU widens BF16 collectives to F32 and FP8 ones to F16, hiding what compression saves.
Loop bodies (gradient accumulation) count once per iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from msmoe_jax.cli import add_config_args, load_cli_config
from msmoe_jax.config import Config, ConfigError
from msmoe_jax.h100 import platforms_for_compiling

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def reference_layouts(n: int) -> dict[str, dict]:
    """Baselines over n devices: pure data parallelism, the paper's SP+EP, Megatron's TP+TP."""
    return {
        "data": dict(data=n, sequence=1, tensor=1, expert_data=n, expert=1, expert_tensor=1),
        "SP+EP": dict(data=1, sequence=n, tensor=1, attention="ulysses", expert_data=1,
                      expert=n, expert_tensor=1),
        "TP+TP": dict(data=1, sequence=1, tensor=n, attention="tensor", expert_data=1,
                      expert=1, expert_tensor=n),
    }


def build_step(cfg: Config, devices=None, abstract: bool = True):
    """(layout, mesh, jitted train step, state, token batch) for ``cfg``; state and tokens are
    ShapeDtypeStructs when ``abstract``, else real (fresh parameters, random tokens)."""
    import jax
    import numpy as np

    from msmoe_jax.parallel.mesh import Layout, make_mesh, sharding
    from msmoe_jax.state import init_state
    from msmoe_jax.step import make_train_step

    devices = list(jax.devices() if devices is None else devices)
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    graphdef, optimizer, state, specs = init_state(cfg, mesh, layout, abstract=abstract)
    step = make_train_step(cfg, graphdef, optimizer, mesh, layout, specs)
    t = cfg.train
    batch_sharding = sharding(mesh, layout.batch)
    if abstract:
        tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), np.int32,
                                      sharding=batch_sharding)
    else:
        rng = np.random.default_rng(cfg.seed)
        tokens = jax.device_put(rng.integers(0, cfg.model.vocab_size,
                                             (t.batch_size, t.seq_len + 1), np.int32),
                                batch_sharding)
    return layout, mesh, step, state, tokens


def step_collectives(cfg: Config, devices=None, hlo: str = "compiled"):
    """(layout, [Collective]) for one training step of ``cfg`` (lowered, not run); ``hlo``:
    "h100" (``devices`` is then a count), "compiled" or "lowered" (see the module
    docstring)."""
    from msmoe_jax.parallel.comm_bytes import collectives

    if hlo == "h100":
        from msmoe_jax import h100
        from msmoe_jax.parallel.mesh import Layout

        n = devices or cfg.parallel.devices or 8
        depths = h100.depths(cfg)
        found = [collectives(h100.compile_step(cfg, n, layers=d).text, n) for d in depths]
        if len(found) == 2:  # two depths, two MoE blocks apart: add the blocks missing
            found = [more_blocks(found[0], found[1], (cfg.model.num_layers - depths[1]) // 2)]
        return Layout.from_config(cfg, n), found[0]
    layout, mesh, step, state, tokens = build_step(cfg, devices)
    lowered = step.lower(state, tokens)
    text = (lowered.compile().as_text() if hlo == "compiled"
            else lowered.as_text(dialect="hlo", debug_info=True))
    return layout, collectives(text, mesh.size)


def more_blocks(fewer: list, more: list, times: int) -> list:
    """``more``'s collectives plus ``times`` copies of those it has beyond ``fewer`` (the
    program at two depths: what the extra blocks communicate)."""
    from collections import Counter

    extra = Counter(more) - Counter(fewer)
    return more + [c for c, k in extra.items() for _ in range(k)] * times


def compressed(cfg: Config) -> Config:
    """``cfg`` with every communication-compression switch on."""
    return dataclasses.replace(cfg, compression=dataclasses.replace(
        cfg.compression, gradients="bf16_a2a", dispatch="fp8", combine="fp8", tensor="fp8"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, DEFAULT_CONFIG)
    p.add_argument("--compare", action="store_true",
                   help="also compile data-only, SP+EP and TP+TP layouts of the same model")
    p.add_argument("--compress", action="store_true",
                   help="also the configured layout with every compression switch on, and the "
                        "saving per collective")
    p.add_argument("--hlo", choices=("auto", "h100", "compiled", "lowered"), default="auto",
                   help="which program to read (default: h100 when the CUDA plugin is "
                        "installed, else compiled on GPU and lowered elsewhere)")
    args = p.parse_args(argv)
    platforms_for_compiling()
    cfg = load_cli_config(args)
    if cfg is None:
        return 2
    import jax

    from msmoe_jax import h100
    from msmoe_jax.parallel.comm_bytes import by_scope, human, summarize
    from msmoe_jax.parallel.mesh import validate_for

    if args.hlo == "h100" and not h100.available():
        print(f"error: {h100.INSTALL_HINT}", file=sys.stderr)
        return 2
    hlo = args.hlo if args.hlo != "auto" else (
        "compiled" if jax.default_backend() == "gpu" else
        "h100" if h100.available() else "lowered")
    n = (cfg.parallel.devices or 8) if hlo == "h100" else jax.device_count()
    try:
        validate_for(cfg, n)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layouts = {"configured": cfg}
    if args.compare:
        for name, fields in reference_layouts(n).items():
            layouts[name] = dataclasses.replace(
                cfg, parallel=dataclasses.replace(cfg.parallel, **fields))
    if args.compress:
        layouts["compressed"] = compressed(cfg)
    m, t = cfg.model, cfg.train
    print(f"model: d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads "
          f"({m.num_kv_heads} KV), {m.num_experts} experts top-{m.top_k}, {m.dtype} compute; "
          f"batch {t.batch_size} x {t.seq_len} tokens; {n} "
          f"{'H100 (compile-only)' if hlo == 'h100' else jax.devices()[0].platform} devices")
    source = ("program compiled for H100" if hlo == "h100" else
              f"{hlo} {jax.devices()[0].platform.upper()} program" + (
                  " (fallback: install .[h100-compile] to read the H100 program)"
                  if jax.default_backend() == "cpu" else ""))
    print(f"bytes: sent per device per training step (forward + backward + optimizer), read "
          f"from the {source}")
    if hlo == "h100" and len(h100.depths(cfg)) == 2:
        print(f"note: compiled at {' and '.join(map(str, h100.depths(cfg)))} layers; the "
              f"collectives of the extra blocks are added up to {cfg.model.num_layers}")
    if hlo == "compiled" and jax.default_backend() == "cpu":
        print("note: XLA:CPU runs bf16 collectives in f32 and fp8 ones in f16, so they count "
              "double here; on GPU they move as written (--hlo lowered shows that)")
    print()
    totals, scopes = {}, {}
    for name, c in layouts.items():
        try:
            validate_for(c, n)
            layout, found = step_collectives(c, n if hlo == "h100" else None, hlo=hlo)
        except ConfigError as e:
            print(f"[{name}] not possible for this model: {e}\n")
            continue
        totals[name] = sum(x.bytes for x in found)
        scopes[name] = by_scope(found)
        print(f"[{name}] {layout.describe()}" + (f"; {describe_compression(c)}"
                                                 if name in ("configured", "compressed") else ""))
        print(f"  {'where':<17} {'collective':<19} {'group':>5} {'count':>6} {'bytes':>12}")
        for scope, op, group, count, b in summarize(found):
            print(f"  {scope:<17} {op:<19} {group:>5} {count:>6} {human(b):>12}")
        print(f"  {'total':<17} {'':<19} {'':>5} {len(found):>6} {human(totals[name]):>12}\n")
    if "compressed" in scopes and "configured" in scopes:
        before, after = scopes["configured"], scopes["compressed"]
        print(f"{'where':<17} {'configured':>12} {'compressed':>12} {'saving':>7}")
        for scope in sorted(set(before) | set(after), key=lambda k: -before.get(k, 0)):
            b, a = before.get(scope, 0.0), after.get(scope, 0.0)
            print(f"{scope:<17} {human(b):>12} {human(a):>12} " + (f"{b / a:>6.2f}x" if a else
                                                                   f"{'-':>7}"))
        b, a = totals["configured"], totals["compressed"]
        print(f"{'total':<17} {human(b):>12} {human(a):>12} {b / a:>6.2f}x\n")
    if any(name in totals for name in reference_layouts(n)):
        base = totals.get("TP+TP")
        print(f"{'layout':<12} {'bytes/step':>14}" + (f" {'vs TP+TP':>9}" if base else ""))
        for name, b in totals.items():
            print(f"{name:<12} {human(b):>14}" + (f" {b / base:>8.2f}x" if base else ""))
    return 0


def describe_compression(cfg: Config) -> str:
    z = cfg.compression
    return (f"gradients {z.gradients}, dispatch {z.dispatch}, combine {z.combine}, "
            f"tensor {z.tensor}")


if __name__ == "__main__":
    sys.exit(main())
