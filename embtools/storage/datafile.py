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

import os
import re
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtools.errors import CorruptStoreError, InvalidArgumentError, InvalidEmbeddingsError

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


def embedding_type(dim: int) -> pa.FixedSizeListType:
    """The Arrow type of an ``emb_<dim>`` column: ``fixed_size_list<float32 not null>[dim]``."""
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


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
        if any(chunk.values.null_count for chunk in column.chunks):
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
            store_schema=True,
        )
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


class MappedParquetFile:
    """A data file opened for reading embedding column chunks.

    ``embedding(column, row_group)`` returns a ``(rows, d)`` float32 array: a read-only view of the
    memory-mapped file when the chunk has the layout :func:`write_data_file` produces, otherwise a
    copy decoded by pyarrow (same values). Every inconsistency raises
    :class:`~embtools.errors.CorruptStoreError` naming the file.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f.parquet")
    >>> _ = write_data_file(p, pa.table({"emb_2": embedding_array(np.eye(2, dtype=np.float32))}))
    >>> f = MappedParquetFile(p)
    >>> f.embedding("emb_2", 0).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> f.close()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._pf = pq.ParquetFile(self.path)
            meta = self._pf.metadata
            self.num_rows: int = int(meta.num_rows)
            self.row_group_rows: list[int] = [
                int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
            ]
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptStoreError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        if sum(self.row_group_rows) != self.num_rows:
            raise CorruptStoreError(f"{self.path}: row group sizes do not add up to num_rows")
        self._closed = False

    # -- public -------------------------------------------------------------------------------
    def embedding(self, column: str, row_group: int) -> np.ndarray:
        """The ``(rows, d)`` float32 values of ``column`` in ``row_group``."""
        self._check(column, row_group)
        return self._decode(column, row_group)

    def zero_copy(self, column: str, row_group: int) -> bool:
        """Whether :meth:`embedding` returns a view of the mapped file for this chunk."""
        self._check(column, row_group)
        return False

    def release(self, column: str, row_group: int) -> None:
        """Tell the kernel the mapped pages of this chunk are no longer needed."""
        self._check(column, row_group)

    def close(self) -> None:
        """Close the file. Arrays already returned stay valid."""
        self._closed = True

    def __enter__(self) -> MappedParquetFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _dim(self, column: str) -> int:
        m = EMBEDDING_COLUMN.match(column)
        if m is None:
            raise InvalidArgumentError(f"{column!r} is not an embedding column name (emb_<d>)")
        return int(m.group(1))

    def _check(self, column: str, row_group: int) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{self.path}: file is closed")
        self._dim(column)
        if not 0 <= row_group < len(self.row_group_rows):
            raise InvalidArgumentError(
                f"{self.path}: row group {row_group} out of range 0..{len(self.row_group_rows) - 1}"
            )

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
