"""The training loop: state initialisation, the compiled step, logging and checkpoints."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from msmoe_jax import flops
from msmoe_jax.checkpoint import CheckpointError, Checkpointer
from msmoe_jax.config import Config, ConfigError
from msmoe_jax.convert import restore_params
from msmoe_jax.data import GlobalBatches
from msmoe_jax.hf.families import ConversionError
from msmoe_jax.optim import lr_schedule
from msmoe_jax.parallel.mesh import REPLICATED, Layout, make_mesh, sharding
from msmoe_jax.parallel.strategy import make_grad_fn
from msmoe_jax.state import init_state, state_from_params


def load_params(path: str, cfg: Config, mesh: Mesh, layout: Layout):
    try:
        return restore_params(path, cfg, mesh, layout)
    except ConversionError as e:
        raise CheckpointError(f"checkpoint.init_from: {e}") from e


def make_train_step(cfg: Config, graphdef, optimizer, mesh: Mesh, layout: Layout, specs,
                    on_trace: Callable | None = None):
    """A jitted ``step(state, tokens) -> (state, metrics)``; ``on_trace`` runs at each trace.
    The new state keeps the layout of ``specs``."""
    grad_fn = make_grad_fn(cfg, graphdef, mesh, layout, specs["params"])
    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)

    def step(state, tokens):
        if on_trace is not None:
            on_trace()
        metrics, grads = grad_fn(state["params"], tokens)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    state_shardings = jax.tree.map(lambda spec: sharding(mesh, spec), specs)
    return jax.jit(step, donate_argnums=0,
                   out_shardings=(state_shardings, sharding(mesh, REPLICATED)))


def lead() -> bool:
    """Whether this is the process that logs and writes metrics (process 0)."""
    return jax.process_index() == 0


class MetricsLog:
    """metrics.jsonl in the run directory plus console output (a tqdm bar on a terminal) and,
    optionally, TensorBoard. Only process 0 writes; the other processes' logs do nothing."""

    def __init__(self, run_dir: Path, total: int, start: int, progress: str,
                 tensorboard: bool = False):
        self.file = self.bar = self.tb = None
        if not lead():
            return
        self.path = run_dir / "metrics.jsonl"
        self._drop_records_after(start)  # a resumed run rewrites the steps it redoes
        self.file = open(self.path, "a")
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        if tensorboard:
            self.tb = tensorboard_writer(run_dir / "tensorboard")

    def _drop_records_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            write_tensorboard(self.tb, record)
        text = (f"step {record['step']:>6} | loss {record['loss']:.4f} | ce {record['ce']:.4f}"
                + (f" | aux {record['aux_loss']:.4f} | z {record['z_loss']:.3f}"
                   f" | drop {record['dropped_frac']:.3f}" if "aux_loss" in record else "")
                + (f" | {record['tokens_per_sec']:,.0f} tok/s | MFU {100 * record['mfu']:.2f}%"
                   if record["tokens_per_sec"] is not None else " | tok/s n/a (compiling)"))
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def tensorboard_writer(directory: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard: needs the tensorboardX package; install it with "
                          "pip install -e '.[tensorboard]' or set run.tensorboard=false") from None
    return SummaryWriter(str(directory))


def write_tensorboard(writer, record: dict) -> None:
    """Scalars as they are; per MoE layer the busiest expert's load over the mean load and
    the dropped assignments."""
    step = record["step"]
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step":
            writer.add_scalar(f"train/{key}", value, step)
    for i, counts in enumerate(record.get("expert_tokens", [])):
        mean = max(sum(counts) / len(counts), 1e-9)
        writer.add_scalar(f"moe/layer{i}/max_load_over_mean", max(counts) / mean, step)
        writer.add_scalar(f"moe/layer{i}/dropped_tokens", record["dropped_tokens"][i], step)
    writer.flush()


OVERFLOW_WARN = 0.01  # dropless runs: warn when more of the assignments than this overflow


class OverflowWatch:
    """Dropless runs lose no assignment to capacity, so any ``dropped_frac`` is rows that did
    not fit the bounded exchange buffers (``parallel.buffer_factor``): warn past
    ``OVERFLOW_WARN``, at the first such step and then at most every ``every`` steps."""

    def __init__(self, cfg: Config, every: int = 100):
        self.factor = cfg.parallel.buffer_factor
        self.active = cfg.model.moe_mode == "dropless" and cfg.model.num_experts > 0
        self.every, self.last = every, None

    def check(self, record: dict) -> str | None:
        frac, step = record.get("dropped_frac", 0.0), record["step"]
        if not self.active or frac <= OVERFLOW_WARN:
            return None
        if self.last is not None and step - self.last < self.every:
            return None
        self.last = step
        return (f"warning: step {step}: {frac:.1%} of the expert assignments overflowed the "
                f"dropless exchange buffers (parallel.buffer_factor={self.factor}) and were "
                "dropped; raise parallel.buffer_factor, or set it to 'worst_case'")


def to_record(metrics: dict) -> dict:
    """Device metrics as JSON values: floats, and nested lists for the per-layer arrays."""
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
            for k, v in jax.device_get(metrics).items()}


def info(msg: str) -> None:
    if lead():
        print(msg, flush=True)


class Profile:
    """A JAX profiler trace of ``steps`` steps from ``first`` (0-based; after the compiling
    step), written under ``directory`` for TensorBoard's profile plugin or Perfetto."""

    def __init__(self, directory: Path, first: int, steps: int):
        self.directory, self.first, self.last = directory, first, first + steps
        self.running = False

    def at(self, step: int, pending=None) -> None:
        """Call before running ``step``; ``pending``: the previous step's outputs."""
        if step == self.first and self.last > self.first:
            jax.profiler.start_trace(str(self.directory))
            self.running = True
        elif step == self.last:
            self.stop(pending)

    def stop(self, pending=None) -> None:
        if self.running:
            jax.block_until_ready(pending)  # the traced steps run asynchronously
            jax.profiler.stop_trace()
            self.running = False
            info(f"profiler trace of steps {self.first + 1}..{self.last} in {self.directory}")


# Fault injection for the kill-and-resume test: SIGKILL this process right after this step.
KILL_AFTER_STEP_ENV = "MSMOE_TEST_KILL_AFTER_STEP"


def train(cfg: Config, devices=None) -> dict[str, Any]:
    """Runs (or resumes) training as configured. Returns a summary of the run."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead():
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    devices = list(jax.devices() if devices is None else devices)
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    info(f"layout: {layout.describe()}")
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    info(f"mesh {dict(mesh.shape)} over {mesh.size} {devices[0].platform} devices{hosts}")

    data = GlobalBatches(cfg)
    ckpt, latest = None, None
    if cfg.checkpoint.every > 0:
        ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep,
                            cfg.checkpoint.async_save)
        latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    init_from = cfg.checkpoint.init_from if latest is None else None
    # Resuming restores into abstract arrays: the fresh model is never materialised.
    graphdef, optimizer, state, specs = init_state(
        cfg, mesh, layout, abstract=latest is not None or init_from is not None)
    if init_from is not None:
        state = state_from_params(load_params(init_from, cfg, mesh, layout), optimizer, mesh,
                                  specs)
        info(f"initialised the parameters from {init_from}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    info(f"model: {n_params:,} parameters, "
         f"{flops.active_matmul_params(cfg.model):,} active matmul parameters per token")
    start = 0
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        data.set_state(data_state)
        start = int(state["step"])
        info(f"resumed from {ckpt.directory / str(latest)} at step {start}")

    traces = []
    step_fn = make_train_step(cfg, graphdef, optimizer, mesh, layout, specs,
                              on_trace=lambda: traces.append(1))
    batch_sharding = sharding(mesh, layout.batch)
    flops_per_token = flops.train_flops_per_token(cfg.model, cfg.train.seq_len)
    peak = flops.peak_flops_per_device(cfg.run.peak_tflops)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

    if start >= cfg.train.steps:
        info(f"nothing to do: the run in {run_dir} is already at step {start} of "
             f"{cfg.train.steps} (raise train.steps to continue it)")
    log = MetricsLog(run_dir, cfg.train.steps, start, cfg.run.progress, cfg.run.tensorboard)
    profile = Profile(run_dir / "profile", start + 1, cfg.run.profile_steps)
    overflow = OverflowWatch(cfg)
    history = []
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0"))
    t_last, steps_since, metrics = None, 0, None
    try:
        for step in range(start, cfg.train.steps):
            profile.at(step, metrics)
            tokens = data.next(batch_sharding)
            if t_last is None:
                t0 = time.perf_counter()
                state, metrics = step_fn(state, tokens)
                jax.block_until_ready(metrics)
                info(f"compiled and ran the first step in {time.perf_counter() - t0:.1f}s")
                t_last = time.perf_counter()
            else:
                state, metrics = step_fn(state, tokens)
                steps_since += 1
            done = step + 1
            log.advance(1)
            if done % cfg.train.log_every == 0 or done in (start + 1, cfg.train.steps):
                record = {"step": done, **to_record(metrics)}
                now = time.perf_counter()
                # Throughput excludes the first step (compilation); null until measurable.
                tps = steps_since * tokens_per_step / (now - t_last) if steps_since else None
                t_last, steps_since = now, 0
                record.update(tokens_per_sec=tps, mfu=None if tps is None else
                              flops.mfu(flops_per_token, tps, mesh.size, peak))
                if not np.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {done}; "
                                             "lower optimizer.lr or check the data")
                log.write(record)
                if warning := overflow.check(record):
                    info(warning)
                history.append(record)
            if ckpt is not None:
                ckpt.save(done, state, data.get_state(), force=done == cfg.train.steps)
            if done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        profile.stop(metrics)
        log.close()
        if ckpt is not None:
            ckpt.close()
    return {"history": history, "traces": len(traces), "start_step": start, "state": state,
            "mesh": mesh, "layout": layout}
