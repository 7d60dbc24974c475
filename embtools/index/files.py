"""The files of an IVF index: centroids and codes, plain Parquet under ``_index/<name>/``.

An index is recorded in the manifest (:class:`~embtools.storage.manifest.IndexEntry`): ``files[0]``
is the centroids file (``partition`` int32, ``emb_<d>`` float32 centroid), ``files[1:]`` the codes
files. A codes file holds whole partitions, rows sorted by ``(partition, row_id)``: ``row_id``
int64, ``partition`` int32 and the probe codes, ``emb_<m>`` float32 (``codes="float"``: the
search dimension, the rows as stored, with their float64 norms in ``norm`` for cosine;
an int: a stored Matryoshka prefix, unit length for cosine). Each file is one
row group written by the store's data-file writer (:func:`~embtools.storage.datafile.write_data_file`,
PLAIN, uncompressed, page-aligned as data files are), so a partition is one contiguous slice of a
zero-copy mapped view. Its partition offsets are in the file's key-value metadata
(``embtools.partitions``: first partition, offsets) and are checked against the ``partition``
column when the file is opened; anything inconsistent is CorruptStoreError.

Examples
--------
>>> import numpy as np, tempfile, os
>>> root = tempfile.mkdtemp()
>>> os.makedirs(os.path.join(root, "_index", "i"))
>>> rel, size = write_codes(root, "i", np.array([5, 3, 9]), np.array([0, 2, 2], np.int32),
...                         np.eye(3, dtype=np.float32))
>>> f = CodesFile(os.path.join(root, rel), size, partitions=3)
>>> f.row_ids.tolist(), f.starts.tolist(), f.codes.shape
([5, 3, 9], [0, 1, 1, 3], (3, 3))
>>> f.close()
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtools.errors import CorruptStoreError
from embtools.storage.datafile import MappedParquetFile, embedding_array, write_data_file
from embtools.storage.manifest import INDEX_DIR

__all__ = ["CodesFile", "raw_codes", "read_centroids", "write_centroids", "write_codes"]

_META_KEY = b"embtools.partitions"
#: The column of int8 and binary codes (``fixed_size_binary``); float codes are ``emb_<m>``.
CODE_COLUMN = "code"
#: The float64 norms of float codes that are the rows as stored (cosine).
NORM_COLUMN = "norm"


def raw_codes(codes: Any, code_dim: Any, dimension: int) -> bool:
    """Whether an index's codes are the rows as stored (float codes of the search dimension):
    its shortlists are re-ranked from them, without reading the data files (cosine indexes mark
    it with ``raw_codes`` in their info: earlier ones hold unit rows)."""
    return codes == "float" and code_dim == dimension


def _new_path(root: str, name: str) -> tuple[str, str]:
    rel = f"{INDEX_DIR}/{name}/{uuid.uuid4().hex}.parquet"
    return rel, os.path.join(root, rel)


def write_centroids(root: str, name: str, centroids: np.ndarray) -> tuple[str, int]:
    """Write the centroids file; ``(relative path, bytes)``."""
    rel, path = _new_path(root, name)
    p = len(centroids)
    table = pa.table({"partition": pa.array(np.arange(p, dtype=np.int32)),
                      f"emb_{centroids.shape[1]}": embedding_array(centroids)})
    return rel, write_data_file(path, table, row_group_rows=max(1, p))


def write_codes(root: str, name: str, row_ids: np.ndarray, parts: np.ndarray,
                codes: np.ndarray, durable: bool = True,
                norms: np.ndarray | None = None) -> tuple[str, int]:
    """Write one codes file (rows already sorted by partition, then row id); ``(path, bytes)``
    (relative to ``root``). ``durable=False``: not fsynced, the caller does it before the commit.
    ``norms``: each row's float64 norm (cosine over the rows as stored)."""
    rel, path = _new_path(root, name)
    parts = np.asarray(parts, np.int32)
    if codes.dtype == np.float32:
        column, values = f"emb_{codes.shape[1]}", embedding_array(codes)
    else:  # int8 or packed sign bits: one fixed-size binary value per row
        raw = np.ascontiguousarray(codes).view(np.uint8)
        values = pa.FixedSizeBinaryArray.from_buffers(pa.binary(raw.shape[1]), len(raw),
                                                      [None, pa.py_buffer(raw.reshape(-1))])
        column = CODE_COLUMN
    first = int(parts[0]) if len(parts) else 0
    last = int(parts[-1]) if len(parts) else -1
    offsets = np.searchsorted(parts, np.arange(first, last + 2)).tolist()
    meta = {_META_KEY: json.dumps({"first": first, "offsets": offsets}).encode()}
    columns = {"row_id": pa.array(np.asarray(row_ids, np.int64)), "partition": pa.array(parts),
               column: values}
    if norms is not None:
        columns[NORM_COLUMN] = pa.array(np.asarray(norms, np.float64))
    table = pa.table(columns)
    table = table.replace_schema_metadata(meta)
    return rel, write_data_file(path, table, row_group_rows=max(1, len(parts)), durable=durable)


def _open(path: str, size: int) -> MappedParquetFile:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptStoreError(f"{path}: index file listed by the manifest is missing") from None
    if not os.path.isfile(path) or os.path.islink(path) or st.st_size != size:
        raise CorruptStoreError(f"{path}: index file is not a regular file of {size} bytes")
    f = MappedParquetFile(path)
    if len(f.row_group_rows) != 1:
        f.close()
        raise CorruptStoreError(f"{path}: an index file has one row group, found {len(f.row_group_rows)}")
    return f


def _column(path: str, name: str, dtype: type) -> np.ndarray:
    try:
        col = pq.read_table(path, columns=[name]).column(0)
        return np.asarray(col.to_numpy(), dtype=dtype)
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: cannot read the index column {name!r} ({exc})") from None


def _binary_copy(path: str, column: str, rows: int) -> np.ndarray:
    """A fixed-size binary column as a ``(rows, width)`` uint8 array (decoded by pyarrow)."""
    try:
        col = pq.read_table(path, columns=[column]).column(0).combine_chunks()
        width = col.type.byte_width
        buf = col.buffers()[1]
        out = np.frombuffer(buf, np.uint8, count=rows * width, offset=col.offset * width)
        return out.reshape(rows, width)
    except (OSError, pa.ArrowException, AttributeError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: cannot read the codes column ({exc})") from None


def read_centroids(path: str, size: int, dim: int, partitions: int) -> np.ndarray:
    """The ``(partitions, dim)`` float32 centroids (a copy), checked against the manifest."""
    f = _open(path, size)
    try:
        c = np.array(f.embedding(f"emb_{dim}", 0), dtype=np.float32)
    except (KeyError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: no centroid column emb_{dim} ({exc})") from None
    finally:
        f.close()
    if c.shape != (partitions, dim) or not np.isfinite(c).all():
        raise CorruptStoreError(f"{path}: centroids of shape {c.shape}, expected ({partitions}, {dim})")
    return c


class CodesFile:
    """One opened codes file: ``row_ids`` (int64), ``starts`` (``partitions + 1`` row offsets of
    each partition in this file), ``codes`` (a read-only ``(rows, m)`` mapped view) and
    ``norms`` (float64, None when the file has none)."""

    def __init__(self, path: str, size: int, partitions: int, code_dim: int | None = None) -> None:
        self.path = path
        self._f = _open(path, size)
        try:
            self._load(partitions, code_dim)
        except BaseException:
            self._f.close()
            raise

    def _load(self, partitions: int, code_dim: int | None) -> None:
        path = self.path
        schema = self._f._arrow_schema
        names = [n for n in schema.names if n.startswith("emb_") or n == CODE_COLUMN]
        if len(names) != 1 or (code_dim is not None and names[0] not in (f"emb_{code_dim}", CODE_COLUMN)):
            raise CorruptStoreError(f"{path}: expected one codes column, found {names}")
        self.column = names[0]
        self.binary = self.column == CODE_COLUMN
        self.row_ids = _column(path, "row_id", np.int64)
        parts = _column(path, "partition", np.int32)
        n = len(parts)
        if n != len(self.row_ids) or n != self._f.num_rows:
            raise CorruptStoreError(f"{path}: index columns of different lengths")
        if n and (parts[0] < 0 or parts[-1] >= partitions or (np.diff(parts) < 0).any()):
            raise CorruptStoreError(f"{path}: partitions are not sorted in 0..{partitions - 1}")
        self.starts = np.searchsorted(parts, np.arange(partitions + 1)).astype(np.int64)
        self.norms = _column(path, NORM_COLUMN, np.float64) if NORM_COLUMN in schema.names else None
        if self.norms is not None and (len(self.norms) != n
                                       or not (np.isfinite(self.norms) & (self.norms >= 0)).all()):
            raise CorruptStoreError(f"{path}: {NORM_COLUMN} does not hold a finite norm per row")
        raw = (self._f._arrow_schema.metadata or {}).get(_META_KEY)
        try:
            meta = json.loads(raw) if raw is not None else {}
            first, offsets = int(meta["first"]), [int(o) for o in meta["offsets"]]
        except (TypeError, ValueError, KeyError):
            raise CorruptStoreError(f"{path}: missing or unreadable partition offsets") from None
        if n and offsets != self.starts[first:first + len(offsets)].tolist():
            raise CorruptStoreError(f"{path}: partition offsets disagree with the partition column")
        self.copied = False
        if not self.binary:
            self.codes = self._f.embedding(self.column, 0)
        elif hasattr(self._f, "array"):  # zero-copy fixed-size binary pages (aligned data files)
            self.codes = self._f.array(self.column, 0)
        else:  # decoded by pyarrow: a copy in memory
            self.codes, self.copied = _binary_copy(path, self.column, n), True
        if self.codes.shape[0] != n:
            raise CorruptStoreError(f"{path}: {self.codes.shape[0]} codes for {n} rows")

    @property
    def nbytes(self) -> int:
        """Bytes of codes in this file."""
        return int(self.codes.nbytes)

    def release(self) -> None:
        """Give back the mapped pages of the codes (they are read again on the next probe)."""
        self._f.release(self.column, 0)

    def close(self) -> None:
        self._f.close()
