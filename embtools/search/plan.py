"""The search planner: which path a search takes and how every buffer is sized under the cap.

:func:`plan_search` looks at a :class:`~embtools.search.request.SearchRequest` and its
:class:`~embtools.search.request.SearchContext` and returns a :class:`SearchPlan`:

* ``empty``: nothing selected (or ``k`` rows of nothing): no pass at all;
* ``screen``: cosine/dot batches of at least ``SCREEN_MIN_QUERIES`` queries on a CPU with bfloat16
  hardware (or ``screen="on"``), only when the screen's query groups and batches, the float64
  re-ranking of its candidates and the float32 stream of the queries it cannot certify all fit
  the memory cap (the groups are sized down to fit);
* ``float32``: the float32 stream of the engine (``overfetch(k)`` candidates per query) re-ranked in
  float64;
* ``funnel``: the Matryoshka funnel's first stage (screened or float32), then re-ranking.

Any search whose smallest sizing (one query against one row at a time) fits the cap runs; only
when even that does not fit does the planner raise :class:`~embtools.errors.MemoryLimitError`, and
its message names the smallest ``max_memory_gb`` that works. :func:`run_search` runs a plan;
:meth:`SearchPlan.explain` describes it (``store.explain(...)``).

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> from embtools.search.request import SearchContext, SearchRequest
>>> from embtools.storage.memory_source import ArraySource
>>> x = ArraySource(np.eye(4, dtype=np.float32))
>>> req = SearchRequest.build(x, np.eye(4, dtype=np.float32)[1], k=2, metric="dot")
>>> ctx = SearchContext(x, get_backend("numpy"), MemoryBudget(0.001))
>>> plan = plan_search(req, ctx)
>>> plan.path, plan.passes
('float32', 1)
>>> run_search(req, ctx, plan).positions.tolist()
[[1, 0]]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.errors import InvalidArgumentError, MemoryLimitError
from embtools.memory import GB, format_bytes
from embtools.search.engine import StreamSizes, plan_stream, run_stream, stream_min_bytes
from embtools.search.funnel import funnel_top_k
from embtools.search.int8screen import certified_int8_top_k, int8_screen_bytes
from embtools.search.ivf import (
    IndexSizes,
    describe,
    exact_is_cheaper,
    index_top_k,
    merge_top_k,
    outside_rows,
    size_index,
)
from embtools.search.quantized import (
    CodeSizes,
    code_rerank_bytes,
    codes_min_bytes,
    quantized_spec,
    size_codes,
)
from embtools.search.refine import (
    RERANK_CHUNK_BYTES,
    RerankSizes,
    overfetch,
    rerank,
    rerank_min_bytes,
    size_rerank,
)
from embtools.search.request import SearchContext, SearchRequest, TopK, cap_error, smallest_cap_gb
from embtools.search.screen import (
    SCREEN_MIN_BATCH_ROWS,
    SCREEN_MIN_GROUP,
    SHORTLIST_MAX,
    ScreenSizes,
    screen_enabled,
    screen_min_bytes,
    screen_possible,
    screen_width,
    screened_top_k,
    shortlist_sizes,
    size_screen,
)

__all__ = ["SearchPlan", "plan_search", "run_search"]

#: The backend the screen's uncertified queries are searched on (its tile kernel is the fastest
#: float32 path on CPU data, and the screen runs only on CPU stores).
FALLBACK_BACKEND = "numpy"


@dataclass(frozen=True)
class SearchPlan:
    """A search's path and sizes (see the module docstring). ``stream``: the float32 stream (the
    path's, the funnel's first stage, or the screen's fallback sized for every query);
    ``screen``: the screen's groups and batches; ``fallback``: the backend of the screen's
    uncertified queries; ``candidates``: rows per query re-ranked in float64 (0: the float32
    order is the answer, for a ``k`` whose candidates would not fit ``RERANK_CHUNK_BYTES``);
    ``min_bytes``: the workspace of the smallest plan; ``notes``: why paths were not taken."""

    path: str
    nq: int
    n_sel: int
    dim: int
    k: int
    metric: str
    backend: str
    cap_bytes: int | None
    held_bytes: int
    min_bytes: int
    min_cap_gb: float
    stream: StreamSizes | None = None
    screen: ScreenSizes | None = None
    fallback: str | None = None
    candidates: int = 0
    rerank: RerankSizes | None = None
    funnel: tuple[tuple[int | str, int], ...] | None = None
    notes: tuple[str, ...] = ()
    index: IndexSizes | None = None
    probe: Any = None
    codes: CodeSizes | None = None

    @property
    def torch(self) -> bool:
        """Whether the search runs torch (the screen's bfloat16 matmul, or a torch backend)."""
        return self.screen is not None or self.backend == "torch"

    @property
    def passes(self) -> int:
        """Passes over the selected rows (the screen's uncertified queries may add one)."""
        if self.path in ("empty", "index"):
            return 0
        sizes = self.screen or self.stream or self.codes
        assert sizes is not None
        return -(-self.nq // sizes.group)

    def explain(self) -> str:
        """The plan as text: path, batch rows, bytes per batch, passes, torch, smallest cap."""
        cap = "none" if self.cap_bytes is None else format_bytes(self.cap_bytes)
        lines = [
            f"search of {self.nq} quer{'y' if self.nq == 1 else 'ies'} over {self.n_sel:,} rows: "
            f"dimension {self.dim}, k={self.k}, {self.metric}, {self.backend} backend; "
            f"memory cap {cap} ({format_bytes(self.held_bytes)} already held)",
            f"path: {self._path_text()}",
        ]
        if self.screen is not None:
            sc = self.screen
            lines.append(
                f"  bfloat16 screen: query groups of {sc.group}, batches of {sc.rows:,} rows "
                f"({format_bytes(sc.rows * self.dim * 4)} of vectors), {format_bytes(sc.nbytes)} "
                f"per batch with its workspace; keeps {sc.width} rows per query"
            )
        if self.stream is not None:
            s = self.stream
            role = "float32 stream"
            if self.path == "screen":
                role = f"float32 stream of uncertified queries ({self.fallback} backend)"
            lines.append(
                f"  {role}: query groups of {s.group}, {s.chunk} per matmul, batches of "
                f"{s.rows:,} rows ({format_bytes(s.rows * self.dim * 4)} of vectors), "
                f"{format_bytes(s.nbytes)} per batch with its workspace"
                + (", read ahead by a thread" if s.prefetch else "")
                + (f", cosine by inverse row norms ({s.norms})" if s.scaled else "")
            )
        if self.index is not None:
            lines.append(describe(self.probe, self.index))
        if self.codes is not None:
            c = self.codes
            kind = self.funnel[0][0] if self.funnel else "int8"
            lines.append(
                f"  {kind} codes: query groups of {c.group}, batches of {c.rows:,} rows, "
                f"{format_bytes(c.nbytes)} of workspace")
        if self.candidates:
            r = self.rerank
            size = "" if r is None else f", {r.group} queries at a time, {format_bytes(r.nbytes)}"
            lines.append(f"  float64 re-rank: {self.candidates} candidates per query{size}")
        lines.append(f"passes over the rows: {self.passes}"
                     + (" (+1 for uncertified queries, if any)" if self.path == "screen" else ""))
        if self.screen is not None and self.backend == "numpy":
            lines.append("torch: yes (the bfloat16 screen runs torch's matmul on this NumPy store)")
        else:
            lines.append(f"torch: {'yes' if self.torch else 'no'}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(
            f"smallest cap for this search: max_memory_gb={self.min_cap_gb:.9f} "
            f"({format_bytes(self.min_cap_gb * GB)})"
        )
        return "\n".join(lines)

    def _path_text(self) -> str:
        if self.path == "empty":
            return "nothing to search"
        if self.path == "index":
            return ("IVF index shortlist, then a float64 re-rank of the shortlisted rows; rows "
                    "outside the index searched exactly and merged")
        tail = (f", then a float64 re-rank of {self.candidates} candidates per query"
                if self.candidates else " (the float32 order: re-ranking would not fit)")
        if self.path == "int8-screen":
            return ("certified int8 screen (rows whose int8-code score bounds cannot reach the "
                    "top k are skipped), then a float64 re-rank of the rows kept; uncertified "
                    "queries take the float32 stream")
        if self.path == "screen":
            return ("bfloat16 screen with a float64 re-rank of certified queries; uncertified "
                    f"queries take the float32 stream on the {self.fallback} backend")
        if self.path == "funnel":
            assert self.funnel is not None
            d0, n0 = self.funnel[0]
            dims = " -> ".join(f"{d} ({n})" for d, n in self.funnel[1:])
            later = f", re-ranked by {dims}" if dims else ""
            if isinstance(d0, str):
                return (f"quantized funnel: shortlist of {n0} by the {d0} codes of dimension "
                        f"{self.dim}{later}, then a float64 re-rank at {self.dim}")
            first = "bfloat16 screen" if self.screen is not None else "float32 stream"
            return (f"Matryoshka funnel: shortlist of {n0} by the {first} at dimension {d0}"
                    f"{later}, then a float64 re-rank at {self.dim}")
        return "float32 stream" + tail


def _fallback_ctx(ctx: SearchContext) -> SearchContext:
    from embtools.backends import get_backend

    if ctx.backend.name == FALLBACK_BACKEND:
        return ctx
    return dataclasses.replace(ctx, backend=get_backend(FALLBACK_BACKEND))


def plan_search(req: SearchRequest, ctx: SearchContext) -> SearchPlan:
    """Choose the path of ``req`` on ``ctx`` and size its buffers under the budget.

    Raises MemoryLimitError (naming the smallest cap) only when even the smallest plan does not fit.
    """
    budget = ctx.budget
    avail = budget.available_bytes
    kk = req.kk
    base: dict[str, Any] = dict(
        nq=req.nq, n_sel=req.n_sel, dim=req.dim, k=req.k, metric=req.metric,
        backend=ctx.backend.name, cap_bytes=budget.cap_bytes, held_bytes=budget.held_bytes,
    )
    if kk == 0:
        return SearchPlan("empty", **base, min_bytes=0, min_cap_gb=smallest_cap_gb(budget, 0))
    notes: list[str] = []
    probe = _find_probe(req, ctx, notes)
    if probe is not None:
        sizes_i = size_index(req, probe, avail)
        if sizes_i is not None and exact_is_cheaper(req, probe, sizes_i):
            notes.append(
                f"the where= filter selects {req.n_sel:,} rows, no more than the ~"
                f"{sizes_i.scored_rows(probe):,} the index's {sizes_i.nprobe} widened probes would "
                "score: exact search of the selection")
        elif sizes_i is not None:
            least_i = probe.workspace_bytes(1, sizes_i.nprobe, sizes_i.width)
            return SearchPlan("index", **base, min_bytes=least_i,
                              min_cap_gb=smallest_cap_gb(budget, least_i), index=sizes_i,
                              probe=probe, candidates=sizes_i.width, notes=tuple(notes))
        else:
            notes.append(f"the index search ({probe.name}) does not fit the cap: exact search")
    if req.funnel is not None:
        return _plan_funnel(req, ctx, base, notes)
    if req.screen == "int8":
        plan = _plan_int8(req, ctx, base, notes)
        if plan is not None:
            return plan
    m = min(overfetch(kk), req.n_sel)
    if rerank_min_bytes(m, req.dim) > RERANK_CHUNK_BYTES:  # a huge k: the float32 order
        m = kk
    reranked = rerank_min_bytes(m, req.dim) <= RERANK_CHUNK_BYTES
    least = stream_min_bytes(req, ctx, m)
    if reranked:
        least = max(least, rerank_min_bytes(m, req.dim))
    min_cap = smallest_cap_gb(budget, least)
    base.update(min_bytes=least, min_cap_gb=min_cap)
    cands = m if reranked else 0

    if screen_possible(ctx.backend, req.nq, kk, req.metric, req.n_sel, req.screen):
        # sized first: a screen that does not fit the cap never imports torch
        width = min(req.n_sel, max(kk, screen_width(kk)))
        sizes = size_screen(avail, req.nq, req.dim, width, req.n_sel, req.batch_rows)
        fb_ctx = _fallback_ctx(ctx)
        fallback = plan_stream(req, fb_ctx, m)
        rr = size_rerank(avail, req.nq, width, req.dim)
        if sizes is None or fallback is None or rr is None:
            need = screen_min_bytes(req.nq, req.dim, width, req.n_sel)
            notes.append(
                f"the bfloat16 screen needs {format_bytes(need)} (groups of at least "
                f"{min(req.nq, SCREEN_MIN_GROUP)} queries, batches of "
                f"{min(req.n_sel, SCREEN_MIN_BATCH_ROWS):,} rows), over the "
                f"{format_bytes(avail or 0)} left: float32 stream"
            )
        elif screen_enabled(ctx.backend, req.nq, kk, req.metric, req.n_sel, req.screen):
            return SearchPlan("screen", **base, stream=fallback, screen=sizes,
                              fallback=fb_ctx.backend.name, candidates=cands,
                              rerank=size_rerank(avail, req.nq, m, req.dim), notes=tuple(notes))
        elif req.screen == "on":
            notes.append("screen='on' but torch's bfloat16 product is unavailable or does not "
                         "sum in float32 here: float32 stream")
    elif req.screen == "on":
        notes.append("screen='on' but this search cannot be screened (metric, k, backend, "
                     "query or row count)")
    stream = plan_stream(req, ctx, m)
    rr = size_rerank(avail, req.nq, m, req.dim) if reranked else None
    if stream is None or (reranked and rr is None):
        raise cap_error(budget, least, _what(req))
    return SearchPlan("float32", **base, stream=stream, candidates=cands, rerank=rr,
                      notes=tuple(notes))


def _plan_int8(req: SearchRequest, ctx: SearchContext, base: dict[str, Any], notes: list[str]
               ) -> SearchPlan | None:
    """The certified int8 screen (``screen="int8"``), with the float32 stream sized for the
    queries it cannot certify; None (and a note) when the store has no int8 codes of the
    dimension or the screen does not fit the cap: the exact search then streams float32."""
    specs = getattr(ctx.source, "quantized", None) or {}
    spec = specs.get(req.dim)
    if spec is None or "int8" not in spec.kinds:
        notes.append(f"screen='int8' needs int8 codes of dimension {req.dim} (store.quantize): "
                     "float32 stream")
        return None
    avail = ctx.budget.available_bytes
    m = min(overfetch(req.kk), req.n_sel)
    room = None if avail is None else avail - int8_screen_bytes(req.dim)
    codes = None if room is not None and room <= 0 else size_codes(
        room, 1, "int8", req.dim, req.kk, req.n_sel, req.batch_rows)
    stream = plan_stream(req, ctx, m)
    rr = size_rerank(avail, req.nq, m, req.dim)
    if codes is None or stream is None or rr is None:
        notes.append("the certified int8 screen does not fit the cap: float32 stream")
        return None
    least = max(stream_min_bytes(req, ctx, m), rerank_min_bytes(m, req.dim))
    base = {**base, "min_bytes": least, "min_cap_gb": smallest_cap_gb(ctx.budget, least)}
    return SearchPlan("int8-screen", **base, codes=codes, stream=stream, fallback=ctx.backend.name,
                      candidates=m, rerank=rr, notes=tuple(notes))


def _find_probe(req: SearchRequest, ctx: SearchContext, notes: list[str]) -> Any:
    """The index that may serve ``req``, or None (``exact``, a funnel, a filter, no index)."""
    asked = req.nprobe is not None or req.refine is not None
    if req.exact:
        if asked:
            raise InvalidArgumentError("exact=True searches every row: nprobe and refine do not apply")
        return None
    if req.funnel is not None:
        if asked:
            notes.append("an index search takes no funnel: exact search")
        return None
    try:
        probe = None if ctx.find_index is None else ctx.find_index(req.dim, req.metric)
    except MemoryLimitError:
        if asked:
            raise
        notes.append("the index does not fit the memory cap: exact search")
        return None
    if probe is None and asked:
        raise InvalidArgumentError(
            f"nprobe/refine need an index of dimension {req.dim} for metric {req.metric!r}; build "
            f"one with store.create_index(dimension={req.dim}, metric={req.metric!r})")
    return probe


def _plan_funnel(
    req: SearchRequest, ctx: SearchContext, base: dict[str, Any], notes: list[str]
) -> SearchPlan:
    assert req.funnel is not None
    avail = ctx.budget.available_bytes
    d0, n0 = req.funnel[0]
    n0 = min(n0, req.n_sel)
    later = [d for d, _ in req.funnel[1:]]
    widths = [min(n, req.n_sel) for _, n in req.funnel]
    for kind in [d for d, _ in req.funnel if isinstance(d, str)]:
        quantized_spec(ctx.source, req.dim, kind)  # the codes are there, else a clear error
    reranks = [code_rerank_bytes(d, req.dim, w) if isinstance(d, str) else rerank_min_bytes(w, d)
               for w, d in zip(widths[:-1], later, strict=True)]
    reranks.append(rerank_min_bytes(widths[-1], req.dim))
    if isinstance(d0, str):
        least = max([codes_min_bytes(d0, req.dim, n0), *reranks])
        base.update(min_bytes=least, min_cap_gb=smallest_cap_gb(ctx.budget, least),
                    funnel=req.funnel)
        codes = size_codes(avail, req.nq, d0, req.dim, n0, req.n_sel, req.batch_rows)
        rr = size_rerank(avail, req.nq, widths[-1], req.dim)
        if codes is None or rr is None or (avail is not None and max(reranks) > avail):
            raise cap_error(ctx.budget, least, _what(req))
        return SearchPlan("funnel", **base, codes=codes, candidates=widths[-1], rerank=rr,
                          notes=tuple(notes))
    stage = req.at_dim(int(d0), n0)
    dims = [int(d) for d in later] + [req.dim]
    least = max([stream_min_bytes(stage, ctx, n0), *reranks])
    base.update(min_bytes=least, min_cap_gb=smallest_cap_gb(ctx.budget, least), funnel=req.funnel)
    fits = all(size_rerank(avail, req.nq, w, d) is not None for w, d in zip(widths, dims, strict=True))
    if not fits:
        raise cap_error(ctx.budget, least, _what(req))
    common: dict[str, Any] = dict(
        candidates=widths[-1], rerank=size_rerank(avail, req.nq, widths[-1], req.dim)
    )
    possible = screen_possible(ctx.backend, req.nq, 1, req.metric, req.n_sel, req.screen)
    if n0 <= SHORTLIST_MAX and possible:
        sizes = shortlist_sizes(avail, stage, n0)
        if sizes is None:
            notes.append("the bfloat16 shortlist does not fit the cap: float32 stream")
        elif screen_enabled(ctx.backend, req.nq, 1, req.metric, req.n_sel, req.screen):
            return SearchPlan("funnel", **base, screen=sizes, **common, notes=tuple(notes))
    stream = plan_stream(stage, ctx, n0)
    if stream is None:
        raise cap_error(ctx.budget, least, _what(req))
    return SearchPlan("funnel", **base, stream=stream, **common, notes=tuple(notes))


def _what(req: SearchRequest) -> str:
    return (f"a search of {req.nq} quer{'y' if req.nq == 1 else 'ies'} over {req.n_sel:,} rows of "
            f"dimension {req.dim} (k={req.k})")


def run_search(req: SearchRequest, ctx: SearchContext, plan: SearchPlan | None = None) -> TopK:
    """Run ``req`` on ``ctx`` as ``plan`` (default :func:`plan_search`) says: the exact top-k
    (float64 order, ties by lower position), or the funnel's."""
    if plan is None:
        plan = plan_search(req, ctx)
    if plan.path == "empty":
        return TopK.empty(req.nq)
    if plan.path == "index":
        assert plan.index is not None
        top = index_top_k(req, ctx, plan.probe, plan.index)
        rest = outside_rows(req, plan.probe)
        if len(rest):  # rows added after the index: searched exactly, then merged
            sub = req.replace(positions=rest, n_sel=len(rest), exact=True, nprobe=None, refine=None)
            other = run_search(sub, ctx)
            s, p = merge_top_k(top.scores, top.positions, other.scores, other.positions, req.kk,
                               req.largest)
            top = TopK(s, p)
        return top
    if plan.path == "funnel":
        first = plan.screen or plan.stream or plan.codes
        assert first is not None
        return funnel_top_k(req, ctx, first)
    assert plan.stream is not None
    if plan.path == "float32":
        return _float32(req, ctx, plan.stream, plan.candidates)
    if plan.path == "int8-screen":
        assert plan.codes is not None
        top, ok = certified_int8_top_k(req, ctx, plan.codes)
        if not ok.all():  # queries the codes cannot certify: the float32 stream
            rest = np.flatnonzero(~ok)
            sub = req.subset(rest)
            again = _float32(sub, ctx, plan_stream(sub, ctx, plan.candidates) or plan.stream,
                             plan.candidates)
            top.scores[rest], top.positions[rest] = again.scores, again.positions
        return top
    assert plan.screen is not None
    top, ok = screened_top_k(req, ctx, plan.screen)
    if not ok.all():  # the planner's fallback: the float32 stream on its backend
        rest = np.flatnonzero(~ok)
        sub = req.subset(rest)
        fb_ctx = _fallback_ctx(ctx)
        sizes = plan_stream(sub, fb_ctx, plan.candidates or req.kk) or plan.stream
        again = _float32(sub, fb_ctx, sizes, plan.candidates)
        top.scores[rest], top.positions[rest] = again.scores, again.positions
    return top


def _float32(req: SearchRequest, ctx: SearchContext, sizes: StreamSizes, candidates: int) -> TopK:
    """The float32 stream's top ``candidates`` re-ranked in float64 (0: its top ``k`` as it is)."""
    if not candidates:
        return run_stream(req, ctx, sizes)
    cand = run_stream(req, ctx, sizes, candidates).positions
    return rerank(req, ctx, cand, req.kk)
