"""MemoryState: the state of an in-memory store (``EmbeddingStore(path=None)``), a
:class:`~embtools.storage.state.StoreState`.

Versions are an in-memory counter (only the open one is kept). Every embedding byte is held in the store's
:class:`~embtools.memory.MemoryBudget` under ``store/emb_<d>``, so an add past ``max_memory_gb``
raises :class:`~embtools.errors.MemoryLimitError` (the seed's memory limit) and changes nothing.

Examples
--------
>>> import numpy as np
>>> from embtools.memory import MemoryBudget
>>> from embtools.storage.ingest import prepare_batch
>>> state = MemoryState(MemoryBudget(None))
>>> src = state.source
>>> b = prepare_batch(np.ones((2, 3)), stored_dims=src.dimensions, schema=src.schema, num_rows=0)
>>> state.add(b, {}), state.source.take_metadata([0, 1])["text_id"].to_list()
(1, ['row-0', 'row-1'])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embtools.errors import DuplicateTextIdError
from embtools.memory import MemoryBudget
from embtools.storage.ingest import Batch
from embtools.storage.manifest import config_hash
from embtools.storage.memory_source import MemorySource
from embtools.storage.quantized import sample_ranges
from embtools.storage.quantspec import KINDS, QuantSpec, code_column, encode
from embtools.storage.schema import ROW_ID, TEXT_ID, base_schema, empty_table

__all__ = ["MemoryState", "first_duplicate"]

_HINT = "raise max_memory_gb, or give the store a path so that it lives on disk"


def first_duplicate(existing: pa.Array | pa.ChunkedArray, ids: pa.Array) -> str | None:
    """The first of ``ids`` that is already in ``existing``, or None."""
    if len(existing) == 0 or len(ids) == 0:
        return None
    hit = pc.is_in(ids, value_set=pa.chunked_array(existing).combine_chunks())
    idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    return None if idx.size == 0 else str(ids[int(idx[0])].as_py())


class MemoryState:
    """Rows held in memory: a metadata table, one float32 array per dimension, properties."""

    path: str | None = None
    read_only = False

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.version = 0
        self.meta: pa.Table = empty_table(base_schema())
        self.arrays: dict[int, np.ndarray] = {}
        self.properties: dict[str, Any] = {}
        self.quantized: dict[int, QuantSpec] = {}  # dim -> how its codes were made
        self.codes: dict[str, np.ndarray] = {}  # code column name -> uint8 (n, width)
        self.next_row_id = 0
        self._source: MemorySource | None = None

    @property
    def source(self) -> MemorySource:
        if self._source is None:
            self._source = MemorySource(self.meta, self.arrays, self.budget, self.codes,
                                        self.quantized)
        return self._source

    @property
    def config_hash(self) -> str:
        return config_hash(sorted(self.arrays), self.meta.schema, self.properties)

    def versions(self) -> list[int]:
        """0..version (the counter's history; only the open version holds rows)."""
        return list(range(self.version + 1))

    def files(self) -> list[str]:
        return []

    def held_array(self, dim: int) -> np.ndarray | None:
        return self.arrays.get(dim)

    def compact(self, target_file_bytes: int) -> int:
        """Nothing to merge in memory: the open version."""
        return self.version

    def vacuum(self, retain_versions: int, older_than: Any, grace_seconds: float
               ) -> dict[str, list[Any]]:
        """No old versions or files are kept in memory: nothing removed."""
        return {"versions": [], "files": []}

    def refresh(self) -> int:
        return self.version

    def close(self) -> None:
        """Nothing to close."""

    def add(self, batch: Batch, properties: dict[str, Any]) -> int:
        n = batch.num_rows
        ids = batch.all_text_ids(self.next_row_id)
        dup = first_duplicate(self.meta.column(TEXT_ID), ids)
        if dup is not None:
            raise DuplicateTextIdError(f"text id {dup!r} is already in the store")
        new_bytes = n * sum(batch.dimensions) * 4
        new_bytes += n * sum(c.shape[1] for c in self.codes.values())
        self.budget.check(new_bytes, f"adding {n} rows of dimensions {batch.dimensions}", _HINT)
        table = batch.table(0, n, self.next_row_id, ids, with_embeddings=False)
        old = self.meta
        if old.num_rows:
            merged = pa.concat_tables([old, table], promote_options="default")
            meta = merged.select(batch.schema.names).cast(batch.schema)
        else:
            meta = table.cast(batch.schema)
        arrays: dict[int, np.ndarray] = {}
        for d in batch.dimensions:
            new = batch.embeddings(d, 0, n)
            arrays[d] = np.concatenate([self.arrays[d], new]) if old.num_rows else new.copy()
        codes = {}
        for d, spec in self.quantized.items():
            for kind in spec.kinds:
                name = code_column(d, kind)
                codes[name] = np.concatenate([self.codes[name], encode(spec, kind, arrays[d][-n:])])
        self._replace(meta, arrays, codes)
        self.properties.update(properties)
        self.next_row_id += n
        self.version += 1
        return self.version

    def add_dimension(self, dim: int, embeddings: np.ndarray) -> int:
        """Attach dimension ``dim`` (one row per stored row) as a new held array."""
        new = np.array(embeddings, dtype=np.float32, order="C")  # a copy the caller cannot change
        self.budget.check(int(new.nbytes), f"adding dimension {dim} to {len(new)} rows", _HINT)
        self._replace(self.meta, {**self.arrays, dim: new})
        self.version += 1
        return self.version

    def quantize(self, dim: int, kinds: tuple[str, ...], sample_rows: int) -> int:
        """Hold ``kinds`` codes of dimension ``dim`` for every row (replacing earlier ones)."""
        ranges, sampled = (None, 0)
        if "int8" in kinds:
            ranges, sampled = sample_ranges(self.source, dim, sample_rows)
            ranges.setflags(write=False)
        spec = QuantSpec(dim, tuple(sorted(kinds)), ranges, sampled)
        mine = {code_column(dim, k) for k in KINDS}
        codes = {c: a for c, a in self.codes.items() if c not in mine}
        new = {code_column(dim, k): encode(spec, k, self.arrays[dim]) for k in spec.kinds}
        old_bytes = sum(int(self.codes[c].nbytes) for c in mine if c in self.codes)
        self.budget.check(max(0, sum(int(a.nbytes) for a in new.values()) - old_bytes),
                          f"quantizing dimension {dim}", _HINT)
        self.quantized = {**self.quantized, dim: spec}
        self._replace(self.meta, self.arrays, {**codes, **new})
        self.version += 1
        return self.version

    def clear(self) -> int:
        """Drop every row, dimension and metadata column (properties kept)."""
        self.quantized = {}
        self._replace(empty_table(base_schema()), {})
        self.version += 1
        return self.version

    def delete(self, positions: np.ndarray) -> int:
        keep = np.ones(self.meta.num_rows, dtype=bool)
        keep[positions] = False
        self._replace(self.meta.filter(pa.array(keep)), {d: a[keep] for d, a in self.arrays.items()},
                      {c: a[keep] for c, a in self.codes.items()})
        self.version += 1
        return self.version

    def _replace(self, meta: pa.Table, arrays: dict[int, np.ndarray],
                 codes: dict[str, np.ndarray] | None = None) -> None:
        for d in list(self.arrays):
            self.budget.free(f"store/emb_{d}")
        for c in list(self.codes):
            self.budget.free(f"store/{c}")
        self.meta, self.arrays, self._source = meta, arrays, None
        self.codes = {} if codes is None else codes
        for d, a in arrays.items():
            a.setflags(write=False)  # get_embeddings hands out these arrays without a copy
            self.budget.hold(f"store/emb_{d}", int(a.nbytes))
        for c, a in self.codes.items():
            a.setflags(write=False)
            self.budget.hold(f"store/{c}", int(a.nbytes))
        assert meta.column(ROW_ID).null_count == 0
