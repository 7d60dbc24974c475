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

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from embtools.errors import DimensionMismatchError, EmbtoolsError, InvalidArgumentError
from embtools.search.engine import check_k, check_metric, prepare_queries
from embtools.search.filters import select_positions
from embtools.search.funnel import funnel_top_k, parse_funnel
from embtools.search.refine import exact_top_k

__all__ = ["compute_similarity", "is_store", "result_frame", "search_dimension", "search_store"]


def is_store(obj: Any) -> bool:
    """True for an EmbeddingStore-like object (it has ``source``, ``backend`` and ``budget``)."""
    return all(hasattr(obj, name) for name in ("source", "backend", "budget"))


def search_dimension(source: Any, dimension: Any, query_dim: int | None) -> int:
    """The dimension to search: ``dimension``, else the queries' own; it must be stored or a prefix
    of a stored dimension (DimensionMismatchError otherwise)."""
    stored = [int(d) for d in getattr(source, "dimensions", [])]
    if dimension is None:
        if query_dim is None:
            if not stored:
                raise DimensionMismatchError("the store holds no embeddings; pass dimension=")
            return max(stored)
        dim = query_dim
    else:
        if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)):
            raise InvalidArgumentError(f"dimension must be a positive integer, got {dimension!r}")
        dim = int(dimension)
        if dim <= 0:
            raise InvalidArgumentError(f"dimension must be a positive integer, got {dim}")
        if query_dim is not None and query_dim != dim:
            raise DimensionMismatchError(
                f"queries have dimension {query_dim} but dimension={dim} was asked for; "
                f"slice the queries (Q[:, :{dim}]) for a Matryoshka prefix"
            )
    if stored and dim > max(stored):
        raise DimensionMismatchError(
            f"dimension {dim} is larger than every stored dimension {sorted(stored)}"
        )
    return dim


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


def result_frame(
    source: Any, scores: np.ndarray, positions: np.ndarray, columns: list[str] | None = None
) -> pl.DataFrame:
    """The result DataFrame: ``query, rank, row_id, text_id, label, score`` (+ ``columns``)."""
    nq, kk = positions.shape
    flat = positions.reshape(-1)
    if nq == 1:  # the positions of one query are distinct: no de-duplication needed
        uniq, inv = flat, None
    else:
        uniq, inv = np.unique(flat, return_inverse=True)
    try:
        meta = source.take_metadata(uniq, columns)
    except EmbtoolsError:
        raise
    except Exception as err:  # an unknown column name
        raise InvalidArgumentError(f"cannot read the metadata columns {columns!r}: {err}") from None
    if inv is not None and len(uniq):
        meta = meta[inv.reshape(-1)]
    extra = [c for c in (columns or []) if c not in ("row_id", "text_id", "label")]
    base = [c for c in ("row_id", "text_id", "label") if c in meta.columns]
    return pl.DataFrame(
        [
            pl.Series("query", np.repeat(np.arange(nq, dtype=np.int64), kk)),
            pl.Series("rank", np.tile(np.arange(kk, dtype=np.int64), nq)),
            *(meta.get_column(c) for c in base),
            pl.Series("score", scores.reshape(-1).astype(np.float32, copy=False), dtype=pl.Float32),
            *(meta.get_column(c) for c in extra),
        ]
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
    funnel: Sequence[tuple[int, int]] | None = None,
    batch_rows: int | None = None,
    **join_options: Any,
) -> Any:
    """Exact top-``k`` rows of ``store`` for each query, as a polars DataFrame.

    ``queries`` is an ``(n, d)`` or ``(d,)`` array of any backend, a text or a list of texts
    (embedded with the model the store records, see :func:`embtools.embed.embed_queries`), or
    another store: then this is
    :func:`~embtools.search.join.similarity_join` (``out=`` a directory to write the results to and
    get its path back; without ``out`` the join's rows come back as a DataFrame). Metrics: ``cosine``
    (zero vectors score 0), ``dot``, ``l2`` (squared Euclidean, smallest first). ``where`` (polars
    expression or SQL predicate string) picks the rows before scoring, so each query gets
    ``min(k, matches)`` rows. ``funnel=[(64, 400), (256, 100)]`` runs the Matryoshka funnel.
    Ties go to the lower ``row_id``.

    Examples
    --------
    >>> import numpy as np, embtools as et
    >>> store = et.EmbeddingStore(None, backend="numpy")
    >>> _ = store.add({2: np.array([[1, 0], [0, 1], [1, 1]], np.float32)}, text_ids=["x", "y", "z"],
    ...               labels=["a", "b", "a"])
    >>> search_store(store, [1.0, 0.0], k=5, where="label = 'a'")["text_id"].to_list()
    ['x', 'z']
    """
    if is_store(queries):
        from embtools.search.join import similarity_join

        out = join_options.pop("out", None)
        if funnel is not None or columns is not None:
            raise InvalidArgumentError("funnel and columns are not supported when queries is a store")
        kwargs = dict(dimension=dimension, where=where, metric=metric, batch_rows=batch_rows)
        if out is not None:
            return similarity_join(queries, store, k, out=out, **kwargs, **join_options)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="embtools-join-") as tmp:
            path = similarity_join(queries, store, k, out=tmp + "/join", **kwargs, **join_options)
            return pl.read_parquet(str(path) + "/*.parquet")
    if join_options:
        raise InvalidArgumentError(
            f"unexpected arguments {sorted(join_options)} (they apply when queries is a store)"
        )
    k = check_k(k)
    metric = check_metric(metric)
    cols = _columns(columns)
    source = store.source
    if isinstance(queries, str) or (
        isinstance(queries, (list, tuple)) and queries and all(isinstance(t, str) for t in queries)
    ):
        from embtools.embed import embed_queries  # texts: embedded with the store's recorded model

        queries = embed_queries(store, queries, dimension)
    q, _ = prepare_queries(queries)
    dim = search_dimension(source, dimension, q.shape[1])
    positions = select_positions(source, where)
    stages = None if funnel is None else parse_funnel(funnel, dim, k)
    if source.num_rows == 0:
        scores, found = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    elif stages is None:
        scores, found = exact_top_k(
            source, store.backend, store.budget, q, dim, k, metric, positions, batch_rows
        )
    else:
        scores, found = funnel_top_k(
            source, store.backend, store.budget, q, dim, k, metric, stages, positions, batch_rows
        )
    return result_frame(source, scores, found, cols)


def compute_similarity(
    store: Any, query: Any, dimension: int | None = None, top_k: int | None = None
) -> tuple[Any, np.ndarray]:
    """The seed's form: cosine ``(similarities, indices)`` of the best ``top_k`` rows (all rows,
    sorted, when ``top_k`` is None). Similarities are in the store backend's array format, indices
    NumPy int64 positions; a 1-D query gives 1-D results, a 2-D query one row per query.

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
    dim = search_dimension(source, dimension, q.shape[1])
    k = source.num_rows if top_k is None else check_k(top_k, "top_k")
    if k == 0:
        scores, found = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    else:
        scores, found = exact_top_k(source, store.backend, store.budget, q, dim, k, "cosine")
    scores = np.clip(scores, -1.0, 1.0)
    if one:
        scores, found = scores[0], found[0]
    return store.backend.from_numpy(np.ascontiguousarray(scores)), np.ascontiguousarray(found)
