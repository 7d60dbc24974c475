"""Validation and normalisation of ``add()`` input into what the writer stores.

Everything the caller passes is checked here before anything is written: embeddings (any backend's
array, nested lists, a pyarrow ``FixedSizeList``/``ChunkedArray``, a polars ``Array`` Series, or a
mapping ``{dim: array}``), text ids, labels and metadata. Each problem raises a typed error from
:mod:`embtools.errors` that names what and where (the first bad row, the column). Embeddings stay the
caller's arrays (float16/32/64); :meth:`Batch.embeddings` casts one row range at a time to float32 so
that no full-size copy is ever made.

Examples
--------
>>> import numpy as np
>>> from embtools.storage.schema import base_schema
>>> b = prepare_batch({4: np.ones((3, 4))}, text_ids=["a", "b", "c"], labels=[1, 2, 3],
...                   metadata={"year": [2020, 2021, 2022]}, stored_dims=[], schema=base_schema(),
...                   num_rows=0)
>>> b.num_rows, b.dimensions, b.schema.field("label").type, b.embeddings(4, 0, 2).dtype
(3, [4], DataType(int64), dtype('float32'))
>>> b.table(0, 3, row_id_start=10).column("row_id").to_pylist()
[10, 11, 12]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from embtools.backends.frameworks import framework_of, to_numpy
from embtools.errors import (
    DimensionMismatchError,
    DuplicateTextIdError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    LengthMismatchError,
    SchemaMismatchError,
)
from embtools.storage.schema import (
    LABEL,
    ROW_ID,
    TEXT_ID,
    emb_column,
    embedding_type,
    is_reserved,
    normalize_type,
)

__all__ = ["Batch", "as_embedding_matrix", "prepare_batch", "reject_sparse"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHECK_BYTES = 16 * 1024**2


@dataclass
class Batch:
    """Validated input of one ``add()``: embeddings per dimension, ids, labels, metadata, schema."""

    num_rows: int
    arrays: dict[int, np.ndarray]          # dim -> (num_rows, dim) float16/32/64, the caller's data
    text_ids: pa.Array | None              # string, or None to generate
    labels: pa.Array                       # of the schema's label type
    metadata: pa.Table                     # user columns, in schema order, cast to the schema
    schema: pa.Schema                      # the store's schema after this add

    @property
    def dimensions(self) -> list[int]:
        return sorted(self.arrays)

    def all_text_ids(self, row_id_start: int) -> pa.Array:
        """The given text ids, or ``row-<row_id>`` for rows from ``row_id_start``."""
        if self.text_ids is not None:
            return self.text_ids
        return pa.array([f"row-{r}" for r in range(row_id_start, row_id_start + self.num_rows)],
                        pa.string())

    def embeddings(self, dim: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of dimension ``dim`` as C-contiguous float32."""
        return np.ascontiguousarray(self.arrays[dim][start:stop], dtype=np.float32)

    def table(self, start: int, stop: int, row_id_start: int,
              text_ids: pa.Array | None = None, with_embeddings: bool = True) -> pa.Table:
        """The data-file table of rows ``start:stop`` with row ids from ``row_id_start``."""
        n = stop - start
        row_ids = np.arange(row_id_start, row_id_start + n, dtype=np.int64)
        ids = text_ids if text_ids is not None else self.text_ids
        if ids is None:
            ids = pa.array([f"row-{r}" for r in row_ids.tolist()], pa.string())
        else:
            ids = ids.slice(start, n)
        columns: dict[str, Any] = {ROW_ID: pa.array(row_ids), TEXT_ID: ids,
                                   LABEL: self.labels.slice(start, n)}
        for name in self.metadata.column_names:
            columns[name] = self.metadata.column(name).slice(start, n)
        fields = list(self.schema)
        for dim in self.dimensions if with_embeddings else []:
            x = self.embeddings(dim, start, stop)
            columns[emb_column(dim)] = pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), type=embedding_type(dim))
            fields.append(pa.field(emb_column(dim), embedding_type(dim), nullable=False))
        return pa.table(columns, schema=pa.schema(fields))


# -- embeddings -------------------------------------------------------------------------------

def as_embedding_matrix(x: Any, what: str = "embeddings") -> np.ndarray:
    """Any supported embedding input as a 2-D float16/32/64 NumPy array, checked for shape and dtype.

    Finite values are checked separately (:func:`check_finite`).
    """
    if isinstance(x, (pa.ChunkedArray, pa.Array)):
        return _from_arrow(x, what)
    module = framework_of(x)
    if module == "polars":
        return _from_arrow(x.to_arrow(), what)
    reject_sparse(x, what)
    if module in ("torch", "mlx"):
        x = to_numpy(x)
    elif isinstance(x, (list, tuple)):
        x = _from_nested(x, what)
    if not isinstance(x, np.ndarray):
        raise InvalidEmbeddingsError(
            f"{what}: expected an array (NumPy, torch, MLX, pyarrow, polars), got {type(x).__name__}")
    if x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8):
        pass
    elif x.dtype.kind == "O":
        raise InvalidEmbeddingsError(f"{what}: object arrays are not embeddings (ragged input?)")
    else:
        raise InvalidEmbeddingsError(
            f"{what}: dtype {x.dtype} cannot be stored safely as float32; pass float16, float32 "
            "or float64 values")
    if x.ndim != 2:
        raise InvalidEmbeddingsError(f"{what}: expected a 2-D (rows, dim) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidEmbeddingsError(f"{what}: empty array of shape {x.shape}")
    return x


def reject_sparse(x: Any, what: str) -> None:
    """InvalidEmbeddingsError for a sparse array (torch sparse COO/CSR/..., scipy.sparse)."""
    layout = str(getattr(x, "layout", ""))
    scipy_like = hasattr(x, "nnz") and callable(getattr(x, "toarray", None))
    if layout.startswith("torch.sparse") or getattr(x, "is_sparse", False) is True or scipy_like:
        raise InvalidEmbeddingsError(
            f"{what}: a sparse array ({type(x).__name__}, layout {layout or 'sparse'}); embeddings are "
            "dense: pass x.to_dense() (torch) or x.toarray() (scipy)")


def _from_nested(rows: Sequence[Any], what: str) -> np.ndarray:
    if len(rows) == 0:
        raise InvalidEmbeddingsError(f"{what}: empty list")
    width = None
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple, np.ndarray)):
            raise InvalidEmbeddingsError(f"{what}: row {i} is a {type(row).__name__}, not a vector")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise InvalidEmbeddingsError(
                f"{what}: ragged input, row {i} has length {len(row)}, row 0 has {width}")
    try:
        arr = np.asarray(rows)
    except (ValueError, TypeError) as exc:
        raise InvalidEmbeddingsError(f"{what}: not a numeric matrix ({exc})") from None
    if arr.dtype.kind in "iu":
        raise InvalidEmbeddingsError(
            f"{what}: integer values; pass floats (e.g. np.asarray(x, dtype=np.float32))")
    return arr


def _from_arrow(col: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = col.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise InvalidEmbeddingsError(f"{what}: Arrow column of type {t} is not a list of floats")
    if len(col) == 0:
        raise InvalidEmbeddingsError(f"{what}: empty column")
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidEmbeddingsError(f"{what}: row {first} is null")
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
    else:
        lengths = np.asarray(col.value_lengths().to_numpy(zero_copy_only=False))
        dim = int(lengths[0])
        bad = np.flatnonzero(lengths != dim)
        if bad.size:
            raise InvalidEmbeddingsError(
                f"{what}: ragged input, row {int(bad[0])} has length {int(lengths[bad[0]])}, "
                f"row 0 has {dim}")
    values = col.flatten()
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(dim, 1)
        raise InvalidEmbeddingsError(f"{what}: row {first} has a null value")
    vt = values.type
    if not pa.types.is_floating(vt):
        raise InvalidEmbeddingsError(f"{what}: values of type {vt} cannot be stored safely as float32")
    if dim == 0:
        raise InvalidEmbeddingsError(f"{what}: vectors of length 0")
    return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(col), dim)


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise InvalidEmbeddingsError naming the first row with NaN/inf or a value past float32 range."""
    rows = max(1, _CHECK_BYTES // max(1, x.shape[1] * x.itemsize))
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise InvalidEmbeddingsError(f"{what}: row {row} contains NaN or inf")
        if x.dtype.itemsize == 8:
            over = (np.abs(chunk) > _FLOAT32_MAX).any(axis=1)
            if over.any():
                row = start + int(np.flatnonzero(over)[0])
                raise InvalidEmbeddingsError(
                    f"{what}: row {row} has a value outside the float32 range")


def _embeddings(embeddings: Any, dimension: int | None) -> dict[int, np.ndarray]:
    if isinstance(embeddings, Mapping):
        if dimension is not None:
            raise InvalidArgumentError("pass either a {dim: array} mapping or dimension=, not both")
        if not embeddings:
            raise InvalidEmbeddingsError("embeddings: empty mapping")
        out: dict[int, np.ndarray] = {}
        for key, value in embeddings.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 1:
                raise InvalidArgumentError(f"embeddings mapping key {key!r} is not a dimension (int >= 1)")
            arr = as_embedding_matrix(value, f"embeddings[{int(key)}]")
            if arr.shape[1] != key:
                raise DimensionMismatchError(
                    f"embeddings[{int(key)}] has {arr.shape[1]} columns, expected {int(key)}")
            out[int(key)] = arr
        counts = {d: a.shape[0] for d, a in out.items()}
        if len(set(counts.values())) != 1:
            raise LengthMismatchError(f"embeddings of different dimensions have different row counts: {counts}")
        return out
    arr = as_embedding_matrix(embeddings)
    if dimension is not None:
        if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
            raise InvalidArgumentError(f"dimension must be an int >= 1, got {dimension!r}")
        if arr.shape[1] != dimension:
            raise DimensionMismatchError(
                f"embeddings have {arr.shape[1]} columns but dimension={int(dimension)}")
    return {int(arr.shape[1]): arr}


# -- ids, labels, metadata --------------------------------------------------------------------

def _column(values: Any, what: str) -> pa.Array:
    """A 1-D column (list, NumPy, pyarrow, polars) as a pyarrow Array."""
    module = framework_of(values)
    try:
        if module == "polars":
            arr = values.to_arrow()
        elif isinstance(values, pa.ChunkedArray):
            arr = values.combine_chunks()
        elif isinstance(values, pa.Array):
            arr = values
        elif isinstance(values, np.ndarray):
            if values.ndim != 1:
                raise InvalidArgumentError(f"{what}: expected a 1-D column, got shape {values.shape}")
            arr = pa.array(values.tolist() if values.dtype.kind in "OU" else values)
        elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise InvalidArgumentError(f"{what}: expected a sequence, got {type(values).__name__}")
        else:
            arr = pa.array(list(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaMismatchError(f"{what}: values of mixed or unsupported types ({exc})") from None
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what}: row {_bad_string_row(values)} is a string that is not "
                                   "valid Unicode (a lone surrogate?); it cannot be stored") from None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = normalize_type(arr.type)
    if t != arr.type:
        arr = arr.cast(t)
    return arr


def _bad_string_row(values: Any) -> int | str:
    """The first row of ``values`` holding a string UTF-8 cannot encode ('?' when not found)."""
    try:
        for i, v in enumerate(values):
            if isinstance(v, str) and not _encodable(v):
                return i
    except TypeError:
        pass
    return "?"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_ids(text_ids: Any, n: int) -> pa.Array | None:
    if text_ids is None:
        return None
    arr = _column(text_ids, "text_ids")
    if len(arr) != n:
        raise LengthMismatchError(f"{len(arr)} text_ids for {n} embedding rows")
    if not (pa.types.is_string(arr.type) or pa.types.is_null(arr.type)):
        raise InvalidArgumentError(f"text_ids must be strings, got {arr.type}")
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidArgumentError(f"text_ids: row {first} is null")
    ids = arr.to_pylist()
    seen: dict[str, int] = {}
    for i, t in enumerate(ids):
        if t in seen:
            raise DuplicateTextIdError(f"text id {t!r} occurs twice in the batch (rows {seen[t]} and {i})")
        seen[t] = i
    return arr.cast(pa.string())


def _labels(labels: Any, n: int, stored: pa.DataType, can_retype: bool) -> pa.Array:
    if labels is None:
        return pa.nulls(n, stored)
    arr = _column(labels, "labels")
    if len(arr) != n:
        raise LengthMismatchError(f"{len(arr)} labels for {n} embedding rows")
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(n, stored)
    if pa.types.is_integer(t):
        arr, t = arr.cast(pa.int64()), pa.int64()
    if not (pa.types.is_string(t) or t == pa.int64()):
        raise SchemaMismatchError(f"labels must be strings or integers, got {t}")
    if t != stored and not can_retype:
        raise SchemaMismatchError(f"labels of type {t} do not match the store's label type {stored}")
    return arr


def _metadata_table(metadata: Any, n: int) -> pa.Table:
    if metadata is None:
        return pa.table({})
    module = framework_of(metadata)
    if module == "polars" and hasattr(metadata, "to_arrow") and hasattr(metadata, "columns"):
        metadata = metadata.to_arrow()
    if isinstance(metadata, pa.RecordBatch):
        metadata = pa.Table.from_batches([metadata])
    if isinstance(metadata, pa.Table):
        items = list(zip(metadata.column_names, metadata.columns, strict=True))
    elif isinstance(metadata, Mapping):
        items = list(metadata.items())
    else:
        raise InvalidArgumentError(
            f"metadata must be a dict of columns, a polars DataFrame or a pyarrow Table, "
            f"got {type(metadata).__name__}")
    columns: dict[str, pa.Array] = {}
    for name, values in items:
        if not isinstance(name, str) or not name:
            raise SchemaMismatchError(f"metadata column name {name!r} is not a non-empty string")
        if not name.isprintable() or not _encodable(name):
            raise SchemaMismatchError(
                f"metadata column name {name!r} has control characters or invalid Unicode")
        if is_reserved(name):
            raise SchemaMismatchError(
                f"metadata column {name!r} uses a reserved name (row_id, text_id, label, emb_*); "
                "rename it")
        arr = _column(values, f"metadata[{name!r}]")
        if len(arr) != n:
            raise LengthMismatchError(f"metadata column {name!r} has {len(arr)} rows, embeddings have {n}")
        columns[name] = arr
    return pa.table(columns) if columns else pa.table({})


def prepare_batch(embeddings: Any, text_ids: Any = None, labels: Any = None, metadata: Any = None,
                  *, dimension: int | None = None, stored_dims: Sequence[int], schema: pa.Schema,
                  num_rows: int) -> Batch:
    """Validate one ``add()`` against the store state (``stored_dims``, ``schema``, ``num_rows``).

    Returns a :class:`Batch`; raises DimensionMismatchError, InvalidEmbeddingsError,
    LengthMismatchError, DuplicateTextIdError (within the batch), SchemaMismatchError or
    InvalidArgumentError. Duplicates against the store are checked by the store.
    """
    arrays = _embeddings(embeddings, dimension)
    n = next(iter(arrays.values())).shape[0]
    if num_rows > 0 and sorted(arrays) != sorted(stored_dims):
        raise DimensionMismatchError(
            f"the store holds dimensions {sorted(stored_dims)}, got {sorted(arrays)}; every add must "
            f"give all stored dimensions (pass a mapping {{dim: array}})")
    for dim, arr in arrays.items():
        check_finite(arr, f"embeddings[{dim}]" if len(arrays) > 1 else "embeddings")
    ids = _text_ids(text_ids, n)
    empty = num_rows == 0
    label_arr = _labels(labels, n, schema.field(LABEL).type, can_retype=empty)
    meta = _metadata_table(metadata, n)
    # Reconcile with the stored schema: cast nulls, refuse type changes, add missing and new columns.
    fields = [pa.field(ROW_ID, pa.int64(), nullable=False), pa.field(TEXT_ID, pa.string(), nullable=False),
              pa.field(LABEL, label_arr.type if empty else schema.field(LABEL).type)]
    out: dict[str, pa.Array] = {}
    user_stored = [f for f in schema if f.name not in (ROW_ID, TEXT_ID, LABEL)]
    for f in user_stored:
        if f.name in meta.column_names:
            arr = meta.column(f.name).combine_chunks()
            if pa.types.is_null(arr.type):
                arr = pa.nulls(n, f.type)
            elif arr.type != f.type:
                if pa.types.is_null(f.type) and empty:
                    f = pa.field(f.name, arr.type)
                else:
                    raise SchemaMismatchError(
                        f"metadata column {f.name!r} has type {arr.type}, the store has {f.type}")
            out[f.name] = arr
        else:
            out[f.name] = pa.nulls(n, f.type)
        fields.append(pa.field(f.name, f.type))
    for name in meta.column_names:
        if name not in out:
            arr = meta.column(name).combine_chunks()
            out[name] = arr
            fields.append(pa.field(name, arr.type))
    new_schema = pa.schema(fields)
    table = pa.table(out, schema=pa.schema(fields[3:])) if out else pa.table({})
    return Batch(n, arrays, ids, label_arr, table, new_schema)
