"""The lane of query loops: one query's index search, planned once per store version.

A loop of single queries (``for v in Q: store.compute_similarity(v, 384, 10)``) asks the same
search again and again: the same ``k``, ``nprobe``, ``refine`` and dimension against the same
version. Checking the arguments, planning the path and sizing it under the cap cost more than the
compiled search itself (about 90 us against 120 us at 1M rows). The first call of a loop takes
the full path (:func:`~embtools.search.plan.plan_search`); when its plan is one query through
an index searched whole in compiled calls (:meth:`~embtools.search.ivf.IndexProbe.searches_whole`),
with no filter and no row outside the index, :func:`open_lane` keeps that plan as an
:class:`IndexLane`, cached on the store under the call's arguments. Later
calls with the same arguments check only the query (shape, dtype, finite values) and run
:meth:`IndexLane.run`: the same compiled call (:meth:`~embtools.search.ivf.IndexProbe.top_whole`),
its arguments bound once (:meth:`~embtools.search.ivf.IndexProbe.whole_search`), holding the same
workspace under the cap, so the results are the full path's bit for bit. A
lane that cannot take a query (another dimension, a cap now too full) answers None and the call
takes the full path, which raises what it raises. A new version drops the store's lanes.

Examples
--------
>>> import numpy as np, embtools as et
>>> from embtools.search.request import SearchContext, SearchRequest
>>> store = et.EmbeddingStore(None, backend="numpy")   # in memory: no index, so no lane
>>> _ = store.add_embeddings(np.eye(4, dtype=np.float32), dimension=4)
>>> req = SearchRequest.build(store.source, np.eye(4, dtype=np.float32)[1], k=2)
>>> open_lane(req, SearchContext.of(store)) is None
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.memory import MemoryBudget
from embtools.search.plan import SearchPlan, plan_search
from embtools.search.request import SearchContext, SearchRequest, TopK

__all__ = ["IndexLane", "cached_lane", "keep_lane", "lane_key", "open_lane"]


@dataclass(frozen=True)
class IndexLane:
    """The planned index search of one ``dim``-dimensional query (see the module docstring)."""

    probe: Any
    budget: MemoryBudget
    dim: int
    metric: str
    kk: int
    nprobe: int
    width: int
    #: the workspace the full path holds for one query (:func:`~embtools.search.ivf.index_top_k`)
    need: int
    #: the compiled call with its arguments bound (:meth:`~embtools.search.ivf.IndexProbe.whole_search`)
    call: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None] | None = None

    def run(self, q: np.ndarray) -> TopK | None:
        """The top ``kk`` of the prepared query ``q`` (float32 ``(1, dim)``), as the full path
        finds it; None when the lane cannot take ``q`` (another shape, the cap cannot hold the
        workspace now, or the compiled kernels were switched off since, ``EMBTOOLS_JIT=0``)."""
        if q.shape != (1, self.dim) or not self.probe.searches_whole(self.dim, self.metric):
            return None
        avail = self.budget.available_bytes
        if avail is None:  # no cap to hold the workspace under
            return self._search(q)
        if self.need > avail:
            return None
        key = f"index/lane/{id(q)}"
        self.budget.hold(key, self.need, f"the index search ({self.probe.name})")
        try:
            return self._search(q)
        finally:
            self.budget.free(key)

    def _search(self, q: np.ndarray) -> TopK:
        found = None if self.call is None else self.call(q)
        s, p = self.probe.top_whole(q, self.kk, self.nprobe, self.width) if found is None else found
        return TopK(s, p)


def open_lane(req: SearchRequest, ctx: SearchContext, plan: SearchPlan | None = None) -> IndexLane | None:
    """The lane of ``req`` planned as ``plan`` (default :func:`plan_search`), or None when its
    search is not one unfiltered query through an index that holds every row and searches it
    whole."""
    if req.nq != 1 or req.positions is not None:
        return None
    plan = plan_search(req, ctx) if plan is None else plan
    probe, sizes = plan.probe, plan.index
    if plan.path != "index" or sizes is None or len(probe.uncovered):
        return None
    if not probe.searches_whole(req.dim, req.metric) or sizes.group != 1:
        return None
    need = probe.workspace_bytes(1, sizes.nprobe, sizes.width)
    call = probe.whole_search(req.kk, sizes.nprobe, sizes.width)
    return IndexLane(probe, ctx.budget, req.dim, req.metric, req.kk, sizes.nprobe, sizes.width, need, call)


def lane_key(*args: Any) -> tuple[Any, ...] | None:
    """The arguments of a call as a cache key: each with its type (``10``, ``10.0`` and ``True``
    are equal keys of a dict but not equal arguments: the full path rejects two of them); None
    when one cannot be a key (the full path says what is wrong with it)."""
    key = tuple(zip(map(type, args), args, strict=True))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def cached_lane(store: Any, key: tuple[Any, ...] | None) -> IndexLane | None:
    """The lane kept under ``key`` for the store's open version, or None."""
    lanes = store.__dict__.get("_lanes")
    if key is None or lanes is None or lanes[0] is not store.source:
        return None
    found: IndexLane | None = lanes[1].get(key)
    return found


#: lanes kept per store version (distinct argument sets of a loop)
MAX_LANES = 16


def keep_lane(store: Any, key: tuple[Any, ...] | None, lane: IndexLane | None) -> None:
    """Keep ``lane`` (when there is one) under ``key`` for the store's open version; other
    versions' lanes are dropped either way (with the index objects they hold)."""
    source = store.source
    lanes = store.__dict__.get("_lanes")
    if lanes is None or lanes[0] is not source:
        lanes = (source, {})
        store.__dict__["_lanes"] = lanes
    if key is None or lane is None:
        return
    if len(lanes[1]) >= MAX_LANES:
        lanes[1].clear()
    lanes[1][key] = lane
