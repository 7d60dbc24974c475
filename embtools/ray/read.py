"""read_store: a Ray dataset over one committed version of a store.

The driver opens the store at one version (the latest when ``version`` is None), resolves
``where`` to row positions and cuts them into blocks along the data files; each read task opens
that same version read-only and reads its rows with the store's own reader (page reads of the
embedding columns, mapped zero-copy and checked against their CRCs), so whatever is committed
meanwhile, the dataset is one consistent snapshot. Embedding columns come as Ray tensor columns:
``iter_batches(batch_format="numpy")`` gives each ``emb_<d>`` as a float32 ``(rows, d)`` array.

Examples
--------
>>> ds = read_store("corpus.store", dimension=384, where="label = 'news'")   # doctest: +SKIP
>>> next(ds.iter_batches(batch_format="numpy"))["emb_384"].shape             # doctest: +SKIP
(1024, 384)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from embtools.errors import InvalidArgumentError
from embtools.storage.schema import emb_column

__all__ = ["StoreDatasource", "read_store"]

#: Bytes of embeddings per block (Ray's default target block size is 128 MiB).
BLOCK_BYTES = 64 * 1024**2


def _open(root: str, version: int | None, options: dict[str, Any] | None) -> Any:
    from embtools.store import EmbeddingStore

    return EmbeddingStore(root, backend="numpy", version=version, storage_options=options)


class StoreDatasource(Datasource):
    """The Ray datasource behind :func:`read_store` (one version, positions cut along files)."""

    def __init__(self, store_or_url: Any, dimension: int | Sequence[int] | None = None,
                 columns: Sequence[str] | None = None, where: Any = None,
                 version: int | None = None, block_rows: int | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        from embtools.ray.sink import store_options, store_root

        self.root = store_root(store_or_url)
        self.options = store_options(store_or_url, storage_options)
        if version is None:
            version = _latest(self.root, self.options)
        store = _open(self.root, version, self.options)
        try:
            src = store.source
            self.version = store.version
            if dimension is None:
                dims = list(src.dimensions)
            elif isinstance(dimension, (int, np.integer)) and not isinstance(dimension, bool):
                dims = [int(dimension)]
            else:
                dims = [int(d) for d in dimension]  # type: ignore[union-attr]
            for d in dims:
                src.resolve(d)  # a stored dimension or a prefix of one (else a typed error)
            self.dims = dims
            meta_names = src.metadata().collect_schema().names()
            if columns is not None:
                unknown = [c for c in columns if c not in meta_names]
                if unknown:
                    raise InvalidArgumentError(
                        f"columns {unknown} are not in the store (its columns: {meta_names})")
            base = ("row_id", "text_id", "label")
            self.columns = ([c for c in meta_names if c not in base] if columns is None
                            else [c for c in columns if c not in base])
            self.select = list(meta_names) if columns is None else ["row_id", *[
                c for c in columns if c != "row_id"]]
            positions = (np.arange(src.num_rows, dtype=np.int64) if where is None
                         else np.asarray(src.select(where), dtype=np.int64))
            starts = np.cumsum([0] + [f.num_rows for f in src.manifest.files])
            bytes_per_row = max(1, sum(dims) * 4)
            rows = block_rows or max(1, BLOCK_BYTES // bytes_per_row)
            self.chunks: list[np.ndarray] = []
            for i in range(len(starts) - 1):
                lo, hi = np.searchsorted(positions, [starts[i], starts[i + 1]])
                for s in range(int(lo), int(hi), rows):
                    self.chunks.append(positions[s:min(int(hi), s + rows)])
            self.bytes_per_row = bytes_per_row + 64
        finally:
            store.close()

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum(len(c) for c in self.chunks) * self.bytes_per_row)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """At most ``parallelism`` tasks, each reading consecutive blocks."""
        n = len(self.chunks)
        if n == 0:
            return []
        tasks = []
        groups = np.array_split(np.arange(n), min(n, max(1, parallelism)))
        for group in groups:
            chunks = [self.chunks[i] for i in group]
            rows = sum(len(c) for c in chunks)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * self.bytes_per_row,
                                 exec_stats=None, input_files=None)
            tasks.append(ReadTask(_reader(self.root, self.version, self.options, self.dims,
                                          self.columns, self.select, chunks), meta))
        return tasks

    def get_name(self) -> str:
        return "EmbtoolsStore"


def _latest(root: str, options: dict[str, Any] | None) -> int:
    from embtools.ray.sink import open_store_storage
    from embtools.storage.manifest import read_manifest

    return read_manifest(open_store_storage(root, options)).version


def _reader(root: str, version: int, options: dict[str, Any] | None, dims: list[int],
            columns: list[str], select: list[str], chunks: list[np.ndarray]) -> Any:
    def read() -> Iterator[pa.Table]:
        from ray.data.extensions import ArrowTensorArray

        store = _open(root, version, options)
        try:
            src = store.source
            for pos in chunks:
                table = src.take_metadata(pos, columns).to_arrow().select(select)
                for d in dims:
                    out = np.empty((len(pos), d), dtype=np.float32)
                    filled = 0
                    for got, x in src.iter_vectors(d, pos):
                        out[filled:filled + len(got)] = x
                        filled += len(got)
                    table = table.append_column(emb_column(d), ArrowTensorArray.from_numpy(out))
                yield table
        finally:
            store.close()

    return read


def read_store(store_or_url: Any, dimension: int | Sequence[int] | None = None,
               columns: Sequence[str] | None = None, where: Any = None,
               version: int | None = None, *, block_rows: int | None = None,
               storage_options: dict[str, Any] | None = None, **read_args: Any) -> Any:
    """A ``ray.data.Dataset`` of one committed version of a store.

    ``dimension``: a stored dimension, a prefix of one, or a list (None: every stored one), each
    an ``emb_<d>`` tensor column; ``columns``: metadata columns besides ``row_id`` (None: all);
    ``where``: a polars expression or SQL string selecting rows; ``version``: the version to read
    (None: the latest at the time of the call). Rows come in row order within each block.
    ``storage_options`` go with a store URL given as a string (an EmbeddingStore brings its
    own). ``block_rows`` sets the rows per block (default: 64 MiB of embeddings); other keyword
    arguments go to ``ray.data.read_datasource`` (``num_cpus``, ``concurrency``, ...).

    Examples
    --------
    >>> ds = read_store("s3://bucket/corpus.store", dimension=64)            # doctest: +SKIP
    >>> ds.count()                                                           # doctest: +SKIP
    100000
    """
    import ray.data

    source = StoreDatasource(store_or_url, dimension, columns, where, version, block_rows,
                             storage_options)
    return ray.data.read_datasource(source, **read_args)

