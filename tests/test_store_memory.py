"""The memory cap on the store side: get_embeddings, iter_batches, add splitting, releases."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.errors import MemoryLimitError
from embtools.memory import format_bytes
from embtools.storage.datafile import MappedParquetFile

N, D = 2000, 64            # 512,000 bytes of embeddings
CAP_GB = 400_000 / 1024**3  # a cap below that


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.fixture
def capped(tmp_path):
    x = _x(N, D)
    et.EmbeddingStore(tmp_path / "s").add(x, metadata={"k": list(range(N))})
    return et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=CAP_GB), x


def test_get_embeddings_past_the_cap_raises_with_sizes_and_hint(capped):
    store, x = capped
    with pytest.raises(MemoryLimitError) as info:
        store.get_embeddings(D)
    msg = str(info.value)
    assert format_bytes(N * D * 4) in msg and format_bytes(int(CAP_GB * 1024**3)) in msg
    assert "iter_batches" in msg and "search" in msg
    half = store.get_embeddings(D, where=pl.col("k") % 2 == 0)
    assert np.array_equal(half, x[::2])
    assert np.array_equal(store.get_embeddings(16), x[:, :16])   # a prefix fits
    assert store.budget.held_bytes == 0


def test_iter_batches_sized_from_the_cap_and_ledger(capped):
    store, x = capped
    cap = store.budget.cap_bytes
    sizes, blocks = [], []
    for meta, block in store.iter_batches(D):
        assert 0 < store.budget.held_bytes <= cap
        sizes.append(len(block))
        blocks.append(np.array(block))
        assert meta["k"].to_list() == list(range(sum(sizes) - len(block), sum(sizes)))
    assert max(sizes) * D * 4 <= cap and len(sizes) >= 2
    assert np.array_equal(np.concatenate(blocks), x)
    assert store.budget.held_bytes == 0
    it = store.iter_batches(D, batch_rows=100)
    next(it)
    assert store.budget.held_bytes == 100 * D * 4
    it.close()
    assert store.budget.held_bytes == 0


def test_iter_batches_batch_rows_checked_against_the_cap(capped):
    store, _ = capped
    with pytest.raises(MemoryLimitError, match="batch_rows"):
        store.iter_batches(D, batch_rows=N)
    assert [len(b) for _, b in store.iter_batches(D, batch_rows=700)] == [700, 700, 600]


def test_get_memory_info_on_disk(capped):
    store, _ = capped
    info = store.get_memory_info()
    assert info["cap_bytes"] == int(CAP_GB * 1024**3) and info["max_memory_gb"] == CAP_GB
    assert info["dimensions"][D]["bytes"] == N * D * 4 and info["dimensions"][D]["held_bytes"] == 0
    assert info["held_bytes"] == 0 and not info["in_memory"]
    assert store.get_total_memory_usage() == 0


def test_large_add_is_split_into_bounded_files(tmp_path):
    x = _x(N, D)
    store = et.EmbeddingStore(tmp_path / "s", max_memory_gb=CAP_GB)
    store.add(x)
    per_row = D * 4
    for f in store.files():
        rows = pq.read_metadata(f).num_rows
        assert rows * per_row <= store.budget.cap_bytes // 2
        assert pq.read_metadata(f).num_row_groups == 1  # mapped, never decoded whole: one view
    assert len(store.files()) >= 3
    assert np.array_equal(et.EmbeddingStore(tmp_path / "s").get_embeddings(D), x)
    t = et.EmbeddingStore(tmp_path / "t", target_file_bytes=50_000)
    t.add(x)
    assert len(t.files()) == -(-N // (50_000 // (D * 4 + 64)))


def test_finished_row_groups_are_released_once(tmp_path, monkeypatch):
    x = _x(300, 8)
    store = et.EmbeddingStore(tmp_path / "s", max_memory_gb=3000 / 1024**3)  # row groups of ~93 rows
    store.add(x)
    groups = sum(pq.read_metadata(f).num_row_groups for f in store.files())
    assert groups > 3
    released: list[tuple[str, str, int]] = []
    orig = MappedParquetFile.release

    def spy(self, column, row_group):
        released.append((self.path, column, row_group))
        return orig(self, column, row_group)

    monkeypatch.setattr(MappedParquetFile, "release", spy)
    got = np.concatenate([np.array(b) for _, b in store.iter_batches(8, batch_rows=40)])
    assert np.array_equal(got, x)
    assert len(released) == len(set(released)) == groups


def test_big_batches_are_views_given_back_as_the_reader_moves_on(tmp_path, monkeypatch):
    # 20,000 rows of 1 KiB in files (row groups) of at most 4 MiB; batches of 6,000 rows (6 MB) are above
    # VIEW_BATCH_BYTES: they end at row group ends rather than copy, and each view's rows are
    # given back (release_rows) before the next batch is made.
    x = _x(20_000, 256)
    et.EmbeddingStore(tmp_path / "s", max_memory_gb=16 / 1024, target_file_bytes=4 * 1024**2).add(x)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=16 / 1024)  # capped: give back
    groups = [g for f in store.files() for g in pq.ParquetFile(f).metadata.to_dict()["row_groups"]]
    sizes = [g["num_rows"] for g in groups]
    assert len(sizes) > 3 and max(sizes) < 6000
    released: list[tuple[int, int]] = []
    orig = MappedParquetFile.release_rows

    def spy(self, column, row_group, start=None, stop=None):
        if start is not None:  # not the whole-chunk release at the end of a row group
            released.append((start, stop))
        return orig(self, column, row_group, start, stop)

    monkeypatch.setattr(MappedParquetFile, "release_rows", spy)
    got, lengths = [], []
    for i, (_pos, block) in enumerate(store.source.iter_vectors(256, batch_rows=6000)):
        assert not block.flags.owndata and len(block) <= 6000  # a view of the mapped file
        assert len(released) == i  # the batches before this one were given back
        got.append(np.array(block))
        lengths.append(len(block))
    assert np.array_equal(np.concatenate(got), x)
    assert sum(lengths) == 20_000 and len(released) == len(lengths)
    # rows gathered from a selection come in half batches (a copy lives on in the consumer's
    # hands while the next is filled), with the same values
    sel = np.arange(0, 20_000, 2)
    blocks = list(store.source.iter_vectors(256, positions=sel, batch_rows=6000))
    assert max(len(b) for _, b in blocks) <= 3000
    assert np.array_equal(np.concatenate([b for _, b in blocks]), x[sel])
    # small batches keep their exact size across row groups (copies are cheap there)
    small = [len(b) for _, b in store.source.iter_vectors(256, batch_rows=1000)]
    assert small[:-1] == [1000] * (len(small) - 1)
