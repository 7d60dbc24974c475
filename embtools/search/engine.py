"""The exact streaming top-k engine: every query against every selected corpus row, under the cap.

The corpus is read from a :class:`VectorSource` in ascending position order, in batches sized from
the :class:`~embtools.memory.MemoryBudget` (the batch, its prepared copy, the batch being prefetched,
the score matrix and the top-k buffers all count against the cap). Each batch is scored on the
backend with :meth:`Backend.block_top_k` and merged into a running top-k per query with
:meth:`Backend.merge_top_k` on the device. Block-local indices are offset by the number of rows
already streamed (an *ordinal* into the selection), so ties go to the lower ordinal, which is the
lower position and the lower ``row_id``.

A reader thread prepares the next batch (reads it from the memory map, normalises it for cosine or
copies it, and on a backend that :class:`~embtools.backends.abilities.SupportsAsyncUpload`
(CUDA) starts its host-to-device copy) while the device scores the current one.

Few queries (fewer than ``PREFETCH_MIN_QUERIES``) on a backend that
:class:`~embtools.backends.abilities.SupportsScaledScores` (NumPy) are scored straight from the
source's arrays with no thread and no copy: for
cosine the block stays unnormalised and each row's score is multiplied by its inverse norm. The
inverse norms of an immutable source (``source.frozen``: a committed snapshot, an in-memory
store's version) are computed during the first full pass and kept per ``(source, dimension)``,
4 bytes a row, so a single query costs one pass over the vectors, like a flat index.

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> from embtools.search.engine import stream_top_k
>>> from embtools.storage.memory_source import ArraySource
>>> corpus = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
>>> scores, pos = stream_top_k(ArraySource(corpus), get_backend("numpy"), MemoryBudget(None),
...                            np.array([[1, 0.1]], dtype=np.float32), 2, k=2, metric="dot")
>>> pos.tolist(), scores.astype(float).round(2).tolist()
([[2, 0]], [[1.1, 1.0]])

Inside the search layer the stream is sized by :func:`plan_stream` (called by the planner,
:mod:`embtools.search.plan`) and run by :func:`run_stream` on a request and a context.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.backends.abilities import (
    SupportsAsyncUpload,
    SupportsRunningTopK,
    SupportsScaledScores,
)
from embtools.kernels.numpy_tiles import QUERY_THREADS as TILE_THREADS
from embtools.kernels.numpy_tiles import inverse_norms, tile_bytes, tile_cols
from embtools.memory import MemoryBudget
from embtools.search.request import SearchContext, SearchRequest, TopK, cap_error
from embtools.storage.memory_source import ArraySource
from embtools.storage.source import VectorSource

__all__ = [
    "ArraySource",
    "StreamSizes",
    "VectorSource",
    "has_ability",
    "normalize_rows",
    "plan_stream",
    "run_stream",
    "size_stream",
    "stream_top_k",
]

#: Without a memory cap, aim for batches whose workspace is about this many bytes.
DEFAULT_WORKSPACE_BYTES = 256 * 1024**2
#: Largest number of queries scored against one batch in one matmul.
MAX_QUERY_CHUNK = 2048
#: Smallest batch worth streaming before query chunks are made smaller.
MIN_BATCH_ROWS = 1024
#: From this many queries on, dot/l2 batches are prefetched (copied) by a reader thread.
PREFETCH_MIN_QUERIES = 16
#: Largest batch without a cap when the backend scores tile by tile (NumPy).
MAX_TILED_BATCH_ROWS = 262_144


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """A new float32 array with the rows of ``x`` L2-normalised (zero rows stay zero; tiny rows
    are rescaled first): the NumPy backend's normalize."""
    from embtools.backends import get_backend

    return get_backend("numpy").normalize(np.asarray(x, dtype=np.float32))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class StreamSizes:
    """How a float32 stream is cut up: query groups (one corpus pass each), query chunks per
    matmul, corpus rows per batch, whether a reader thread prefetches, the bytes held, whether
    cosine is scored on unnormalised blocks with inverse norms (``scaled``; ``norms``: ``cached``,
    ``fill`` a new cache during the pass, or ``batch``: computed per batch), whether the backend
    keeps a running top-k tile by tile (``tiled``), and the fewest bytes any sizing needs."""

    group: int
    chunk: int
    rows: int
    prefetch: bool
    nbytes: int
    scaled: bool = False
    norms: str = "batch"
    tiled: bool = False
    min_bytes: int = 0


@functools.lru_cache(maxsize=512)  # a pure function of its arguments: planned once per shape
def size_stream(
    avail: int | None,
    nq: int,
    dim: int,
    k: int,
    n_rows: int,
    metric: str,
    batch_rows: int | None = None,
    scaled: bool = False,
    extra_bytes: int = 0,
    tiled: bool = False,
) -> StreamSizes | None:
    """Size a stream of ``nq`` queries over ``n_rows`` rows of ``dim`` floats in ``avail`` bytes
    (None: no cap); None when not even one query against one row fits.

    ``scaled``: cosine on unnormalised blocks with per-row inverse norms (no prepared copy, no
    reader thread). ``extra_bytes`` (e.g. cached norms read by the search) count in ``nbytes``.
    ``tiled``: the backend scores a block tile by tile (the NumPy kernel), so its score
    workspace is a fixed few tiles rather than a score per (query, row) of the batch, and
    batches may be larger (fewer merges into the running top-k).

    Examples
    --------
    >>> s = size_stream(2**20, nq=10, dim=64, k=5, n_rows=100_000, metric="cosine")
    >>> s.nbytes <= 2**20, s.min_bytes <= s.nbytes, s.rows
    (True, True, 1173)
    >>> size_stream(s.min_bytes - 1, nq=10, dim=64, k=5, n_rows=100_000, metric="cosine") is None
    True
    """
    prefetch = (metric == "cosine" and not scaled) or nq >= PREFETCH_MIN_QUERIES
    copies = 3 if prefetch else 2  # the batch, its prepared copy, the next batch

    def fixed(group: int) -> int:
        # queries (+normalised) and top-k buffers
        return group * dim * 4 * 2 + group * k * 12 * 3 + extra_bytes

    def per_row(chunk: int) -> int:
        # + scores (float32) and selection workspace (+ the inverse norms of the batch)
        scores = 8 if tiled else chunk * 12
        return dim * 4 * copies + scores + (4 if scaled else 0)

    # tiled: the kernel's tile buffers grow with the batch up to one tile of ``cols`` rows (the
    # widest tile: of the smallest share of the queries that a thread gets)
    def cols_of(chunk: int) -> int:
        return tile_cols(k, max(1, chunk // TILE_THREADS)) if tiled else 0

    def tile_row(chunk: int) -> int:
        if not tiled:
            return 0
        return tile_bytes(chunk, k, dim) // tile_cols(k, chunk)

    def fit(room: int, chunk: int) -> int:
        """Most rows whose bytes fit ``room``."""
        a, b, cols = per_row(chunk), tile_row(chunk), cols_of(chunk)
        if room >= cols * (a + b):
            return cols + (room - cols * (a + b)) // a
        return room // (a + b)

    least = fixed(1) + per_row(1) + tile_row(1)
    n_rows = max(n_rows, 1)
    group = nq
    if avail is not None:
        while group > 1 and fixed(group) > avail // 2:
            group = (group + 1) // 2
    chunk = min(group, MAX_QUERY_CHUNK)
    if avail is None:
        rows = DEFAULT_WORKSPACE_BYTES // per_row(chunk)
        rows = max(MIN_BATCH_ROWS, min(rows, MAX_TILED_BATCH_ROWS if tiled else 65_536))
    else:
        want = min(n_rows, MIN_BATCH_ROWS)
        rows = fit(avail - fixed(group), chunk)
        while rows < want and chunk > 1:  # smaller matmuls, while that buys larger batches
            half = fit(avail - fixed(group), (chunk + 1) // 2)
            if rows >= 1 and half < rows * 1.1:
                break
            chunk, rows = (chunk + 1) // 2, half
        if rows < 1:  # the smallest sizing: one query against one row at a time
            group = chunk = 1
            rows = fit(avail - fixed(1), 1)
            if rows < 1:
                return None
    if batch_rows is not None:
        rows = min(rows, batch_rows)
    rows = int(min(rows, n_rows))
    nbytes = fixed(group) + rows * per_row(chunk) + min(rows, cols_of(chunk)) * tile_row(chunk)
    return StreamSizes(group, chunk, rows, prefetch, nbytes, scaled, tiled=tiled, min_bytes=least)


#: ``isinstance(backend, ability)`` per (backend class, ability): a Protocol check walks the
#: Protocol's attributes on every call (tens of microseconds), and abilities are class methods
_ABILITIES: dict[tuple[type, type], bool] = {}


def has_ability(backend: Any, ability: type) -> bool:
    """``isinstance(backend, ability)`` for a runtime-checkable ability Protocol, cached per
    backend class.

    Examples
    --------
    >>> from embtools.backends import get_backend
    >>> has_ability(get_backend("numpy"), SupportsRunningTopK)
    True
    """
    key = (type(backend), ability)
    got = _ABILITIES.get(key)
    if got is None:
        got = _ABILITIES[key] = isinstance(backend, ability)
    return got


def _abilities(req: SearchRequest, ctx: SearchContext) -> tuple[bool, bool]:
    """(scaled, tiled): cosine of few queries scored on unnormalised blocks with inverse norms
    (backends that :class:`SupportsScaledScores`), and a running top-k kept tile by tile."""
    backend = ctx.backend
    scaled = (
        req.metric == "cosine"
        and req.nq < PREFETCH_MIN_QUERIES
        and has_ability(backend, SupportsScaledScores)
    )
    return scaled, has_ability(backend, SupportsRunningTopK)


def plan_stream(req: SearchRequest, ctx: SearchContext, k: int | None = None) -> StreamSizes | None:
    """Size the float32 stream of ``req`` (its top ``k``, default ``req.kk``) on ``ctx``'s backend
    under what the budget has left; None when not even the smallest sizing fits (its bytes:
    :func:`stream_min_bytes`)."""
    kk = min(req.kk if k is None else k, req.n_sel)
    scaled, tiled = _abilities(req, ctx)
    avail = ctx.budget.available_bytes
    norms = _RowNorms.kind(ctx.source, req.dim, avail, req.positions is None) if scaled else "batch"
    extra = ctx.source.num_rows * 4 if norms != "batch" else 0
    args = (req.nq, req.dim, kk, req.n_sel, req.metric, req.batch_rows, scaled)
    sizes = size_stream(avail, *args, extra, tiled)
    if sizes is None and extra:  # without the norm cache
        norms, sizes = "batch", size_stream(avail, *args, 0, tiled)
    return None if sizes is None else dataclasses.replace(sizes, norms=norms)


def stream_min_bytes(req: SearchRequest, ctx: SearchContext, k: int | None = None) -> int:
    """The fewest bytes the float32 stream of ``req`` needs (one query, one row at a time)."""
    kk = min(req.kk if k is None else k, req.n_sel)
    scaled, tiled = _abilities(req, ctx)
    sizes = size_stream(None, req.nq, req.dim, kk, req.n_sel, req.metric, None, scaled, 0, tiled)
    assert sizes is not None
    return sizes.min_bytes


# ---------------------------------------------------------------------------------- reading
def _split(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut batches longer than ``rows`` (views, no copies)."""
    for pos, vec in batches:
        if len(pos) <= rows:
            yield pos, vec
        else:
            for s in range(0, len(pos), rows):
                yield pos[s : s + rows], vec[s : s + rows]


_DONE = object()


def _prefetched(
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    prepare: Callable[[np.ndarray], Any],
) -> Iterator[tuple[np.ndarray, Any]]:
    """Run ``prepare`` (which must copy) on each batch in a reader thread, one batch ahead."""
    q: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        try:
            for pos, vec in batches:
                item = (np.array(pos, dtype=np.int64), prepare(vec))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=reader, name="embtools-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _batches(
    source: VectorSource,
    backend: Any,
    dim: int,
    positions: np.ndarray | None,
    plan: StreamSizes,
    metric: str,
    scaled: bool = False,
) -> Iterator[tuple[np.ndarray, Any]]:
    """(positions, backend block ready to score) in ascending position order; ``scaled`` blocks
    are left unnormalised for cosine (scored with inverse norms)."""
    # views: a batch ending at a row group's end comes short rather than copied with the next
    raw = _split(
        source.iter_vectors(dim, positions=positions, batch_rows=plan.rows, views=True), plan.rows
    )
    if not plan.prefetch:
        normalize = metric == "cosine" and not scaled
        for pos, vec in raw:
            block = backend.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
            yield pos, backend.normalize(block) if normalize else block
        return

    # on CUDA the reader thread also starts the batch's host-to-device copy
    uploader = backend.async_uploader() if has_ability(backend, SupportsAsyncUpload) else None

    def prepare(vec: np.ndarray) -> Any:
        x = normalize_rows(vec) if metric == "cosine" else np.array(vec, dtype=np.float32)
        return x if uploader is None else uploader.start(x)

    for pos, x in _prefetched(raw, prepare):
        yield pos, backend.from_numpy(x) if uploader is None else uploader.finish(x)


# ---------------------------------------------------------------------------------- the engine
def stream_top_k(
    source: VectorSource,
    backend: Any,
    budget: MemoryBudget,
    queries: Any,
    dim: int,
    k: int,
    metric: str = "cosine",
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 engine's top-k of ``queries`` (``(nq, dim)``) over the source's rows (those at
    ``positions``, ascending, when given), sized under ``budget``: NumPy ``(scores float32,
    positions int64)``, ``(nq, min(k, rows))``, best first (l2: smallest first), ties by lower
    position. Exact in float32; :func:`embtools.search.search_store` re-ranks in float64."""
    req = SearchRequest.build(
        source, queries, k, dimension=dim, metric=metric, positions=positions, batch_rows=batch_rows
    )
    ctx = SearchContext(source, backend, budget)
    sizes = plan_stream(req, ctx)
    if sizes is None:
        raise cap_error(budget, stream_min_bytes(req, ctx), f"a search of {dim}-dimensional vectors")
    top = run_stream(req, ctx, sizes)
    return top.scores, top.positions


def run_stream(req: SearchRequest, ctx: SearchContext, sizes: StreamSizes, k: int | None = None) -> TopK:
    """Run the float32 stream of ``req`` (its top ``k``, default ``req.kk``) as ``sizes`` says."""
    kk = min(req.kk if k is None else k, req.n_sel)
    nq = req.nq
    if kk == 0 or nq == 0:
        return TopK.empty(nq)
    norms = None
    if sizes.scaled:
        norms = _RowNorms.for_search(ctx.source, req.dim, sizes.norms)
    key = f"search/{id(req)}"
    out_s: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    with ctx.budget.holding(key, sizes.nbytes, "the search workspace", "raise max_memory_gb"):
        for g in range(0, nq, sizes.group):
            s, i = _one_pass(
                ctx.source, ctx.backend, req.queries[g : g + sizes.group], req.dim, kk, req.metric,
                req.positions, sizes, norms,
            )
            out_s.append(s)
            out_i.append(i)
    ordinals = np.concatenate(out_i, axis=0)
    return TopK(np.concatenate(out_s, axis=0), req.to_positions(ordinals))


def _one_pass(
    source: VectorSource,
    backend: Any,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    positions: np.ndarray | None,
    plan: StreamSizes,
    norms: _RowNorms | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the corpus for a group of queries; returns ordinals into the selection.

    ``norms`` (cosine on a backend that :class:`SupportsScaledScores`): score unnormalised
    blocks, each row multiplied by its inverse norm."""
    q = backend.from_numpy(queries)
    if metric == "cosine":
        q = backend.normalize(q)
    chunks = [(a, min(a + plan.chunk, len(queries))) for a in range(0, len(queries), plan.chunk)]
    best: list[tuple[Any, Any] | None] = [None] * len(chunks)
    qs = [q[a:b] for a, b in chunks]
    largest = metric != "l2"
    seen = 0
    scaled = norms is not None
    running = backend if has_ability(backend, SupportsRunningTopK) else None
    for pos, block in _batches(source, backend, dim, positions, plan, metric, scaled):
        n = len(pos)
        if n == 0:
            continue
        expected = seen if positions is None else int(positions[seen])
        if int(pos[0]) != expected:
            raise RuntimeError(
                f"the vector source yielded position {int(pos[0])} where {expected} was expected"
            )
        kb = min(k, n)
        scale = None
        if norms is not None:
            scale = norms.of_batch(pos, block)
            if scale is None:  # norms out of float32's safe range: normalise the block
                block = backend.normalize(block)
        for c, qc in enumerate(qs):
            prev = best[c]
            if running is not None and prev is not None:
                # the backend merges the block into the running top-k: later blocks only look
                # at rows that beat the k-th best so far
                best[c] = running.block_top_k_running(qc, block, k, metric, prev, seen, scale)
                continue
            if scale is not None:
                values, local = backend.block_top_k_scaled(qc, block, kb, metric, scale)
            else:
                values, local = backend.block_top_k(qc, block, kb, metric)
            glob = local + seen
            best[c] = (values, glob) if prev is None else backend.merge_top_k(
                *prev, values, glob, k, largest=largest
            )
        seen += n
    if seen != (source.num_rows if positions is None else len(positions)):
        raise RuntimeError(f"the vector source yielded {seen} rows, expected more")
    if norms is not None and positions is None:
        norms.pass_done()
    backend.synchronize()
    scores = np.concatenate([np.asarray(backend.to_numpy(b[0]), np.float32) for b in best if b], 0)
    idx = np.concatenate([np.asarray(backend.to_numpy(b[1]), np.int64) for b in best if b], 0)
    return scores, idx


# ---------------------------------------------------------------------------------- row norms
#: inverse norms kept per source: WeakKeyDictionary[source, {dim: float32 (num_rows,)}]
_NORM_CACHE: weakref.WeakKeyDictionary[Any, dict[int, np.ndarray]] = weakref.WeakKeyDictionary()
_NORM_LOCK = threading.Lock()
#: dimensions whose norms are kept per source (the most recently filled)
_NORM_DIMS = 4
#: a norm cache is built only when it takes at most this fraction of the memory cap left
_NORM_CAP_FRACTION = 16


class _RowNorms:
    """The inverse row norms of one search's ``(source, dim)``: cached ones, or computed batch by
    batch (and filled into a new cache during a full pass when the source is immutable)."""

    def __init__(self, source: Any, dim: int, cached: np.ndarray | None, fill: bool) -> None:
        self.source = source
        self.dim = dim
        self.cached = cached
        self.filling = None if cached is not None or not fill else np.empty(source.num_rows, np.float32)
        self.complete = True  # every batch so far had safe norms

    @staticmethod
    def kind(source: Any, dim: int, avail: int | None, full: bool) -> str:
        """``cached`` (kept norms of an immutable source), ``fill`` (a full pass over an immutable
        source whose norms fit a small share of the cap left: keep them) or ``batch``."""
        if not getattr(source, "frozen", False):
            return "batch"
        with _NORM_LOCK:
            if _NORM_CACHE.get(source, {}).get(dim) is not None:
                return "cached"
        fits = avail is None or source.num_rows * 4 * _NORM_CAP_FRACTION <= avail
        return "fill" if fits and full else "batch"

    @classmethod
    def for_search(cls, source: Any, dim: int, kind: str) -> _RowNorms:
        """The norms for a search of ``source`` at ``dim`` as the planner chose (:meth:`kind`)."""
        cached = None
        if kind == "cached":
            with _NORM_LOCK:
                cached = _NORM_CACHE.get(source, {}).get(dim)
        return cls(source, dim, cached, kind == "fill")

    @property
    def nbytes(self) -> int:
        """Bytes of norms this search holds (a cache read or filled)."""
        arr = self.cached if self.cached is not None else self.filling
        return 0 if arr is None else int(arr.nbytes)

    def of_batch(self, pos: np.ndarray, block: np.ndarray) -> np.ndarray | None:
        """Inverse norms of the batch's rows (positions ``pos``), or None (normalise instead)."""
        a, b = int(pos[0]), int(pos[-1]) + 1
        run = b - a == len(pos)
        if self.cached is not None:
            return self.cached[a:b] if run else self.cached[pos]
        inv = inverse_norms(block)
        if inv is None:
            self.complete = False
        elif self.filling is not None:
            if run:
                self.filling[a:b] = inv
            else:
                self.filling[pos] = inv
        return inv

    def pass_done(self) -> None:
        """After a full pass over every row: keep the filled norms for later searches."""
        if self.filling is None or not self.complete:
            return
        arr, self.filling = self.filling, None
        arr.setflags(write=False)
        with _NORM_LOCK:
            per_dim = _NORM_CACHE.setdefault(self.source, {})
            per_dim.pop(self.dim, None)
            per_dim[self.dim] = arr
            while len(per_dim) > _NORM_DIMS:
                per_dim.pop(next(iter(per_dim)))
        self.cached = arr
