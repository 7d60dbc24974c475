"""delete / compact / vacuum, snapshots of older versions, and conflicts between writers: each test
on a local directory and on S3 (moto), through conftest's ``location`` fixture."""

from __future__ import annotations

import os
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.errors import CommitConflictError, DuplicateTextIdError, StoreNotFoundError


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _filled(location, adds: int = 3, rows: int = 20, target: int = 1200) -> tuple[et.EmbeddingStore, np.ndarray]:
    store = location.open("s", backend="numpy", target_file_bytes=target)
    xs = []
    for a in range(adds):
        x = _x(rows, 8, a)
        store.add({8: x, 2: np.ascontiguousarray(x[:, :2] * 3)}, text_ids=[f"a{a}-{i}" for i in range(rows)],
                  labels=[i % 4 for i in range(rows)], metadata={"n": [a * rows + i for i in range(rows)]})
        xs.append(x)
    return store, np.concatenate(xs)


def _data(store: et.EmbeddingStore) -> dict[str, int]:
    """The objects under the store's data/ folder: name -> size."""
    return {o.key.rpartition("/")[2]: o.size for o in store._state.storage.list("data/")}


def _local(store: et.EmbeddingStore, file: str) -> str:
    """A local copy of one of ``store.files()`` (the file itself in a directory)."""
    return store._state.storage.fetch(f"data/{os.path.basename(file)}")


def _check(store: et.EmbeddingStore, x: np.ndarray, keep: np.ndarray) -> None:
    meta = store.metadata().collect()
    assert meta["row_id"].to_list() == np.flatnonzero(keep).tolist()
    assert meta["n"].to_list() == np.flatnonzero(keep).tolist()
    assert np.array_equal(store.get_embeddings(8), x[keep])
    assert np.array_equal(store.get_embeddings(2), x[keep][:, :2] * 3)


def test_delete_rewrites_only_affected_files_and_keeps_row_ids(location):
    store, x = _filled(location)
    v, files = store.version, store.files()
    assert len(files) >= 6
    first_rows = pq.read_metadata(_local(store, files[0])).num_rows
    assert store.delete((pl.col("label") == 1) & (pl.col("n") >= first_rows)) == v + 1
    n = np.arange(len(x))
    keep = ~((n % 20 % 4 == 1) & (n >= first_rows))
    _check(store, x, keep)
    assert store.files()[0] == files[0]          # untouched file is kept as is
    deleted = set(np.flatnonzero(~keep).tolist())
    for f in files:                               # exactly the files with deleted rows were rewritten
        touched = bool(set(pq.read_table(_local(store, f), columns=["row_id"])["row_id"].to_pylist()) & deleted)
        assert (f in store.files()) is not touched
    old = location.open("s", version=v)
    _check(old, x, np.ones(len(x), bool))
    assert store.delete("n > 100000") == v + 1    # nothing matches: no new version
    assert location.open("s").metadata().collect()["row_id"].to_list() == np.flatnonzero(keep).tolist()


def test_delete_everything_then_add_again(location):
    store, x = _filled(location, adds=1)
    store.delete(pl.lit(True))
    assert store.num_rows == 0 and store.files() == [] and store.dimensions == [2, 8]
    assert store.get_embeddings(8).shape == (0, 8)
    assert store.metadata().collect().height == 0
    store.add({8: x[:2], 2: x[:2, :2]}, text_ids=["a0-0", "z"])   # deleted ids may be reused
    meta = store.metadata().collect()
    assert meta["row_id"].to_list() == [20, 21] and meta["text_id"].to_list() == ["a0-0", "z"]


def test_compact_merges_small_files_keeping_rows_order_and_ids(location):
    store, x = _filled(location, adds=3, rows=20, target=700)
    store.add({8: _x(3, 8, 9), 2: _x(3, 2, 9)}, metadata={"late": ["p", "q", "r"]})   # schema grows
    x = np.concatenate([x, _x(3, 8, 9)])
    before_files, v = store.files(), store.version
    meta_before = store.metadata().collect()
    emb2 = store.get_embeddings(2)
    assert store.compact(target_file_bytes=10**8) == v + 1
    assert len(store.files()) == 1 < len(before_files)
    assert store.metadata().collect().equals(meta_before)
    assert np.array_equal(store.get_embeddings(8), x) and np.array_equal(store.get_embeddings(2), emb2)
    assert store.compact(target_file_bytes=10**8) == v + 1    # nothing left to merge
    old = location.open("s", version=v)
    assert old.files() == before_files and np.array_equal(old.get_embeddings(8), x)
    store.add({8: _x(1, 8, 10), 2: _x(1, 2, 10)}, text_ids=["after"])
    assert store.metadata().collect()["row_id"].to_list()[-1] == 63


def test_compact_respects_target_size(location):
    store, x = _filled(location, adds=2, rows=30, target=500)
    sizes = list(_data(store).values())
    target = 3 * max(sizes)
    store.compact(target_file_bytes=target)
    assert 1 < len(store.files()) < len(sizes)
    assert np.array_equal(store.get_embeddings(8), x)


def test_vacuum_removes_unreferenced_files_and_old_versions(location):
    store, x = _filled(location, adds=2)
    store.delete(pl.col("n") < 5)
    store.compact(target_file_bytes=10**8)
    store._state.storage.put("data/junk.txt", b"not parquet")
    all_files = set(_data(store))
    live = {os.path.basename(f) for f in store.files()}
    kept_prev = {os.path.basename(f) for f in location.open("s", version=store.version - 1).files()}
    removed = store.vacuum(retain_versions=2)
    assert removed == {"versions": list(range(store.version - 1)), "files": []}
    assert set(_data(store)) == all_files                     # grace period: no file removed yet
    removed = store.vacuum(retain_versions=2, grace_seconds=0)
    assert removed["versions"] == [] and len(removed["files"]) == len(all_files - live - kept_prev) > 1
    assert set(_data(store)) == live | kept_prev
    assert store.versions() == [store.version - 1, store.version]
    removed = store.vacuum(retain_versions=1, grace_seconds=0)
    assert set(_data(store)) == live and store.versions() == [store.version]
    reopened = location.open("s")
    keep = np.arange(len(x)) >= 5
    assert np.array_equal(reopened.get_embeddings(8), x[keep])
    with pytest.raises(StoreNotFoundError, match="versions"):
        location.open("s", version=1)


def test_vacuum_older_than_keeps_recent_versions(location, monkeypatch):
    import embtools.storage.manifest as mf

    store, _ = _filled(location, adds=1)                       # versions 0 and 1
    time.sleep(1.5)                                            # S3 keeps whole seconds
    for a in (1, 2):                                           # versions 2 and 3
        store.add({8: _x(20, 8, a), 2: _x(20, 2, a)}, text_ids=[f"b{a}-{i}" for i in range(20)])
    made = {o.key: o.mtime for o in store._state.storage.list("_versions/")}
    # an hour after version 2 was made, less half a second: 0 and 1 are older than an hour
    now = made[f"_versions/{2:020d}.json"] + 3600 - 0.5
    monkeypatch.setattr(mf.time, "time", lambda: now)
    removed = store.vacuum(retain_versions=1, older_than=3600, grace_seconds=0)
    monkeypatch.undo()
    assert removed["versions"] == [0, 1] and store.versions() == [2, 3]
    assert location.open("s", version=2).num_rows == 40


def test_reader_keeps_its_version_while_writer_commits(location):
    writer, x = _filled(location, adds=1)
    reader = location.open("s")                 # opened at version 1
    pinned = location.open("s", version=1)
    lazy = reader.metadata()
    writer.add({8: _x(5, 8, 5), 2: _x(5, 2, 5)})
    writer.delete(pl.col("n") < 3)
    writer.compact(target_file_bytes=10**8)
    for r in (reader, pinned):
        assert r.version == 1 and r.num_rows == 20
        assert np.array_equal(r.get_embeddings(8), x)
        assert r.metadata().collect()["n"].to_list() == list(range(20))
        # files of 11 and 9 rows: every batch is a view of one file, so batches end at files
        assert [len(b) for _, b in r.iter_batches(8, batch_rows=7)] == [7, 4, 7, 2]
    assert lazy.collect().height == 20
    assert reader.refresh() == writer.version == 4 and reader.num_rows == 22


def test_appends_from_two_handles_rebase(location):
    a, _ = _filled(location, adds=1)
    b = location.open("s")
    a.add({8: _x(2, 8, 1), 2: _x(2, 2, 1)}, text_ids=["from-a", "shared"])
    assert b.version == 1
    with pytest.raises(DuplicateTextIdError, match="'shared'"):
        b.add({8: _x(2, 8, 2), 2: _x(2, 2, 2)}, text_ids=["from-b", "shared"])
    assert b.version == 1 and location.open("s").version == 2
    assert b.add({8: _x(1, 8, 3), 2: _x(1, 2, 3)}, text_ids=["from-b"]) == 3
    meta = b.metadata().collect()
    assert meta["text_id"].to_list()[-3:] == ["from-a", "shared", "from-b"]
    assert meta["row_id"].is_unique().all() and meta["row_id"].is_sorted()


def test_delete_conflicts_with_concurrent_compact(location):
    a, x = _filled(location, adds=2, target=700)
    b = location.open("s")
    a.compact(target_file_bytes=10**8)
    with pytest.raises(CommitConflictError, match="retry"):
        b.delete(pl.col("n") == 0)
    latest = location.open("s")
    assert latest.version == a.version and np.array_equal(latest.get_embeddings(8), x)
    b.refresh()
    assert b.delete(pl.col("n") == 0) == a.version + 1 and b.num_rows == len(x) - 1


def test_delete_rebases_over_concurrent_append(location):
    a, _ = _filled(location, adds=1)
    b = location.open("s")
    a.add({8: _x(2, 8, 4), 2: _x(2, 2, 4)}, text_ids=["p", "q"])
    b.delete(pl.col("n") < 10)
    meta = location.open("s").metadata().collect()
    assert meta["text_id"].to_list() == [f"a0-{i}" for i in range(10, 20)] + ["p", "q"]
