"""The embtools data file: Parquet with raw embedding columns, and a reader that maps them.

A data file is plain Parquet. Embedding columns ``emb_<d>`` are ``fixed_size_list<float32 not
null>[d]`` (not nullable); they and every ``fixed_size_binary`` column (quantized codes) are the
*fixed-width* columns: written PLAIN, uncompressed, without dictionary or statistics, one data page
per column chunk, the page's values starting at a 64-byte aligned file offset
(:mod:`embtools.storage.placement`); every other column is zstd-compressed with statistics. A file
is one row group unless its widest fixed-width column passes :data:`MAX_CHUNK_BYTES`.
:class:`MappedParquetFile` maps the file and returns each fixed-width column chunk as an aligned,
read-only NumPy view of the mapping (``float32 (rows, d)`` or ``uint8 (rows, width)``).

Examples
--------
>>> import numpy as np, pyarrow as pa, tempfile, os
>>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
>>> table = pa.table({"row_id": pa.array(np.arange(4)), "emb_3": embedding_array(x)})
>>> path = os.path.join(tempfile.mkdtemp(), "part-0.parquet")
>>> write_data_file(path, table) > 0
True
>>> with MappedParquetFile(path) as f:
...     f.num_rows, f.row_group_rows, f.embedding("emb_3", 0)[1].tolist(), f.aligned("emb_3", 0)
(4, [4], [3.0, 4.0, 5.0], True)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtools.errors import CorruptStoreError, InvalidArgumentError, InvalidEmbeddingsError
from embtools.storage.durable import fsync_file
from embtools.storage.footer import parse_footer
from embtools.storage.pages import LayoutError, plain_value_spans
from embtools.storage.placement import ALIGNMENT, aligned_copy
from embtools.storage.schema import embedding_type

__all__ = [
    "ALIGNMENT",
    "EMBEDDING_COLUMN",
    "MAX_CHUNK_BYTES",
    "MappedParquetFile",
    "embedding_array",
    "embedding_type",
    "fixed_width_columns",
    "write_data_file",
]

EMBEDDING_COLUMN = re.compile(r"^emb_([1-9][0-9]*)$")
"""Names of embedding columns: ``emb_<d>``."""

MAX_CHUNK_BYTES = 2**31 - 2**27
"""Most bytes of one fixed-width column per row group (its one data page: Parquet page sizes are
int32). A file is one row group below this, so all its rows are one aligned view."""

DEFAULT_ROWS_NO_EMBEDDING = 1024 * 1024
# madvise(MADV_POPULATE_READ) (Linux >= 5.14; Python names it from 3.12): map a range's pages in
# one call; None where the system lacks it (then pages fault in as they are read)
_POPULATE_READ: int | None = getattr(mmap, "MADV_POPULATE_READ",
                                     22 if sys.platform.startswith("linux") else None)


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D float32 array as an Arrow ``fixed_size_list`` array (zero-copy when C-contiguous)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InvalidArgumentError(f"expected a 2-D array with >= 1 column, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=embedding_type(x.shape[1]))


def fixed_width_columns(schema: pa.Schema) -> dict[str, int]:
    """``{name: bytes per row}`` of the fixed-width columns of ``schema``: fixed-size lists of
    float32 and fixed-size binaries (what the writer places aligned).

    Examples
    --------
    >>> fixed_width_columns(pa.schema([("emb_8", embedding_type(8)), ("emb_8_b1", pa.binary(1)),
    ...                                ("text_id", pa.string())]))
    {'emb_8': 32, 'emb_8_b1': 1}
    """
    out = {}
    for field in schema:
        typ = field.type
        if pa.types.is_fixed_size_list(typ) and typ.value_type == pa.float32():
            out[field.name] = 4 * typ.list_size
        elif pa.types.is_fixed_size_binary(typ):
            out[field.name] = typ.byte_width
    return out


def _normalise_table(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """Cast embedding columns to the exact type and mark them non-nullable."""
    fields = []
    columns = []
    emb_names = []
    for field, column in zip(table.schema, table.columns, strict=True):
        m = EMBEDDING_COLUMN.match(field.name)
        if m is None:
            fields.append(field)
            columns.append(column)
            continue
        dim = int(m.group(1))
        if not pa.types.is_fixed_size_list(field.type) or field.type.list_size != dim:
            raise InvalidArgumentError(
                f"column {field.name!r} must be fixed_size_list<float32>[{dim}], got {field.type}"
            )
        if column.null_count:
            raise InvalidEmbeddingsError(f"column {field.name!r} has {column.null_count} null rows")
        typ = embedding_type(dim)
        if column.type != typ:
            column = column.cast(typ)
        if any(chunk.flatten().null_count for chunk in column.chunks):
            raise InvalidEmbeddingsError(f"column {field.name!r} has null values")
        fields.append(pa.field(field.name, typ, nullable=False, metadata=field.metadata))
        columns.append(column)
        emb_names.append(field.name)
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return pa.Table.from_arrays(columns, schema=schema), emb_names


def write_data_file(path: str | os.PathLike[str], table: pa.Table, *,
                    row_group_rows: int | None = None, durable: bool = True) -> int:
    """Write ``table`` as an embtools data file at ``path``, fsync it (unless ``durable`` is False:
    the caller then fsyncs it, with :func:`~embtools.storage.durable.fsync_path`,
    before it commits), and return its size in bytes.

    Fixed-width columns (embeddings, fixed-size binaries) are PLAIN, uncompressed, without
    dictionary or statistics, one page per column chunk (data page v2) whose values start at a
    64-byte aligned offset; other columns are zstd with statistics. ``row_group_rows`` defaults to
    all rows in one row group, or as many as keep the widest fixed-width column under
    :data:`MAX_CHUNK_BYTES`. pyarrow writes the file into an unnamed temporary file beside
    ``path``; :func:`~embtools.storage.placement.aligned_copy` then copies it to ``path``
    with the pages placed.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, tempfile, os
    >>> t = pa.table({"emb_2": embedding_array(np.ones((5, 2), np.float32))})
    >>> write_data_file(os.path.join(tempfile.mkdtemp(), "f.parquet"), t, row_group_rows=2) > 0
    True
    """
    table, _ = _normalise_table(table)
    if row_group_rows is not None and (
        isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) or row_group_rows < 1
    ):
        raise InvalidArgumentError(f"row_group_rows must be a positive int, got {row_group_rows!r}")
    fixed = fixed_width_columns(table.schema)
    widest = max(fixed.values(), default=0)
    if row_group_rows is None:
        row_group_rows = max(1, MAX_CHUNK_BYTES // widest) if widest else DEFAULT_ROWS_NO_EMBEDDING
    rows = max(1, min(row_group_rows, table.num_rows, max(1, MAX_CHUNK_BYTES // max(widest, 1))))
    # One data page per fixed-width chunk: page size limit above the chunk size, no row limit.
    page_bytes = int(min(2**31 - 1, rows * widest + (1 << 20)))
    others = [n for n in table.column_names if n not in fixed]
    compression: dict[str, str] = {n: "zstd" for n in others}
    compression.update({n: "none" for n in fixed})
    folder = os.path.dirname(os.path.abspath(path))
    # unnamed (O_TMPFILE where the system has it): nothing is left behind by a crash
    with tempfile.TemporaryFile(dir=folder) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=rows,
            use_dictionary=others,
            compression=compression,
            write_statistics=others,
            column_encoding={n: "PLAIN" for n in fixed} or None,
            data_page_size=page_bytes,
            max_rows_per_page=rows,
            data_page_version="2.0",
            write_page_checksum=True,
            write_page_index=False,
            store_schema=True,
        )
        tmp.flush()
        with open(path, "wb") as fh:
            size = aligned_copy(tmp.fileno(), os.fstat(tmp.fileno()).st_size, fh.fileno(), fixed)
            if durable:
                fsync_file(fh)
            return size


@dataclass(frozen=True)
class _Layout:
    """How a fixed-width column is stored: its Parquet leaf and levels, and a row as NumPy sees it
    (``width`` items of ``dtype``: ``d`` float32, or ``width`` bytes of a fixed-size binary)."""

    leaf: int
    dtype: np.dtype
    width: int
    values_per_row: int  # Parquet values per row: d for a list, 1 for a binary
    value_bytes: int  # bytes of one Parquet value
    max_rep: int
    max_def: int

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize


class MappedParquetFile:
    """A data file opened for reading its fixed-width column chunks.

    ``array(column, row_group)`` returns a ``(rows, d)`` float32 array of an embedding column, or a
    ``(rows, width)`` uint8 array of a fixed-size binary column: a read-only view of the
    memory-mapped file when the chunk has the layout :func:`write_data_file` produces (one PLAIN,
    uncompressed data page, no dictionary, no nulls), otherwise a copy decoded by pyarrow with the
    same values. A chunk of several plain pages is returned as a copy concatenated from the mapped
    pages. :meth:`aligned` tells whether the view starts at a 64-byte aligned offset (files written
    before embtools placed its pages map unaligned). Every inconsistency raises
    :class:`~embtools.errors.CorruptStoreError` naming the file. ``verify_checksums=True`` checks
    each mapped page against its CRC-32 (written by :func:`write_data_file`) when the chunk is first
    planned; it reads every byte, so it is off by default.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f.parquet")
    >>> codes = pa.array([b"\\x01\\x02", b"\\x03\\x04"], pa.binary(2))
    >>> _ = write_data_file(p, pa.table({"emb_2": embedding_array(np.eye(2, dtype=np.float32)),
    ...                                  "emb_2_i8": codes}))
    >>> f = MappedParquetFile(p)
    >>> f.embedding("emb_2", 0).tolist(), f.zero_copy("emb_2", 0), f.aligned("emb_2", 0)
    ([[1.0, 0.0], [0.0, 1.0]], True, True)
    >>> f.array("emb_2_i8", 0).tolist(), f.aligned("emb_2_i8", 0)
    ([[1, 2], [3, 4]], True)
    >>> f.release("emb_2", 0)
    >>> f.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, verify_checksums: bool = False) -> None:
        self.path = os.fspath(path)
        self.verify_checksums = verify_checksums
        self._plans: dict[tuple[str, int], list[tuple[int, int]] | None] = {}
        self._layouts: dict[str, _Layout | None] = {}
        self._resident: set[tuple[str, int]] = set()  # chunks populated whole, not released since
        self._mm: mmap.mmap | None = None
        self._closed = False
        # non-blocking: a FIFO in place of the file must not hang the open
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptStoreError(f"{self.path}: not a regular file")
            if st.st_size < 12:
                raise CorruptStoreError(f"{self.path}: {st.st_size} bytes is too short for Parquet")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = st.st_size
        try:
            # checked before pyarrow reads it: pyarrow aborts the process on some damaged footers
            self._footer = parse_footer(self._mm)
            self._pf = pq.ParquetFile(self.path, page_checksum_verification=verify_checksums)
            self._arrow_schema = self._pf.schema_arrow
            self._leaves: dict[str, list[int]] = {}
            for i in range(self._pf.metadata.num_columns):
                top = self._pf.schema.column(i).path.split(".")[0]
                self._leaves.setdefault(top, []).append(i)
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            self.close()
            raise CorruptStoreError(f"{self.path}: not a readable Parquet file ({exc})") from None
        self.num_rows: int = self._footer.num_rows
        self.row_group_rows: list[int] = [rows for rows, _ in self._footer.row_groups]
        self._data_end = self._footer.data_end

    # -- public -------------------------------------------------------------------------------
    def array(self, column: str, row_group: int) -> np.ndarray:
        """The values of fixed-width ``column`` in ``row_group``: ``(rows, d)`` float32 of an
        embedding column, ``(rows, width)`` uint8 of a fixed-size binary column.

        A read-only view of the mapped file when :meth:`zero_copy` is true, else a new array.
        """
        spans = self._plan(column, row_group)
        if spans is None:
            return self._decode(column, row_group)
        layout = self._layout(column)
        assert layout is not None
        rows, dtype = self.row_group_rows[row_group], layout.dtype
        if len(spans) == 1:
            off, nbytes = spans[0]
            view = np.frombuffer(self._map(), dtype=dtype, count=nbytes // dtype.itemsize, offset=off)
            return view.reshape(rows, layout.width)
        out = np.empty(rows * layout.width, dtype=dtype)
        pos = 0
        for off, nbytes in spans:
            n = nbytes // dtype.itemsize
            out[pos:pos + n] = np.frombuffer(self._map(), dtype=dtype, count=n, offset=off)
            pos += n
        return out.reshape(rows, layout.width)

    def embedding(self, column: str, row_group: int) -> np.ndarray:
        """The ``(rows, d)`` float32 values of embedding ``column`` (``emb_<d>``) in ``row_group``
        (see :meth:`array`)."""
        self._dim(column)
        return self.array(column, row_group)

    def embedding_rows(self, column: str, row_groups: list[int] | None = None) -> np.ndarray:
        """Several row groups (default: all) of a fixed-width column as one array.

        A view of the mapped file for a single zero-copy row group; otherwise a copy.
        """
        groups = list(range(len(self.row_group_rows))) if row_groups is None else list(row_groups)
        if len(groups) == 1:
            return self.array(column, groups[0])
        for g in groups:
            self._check(column, g)
        parts = []
        for g in groups:
            parts.append(np.array(self.array(column, g)))
            self.release(column, g)
        if parts:
            return np.concatenate(parts)
        layout = self._layout(column)
        width = self._dim(column) if layout is None else layout.width
        return np.empty((0, width), dtype=np.float32 if layout is None else layout.dtype)

    def zero_copy(self, column: str, row_group: int) -> bool:
        """Whether :meth:`array` returns a view of the mapped file for this chunk."""
        spans = self._plan(column, row_group)
        return spans is not None and len(spans) == 1

    def aligned(self, column: str, row_group: int) -> bool:
        """Whether :meth:`array` returns a view whose values start at a 64-byte aligned offset
        (what :func:`write_data_file` writes; an empty chunk counts as aligned)."""
        spans = self._plan(column, row_group)
        if spans == [] and self.row_group_rows[row_group] == 0:
            return True
        return spans is not None and len(spans) == 1 and spans[0][0] % ALIGNMENT == 0

    def all_aligned(self) -> bool:
        """Whether every embedding and fixed-size binary chunk of the file maps aligned
        (``compact`` rewrites files written before embtools placed its pages)."""
        names = [n for n, _ in fixed_width_columns(self._arrow_schema).items()
                 if EMBEDDING_COLUMN.match(n) or pa.types.is_fixed_size_binary(
                     self._arrow_schema.field(n).type)]
        return all(self.aligned(n, g) for n in names for g in range(len(self.row_group_rows)))

    def prefetch(self, column: str, row_group: int) -> None:
        """Ask the kernel to read this chunk's mapped pages ahead (``MADV_WILLNEED``)."""
        spans = self._plan(column, row_group)
        if spans:
            lo = min(off for off, _ in spans)
            hi = max(off + n for off, n in spans)
            self._madvise("MADV_WILLNEED", lo - lo % mmap.PAGESIZE, hi)

    def populate(self, column: str, row_group: int, start: int | None = None,
                 stop: int | None = None) -> None:
        """Map the pages of rows ``start:stop`` of a chunk (default: all) into the process now.

        One ``madvise(MADV_POPULATE_READ)`` call instead of a page fault every 64 KiB while the
        rows are read (faults inside a multi-threaded BLAS call cost more than the product). A
        no-op for a chunk populated whole and not released since, for decoded chunks, and where
        the system lacks it.
        """
        global _POPULATE_READ
        key = (column, int(row_group))
        if _POPULATE_READ is None or key in self._resident:
            return
        spans = self._plan(column, row_group)
        if not spans:
            return
        rows = self.row_group_rows[row_group]
        a, b = self._rows(rows, start, stop)
        lo = min(off for off, _ in spans)
        hi = max(off + n for off, n in spans)
        if len(spans) == 1 and (a, b) != (0, rows):
            layout = self._layout(column)
            assert layout is not None
            lo, hi = lo + a * layout.row_bytes, lo + b * layout.row_bytes
        lo -= lo % mmap.PAGESIZE
        try:
            self._madvise_raw(_POPULATE_READ, lo, hi)
        except OSError:  # an older kernel: EINVAL
            _POPULATE_READ = None
            return
        if (a, b) == (0, rows) or len(spans) != 1:
            self._resident.add(key)

    def release(self, column: str, row_group: int, start: int | None = None,
                stop: int | None = None) -> None:
        """Drop this chunk's mapped pages from the process (``MADV_DONTNEED``).

        With ``start``/``stop``, only the memory pages lying wholly inside rows ``start:stop`` of
        the chunk are dropped (see :meth:`release_rows`). The file stays mapped: arrays returned
        earlier stay valid and fault their pages back in (from the page cache) if they are read
        again. A no-op for pyarrow-decoded chunks.
        """
        self.release_rows(column, row_group, start, stop)

    def release_rows(self, column: str, row_group: int, start: int | None = None,
                     stop: int | None = None) -> None:
        """Drop the mapped pages of rows ``start:stop`` of a chunk (default: all its rows).

        Pages shared with rows outside the range are kept (a batch reader gives back each batch
        as it finishes, then the whole chunk with :meth:`release`). A chunk of several data pages
        is only released whole.
        """
        spans = self._plan(column, row_group)
        if not spans:
            return
        rows = self.row_group_rows[row_group]
        a, b = self._rows(rows, start, stop)
        self._resident.discard((column, int(row_group)))
        lo = min(off for off, _ in spans)
        hi = max(off + n for off, n in spans)
        if (a, b) != (0, rows):
            if len(spans) != 1:
                return  # several pages: only the whole chunk is released
            layout = self._layout(column)
            assert layout is not None
            lo, hi = lo + a * layout.row_bytes, lo + b * layout.row_bytes
            lo += -lo % mmap.PAGESIZE  # keep the pages shared with neighbouring rows
            hi -= hi % mmap.PAGESIZE
        else:
            lo -= lo % mmap.PAGESIZE
        self._madvise("MADV_DONTNEED", lo, hi)

    def close(self) -> None:
        """Close the file. Arrays already returned stay valid (the mapping lives until they go)."""
        self._closed = True
        if self._mm is not None:
            # With views still alive, close() raises BufferError; the mapping then goes with them.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        pf = getattr(self, "_pf", None)
        if pf is not None:
            pf.close()

    def __enter__(self) -> MappedParquetFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise InvalidArgumentError(f"{self.path}: file is closed")
        return self._mm

    def _dim(self, column: str) -> int:
        m = EMBEDDING_COLUMN.match(column)
        if m is None:
            raise InvalidArgumentError(f"{column!r} is not an embedding column name (emb_<d>)")
        return int(m.group(1))

    def _check(self, column: str, row_group: int) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{self.path}: file is closed")
        if column not in self._leaves:
            raise InvalidArgumentError(f"{self.path}: no column {column!r}")
        self._layout(column)
        if isinstance(row_group, bool) or not isinstance(row_group, (int, np.integer)) or not (
            0 <= row_group < len(self.row_group_rows)
        ):
            raise InvalidArgumentError(
                f"{self.path}: row group {row_group!r} out of range "
                f"0..{len(self.row_group_rows) - 1}"
            )

    def _layout(self, column: str) -> _Layout | None:
        """The mapped layout of ``column`` (cached); None: decode with pyarrow. Raises
        InvalidArgumentError for a column that is neither ``emb_<d>`` nor a fixed-size binary."""
        if column not in self._layouts:
            self._layouts[column] = self._make_layout(column)
        return self._layouts[column]

    def _make_layout(self, column: str) -> _Layout | None:
        field = self._arrow_schema.field(column)
        typ = field.type
        leaves = self._leaves[column]
        desc = self._pf.schema.column(leaves[0])
        levels = (desc.max_repetition_level, desc.max_definition_level)
        if EMBEDDING_COLUMN.match(column):
            dim = self._dim(column)
            if (len(leaves) != 1 or field.nullable or not pa.types.is_fixed_size_list(typ)
                    or typ.list_size != dim or typ.value_type != pa.float32()
                    or typ.value_field.nullable or desc.physical_type != "FLOAT" or levels != (1, 1)):
                return None
            return _Layout(leaves[0], np.dtype("<f4"), dim, dim, 4, 1, 1)
        if not pa.types.is_fixed_size_binary(typ):
            raise InvalidArgumentError(
                f"{column!r} is not a fixed-width column (emb_<d> or fixed_size_binary)")
        width = typ.byte_width
        if (len(leaves) != 1 or desc.physical_type != "FIXED_LEN_BYTE_ARRAY" or desc.length != width
                or levels not in ((0, 0), (0, 1)) or width < 1):
            return None
        return _Layout(leaves[0], np.dtype("u1"), width, 1, width, *levels)

    def _rows(self, rows: int, start: int | None, stop: int | None) -> tuple[int, int]:
        a = 0 if start is None else start
        b = rows if stop is None else stop
        if not 0 <= a <= b <= rows:
            raise InvalidArgumentError(f"{self.path}: rows {a}:{b} outside 0..{rows}")
        return a, b

    def _madvise(self, option: str, lo: int, hi: int) -> None:
        advice = getattr(mmap, option, None)
        if advice is not None:
            self._madvise_raw(advice, lo, hi)

    def _madvise_raw(self, advice: int, lo: int, hi: int) -> None:
        if hi > lo:
            self._map().madvise(advice, lo, hi - lo)

    def _plan(self, column: str, row_group: int) -> list[tuple[int, int]] | None:
        """``(offset, bytes)`` of each page's values of a plain chunk (cached), or ``None`` to
        decode with pyarrow."""
        self._check(column, row_group)
        key = (column, int(row_group))
        if key not in self._plans:
            self._plans[key] = self._make_plan(column, int(row_group))
        return self._plans[key]

    def _make_plan(self, column: str, row_group: int) -> list[tuple[int, int]] | None:
        layout = self._layout(column)
        if layout is None:
            return None
        rows = self.row_group_rows[row_group]
        where = f"{self.path}: column {column!r} row group {row_group}"
        # the footer as embtools decoded and checked it (pyarrow's ``compression`` aborts on a
        # damaged codec id)
        cc = self._footer.row_groups[row_group][1][layout.leaf]
        if cc.codec != 0 or cc.has_dictionary:
            return None
        start, length, num_values, encodings = cc.start, cc.length, cc.num_values, cc.encodings
        per_row = layout.values_per_row
        if num_values != rows * per_row:
            raise CorruptStoreError(f"{where}: {num_values} values, expected {rows} x {per_row}")
        if rows == 0:
            return []  # an empty row group (pyarrow writes one for an empty table): no pages
        if start < 4 or length < 0 or start + length > self._data_end:
            raise CorruptStoreError(
                f"{where}: chunk [{start}, {start + length}) outside the data region "
                f"[4, {self._data_end})"
            )
        try:
            spans = plain_value_spans(self._map(), start, length, rows=rows, dim=per_row,
                                      max_rep=layout.max_rep, max_def=layout.max_def,
                                      verify_crc=self.verify_checksums, encodings=encodings,
                                      value_bytes=layout.value_bytes)
        except LayoutError as exc:
            raise CorruptStoreError(f"{where}: {exc}") from exc
        return None if spans is None else [(off, n * layout.value_bytes) for off, n in spans]

    def _read_column(self, column: str, row_group: int) -> pa.ChunkedArray:
        rows = self.row_group_rows[row_group]
        where = f"{self.path}: column {column!r} row group {row_group}"
        try:
            col = self._pf.read_row_group(row_group, columns=[column]).column(0)
        except KeyError as exc:
            raise InvalidArgumentError(f"{self.path}: no column {column!r}") from exc
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptStoreError(f"{where}: cannot decode ({exc})") from exc
        if col.null_count:
            raise CorruptStoreError(f"{where}: {col.null_count} null rows in a fixed-width column")
        if len(col) != rows:
            raise CorruptStoreError(f"{where}: {len(col)} rows, footer says {rows}")
        return col

    def _decode(self, column: str, row_group: int) -> np.ndarray:
        """pyarrow decode of one chunk, as a fresh C-contiguous array."""
        if not EMBEDDING_COLUMN.match(column):
            return self._decode_binary(column, row_group)
        dim = self._dim(column)
        rows = self.row_group_rows[row_group]
        where = f"{self.path}: column {column!r} row group {row_group}"
        col = self._read_column(column, row_group)
        out = np.empty((rows, dim), dtype=np.float32)
        pos = 0
        for chunk in col.chunks:
            typ = chunk.type
            if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ)
                    or pa.types.is_large_list(typ)):
                raise CorruptStoreError(f"{where}: not a list column ({typ})")
            flat = chunk.flatten()
            if flat.null_count:
                raise CorruptStoreError(f"{where}: null values in an embedding column")
            if not pa.types.is_fixed_size_list(typ):
                lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
                if len(lengths) and not (lengths == dim).all():
                    raise CorruptStoreError(f"{where}: rows are not all of length {dim}")
            if len(flat) != len(chunk) * dim:
                raise CorruptStoreError(f"{where}: rows are not all of length {dim}")
            vals = flat.cast(pa.float32()).to_numpy(zero_copy_only=False)
            out[pos:pos + len(chunk)] = vals.reshape(len(chunk), dim)
            pos += len(chunk)
        return out

    def _decode_binary(self, column: str, row_group: int) -> np.ndarray:
        width = self._arrow_schema.field(column).type.byte_width
        col = self._read_column(column, row_group)
        out = np.empty((self.row_group_rows[row_group], width), dtype=np.uint8)
        pos = 0
        for chunk in col.chunks:
            data = chunk.buffers()[1]
            n = len(chunk)
            out[pos:pos + n] = np.frombuffer(data, np.uint8, n * width, chunk.offset * width
                                             ).reshape(n, width)
            pos += n
        return out
