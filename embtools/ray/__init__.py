"""embtools on Ray Data: read a store as a dataset, embed texts into a store, join stores.

``pip install embtools[ray]``. Importing this package imports ray (``import embtools`` does not).

- :func:`read_store`: a ``ray.data.Dataset`` over one committed version of a store.
- :class:`StoreDatasink`: workers write data files, the driver commits them as one version.
- :func:`embed_to_store`: batch embedding with an actor pool (the model loaded once per actor);
  :func:`vectors_to_store` for precomputed vectors.
- :func:`similarity_join`: query blocks as Ray tasks, parts committed at the end, resumable.
"""

from __future__ import annotations

from embtools.ray.embed import embed_to_store, vectors_to_store
from embtools.ray.join import similarity_join
from embtools.ray.read import read_store
from embtools.ray.sink import StoreDatasink

__all__ = [
    "StoreDatasink",
    "embed_to_store",
    "read_store",
    "similarity_join",
    "vectors_to_store",
]
