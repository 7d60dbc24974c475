"""The write side of a store: append, delete, compact and save, each one commit.

Every operation writes its data files first (fsynced under ``data/``, and uploaded on an object
store), then commits a manifest with :func:`embtools.storage.manifest.commit`. ``root`` is the store
directory or its :class:`~embtools.storage.io.Storage`. Conflicts with concurrent writers:

- append rebases onto whatever was committed meanwhile (its files join the latest file list; its
  text ids are re-checked against the files added since its base version). Its row ids come from
  the ``next_row_id`` it read; when another writer's commit took them first, it writes its files
  again with the next free ids (and default text ids ``row-<row_id>`` to match) and retries;
- delete and compact need all their input files in the latest version; when another writer removed
  one (a concurrent delete or compact), they raise :class:`~embtools.errors.CommitConflictError`;
  re-open the store and retry.

A distributed add splits append in two: :func:`write_files` on the workers (data files, not
committed) and :func:`commit_files` on the driver (one version, append's validation, a job id that
makes a retried or re-run job commit nothing).

An operation that fails before its commit (a conflict, a duplicate id, a full disk: then
:class:`~embtools.errors.StorageFullError`) removes the data files it wrote; the store is unchanged.

Examples
--------
>>> rows_per_file(bytes_per_row=1024, target_bytes=10 * 1024, cap_free=None)
10
>>> rows_per_file(bytes_per_row=1024, target_bytes=10 * 1024, cap_free=4096)
2
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embtools.errors import (
    CommitConflictError,
    CorruptStoreError,
    DimensionMismatchError,
    DuplicateTextIdError,
    EmbtoolsError,
    SchemaMismatchError,
    StorageFullError,
)
from embtools.memory import MemoryBudget
from embtools.storage.datafile import MappedParquetFile, write_data_file
from embtools.storage.ingest import Batch
from embtools.storage.io import LocalStorage, Storage, as_storage
from embtools.storage.manifest import (
    DATA_DIR,
    FileEntry,
    Manifest,
    StoreRoot,
    commit,
    config_hash,
    crash_point,
    latest_version,
    new_data_path,
    read_manifest,
)
from embtools.storage.quantspec import QuantSpec, add_code_columns
from embtools.storage.schema import LABEL, ROW_ID, TEXT_ID, emb_column, embedding_type
from embtools.storage.verify import check_file, file_checksums

__all__ = [
    "append",
    "commit_files",
    "compact_files",
    "delete_rows",
    "rows_per_file",
    "save_source",
    "write_files",
]

_FULL = (errno.ENOSPC, errno.EDQUOT)


def rows_per_file(bytes_per_row: int, target_bytes: int, cap_free: int | None) -> int:
    """Rows per data file: ``target_bytes`` worth, and at most half the free memory budget."""
    rows = max(1, target_bytes // max(1, bytes_per_row))
    if cap_free is not None:
        rows = min(rows, max(1, cap_free // (2 * max(1, bytes_per_row))))
    return int(rows)


class _Write:
    """The data files one operation writes: removed again, and ENOSPC/EDQUOT turned into
    StorageFullError, when the operation fails before its commit publishes them.

    A failed commit thus leaves nothing behind; a SIGKILL may still leave unreferenced files,
    which vacuum removes after its grace period.
    """

    def __init__(self, root: StoreRoot, version: int) -> None:
        self.storage = as_storage(root)
        self.root = self.storage.url
        self.version = version
        self.keys: list[str] = []

    def __enter__(self) -> _Write:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        self.discard()
        if isinstance(exc, OSError) and exc.errno in _FULL and not isinstance(exc, EmbtoolsError):
            raise StorageFullError(
                f"{self.root}: no space left on the device ({exc.strerror}); nothing was committed "
                f"and the store is unchanged (version {self.version})") from exc

    def discard(self) -> None:
        """Remove the files written so far (local copies and uploaded objects)."""
        for key in self.keys:
            with contextlib.suppress(OSError):
                os.unlink(self.storage.local_path(key))
            if not self.storage.is_local:
                with contextlib.suppress(Exception):
                    self.storage.delete(key)
        self.keys.clear()

    def file(self, table: pa.Table, row_group_rows: int | None = None) -> FileEntry:
        """Write ``table`` as a new data file (see :func:`_write`)."""
        return _write(self.storage, table, row_group_rows, self.keys)


def _write(root: StoreRoot, table: pa.Table, row_group_rows: int | None = None,
           written: list[str] | None = None) -> FileEntry:
    """Write ``table`` as a new data file of the store and publish it (upload on an object store);
    its manifest entry. ``written`` collects the new file's key before anything is written."""
    storage = as_storage(root)
    rel, path = new_data_path(storage)
    if written is not None:
        written.append(rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nbytes = write_data_file(path, table, row_group_rows=row_group_rows)
    md = pq.read_metadata(path)
    row_ids = table.column(ROW_ID).to_numpy()
    entry = FileEntry(rel, table.num_rows, int(row_ids.min()), int(row_ids.max()), int(nbytes),
                      [int(md.row_group(i).num_rows) for i in range(md.num_row_groups)],
                      *file_checksums(path))
    storage.upload(rel)
    return entry


def _sorted(files: Sequence[FileEntry]) -> list[FileEntry]:
    return sorted(files, key=lambda f: f.row_id_min)


def existing_text_id(root: StoreRoot, files: Sequence[FileEntry], ids: pa.Array) -> str | None:
    """The first of ``ids`` already present in ``files``, or None."""
    if not files or len(ids) == 0:
        return None
    storage = as_storage(root)
    paths = [storage.fetch(f.path) for f in files]
    for f in files:  # path, footer and text_id pages checked before polars reads them
        check_file(storage.local_root, f, [TEXT_ID])
    wanted = pl.Series("ids", ids.to_pylist(), dtype=pl.String)
    # files may differ in their metadata columns (a later add brought a new one): read text_id only
    try:
        hits = (pl.scan_parquet(paths, glob=False, schema={TEXT_ID: pl.String}, extra_columns="ignore")
                .filter(pl.col(TEXT_ID).is_in(wanted.implode())).head(1).collect())
    except (pl.exceptions.PanicException, pl.exceptions.PolarsError, OSError) as exc:
        raise CorruptStoreError(f"{storage.url}: cannot read the stored text ids ({exc})") from None
    return None if hits.height == 0 else str(hits[TEXT_ID][0])


def _merge_schema(latest: Manifest, schema: pa.Schema) -> pa.Schema:
    fields = list(latest.schema)
    names = {f.name: i for i, f in enumerate(fields)}
    for f in schema:
        if f.name in names:
            old = fields[names[f.name]]
            if old.type != f.type:
                if latest.num_rows:
                    raise CommitConflictError(
                        f"column {f.name!r}: a concurrent writer stored type {old.type}, this add has "
                        f"{f.type}")
                fields[names[f.name]] = f
        else:
            fields.append(f)
    return pa.schema(fields)


def _finish_data(storage: Storage) -> None:
    if isinstance(storage, LocalStorage):
        storage.sync(DATA_DIR)
    crash_point("after_data")


def _write_rows(w: _Write, batch: Batch, start: int, ids: pa.Array, budget: MemoryBudget,
                target_bytes: int, codes: dict[int, QuantSpec]) -> list[FileEntry]:
    """Write the rows of ``batch`` (row ids from ``start``) as data files of ``target_bytes``,
    with the quantized columns ``codes`` (the store's) encoded from their vectors."""
    n = batch.num_rows
    bytes_per_row = sum(batch.dimensions) * 4 + 64
    rows = rows_per_file(bytes_per_row, target_bytes, budget.available_bytes)
    entries = []
    for s in range(0, n, rows):
        e = min(n, s + rows)
        table = batch.table(s, e, start + s, text_ids=ids)
        entries.append(w.file(add_code_columns(table, codes) if codes else table))
    return entries


class _JobDone(Exception):
    """Raised by an add's rebase when its job id is already committed (nothing to do)."""


class _RowIdsTaken(Exception):
    """An add's row ids were taken by a commit of another writer (internal: it rewrites)."""

    def __init__(self, latest: Manifest) -> None:
        super().__init__(latest.version)
        self.latest = latest


_MAX_REWRITES = 1000


def _add_rebase(storage: Storage, current: Manifest, entries: list[FileEntry], ids: pa.Array,
                dims: list[int], schema: pa.Schema, properties: dict[str, Any],
                job_id: str | None, start: int, codes: dict[int, QuantSpec] | None = None) -> Any:
    """The rebase of an add: its files (row ids from ``start``) on top of the latest version,
    after checking the text ids of the files committed since ``current``, the dimensions, that
    its row ids are still free (else :class:`_RowIdsTaken`) and (``codes``: the quantized columns
    the files were written with) that nobody quantized the store meanwhile."""
    known = {f.path for f in current.files}
    next_row_id = start + sum(e.num_rows for e in entries)

    def rebase(latest: Manifest | None) -> Manifest:
        if latest is None:
            raise CorruptStoreError(f"{storage.url}: the store has no committed version")
        if job_id is not None and job_id in latest.jobs:
            raise _JobDone(job_id)
        if latest.version != current.version:
            added = [f for f in latest.files if f.path not in known]
            dup = existing_text_id(storage, added, ids)
            if dup is not None:
                raise DuplicateTextIdError(f"text id {dup!r} was added by a concurrent writer")
            if latest.num_rows and sorted(latest.dimensions) != dims:
                raise CommitConflictError(
                    f"a concurrent writer stored dimensions {latest.dimensions}, this add has {dims}")
        if latest.next_row_id != start:
            raise _RowIdsTaken(latest)
        if codes is not None and latest.quantized != codes:
            raise CommitConflictError(
                "a concurrent writer quantized the store meanwhile; re-open it and add again")
        merged = _merge_schema(latest, schema)
        props = {**latest.properties, **properties}
        jobs = latest.jobs if job_id is None else (*latest.jobs, job_id)
        return replace(latest, operation="add", files=_sorted([*latest.files, *entries]),
                       dimensions=dims, schema=merged, properties=props, jobs=jobs,
                       config_hash=config_hash(dims, merged, props), next_row_id=next_row_id)

    return rebase


def append(root: StoreRoot, base: Manifest, batch: Batch, properties: dict[str, Any],
           budget: MemoryBudget, target_bytes: int) -> Manifest:
    """Write ``batch`` as new data files and commit them on top of the latest version.

    Text ids are checked against the latest version, not only ``base``: another process may have
    compacted the store and vacuumed ``base``'s files away (a long-lived handle then rebases).
    Row ids start at the latest ``next_row_id``; when a concurrent commit takes them first, the
    files are written again with the next free ids (see the module doc).
    """
    storage = as_storage(root)
    with _Write(storage, base.version) as w:
        current = base
        for _ in range(_MAX_REWRITES):
            start = _latest(storage, current).next_row_id
            ids = batch.all_text_ids(start)
            current = _check_new_ids(storage, current, ids)
            if current.next_row_id != start:  # a commit landed meanwhile: its ids first
                continue
            entries = _write_rows(w, batch, start, ids, budget, target_bytes,
                                  current.quantized)
            _finish_data(storage)
            try:
                return commit(storage, _add_rebase(storage, current, entries, ids, batch.dimensions,
                                                   batch.schema, properties, None, start,
                                                   current.quantized))
            except _RowIdsTaken as taken:
                w.discard()
                current = taken.latest
        raise CommitConflictError(f"{storage.url}: could not commit an add after {_MAX_REWRITES} "
                                  "attempts (other writers kept taking its row ids)")
    raise AssertionError("unreachable")  # pragma: no cover


def write_files(root: StoreRoot, batch: Batch, budget: MemoryBudget, target_bytes: int
                ) -> list[FileEntry]:
    """The write half of a distributed add: ``batch``'s rows as data files, not committed.

    The files are written as :func:`append` writes them (aligned pages, checksums, fsynced or
    uploaded), with provisional row ids from the latest ``next_row_id``: :func:`commit_files`
    (on any machine) assigns the final ids and publishes them. Files that are never committed are
    removed by ``vacuum`` after its grace period. Text ids are checked by the commit, not here.
    """
    storage = as_storage(root)
    latest = read_manifest(storage)
    with _Write(storage, latest.version) as w:
        start = latest.next_row_id
        entries = _write_rows(w, batch, start, batch.all_text_ids(start), budget, target_bytes,
                              latest.quantized)
        _finish_data(storage)
    return entries


def commit_files(root: StoreRoot, entries: Sequence[FileEntry], dims: Sequence[int],
                 schema: pa.Schema, properties: dict[str, Any], job_id: str | None = None
                 ) -> Manifest | None:
    """The commit half of a distributed add: publish the files of :func:`write_files` calls as
    one version, with the validation of :func:`append`.

    Each file is checked (footer, text-id pages, its columns against ``dims`` and ``schema``); the
    text ids must be unique across the files and new to the store (DuplicateTextIdError), the
    dimensions those stored (DimensionMismatchError). Row ids are assigned here, in the order of
    ``entries`` from the latest ``next_row_id``: a file whose provisional ids differ is written
    again with its final ids (default text ids ``row-<id>`` follow). ``job_id`` is recorded in the
    manifest: when the latest version already records it (a retried or re-run job), nothing is
    committed and None is returned. On any failure, and when nothing is committed, the files are
    removed.
    """
    storage = as_storage(root)
    entries = list(entries)
    dims = sorted(int(d) for d in dims)
    w = _Write(storage, 0)
    try:
        latest = read_manifest(storage)
        for _ in range(_MAX_REWRITES):
            if job_id is not None and job_id in latest.jobs:
                raise _JobDone(job_id)
            if latest.num_rows and sorted(latest.dimensions) != dims:
                raise DimensionMismatchError(
                    f"the store holds dimensions {sorted(latest.dimensions)}, the written files have {dims}")
            start = latest.next_row_id
            entries = _renumber(w, storage, entries, start)
            ids = _written_ids(storage, entries, dims, schema, latest.quantized)
            current = _check_new_ids(storage, latest, ids)
            if current.next_row_id != start:
                latest = current
                continue
            with contextlib.suppress(OSError):
                _finish_data(storage)
            try:
                return commit(storage, _add_rebase(storage, current, entries, ids, dims, schema,
                                                   dict(properties), job_id, start))
            except _RowIdsTaken as taken:
                latest = taken.latest
        raise CommitConflictError(f"{storage.url}: could not commit after {_MAX_REWRITES} attempts "
                                  "(other writers kept taking its row ids)")
    except BaseException as exc:
        for e in entries:
            _remove_file(storage, e.path)
        w.discard()
        if isinstance(exc, _JobDone):
            return None
        raise


def _remove_file(storage: Storage, key: str) -> None:
    """Remove an uncommitted data file (its local copy and, on an object store, the object)."""
    with contextlib.suppress(OSError):
        os.unlink(storage.local_path(key))
    if not storage.is_local:
        with contextlib.suppress(Exception):
            storage.delete(key)


def _renumber(w: _Write, storage: Storage, entries: list[FileEntry], start: int) -> list[FileEntry]:
    """``entries`` with row ids ``start, start+1, ...`` in their order: a file holding other ids is
    written again with these (text ids ``row-<old id>`` become ``row-<new id>``) and removed."""
    out: list[FileEntry] = []
    s = start
    for e in entries:
        n = e.num_rows
        if n == 0 or (e.row_id_min == s and e.row_id_max == s + n - 1):
            out.append(e)
            s += n
            continue
        table = _read(storage, e)
        old = table.column(ROW_ID).to_numpy()
        new = np.arange(s, s + n, dtype=np.int64)
        texts = table.column(TEXT_ID).to_pylist()
        texts = [f"row-{b}" if t == f"row-{a}" else t
                 for t, a, b in zip(texts, old.tolist(), new.tolist(), strict=True)]
        i, j = table.schema.get_field_index(ROW_ID), table.schema.get_field_index(TEXT_ID)
        table = table.set_column(i, table.schema.field(i), pa.array(new, pa.int64()))
        table = table.set_column(j, table.schema.field(j), pa.array(texts, pa.string()))
        out.append(w.file(table))
        _remove_file(storage, e.path)
        s += n
    return out


def _written_ids(storage: Storage, entries: list[FileEntry], dims: list[int], schema: pa.Schema,
                 codes: dict[int, QuantSpec]) -> pa.Array:
    """The text ids of the written files, after checking each file (its embedding and quantized
    columns those of the store) and that no id repeats."""
    want = {emb_column(d) for d in dims} | {c for spec in codes.values() for c in spec.columns}
    chunks = []
    for e in entries:
        path = storage.fetch(e.path)
        check_file(storage.local_root, e, [TEXT_ID])  # the path, footer and text-id pages
        names = pq.read_schema(path).names
        got = {n for n in names if n.startswith("emb_")}
        if got != want or names[:3] != [ROW_ID, TEXT_ID, LABEL]:
            raise DimensionMismatchError(
                f"{e.path}: columns {names} do not hold exactly the dimensions {dims}"
                + (f" and the quantized columns {sorted(want - {emb_column(d) for d in dims})} "
                   "(was the store quantized while the files were written?)" if codes else ""))
        unknown = [n for n in names if n not in want and n not in schema.names]
        if unknown:
            raise SchemaMismatchError(f"{e.path}: columns {unknown} are not in the schema")
        chunks.append(pq.read_table(path, columns=[TEXT_ID])[TEXT_ID])
    ids = pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string()).combine_chunks()
    if len(ids) != sum(e.num_rows for e in entries):
        raise CorruptStoreError(f"{storage.url}: the written files do not hold the rows their entries list")
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise DuplicateTextIdError(f"text id {repeated[0].as_py()!r} occurs in more than one row "
                                   "of the written files")
    return ids


def _latest(storage: Storage, known: Manifest) -> Manifest:
    """The latest manifest (``known`` when nothing newer was committed)."""
    return known if latest_version(storage) == known.version else read_manifest(storage)


def _check_new_ids(root: StoreRoot, base: Manifest, ids: pa.Array, attempts: int = 5) -> Manifest:
    """The latest manifest, after checking that none of ``ids`` is in it (DuplicateTextIdError).

    When its files vanish while they are read (a compact and vacuum elsewhere), the check runs
    again on the newer version.
    """
    storage = as_storage(root)
    for attempt in range(attempts):
        current = _latest(storage, base)
        try:
            dup = existing_text_id(storage, current.files, ids)
        except Exception as exc:  # a file vanished (FileNotFoundError, polars' errors) or is damaged
            if attempt + 1 < attempts and latest_version(storage) != current.version:
                continue
            raise CorruptStoreError(f"{storage.url}: cannot read the text ids of version "
                                    f"{current.version} ({' '.join(str(exc).split())[:300]})") from None
        if dup is not None:
            raise DuplicateTextIdError(f"text id {dup!r} is already in the store")
        return current
    raise AssertionError("unreachable")  # pragma: no cover


def _needs_inputs(root: StoreRoot, inputs: set[str], operation: str, new: list[FileEntry]
                  ) -> Any:
    url = as_storage(root).url

    def rebase(latest: Manifest | None) -> Manifest:
        if latest is None:
            raise CorruptStoreError(f"{url}: the store has no committed version")
        present = {f.path for f in latest.files}
        missing = inputs - present
        if missing:
            raise CommitConflictError(
                f"{operation}: a concurrent writer removed {len(missing)} of its input files "
                f"(version {latest.version}); re-open the store and retry")
        files = [f for f in latest.files if f.path not in inputs] + new
        return replace(latest, operation=operation, files=_sorted(files))
    return rebase


def _read(root: StoreRoot, entry: FileEntry) -> pa.Table:
    storage = as_storage(root)
    path = storage.fetch(entry.path)
    check_file(storage.local_root, entry, full=True)  # every page's CRC, before rows are rewritten
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorruptStoreError(f"{storage.display(entry.path)}: cannot read ({exc})") from exc


def delete_rows(root: StoreRoot, snapshot: Any, positions: np.ndarray) -> Manifest:
    """Rewrite the files holding ``positions`` without them (copy-on-write) and commit."""
    storage = as_storage(root)
    base: Manifest = snapshot.manifest
    starts = np.cumsum([0] + [f.num_rows for f in base.files])
    file_idx = np.searchsorted(starts, positions, side="right") - 1
    inputs: set[str] = set()
    new: list[FileEntry] = []
    with _Write(storage, base.version) as w:
        for i in np.unique(file_idx):
            entry = base.files[int(i)]
            keep = np.ones(entry.num_rows, dtype=bool)
            keep[positions[file_idx == i] - starts[i]] = False
            if keep.any():
                table = _read(storage, entry).filter(pa.array(keep))
                new.append(w.file(table))
            inputs.add(entry.path)
        _finish_data(storage)
        return commit(storage, _needs_inputs(storage, inputs, "delete", new))


def _aligned(storage: Storage, entry: FileEntry) -> bool:
    """Whether every fixed-width chunk of the file maps aligned (files written before embtools
    placed its pages do not: compact rewrites them)."""
    path = storage.prefetch(entry.path, entry.bytes, None, None)  # the whole file on object stores
    check_file(storage.local_root, entry, ())  # path and footer, before the footer is parsed again
    with MappedParquetFile(path) as f:
        return f.all_aligned()


def compact_files(root: StoreRoot, base: Manifest, target_bytes: int, budget: MemoryBudget
                  ) -> Manifest | None:
    """Merge runs of consecutive files smaller than ``target_bytes``, and rewrite the files whose
    pages are not aligned (see :func:`_aligned`); None when there is nothing to do."""
    storage = as_storage(root)
    groups: list[list[FileEntry]] = []
    current: list[FileEntry] = []
    size = 0
    for f in base.files:
        if current and size + f.bytes > target_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += f.bytes
    if current:
        groups.append(current)
    merges = [g for g in groups if len(g) > 1 or not _aligned(storage, g[0])]
    if not merges:
        return None
    inputs: set[str] = set()
    new: list[FileEntry] = []
    with _Write(storage, base.version) as w:
        for group in merges:
            table = pa.concat_tables([_read(storage, f) for f in group], promote_options="default")
            new.append(w.file(table))
            inputs.update(f.path for f in group)
            del table
        _finish_data(storage)
        return commit(storage, _needs_inputs(storage, inputs, "compact", new))


def save_source(root: StoreRoot, base: Manifest, source: Any, properties: dict[str, Any],
                budget: MemoryBudget, target_bytes: int) -> Manifest:
    """Write every row of ``source`` (a Snapshot or MemorySource) into ``root`` as a new version.

    The new version holds exactly the source's rows (row ids kept), replacing what ``root`` held;
    its ``next_row_id`` stays above every id either store used.
    """
    storage = as_storage(root)
    with _Write(storage, base.version) as w:
        return _save(storage, source, properties, budget, target_bytes, w)


def _save(storage: Storage, source: Any, properties: dict[str, Any], budget: MemoryBudget,
          target_bytes: int, w: _Write) -> Manifest:
    entries: list[FileEntry] = []
    dims = sorted(source.dimensions)
    quantized = dict(getattr(source, "quantized", {}))
    if hasattr(source, "manifest"):
        for f in source.manifest.files:
            entries.append(w.file(_read(source.storage, f)))
    elif source.num_rows:
        bytes_per_row = sum(dims) * 4 + 64
        rows = rows_per_file(bytes_per_row, target_bytes, None)
        for s in range(0, source.num_rows, rows):
            e = min(source.num_rows, s + rows)
            table = source.meta.slice(s, e - s)
            for d in dims:
                x = np.ascontiguousarray(source.arrays[d][s:e])
                table = table.append_column(
                    pa.field(emb_column(d), embedding_type(d), nullable=False),
                    pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=embedding_type(d)))
            if quantized:
                table = add_code_columns(table, quantized)
            entries.append(w.file(table))
    if entries:
        _finish_data(storage)
    schema = source.schema
    assert schema.names[:3] == [ROW_ID, TEXT_ID, LABEL]
    top = max((f.row_id_max + 1 for f in entries if f.num_rows), default=0)
    top = max(top, int(getattr(getattr(source, "manifest", None), "next_row_id", 0)))

    def rebase(latest: Manifest | None) -> Manifest:
        if latest is None:
            raise CorruptStoreError(f"{storage.url}: the store has no committed version")
        return replace(latest, operation="save", files=_sorted(entries), dimensions=dims, indexes=[],
                       schema=schema, properties=dict(properties), quantized=quantized,
                       config_hash=config_hash(dims, schema, properties),
                       next_row_id=max(latest.next_row_id, top))

    return commit(storage, rebase)
