"""In-memory VectorSources: the in-memory store's data (:class:`MemorySource`) and one bare array
(:class:`ArraySource`).

A MemorySource (``EmbeddingStore(path=None)``) holds the metadata as one pyarrow table (row_id,
text_id, label, user columns) and one C-contiguous float32 NumPy array per stored dimension, rows
in ascending row id.

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
from embtools.storage.snapshot import BaseRows, metadata_frame
from embtools.storage.source import Chunk, ChunkedSource

__all__ = ["ArraySource", "MemorySource"]


class MemorySource(ChunkedSource):
    """In-memory rows: ``meta`` (pyarrow table) and ``arrays`` (dim -> (n, dim) float32)."""

    def __init__(self, meta: pa.Table, arrays: dict[int, np.ndarray],
                 budget: MemoryBudget | None = None, codes: dict[str, np.ndarray] | None = None,
                 quantized: dict[int, Any] | None = None) -> None:
        self.meta = meta
        self.arrays = arrays
        self.codes = codes or {}  # quantized code columns: name -> uint8 (n, width)
        self.quantized = quantized or {}
        self.budget = budget
        self.num_rows = meta.num_rows
        self.dimensions = sorted(arrays)
        self.schema = meta.schema
        self._base: BaseRows | None = None  # row_id, text_id, label (a version never changes)

    def metadata(self) -> pl.LazyFrame:
        return metadata_frame(self.meta).lazy()

    def chunks(self) -> list[Chunk]:
        if self.num_rows == 0:
            return []
        return [Chunk(0, self.num_rows, lambda d: self.arrays[d], lambda d: None)]

    def binary_chunks(self, column: str) -> list[tuple[int, int, Any, Any]]:
        """``(start, rows, load, release)`` of a held code column (see ``Snapshot.binary_chunks``)."""
        if column not in self.codes:
            raise InvalidArgumentError(f"the store holds no column {column!r}")
        if self.num_rows == 0:
            return []
        return [(0, self.num_rows, lambda: self.codes[column], lambda: None)]

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
        if len(names) == 3:  # a search's hits: gathered from the base columns on this thread
            if self._base is None:
                self._base = BaseRows.of(self.meta.select(names))
            return self._base.frame(pos)
        return metadata_frame(self.meta.select(names).take(pa.array(pos)))


class ArraySource(ChunkedSource):
    """A :class:`~embtools.storage.source.VectorSource` over one 2-D array, without metadata.

    Its one stored dimension is the array's width (prefixes served); positions are row numbers.
    It has no metadata, so no filters (``select(None)`` only) and no ``take_metadata``. It is not
    ``frozen``: the caller may change the array.

    Examples
    --------
    >>> src = ArraySource(np.ones((5, 4), dtype=np.float32))
    >>> [p.tolist() for p, _ in src.iter_vectors(4, batch_rows=2)]
    [[0, 1], [2, 3], [4]]
    """

    frozen = False

    def __init__(self, vectors: Any) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] < 1:
            raise InvalidArgumentError(f"an ArraySource needs a 2-D array, got shape {x.shape}")
        self.vectors = x
        self.num_rows = int(x.shape[0])
        self.dimensions = [int(x.shape[1])]

    def select(self, where: Any) -> np.ndarray:
        if where is not None:
            raise InvalidArgumentError("an ArraySource has no metadata to filter on")
        return np.arange(self.num_rows, dtype=np.int64)

    def metadata(self) -> pl.LazyFrame:
        raise InvalidArgumentError("an ArraySource has no metadata")

    def chunks(self) -> list[Chunk]:
        if self.num_rows == 0:
            return []
        return [Chunk(0, self.num_rows, lambda d: self.vectors, lambda d: None)]

    def take_metadata(self, positions: Any, columns: Sequence[str] | None = None) -> pl.DataFrame:
        raise InvalidArgumentError("an ArraySource has no metadata")
