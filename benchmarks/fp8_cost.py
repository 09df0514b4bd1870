"""Cost of FP8 quantisation per MoE layer against the bytes it saves.

    python benchmarks/fp8_cost.py           # the paper-sized shapes (meant for one GPU)
    python benchmarks/fp8_cost.py --quick   # small shapes, any backend (a smoke run)

For one MoE layer's dispatch payload (tokens x top_k rows of d_model, BF16) it times, side by
side on one device: the BF16 -> FP8 wire encode (per-row amax, scale, saturating cast, pack)
and the decode back, forward and as the backward does it again for the cotangent. It prints
the bytes a BF16 and an FP8 all_to_all would send for that payload, and the *break-even link
bandwidth*: the bytes saved divided by the quantisation time. Compression pays on links slower
than that (NVLink ~ 450 GB/s per direction on H100, InfiniBand ~ 50 GB/s per GPU).
Absolute times only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks.timing import timed
from msmoe_jax.parallel import fp8

# name: (tokens per device, d_model, top_k)
SHAPES = {
    "mixtral-8x7b 8k": (8192, 4096, 2),
    "deepseekmoe 8k": (8192, 2048, 6),
    "paper-internal 8k": (8192, 4096, 3),
}
QUICK = {"tiny": (512, 128, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    encode = jax.jit(fp8.encode)
    decode = jax.jit(lambda w: fp8.decode(w, jnp.bfloat16))
    copy = jax.jit(lambda x: x * 1)  # one read + write of the BF16 payload, for scale
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; one MoE layer's dispatch "
          "payload (rows = tokens x top_k), per direction")
    print(f"{'shape':<20} {'rows x d':>13} {'bf16 MiB':>9} {'fp8 MiB':>8} {'copy us':>8} "
          f"{'encode us':>10} {'decode us':>10} {'break-even GB/s':>16}")
    for name, (tokens, d, k) in shapes.items():
        rows = tokens * k
        x = jax.random.normal(jax.random.key(0), (rows, d), jnp.bfloat16)
        w = encode(x)
        t_copy = timed(copy, x, reps=args.reps)
        t_enc = timed(encode, x, reps=args.reps)
        t_dec = timed(decode, w, reps=args.reps)
        bf16_bytes, fp8_bytes = rows * d * 2, rows * (d + fp8.SCALE_BYTES)
        saved = bf16_bytes - fp8_bytes
        print(f"{name:<20} {f'{rows}x{d}':>13} {bf16_bytes / 2**20:>9.1f} "
              f"{fp8_bytes / 2**20:>8.1f} {t_copy * 1e6:>8.0f} {t_enc * 1e6:>10.0f} "
              f"{t_dec * 1e6:>10.0f} {saved / (t_enc + t_dec) / 1e9:>16.1f}")
    print("A layer sends this payload 4 times per step (dispatch and combine, forward and "
          "backward), each with one encode and one decode.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
