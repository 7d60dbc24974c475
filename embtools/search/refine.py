"""Exact re-ranking of candidate rows in float64.

The streaming engine scores in float32 on the backend, where the same vector can score a last bit
differently depending on where it sits in a matmul tile. The planner (:mod:`embtools.search.plan`)
therefore asks the engine for a few more than ``k`` candidates (:func:`overfetch`) and re-ranks
them with :func:`rerank`, which recomputes their scores in float64 from the stored float32 vectors
and orders them by score, ties by lower position. The result is the float64 brute force's (exact
duplicates tie exactly and come in row-id order), and it is the same on every backend.

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> from embtools.search.request import SearchContext, SearchRequest
>>> from embtools.storage.memory_source import ArraySource
>>> x = ArraySource(np.array([[1, 0], [0, 1], [1, 0]], np.float32))
>>> req = SearchRequest.build(x, [[1, 0]], k=2)
>>> top = rerank(req, SearchContext(x, get_backend("numpy"), MemoryBudget(None)), np.array([[2, 1, 0]]))
>>> top.positions.tolist(), top.scores.tolist()
([[0, 2]], [[1.0, 1.0]])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.kernels.jit import jit_kernels
from embtools.kernels.threads import ForkSafePool
from embtools.search.request import SearchContext, SearchRequest, TopK, cap_error
from embtools.storage.source import VectorSource, gather_rows

__all__ = ["RerankSizes", "float64_queries", "overfetch", "query_norms", "rerank", "rerank_min_bytes",
           "rerank_queries", "size_rerank", "unit_queries"]

#: Gathered candidate vectors re-ranked in one go are kept under this many bytes (and the cap).
RERANK_CHUNK_BYTES = 64 * 1024**2
#: The compiled re-rank gathers and scores at least this many distinct candidates on two threads.
THREADED_RERANK_ROWS = 2048
_POOL = ForkSafePool(2, "embtools-rerank")
#: float64 products are formed this many bytes at a time, so that they stay in the CPU cache
SUB_BLOCK_BYTES = 1024**2


def overfetch(k: int) -> int:
    """How many float32 candidates to fetch for an exact top-``k``: ``k`` plus a margin."""
    return k + max(8, k // 4)


@dataclass(frozen=True)
class RerankSizes:
    """Queries re-ranked together (``group``), candidate columns gathered at a time (``width``),
    the bytes of float64 products formed at a time (``sub``) and the bytes held."""

    group: int
    width: int
    sub: int
    nbytes: int


def rerank_min_bytes(m: int, dim: int) -> int:
    """The fewest bytes re-ranking ``m`` candidates per query at ``dim`` needs: one query, one
    candidate gathered at a time, one row of float64 products."""
    return dim * 12 + m * 24 + dim * 4 + 8


@functools.lru_cache(maxsize=512)  # a pure function of its arguments
def size_rerank(avail: int | None, nq: int, m: int, dim: int) -> RerankSizes | None:
    """Size the re-ranking of ``m`` candidates for each of ``nq`` queries in ``avail`` bytes (None:
    no cap, at most ``RERANK_CHUNK_BYTES``); None when not even :func:`rerank_min_bytes` fit.

    Fixed: one cache-sized block of float64 products (and its float32 gather); per query: its
    ``m`` scores and sort keys; per (query, candidate) in a column block: one gathered float32 row
    and its float64 norm.

    Examples
    --------
    >>> size_rerank(None, 10, 18, 64).nbytes <= RERANK_CHUNK_BYTES
    True
    >>> size_rerank(rerank_min_bytes(18, 64) - 1, 10, 18, 64) is None
    True
    """
    limit = RERANK_CHUNK_BYTES if avail is None else min(RERANK_CHUNK_BYTES, avail)
    if limit < rerank_min_bytes(m, dim):
        return None
    per_col = dim * 4 + 8
    sub = max(dim * 12, min(SUB_BLOCK_BYTES, limit // 4, limit - m * 24 - per_col))
    group = max(1, min(nq, (limit - sub) // (m * 24 + min(m, 32) * per_col)))
    width = max(1, min(m, (limit - sub - group * m * 24) // (group * per_col)))
    return RerankSizes(group, width, sub, sub + group * m * 24 + group * width * per_col)


def rerank_queries(req: SearchRequest) -> np.ndarray:
    """The queries as the re-rank scores them: ``req.dim`` dimensions in float64, unit length
    for cosine (zero queries stay zero)."""
    return float64_queries(req.queries, req.dim, req.metric)


def float64_queries(queries: np.ndarray, dim: int, metric: str) -> np.ndarray:
    """:func:`rerank_queries` of float32 ``queries`` searched at ``dim`` by ``metric``."""
    q = queries[:, :dim].astype(np.float64)
    if metric == "cosine":
        q /= query_norms(q)
    return q


def query_norms(q64: np.ndarray) -> np.ndarray:
    """The float64 norms ``(nq, 1)`` of float64 rows (np.linalg.norm's pairwise sum, without its
    checks), 1 for zero rows: what :func:`float64_queries` divides by, and, rounded to float32,
    :func:`unit_queries` (the compiled :func:`~embtools.kernels.rerank_jit.row_norms` has the
    same bits)."""
    qn = np.sqrt(np.add.reduce(q64 * q64, axis=1, keepdims=True))
    return np.where(qn == 0, 1.0, qn)


def unit_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """float32 ``queries`` at ``dim`` dimensions divided by their :func:`query_norms` rounded to
    float32 (a new array): the cosine queries an index probe scores its codes with.

    Examples
    --------
    >>> unit_queries(np.array([[3.0, 4.0, 9.0], [0.0, 0.0, 1.0]], np.float32), 2).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    q = np.array(queries[:, :dim], dtype=np.float32, order="C")
    q /= query_norms(q.astype(np.float64)).astype(np.float32)
    return q


def rerank(
    req: SearchRequest, ctx: SearchContext, candidates: np.ndarray, keep: int | None = None
) -> TopK:
    """Re-score each query's candidate positions with ``req.dim`` dimensions and keep the best
    ``keep`` (default ``req.k``).

    ``candidates`` is ``(nq, m)`` int64 (distinct positions per row). Scores are computed in float64
    from the float32 vectors; ties go to the lower position.
    """
    nq, m = candidates.shape
    keep = min(req.k if keep is None else keep, m)
    if m == 0 or nq == 0:
        return TopK.empty(nq)
    dim, metric = req.dim, req.metric
    q = rerank_queries(req)
    sizes = size_rerank(ctx.budget.available_bytes, nq, m, dim)
    if sizes is None:
        raise cap_error(ctx.budget, rerank_min_bytes(m, dim), "re-ranking candidates")
    jit = jit_kernels("rerank_jit")
    if nq == 1 and jit is not None and sizes.width == m:
        return _rerank_one(jit, req, ctx, q, candidates[0], keep, sizes.nbytes)
    group, width = sizes.group, sizes.width
    out_s = np.empty((nq, keep), np.float32)
    out_p = np.empty((nq, keep), np.int64)
    with ctx.budget.holding(f"rerank/{id(candidates)}", sizes.nbytes, "re-ranking candidates",
                            "raise max_memory_gb or use a smaller k or funnel"):
        for a in range(0, nq, group):
            b = min(a + group, nq)
            cand = np.sort(candidates[a:b], axis=1)
            scores = np.empty(cand.shape, np.float64)
            for c in range(0, m, width):
                scores[:, c : c + width] = _score(
                    ctx.source, q[a:b], dim, cand[:, c : c + width], metric, sizes.sub,
                    threads=ctx.budget.available_bytes is None,
                )
            key = scores if metric == "l2" else -scores
            order = np.argsort(key, axis=1, kind="stable")[:, :keep]
            rows = np.arange(b - a)[:, None]
            out_s[a:b] = scores[rows, order]
            out_p[a:b] = cand[rows, order]
    return TopK(out_s, out_p)


def _rerank_one(jit: Any, req: SearchRequest, ctx: SearchContext, q: np.ndarray, cand: np.ndarray,
                keep: int, nbytes: int) -> TopK:
    """:func:`rerank` of one query (``q``: float64, normalised for cosine) by the compiled kernel:
    the same scores and order, without the batch's grouping (a single search's re-rank)."""
    rows = np.sort(cand)
    threads = ctx.budget.available_bytes is None
    with ctx.budget.holding(f"rerank/{id(cand)}", nbytes, "re-ranking candidates",
                            "raise max_memory_gb or use a smaller k or funnel"):
        scores = _score_jit(jit, ctx.source, q, req.dim, rows, np.arange(len(rows))[None, :], req.metric,
                            threads)[0]
    order = np.argsort(scores if req.metric == "l2" else -scores, kind="stable")[:keep]
    return TopK(scores[order][None, :].astype(np.float32), rows[order][None, :])


def _score_jit(jit: Any, source: VectorSource, q: np.ndarray, dim: int, uniq: np.ndarray,
               inv: np.ndarray, metric: str, threads: bool) -> np.ndarray:
    """:func:`_score` by the compiled kernel (:mod:`embtools.kernels.rerank_jit`); with
    ``threads`` (no cap: the gathers' pages stay mapped), many candidates are gathered and scored
    in two halves on two threads, and the float64 norms of a frozen source's rows are kept."""
    vecs = np.empty((len(uniq), dim), np.float32)
    code = jit.METRICS[metric]
    split = threads and len(uniq) >= THREADED_RERANK_ROWS and len(q) >= 2
    if not split:
        gather_rows(source, dim, uniq, out=vecs)
    else:
        half = len(uniq) // 2
        list(_POOL.get().map(lambda ab: gather_rows(source, dim, uniq[ab[0]:ab[1]], out=vecs[ab[0]:ab[1]]),
                             [(0, half), (half, len(uniq))]))
    norms = _norms(jit, source, dim, uniq, vecs) if metric == "cosine" and threads else None
    if not split:
        scores: np.ndarray = jit.rerank_scores(q, vecs, inv, code, norms)
        return scores
    rows = len(q) // 2
    parts = list(_POOL.get().map(lambda ab: jit.rerank_scores(q[ab[0]:ab[1]], vecs, inv[ab[0]:ab[1]], code, norms),
                                 [(0, rows), (rows, len(q))]))
    return np.concatenate(parts)


def _norms(jit: Any, source: VectorSource, dim: int, uniq: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """The float64 norms of rows ``uniq`` (gathered in ``vecs``); a frozen source (a committed
    version) keeps them, 8 bytes a row and dimension, so later searches compute only new ones."""
    if not getattr(source, "frozen", False):
        return np.asarray(jit.row_norms(vecs))
    kept = source.__dict__.setdefault("_rerank_norms", {})
    known = kept.get(dim)
    if known is None:
        known = kept[dim] = np.full(int(source.num_rows), np.nan)
    got = known[uniq]
    miss = np.isnan(got)
    if miss.any():
        got[miss] = jit.row_norms(vecs[miss])
        known[uniq[miss]] = got[miss]
    return got


def _score(
    source: VectorSource,
    q: np.ndarray,
    dim: int,
    cand: np.ndarray,
    metric: str,
    sub_bytes: int = SUB_BLOCK_BYTES,
    threads: bool = False,
) -> np.ndarray:
    """float64 scores ``(g, w)`` of queries ``q`` (float64, normalised for cosine) against their
    candidate positions ``cand``.

    Each (query, row) score is the sum, along the last axis of a C-contiguous float64 array, of
    the elementwise products (or squared differences): NumPy's pairwise sum over ``dim`` values,
    the same bits for a pair whatever the block shape (a BLAS call may round differently for
    different shapes), so exact duplicates tie exactly. Row norms are computed the same way once
    per distinct row. The products are formed a few queries at a time (``sub_bytes``).
    """
    if cand.shape[0] == 1:  # one query: its candidates are already distinct and ascending
        uniq, inv = cand[0], np.arange(cand.shape[1])[None, :]
    else:
        uniq, inv = np.unique(cand, return_inverse=True)
        inv = inv.reshape(cand.shape)
    jit = jit_kernels("rerank_jit")
    if jit is not None:  # the same bits, without the (queries, candidates, dim) float64 block
        return _score_jit(jit, source, np.ascontiguousarray(q), dim, uniq, np.ascontiguousarray(inv), metric,
                          threads)
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
