"""Spherical k-means on the store's backend: IVF partition centroids.

:func:`train_centroids` clusters a sample (a NumPy float32 array) into ``partitions`` centroids:
for ``cosine`` and ``dot`` on unit-length rows with unit-length centroids (spherical k-means, the
partitions of an inner-product index), for ``l2`` with plain means. Each iteration assigns every
sample row to its best centroid with the backend's exact top-1 kernel (``block_top_k(..., k=1)``,
the kernel of the exact search) in batches sized under ``budget``, then recomputes the centroids in
float64. Empty partitions are re-seeded with the rows farthest from their centroids. Deterministic
for a given ``seed``.

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> rng = np.random.default_rng(0)
>>> x = np.concatenate([rng.normal(c, 0.05, (50, 3)) for c in np.eye(3)]).astype(np.float32)
>>> c = train_centroids(x, 3, "cosine", get_backend("numpy"), MemoryBudget(None))
>>> sorted(np.round(np.abs(c).max(axis=1), 1).tolist())
[1.0, 1.0, 1.0]
>>> np.bincount(assign(x, c, "cosine", get_backend("numpy"), MemoryBudget(None))).tolist()
[50, 50, 50]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from embtools.memory import MemoryBudget

__all__ = ["DEFAULT_ITERATIONS", "assign", "assign_batch_rows", "normalize_rows", "train_centroids"]

#: k-means iterations over the sample (FAISS's IVF training uses 10 by default as well).
DEFAULT_ITERATIONS = 10


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-length rows (float32, in place when ``x`` is writable float32); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


def assign_batch_rows(dim: int, partitions: int, avail: int | None) -> int:
    """Rows assigned at a time: their vectors, a score row per row and the result, in a quarter of
    ``avail`` bytes (at most 8,192 rows, at least 1)."""
    per_row = dim * 4 * 2 + partitions * 4 + 16
    rows = 8192 if avail is None else max(1, min(8192, avail // 4 // per_row))
    return int(rows)


def assign(x: np.ndarray, centroids: np.ndarray, metric: str, backend: Any, budget: MemoryBudget,
           best: np.ndarray | None = None) -> np.ndarray:
    """The nearest centroid (int32) of each row of ``x`` (rows already normalised for cosine),
    by the backend's exact top-1 kernel; ``best`` (float32, optional) receives the scores."""
    n, dim = x.shape
    out = np.empty(n, np.int32)
    kernel_metric = "l2" if metric == "l2" else "dot"
    step = assign_batch_rows(dim, len(centroids), budget.available_bytes)
    c = backend.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    for a in range(0, n, step):
        b = min(n, a + step)
        values, idx = backend.block_top_k(backend.from_numpy(np.ascontiguousarray(x[a:b])), c, 1,
                                          kernel_metric)
        out[a:b] = np.asarray(backend.to_numpy(idx)).reshape(-1)
        if best is not None:
            best[a:b] = np.asarray(backend.to_numpy(values), dtype=np.float32).reshape(-1)
    return out


def _update(x: np.ndarray, labels: np.ndarray, partitions: int, metric: str,
            best: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New centroids from the assignment (empty partitions re-seeded with the worst-fit rows)."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=partitions)
    sums = np.zeros((partitions, x.shape[1]), np.float64)
    step = 65_536
    for a in range(0, len(order), step):  # reduceat over sorted rows, a slice at a time
        sel = order[a:a + step]
        lab = labels[sel]
        cuts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        sums[lab[cuts]] += np.add.reduceat(x[sel].astype(np.float64), cuts, axis=0)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        # re-seed with the rows that fit their centroid worst (largest distance / lowest score)
        worst = np.argsort(best if metric == "l2" else -best, kind="stable")[::-1]
        seeds = worst[: len(empty)] if len(worst) >= len(empty) else rng.integers(0, len(x), len(empty))
        sums[empty] = x[seeds]
        counts = counts.copy()
        counts[empty] = 1
    if metric == "l2":
        cent = sums / counts[:, None]
    else:
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cent = sums / np.where(norms == 0, 1.0, norms)
    return cent.astype(np.float32)


def train_centroids(sample: np.ndarray, partitions: int, metric: str, backend: Any,
                    budget: MemoryBudget, *, iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
                    advance: Callable[[int], None] | None = None) -> np.ndarray:
    """``partitions`` centroids (float32 ``(partitions, d)``) of ``sample`` by k-means.

    ``sample`` rows are normalised first for cosine and dot (spherical k-means); the first
    centroids are distinct random sample rows. ``advance(1)`` is called after each iteration.
    """
    x = normalize_rows(sample) if metric != "l2" else np.ascontiguousarray(sample, np.float32)
    n = len(x)
    partitions = max(1, min(int(partitions), n))
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(n, partitions, replace=False))].copy()
    best = np.empty(n, np.float32)
    for _ in range(iterations):
        labels = assign(x, cent, metric, backend, budget, best)
        cent = _update(x, labels, partitions, metric, best, rng)
        if advance is not None:
            advance(1)
    return cent
