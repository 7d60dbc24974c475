"""Whole-store column changes of a store directory: attach a new dimension to every row, or clear.

:func:`add_dimension_files` rewrites each data file copy-on-write with one more ``emb_<d>`` column
(the other columns, row ids and row order unchanged; files stay plain Parquet) and commits the new
version atomically, like compact: when a concurrent writer changed the files or the dimensions
meanwhile, the commit raises :class:`~embtools.errors.CommitConflictError` and the store is as it
was. :func:`clear_files` commits a version with no rows and no dimensions (the seed's ``clear()``).

Examples
--------
>>> import tempfile, numpy as np
>>> from embtools.store import EmbeddingStore
>>> store = EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> x = np.arange(12, dtype=np.float32).reshape(3, 4)
>>> store.add_embeddings(x, dimension=4)
1
>>> m = add_dimension_files(store.path, store.source.manifest, 2, x[:, :2] * 10)
>>> m.dimensions, m.operation, m.num_rows
([2, 4], 'add_dimension', 3)
>>> clear_files(store.path, m).dimensions
[]
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtools.errors import CommitConflictError, CorruptStoreError, LengthMismatchError
from embtools.storage.datafile import embedding_array
from embtools.storage.io import LocalStorage, as_storage
from embtools.storage.manifest import DATA_DIR, FileEntry, Manifest, StoreRoot, commit, config_hash
from embtools.storage.schema import base_schema, emb_column
from embtools.storage.writer import _write as write_table

__all__ = ["add_dimension_files", "clear_files"]


def _rewrite(root: StoreRoot, entry: FileEntry, dim: int, rows: np.ndarray) -> FileEntry:
    """``entry``'s file with the column ``emb_<dim>`` (``rows``) appended, as a new data file."""
    src = as_storage(root).fetch(entry.path)
    try:
        table = pq.read_table(src)
    except (OSError, pa.ArrowException) as exc:
        raise CorruptStoreError(f"{src}: cannot read ({exc})") from exc
    if table.num_rows != entry.num_rows:
        raise CorruptStoreError(
            f"{src}: holds {table.num_rows} rows, the manifest says {entry.num_rows}")
    table = table.append_column(emb_column(dim), embedding_array(rows))
    # the writer's own file writing (checks, file entry), so the new file is like any other
    return write_table(root, table)


def unchanged_since(root: StoreRoot, base: Manifest, latest: Manifest | None,
                    operation: str) -> Manifest:
    """``latest`` when it still holds ``base``'s files and dimensions (what a rewrite of every
    file was computed from); CommitConflictError when a concurrent writer changed them,
    CorruptStoreError when nothing is committed.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from embtools.store import EmbeddingStore
    >>> store = EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
    >>> _ = store.add_embeddings(np.ones((2, 4), np.float32), dimension=4)
    >>> m = store.source.manifest
    >>> unchanged_since(store.path, m, m, "quantize") is m
    True
    >>> unchanged_since(store.path, m, None, "quantize")
    Traceback (most recent call last):
    ...
    embtools.errors.CorruptStoreError: ...: the store has no committed version
    """
    if latest is None:
        raise CorruptStoreError(f"{root}: the store has no committed version")
    if ([f.path for f in latest.files] != [f.path for f in base.files]
            or latest.dimensions != base.dimensions):
        raise CommitConflictError(
            f"{operation}: a concurrent writer changed the store (version {latest.version}); "
            "re-open the store and retry")
    return latest


def add_dimension_files(root: StoreRoot, base: Manifest, dim: int, embeddings: np.ndarray) -> Manifest:
    """Commit ``base`` with dimension ``dim`` added: row ``i`` of ``embeddings`` (float32, one row
    per stored row, in row order) goes to the ``i``-th stored row."""
    n = base.num_rows
    if embeddings.shape != (n, dim):
        raise LengthMismatchError(
            f"add_dimension({dim}) needs an array of shape ({n}, {dim}), got {embeddings.shape}")
    new: list[FileEntry] = []
    start = 0
    for entry in base.files:
        new.append(_rewrite(root, entry, dim, embeddings[start:start + entry.num_rows]))
        start += entry.num_rows
    storage = as_storage(root)
    if isinstance(storage, LocalStorage):
        storage.sync(DATA_DIR)
    dims = sorted([*base.dimensions, dim])

    def rebase(latest: Manifest | None) -> Manifest:
        latest = unchanged_since(root, base, latest, "add_dimension")
        return replace(latest, operation="add_dimension", files=new, dimensions=dims,
                       config_hash=config_hash(dims, latest.schema, latest.properties))

    return commit(root, rebase)


def clear_files(root: StoreRoot, base: Manifest) -> Manifest:
    """Commit a version with no rows, no dimensions and no metadata columns (properties kept)."""
    schema = base_schema()

    def rebase(latest: Manifest | None) -> Manifest:
        if latest is None:
            raise CorruptStoreError(f"{root}: the store has no committed version")
        return replace(latest, operation="clear", files=[], dimensions=[], schema=schema, indexes=[],
                       quantized={}, config_hash=config_hash([], schema, latest.properties))

    return commit(root, rebase)
