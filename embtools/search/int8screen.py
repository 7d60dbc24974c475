"""The certified int8 screen: exact search that skips rows the int8 codes prove cannot score well.

Every value ``x_j`` of a row whose codes avoid the two end codes lies within ``r_j``
(:func:`embtools.kernels.codes.int8_radius`) of its bucket centre ``x^_j``, so its score has a
bounded error: ``|q . x - q . x^| <= sum_j |q_j| r_j`` and ``| |x| - |x^| | <= |r|``. The screen
computes each row's score interval from the codes (``d`` bytes a row instead of ``4 d``; the
kernels are in :mod:`embtools.kernels.int8`: integer products with the int8-rounded query, whose
rounding is bounded too), takes the k-th largest lower bound ``T`` and keeps
only the rows whose upper bound reaches ``T`` (every row with an end code, whose value may have
been clipped, is kept). At least k rows truly score ``>= T``, so every row of the exact top k is
kept; the float64 re-rank of the kept rows (:func:`embtools.search.refine.rerank`) is therefore
the exact answer: the same rows as the float32 / float64 search. When more rows survive than
``MAX_CANDIDATES`` allows (queries that the codes cannot separate) the query returns None and the
planner's float32 stream answers it.

The query-independent part of the bounds (:func:`embtools.kernels.int8.int8_row_terms`: the
centres' norms, and which rows hold an end code) is computed once per immutable source and kept
with it (24 bytes a row, :class:`RowTerms`) when that fits in ``1 / TERMS_CAP_FRACTION`` of the
room under the cap.

``store.search(Q, k, screen="int8")`` asks for it (the store must hold int8 codes of the search
dimension, ``store.quantize``). The planner does not choose it by itself: how many rows it must
read as floats depends on how the scores crowd around the k-th best (see the README's figures).

Examples
--------
>>> import numpy as np, embtools as et
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
>>> _ = store.add_embeddings(x, dimension=16)
>>> _ = store.quantize(16, kinds=["int8"])
>>> store.search(x[:2], k=3, screen="int8").equals(store.search(x[:2], k=3))
True
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.kernels.int8 import (
    Int8Bounds,
    QueryTerms,
    int8_inverse_norms,
    int8_row_terms,
    int8_score_bounds,
)
from embtools.kernels.jit import jit_kernels
from embtools.kernels.threads import ForkSafePool, one_blas_thread
from embtools.search.quantized import CodeSizes, quantized_spec
from embtools.search.refine import rerank
from embtools.search.request import SearchContext, SearchRequest, TopK
from embtools.storage.quantized import iter_codes
from embtools.storage.source import gather_rows

__all__ = ["MAX_CANDIDATES", "certified_int8_top_k", "int8_screen_bytes"]

#: most rows kept per query (beyond it the query goes to the float32 stream)
MAX_CANDIDATES = 20_000
#: rows bounded per kernel call (its float64 temporaries: about 64 bytes a row)
SCREEN_ROWS = 32768
#: the kept row terms of an immutable source take at most this share of the room under the cap
TERMS_CAP_FRACTION = 16
_POOL = ForkSafePool(2, "embtools-int8-screen")
_TERMS: weakref.WeakKeyDictionary[Any, dict[int, RowTerms]] = weakref.WeakKeyDictionary()
_TERMS_LOCK = threading.Lock()
_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)


def int8_screen_bytes(dim: int) -> int:
    """Bytes held for a query's kept rows (position and bound) and their float64 re-rank."""
    return MAX_CANDIDATES * (16 + dim * 12)


@dataclass(frozen=True)
class RowTerms:
    """The query-independent part of every row's bounds: :func:`~embtools.kernels.int8.int8_row_terms`
    and, for cosine, :func:`~embtools.kernels.int8.int8_inverse_norms` (24 bytes a row); and
    the rows whose codes bound nothing (an end code: a value the sampled ranges clipped; or a
    norm that may be zero), ``end_pos``, with their float32 vectors ``end_rows`` (None where
    they would not fit): the screen scores those exactly instead of keeping them all."""

    terms: np.ndarray
    inv_lo: np.ndarray
    inv_hi: np.ndarray
    end_pos: np.ndarray
    end_rows: np.ndarray | None = None
    end_norms: np.ndarray | None = None

    def end_bounds(self, q: np.ndarray, metric: str, positions: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions, lower, upper)`` of the end rows (those in ``positions`` when given) for
        the float64 query ``q`` (normalised for cosine): their scores from a float32 product,
        widened by a bound on its rounding (``(d + 4) u |q| |x|``, the query's own rounding to
        float32 included)."""
        assert self.end_rows is not None and self.end_norms is not None
        pos, x, norms = self.end_pos, self.end_rows, self.end_norms
        if positions is not None:
            pick = np.isin(pos, positions, assume_unique=True)
            pos, x, norms = pos[pick], x[pick], norms[pick]
        dots = (x @ q.astype(np.float32)).astype(np.float64)
        qn = float(np.sqrt(q @ q))
        err = 1.01 * (q.shape[0] + 4) * _EPS32 * qn * norms + 8 * _EPS64 * np.abs(dots)
        if metric == "cosine":
            scores = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            tol = np.divide(err, norms, out=np.zeros_like(dots), where=norms > 0) * (1 + 8 * _EPS64)
        elif metric == "dot":
            scores, tol = dots, err
        else:  # l2: larger is better, the negated squared distance
            scores = -(qn * qn + norms * norms - 2.0 * dots)
            tol = 2.0 * err + 8 * _EPS64 * (qn * qn + norms * norms)
        return pos, scores - tol, scores + tol

    def take(self, pos: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``(terms, (inv_lo, inv_hi))`` of ascending positions (a slice for a run of rows)."""
        a, b = int(pos[0]), int(pos[-1]) + 1
        sel: Any = slice(a, b) if b - a == len(pos) else pos
        return self.terms[sel], (self.inv_lo[sel], self.inv_hi[sel])


def _row_terms(ctx: SearchContext, dim: int, bounds: Int8Bounds) -> RowTerms | None:
    """The :class:`RowTerms` of every row of an immutable source, computed once and kept with it
    (24 bytes a row), or None (a source that changes, or terms that would take more than
    ``1 / TERMS_CAP_FRACTION`` of the room left under the cap)."""
    source = ctx.source
    if not getattr(source, "frozen", False):
        return None
    with _TERMS_LOCK:
        kept = _TERMS.get(source, {}).get(dim)
    if kept is not None:
        return kept
    avail = ctx.budget.available_bytes
    if avail is not None and source.num_rows * 24 * TERMS_CAP_FRACTION > avail:
        return None
    terms = np.empty(source.num_rows, np.float64)
    for pos, codes in iter_codes(source, dim, "int8", None, SCREEN_ROWS):
        terms[pos[0] : pos[-1] + 1] = int8_row_terms(codes, bounds)
    inv_lo, inv_hi = int8_inverse_norms(terms, bounds)
    end_pos = np.flatnonzero(np.isnan(terms) | np.isnan(inv_lo))
    end_rows = end_norms = None
    if avail is None or len(end_pos) * (dim + 2) * 4 * TERMS_CAP_FRACTION <= avail - source.num_rows * 24:
        end_rows = gather_rows(source, dim, end_pos)
        end_norms = np.linalg.norm(end_rows.astype(np.float64), axis=1)
    for arr in (terms, inv_lo, inv_hi, end_pos, end_rows, end_norms):
        if arr is not None:
            arr.setflags(write=False)
    kept = RowTerms(terms, inv_lo, inv_hi, end_pos, end_rows, end_norms)
    with _TERMS_LOCK:
        _TERMS.setdefault(source, {})[dim] = kept
    return kept


def certified_int8_top_k(req: SearchRequest, ctx: SearchContext, sizes: CodeSizes
                         ) -> tuple[TopK, np.ndarray]:
    """The exact top-k of each query (float64 re-rank of the rows the codes cannot rule out), and
    per query whether it was certified (False: the caller searches it another way)."""
    spec = quantized_spec(ctx.source, req.dim, "int8")
    bounds = Int8Bounds.of(spec.ranges)
    kk = req.kk
    queries = req.queries[:, : req.dim].astype(np.float64)
    if req.metric == "cosine":
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1.0, norms)
    out_s = np.zeros((req.nq, kk), np.float32)
    out_p = np.zeros((req.nq, kk), np.int64)
    ok = np.zeros(req.nq, bool)
    step = max(1, min(sizes.rows, SCREEN_ROWS))
    held = sizes.nbytes + int8_screen_bytes(req.dim)
    with ctx.budget.holding(f"int8-screen/{id(out_p)}", held, "the certified int8 screen",
                            "raise max_memory_gb"):
        terms = _row_terms(ctx, req.dim, bounds)
        jit = jit_kernels("int8_jit") if terms is not None and req.dim * 128 * 127 < 2**24 else None
        for qi in range(req.nq):
            with one_blas_thread():  # products with one query: BLAS threads only cost
                if jit is not None and terms is not None:
                    kept = _screen_one_jit(jit, req, ctx, queries[qi], bounds, kk, sizes.rows, terms)
                else:
                    kept = _screen_one(req, ctx, queries[qi], bounds, kk, sizes.rows, step, terms)
            if kept is None:
                continue
            top = rerank(req.subset(slice(qi, qi + 1)), ctx, kept[None, :], kk)
            out_s[qi], out_p[qi] = top.scores[0], top.positions[0]
            ok[qi] = True
    return TopK(out_s, out_p), ok


def _screen_one_jit(jit: Any, req: SearchRequest, ctx: SearchContext, q: np.ndarray,
                    bounds: Int8Bounds, kk: int, rows: int, terms: RowTerms) -> np.ndarray | None:
    """:func:`_screen_one` by the compiled kernel (:mod:`embtools.kernels.int8_jit`): each
    block's rows split over two threads, each with its own heap and kept rows (exact float32
    integer products: the caller checks ``dim * 128 * 127 < 2**24``)."""
    qt = QueryTerms.of(q, bounds)
    w = qt.wi.astype(np.float32)
    metric = {"cosine": jit.METRIC_COSINE, "dot": jit.METRIC_DOT}.get(req.metric, jit.METRIC_L2)
    e3 = qt.l2_slack(bounds)
    states = [jit.ScreenState.new(kk, 4 * MAX_CANDIDATES) for _ in range(2)]

    skip_end = terms.end_rows is not None  # scored exactly below, not kept wholesale

    def scan(state: Any, p: np.ndarray, codes: np.ndarray) -> None:
        if len(p) == 0 or state.failed:
            return
        t, (inv_lo, inv_hi) = terms.take(p)
        jit.screen_rows(codes, w, p, qt.alpha, qt.const, qt.rad, metric, inv_lo, inv_hi, t, qt.qq,
                        e3, bounds.rho, skip_end, *state.arrays, MAX_CANDIDATES)

    pool = _POOL.get()
    for pos, codes in iter_codes(ctx.source, req.dim, "int8", req.positions, rows):
        c8 = codes.view(np.int8)
        half = len(pos) // 2
        other = pool.submit(scan, states[1], pos[half:], c8[half:])
        scan(states[0], pos[:half], c8[:half])
        other.result()
        if states[0].failed or states[1].failed:
            return None
    extra = terms.end_bounds(q, req.metric, req.positions) if skip_end else None
    final = jit.finish(states, extra)
    if final.size > MAX_CANDIDATES or final.size < kk:
        return None
    return final


def _screen_one(req: SearchRequest, ctx: SearchContext, q: np.ndarray, bounds: Int8Bounds, kk: int,
                rows: int, step: int, terms: RowTerms | None) -> np.ndarray | None:
    """Positions of the rows one query keeps (ascending), or None past MAX_CANDIDATES."""
    best_lo = np.full(0, -np.inf)
    kth = -np.inf
    kept_pos: list[np.ndarray] = []
    kept_hi: list[np.ndarray] = []
    count = 0
    exact_ends = terms is not None and terms.end_rows is not None
    for pos, codes in iter_codes(ctx.source, req.dim, "int8", req.positions, rows):
        for s in range(0, len(pos), step):
            p = pos[s : s + step]
            t, inv = (None, None) if terms is None else terms.take(p)
            lo, hi = int8_score_bounds(q, codes[s : s + step], bounds, req.metric, t,
                                       inverse_norms=inv)
            if exact_ends:  # scored exactly below
                assert t is not None and inv is not None
                bounded = ~(np.isnan(t) | np.isnan(inv[0]))
                p, lo, hi = p[bounded], lo[bounded], hi[bounded]
            both = np.concatenate([best_lo, lo])
            if both.size > kk:
                best_lo = np.partition(both, both.size - kk)[both.size - kk :]
            else:
                best_lo = both
            if best_lo.size >= kk:
                kth = float(best_lo.min())
            keep = np.flatnonzero(hi >= kth)
            count += keep.size
            kept_pos.append(p[keep])
            kept_hi.append(hi[keep])
            if count > 4 * MAX_CANDIDATES:  # the final threshold would have to prune a lot
                pos_all, hi_all = np.concatenate(kept_pos), np.concatenate(kept_hi)
                sel = hi_all >= kth
                kept_pos, kept_hi, count = [pos_all[sel]], [hi_all[sel]], int(sel.sum())
                if count > MAX_CANDIDATES:
                    return None
    if exact_ends:
        assert terms is not None
        end_pos, end_lo, end_hi = terms.end_bounds(q, req.metric, req.positions)
        kept_pos.append(end_pos)
        kept_hi.append(end_hi)
        low = np.concatenate([best_lo, end_lo])
        if low.size >= kk:
            kth = float(np.partition(low, low.size - kk)[low.size - kk])
    pos_all = np.concatenate(kept_pos) if kept_pos else np.zeros(0, np.int64)
    hi_all = np.concatenate(kept_hi) if kept_hi else np.zeros(0)
    final = pos_all[hi_all >= kth]
    if final.size > MAX_CANDIDATES or final.size < kk:
        return None
    return np.sort(final)
