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


class ShapeMismatch(CheckpointError):
    """A checkpoint whose arrays have other shapes than the config's (another model)."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def _name(path) -> str:
    """A tree path as Orbax names the array: ``params.moe_blocks.attn.wq.value``."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


UNSTACKED = ("its layers are stored one by one (params.blocks.N, written before the blocks "
             "were stacked for jax.lax.scan), which this version does not read; export it "
             "to Hugging Face with the version that wrote it and import it here "
             "(docs/checkpoints-and-hf.md), or start afresh with another run.dir")


def unstacked_layers(names) -> bool:
    """Whether array names (``params.blocks.0.attn.wq.value``) come from a checkpoint with
    one entry per layer: the layout before the blocks were stacked."""
    return any(".blocks." in f".{n}" for n in names)


def saved_names(path: Path) -> list[str]:
    """The array names in an imported ``params/`` or a checkpoint step's ``state/`` under
    ``path``; empty when there is no readable metadata."""
    for item in ("params", "state"):
        if (Path(path) / item).is_dir():
            try:
                with ocp.StandardCheckpointer() as ckpt:
                    tree = ckpt.metadata(Path(path) / item)
                tree = getattr(tree, "item_metadata", tree)
                return [_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
            except Exception:  # noqa: BLE001 - no metadata: nothing to say
                return []
    return []


def _first_sentence(e: Exception) -> str:
    """The gist of an Orbax error, without its advice about Orbax's own API."""
    text = " ".join(str(e).split())
    return text.split(". ")[0][:300]


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler()})
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report them plainly
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write (the interval, and not yet saved)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval (or ``force``); returns whether it saved."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        path = self.directory / str(step)
        # Checked first: Orbax fails on the first mismatching array with others still being
        # read, and those then print tracebacks from its closed event loop.
        if differ := self.mismatches(step, target):
            raise ShapeMismatch(
                f"checkpoint {path} holds arrays of other shapes than this config's: "
                f"{'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path} could not be restored ({type(e).__name__}: "
                f"{_first_sentence(e)}). It may be corrupt or written for a different model "
                "config; delete it, or set checkpoint.resume=false or another run.dir to start "
                "afresh.") from e
        return out.state, out.data

    def mismatches(self, step: int, target: Any) -> list[str]:
        """The arrays whose saved shape differs from ``target``'s (or that only one side has),
        from the checkpoint's metadata; empty when the metadata cannot be read. Raises
        CheckpointError for a checkpoint with one entry per layer (``unstacked_layers``)."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - then restore itself reports what is wrong
            return []
        have = {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
        if not have:  # no usable metadata: let restore judge
            return []
        if unstacked_layers(have):
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: {UNSTACKED}")
        want = {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
        return [f"{k} {have.get(k, 'absent')} saved, {want.get(k, 'absent')} here"
                for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
