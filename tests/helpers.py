"""Shared helpers of the tests (data generators, stores, the float64 brute force; see conftest.py).

``check_top_k`` is the differential oracle: it accepts a result only if it is the exact top-k of a
NumPy float64 brute force (up to scores within ``tol`` of each other, whose order float32 cannot
decide), with ties on exactly equal float64 scores going to the lower position.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import embtools as et

__all__ = [
    "available",
    "brute_force",
    "check_frame",
    "check_top_k",
    "make_store",
    "planted_corpus",
]


def available() -> list[str]:
    """Backends importable here."""
    return list(et.available_backends())


def planted_corpus(rng: np.random.Generator, n: int, d: int, *, integer: bool = False) -> np.ndarray:
    """Random corpus with planted exact duplicates and near-duplicates (and one zero row)."""
    if integer:
        x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    m = max(n // 10, 2)
    src = rng.choice(n, size=m, replace=False)
    dst = rng.choice(n, size=m, replace=False)
    x[dst[: m // 2]] = x[src[: m // 2]]  # exact duplicates: exact ties
    if not integer:
        noise = rng.standard_normal((m - m // 2, d)).astype(np.float32) * 1e-3
        x[dst[m // 2 :]] = x[src[m // 2 :]] + noise  # near-duplicates
    x[rng.integers(n)] = 0.0
    return x


def brute_force(
    corpus: np.ndarray, queries: np.ndarray, metric: str, positions: np.ndarray | None = None
) -> np.ndarray:
    """Full float64 score matrix ``(nq, n)``; rows outside ``positions`` get NaN."""
    c = corpus.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        cn = np.linalg.norm(c, axis=1, keepdims=True)
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        s = (q / np.where(qn == 0, 1, qn)) @ (c / np.where(cn == 0, 1, cn)).T
    elif metric == "dot":
        s = q @ c.T
    else:
        s = (q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2 * q @ c.T
        s = np.maximum(s, 0)
    if positions is not None:
        mask = np.ones(c.shape[0], bool)
        mask[positions] = False
        s[:, mask] = np.nan
    return s


def reference_order(s: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Brute-force top-k positions per row: best score first, ties by lower position."""
    out = []
    for row in s:
        valid = np.flatnonzero(~np.isnan(row))
        key = -row[valid] if metric != "l2" else row[valid]
        order = valid[np.lexsort((valid, key))]
        out.append(order[:k])
    return np.array(out, dtype=np.int64).reshape(len(s), -1)


def check_top_k(
    s64: np.ndarray,
    scores: np.ndarray,
    found: np.ndarray,
    k: int,
    metric: str,
    tol: float = 1e-4,
    exact: bool = False,
) -> None:
    """Assert ``(scores, found)`` is the exact top-k of the float64 score matrix ``s64``.

    ``exact=True`` (integer data, whose float32 scores are exact) demands identical positions in
    identical order, ties by lower position. Otherwise positions must agree except among scores
    within ``tol`` of each other, and rows tied in both the float64 reference and the returned
    ``scores`` must come in position order. (Identical rows in different blocks of a float32 pass
    can round to different float32 scores: that pass orders them by its scores, which
    :func:`embtools.search.search_store`'s float64 re-rank then ties exactly.)
    """
    ref = reference_order(s64, metric, k)
    assert found.shape == ref.shape, (found.shape, ref.shape)
    if exact:
        np.testing.assert_array_equal(found, ref)
    sign = 1.0 if metric != "l2" else -1.0
    for qi in range(len(s64)):
        row = s64[qi]
        got = found[qi]
        assert len(set(got.tolist())) == len(got), "duplicate positions in a result row"
        assert not np.isnan(row[got]).any(), "a result outside the selection"
        np.testing.assert_allclose(scores[qi], row[got], rtol=0, atol=tol)
        if len(got) == 0:
            continue
        # set: everything clearly better than the k-th best is found; nothing clearly worse is
        kth = sign * row[ref[qi][-1]]
        valid = ~np.isnan(row)
        must = np.flatnonzero(valid & (sign * row > kth + tol))
        assert set(must.tolist()) <= set(got.tolist()), f"query {qi}: missed clear hits"
        assert (sign * row[got] >= kth - tol).all(), f"query {qi}: a clearly worse row"
        # order: best first (within tol); exact float64 ties by lower position
        g = sign * row[got]
        assert (np.diff(g) <= tol).all(), f"query {qi}: not sorted"
        same = np.flatnonzero((np.diff(g) == 0) & (np.diff(scores[qi]) == 0))
        assert (got[same] < got[same + 1]).all(), f"query {qi}: tie not broken by position"


def check_frame(frame: pl.DataFrame, nq: int, per_query: int) -> None:
    """Shape and dtypes of a search result frame."""
    assert frame.columns[:6] == ["query", "rank", "row_id", "text_id", "label", "score"]
    assert frame.schema["score"] == pl.Float32
    assert frame.height == nq * per_query
    if frame.height:
        counts = frame.group_by("query").len()["len"].to_list()
        assert set(counts) == {per_query}
        assert frame["rank"].to_list() == list(range(per_query)) * nq


def make_store(
    path: Path | None,
    vectors: dict[int, np.ndarray] | np.ndarray,
    *,
    backend: str = "numpy",
    max_memory_gb: float | None = None,
    labels: Any = None,
    metadata: dict[str, Any] | None = None,
    pieces: bool = True,
) -> Any:
    """A real EmbeddingStore (on disk at ``path``, or in memory for None) holding ``vectors``."""
    if isinstance(vectors, np.ndarray):
        vectors = {vectors.shape[1]: vectors}
    n = next(iter(vectors.values())).shape[0]
    store = et.EmbeddingStore(
        None if path is None else str(path), backend=backend, max_memory_gb=max_memory_gb
    )
    # several adds: several data files, so reads cross file boundaries
    cuts = [0, n // 3, (2 * n) // 3, n] if n >= 30 and pieces else [0, n]
    for lo, hi in itertools.pairwise(cuts):
        if hi == lo:
            continue
        store.add(
            {d: v[lo:hi] for d, v in vectors.items()},
            text_ids=[f"t{i}" for i in range(lo, hi)],
            labels=None if labels is None else list(labels[lo:hi]),
            metadata=None if metadata is None else {c: v[lo:hi] for c, v in metadata.items()},
        )
    return store
