"""Exact streaming search: differential tests against a NumPy float64 brute force."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.errors import (
    DimensionMismatchError,
    FilterError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
)
from embtools.memory import MemoryBudget
from embtools.search import compute_similarity, search_store
from embtools.search.engine import ArraySource, size_stream, stream_top_k
from tests.helpers import (
    available,
    brute_force,
    check_frame,
    check_top_k,
    make_store,
    planted_corpus,
)

BACKENDS = available()
METRICS = ["cosine", "dot", "l2"]


def _size(backend: str) -> int:
    return 150 if backend == "mlx" else 700  # MLX on CPU is slow here: tiny data


def _cap(n: int, d: int, times: float = 4.0) -> float:
    """A memory cap ``times`` smaller than the corpus."""
    return n * d * 4 / times / 1024**3


def _arrays(frame: pl.DataFrame, nq: int) -> tuple[np.ndarray, np.ndarray]:
    per = frame.height // nq if nq else 0
    s = frame["score"].to_numpy().reshape(nq, per)
    p = frame["row_id"].to_numpy().reshape(nq, per)
    return s, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("filtered", [False, True])
def test_search_matches_brute_force(tmp_path, backend, metric, filtered):
    rng = np.random.default_rng()
    n, d, nq, k = _size(backend), 24, 6, 10
    x = planted_corpus(rng, n, d)
    labels = rng.choice(["a", "b", "c"], size=n).tolist()
    store = make_store(tmp_path / "s", x, backend=backend, max_memory_gb=_cap(n, d), labels=labels)
    q = np.concatenate([x[rng.choice(n, 3)], rng.standard_normal((nq - 3, d)).astype(np.float32)])
    where = pl.col("label") != "b" if filtered else None
    positions = np.flatnonzero(np.array(labels) != "b") if filtered else None
    frame = search_store(store, q, k, metric=metric, where=where)
    check_frame(frame, nq, k)
    scores, found = _arrays(frame, nq)
    check_top_k(brute_force(x, q, metric, positions), scores, found, k, metric)
    if filtered:
        assert set(frame["label"].to_list()) <= {"a", "c"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_exact_ties_broken_by_row_id(tmp_path, backend, metric):
    """Integer data: float32 scores are exact, so the result must equal the brute force exactly,
    with the many exact ties (and the planted duplicates) in row-id order."""
    rng = np.random.default_rng()
    n, d, k = _size(backend), 8, 25
    x = planted_corpus(rng, n, d, integer=True)
    q = np.concatenate([x[:2], rng.integers(-3, 4, size=(3, d)).astype(np.float32)])
    store = make_store(tmp_path / "s", x, backend=backend, max_memory_gb=_cap(n, d, 3))
    scores, found = _arrays(search_store(store, q, k, metric=metric), len(q))
    s64 = brute_force(x, q, metric)
    check_top_k(s64, scores, found, k, metric, exact=True)
    assert (np.diff(s64[0][found[0]]) == 0).any(), "the data should hold exact ties"


def test_corpus_many_times_the_cap_streams_in_many_batches(tmp_path):
    rng = np.random.default_rng()
    n, d = 2000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    cap = _cap(n, d, 8)
    plan = size_stream(MemoryBudget(cap).available_bytes, 5, d, 10, n, "cosine")
    assert plan is not None
    assert plan.rows * 8 <= n and plan.nbytes <= cap * 1024**3
    store = make_store(tmp_path / "s", x, max_memory_gb=cap)
    q = rng.standard_normal((5, d)).astype(np.float32)
    scores, found = _arrays(search_store(store, q, 10), 5)
    check_top_k(brute_force(x, q, "cosine"), scores, found, 10, "cosine")
    assert store.budget.held_bytes == 0 or "search" not in " ".join(store.budget.held())


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_on_array_source_many_small_batches(backend):
    rng = np.random.default_rng()
    n, d = _size(backend), 16
    x = planted_corpus(rng, n, d)
    q = rng.standard_normal((4, d)).astype(np.float32)
    positions = np.sort(rng.choice(n, size=n // 2, replace=False)).astype(np.int64)
    for metric in METRICS:
        s, p = stream_top_k(ArraySource(x), et.get_backend(backend), MemoryBudget(None), q, d, 7,
                            metric, positions, batch_rows=13)
        check_top_k(brute_force(x, q, metric, positions), s, p, 7, metric)
        tied = np.diff(s, axis=1) == 0  # the float32 pass breaks its own ties by position
        assert (np.diff(p, axis=1)[tied] > 0).all()


def test_filter_matching_nothing_one_or_everything(tmp_path):
    rng = np.random.default_rng()
    n, d = 300, 12
    x = rng.standard_normal((n, d)).astype(np.float32)
    years = rng.integers(2000, 2020, size=n)
    years[17] = 2030
    store = make_store(tmp_path / "s", x, metadata={"year": years}, max_memory_gb=_cap(n, d))
    q = rng.standard_normal((3, d)).astype(np.float32)
    none = search_store(store, q, 5, where=pl.col("year") > 2040, columns=["year"])
    assert none.height == 0
    assert none.columns == ["query", "rank", "row_id", "text_id", "label", "score", "year"]
    assert none.schema["score"] == pl.Float32
    one = search_store(store, q, 5, where="year = 2030")
    check_frame(one, 3, 1)
    assert one["row_id"].to_list() == [17, 17, 17]
    everything = search_store(store, q, 5, where=pl.col("year") > 0)
    assert everything.equals(search_store(store, q, 5))


def test_k_larger_than_rows_returns_all_rows_and_columns(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((9, 6)).astype(np.float32)
    years = np.arange(9) + 2000
    store = make_store(tmp_path / "s", x, metadata={"year": years})
    frame = search_store(store, x[:2], 50, columns=["year"], metric="l2")
    check_frame(frame, 2, 9)
    assert frame.filter(pl.col("rank") == 0)["row_id"].to_list() == [0, 1]
    assert (frame["year"].to_numpy() == frame["row_id"].to_numpy() + 2000).all()
    scores, found = _arrays(frame, 2)
    check_top_k(brute_force(x, x[:2], "l2"), scores, found, 50, "l2")


def test_zero_vectors_score_zero_under_cosine(tmp_path):
    x = np.array([[1, 0], [0, 0], [0, 1]], np.float32)
    store = make_store(tmp_path / "s", x)
    frame = search_store(store, np.array([[0.0, 0.0], [1.0, 0.0]]), 3)
    assert not frame["score"].is_nan().any()
    assert frame.filter(pl.col("query") == 0)["score"].to_list() == [0.0, 0.0, 0.0]
    assert frame.filter(pl.col("query") == 1)["row_id"].to_list() == [0, 1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_of_any_backend_and_one_dimensional(tmp_path, backend):
    rng = np.random.default_rng()
    x = rng.standard_normal((60, 8)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    expected = search_store(store, q, 4)
    got = search_store(store, et.convert(q, backend), 4)
    assert got["row_id"].to_list() == expected["row_id"].to_list()
    single = search_store(store, q[1], 4)
    assert single["query"].to_list() == [0] * 4
    assert single["row_id"].to_list() == expected.filter(pl.col("query") == 1)["row_id"].to_list()


def test_backends_agree(tmp_path):
    rng = np.random.default_rng()
    x = planted_corpus(rng, 120, 16)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    frames = {
        b: search_store(make_store(tmp_path / b, x, backend=b, max_memory_gb=_cap(120, 16)), q, 8)
        for b in BACKENDS
    }
    base = frames["numpy"]
    s64 = brute_force(x, q, "cosine")
    for b, f in frames.items():
        np.testing.assert_allclose(f["score"].to_numpy(), base["score"].to_numpy(), atol=1e-5)
        diff = f["row_id"].to_numpy() != base["row_id"].to_numpy()
        if diff.any():  # only where float32 cannot tell the scores apart
            got = s64[f["query"].to_numpy()[diff], f["row_id"].to_numpy()[diff]]
            ref = s64[base["query"].to_numpy()[diff], base["row_id"].to_numpy()[diff]]
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_similarity_seed_form(tmp_path, backend):
    rng = np.random.default_rng()
    x = rng.standard_normal((40, 8)).astype(np.float32)
    store = make_store(tmp_path / "s", x, backend=backend)
    b = et.get_backend(backend)
    sims, idx = compute_similarity(store, x[3], 8, top_k=5)
    assert b.is_array(sims) and isinstance(idx, np.ndarray) and idx.dtype == np.int64
    assert idx.shape == (5,) and idx[0] == 3
    s64 = brute_force(x, x[3:4], "cosine")
    check_top_k(s64, b.to_numpy(sims)[None], idx[None], 5, "cosine")
    all_sims, all_idx = compute_similarity(store, x[:2], 8)
    assert b.to_numpy(all_sims).shape == (2, 40) and sorted(all_idx[0].tolist()) == list(range(40))
    check_top_k(brute_force(x, x[:2], "cosine"), b.to_numpy(all_sims), all_idx, 40, "cosine")


def test_matryoshka_prefix_dimension(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((80, 32)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, found = _arrays(search_store(store, q, 6, dimension=8), 3)
    check_top_k(brute_force(x[:, :8], q, "cosine"), scores, found, 6, "cosine")


def test_bad_input_raises_typed_errors(tmp_path):
    x = np.random.default_rng().standard_normal((20, 4)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    q = x[:2]
    for bad_k in (0, -1, True, 2.5, "3"):
        with pytest.raises(InvalidArgumentError):
            search_store(store, q, bad_k)
    with pytest.raises(DimensionMismatchError):
        search_store(store, np.ones((2, 5), np.float32), 3)
    with pytest.raises(DimensionMismatchError):
        search_store(store, q, 3, dimension=3)
    for bad in (np.nan, np.inf, -np.inf):  # in one query of a few, or both infinities in one
        for one in (np.array([[bad, 0, 0, 0]]), np.array([[0, 1, 0, 0], [1, bad, 0, 0]])):
            with pytest.raises(InvalidEmbeddingsError):
                search_store(store, one, 3)
    with warnings.catch_warnings(), pytest.raises(InvalidEmbeddingsError):
        warnings.simplefilter("error")  # the check itself warns of nothing (no inf - inf)
        search_store(store, np.array([[np.inf, -np.inf, 0, 0]], np.float32)[0], 3)
    with pytest.raises(InvalidEmbeddingsError):
        search_store(store, np.zeros((0, 4)), 3)
    with pytest.raises(InvalidArgumentError):
        search_store(store, q, 3, metric="manhattan")
    with pytest.raises(FilterError):
        search_store(store, q, 3, where=pl.col("no_such_column") > 1)
    with pytest.raises(FilterError):
        search_store(store, q, 3, where="label = = 'x'")
    with pytest.raises(FilterError):
        search_store(store, q, 3, where=42)
    with pytest.raises(InvalidArgumentError):
        search_store(store, q, 3, funnel=[(2, 1)])
    with pytest.raises(InvalidArgumentError):
        compute_similarity(store, q, 4, top_k=0)


def test_all_finite_agrees_with_isfinite_at_the_float32_extremes(rng):
    from embtools.search.request import all_finite

    big = np.finfo(np.float32).max
    for shape in ((1, 384), (7, 5), (3, 4096)):
        q = rng.choice(np.array([big, -big, 1e-45, -0.0, 1.0], np.float32), size=shape)
        assert all_finite(q)  # the largest magnitudes of every sign, in every dimension: no overflow
        for bad in (np.nan, np.inf, -np.inf):
            r = q.copy()
            r[rng.integers(shape[0]), rng.integers(shape[1])] = bad
            assert all_finite(r) is False and not np.isfinite(r).all()
