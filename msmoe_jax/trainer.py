"""The training loop: open the run directory, start or resume the state, run the steps, log,
and save checkpoints that hold only finite states."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from msmoe_jax import flops, hooks, rundir
from msmoe_jax.checkpoint import Checkpointer, CheckpointError, ShapeMismatch
from msmoe_jax.config import Config
from msmoe_jax.convert import restore_params
from msmoe_jax.data import GlobalBatches
from msmoe_jax.hf.families import ConversionError
from msmoe_jax.observe import MetricsLog, OverflowWatch, Profile, Throughput, info, lead, to_record
from msmoe_jax.parallel.mesh import REPLICATED, Layout, make_mesh, sharding
from msmoe_jax.state import init_state, state_from_params
from msmoe_jax.step import make_train_step


class NonFiniteError(FloatingPointError):
    """A step's loss or gradients were not finite; phrased for the user."""


@dataclasses.dataclass
class Run:
    """Everything the loop needs, set up by ``start``."""
    cfg: Config
    run_dir: Path
    mesh: Mesh
    layout: Layout
    graphdef: Any
    optimizer: Any
    specs: Any
    state: Any
    data: GlobalBatches
    ckpt: Checkpointer | None
    first_step: int  # 0, or the step the run resumed at


def train(cfg: Config, devices=None) -> dict[str, Any]:
    """Runs (or resumes) training as configured. Returns a summary of the run."""
    run_dir = rundir.prepare(cfg.run.dir)
    lock = rundir.lock_run_dir(run_dir)
    ckpt = None
    try:
        if cfg.checkpoint.every > 0:
            ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every,
                                cfg.checkpoint.keep, cfg.checkpoint.async_save)
        return loop(start(cfg, run_dir, devices, ckpt))
    finally:
        if ckpt is not None:
            ckpt.close()
        if lock is not None:
            lock.release()


def loop(run: Run) -> dict[str, Any]:
    cfg, ckpt, data, state = run.cfg, run.ckpt, run.data, run.state
    traces = []
    step_fn = make_train_step(cfg, run.graphdef, run.optimizer, run.mesh, run.layout, run.specs,
                              on_trace=lambda: traces.append(1))
    batches = sharding(run.mesh, run.layout.batch)
    last = cfg.train.steps
    if run.first_step >= last:
        info(f"nothing to do: the run in {run.run_dir} is already at step {run.first_step} of "
             f"{last} (raise train.steps to continue it)")
    log = MetricsLog(run.run_dir, last, run.first_step, cfg.run.progress, cfg.run.tensorboard)
    profile = Profile(run.run_dir / "profile", run.first_step + 1, cfg.run.profile_steps)
    overflow, meter = OverflowWatch(cfg), Throughput(cfg, run.mesh.size)
    finite = FiniteWatch(run.mesh, run.first_step, cfg.checkpoint.resume)
    history, metrics = [], None
    try:
        for step in range(run.first_step, last):
            profile.at(step, metrics)
            state, metrics = step_fn(state, data.next(batches))
            finite.note(metrics["finite"])
            meter.after_step(metrics)
            done = step + 1
            log.advance(1)
            if done % cfg.train.log_every == 0 or done in (run.first_step + 1, last):
                finite.check(ckpt)  # the metrics' transfer syncs here anyway
                record = {"step": done, **to_record(metrics), **meter.rates()}
                log.write(record)
                if warning := overflow.check(record):
                    info(warning)
                history.append(record)
            if ckpt is not None and (ckpt.due(done) or done == last):
                finite.check(ckpt)  # the save waits for this step anyway
                ckpt.save(done, state, data.get_state(), force=done == last)
            hooks.after_step(done)
        finite.check(ckpt)
    finally:
        profile.stop(metrics)
        log.close()
    return {"history": history, "traces": len(traces), "start_step": run.first_step,
            "state": state, "mesh": run.mesh, "layout": run.layout}


def start(cfg: Config, run_dir: Path, devices, ckpt: Checkpointer | None) -> Run:
    """The mesh, the data and the state: fresh, initialised from ``checkpoint.init_from`` or
    resumed from the run directory's latest checkpoint. Writes ``config.json`` once the state
    is there (a refused resume leaves the directory as it was)."""
    devices = list(jax.devices() if devices is None else devices)
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    info(f"layout: {layout.describe()}")
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    info(f"mesh {dict(mesh.shape)} over {mesh.size} {devices[0].platform} devices{hosts}")

    data = GlobalBatches(cfg)
    latest = ckpt.latest_step() if ckpt is not None and cfg.checkpoint.resume else None
    init_from = cfg.checkpoint.init_from if latest is None else None
    # Resuming restores into abstract arrays: the fresh model is never materialised.
    graphdef, optimizer, state, specs = init_state(
        cfg, mesh, layout, abstract=latest is not None or init_from is not None)
    if init_from is not None:
        try:
            params = restore_params(init_from, cfg, mesh, layout)
        except ConversionError as e:
            raise CheckpointError(f"checkpoint.init_from: {e}") from e
        state = state_from_params(params, optimizer, mesh, specs)
        info(f"initialised the parameters from {init_from}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    info(f"model: {n_params:,} parameters, "
         f"{flops.active_matmul_params(cfg.model):,} active matmul parameters per token")
    first_step = 0
    if latest is not None:
        assert ckpt is not None
        state = resume(cfg, run_dir, ckpt, latest, state, data)
        first_step = int(state["step"])
        info(f"resumed from {ckpt.directory / str(latest)} at step {first_step}")
    if lead():
        rundir.write_config(run_dir, cfg.to_dict())
    return Run(cfg, run_dir, mesh, layout, graphdef, optimizer, specs, state, data, ckpt,
               first_step)


def resume(cfg: Config, run_dir: Path, ckpt: Checkpointer, step: int, target,
           data: GlobalBatches):
    """The state of checkpoint ``step`` on ``target``'s shardings; sets the data position.
    A checkpoint of another model is refused naming the model fields that changed (from the
    ``config.json`` the saved run wrote)."""
    saved = rundir.saved_config(run_dir)
    try:
        state, data_state = ckpt.restore(step, target)
    except ShapeMismatch:
        current = cfg.to_dict()
        changed = [line for section in ("model", "optimizer")
                   for line in rundir.differences(saved or {}, current, section)]
        if not changed:
            raise
        raise CheckpointError(
            f"run.dir={run_dir}: cannot resume from step {step}: its checkpoint holds another "
            f"model or optimizer state ({'; '.join(changed)}, saved -> this config). Set those "
            "fields back, or start afresh with checkpoint.resume=false or another run.dir") \
            from None
    data.set_state(data_state, (saved or {}).get("train", {}).get("batch_size"))
    return state


class FiniteWatch:
    """The first step whose loss or gradients were not finite (0: none yet), kept on the
    devices: noting a step is one more tiny asynchronous computation, and reading the result
    happens only where the loop waits for the devices anyway (logged steps, checkpoints, the
    end). The step itself already left the state unchanged (``step.make_train_step``)."""

    def __init__(self, mesh: Mesh, first_step: int, resumes: bool = True):
        self.resumes = resumes  # whether a rerun resumes (checkpoint.resume), for the message
        replicated = sharding(mesh, REPLICATED)
        self.first_bad, self.done = jax.jit(
            lambda: (jnp.zeros((), jnp.int32), jnp.full((), first_step, jnp.int32)),
            out_shardings=(replicated, replicated))()
        self._note = jax.jit(
            lambda bad, done, ok: (jnp.where((bad == 0) & ~ok, done + 1, bad), done + 1),
            out_shardings=(replicated, replicated))

    def note(self, finite) -> None:
        self.first_bad, self.done = self._note(self.first_bad, self.done, finite)

    def check(self, ckpt: Checkpointer | None) -> None:
        bad = int(self.first_bad)
        if not bad:
            return
        saved = ckpt.latest_step() if ckpt is not None and self.resumes else None
        rerun = (f"it resumes from the last checkpoint, step {saved}, which is finite (if the "
                 "run was diverging already there, delete that step's directory, or set "
                 "checkpoint.resume=false)"
                 if saved is not None else
                 "it starts afresh (checkpoints are off: checkpoint.every=0)" if ckpt is None
                 else "it starts afresh (checkpoint.resume=false)" if not self.resumes
                 else "it starts afresh (no checkpoint was saved before that step)")
        raise NonFiniteError(
            f"step {bad}: the loss or the gradients are not finite (the first such step). It was "
            "not applied, and no state from it on was saved. Lower optimizer.lr (or raise "
            f"optimizer.warmup_steps), or check the data, and rerun: {rerun}")
