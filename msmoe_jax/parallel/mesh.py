"""The device mesh: its axis names and the sharding rules, in one place.

Data parallelism shards the batch over the ``data`` axis and replicates parameters. The
sequence, tensor and expert axes of the folded layout will be added here.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from msmoe_jax.config import ConfigError, ParallelConfig

DATA = "data"
AXES = (DATA,)
BATCH_AXES = (DATA,)  # mesh axes the batch dimension is split over

BATCH = P(BATCH_AXES)  # [batch, ...] arrays
REPLICATED = P()  # parameters and optimizer state under data parallelism


def mesh_shape(cfg: ParallelConfig, device_count: int) -> dict[str, int]:
    """Axis name -> size for ``device_count`` devices; ConfigError if they cannot fill it."""
    data = device_count if cfg.data == -1 else cfg.data
    if data != device_count:
        raise ConfigError(f"parallel.data: the mesh (data={data}) has {data} devices but "
                          f"{device_count} are available; the product of the mesh axes must "
                          "equal the device count (or use -1)")
    return {DATA: data}


def make_mesh(cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh over ``devices`` (default: all). Axis types are Auto: collectives are
    written by hand inside shard_map, and jit outside it only moves whole arrays."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                         axis_types=(AxisType.Auto,) * len(shape))


def sharding(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)
