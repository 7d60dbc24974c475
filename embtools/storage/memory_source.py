"""MemorySource: the in-memory store's data (``EmbeddingStore(path=None)``), a VectorSource.

Holds the metadata as one pyarrow table (row_id, text_id, label, user columns) and one C-contiguous
float32 NumPy array per stored dimension, rows in ascending row id.

Examples
--------
>>> import numpy as np, pyarrow as pa
>>> meta = pa.table({"row_id": [0, 1], "text_id": ["a", "b"], "label": pa.nulls(2, pa.string())})
>>> src = MemorySource(meta, {2: np.eye(2, dtype=np.float32)})
>>> src.select("text_id = 'b'").tolist(), src.take_metadata([1])["text_id"].to_list()
([1], ['b'])
>>> [x.tolist() for _, x in src.iter_vectors(1)]
[[[1.0], [0.0]]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from embtools.errors import InvalidArgumentError
from embtools.memory import MemoryBudget
from embtools.storage.schema import LABEL, ROW_ID, TEXT_ID
from embtools.storage.snapshot import metadata_frame
from embtools.storage.source import Chunk, ChunkedSource

__all__ = ["MemorySource"]


class MemorySource(ChunkedSource):
    """In-memory rows: ``meta`` (pyarrow table) and ``arrays`` (dim -> (n, dim) float32)."""

    #: its rows never change (a new version is a new object): the search engine may cache derived
    #: data (row norms) per object
    frozen = True

    def __init__(self, meta: pa.Table, arrays: dict[int, np.ndarray],
                 budget: MemoryBudget | None = None) -> None:
        self.meta = meta
        self.arrays = arrays
        self.budget = budget
        self.num_rows = meta.num_rows
        self.dimensions = sorted(arrays)
        self.schema = meta.schema

    def metadata(self) -> pl.LazyFrame:
        return metadata_frame(self.meta).lazy()

    def chunks(self) -> list[Chunk]:
        if self.num_rows == 0:
            return []
        return [Chunk(0, self.num_rows, lambda d: self.arrays[d], lambda d: None)]

    def take_metadata(self, positions: Any, columns: Sequence[str] | None = None) -> pl.DataFrame:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        names = [ROW_ID, TEXT_ID, LABEL]
        for c in columns or []:
            if c not in self.meta.column_names:
                raise InvalidArgumentError(
                    f"unknown metadata column {c!r}; columns: {self.meta.column_names}")
            if c not in names:
                names.append(c)
        if pos.size and (pos.min() < 0 or pos.max() >= self.num_rows):
            raise InvalidArgumentError(f"positions out of range 0..{self.num_rows - 1}")
        return metadata_frame(self.meta.select(names).take(pa.array(pos)))
