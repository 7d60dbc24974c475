"""The embtools data file: Parquet with raw embedding columns, and a reader that maps them.

A data file is plain Parquet. Embedding columns ``emb_<d>`` are ``fixed_size_list<float32 not
null>[d]`` (not nullable) written PLAIN, uncompressed, without dictionary or statistics, one data page
per column chunk; every other column is zstd-compressed with statistics. :class:`MappedParquetFile`
reads the footer with pyarrow and returns each embedding column chunk as a NumPy array.

Examples
--------
>>> import numpy as np, pyarrow as pa, tempfile, os
>>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
>>> table = pa.table({"row_id": pa.array(np.arange(4)), "emb_3": embedding_array(x)})
>>> path = os.path.join(tempfile.mkdtemp(), "part-0.parquet")
>>> write_data_file(path, table) > 0
True
>>> with MappedParquetFile(path) as f:
...     f.num_rows, f.row_group_rows, f.embedding("emb_3", 0)[1].tolist()
(4, [4], [3.0, 4.0, 5.0])
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtools.errors import CorruptStoreError, InvalidArgumentError, InvalidEmbeddingsError
from embtools.storage.durable import fsync_file
from embtools.storage.footer import parse_footer
from embtools.storage.pages import LayoutError, plain_value_spans
from embtools.storage.schema import embedding_type

__all__ = [
    "EMBEDDING_COLUMN",
    "MappedParquetFile",
    "embedding_array",
    "embedding_type",
    "write_data_file",
]

EMBEDDING_COLUMN = re.compile(r"^emb_([1-9][0-9]*)$")
"""Names of embedding columns: ``emb_<d>``."""

TARGET_CHUNK_BYTES = 64 * 1024**2
"""Default row group size: about this many bytes of the widest embedding column."""

MAX_PAGE_BYTES = 1024**3
"""Largest data page we ask pyarrow for (Parquet page sizes are int32)."""

DEFAULT_ROWS_NO_EMBEDDING = 1024 * 1024
_F32 = np.dtype("<f4")


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D float32 array as an Arrow ``fixed_size_list`` array (zero-copy when C-contiguous)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InvalidArgumentError(f"expected a 2-D array with >= 1 column, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=embedding_type(x.shape[1]))


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
                    row_group_rows: int | None = None) -> int:
    """Write ``table`` as an embtools data file at ``path``, fsync it, and return its size in bytes.

    Embedding columns are PLAIN, uncompressed, without dictionary or statistics, one page per
    column chunk (data page v2); other columns are zstd with statistics. ``row_group_rows`` defaults
    to about 64 MiB of the widest embedding column per row group.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, tempfile, os
    >>> t = pa.table({"emb_2": embedding_array(np.ones((5, 2), np.float32))})
    >>> write_data_file(os.path.join(tempfile.mkdtemp(), "f.parquet"), t, row_group_rows=2) > 0
    True
    """
    table, emb = _normalise_table(table)
    if row_group_rows is not None and (
        isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) or row_group_rows < 1
    ):
        raise InvalidArgumentError(f"row_group_rows must be a positive int, got {row_group_rows!r}")
    widest = max((table.schema.field(n).type.list_size * 4 for n in emb), default=0)
    if row_group_rows is None:
        row_group_rows = max(1, TARGET_CHUNK_BYTES // widest) if widest else DEFAULT_ROWS_NO_EMBEDDING
    rows = max(1, min(row_group_rows, table.num_rows))
    # One data page per embedding chunk: page size limit above the chunk size, no row limit.
    page_bytes = int(min(MAX_PAGE_BYTES, rows * widest + (1 << 20)))
    others = [n for n in table.column_names if n not in emb]
    compression: dict[str, str] = {n: "zstd" for n in others}
    compression.update({n: "none" for n in emb})
    with open(path, "wb") as fh:
        pq.write_table(
            table,
            fh,
            row_group_size=rows,
            use_dictionary=others,
            compression=compression,
            write_statistics=others,
            column_encoding={n: "PLAIN" for n in emb} or None,
            data_page_size=page_bytes,
            max_rows_per_page=rows,
            data_page_version="2.0",
            write_page_checksum=True,
            store_schema=True,
        )
        fsync_file(fh)
        return fh.tell()


class MappedParquetFile:
    """A data file opened for reading embedding column chunks.

    ``embedding(column, row_group)`` returns a ``(rows, d)`` float32 array: a read-only view of the
    memory-mapped file when the chunk has the layout :func:`write_data_file` produces (one PLAIN,
    uncompressed data page, no dictionary, no nulls), otherwise a copy decoded by pyarrow with the
    same values. A chunk of several plain pages is returned as a copy concatenated from the mapped
    pages. Every inconsistency raises :class:`~embtools.errors.CorruptStoreError` naming the file.
    ``verify_checksums=True`` checks each mapped page against its CRC-32 (written by
    :func:`write_data_file`) when the chunk is first planned; it reads every byte, so it is off by
    default.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f.parquet")
    >>> _ = write_data_file(p, pa.table({"emb_2": embedding_array(np.eye(2, dtype=np.float32))}))
    >>> f = MappedParquetFile(p)
    >>> f.embedding("emb_2", 0).tolist(), f.zero_copy("emb_2", 0)
    ([[1.0, 0.0], [0.0, 1.0]], True)
    >>> f.release("emb_2", 0)
    >>> f.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, verify_checksums: bool = False) -> None:
        self.path = os.fspath(path)
        self.verify_checksums = verify_checksums
        self._plans: dict[tuple[str, int], list[tuple[int, int]] | None] = {}
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
    def embedding(self, column: str, row_group: int) -> np.ndarray:
        """The ``(rows, d)`` float32 values of ``column`` in ``row_group``.

        A read-only view of the mapped file when :meth:`zero_copy` is true, else a new array.
        """
        spans = self._plan(column, row_group)
        if spans is None:
            return self._decode(column, row_group)
        rows, dim = self.row_group_rows[row_group], self._dim(column)
        if len(spans) == 1:
            off, n = spans[0]
            return np.frombuffer(self._map(), dtype=_F32, count=n, offset=off).reshape(rows, dim)
        out = np.empty(rows * dim, dtype=np.float32)
        pos = 0
        for off, n in spans:
            out[pos:pos + n] = np.frombuffer(self._map(), dtype=_F32, count=n, offset=off)
            pos += n
        return out.reshape(rows, dim)

    def embedding_rows(self, column: str, row_groups: list[int] | None = None) -> np.ndarray:
        """Several row groups (default: all) as one ``(rows, d)`` array.

        A view of the mapped file for a single zero-copy row group; otherwise a copy.
        """
        groups = list(range(len(self.row_group_rows))) if row_groups is None else list(row_groups)
        if len(groups) == 1:
            return self.embedding(column, groups[0])
        dim = self._dim(column)
        for g in groups:
            self._check(column, g)
        out = np.empty((sum(self.row_group_rows[g] for g in groups), dim), dtype=np.float32)
        pos = 0
        for g in groups:
            rows = self.row_group_rows[g]
            out[pos:pos + rows] = self.embedding(column, g)
            self.release(column, g)
            pos += rows
        return out

    def zero_copy(self, column: str, row_group: int) -> bool:
        """Whether :meth:`embedding` returns a view of the mapped file for this chunk."""
        spans = self._plan(column, row_group)
        return spans is not None and len(spans) == 1

    def prefetch(self, column: str, row_group: int) -> None:
        """Ask the kernel to read this chunk's mapped pages ahead (``MADV_WILLNEED``)."""
        spans = self._plan(column, row_group)
        if spans:
            lo = min(off for off, _ in spans)
            hi = max(off + 4 * n for off, n in spans)
            self._madvise("MADV_WILLNEED", lo - lo % mmap.PAGESIZE, hi)

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
        a = 0 if start is None else start
        b = rows if stop is None else stop
        if not 0 <= a <= b <= rows:
            raise InvalidArgumentError(f"{self.path}: rows {a}:{b} outside 0..{rows}")
        lo = min(off for off, _ in spans)
        hi = max(off + 4 * n for off, n in spans)
        if (a, b) != (0, rows):
            if len(spans) != 1:
                return  # several pages: only the whole chunk is released
            row_bytes = 4 * self._dim(column)
            lo, hi = lo + a * row_bytes, lo + b * row_bytes
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
        self._dim(column)
        if column not in self._leaves:
            raise InvalidArgumentError(f"{self.path}: no column {column!r}")
        if isinstance(row_group, bool) or not isinstance(row_group, (int, np.integer)) or not (
            0 <= row_group < len(self.row_group_rows)
        ):
            raise InvalidArgumentError(
                f"{self.path}: row group {row_group!r} out of range "
                f"0..{len(self.row_group_rows) - 1}"
            )

    def _madvise(self, option: str, lo: int, hi: int) -> None:
        advice = getattr(mmap, option, None)
        if advice is not None and hi > lo:
            self._map().madvise(advice, lo, hi - lo)

    def _plan(self, column: str, row_group: int) -> list[tuple[int, int]] | None:
        """Value spans of a plain chunk (cached), or ``None`` to decode with pyarrow."""
        self._check(column, row_group)
        key = (column, int(row_group))
        if key not in self._plans:
            self._plans[key] = self._make_plan(column, int(row_group))
        return self._plans[key]

    def _make_plan(self, column: str, row_group: int) -> list[tuple[int, int]] | None:
        dim = self._dim(column)
        rows = self.row_group_rows[row_group]
        where = f"{self.path}: column {column!r} row group {row_group}"
        idx = self._arrow_schema.get_field_index(column)
        if idx < 0 or len(self._leaves[column]) != 1:
            return None
        field = self._arrow_schema.field(idx)
        typ = field.type
        if (field.nullable or not pa.types.is_fixed_size_list(typ) or typ.list_size != dim
                or typ.value_type != pa.float32() or typ.value_field.nullable):
            return None
        leaf = self._leaves[column][0]
        desc = self._pf.schema.column(leaf)
        if desc.physical_type != "FLOAT" or (desc.max_repetition_level,
                                             desc.max_definition_level) != (1, 1):
            return None
        # the footer as embtools decoded and checked it (pyarrow's ``compression`` aborts on a
        # damaged codec id)
        cc = self._footer.row_groups[row_group][1][leaf]
        if cc.codec != 0 or cc.has_dictionary:
            return None
        start, length, num_values, encodings = cc.start, cc.length, cc.num_values, cc.encodings
        if num_values != rows * dim:
            raise CorruptStoreError(f"{where}: {num_values} values, expected {rows} x {dim}")
        if rows == 0:
            return []  # an empty row group (pyarrow writes one for an empty table): no pages
        if start < 4 or length < 0 or start + length > self._data_end:
            raise CorruptStoreError(
                f"{where}: chunk [{start}, {start + length}) outside the data region "
                f"[4, {self._data_end})"
            )
        try:
            return plain_value_spans(self._map(), start, length, rows=rows, dim=dim,
                                     max_rep=1, max_def=1, verify_crc=self.verify_checksums,
                                     encodings=encodings)
        except LayoutError as exc:
            raise CorruptStoreError(f"{where}: {exc}") from exc

    def _decode(self, column: str, row_group: int) -> np.ndarray:
        """pyarrow decode of one chunk, as a fresh C-contiguous (rows, d) float32 array."""
        dim = self._dim(column)
        rows = self.row_group_rows[row_group]
        where = f"{self.path}: column {column!r} row group {row_group}"
        try:
            tab = self._pf.read_row_group(row_group, columns=[column])
            col = tab.column(0)
        except KeyError as exc:
            raise InvalidArgumentError(f"{self.path}: no column {column!r}") from exc
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptStoreError(f"{where}: cannot decode ({exc})") from exc
        if col.null_count:
            raise CorruptStoreError(f"{where}: {col.null_count} null rows in an embedding column")
        if len(col) != rows:
            raise CorruptStoreError(f"{where}: {len(col)} rows, footer says {rows}")
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
