"""Exact re-ranking of candidate rows in float64, and the exact search built on it.

The streaming engine scores in float32 on the backend, where the same vector can score a last bit
differently depending on where it sits in a matmul tile. :func:`exact_top_k` therefore asks the
engine for a few more than ``k`` candidates and re-ranks them with :func:`rerank`, which recomputes
their scores in float64 from the stored float32 vectors and orders them by score, ties by lower
position. The result is the float64 brute force's (exact duplicates tie exactly and come in row-id
order), and it is the same on every backend.

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> from embtools.storage.memory_source import ArraySource
>>> x = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
>>> s, p = exact_top_k(ArraySource(x), get_backend("numpy"), MemoryBudget(None),
...                    np.array([[1, 0]], np.float32), 2, 2, "cosine")
>>> p.tolist(), s.tolist()
([[0, 2]], [[1.0, 1.0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embtools.memory import MemoryBudget
from embtools.search.engine import stream_top_k
from embtools.storage.source import VectorSource, gather_rows

__all__ = ["exact_top_k", "overfetch", "rerank"]

#: Gathered candidate vectors re-ranked in one go are kept under this many bytes (and the cap).
RERANK_CHUNK_BYTES = 64 * 1024**2
_RERANK_BYTES_PER_VALUE = 4 + 4 + 8 + 8  # the guard of exact_top_k: generous per (candidate, dim)
#: float64 products are formed this many bytes at a time, so that they stay in the CPU cache
SUB_BLOCK_BYTES = 1024**2


def overfetch(k: int) -> int:
    """How many float32 candidates to fetch for an exact top-``k``: ``k`` plus a margin."""
    return k + max(8, k // 4)


def exact_top_k(
    source: VectorSource,
    backend: Any,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k``: the streaming engine's top ``overfetch(k)`` re-ranked in float64.

    Large batches of cosine/dot queries on CPUs with bfloat16 matrix units are screened in
    bfloat16 first (:mod:`embtools.search.screen`); the queries the screen cannot certify take
    the float32 path. When one query's candidate scores would not fit the re-ranking workspace
    (a huge ``k``), the engine's float32 order is returned as it is (ties by position among equal
    float32 scores).
    """
    from embtools.search.screen import screen_enabled, screened_top_k  # screen imports rerank

    n_sel = source.num_rows if positions is None else len(positions)
    if screen_enabled(backend, len(queries), k, metric, n_sel):
        scores, found, ok = screened_top_k(
            source, budget, queries, dim, k, metric, positions, batch_rows
        )
        if not ok.all():  # a few queries: the NumPy kernel is the fastest on CPU data
            from embtools.backends import get_backend

            rest = np.flatnonzero(~ok)
            scores[rest], found[rest] = _float32_top_k(
                source, get_backend("numpy"), budget, queries[rest], dim, k, metric, positions,
                batch_rows,
            )
        return scores, found
    return _float32_top_k(source, backend, budget, queries, dim, k, metric, positions, batch_rows)


def _float32_top_k(
    source: VectorSource,
    backend: Any,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 engine's top ``overfetch(k)`` re-ranked in float64."""
    m = overfetch(k)
    avail = budget.available_bytes
    limit = RERANK_CHUNK_BYTES if avail is None else min(RERANK_CHUNK_BYTES, avail)
    if m * 24 + dim * _RERANK_BYTES_PER_VALUE > limit:
        return stream_top_k(source, backend, budget, queries, dim, k, metric, positions, batch_rows)
    _, cand = stream_top_k(source, backend, budget, queries, dim, m, metric, positions, batch_rows)
    return rerank(source, budget, queries, dim, cand, k, metric)


def rerank(
    source: VectorSource,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    candidates: np.ndarray,
    keep: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate positions with ``dim`` dimensions and keep the best ``keep``.

    ``candidates`` is ``(nq, m)`` int64 (distinct positions per row). Scores are computed in float64
    from the float32 vectors; ties go to the lower position. Returns ``(scores float32, positions)``.
    """
    nq, m = candidates.shape
    keep = min(keep, m)
    if m == 0 or nq == 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    q = queries[:, :dim].astype(np.float64)
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.where(qn == 0, 1.0, qn)
    avail = budget.available_bytes
    limit = RERANK_CHUNK_BYTES if avail is None else min(RERANK_CHUNK_BYTES, avail)
    # fixed: one cache-sized block of float64 products (and its float32 gather); per query: its m
    # scores and sort keys; per (query, candidate) in a column block: at most one gathered float32
    # row and its float64 norm
    sub = max(dim * 12, min(SUB_BLOCK_BYTES, limit // 4))
    per_col = dim * 4 + 8
    group = max(1, min(nq, (limit - sub) // (m * 24 + min(m, 32) * per_col)))
    width = max(1, min(m, (limit - sub - group * m * 24) // (group * per_col)))
    nbytes = sub + group * m * 24 + group * width * per_col
    out_s = np.empty((nq, keep), np.float32)
    out_p = np.empty((nq, keep), np.int64)
    with budget.holding(f"rerank/{id(candidates)}", nbytes, "re-ranking candidates",
                        "raise max_memory_gb or use a smaller k or funnel"):
        for a in range(0, nq, group):
            b = min(a + group, nq)
            cand = np.sort(candidates[a:b], axis=1)
            scores = np.empty(cand.shape, np.float64)
            for c in range(0, m, width):
                scores[:, c : c + width] = _score(
                    source, q[a:b], dim, cand[:, c : c + width], metric, sub
                )
            key = scores if metric == "l2" else -scores
            order = np.argsort(key, axis=1, kind="stable")[:, :keep]
            out_s[a:b] = np.take_along_axis(scores, order, axis=1)
            out_p[a:b] = np.take_along_axis(cand, order, axis=1)
    return out_s, out_p


def _score(
    source: VectorSource,
    q: np.ndarray,
    dim: int,
    cand: np.ndarray,
    metric: str,
    sub_bytes: int = SUB_BLOCK_BYTES,
) -> np.ndarray:
    """float64 scores ``(g, w)`` of queries ``q`` (float64, normalised for cosine) against their
    candidate positions ``cand``.

    Each (query, row) score is the sum, along the last axis of a C-contiguous float64 array, of
    the elementwise products (or squared differences): NumPy's pairwise sum over ``dim`` values,
    the same bits for a pair whatever the block shape (a BLAS call may round differently for
    different shapes), so exact duplicates tie exactly. Row norms are computed the same way once
    per distinct row. The products are formed a few queries at a time (``sub_bytes``).
    """
    uniq, inv = np.unique(cand, return_inverse=True)
    inv = inv.reshape(cand.shape)
    vecs = gather_rows(source, dim, uniq)
    g_rows, w = cand.shape
    out = np.empty((g_rows, w), np.float64)
    step = max(1, sub_bytes // (w * dim * 12))  # queries per block of products
    rows = max(1, sub_bytes // (dim * 8))
    if metric == "cosine":
        norms = np.empty(len(uniq), np.float64)
        for r in range(0, len(uniq), rows):
            v64 = vecs[r : r + rows].astype(np.float64)
            np.multiply(v64, v64, out=v64)
            np.sqrt(np.sum(v64, axis=-1), out=norms[r : r + rows])
        norms[norms == 0] = 1.0
    buf = np.empty(min(step, g_rows) * w * dim, np.float64)
    for a in range(0, g_rows, step):
        b = min(a + step, g_rows)
        g = buf[: (b - a) * w * dim].reshape(b - a, w, dim)
        g[...] = vecs[inv[a:b]]
        if metric == "l2":
            np.subtract(g, q[a:b, None, :], out=g)
            np.multiply(g, g, out=g)
        else:
            np.multiply(g, q[a:b, None, :], out=g)
        np.sum(g, axis=-1, out=out[a:b])
    if metric == "cosine":
        out /= norms[inv]
        np.clip(out, -1.0, 1.0, out=out)
    return out
