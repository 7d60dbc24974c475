"""The state behind an EmbeddingStore: one interface, a directory and an in-memory implementation.

:class:`StoreState` is what :class:`~embtools.store.EmbeddingStore` delegates to (it never asks
which kind it holds): the open version's :class:`~embtools.storage.source.VectorSource`, the
version and its history, writes (add, delete, compact, vacuum), refresh and close.
:class:`DirectoryState` is a store directory (versioned Parquet files, see
:mod:`embtools.storage.manifest`); :class:`~embtools.storage.memory_writer.MemoryState` keeps the
rows in memory (``EmbeddingStore(path=None)``). :func:`open_state` picks one.

Examples
--------
>>> import tempfile, numpy as np
>>> from embtools.memory import MemoryBudget
>>> from embtools.storage.ingest import prepare_batch
>>> state = open_state(tempfile.mkdtemp() + "/s", None, MemoryBudget(None), 2**20)
>>> src = state.source
>>> batch = prepare_batch(np.eye(2), stored_dims=src.dimensions, schema=src.schema, num_rows=0)
>>> state.add(batch, {"model": "m"}), state.versions(), state.source.num_rows, state.properties
(1, [0, 1], 2, {'model': 'm'})
>>> state.delete(np.array([0])), state.source.num_rows, len(state.files())
(2, 1, 1)
>>> mem = open_state(None, None, MemoryBudget(None), 2**20)
>>> mem.add(batch, {}), mem.versions(), mem.files(), mem.held_array(2).shape
(1, [0, 1], [], (2, 2))
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from embtools.errors import InvalidArgumentError, StoreNotFoundError
from embtools.memory import MemoryBudget
from embtools.storage import manifest as mf
from embtools.storage.columns import add_dimension_files, clear_files
from embtools.storage.ingest import Batch
from embtools.storage.io import LocalStorage, Storage, is_url
from embtools.storage.memory_writer import MemoryState
from embtools.storage.quantized import quantize_files
from embtools.storage.snapshot import Snapshot
from embtools.storage.writer import append, compact_files, delete_rows, save_source

__all__ = ["DirectoryState", "StoreState", "open_state", "open_storage"]


@runtime_checkable
class StoreState(Protocol):
    """What an EmbeddingStore holds: the open version and the operations that change it."""

    #: the store directory (absolute), or None in memory
    path: str | None
    #: opened at a fixed version (writes refused by the store)
    read_only: bool

    @property
    def source(self) -> Any:
        """The VectorSource of the open version (immutable: a write makes a new one)."""

    @property
    def version(self) -> int:
        """The open version."""

    @property
    def properties(self) -> dict[str, Any]:
        """Store-level JSON properties of the open version (do not modify)."""

    @property
    def config_hash(self) -> str:
        """Hash of dimensions, schema and properties."""

    def versions(self) -> list[int]:
        """The versions that can be opened, ascending."""

    def files(self) -> list[str]:
        """Absolute paths of the open version's data files ([] in memory)."""

    def held_array(self, dim: int) -> np.ndarray | None:
        """The whole read-only array of stored dimension ``dim`` when it is held in memory (the
        store's memory budget already counts it), else None."""

    def add(self, batch: Batch, properties: dict[str, Any]) -> int:
        """Append a prepared batch (and merge ``properties``); the new version."""

    def delete(self, positions: np.ndarray) -> int:
        """Remove the rows at ``positions`` (ascending, non-empty); the new version."""

    def compact(self, target_file_bytes: int) -> int:
        """Merge small data files; the new version, or the open one when nothing merges."""

    def add_dimension(self, dim: int, embeddings: np.ndarray) -> int:
        """Attach dimension ``dim`` (float32, one row per stored row, in row order); the new version."""

    def quantize(self, dim: int, kinds: tuple[str, ...], sample_rows: int) -> int:
        """Add ``kinds`` quantized columns of dimension ``dim`` for every row; the new version."""

    def clear(self) -> int:
        """Remove every row, dimension and metadata column; the new version."""

    def vacuum(self, retain_versions: int, older_than: Any, grace_seconds: float
               ) -> dict[str, list[Any]]:
        """Remove old versions and unreferenced files (arguments already checked)."""

    def refresh(self) -> int:
        """Move to the latest version (a writable directory store); the open version."""

    def close(self) -> None:
        """Release open files."""


def open_state(path: str | None, version: int | None, budget: MemoryBudget,
               target_file_bytes: int, storage_options: dict[str, Any] | None = None,
               cache_dir: str | None = None) -> StoreState:
    """A :class:`DirectoryState` for ``path`` (a directory or a URL; created when missing or
    empty), or a :class:`~embtools.storage.memory_writer.MemoryState` when ``path`` is None."""
    if path is None:
        if version is not None:
            raise InvalidArgumentError("version= needs a store path")
        return MemoryState(budget)
    return DirectoryState(open_storage(path, storage_options, cache_dir), version, budget,
                          target_file_bytes)


def open_storage(path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Storage:
    """The :class:`~embtools.storage.io.Storage` of a store path or URL: a directory for plain
    paths and ``file://`` URLs, obstore for ``s3://``, ``gs://``, ``az://`` (``storage_options``,
    ``cache_dir``: see :class:`~embtools.storage.object_store.ObjectStorage`)."""
    if isinstance(path, Storage):
        return path
    text = os.fspath(path)
    if is_url(text):
        if text.lower().startswith("file://"):
            if storage_options:
                raise InvalidArgumentError("file:// URLs take no storage_options")
            from urllib.parse import unquote, urlparse

            parsed = urlparse(text)
            if parsed.netloc not in ("", "localhost"):
                raise InvalidArgumentError(f"{text!r}: a file:// URL names a local path (file:///dir)")
            return LocalStorage(os.path.abspath(unquote(parsed.path)))
        from embtools.storage.object_store import ObjectStorage

        return ObjectStorage(text, storage_options, cache_dir)
    if storage_options:
        raise InvalidArgumentError("storage_options are for URLs (s3://, gs://, az://), not directories")
    return LocalStorage(os.path.abspath(text))


def _create_or_check(storage: Storage, version: int | None) -> None:
    """Create an empty store (version 0) unless one is there; refuse other contents."""
    if not isinstance(storage, LocalStorage):
        if mf.latest_version(storage) is not None:
            return
        if version is not None:
            raise StoreNotFoundError(f"no store at {storage.url!r}, so no version {version}")
        mf.commit(storage, lambda latest: latest or mf.empty_manifest("create"))
        return
    root = storage.local_root
    if mf.is_store(root):
        return
    exists = os.path.exists(root)
    if exists and not os.path.isdir(root):
        raise StoreNotFoundError(f"{root!r} is a file, not an embtools store directory")
    if exists and os.listdir(root):
        raise StoreNotFoundError(
            f"{root!r} is a non-empty directory that is not an embtools store (no _versions/)")
    if version is not None:
        raise StoreNotFoundError(f"no store at {root!r}, so no version {version}")
    os.makedirs(os.path.join(root, mf.DATA_DIR), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.makedirs(os.path.join(root, mf.VERSIONS_DIR))
    if mf.latest_version(root) is None:
        mf.commit(root, lambda latest: latest or mf.empty_manifest("create"))


class DirectoryState:
    """A store directory opened at ``version`` (read-only) or at the latest version (writable).

    Each write commits a new version and opens it (see :mod:`embtools.storage.writer`).
    """

    def __init__(self, path: str | os.PathLike[str] | Storage, version: int | None,
                 budget: MemoryBudget, target_file_bytes: int) -> None:
        self.storage = open_storage(path)
        #: the directory, or the URL of a store on object storage
        self.path: str | None = self.storage.url
        self.root: Storage = self.storage
        self.read_only = version is not None
        self.budget = budget
        self.target_file_bytes = target_file_bytes
        _create_or_check(self.storage, version)
        self._snap = Snapshot(self.storage, mf.read_manifest(self.storage, version), budget)

    # -- reads ----------------------------------------------------------------------------------
    @property
    def source(self) -> Snapshot:
        return self._snap

    @property
    def version(self) -> int:
        return int(self._snap.version)

    @property
    def properties(self) -> dict[str, Any]:
        return self._snap.manifest.properties

    @property
    def config_hash(self) -> str:
        return str(self._snap.manifest.config_hash)

    def versions(self) -> list[int]:
        return mf.list_versions(self.root)

    def files(self) -> list[str]:
        if self.storage.is_local:
            return self._snap.files()
        return [self.storage.display(f.path) for f in self._snap.manifest.files]

    def held_array(self, dim: int) -> np.ndarray | None:
        return None

    # -- writes ---------------------------------------------------------------------------------
    def _open(self, manifest: mf.Manifest) -> int:
        self._snap.close()
        self._snap = Snapshot(self.root, manifest, self.budget)
        return self.version

    def add(self, batch: Batch, properties: dict[str, Any]) -> int:
        return self._open(append(self.root, self._snap.manifest, batch, properties, self.budget,
                                 self.target_file_bytes))

    def delete(self, positions: np.ndarray) -> int:
        return self._open(delete_rows(self.root, self._snap, positions))

    def compact(self, target_file_bytes: int) -> int:
        manifest = compact_files(self.root, self._snap.manifest, target_file_bytes, self.budget)
        return self.version if manifest is None else self._open(manifest)

    def add_dimension(self, dim: int, embeddings: np.ndarray) -> int:
        return self._open(add_dimension_files(self.root, self._snap.manifest, dim, embeddings))

    def quantize(self, dim: int, kinds: tuple[str, ...], sample_rows: int) -> int:
        return self._open(quantize_files(self.root, self._snap.manifest, dim, kinds, self._snap,
                                         sample_rows))

    def clear(self) -> int:
        return self._open(clear_files(self.root, self._snap.manifest))

    def vacuum(self, retain_versions: int, older_than: Any, grace_seconds: float
               ) -> dict[str, list[Any]]:
        return mf.vacuum(self.root, retain_versions, older_than, grace_seconds)

    def save_source(self, source: Any, properties: dict[str, Any]) -> int:
        """Replace this store's rows with every row of ``source`` (row ids kept): a new version."""
        return self._open(save_source(self.root, self._snap.manifest, source, properties,
                                      self.budget, self.target_file_bytes))

    def refresh(self) -> int:
        if not self.read_only:
            self._open(mf.read_manifest(self.root, None))
        return self.version

    def close(self) -> None:
        self._snap.close()
        self.storage.close()
