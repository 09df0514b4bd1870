"""Input pipeline: token streams, cut into windows and batched by a seeded grain pipeline.

Two sources:

* ``stdlib``: the running Python's standard-library source files, read in sorted order and
  tokenised at byte level (vocabulary 256). Real text, no download. The corpus depends on the
  Python version, so runs are reproducible per interpreter version.
* ``tokens``: a flat binary file of pre-tokenised ids (uint16 or uint32, native byte order),
  memory-mapped so it may be larger than RAM.

The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs plus shifted
targets). ``grain.MapDataset`` shuffles the window order from the seed, repeats it epoch after
epoch and batches; its position (the next window's index) is saved with each checkpoint, so a
resumed run sees exactly the windows the uninterrupted run would have seen. In a
multi-process run every process reads only the rows of each global batch that its own devices
hold (``GlobalBatches``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import grain
import jax
import numpy as np

from msmoe_jax.config import Config, DataConfig


class DataError(ValueError):
    """A problem with the training data, phrased for the user."""


def stdlib_corpus(max_bytes: int) -> np.ndarray:
    """Bytes of the standard library's ``*.py`` files (sorted paths), at most ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data + b"\n")
        total += len(data) + 1
        if total >= max_bytes:
            break
    if not chunks:
        raise DataError(f"data.source=stdlib: no Python source files found under {root}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def token_file(path: str, dtype: str) -> np.ndarray:
    """Memory-maps a flat file of token ids."""
    p = Path(path)
    itemsize = np.dtype(dtype).itemsize
    size = p.stat().st_size
    if size == 0 or size % itemsize:
        raise DataError(f"data.path={path}: {size} bytes is not a positive multiple of the "
                        f"{dtype} item size ({itemsize}); is data.token_dtype right?")
    return np.memmap(p, dtype=dtype, mode="r")


def load_tokens(cfg: DataConfig) -> np.ndarray:
    if cfg.source == "stdlib":
        return stdlib_corpus(cfg.max_bytes)
    assert cfg.path is not None  # Config.validate: data.path is set for source 'tokens'
    return token_file(cfg.path, cfg.token_dtype)


class Windows:
    """Random access to window i: tokens[i*s : i*s + s + 1], checked against the vocabulary."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int, name: str):
        self.tokens, self.seq_len, self.vocab_size, self.name = tokens, seq_len, vocab_size, name
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise DataError(f"{name}: {len(tokens)} tokens is too few for one window of "
                            f"train.seq_len + 1 = {seq_len + 1}")

    def __call__(self, i) -> np.ndarray:
        start = int(i) * self.seq_len
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)
        if window.max() >= self.vocab_size:
            raise DataError(f"{self.name}: token id {int(window.max())} near position {start} is "
                            f"outside model.vocab_size={self.vocab_size}")
        return window


def window_dataset(tokens: np.ndarray, seq_len: int, seed: int, vocab_size: int,
                   name: str = "data") -> grain.MapDataset:
    """An endless, seeded MapDataset of int32 windows [seq_len + 1]: a shuffled epoch order,
    repeated."""
    windows = Windows(tokens, seq_len, vocab_size, name)
    return grain.MapDataset.range(windows.count).shuffle(seed=seed).repeat(None).map(windows)


def make_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 vocab_size: int, name: str = "data") -> grain.MapDataset:
    """An endless, seeded MapDataset of int32 batches [batch_size, seq_len + 1]."""
    return (window_dataset(tokens, seq_len, seed, vocab_size, name)
            .batch(batch_size, drop_remainder=True))


class GlobalBatches:
    """The global batches of a run, each process reading only the rows its devices hold.

    The run reads the window stream (what ``window_dataset`` gives) in order, ``B`` windows a
    batch, whatever the number of processes. ``next(sharding)`` builds the global array from
    process-local reads (``jax.make_array_from_callback`` asks only for the addressable shards).
    The position is the next window's index, saved with checkpoints in windows rather than
    batches, so a run resumed with another ``train.batch_size`` (or on another mesh or process
    count) goes on exactly where the saved run stopped. Windows of another ``train.seq_len``
    would be other windows, so that change is refused on resume.
    """

    def __init__(self, cfg: Config):
        name = "stdlib corpus" if cfg.data.source == "stdlib" else f"data.path={cfg.data.path}"
        self.windows = window_dataset(load_tokens(cfg.data), cfg.train.seq_len, cfg.seed,
                                      cfg.model.vocab_size, name)
        self.shape = (cfg.train.batch_size, cfg.train.seq_len + 1)
        self.position = 0  # the next window

    def rows(self, first: int, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of the batch starting at window ``first``: int32 [hi - lo, s + 1]."""
        return np.stack([self.windows[first + i] for i in range(lo, hi)])

    def next(self, sharding) -> jax.Array:
        read = {}  # devices holding the same rows (sequence/tensor replicas) read them once

        def shard(index):
            lo, hi, _ = index[0].indices(self.shape[0])
            if (lo, hi) not in read:
                read[(lo, hi)] = self.rows(self.position, lo, hi)
            return read[(lo, hi)][(slice(None), *index[1:])]

        out = jax.make_array_from_callback(self.shape, sharding, shard)
        self.position += self.shape[0]
        return out

    def get_state(self) -> dict:
        return {"next_window": self.position, "seq_len": self.shape[1] - 1}

    def set_state(self, state: dict, saved_batch_size: int | None = None) -> None:
        """Restores a saved position. Checkpoints written before positions were counted in
        windows hold ``next_batch``: that many batches of ``saved_batch_size`` (the saved
        run's ``train.batch_size``; this run's when unknown)."""
        seq_len = self.shape[1] - 1
        if "next_window" in state:
            if state.get("seq_len", seq_len) != seq_len:
                raise DataError(
                    f"train.seq_len: the checkpoint was trained on windows of "
                    f"{state['seq_len']} tokens, this config cuts {seq_len}; other windows "
                    "would repeat or skip data. Keep train.seq_len, or start afresh "
                    "(checkpoint.resume=false or another run.dir)")
            self.position = int(state["next_window"])
        elif "next_batch" in state:
            self.position = int(state["next_batch"]) * (saved_batch_size or self.shape[0])
        else:
            raise DataError(f"the checkpoint's data position {state} has neither 'next_window' "
                            "nor 'next_batch'; set checkpoint.resume=false to start afresh")
