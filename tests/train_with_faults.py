"""train.py with fault injection, for tests: ``python tests/train_with_faults.py --kill-after
STEP [train.py arguments]`` SIGKILLs the process right after step STEP (no cleanup, no final
save), through the loop's after-step hook."""

import os
import runpy
import signal
import sys
from pathlib import Path

from msmoe_jax import hooks  # no JAX: train.py still sets the device flags first


def main() -> None:
    if sys.argv[1:2] != ["--kill-after"]:
        sys.exit("usage: train_with_faults.py --kill-after STEP [train.py arguments]")
    kill_after = int(sys.argv[2])
    hooks.AFTER_STEP.append(
        lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_after else None)
    train = Path(__file__).resolve().parents[1] / "train.py"
    sys.argv = [str(train), *sys.argv[3:]]
    runpy.run_path(str(train), run_name="__main__")


if __name__ == "__main__":
    main()
