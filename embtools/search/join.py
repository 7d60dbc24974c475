"""Batch similarity jobs: every row of one store against another, written to Parquet in chunks.

``similarity_join(left, right, k, out=dir)`` cuts the (filtered) rows of ``left`` into query chunks
of ``chunk_rows``; each chunk is searched exactly against ``right`` with the streaming engine (under
``right``'s memory cap) and written as ``dir/part-000123.parquet`` with columns ``left_text_id,
right_text_id, rank, score, left_row_id, right_row_id``. A part file is written to a temporary name,
fsynced and renamed, then recorded in ``dir/_progress.json`` (replaced atomically), so a job that is
killed can be re-run with the same arguments and recomputes only the chunks that were not recorded.
``dir/_job.json`` holds the parameter hash that a re-run must match (see :class:`embtools.storage.jobs.Job`).

Read the result with ``pl.scan_parquet(f"{dir}/*.parquet")``.

Examples
--------
>>> import numpy as np, polars as pl, tempfile, embtools as et
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> _ = store.add_embeddings(np.array([[1, 0], [1, 0.01], [0, 1]], np.float32), dimension=2,
...                          text_ids=["a", "a2", "b"])
>>> out = similarity_join(store, store, 1, out=tempfile.mkdtemp() + "/nn", exclude_self=True)
>>> pl.read_parquet(f"{out}/*.parquet")["right_text_id"].to_list()
['a2', 'a', 'a2']
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtools.backends.base import check_k, check_metric
from embtools.errors import DimensionMismatchError, InvalidArgumentError
from embtools.search.filters import select_positions, where_key
from embtools.search.plan import run_search
from embtools.search.request import (
    SearchContext,
    SearchRequest,
    check_screen,
    is_store,
    search_dimension,
)
from embtools.storage.jobs import JOB_FILE, PROGRESS_FILE, Job
from embtools.storage.jobs import progress as job_progress
from embtools.storage.source import gather_rows

__all__ = ["JOB_FILE", "PROGRESS_FILE", "similarity_join"]

#: Default number of left rows per chunk (one pass over ``right`` each), before the memory cap.
DEFAULT_CHUNK_ROWS = 4096


def _identity(store: Any) -> dict[str, Any]:
    """What identifies a store's data for the parameter hash."""
    path = getattr(store, "path", None)
    ident: dict[str, Any] = {
        "path": None if path is None else str(Path(path).resolve()),
        "version": getattr(store, "version", None),
        "num_rows": int(store.source.num_rows),
    }
    if path is None:  # an in-memory store: only resumable within this process
        ident["object"] = id(store.source)
    return ident


def _same_data(left: Any, right: Any) -> bool:
    if left is right or left.source is right.source:
        return True
    lp, rp = getattr(left, "path", None), getattr(right, "path", None)
    return (
        lp is not None
        and rp is not None
        and Path(lp).resolve() == Path(rp).resolve()
        and getattr(left, "version", None) == getattr(right, "version", None)
    )


def _join_dimension(left: Any, right: Any, dimension: Any) -> int:
    lmax = max([int(d) for d in left.source.dimensions] or [0])
    if dimension is None:
        common = [int(d) for d in right.source.dimensions if int(d) <= lmax]
        if not common:
            raise DimensionMismatchError(
                f"no dimension is served by both stores (left {left.source.dimensions}, "
                f"right {right.source.dimensions}); pass dimension="
            )
        dimension = max(common)
    dim = search_dimension(right.source, dimension, None)
    search_dimension(left.source, dim, None)
    return dim


def check_join_args(k: Any, metric: Any, screen: Any, batch_rows: Any, nprobe: Any, refine: Any,
                    out: Any) -> tuple[int, str, str, int | None, int | None, int | None]:
    """The checked scalar arguments of a similarity join (the local one and the Ray one).

    Examples
    --------
    >>> check_join_args(10, "cosine", "auto", None, 4, None, "out")
    (10, 'cosine', 'auto', None, 4, None)
    """
    checked = (check_k(k), check_metric(metric), check_screen(screen))
    optional = tuple(None if v is None else check_k(v, name)
                     for v, name in ((batch_rows, "batch_rows"), (nprobe, "nprobe"), (refine, "refine")))
    if out is None:
        raise InvalidArgumentError("similarity_join needs out= (a directory for the Parquet parts)")
    return (*checked, *optional)  # type: ignore[return-value]


def _drop_self(
    scores: np.ndarray, found: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (query index, rank, keep mask) after dropping each query's own position."""
    keep = found != own[:, None]
    rank = np.cumsum(keep, axis=1) - 1
    keep &= rank < k
    rows, cols = np.nonzero(keep)
    return rows, rank[rows, cols], cols


def similarity_join(
    left: Any,
    right: Any,
    k: int,
    out: str | os.PathLike[str],
    *,
    dimension: int | None = None,
    where: Any = None,
    left_where: Any = None,
    exclude_self: bool = False,
    metric: str = "cosine",
    batch_rows: int | None = None,
    chunk_rows: int | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    screen: str | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
) -> Path:
    """Top-``k`` rows of ``right`` for every row of ``left``, written to the Parquet dataset ``out``.

    ``where`` filters ``right`` (the rows searched), ``left_where`` the query rows. With
    ``exclude_self=True`` on a self-join (the same store, or the same directory and version) each
    row's own match is dropped and ``k`` other neighbours are still returned: a k-NN graph or a
    near-duplicate finder. ``progress`` shows a rich progress bar (default: when stderr is a
    terminal). Re-running with the same arguments resumes an interrupted job; other arguments on
    the same ``out`` raise InvalidArgumentError unless ``overwrite=True``. ``screen`` allows,
    forces or forbids the bfloat16 screen (see :func:`~embtools.search.search_store`); each chunk
    is planned under ``right``'s memory cap. ``nprobe`` (and ``refine``) search through ``right``'s
    IVF index (see :meth:`~embtools.store.EmbeddingStore.create_index`): an approximate k-NN
    graph, much faster than the exact join on large stores. Returns ``Path(out)``.
    """
    if not is_store(left) or not is_store(right):
        raise InvalidArgumentError("similarity_join takes two EmbeddingStores (left, right)")
    k, metric, screen, batch_rows, nprobe, refine = check_join_args(
        k, metric, screen, batch_rows, nprobe, refine, out)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise InvalidArgumentError(f"out={out_path} exists and is not a directory")
    if exclude_self and not _same_data(left, right):
        raise InvalidArgumentError("exclude_self=True needs a self-join (right is the same store as left)")
    dim = _join_dimension(left, right, dimension)
    left_pos = select_positions(left.source, left_where)
    right_pos = select_positions(right.source, where)
    n_left = left.source.num_rows if left_pos is None else len(left_pos)
    if chunk_rows is None:
        avail = right.budget.available_bytes
        per_query = dim * 4 * 2 + (k + 1) * 12 * 3
        chunk = DEFAULT_CHUNK_ROWS if avail is None else max(1, min(DEFAULT_CHUNK_ROWS, avail // 4 // per_query))
    else:
        chunk = check_k(chunk_rows, "chunk_rows")
    n_chunks = -(-n_left // chunk)
    job = {
        "kind": "similarity_join",
        "left": _identity(left),
        "right": _identity(right),
        "k": k,
        "dimension": dim,
        "metric": metric,
        "where": where_key(where),
        "left_where": where_key(left_where),
        "exclude_self": bool(exclude_self),
        "chunk_rows": chunk,
        "chunks": n_chunks,
        **({} if nprobe is None and refine is None else {"nprobe": nprobe, "refine": refine}),
    }
    state = Job(out_path, job, overwrite=overwrite)
    todo = state.todo(n_chunks)
    show = None if progress is None else bool(progress)
    with job_progress(n_chunks, "similarity join (chunks)", enabled=show,
                      done=n_chunks - len(todo)) as advance:
        for c in todo:
            lo, hi = c * chunk, min((c + 1) * chunk, n_left)
            pos = np.arange(lo, hi, dtype=np.int64) if left_pos is None else left_pos[lo:hi]
            table = _join_chunk(
                left, right, pos, dim, k, metric, right_pos, exclude_self, batch_rows, screen,
                nprobe, refine,
            )
            state.write_part(c, partial(pq.write_table, table, compression="zstd"))
            advance(1)
    state.finish()
    return out_path


def _join_chunk(
    left: Any,
    right: Any,
    pos: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    right_pos: np.ndarray | None,
    exclude_self: bool,
    batch_rows: int | None,
    screen: str,
    nprobe: int | None = None,
    refine: int | None = None,
) -> pa.Table:
    """Search one chunk of left rows against right; the part file's table."""
    budget = right.budget
    key = f"join/left/{id(pos)}"
    with budget.holding(key, len(pos) * dim * 4, "a chunk of join queries", "raise max_memory_gb or lower chunk_rows"):
        queries = gather_rows(left.source, dim, pos)
        kk = k + 1 if exclude_self else k
        req = SearchRequest.build(
            right.source, queries, kk, dimension=dim, metric=metric, positions=right_pos,
            batch_rows=batch_rows, screen=screen, nprobe=nprobe, refine=refine,
            exact=nprobe is None and refine is None,
        )
        top = run_search(req, SearchContext.of(right))
        scores, found = top.scores, top.positions
    if exclude_self:
        rows, rank, cols = _drop_self(scores, found, pos, k)
    else:
        nq, width = found.shape
        rows = np.repeat(np.arange(nq), width)
        cols = np.tile(np.arange(width), nq)
        rank = cols
    hit = found[rows, cols]
    lmeta = left.source.take_metadata(pos, None)
    uniq, inv = np.unique(hit, return_inverse=True)
    rmeta = right.source.take_metadata(uniq, None)
    l_text = lmeta["text_id"].to_arrow().take(pa.array(rows))
    r_text = rmeta["text_id"].to_arrow().take(pa.array(inv.reshape(-1)))
    l_row = lmeta["row_id"].to_numpy()[rows]
    r_row = rmeta["row_id"].to_numpy()[inv.reshape(-1)]
    return pa.table(
        {
            "left_text_id": l_text,
            "right_text_id": r_text,
            "rank": pa.array(np.asarray(rank, dtype=np.int32)),
            "score": pa.array(scores[rows, cols].astype(np.float32)),
            "left_row_id": pa.array(np.asarray(l_row, dtype=np.int64)),
            "right_row_id": pa.array(np.asarray(r_row, dtype=np.int64)),
        }
    )

