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
:class:`~embtools.backends.abilities.SupportsScaledScores` (NumPy) are scored straight from the source's arrays with no thread and no copy: for
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
"""

from __future__ import annotations

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
from embtools.backends.frameworks import is_foreign_array, to_numpy
from embtools.errors import (
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    MemoryLimitError,
)
from embtools.kernels.numpy_tiles import QUERY_THREADS as TILE_THREADS
from embtools.kernels.numpy_tiles import inverse_norms, tile_bytes, tile_cols
from embtools.memory import MemoryBudget
from embtools.storage.memory_source import ArraySource
from embtools.storage.source import VectorSource

__all__ = [
    "METRICS",
    "ArraySource",
    "SearchPlan",
    "VectorSource",
    "check_k",
    "check_metric",
    "normalize_rows",
    "plan_search",
    "prepare_queries",
    "stream_top_k",
]

METRICS = ("cosine", "dot", "l2")

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


# ---------------------------------------------------------------------------------- validation
def check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int; InvalidArgumentError unless it is a positive integer (bools refused)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {k!r}")
    if int(k) <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {int(k)}")
    return int(k)


def check_metric(metric: Any) -> str:
    """The metric name; InvalidArgumentError unless it is cosine, dot or l2."""
    if not isinstance(metric, str) or metric.lower() not in METRICS:
        raise InvalidArgumentError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric.lower()


def prepare_queries(queries: Any, dim: int | None = None) -> tuple[np.ndarray, bool]:
    """Any backend's query array as C-contiguous float32 NumPy ``(n, d)``, and whether it was 1-D.

    Raises InvalidEmbeddingsError for empty, non-numeric, NaN or inf queries, and
    DimensionMismatchError when ``dim`` is given and the queries have another dimension.

    Examples
    --------
    >>> q, one = prepare_queries([1.0, 2.0])
    >>> q.shape, one
    ((1, 2), True)
    """
    from embtools.storage.ingest import reject_sparse

    reject_sparse(queries, "queries")
    if isinstance(queries, np.ndarray):
        arr = queries
    elif is_foreign_array(queries):
        arr = np.asarray(to_numpy(queries))
    else:
        try:
            arr = np.asarray(queries)
        except ValueError as err:
            raise InvalidEmbeddingsError(f"queries are not a regular array: {err}") from None
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidEmbeddingsError(f"queries must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise InvalidEmbeddingsError(f"queries must be 1-D or 2-D, got shape {arr.shape}")
    one = arr.ndim == 1
    q = np.ascontiguousarray(arr.reshape(1, -1) if one else arr, dtype=np.float32)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise InvalidEmbeddingsError(f"queries are empty (shape {arr.shape})")
    if not np.isfinite(q).all():
        raise InvalidEmbeddingsError("queries contain NaN or inf values")
    if dim is not None and q.shape[1] != dim:
        raise DimensionMismatchError(
            f"queries have dimension {q.shape[1]} but the search uses dimension {dim}; "
            f"pass dimension={q.shape[1]} or slice the queries (Q[:, :{dim}])"
        )
    return q, one


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """A new float32 array with the rows of ``x`` L2-normalised (zero rows stay zero; tiny rows
    are rescaled first): the NumPy backend's normalize."""
    from embtools.backends import get_backend

    return get_backend("numpy").normalize(np.asarray(x, dtype=np.float32))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class SearchPlan:
    """How a search is cut up: query groups (one corpus pass each), query chunks per matmul,
    corpus rows per batch, whether a reader thread prefetches, and the bytes held."""

    group: int
    chunk: int
    rows: int
    prefetch: bool
    nbytes: int


def plan_search(
    budget: MemoryBudget,
    nq: int,
    dim: int,
    k: int,
    n_rows: int,
    metric: str,
    batch_rows: int | None = None,
    scaled: bool = False,
    extra_bytes: int = 0,
    tiled: bool = False,
) -> SearchPlan:
    """Size the batches of a search of ``nq`` queries over ``n_rows`` rows of ``dim`` floats.

    ``scaled``: cosine on unnormalised blocks with per-row inverse norms (no prepared copy, no
    reader thread). ``extra_bytes`` (e.g. cached norms read by the search) count in ``nbytes``.
    ``tiled``: the backend scores a block tile by tile (the NumPy kernel), so its score
    workspace is a fixed few tiles rather than a score per (query, row) of the batch, and
    batches may be larger (fewer merges into the running top-k).

    Examples
    --------
    >>> p = plan_search(MemoryBudget(0.001), nq=10, dim=64, k=5, n_rows=100_000, metric="cosine")
    >>> p.rows * (3 * 64 * 4 + 10 * 12) + p.nbytes - p.rows * (3 * 64 * 4 + 10 * 12) <= 0.001 * 1024**3
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

    n_rows = max(n_rows, 1)
    avail = budget.available_bytes
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
        while rows < want and chunk > 1:
            chunk = (chunk + 1) // 2
            rows = fit(avail - fixed(group), chunk)
        if rows < 1:
            budget.check(
                fixed(group) + per_row(chunk) + tile_row(chunk),
                f"a search of {dim}-dimensional vectors",
                "raise max_memory_gb",
            )
            raise MemoryLimitError("the memory cap is too small for one batch of one row")
    if batch_rows is not None:
        rows = min(rows, check_k(batch_rows, "batch_rows"))
    rows = int(min(rows, n_rows))
    nbytes = fixed(group) + rows * per_row(chunk) + min(rows, cols_of(chunk)) * tile_row(chunk)
    return SearchPlan(group, chunk, rows, prefetch, nbytes)


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
    plan: SearchPlan,
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
    uploader = backend.async_uploader() if isinstance(backend, SupportsAsyncUpload) else None

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
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str = "cosine",
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` (validated float32 ``(nq, dim)``) over the source's rows.

    ``positions`` (ascending int64) restricts the search to those rows. Returns NumPy
    ``(scores float32 (nq, kk), positions int64 (nq, kk))`` with ``kk = min(k, rows searched)``,
    best first (l2: smallest distance first), ties by lower position.
    """
    metric = check_metric(metric)
    k = check_k(k)
    nq = int(queries.shape[0])
    n_sel = source.num_rows if positions is None else len(positions)
    kk = min(k, n_sel)
    if kk == 0 or nq == 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    scaled = (
        metric == "cosine"
        and nq < PREFETCH_MIN_QUERIES
        and isinstance(backend, SupportsScaledScores)
    )
    norms = _RowNorms.for_search(source, dim, budget, positions is None) if scaled else None
    extra = 0 if norms is None else norms.nbytes
    tiled = isinstance(backend, SupportsRunningTopK)
    plan = plan_search(budget, nq, dim, kk, n_sel, metric, batch_rows, scaled, extra, tiled)
    key = f"search/{id(queries)}"
    out_s: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    with budget.holding(key, plan.nbytes, "the search workspace", "raise max_memory_gb"):
        for g in range(0, nq, plan.group):
            s, i = _one_pass(
                source, backend, queries[g : g + plan.group], dim, kk, metric, positions, plan, norms
            )
            out_s.append(s)
            out_i.append(i)
    scores = np.concatenate(out_s, axis=0)
    ordinals = np.concatenate(out_i, axis=0)
    found = ordinals if positions is None else np.asarray(positions, dtype=np.int64)[ordinals]
    return scores, found


def _one_pass(
    source: VectorSource,
    backend: Any,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    positions: np.ndarray | None,
    plan: SearchPlan,
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
    running = backend if isinstance(backend, SupportsRunningTopK) else None
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

    @classmethod
    def for_search(cls, source: Any, dim: int, budget: MemoryBudget, full: bool) -> _RowNorms:
        """The norms for a search of ``source`` at ``dim``; ``full``: it reads every row."""
        frozen = bool(getattr(source, "frozen", False))
        cached = None
        if frozen:
            with _NORM_LOCK:
                cached = _NORM_CACHE.get(source, {}).get(dim)
        avail = budget.available_bytes
        fits = avail is None or source.num_rows * 4 * _NORM_CAP_FRACTION <= avail
        return cls(source, dim, cached, frozen and fits and full)

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
