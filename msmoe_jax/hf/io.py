"""Reading and writing Hugging Face checkpoints, tensor by tensor.

Import streams: every parameter is built with ``jax.make_array_from_callback`` on its final
sharding, and each device's block is read from the safetensors files on demand, layer by
layer for the stacked blocks' ``[layers, ...]`` parameters. A stacked expert tensor
``[E, d, f]`` is read expert by expert and only the rows and columns the device holds
(``safe_open(...).get_slice``), so no host ever holds a whole layer's experts, let alone the
model; a plain tensor is read once per process and sliced for its devices (for a stacked
parameter, all its layers are held until it is built).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

from msmoe_jax.hf.families import ConversionError, Layered, Source, Stacked


def _open(path: Path):
    """``safe_open`` whose failures (a missing or damaged file) name the file."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (named in model.safetensors.index.json)")
    try:
        return safe_open(path, "np")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"{path}: not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from None


class Reader:
    """The tensors of a checkpoint directory: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index (JSON with a "
                                      f"weight_map): {type(e).__name__}: {e}") from None
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: weight_map: expected an object of tensor "
                                      f"name -> file, got {type(weight_map).__name__}")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.directory}: no *.safetensors files")
            weight_map = {}
            for f in files:
                with _open(f) as s:
                    weight_map.update({k: f.name for k in s.keys()})
        self.weight_map = weight_map
        self._open: dict[str, object] = {}

    def _file(self, name: str):
        if name not in self.weight_map:
            raise ConversionError(f"{self.directory}: tensor {name} is missing")
        f = self.weight_map[name]
        if f not in self._open:
            self._open[f] = _open(self.directory / f)
        return self._open[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        part = self._file(name).get_slice(name)
        return part[index] if index is not None else part[:]


def expected_shape(reader: Reader, source: Source, shape: tuple[int, ...], path: str) -> None:
    """Checks the HF tensor(s) against our parameter's shape before anything is read."""
    if isinstance(source, Layered):
        if len(source.layers) != shape[0]:
            raise ConversionError(f"{path}: {len(source.layers)} layers in the checkpoint, "
                                  f"{shape[0]} in our model")
        for layer in source.layers:
            expected_shape(reader, layer, shape[1:], path)
        return
    if isinstance(source, Stacked):
        got = reader.shape(source.names[0])
        want = shape[1:][::-1] if source.transpose else shape[1:]
        names, count = source.names[0], len(source.names)
        ok = tuple(got) == tuple(want) and count == shape[0]
    else:
        got, names = reader.shape(source.name), source.name
        ok = int(np.prod(got)) == int(np.prod(shape))
    if not ok:
        raise ConversionError(f"{names}: shape {got} does not fit our {path} of shape {shape}")


def _blocks(reader: Reader, source: Source, shape, dtype):
    """``index -> np.ndarray``: the part of our parameter at ``index`` (a tuple of slices),
    read from the HF tensors. A plain tensor is read once per process and kept until the
    parameter is built (devices ask for their blocks one after another); experts are read one
    by one, only the rows and columns asked for."""
    if isinstance(source, Layered):
        parts = [_blocks(reader, s, shape[1:], dtype) for s in source.layers]
        return lambda index: np.stack([parts[i](index[1:])
                                       for i in range(*index[0].indices(shape[0]))])
    if isinstance(source, Stacked):
        def stacked(index):
            experts, rows, cols = index
            parts = []
            for e in range(*experts.indices(shape[0])):
                name = source.names[e]
                if source.transpose:  # ours [a, b] = hf [b, a].T
                    parts.append(reader.read(name, (cols, rows)).T)
                else:
                    parts.append(reader.read(name, (rows, cols)))
            return np.stack(parts).astype(dtype)
        return stacked
    whole: list[np.ndarray] = []

    def dense(index):
        if not whole:
            x = reader.read(source.name)
            whole.append((x.T if source.transpose else x).reshape(shape).astype(dtype))
        return whole[0][index]
    return dense


def load_param(reader: Reader, source: Source, shape, dtype, sharding) -> jax.Array:
    """One parameter, built on ``sharding`` from per-device reads (``_blocks``)."""
    return jax.make_array_from_callback(shape, sharding, _blocks(reader, source, shape, dtype))


def to_hf(tensors: dict[str, Source],
          params_by_path: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters (host arrays by path) -> HF tensors by name."""
    out: dict[str, np.ndarray] = {}
    for path, source in tensors.items():
        _to_hf(source, params_by_path[path], out)
    return out


def _to_hf(source: Source, x: np.ndarray, out: dict[str, np.ndarray]) -> None:
    if isinstance(source, Layered):
        for layer, s in zip(x, source.layers):
            _to_hf(s, layer, out)
        return
    if isinstance(source, Stacked):
        for e, name in enumerate(source.names):
            out[name] = np.ascontiguousarray(x[e].T if source.transpose else x[e])
    elif source.transpose:
        x = x.reshape(int(np.prod(x.shape[:source.in_dims])), -1)
        out[source.name] = np.ascontiguousarray(x.T)
    else:
        out[source.name] = np.ascontiguousarray(x.reshape(-1) if source.flat else x)
