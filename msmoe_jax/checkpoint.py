"""Checkpoints with Orbax's CheckpointManager.

A checkpoint holds the train state (step, parameters, optimizer state) and the data iterator's
position (JSON). Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves no step that ``latest_step`` would pick up. Restoring takes
abstract arrays carrying the *current* mesh's shardings, so a checkpoint saved on one mesh is
restored onto another (different device count or shape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, phrased for the user."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report them plainly
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval (or ``force``); returns whether it saved."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        path = self.directory / str(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint {path} could not be restored ({type(e).__name__}: {msg}). It may be "
                "corrupt or written for a different model config; delete it, or set "
                "checkpoint.resume=false or another run.dir to start afresh.") from e
        return out.state, out.data

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
