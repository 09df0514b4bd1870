"""Grouped GEMM of MoE experts: our Pallas kernel against jax.lax.ragged_dot, JAX's Mosaic GPU
ragged_dot example kernel and a dense matmul of the same FLOPs (the ceiling), forward and
backward; then a whole expert layer with the permutation fused into the kernel vs unfused.

    python benchmarks/grouped_gemm.py                 # on one GPU: the table below
    python benchmarks/grouped_gemm.py --quick         # tiny shapes, any backend (a smoke run)

The GEMM is the expert up-projection: rows = tokens x top_k sorted by expert, [rows, h] @
[E, h, ffn]. Forward FLOPs 2*rows*h*ffn; backward (data and weight gradients) twice that.
Routing: ``balanced`` (equal groups) or ``skewed`` (group sizes ~ 1/rank^1.2, some near empty).
Off GPU the Pallas kernel runs in the interpreter and the Mosaic GPU kernel is skipped, so only
the GPU's numbers mean anything; the CPU run checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import timed
from msmoe_jax.kernels.experts import fused_experts, pallas_dot
from msmoe_jax.kernels.grouped_gemm import Tiles, grouped_matmul
from msmoe_jax.model.moe import ExpertWeights, grouped_experts

# name: (hidden, expert ffn, experts, top_k)
SHAPES = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseekmoe": (2048, 1408, 64, 6),
    "paper-internal": (4096, 14336, 32, 3),
}
QUICK = {"tiny": (64, 128, 4, 2)}


def group_sizes(rows: int, experts: int, routing: str) -> np.ndarray:
    if routing == "balanced":
        p = np.ones(experts)
    else:
        p = 1.0 / np.arange(1, experts + 1) ** 1.2
    sizes = np.floor(rows * p / p.sum()).astype(np.int32)
    sizes[0] += rows - sizes.sum()
    return sizes


def mosaic_ragged_dot():
    """JAX's Mosaic GPU ragged_dot example as a library call, or None off GPU / if missing."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError:
        return None

    def dot(lhs, rhs, sizes):
        return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, block_m=128,
                                          block_n=128, block_k=64, max_concurrent_steps=4,
                                          grid_block_n=1)

    return dot


def lowered_as(hlo: str) -> str:
    """How a compiled ragged_dot runs, read from its optimised HLO."""
    if "cudnn" in hlo.lower():
        return "cuDNN fusion"
    if "__gpu$xla.gpu.triton" in hlo:
        return "Triton kernel"
    return "ragged-dot op" if "ragged-dot" in hlo else "dense dot over masked rows"


IMPLS = ("pallas (ours)", "ragged_dot", "dense dot", "mosaic ragged_dot")


def gemm_rows(name, h, f, e, k, tokens, routing, tiles, reps, dtype, impls=IMPLS):
    """One dict per implementation: fwd_ms, fwd_tflops and bwd_tflops (None where the
    implementation has no backward rule, with the reason in ``note``)."""
    rows = tokens * k
    sizes = jnp.asarray(group_sizes(rows, e, routing))
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (rows, h), dtype)
    rhs = (jax.random.normal(keys[1], (e, h, f), jnp.float32) / h ** 0.5).astype(dtype)
    dense_w = rhs[0]
    flops = 2 * rows * h * f
    ours = lambda a, b: grouped_matmul(a, b, sizes, None, None, None, None, None, tiles, None)
    xla = lambda a, b: jax.lax.ragged_dot(a, b, sizes)
    dense = lambda a, b: jnp.dot(a, b)
    available = {"pallas (ours)": (ours, rhs), "ragged_dot": (xla, rhs),
                 "dense dot": (dense, dense_w)}
    mosaic = mosaic_ragged_dot()
    if mosaic is not None:
        available["mosaic ragged_dot"] = (lambda a, b: mosaic(a, b, sizes), rhs)
    out = []
    for impl in impls:
        if impl not in available:
            continue
        fn, w = available[impl]
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b).astype(jnp.float32)),
                                   argnums=(0, 1)))
        row = dict(shape=name, tokens=tokens, routing=routing, impl=impl, fwd_ms=None,
                   fwd_tflops=None, bwd_tflops=None, note="")
        out.append(row)
        try:
            t_f = timed(fwd, lhs, w, reps=reps)
        except Exception as err:  # noqa: BLE001 (one implementation failing: the table goes on)
            row["note"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            continue
        row.update(fwd_ms=t_f * 1e3, fwd_tflops=flops / t_f / 1e12)
        if impl == "ragged_dot":  # which lowering ran (a flag can fall back silently)
            row["lowered_as"] = lowered_as(fwd.lower(lhs, w).compile().as_text())
        try:
            t_b = timed(fwd_bwd, lhs, w, reps=reps) - t_f
            if t_b > 0.05 * t_f:
                row["bwd_tflops"] = 2 * flops / t_b / 1e12
            else:
                row["note"] = "forward + backward timed no slower than forward: noise"
        except Exception as err:  # noqa: BLE001 (the Mosaic example has no backward rule)
            row["note"] = f"no backward ({type(err).__name__}: {str(err)[:150]})"
    return out


def layer_rows(name, h, f, e, k, tokens, routing, tiles, reps, dtype):
    """A whole expert layer (permute, gate/up, SwiGLU, down, gate-weighted combine), fwd+bwd:
    one dict per implementation with its ``ms``."""
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (tokens, h), dtype)
    w = ExpertWeights(*((jax.random.normal(kk, s, jnp.float32) / s[1] ** 0.5).astype(dtype)
                        for kk, s in zip(keys[1:4], [(e, h, f), (e, h, f), (e, f, h)])))
    bias = jnp.log(jnp.asarray(group_sizes(10_000 * e, e, routing), jnp.float32) + 1)
    logits = jax.random.normal(keys[4], (tokens, e)) + 4 * bias
    gates, idx = jax.lax.top_k(jax.nn.softmax(logits), k)
    idx = idx.astype(jnp.int32)
    impls = {"fused (ours)": fused_experts(tiles),
             "unfused, pallas": grouped_experts(pallas_dot(tiles)),
             "unfused, ragged_dot": grouped_experts(jax.lax.ragged_dot)}
    out = []
    for impl, fn in impls.items():
        step = jax.jit(jax.grad(
            lambda x, w, fn=fn: jnp.sum(fn(x, idx, gates, w, None)[0].astype(jnp.float32)),
            argnums=(0, 1)))
        t = timed(step, x, w, reps=reps)
        out.append(dict(shape=name, tokens=tokens, routing=routing, impl=impl, ms=t * 1e3))
    return out


def gemm_table_rows(rows):
    """``gemm_rows`` dicts as table cells."""
    num = lambda v, spec: "n/a" if v is None else format(v, spec)
    return [(r["shape"], r["tokens"], r["routing"], r["impl"], num(r["fwd_ms"], "9.3f"),
             num(r["fwd_tflops"], "8.1f"), num(r["bwd_tflops"], "8.1f") + (
                 f" ({r['note']})" if r["note"] else "")) for r in rows]


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run, any backend)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--routing", nargs="+", default=["balanced", "skewed"],
                   choices=["balanced", "skewed"])
    p.add_argument("--tiles", default="128,128,64", help="block_m,block_n,block_k")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-layer", action="store_true", help="skip the fused-layer table")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                   help="grouped GEMM implementations to time (default: all available)")
    p.add_argument("--json", help="also write the GEMM rows to this JSON file")
    a = p.parse_args(argv)
    bm, bn, bk = (int(v) for v in a.tiles.split(","))
    shapes = QUICK if a.quick else {s: SHAPES[s] for s in a.shapes}
    tokens = [64] if a.quick else a.tokens
    tiles = Tiles(16, 16, 16) if a.quick else Tiles(bm, bn, bk)
    reps = 1 if a.quick else a.reps
    dtype = jnp.bfloat16
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax "
          f"{jax.__version__}, bf16, tiles {tiles}")
    if jax.default_backend() != "gpu":
        print("not a GPU: the Pallas kernel runs interpreted; timings are not meaningful")
    rows, layer = [], []
    for name, (h, f, e, k) in shapes.items():
        for t in tokens:
            for routing in a.routing:
                rows += gemm_rows(name, h, f, e, k, t, routing, tiles, reps, dtype, a.impls)
                if not a.no_layer:
                    layer += layer_rows(name, h, f, e, k, t, routing, tiles, reps, dtype)
    print("\nGrouped GEMM [tokens*k, h] x [E, h, ffn] (backward = data + weight gradients)")
    table(("shape", "tokens", "routing", "impl", "fwd ms", "fwd TFLOP/s", "bwd TFLOP/s"),
          gemm_table_rows(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if layer:
        print("\nExpert layer forward + backward (permute, SwiGLU experts, gate-weighted combine)")
        table(("shape", "tokens", "routing", "impl", "ms"),
              [(r["shape"], r["tokens"], r["routing"], r["impl"], f"{r['ms']:9.3f}")
               for r in layer])


if __name__ == "__main__":
    main()
