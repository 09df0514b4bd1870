"""Timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, *args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
