"""Versions, manifests and the commit protocol of a store (a directory or an object store).

Layout (keys of the store's :class:`~embtools.storage.io.Storage`)::

    _versions/<version:020d>.json   one JSON manifest per committed version (names sort by version)
    data/<uuid>.parquet             data files (only those a manifest lists are ever read)

Commit (after Delta Lake's and Lance's protocols): data files are written (fsynced, or uploaded)
first; the manifest of version N+1 is then *created only if absent* (``os.link`` of a fsynced
temporary file locally, a conditional put with ``If-None-Match: *`` on an object store), so two
writers can never both commit a version. Since vacuum removes old versions, N+1 may also be free
again because it was committed and vacuumed while this writer worked: a commit that finds a newer
version above its own withdraws it and commits again on top (otherwise the newest version would
not contain it). A loser re-reads the latest version and asks its ``rebase`` callback for a new
manifest (appends rebase onto any version; deletes and compactions raise
:class:`~embtools.errors.CommitConflictError` when their input files are gone). A crash at any point
leaves at worst unreferenced files, which :func:`vacuum` removes after its grace period.

Row ids are assigned by the commit, with no lock or counter file: each manifest records
``next_row_id``, the first id no version has used. An append writes its files with ids from the
``next_row_id`` it read; its rebase accepts them only while they are still free, else the writer
rewrites its files with the new ids and tries again (:mod:`embtools.storage.writer`). Writers on
different machines therefore never collide, and ids are never reused, even after a delete.

Examples
--------
>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> m = commit(root, lambda latest: empty_manifest("create"))
>>> m.version, m.next_row_id, list_versions(root)
(0, 0, [0])
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from embtools.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    SnapshotExpiredError,
    StoreNotFoundError,
)
from embtools.storage.durable import fsync_dir
from embtools.storage.io import (
    CRASH_ENV,
    LocalStorage,
    ObjectInfo,
    Storage,
    as_storage,
    crash_point,
)
from embtools.storage.quantspec import QuantSpec, specs_from_json, specs_to_json
from embtools.storage.schema import base_schema, schema_from_json, schema_to_json

__all__ = [
    "CRASH_ENV",
    "DATA_DIR",
    "DATA_FILE",
    "FORMAT",
    "INDEX_DIR",
    "INDEX_FILE",
    "VERSIONS_DIR",
    "FileEntry",
    "IndexEntry",
    "Manifest",
    "check_job_id",
    "check_vacuum_args",
    "commit",
    "config_hash",
    "crash_point",
    "empty_manifest",
    "fsync_dir",
    "is_store",
    "latest_version",
    "list_versions",
    "missing_file_error",
    "new_data_path",
    "read_manifest",
    "vacuum",
]

FORMAT = "embtools/1"
VERSIONS_DIR = "_versions"
DATA_DIR = "data"
_VERSION_FILE = re.compile(r"^([0-9]{20})\.json$")
_MAX_COMMIT_ATTEMPTS = 1000
_MAX_COUNT = 2**62
DATA_FILE = re.compile(r"^data/[0-9a-f]{32}\.parquet$")
"""Manifest paths of data files (what :func:`new_data_path` makes); nothing else is ever opened."""
INDEX_DIR = "_index"
INDEX_FILE = re.compile(r"^_index/[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{32}\.parquet$")
"""Manifest paths of index files: ``_index/<index name>/<32 hex>.parquet``."""


StoreRoot = str | os.PathLike[str] | Storage
"""A store's location: its directory, or its :class:`~embtools.storage.io.Storage`."""


@dataclass(frozen=True)
class FileEntry:
    """One committed data file: path relative to the store, rows, row-id range, size, row groups,
    and the CRC-32s of its footer and of each column chunk (``footer_crc``, ``chunk_crcs``, in row
    group then column order; None in files committed before they were recorded)."""

    path: str
    num_rows: int
    row_id_min: int
    row_id_max: int
    bytes: int
    row_groups: list[int]
    footer_crc: int | None = None
    chunk_crcs: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "path": self.path, "num_rows": self.num_rows, "row_id_min": self.row_id_min,
            "row_id_max": self.row_id_max, "bytes": self.bytes, "row_groups": list(self.row_groups),
        }
        if self.footer_crc is not None:
            out["footer_crc"] = self.footer_crc
        if self.chunk_crcs is not None:
            out["chunk_crcs"] = list(self.chunk_crcs)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        """Parse and check one manifest file entry (ValueError, TypeError or KeyError when bad)."""
        if not isinstance(d, dict):
            raise TypeError(f"a file entry is a {type(d).__name__}, not an object")
        path = d["path"]
        if not isinstance(path, str) or not DATA_FILE.match(path):
            raise ValueError(f"file path {path!r} is not data/<32 hex digits>.parquet")
        groups = d["row_groups"]
        if not isinstance(groups, list):
            raise TypeError("row_groups is not a list")
        crc, chunks = d.get("footer_crc"), d.get("chunk_crcs")
        if chunks is not None and not isinstance(chunks, list):
            raise TypeError("chunk_crcs is not a list")
        entry = cls(path, _count(d["num_rows"], "num_rows"), _count(d["row_id_min"], "row_id_min"),
                    _count(d["row_id_max"], "row_id_max"), _count(d["bytes"], "bytes"),
                    [_count(r, "row group size") for r in groups],
                    None if crc is None else _count(crc, "footer_crc", 2**32 - 1),
                    None if chunks is None else [_count(c, "chunk_crcs", 2**32 - 1) for c in chunks])
        if sum(entry.row_groups) != entry.num_rows:
            raise ValueError(f"{path}: row groups {entry.row_groups} do not add up to {entry.num_rows} rows")
        if entry.num_rows and entry.row_id_max - entry.row_id_min + 1 < entry.num_rows:
            raise ValueError(f"{path}: {entry.num_rows} rows cannot have ids "
                             f"{entry.row_id_min}..{entry.row_id_max}")
        if entry.bytes < 12:
            raise ValueError(f"{path}: {entry.bytes} bytes is too short for Parquet")
        return entry


JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$")
"""A job id: 1-128 letters, digits and ``._:@+=-``, starting with a letter or digit."""


def check_job_id(job_id: Any) -> str:
    """``job_id`` when it is a valid job id (:data:`JOB_ID`), else InvalidArgumentError.

    Examples
    --------
    >>> check_job_id("embed-2026-12-02")
    'embed-2026-12-02'
    """
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise InvalidArgumentError(
            f"job id {job_id!r} must be 1-128 letters, digits and ._:@+=- (starting with a letter "
            "or digit)")
    return job_id


def _count(v: Any, what: str, hi: int = _MAX_COUNT) -> int:
    """A JSON integer in ``0..hi`` (not a bool or float)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} is {v!r}, not an integer")
    if not 0 <= v <= hi:
        raise ValueError(f"{what} {v} is out of range")
    return v


def _check_files(files: list[FileEntry]) -> None:
    """Files in row-id order, distinct, with disjoint row-id ranges."""
    seen: set[str] = set()
    prev: FileEntry | None = None
    for f in files:
        if f.path in seen:
            raise ValueError(f"{f.path} is listed twice")
        seen.add(f.path)
        if not f.num_rows:
            continue
        if prev is not None and f.row_id_min <= prev.row_id_max:
            raise ValueError(f"{f.path}: row ids {f.row_id_min}..{f.row_id_max} overlap "
                             f"{prev.path}'s or are out of order")
        prev = f


@dataclass(frozen=True)
class IndexEntry:
    """One index recorded in a manifest (see :mod:`embtools.index`): its ``name``, the
    ``dimension`` and ``metric`` it serves, its ``files`` (``_index/<name>/...``, their sizes in
    ``file_bytes``), the data ``covers`` (the data files whose rows it holds, as they were when
    it was built or last optimised) and ``info``: JSON details the index package owns (codes,
    partitions, rows...)."""

    name: str
    dimension: int
    metric: str
    files: list[str]
    file_bytes: list[int]
    covers: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dimension": self.dimension, "metric": self.metric,
                "files": list(self.files), "file_bytes": list(self.file_bytes),
                "covers": list(self.covers), "info": self.info}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexEntry:
        """Parse and check one index record (ValueError, TypeError or KeyError when bad)."""
        if not isinstance(d, dict):
            raise TypeError(f"an index entry is a {type(d).__name__}, not an object")
        name, metric, files, sizes, covers, info = (d["name"], d["metric"], d["files"],
                                                    d["file_bytes"], d["covers"], d.get("info", {}))
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name):
            raise ValueError(f"bad index name {name!r}")
        if metric not in ("cosine", "dot", "l2"):
            raise ValueError(f"index {name}: unknown metric {metric!r}")
        if not all(isinstance(x, list) for x in (files, sizes, covers)) or not isinstance(info, dict):
            raise TypeError(f"index {name}: files, file_bytes and covers must be lists, info an object")
        for f in files:
            if not isinstance(f, str) or not INDEX_FILE.match(f) or not f.startswith(f"{INDEX_DIR}/{name}/"):
                raise ValueError(f"index {name}: file path {f!r} is not {INDEX_DIR}/{name}/<32 hex>.parquet")
        for f in covers:
            if not isinstance(f, str) or not DATA_FILE.match(f):
                raise ValueError(f"index {name}: covered file {f!r} is not a data file path")
        if len(sizes) != len(files):
            raise ValueError(f"index {name}: {len(files)} files but {len(sizes)} sizes")
        return cls(name, _count(d["dimension"], "index dimension"), metric, list(files),
                   [_count(b, "index file bytes") for b in sizes], list(covers), dict(info))


@dataclass(frozen=True)
class Manifest:
    """One committed version: its files (sorted by row id), dimensions, schema and properties."""

    version: int
    parent: int | None
    created: str
    operation: str
    files: list[FileEntry]
    dimensions: list[int]
    schema: pa.Schema
    config_hash: str
    properties: dict[str, Any] = field(default_factory=dict)
    #: ids of the jobs whose rows this version holds (``writer.commit_files(job_id=...)``):
    #: a retried or re-run job with a recorded id commits nothing
    jobs: tuple[str, ...] = ()
    indexes: list[IndexEntry] = field(default_factory=list)
    #: the first row id no version of the store has used (assigned by the commit; never reused)
    next_row_id: int = 0
    #: a random id of this commit, and its parent's (tells a version built on this one from a
    #: version that this one's number was re-used below: see :func:`commit`)
    commit_id: str = ""
    parent_commit: str = ""
    #: quantized columns per dimension (storage/quantspec.py): kinds and int8 ranges
    quantized: dict[int, QuantSpec] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "parent": self.parent,
            "created": self.created, "operation": self.operation,
            "files": [f.to_json() for f in self.files], "dimensions": list(self.dimensions),
            "schema": schema_to_json(self.schema), "config_hash": self.config_hash,
            "properties": self.properties, "next_row_id": self.next_row_id,
            "commit_id": self.commit_id, "parent_commit": self.parent_commit,
            **({"indexes": [i.to_json() for i in self.indexes]} if self.indexes else {}),
        }
        if self.jobs:
            out["jobs"] = list(self.jobs)
        if self.quantized:
            out["quantized"] = specs_to_json(self.quantized)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Parse and check a manifest (ValueError, TypeError or KeyError when it is malformed)."""
        if not isinstance(d, dict):
            raise TypeError(f"the manifest is a JSON {type(d).__name__}, not an object")
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown format {d.get('format')!r}")
        files, dims, props = d["files"], d["dimensions"], d.get("properties") or {}
        if not isinstance(files, list) or not isinstance(dims, list) or not isinstance(props, dict):
            raise TypeError("files and dimensions must be lists, properties an object")
        jobs = d.get("jobs") or []
        if not isinstance(jobs, list) or not all(isinstance(j, str) and JOB_ID.match(j) for j in jobs):
            raise TypeError("jobs must be a list of job ids")
        entries = [FileEntry.from_json(f) for f in files]
        _check_files(entries)
        dimensions = [_count(x, "dimension") for x in dims]
        if len(set(dimensions)) != len(dimensions) or 0 in dimensions:
            raise ValueError(f"bad dimensions {dimensions}")
        raw_indexes = d.get("indexes", [])
        if not isinstance(raw_indexes, list):
            raise TypeError("indexes must be a list")
        indexes = [IndexEntry.from_json(i) for i in raw_indexes]
        if len({i.name for i in indexes}) != len(indexes):
            raise ValueError("an index name is listed twice")
        parent = d["parent"]
        top = max((f.row_id_max + 1 for f in entries if f.num_rows), default=0)
        next_row_id = d.get("next_row_id")  # manifests written before it was recorded: from files
        # never below the files' ids (an edited manifest cannot make ids be reused)
        next_row_id = top if next_row_id is None else max(top, _count(next_row_id, "next_row_id"))
        return cls(
            version=_count(d["version"], "version"),
            parent=None if parent is None else _count(parent, "parent"),
            created=str(d["created"]), operation=str(d["operation"]),
            files=entries, dimensions=dimensions, schema=schema_from_json(d["schema"]),
            config_hash=str(d["config_hash"]), properties=dict(props), jobs=tuple(jobs),
            indexes=indexes,
            next_row_id=next_row_id, commit_id=str(d.get("commit_id") or ""),
            parent_commit=str(d.get("parent_commit") or ""),
            quantized=specs_from_json(d.get("quantized"), dimensions),
        )

    def settings_hash(self) -> str:
        """The config hash of this manifest's settings (dimensions, schema, properties)."""
        return config_hash(self.dimensions, self.schema, self.properties)


def config_hash(dimensions: list[int], schema: pa.Schema, properties: dict[str, Any]) -> str:
    """``compute_config_hash`` of the store settings recorded in a manifest."""
    from embtools.config import compute_config_hash

    return compute_config_hash({
        "dimensions": sorted(dimensions),
        "schema": {f.name: str(f.type) for f in schema},
        "properties": properties,
    })


def empty_manifest(operation: str = "create") -> Manifest:
    """A manifest with no files, no dimensions and the base schema (version/parent set by commit)."""
    schema = base_schema()
    return Manifest(0, None, _now(), operation, [], [], schema, config_hash([], schema, {}), {}, next_row_id=0)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _version_key(version: int) -> str:
    return f"{VERSIONS_DIR}/{version:020d}.json"


def is_store(root: StoreRoot) -> bool:
    """Whether ``root`` is a store (a directory with a ``_versions`` folder, or a location with a
    committed version)."""
    storage = as_storage(root)
    if isinstance(storage, LocalStorage):
        return os.path.isdir(os.path.join(storage.local_root, VERSIONS_DIR))
    return bool(storage.list(f"{VERSIONS_DIR}/"))


def list_versions(root: StoreRoot, after: int | None = None) -> list[int]:
    """The committed versions of the store at ``root`` (those above ``after``), ascending.

    Version names sort in version order, so ``after`` lists only the newer ones (one request).
    """
    storage = as_storage(root)
    names = storage.list(f"{VERSIONS_DIR}/", None if after is None else _version_key(after))
    return sorted(int(m.group(1)) for o in names
                  if (m := _VERSION_FILE.match(o.key.rpartition("/")[2])))


def latest_version(root: StoreRoot, after: int | None = None) -> int | None:
    """The newest committed version (above ``after``), or None when there is none."""
    versions = list_versions(root, after)
    return versions[-1] if versions else None


def read_manifest(root: StoreRoot, version: int | None = None) -> Manifest:
    """Read the manifest of ``version`` (default: the latest).

    Raises StoreNotFoundError (listing the versions there are) when it does not exist, and
    CorruptStoreError when it cannot be parsed.
    """
    storage = as_storage(root)
    if version is None:
        # vacuum may remove the version found newest before it is read, once a writer has
        # committed a newer one: read the newest again
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            latest = latest_version(storage)
            if latest is None:
                raise StoreNotFoundError(f"{storage.url!r} has no committed version")
            try:
                return read_manifest(storage, latest)
            except StoreNotFoundError:
                if latest_version(storage) == latest:
                    raise
        raise CorruptStoreError(f"{storage.url}: versions keep vanishing while read")
    key = _version_key(version)
    path = storage.display(key)
    try:
        data = json.loads(storage.read(key))
        manifest = Manifest.from_json(data)
    except FileNotFoundError:
        have = list_versions(storage)
        raise StoreNotFoundError(
            f"store {storage.url!r} has no version {version}; versions: {have}"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError,
            pa.ArrowException) as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if manifest.version != version:
        raise CorruptStoreError(f"{path}: manifest says version {manifest.version}")
    return manifest


def missing_file_error(root: StoreRoot, version: int, path: str) -> CorruptStoreError:
    """The error for a data file of ``version`` that is gone: SnapshotExpiredError when vacuum
    removed the version itself (a handle outlived it), else CorruptStoreError."""
    storage = as_storage(root)
    if not storage.exists(_version_key(version)):
        return SnapshotExpiredError(
            f"version {version} of the store {storage.url!r} was removed by vacuum while this "
            f"handle read it, and its data files with it ({os.path.basename(path)} is gone); re-open "
            "the store (or call refresh()) to read the latest version")
    return CorruptStoreError(f"{path}: listed by version {version} but missing")


def new_data_path(root: StoreRoot) -> tuple[str, str]:
    """A fresh ``(relative, local absolute)`` path for a data file (publish it with
    :meth:`~embtools.storage.io.Storage.upload`)."""
    rel = f"{DATA_DIR}/{uuid.uuid4().hex}.parquet"
    return rel, as_storage(root).local_path(rel)


def commit(root: StoreRoot, rebase: Callable[[Manifest | None], Manifest],
           operation_note: str = "") -> Manifest:
    """Publish the manifest ``rebase(latest)`` as version ``latest + 1`` and return it.

    ``rebase`` gets the latest committed manifest (None for an empty store) and returns the
    manifest to commit on top of it (its version and parent are set here); it is called again with
    the new latest when another writer wins the race, and may raise CommitConflictError. The
    manifest is created only if its name is free (a link locally, ``If-None-Match: *`` on an
    object store), so two writers can never both commit a version.
    """
    storage = as_storage(root)
    for _ in range(_MAX_COMMIT_ATTEMPTS):
        latest_n = latest_version(storage)
        try:
            latest = None if latest_n is None else read_manifest(storage, latest_n)
        except StoreNotFoundError:  # vacuumed since it was listed: a newer one exists
            continue
        new_version = 0 if latest_n is None else latest_n + 1
        manifest = replace(rebase(latest), version=new_version, parent=latest_n, created=_now(),
                           commit_id=uuid.uuid4().hex,
                           parent_commit="" if latest is None else latest.commit_id)
        _check_row_ids(manifest)
        data = json.dumps(manifest.to_json(), indent=1).encode("utf-8")
        if not storage.create(_version_key(new_version), data):
            continue
        if _buried(storage, manifest):
            # Other writers committed new_version and more after this one read the latest, and
            # vacuum removed new_version again, so the create re-used its number below the
            # newest version, where no reader looks. Withdraw it and commit on top instead.
            storage.delete(_version_key(new_version))
            continue
        # Published: from here on the version exists, so nothing may report it as not committed
        # (the caller would remove its files).
        return manifest
    raise CorruptStoreError(f"{storage.url}: could not commit after {_MAX_COMMIT_ATTEMPTS} attempts")


def _buried(storage: Storage, manifest: Manifest) -> bool:
    """Whether a newer version exists that was not built on ``manifest`` (just created).

    A version built on it names it as ``parent_commit``. When version N+1 is missing but a newer
    one exists, N+1 was vacuumed; vacuum removes older versions first, so that N+1 was not built
    on this (newer) manifest: buried too.
    """
    newer = list_versions(storage, after=manifest.version)
    if not newer:
        return False
    if newer[0] != manifest.version + 1:
        return True
    try:
        above = read_manifest(storage, newer[0])
    except StoreNotFoundError:
        return True
    return above.parent_commit != manifest.commit_id


def _check_row_ids(manifest: Manifest) -> None:
    """A manifest about to be committed: its files' row ids are below its ``next_row_id``."""
    top = max((f.row_id_max for f in manifest.files if f.num_rows), default=-1)
    if top >= manifest.next_row_id:
        raise CorruptStoreError(
            f"internal error: row id {top} is not below next_row_id {manifest.next_row_id}")


def _seconds(value: Any) -> bool:
    """Whether ``value`` is a finite, non-negative number of seconds (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value >= 0)


def _referenced_files(storage: Storage, versions: set[int]) -> set[str]:
    """The data and index files (relative paths) the manifests of ``versions`` list; a version a
    concurrent vacuum removed meanwhile lists none."""
    out: set[str] = set()
    for v in sorted(versions):
        try:
            m = read_manifest(storage, v)
        except StoreNotFoundError:
            continue
        out.update(f.path for f in m.files)
        out.update(os.path.normpath(p) for i in m.indexes for p in i.files)
    return out


def _stored_files(storage: Storage) -> list[ObjectInfo]:
    """The objects under ``data/`` and ``_index/<name>/`` (what vacuum may remove)."""
    out = list(storage.list(f"{DATA_DIR}/"))
    if isinstance(storage, LocalStorage):
        index_dir = os.path.join(storage.local_root, INDEX_DIR)
        for sub in sorted(os.listdir(index_dir)) if os.path.isdir(index_dir) else []:
            folder = os.path.join(index_dir, sub)
            if os.path.isdir(folder) and not os.path.islink(folder):
                out.extend(storage.list(f"{INDEX_DIR}/{sub}/"))
    else:
        out.extend(o for o in storage.list(f"{INDEX_DIR}/") if o.key.count("/") == 2)
    return out


def check_vacuum_args(retain_versions: Any, older_than: Any, grace_seconds: Any) -> float | None:
    """Validate :func:`vacuum`'s arguments; returns ``older_than`` in seconds."""
    if isinstance(retain_versions, bool) or not isinstance(retain_versions, int) or retain_versions < 1:
        raise InvalidArgumentError(f"retain_versions must be an int >= 1, got {retain_versions!r}")
    if isinstance(older_than, _dt.timedelta):
        older_than = older_than.total_seconds()
    if older_than is not None and not _seconds(older_than):
        raise InvalidArgumentError(f"older_than must be a finite number of seconds >= 0, got {older_than!r}")
    if not _seconds(grace_seconds):
        # nan compared as "not younger than nan" and acted as 0: a writer's uncommitted files went
        raise InvalidArgumentError(f"grace_seconds must be a finite number >= 0, got {grace_seconds!r}")
    return None if older_than is None else float(older_than)


def vacuum(root: StoreRoot, retain_versions: int = 1,
           older_than: float | _dt.timedelta | None = None,
           grace_seconds: float = 3600.0) -> dict[str, list[Any]]:
    """Remove old version manifests and data files no retained version references.

    Keeps the newest ``retain_versions`` versions (at least 1: the latest is never removed); with
    ``older_than`` (seconds or a timedelta), an older version is removed only when its manifest is
    older than that. Unreferenced data files and stale temporary manifests are removed only when
    their modification time is more than ``grace_seconds`` ago, so that the files of a writer that
    has not committed yet survive. Returns ``{"versions": [...], "files": [...]}`` of what was removed.
    """
    older_than = check_vacuum_args(retain_versions, older_than, grace_seconds)
    storage = as_storage(root)
    now = time.time()
    listed = {int(m.group(1)): o for o in storage.list(f"{VERSIONS_DIR}/")
              if (m := _VERSION_FILE.match(o.key.rpartition("/")[2]))}
    versions = sorted(listed)
    keep = set(versions[-retain_versions:])
    removed_versions: list[int] = []
    for v in versions:
        if v in keep:
            continue
        if older_than is not None and now - listed[v].mtime < older_than:
            keep.add(v)
            continue
        removed_versions.append(v)
    referenced = _referenced_files(storage, keep)
    # Manifests first: a removed version must never point at a removed file.
    for v in removed_versions:
        storage.delete(_version_key(v))
    # versions committed meanwhile keep their files too (a compact's inputs, an old writer's files)
    referenced |= _referenced_files(storage, set(list_versions(storage, after=max(versions, default=-1))))
    removed_files: list[str] = []
    for obj in _stored_files(storage):
        if obj.key in referenced or now - obj.mtime < grace_seconds:
            continue
        storage.delete(obj.key)
        removed_files.append(storage.display(obj.key))
    for obj in storage.list(f"{VERSIONS_DIR}/.tmp-"):
        if now - obj.mtime >= grace_seconds:
            storage.delete(obj.key)
    if isinstance(storage, LocalStorage):
        storage.sync(VERSIONS_DIR)
        storage.sync(DATA_DIR)
    return {"versions": removed_versions, "files": removed_files}
