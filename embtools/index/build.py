"""Building an IVF index: train centroids on a sample, assign every row, write, commit.

:func:`build_index` runs under the store's memory budget in three steps, each sized from what the
cap leaves:

1. k-means on a sample (at most 3/5 of what the cap leaves; fewer rows are sampled when the cap is
   small) with the exact top-1 of :mod:`embtools.index.kmeans`;
2. every row, chunk by chunk in position order (a sequential read of the data files): normalised,
   assigned to its exact nearest centroid, encoded, and the chunk's codes spilled sorted by
   partition (:mod:`embtools.index.spill`);
3. the codes files: runs of whole partitions of at most :data:`CODES_FILE_BYTES` (and a quarter
   of what the cap leaves), each put together from one contiguous slice of every chunk's spill
   and written in ``(partition, row_id)`` order.

The centroids and each chunk are spill files keyed by the build's settings, so a build that is
killed resumes where it stopped when run again with the same settings: a re-run skips the k-means
and the chunks already done (``crash_point("after_index_centroids")`` and
``crash_point("after_index_chunk")`` are the test hooks). The codes files go to ``_index/<name>/``
and are fsynced; then the index is committed as a new version (``crash_point("after_index_files")``
between the two): a crash before the commit leaves the old version, unreferenced files and the
spills, all of which vacuum removes once past its grace period; after the commit the spills are
removed (:func:`finish_build`).

:func:`assign_rows` assigns rows to existing centroids (``optimize_index``'s delta) and writes them
as more codes files, through the same steps 2 and 3.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from embtools.errors import CorruptStoreError, MemoryLimitError
from embtools.index.files import raw_codes, write_centroids, write_codes
from embtools.index.kmeans import (
    DEFAULT_ITERATIONS,
    Top1,
    assign_batch_rows,
    normalize_rows,
    train_centroids,
)
from embtools.index.soar import second_partitions
from embtools.index.spill import Spill, read_rows
from embtools.kernels.codes import encode_int8, int8_ranges, pack_signs, sign_bytes
from embtools.memory import MemoryBudget, format_bytes
from embtools.storage.durable import fsync_dir, fsync_path
from embtools.storage.jobs import progress
from embtools.storage.manifest import INDEX_DIR, IndexEntry, Manifest, commit, crash_point
from embtools.storage.source import gather_rows

__all__ = ["CHUNK_ROWS", "CODES_FILE_BYTES", "assign_rows", "build_index", "commit_index",
           "default_partitions", "default_sample_rows", "delta_spill", "encode", "finish_build",
           "index_name"]

#: A codes file holds whole partitions of at most about this many bytes of codes.
CODES_FILE_BYTES = 64 * 1024**2
#: Training rows gathered per call (the reader copies about half as many at a time).
SAMPLE_STEP = 8192
#: Rows per chunk of the assignment (a spill file each; fewer when the cap is small).
CHUNK_ROWS = 65_536
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
           ranges: np.ndarray | None = None, raw: bool = False) -> np.ndarray:
    """The probe codes of float32 rows ``x``: the ``code_dim`` prefix (unit length for cosine) as
    float32, as int8 codes with ``ranges`` (``kind="int8"``) or as packed sign bits (``"binary"``);
    ``raw``: float codes that are the rows as they are (also for cosine).

    Examples
    --------
    >>> x = np.array([[3.0, -4.0, 1.0]], np.float32)
    >>> encode(x, 2, "cosine").tolist(), encode(x, 3, "dot", "binary").tolist()
    ([[0.6000000238418579, -0.800000011920929]], [[160]])
    >>> encode(x, 3, "cosine", raw=True).tolist()
    [[3.0, -4.0, 1.0]]
    """
    codes = np.array(x[:, :code_dim], dtype=np.float32)  # a copy: ``x`` is left as it is
    if raw:
        if kind != "float":
            raise ValueError(f"raw codes are float codes, not {kind}")
        return codes
    if metric == "cosine":
        codes = normalize_rows(codes)
    if kind == "int8":
        assert ranges is not None
        return encode_int8(codes, ranges)
    if kind == "binary":
        return pack_signs(codes)
    return codes


def code_norms(codes: np.ndarray) -> np.ndarray:
    """float64 norms of float32 ``codes``, the bits of the exact re-rank's
    (``np.sqrt(np.sum(v64 * v64, axis=-1))``, :func:`~embtools.search.refine.rerank`): a re-rank
    from the codes divides by them, and a scan multiplies a row's float32 product by
    ``1 / norm`` in float32.

    Examples
    --------
    >>> code_norms(np.array([[3, 4], [0, 0]], np.float32)).tolist()
    [5.0, 0.0]
    """
    out = np.empty(len(codes), np.float64)
    for a in range(0, len(codes), 4096):
        v64 = codes[a:a + 4096].astype(np.float64)
        np.multiply(v64, v64, out=v64)
        np.sqrt(np.sum(v64, axis=-1), out=out[a:a + 4096])
    return out


def code_ranges(sample: np.ndarray, metric: str) -> np.ndarray:
    """int8 ranges (per-dimension min and max) of the sample's codes (normalised for cosine)."""
    lo = np.full(sample.shape[1], np.inf, np.float32)
    hi = np.full(sample.shape[1], -np.inf, np.float32)
    for a in range(0, len(sample), 4096):
        block = np.array(sample[a:a + 4096], dtype=np.float32)
        r = int8_ranges(normalize_rows(block) if metric == "cosine" else block)
        lo, hi = np.minimum(lo, r[0]), np.maximum(hi, r[1])
    return np.vstack([lo, hi])


def _sample(source: Any, positions: np.ndarray, dim: int, rows: int,
            rng: np.random.Generator) -> np.ndarray:
    pick = positions if rows >= len(positions) else np.sort(rng.choice(positions, rows, replace=False))
    out = np.empty((len(pick), dim), np.float32)
    for a in range(0, len(pick), SAMPLE_STEP):  # the reader's copy buffer stays small
        gather_rows(source, dim, pick[a:a + SAMPLE_STEP], out=out[a:a + SAMPLE_STEP])
    return out


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


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere
    nothing): buffers of a few MiB freed by one step otherwise stay resident under the next."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def _arrow_pool() -> Any:
    """pyarrow's default memory pool (None when pyarrow has no ``release_unused``)."""
    import pyarrow as pa

    pool = pa.default_memory_pool()
    return pool if hasattr(pool, "release_unused") else None


def _code_layout(kind: str, code_dim: int) -> tuple[np.dtype, int]:
    """dtype and width (values per row) of a row's codes."""
    if kind == "int8":
        return np.dtype(np.int8), code_dim
    if kind == "binary":
        return np.dtype(np.uint8), sign_bytes(code_dim)
    return np.dtype(np.float32), code_dim


def _chunk_plan(n: int, dim: int, code_bytes: int, partitions: int,
                avail: int | None) -> tuple[int, int, int]:
    """``(chunk rows, batch rows, score columns)``: a chunk's codes in a quarter of what the cap
    leaves, a batch's vectors (with the reader's copy and the sorted slice being spilled) and a
    tile of its scores in a third."""
    chunk = CHUNK_ROWS if avail is None else max(1, min(CHUNK_ROWS, avail // 4 // max(1, code_bytes + 8)))
    batch, cols = assign_batch_rows(dim * 3, partitions, None if avail is None else avail * 4 // 3)
    return int(min(chunk, max(n, 1))), int(min(batch, chunk, max(n, 1))), cols


def _entry_rows(n: int, chunk: int, copies: int) -> np.ndarray:
    """The row (index into the positions) of each entry of the index, chunk by chunk: a chunk's
    rows, ``copies`` times over (with SOAR, first in their nearest partition, then in the second)."""
    return np.concatenate([np.tile(np.arange(a, min(n, a + chunk)), copies) for a in range(0, n, chunk)]
                          or [np.zeros(0, np.int64)])


def _assign_chunks(spill: Spill, source: Any, positions: np.ndarray, centroids: np.ndarray,
                   dim: int, code_dim: int, metric: str, kind: str, ranges: np.ndarray | None,
                   backend: Any, budget: MemoryBudget, advance: Any,
                   raw: bool = False, soar: float | None = None) -> tuple[np.ndarray, list[Any], int]:
    """Step 2: each entry's partition (int32; one entry per row in ``positions`` order, with
    ``soar`` two per row, :func:`_entry_rows`), each chunk's spill of codes sorted by
    (partition, row) (chunks already spilled by an earlier run are reused) and the chunk rows."""
    n, p = len(positions), len(centroids)
    copies = 1 if soar is None else 2
    dtype, width = _code_layout(kind, code_dim)
    code_bytes = dtype.itemsize * width
    chunk, batch, cols = _chunk_plan(n, dim, code_bytes * copies, p, budget.available_bytes)
    parts = np.empty(n * copies, np.int32)
    spills: list[Any] = []
    top: Top1 | None = None
    buf: np.ndarray | None = None
    codes: np.ndarray | None = None
    for i, a in enumerate(range(0, n, chunk)):
        b = min(n, a + chunk)
        m = b - a
        mine = parts[a * copies:b * copies]  # the chunk's entries: its rows' first partitions, then their second
        what = f"c{i:06d}"
        done = spill.load(f"{what}-parts", np.int32, (m * copies,))
        hit = None if done is None else spill.path(f"{what}-codes", dtype, (m * copies, width))
        if done is not None and hit is not None and int(done.min()) >= 0 and int(done.max()) < p:
            mine[:] = done
            spills.append(hit)
            advance(m)
            continue
        if top is None:
            top = Top1(centroids, metric, backend, batch, cols)
            buf = np.empty((batch, dim), np.float32)
            codes = np.empty((chunk, width), dtype)
        assert buf is not None and codes is not None
        for s in range(a, b, batch):
            e = min(b, s + batch)
            x = gather_rows(source, dim, positions[s:e], out=buf[: e - s])
            codes[s - a:e - a] = encode(x, code_dim, metric, kind, ranges, raw)
            if metric != "l2":
                normalize_rows(x)  # spherical partitions
            top(x, mine[s - a:e - a])
            if soar is not None:
                mine[m + s - a:m + e - a] = second_partitions(x, mine[s - a:e - a], centroids, soar, max(1, cols // 3))
            advance(e - s)
        rows = np.tile(np.arange(m), copies)
        order = np.lexsort((rows, mine))  # partition order, then position order
        with spill.writer(f"{what}-codes", dtype, (m * copies, width)) as w:
            for s in range(0, m * copies, batch):
                w.write(codes[rows[order[s:s + batch]]])
        spill.save(f"{what}-parts", mine)
        crash_point("after_index_chunk")
        spills.append(w.written)
    return parts, spills, chunk


def _write_runs(root: str, name: str, parts: np.ndarray, row_ids: np.ndarray, spills: list[Any],
                chunk: int, partitions: int, kind: str, code_dim: int, budget: MemoryBudget,
                advance: Any, norms: bool = False, copies: int = 1) -> list[tuple[str, int]]:
    """Step 3: the codes files, runs of whole partitions put together from the chunks' spills
    (``chunk`` rows each, ``copies`` entries a row: ``parts`` holds the entries' partitions,
    :func:`_entry_rows`); ``norms``: with the codes' norms (:func:`code_norms`)."""
    if copies > 1:  # (partition, position): the rows of the index
        rows_of = _entry_rows(len(row_ids), chunk, copies)
        row_ids, order = row_ids[rows_of], np.lexsort((rows_of, parts))
        del rows_of
    else:
        order = np.argsort(parts, kind="stable")
    chunk *= copies
    n = len(parts)
    dtype, width = _code_layout(kind, code_dim)
    code_bytes = dtype.itemsize * width
    counts = np.bincount(parts, minlength=partitions)
    avail = budget.available_bytes
    # a run's codes, and pyarrow's pages while writing them (about four times as many bytes)
    limit = CODES_FILE_BYTES if avail is None else max(code_bytes, min(CODES_FILE_BYTES, avail // 16))
    runs = [(p0, p1) for p0, p1 in _plan_files(counts, code_bytes, limit) if counts[p0:p1].sum()]
    if not runs:
        return []
    ends = np.r_[0, np.cumsum(counts)]
    # where each run's rows start and end in each chunk's spill (it is in partition order)
    cuts = np.array([p for run in runs for p in run])
    starts = np.array([np.r_[0, np.cumsum(np.bincount(parts[a:a + chunk], minlength=partitions))][cuts]
                       for a in range(0, n, chunk)])
    out = np.empty((max(int(ends[p1] - ends[p0]) for p0, p1 in runs), width), dtype)
    stage = np.empty((int((starts[:, 1::2] - starts[:, 0::2]).max()), width), dtype)
    pool = _arrow_pool()
    files: list[tuple[str, int]] = []
    # each file is fsynced on a second thread while the next one is put together (the disk
    # writes one back as the CPU works on the next); all are waited for before returning
    with ThreadPoolExecutor(1, thread_name_prefix="embtools-index-fsync") as syncer:
        synced = []
        for r, (p0, p1) in enumerate(runs):
            lo, hi = int(ends[p0]), int(ends[p1])
            placed = np.cumsum(counts[p0:p1]) - counts[p0:p1]  # next free row of each partition
            for j, hit in enumerate(spills):
                c0, c1 = int(starts[j, 2 * r]), int(starts[j, 2 * r + 1])
                if c1 == c0:
                    continue
                mine = parts[j * chunk:(j + 1) * chunk]
                cnt = np.bincount(mine[(mine >= p0) & (mine < p1)] - p0, minlength=p1 - p0)
                read_rows(hit, stage[: c1 - c0], c0)
                # this chunk's rows of each partition follow the earlier chunks' rows of it
                dest = np.repeat(placed - (np.cumsum(cnt) - cnt), cnt) + np.arange(c1 - c0)
                out[dest] = stage[: c1 - c0]
                placed += cnt
            sel = order[lo:hi]
            rel, size = write_codes(root, name, row_ids[sel], parts[sel], out[: hi - lo], durable=False,
                                    norms=code_norms(out[: hi - lo]) if norms else None)
            files.append((rel, size))
            synced.append(syncer.submit(fsync_path, os.path.join(root, rel)))
            if pool is not None:
                pool.release_unused()  # give pyarrow's freed pages back now, not at its leisure
            advance(hi - lo)
        for done in synced:
            done.result()
    return files


def assign_rows(root: str, name: str, source: Any, positions: np.ndarray, row_ids: np.ndarray,
                centroids: np.ndarray, dim: int, code_dim: int, metric: str, backend: Any,
                budget: MemoryBudget, show: bool | None = None, kind: str = "float",
                ranges: np.ndarray | None = None, spill: Spill | None = None,
                raw: bool = False, soar: float | None = None) -> list[tuple[str, int]]:
    """Assign the rows at ``positions`` (ascending; their ``row_ids``) to ``centroids`` and write
    their codes in partition order; the ``(path, bytes)`` of each codes file written. ``spill``
    (default: :func:`delta_spill`) keeps the finished chunks for a re-run; the caller removes it
    after the commit. ``raw``: float codes that are the rows as stored (:func:`encode`), with
    their norms for cosine; ``soar``: SOAR's lambda, each row written to a second partition too
    (:mod:`embtools.index.soar`)."""
    n = len(positions)
    copies = 1 if soar is None else 2
    if spill is None:
        spill = delta_spill(root, name, positions, row_ids, centroids, code_dim, metric, kind,
                            budget, ranges, raw, soar)
    with progress((1 + copies) * n, f"index {name}: assigning and writing rows", enabled=show,
                  unit="rows") as advance:
        parts, spills, chunk = _assign_chunks(spill, source, positions, centroids, dim, code_dim,
                                              metric, kind, ranges, backend, budget, advance, raw, soar)
        _trim_heap()  # the batches' buffers, freed, go back before pyarrow's pages come
        return _write_runs(root, name, parts, row_ids, spills, chunk, len(centroids), kind,
                           code_dim, budget, advance, raw and metric == "cosine", copies)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data).hexdigest()[:16]


def delta_spill(root: str, name: str, positions: np.ndarray, row_ids: np.ndarray,
                centroids: np.ndarray, code_dim: int, metric: str, kind: str,
                budget: MemoryBudget, ranges: np.ndarray | None = None, raw: bool = False,
                soar: float | None = None) -> Spill:
    """The spill of :func:`assign_rows` for these rows and centroids (and the cap)."""
    return Spill(os.path.join(root, INDEX_DIR, name),
                 Spill.key(rows=_digest(positions), ids=_digest(row_ids), centroids=_digest(centroids),
                           code_dim=code_dim, metric=metric, kind=kind, cap=budget.cap_bytes,
                           ranges=None if ranges is None else _digest(ranges), raw=raw,
                           **({} if soar is None else {"soar": soar})))


def build_index(root: str, snapshot: Any, backend: Any, budget: MemoryBudget, *, dimension: int,
                metric: str, code_dim: int, codes: str, partitions: int | None,
                sample_rows: int | None, iterations: int = DEFAULT_ITERATIONS,
                show: bool | None = None, soar: float | None = None) -> IndexEntry:
    """Train and write the index of ``snapshot``'s rows (files fsynced, nothing committed; the
    entry's ``info["build"]`` names the spills :func:`finish_build` removes after the commit)."""
    n = int(snapshot.num_rows)
    name = index_name(dimension, metric)
    raw = raw_codes(codes, code_dim, dimension)
    p = default_partitions(n) if partitions is None else min(int(partitions), n)
    want = default_sample_rows(n, p) if sample_rows is None else min(int(sample_rows), n)
    want = max(want, p)
    rng = np.random.default_rng(0)
    positions = np.arange(n, dtype=np.int64)
    row_ids = snapshot.metadata().select("row_id").collect()["row_id"].to_numpy().astype(np.int64)
    if len(row_ids) != n:
        raise CorruptStoreError(f"{root}: {len(row_ids)} row ids for {n} rows")
    folder = os.path.join(root, INDEX_DIR, name)
    os.makedirs(folder, exist_ok=True)
    key = f"index/build/{id(snapshot)}"
    rows_held = min(want, n)
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
    spill = Spill(folder, Spill.key(version=int(snapshot.version),
                                    files=[f.path for f in snapshot.manifest.files], rows=n,
                                    dimension=dimension, metric=metric, partitions=p,
                                    sample_rows=rows_held, iterations=iterations, codes=codes,
                                    code_dim=code_dim, cap=budget.cap_bytes, raw=raw,
                                    **({} if soar is None else {"soar": soar})))
    centroids = spill.load("centroids", np.float32, (p, dimension))
    ranges = spill.load("ranges", np.float32, (2, code_dim)) if codes == "int8" else None
    if centroids is None or not np.isfinite(centroids).all() or (codes == "int8" and ranges is None):
        with budget.holding(key, need, "the index training sample"):
            sample = _sample(snapshot, positions, dimension, rows_held, rng)
            ranges = code_ranges(sample[:, :code_dim], metric) if codes == "int8" else None
            with progress(iterations, f"index {name}: k-means on {len(sample):,} rows, {p} partitions",
                          enabled=show) as advance:
                centroids = train_centroids(sample, p, metric, backend, budget, iterations=iterations,
                                            advance=advance)
            del sample
        if ranges is not None:
            spill.save("ranges", ranges)
        spill.save("centroids", centroids)
        crash_point("after_index_centroids")
    c_path = write_centroids(root, name, centroids)
    written = [c_path]
    written += assign_rows(root, name, snapshot, positions, row_ids, centroids, dimension,
                           code_dim, metric, backend, budget, show, codes, ranges, spill, raw, soar)
    fsync_dir(folder)
    crash_point("after_index_files")
    info = {"codes": codes, "code_dim": code_dim, "partitions": len(centroids), "rows": n,
            "built_version": int(snapshot.version), "sample_rows": int(rows_held),
            "iterations": iterations, "delta_rows": 0, "build": spill.prefix[6:-1], "raw_codes": raw,
            **({} if soar is None else {"soar_lambda": soar}),
            **({} if ranges is None else {"int8_ranges": ranges.tolist()})}
    return IndexEntry(name, dimension, metric, [f for f, _ in written], [b for _, b in written],
                      [f.path for f in snapshot.manifest.files], info)


def finish_build(root: str, name: str, key: Any) -> None:
    """Remove the spill files of the build ``key`` (an entry's ``info["build"]``) once its
    version is committed."""
    if isinstance(key, str) and key.isalnum():
        Spill(os.path.join(root, INDEX_DIR, name), key).remove()


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
