"""The vector-source contract (:class:`VectorSource`) and its shared read logic.

A :class:`VectorSource` is what search reads: rows at positions ``0..num_rows-1``, their vectors
in each stored dimension (and its prefixes) in ascending position order, their metadata. The
implementations, all checked by ``tests/test_sources.py``: the
:class:`~embtools.storage.snapshot.Snapshot` (a committed version on disk), the
:class:`~embtools.storage.memory_source.MemorySource` (the in-memory store) and the
:class:`~embtools.storage.memory_source.ArraySource` (one bare array).

They are sequences of *chunks* (a data file's row group, or an in-memory array) in ascending
position order: :class:`ChunkedSource` implements ``select``, ``iter_vectors`` and the dimension
rules once, and :func:`gather_rows` copies selected rows into one array.

Examples
--------
>>> import polars as pl
>>> compile_where("year > 2020") is not None, compile_where(pl.col("x") == 1) is not None
(True, True)
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import polars as pl

from embtools.errors import (
    CorruptStoreError,
    DimensionMismatchError,
    FilterError,
    InvalidArgumentError,
)
from embtools.memory import MemoryBudget
from embtools.storage.predicate import describe, to_expression

__all__ = [
    "Chunk",
    "ChunkedSource",
    "VectorSource",
    "compile_where",
    "gather_rows",
    "resolve_dimension",
]

_POS = "__embtools_pos"
MAX_DEFAULT_BATCH_ROWS = 262_144
#: Batches above this many bytes end at their chunk's end (a view) rather than copy a contiguous
#: run together with the next chunk's rows; smaller ones keep exactly ``batch_rows`` rows.
VIEW_BATCH_BYTES = 4 * 1024**2
#: Rows copied into a batch per step (then released) are about this many bytes of mapped pages
#: (less under a small memory cap: see :func:`gather_span_bytes`).
GATHER_STEP_BYTES = 8 * 1024**2
#: A read fault on a mapped file maps the cached pages around it too (Linux "fault-around", 64 KiB
#: by default): releases reach this far (twice over) below the rows just read, so those pages go too.
FAULT_AROUND_BYTES = 64 * 1024
#: At most this many rows are gathered by one fancy index per chunk (:meth:`ChunkedSource.take_rows`)
TAKE_ROWS = 4096


@runtime_checkable
class VectorSource(Protocol):
    """What search reads (see docs/internals.md): the rows of one immutable version.

    ``iter_vectors(dim, positions, batch_rows, views=)`` yields ``(positions, (n, dim) float32)``
    batches in ascending position order, for a stored dimension or a prefix of one (the smallest
    stored dimension above it); ``positions`` (any order, repeats ignored) selects rows. Batches
    may be read-only views, valid until the consumer lets go of them. ``frozen``: the rows never
    change, so derived data (row norms) may be cached per source object.
    """

    num_rows: int
    dimensions: list[int]
    frozen: bool

    def select(self, where: Any) -> np.ndarray:
        """int64 positions of the rows matching ``where`` (all for None), ascending."""

    def iter_vectors(
        self,
        dim: int,
        positions: np.ndarray | None = None,
        batch_rows: int | None = None,
        *,
        views: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, vectors)`` batches in ascending position order."""

    def take_metadata(self, positions: Any, columns: Sequence[str] | None = None) -> pl.DataFrame:
        """row_id, text_id, label (+ ``columns``) of ``positions``, in the order given."""


def gather_rows(source: VectorSource, dim: int, positions: Any = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """The vectors of ``positions`` (ascending and distinct; all rows for None) as one
    ``(n, dim)`` float32 array, filled batch by batch (into ``out`` when given).

    Examples
    --------
    >>> from embtools.storage.memory_source import ArraySource
    >>> gather_rows(ArraySource(np.arange(8, dtype=np.float32).reshape(4, 2)), 1, [1, 3]).tolist()
    [[2.0], [6.0]]
    """
    n = int(source.num_rows) if positions is None else len(positions)
    if out is None:
        out = np.empty((n, int(dim)), dtype=np.float32)
    if positions is not None and isinstance(source, ChunkedSource) and source.takes(n):
        source.take_rows(dim, positions, out)
        return out
    filled = 0
    for pos, block in source.iter_vectors(dim, positions, batch_rows=max(min(n, 65_536), 1)):
        out[filled:filled + len(pos)] = block
        filled += len(pos)
    if filled != n:
        raise InvalidArgumentError(
            f"the source yielded {filled} of {n} rows: positions must be ascending and distinct")
    return out


def compile_where(where: Any, columns: Sequence[str] | None = None) -> pl.Expr:
    """A polars expression or a SQL predicate string as a polars expression over ``columns``
    (see :func:`embtools.storage.predicate.to_expression`; FilterError otherwise)."""
    if where is None:
        raise FilterError("where is None here; pass a polars expression or a SQL predicate string")
    expr = to_expression(where, columns)
    assert expr is not None
    return expr


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_dimension(dim: Any, stored: Sequence[int]) -> int:
    """The stored dimension that serves ``dim``: itself, or the smallest stored one above it."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dimension must be an int >= 1, got {dim!r}")
    dim = int(dim)
    if dim in stored:
        return dim
    above = [d for d in stored if d > dim]
    if not above:
        raise DimensionMismatchError(
            f"dimension {dim} is not stored and is not a prefix of a stored one; "
            f"stored dimensions: {sorted(stored)}")
    return min(above)


@dataclass
class Chunk:
    """Rows ``start:start+rows`` of a source; ``load(stored_dim)`` gives their (rows, d) float32."""

    start: int
    rows: int
    load: Callable[[int], np.ndarray]
    release: Callable[[int], None]
    #: ``release_rows(stored_dim, start, stop)``: give back the memory of rows ``start:stop`` of
    #: the chunk (their pages may fault in again if read); None when there is nothing to give back
    release_rows: Callable[[int, int, int], None] | None = None
    #: ``populate(stored_dim, start, stop)``: map the pages of rows ``start:stop`` before they are
    #: handed out as a view (one call, not a fault per page); None when there are none to map
    populate: Callable[[int, int, int], None] | None = None


class ChunkedSource:
    """Base class of the VectorSources; subclasses set ``num_rows``, ``dimensions`` and implement
    :meth:`metadata`, :meth:`chunks` and :meth:`take_metadata`."""

    num_rows: int
    dimensions: list[int]
    budget: MemoryBudget | None = None
    #: see :class:`VectorSource`; the store's sources are immutable versions
    frozen: bool = True

    def metadata(self) -> pl.LazyFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def chunks(self) -> list[Chunk]:  # pragma: no cover - abstract
        raise NotImplementedError

    def take_metadata(self, positions: Any, columns: Sequence[str] | None = None) -> pl.DataFrame:
        raise NotImplementedError  # pragma: no cover - abstract

    def read_error(self, exc: BaseException) -> Exception | None:
        """The error to raise instead of ``exc`` from a failed metadata scan (None: a FilterError)."""
        return None

    def check_files(self) -> None:
        """Raise CorruptStoreError unless every file behind ``num_rows`` is there and agrees with it
        (a no-op for a source without files); call before allocating ``num_rows`` rows."""

    # -- shared ----------------------------------------------------------------------------------
    def select(self, where: Any) -> np.ndarray:
        """int64 positions of the rows matching ``where`` (all rows for None), ascending."""
        if where is None:
            return np.arange(self.num_rows, dtype=np.int64)
        frame = self.metadata()  # checks the files (CorruptStoreError) before polars reads them
        expr = compile_where(where, frame.collect_schema().names())
        try:
            out = frame.with_row_index(_POS).filter(expr).select(_POS).collect()
        except pl.exceptions.PanicException as exc:  # a BaseException: damaged bytes polars trips on
            raise self.read_error(exc) or CorruptStoreError(
                f"cannot read the store's metadata ({one_line(exc)})") from None
        except Exception as exc:  # polars: InvalidOperationError (a type mismatch), ...
            raise self.read_error(exc) or FilterError(
                f"cannot apply where={describe(where)}: {one_line(exc)}") from None
        return out.get_column(_POS).to_numpy().astype(np.int64, copy=False)

    def resolve(self, dim: int) -> int:
        """The stored dimension that serves ``dim`` (see :func:`resolve_dimension`)."""
        return resolve_dimension(dim, self.dimensions)

    def default_batch_rows(self, dim: int) -> int:
        """Rows per batch from the memory budget (capped at 262,144)."""
        if self.budget is None:
            return 65_536
        return min(self.budget.rows_per_batch(dim * 4), MAX_DEFAULT_BATCH_ROWS)

    def mapped_view(self, dim: int, positions: Any = None) -> np.ndarray | None:
        """The rows at ``positions`` (ascending and distinct; None: all) as one read-only view of
        a mapped data file when they are one contiguous run of one aligned chunk; else None (and
        for sources without mapped files). The caller counts the view against the memory cap."""
        return None

    def takes(self, n: int) -> bool:
        """Whether :meth:`take_rows` may gather ``n`` rows at once: any number without a memory
        cap (the mapped pages may stay); under a cap a few rows (a re-rank's candidates), only
        as many as the pages one gather step may touch (each row can map a fault-around window
        of pages until its chunk is released)."""
        if n <= 0:
            return False
        if self.budget is None or self.budget.cap_bytes is None:
            return True  # no cap: the mapped pages may stay
        return n <= TAKE_ROWS and n * 2 * FAULT_AROUND_BYTES <= gather_span_bytes(self.budget)

    def take_rows(self, dim: int, positions: Any, out: np.ndarray) -> None:
        """Copy the rows at ``positions`` (ascending and distinct) into ``out`` (``(n, dim)``
        float32) straight from their chunks: one fancy index per chunk touched, no batches
        (the re-rank of a search's candidates). Each chunk is released once read."""
        pos = self._check_positions(positions)
        if len(pos) != len(out):
            raise InvalidArgumentError(
                f"the source yielded {len(pos)} of {len(out)} rows: positions must be ascending "
                "and distinct")
        stored = self.resolve(dim)
        dim = int(dim)
        if not len(pos):
            return
        chunks = self.chunks()
        starts = self._starts_of(chunks)
        ci = np.searchsorted(starts, pos, side="right") - 1
        cuts = [0, *(np.flatnonzero(ci[1:] != ci[:-1]) + 1).tolist(), len(pos)]  # runs of one chunk
        for a, b in itertools.pairwise(cuts):
            chunk = chunks[int(ci[a])]
            arr = chunk.load(stored)
            local = pos[a:b] - chunk.start
            if dim != stored:
                out[a:b] = arr[local, :dim]
            else:
                np.take(arr, local, axis=0, out=out[a:b])
            del arr
            chunk.release(stored)

    def _starts_of(self, chunks: list[Chunk]) -> np.ndarray:
        """First position of each chunk (kept while ``chunks()`` returns the same list)."""
        got = self.__dict__.get("_chunk_starts")
        if got is None or got[0] is not chunks:
            got = (chunks, np.array([c.start for c in chunks], dtype=np.int64))
            self.__dict__["_chunk_starts"] = got
        starts: np.ndarray = got[1]
        return starts

    def iter_vectors(self, dim: int, positions: Any = None, batch_rows: int | None = None,
                     *, views: bool | str = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, (n, dim) float32)`` batches in ascending position order.

        A batch that lies in one chunk as a contiguous run is a (read-only) view; otherwise it is a
        fresh array. Batches hold ``batch_rows`` rows except the last, and except that a batch of
        more than ``VIEW_BATCH_BYTES`` never copies a contiguous run: it ends at its chunk's end
        (a view), a long run inside a selection comes as its own view, and rows gathered from a
        selection come in batches of ``batch_rows // 2`` rows. ``views``: smaller
        batches do the same for a run of at least a quarter batch that ends at a chunk's end;
        ``views="always"``: every contiguous run ending at a chunk's end comes as a view, however
        short (a scan of all rows is then views only: ``iter_batches``).

        Memory: the mapped pages of a view are given back when the next batch is asked for (the
        array stays valid; read again, it faults its pages back in), rows copied into a batch as
        soon as they are copied, and each chunk once all its rows have been handed out. So the
        reader holds about one batch, whatever the store size.
        """
        stored = self.resolve(dim)
        dim = int(dim)
        if batch_rows is None:
            batch_rows = self.default_batch_rows(dim)
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
            raise InvalidArgumentError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        batch_rows = int(batch_rows)
        if views not in (True, False, "always"):
            raise InvalidArgumentError(f"views must be True, False or 'always', got {views!r}")
        pos = None if positions is None else self._check_positions(positions)
        return self._iter(stored, dim, pos, batch_rows, views)

    def _check_positions(self, positions: Any) -> np.ndarray:
        pos = np.asarray(positions)
        if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
            raise InvalidArgumentError("positions must be a 1-D array of integers")
        pos = pos.astype(np.int64, copy=False)
        if pos.size:
            if pos.min() < 0 or pos.max() >= self.num_rows:
                raise InvalidArgumentError(f"positions out of range 0..{self.num_rows - 1}")
            if (np.diff(pos) <= 0).any():
                pos = np.unique(pos)
        return pos

    def _iter(self, stored: int, dim: int, pos: np.ndarray | None, batch_rows: int,
              views: bool | str = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Memory: a view's mapped pages are given back (release_rows) when the consumer asks for
        # the next batch, and rows copied into a batch buffer right after the copy (in steps, so
        # that a sparse selection does not fault in a whole chunk first). Above VIEW_BATCH_BYTES a
        # contiguous run is never copied together with the next chunk's rows (that would hold a
        # full-size copy besides the view the consumer still has): the batch ends at the chunk.
        big = batch_rows * dim * 4 > VIEW_BATCH_BYTES
        if views == "always":
            min_view = 1
        elif big:
            min_view = min(-(-batch_rows // 4), max(1, VIEW_BATCH_BYTES // (dim * 4)))
        else:
            min_view = -(-batch_rows // 4) if views else batch_rows
        step = max(1, GATHER_STEP_BYTES // max(stored * 4, mmap.PAGESIZE))
        # rows of a selection copied per step span at most this many rows of the chunk, so the
        # pages faulted in (with their fault-around neighbours) stay within a fraction of the cap
        span = max(1, gather_span_bytes(self.budget) // (stored * 4))
        margin = -(-2 * FAULT_AROUND_BYTES // (stored * 4))
        # A copied batch stays alive in the consumer's hands while the next one is filled (and
        # cannot be given back like a view's pages): above VIEW_BATCH_BYTES it holds half a batch.
        copy_rows = max(1, batch_rows // 2) if big else batch_rows
        buf: np.ndarray | None = None
        buf_pos: np.ndarray | None = None
        fill = 0
        chunks = self.chunks()
        for ci, chunk in enumerate(chunks):
            if pos is None:
                local = np.arange(chunk.rows, dtype=np.int64)
            else:
                lo, hi = np.searchsorted(pos, [chunk.start, chunk.start + chunk.rows])
                local = pos[lo:hi] - chunk.start
            if local.size == 0:
                continue
            arr = chunk.load(stored)
            last_chunk = (pos is None and ci == len(chunks) - 1) or (
                pos is not None and int(pos[-1]) < chunk.start + chunk.rows)
            release_rows = chunk.release_rows or _no_release
            i = 0
            while i < local.size:
                n = min(batch_rows, local.size - i)
                run = _leading_run(local[i:i + n])
                if run == n and fill == 0 and (
                        n == batch_rows or n >= min_view or (last_chunk and i + n == local.size)):
                    view_rows = n
                elif big and run >= min_view:
                    view_rows = run
                    if fill:  # keep position order: hand out the rows copied so far first
                        assert buf is not None and buf_pos is not None
                        yield buf_pos[:fill], buf[:fill]
                        buf, buf_pos, fill = None, None, 0
                else:
                    view_rows = 0
                if view_rows:
                    a = int(local[i])
                    b = a + view_rows
                    if chunk.populate is not None:
                        chunk.populate(stored, a, b)
                    yield local[i:i + view_rows] + chunk.start, (arr[a:b, :dim] if dim != stored else arr[a:b])
                    release_rows(stored, max(0, a - margin), b)
                    i += view_rows
                    continue
                take = min(copy_rows - fill, local.size - i)
                if buf is None:
                    buf = np.empty((copy_rows, dim), dtype=np.float32)
                    buf_pos = np.empty(copy_rows, dtype=np.int64)
                assert buf_pos is not None
                s = 0
                while s < take:
                    sel = local[i + s:i + min(s + step, take)]
                    sel = sel[:max(1, int(np.searchsorted(sel, sel[0] + span)))]
                    a, b = int(sel[0]), int(sel[-1]) + 1
                    out = buf[fill + s:fill + s + sel.size]
                    out[:] = arr[a:b, :dim] if b - a == sel.size else arr[sel, :dim]
                    release_rows(stored, max(0, a - margin), b)
                    s += sel.size
                buf_pos[fill:fill + take] = local[i:i + take] + chunk.start
                fill += take
                i += take
                if fill == copy_rows:
                    yield buf_pos, buf
                    buf, buf_pos, fill = None, None, 0
            del arr
            chunk.release(stored)
        if fill:
            assert buf is not None and buf_pos is not None
            yield buf_pos[:fill], buf[:fill]


def gather_span_bytes(budget: MemoryBudget | None) -> int:
    """Bytes of a chunk one gather step may touch: GATHER_STEP_BYTES, or an eighth of the memory
    cap when that is less (at least 256 KiB)."""
    if budget is None or budget.cap_bytes is None:
        return GATHER_STEP_BYTES
    return max(256 * 1024, min(GATHER_STEP_BYTES, budget.cap_bytes // 8))


def _no_release(dim: int, start: int, stop: int) -> None:
    """``Chunk.release_rows`` of a chunk that holds no mapped pages."""


def _leading_run(sel: np.ndarray) -> int:
    """How many of the ascending, distinct ``sel`` (non-empty) are consecutive from the first."""
    if int(sel[-1]) - int(sel[0]) == sel.size - 1:
        return int(sel.size)
    return int(np.flatnonzero(np.diff(sel) != 1)[0]) + 1
