"""A few queries' whole IVF search in one compiled call: probe, scan and re-rank from the codes.

For an index whose codes are the rows as stored (``codes="float"`` at the search dimension), a
query's search is: pick its ``nprobe`` nearest centroids, scan the codes of those partitions in
every codes file into a heap of the best ``width`` rows, cut the shortlist where the float32
scores certify it (cosine), and re-rank the rest in float64 from the same codes. int8 codes of
the search dimension are scanned by exact integer sums (each code a bucket centre:
:func:`~embtools.kernels.ivf_jit.scan_int8`) and their shortlist is re-ranked from the rows of
the mapped data files. Run as separate
NumPy and numba calls, the glue between the steps costs more than the steps for one query on a
million rows; :func:`search_few` runs them back to back with the kernels of
:mod:`embtools.kernels.ivf_jit` and :mod:`embtools.kernels.rerank_jit`, so its results are
theirs, bit for bit.

Load this module through :func:`embtools.kernels.jit.jit_kernels` (it imports numba).

Examples
--------
>>> import numpy as np
>>> rows = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
>>> t = few_tables(np.array([[True], [True]]), [np.array([0, 1, 3])], [rows], [np.arange(3)],
...                [np.zeros(0, np.float32)], [np.zeros(0, np.float32)], [np.zeros(0)])
>>> cent = np.array([[1, 0], [0.5, 0.5]], np.float32)
>>> s, p, done, scanned = search_few(np.array([[1.0, 0.5]], np.float32), cent, None, 2,
...                                  np.array([1, 2]), 2, t, np.arange(3),
...                                  np.zeros(0, bool), 3, 2, "dot", 0.0)
>>> p.tolist(), s.tolist(), done.tolist(), scanned
([[2, 0]], [[1.5, 1.0]], [True], 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.experimental import structref

from embtools.kernels.ivf_jit import (
    EMPTY,
    _certified_width,
    _dot,
    _push,
    _scan_weights,
    _sort_heaps,
    int8_weights,
    merge_heaps,
    new_heaps,
    scan_codes,
    screen_terms,
    screened_centroids,
)
from embtools.kernels.rerank_jit import (
    METRICS,
    _code_top,
    _row_norms,
    frozen_list,
    sum_program,
)

__all__ = ["BoundArgs", "few_tables", "finish_few", "prepared_queries", "probe_few", "scan_few", "search_args",
           "search_few", "search_with", "warm"]

_L2 = METRICS["l2"]
_COSINE = METRICS["cosine"]
_NONE32 = np.zeros(0, np.float32)
#: no screen (every centroid scored): empty codes, minima, steps, errors and magnitudes
_NO_SCREEN = (np.zeros((0, 0), np.uint8), _NONE32, _NONE32, np.zeros(0), np.zeros(0))


@njit(nogil=True, cache=True)
def _padded(nq: int, kk: int, metric: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Empty results ``(scores, positions)`` of ``nq`` queries: -inf (inf for l2) and -1."""
    return (np.full((nq, kk), np.inf if metric == _L2 else -np.inf, np.float32),
            np.full((nq, kk), -1, np.int64))


@njit(nogil=True, cache=True)
def _nearest(q: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray, l2: bool, n: int) -> np.ndarray:  # pragma: no cover
    """The ``n`` best centroids of ``q`` by the float32 product (``2 q.c - |c|^2`` for l2), best
    first, ties to the lower column (:func:`~embtools.kernels.ivf_jit.top_columns`' order)."""
    hs = np.full((1, n), -np.inf, np.float32)
    hi = np.full((1, n), EMPTY, np.int64)
    for c in range(centroids.shape[0]):
        s = np.float32(_dot(q, centroids[c]))
        if l2:
            s = np.float32(2.0) * s - c_sq[c]
        _push(hs[0], hi[0], s, c)
    _sort_heaps(hs, hi)
    return hi[0]


@njit(nogil=True, cache=True)
def _probe(qi: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray, coarse: np.ndarray, lo: np.ndarray,
           step: np.ndarray, err: np.ndarray, cmax: np.ndarray, nprobe: int,
           l2: bool) -> np.ndarray:  # pragma: no cover - compiled
    """The ``nprobe`` nearest partitions of ``qi``, best first (all when ``nprobe`` covers them)."""
    p = centroids.shape[0]
    if nprobe >= p:
        return np.arange(p)
    if coarse.shape[0] > 0:
        v, scale, margin = screen_terms(qi, lo, step, err, cmax)
        return screened_centroids(qi, v, scale, coarse, margin, centroids, nprobe)
    return _nearest(qi, centroids, c_sq, l2, nprobe)


@njit(nogil=True, cache=True)
def _scan(q: np.ndarray, c0: np.ndarray, v: np.ndarray, scale: np.ndarray, probes: np.ndarray, holds: np.ndarray,
          starts: Any, codes: Any, pos: Any, sq: Any, inv: Any, mask: np.ndarray, hs: np.ndarray,
          hi: np.ndarray) -> int:  # pragma: no cover - compiled
    """Scan partitions ``probes`` (``(nq, m)``, -1: none) of the codes files holding rows of them
    (``holds[part, file]``) into the heaps ``hs, hi`` of the scan weights ``q`` and constants
    ``c0`` (:func:`~embtools.kernels.ivf_jit.scan_weights`; int8 codes: their integer weights
    ``v, scale``, :func:`~embtools.kernels.ivf_jit.int8_weights`); returns the rows scanned. The
    other files are not touched (a typed list's item costs a reference count)."""
    scanned = 0
    for f in range(holds.shape[1]):
        used = False
        for part in probes.ravel():
            if part >= 0 and holds[part, f]:
                used = True
                break
        if not used:
            continue
        st = starts[f]
        for part in probes.ravel():
            if part >= 0:
                scanned += st[part + 1] - st[part]
        scan_codes(q, c0, v, scale, probes, st, codes[f], pos[f], sq[f], mask, hs, hi, inv[f])
    return scanned


@njit(nogil=True, cache=True)
def _finish(hs: np.ndarray, hi: np.ndarray, q64: np.ndarray, eps: float, where: np.ndarray, codes: Any,
            norms: Any, metric: int, program: np.ndarray, out_s: np.ndarray,
            out_p: np.ndarray) -> None:  # pragma: no cover - compiled
    """Sort the heaps of queries ``q64``, cut each shortlist where its float32 scores certify it
    (``eps`` > 0; :func:`~embtools.kernels.ivf_jit._certified_width`) and re-rank it from the codes
    into ``out_s, out_p``."""
    _sort_heaps(hs, hi)
    kk = out_s.shape[1]
    for i in range(hs.shape[0]):
        keep = _certified_width(hs[i], kk, eps)
        _code_top(q64[i:i + 1], hi[i:i + 1, :keep], where, codes, norms, metric, program,
                  out_s[i:i + 1], out_p[i:i + 1])


@njit(nogil=True, cache=True)
def _probe_few(q: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray, coarse: np.ndarray, lo: np.ndarray,
               step: np.ndarray, err: np.ndarray, cmax: np.ndarray, nprobe: int, live: np.ndarray,
               need: int, l2: bool) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """:func:`probe_few`."""
    nq = q.shape[0]
    parts = np.full((nq, min(nprobe, centroids.shape[0])), -1, np.int64)
    done = np.zeros(nq, np.bool_)
    for i in range(nq):
        top = _probe(q[i], centroids, c_sq, coarse, lo, step, err, cmax, nprobe, l2)
        held = 0
        for part in top:
            held += live[part]
        if held >= need:  # else the caller probes further partitions for this query
            done[i] = True
            parts[i, :len(top)] = top
    return parts, done


@njit(nogil=True, cache=True)
def _prepared(queries: np.ndarray, cosine: bool, program: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """``(q, q64)``: the float32 queries the probe and scan score with and the float64 ones of the
    re-rank, for cosine divided by the queries' float64 norms (1 for zero queries), rounded to
    float32 for ``q``: :func:`~embtools.search.refine.unit_queries` and
    :func:`~embtools.search.refine.float64_queries` to the bit (the norms are NumPy's pairwise
    sums, :func:`~embtools.kernels.rerank_jit.row_norms`)."""
    q64 = np.empty(queries.shape)
    if not cosine:
        q64[:] = queries
        return queries, q64
    q = np.empty_like(queries)
    norms = _row_norms(queries, program)
    for i in range(queries.shape[0]):
        n, n32 = norms[i], np.float32(norms[i])
        for t in range(queries.shape[1]):
            q64[i, t] = np.float64(queries[i, t]) / n
            q[i, t] = queries[i, t] / n32
    return q, q64


@njit(nogil=True, cache=True)
def _search_few(queries: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray,
                coarse: np.ndarray, lo: np.ndarray, step: np.ndarray, err: np.ndarray,
                cmax: np.ndarray, nprobe: int, live: np.ndarray, need: int, holds: np.ndarray, starts: Any, codes: Any,
                pos: Any, sq: Any, inv: Any, steps: np.ndarray, centers: np.ndarray, rows: Any, norms: Any,
                where: np.ndarray, mask: np.ndarray, width: int, kk: int, metric: int, eps: float,
                program: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover
    """:func:`search_few`."""
    q, q64 = _prepared(queries, metric == _COSINE, program)
    out_s, out_p = _padded(q.shape[0], kk, metric)
    parts, done = _probe_few(q, centroids, c_sq, coarse, lo, step, err, cmax, nprobe, live, need, metric == _L2)
    w, c0 = _scan_weights(q, steps, centers, program)
    v, scale = int8_weights(w) if steps.shape[0] > 0 else (np.zeros((q.shape[0], 0), np.int16), np.ones(q.shape[0]))
    scanned = 0
    for i in range(q.shape[0]):  # each query scanned and re-ranked while its rows are in the cache
        if not done[i]:  # left padded
            continue
        hs = np.full((1, width), -np.inf, np.float32)
        hi = np.full((1, width), EMPTY, np.int64)
        scanned += _scan(w[i:i + 1], c0[i:i + 1], v[i:i + 1], scale[i:i + 1], parts[i:i + 1], holds, starts, codes,
                         pos, sq, inv, mask, hs, hi)
        _finish(hs, hi, q64[i:i + 1], eps, where, rows, norms, metric, program, out_s[i:i + 1], out_p[i:i + 1])
    return out_s, out_p, done, scanned


@structref.register
class _BoundType(types.StructRef):  # type: ignore[misc]  # numba's classes are untyped
    """The numba type of :class:`BoundArgs` (one per combination of its fields' types)."""

    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(t)) for name, t in fields)


class BoundArgs(structref.StructRefProxy):  # type: ignore[misc]
    """The arguments after the queries of :func:`search_few`'s compiled call, bound once
    (:func:`search_args`): numba unboxes this one object in well under a microsecond, where its
    27 fields one by one (seven typed lists among them) took about 6 us of an 80 us MiniLM query."""


_BOUND_FIELDS = ("centroids", "c_sq", "coarse", "lo", "step", "err", "cmax", "nprobe", "live", "need", "holds",
                 "starts", "codes", "pos", "sq", "inv", "steps", "centers", "rows", "norms", "where", "mask",
                 "width", "kk", "metric", "eps", "program")
structref.define_proxy(BoundArgs, _BoundType, list(_BOUND_FIELDS))


@njit(cache=True)
def _bind(centroids: Any, c_sq: Any, coarse: Any, lo: Any, step: Any, err: Any, cmax: Any, nprobe: Any, live: Any,
          need: Any, holds: Any, starts: Any, codes: Any, pos: Any, sq: Any, inv: Any, steps: Any, centers: Any,
          rows: Any, norms: Any, where: Any, mask: Any, width: Any, kk: Any, metric: Any, eps: Any,
          program: Any) -> Any:  # pragma: no cover - compiled
    """A :class:`BoundArgs` of these fields (compiled and cached: the proxy's own constructor
    would compile in every process)."""
    return BoundArgs(centroids, c_sq, coarse, lo, step, err, cmax, nprobe, live, need, holds, starts, codes, pos, sq,
                     inv, steps, centers, rows, norms, where, mask, width, kk, metric, eps, program)


@njit(nogil=True, cache=True)
def search_with(queries: np.ndarray, a: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover
    """:func:`search_few` of ``queries`` (``(nq, d)`` float32, C-contiguous) with the arguments
    ``a`` bound by :func:`search_args`: a loop of single queries binds them once
    (:meth:`embtools.index.IvfIndex.whole_search`)."""
    return _search_few(queries, a.centroids, a.c_sq, a.coarse, a.lo, a.step, a.err, a.cmax, a.nprobe, a.live,
                       a.need, a.holds, a.starts, a.codes, a.pos, a.sq, a.inv, a.steps, a.centers, a.rows,
                       a.norms, a.where, a.mask, a.width, a.kk, a.metric, a.eps, a.program)


def few_tables(holds: np.ndarray, starts: list[np.ndarray], codes: list[np.ndarray], positions: list[np.ndarray],
               sq: list[np.ndarray], inv: list[np.ndarray], norms: list[np.ndarray]) -> tuple[Any, ...]:
    """The codes files as :func:`search_few` reads them: ``holds``, which files hold rows of each
    partition (``(partitions, files)`` bool), then numba typed lists
    (:func:`~embtools.kernels.rerank_jit.frozen_list`), one entry per file: partition starts
    (int64), codes (float32, or int8), positions (int64), squared norms and inverse norms
    (float32; empty where the metric needs none) and float64 norms (cosine float codes; empty
    otherwise)."""
    kind = np.int8 if codes and codes[0].dtype == np.int8 else np.float32
    return (np.ascontiguousarray(holds, dtype=bool), frozen_list(starts, np.int64), frozen_list(codes, kind),
            frozen_list(positions, np.int64), frozen_list(sq, np.float32), frozen_list(inv, np.float32),
            frozen_list(norms, np.float64))


def search_few(queries: np.ndarray, centroids: np.ndarray, screen: tuple[np.ndarray, ...] | None,
               nprobe: int, live: np.ndarray, need: int, tables: tuple[Any, ...], where: np.ndarray,
               mask: np.ndarray, width: int, kk: int, metric: str, eps: float,
               c_sq: np.ndarray | None = None, int8: tuple[np.ndarray, np.ndarray] | None = None,
               rows: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The top ``kk`` of each query: float32 scores and positions ``(nq, kk)`` (padded with -1 and
    -inf, inf for l2), whether the query was searched (False where its ``nprobe`` nearest
    partitions hold fewer than ``need`` rows of ``live``, the live rows of each partition) and
    the rows scanned.

    ``queries``: ``(nq, d)`` float32, C-contiguous, as asked (for cosine the call divides them by
    their norms, as :meth:`embtools.index.IvfIndex._queries` and the re-rank do); ``screen``: the uint8 centroid codes, minima, steps, errors
    and magnitudes (:meth:`embtools.index.IvfIndex._coarse_codes`) or None to score every
    centroid; ``tables``: :func:`few_tables`; ``mask``: the positions that may be returned
    (empty: every live row); ``eps``: the float32 scores' certified error (0: no cut);
    ``c_sq``: the centroids' squared norms (l2); ``int8``: for int8 codes, their per-dimension
    steps and the centres of code 0 (:func:`~embtools.kernels.codes.int8_steps`); ``rows``: the
    tables the shortlist is re-ranked from (:func:`~embtools.kernels.rerank_jit.code_tables`;
    None: the codes, which are the rows); ``where``: each position's ``table << CODE_SHIFT |
    row`` in them."""
    out_s, out_p, done, scanned = search_with(queries, search_args(
        centroids, screen, nprobe, live, need, tables, where, mask, width, kk, metric, eps, queries.shape[1],
        c_sq, int8, rows))
    return out_s, out_p, done, int(scanned)


def search_args(centroids: np.ndarray, screen: tuple[np.ndarray, ...] | None, nprobe: int, live: np.ndarray,
                need: int, tables: tuple[Any, ...], where: np.ndarray, mask: np.ndarray, width: int, kk: int,
                metric: str, eps: float, dim: int, c_sq: np.ndarray | None = None,
                int8: tuple[np.ndarray, np.ndarray] | None = None,
                rows: tuple[Any, Any] | None = None) -> BoundArgs:
    """The arguments after the queries of the compiled call :func:`search_few` makes (the same
    parameters, for ``dim``-dimensional queries), bound for :func:`search_with`."""
    coarse, lo, step, err, cmax = _NO_SCREEN if screen is None else screen
    holds, starts, codes, pos, sq, inv, norms = tables
    steps, centers = (_NONE32, _NONE32) if int8 is None else int8
    rows_, norms_ = (codes, norms) if rows is None else rows
    return _bind(centroids, _NONE32 if c_sq is None else c_sq, coarse, lo, step, err, cmax, int(nprobe), live,
                 int(need), holds, starts, codes, pos, sq, inv, steps, centers, rows_, norms_, where, mask, int(width),
                 int(kk), METRICS[metric], float(eps), sum_program(dim))


def prepared_queries(queries: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(q, q64)``: the float32 queries the probe and scan score with and the float64 ones of the
    re-rank, as :func:`search_few` prepares ``queries`` (``(nq, d)`` float32, C-contiguous): for
    cosine divided by their norms, computed once for both."""
    out: tuple[np.ndarray, np.ndarray] = _prepared(queries, metric == "cosine", sum_program(queries.shape[1]))
    return out


def probe_few(q: np.ndarray, centroids: np.ndarray, screen: tuple[np.ndarray, ...] | None, nprobe: int,
              live: np.ndarray, need: int, metric: str,
              c_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first step of :func:`search_few` on its own: ``(parts, done)``, each query's
    ``nprobe`` nearest partitions ``(nq, nprobe)`` and whether they hold ``need`` rows of
    ``live`` (a row of -1 where not)."""
    coarse, lo, step, err, cmax = _NO_SCREEN if screen is None else screen
    out: tuple[np.ndarray, np.ndarray] = _probe_few(
        q, centroids, _NONE32 if c_sq is None else c_sq, coarse, lo, step, err, cmax, nprobe, live, need,
        metric == "l2")
    return out


def scan_few(q: np.ndarray, parts: np.ndarray, tables: tuple[Any, ...], mask: np.ndarray,
             width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The second step: the unsorted heaps ``(hs, hi)`` of the best ``width`` rows of partitions
    ``parts`` (``(nq, m)``, -1: none) for each query, and the rows scanned. Two threads may each
    scan a share of the partitions; :func:`finish_few` merges their heaps."""
    hs, hi = new_heaps(len(q), width)
    holds, starts, codes, pos, sq, inv, _ = tables
    scanned = _scan(q, np.zeros(len(q), np.float32), np.zeros((len(q), 0), np.int16), np.ones(len(q)),
                    np.ascontiguousarray(parts), holds, starts, codes, pos, sq, inv, mask, hs, hi)
    return hs, hi, int(scanned)


def finish_few(heaps: list[tuple[np.ndarray, np.ndarray]], q64: np.ndarray, kk: int, tables: tuple[Any, ...],
               where: np.ndarray, metric: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The last step: merge the heaps of :func:`scan_few` calls, cut and re-rank each query's
    shortlist from the codes: the scores and positions :func:`search_few` returns."""
    hs, hi = heaps[0]
    for hs2, hi2 in heaps[1:]:
        merge_heaps(hs, hi, hs2, hi2)
    code = METRICS[metric]
    out_s, out_p = _padded(len(hs), kk, code)
    _finish(hs, hi, q64, eps, where, tables[2], tables[6], code, sum_program(q64.shape[1]), out_s, out_p)
    return out_s, out_p


def warm() -> None:
    """Run the kernel once on tiny inputs."""
    rows = np.eye(2, dtype=np.float32)
    t = few_tables(np.ones((2, 1), bool), [np.array([0, 1, 2])], [rows], [np.arange(2)], [np.zeros(0, np.float32)],
                   [np.ones(2, np.float32)], [np.ones(2)])
    screen = (np.zeros((2, 2), np.uint8), np.zeros(2, np.float32), np.ones(2, np.float32), np.ones(2), np.ones(2))
    t8 = few_tables(np.ones((2, 1), bool), [np.array([0, 1, 2])], [np.eye(2, dtype=np.int8)], [np.arange(2)],
                    [np.zeros(0, np.float32)], [np.zeros(0, np.float32)], [np.zeros(0)])
    search_few(rows[:1], rows, None, 1, np.ones(2, np.int64), 1, t8, np.arange(2), np.zeros(0, bool), 2, 1,
               "cosine", 0.0, None, (np.ones(2, np.float32), np.zeros(2, np.float32)), (t[2], frozen_list([np.zeros(0)], np.float64)))
    for s in (None, screen):
        search_few(rows[:1], rows, s, 1, np.ones(2, np.int64), 1, t,
                   np.arange(2), np.zeros(0, bool), 2, 1, "cosine", 1e-6)
        parts, _ = probe_few(rows[:1], rows, s, 1, np.ones(2, np.int64), 1, "cosine")
        hs, hi, _ = scan_few(rows[:1], parts, t, np.zeros(0, bool), 2)
        finish_few([(hs, hi), scan_few(rows[:1], parts, t, np.zeros(0, bool), 2)[:2]],
                   rows[:1].astype(np.float64), 1, t, np.arange(2), "cosine", 1e-6)
