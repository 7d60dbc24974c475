"""Search: exact streaming top-k, filters, Matryoshka funnel, batch similarity jobs.

- :func:`search_store` (``store.search``): exact top-k of array queries over a store, under its
  memory cap, as a polars DataFrame ``query, rank, row_id, text_id, label, score``.
- :func:`explain_search` (``store.explain``): the plan a search would run, as text.
- :func:`compute_similarity` (``store.compute_similarity``): the seed's ``(similarities, indices)``.
- :func:`similarity_join`: every row of one store against another, to a resumable Parquet dataset.
- :func:`recall_at_k`: recall of a (funnel) result against the exact one.

Only NumPy, pyarrow and polars are imported here; torch and MLX load with their backends.

Examples
--------
>>> import numpy as np, embtools as et
>>> from embtools.search import search_store
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> _ = store.add_embeddings(np.eye(4, dtype=np.float32), dimension=4)
>>> search_store(store, np.eye(4, dtype=np.float32)[2], k=1)["row_id"].to_list()
[2]
"""

from __future__ import annotations

from embtools.search.api import compute_similarity, explain_search, search_store
from embtools.search.engine import stream_top_k
from embtools.search.funnel import recall_at_k
from embtools.search.join import similarity_join

__all__ = [
    "compute_similarity",
    "explain_search",
    "recall_at_k",
    "search_store",
    "similarity_join",
    "stream_top_k",
]
