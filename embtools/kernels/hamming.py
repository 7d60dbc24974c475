"""Hamming distances and asymmetric scores over packed sign bits, with exact top-k.

- :func:`hamming_distances` / :func:`hamming_top_k`: Hamming distance between packed codes
  (``uint8 (n, b)``, :func:`embtools.kernels.codes.pack_signs`), equal to FAISS
  ``IndexBinaryFlat`` (distances and ids; ties go to the lower index as there). A few queries
  use ``np.bitwise_count`` on 64-bit words (a byte lookup table where NumPy lacks it); batches
  unpack both sides to +-1 and use a float32 matrix product, exact because every sum is an
  integer far below 2**24: ``hamming = (bits - q . c) / 2``.
- :func:`threaded_hamming_top_k`: the same results as :func:`hamming_top_k` (and FAISS), split
  over ``THREADS`` threads. Codes of whole 64-bit words are scanned by the compiled kernel of
  :mod:`embtools.kernels.hamming_jit` where numba is installed (one pass, no distance array;
  about 1.3x faster than FAISS' scan for one query and 1.6x for batches), else by FAISS
  ``knn_hamming`` where FAISS is installed, else by :func:`hamming_top_k` (NumPy's popcount
  releases the GIL too). One query's rows are split over the threads and the parts' top k
  merged with ties to the lower index; a batch's queries are split (the compiled kernel) or
  spread by FAISS over its own threads. The kernel of the binary search path.
- :func:`sign_scores` / :func:`sign_top_k`: the *asymmetric* score of float queries against sign
  codes, ``q . s`` with ``s`` the +-1 vector of the code (a per-byte lookup table of the query's
  partial sums for a few queries, +-1 unpacking and a matrix product for batches).

Every function works through the codes in tiles, so its temporaries stay a few MiB whatever
the number of rows.

Examples
--------
>>> import numpy as np
>>> codes = np.array([[0b11110000], [0b11111111], [0b00000000]], dtype=np.uint8)
>>> hamming_distances(np.array([[0b11110001]], dtype=np.uint8), codes).tolist()
[[1, 3, 5]]
>>> d, i = hamming_top_k(np.array([[0b11110001]], dtype=np.uint8), codes, 2)
>>> d.tolist(), i.tolist()
([[1, 3]], [[0, 1]])
>>> q = np.array([[1.0, 0, 0, 0, 0, 0, 0, -2.0]], dtype=np.float32)
>>> sign_scores(q, codes, 8).tolist()
[[3.0, -1.0, 1.0]]
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from embtools.kernels.codes import unpack_signs
from embtools.kernels.jit import jit_kernels
from embtools.kernels.numpy_tiles import block_top_k, select_top_k_1d
from embtools.kernels.threads import ForkSafePool

__all__ = [
    "HAS_BITWISE_COUNT",
    "HammingStream",
    "hamming_distances",
    "hamming_top_k",
    "merge_smallest",
    "popcount",
    "sign_scores",
    "sign_scores64",
    "sign_top_k",
    "threaded_hamming_top_k",
]

#: NumPy >= 2.0 has a vectorised population count
HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
#: bits set in each byte value (the lookup table where ``np.bitwise_count`` is missing)
POPCOUNT8 = (
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
)
#: queries from which a product of +-1 matrices beats popcount / lookup tables
MATMUL_QUERIES = 16
#: bytes of temporaries per tile
TILE_BYTES = 8 * 1024**2
#: threads that split the rows of :func:`threaded_hamming_top_k`
THREADS = max(1, min(8, os.cpu_count() or 1))
#: fewest rows per thread
MIN_THREAD_ROWS = 32768
#: fewest queries per thread of a batch in the compiled kernel
MIN_THREAD_QUERIES = 4
#: threads that split one query's rows in the compiled kernel by default: its scan is bound by
#: memory bandwidth, and on the 2-core benchmark machine a second thread made a single-query
#: binary search of 1M rows 0.8-1.8 ms slower (hand-offs, no more bandwidth)
JIT_ROW_THREADS = 1


def popcount(a: np.ndarray) -> np.ndarray:
    """Bits set in each element of an unsigned integer array (uint8 result).

    Examples
    --------
    >>> popcount(np.array([0, 7, 255], dtype=np.uint8)).tolist()
    [0, 3, 8]
    """
    if HAS_BITWISE_COUNT:
        return np.bitwise_count(a)
    return POPCOUNT8[a.view(np.uint8)].reshape(*a.shape, a.itemsize).sum(axis=-1, dtype=np.uint8)


def _words(codes: np.ndarray) -> np.ndarray:
    """Codes as 64-bit words when their row length allows it (a view), else as bytes."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    if c.shape[1] % 8 == 0 and c.shape[1] > 0:
        return c.view(np.uint64)
    return c


def _check(queries: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(queries, dtype=np.uint8)
    c = np.asarray(codes, dtype=np.uint8)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"codes of shapes {q.shape} and {c.shape} do not match")
    return q, c


def _popcount_row(qw: np.ndarray, cw: np.ndarray, out: np.ndarray, tile_bytes: int = TILE_BYTES) -> None:
    """Distances of one query (words ``qw``) to every row of ``cw``, written into 1-D ``out``."""
    tile = max(1, tile_bytes // max(1, cw.shape[1] * cw.itemsize))
    for s in range(0, cw.shape[0], tile):
        counts = popcount(np.bitwise_xor(cw[s : s + tile], qw))
        o = out[s : s + tile]
        o[...] = counts[:, 0]
        for j in range(1, counts.shape[1]):  # column adds: faster than a sum over a short axis
            o += counts[:, j]


def _matmul_distances(q: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    bits = 8 * q.shape[1]
    qs = unpack_signs(q, bits)
    tile = max(1, TILE_BYTES // (4 * bits))
    for s in range(0, c.shape[0], tile):
        dots = qs @ unpack_signs(c[s : s + tile], bits).T
        out[:, s : s + tile] = ((bits - dots) * 0.5).astype(np.int32)


def hamming_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances ``(nq, n)`` int32 between packed query codes and packed row codes.

    Examples
    --------
    >>> hamming_distances(np.array([[1, 2]], dtype=np.uint8), np.array([[1, 2], [0, 1]], dtype=np.uint8)).tolist()
    [[0, 3]]
    """
    q, c = _check(queries, codes)
    out = np.empty((q.shape[0], c.shape[0]), dtype=np.int32)
    if q.shape[0] >= MATMUL_QUERIES:
        _matmul_distances(q, c, out)
    else:
        qw, cw = _words(q), _words(c)
        for r in range(q.shape[0]):
            _popcount_row(qw[r], cw, out[r])
    return out


def _smallest_ints(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest of a 1-D array of small non-negative ints, ties to the lower index."""
    counts = np.bincount(dist)
    kth = int(np.searchsorted(np.cumsum(counts), k))  # the k-th smallest value
    below = np.flatnonzero(dist < kth)
    ties = np.flatnonzero(dist == kth)[: k - below.size]
    idx = np.concatenate([below, ties])
    vals = dist[idx]
    order = np.lexsort((idx, vals))
    return vals[order].astype(np.int32), idx[order].astype(np.int64)


def merge_smallest(
    values: np.ndarray, indices: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` smallest of ``values`` (ties to the lower index), sorted.

    Small non-negative integers (Hamming distances) with indices below 2**31 are merged as one
    int64 key per entry (value, then index): a partition and a sort of ``k`` keys per row, several
    times faster than the general lexicographic sort.

    Examples
    --------
    >>> v, i = merge_smallest(np.array([[3, 1, 1]]), np.array([[0, 9, 4]]), 2)
    >>> v.tolist(), i.tolist()
    ([[1, 1]], [[4, 9]])
    """
    k = min(int(k), values.shape[1])
    if (values.dtype.kind in "iu" and indices.dtype.kind in "iu" and values.size
            and int(values.min()) >= 0 and int(values.max()) < 2**31
            and int(indices.min()) >= 0 and int(indices.max()) < 2**31):
        keys = (values.astype(np.int64) << 32) | indices.astype(np.int64)
        if 0 < k < keys.shape[1]:
            keys = np.partition(keys, k - 1, axis=1)[:, :k]
        keys = np.sort(keys, axis=1)[:, :k]
        return ((keys >> 32).astype(values.dtype, copy=False),
                (keys & 0xFFFFFFFF).astype(indices.dtype, copy=False))
    order = np.lexsort((indices, values), axis=-1)[:, :k]
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)


def hamming_top_k(queries: np.ndarray, codes: np.ndarray, k: int, tile_bytes: int = TILE_BYTES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows by Hamming distance: ``(distances int32, indices int64)``, nearest
    first, ties to the lower index (as FAISS ``IndexBinaryFlat``); k is clipped to the rows.

    A few queries: popcount distances and a counting selection per query; batches: the fused
    float32 tile kernel of :mod:`embtools.kernels.numpy_tiles` over +-1 vectors (the largest
    product is the smallest distance, and ties go to the lower index there too). Temporaries:
    about ``tile_bytes`` (and the distances of one query, 4 bytes a row).

    Examples
    --------
    >>> c = np.array([[0], [3], [1], [1]], dtype=np.uint8)
    >>> d, i = hamming_top_k(np.array([[1]], dtype=np.uint8), c, 3)
    >>> d.tolist(), i.tolist()
    ([[0, 0, 1]], [[2, 3, 0]])
    """
    q, c = _check(queries, codes)
    k = min(int(k), c.shape[0])
    nq = q.shape[0]
    out_d = np.zeros((nq, max(k, 0)), dtype=np.int32)
    out_i = np.zeros((nq, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out_d, out_i
    if nq < MATMUL_QUERIES:
        qw, cw = _words(q), _words(c)
        dist = np.empty(c.shape[0], dtype=np.int32)
        for r in range(nq):
            _popcount_row(qw[r], cw, dist, tile_bytes)
            out_d[r], out_i[r] = _smallest_ints(dist, k)
        return out_d, out_i
    bits = 8 * q.shape[1]
    values, indices = _signs_top_k(unpack_signs(q, bits), c, bits, k, tile_bytes)
    return ((bits - values) * 0.5).astype(np.int32), indices


def _signs_top_k(q: np.ndarray, c: np.ndarray, dim: int, k: int, tile_bytes: int = TILE_BYTES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows by ``q . signs(c)`` for float32 queries ``q``: the fused tile kernel."""
    tile = max(k, tile_bytes // (4 * dim))
    running: tuple[np.ndarray, np.ndarray] | None = None
    for s in range(0, c.shape[0], tile):
        block = unpack_signs(c[s : s + tile], dim)
        running = block_top_k(q, block, k, "dot", running=running, offset=s)
    assert running is not None
    return running


def _query_tables(queries: np.ndarray, nbytes: int, dtype: Any = np.float32) -> np.ndarray:
    """Per query and code byte, the score of each of the 256 byte values: ``(nq, nbytes, 256)``."""
    nq, dim = queries.shape
    padded = np.zeros((nq, nbytes * 8), dtype=dtype)
    padded[:, :dim] = queries
    signs = unpack_signs(np.arange(256, dtype=np.uint8)[:, None], 8).astype(dtype)  # (256, 8)
    return np.einsum("qjb,vb->qjv", padded.reshape(nq, nbytes, 8), signs).astype(dtype)


def sign_scores64(query: np.ndarray, codes: np.ndarray, dim: int) -> np.ndarray:
    """The asymmetric scores of one float query against packed sign codes, as :func:`sign_scores`
    but in float64 (per-byte tables of float64 partial sums): ``(n,)``. The binary search path
    orders its Hamming shortlist by these (the compiled kernel's float64 scores, to within
    float64 rounding), so a shortlist's order does not hang on float32 rounding.

    Examples
    --------
    >>> sign_scores64(np.array([0.5, 0.25], dtype=np.float32), np.array([[128], [192]], dtype=np.uint8), 2).tolist()
    [0.25, 0.75]
    """
    q = np.asarray(query, dtype=np.float64).reshape(1, -1)
    c = np.asarray(codes, dtype=np.uint8)
    if q.shape[1] != dim or c.ndim != 2 or c.shape[1] != (dim + 7) // 8:
        raise ValueError(f"query {q.shape} and codes {c.shape} do not match dimension {dim}")
    nbytes = c.shape[1]
    table = _query_tables(q, nbytes, np.float64).reshape(nbytes * 256)
    idx = c.astype(np.intp)
    idx += (np.arange(nbytes, dtype=np.intp) * 256)[None, :]
    return table.take(idx).sum(axis=1)  # type: ignore[no-any-return]


def sign_scores(queries: np.ndarray, codes: np.ndarray, dim: int) -> np.ndarray:
    """Asymmetric scores ``(nq, n)`` float32: each float query against the +-1 vectors of the
    packed sign codes (``dim`` dimensions; padding bits are ignored).

    Examples
    --------
    >>> sign_scores(np.array([[0.5, 0.25]], dtype=np.float32), np.array([[128], [64]], dtype=np.uint8), 2).tolist()
    [[0.25, -0.25]]
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    c = np.asarray(codes, dtype=np.uint8)
    if q.shape[1] != dim or c.ndim != 2 or c.shape[1] != (dim + 7) // 8:
        raise ValueError(f"queries {q.shape} and codes {c.shape} do not match dimension {dim}")
    nq, n = q.shape[0], c.shape[0]
    out = np.empty((nq, n), dtype=np.float32)
    if nq >= MATMUL_QUERIES:
        tile = max(1, TILE_BYTES // (4 * dim))
        for s in range(0, n, tile):
            out[:, s : s + tile] = q @ unpack_signs(c[s : s + tile], dim).T
        return out
    nbytes = c.shape[1]
    tables = _query_tables(q, nbytes).reshape(nq, nbytes * 256)
    offsets = (np.arange(nbytes, dtype=np.intp) * 256)[None, :]
    tile = max(1, TILE_BYTES // (8 * nbytes))
    for s in range(0, n, tile):
        idx = c[s : s + tile].astype(np.intp)
        idx += offsets
        for r in range(nq):
            out[r, s : s + tile] = tables[r].take(idx).sum(axis=1)
    return out


def sign_top_k(
    queries: np.ndarray, codes: np.ndarray, dim: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows by asymmetric sign score: ``(scores float32, indices int64)``, best
    first, ties to the lower index; k is clipped to the rows.

    Examples
    --------
    >>> c = np.array([[128], [64], [192]], dtype=np.uint8)
    >>> s, i = sign_top_k(np.array([[0.5, 0.25]], dtype=np.float32), c, 2, 2)
    >>> s.tolist(), i.tolist()
    ([[0.75, 0.25]], [[2, 0]])
    """
    c = np.asarray(codes, dtype=np.uint8)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    k = min(int(k), c.shape[0])
    nq = q.shape[0]
    if k <= 0:
        return np.zeros((nq, 0), dtype=np.float32), np.zeros((nq, 0), dtype=np.int64)
    if nq >= MATMUL_QUERIES:
        if q.shape[1] != dim or c.ndim != 2 or c.shape[1] != (dim + 7) // 8:
            raise ValueError(f"queries {q.shape} and codes {c.shape} do not match dimension {dim}")
        return _signs_top_k(np.ascontiguousarray(q), c, dim, k)
    scores = sign_scores(q, c, dim)
    out_v = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for r in range(nq):
        out_v[r], out_i[r] = select_top_k_1d(scores[r], k)
    return out_v, out_i


def _faiss() -> Any:
    """The ``faiss`` module where it is installed, else None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


_POOL = ForkSafePool(THREADS, "embtools-hamming")


def _part_top_k(q: np.ndarray, c: np.ndarray, k: int, use_faiss: bool, tile_bytes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss() if use_faiss and c.shape[1] % 8 == 0 else None
    if faiss is None:
        return hamming_top_k(q, c, k, tile_bytes)
    if q.shape[0] > 1:  # a batch: FAISS spreads its queries over its OpenMP threads
        d, i = faiss.knn_hamming(q, c, k)
    else:
        # One query: an OpenMP team costs ~6 ms of wake-ups on a busy 2-core machine against
        # 0.1 ms for the scan of 20k rows; our threads split the rows. The setting belongs to
        # the calling thread only, and is put back.
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            d, i = faiss.knn_hamming(q, c, k)
        finally:
            faiss.omp_set_num_threads(before)
    return d.astype(np.int32, copy=False), i.astype(np.int64, copy=False)


def _edges(n: int, parts: int) -> list[int]:
    """``parts + 1`` integer cut points of ``range(n)`` into near-equal parts."""
    return [n * p // parts for p in range(parts + 1)]


class HammingStream:
    """The ``k`` nearest rows by Hamming distance over batches of codes read one after another
    (rows in ascending index order, e.g. the row groups of a store): :func:`threaded_hamming_top_k`
    without a merge per batch where the compiled kernel runs.

    With :mod:`embtools.kernels.hamming_jit` (codes of whole 64-bit words, numba installed) each
    batch is scanned into per-query buffers that persist: one query's rows split over
    ``threads`` threads (default ``JIT_ROW_THREADS``; each keeps its own buffers; parts of at
    least ``MIN_THREAD_ROWS`` rows), a batch's queries split (default ``THREADS``; at least
    ``MIN_THREAD_QUERIES`` each). Otherwise each batch's top k
    comes from :func:`threaded_hamming_top_k` and is merged into the running best.

    ``keep_codes``: the compiled kernel copies each candidate's code into its buffer as it
    enters, so :meth:`codes` returns the winners' codes without reading them again (None on the
    other paths).

    Examples
    --------
    >>> s = HammingStream(np.array([[1]], dtype=np.uint8), 3)
    >>> s.add(np.array([[0], [3]], dtype=np.uint8))
    >>> s.add(np.array([[1], [1]], dtype=np.uint8))
    >>> d, i = s.result()
    >>> d.tolist(), i.tolist()
    ([[0, 0, 1]], [[2, 3, 0]])
    """

    def __init__(self, queries: np.ndarray, k: int, *, threads: int | None = None,
                 use_faiss: bool = True, keep_codes: bool = False) -> None:
        q = np.asarray(queries, dtype=np.uint8)
        if q.ndim == 1:
            q = q[None, :]
        self.queries = np.ascontiguousarray(q)
        self.k = max(0, int(k))
        self.use_faiss = use_faiss
        self.seen = 0
        nb, nq = q.shape[1], q.shape[0]
        self._jit = jit_kernels("hamming_jit") if nb % 8 == 0 and nb and self.k else None
        if threads is None:
            threads = JIT_ROW_THREADS if self._jit is not None and nq == 1 else THREADS
        self.threads = max(1, threads)
        if self._jit is not None:
            self._qw = self.queries.view(np.uint64)
            self._parts = 1 if nq > 1 else self.threads
            words = self._qw.shape[1] if keep_codes else 0
            self._state = self._jit.new_state(self._parts, nq, self.k, words)
        else:
            self._best = (np.zeros((nq, 0), np.int32), np.zeros((nq, 0), np.int64))

    def add(self, codes: np.ndarray) -> None:
        """Scan the next ``codes`` (uint8 ``(n, bytes)``); their indices follow the rows before."""
        c = np.asarray(codes, dtype=np.uint8)
        if c.ndim != 2 or c.shape[1] != self.queries.shape[1]:
            raise ValueError(f"codes of shapes {self.queries.shape} and {c.shape} do not match")
        n, offset = c.shape[0], self.seen
        self.seen += n
        if n == 0 or self.k == 0:
            return
        if self._jit is None:
            d, i = threaded_hamming_top_k(self.queries, c, min(self.k, n), threads=self.threads,
                                          use_faiss=self.use_faiss)
            bd, bi = self._best
            self._best = merge_smallest(np.concatenate([bd, d], axis=1),
                                        np.concatenate([bi, i + offset], axis=1), self.k)
            return
        cw = np.ascontiguousarray(c).view(np.uint64)
        bd, bi, counts, limits, bc = self._state
        scan, k, tile = self._jit.scan, self.k, self._jit.TILE_ROWS
        nq = self._qw.shape[0]
        jobs: list[tuple[Any, ...]]
        if nq > 1:
            edges = _edges(nq, max(1, min(self.threads, nq // MIN_THREAD_QUERIES)))
            jobs = [(self._qw[a:b], cw, offset, k, tile, bd[0, a:b], bi[0, a:b], counts[0, a:b],
                     limits[0, a:b], bc[0, a:b]) for a, b in itertools.pairwise(edges)]
        else:
            edges = _edges(n, max(1, min(self._parts, n // MIN_THREAD_ROWS)))
            jobs = [(self._qw, cw[a:b], offset + a, k, max(1, b - a), bd[p], bi[p], counts[p],
                     limits[p], bc[p]) for p, (a, b) in enumerate(itertools.pairwise(edges))]
        if len(jobs) == 1:
            scan(*jobs[0])
            return
        for f in [_POOL.get().submit(scan, *job) for job in jobs]:
            f.result()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(distances int32 (nq, k'), indices int64 (nq, k'))``, nearest first, ties to the
        lower index; ``k'`` is ``k`` clipped to the rows added."""
        nq = self.queries.shape[0]
        k = min(self.k, self.seen)
        if k == 0:
            return np.zeros((nq, 0), np.int32), np.zeros((nq, 0), np.int64)
        if self._jit is None:
            return self._best
        bd, bi, counts, _, bc = self._state
        d, i = self._jit.finish(bd, bi, counts, k, 8 * self.queries.shape[1], bc)
        if bc.shape[3]:
            self._codes = self._winner_codes(i)
        return d, i

    def _winner_codes(self, winners: np.ndarray) -> np.ndarray:
        """The kept codes of ``winners`` ``(nq, k)`` (after ``finish``: each part's buffer holds
        its best rows in row order), uint8 ``(nq, k, bytes)``."""
        _, bi, counts, _, bc = self._state
        nq, k = winners.shape
        out = np.empty((nq, k, bc.shape[3]), np.uint64)
        for r in range(nq):
            ids = np.concatenate([bi[p, r, : counts[p, r]] for p in range(bi.shape[0])])
            words = np.concatenate([bc[p, r, : counts[p, r]] for p in range(bi.shape[0])])
            order = np.argsort(ids, kind="stable")
            out[r] = words[order[np.searchsorted(ids[order], winners[r])]]
        return out.view(np.uint8)

    def codes(self) -> np.ndarray | None:
        """After :meth:`result`, the winners' codes ``(nq, k', bytes)`` uint8 in result order
        where they were kept (``keep_codes`` and the compiled kernel), else None."""
        return getattr(self, "_codes", None)


def threaded_hamming_top_k(queries: np.ndarray, codes: np.ndarray, k: int, *,
                           threads: int | None = None, use_faiss: bool = True
                           ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hamming_top_k` (the same distances and indices, ties to the lower index, as FAISS
    ``IndexBinaryFlat``) over ``threads`` threads (default ``THREADS``).

    Codes of whole 64-bit words go to the compiled kernel (:mod:`embtools.kernels.hamming_jit`)
    where :func:`~embtools.kernels.jit.jit_kernels` loads it, through :class:`HammingStream`:
    one query's rows split over the threads (default ``JIT_ROW_THREADS``), a batch's queries
    split. Otherwise the rows are split (parts of at least
    ``MIN_THREAD_ROWS`` rows; a batch of queries FAISS spreads over its own threads instead) and
    each part runs FAISS ``knn_hamming`` where FAISS is installed and ``use_faiss`` (whole
    words), else :func:`hamming_top_k` (the parts share its ``TILE_BYTES`` of temporaries).

    Examples
    --------
    >>> c = np.array([[0], [3], [1], [1]], dtype=np.uint8)
    >>> d, i = threaded_hamming_top_k(np.array([[1]], dtype=np.uint8), c, 3, threads=2)
    >>> d.tolist(), i.tolist()
    ([[0, 0, 1]], [[2, 3, 0]])
    """
    q, c = _check(queries, codes)
    q, c = np.ascontiguousarray(q), np.ascontiguousarray(c)
    n = c.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros((q.shape[0], 0), np.int32), np.zeros((q.shape[0], 0), np.int64)
    if c.shape[1] % 8 == 0 and c.shape[1] and jit_kernels("hamming_jit") is not None:
        stream = HammingStream(q, k, threads=threads)
        stream.add(c)
        return stream.result()
    parts = max(1, min(threads or THREADS, n // MIN_THREAD_ROWS))
    if threads is None and use_faiss and q.shape[0] > 1 and _faiss() is not None:
        parts = 1  # FAISS spreads a batch's queries over its own threads
    if parts == 1:
        return _part_top_k(q, c, k, use_faiss, TILE_BYTES)
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    tile = TILE_BYTES // parts
    futures = [_POOL.get().submit(_part_top_k, q, c[a:b], min(k, int(b - a)), use_faiss, tile)
               for a, b in itertools.pairwise(edges)]
    results = [f.result() for f in futures]
    d = np.concatenate([r[0] for r in results], axis=1)
    i = np.concatenate([r[1] + a for r, a in zip(results, edges[:-1], strict=True)], axis=1)
    return merge_smallest(d, i, k)
