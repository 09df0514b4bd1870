"""Input pipeline: deterministic order, resumable position, token files, clear errors."""

import dataclasses

import numpy as np
import pytest

from msmoe_jax.data import DataError, make_dataset, stdlib_corpus, token_file


def take(it, n):
    return [np.asarray(next(it)) for _ in range(n)]


def test_stdlib_corpus_is_real_text():
    corpus = stdlib_corpus(200_000)
    assert corpus.dtype == np.uint8 and len(corpus) == 200_000
    text = corpus.tobytes().decode("utf-8", errors="ignore")
    assert "def " in text and "import " in text


def test_order_is_seeded_and_state_resumes():
    tokens = np.arange(5000) % 251
    ds = lambda seed: make_dataset(tokens, 16, 4, seed, 256)
    a, b = take(iter(ds(0)), 5), take(iter(ds(0)), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], take(iter(ds(1)), 1)[0])
    assert a[0].shape == (4, 17) and a[0].dtype == np.int32

    it = iter(ds(0))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    resumed = iter(ds(0))
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 4)):
        np.testing.assert_array_equal(x, y)


def test_windows_are_contiguous_slices_and_epochs_cover_all():
    tokens = np.arange(1 + 8 * 10) % 256  # exactly 10 windows of 8 (+1 target)
    it = iter(make_dataset(tokens, 8, 5, 0, 256))
    starts = []
    for batch in take(it, 2):  # one epoch
        for row in batch:
            assert np.array_equal(row, tokens[row[0]:row[0] + 9])
            starts.append(int(row[0]))
    assert sorted(starts) == list(range(0, 80, 8))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_roundtrip(tmp_path, dtype):
    ids = np.random.default_rng(0).integers(0, 50_000, size=2000).astype(dtype)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    mm = token_file(str(path), dtype)
    np.testing.assert_array_equal(mm, ids)
    batch = next(iter(make_dataset(mm, 32, 2, 0, 50_000)))
    for row in batch:
        start = np.flatnonzero(ids[:-32] == row[0])
        assert any(np.array_equal(ids[s:s + 33], row) for s in start)


def test_data_errors(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a positive multiple of the uint16 item size"):
        token_file(str(odd), "uint16")
    with pytest.raises(DataError, match="too few for one window"):
        make_dataset(np.arange(10), 16, 2, 0, 256)
    it = iter(make_dataset(np.full(100, 300), 8, 2, 0, 256, name="data.path=x.bin"))
    with pytest.raises(DataError, match=r"data.path=x.bin: token id 300 .* outside model.vocab_size=256"):
        next(it)


def test_global_batches_match_the_batched_stream_on_any_sharding(tmp_path):
    """A global batch built from per-shard reads is make_dataset's batch, whether the batch
    is split over 2 row groups (replicated over the rest) or 8."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from msmoe_jax.data import GlobalBatches, load_tokens
    from support import tiny_config

    cfg = tiny_config(tmp_path)
    expected = iter(make_dataset(load_tokens(cfg.data), cfg.train.seq_len, cfg.train.batch_size,
                                 cfg.seed, cfg.model.vocab_size))
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    data = GlobalBatches(cfg)
    for spec in (P("data"), P(("data", "seq")), P("data")):
        batch = data.next(NamedSharding(mesh, spec))
        assert batch.shape == (8, 33) and batch.sharding.spec == spec
        np.testing.assert_array_equal(np.asarray(batch), next(expected))
    assert data.get_state() == {"next_window": 24, "seq_len": 32}
    data.set_state({"next_batch": 1})  # a checkpoint from before positions counted windows
    np.testing.assert_array_equal(data.rows(8, 2, 5), np.asarray(data.next(
        NamedSharding(mesh, P())))[2:5])
    data.set_state({"next_batch": 3}, saved_batch_size=4)  # saved with batches of 4
    assert data.get_state()["next_window"] == 12
    with pytest.raises(DataError, match="next_window"):
        data.set_state({"position": 3})


def test_resuming_with_another_batch_size_continues_the_window_stream(tmp_path):
    """Three batches of 8, resumed with batches of 16 (or 4): the next batch starts at window
    24 either way, so no window is skipped or repeated. Another seq_len is refused."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from msmoe_jax.data import GlobalBatches, load_tokens, window_dataset
    from support import tiny_config

    cfg = tiny_config(tmp_path)
    replicated = NamedSharding(jax.make_mesh((8,), ("data",)), P())
    saved = GlobalBatches(cfg)
    for _ in range(3):
        saved.next(replicated)
    stream = window_dataset(load_tokens(cfg.data), cfg.train.seq_len, cfg.seed,
                            cfg.model.vocab_size)
    for batch_size in (16, 4):
        other = GlobalBatches(dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size)))
        other.set_state(saved.get_state())
        np.testing.assert_array_equal(np.asarray(other.next(replicated)),
                                      np.stack([stream[24 + i] for i in range(batch_size)]))
    longer = GlobalBatches(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seq_len=64)))
    with pytest.raises(DataError, match="train.seq_len"):
        longer.set_state(saved.get_state())
