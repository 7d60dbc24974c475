"""The index path of a search: shortlist through an IVF index, re-rank exactly, merge.

The index itself lives in :mod:`embtools.index` (a layer above); the search reaches it through
the :class:`IndexProbe` protocol that the store's ``find_index`` hands to the search context. The
planner (:mod:`embtools.search.plan`) sizes the path with :func:`size_index` and runs it:

1. :func:`index_top_k`: queries in groups sized under the cap; for each group the probe returns
   the best ``width = k * refine`` rows of the ``nprobe`` nearest partitions of each query (by the
   codes), and :func:`~embtools.search.refine.rerank` re-scores them in float64 from the stored
   float32 vectors (the exact search's own re-rank), or, where the codes are those vectors
   (``codes="float"`` at the search dimension), the probe re-scores them from its codes with the
   same bits, reading nothing more (int8 codes of the search dimension: from the mapped data
   files, in the same compiled calls, when there is no memory cap);
2. the rows the index does not hold (added after it was built) are searched exactly;
3. :func:`merge_top_k` merges the two, ties by lower position.

Examples
--------
>>> import numpy as np
>>> s, p = merge_top_k(np.array([[0.9, 0.5]]), np.array([[4, 2]]),
...                    np.array([[0.7]]), np.array([[1]]), k=2, largest=True)
>>> p.tolist(), s.tolist()
([[4, 1]], [[0.8999999761581421, 0.699999988079071]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from embtools.search.refine import overfetch, rerank, rerank_min_bytes, size_rerank
from embtools.search.request import SearchContext, SearchRequest, TopK

__all__ = ["IndexProbe", "IndexSizes", "exact_is_cheaper", "index_top_k", "merge_top_k", "outside_rows",
           "size_index"]


@runtime_checkable
class IndexProbe(Protocol):
    """An IVF index opened for one version of a store (see :class:`embtools.index.IvfIndex`)."""

    name: str
    partitions: int
    code_dim: int
    default_refine: int
    #: positions of the version's rows that the index does not hold (searched exactly)
    uncovered: np.ndarray
    #: rows of the version that the index holds
    live_rows: int

    def default_nprobe(self) -> int:
        """Partitions probed when ``nprobe`` is not given."""

    def workspace_bytes(self, nq: int, nprobe: int, width: int) -> int:
        """Bytes a shortlist of ``nq`` queries needs (scores, candidates, codes read)."""

    def shortlist(self, queries: np.ndarray, kk: int, nprobe: int, width: int,
                  positions: np.ndarray | None = None) -> np.ndarray:
        """``(nq, width)`` int64 positions, best first by the codes, -1 where a query has fewer
        candidates; at least ``kk`` real ones when the index holds that many live rows (of the
        filter's selected ``positions``, the only rows returned when given)."""

    def searches_whole(self, dim: int, metric: str) -> bool:
        """Whether :meth:`top_whole` can search ``dim`` dimensions by ``metric`` in compiled
        calls, re-ranking without :func:`~embtools.search.refine.rerank`: the codes are the rows
        as stored, or int8 codes whose rows the index reads from the mapped data files (no
        memory cap), and the compiled kernels are installed."""

    def top_whole(self, queries: np.ndarray, kk: int, nprobe: int, width: int,
                  positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The best ``kk`` rows of each query's shortlist (as :meth:`shortlist`) re-ranked exactly
        (the queries in float64 as :func:`~embtools.search.refine.rerank_queries` makes
        them): the float32 scores and positions ``(nq, kk)`` that
        :func:`~embtools.search.refine.rerank` gives, padded as :func:`_rerank_ragged` pads."""

    def whole_search(self, kk: int, nprobe: int,
                     width: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None] | None:
        """:meth:`top_whole` of one unfiltered ``(1, d)`` float32 query as a function with
        everything but the query prepared once (a loop of single queries), giving what
        :meth:`top_whole` gives, or None for a query it must widen (its partitions hold fewer
        than ``kk`` rows: then :meth:`top_whole`); None where no such function is kept."""


@dataclass(frozen=True)
class IndexSizes:
    """Queries shortlisted together (``group``), partitions probed, refinement factor, candidates
    per query (``width``), re-rank sizes, and the bytes of the largest step."""

    group: int
    nprobe: int
    refine: int
    width: int
    nbytes: int
    #: with a where= filter: the probes asked for (``nprobe`` is widened by the selectivity)
    asked_nprobe: int | None = None

    def scored_rows(self, probe: IndexProbe) -> int:
        """About how many indexed rows each query's probes score."""
        return -(-self.nprobe * probe.live_rows // max(1, probe.partitions))


def _mask_bytes(req: SearchRequest, probe: IndexProbe) -> int:
    """Bytes of a filter's selection mask over the version's rows and its partitions."""
    if req.positions is None:
        return 0
    return probe.live_rows + len(probe.uncovered) + 1 + req.n_sel * 4


def size_index(req: SearchRequest, probe: IndexProbe, avail: int | None) -> IndexSizes | None:
    """Size the index path of ``req`` in ``avail`` bytes (None: no cap); None when not even one
    query fits."""
    nprobe = min(probe.partitions, req.nprobe or probe.default_nprobe())
    asked = None
    if req.positions is not None:  # a filter: probe more partitions, as many as it thins them
        rows = probe.live_rows + len(probe.uncovered)
        asked, nprobe = nprobe, min(probe.partitions, -(-nprobe * rows // max(1, req.n_sel)))
    refine = req.refine or probe.default_refine
    width = max(overfetch(req.kk) if refine == 1 else req.kk * refine, req.kk)
    width = min(width, probe.live_rows) if probe.live_rows else req.kk
    width = max(width, 1)
    mask = _mask_bytes(req, probe)
    least = max(probe.workspace_bytes(1, nprobe, width) + mask, rerank_min_bytes(width, req.dim))
    if avail is not None and least > avail:
        return None
    group = req.nq
    if avail is not None:
        while group > 1 and probe.workspace_bytes(group, nprobe, width) + mask > avail // 2:
            group = max(1, group // 2)
    group = min(group, 1024)  # each partition read once per group
    if size_rerank(avail, min(group, req.nq), width, req.dim) is None:
        return None
    return IndexSizes(group, nprobe, refine, width,
                      max(least, probe.workspace_bytes(group, nprobe, width) + mask), asked)


def exact_is_cheaper(req: SearchRequest, probe: IndexProbe, sizes: IndexSizes) -> bool:
    """Whether the exact search of a filter's selection reads fewer rows than the index's
    widened probes would score (then the planner searches the selection exactly)."""
    return req.positions is not None and req.n_sel <= sizes.scored_rows(probe)


def outside_rows(req: SearchRequest, probe: IndexProbe) -> np.ndarray:
    """The selected rows the index does not hold (added after it): searched exactly."""
    rest = probe.uncovered
    if req.positions is not None and len(rest):
        rest = rest[np.isin(rest, req.positions, assume_unique=True)]
    return rest


def _rerank_ragged(req: SearchRequest, ctx: SearchContext, cand: np.ndarray, kk: int) -> TopK:
    """:func:`rerank` of candidate rows padded with -1 (queries grouped by their count)."""
    nq = len(cand)
    counts = (cand >= 0).sum(axis=1)
    if nq and cand.shape[1] >= kk and counts.min() == cand.shape[1]:  # every query full (common)
        return rerank(req, ctx, np.ascontiguousarray(cand), kk)
    fill = -np.inf if req.largest else np.inf
    scores = np.full((nq, kk), fill, np.float32)
    found = np.full((nq, kk), -1, np.int64)
    for c in np.unique(counts):
        rows = np.flatnonzero(counts == c)
        if c == 0:
            continue
        sub = req.subset(rows)
        top = rerank(sub, ctx, np.ascontiguousarray(cand[rows, :c]), kk)
        w = top.positions.shape[1]
        scores[rows, :w], found[rows, :w] = top.scores, top.positions
    return TopK(scores, found)


def index_top_k(req: SearchRequest, ctx: SearchContext, probe: IndexProbe, sizes: IndexSizes) -> TopK:
    """The best ``kk`` of the rows the index holds, for each query (exact float64 scores of the
    shortlisted rows; -1 positions where a query found fewer)."""
    kk, nq = req.kk, req.nq
    out_s = np.empty((nq, kk), np.float32)
    out_p = np.empty((nq, kk), np.int64)
    key = f"index/search/{id(req)}"
    need = probe.workspace_bytes(min(sizes.group, nq), sizes.nprobe, sizes.width) + _mask_bytes(req, probe)
    whole = probe.searches_whole(req.dim, req.metric)  # probe, scan and re-rank compiled
    with ctx.budget.holding(key, need,
                            f"the index search ({probe.name})", "raise max_memory_gb or lower nprobe"):
        for a in range(0, nq, sizes.group):
            b = min(nq, a + sizes.group)
            sub = req if (a, b) == (0, nq) else req.subset(slice(a, b))
            if whole:
                out_s[a:b], out_p[a:b] = probe.top_whole(sub.queries, kk, sizes.nprobe, sizes.width,
                                                         req.positions)
            else:
                cand = probe.shortlist(sub.queries, kk, sizes.nprobe, sizes.width, req.positions)
                top = _rerank_ragged(sub, ctx, cand, kk)
                out_s[a:b], out_p[a:b] = top.scores, top.positions
    return TopK(out_s, out_p)


def merge_top_k(scores_a: np.ndarray, pos_a: np.ndarray, scores_b: np.ndarray, pos_b: np.ndarray,
                k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-query result lists (positions -1 are empty slots): the best ``k``, ties by
    lower position."""
    s = np.concatenate([scores_a, scores_b], axis=1).astype(np.float64)
    p = np.concatenate([pos_a, pos_b], axis=1)
    key = np.where(p < 0, np.inf, -s if largest else s)
    big = np.where(p < 0, np.iinfo(np.int64).max, p)
    order = np.lexsort((big, key), axis=1)[:, :k]
    return (np.take_along_axis(s, order, axis=1).astype(np.float32),
            np.take_along_axis(p, order, axis=1))


def describe(probe: Any, sizes: IndexSizes) -> str:
    """One line for ``explain``."""
    widened = ("" if sizes.asked_nprobe is None else
               f" (widened from {sizes.asked_nprobe} for the where= filter's selection)")
    return (f"  IVF index {probe.name}: {sizes.nprobe} of {probe.partitions} partitions per query{widened}, "
            f"shortlist of {sizes.width} by {probe.code_dim}-dimensional codes, query groups of "
            f"{sizes.group}; {len(probe.uncovered):,} rows outside the index searched exactly")
