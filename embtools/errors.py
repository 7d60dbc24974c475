"""Typed errors raised by embtools.

Every error derives from :class:`EmbtoolsError` *and* from the standard exception a caller would
naturally catch (``ValueError``, ``ImportError``, ``MemoryError``, ...), so both
``except embtools.errors.DimensionMismatchError`` and ``except ValueError`` work.

Examples
--------
>>> from embtools.errors import DimensionMismatchError, EmbtoolsError
>>> try:
...     raise DimensionMismatchError("expected 384 columns, got 128")
... except ValueError as err:
...     isinstance(err, EmbtoolsError)
True
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CommitConflictError",
    "CorruptStoreError",
    "DeviceUnavailableError",
    "DimensionMismatchError",
    "DuplicateTextIdError",
    "EmbtoolsError",
    "FilterError",
    "InvalidArgumentError",
    "InvalidEmbeddingsError",
    "LengthMismatchError",
    "MemoryLimitError",
    "ModelMismatchError",
    "ModelUnavailableError",
    "ReadOnlyStoreError",
    "SchemaMismatchError",
    "SnapshotExpiredError",
    "StorageAccessError",
    "StorageFullError",
    "StorageUnavailableError",
    "StoreNotFoundError",
]


class EmbtoolsError(Exception):
    """Base class of every error embtools raises on purpose."""


class InvalidArgumentError(EmbtoolsError, ValueError):
    """An argument is out of range or of the wrong kind (``k <= 0``, an unknown metric, ...)."""


class DimensionMismatchError(EmbtoolsError, ValueError):
    """An array's last dimension does not match the store's or the query's dimension."""


class InvalidEmbeddingsError(EmbtoolsError, ValueError):
    """Embeddings that cannot be stored: NaN or inf, ragged, empty, or an unsafe dtype."""


class LengthMismatchError(EmbtoolsError, ValueError):
    """Embeddings, text ids, labels or metadata columns disagree on the number of rows."""


class DuplicateTextIdError(EmbtoolsError, ValueError):
    """A text id occurs twice in a batch, or is already in the store."""


class SchemaMismatchError(EmbtoolsError, ValueError):
    """A metadata column clashes with a reserved name or changes its type."""


class FilterError(EmbtoolsError, ValueError):
    """A ``where`` filter that cannot be applied to the store's metadata."""


class MemoryLimitError(EmbtoolsError, MemoryError):
    """An operation would hold more embedding bytes than ``max_memory_gb`` allows."""


class BackendUnavailableError(EmbtoolsError, ImportError):
    """A compute backend whose framework is not installed; the message names the extra to install."""


class DeviceUnavailableError(EmbtoolsError, ValueError):
    """A device (``cuda``, ``cuda:1``, ``mps``) that is not present; the message lists what is."""


class StoreNotFoundError(EmbtoolsError, FileNotFoundError):
    """A path that is not an embtools store, or a version the store does not have."""


class CorruptStoreError(EmbtoolsError, OSError):
    """A store file (manifest or Parquet data file) that is damaged or not what its manifest says."""


class CommitConflictError(EmbtoolsError, RuntimeError):
    """A concurrent writer changed what this commit depends on; re-open and retry."""


class ReadOnlyStoreError(EmbtoolsError, PermissionError):
    """A write to a read-only snapshot (a store opened at an older ``version``)."""


class ModelMismatchError(EmbtoolsError, ValueError):
    """Texts embedded with a different model than the one recorded in the store."""


class ModelUnavailableError(EmbtoolsError, RuntimeError):
    """An embedding model that cannot be loaded (not installed, or not reachable offline)."""


class SnapshotExpiredError(CorruptStoreError):
    """The version a handle reads was removed by ``vacuum`` (its files are gone); re-open the store."""


class StorageFullError(EmbtoolsError, OSError):
    """The disk (or quota) filled up during a write; nothing was committed and the store is unchanged."""


class StorageAccessError(EmbtoolsError, PermissionError):
    """The object store refused the credentials or the request (wrong secret, no permission)."""


class StorageUnavailableError(EmbtoolsError, ConnectionError):
    """The object store stayed unreachable, dropped connections or throttled past the retries."""
