"""Building an IVF index: train centroids on a sample, assign every row, write, commit.

:func:`build_index` runs under the store's memory budget: the training sample is at most half of
what the cap leaves (fewer rows are sampled when the cap is small), every row is assigned to its
nearest centroid in batches (the backend's exact top-1 kernel, see :mod:`embtools.index.kmeans`),
and the codes are written in partition order, one codes file per run of whole partitions of at
most :data:`CODES_FILE_BYTES` (and a quarter of the cap). The files go to ``_index/<name>/`` and are
fsynced; then the index is committed as a new version (``crash_point("after_index_files")`` between
the two): a crash before the commit leaves the old version and unreferenced files, which vacuum
removes. Building is cheap enough to restart (minutes for 1M rows).

:func:`assign_rows` assigns rows to existing centroids (``optimize_index``'s delta) and writes them
as more codes files.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import numpy as np

from embtools.errors import CorruptStoreError, MemoryLimitError
from embtools.index.files import write_centroids, write_codes
from embtools.index.kmeans import DEFAULT_ITERATIONS, assign, normalize_rows, train_centroids
from embtools.kernels.codes import encode_int8, int8_ranges, pack_signs
from embtools.memory import MemoryBudget, format_bytes
from embtools.storage.durable import fsync_dir
from embtools.storage.jobs import progress
from embtools.storage.manifest import INDEX_DIR, IndexEntry, Manifest, commit, crash_point
from embtools.storage.source import gather_rows

__all__ = ["CODES_FILE_BYTES", "assign_rows", "build_index", "commit_index", "default_partitions",
           "default_sample_rows", "encode", "index_name"]

#: A codes file holds whole partitions of at most about this many bytes of codes.
CODES_FILE_BYTES = 64 * 1024**2
#: Training rows per partition, and the least training rows when the store has them.
ROWS_PER_PARTITION = 64
MIN_SAMPLE_ROWS = 100_000


def index_name(dimension: int, metric: str) -> str:
    """The name of the index serving ``dimension`` and ``metric`` (one per pair)."""
    return f"emb_{dimension}_{metric}"


def default_partitions(rows: int) -> int:
    """About ``4 * sqrt(rows)`` partitions (at least 1, at most ``rows``)."""
    return max(1, min(rows, round(4 * math.sqrt(rows))))


def default_sample_rows(rows: int, partitions: int) -> int:
    """``64`` rows per partition, at least 100,000 (all rows when the store has fewer)."""
    return min(rows, max(ROWS_PER_PARTITION * partitions, MIN_SAMPLE_ROWS))


def encode(x: np.ndarray, code_dim: int, metric: str, kind: str = "float",
           ranges: np.ndarray | None = None) -> np.ndarray:
    """The probe codes of float32 rows ``x``: the ``code_dim`` prefix (unit length for cosine) as
    float32, as int8 codes with ``ranges`` (``kind="int8"``) or as packed sign bits (``"binary"``).

    Examples
    --------
    >>> x = np.array([[3.0, -4.0, 1.0]], np.float32)
    >>> encode(x, 2, "cosine").tolist(), encode(x, 3, "dot", "binary").tolist()
    ([[0.6000000238418579, -0.800000011920929]], [[160]])
    """
    codes = np.ascontiguousarray(x[:, :code_dim], dtype=np.float32)
    if metric == "cosine":
        codes = normalize_rows(codes)
    if kind == "int8":
        assert ranges is not None
        return encode_int8(codes, ranges)
    if kind == "binary":
        return pack_signs(codes)
    return codes


def code_ranges(sample: np.ndarray, metric: str) -> np.ndarray:
    """int8 ranges (per-dimension min and max) of the sample's codes (normalised for cosine)."""
    lo = np.full(sample.shape[1], np.inf, np.float32)
    hi = np.full(sample.shape[1], -np.inf, np.float32)
    for a in range(0, len(sample), 16384):
        block = np.array(sample[a:a + 16384], dtype=np.float32)
        r = int8_ranges(normalize_rows(block) if metric == "cosine" else block)
        lo, hi = np.minimum(lo, r[0]), np.maximum(hi, r[1])
    return np.vstack([lo, hi])


def _sample(source: Any, positions: np.ndarray, dim: int, rows: int,
            rng: np.random.Generator) -> np.ndarray:
    pick = positions if rows >= len(positions) else np.sort(rng.choice(positions, rows, replace=False))
    return gather_rows(source, dim, pick)


def _plan_files(counts: np.ndarray, bytes_per_row: int, limit: int) -> list[tuple[int, int]]:
    """Runs ``[p0, p1)`` of whole partitions of at most ``limit`` bytes of codes (a bigger
    partition gets a file of its own)."""
    runs, start, size = [], 0, 0
    for p, c in enumerate(counts.tolist()):
        if size and size + c * bytes_per_row > limit:
            runs.append((start, p))
            start, size = p, 0
        size += c * bytes_per_row
    runs.append((start, len(counts)))
    return runs


def assign_rows(root: str, name: str, source: Any, positions: np.ndarray, row_ids: np.ndarray,
                centroids: np.ndarray, dim: int, code_dim: int, metric: str, backend: Any,
                budget: MemoryBudget, show: bool | None = None, kind: str = "float",
                ranges: np.ndarray | None = None) -> list[tuple[str, int]]:
    """Assign the rows at ``positions`` (ascending; their ``row_ids``) to ``centroids`` and write
    their codes in partition order; the ``(path, bytes)`` of each codes file written."""
    n = len(positions)
    parts = np.empty(n, np.int32)
    avail = budget.available_bytes
    step = max(1, min(65_536, (avail // 4 // (dim * 4 * 3)) if avail is not None else 65_536))
    files: list[tuple[str, int]] = []
    with progress(2 * n, f"index {name}: assigning and writing rows", enabled=show,
                  unit="rows") as advance:
        for a in range(0, n, step):  # pass 1: each row's partition
            block = gather_rows(source, dim, positions[a:a + step])
            if metric != "l2":
                block = normalize_rows(block)
            parts[a:a + step] = assign(block, centroids, metric, backend, budget)
            advance(len(block))
        order = np.argsort(parts, kind="stable")  # row-id order within each partition
        counts = np.bincount(parts, minlength=len(centroids))
        limit = CODES_FILE_BYTES if avail is None else max(code_dim * 4, min(CODES_FILE_BYTES, avail // 4))
        ends = np.cumsum(counts)
        for p0, p1 in _plan_files(counts, code_dim * 4, limit):  # pass 2: codes in partition order
            lo, hi = (int(ends[p0 - 1]) if p0 else 0), int(ends[p1 - 1])
            if hi == lo:
                continue
            sel = order[lo:hi]
            asc = np.argsort(sel, kind="stable")
            block = np.empty((hi - lo, code_dim), np.float32)
            block[asc] = gather_rows(source, code_dim if code_dim < dim else dim, positions[sel[asc]])
            files.append(write_codes(root, name, row_ids[sel], parts[sel],
                                     encode(block, code_dim, metric, kind, ranges)))
            advance(hi - lo)
    return files


def build_index(root: str, snapshot: Any, backend: Any, budget: MemoryBudget, *, dimension: int,
                metric: str, code_dim: int, codes: str, partitions: int | None,
                sample_rows: int | None, iterations: int = DEFAULT_ITERATIONS,
                show: bool | None = None) -> IndexEntry:
    """Train and write the index of ``snapshot``'s rows (files fsynced, nothing committed)."""
    n = int(snapshot.num_rows)
    name = index_name(dimension, metric)
    p = default_partitions(n) if partitions is None else min(int(partitions), n)
    want = default_sample_rows(n, p) if sample_rows is None else min(int(sample_rows), n)
    want = max(want, p)
    rng = np.random.default_rng(0)
    positions = np.arange(n, dtype=np.int64)
    row_ids = snapshot.metadata().select("row_id").collect()["row_id"].to_numpy().astype(np.int64)
    if len(row_ids) != n:
        raise CorruptStoreError(f"{root}: {len(row_ids)} row ids for {n} rows")
    os.makedirs(os.path.join(root, INDEX_DIR, name), exist_ok=True)
    key = f"index/build/{id(snapshot)}"
    rows_held = min(want, n)
    need = rows_held * dimension * 4
    avail = budget.available_bytes
    if avail is not None:  # the sample (normalised in place) in 3/5 of the room, the rest for
        # the centroids and the assignment batches
        rows_held = min(rows_held, max(1, avail * 3 // 5 // (dimension * 4)))
        if rows_held < p or avail - rows_held * dimension * 4 < 2 * p * dimension * 4:
            raise MemoryLimitError(
                f"create_index: a training sample of {p} rows (one per partition) of dimension "
                f"{dimension} and its centroids need {format_bytes(3 * p * dimension * 4)}, over "
                f"the {format_bytes(avail)} the memory cap leaves; raise max_memory_gb or pass "
                "fewer partitions")
        need = rows_held * dimension * 4
    with budget.holding(key, need, "the index training sample"):
        sample = _sample(snapshot, positions, dimension, rows_held, rng)
        ranges = code_ranges(sample[:, :code_dim], metric) if codes == "int8" else None
        with progress(iterations, f"index {name}: k-means on {len(sample):,} rows, {p} partitions",
                      enabled=show) as advance:
            centroids = train_centroids(sample, p, metric, backend, budget, iterations=iterations,
                                        advance=advance)
        del sample
    c_path = write_centroids(root, name, centroids)
    written = [c_path]
    written += assign_rows(root, name, snapshot, positions, row_ids, centroids, dimension,
                           code_dim, metric, backend, budget, show, codes, ranges)
    fsync_dir(os.path.join(root, INDEX_DIR, name))
    crash_point("after_index_files")
    info = {"codes": codes, "code_dim": code_dim, "partitions": len(centroids), "rows": n,
            "built_version": int(snapshot.version), "sample_rows": int(rows_held),
            "iterations": iterations, "delta_rows": 0,
            **({} if ranges is None else {"int8_ranges": ranges.tolist()})}
    return IndexEntry(name, dimension, metric, [f for f, _ in written], [b for _, b in written],
                      [f.path for f in snapshot.manifest.files], info)


def commit_index(root: str, entry: IndexEntry | None, drop: str | None = None,
                 operation: str = "create_index") -> Manifest:
    """Commit ``entry`` (replacing an index of the same name), or drop the index ``drop``, as a new
    version on top of the latest."""
    def rebase(latest: Manifest | None) -> Manifest:
        if latest is None:
            raise CorruptStoreError(f"{root}: the store has no committed version")
        gone = drop if entry is None else entry.name
        kept = [i for i in latest.indexes if i.name != gone]
        return replace(latest, operation=operation, indexes=kept + ([] if entry is None else [entry]))

    return commit(root, rebase)
