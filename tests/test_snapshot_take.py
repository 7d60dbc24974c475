"""Gathering a search's hits: the few-rows path (element by element from the string arrays'
buffers) gives exactly the frames of pyarrow's ``take`` path and of an independent reference
(``to_pylist``), for every string layout (large strings, slices with an offset, nulls, all
nulls, empty and non-ASCII strings), non-string labels, repeats and any order."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.errors import InvalidArgumentError
from embtools.storage import snapshot
from embtools.storage.snapshot import BaseRows


def _reference(table: pa.Table, idx: np.ndarray) -> list[tuple]:
    cols = [table.column(n).to_pylist() for n in ("row_id", "text_id", "label")]
    return [tuple(c[i] for c in cols) for i in idx.tolist()]


def _table(rng, n: int, text_type: pa.DataType, label: str) -> pa.Table:
    texts = [("", "é€", "x" * int(rng.integers(0, 40)), f"t{i}")[i % 4] for i in range(n)]
    if label == "all-null":
        labels = pa.nulls(n, pa.string())
    elif label == "int":
        labels = pa.array([None if i % 3 else i for i in range(n)], pa.int64())
    else:
        labels = pa.array([None if i % 3 == 1 else f"l{i % 5}" for i in range(n)], text_type)
    return pa.table({"row_id": pa.array(np.arange(n) * 3 + 1, pa.int64()),
                     "text_id": pa.array(texts, text_type), "label": labels})


@pytest.mark.parametrize("text_type", [pa.string(), pa.large_string()])
@pytest.mark.parametrize("label", ["strings", "all-null", "int"])
@pytest.mark.parametrize("offset", [0, 13])
def test_few_rows_equal_take_and_reference(rng, text_type, label, offset):
    full = _table(rng, 300, text_type, label)
    table = full.slice(offset, 250)  # arrays with an offset into their buffers
    rows = BaseRows.of(table)
    for n in (1, 2, 10, snapshot.FEW_ROWS, snapshot.FEW_ROWS + 1, 600):
        idx = rng.integers(0, table.num_rows, n)
        idx[: n // 3] = idx[0]  # repeats
        got = rows.frame(idx)
        assert got.rows() == _reference(table, idx)
        assert got.schema == pl.Schema({"row_id": pl.Int64, "text_id": pl.String,
                                        "label": pl.Int64 if label == "int" else pl.String})
        slow = rows.take(idx)  # pyarrow's take: the frame of the many-rows path
        assert got.equals(pl.DataFrame([pl.Series("row_id", slow.row_id),
                                        pl.Series("text_id", slow.text_id),
                                        pl.Series("label", slow.label)]))
    assert (rows.strings() is None) == (label == "int")
    if rows.strings() is not None:  # both element-by-element gathers: vectorised and one by one
        idx = np.array([5, 0, 5, 249])
        assert list(zip(*rows.values(idx), strict=True)) == _reference(table, idx)
        assert list(zip(*BaseRows.few_values([(rows, i) for i in idx.tolist()]),
                        strict=True)) == _reference(table, idx)


def test_few_rows_of_an_empty_gather():
    rows = BaseRows.of(pa.table({"row_id": pa.array([4], pa.int64()), "text_id": ["a"],
                                 "label": pa.nulls(1, pa.string())}))
    out = snapshot.base_frame(BaseRows.few_values([]))
    assert out.height == 0 and out.columns == ["row_id", "text_id", "label"]
    assert rows.frame(np.zeros(0, np.int64)).schema == out.schema


@pytest.mark.parametrize("labels", ["strings", "ints"])
@pytest.mark.parametrize("joined", [True, False])
def test_take_metadata_few_and_many_rows_over_row_groups(tmp_path, rng, monkeypatch, labels, joined):
    """A store of several files and row groups: hits spread over them, in any order, with repeats,
    give the rows of the files as pyarrow reads them, the same frame on both paths, whether the
    row groups' base rows are joined into one piece once all are cached or kept apart."""
    n, per = 900, 300
    if not joined:
        monkeypatch.setattr(snapshot.Snapshot, "_join_base_rows", lambda self, groups: None)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    lab = [None if i % 4 == 1 else (f"é{i % 7}" if labels == "strings" else i % 7) for i in range(n)]
    for a in range(0, n, per):
        store.add(rng.standard_normal((per, 4)).astype(np.float32),
                  text_ids=[f"é{i}" * (i % 3 + 1) for i in range(a, a + per)], labels=lab[a:a + per])
    src = store.source
    ref = pa.concat_tables([pq.read_table(f, columns=["row_id", "text_id", "label"]) for f in src.files()])
    for m in (1, 10, 40, snapshot.FEW_ROWS, snapshot.FEW_ROWS + 1, 2000):
        pos = rng.integers(0, n, m)
        pos[: m // 4] = pos[-1]
        fast = src.take_metadata(pos)
        assert fast.rows() == _reference(ref, pos)
        with monkeypatch.context() as m:
            m.setattr(snapshot, "FEW_ROWS", 0)  # every gather through pyarrow's take
            assert fast.equals(src.take_metadata(pos))
        extra = src.take_metadata(pos, ["label"])
        assert extra.equals(fast)
    assert (src._whole_base is not None) == joined  # every row group was read: joined when allowed
    for nq in (1, 3):  # the result frame of a few hits is built in one go
        q = rng.standard_normal((nq, 4)).astype(np.float32)
        res = store.search(q, k=7)
        assert res["text_id"].to_list() == [f"é{i}" * (i % 3 + 1) for i in res["row_id"].to_list()]
        assert res["label"].to_list() == [lab[i] for i in res["row_id"].to_list()]
        with monkeypatch.context() as m:
            m.setattr(snapshot, "FEW_ROWS", 0)
            assert res.equals(store.search(q, k=7))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        src.few_base_values(np.array([3, n]))


def test_num_rows_checks_the_files_once(tmp_path, rng, monkeypatch):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for _ in range(3):
        store.add(rng.standard_normal((5, 4)).astype(np.float32))
    src = store.source
    assert src.num_rows == 15 and src._files_checked
    calls: list[int] = []
    monkeypatch.setattr(snapshot.os.path, "lexists", lambda p: calls.append(1) or True)
    assert src.num_rows == 15 and not calls


def test_uncapped_embedding_views_are_kept_and_dropped_on_close(tmp_path, rng):
    x = rng.standard_normal((50, 8)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x[:20])
    store.add(x[20:])
    src = store.source
    assert not src.capped
    out = np.empty((4, 8), np.float32)
    pos = np.array([1, 19, 20, 49])
    for _ in range(2):
        src.take_rows(8, pos, out)
        np.testing.assert_array_equal(out, x[pos])
    assert len(src._views) == 2 and all(not v.flags.writeable for v in src._views.values())
    src.close()
    assert not src._views


def test_take_rows_of_no_rows_and_of_one_chunk_run(tmp_path, rng):
    x = rng.standard_normal((30, 4)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for a in range(0, 30, 10):
        store.add(x[a:a + 10])
    src = store.source
    src.take_rows(4, np.zeros(0, np.int64), np.empty((0, 4), np.float32))
    for pos in ([0], [3, 4, 9], [9, 10], [0, 11, 12, 29], list(range(30))):
        out = np.empty((len(pos), 4), np.float32)
        src.take_rows(4, np.array(pos), out)
        np.testing.assert_array_equal(out, x[pos])


def test_invalid_utf8_is_corrupt_store_error():
    """Bytes that are not UTF-8 in a string array (Arrow does not check what it reads) give
    CorruptStoreError, not a decoding crash or replaced characters."""
    from embtools.errors import CorruptStoreError

    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 1, 3], np.int32)),
                                                 pa.py_buffer(b"a\xff\xfe")])
    rows = BaseRows(np.array([1, 2], np.int64), bad, pa.array(["x", "y"]))
    assert rows.frame(np.array([0])).rows() == [(1, "a", "x")]
    assert BaseRows.few_values([(rows, 0)]) == ([1], ["a"], ["x"])
    with pytest.raises(CorruptStoreError):
        rows.frame(np.array([0, 1]))
    with pytest.raises(CorruptStoreError):
        BaseRows.few_values([(rows, 1)])


def test_take_rows_few_rows_gather_equals_the_chunked_path(tmp_path, rng, monkeypatch):
    """Without a cap a few rows are copied one by one from the kept views of the mapped chunks:
    the same rows as the chunked path, over files and row groups, prefixes of the stored
    dimension, and the same errors for positions that are not ascending or out of range."""
    from embtools.storage import snapshot as snap_mod
    from embtools.storage.source import ChunkedSource

    x = rng.standard_normal((700, 6)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for a in range(0, 700, 250):
        store.add(x[a:a + 250])
    src = store.source
    assert len(src.chunks()) >= 3
    for n in (1, 2, 18, snap_mod.FEW_TAKE_ROWS, snap_mod.FEW_TAKE_ROWS + 1, 700):
        pos = np.sort(rng.choice(700, n, replace=False)).astype(np.int64)
        for dim in (6, 4):
            out = np.empty((n, dim), np.float32)
            src.take_rows(dim, pos, out)
            assert np.array_equal(out, x[pos, :dim])
            slow = np.empty((n, dim), np.float32)
            ChunkedSource.take_rows(src, dim, pos, slow)
            assert np.array_equal(out, slow)
    taken = []
    monkeypatch.setattr(snap_mod.Snapshot, "_take_kept",
                        lambda self, *a, _f=snap_mod.Snapshot._take_kept: taken.append(_f(self, *a)) or taken[-1])
    src.take_rows(6, pos[:18], np.empty((18, 6), np.float32))
    assert taken == [True]  # the few-rows path served it
    monkeypatch.undo()
    with pytest.raises(InvalidArgumentError):
        src.take_rows(6, np.array([3, 3], np.int64), np.empty((2, 6), np.float32))  # 1 of 2 rows
    with pytest.raises(InvalidArgumentError):
        src.take_rows(6, np.array([699, 700], np.int64), np.empty((2, 6), np.float32))
    with pytest.raises(InvalidArgumentError):
        src.take_rows(6, np.array([-1, 4], np.int64), np.empty((2, 6), np.float32))
    out = np.empty((3, 6), np.float32)
    src.take_rows(6, np.array([9, 2, 4], np.int64), out)  # not ascending: the chunked path sorts
    assert np.array_equal(out, x[[2, 4, 9]])
    out = np.empty((2, 6), np.float32)
    src.take_rows(6, np.array([3, 5], np.int64), out)  # a failed call leaves the path working
    assert np.array_equal(out, x[[3, 5]])
    assert snap_mod.FEW_TAKE_ROWS >= 18  # a single query's candidates
    monkeypatch.setattr(snap_mod, "FEW_TAKE_ROWS", 0)  # the chunked path alone gives the same
    src.take_rows(6, np.array([3, 5], np.int64), out)
    assert np.array_equal(out, x[[3, 5]])
    store.close()


def test_take_rows_under_a_cap_does_not_keep_views(tmp_path, rng):
    x = rng.standard_normal((300, 4)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=0.05)
    store.add(x)
    src = store.source
    out = np.empty((3, 4), np.float32)
    src.take_rows(4, np.array([0, 7, 299], np.int64), out)
    assert np.array_equal(out, x[[0, 7, 299]]) and not src._views


def test_base_rows_are_joined_only_within_half_the_metadata_cache(tmp_path, rng, monkeypatch):
    """The joined copy and its pieces are held together for a moment: the row groups are joined
    only when they fill at most half of META_CACHE_BYTES, and the joined piece is then all the
    cache holds."""
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for a in range(0, 600, 200):
        store.add(rng.standard_normal((200, 4)).astype(np.float32),
                  text_ids=[f"t{i}" for i in range(a, a + 200)])
    pos = np.arange(0, 600, 7)
    total = sum(store.source._base_rows(g).nbytes for g in range(3))
    for cap, joined in ((total * 3 // 2, False), (total * 2, True)):
        monkeypatch.setattr(snapshot, "META_CACHE_BYTES", cap)
        src = et.EmbeddingStore(tmp_path / "s", backend="numpy").source
        got = src.take_metadata(pos)
        assert got["text_id"].to_list() == [f"t{i}" for i in pos.tolist()]
        assert (src._whole_base is not None) == joined
        assert src._meta_bytes <= cap
        if joined:
            assert not src._meta_groups and src._meta_bytes == src._whole_base.nbytes
            assert src.few_base_values(pos[:5])[1] == [f"t{i}" for i in pos[:5].tolist()]
