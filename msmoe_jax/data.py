"""Input pipeline: token streams, cut into windows and batched by a seeded grain pipeline.

Two sources:

* ``stdlib``: the running Python's standard-library source files, read in sorted order and
  tokenised at byte level (vocabulary 256). Real text, no download. The corpus depends on the
  Python version, so runs are reproducible per interpreter version.
* ``tokens``: a flat binary file of pre-tokenised ids (uint16 or uint32, native byte order),
  memory-mapped so it may be larger than RAM.

The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs plus shifted
targets). ``grain.MapDataset`` shuffles the window order from the seed, repeats it epoch after
epoch and batches; its iterator state (a position) is saved with each checkpoint, so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import grain
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


def make_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 vocab_size: int, name: str = "data") -> grain.MapDataset:
    """An endless, seeded MapDataset of int32 batches [batch_size, seq_len + 1]."""
    windows = Windows(tokens, seq_len, vocab_size, name)
    return (grain.MapDataset.range(windows.count)
            .shuffle(seed=seed)
            .repeat(None)
            .map(windows)
            .batch(batch_size, drop_remainder=True))


def make_iterator(cfg: Config):
    """The training iterator for ``cfg``; has ``get_state()`` / ``set_state()``."""
    name = "stdlib corpus" if cfg.data.source == "stdlib" else f"data.path={cfg.data.path}"
    tokens = load_tokens(cfg.data)
    ds = make_dataset(tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.seed,
                      cfg.model.vocab_size, name)
    return iter(ds)
