"""Local expert compute: dense padded einsum vs grouped GEMM (ragged_dot), forward + backward.

    python benchmarks/expert_compute.py [--tokens 2048 --d-model 128 --d-ff 256 --experts 8
                                         --top-k 2]

Both paths run on the same device, shapes and routing in one process; the table shows time per
forward+backward and the ratio to the padded path. On a CPU only the ratios mean anything; this
is what ``model.expert_compute=auto`` is chosen from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import timed  # noqa: E402
from msmoe_jax.model.moe import ExpertWeights, experts_padded, experts_ragged, route_topk  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()

    dt = jnp.dtype(a.dtype)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (a.tokens, a.d_model), dt)
    logits = jax.random.normal(keys[1], (a.tokens, a.experts))
    gates, idx, _ = route_topk(logits, a.top_k, True)
    w = ExpertWeights(*(0.05 * jax.random.normal(k, s, dt) for k, s in zip(keys[2:], [
        (a.experts, a.d_model, a.d_ff), (a.experts, a.d_model, a.d_ff),
        (a.experts, a.d_ff, a.d_model)])))

    print(f"backend {jax.default_backend()} | tokens {a.tokens} d {a.d_model} f {a.d_ff} "
          f"E {a.experts} k {a.top_k} {a.dtype} | forward+backward, median of {a.repeats}")
    print(f"{'mode':<10} {'impl':<11} {'ms':>9} {'vs padded':>10}")
    for mode, capacity_factor in (("dropless", None), ("capacity", 1.25)):
        base = None
        for name, impl in (("padded", experts_padded), ("ragged_dot", experts_ragged)):
            loss = lambda x, w, impl=impl, cf=capacity_factor: jnp.sum(
                impl(x, idx, gates, w, cf)[0].astype(jnp.float32) ** 2)
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            t = timed(fn, x, w, reps=a.repeats)
            base = base or t
            print(f"{mode:<10} {name:<11} {1e3 * t:>9.2f} {t / base:>9.2f}x")


if __name__ == "__main__":
    main()
