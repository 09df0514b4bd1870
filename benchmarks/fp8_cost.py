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


def layer_cost(tokens: int, d: int, k: int, reps: int) -> dict:
    """Times (seconds) of a plain copy, the FP8 encode and the decode of one layer's dispatch
    payload (tokens x top_k rows of d, BF16), its BF16 and FP8 bytes, and the link bandwidth
    (bytes/s) below which sending FP8 pays."""
    encode = jax.jit(fp8.encode)
    decode = jax.jit(lambda w: fp8.decode(w, jnp.bfloat16))
    copy = jax.jit(lambda x: x * 1)  # one read + write of the BF16 payload, for scale
    rows = tokens * k
    x = jax.random.normal(jax.random.key(0), (rows, d), jnp.bfloat16)
    w = encode(x)
    t_copy, t_enc, t_dec = (timed(copy, x, reps=reps), timed(encode, x, reps=reps),
                            timed(decode, w, reps=reps))
    bf16_bytes, fp8_bytes = rows * d * 2, rows * (d + fp8.SCALE_BYTES)
    return dict(rows=rows, d=d, bf16_bytes=bf16_bytes, fp8_bytes=fp8_bytes, copy_s=t_copy,
                encode_s=t_enc, decode_s=t_dec,
                break_even_bw=(bf16_bytes - fp8_bytes) / (t_enc + t_dec))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; one MoE layer's dispatch "
          "payload (rows = tokens x top_k), per direction")
    print(f"{'shape':<20} {'rows x d':>13} {'bf16 MiB':>9} {'fp8 MiB':>8} {'copy us':>8} "
          f"{'encode us':>10} {'decode us':>10} {'break-even GB/s':>16}")
    for name, (tokens, d, k) in shapes.items():
        c = layer_cost(tokens, d, k, args.reps)
        size = f"{c['rows']}x{d}"
        print(f"{name:<20} {size:>13} {c['bf16_bytes'] / 2**20:>9.1f} "
              f"{c['fp8_bytes'] / 2**20:>8.1f} {c['copy_s'] * 1e6:>8.0f} "
              f"{c['encode_s'] * 1e6:>10.0f} {c['decode_s'] * 1e6:>10.0f} "
              f"{c['break_even_bw'] / 1e9:>16.1f}")
    print("A layer sends this payload 4 times per step (dispatch and combine, forward and "
          "backward), each with one encode and one decode.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
