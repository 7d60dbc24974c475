"""Matryoshka funnel search: exact when the shortlists cover the corpus, reads the stored short
columns, recall against the exact search."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from embtools.errors import InvalidArgumentError
from embtools.search import recall_at_k, search_store
from tests.helpers import available, brute_force, check_top_k, make_store


def matryoshka(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Clustered vectors whose variance decays along the dimensions."""
    centers = rng.standard_normal((max(n // 20, 2), d))
    x = centers[rng.integers(len(centers), size=n)] + 0.5 * rng.standard_normal((n, d))
    return (x * np.exp(-np.arange(d) / (d / 4))).astype(np.float32)


@pytest.mark.parametrize("backend", available())
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_funnel_covering_the_corpus_is_exact(tmp_path, backend, metric):
    rng = np.random.default_rng()
    n, d = (120 if backend == "mlx" else 400), 32
    x = matryoshka(rng, n, d)
    x[5] = x[9]  # an exact tie
    labels = rng.choice(["a", "b"], size=n).tolist()
    store = make_store(tmp_path / "s", {8: x[:, :8], 16: x[:, :16], d: x}, backend=backend,
                       labels=labels, max_memory_gb=n * d * 4 / 3 / 1024**3)
    q = np.concatenate([x[[9, 3]], matryoshka(rng, 3, d)])
    for where in (None, pl.col("label") == "a"):
        exact = search_store(store, q, 10, metric=metric, where=where)
        funnel = search_store(store, q, 10, metric=metric, where=where, funnel=[(8, n), (16, n)])
        assert funnel.equals(exact)
        positions = None if where is None else np.flatnonzero(np.array(labels) == "a")
        s = funnel["score"].to_numpy().reshape(5, 10)
        p = funnel["row_id"].to_numpy().reshape(5, 10)
        check_top_k(brute_force(x, q, metric, positions), s, p, 10, metric)
    assert recall_at_k(funnel, exact) == 1.0


def test_funnel_reads_the_stored_short_columns(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    n, d = 300, 32
    x = matryoshka(rng, n, d)
    store = make_store(tmp_path / "s", {8: x[:, :8], d: x})
    asked: list[tuple[int, int]] = []
    original = store.source.iter_vectors

    def spy(dim, positions=None, batch_rows=None, **kw):
        rows = store.source.num_rows if positions is None else len(positions)
        asked.append((dim, rows))
        return original(dim, positions=positions, batch_rows=batch_rows, **kw)

    take = store.source.take_rows

    def spy_take(dim, positions, out):  # the re-ranks gather a few rows straight from the chunks
        asked.append((dim, len(positions)))
        return take(dim, positions, out)

    monkeypatch.setattr(store.source, "iter_vectors", spy)
    monkeypatch.setattr(store.source, "take_rows", spy_take)
    q = matryoshka(rng, 4, d)
    search_store(store, q, 5, funnel=[(8, 40), (16, 20)])
    full_passes = [rows for dim, rows in asked if rows == n]
    assert asked[0] == (8, n) and len(full_passes) == 1  # one full pass, with the stored emb_8
    assert all(rows <= 4 * 40 for dim, rows in asked[1:])  # later stages read only shortlists
    assert {dim for dim, _ in asked} == {8, 16, d}


def test_funnel_recall_on_matryoshka_data(tmp_path):
    rng = np.random.default_rng()
    n, d = 2000, 64
    x = matryoshka(rng, n, d)
    store = make_store(tmp_path / "s", {16: x[:, :16], 32: x[:, :32], d: x})
    q = matryoshka(rng, 20, d)
    exact = search_store(store, q, 10)
    funnel = search_store(store, q, 10, funnel=[(16, 100), (32, 30)])
    check = []
    for qi in range(20):
        a = set(funnel.filter(pl.col("query") == qi)["row_id"].to_list())
        b = set(exact.filter(pl.col("query") == qi)["row_id"].to_list())
        check.append(len(a & b) / 10)
    recall = recall_at_k(funnel, exact, 10)
    assert recall == pytest.approx(np.mean(check))
    assert 0.5 < recall <= 1.0  # the leading dimensions carry most of the signal
    assert recall_at_k(exact, exact) == 1.0


def test_funnel_arguments_are_checked(tmp_path):
    x = np.random.default_rng().standard_normal((50, 16)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    q = x[:2]
    for bad in ([], [(16, 20)], [(8, 5)], [(8, 20), (4, 10)], [(4, 10), (8, 20)], [(0, 20)],
                "64", [(8,)]):
        with pytest.raises(InvalidArgumentError):
            search_store(store, q, 10, funnel=bad)
