"""Snapshot: one committed version of a store directory, the read side (a VectorSource).

A snapshot reads only the files its manifest lists. Positions 0..num_rows-1 follow the manifest's
file order (ascending row id); each file's row-group sizes come from the manifest, so a selection
opens only the row groups that hold selected rows. Embedding chunks are read with
:class:`~embtools.storage.datafile.MappedParquetFile` and released once consumed.

Examples
--------
>>> import tempfile, numpy as np, embtools as et
>>> store = et.EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> _ = store.add(np.eye(3, dtype=np.float32), text_ids=["a", "b", "c"])
>>> snap = store.source
>>> snap.select("text_id = 'b'").tolist()
[1]
>>> [(p.tolist(), x.shape) for p, x in snap.iter_vectors(2, batch_rows=2)]
[([0, 1], (2, 2)), ([2], (1, 2))]
>>> snap.take_metadata([2, 0])["text_id"].to_list()
['c', 'a']
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from embtools.errors import CorruptStoreError, InvalidArgumentError
from embtools.memory import MemoryBudget
from embtools.storage.datafile import EMBEDDING_COLUMN, MappedParquetFile
from embtools.storage.io import as_storage
from embtools.storage.manifest import Manifest, StoreRoot, missing_file_error
from embtools.storage.schema import LABEL, ROW_ID, TEXT_ID, emb_column, empty_table
from embtools.storage.small_frame import Column, small_frame
from embtools.storage.source import Chunk, ChunkedSource
from embtools.storage.verify import CheckedFile

__all__ = ["META_CACHE_BYTES", "BaseRows", "Snapshot", "metadata_frame"]

#: decoded metadata row groups kept per snapshot for take_metadata (search results)
META_CACHE_BYTES = 64 * 1024**2
_BASE = (ROW_ID, TEXT_ID, LABEL)


def _release_quietly(f: MappedParquetFile, column: str, rg: int, start: int, stop: int) -> None:
    """Give back the mapped pages of a collected view (nothing to do once the file is closed)."""
    with contextlib.suppress(Exception):
        f.release_rows(column, rg, start, stop)


def metadata_frame(table: pa.Table) -> pl.DataFrame:
    """A pyarrow table as a polars DataFrame."""
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)
    return out


#: the ``row_id, text_id, label`` values of a few rows: int64 row ids, the strings as lists
BaseValues = tuple[np.ndarray, list[str | None], list[str | None]]


def base_columns(values: BaseValues) -> list[Column]:
    """The :func:`small_frame` columns ``row_id, text_id, label`` of a few rows' values."""
    return [(ROW_ID, pl.Int64, values[0]), (TEXT_ID, pl.String, values[1]),
            (LABEL, pl.String, values[2])]


def base_frame(values: BaseValues) -> pl.DataFrame:
    """The ``row_id, text_id, label`` frame of a few rows' values."""
    return small_frame(base_columns(values))


#: at most this many positions are gathered element by element (:meth:`BaseRows.values`);
#: more go through pyarrow's ``take`` (one dispatch of ~20 us per row group, then per element
#: costs much less than the ~1 us of a Python-level gather)
FEW_ROWS = 128
#: Without a cap, gathers of at most this many embedding rows are copied row by row from the kept
#: views of the mapped chunks (more: the chunked path of :meth:`ChunkedSource.take_rows`).
FEW_TAKE_ROWS = 128


class _Strings:
    """Element access to a string (or large string) Arrow array through its buffers (offsets,
    bytes, validity bits as NumPy/memoryview), ~10x cheaper per element than a pyarrow scalar."""

    __slots__ = ("bits", "data", "nulls", "offsets", "valid")

    def __init__(self, arr: pa.Array) -> None:
        validity, offsets, data = arr.buffers()[:3]
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        n, start = len(arr), arr.offset
        self.offsets = np.frombuffer(offsets, dtype=width)[start:start + n + 1] if n else np.zeros(1, width)
        self.data = memoryview(data) if data is not None else memoryview(b"")
        self.bits = start
        self.nulls = arr.null_count > 0
        # the validity bits (None with nulls: every element is null)
        self.valid = (np.frombuffer(validity, dtype=np.uint8)
                      if self.nulls and arr.null_count < n else None)

    @staticmethod
    def of(arr: pa.Array) -> _Strings | None:
        """The view of ``arr``, or None when it is no plain (large) string array."""
        t = arr.type
        return _Strings(arr) if pa.types.is_string(t) or pa.types.is_large_string(t) else None

    def at(self, i: int) -> str | None:
        """Element ``i`` (None when null)."""
        if self.nulls:
            valid = self.valid
            b = i + self.bits
            if valid is None or not (int(valid[b >> 3]) >> (b & 7)) & 1:
                return None
        off = self.offsets
        try:
            return self.data[off[i]:off[i + 1]].tobytes().decode()
        except UnicodeDecodeError:  # bytes Arrow's reader did not check
            raise CorruptStoreError("a string column holds bytes that are not UTF-8") from None

    def gather(self, idx: np.ndarray) -> list[str | None]:
        """Elements ``idx`` (an int64 array in range), in order."""
        if self.nulls and self.valid is None:
            return [None] * len(idx)
        data, starts, stops = self.data, self.offsets[idx], self.offsets[1:][idx]
        nulls: list[int] = []
        if self.valid is not None:
            bits = idx + self.bits
            nulls = np.flatnonzero(((self.valid[bits >> 3] >> (bits & 7)) & 1) == 0).tolist()
            stops[nulls] = starts[nulls]  # a null's bytes are not read
        try:  # tobytes().decode(): half the time of str(view, "utf-8")
            out: list[str | None] = [data[a:b].tobytes().decode() for a, b in
                                     zip(starts.tolist(), stops.tolist(), strict=True)]
        except UnicodeDecodeError:  # bytes Arrow's reader did not check
            raise CorruptStoreError("a string column holds bytes that are not UTF-8") from None
        for j in nulls:
            out[j] = None
        return out


@dataclass(frozen=True)
class BaseRows:
    """The base columns (``row_id, text_id, label``) of some rows, decoded once, from which a
    search's hits are gathered on the calling thread: ``row_id`` as NumPy int64, the others as
    Arrow arrays of one chunk each (``take`` runs on this thread; ``pl.from_arrow`` of the hits'
    small table costs more than the whole search of a small store, and a polars gather runs in
    polars' thread pool, which on a busy machine makes it ten times slower on average). A few
    rows (a single search's hits, up to :data:`FEW_ROWS`) are gathered element by element from
    the string arrays' buffers, without a pyarrow dispatch per row group.

    Examples
    --------
    >>> rows = BaseRows.of(pa.table({"row_id": [7, 8], "text_id": ["a", "b"],
    ...                              "label": pa.nulls(2, pa.string())}))
    >>> rows.frame(np.array([1, 1, 0])).rows()
    [(8, 'b', None), (8, 'b', None), (7, 'a', None)]
    >>> ids, texts, labels = rows.values(np.array([1, 0]))
    >>> ids.tolist(), texts, labels
    ([8, 7], ['b', 'a'], [None, None])
    """

    row_id: np.ndarray
    text_id: pa.Array
    label: pa.Array
    # buffer views of text_id and label for element access (None: not plain strings; no copy)
    _views: list[_Strings | None] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, table: pa.Table) -> BaseRows:
        """The rows of a table of the three base columns (the store's types)."""
        rid = np.asarray(table.column(ROW_ID).to_numpy(), dtype=np.int64)
        return cls(rid, table.column(TEXT_ID).combine_chunks(), table.column(LABEL).combine_chunks())

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self.row_id.nbytes + self.text_id.nbytes + self.label.nbytes)

    def take(self, idx: np.ndarray) -> BaseRows:
        """The rows at ``idx`` (any order, repeats allowed)."""
        at = pa.array(idx, type=pa.int64())
        return BaseRows(self.row_id[idx], self.text_id.take(at), self.label.take(at))

    def slice(self, start: int, length: int) -> BaseRows:
        """Rows ``start .. start + length - 1`` (views, no copy)."""
        return BaseRows(self.row_id[start:start + length], self.text_id.slice(start, length),
                        self.label.slice(start, length))

    @staticmethod
    def concat(parts: Sequence[BaseRows]) -> BaseRows:
        """The rows of ``parts``, one after the other."""
        return BaseRows(np.concatenate([p.row_id for p in parts]),
                        pa.concat_arrays([p.text_id for p in parts]),
                        pa.concat_arrays([p.label for p in parts]))

    def frame(self, idx: np.ndarray | None = None) -> pl.DataFrame:
        """A polars frame ``row_id, text_id, label`` of the rows at ``idx`` (None: all)."""
        few = self.values(np.asarray(idx, np.int64)) if idx is not None and len(idx) <= FEW_ROWS else None
        if few is not None:
            return base_frame(few)
        rows = self if idx is None else self.take(idx)
        return pl.DataFrame([pl.Series(ROW_ID, rows.row_id), pl.Series(TEXT_ID, rows.text_id),
                             pl.Series(LABEL, rows.label)])

    def strings(self) -> tuple[_Strings, _Strings] | None:
        """The buffer views of ``text_id`` and ``label`` (made once), or None when either is not
        a plain string column (then only :meth:`take` gathers)."""
        views = self._views
        if not views:  # one assignment: threads that race here store equal views
            views[:] = (_Strings.of(self.text_id), _Strings.of(self.label))
        text, label = views
        return None if text is None or label is None else (text, label)

    def values(self, idx: np.ndarray) -> BaseValues | None:
        """The ``row_id, text_id, label`` values of the rows at ``idx`` (an int64 array in range),
        in order, gathered element by element; None when the strings are not plain."""
        views = self.strings()
        if views is None:
            return None
        return self.row_id[idx], views[0].gather(idx), views[1].gather(idx)

    @staticmethod
    def few_values(hits: Sequence[tuple[BaseRows, int]]) -> BaseValues:
        """The ``row_id, text_id, label`` values of ``(rows, i)`` pairs, row ``i`` of ``rows``
        each, in order, gathered element by element (every ``rows.strings()`` must be views)."""
        ids: list[int] = []
        texts: list[str | None] = []
        labels: list[str | None] = []
        for rows, i in hits:
            views = rows.strings()
            assert views is not None
            ids.append(int(rows.row_id[i]))
            texts.append(views[0].at(i))
            labels.append(views[1].at(i))
        return np.array(ids, np.int64), texts, labels


class Snapshot(ChunkedSource):
    """The committed version ``manifest`` of the store at ``root`` (a directory or a Storage;
    ``self.root`` is the local folder its data files are read from)."""

    def __init__(self, root: StoreRoot, manifest: Manifest,
                 budget: MemoryBudget | None = None) -> None:
        self.storage = as_storage(root)
        self.root = self.storage.local_root
        self.manifest = manifest
        self.budget = budget
        self.version = manifest.version
        self._num_rows = manifest.num_rows
        self._files_checked = False
        self.dimensions = sorted(manifest.dimensions)
        self.schema = manifest.schema
        self.quantized = manifest.quantized  # dim -> QuantSpec of the quantized columns
        starts = np.cumsum([0] + [f.num_rows for f in manifest.files])
        self._file_starts = starts
        self._open: dict[int, MappedParquetFile] = {}
        # metadata reads (take_metadata): open footers, and decoded row groups, least recent first
        self._meta_files: dict[int, pq.ParquetFile] = {}
        self._meta_groups: OrderedDict[tuple[int, int, tuple[str, ...]], BaseRows] = OrderedDict()
        self._groups: tuple[np.ndarray, list[tuple[int, int]]] | None = None
        self._chunks: list[Chunk] | None = None
        # uncapped: the views of the mapped embedding chunks handed out, (file, row group, dim)
        self._views: dict[tuple[int, int, int], np.ndarray] = {}
        self._binary: dict[str, list[tuple[int, int, Any, Any]]] = {}
        self._meta_bytes = 0
        # every row's base columns in one piece, once they fit (see _join_base_rows)
        self._whole_base: BaseRows | None = None
        self._meta_lock = threading.Lock()
        self._verified: set[tuple[Any, ...]] = set()

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        """Rows of this version; the first use checks every file's footer against the manifest
        (a count that the files do not hold is CorruptStoreError, never an allocation). Files that
        are gone are left to the reads (a handle whose version was vacuumed can still add)."""
        if not self._files_checked:
            checked = 0
            for i, f in enumerate(self.manifest.files):
                if not self.storage.is_local or os.path.lexists(os.path.join(self.root, f.path)):
                    self._verify(i, (), ())
                    checked += 1
            # every file checked: what check_files() does, so later calls skip the loop
            self._files_checked = checked == len(self.manifest.files)
        return self._num_rows

    # -- files ---------------------------------------------------------------------------------
    def files(self) -> list[str]:
        """Absolute paths of the committed data files, in position order (each checked: a regular
        file in the data folder whose footer matches the manifest, else CorruptStoreError)."""
        self.check_files()
        return [os.path.join(self.root, f.path) for f in self.manifest.files]

    def check_files(self) -> None:
        """Check every file's path and footer against the manifest (rows, row groups, size)."""
        if not self._files_checked:
            for i in range(len(self.manifest.files)):
                self._verify(i, (), ())
            self._files_checked = True

    def _verify(self, i: int, columns: Sequence[str] | None, row_groups: Sequence[int] | None) -> None:
        """Check file ``i``'s path and footer, and the page CRCs of ``columns`` in ``row_groups``
        (None: all), once per snapshot (and once per process: see embtools.storage.verify)."""
        key = (i, None if columns is None else tuple(columns),
               None if row_groups is None else tuple(row_groups))
        if key in self._verified:
            return
        self._fetch(i, columns, row_groups)
        try:
            f = CheckedFile(self.root, self.manifest.files[i])
        except CorruptStoreError:
            path = os.path.join(self.root, self.manifest.files[i].path)
            if not os.path.lexists(path):  # gone: SnapshotExpiredError when vacuum removed the version
                raise missing_file_error(self.storage, self.version, path) from None
            raise
        with f:
            if columns is None:
                columns = [c for c in f.footer.columns if not EMBEDDING_COLUMN.match(c)]
            f.check(columns, row_groups)
        self._verified.add(key)

    def _fetch(self, i: int, columns: Sequence[str] | None, row_groups: Sequence[int] | None) -> None:
        """Bring the footer of file ``i`` and the chunks of ``columns`` (None: every non-embedding
        column) in ``row_groups`` to this machine (only the missing byte ranges from an object
        store; nothing for a directory)."""
        if self.storage.is_local:
            return
        entry = self.manifest.files[i]
        try:
            if columns is None:
                footer = self.storage.footer(entry.path, entry.bytes)  # type: ignore[attr-defined]
                columns = [c for c in footer.columns if not EMBEDDING_COLUMN.match(c)]
            self.storage.prefetch(entry.path, entry.bytes, columns, row_groups)
        except FileNotFoundError:
            raise missing_file_error(self.storage, self.version,
                                     self.storage.display(entry.path)) from None

    def _file(self, i: int) -> MappedParquetFile:
        f = self._open.get(i)
        if f is None:
            self._verify(i, (), ())
            path = os.path.join(self.root, self.manifest.files[i].path)
            try:
                f = MappedParquetFile(path)
            except FileNotFoundError:
                raise missing_file_error(self.storage, self.version, path) from None
            if f.row_group_rows != self.manifest.files[i].row_groups:
                f.close()
                raise CorruptStoreError(f"{path}: row groups {f.row_group_rows} do not match the manifest")
            self._open[i] = f
        return f

    def close(self) -> None:
        """Close the open data files and drop the cached metadata."""
        self._views.clear()
        for f in self._open.values():
            f.close()
        self._open.clear()
        with self._meta_lock:
            for pf in self._meta_files.values():
                pf.close()
            self._meta_files.clear()
            self._meta_groups.clear()
            self._meta_bytes = 0
            self._whole_base = None

    # -- VectorSource ----------------------------------------------------------------------------
    def metadata(self) -> pl.LazyFrame:
        """polars LazyFrame of the non-embedding columns over the committed files, in position order."""
        empty = metadata_frame(empty_table(self.schema))
        if not self.manifest.files:
            return empty.lazy()
        for i in range(len(self.manifest.files)):
            self._verify(i, None, None)  # the pages of every metadata column
        # row-group statistics may skip row groups only when the footers were checked by CRC
        trusted = all(f.footer_crc is not None for f in self.manifest.files)
        return pl.scan_parquet(self.files(), schema=empty.schema, missing_columns="insert",
                               extra_columns="ignore", glob=False, use_statistics=trusted)

    def read_error(self, exc: BaseException) -> Exception | None:
        """The typed error for a failed metadata scan when one of the files is gone."""
        for f in self.manifest.files:
            path = os.path.join(self.root, f.path)
            if not os.path.exists(path):
                return missing_file_error(self.storage, self.version, path)
        return None

    def chunks(self) -> list[Chunk]:
        """One :class:`Chunk` per row group, in position order (built once per snapshot: a
        version never changes)."""
        if self._chunks is None:
            self.check_files()  # row-group sizes are the files', not only the manifest's
            out: list[Chunk] = []
            for i, entry in enumerate(self.manifest.files):
                start = int(self._file_starts[i])
                for rg, rows in enumerate(entry.row_groups):
                    out.append(Chunk(start, rows, self._loader(i, rg), self._releaser(i, rg),
                                     self._row_releaser(i, rg), self._populator(i, rg)))
                    start += rows
            self._chunks = out
        return self._chunks

    def take_rows(self, dim: int, positions: Any, out: np.ndarray) -> None:
        """See :meth:`ChunkedSource.take_rows`; without a cap, up to :data:`FEW_TAKE_ROWS` rows
        (a single search's candidates) are copied one by one from the kept views of the mapped
        chunks: ~30 us for 18 rows of a 1M-row store instead of ~100 us for a dozen NumPy calls
        per chunk touched."""
        if not self.capped and len(out) <= FEW_TAKE_ROWS and self._take_kept(dim, positions, out):
            return
        super().take_rows(dim, positions, out)

    def _take_kept(self, dim: int, positions: Any, out: np.ndarray) -> bool:
        """:meth:`take_rows` from the kept views (uncapped); False, ``out`` undefined, unless
        ``positions`` are ascending, distinct and in range and every chunk read is a kept view."""
        if not isinstance(positions, np.ndarray) or positions.ndim != 1 or positions.dtype.kind not in "iu" \
                or not 0 < len(positions) == len(out):
            return False
        stored = self.resolve(dim)
        pos = positions.tolist()
        if pos[0] < 0 or pos[-1] >= self.num_rows:
            return False
        chunks = self.chunks()
        starts = self._starts_of(chunks)
        where = (np.searchsorted(starts, positions, side="right") - 1).tolist()
        groups = self._group_starts()[1]
        d = out.shape[1]
        seen: dict[int, tuple[np.ndarray, int]] = {}  # chunk: its kept view, its first position
        prev = -1
        for j, (p, c) in enumerate(zip(pos, where, strict=True)):
            if p <= prev:
                return False
            prev = p
            got = seen.get(c)
            if got is None:
                key = (*groups[c], stored)
                if key not in self._views:
                    chunks[c].load(stored)  # keeps the view when it is one of the mapped file
                    if key not in self._views:
                        return False
                got = seen[c] = (self._views[key], chunks[c].start)
            out[j] = got[0][p - got[1], :d]
        return True

    def row_views(self, dim: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
        """Uncapped: the first position of every chunk and the chunk's rows of the stored
        dimension serving ``dim`` (its first ``dim`` values are the rows), each a kept read-only
        view of the mapped data file (checked against its CRCs once, as any read); None under a
        cap or when a chunk is not such a view (a file written before embtools placed its pages)."""
        if self.capped:
            return None
        stored = self.resolve(dim)
        chunks = self.chunks()
        views: list[np.ndarray] = []
        for chunk, group in zip(chunks, self._group_starts()[1], strict=True):
            key = (*group, stored)
            if key not in self._views:
                chunk.load(stored)  # keeps the view when it is one of the mapped file
                if key not in self._views:
                    return None
            views.append(self._views[key])
        return self._starts_of(chunks), views

    def load_column(self, i: int, rg: int, column: str) -> np.ndarray:
        """Fixed-width ``column`` (``emb_<d>`` or a fixed-size binary) of row group ``rg`` of file
        ``i``, its pages checked first: an aligned read-only view of the mapped file for files
        embtools wrote (see :meth:`MappedParquetFile.array`)."""
        self._verify(i, (column,), (rg,))
        return self._file(i).array(column, rg)

    def mapped_view(self, dim: int, positions: Any = None) -> np.ndarray | None:
        """The rows at ``positions`` (ascending, distinct; None: all) as one read-only view of a
        mapped data file, when they are one contiguous run of one aligned row group (a view of
        the ``dim`` first values of a larger stored dimension is strided); else None. Under a
        memory cap, the view's mapped pages are given back when it is garbage collected."""
        stored = self.resolve(dim)
        if positions is None:
            a, b = 0, self.num_rows
        else:
            pos = np.asarray(positions)
            if pos.ndim != 1 or not pos.size or pos.dtype.kind not in "iu":
                return None
            a, b = int(pos[0]), int(pos[-1]) + 1
            if b - a != pos.size or a < 0 or b > self.num_rows or (pos.size > 1 and (np.diff(pos) != 1).any()):
                return None
        if b <= a:
            return None
        i = int(np.searchsorted(self._file_starts, a, side="right")) - 1
        ends = int(self._file_starts[i]) + np.cumsum(self.manifest.files[i].row_groups)
        rg = int(np.searchsorted(ends, a, side="right"))
        if rg >= len(ends) or b > ends[rg]:
            return None  # the rows span row groups or files
        start = int(ends[rg]) - self.manifest.files[i].row_groups[rg]
        col = emb_column(stored)
        arr = self.load_column(i, rg, col)
        f = self._file(i)
        if not f.aligned(col, rg):
            return None  # a file written before embtools placed its pages: the copying path
        view = arr[a - start:b - start]
        if dim != stored:
            view = view[:, :dim]
        f.populate(col, rg, a - start, b - start)
        if self.capped:
            weakref.finalize(view, _release_quietly, f, col, rg, a - start, b - start)
        return view

    @property
    def capped(self) -> bool:
        """Whether reads are under a memory cap. Under one, the mapped pages of each batch are
        given back as the reader moves on; without one they stay mapped (clean page-cache pages
        the kernel reclaims under pressure), so the next pass reads them without page faults."""
        return self.budget is not None and self.budget.cap_bytes is not None

    def _loader(self, i: int, rg: int) -> Any:
        def load(dim: int) -> np.ndarray:
            capped = self.capped
            if not capped:  # a view handed out before (its pages stay mapped without a cap)
                arr = self._views.get((i, rg, dim))
                if arr is not None:
                    return arr
            column = emb_column(dim)
            arr = self.load_column(i, rg, column)
            if not capped:
                f = self._file(i)
                f.populate(column, rg)  # once: the pages stay mapped
                if f.zero_copy(column, rg):  # a view of the mapped file: kept, it holds no memory
                    self._views[(i, rg, dim)] = arr
            return arr
        return load

    def _releaser(self, i: int, rg: int) -> Any:
        def release(dim: int) -> None:
            if self.capped:
                self._file(i).release(emb_column(dim), rg)
        return release

    def _row_releaser(self, i: int, rg: int) -> Any:
        def release_rows(dim: int, start: int, stop: int) -> None:
            if self.capped:
                self._file(i).release_rows(emb_column(dim), rg, start, stop)
        return release_rows

    def _populator(self, i: int, rg: int) -> Any:
        def populate(dim: int, start: int, stop: int) -> None:
            self._file(i).populate(emb_column(dim), rg, start, stop)
        return populate

    def binary_chunks(self, column: str) -> list[tuple[int, int, Any, Any]]:
        """``(start, rows, load, release)`` per row group of a ``fixed_size_binary`` column (the
        quantized codes): ``load()`` returns the ``(rows, width)`` uint8 values (checked against
        their CRCs first), ``release()`` gives back their mapped pages under a memory cap
        (without one they stay mapped, like the float pages: the next search faults none).
        Built once per column."""
        out = self._binary.get(column)
        if out is None:
            self.check_files()
            out = []
            for i, entry in enumerate(self.manifest.files):
                start = int(self._file_starts[i])
                for rg, rows in enumerate(entry.row_groups):
                    out.append((start, rows, self._binary_loader(i, rg, column),
                                self._binary_releaser(i, rg, column)))
                    start += rows
            self._binary[column] = out
        return out

    def _binary_loader(self, i: int, rg: int, column: str) -> Any:
        def load() -> np.ndarray:
            self._verify(i, (column,), (rg,))
            arr = self._file(i).array(column, rg)
            if not self.capped:
                self._file(i).populate(column, rg)  # once: the pages stay mapped
            return arr
        return load

    def _binary_releaser(self, i: int, rg: int, column: str) -> Any:
        def release() -> None:
            if self.capped:
                self._file(i).release(column, rg)
        return release

    def take_metadata(self, positions: Any, columns: Sequence[str] | None = None) -> pl.DataFrame:
        """row_id, text_id, label (+ ``columns``) of ``positions``, in the order given.

        The base columns (every search result's) come from whole row groups decoded once and
        cached (:class:`BaseRows`): a search's hits are gathered on this thread, no Arrow round
        trip.
        Other columns are read from their row groups with pyarrow each time."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        names = [ROW_ID, TEXT_ID, LABEL]
        for c in columns or []:
            if c not in self.schema.names:
                raise InvalidArgumentError(
                    f"unknown metadata column {c!r}; columns: {self.schema.names}")
            if c not in names:
                names.append(c)
        schema = pa.schema([self.schema.field(n) for n in names])
        if pos.size == 0:
            return metadata_frame(empty_table(schema))
        if pos.min() < 0 or pos.max() >= self.num_rows:
            raise InvalidArgumentError(f"positions out of range 0..{self.num_rows - 1}")
        base = self._take_base(pos)
        if len(names) == len(_BASE):
            return base
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        file_idx = np.searchsorted(self._file_starts, sorted_pos, side="right") - 1
        extra = pa.schema([self.schema.field(n) for n in names[len(_BASE):]])
        parts: list[pa.Table] = []
        for i in np.unique(file_idx):
            local = sorted_pos[file_idx == i] - self._file_starts[i]
            parts.append(self._read_rows(int(i), local, extra))
        table = pa.concat_tables(parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        more = metadata_frame(table.take(pa.array(inverse)))
        del parts, table
        # The reads ran on this thread: give the pages pyarrow's pool (mimalloc) kept from them
        # back to the system, or a stream of batches (iter_batches) piles up tens of MiB.
        pa.default_memory_pool().release_unused()
        return base.hstack(more)

    def few_base_values(self, positions: np.ndarray) -> BaseValues | None:
        """The ``row_id, text_id, label`` values of at most :data:`FEW_ROWS` ``positions`` (in
        the order given), gathered element by element; None for more positions or columns that
        are not plain strings (then :meth:`take_metadata`). A search's hits, without a frame.

        Raises InvalidArgumentError for positions out of range."""
        if positions.size > FEW_ROWS:
            return None
        pos = positions.tolist()
        if pos and (min(pos) < 0 or max(pos) >= self.num_rows):
            raise InvalidArgumentError(f"positions out of range 0..{self.num_rows - 1}")
        whole = self._whole_base
        if whole is not None:
            return whole.values(np.asarray(positions, np.int64))
        starts, _ = self._group_starts()
        found: dict[int, BaseRows] = {}
        hits: list[tuple[BaseRows, int]] = []
        for p, gi in zip(pos, np.searchsorted(starts, positions, side="right").tolist(), strict=True):
            rows = found.get(gi)
            if rows is None:
                rows = found[gi] = self._base_rows(gi - 1)
                if rows.strings() is None:
                    return None
            hits.append((rows, p - int(starts[gi - 1])))
        return BaseRows.few_values(hits)

    def _take_base(self, pos: np.ndarray) -> pl.DataFrame:
        """row_id, text_id, label of ``pos`` (in range), in the order given, from the cached
        base rows of the row groups that hold them."""
        few = self.few_base_values(pos)  # a search's hits: no dispatch per row group
        if few is not None:
            return base_frame(few)
        whole = self._whole_base
        if whole is not None:  # one gather (a batch's hits fall in every row group)
            return whole.frame(pos)
        starts, _ = self._group_starts()
        g = np.searchsorted(starts, pos, side="right") - 1
        first = int(g[0])
        if (g == first).all():  # the common case: every hit in one row group
            return self._base_rows(first).frame(pos - starts[first])
        order = np.argsort(g, kind="stable")
        gs, ps = g[order], pos[order]
        cuts = [0, *(np.flatnonzero(np.diff(gs)) + 1).tolist(), len(gs)]
        pieces = [self._base_rows(int(gs[a])).take(ps[a:b] - starts[gs[a]])
                  for a, b in itertools.pairwise(cuts)]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return BaseRows.concat(pieces).frame(inverse)

    def _group_starts(self) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The first position of every row group of the snapshot, and its ``(file, row group)``."""
        cached = self._groups
        if cached is None:
            groups = [(i, rg) for i, f in enumerate(self.manifest.files) for rg in range(len(f.row_groups))]
            sizes = [r for f in self.manifest.files for r in f.row_groups]
            starts = np.cumsum([0, *sizes])[:-1].astype(np.int64)
            cached = self._groups = (starts, groups)
        return cached

    def _base_rows(self, g: int) -> BaseRows:
        """row_id, text_id, label of row group ``g`` of the snapshot in the store's schema, kept
        in a small per-snapshot cache (at most META_CACHE_BYTES, least recently used dropped)."""
        starts, groups = self._group_starts()
        i, rg = groups[g]
        whole = self._whole_base
        if whole is not None:
            return whole.slice(int(starts[g]), self.manifest.files[i].row_groups[rg])
        key = (i, rg, _BASE)
        with self._meta_lock:
            rows = self._meta_groups.get(key)
            if rows is not None:
                self._meta_groups.move_to_end(key)
                return rows
        schema = pa.schema([self.schema.field(n) for n in _BASE])
        table = self._row_group(i, rg, _BASE)
        cols = [table.column(n) if n in table.column_names else pa.nulls(table.num_rows, f.type)
                for n, f in zip(_BASE, schema, strict=True)]
        rows = BaseRows.of(pa.Table.from_arrays(
            [c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema))
        del table, cols
        pa.default_memory_pool().release_unused()
        with self._meta_lock:
            if rows.nbytes <= META_CACHE_BYTES and key not in self._meta_groups:
                self._meta_groups[key] = rows
                self._meta_bytes += rows.nbytes
                while self._meta_bytes > META_CACHE_BYTES:
                    _, old = self._meta_groups.popitem(last=False)
                    self._meta_bytes -= old.nbytes
            self._join_base_rows(groups)
        return rows

    def _join_base_rows(self, groups: list[tuple[int, int]]) -> None:
        """(Holding the lock.) Once the base rows of every row group are cached in at most half
        of META_CACHE_BYTES, one :class:`BaseRows` of them all replaces them (the copy and the
        pieces fit the cap together): a search's hits are then gathered with a few vectorised
        lookups, not a lookup of the row group per hit (~25 us less for ten hits)."""
        if self._whole_base is not None or len(self._meta_groups) < len(groups) \
                or self._meta_bytes > META_CACHE_BYTES // 2:
            return
        whole = BaseRows.concat([self._meta_groups[(i, rg, _BASE)] for i, rg in groups])
        self._meta_groups.clear()
        self._meta_bytes = whole.nbytes
        self._whole_base = whole

    def _read_rows(self, i: int, local: np.ndarray, schema: pa.Schema) -> pa.Table:
        """Rows ``local`` (sorted) of file ``i``, reading only their row groups."""
        entry = self.manifest.files[i]
        rg_starts = np.cumsum([0, *entry.row_groups])
        rg_idx = np.searchsorted(rg_starts, local, side="right") - 1
        groups = np.unique(rg_idx)
        names = tuple(schema.names)
        tables = [self._row_group(i, int(g), names) for g in groups]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        # row r of group g sits at (rows of the groups before g among those read) + (r - start of g)
        sizes = np.array([entry.row_groups[g] for g in groups], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        idx = offsets[np.searchsorted(groups, rg_idx)] + (local - rg_starts[rg_idx])
        table = table.take(pa.array(idx, type=pa.int64()))
        cols = [table.column(n) if n in table.column_names else pa.nulls(len(idx), schema.field(n).type)
                for n in schema.names]
        return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)

    def _row_group(self, i: int, rg: int, names: tuple[str, ...]) -> pa.Table:
        """Columns ``names`` (those the file has) of row group ``rg`` of file ``i`` (its pages
        checked first), read with pyarrow on this thread."""
        with self._meta_lock:
            pf = self._meta_files.get(i)
        path = os.path.join(self.root, self.manifest.files[i].path)
        self._verify(i, names, (rg,))
        try:
            if pf is None:
                pf = pq.ParquetFile(path, pre_buffer=False)
            present = [n for n in names if n in pf.schema_arrow.names]
            # on this thread (see take_metadata): a few small columns, nothing to parallelise
            table = pf.read_row_group(rg, columns=present, use_threads=False)
        except FileNotFoundError:
            raise missing_file_error(self.storage, self.version, path) from None
        except (OSError, pa.ArrowException) as exc:
            raise CorruptStoreError(f"{path}: cannot read metadata ({exc})") from exc
        with self._meta_lock:
            if i not in self._meta_files:
                self._meta_files[i] = pf
        return table
