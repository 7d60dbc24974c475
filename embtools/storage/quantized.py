"""Quantized columns of a store: writing them (a new version, and every later add) and reading them.

:func:`quantize_files` computes the int8 ranges on a sample of the stored rows
(:func:`sample_ranges`), rewrites every data file copy-on-write with the code columns of
:mod:`embtools.storage.quantspec` and commits one new version whose manifest records the
:class:`~embtools.storage.quantspec.QuantSpec` (like ``add_dimension``: a concurrent change of the
files raises :class:`~embtools.errors.CommitConflictError`, the store is unchanged).
``quantspec.add_code_columns`` encodes the codes of new rows (``add``); delete, compact and save copy the
columns with the rest of the rows. :func:`iter_codes` and :func:`gather_codes` read them for
search (views of the mapped files where the layout allows).

Examples
--------
>>> import tempfile, numpy as np
>>> from embtools.store import EmbeddingStore
>>> store = EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> _ = store.add_embeddings(np.array([[1, -1], [-1, 2], [0.5, 0.5]], np.float32), dimension=2)
>>> m = quantize_files(store.path, store.source.manifest, 2, ("binary", "int8"), store.source)
>>> m.quantized[2].kinds, m.operation
(('binary', 'int8'), 'quantize')
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from embtools.errors import CorruptStoreError, InvalidArgumentError
from embtools.kernels.codes import int8_ranges
from embtools.storage.columns import unchanged_since
from embtools.storage.io import LocalStorage, as_storage
from embtools.storage.manifest import DATA_DIR, FileEntry, Manifest, StoreRoot, commit
from embtools.storage.quantspec import QuantSpec, add_code_columns, code_column, code_width
from embtools.storage.source import gather_rows
from embtools.storage.writer import _read, _Write

__all__ = [
    "SAMPLE_ROWS",
    "gather_codes",
    "iter_codes",
    "quantize_files",
    "sample_ranges",
]

#: rows sampled (uniformly, seeded) for the int8 ranges
SAMPLE_ROWS = 100_000


def sample_ranges(source: Any, dim: int, rows: int = SAMPLE_ROWS, seed: int = 0) -> tuple[np.ndarray, int]:
    """``(ranges, sampled)``: int8 ranges ``(2, dim)`` float32 of a uniform sample of at most
    ``rows`` stored rows (seeded, so the same store gives the same ranges)."""
    n = int(source.num_rows)
    if n == 0:
        raise InvalidArgumentError("the store has no rows to compute int8 ranges from")
    if n <= rows:
        pos = np.arange(n, dtype=np.int64)
    else:
        pos = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
    return int8_ranges(gather_rows(source, dim, pos)), int(pos.size)


def quantize_files(
    root: StoreRoot, base: Manifest, dim: int, kinds: tuple[str, ...], source: Any,
    sample_rows: int = SAMPLE_ROWS,
) -> Manifest:
    """Commit ``base`` with ``kinds`` codes of dimension ``dim`` for every row (int8 ranges from
    a sample of ``source``, the snapshot of ``base``); replaces earlier codes of ``dim``."""
    if dim not in base.dimensions:
        raise InvalidArgumentError(f"dimension {dim} is not stored; stored: {base.dimensions}")
    ranges, sampled = (None, 0)
    if "int8" in kinds:
        ranges, sampled = sample_ranges(source, dim, sample_rows)
        ranges.setflags(write=False)
    spec = QuantSpec(dim, tuple(sorted(kinds)), ranges, sampled)
    new: list[FileEntry] = []
    with _Write(root, base.version) as w:
        for entry in base.files:
            table = add_code_columns(_read(root, entry), {dim: spec})
            if table.num_rows != entry.num_rows:
                raise CorruptStoreError(f"{entry.path}: holds {table.num_rows} rows, the manifest "
                                        f"says {entry.num_rows}")
            new.append(w.file(table))
            del table
        storage = as_storage(root)
        if isinstance(storage, LocalStorage):
            storage.sync(DATA_DIR)

        def rebase(latest: Manifest | None) -> Manifest:
            latest = unchanged_since(root, base, latest, "quantize")
            return replace(latest, operation="quantize", files=new,
                           quantized={**latest.quantized, dim: spec})

        return commit(root, rebase)


def _chunks(source: Any, column: str) -> list[tuple[int, int, Any, Any]]:
    get = getattr(source, "binary_chunks", None)
    if get is None:
        raise InvalidArgumentError("this source holds no quantized columns")
    out: list[tuple[int, int, Any, Any]] = get(column)
    return out


def iter_codes(
    source: Any, dim: int, kind: str, positions: np.ndarray | None = None, batch_rows: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(positions, codes)`` batches of the ``kind`` codes of dimension ``dim``, in ascending
    position order: uint8 ``(n, width)`` arrays (read-only views of the mapped files where the
    layout allows; valid until the next batch). ``positions`` (ascending) picks rows; a batch
    holds at most one row group's rows, and at most ``batch_rows``."""
    column = code_column(dim, kind)
    pos = None if positions is None else np.asarray(positions, dtype=np.int64)
    step = batch_rows or (1 << 62)
    for start, rows, load, release in _chunks(source, column):
        if rows == 0:
            continue
        if pos is None:
            codes = load()
            for a in range(0, rows, step):
                b = min(rows, a + step)
                yield np.arange(start + a, start + b, dtype=np.int64), codes[a:b]
        else:
            lo, hi = np.searchsorted(pos, [start, start + rows])
            if lo == hi:
                continue
            codes = load()
            for a in range(int(lo), int(hi), step):
                p = pos[a : min(int(hi), a + step)]
                yield p, codes[p - start]
        release()


def gather_codes(source: Any, dim: int, kind: str, positions: np.ndarray) -> np.ndarray:
    """The ``kind`` codes of ``positions`` (any order, repeats allowed), uint8 ``(n, width)``."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    width = code_width(dim, kind)
    out = np.empty((pos.size, width), np.uint8)
    if pos.size == 0:
        return out
    uniq, inv = np.unique(pos, return_inverse=True)
    got = np.empty((uniq.size, width), np.uint8)
    i = 0
    for p, codes in iter_codes(source, dim, kind, uniq):
        got[i : i + p.size] = codes
        i += p.size
    if i != uniq.size:
        raise InvalidArgumentError("positions out of range")
    out[...] = got[inv]
    return out
