"""Every shipped config's training step compiled for H100 (no GPU needed): per-device memory
(``plan --compile``) and executed vs useful work (``python -m msmoe_jax.steptime``) from the
same compiles, as the markdown tables of docs/performance.md.

    python benchmarks/h100_programs.py [--configs default.yaml mixtral_8x7b_64xh100.yaml]
                                       [--out h100_programs.md]

Needs ``pip install -e .[h100-compile]``. Configs deeper than 8 layers are compiled at 2 and 4
layers and extrapolated per layer. Several minutes per cluster config on 2 CPU cores. A config
with a former layout (``FORMER``) is followed by that layout, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msmoe_jax.h100 import platforms_for_compiling  # noqa: E402

FORMER_352B = ["parallel.zero=0", "parallel.attention=tensor", "parallel.sequence=1",
               "parallel.tensor=8", "parallel.collective_matmul=bidirectional"]
# Layouts the shipped configs used before, kept as comparisons rather than as configs.
FORMER = {
    # Before issue [4/5]: the experts split across the nodes and each expert's width over the
    # node (expert_tensor 8), with replicated optimizer state: the in-node layout did not fit.
    "mixtral_8x7b_64xh100.yaml": ["parallel.expert_data=1", "parallel.expert_tensor=8",
                                  "parallel.zero=0", "train.grad_accum_steps=16"],
    # Tensor-parallel attention over the node with replicated optimizer state (before ZeRO
    # let Ulysses attention's replicated attention state fit).
    "megascale_352b_512xh100.yaml": FORMER_352B,
}
# The config without issue [4/5]'s memory features: the vocabulary replicated, the layers
# unrolled.
BEFORE = ["parallel.vocab=replicated", "train.scan_layers=false"]


def main(argv=None) -> int:
    platforms_for_compiling()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="*",
                   default=sorted(x.name for x in (ROOT / "configs").glob("*.yaml")))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, help="also write the tables to this file")
    p.add_argument("--before", action="store_true",
                   help="also compile each config as it was before issue [4/5] (BEFORE)")
    args = p.parse_args(argv)

    from msmoe_jax import h100
    from msmoe_jax.config import load_config
    from msmoe_jax.parallel.comm_bytes import human
    from msmoe_jax.parallel.mesh import validate_for
    from msmoe_jax.plan import compile_plan, memory_table, plan
    from msmoe_jax.steptime.report import analyse, expert_recompute

    memory_rows, work_rows = [], []
    entries = []  # (row label, config file, overrides of a former layout)
    for file in args.configs:
        entries.append((file, file, []))
        if args.before:
            entries.append((f"{file} (before [4/5])", file, BEFORE))
        if file in FORMER:  # as it was shipped: the former layout, layers unrolled
            entries.append((f"{file} (former layout)", file, [*FORMER[file], *BEFORE]))
    for name, file, former in entries:
        cfg = load_config(ROOT / "configs" / file, [*former, *args.overrides])
        n = cfg.parallel.devices or 8
        validate_for(cfg, n)
        t0 = time.perf_counter()
        runs = [h100.compile_step(cfg, n, layers=d) for d in h100.depths(cfg)]
        seconds = time.perf_counter() - t0
        p_ = plan(cfg, n)
        c = compile_plan(cfg, n, runs=runs)
        gib = dict(memory_table(p_, c))
        memory_rows.append(
            f"| {name} | {n} | {'/'.join(map(str, c.layers))} | "
            + " | ".join(f"{v:.2f}" for v in gib.values())
            + f" | {'yes' if c.fits else '**no**'} |")
        r = analyse(cfg, n, {x.layers: x.text for x in runs})
        ratio = lambda k: (f"{r.executed.get(k, 0) / r.useful[k]:.2f}x" if r.useful.get(k)
                           else "-")
        total = sum(r.executed.values()) / sum(r.useful.values())
        moved = r.moved.get("moe_dispatch", 0.0)
        planned = r.useful.get("experts", 0.0) * (1 + expert_recompute(cfg))
        work_rows.append(
            f"| {name} | {ratio('attention')} | {ratio('experts')} | "
            f"{r.executed.get('experts', 0.0) / planned:.2f}x | {total:.2f}x | "
            f"{human(moved)} | {human(r.moved.get('expert_tensor', 0.0))} | "
            f"{human(r.routed) if r.routed else '-'} | "
            f"{(f'{moved / r.routed:.1f}x' if r.routed else '-')} | "
            f"{sum(r.exposed.values()) * 1e3:,.1f} | {r.step * 1e3:,.1f} | {r.mfu:.1%} |")
        print(f"{name}: compiled in {seconds:.0f}s", file=sys.stderr, flush=True)
    fields = list(gib)  # the memory table's rows, the same for every config
    out = ["| config | GPUs | layers compiled | " + " | ".join(f"{f} GiB" for f in fields)
           + " | fits 80 GB (90%) |", "|---" * (4 + len(fields)) + "|", *memory_rows, "",
           "| config | attention exec/useful | experts exec/useful | experts exec/(useful + "
           "remat) | all matmuls exec/useful | expert exchange moved | expert_tensor moved "
           "| routed rows | moved/routed | exposed comm ms | step ms | MFU |",
           "|---" * 12 + "|", *work_rows]
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
