"""Matryoshka funnel search (adaptive retrieval, Kusupati et al. 2022, "Matryoshka Representation
Learning"): shortlist with a short prefix, re-rank the shortlist with longer prefixes.

``funnel=[(64, 400), (256, 100)]`` scores every selected row with the 64-dimensional prefix (the
stored ``emb_64`` column when there is one, so only 256 bytes per row are read), keeps 400 per
query, re-ranks those with 256 dimensions, keeps 100, and re-ranks those with the full dimension to
return ``k``. For cosine each prefix is re-normalised. When every shortlist covers the whole
selection the result is the exact search's.

Examples
--------
>>> parse_funnel([(64, 400), (128, 100)], full_dim=384, k=10)
[(64, 400), (128, 100)]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embtools.errors import InvalidArgumentError
from embtools.memory import MemoryBudget
from embtools.search.engine import check_k, stream_top_k
from embtools.search.refine import rerank
from embtools.storage.source import VectorSource

__all__ = ["funnel_top_k", "parse_funnel", "recall_at_k"]

def parse_funnel(funnel: Any, full_dim: int, k: int) -> list[tuple[int, int]]:
    """Validate ``funnel``: a non-empty list of ``(dimension, shortlist)`` pairs with dimensions
    increasing and below ``full_dim``, shortlists non-increasing and at least ``k``."""
    try:
        stages = [(int(d), int(n)) for d, n in funnel]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"funnel must be a list of (dimension, shortlist) pairs, e.g. [(64, 400), (256, 100)], "
            f"got {funnel!r}"
        ) from None
    if not stages:
        raise InvalidArgumentError("funnel is empty; pass None for an exact search")
    for i, (d, n) in enumerate(stages):
        check_k(d, "a funnel dimension")
        check_k(n, "a funnel shortlist")
        if d >= full_dim:
            raise InvalidArgumentError(
                f"funnel dimension {d} is not below the search dimension {full_dim}"
            )
        if n < k:
            raise InvalidArgumentError(f"funnel shortlist {n} is smaller than k={k}")
        if i and d <= stages[i - 1][0]:
            raise InvalidArgumentError(f"funnel dimensions must increase, got {[s[0] for s in stages]}")
        if i and n > stages[i - 1][1]:
            raise InvalidArgumentError(f"funnel shortlists must not grow, got {[s[1] for s in stages]}")
    return stages


def funnel_top_k(
    source: VectorSource,
    backend: Any,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    stages: list[tuple[int, int]],
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Funnel search: the top-``stages[0][1]`` on the ``stages[0][0]`` prefix over the selection
    (float32, or bfloat16 scores for large batches when the screen is on), then :func:`rerank`
    through the later stages and the full ``dim`` to ``k``."""
    from embtools.search.screen import SHORTLIST_MAX, screen_enabled, screened_shortlist

    d0, n0 = stages[0]
    q0 = np.ascontiguousarray(queries[:, :d0])
    n_sel = source.num_rows if positions is None else len(positions)
    if n0 <= SHORTLIST_MAX and screen_enabled(backend, len(q0), 1, metric, n_sel):
        # bfloat16 scores pick the shortlist (the later stages re-rank it in float64)
        cand = screened_shortlist(source, budget, q0, d0, n0, metric, positions, batch_rows)
    else:
        _, cand = stream_top_k(source, backend, budget, q0, d0, n0, metric, positions, batch_rows)
    for d, n in stages[1:]:
        _, cand = rerank(source, budget, queries, d, cand, n, metric)
    return rerank(source, budget, queries, dim, cand, k, metric)


def recall_at_k(result: Any, reference: Any, k: int | None = None) -> float:
    """Mean over queries of the fraction of the reference's top-``k`` row ids found in the result's
    top-``k`` (both polars DataFrames from ``search_store``, with ``query``, ``rank``, ``row_id``).

    Examples
    --------
    >>> import polars as pl
    >>> ref = pl.DataFrame({"query": [0, 0, 1, 1], "rank": [0, 1, 0, 1], "row_id": [1, 2, 3, 4]})
    >>> got = pl.DataFrame({"query": [0, 0, 1, 1], "rank": [0, 1, 0, 1], "row_id": [2, 9, 3, 4]})
    >>> recall_at_k(got, ref)
    0.75
    """
    import polars as pl

    if k is not None:
        k = check_k(k)
        result = result.filter(pl.col("rank") < k)
        reference = reference.filter(pl.col("rank") < k)
    if reference.height == 0:
        return 1.0
    ref = reference.select("query", "row_id")
    hits = ref.join(result.select("query", "row_id"), on=["query", "row_id"], how="inner")
    per_query = (
        ref.group_by("query")
        .len(name="n")
        .join(hits.group_by("query").len(name="h"), on="query", how="left")
        .with_columns(pl.col("h").fill_null(0))
    )
    return float((per_query["h"] / per_query["n"]).mean())  # type: ignore[arg-type]
