"""Versions, manifests and the atomic commit protocol of a store directory.

Layout::

    STORE/_versions/<version:020d>.json   one JSON manifest per committed version
    STORE/data/<uuid>.parquet             data files (only those a manifest lists are ever read)
    STORE/_rowids                         the row-id counter (reserved under an exclusive flock)

Commit (after Delta Lake's and Lance's local-filesystem protocols): data files are written and fsynced
first; the manifest goes to a temporary file in ``_versions`` and is fsynced; it is then published with
``os.link(tmp, "<N+1>.json")``, which fails with ``FileExistsError`` when another writer already
committed N+1, so two writers can never both commit a version; finally the ``_versions`` directory is
fsynced. Since vacuum removes old versions, N+1 may also be free again because it was committed and
vacuumed while this writer worked: a commit that finds a newer version above its own withdraws it
and commits again on top (otherwise the newest version would not contain it). A loser re-reads the latest version and asks its ``rebase`` callback for a new manifest
(appends rebase onto any version; deletes and compactions raise
:class:`~embtools.errors.CommitConflictError` when their input files are gone). A crash at any point
leaves at worst unreferenced files, which :func:`vacuum` removes.

Examples
--------
>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> m = commit(root, lambda latest: empty_manifest("create"))
>>> m.version, list_versions(root)
(0, [0])
>>> reserve_row_ids(root, 10), reserve_row_ids(root, 5)
(0, 10)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import re
import signal
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
from embtools.storage.durable import fsync_dir, fsync_file
from embtools.storage.schema import base_schema, schema_from_json, schema_to_json

__all__ = [
    "CRASH_ENV",
    "DATA_DIR",
    "DATA_FILE",
    "FORMAT",
    "INDEX_DIR",
    "INDEX_FILE",
    "ROWIDS_FILE",
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
    "reserve_row_ids",
    "vacuum",
]

FORMAT = "embtools/1"
VERSIONS_DIR = "_versions"
DATA_DIR = "data"
ROWIDS_FILE = "_rowids"
CRASH_ENV = "EMBTOOLS_CRASH_AT"
_VERSION_FILE = re.compile(r"^([0-9]{20})\.json$")
_MAX_COMMIT_ATTEMPTS = 1000
_MAX_COUNT = 2**62
DATA_FILE = re.compile(r"^data/[0-9a-f]{32}\.parquet$")
"""Manifest paths of data files (what :func:`new_data_path` makes); nothing else is ever opened."""
INDEX_DIR = "_index"
INDEX_FILE = re.compile(r"^_index/[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{32}\.parquet$")
"""Manifest paths of index files: ``_index/<index name>/<32 hex>.parquet``."""


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$EMBTOOLS_CRASH_AT`` equals ``name``.

    Named points: ``after_data`` (data files written, no manifest), ``after_manifest_tmp`` (temporary
    manifest written, not published), ``before_dir_fsync`` (published, directory not yet fsynced).
    Harmless in production: the variable is never set.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "parent": self.parent,
            "created": self.created, "operation": self.operation,
            "files": [f.to_json() for f in self.files], "dimensions": list(self.dimensions),
            "schema": schema_to_json(self.schema), "config_hash": self.config_hash,
            "properties": self.properties,
            **({"indexes": [i.to_json() for i in self.indexes]} if self.indexes else {}),
        }
        if self.jobs:
            out["jobs"] = list(self.jobs)
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
        return cls(
            version=_count(d["version"], "version"),
            parent=None if parent is None else _count(parent, "parent"),
            created=str(d["created"]), operation=str(d["operation"]),
            files=entries, dimensions=dimensions, schema=schema_from_json(d["schema"]),
            config_hash=str(d["config_hash"]), properties=dict(props), jobs=tuple(jobs),
            indexes=indexes,
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
    return Manifest(0, None, _now(), operation, [], [], schema, config_hash([], schema, {}), {})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _versions_dir(root: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(root), VERSIONS_DIR)


def _version_path(root: str | os.PathLike[str], version: int) -> str:
    return os.path.join(_versions_dir(root), f"{version:020d}.json")


def is_store(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is a store directory (has a ``_versions`` folder)."""
    return os.path.isdir(_versions_dir(root))


def list_versions(root: str | os.PathLike[str]) -> list[int]:
    """The committed versions of the store at ``root``, ascending."""
    try:
        names = os.listdir(_versions_dir(root))
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _VERSION_FILE.match(n)))


def latest_version(root: str | os.PathLike[str]) -> int | None:
    """The newest committed version, or None when there is none."""
    versions = list_versions(root)
    return versions[-1] if versions else None


def read_manifest(root: str | os.PathLike[str], version: int | None = None) -> Manifest:
    """Read the manifest of ``version`` (default: the latest).

    Raises StoreNotFoundError (listing the versions there are) when it does not exist, and
    CorruptStoreError when it cannot be parsed.
    """
    if version is None:
        # vacuum may remove the version found newest before it is read, once a writer has
        # committed a newer one: read the newest again
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            latest = latest_version(root)
            if latest is None:
                raise StoreNotFoundError(f"{os.fspath(root)!r} has no committed version")
            try:
                return read_manifest(root, latest)
            except StoreNotFoundError:
                if latest_version(root) == latest:
                    raise
        raise CorruptStoreError(f"{os.fspath(root)}: versions keep vanishing while read")
    path = _version_path(root, version)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        manifest = Manifest.from_json(data)
    except FileNotFoundError:
        have = list_versions(root)
        raise StoreNotFoundError(
            f"store {os.fspath(root)!r} has no version {version}; versions: {have}"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError,
            pa.ArrowException) as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if manifest.version != version:
        raise CorruptStoreError(f"{path}: manifest says version {manifest.version}")
    return manifest


def missing_file_error(root: str | os.PathLike[str], version: int, path: str) -> CorruptStoreError:
    """The error for a data file of ``version`` that is gone: SnapshotExpiredError when vacuum
    removed the version itself (a handle outlived it), else CorruptStoreError."""
    if not os.path.exists(_version_path(root, version)):
        return SnapshotExpiredError(
            f"version {version} of the store {os.fspath(root)!r} was removed by vacuum while this "
            f"handle read it, and its data files with it ({os.path.basename(path)} is gone); re-open "
            "the store (or call refresh()) to read the latest version")
    return CorruptStoreError(f"{path}: listed by version {version} but missing")


def new_data_path(root: str | os.PathLike[str]) -> tuple[str, str]:
    """A fresh ``(relative, absolute)`` path for a data file."""
    rel = f"{DATA_DIR}/{uuid.uuid4().hex}.parquet"
    return rel, os.path.join(os.fspath(root), rel)


def reserve_row_ids(root: str | os.PathLike[str], n: int) -> int:
    """Reserve ``n`` consecutive row ids and return the first.

    The counter file is updated under an exclusive ``flock``; a writer that crashes after reserving
    only leaves a gap in the row ids.
    """
    if n < 0:
        raise InvalidArgumentError(f"cannot reserve {n} row ids")
    path = os.path.join(os.fspath(root), ROWIDS_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0).decode("ascii").strip()
        start = int(raw) if raw else 0
        start = max(start, _max_committed_row_id(root) + 1)
        data = f"{start + n:020d}\n".encode("ascii")
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return start
    finally:
        os.close(fd)  # closing releases the lock


def _max_committed_row_id(root: str | os.PathLike[str]) -> int:
    """Largest row id of the latest version (guards against a lost or reset counter file)."""
    latest = latest_version(root)
    if latest is None:
        return -1
    try:
        files = read_manifest(root, latest).files
    except (StoreNotFoundError, CorruptStoreError):
        return -1
    return max((f.row_id_max for f in files), default=-1)


def commit(root: str | os.PathLike[str], rebase: Callable[[Manifest | None], Manifest],
           operation_note: str = "") -> Manifest:
    """Publish the manifest ``rebase(latest)`` as version ``latest + 1`` and return it.

    ``rebase`` gets the latest committed manifest (None for an empty directory) and returns the
    manifest to commit on top of it (its version and parent are set here); it is called again with
    the new latest when another writer wins the race, and may raise CommitConflictError.
    """
    root = os.fspath(root)
    vdir = _versions_dir(root)
    os.makedirs(vdir, exist_ok=True)
    for _ in range(_MAX_COMMIT_ATTEMPTS):
        latest = None if latest_version(root) is None else read_manifest(root)
        latest_n = None if latest is None else latest.version
        new_version = 0 if latest_n is None else latest_n + 1
        manifest = replace(rebase(latest), version=new_version, parent=latest_n, created=_now())
        tmp = os.path.join(vdir, f".tmp-{uuid.uuid4().hex}.json")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(manifest.to_json(), fh, indent=1)
                fsync_file(fh)
            crash_point("after_manifest_tmp")
            os.link(tmp, _version_path(root, new_version))
        except FileExistsError:
            continue
        finally:  # the temporary manifest goes whatever happened (a full disk, a lost race)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if any(v > new_version for v in list_versions(root)):
            # Buried: other writers committed new_version and more after this one read the
            # latest, and vacuum removed new_version again, so the link re-used its number below
            # the newest version, where no reader looks. Withdraw it and commit on top instead.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_version_path(root, new_version))
            continue
        crash_point("before_dir_fsync")
        # Published: from here on the version exists, so nothing may report it as not committed
        # (the caller would remove its files). The directory fsync is best effort.
        with contextlib.suppress(OSError):
            fsync_dir(vdir)
        return manifest
    raise CorruptStoreError(f"{root}: could not commit after {_MAX_COMMIT_ATTEMPTS} attempts")


def _seconds(value: Any) -> bool:
    """Whether ``value`` is a finite, non-negative number of seconds (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value >= 0)


def _mtime(path: str) -> float | None:
    """``path``'s modification time, or None when it is gone (removed by a racing process)."""
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return None


def _referenced_files(root: str, versions: set[int]) -> set[str]:
    """The data and index files (normalised relative paths) the manifests of ``versions`` list; a
    version a concurrent vacuum removed meanwhile lists none."""
    out: set[str] = set()
    for v in sorted(versions):
        try:
            m = read_manifest(root, v)
        except StoreNotFoundError:
            continue
        out.update(os.path.normpath(f.path) for f in m.files)
        out.update(os.path.normpath(p) for i in m.indexes for p in i.files)
    return out


def _stored_files(root: str) -> list[str]:
    """Relative paths of the files under ``data/`` and ``_index/<name>/`` (what vacuum may remove)."""
    out = []
    data_dir = os.path.join(root, DATA_DIR)
    for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        out.append(f"{DATA_DIR}/{name}")
    index_dir = os.path.join(root, INDEX_DIR)
    for sub in sorted(os.listdir(index_dir)) if os.path.isdir(index_dir) else []:
        folder = os.path.join(index_dir, sub)
        if os.path.isdir(folder) and not os.path.islink(folder):
            out.extend(f"{INDEX_DIR}/{sub}/{name}" for name in sorted(os.listdir(folder)))
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


def vacuum(root: str | os.PathLike[str], retain_versions: int = 1,
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
    root = os.fspath(root)
    now = time.time()
    versions = list_versions(root)
    keep = set(versions[-retain_versions:])
    removed_versions: list[int] = []
    for v in versions:
        if v in keep:
            continue
        mtime = _mtime(_version_path(root, v))
        if mtime is None:  # a concurrent vacuum removed it
            continue
        if older_than is not None and now - mtime < older_than:
            keep.add(v)
            continue
        removed_versions.append(v)
    referenced = _referenced_files(root, keep)
    # Manifests first: a removed version must never point at a removed file.
    for v in removed_versions:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_version_path(root, v))
    # versions committed meanwhile keep their files too (a compact's inputs, an old writer's files)
    referenced |= _referenced_files(root, {v for v in list_versions(root) if v > max(versions, default=-1)})
    removed_files: list[str] = []
    data_dir = os.path.join(root, DATA_DIR)
    for stored in _stored_files(root):
        rel = os.path.normpath(stored)
        path = os.path.join(root, rel)
        if rel in referenced or not os.path.isfile(path):
            continue
        mtime = _mtime(path)
        if mtime is None or now - mtime < grace_seconds:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        removed_files.append(path)
    vdir = _versions_dir(root)
    for name in os.listdir(vdir):
        path = os.path.join(vdir, name)
        mtime = _mtime(path) if name.startswith(".tmp-") else None
        if mtime is not None and now - mtime >= grace_seconds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    fsync_dir(vdir)
    if os.path.isdir(data_dir):
        fsync_dir(data_dir)
    return {"versions": removed_versions, "files": removed_files}
