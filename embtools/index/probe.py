"""An IVF index opened for one committed version: probing partitions and shortlisting rows.

:class:`IvfIndex` reads the index's centroids and the row ids of its codes files, and maps each
indexed row id to its position in the version it serves (row ids are stable across deletes and
compaction): rows deleted since the build map to -1 and are never returned, and rows of the
version that the index does not hold (added after it) are listed in ``uncovered`` for the exact
search. It implements :class:`embtools.search.ivf.IndexProbe`.

:meth:`IvfIndex.shortlist` scores each query against the centroids, takes its ``nprobe`` nearest
partitions (more when those hold fewer than ``k`` live rows), and groups the (query, partition)
pairs by partition, so each partition's codes (a zero-copy slice of a mapped codes file) are read
once per query group and scored against all the queries that probe it with one matrix product.

Float codes of the search dimension are the rows as stored (cosine indexes keep each row's float64
norm beside them; the scans multiply by its float32 inverse): :meth:`IvfIndex.rerank_whole`
re-ranks a shortlist from them with the exact re-rank's bits, reading nothing from the data files.
Without a memory cap, int8 codes of the search dimension re-rank theirs from the rows of the mapped
data files in the same compiled calls (:meth:`IvfIndex.searches_whole`).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from embtools.errors import CorruptStoreError, InvalidArgumentError
from embtools.index.files import CodesFile, raw_codes, read_centroids
from embtools.index.soar import check_soar_lambda
from embtools.kernels.codes import CODE_SHIFT, decode_int8, int8_steps, pack_codes
from embtools.kernels.hamming import sign_scores
from embtools.kernels.jit import jit_kernels
from embtools.kernels.threads import ForkSafePool, one_blas_thread
from embtools.memory import MemoryBudget
from embtools.search.refine import float64_queries, unit_queries
from embtools.storage.manifest import IndexEntry

__all__ = ["IvfIndex", "default_nprobe"]

#: Threads scoring partitions of a batch (each runs single-threaded BLAS on small products).
_THREADS = max(1, min(4, os.cpu_count() or 1))
_POOL = ForkSafePool(_THREADS, "embtools-probe")
#: Batches whose probes hit a partition fewer than this many times on average are shortlisted one
#: query at a time (a gemv per probed partition into one flat score vector): grouping queries by
#: partition pays only when a partition's codes are scored against several queries at once
#: (measured: one at a time is 2-4x faster up to ~100 queries of 16 probes in 1,265 partitions).
GROUP_MIN_SHARE = 2.0
#: Batches of at least this many queries are split over the threads by the compiled shortlist.
JIT_SPLIT_QUERIES = 8
#: Indexes of at least this many partitions pick a query's partitions by :meth:`IvfIndex._screened`
#: (a batch's by :meth:`IvfIndex._screened_batch`: uint8 codes of the centroids first) when it
#: probes at most one in ``SCREEN_SHARE`` of them; others score every centroid in float32. On
#: MiniLM's 885 x 384 centroids at nprobe 16 a single query's pick took 14 us against 30 us for
#: the float32 scores and selection, and 500 queries' 4.9 ms against 5.7-6.8 ms.
SCREEN_CENTROIDS = 256
SCREEN_SHARE = 32
#: Fewer queries whose probes hold at least this many rows have them scanned by two threads.
JIT_SPLIT_ROWS = 4096
#: A few queries of a raw-codes index whose probes hold about this many rows or fewer (on average:
#: ``nprobe`` partitions of the mean size) are searched in one compiled call (one thread), more
#: by the steps (their scan split over two threads): measured on MiniLM, 885 partitions, one
#: query: ~7k rows scanned took 745-980 us in one call against 850-1030 us split, ~22k rows
#: 2.3-2.9 ms against 1.9-2.0 ms.
ONE_CALL_ROWS = 12288


def _split(cum_work: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges of items with about equal work (``cum_work``: cumulative)."""
    n = len(cum_work)
    if parts <= 1 or n == 0:
        return [(0, n)]
    cuts = np.searchsorted(cum_work, cum_work[-1] * np.arange(1, parts) / parts)
    edges = [0, *sorted({int(c) for c in cuts if 0 < c < n}), n]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _first_of_each(cand: np.ndarray, width: int) -> np.ndarray:
    """``(m, width)``: each row of positions ``cand`` in its order with a position's second
    appearance (SOAR's second copy of a row) and -1 dropped, cut to ``width`` and padded with -1."""
    out = np.full((len(cand), width), -1, np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        keep = row[np.sort(np.unique(row, return_index=True)[1])][:width]
        out[i, :len(keep)] = keep
    return out


def default_nprobe(partitions: int) -> int:
    """Partitions probed by default: about ``sqrt(partitions)``, at least 8 (all when fewer)."""
    return int(min(partitions, max(8, round(math.sqrt(partitions)))))


class IvfIndex:
    """The index ``entry`` of ``snapshot`` (a :class:`~embtools.storage.snapshot.Snapshot`)."""

    def __init__(self, snapshot: Any, entry: IndexEntry, budget: MemoryBudget,
                 row_ids: np.ndarray) -> None:
        root = snapshot.root
        info = entry.info
        self.entry = entry
        self.name = entry.name
        self.dimension = entry.dimension
        self.metric = entry.metric
        self.partitions = int(info["partitions"])
        self.code_dim = int(info["code_dim"])
        self.codes = str(info.get("codes", "float"))
        self.kind = self.codes if self.codes in ("int8", "binary") else "float"
        try:
            #: SOAR's lambda: each row is in two partitions (None: in one; :mod:`embtools.index.soar`)
            self.soar = check_soar_lambda(info.get("soar_lambda"))
        except InvalidArgumentError:
            raise CorruptStoreError(f"index {self.name}: soar_lambda {info.get('soar_lambda')!r}") from None
        #: entries per row: a partition's live entries of ``copies * k`` hold ``k`` rows
        self.copies = 1 if self.soar is None else 2
        self.default_refine = {"int8": 2, "binary": 10}.get(
            self.kind, 1 if self.code_dim >= self.dimension else 10)
        #: float codes of the full dimension are the rows as stored (unit rows of cosine indexes
        #: built before ``raw_codes``): a shortlist is re-ranked from them (:meth:`rerank_whole`)
        self.raw = raw_codes(self.codes, self.code_dim, self.dimension) and (
            self.metric != "cosine" or bool(info.get("raw_codes", False)))
        ranges = info.get("int8_ranges")
        self.ranges = None if ranges is None else np.asarray(ranges, np.float32)
        if self.kind == "int8" and (self.ranges is None or self.ranges.shape != (2, self.code_dim)):
            raise CorruptStoreError(f"index {self.name}: int8 codes without their ranges")
        self._int8 = self._int8_terms(self.ranges) if self.kind == "int8" and self.ranges is not None else None
        self.budget = budget
        self._source = snapshot  # the data files an int8 shortlist is re-ranked from (:meth:`_row_tables`)
        self.centroids = read_centroids(os.path.join(root, entry.files[0]), entry.file_bytes[0],
                                        self.dimension, self.partitions)
        self._c_sq = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self.files: list[CodesFile] = []
        try:
            for rel, size in zip(entry.files[1:], entry.file_bytes[1:], strict=True):
                self.files.append(CodesFile(os.path.join(root, rel), size, self.partitions, self.code_dim))
                width = (self.code_dim + 7) // 8 if self.kind == "binary" else self.code_dim
                codes = self.files[-1].codes
                if codes.ndim != 2 or codes.shape[1] != width:  # the compiled scans read this many
                    raise CorruptStoreError(f"index {self.name}: {rel} holds codes of shape "
                                            f"{codes.shape}, not {width} per row")
        except BaseException:
            self.close()
            raise
        n = len(row_ids)
        covered = np.zeros(n, bool)
        self.positions: list[np.ndarray] = []
        self.live_counts = np.zeros(self.partitions, np.int64)
        self.total_counts = np.zeros(self.partitions, np.int64)
        self._sq: list[np.ndarray | None] = []
        self._inv: list[np.ndarray | None] = []  # raw cosine codes: each row's inverse norm
        #: raw codes: each position's row in the codes (``file << CODE_SHIFT | row``; -1: none)
        self._where = np.full(n if self.raw else 0, -1, np.int64)
        for fi, f in enumerate(self.files):
            pos = np.searchsorted(row_ids, f.row_ids)
            pos = np.minimum(pos, max(n - 1, 0))
            ok = (row_ids[pos] == f.row_ids) if n else np.zeros(len(pos), bool)
            covered[pos[ok]] = True
            self.positions.append(np.where(ok, pos, -1))
            if self.raw:
                self._where[pos[ok]] = (fi << CODE_SHIFT) | np.flatnonzero(ok)
            sizes = np.diff(f.starts)
            self.total_counts += sizes
            part_of_row = np.repeat(np.arange(self.partitions), sizes)
            self.live_counts += np.bincount(part_of_row[ok], minlength=self.partitions)
            if self.metric == "l2":
                block = self._decode(f.codes)
                self._sq.append(np.einsum("ij,ij->i", block, block))
            else:
                self._sq.append(None)
            if self.raw and self.metric == "cosine":
                if f.norms is None:
                    raise CorruptStoreError(f"index {self.name}: {f.path} holds raw codes without their norms")
                with np.errstate(divide="ignore"):
                    self._inv.append(np.where(f.norms > 0, 1 / f.norms, 1.0).astype(np.float32))
            else:
                self._inv.append(None)
        # the float32 error bound of :meth:`_certified` holds for rows of norms in this range
        self._bounded = all(v is None or (float(v.min(initial=1)) >= 1e-15 and float(v.max(initial=1)) <= 1e15)
                            for v in self._inv)
        self._tables: Any = None  # the codes as the compiled searches read them (:meth:`_code_lists`)
        # which codes files hold rows of each partition ((partitions, files) bool): a scan skips
        # the files without rows in the probed partitions (each compiled call costs ~10 us)
        self._part_files = np.zeros((self.partitions, len(self.files)), bool)
        for fi, f in enumerate(self.files):
            self._part_files[:, fi] = np.diff(f.starts) > 0
        self.uncovered = np.flatnonzero(~covered).astype(np.int64)
        self.uncovered.setflags(write=False)
        self.live_rows = int(covered.sum())
        self._live_total = int(self.live_counts.sum())
        self._largest = np.cumsum(np.sort(self.total_counts)[::-1])
        self._code_bytes = sum(f.nbytes for f in self.files)
        self._touched = 0
        self._part_of: np.ndarray | None = None
        #: uint8 codes of the centroids for :meth:`_screened` (codes, start, step, error, max |c|)
        self._coarse: tuple[np.ndarray, ...] | None = None
        #: the same codes as :meth:`_screened_batch` reads them (:func:`~embtools.kernels.codes.pack_codes`)
        self._packed: np.ndarray | None = None
        #: what a shortlist is re-ranked from in one compiled call (:meth:`_row_tables`; False: none)
        self._rows: tuple[Any, ...] | bool | None = None

    # -- sizes ------------------------------------------------------------------------------------
    def default_nprobe(self) -> int:
        return default_nprobe(self.partitions)

    def resident_bytes(self) -> int:
        """Bytes this object keeps (centroids, positions, row ids, norms, codes decoded into
        memory where the file cannot be mapped)."""
        return int(self.centroids.nbytes + sum(p.nbytes * 2 for p in self.positions)
                   + self._part_files.nbytes + self._where.nbytes
                   + sum(0 if v is None else v.nbytes * 3 for v in self._inv)  # and the norms
                   + self.uncovered.nbytes + sum(0 if s is None else s.nbytes for s in self._sq)
                   + sum(f.nbytes for f in self.files if f.copied)
                   + (0 if self._part_of is None else self._part_of.nbytes)
                   + (self._rows[0].nbytes if isinstance(self._rows, tuple) and self._rows[0] is not self._where else 0)
                   + (0 if self._coarse is None else sum(a.nbytes for a in self._coarse))
                   + (0 if self._packed is None else self._packed.nbytes))

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 rows of a block of codes (int8: the bucket centres; float: as they are)."""
        if self.kind == "int8":
            assert self.ranges is not None
            return decode_int8(codes.view(np.int8), self.ranges)
        return codes

    def _rows_bound(self, nprobe: int) -> int:
        """The most rows ``nprobe`` partitions can hold."""
        if not len(self._largest):
            return 0
        return int(self._largest[min(nprobe, len(self._largest)) - 1])

    def workspace_bytes(self, nq: int, nprobe: int, width: int) -> int:
        rows = self._rows_bound(nprobe)
        codes = min(self._code_bytes, nq * rows * self.code_dim * 4)
        return int(nq * (self.partitions * 8 + rows * 20 + width * 24) + codes)

    # -- probing ----------------------------------------------------------------------------------
    def _queries(self, queries: np.ndarray, dim: int) -> np.ndarray:
        """The float32 queries as the probe scores them (a copy: unit length for cosine, as the
        compiled single-query search makes them)."""
        if self.metric == "cosine":
            return unit_queries(queries, dim)
        return np.array(queries[:, :dim], dtype=np.float32, order="C")

    def partition_of(self) -> np.ndarray:
        """The partition of each row of the version (int32; -1: not in the index), built on the
        first filtered search and kept (4 bytes a row)."""
        if self._part_of is None:
            n = len(self.uncovered) + self.live_rows
            out = np.full(n, -1, np.int32)
            for f, pos in zip(self.files, self.positions, strict=True):
                parts = np.repeat(np.arange(self.partitions, dtype=np.int32), np.diff(f.starts))
                ok = pos >= 0
                out[pos[ok]] = parts[ok]
            out.setflags(write=False)
            self._part_of = out
        return self._part_of

    def selection(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, counts)`` of a filter's selected ``positions``: a bool mask over the version's
        rows with one more, False, entry (so that position -1, a deleted row, reads False) and
        the selected live rows of each partition."""
        part_of = self.partition_of()
        mask = np.zeros(len(part_of) + 1, bool)
        mask[positions] = True
        parts = part_of[positions]
        counts = np.bincount(parts[parts >= 0], minlength=self.partitions).astype(np.int64)
        return mask, counts

    def probes(self, queries: np.ndarray, kk: int, nprobe: int,
               counts: np.ndarray | None = None, jit: Any = None,
               prepared: np.ndarray | None = None) -> list[np.ndarray]:
        """The partitions each query probes: its ``nprobe`` nearest centroids, and more until they
        hold ``kk`` live rows (``counts``: live rows of each partition that may be returned; default
        every live row). ``jit``: the compiled kernels, which select the nearest in one pass.
        ``prepared``: ``queries`` as the probe scores them (``self._queries(queries, dimension)``),
        when the caller has them already."""
        q = self._queries(queries, self.dimension) if prepared is None else prepared
        p = self.partitions
        live = self.live_counts if counts is None else counts
        need = min(kk * self.copies, self._live_total) if counts is None else min(kk, int(live.sum()))
        few = jit is not None and len(q) < JIT_SPLIT_QUERIES
        if few and self._screens(nprobe):
            picked = [self._screened(jit, v, nprobe) for v in q]
        elif not few and jit is not None and jit.FAST_BATCH_SCREEN and self._screens(nprobe):
            picked = list(self._screened_batch(jit, q, nprobe))
        else:
            picked = None
        if picked is not None and all(int(live[t].sum()) >= need for t in picked):
            return picked
        if few:  # a few queries: no BLAS call
            scores = np.empty((len(q), p), np.float32)
            jit.centroid_scores(q, self.centroids, scores)
        else:
            scores = q @ self.centroids.T
        if self.metric == "l2":
            scores = 2 * scores - self._c_sq[None, :]
        if nprobe >= p:
            top = np.broadcast_to(np.arange(p), (len(q), p))
        else:
            top = (np.argpartition(-scores, nprobe - 1, axis=1)[:, :nprobe] if jit is None
                   else jit.top_columns(np.ascontiguousarray(scores, dtype=np.float32), nprobe))
        out = list(top)
        for i in np.flatnonzero(live[top].sum(axis=1) < need).tolist():
            order = np.argsort(-scores[i], kind="stable")
            reach = np.searchsorted(np.cumsum(live[order]), need) + 1
            out[i] = order[:max(nprobe, int(reach))]
        return out

    def _screens(self, nprobe: int) -> bool:
        """Whether queries probing ``nprobe`` partitions pick them by :meth:`_screened` (a batch
        by :meth:`_screened_batch`, on CPUs with AVX-512 VNNI)."""
        p = self.partitions
        return self.metric != "l2" and p >= SCREEN_CENTROIDS and nprobe * SCREEN_SHARE <= p

    def _coarse_codes(self) -> tuple[np.ndarray, ...]:
        """uint8 codes of the centroids (per-dimension buckets over their range), built on first
        use and kept: ``(codes, minima, steps, largest error, largest |centroid|)`` per dimension
        (the last two float64). The codes' rows are padded with zeros to a multiple of 64 bytes
        (whole blocks for :func:`~embtools.kernels.code_sums_jit.code_sums`)."""
        if self._coarse is None:
            c = self.centroids.astype(np.float64)
            lo, hi = c.min(axis=0), c.max(axis=0)
            step = np.where(hi > lo, (hi - lo) / 255, 1.0).astype(np.float32)
            lo32 = lo.astype(np.float32)
            codes = np.clip(np.rint((c - lo32) / step), 0, 255)
            err = np.abs(c - (lo32 + codes * step.astype(np.float64))).max(axis=0)
            padded = np.zeros((len(c), -(-c.shape[1] // 64) * 64), np.uint8)
            padded[:, :c.shape[1]] = codes
            self._coarse = (padded, lo32, step, err, np.abs(c).max(axis=0))
        return self._coarse

    def _screened(self, jit: Any, q: np.ndarray, nprobe: int) -> np.ndarray:
        """Query ``q``'s ``nprobe`` nearest centroids by their float32 products, best first (ties
        to the lower partition), through :func:`~embtools.kernels.ivf_jit.screened_centroids`:
        scored from uint8 codes of the centroids (a quarter of their bytes, which a query's
        other reads push out of the cache) against int16 weights, then exactly within a certified
        margin (:func:`~embtools.kernels.ivf_jit.screen_terms`)."""
        codes, lo, step, err, cmax = self._coarse_codes()
        v, scale, margin = jit.screen_terms(q, lo, step, err, cmax)
        top: np.ndarray = jit.screened_centroids(q, v, scale, codes, margin, self.centroids, nprobe)
        return top

    def _screened_batch(self, jit: Any, q: np.ndarray, nprobe: int) -> np.ndarray:
        """:meth:`_screened` of each row of ``q`` (the same partitions), the codes' integer sums of
        a chunk of queries computed together (:func:`~embtools.kernels.ivf_jit.screened_batch`:
        on AVX-512 VNNI, 7 ms for 500 queries and 4,000 centroids of 384 dimensions against 16 ms
        for their float32 product on one core here)."""
        codes, lo, step, err, cmax = self._coarse_codes()
        if self._packed is None:
            self._packed = pack_codes(codes, self.dimension)
        top: np.ndarray = jit.screened_batch(q, lo, step, err, cmax, self._packed, self.centroids, nprobe)
        return top

    def shortlist(self, queries: np.ndarray, kk: int, nprobe: int, width: int,
                  positions: np.ndarray | None = None) -> np.ndarray:
        """See :meth:`embtools.search.ivf.IndexProbe.shortlist`; ``positions``: a filter's selected
        rows (ascending), the only ones returned (None: every row).

        Few queries for the partitions are shortlisted one at a time (a product per probed
        partition slice into one score vector); more are grouped by partition (each partition's
        codes scored once against every query of the batch that probes it)."""
        sel = None if positions is None else self.selection(positions)
        nq = len(queries)
        jit = jit_kernels("ivf_jit")
        if jit is not None:
            if nq < JIT_SPLIT_QUERIES:  # no product large enough for BLAS to thread
                return self._shortlist_jit(jit, queries, kk, nprobe, width, sel)
            with one_blas_thread():  # each thread runs its own small products
                return self._shortlist_jit(jit, queries, kk, nprobe, width, sel)
        with one_blas_thread():  # small products: BLAS threads only cost (a lot on a busy machine)
            probes = self.probes(queries, kk, nprobe, None if sel is None else sel[1])
            if nq * min(nprobe, self.partitions) >= GROUP_MIN_SHARE * self.partitions:
                return self._shortlist(queries, probes, width, sel)
            cq = self._queries(queries, self.code_dim)
            out = np.full((nq, width), -1, np.int64)
            for i in range(nq):
                scores, pos = self._block(probes[i], cq[i:i + 1], sel)
                best = self._best(scores, pos, width * self.copies)
                best = _first_of_each(best, width) if self.copies > 1 else best
                out[i, :best.shape[1]] = best
            return out

    def _shortlist_jit(self, jit: Any, queries: np.ndarray, kk: int, nprobe: int, width: int,
                       sel: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """The compiled shortlist (:mod:`embtools.kernels.ivf_jit`) into heaps of each query's
        best ``width`` rows, one pass over its probed partitions per codes file. A batch is split
        over two threads, each scoring its queries against the centroids (one BLAS thread),
        picking their partitions and scanning them; a few queries with many rows to scan have
        their partitions dealt to two threads, whose heaps are then merged."""
        nq = len(queries)
        cq = self._queries(queries, self.code_dim)
        counts = None if sel is None else sel[1]
        mask = np.zeros(0, bool) if sel is None else sel[0]
        hs, hi = jit.new_heaps(nq, width)

        def plan(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Partitions (padded with -1) and scan weights of queries ``a:b``."""
            same = self.code_dim == self.dimension  # the codes' queries are the probes' too
            probes = self.probes(queries[a:b], kk, nprobe, counts, jit, cq[a:b] if same else None)
            parts = np.full((b - a, max((len(x) for x in probes), default=0)), -1, np.int64)
            for i, x in enumerate(probes):
                parts[i, :len(x)] = x
            return (parts, *self._weights(jit, cq[a:b]))

        def run(a: int, b: int) -> int:
            parts, weights, c0 = plan(a, b)
            self._scan(jit, weights, c0, parts, mask, hs[a:b], hi[a:b])
            return int(self.total_counts[parts[parts >= 0]].sum())

        if nq >= JIT_SPLIT_QUERIES:
            half = nq // 2
            scored = sum(_POOL.get().map(lambda ab: run(*ab), [(0, half), (half, nq)]))
        else:
            parts, weights, c0 = plan(0, nq)
            scored = int(self.total_counts[parts[parts >= 0]].sum())
            if scored < JIT_SPLIT_ROWS:
                self._scan(jit, weights, c0, parts, mask, hs, hi)
            else:  # every other partition to a second thread, with heaps of its own
                hs2, hi2 = jit.new_heaps(nq, width)
                other = _POOL.get().submit(self._scan, jit, weights, c0, parts[:, 1::2], mask, hs2, hi2)
                self._scan(jit, weights, c0, parts[:, 0::2], mask, hs, hi)
                other.result()
                jit.merge_heaps(hs, hi, hs2, hi2)
        jit.sort_heaps(hs, hi)
        self._touched += scored * self.code_dim * 4
        self._release_if_needed()
        return self._certified(jit, hs, hi, kk)

    def _cut_error(self) -> float:
        """The certified error of a code's float32 score, for float codes of the full vectors
        (cosine; 0 for other indexes, whose shortlists are not cut): ``eps = (2d + 16) u``, the
        bound of :meth:`_certified`."""
        if (self.kind == "float" and self.code_dim == self.dimension and self.metric == "cosine"
                and self._bounded):
            return (2 * self.code_dim + 16) * 2.0**-24
        return 0.0

    def _certified(self, jit: Any, hs: np.ndarray, hi: np.ndarray, kk: int) -> np.ndarray:
        """The shortlist ``hi`` (scores ``hs``, best first) cut to the columns that can hold a
        row of a query's exact top ``kk``, for float codes of the full vectors (cosine): a code's
        float32 score is within ``eps = (2d + 16) u`` of the row's exact cosine (unit codes: the
        two roundings to unit length and the float32 product; raw codes: the query's rounding to
        unit length, the float32 product, the float32 inverse norm and the product with it, for
        rows of norms within 1e-15..1e15), so a row scoring more than ``2 eps`` below the
        ``kk``-th is below the exact scores of ``kk`` others and is not re-ranked. A batch keeps
        the widest query's cut (:func:`~embtools.kernels.ivf_jit.certified_width`, the rule a
        single query's compiled call applies)."""
        return hi[:, :jit.certified_width(hs, kk, self._cut_error())]

    def _scan(self, jit: Any, weights: np.ndarray, c0: np.ndarray, parts: np.ndarray, mask: np.ndarray,
              hs: np.ndarray, hi: np.ndarray) -> None:
        """Scan partitions ``parts`` of every codes file into the heaps ``hs, hi`` (one row per
        query, as ``weights``)."""
        none = np.zeros(0, np.float32)
        parts = np.ascontiguousarray(parts)
        holding = self._part_files[parts[parts >= 0]].any(axis=0)  # files with rows to scan
        if self.kind == "int8":
            v, scale = jit.int8_weights(weights)
        for fi in np.flatnonzero(holding).tolist():
            f = self.files[fi]
            sq, inv = self._sq[fi], self._inv[fi]
            sq = none if sq is None else sq
            if self.kind == "binary":
                jit.scan_signs(weights, parts, f.starts, f.codes, self.positions[fi], sq, mask, hs, hi)
            elif self.kind == "int8":
                jit.scan_int8(v, scale, c0, parts, f.starts, f.codes.view(np.int8), self.positions[fi], sq, mask,
                              hs, hi, none if inv is None else inv)
            else:
                jit.scan_dense(weights, c0, parts, f.starts, f.codes, self.positions[fi], sq, mask, hs, hi,
                               none if inv is None else inv)

    def _weights(self, jit: Any, cq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the compiled scans score codes with: ``(weights, c0)``, float codes ``cq`` and 0,
        int8 ``cq * step`` and ``q . (start + 128.5 step)`` (the bucket centres:
        :func:`~embtools.kernels.ivf_jit.scan_weights`), binary the nibble tables (and no
        constant)."""
        if self.kind == "binary":
            return jit.nibble_tables(cq, (self.code_dim + 7) // 8), np.zeros(0, np.float32)
        if self.kind == "int8":
            assert self._int8 is not None
            out: tuple[np.ndarray, np.ndarray] = jit.scan_weights(np.ascontiguousarray(cq), *self._int8)
            return out
        return cq, np.zeros(len(cq), np.float32)

    @staticmethod
    def _int8_terms(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int8 codes' per-dimension steps and the bucket centres of code 0 (float32) for their
        ``ranges``: a code ``c`` (-128..127) stands for ``centers + c * steps``, scored as
        ``q . centers + (q * steps) . c`` (:func:`~embtools.kernels.codes.int8_steps`)."""
        starts, steps = int8_steps(ranges)
        return steps.astype(np.float32), (starts + np.float32(128.5) * steps).astype(np.float32)

    def _block(self, parts: np.ndarray, cq: np.ndarray,
               sel: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(rows, m)`` of the rows of partitions ``parts`` (in every codes file) against
        the codes queries ``cq`` ``(m, code_dim)``, one product per partition slice of the mapped
        codes, and the rows' positions; rows that may not be returned score -inf."""
        m = len(cq)
        if self.kind == "int8":  # score the bucket centres: codes @ (q * step) + q . (start + 128.5 step)
            assert self._int8 is not None
            steps, centers = self._int8
            w = np.ascontiguousarray((cq * steps).T, dtype=np.float32)
            c0 = (cq @ centers).astype(np.float32)
        else:
            w, c0 = np.ascontiguousarray(cq.T), None
        total = int(self.total_counts[parts].sum())
        scores = np.empty((total, m), np.float32)
        pos = np.empty(total, np.int64)
        sq = np.empty(total, np.float32) if self.metric == "l2" else None
        inv = np.empty(total, np.float32) if self._inv and self._inv[0] is not None else None
        at = 0
        for fi, f in enumerate(self.files):
            codes, rows_pos, rows_sq, rows_inv = f.codes, self.positions[fi], self._sq[fi], self._inv[fi]
            for s, e in zip(f.starts[parts].tolist(), f.starts[parts + 1].tolist(), strict=True):
                if s == e:
                    continue
                b = at + e - s
                if self.kind == "binary":
                    scores[at:b] = sign_scores(cq, codes[s:e], self.code_dim).T
                elif self.kind == "int8":
                    np.dot(codes[s:e].view(np.int8).astype(np.float32), w, out=scores[at:b])
                else:
                    np.dot(codes[s:e], w, out=scores[at:b])
                pos[at:b] = rows_pos[s:e]
                if sq is not None and rows_sq is not None:
                    sq[at:b] = rows_sq[s:e]
                if inv is not None and rows_inv is not None:
                    inv[at:b] = rows_inv[s:e]
                at = b
        self._touched += total * self.code_dim * 4
        self._release_if_needed()
        if c0 is not None:
            scores += c0[None, :]
        if sq is not None:
            scores *= 2
            scores -= sq[:, None]
        if inv is not None:
            scores *= inv[:, None]
        scores[pos < 0 if sel is None else ~sel[0][pos]] = -np.inf
        return scores, pos

    @staticmethod
    def _best(scores: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
        """``(m, w)`` positions of the best ``w = min(width, rows)`` rows of each column of
        ``scores``, best first, -1 for rows scored -inf."""
        total = len(scores)
        if total > width:
            pick = np.argpartition(-scores, width - 1, axis=0)[:width]
            s = np.take_along_axis(scores, pick, axis=0)
        else:
            pick = np.broadcast_to(np.arange(total)[:, None], scores.shape)
            s = scores
        order = np.argsort(-s, axis=0, kind="stable")
        s = np.take_along_axis(s, order, axis=0)
        out = pos[np.take_along_axis(pick, order, axis=0)].T
        out[np.isneginf(s.T)] = -1
        return out

    def _shortlist(self, queries: np.ndarray, probes: list[np.ndarray], width: int,
                   sel: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """(query, partition) pairs grouped by partition: each partition's codes scored once
        against every query that probes it, scattered into per-query buffers."""
        nq = len(queries)
        mask = None if sel is None else sel[0]
        cq = self._queries(queries, self.code_dim)
        qi = np.repeat(np.arange(nq), [len(x) for x in probes])
        pi = np.concatenate(probes).astype(np.int64) if probes else np.zeros(0, np.int64)
        size = self.total_counts[pi]
        # each (query, partition) pair's columns in its query's row of the buffers
        ends = np.cumsum(size)
        first = np.r_[0, np.cumsum([len(x) for x in probes])][:-1]
        base = ends - size - np.repeat(ends[first] - size[first], [len(x) for x in probes])
        cols = int(np.bincount(qi, weights=size, minlength=nq).max()) if nq else 0
        buf_s = np.full((nq, max(cols, 1)), -np.inf, np.float32)
        buf_p = np.full((nq, max(cols, 1)), -1, np.int64)
        order = np.argsort(pi, kind="stable")
        qi, pi, base = qi[order], pi[order], base[order]
        cuts = np.flatnonzero(np.r_[True, pi[1:] != pi[:-1]]) if len(pi) else np.zeros(0, np.int64)
        bounds = np.r_[cuts, len(pi)]
        work = (np.diff(bounds) * self.total_counts[pi[cuts]]) if len(cuts) else np.zeros(0)
        halves = _split(np.cumsum(work), _THREADS if nq > 1 and len(cuts) > 16 else 1)

        def run(lo: int, hi: int) -> None:
            for j in range(lo, hi):
                part = int(pi[bounds[j]])
                qs = qi[bounds[j]:bounds[j + 1]]
                at0 = base[bounds[j]:bounds[j + 1]]
                self._score_partition(part, cq[qs], qs, at0, buf_s, buf_p, mask)

        if len(halves) == 1:
            run(0, len(cuts))
        else:
            list(_POOL.get().map(lambda ab: run(*ab), halves))
        self._touched += int(size.sum()) * self.code_dim * 4
        self._release_if_needed()
        w = min(width * self.copies, buf_s.shape[1])
        if buf_s.shape[1] > w:
            pick = np.argpartition(-buf_s, w - 1, axis=1)[:, :w]
        else:
            pick = np.broadcast_to(np.arange(w), (nq, w))
        s_pick = np.take_along_axis(buf_s, pick, axis=1)
        p_pick = np.take_along_axis(buf_p, pick, axis=1)
        best = np.argsort(-s_pick, axis=1, kind="stable")
        out = np.take_along_axis(p_pick, best, axis=1)
        out[np.take_along_axis(s_pick, best, axis=1) == -np.inf] = -1
        if self.copies > 1:
            return _first_of_each(out, width)
        if w < width:
            out = np.concatenate([out, np.full((nq, width - w), -1, np.int64)], axis=1)
        return out

    def _score_partition(self, part: int, sub: np.ndarray, qs: np.ndarray, at0: np.ndarray,
                         buf_s: np.ndarray, buf_p: np.ndarray, mask: np.ndarray | None) -> None:
        """Score partition ``part``'s rows (in every codes file) against the queries ``qs``
        (codes queries ``sub``) into their buffers, from column ``at0`` of each query on."""
        at = qs * buf_s.shape[1] + at0  # flat offsets of the queries' columns
        flat_s, flat_p = buf_s.reshape(-1), buf_p.reshape(-1)
        for fi, f in enumerate(self.files):
            s, e = int(f.starts[part]), int(f.starts[part + 1])
            if s == e:
                continue
            if self.kind == "binary":  # asymmetric: float queries against sign bits
                scores = sign_scores(sub, f.codes[s:e], self.code_dim)
            else:
                scores = sub @ self._decode(f.codes[s:e]).T  # (queries probing it, rows)
            if self.metric == "l2":
                sq = self._sq[fi]
                assert sq is not None
                scores = 2 * scores - sq[None, s:e]
            inv = self._inv[fi]
            if inv is not None:
                scores *= inv[None, s:e]
            pos = self.positions[fi][s:e]
            dead = pos < 0 if mask is None else ~mask[pos]
            if dead.any():
                scores[:, dead] = -np.inf
            cols = at[:, None] + np.arange(e - s)[None, :]
            flat_s[cols] = scores
            flat_p[cols] = pos[None, :]
            at = at + (e - s)

    # -- whole searches: probe, scan and re-rank in compiled calls ---------------------------------
    def searches_whole(self, dim: int, metric: str) -> bool:
        """See :meth:`embtools.search.ivf.IndexProbe.searches_whole`: float codes that are the rows
        as stored, or int8 codes of the full dimension with every data file mapped (no memory
        cap; the first call keeps a view of each, as a single search's re-rank does)."""
        if not (dim == self.dimension and metric == self.metric and self.files
                and jit_kernels("ivf_few_jit") is not None):
            return False
        return self.raw or (self.kind == "int8" and self.code_dim == self.dimension
                            and self._row_tables() is not None)

    def _code_lists(self) -> tuple[Any, ...]:
        """The codes files as the compiled searches read them
        (:func:`~embtools.kernels.ivf_few_jit.few_tables`), built on first use."""
        if self._tables is None:
            few = jit_kernels("ivf_few_jit")
            assert few is not None
            none32, none64 = np.zeros(0, np.float32), np.zeros(0)
            codes = [f.codes.view(np.int8) if self.kind == "int8" else f.codes for f in self.files]
            self._tables = few.few_tables(
                self._part_files, [f.starts for f in self.files], codes, self.positions,
                [none32 if v is None else v for v in self._sq], [none32 if v is None else v for v in self._inv],
                [none64 if f.norms is None else f.norms for f in self.files])
        return self._tables

    def _row_tables(self) -> tuple[Any, ...] | None:
        """``(where, rows, norms)``: what a shortlist is re-ranked from in compiled calls
        (:func:`~embtools.kernels.rerank_jit.code_top`): for raw float codes the codes; for int8
        codes the data files' rows as kept views of the mapped files
        (:meth:`~embtools.storage.snapshot.Snapshot.row_views`; their norms computed as needed),
        each position's ``chunk << CODE_SHIFT | row`` in them (8 bytes a row), built on first use;
        None where there are none (a memory cap, files not mapped)."""
        if self._rows is None:
            rows: tuple[Any, ...] | bool = False
            if self.raw:
                lists = self._code_lists()
                rows = (self._where, lists[2], lists[6])
            elif self.kind == "int8" and hasattr(self._source, "row_views"):
                got = self._source.row_views(self.dimension)  # a damaged file raises here, each time
                if got is not None:
                    rows = self._data_rows(*got)
            self._rows = rows
        return self._rows if isinstance(self._rows, tuple) else None

    def _data_rows(self, starts: np.ndarray, views: list[np.ndarray]) -> tuple[Any, ...] | bool:
        """:meth:`_row_tables` of the data files' chunks (first positions ``starts``, rows ``views``)."""
        jit = jit_kernels("rerank_jit")
        n = len(self.uncovered) + self.live_rows
        sizes = np.diff(np.r_[starts, n])
        if jit is None or any(len(v) != z for v, z in zip(views, sizes.tolist(), strict=True)):
            return False
        chunk = np.repeat(np.arange(len(views), dtype=np.int64), sizes)
        where = (chunk << CODE_SHIFT) | (np.arange(n, dtype=np.int64) - np.repeat(starts, sizes))
        return (where, *jit.code_tables(views, [np.zeros(0)] * len(views)))

    def top_whole(self, queries: np.ndarray, kk: int, nprobe: int, width: int,
                  positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`embtools.search.ivf.IndexProbe.top_whole`. A few queries run in one
        compiled call (:func:`~embtools.kernels.ivf_few_jit.search_few`), or, for float codes
        whose probes hold many rows, in three (probe, the scan split over two threads, merge and
        re-rank); a query whose partitions hold fewer than ``kk`` rows, and a batch, are
        shortlisted (:meth:`shortlist`, which probes further where needed and scans each codes
        file for all the batch's queries at once, so a file's rows stay in cache between
        queries) and re-ranked (:meth:`rerank_whole`)."""
        nq = len(queries)
        if nq >= JIT_SPLIT_QUERIES:  # each codes file scanned for the whole group (its rows stay in cache)
            cand = self.shortlist(queries, kk, nprobe, width, positions)
            return self.rerank_whole(float64_queries(queries, self.dimension, self.metric), cand, kk)
        few = jit_kernels("ivf_few_jit")
        assert few is not None  # searches_whole said so
        sel = None if positions is None else self.selection(positions)
        asked = np.ascontiguousarray(queries[:, :self.dimension], dtype=np.float32)
        args = self._one_call_args(few, nq, kk, nprobe, width, sel)
        if args is not None:
            s, p, done, scanned = few.search_with(asked, args)
        else:  # many rows of float codes: every other partition scanned by a second thread
            screen, live, need, mask = self._probe_inputs(kk, nprobe, sel)
            tables = self._code_lists()
            q, q64 = few.prepared_queries(asked, self.metric)
            parts, done = few.probe_few(q, self.centroids, screen, nprobe, live, need, self.metric, self._c_sq)
            other = _POOL.get().submit(few.scan_few, q, parts[:, 1::2], tables, mask, width)
            hs, hi, scanned = few.scan_few(q, parts[:, 0::2], tables, mask, width)
            hs2, hi2, scanned2 = other.result()
            scanned += scanned2
            s, p = few.finish_few([(hs, hi), (hs2, hi2)], q64, kk, tables, self._where, self.metric,
                                  self._cut_error())
        self._note_scanned(int(scanned))
        if not done.all():  # probes widened until they hold kk rows
            rest = np.flatnonzero(~done)
            cand = self.shortlist(queries[rest], kk, nprobe, width, positions)
            s[rest], p[rest] = self.rerank_whole(float64_queries(queries[rest], self.dimension, self.metric),
                                                 cand, kk)
        return s, p

    def _one_call_args(self, few: Any, nq: int, kk: int, nprobe: int, width: int,
                       sel: tuple[np.ndarray, np.ndarray] | None) -> Any:
        """The arguments after the queries of :meth:`top_whole`'s single compiled call for ``nq``
        queries (:func:`~embtools.kernels.ivf_few_jit.search_args`; ``sel``: a filter's mask and
        live rows per partition), or None where it splits the scan over two threads instead
        (float codes whose probes hold many rows)."""
        int8 = self.kind == "int8"
        if not int8 and nq * min(nprobe, self.partitions) * self._live_total > ONE_CALL_ROWS * max(1, self.partitions):
            return None
        rows = self._row_tables()
        assert rows is not None  # searches_whole said so
        screen, live, need, mask = self._probe_inputs(kk, nprobe, sel)
        return few.search_args(self.centroids, screen, nprobe, live, need, self._code_lists(), rows[0], mask,
                               width, kk, self.metric, self._cut_error(), self.dimension, self._c_sq,
                               self._int8 if int8 else None, rows[1:])

    def _probe_inputs(self, kk: int, nprobe: int, sel: tuple[np.ndarray, np.ndarray] | None
                      ) -> tuple[tuple[np.ndarray, ...] | None, np.ndarray, int, np.ndarray]:
        """What the compiled probe of a few queries takes: the centroid screen (None: every
        centroid scored), the live rows per partition, the rows the probes must hold (``kk``, or
        fewer where fewer are live; twice as many entries of a SOAR index, whose rows are in two
        partitions) and the filter's mask (empty: every live row)."""
        live = self.live_counts if sel is None else sel[1]
        need = min(kk * self.copies, self._live_total) if sel is None else min(kk, int(live.sum()))
        mask = np.zeros(0, bool) if sel is None else sel[0]
        return self._coarse_codes() if self._screens(nprobe) else None, live, need, mask

    def whole_search(self, kk: int, nprobe: int, width: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None] | None:
        """See :meth:`embtools.search.ivf.IndexProbe.whole_search`: :meth:`top_whole`'s single
        compiled call for one unfiltered query with its arguments bound once; None where
        :meth:`top_whole` would split the scan (or the kernels are off)."""
        few = jit_kernels("ivf_few_jit")
        if few is None or not self.searches_whole(self.dimension, self.metric):
            return None
        args = self._one_call_args(few, 1, kk, nprobe, width, None)
        if args is None:
            return None
        search, dim = few.search_with, self.dimension

        def call(q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
            s, p, done, scanned = search(np.ascontiguousarray(q[:, :dim], dtype=np.float32), args)
            self._note_scanned(int(scanned))
            return (s, p) if done[0] else None

        return call

    def _note_scanned(self, rows: int) -> None:
        """Count the code bytes ``rows`` scanned rows touched (see :meth:`_release_if_needed`)."""
        self._touched += rows * self.code_dim * (1 if self.kind == "int8" else 4)
        self._release_if_needed()

    def rerank_whole(self, q: np.ndarray, cand: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The float32 scores and positions ``(nq, kk)`` of the best ``kk`` of the shortlist
        ``cand`` for the float64 queries ``q`` (:func:`~embtools.search.refine.rerank_queries`),
        the rows read from :meth:`_row_tables`: the compiled :func:`~embtools.kernels.rerank_jit.code_top`,
        whose scores and order are those of :func:`~embtools.search.refine.rerank`, padded as
        :func:`~embtools.search.ivf._rerank_ragged` pads."""
        jit = jit_kernels("rerank_jit")
        rows = self._row_tables()
        assert jit is not None and rows is not None  # searches_whole said so
        where, tables = rows[0], rows[1:]
        q, cand = np.ascontiguousarray(q), np.ascontiguousarray(cand)
        metric = jit.METRICS[self.metric]
        if len(q) < JIT_SPLIT_QUERIES:
            out: tuple[np.ndarray, np.ndarray] = jit.code_top(q, cand, where, *tables, metric, kk)
            return out
        # rows read at random (a cache miss each): two threads keep more in flight
        halves = [(0, len(q) // 2), (len(q) // 2, len(q))]
        parts = list(_POOL.get().map(
            lambda ab: jit.code_top(q[ab[0]:ab[1]], cand[ab[0]:ab[1]], where, *tables, metric, kk), halves))
        return np.concatenate([s for s, _ in parts]), np.concatenate([p for _, p in parts])

    def _release_if_needed(self) -> None:
        """Give back mapped code pages once the probes touched a quarter of the cap's room."""
        avail = self.budget.available_bytes
        if avail is not None and self._touched > avail // 4:
            for f in self.files:
                f.release()
            self._touched = 0

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []
