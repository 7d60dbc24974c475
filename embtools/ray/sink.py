"""StoreDatasink: a Ray Data sink whose workers write data files and whose driver commits them.

``dataset.write_datasink(StoreDatasink(store))`` stores every row of a Ray dataset as **one new
version** of ``store``:

- the write half (:meth:`StoreDatasink.write`, in Ray's write tasks) validates each block as
  ``store.add`` does (dimensions, NaN/inf, lengths, text ids within the block, metadata types)
  and writes it with :func:`embtools.storage.writer.write_files` (aligned pages, checksums,
  fsynced), returning the file entries, not committing them;
- the commit half (:meth:`StoreDatasink.on_write_complete`, on the driver) publishes all the
  entries as one version with :func:`embtools.storage.writer.commit_files`: the commit path and
  checks of ``add`` (duplicate text ids across blocks and against the store, dimensions), with
  ``job_id`` recorded in the manifest. A retried write task's lost attempt is never committed
  (its files are orphans that ``vacuum`` removes); a job whose id is already recorded commits
  nothing.

Input columns: ``emb_<d>`` embedding columns (Ray tensor columns, fixed-size or plain lists of
floats), the text id and label columns (``id_column``, ``label_column``), and metadata columns
(``metadata_columns``; None: every other column).

Examples
--------
The two halves run without a cluster (Ray calls them in its tasks and on the driver):

>>> import tempfile, numpy as np, pyarrow as pa, embtools as et
>>> from ray.data.datasource import WriteResult
>>> store = et.EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> sink = StoreDatasink(store, job_id="demo-1")
>>> block = pa.table({"text_id": ["a", "b"], "emb_2": [[1.0, 0.0], [0.0, 1.0]]})
>>> sink.on_write_start(block.schema)
>>> result = sink.write([block], None)
>>> sink.on_write_complete(WriteResult(2, 0, [result]))
>>> sink.version, store.refresh(), store.get_text_ids()
(1, 1, ['a', 'b'])
>>> again = StoreDatasink(store, job_id="demo-1")
>>> again.on_write_start(block.schema)
>>> again.on_write_complete(WriteResult(2, 0, [again.write([block], None)]))
>>> again.committed, store.refresh()
(False, 1)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Datasink

from embtools.errors import InvalidArgumentError, InvalidEmbeddingsError, SchemaMismatchError
from embtools.memory import MemoryBudget
from embtools.ray.faults import crash_point
from embtools.storage.ingest import prepare_batch
from embtools.storage.manifest import FileEntry, check_job_id, read_manifest
from embtools.storage.schema import (
    LABEL,
    ROW_ID,
    TEXT_ID,
    is_reserved,
    normalize_type,
    parse_emb_column,
    schema_from_json,
    schema_to_json,
)
from embtools.storage.writer import commit_files, write_files

__all__ = [
    "StoreDatasink",
    "block_matrix",
    "open_store_storage",
    "store_options",
    "store_root",
]

#: Target size of the files one write task writes (a task writes at least one file per block).
DEFAULT_FILE_BYTES = 64 * 1024**2


def store_root(store: Any) -> str:
    """The directory or URL of ``store`` (an EmbeddingStore, a path or a URL);
    InvalidArgumentError for an in-memory store, which cluster workers cannot reach."""
    from embtools.storage.io import is_url

    path = store if isinstance(store, (str, os.PathLike)) else getattr(store, "path", None)
    if path is None:
        raise InvalidArgumentError(
            "Ray jobs need a store that every worker can reach (a directory or a URL), not an "
            "in-memory store; save it with store.save_to_disk(path) first")
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


def store_options(store: Any, storage_options: Mapping[str, Any] | None = None
                  ) -> dict[str, Any] | None:
    """The storage options the workers open ``store`` with: ``storage_options`` when given, else
    those of an EmbeddingStore (None for a directory)."""
    if storage_options is not None:
        return dict(storage_options)
    return dict(getattr(store, "storage_options", None) or {}) or None


def open_store_storage(root: str, options: Mapping[str, Any] | None) -> Any:
    """The :class:`~embtools.storage.io.Storage` of a store directory or URL."""
    from embtools.storage.state import open_storage

    return open_storage(root, dict(options) if options else None)


def block_matrix(column: pa.ChunkedArray | pa.Array, what: str) -> Any:
    """An embedding column of a Ray block as a 2-D array (Ray tensor columns included)."""
    from embtools.storage.ingest import as_embedding_matrix

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if chunks and isinstance(chunks[0].type, pa.ExtensionType) and hasattr(chunks[0], "to_numpy"):
        parts = [np.asarray(c.to_numpy()) for c in chunks if len(c)]
        if not parts or parts[0].ndim != 2:
            raise InvalidEmbeddingsError(f"{what}: a tensor column of shape other than (rows, dim)")
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return as_embedding_matrix(arr, what)
    return as_embedding_matrix(column, what)


class StoreDatasink(Datasink[dict[str, Any]]):
    """Write a Ray dataset into an embtools store as one version (see the module docstring).

    Parameters
    ----------
    store : an EmbeddingStore backed by a directory every worker reaches, or its path.
    id_column, label_column : input columns of the text ids (None: ``row-<row_id>``) and labels
        (absent: no labels).
    metadata_columns : input columns stored as metadata (None: every column that is not an id,
        label or ``emb_<d>`` column).
    job_id : recorded in the manifest; a job with a recorded id commits nothing (re-runs,
        retries). None: no record.
    properties : merged into the store properties in the same commit (e.g. the model record).
    target_file_bytes : size of the data files a write task writes.
    storage_options : for a store URL given as a string (an EmbeddingStore brings its own).
    """

    def __init__(self, store: Any, *, id_column: str | None = TEXT_ID,
                 label_column: str | None = LABEL, metadata_columns: Sequence[str] | None = None,
                 job_id: str | None = None, properties: Mapping[str, Any] | None = None,
                 target_file_bytes: int = DEFAULT_FILE_BYTES,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.root = store_root(store)
        self.storage_options = store_options(store, storage_options)
        self.id_column = id_column
        self.label_column = label_column
        self.metadata_columns = None if metadata_columns is None else list(metadata_columns)
        self.job_id = None if job_id is None else check_job_id(job_id)
        self.properties = dict(properties or {})
        self.target_file_bytes = int(target_file_bytes)
        self.version: int | None = None
        self.committed = False
        self._schema: dict[str, Any] | None = None
        self._dims: list[int] | None = None
        self._settled = False

    # -- driver: before the write tasks ----------------------------------------------------------
    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        """Fix the stored schema from the store's latest version and the input's schema."""
        latest = read_manifest(self._storage())
        target = latest.schema
        settled = latest.num_rows > 0
        dims = list(latest.dimensions) if settled else None
        if schema is not None:
            names = schema.names
            given = sorted(d for n in names if (d := parse_emb_column(n)) is not None)
            if dims is None and given:
                dims = given
            if self.label_column in names and not settled:
                t = normalize_type(schema.field(self.label_column).type)
                if pa.types.is_integer(t):
                    t = pa.int64()
                if pa.types.is_string(t) or t == pa.int64():
                    target = target.set(target.get_field_index(LABEL), pa.field(LABEL, t))
                    settled = True
            for name in self._metadata_names(names):
                t = normalize_type(schema.field(name).type)
                if name not in target.names and not pa.types.is_null(t):
                    target = target.append(pa.field(name, t))
        self._schema = schema_to_json(target)
        self._dims = dims
        self._settled = settled

    def _storage(self) -> Any:
        return open_store_storage(self.root, self.storage_options)

    def _remove(self, storage: Any, entries: Sequence[Any]) -> None:
        for e in entries:
            with contextlib.suppress(Exception):
                storage.delete(e.path if hasattr(e, "path") else e)

    def _metadata_names(self, names: Sequence[str]) -> list[str]:
        if self.metadata_columns is not None:
            missing = [m for m in self.metadata_columns if m not in names]
            if missing:
                raise InvalidArgumentError(f"metadata columns {missing} are not in the dataset "
                                           f"(its columns: {list(names)})")
            return list(self.metadata_columns)
        skip = {self.id_column, self.label_column, ROW_ID}  # row ids are the store's to assign
        return [n for n in names if n not in skip and parse_emb_column(n) is None]

    # -- workers: the write half -----------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """Validate and write each block as data files; returns their entries (not committed)."""
        from ray.data.block import BlockAccessor

        if self._schema is None:
            self.on_write_start(None)
        assert self._schema is not None
        schema = schema_from_json(self._schema)
        entries: list[dict[str, Any]] = []
        written: list[FileEntry] = []
        out_schema = schema
        dims = self._dims
        storage = self._storage()
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if table.num_rows == 0:
                    continue
                batch = self._batch(table, schema, dims)
                dims = batch.dimensions
                out_schema = _merge(out_schema, batch.schema)
                files = write_files(storage, batch, MemoryBudget(None), self.target_file_bytes)
                written.extend(files)
        except BaseException:
            self._remove(storage, written)  # nothing of a failed task is committed
            raise
        crash_point("sink_write")  # test hook: the worker dies with its files written
        entries = [f.to_json() for f in written]
        return {"files": entries, "dims": dims, "schema": schema_to_json(out_schema)}

    def _batch(self, table: pa.Table, schema: pa.Schema, dims: list[int] | None) -> Any:
        names = table.column_names
        arrays = {d: block_matrix(table.column(n), n)
                  for n in names if (d := parse_emb_column(n)) is not None}
        if not arrays:
            raise InvalidEmbeddingsError(
                f"the dataset has no emb_<dim> embedding column (its columns: {names})")
        for name in (self.id_column, self.label_column):
            if name is not None and name not in names and name not in (TEXT_ID, LABEL):
                raise InvalidArgumentError(f"column {name!r} is not in the dataset (its columns: {names})")
        ids = table.column(self.id_column) if self.id_column in names else None
        labels = table.column(self.label_column) if self.label_column in names else None
        meta_names = self._metadata_names(names)
        bad = [m for m in meta_names if is_reserved(m)]
        if bad:
            raise SchemaMismatchError(f"metadata columns {bad} use reserved names")
        meta = table.select(meta_names) if meta_names else None
        # the schema and dimensions were fixed by the driver (on_write_start), so every block is
        # checked against them as an add to a store holding rows is
        return prepare_batch(arrays, ids, labels, meta, stored_dims=dims or sorted(arrays),
                             schema=schema, num_rows=1 if (self._settled or dims) else 0)

    # -- driver: the commit half -----------------------------------------------------------------
    def on_write_complete(self, write_result: Any) -> None:
        """Commit every write task's files as one version (nothing when the job is recorded)."""
        returns = [r for r in write_result.write_returns if r and r.get("files")]
        entries = [FileEntry.from_json(f) for r in returns for f in r["files"]]
        storage = self._storage()
        if not entries:
            self.version = read_manifest(storage).version
            return
        dims = {tuple(r["dims"]) for r in returns}
        if len(dims) != 1:
            self._remove(storage, entries)
            raise SchemaMismatchError(f"the write tasks stored different dimensions: {sorted(dims)}")
        schema = schema_from_json(returns[0]["schema"])
        try:
            for r in returns[1:]:
                schema = _merge(schema, schema_from_json(r["schema"]))
        except SchemaMismatchError:
            self._remove(storage, entries)
            raise
        stored = list(next(iter(dims)))
        manifest = commit_files(storage, entries, stored, schema,
                                self.commit_properties(stored), self.job_id)
        self.committed = manifest is not None
        self.version = (manifest or read_manifest(storage)).version


    def commit_properties(self, dims: list[int]) -> dict[str, Any]:
        """The properties merged into the store by the commit (``properties``; a subclass may
        add what depends on the dimensions written)."""
        return dict(self.properties)


def _merge(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    """``a`` with ``b``'s new columns; SchemaMismatchError when a column's types differ."""
    out = a
    for f in b:
        if f.name not in out.names:
            out = out.append(f)
            continue
        t = out.field(f.name).type
        if t != f.type and not pa.types.is_null(f.type):
            if pa.types.is_null(t):
                out = out.set(out.get_field_index(f.name), f)
            else:
                raise SchemaMismatchError(
                    f"column {f.name!r} has type {t} in one block and {f.type} in another; give "
                    "every block the same types (cast the dataset)")
    return out


