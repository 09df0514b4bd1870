"""Callbacks the training loop runs after each step, for tools and tests (fault injection:
tests/train_with_faults.py kills the process after a given step). Imports no JAX, so a
wrapper can install hooks before train.py sets the device flags."""

from __future__ import annotations

from collections.abc import Callable

# Each is called with the number of the step that just completed (1-based), on every process.
AFTER_STEP: list[Callable[[int], None]] = []


def after_step(step: int) -> None:
    for hook in AFTER_STEP:
        hook(step)
