"""Compile a training step for H100s that are not there: the program a GPU cluster would run,
read on a CPU-only machine.

JAX's CUDA PJRT plugin can describe a GPU topology without a GPU or driver
(``jax.experimental.topologies``); programs compiled for its devices go through XLA:GPU's whole
pipeline (fusions, async collectives, BF16/FP8 wires, Triton kernels compiled to PTX) and come
with a per-device memory analysis. Needs ``pip install -e .[h100-compile]`` (the plugin of
exactly the installed jaxlib's version, without NVIDIA libraries) and ``JAX_PLATFORMS=cpu``,
set before JAX starts (the command-line tools set it; without it the plugin tries to start
CUDA and is not registered).

Devices are laid out as hosts x 8 (``gpus_per_host``), numbered host-major, so the mesh's
last axes are the ones inside a node, as ``jax.make_mesh`` orders real GPUs.

Configs are compiled at their full depth when their layers run under ``jax.lax.scan`` (the
default). Deep unrolled ones are compiled with fewer layers (``layers``) and extrapolated
linearly per layer (``extrapolate``): memory and the per-layer HLO are affine in the layer count
because every block is the same program; ``docs/performance.md`` states the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

from msmoe_jax.config import Config

TARGET = Path(__file__).with_name("targets") / "h100_sxm.txtpb"
GPUS_PER_HOST = 8
CUDNN_STAND_IN = 90100  # the cuDNN version JAX is told when compiling without the library
INSTALL_HINT = ('compiling for H100 needs the CUDA PJRT plugin of the installed jaxlib: '
                'pip install -e ".[h100-compile]" (and JAX_PLATFORMS=cpu on a machine without '
                'a GPU)')


class PluginMissing(RuntimeError):
    """The CUDA plugin is not installed or not registered; the message says what to do."""


def platforms_for_compiling() -> None:
    """Call before JAX starts, from command-line tools that only compile: keeps JAX off CUDA
    (the plugin still registers, for compile-only topologies) unless a GPU is really there,
    in which case JAX_PLATFORMS is left alone."""
    import os
    import shutil

    if "JAX_PLATFORMS" not in os.environ and not shutil.which("nvidia-smi"):
        os.environ["JAX_PLATFORMS"] = "cpu"


def devices(n: int, gpus_per_host: int = GPUS_PER_HOST) -> list:
    """``n`` compile-only H100 devices, ``min(n, gpus_per_host)`` per host."""
    per_host = min(n, gpus_per_host)
    if n % per_host:
        raise ValueError(f"{n} H100s do not fill hosts of {per_host}")
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            platform="cuda", topology_name="h100", target_config=TARGET.read_text(),
            topology=f"1x{n // per_host}x{per_host}")
    except (NotImplementedError, RuntimeError, ValueError) as e:
        raise PluginMissing(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    return list(topo.devices)


def memory_capacity() -> int:
    """Bytes of one target GPU's memory (the target description's device_memory_size)."""
    import re

    found = re.search(r"device_memory_size:\s*(\d+)", TARGET.read_text())
    assert found, f"{TARGET} has no device_memory_size"
    return int(found.group(1))


def available() -> bool:
    """True when H100 programs can be compiled here."""
    try:
        devices(1)
        return True
    except PluginMissing:
        return False


class Memory(NamedTuple):
    """Bytes per device from XLA's memory analysis of the compiled program."""

    arguments: int  # inputs: training state and batch
    outputs: int
    aliased: int  # outputs written over donated inputs (the state)
    temporaries: int  # everything live inside the step: activations, gradients, workspaces

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to them + temporaries (XLA's single temporary
        allocation, after buffer assignment reused what it could): what the step reserves."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def scaled(self, other: Memory, factor: float) -> Memory:
        """self + factor x (other - self), field by field (linear extrapolation)."""
        return Memory(*(round(a + factor * (b - a)) for a, b in zip(self, other)))


class Compiled(NamedTuple):
    text: str  # the optimised, scheduled HLO of one device
    memory: Memory
    devices: int
    layers: int  # the layers compiled (may be fewer than the config's)
    seconds: float  # compile time


def depths(cfg: Config, max_layers: int = 8) -> tuple[int, ...]:
    """The depths to compile ``cfg`` at: its own when its layers run under ``jax.lax.scan``
    (compile time does not grow with depth) or number at most ``max_layers``; else two small
    ones with the same dense leading layers (d + 2 and d + 4 blocks), whose difference is two
    MoE blocks: extrapolating from them (``extrapolate``) adds MoE blocks only."""
    depth, dense = cfg.model.num_layers, cfg.model.num_dense_layers
    if cfg.train.scan_layers or depth <= max(max_layers, dense + 4):
        return (depth,)
    return (dense + 2, dense + 4)


def with_layers(cfg: Config, layers: int) -> Config:
    """``cfg`` with ``layers`` blocks (dense leading layers kept while they fit)."""
    m = cfg.model
    dense = min(m.num_dense_layers, max(layers - 1, 0)) if m.num_dense_layers else 0
    return dataclasses.replace(cfg, model=dataclasses.replace(
        m, num_layers=layers, num_dense_layers=dense))


@contextlib.contextmanager
def compile_only():
    """Around tracing and compiling for compile-only H100s: no persistent compilation cache
    (it cannot reload such executables), and where no cuDNN library is installed (the plugin
    comes without NVIDIA libraries) a stand-in for JAX's cuDNN version probe, which cuDNN
    attention runs at trace time. XLA compiles the fused-attention custom call without cuDNN;
    its cuDNN graph is built when the program loads on a GPU."""
    import jax
    from jax._src.cudnn import fused_attention_stablehlo as fused  # private: no public probe

    probe = fused.check_cudnn_version
    try:
        probe()
    except RuntimeError:  # "cuDNN not found"
        fused.check_cudnn_version = lambda: CUDNN_STAND_IN
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
        fused.check_cudnn_version = probe


def compile_step(cfg: Config, n: int | None = None, layers: int | None = None) -> Compiled:
    """Compiles ``cfg``'s training step for ``n`` H100s (default: ``parallel.devices``, else 8)
    with abstract inputs (nothing is allocated), optionally with ``layers`` blocks only."""
    from msmoe_jax.cli import GPU_OVERLAP_FLAGS
    from msmoe_jax.comms import build_step

    n = n or cfg.parallel.devices or 8
    if layers is not None:
        cfg = with_layers(cfg, layers)
    devs = devices(n)
    t0 = time.perf_counter()
    # The XLA:GPU flags train.py would set (async collectives, combining, pipelining).
    typed = lambda v: {"true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
    options = ({k: typed(v) for k, v in GPU_OVERLAP_FLAGS.items()}
               if cfg.run.gpu_overlap_flags else {})
    with compile_only():
        _, _, step, state, tokens = build_step(cfg, devs)
        compiled = _compile(step.lower(state, tokens), options)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    memory = Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                    m.temp_size_in_bytes)
    return Compiled(compiled.as_text(), memory, n, cfg.model.num_layers, seconds)


def _compile(lowered, options: dict):
    """``lowered.compile(options)``, leaving out options this XLA does not know (jax 0.11
    dropped the pipelined-collective flags), each with a warning."""
    import re
    import warnings

    import jax

    while True:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as e:
            unknown = re.search(r"No such compile option:?\s*'?([\w.]+)", str(e))
            if not unknown or unknown.group(1) not in options:
                raise
            warnings.warn(f"this XLA has no option {unknown.group(1)}; compiling without it",
                          stacklevel=2)
            options = {k: v for k, v in options.items() if k != unknown.group(1)}


def extrapolate(a: Compiled, b: Compiled, layers: int) -> Memory:
    """Per-device memory at ``layers`` blocks from two compiles with fewer (linear in layers)."""
    return a.memory.scaled(b.memory, (layers - a.layers) / (b.layers - a.layers))
