"""similarity_join on Ray: query chunks as tasks, each under its own memory cap; resumable.

The driver plans the job exactly as :func:`embtools.search.similarity_join` does (the same
dimension, row selections, chunks and job record in ``out``), then runs each chunk not done yet
as a Ray task: the task opens both stores at the versions the driver saw, searches its chunk of
left rows against the right store with the store's own streaming search under ``max_memory_gb``
(Ray's ``memory`` resource reserves that much for it; through the right store's index with
``nprobe``), and writes its part file atomically. The
driver records each part as its task returns (``_progress.json``) and marks the job complete at
the end, so the result is the local join's part for part: a failed task is retried by Ray, and a
job killed at any moment, re-run with the same arguments, runs only the parts not recorded. Local
and Ray runs of the same job share ``out``.

Examples
--------
>>> similarity_join("docs.store", "docs.store", 10, out="s3://bucket/knn",
...                 exclude_self=True)                                   # doctest: +SKIP
PosixPath('s3://bucket/knn')
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from embtools.errors import InvalidArgumentError
from embtools.memory import GB
from embtools.ray.faults import crash_point
from embtools.ray.sink import store_options, store_root

__all__ = ["similarity_join"]

#: Per-task memory cap when neither ``max_memory_gb`` nor the right store's cap is given.
DEFAULT_TASK_GB = 1.0


def _open(root: str, version: int | None, options: dict[str, Any] | None,
          cap: float | None = None) -> Any:
    from embtools.store import EmbeddingStore

    return EmbeddingStore(root, backend="numpy", version=version, max_memory_gb=cap,
                          storage_options=options)


def _part(left: tuple[str, int, Any], right: tuple[str, int, Any], pos: np.ndarray, dim: int, k: int,
          metric: str, where: Any, exclude_self: bool, batch_rows: int | None, screen: str,
          nprobe: int | None, refine: int | None, cap: float, path: str) -> int:
    """One chunk of the join, run in a Ray task: write its part file atomically; its rows."""
    import pyarrow.parquet as pq

    from embtools.search.filters import select_positions
    from embtools.search.join import _join_chunk
    from embtools.storage.durable import write_atomic

    crash_point("join_part")
    rstore = _open(*right, cap)
    lstore = rstore if left == right else _open(*left)
    try:
        right_pos = select_positions(rstore.source, where)
        table = _join_chunk(lstore, rstore, pos, dim, k, metric, right_pos, exclude_self,
                            batch_rows, screen, nprobe, refine)
        write_atomic(path, partial(pq.write_table, table, compression="zstd"))
        return int(table.num_rows)
    finally:
        lstore.close()
        rstore.close()


def similarity_join(left: Any, right: Any, k: int, out: str | os.PathLike[str], *,
                    dimension: int | None = None, where: Any = None, left_where: Any = None,
                    exclude_self: bool = False, metric: str = "cosine",
                    batch_rows: int | None = None, chunk_rows: int | None = None,
                    max_memory_gb: float | None = None, num_cpus: float = 1.0,
                    max_retries: int = 3, progress: bool | None = None, overwrite: bool = False,
                    screen: str | None = None, nprobe: int | None = None,
                    refine: int | None = None,
                    storage_options: dict[str, Any] | None = None) -> Path:
    """Top-``k`` rows of ``right`` for every row of ``left`` (stores or their paths), computed
    by Ray tasks and written to the Parquet dataset ``out``; returns ``Path(out)``.

    The arguments and the result are those of :func:`embtools.search.similarity_join`; besides:
    ``storage_options`` go with store URLs given as strings; ``out`` is a directory every
    worker can write (a shared filesystem). ``nprobe``/``refine`` search through the right store's IVF index (each task probes it under
    its cap), as the local join does. ``max_memory_gb`` is each task's cap (default: the right store's cap, else 1 GB; the task
    reserves it as Ray ``memory``), ``num_cpus`` each task's CPUs, ``max_retries`` how often
    Ray re-runs a failed task. Re-running after a failure resumes the job.
    """
    import ray

    from embtools.backends.base import check_k
    from embtools.search.filters import select_positions, where_key
    from embtools.search.join import (
        DEFAULT_CHUNK_ROWS,
        _identity,
        _join_dimension,
        _same_data,
        check_join_args,
    )
    from embtools.storage.jobs import Job
    from embtools.storage.jobs import progress as job_progress

    k, metric, screen, batch_rows, nprobe, refine = check_join_args(
        k, metric, screen, batch_rows, nprobe, refine, out)
    cap_given = max_memory_gb if max_memory_gb is not None else getattr(right, "max_memory_gb", None)
    cap = float(cap_given if cap_given is not None else DEFAULT_TASK_GB)
    if not cap > 0:
        raise InvalidArgumentError(f"max_memory_gb must be > 0, got {max_memory_gb!r}")
    lroot, rroot = store_root(left), store_root(right)
    lopt, ropt = store_options(left, storage_options), store_options(right, storage_options)
    lver = getattr(left, "version", None) if not isinstance(left, (str, os.PathLike)) else None
    rver = getattr(right, "version", None) if not isinstance(right, (str, os.PathLike)) else None
    lstore = _open(lroot, lver, lopt)
    rstore = _open(rroot, rver, ropt, cap)
    try:
        if exclude_self and not _same_data(lstore, rstore):
            raise InvalidArgumentError(
                "exclude_self=True needs a self-join (right is the same store as left)")
        dim = _join_dimension(lstore, rstore, dimension)
        left_pos = select_positions(lstore.source, left_where)
        select_positions(rstore.source, where)  # a bad filter fails here, not in every task
        n_left = lstore.source.num_rows if left_pos is None else len(left_pos)
        if chunk_rows is None:
            per_query = dim * 4 * 2 + (k + 1) * 12 * 3
            chunk = max(1, min(DEFAULT_CHUNK_ROWS, int(cap * GB) // 4 // per_query))
        else:
            chunk = check_k(chunk_rows, "chunk_rows")
        n_chunks = -(-n_left // chunk)
        params = {
            "kind": "similarity_join", "left": _identity(lstore), "right": _identity(rstore),
            "k": k, "dimension": dim, "metric": metric, "where": where_key(where),
            "left_where": where_key(left_where), "exclude_self": bool(exclude_self),
            "chunk_rows": chunk, "chunks": n_chunks,
            **({} if nprobe is None and refine is None else {"nprobe": nprobe, "refine": refine}),
        }
        lkey, rkey = (lroot, lstore.version, lopt), (rroot, rstore.version, ropt)
    finally:
        lstore.close()
        rstore.close()
    job = Job(Path(out), params, overwrite=overwrite)
    todo = job.todo(n_chunks)
    remote: Any = ray.remote  # its typing knows no function of 12 arguments
    task = remote(_part).options(num_cpus=num_cpus, memory=int(cap * GB) + 256 * 1024**2,
                                     max_retries=max_retries, retry_exceptions=False)
    running: dict[Any, int] = {}
    show = None if progress is None else bool(progress)
    with job_progress(n_chunks, "similarity join (Ray tasks)", enabled=show,
                      done=n_chunks - len(todo)) as advance:
        for c in todo:
            lo, hi = c * chunk, min((c + 1) * chunk, n_left)
            pos = np.arange(lo, hi, dtype=np.int64) if left_pos is None else left_pos[lo:hi]
            ref = task.remote(lkey, rkey, pos, dim, k, metric, where, bool(exclude_self),
                              batch_rows, screen, nprobe, refine, cap, str(job.part_path(c)))
            running[ref] = c
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    ray.get(ref)  # a task that failed for good raises here
                    job.record(running.pop(ref))
                    advance(1)
        except BaseException:
            _stop(running, job)
            raise
    job.finish()
    return Path(out)


def _stop(running: dict[Any, int], job: Any) -> None:
    """Cancel the tasks still running (a re-run must not race them) and record the parts of
    those that finished meanwhile, so that a re-run does only the rest."""
    import ray

    for ref in running:
        ray.cancel(ref, force=True)
    for ref, part in running.items():
        try:
            ray.get(ref)
        except Exception:  # cancelled or failed: the re-run does this part
            continue
        job.record(part)
