"""embed_to_store: batch embedding of a Ray dataset into a store with an actor pool.

The canonical Ray batch-inference pattern: ``dataset.map_batches(Embedder, concurrency=actors)``
where each actor loads the sentence-transformers model once and embeds batch after batch; the
vectors go through :class:`~embtools.ray.sink.StoreDatasink` (workers write data files, the
driver commits one version). The model is checked against and recorded in the store exactly as
:func:`embtools.embed.add_texts` does (``store.properties["embedding_model"]``), rows whose text
id is already stored are skipped, and ``job_id`` makes a re-run commit nothing.

**Resources.** On a small cluster an actor pool that takes every CPU starves the read tasks
that feed it. By default each actor reserves 1 CPU (or ``num_gpus`` GPUs) and the pool has
``cluster CPUs - 1`` actors (at least 1), so one CPU stays free for the reads and the writes;
each CPU actor runs ``threads`` torch threads (default: the cluster's CPUs divided among the
actors, at most one node's CPUs), so a 2-CPU machine runs one actor on both cores.

Examples
--------
>>> import ray, embtools as et                                           # doctest: +SKIP
>>> ds = ray.data.read_parquet("s3://bucket/passages/")                  # doctest: +SKIP
>>> store = et.EmbeddingStore("s3://bucket/passages.store")              # doctest: +SKIP
>>> embed_to_store(ds, store, text_column="text", id_column="id", dims=[64, 384],
...                job_id="passages-2026-12")                            # doctest: +SKIP
1
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from embtools.errors import InvalidArgumentError
from embtools.ray.faults import crash_point
from embtools.ray.sink import StoreDatasink, open_store_storage, store_options, store_root
from embtools.storage.schema import LABEL, TEXT_ID, emb_column

__all__ = ["LIGHT_CPUS", "Embedder", "embed_to_store", "pool_defaults", "vectors_to_store"]

#: The metadata column of the texts with ``store_text=True`` (as ``embtools ingest`` names it).
TEXT_METADATA = "text"

#: CPUs reserved by the light tasks around the actor pool (skipping stored ids, writing files):
#: with the pool holding all CPUs but one, a write task of a whole CPU could wait for ever
LIGHT_CPUS = 0.25


def pool_defaults(num_cpus: float | None, num_gpus: float | None, actors: int | None,
                  threads: int | None) -> tuple[float, float | None, int, int]:
    """``(num_cpus, num_gpus, actors, threads)`` of the actor pool (see the module docstring).

    Examples
    --------
    >>> pool_defaults(None, None, None, None)                           # doctest: +SKIP
    (1.0, None, 1, 2)
    """
    import ray

    total = ray.cluster_resources()
    cpus = float(total.get("CPU", 1))
    node_cpus = max([float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive")] or [cpus])
    if num_gpus:
        per_cpu = 1.0 if num_cpus is None else float(num_cpus)
        n = actors or max(1, int(total.get("GPU", 0) // num_gpus))
        return per_cpu, float(num_gpus), n, threads or max(1, round(per_cpu))
    per_cpu = 1.0 if num_cpus is None else float(num_cpus)
    if per_cpu <= 0:
        raise InvalidArgumentError(f"num_cpus must be > 0, got {num_cpus!r}")
    n = actors or max(1, int((cpus - 1) // per_cpu))
    if threads is None:
        threads = max(1, min(int(node_cpus), int(cpus // n)))
    return per_cpu, None, int(n), int(threads)


class Embedder:
    """The actor of the pool: loads the model once, embeds a pyarrow batch into store columns."""

    def __init__(self, spec: Any, dims: list[int] | None, normalize: bool, batch_size: int,
                 device: str | None, threads: int | None, text_column: str,
                 id_column: str | None, label_column: str | None,
                 metadata_columns: Sequence[str], store_text: bool = False) -> None:
        if spec.source != "hub":  # a packaged or local model never needs the network
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from embtools.models import load_model

        load_model(spec, device=device)  # once per actor; embed_texts finds it loaded
        self.spec, self.dims, self.normalize = spec, dims, normalize
        self.batch_size, self.device = batch_size, device
        self.text_column, self.id_column, self.label_column = text_column, id_column, label_column
        self.metadata_columns = list(metadata_columns)
        self.store_text = store_text

    def __call__(self, table: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        from embtools.embed import embed_texts

        crash_point("embed_batch")
        texts = table.column(self.text_column)
        if texts.null_count:
            raise InvalidArgumentError(f"text column {self.text_column!r} has {texts.null_count} null rows")
        items = [str(t) for t in texts.to_pylist()]
        out = embed_texts(items, self.spec, batch_size=self.batch_size, device=self.device,
                          dims=self.dims, normalize=self.normalize, cache_dir=False)
        by_dim = out if isinstance(out, dict) else {int(out.shape[1]): out}
        cols: dict[str, Any] = {}
        if self.id_column is not None:
            cols[TEXT_ID] = table.column(self.id_column)
        if self.label_column is not None:
            cols[LABEL] = table.column(self.label_column)
        for name in self.metadata_columns:
            cols[name] = table.column(name)
        if self.store_text:
            cols[TEXT_METADATA] = texts
        for d in sorted(by_dim):
            cols[emb_column(d)] = ArrowTensorArray.from_numpy(np.ascontiguousarray(by_dim[d]))
        return pa.table(cols)


def _skip_stored(table: pa.Table, stored: Any, id_column: str) -> pa.Table:
    """Drop the rows whose id is in ``stored`` (the ids of the version the driver read; an
    object reference to them)."""
    import pyarrow.compute as pc
    import ray

    if not isinstance(stored, pa.Array):
        stored = ray.get(stored)
    ids = table.column(id_column).cast(pa.string())
    return table.filter(pc.invert(pc.is_in(ids, value_set=stored)))


def _dataset_columns(dataset: Any, wanted: list[str | None]) -> list[str]:
    """The given (not None) columns of ``wanted``, each checked to be in ``dataset``."""
    names = dataset.columns()
    columns = [c for c in wanted if c is not None]
    missing = [c for c in columns if c not in names]
    if missing:
        raise InvalidArgumentError(f"columns {missing} are not in the dataset (its columns: {names})")
    return columns


def _new_rows(ds: Any, target: Any, id_column: str | None) -> Any:
    """``ds`` without the rows whose id ``target`` holds (the ids go to the tasks once)."""
    if id_column is None or not target.num_rows:
        return ds
    import ray

    stored = pa.array(target.get_text_ids(), pa.string())
    return ds.map_batches(_skip_stored, fn_args=(ray.put(stored), id_column),
                          batch_format="pyarrow", num_cpus=LIGHT_CPUS)


def _vector_columns(table: pa.Table, vector_column: str, dims: list[int] | None, id_column: str,
                    label_column: str | None, metadata_columns: list[str]) -> pa.Table:
    """A block of precomputed vectors as store columns: ``emb_<d>`` prefixes of the vectors."""
    from ray.data.extensions import ArrowTensorArray

    from embtools.ray.sink import block_matrix

    x = np.asarray(block_matrix(table.column(vector_column), vector_column), dtype=np.float32)
    wanted = dims or [x.shape[1]]
    if max(wanted) > x.shape[1]:
        raise InvalidArgumentError(f"dims {max(wanted)} is larger than the vectors' dimension {x.shape[1]}")
    cols: dict[str, Any] = {TEXT_ID: table.column(id_column)}
    if label_column is not None:
        cols[LABEL] = table.column(label_column)
    for name in metadata_columns:
        cols[name] = table.column(name)
    for d in sorted(set(wanted)):
        cols[emb_column(d)] = ArrowTensorArray.from_numpy(np.ascontiguousarray(x[:, :d]))
    return pa.table(cols)


def vectors_to_store(dataset: Any, store: Any, *, vector_column: str, id_column: str = "id",
                     label_column: str | None = None, metadata_columns: Sequence[str] = (),
                     dims: Sequence[int] | None = None, job_id: str | None = None,
                     storage_options: dict[str, Any] | None = None) -> int:
    """Store precomputed vectors (``vector_column``, lists of floats; ``dims``: the Matryoshka
    prefixes kept, default the full width) as one new version; returns it. Rows whose id is
    stored are skipped; ``job_id`` as for :func:`embed_to_store`.
    """
    from embtools.storage.manifest import check_job_id, read_manifest
    from embtools.store import EmbeddingStore

    root = store_root(store)
    options = store_options(store, storage_options)
    if job_id is not None:
        check_job_id(job_id)
        latest = read_manifest(open_store_storage(root, options))
        if job_id in latest.jobs:
            return latest.version
    columns = _dataset_columns(dataset, [vector_column, id_column, label_column, *metadata_columns])
    target = EmbeddingStore(root, backend="numpy", storage_options=options)
    try:
        ds = _new_rows(dataset.select_columns(columns),
                       target, id_column)
    finally:
        target.close()
    ds = ds.map_batches(_vector_columns, fn_args=(vector_column, None if dims is None else list(dims),
                                                  id_column, label_column, list(metadata_columns)),
                        batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    sink = StoreDatasink(root, label_column=LABEL if label_column is not None else None,
                         metadata_columns=list(metadata_columns), job_id=job_id,
                         storage_options=options)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    assert sink.version is not None
    if isinstance(store, EmbeddingStore) and not store.read_only:
        store.refresh()
    return sink.version


class _ModelSink(StoreDatasink):
    """A StoreDatasink that records the model (with the dims it stored) when it commits."""

    def __init__(self, store: Any, config: dict[str, Any] | None, **kw: Any) -> None:
        super().__init__(store, **kw)
        self.config = config

    def commit_properties(self, dims: list[int]) -> dict[str, Any]:
        if self.config is None:
            return super().commit_properties(dims)
        from embtools.embed import MODEL_PROPERTY, _record, model_config

        cfg = model_config(self.config["spec"], dims, self.config["normalize"])
        return {**self.properties, MODEL_PROPERTY: _record(cfg)}


def embed_to_store(dataset: Any, store: Any, *, text_column: str = "text",
                   id_column: str | None = "id", label_column: str | None = None,
                   metadata_columns: Sequence[str] = (), model: Any = None,
                   dims: int | Sequence[int] | None = None, batch_size: int = 64,
                   num_gpus: float | None = None, num_cpus: float | None = None,
                   actors: int | None = None, threads: int | None = None,
                   device: str | None = None, normalize: bool | None = None,
                   store_text: bool = False, job_id: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> int:
    """Embed ``dataset[text_column]`` into ``store`` as one new version; returns the version.

    ``id_column`` holds the text ids (None: ``row-<row_id>``), ``label_column`` the labels,
    ``metadata_columns`` are stored as metadata. ``model``/``dims``/``normalize`` as for
    :func:`embtools.embed.add_texts` (the recorded model when the store has one; another one
    raises ModelMismatchError before anything runs). ``batch_size`` rows per model call and
    per Ray batch; ``actors`` the pool size, ``num_cpus``/``num_gpus`` per actor, ``threads``
    torch threads per CPU actor (defaults: :func:`pool_defaults`). ``store_text`` keeps the
    texts as a ``text`` metadata column. Rows whose id is stored are skipped; with ``job_id`` a
    job already committed runs nothing and commits nothing. ``storage_options`` go with a store
    URL given as a string.
    """
    from embtools.embed import _resolve_for_store
    from embtools.storage.manifest import check_job_id, read_manifest
    from embtools.store import EmbeddingStore

    root = store_root(store)
    options = store_options(store, storage_options)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if job_id is not None:
        check_job_id(job_id)
    columns = _dataset_columns(dataset, [text_column, id_column, label_column, *metadata_columns])
    target = EmbeddingStore(root, backend="numpy", storage_options=options)
    try:
        spec, wanted, norm, record = _resolve_for_store(target, model, dims, normalize)
        if job_id is not None and job_id in read_manifest(open_store_storage(root, options)).jobs:
            return target.version
        ds = _new_rows(dataset.select_columns(columns),
                       target, id_column)
    finally:
        target.close()
    per_cpu, per_gpu, n, torch_threads = pool_defaults(num_cpus, num_gpus, actors, threads)
    embedded = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "spec": spec, "dims": wanted, "normalize": norm, "batch_size": batch_size,
            "device": device, "threads": None if per_gpu else torch_threads,
            "text_column": text_column, "id_column": id_column, "label_column": label_column,
            "metadata_columns": list(metadata_columns), "store_text": store_text},
        batch_size=batch_size, batch_format="pyarrow", concurrency=n, num_cpus=per_cpu,
        num_gpus=per_gpu)
    sink = _ModelSink(root, None if record is not None else {"spec": spec, "normalize": norm},
                      id_column=TEXT_ID if id_column is not None else None,
                      label_column=LABEL if label_column is not None else None,
                      metadata_columns=[*metadata_columns, *([TEXT_METADATA] if store_text else [])],
                      job_id=job_id, storage_options=options)
    embedded.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    assert sink.version is not None
    if isinstance(store, EmbeddingStore) and not store.read_only:
        store.refresh()
    return sink.version
