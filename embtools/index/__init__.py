"""IVF indexes over a store: spherical k-means partitions, Parquet codes files, probing.

``store.create_index(dimension=384)`` trains centroids on a sample (:mod:`~embtools.index.kmeans`),
writes every row's probe codes in partition order under ``_index/<name>/``
(:mod:`~embtools.index.files`, :mod:`~embtools.index.build`) and commits the index as a new
version; ``store.search(Q, k, nprobe=...)`` then shortlists through it
(:mod:`~embtools.index.probe`, planned by :mod:`embtools.search.plan`) and re-ranks exactly.
"""

from embtools.index.api import create_index, drop_index, find_index, index_info, optimize_index

__all__ = ["create_index", "drop_index", "find_index", "index_info", "optimize_index"]
