"""The storage I/O interface of a store: one small abstract class, a local and an object-store
implementation (after zarr-python v3's ``zarr.abc.store``).

Everything a store keeps goes through a :class:`Storage` under relative keys (``_versions/...json``,
``data/<hex>.parquet``): manifests are listed, read and *created only* (``create`` never replaces an
object: two writers racing for one version cannot both win), data files are written, read (whole or
by byte ranges) and deleted. :class:`LocalStorage` is a directory (create-only by ``os.link``);
:class:`~embtools.storage.object_store.ObjectStorage` is S3, GCS, Azure or ``file://`` through
obstore (create-only by ``If-None-Match: *``). ``tests/test_storage_io.py`` runs one conformance
class against each.

The read path (mmap, page checks) works on local files: ``local_root`` is the folder holding the
data files on this machine (the store directory itself, or the object store's download cache), and
:meth:`Storage.fetch` makes sure a data file is there. :meth:`Storage.upload` publishes a data file
written under ``local_root`` (a no-op for a directory).

Examples
--------
>>> import tempfile
>>> s = LocalStorage(tempfile.mkdtemp())
>>> s.create("_versions/a.json", b"{}"), s.create("_versions/a.json", b"[]")
(True, False)
>>> s.read("_versions/a.json"), s.read_ranges("_versions/a.json", [(0, 1), (1, 2)])
(b'{}', [b'{', b'}'])
>>> [(o.key, o.size) for o in s.list("_versions/")]
[('_versions/a.json', 2)]
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from embtools.storage.durable import fsync_dir, fsync_file

__all__ = ["CRASH_ENV", "LocalStorage", "ObjectInfo", "Storage", "as_storage", "crash_point", "is_url"]

CRASH_ENV = "EMBTOOLS_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$EMBTOOLS_CRASH_AT`` equals ``name``.

    Named points: ``after_data`` (data files written, no manifest), ``after_manifest_tmp`` (temporary
    manifest written, not published), ``before_dir_fsync`` (published, directory not yet fsynced).
    Harmless in production: the variable is never set.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store), size in bytes, modification time (s)."""

    key: str
    size: int
    mtime: float


class Storage(ABC):
    """Byte storage of one store under ``/``-separated relative keys."""

    #: the store's location as the user gave it (a path or a URL)
    url: str
    #: the local folder holding the data files this process reads (see the module doc)
    local_root: str
    #: whether the objects live on this machine (local_root is the store itself)
    is_local: bool = True

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object (FileNotFoundError when it does not exist)."""

    @abstractmethod
    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes ``start:end`` of each range (adjacent ranges may be fetched together)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write the object (replacing it: only for data files, whose names are never reused)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write the object unless it exists; True when this call created it, False when not."""

    @abstractmethod
    def list(self, prefix: str, after: str | None = None) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (only those sorting after ``after``), by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (a missing one is not an error)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and modification time (FileNotFoundError when it does not exist)."""

    # -- data files on this machine -----------------------------------------------------------
    def local_path(self, key: str) -> str:
        """Where the data file ``key`` is (or will be, once fetched or written) on this machine."""
        return os.path.join(self.local_root, *key.split("/"))

    def fetch(self, key: str) -> str:
        """The local path of data file ``key``, downloading it first when it is not there
        (FileNotFoundError when there is no such object; a directory returns the path as it is)."""
        return self.local_path(key)

    def prefetch(self, key: str, size: int, columns: Collection[str] | None = (),
                 row_groups: Collection[int] | None = None) -> str:
        """The local path of data file ``key`` (``size`` bytes) holding at least its footer and the
        column chunks of ``columns`` (top-level names; None: all) in ``row_groups`` (None: all).

        A directory has everything; an object store fetches only the missing byte ranges.
        """
        return self.local_path(key)

    def upload(self, key: str) -> None:
        """Publish the data file written at :meth:`local_path` ``(key)`` (no-op for a directory)."""
        return None

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        try:
            self.head(key)
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Release what this storage holds (a temporary download cache)."""
        return None

    def display(self, key: str) -> str:
        """``key`` as users see it in messages (a path or a URL)."""
        return self.local_path(key) if self.is_local else f"{self.url.rstrip('/')}/{key}"


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].isidentifier()


def as_storage(root: Any) -> Storage:
    """``root`` itself when it is a Storage, else a :class:`LocalStorage` of the directory."""
    if isinstance(root, Storage):
        return root
    return LocalStorage(os.fspath(root))


class LocalStorage(Storage):
    """A store directory. ``create`` links a fsynced temporary file to its name (fails when taken)."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.url = os.fspath(root)
        self.local_root = self.url

    def _path(self, key: str) -> str:
        return os.path.join(self.local_root, *key.split("/"))

    def read(self, key: str) -> bytes:
        with open(self._path(key), "rb") as fh:
            return fh.read()

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, max(0, end - start), start) for start, end in ranges]
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fsync_file(fh)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}.json")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fsync_file(fh)
            crash_point("after_manifest_tmp")
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:  # the temporary file goes whatever happened (a full disk, a lost race)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        crash_point("before_dir_fsync")
        with contextlib.suppress(OSError):  # published: the directory fsync is best effort
            fsync_dir(folder)
        return True

    def list(self, prefix: str, after: str | None = None) -> list[ObjectInfo]:
        folder, _, stem = prefix.rpartition("/")
        base = self._path(folder) if folder else self.local_root
        out: list[ObjectInfo] = []
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for e in entries:
            key = f"{folder}/{e.name}" if folder else e.name
            if not e.name.startswith(stem) or (after is not None and key <= after):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile
                continue
            if e.is_dir(follow_symlinks=False):
                continue
            out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def head(self, key: str) -> ObjectInfo:
        st = os.stat(self._path(key))
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def sync(self, folder: str) -> None:
        """fsync the folder ``folder`` (entries created or removed in it survive a power loss)."""
        path = self._path(folder)
        if os.path.isdir(path):
            fsync_dir(path)
