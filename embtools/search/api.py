"""``search_store`` and ``compute_similarity``: the store-level entry points of the search engine.

Both validate their input at the boundary (typed errors from :mod:`embtools.errors`), pick the rows
with the filter, run the exact streaming engine (or the Matryoshka funnel) on the store's backend
under the store's memory budget, and attach the metadata of the hits.

Examples
--------
>>> import numpy as np, embtools as et
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> _ = store.add_embeddings(np.eye(3, dtype=np.float32), dimension=3, text_ids=["a", "b", "c"])
>>> search_store(store, np.array([0.0, 1.0, 0.1]), k=2)["text_id"].to_list()
['b', 'c']
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from embtools.backends.base import check_k
from embtools.errors import EmbtoolsError, InvalidArgumentError
from embtools.search.join import similarity_join
from embtools.search.lane import cached_lane, keep_lane, lane_key, open_lane
from embtools.search.plan import plan_search, run_search
from embtools.search.request import (
    SearchContext,
    SearchRequest,
    TopK,
    is_store,
    prepare_queries,
    search_dimension,
)
from embtools.storage.small_frame import small_frame
from embtools.storage.snapshot import base_columns

__all__ = [
    "compute_similarity",
    "explain_search",
    "is_store",
    "result_frame",
    "search_dimension",
    "search_store",
]


def _columns(columns: Any) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        return [columns]
    if not isinstance(columns, Sequence) or not all(isinstance(c, str) for c in columns):
        raise InvalidArgumentError(f"columns must be a list of column names, got {columns!r}")
    clash = [c for c in columns if c in ("query", "rank", "score")]
    if clash:  # the result frame has these columns already
        raise InvalidArgumentError(
            f"columns {clash} clash with the result columns query, rank, score; read them with "
            "store.metadata() and join on row_id")
    return list(columns)


@functools.lru_cache(maxsize=64)
def _query_rank(nq: int, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``query`` and ``rank`` values of ``nq`` queries' ``kk`` hits each (read-only)."""
    query = np.repeat(np.arange(nq, dtype=np.int64), kk)
    rank = np.tile(np.arange(kk, dtype=np.int64), nq)
    query.flags.writeable = rank.flags.writeable = False
    return query, rank


def result_frame(
    source: Any, scores: np.ndarray, positions: np.ndarray, columns: list[str] | None = None
) -> pl.DataFrame:
    """The result DataFrame: ``query, rank, row_id, text_id, label, score`` (+ ``columns``)."""
    nq, kk = positions.shape
    flat = scores.reshape(-1).astype(np.float32, copy=False)
    few = getattr(source, "few_base_values", None)
    if not columns and few is not None:  # a few hits (FEW_ROWS): gathered one by one
        base = few(positions.reshape(-1))
        if base is not None:
            query, rank = _query_rank(nq, kk)
            return small_frame([("query", pl.Int64, query), ("rank", pl.Int64, rank),
                                *base_columns(base), ("score", pl.Float32, flat)])
    try:  # repeats (a row hit by several queries) are gathered as often as they come
        meta = source.take_metadata(positions.reshape(-1), columns)
    except EmbtoolsError:
        raise
    except Exception as err:  # an unknown column name
        raise InvalidArgumentError(f"cannot read the metadata columns {columns!r}: {err}") from None
    base = [c for c in ("row_id", "text_id", "label") if c in meta.columns]
    extra = [c for c in (columns or []) if c not in ("row_id", "text_id", "label")]
    qs = pl.Series("query", np.repeat(np.arange(nq, dtype=np.int64), kk))
    rs, ss = pl.Series("rank", np.tile(np.arange(kk, dtype=np.int64), nq)), pl.Series("score", flat)
    if meta.columns == base + extra:  # a frame of its own: the result columns go in in place
        meta.insert_column(0, rs)
        meta.insert_column(0, qs)
        return meta.insert_column(2 + len(base), ss)
    return pl.DataFrame([qs, rs, *(meta.get_column(c) for c in base), ss,
                         *(meta.get_column(c) for c in extra)])


def _request(
    store: Any,
    queries: Any,
    k: Any,
    dimension: Any,
    metric: Any,
    where: Any,
    funnel: Any,
    batch_rows: Any,
    screen: Any,
    nprobe: Any = None,
    refine: Any = None,
    exact: Any = False,
    precision: Any = None,
    rescore: Any = None,
) -> SearchRequest:
    """The request of a search of ``store`` (texts are embedded with the store's model)."""
    if isinstance(queries, str) or (
        isinstance(queries, (list, tuple)) and queries and all(isinstance(t, str) for t in queries)
    ):
        from embtools.embed import embed_queries  # texts: embedded with the store's recorded model

        queries = embed_queries(store, queries, dimension)
    return SearchRequest.build(
        store.source, queries, k, dimension=dimension, metric=metric, where=where,
        batch_rows=batch_rows, screen=screen, funnel=funnel, nprobe=nprobe, refine=refine,
        exact=exact, precision=precision, rescore=rescore,
    )


def search_store(
    store: Any,
    queries: Any,
    k: int = 10,
    *,
    dimension: int | None = None,
    metric: str = "cosine",
    where: Any = None,
    columns: Sequence[str] | None = None,
    funnel: Sequence[tuple[int | str, int]] | None = None,
    batch_rows: int | None = None,
    screen: str | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
    exact: bool = False,
    precision: str | None = None,
    rescore: int | None = None,
) -> pl.DataFrame:
    """Top-``k`` rows of ``store`` for each query, as a polars DataFrame (exact, unless an
    index serves the search: then ``nprobe`` and ``refine`` tune it and ``exact=True`` forbids it).

    ``queries`` is an ``(n, d)`` or ``(d,)`` array of any backend, a text or a list of texts
    (embedded with the model the store records, see :func:`embtools.embed.embed_queries`), or
    another store: then every row of that store is a query (the rows of
    :func:`~embtools.search.join.similarity_join`, which writes them to Parquet instead).
    Metrics: ``cosine`` (zero vectors score 0), ``dot``, ``l2`` (squared Euclidean, smallest
    first). ``where`` (polars expression or SQL predicate string) picks the rows before scoring,
    so each query gets ``min(k, matches)`` rows. ``funnel=[(64, 400), (256, 100)]`` runs the
    Matryoshka funnel; ``precision="binary"``/``"int8"`` (with ``rescore=``) shortlists by the
    quantized codes and re-ranks exactly (see :mod:`embtools.search.quantized`). ``batch_rows`` caps the corpus rows per batch; ``screen`` (``"auto"``,
    ``"on"``, ``"off"``; default from ``EMBTOOLS_BF16_SCREEN``) allows, forces or forbids the
    bfloat16 screen. Ties go to the lower ``row_id``. The planner streams any search that fits
    the memory cap (see :func:`explain_search`).

    Examples
    --------
    >>> import numpy as np, embtools as et
    >>> store = et.EmbeddingStore(None, backend="numpy")
    >>> _ = store.add({2: np.array([[1, 0], [0, 1], [1, 1]], np.float32)}, text_ids=["x", "y", "z"],
    ...               labels=["a", "b", "a"])
    >>> search_store(store, [1.0, 0.0], k=5, where="label = 'a'")["text_id"].to_list()
    ['x', 'z']
    """
    if (isinstance(queries, np.ndarray) and where is None and funnel is None and batch_rows is None
            and screen is None and precision is None and rescore is None):
        # an array and no option the lane does not keep: a query loop may take it
        cols = _columns(columns)
        q, _ = prepare_queries(queries)
        top = _search_arrays(store, q, k, dimension, metric, nprobe, refine, exact,
                             lane_key("search", k, dimension, metric, nprobe, refine, exact))
        return result_frame(store.source, top.scores, top.positions, cols)
    if is_store(queries):
        if funnel is not None or columns is not None or precision not in (None, "float32"):
            raise InvalidArgumentError(
                "funnel, precision and columns are not supported when queries is a store")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="embtools-join-") as tmp:
            path = similarity_join(queries, store, k, out=tmp + "/join", dimension=dimension,
                                   where=where, metric=metric, batch_rows=batch_rows,
                                   screen=screen, progress=False, nprobe=nprobe, refine=refine)
            return pl.read_parquet(str(path) + "/*.parquet")
    cols = _columns(columns)
    req = _request(store, queries, k, dimension, metric, where, funnel, batch_rows, screen,
                   nprobe, refine, exact, precision, rescore)
    top = run_search(req, SearchContext.of(store))
    return result_frame(store.source, top.scores, top.positions, cols)


def _search_arrays(store: Any, q: np.ndarray, k: Any, dimension: Any, metric: Any, nprobe: Any,
                   refine: Any, exact: Any, key: tuple[Any, ...] | None) -> TopK:
    """The top ``k`` of the prepared queries ``q``: through the lane kept under ``key`` when it
    takes them (:mod:`embtools.search.lane`), else planned in full (and the lane kept)."""
    lane = cached_lane(store, key)
    top = None if lane is None else lane.run(q)
    if top is not None:
        return top
    # the request checks the queries again: a no-op on the prepared ones
    req = SearchRequest.build(store.source, q, k, dimension=dimension, metric=metric, nprobe=nprobe,
                              refine=refine, exact=exact)
    ctx = SearchContext.of(store)
    plan = plan_search(req, ctx)
    top = run_search(req, ctx, plan)
    keep_lane(store, key, open_lane(req, ctx, plan))
    return top


def explain_search(
    store: Any,
    queries: Any,
    k: int = 10,
    *,
    dimension: int | None = None,
    metric: str = "cosine",
    where: Any = None,
    funnel: Sequence[tuple[int | str, int]] | None = None,
    batch_rows: int | None = None,
    screen: str | None = None,
    precision: str | None = None,
    rescore: int | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
    exact: bool = False,
) -> str:
    """The plan :func:`search_store` would run, as text: the path (screen, float32 stream, funnel),
    query groups and batch rows, bytes per batch, passes over the rows, whether torch is used, and
    the smallest ``max_memory_gb`` under which this search runs. Raises what the search would
    raise for bad arguments or a cap below the smallest plan.

    Examples
    --------
    >>> import numpy as np, embtools as et
    >>> store = et.EmbeddingStore(None, backend="numpy")
    >>> _ = store.add_embeddings(np.eye(4, dtype=np.float32), dimension=4)
    >>> print(explain_search(store, np.eye(4, dtype=np.float32), k=2).splitlines()[1])
    path: float32 stream, then a float64 re-rank of 4 candidates per query
    """
    req = _request(store, queries, k, dimension, metric, where, funnel, batch_rows, screen,
                   nprobe=nprobe, refine=refine, exact=exact, precision=precision, rescore=rescore)
    return plan_search(req, SearchContext.of(store)).explain()


def compute_similarity(
    store: Any,
    query: Any,
    dimension: int | None = None,
    top_k: int | None = None,
    *,
    nprobe: int | None = None,
    refine: int | None = None,
    exact: bool = False,
) -> tuple[Any, np.ndarray]:
    """The seed's form: cosine ``(similarities, indices)`` of the best ``top_k`` rows (all rows,
    sorted, when ``top_k`` is None). Similarities are in the store backend's array format, indices
    NumPy int64 positions; a 1-D query gives 1-D results, a 2-D query one row per query.

    Like :func:`search_store` it goes through a cosine index of the dimension when one covers
    it (``nprobe``, ``refine``; ``exact=True`` forbids it, as does ``top_k=None``), but builds no
    metadata frame: the array form FAISS users know, for loops of single queries.

    Examples
    --------
    >>> import numpy as np, embtools as et
    >>> store = et.EmbeddingStore(None, backend="numpy")
    >>> _ = store.add_embeddings(np.eye(3, dtype=np.float32), dimension=3)
    >>> sims, idx = compute_similarity(store, np.array([0.0, 1.0, 0.0]), 3, top_k=2)
    >>> idx.tolist(), sims.tolist()
    ([1, 0], [1.0, 0.0])
    """
    source = store.source
    q, one = prepare_queries(query)
    if top_k is None and (nprobe is not None or refine is not None):
        raise InvalidArgumentError("top_k=None ranks every row exactly: nprobe and refine do not apply")
    k = source.num_rows if top_k is None else check_k(top_k, "top_k")
    if k == 0:
        search_dimension(source, dimension, q.shape[1])
        top = TopK.empty(len(q))
    else:
        top = _search_arrays(store, q, k, dimension, "cosine", nprobe, refine, exact or top_k is None,
                             lane_key("arrays", dimension, top_k, nprobe, refine, exact))
    scores, found = np.minimum(np.maximum(top.scores, -1.0), 1.0), top.positions  # np.clip's overhead: 10 us
    if one:
        scores, found = scores[0], found[0]
    return store.backend.from_numpy(np.ascontiguousarray(scores)), np.ascontiguousarray(found)
