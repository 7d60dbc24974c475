"""The vector-source contract: one conformance class run for every VectorSource implementation.

``SourceTests`` checks a source built by ``make(case)`` against the arrays and metadata it was
built from: the Parquet Snapshot of a store directory (several files, deleted rows), the in-memory
store's MemorySource, and the bare ArraySource (one dimension, no metadata). Subclass it with a new
``make`` to check a new source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pytest

from embtools.errors import DimensionMismatchError, FilterError, InvalidArgumentError
from embtools.storage.memory_source import ArraySource, MemorySource
from embtools.storage.snapshot import Snapshot
from embtools.storage.source import VectorSource, gather_rows

N = 157  # rows added; some are deleted again in the store cases


@dataclass
class Case:
    """A source and what it must hold: ``vectors[d]`` row by row, ``meta`` (or None)."""

    source: Any
    vectors: dict[int, np.ndarray]
    meta: pl.DataFrame | None
    store: Any = None  # the store that made it, if any


def _all(source: Any, dim: int, positions: Any = None, batch_rows: int | None = None,
         views: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    pos, vec, sizes = [], [], []
    for p, v in source.iter_vectors(dim, positions, batch_rows, views=views):
        assert v.dtype == np.float32 and v.shape == (len(p), dim) and p.dtype == np.int64
        pos.append(p.copy())
        vec.append(np.array(v))
        sizes.append(len(p))
    if not pos:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32), []
    return np.concatenate(pos), np.concatenate(vec), sizes


class SourceTests:
    """Every VectorSource must pass these; subclasses define ``make(new_store, rng)``."""

    frozen = True
    has_metadata = True

    def make(self, new_store, rng) -> Case:  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def case(self, new_store, rng) -> Case:
        return self.make(new_store, rng)

    def test_shape_and_protocol(self, case):
        src = case.source
        n = len(next(iter(case.vectors.values())))
        assert isinstance(src, VectorSource)
        assert (src.num_rows, list(src.dimensions)) == (n, sorted(case.vectors))
        assert bool(src.frozen) is self.frozen

    @pytest.mark.parametrize("batch_rows", [1, 7, 64, None, 10_000])
    def test_iter_all_rows_in_order(self, case, batch_rows):
        n = case.source.num_rows
        for d, x in case.vectors.items():
            pos, vec, sizes = _all(case.source, d, batch_rows=batch_rows)
            np.testing.assert_array_equal(pos, np.arange(n))
            np.testing.assert_array_equal(vec, x)
            if batch_rows is not None:
                # small batches hold exactly batch_rows rows, except the last
                assert all(s == batch_rows for s in sizes[:-1]) and 0 < sizes[-1] <= batch_rows

    @pytest.mark.parametrize("views", [False, True])
    def test_selected_positions_ascending_any_input_order(self, case, rng, views):
        n = case.source.num_rows
        pick = rng.choice(n, size=n // 3, replace=True)  # repeats, any order
        want = np.unique(pick)
        for d, x in case.vectors.items():
            for rows in (1, 5, 32):
                pos, vec, sizes = _all(case.source, d, pick, batch_rows=rows, views=views)
                np.testing.assert_array_equal(pos, want)
                np.testing.assert_array_equal(vec, x[want])
                assert max(sizes) <= rows
                if not views:
                    assert all(s == rows for s in sizes[:-1])
            np.testing.assert_array_equal(gather_rows(case.source, d, want), x[want])
        assert _all(case.source, case.source.dimensions[0], np.array([], np.int64))[0].size == 0

    def test_take_rows_gathers_across_chunks(self, case, rng):
        src = case.source
        n = src.num_rows
        for d, x in case.vectors.items():
            for want in (np.array([0]), np.array([n - 1]), np.array([0, n - 1]),
                         np.unique(rng.choice(n, size=n // 2)), np.arange(n)):
                for dim in (d, max(1, d // 2)):
                    out = np.full((len(want), dim), np.nan, np.float32)
                    src.take_rows(dim, want, out)
                    np.testing.assert_array_equal(out, x[want, :dim])
                    # gather_rows takes the same rows (straight, or batch by batch)
                    np.testing.assert_array_equal(gather_rows(src, dim, want), x[want, :dim])
            with pytest.raises(InvalidArgumentError):  # repeats: fewer rows than asked for
                src.take_rows(d, np.array([1, 1]), np.empty((2, d), np.float32))
            with pytest.raises(InvalidArgumentError):
                src.take_rows(d, np.array([n]), np.empty((1, d), np.float32))

    def test_views_cover_every_row_once(self, case):
        d = max(case.vectors)
        pos, vec, sizes = _all(case.source, d, batch_rows=16, views=True)
        np.testing.assert_array_equal(pos, np.arange(case.source.num_rows))
        np.testing.assert_array_equal(vec, case.vectors[d])
        assert max(sizes) <= 16

    def test_prefixes_of_stored_dimensions(self, case):
        stored = sorted(case.vectors)
        for want in range(1, max(stored) + 1):
            serving = min(d for d in stored if d >= want)
            _, vec, _ = _all(case.source, want, batch_rows=50)
            np.testing.assert_array_equal(vec, case.vectors[serving][:, :want])
        with pytest.raises(DimensionMismatchError):
            next(iter(case.source.iter_vectors(max(stored) + 1)))
        for bad in (0, -1, 2.5, True, "8"):
            with pytest.raises(InvalidArgumentError):
                next(iter(case.source.iter_vectors(bad)))

    def test_bad_positions_and_batch_rows(self, case):
        d = max(case.vectors)
        n = case.source.num_rows
        for bad in ([n], [-1], [[0, 1]], [0.5]):
            with pytest.raises(InvalidArgumentError):
                list(case.source.iter_vectors(d, np.array(bad)))
        for bad in (0, -3, True, 2.0):
            with pytest.raises(InvalidArgumentError):
                list(case.source.iter_vectors(d, batch_rows=bad))

    def test_select_and_take_metadata(self, case, rng):
        src = case.source
        np.testing.assert_array_equal(src.select(None), np.arange(src.num_rows))
        if not self.has_metadata:
            with pytest.raises(InvalidArgumentError):
                src.select("year > 3")
            with pytest.raises(InvalidArgumentError):
                src.take_metadata([0])
            return
        meta = case.meta
        assert meta is not None
        years = meta["year"].to_numpy()
        got = src.select("year % 3 = 1")
        np.testing.assert_array_equal(got, np.flatnonzero(years % 3 == 1))
        assert got.dtype == np.int64
        np.testing.assert_array_equal(src.select(pl.col("label") == "b"),
                                      np.flatnonzero(meta["label"].to_numpy() == "b"))
        assert src.select("year < -1").size == 0
        with pytest.raises(FilterError):
            src.select("no_such_column > 1")
        pick = rng.permutation(src.num_rows)[:20]
        frame = src.take_metadata(pick, ["year"])
        assert frame.columns == ["row_id", "text_id", "label", "year"]
        assert frame["text_id"].to_list() == meta["text_id"].gather(pick).to_list()
        assert frame["year"].to_list() == years[pick].tolist()
        assert src.take_metadata(np.array([], np.int64))["text_id"].to_list() == []
        with pytest.raises(InvalidArgumentError):
            src.take_metadata([src.num_rows])
        with pytest.raises(InvalidArgumentError):
            src.take_metadata([0], ["nope"])


def _store_case(store: Any, rng: np.random.Generator) -> Case:
    """Add N rows of dimensions 8 and 20 (independent values) in three adds, delete a few."""
    x20 = rng.standard_normal((N, 20)).astype(np.float32)
    x8 = rng.standard_normal((N, 8)).astype(np.float32)
    years = rng.integers(0, 30, N)
    labels = rng.choice(["a", "b", "c"], N)
    for lo, hi in ((0, 50), (50, 51), (51, N)):
        store.add({20: x20[lo:hi], 8: x8[lo:hi]}, text_ids=[f"t{i}" for i in range(lo, hi)],
                  labels=labels[lo:hi].tolist(), metadata={"year": years[lo:hi].tolist()})
    gone = [3, 50, 51, N - 1]
    store.delete(pl.col("text_id").is_in([f"t{i}" for i in gone]))
    keep = np.setdiff1d(np.arange(N), gone)
    meta = pl.DataFrame({"text_id": [f"t{i}" for i in keep], "label": labels[keep],
                         "year": years[keep]})
    return Case(store.source, {20: x20[keep], 8: x8[keep]}, meta, store)


class TestSnapshot(SourceTests):
    def make(self, new_store, rng) -> Case:
        store = new_store("disk", target_file_bytes=2048)
        case = _store_case(store, rng)
        assert isinstance(case.source, Snapshot) and len(store.files()) > 3
        return case

    def test_a_version_never_changes(self, case, rng):
        before = _all(case.source, 20)[1]
        case.store.add({20: rng.standard_normal((5, 20)), 8: rng.standard_normal((5, 8))},
                       text_ids=list("vwxyz"))
        np.testing.assert_array_equal(_all(case.source, 20)[1], before)


class TestMemorySource(SourceTests):
    def make(self, new_store, rng) -> Case:
        case = _store_case(new_store("memory"), rng)
        assert isinstance(case.source, MemorySource)
        return case

    test_a_version_never_changes = TestSnapshot.test_a_version_never_changes


class TestArraySource(SourceTests):
    frozen = False
    has_metadata = False

    def make(self, new_store, rng) -> Case:
        x = rng.standard_normal((N, 12))  # float64 input: stored as float32
        return Case(ArraySource(x), {12: x.astype(np.float32)}, None)

    def test_refuses_non_matrices(self):
        for bad in (np.ones(3), np.ones((2, 0)), np.ones((2, 2, 2))):
            with pytest.raises(InvalidArgumentError):
                ArraySource(bad)
