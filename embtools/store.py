"""EmbeddingStore: the facade over the Parquet store, the memory budget, backends and search.

``EmbeddingStore(path)`` opens (or creates) a store directory: versioned, atomically committed Parquet
files (see :mod:`embtools.storage.manifest`). ``EmbeddingStore(path, version=N)`` is a read-only
snapshot of version N. ``EmbeddingStore(path=None)`` keeps everything in memory with the same API
(the seed's form); ``save_to_disk`` writes it as a store. Reads see the version the store has open;
a writable store moves to each version it commits (which includes other writers' commits), and
:meth:`EmbeddingStore.refresh` moves it to the latest.

Examples
--------
>>> import tempfile, numpy as np, polars as pl
>>> store = EmbeddingStore(tempfile.mkdtemp() + "/corpus", backend="numpy")
>>> x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
>>> store.add({8: x, 4: x[:, :4]}, text_ids=list("abcd"), labels=[0, 1, 0, 1],
...           metadata={"year": [2020, 2021, 2022, 2023]})
1
>>> store.dimensions, store.num_rows, store.versions()
([4, 8], 4, [0, 1])
>>> store.metadata().filter(pl.col("year") > 2021).select("text_id").collect()["text_id"].to_list()
['c', 'd']
>>> bool((store.get_embeddings(8, where="label = 1") == x[[1, 3]]).all())
True
>>> store.delete(pl.col("text_id") == "a"), store.num_rows
(2, 3)
"""

from __future__ import annotations

import itertools
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embtools.errors import (
    DimensionMismatchError,
    InvalidArgumentError,
    LengthMismatchError,
    MemoryLimitError,
    ReadOnlyStoreError,
    StoreNotFoundError,
)
from embtools.memory import GB, MemoryBudget

if TYPE_CHECKING:
    import polars as pl

    from embtools.storage.state import StoreState

__all__ = ["DEFAULT_TARGET_FILE_BYTES", "EmbeddingStore"]

DEFAULT_TARGET_FILE_BYTES = 256 * 1024**2
_VIEW_IDS = itertools.count()
"""Target size of a data file written by add() and compact()."""

_HINT = "use store.iter_batches(...) or store.search(...), which stream under the cap"


class _ClassOrInstance:
    """A method that is a classmethod on the class and a plain method on an instance (the seed
    called ``store.load_from_disk(dir)`` on an instance; embtools opens stores from the class)."""

    def __init__(self, on_class: str, on_instance: str) -> None:
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj: EmbeddingStore | None, owner: type[EmbeddingStore]
                ) -> Callable[..., EmbeddingStore]:
        if obj is None:
            return getattr(owner, self.on_class)  # type: ignore[no-any-return]
        return getattr(obj, self.on_instance)  # type: ignore[no-any-return]


class EmbeddingStore:
    """A versioned Parquet embedding store (``path``), or an in-memory one (``path=None``).

    Parameters
    ----------
    path : directory of the store, or a URL (``s3://bucket/prefix``, ``gs://``, ``az://``,
        ``file://``); created (version 0) when it does not exist or is empty. ``None`` keeps
        everything in memory.
    backend, device : compute backend for returned arrays (``embtools.get_backend``).
    max_memory_gb : cap on embedding bytes held at once (None: no cap).
    version : open this committed version read-only.
    target_file_bytes : size of the data files ``add`` writes (default 256 MiB).
    storage_options : settings of an object store (obstore's names: ``endpoint``, ``region``,
        ``access_key_id``, ``secret_access_key``, ``allow_http``, ...); never logged.
    cache_dir : a folder keeping the data files read from an object store across sessions.

    Examples
    --------
    >>> import numpy as np
    >>> mem = EmbeddingStore(backend="numpy", max_memory_gb=0.001)
    >>> mem.add_embeddings(np.ones((2, 3), np.float32), dimension=3, text_ids=["x", "y"])
    1
    >>> mem.get_available_dimensions(), mem.files()
    ([3], [])
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, backend: str | None = None,
                 max_memory_gb: float | None = None, device: str | None = None, *,
                 version: int | None = None, target_file_bytes: int | None = None,
                 storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        if (path in ("numpy", "torch", "mlx") and isinstance(backend, (int, float))
                and not isinstance(backend, bool) and device is None
                and (max_memory_gb is None or isinstance(max_memory_gb, str))):
            # the seed's positional EmbeddingStore(backend, max_memory_gb, device): seed_form below
            # reads the backend name
            seed_cap: Any = backend
            backend, max_memory_gb, device = None, seed_cap, max_memory_gb  # type: ignore[assignment]
        from embtools.backends import get_backend
        from embtools.storage.store_args import seed_form, store_path

        path, backend = seed_form(path, backend)  # the seed's EmbeddingStore("numpy", ...)
        abspath = store_path(path)
        if path is None and (storage_options or cache_dir is not None):
            raise InvalidArgumentError("storage_options and cache_dir need a store URL")

        self.budget = MemoryBudget(max_memory_gb)
        self.backend = get_backend(backend, device)
        self.max_memory_gb = max_memory_gb
        if target_file_bytes is not None and (
                isinstance(target_file_bytes, bool) or not isinstance(target_file_bytes, int)
                or target_file_bytes < 1):
            raise InvalidArgumentError(f"target_file_bytes must be an int >= 1, got {target_file_bytes!r}")
        self.target_file_bytes = target_file_bytes or DEFAULT_TARGET_FILE_BYTES
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise InvalidArgumentError(f"version must be an int, got {version!r}")
        self.path: str | None = abspath
        self.read_only = version is not None
        from embtools.storage.state import open_state

        #: the settings to pass to polars, DuckDB or pyarrow together with :meth:`files` (see README)
        self._state: StoreState = open_state(self.path, version, self.budget, self.target_file_bytes,
                                             storage_options, None if cache_dir is None else os.fspath(cache_dir))
        self.path = self._state.path
        self.storage_options: dict[str, Any] = dict(storage_options or {})

    @classmethod
    def _open_from_disk(cls, directory: str | os.PathLike[str], backend: str | None = None,
                        device: str | None = None, max_memory_gb: float | None = None,
                        version: int | None = None) -> EmbeddingStore:
        """``EmbeddingStore.load_from_disk(directory)``: open the store at ``directory``, or load a
        directory the seed's ``save_to_disk`` wrote into a new in-memory store.

        StoreNotFoundError when ``directory`` is neither; CorruptStoreError for damaged seed files.
        """
        from embtools.storage import seed_format
        from embtools.storage.manifest import is_store

        if is_store(directory):
            return cls(directory, backend=backend, max_memory_gb=max_memory_gb, device=device,
                       version=version)
        if not seed_format.is_seed_directory(directory):
            raise StoreNotFoundError(
                f"{os.fspath(directory)!r} is neither an embtools store nor a directory written by "
                "embedding_tools' save_to_disk")
        if version is not None:
            raise InvalidArgumentError("version= needs an embtools store; a seed directory has none")
        store = cls(None, backend=backend, max_memory_gb=max_memory_gb, device=device)
        seed = seed_format.read_seed(directory)
        if seed.arrays:
            store.add(seed.arrays, text_ids=seed.text_ids, labels=seed.labels)
        return store

    #: ``EmbeddingStore.load_from_disk(dir, backend=..., max_memory_gb=..., version=...)`` opens the
    #: store at ``dir`` (or loads a seed directory into memory); ``store.load_from_disk(dir)``, the
    #: seed's form, replaces this store's rows with those of ``dir`` and returns the store.
    load_from_disk = _ClassOrInstance("_open_from_disk", "_load_rows_from")

    def _load_rows_from(self, directory: str | os.PathLike[str]) -> EmbeddingStore:
        """The instance form of :attr:`load_from_disk`: this store's rows become ``directory``'s
        (a new version; nothing changes when ``directory`` cannot be read or does not fit)."""
        self._writable()
        other = EmbeddingStore._open_from_disk(directory, backend="numpy",
                                               max_memory_gb=self.max_memory_gb)
        try:
            if self.path is not None:
                other.save_to_disk(self.path)
                self.refresh()
                return self
            from embtools.storage.ingest import prepare_batch
            from embtools.storage.schema import base_schema

            src = other.source
            meta = src.metadata().collect()
            arrays = {d: np.asarray(other.get_embeddings(d)) for d in src.dimensions}
            user = meta.drop(["row_id", "text_id", "label"])
            batch = None
            if arrays and src.num_rows:
                batch = prepare_batch(arrays, meta["text_id"], meta["label"],
                                      user if user.width else None, stored_dims=[],
                                      schema=base_schema(), num_rows=0)
                need = src.num_rows * sum(arrays) * 4
                cap = self.budget.cap_bytes
                if cap is not None and need > cap:
                    raise MemoryLimitError(
                        f"load_from_disk: {need / GB:.3f} GB of embeddings do not fit "
                        f"max_memory_gb={self.max_memory_gb}")
            self._state.clear()
            if batch is not None:
                self._state.add(batch, other.properties)
            return self
        finally:
            other.close()

    def refresh(self) -> int:
        """Move a writable store to the latest committed version; returns it."""
        return self._state.refresh()

    # -- state ----------------------------------------------------------------------------------
    @property
    def source(self) -> Any:
        """The VectorSource of the open version (Snapshot or in-memory source)."""
        return self._state.source

    @property
    def version(self) -> int:
        return int(self._state.version)

    def versions(self) -> list[int]:
        """Committed versions (in-memory: 0..version)."""
        return self._state.versions()

    @property
    def dimensions(self) -> list[int]:
        return list(self.source.dimensions)

    def get_available_dimensions(self) -> list[int]:
        """Stored dimensions, ascending (the seed's name)."""
        return self.dimensions

    @property
    def num_rows(self) -> int:
        return int(self.source.num_rows)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def properties(self) -> dict[str, Any]:
        """Store-level JSON properties (e.g. the embedding model)."""
        return json.loads(json.dumps(self._state.properties))

    @property
    def config_hash(self) -> str:
        """Config hash of the store settings (dimensions, schema, properties)."""
        return str(self._state.config_hash)

    def files(self) -> list[str]:
        """Absolute paths (URLs on object storage: read them with :attr:`storage_options`) of the
        committed data files of the open version ([] in memory)."""
        return self._state.files()

    def __repr__(self) -> str:
        where = "memory" if self.path is None else repr(self.path)
        cap = "no cap" if self.max_memory_gb is None else f"{self.max_memory_gb:g} GB cap"
        return (f"EmbeddingStore({where}, version={self.version}, rows={self.num_rows}, "
                f"dims={self.dimensions}, backend={self.backend.name!r}, "
                f"memory={self.budget.held_bytes / GB:.4f} GB held, {cap})")

    # -- writes ---------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(
                f"this store was opened at version {self.version} (read-only snapshot); open it "
                "without version= to write")

    def add(self, embeddings: Any, text_ids: Any = None, labels: Any = None, metadata: Any = None,
            *, properties: Mapping[str, Any] | None = None) -> int:
        """Append rows; returns the new version.

        ``embeddings``: an array of any backend, nested lists, a pyarrow FixedSizeList/ChunkedArray,
        a polars Array Series, or ``{dim: array}`` for several dimensions of the same rows.
        ``text_ids`` default to ``"row-<row_id>"``. ``metadata``: dict of columns, polars DataFrame
        or pyarrow Table. ``properties`` is merged into the store properties in the same commit.
        """
        return self._add(embeddings, text_ids, labels, metadata, None, properties)

    def add_embeddings(self, embeddings: Any, dimension: int, text_ids: Any = None,
                       labels: Any = None, metadata: Any = None) -> int:
        """The seed's form of :meth:`add` for one dimension; returns the new version.

        As in the seed, a dimension the store does not hold yet, given for exactly the stored rows
        (same count; ``text_ids`` and ``labels`` omitted or equal to the stored ones, in order; no
        metadata), is attached to those rows (see :meth:`add_dimension`).
        """
        src = self.source
        if (src.num_rows and metadata is None and not isinstance(embeddings, Mapping)
                and isinstance(dimension, (int, np.integer)) and not isinstance(dimension, bool)
                and dimension >= 1 and int(dimension) not in src.dimensions):
            return self._attach(dimension, embeddings, text_ids, labels, DimensionMismatchError)
        return self._add(embeddings, text_ids, labels, metadata, dimension, None)

    def add_dimension(self, dimension: int, embeddings: Any, text_ids: Any = None) -> int:
        """Attach a dimension the store does not hold yet to its rows; returns the new version.

        ``embeddings`` has one row per stored row, in row order; ``text_ids``, when given, must be
        the stored ids in the same order. On disk every data file is rewritten copy-on-write with
        the new ``emb_<dimension>`` column and the new version is committed atomically. Anything
        ambiguous (another row count, other ids, a stored dimension, an empty store) raises before
        anything is written.

        Examples
        --------
        >>> import numpy as np
        >>> store = EmbeddingStore(backend="numpy")
        >>> store.add_embeddings(np.ones((3, 8), np.float32), dimension=8, text_ids=["a", "b", "c"])
        1
        >>> store.add_dimension(2, np.zeros((3, 2), np.float32), text_ids=["a", "b", "c"])
        2
        >>> store.get_available_dimensions()
        [2, 8]
        """
        return self._attach(dimension, embeddings, text_ids, None, LengthMismatchError)

    def _attach(self, dimension: Any, embeddings: Any, text_ids: Any, labels: Any,
                count_error: type[ValueError]) -> int:
        """:meth:`add_dimension`; a row count other than the store's raises ``count_error``
        (add_embeddings: DimensionMismatchError, as for any add that lacks a stored dimension)."""
        self._writable()
        from embtools.storage.ingest import as_embedding_matrix, check_finite

        if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
            raise InvalidArgumentError(f"dimension must be an int >= 1, got {dimension!r}")
        dim = int(dimension)
        src = self.source
        if dim in src.dimensions:
            raise DimensionMismatchError(f"dimension {dim} is already stored")
        n = src.num_rows
        if n == 0:
            raise InvalidArgumentError(
                f"the store has no rows to attach dimension {dim} to; use add_embeddings")
        arr = as_embedding_matrix(embeddings)
        if arr.shape[1] != dim:
            raise DimensionMismatchError(f"embeddings have {arr.shape[1]} columns but dimension={dim}")
        if arr.shape[0] != n:
            raise count_error(
                f"dimension {dim} is not stored yet: it can only be attached to the {n} stored rows "
                f"(one row each, in row order), got {arr.shape[0]} rows; to add new rows, give every "
                f"stored dimension {src.dimensions}")
        if text_ids is not None and _as_list(text_ids) != self.get_text_ids():
            raise InvalidArgumentError(
                f"dimension {dim} is not stored yet: its text_ids must be the stored ones in the "
                "same order (new texts need every stored dimension)")
        if labels is not None and _as_list(labels) != self.get_labels():
            raise InvalidArgumentError(
                f"dimension {dim} is not stored yet: its labels must be the stored ones")
        check_finite(arr, "embeddings")
        return int(self._state.add_dimension(dim, np.ascontiguousarray(arr, dtype=np.float32)))

    def quantize(self, dimension: int = 384, kinds: Any = ("int8", "binary"), *,
                 sample_rows: int = 100_000) -> int:
        """Add quantized columns of ``dimension`` for every row; returns the new version.

        ``kinds``: ``"int8"`` (``emb_<d>_i8``, one byte per dimension, per-dimension ranges
        computed on a uniform sample of ``sample_rows`` rows and recorded in the manifest) and/or
        ``"binary"`` (``emb_<d>_b1``, packed sign bits). The codes equal sentence-transformers'
        ``quantize_embeddings(..., precision="int8"/"ubinary", ranges=...)``. Later adds encode
        their rows the same way; delete and compact keep the columns. Quantizing a dimension again
        replaces its codes (and ranges). Search them with ``search(..., precision=)``.

        Examples
        --------
        >>> import numpy as np
        >>> store = EmbeddingStore(backend="numpy")
        >>> _ = store.add_embeddings(np.random.default_rng(0).normal(size=(50, 16)), dimension=16)
        >>> store.quantize(16, kinds=("binary",))
        2
        >>> store.quantized
        {16: ('binary',)}
        """
        self._writable()
        from embtools.storage.quantspec import check_kinds

        if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)):
            raise InvalidArgumentError(f"dimension must be an int, got {dimension!r}")
        dim = int(dimension)
        if dim not in self.source.dimensions:
            raise DimensionMismatchError(
                f"dimension {dim} is not stored; stored: {self.source.dimensions} (quantize a "
                "stored dimension, or store the prefix first with slice_to_dimension)")
        kinds_t = check_kinds(kinds)
        if isinstance(sample_rows, bool) or not isinstance(sample_rows, (int, np.integer)) or sample_rows < 2:
            raise InvalidArgumentError(f"sample_rows must be an int >= 2, got {sample_rows!r}")
        if self.source.num_rows == 0:
            raise InvalidArgumentError("the store has no rows to quantize; add rows first")
        return int(self._state.quantize(dim, kinds_t, int(sample_rows)))

    @property
    def quantized(self) -> dict[int, tuple[str, ...]]:
        """The quantized dimensions and their kinds, e.g. ``{384: ("binary", "int8")}``."""
        specs = getattr(self.source, "quantized", {}) or {}
        return {d: specs[d].kinds for d in sorted(specs)}

    def clear(self) -> int:
        """Remove every row, dimension and metadata column (the seed's ``clear()``); the new version.

        On disk the old versions stay readable until vacuumed.
        """
        self._writable()
        return int(self._state.clear())

    def _add(self, embeddings: Any, text_ids: Any, labels: Any, metadata: Any,
             dimension: int | None, properties: Mapping[str, Any] | None) -> int:
        self._writable()
        props = _check_properties(properties)
        from embtools.storage.ingest import prepare_batch

        src = self.source
        batch = prepare_batch(embeddings, text_ids, labels, metadata, dimension=dimension,
                              stored_dims=src.dimensions, schema=src.schema, num_rows=src.num_rows)
        return int(self._state.add(batch, props))

    def delete(self, where: Any) -> int:
        """Delete the rows matching ``where`` (polars expression or SQL string); returns the version.

        A new version when rows match (old versions stay readable until vacuumed); when nothing
        matches, nothing is committed and the current version is returned.
        """
        self._writable()
        if where is None:
            raise InvalidArgumentError("delete needs a where filter (use a literal True to delete all)")
        positions = self.source.select(where)
        if positions.size == 0:
            return self.version
        return int(self._state.delete(positions))

    def compact(self, target_file_bytes: int | None = None) -> int:
        """Merge consecutive small data files into files of about ``target_file_bytes``, and
        rewrite files written before embtools placed its pages aligned (they are read by copying).

        Row ids and row order are kept. Returns the new version, or the current one when there is
        nothing to do (in memory there never is).
        """
        self._writable()
        if target_file_bytes is not None and (
                isinstance(target_file_bytes, bool) or not isinstance(target_file_bytes, int)
                or target_file_bytes < 1):
            raise InvalidArgumentError(f"target_file_bytes must be an int >= 1, got {target_file_bytes!r}")
        return int(self._state.compact(target_file_bytes or self.target_file_bytes))

    def vacuum(self, retain_versions: int = 1, older_than: Any = None,
               grace_seconds: float = 3600.0) -> dict[str, list[Any]]:
        """Remove old versions and unreferenced files (see :func:`embtools.storage.manifest.vacuum`).

        Keeps the newest ``retain_versions`` versions; data files that no kept version references are
        removed once older than ``grace_seconds`` (so a concurrent writer's files survive until it
        commits). Readers of removed versions can no longer read them.
        """
        self._writable()
        from embtools.storage.manifest import check_vacuum_args

        check_vacuum_args(retain_versions, older_than, grace_seconds)
        return self._state.vacuum(retain_versions, older_than, grace_seconds)

    def save_to_disk(self, directory: str | os.PathLike[str]) -> int:
        """Write the open version as a store at ``directory`` (a new version there); returns it."""
        from embtools.storage.io import is_url

        target = os.fspath(directory)
        target = target if is_url(target) else os.path.abspath(target)
        if (self.path is not None and not is_url(target) and not is_url(self.path)
                and os.path.exists(target) and os.path.samefile(self.path, target)):
            raise InvalidArgumentError("save_to_disk: target is this store's own directory")
        from embtools.storage.state import DirectoryState

        dst = DirectoryState(target, None, self.budget, self.target_file_bytes)
        try:
            return dst.save_source(self.source, self.properties)
        finally:
            dst.close()

    # -- reads ----------------------------------------------------------------------------------
    def metadata(self) -> Any:
        """polars LazyFrame of row_id, text_id, label and the metadata columns, in row order."""
        return self.source.metadata()

    def get_text_ids(self) -> list[str]:
        """The text ids in row order (the seed's accessor)."""
        return [str(t) for t in self.source.metadata().select("text_id").collect()["text_id"]]

    def get_labels(self) -> list[Any]:
        """The labels in row order, None where a row has none (the seed's accessor)."""
        return list(self.source.metadata().select("label").collect()["label"].to_list())

    def get_embeddings(self, dimension: int, where: Any = None) -> Any:
        """All (or the ``where``-selected) rows of ``dimension`` as one backend array, in row order.

        Raises MemoryLimitError when the result would pass ``max_memory_gb``.
        """
        src = self.source
        stored = src.resolve(dimension)
        dim = int(dimension)
        held = self._state.held_array(dim) if where is None and stored == dim else None
        if held is not None:  # in memory: already counted by the budget, handed out read-only
            return self.backend.from_numpy(held)
        positions = None if where is None else src.select(where)
        src.check_files()  # the row count is the files' (not only the manifest's) before allocating
        n = src.num_rows if positions is None else int(positions.size)
        nbytes = n * dim * 4
        key = f"get_embeddings/{id(self)}"
        self.budget.check(nbytes, f"get_embeddings({dim}) of {n} rows", _HINT)
        view = src.mapped_view(dim, positions)
        if view is not None:  # rows of one aligned row group: the mapped file itself, no copy
            return self.backend.from_numpy(self._hold_view(view, stored))
        from embtools.storage.source import gather_rows

        with self.budget.holding(key, nbytes, f"get_embeddings({dim})", _HINT):
            out = gather_rows(src, dim, positions)
        return self.backend.from_numpy(out)

    def _hold_view(self, view: np.ndarray, stored: int) -> np.ndarray:
        """Count a mapped view against the cap until it is garbage collected (like a loaded array)."""
        key = f"mapped/emb_{stored}/{next(_VIEW_IDS)}"
        self.budget.hold(key, view.shape[0] * view.shape[1] * 4, f"get_embeddings({view.shape[1]})", _HINT)
        weakref.finalize(view, self.budget.free, key)
        return view

    def iter_batches(self, dimension: int, where: Any = None, batch_rows: int | None = None
                     ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(polars metadata DataFrame, backend array)`` batches in row order.

        The batch size comes from the memory cap; a ``batch_rows`` that does not fit raises
        MemoryLimitError before anything is read.
        """
        src = self.source
        src.resolve(dimension)
        dim = int(dimension)
        if batch_rows is not None:
            if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
                raise InvalidArgumentError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
            self.budget.check(int(batch_rows) * dim * 4, f"a batch of {batch_rows} rows of dimension {dim}",
                              "pass a smaller batch_rows")
            rows = int(batch_rows)
        else:
            rows = src.default_batch_rows(dim)
        positions = None if where is None else src.select(where)
        return self._batches(src, dim, positions, rows)

    def _batches(self, src: Any, dim: int, positions: Any, rows: int) -> Iterator[tuple[Any, Any]]:
        key = f"iter_batches/{id(self)}/{id(positions)}"
        # a scan of every row: each batch a view of the mapped file (batches end at row groups)
        views = "always" if positions is None else False
        with self.budget.holding(key, rows * dim * 4, f"iter_batches({dim})"):
            for pos, block in src.iter_vectors(dim, positions, batch_rows=rows, views=views):
                meta = src.take_metadata(pos, [c for c in src.schema.names
                                               if c not in ("row_id", "text_id", "label")])
                yield meta, self.backend.from_numpy(block)

    def slice_to_dimension(self, source_dim: int, target_dim: int, normalize: bool = False) -> Any:
        """The first ``target_dim`` values of every row of ``source_dim`` (the seed's raw prefix).

        As in the seed, the prefix is kept as a stored dimension when the store does not hold
        ``target_dim`` yet (in memory: held; on disk: a new version with an ``emb_<target_dim>``
        column), so ``get_available_dimensions()`` lists it afterwards; a read-only snapshot only
        returns it. ``normalize=True`` returns the prefix re-normalised to unit length (what is
        kept is always the raw prefix).

        Examples
        --------
        >>> import numpy as np
        >>> store = EmbeddingStore(backend="numpy")
        >>> store.add_embeddings(np.array([[3.0, 4.0, 12.0]], np.float32), dimension=3)
        1
        >>> store.slice_to_dimension(3, 2).tolist(), store.get_available_dimensions()
        ([[3.0, 4.0]], [2, 3])
        >>> [round(float(v), 2) for v in store.slice_to_dimension(3, 2, normalize=True)[0]]
        [0.6, 0.8]
        """
        src = self.source
        stored = src.resolve(source_dim)
        if isinstance(target_dim, bool) or not isinstance(target_dim, (int, np.integer)) or not (
                1 <= target_dim <= source_dim):
            raise DimensionMismatchError(
                f"target_dim must be between 1 and source_dim={source_dim}, got {target_dim!r}")
        target = int(target_dim)
        n = src.num_rows
        nbytes = n * target * 4
        self.budget.check(nbytes, f"slice_to_dimension({source_dim}, {target}) of {n} rows", _HINT)
        out = np.empty((n, target), dtype=np.float32)
        with self.budget.holding(f"slice_to_dimension/{id(self)}", nbytes,
                                 f"slice_to_dimension({target})", _HINT):
            pos = 0
            for _, block in src.iter_vectors(stored, batch_rows=src.default_batch_rows(stored)):
                out[pos:pos + len(block)] = block[:, :target]
                pos += len(block)
        if target not in src.dimensions and not self.read_only and n:
            self._state.add_dimension(target, out)
        x = self.backend.from_numpy(out)
        return self.backend.normalize(x) if normalize else x

    def verify(self) -> Any:
        """Check every data file of the open version, every page's CRC-32 included.

        Returns a :class:`~embtools.storage.verify.VerifyReport`: ``ok``, ``files_checked`` and
        ``damaged`` (``(path, reason)`` pairs). Reads every byte of the store; the in-memory store
        has no files to check.
        """
        from embtools.storage.verify import VerifyReport, verify_store

        src = self.source
        if not hasattr(src, "manifest"):  # the in-memory store
            return VerifyReport(self.version, 0, [])
        return verify_store(src.root, src.manifest)

    # -- memory ---------------------------------------------------------------------------------
    def get_memory_info(self) -> dict[str, Any]:
        """Embedding bytes per dimension (stored and held in memory), what is held, and the cap.

        The seed's keys: ``total_bytes`` and ``total_gb`` (held now; in memory, every embedding),
        ``max_gb``, ``utilization`` (held / cap, 0..1; None without a cap), and per dimension
        ``shape``, ``dtype``, ``memory_bytes`` and ``memory_mb``.
        """
        src = self.source
        held = self.budget.held()
        dims: dict[int, dict[str, Any]] = {}
        for d in src.dimensions:
            held_d = sum(v for k, v in held.items()
                         if k == f"store/emb_{d}" or k.startswith(f"mapped/emb_{d}/"))
            dims[d] = {"rows": src.num_rows, "shape": (src.num_rows, d), "dtype": "float32",
                       "bytes": src.num_rows * d * 4, "held_bytes": held_d,
                       "memory_bytes": held_d, "memory_mb": held_d / 1024**2}
        total = self.budget.held_bytes
        cap = self.budget.cap_bytes
        return {
            # the seed's keys: bytes held (in memory: every embedding), the cap, the fraction used
            "total_bytes": total,
            "total_gb": total / GB,
            "max_gb": self.max_memory_gb,
            "utilization": None if cap is None else total / cap,
            "dimensions": dims,
            "in_memory": self.path is None,
            "held": held,
            "held_bytes": total,
            "stored_bytes": sum(v["bytes"] for v in dims.values()),
            "total_memory_gb": total / GB,
            "max_memory_gb": self.max_memory_gb,
            "cap_bytes": cap,
            "usage_percent": None if cap is None else 100.0 * total / cap,
        }

    def get_total_memory_usage(self) -> int:
        """Embedding bytes held now (the in-memory store's arrays, batches in flight), as in the seed."""
        return int(self.budget.held_bytes)

    # -- indexes --------------------------------------------------------------------------------
    def create_index(self, dimension: int = 384, partitions: int | None = None, codes: Any = "int8",
                     sample_rows: int | None = None, metric: str = "cosine", *,
                     soar_lambda: float | None = None, progress: bool | None = None) -> int:
        """Build an IVF index of ``dimension`` for ``metric`` and commit it; the new version.

        Spherical k-means (plain k-means for ``l2``) on a sample of ``sample_rows`` rows (default
        64 per partition, at least 100,000) finds ``partitions`` centroids (default about
        ``4 * sqrt(rows)``) on the store's backend; every row's probe ``codes`` (``"int8"``: a
        byte per dimension, per-dimension ranges from the sample; ``"binary"``: sign bits, scored
        asymmetrically; ``"float"``: the float32 vector; an int: that Matryoshka prefix) are
        written in partition order as Parquet under ``_index/``. Searches of this dimension and metric then use the index (see
        :meth:`search`); rows added later are searched exactly until :meth:`optimize_index`.
        ``soar_lambda`` (ScaNN's name; 1.0 is a good start) also writes each row to a second
        partition chosen by SOAR (:mod:`embtools.index.soar`): twice the index, about half the
        probes for the same recall where partitions are small or the data spread out. Runs under
        ``max_memory_gb``; ``progress`` shows a bar (default: on a terminal).

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> store = EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
        >>> x = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
        >>> _ = store.add(x)
        >>> store.create_index(dimension=8, partitions=4, codes="float")
        2
        >>> store.search(x[5], k=1, nprobe=4)["row_id"].to_list()
        [5]
        """
        from embtools.index import create_index

        return create_index(self, dimension, partitions, codes, sample_rows, metric, soar_lambda=soar_lambda,
                            progress=progress)

    def optimize_index(self, dimension: int | None = None, metric: str | None = None, *,
                       retrain_share: float = 0.2, progress: bool | None = None) -> int:
        """Index the rows added since the index was built (assigned to its centroids), or build
        it again when rows outside it or deleted since pass ``retrain_share`` of the store; the
        new version (the open one when the index is up to date)."""
        from embtools.index import optimize_index

        return optimize_index(self, dimension, metric, retrain_share=retrain_share, progress=progress)

    def drop_index(self, dimension: int | None = None, metric: str | None = None) -> int:
        """Remove the index of ``dimension`` and ``metric`` (None: all) as a new version."""
        from embtools.index import drop_index

        return drop_index(self, dimension, metric)

    def indexes(self) -> list[dict[str, Any]]:
        """The indexes of the open version and how much of it they cover (a dict each)."""
        from embtools.index import index_info

        return index_info(self)

    def find_index(self, dimension: int, metric: str) -> Any:
        """The index a search of ``dimension`` and ``metric`` uses in the open version, or None."""
        if self.path is None or not self.source.manifest.indexes:
            return None
        from embtools.index import find_index

        return find_index(self, dimension, metric)

    # -- delegates ------------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, *, dimension: int | None = None,
               metric: str = "cosine", where: Any = None, columns: Sequence[str] | None = None,
               funnel: Sequence[tuple[int | str, int]] | None = None, batch_rows: int | None = None,
               screen: str | None = None, nprobe: int | None = None, refine: int | None = None,
               exact: bool = False, precision: str | None = None,
               rescore: int | None = None) -> pl.DataFrame:
        """Top-``k`` rows for each query, as a polars DataFrame ``query, rank, row_id,
        text_id, label, score`` (+ ``columns``); see :func:`embtools.search.search_store`.

        ``queries``: an array (``(n, d)`` or ``(d,)``, any backend), a text or texts (embedded
        with the store's model), or another store (each of its rows a query). ``where`` filters
        the rows searched; ``funnel`` runs the Matryoshka funnel; ``batch_rows`` caps the rows per
        batch; ``screen`` ("auto", "on", "off") allows, forces or forbids the bfloat16 screen.
        ``precision="binary"`` or ``"int8"`` (after :meth:`quantize`) shortlists ``rescore * k``
        rows per query by the quantized codes and returns the best ``k`` with exact float scores
        (approximate: recall, not exactness; ``funnel=[("binary", 400), ("int8", 40)]`` chains
        quantized stages). Any search that can stream under ``max_memory_gb`` does; otherwise MemoryLimitError names
        the smallest cap that works (see :meth:`explain`).

        Without an index the search is exact. With an index of this dimension and metric (see
        :meth:`create_index`) it probes the ``nprobe`` nearest partitions of each query (default
        about ``sqrt(partitions)``), shortlists ``k * refine`` rows by the index codes and
        re-ranks them with exact scores; rows added after the index are searched exactly and
        merged, deleted rows never come back. ``exact=True`` searches every row.
        """
        from embtools.search import search_store

        return search_store(self, queries, k, dimension=dimension, metric=metric, where=where,
                            columns=columns, funnel=funnel, batch_rows=batch_rows, screen=screen,
                            nprobe=nprobe, refine=refine, exact=exact,
                            precision=precision, rescore=rescore)

    def explain(self, queries: Any, k: int = 10, *, dimension: int | None = None,
                metric: str = "cosine", where: Any = None,
                funnel: Sequence[tuple[int | str, int]] | None = None, batch_rows: int | None = None,
                screen: str | None = None, precision: str | None = None,
                rescore: int | None = None, nprobe: int | None = None, refine: int | None = None,
                exact: bool = False) -> str:
        """The plan ``search`` would run with these arguments, as text: path, batch rows, bytes
        per batch, passes over the rows, whether torch is used, the smallest cap that works.

        Examples
        --------
        >>> import numpy as np
        >>> store = EmbeddingStore(backend="numpy", max_memory_gb=0.01)
        >>> _ = store.add_embeddings(np.eye(8, dtype=np.float32), dimension=8)
        >>> store.explain(np.eye(8, dtype=np.float32)[:2], k=3).splitlines()[1]
        'path: float32 stream, then a float64 re-rank of 8 candidates per query'
        """
        from embtools.search.api import explain_search

        return explain_search(self, queries, k, dimension=dimension, metric=metric, where=where,
                              funnel=funnel, batch_rows=batch_rows, screen=screen,
                              precision=precision, rescore=rescore, nprobe=nprobe, refine=refine,
                              exact=exact)

    def compute_similarity(self, query: Any, dimension: int, top_k: int | None = None, *,
                           nprobe: int | None = None, refine: int | None = None,
                           exact: bool = False) -> Any:
        """The seed's ``(similarities, indices)`` search, through a cosine index when one covers
        the dimension (see :func:`embtools.search.compute_similarity`)."""
        from embtools.search import compute_similarity

        return compute_similarity(self, query, dimension, top_k, nprobe=nprobe, refine=refine,
                                  exact=exact)

    def add_texts(self, texts: Any, text_ids: Any = None, labels: Any = None, metadata: Any = None,
                  model: Any = None, **kwargs: Any) -> Any:
        """Embed ``texts`` and add them (see :func:`embtools.embed.add_texts`)."""
        from embtools.embed import add_texts

        return add_texts(self, texts, text_ids=text_ids, labels=labels, metadata=metadata,
                         model=model, **kwargs)

    def close(self) -> None:
        """Close open data files."""
        self._state.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_list(values: Any) -> list[Any]:
    """A column given by the caller (list, NumPy, polars, pyarrow) as a list of Python values."""
    if hasattr(values, "to_pylist"):
        return list(values.to_pylist())
    if hasattr(values, "to_list"):
        return list(values.to_list())
    if isinstance(values, np.ndarray):
        return list(values.tolist())
    if isinstance(values, (str, bytes)):
        return [values]
    return list(values)


def _check_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping) or not all(isinstance(k, str) for k in properties):
        raise InvalidArgumentError("properties must be a dict with string keys")
    try:
        return dict(json.loads(json.dumps(dict(properties), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"properties must be JSON-serialisable: {exc}") from None

