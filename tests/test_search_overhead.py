"""The fixed cost of a search: result frames from cached polars metadata, re-ranks that gather
their candidates straight from the chunks, cached chunk lists and abilities. The answers and the
result schema must stay exactly what they were, on every path and source."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from embtools.search.engine import has_ability
from tests.helpers import brute_force, check_frame, check_top_k, make_store

BASE_SCHEMA = {"query": pl.Int64, "rank": pl.Int64, "row_id": pl.Int64, "text_id": pl.String,
               "label": pl.String, "score": pl.Float32}


def _store(tmp_path, kind, x, **kw):
    labels = [("a", "b", None)[i % 3] for i in range(len(x))]
    store = make_store(None if kind == "memory" else tmp_path / "s", x, labels=labels,
                       metadata={"year": np.arange(len(x)) % 50}, **kw)
    return store, labels


def _check_meta(frame, labels):
    ids = frame["row_id"].to_list()
    assert frame["text_id"].to_list() == [f"t{i}" for i in ids]
    assert frame["label"].to_list() == [labels[i] for i in ids]


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_result_frame_schema_and_metadata_on_every_path(tmp_path, rng, kind):
    n, d = 600, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    store, labels = _store(tmp_path, kind, x)
    store.quantize(dimension=d)
    q = x[rng.choice(n, 4)] + 0.01 * rng.standard_normal((4, d)).astype(np.float32)
    cases = {
        "exact": {},
        "binary": {"precision": "binary"},
        "int8": {"precision": "int8"},
        "funnel": {"funnel": [("binary", 60), ("int8", 20)]},
        "where": {"where": "label = 'a'"},
    }
    for name, kw in cases.items():
        for queries, nq in ((q[0], 1), (q, 4), (np.repeat(q[:1], 3, axis=0), 3)):
            frame = store.search(queries, 7, **kw)
            assert dict(frame.schema) == BASE_SCHEMA, name
            check_frame(frame, nq, 7)
            _check_meta(frame, labels)
            extra = store.search(queries, 7, columns=["year", "text_id"], **kw)
            assert dict(extra.schema) == {**BASE_SCHEMA, "year": pl.Int64}, name
            assert extra.drop("year").equals(frame)
            assert extra["year"].to_list() == [i % 50 for i in extra["row_id"].to_list()]
            if name in ("exact", "where"):  # exact: the float64 brute force's rows
                pos = None if name == "exact" else np.flatnonzero(np.array(labels) == "a")
                qs = np.atleast_2d(queries)
                check_top_k(brute_force(x, qs, "cosine", pos), frame["score"].to_numpy().reshape(nq, 7),
                            frame["row_id"].to_numpy().reshape(nq, 7), 7, "cosine")
    # a row hit by every query comes once per query, with its metadata each time
    same = store.search(np.repeat(x[5:6], 3, axis=0), 1)
    assert same["row_id"].to_list() == [5, 5, 5] and same["text_id"].to_list() == ["t5"] * 3


def test_result_frame_of_an_index_search(tmp_path, rng):
    n, d = 2000, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    store, labels = _store(tmp_path, "disk", x)
    store.create_index(dimension=d, metric="cosine")
    frame = store.search(x[:3], 5)
    assert dict(frame.schema) == BASE_SCHEMA
    check_frame(frame, 3, 5)
    _check_meta(frame, labels)
    assert frame.filter(pl.col("rank") == 0)["row_id"].to_list() == [0, 1, 2]


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_small_gathers_under_a_tiny_cap_keep_the_answer(tmp_path, rng, metric):
    # under a cap a re-rank gathers its few candidates straight from the chunks only while their
    # pages fit one gather step; larger shortlists go batch by batch. Same rows either way.
    n, d = 900, 24
    x = rng.standard_normal((n, d)).astype(np.float32)
    path = tmp_path / "s"
    make_store(path, x)
    import embtools as et

    free = et.EmbeddingStore(str(path), backend="numpy")
    capped = et.EmbeddingStore(str(path), backend="numpy", max_memory_gb=0.01)
    tiny = et.EmbeddingStore(str(path), backend="numpy", max_memory_gb=0.0005)
    assert capped.source.takes(8) and not capped.source.takes(1000)
    assert free.source.takes(1000) and not free.source.takes(0)
    q = rng.standard_normal((3, d)).astype(np.float32)
    for k in (1, 10, 200):
        a = free.search(q, k, metric=metric, exact=True)
        for other in (capped, tiny):
            assert a.equals(other.search(q, k, metric=metric, exact=True))
        check_top_k(brute_force(x, q, metric), a["score"].to_numpy().reshape(3, k),
                    a["row_id"].to_numpy().reshape(3, k), k, metric)


def test_abilities_are_cached_per_backend_class():
    from embtools.backends import get_backend
    from embtools.backends.abilities import SupportsAsyncUpload, SupportsRunningTopK

    b = get_backend("numpy")
    for _ in range(2):
        assert has_ability(b, SupportsRunningTopK) is isinstance(b, SupportsRunningTopK)
        assert has_ability(b, SupportsAsyncUpload) is isinstance(b, SupportsAsyncUpload)


def test_snapshot_chunk_lists_are_built_once_and_codes_stay_mapped_without_a_cap(tmp_path, rng,
                                                                                  monkeypatch):
    from embtools.storage.datafile import MappedParquetFile

    x = rng.standard_normal((300, 16)).astype(np.float32)
    store, _ = _store(tmp_path, "disk", x)
    store.quantize(dimension=16, kinds=("binary",))
    src = store.source
    assert src.chunks() is src.chunks()
    released: list[str] = []
    real = MappedParquetFile.release
    monkeypatch.setattr(MappedParquetFile, "release",
                        lambda self, col, *a, **kw: (released.append(col), real(self, col, *a, **kw)))
    for _ in range(3):
        store.search(x[0], 3, precision="binary")
    assert not [c for c in released if c.endswith("_b1")]  # no cap: the code pages stay mapped
    import embtools as et

    capped = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy", max_memory_gb=0.05)
    assert capped.search(x[0], 3, precision="binary")["row_id"].to_list()[0] == 0
    assert [c for c in released if c.endswith("_b1")]  # under a cap they are given back


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_integer_labels_keep_their_type(tmp_path, rng, kind):
    x = rng.standard_normal((120, 8)).astype(np.float32)
    labels = [None if i % 7 == 0 else i % 4 for i in range(len(x))]
    store = make_store(None if kind == "memory" else tmp_path / "s", x, labels=labels)
    frame = store.search(x[:5], 3, exact=True)
    assert dict(frame.schema) == {**BASE_SCHEMA, "label": pl.Int64}
    assert frame["label"].to_list() == [labels[i] for i in frame["row_id"].to_list()]
    assert store.source.take_metadata([7, 3, 7])["label"].to_list() == [None, 3, None]


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_filter_positions_are_kept_per_version(tmp_path, rng, kind, monkeypatch):
    from embtools.search import filters

    x = rng.standard_normal((200, 8)).astype(np.float32)
    store, labels = _store(tmp_path, kind, x)
    want = np.flatnonzero(np.array(labels) == "a")
    scans: list[object] = []
    src = store.source
    real = type(src).select
    monkeypatch.setattr(type(src), "select", lambda self, w: (scans.append(w), real(self, w))[1])
    for where in ("label = 'a'", pl.col("label") == "a"):
        for _ in range(3):
            got = filters.select_positions(store.source, where)
            np.testing.assert_array_equal(got, want)
            assert not got.flags.writeable
            frame = store.search(x[:2], 5, where=where)
            assert set(frame["label"].to_list()) == {"a"}
    assert len(scans) == 2  # one scan per filter, then kept
    # a new version scans again, and sees its own rows
    store.add(x[:3], labels=["a", "b", "a"])
    got = filters.select_positions(store.source, "label = 'a'")
    np.testing.assert_array_equal(got, np.concatenate([want, [200, 202]]))
    # a bad filter is never kept: it raises every time
    from embtools.errors import FilterError

    for _ in range(2):
        with pytest.raises(FilterError):
            store.search(x[0], 3, where="nope = 1")
    # under a tight cap the positions are not kept
    monkeypatch.setattr(filters, "CACHE_BYTES", 0)
    before = len(scans)
    filters.select_positions(store.source, "label = 'b'")
    filters.select_positions(store.source, "label = 'b'")
    assert len(scans) == before + 2


def test_base_rows_are_kept_compact_and_read_once(tmp_path, rng, monkeypatch):
    # the base columns of a row group are kept in about their Arrow size, so a store whose row
    # group fits META_CACHE_BYTES in Arrow form is read once, not once per search
    from embtools.storage import snapshot

    n = 20_000
    x = rng.standard_normal((n, 4)).astype(np.float32)
    store = make_store(tmp_path / "s", x, pieces=False)
    src = store.source
    table = snapshot.pq.read_table(src.files()[0], columns=["row_id", "text_id", "label"])
    monkeypatch.setattr(snapshot, "META_CACHE_BYTES", int(table.nbytes * 1.5))
    reads: list[int] = []
    real = type(src)._row_group
    monkeypatch.setattr(type(src), "_row_group", lambda self, i, rg, names: (reads.append(i), real(self, i, rg, names))[1])
    for _ in range(5):
        pos = rng.integers(0, n, size=10)
        frame = src.take_metadata(pos)
        assert frame["text_id"].to_list() == [f"t{i}" for i in pos]
    assert len(reads) == 1 and 0 < src._meta_bytes <= snapshot.META_CACHE_BYTES
