"""What a run reports: metrics.jsonl, console lines or a progress bar, TensorBoard, warnings
about overflowing exchange buffers, and profiler traces. Only process 0 writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from msmoe_jax import flops
from msmoe_jax.config import Config, ConfigError


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
    """Device metrics as JSON values: floats, and nested lists for the per-layer arrays
    (``finite`` stays out: a logged step is always finite)."""
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
            for k, v in jax.device_get(metrics).items() if k != "finite"}


class Throughput:
    """Tokens per second and MFU over the steps since the last logged one. The first step
    (compilation) is timed apart and excluded; until a later step ran the rates are null."""

    def __init__(self, cfg: Config, devices: int):
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = flops.peak_flops_per_device(cfg.run.peak_tflops)
        self.devices = devices
        self.t0, self.steps = time.perf_counter(), 0
        self.t_last: float | None = None  # set once the first (compiling) step is done

    def after_step(self, metrics) -> None:
        if self.t_last is None:
            jax.block_until_ready(metrics)
            info(f"compiled and ran the first step in {time.perf_counter() - self.t0:.1f}s")
            self.t_last = time.perf_counter()
        else:
            self.steps += 1

    def rates(self) -> dict:
        now = time.perf_counter()
        tps = (self.steps * self.tokens_per_step / (now - self.t_last)
               if self.steps and self.t_last is not None else None)
        self.t_last, self.steps = now, 0
        return {"tokens_per_sec": tps, "mfu": None if tps is None else
                flops.mfu(self.flops_per_token, tps, self.devices, self.peak)}


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
