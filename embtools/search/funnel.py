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

from embtools.backends.base import check_k
from embtools.search.engine import StreamSizes, run_stream
from embtools.search.quantized import CodeSizes, code_rerank, code_shortlist
from embtools.search.refine import rerank
from embtools.search.request import SearchContext, SearchRequest, TopK, parse_funnel
from embtools.search.screen import ScreenSizes, screened_shortlist

__all__ = ["funnel_top_k", "parse_funnel", "recall_at_k"]


def funnel_top_k(
    req: SearchRequest, ctx: SearchContext, first: StreamSizes | ScreenSizes | CodeSizes
) -> TopK:
    """Funnel search (``req.funnel``): the top-``n0`` on the ``d0`` prefix over the selection
    (the float32 stream, or bfloat16 scores when the planner sized the screen for it: ``first``),
    or by the quantized codes of ``req.dim`` (a ``"binary"``/``"int8"`` first stage, see
    :mod:`embtools.search.quantized`), then the later stages (int8 codes, or :func:`rerank` at
    a prefix) and a float64 :func:`rerank` at the full ``req.dim`` to ``req.k``."""
    assert req.funnel is not None
    d0, n0 = req.funnel[0]
    if isinstance(d0, str):
        assert isinstance(first, CodeSizes)
        cand = code_shortlist(req, ctx, d0, n0, first)
    elif isinstance(first, ScreenSizes):
        # bfloat16 scores pick the shortlist (the later stages re-rank it in float64)
        cand = screened_shortlist(req.at_dim(d0, n0), ctx, n0, first)
    else:
        assert isinstance(first, StreamSizes)
        cand = run_stream(req.at_dim(d0, n0), ctx, first, n0).positions
    for d, n in req.funnel[1:]:
        if isinstance(d, str):
            cand = code_rerank(req, ctx, cand, d, n)
        else:
            cand = rerank(req.replace(dim=d), ctx, cand, n).positions
    return rerank(req, ctx, cand, req.k)


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
