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


def time_train_step(step, state, tokens, steps: int, num_devices: int) -> dict:
    """Compiles a jitted train step, reads its collective bytes, runs it once (the warm-up,
    whose loss every layout shares) and then ``steps`` timed times, threading the state.

    Returns compile_s, sent (bytes per device per step), first_loss, last_loss, seconds
    (median per step), the compiled step and the state after the last step."""
    from msmoe_jax.parallel.comm_bytes import collectives

    t0 = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    sent = sum(c.bytes for c in collectives(compiled.as_text(), num_devices))
    state, metrics = compiled(state, tokens)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return dict(compile_s=compile_s, sent=sent, first_loss=first_loss,
                last_loss=float(metrics["loss"]), seconds=statistics.median(times),
                compiled=compiled, state=state)
