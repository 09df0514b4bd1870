"""The run directory: one run at a time (an exclusive lock), and the config it was written with.

The lock is ``fcntl.flock`` on ``run.dir/.lock``: the kernel drops it when its process dies, so
a crashed run's lock is taken over by the next run without anyone deleting files. The file
holds the owner's pid, host and start time, for the message a second run prints. Only process
0 of a multi-process run takes it (the others share process 0's directory).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from msmoe_jax.config import ConfigError

LOCK = ".lock"
CONFIG = "config.json"


class RunDirError(ConfigError):
    """The run directory cannot be used, phrased for the user."""


def prepare(path: str | Path) -> Path:
    """Creates the run directory (and parents); a clear error when a file is in the way."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"run.dir={path}: not a directory (it, or a folder above it, is a "
                          "file); choose another run.dir") from None
    except OSError as e:
        raise RunDirError(f"run.dir={path}: cannot create it ({e.strerror})") from None
    return run_dir


class RunLock:
    """An exclusive lock on a run directory, held until ``release`` (or the process ends)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise RunDirError(f"run.dir={run_dir}: cannot write its lock file ({e.strerror})") \
                from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = _describe_owner(self.file.read())
            self.file.close()
            raise RunDirError(
                f"run.dir={run_dir}: another run is using it ({owner}); wait for it to end or "
                "stop it, or choose another run.dir") from None
        except OSError as e:  # e.g. a network filesystem without locks
            self.file.close()
            raise RunDirError(f"run.dir={run_dir}: cannot lock it ({e.strerror}); use a local "
                              "or lock-capable filesystem for run.dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def lock_run_dir(run_dir: Path) -> RunLock | None:
    """Process 0 locks the run directory; in a multi-process run every process learns whether
    it did, so all of them stop (not only process 0) when another run holds it."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir)
        except RunDirError as e:
            refused = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
        if int(failed) and refused is None:
            refused = RunDirError(f"run.dir={run_dir}: process 0 could not lock it (see its "
                                  "error)")
    if refused is not None:
        raise refused
    return lock


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"process {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a previous run in this directory wrote, if readable."""
    try:
        return json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / CONFIG).write_text(json.dumps(config, indent=2))


def differences(saved: dict[str, Any], current: dict[str, Any], section: str) -> list[str]:
    """``section.field: saved -> current`` for each field of ``section`` that differs."""
    old, new = saved.get(section, {}), current.get(section, {})
    return [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
