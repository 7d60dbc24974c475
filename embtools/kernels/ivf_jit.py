"""Compiled IVF partition scans: each query's probed partitions read once, best rows kept in a heap.

The NumPy shortlist of :mod:`embtools.index.probe` runs a dozen NumPy calls per (query,
partition) pair and then selects from the scored rows; these kernels fuse the two. For each query
they walk its probed partitions' slices of a codes file, score each live row (the float32 dot
product with the query's weights, plus a constant), and keep the best ``width`` rows in a
min-heap, ties to the lower position. Heaps persist across calls, so the codes files of an index
(its build and its deltas) are scanned one after another into the same heaps, and :func:`sort_heaps`
orders them at the end.

Load this module through :func:`embtools.kernels.jit.jit_kernels` (it imports numba). Each kernel
releases the GIL: the caller splits the queries over its threads.

- :func:`scan_dense`: codes stored as float32;
- :func:`scan_int8`: codes stored as int8, whose bucket centres score ``codes @ w + c0`` (``w = q
  * step``), computed as exact integer sums of the codes and ``w`` rounded to int16 (on AVX-512
  VNNI where the host has it: 5 ns a row of 384 in cache; a scan streamed from memory is bound
  by its bandwidth, 12-20 ns a row here);
- :func:`scan_signs`: codes of packed sign bits, scored asymmetrically (``q . s`` with ``s`` the
  +-1 vector of the code) through per-query tables of each 4-bit nibble's 16 partial sums.

With ``sq`` (the squared norms of the decoded rows) the score is ``2 q.x - |x|^2``, the L2 order;
``mask`` (a bool per position, empty for none) limits the rows to a filter's selection; rows at
position -1 (deleted) are skipped.

Examples
--------
>>> import numpy as np
>>> codes = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
>>> hs, hi = new_heaps(1, 2)
>>> scan_dense(np.array([[1.0, 0.5]], np.float32), np.zeros(1, np.float32), np.array([[0]]),
...            np.array([0, 3]), codes, np.arange(3), np.zeros(0, np.float32), np.zeros(0, bool), hs, hi,
...            np.zeros(0, np.float32))
>>> sort_heaps(hs, hi)
>>> hi.tolist(), hs.tolist()
([[2, 0]], [[1.5, 1.0]])
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from embtools.kernels.code_sums_jit import (
    MAX_WEIGHT,
    code_sums,
    host_has_vnni,
    padded_sums,
    signed_sums,
    split_weights,
)
from embtools.kernels.int8_jit import _heap_replace_min
from embtools.kernels.rerank_jit import sum_program, terms_sum

__all__ = [
    "FAST_BATCH_SCREEN",
    "centroid_scores",
    "certified_width",
    "int8_weights",
    "new_heaps",
    "nibble_tables",
    "scan_codes",
    "scan_dense",
    "scan_int8",
    "scan_signs",
    "scan_weights",
    "screen_terms",
    "screened_batch",
    "screened_centroids",
    "sort_heaps",
    "top_columns",
    "warm",
]


#: whether a batch's probes are picked by :func:`screened_batch` rather than a float32 product of
#: the queries and centroids (on AVX-512 VNNI: half its instructions; elsewhere the portable
#: integer loops lose to BLAS)
FAST_BATCH_SCREEN = host_has_vnni()
#: the position of an empty heap slot: worse than any row at the same score (-inf)
EMPTY = np.iinfo(np.int64).max


def new_heaps(nq: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty heaps: ``(nq, width)`` scores at -inf and positions at :data:`EMPTY`."""
    return np.full((nq, width), -np.inf, np.float32), np.full((nq, width), EMPTY, np.int64)


@njit(nogil=True, cache=True)
def _sift_down(s: np.ndarray, p: np.ndarray, n: int) -> None:  # pragma: no cover - compiled
    """Restore the min-heap order of ``s[:n], p[:n]`` after its root was replaced."""
    v, q = s[0], p[0]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        r = c + 1
        if r < n and (s[r] < s[c] or (s[r] == s[c] and p[r] > p[c])):
            c = r
        if s[c] < v or (s[c] == v and p[c] > q):
            s[i] = s[c]
            p[i] = p[c]
            i = c
        else:
            break
    s[i] = v
    p[i] = q


@njit(nogil=True, cache=True)
def _push(hs: np.ndarray, hi: np.ndarray, s: float, p: int) -> None:  # pragma: no cover - compiled
    """Put (score ``s``, position ``p``) into the min-heap ``hs, hi`` when it beats the root (the
    worst row kept; of equal scores the higher position is worse)."""
    if not (s > hs[0] or (s == hs[0] and p < hi[0])):
        return
    hs[0] = s
    hi[0] = p
    _sift_down(hs, hi, len(hs))


@njit(nogil=True, cache=True)
def _push_row(hs: np.ndarray, hi: np.ndarray, s: float, p: int) -> None:  # pragma: no cover - compiled
    """:func:`_push` of an index row: a position the heap holds already (the second copy of a
    row of a SOAR index, :mod:`embtools.index.soar`, which scores the same) is not pushed again."""
    if not (s > hs[0] or (s == hs[0] and p < hi[0])):
        return
    held = False
    for t in range(len(hi)):  # no early exit: the compare vectorises (3 ns for 20 slots, not 9)
        held |= hi[t] == p
    if held:
        return
    hs[0] = s
    hi[0] = p
    _sift_down(hs, hi, len(hs))


@njit(nogil=True, cache=True, fastmath=True)
def scan_dense(w: np.ndarray, c0: np.ndarray, probes: np.ndarray, starts: np.ndarray,
               codes: np.ndarray, pos: np.ndarray, sq: np.ndarray, mask: np.ndarray,
               hs: np.ndarray, hi: np.ndarray, inv: np.ndarray) -> None:  # pragma: no cover - compiled
    """Scan float32 ``codes`` ``(rows, d)``: query ``i`` (weights ``w[i]``, constant ``c0[i]``)
    scores the rows of partitions ``probes[i]`` (-1: none) into heap ``hs[i], hi[i]``.
    ``starts``: each partition's first row in ``codes`` (partitions + 1 entries); ``pos``: each
    row's position in the version (-1: deleted); ``sq`` (l2) each row's squared norm, ``inv``
    (cosine over rows as stored) its inverse norm, ``mask`` the positions that may be returned
    (each empty: none)."""
    l2 = len(sq) > 0
    scaled = len(inv) > 0
    masked = len(mask) > 0
    d = codes.shape[1]
    for i in range(w.shape[0]):
        wi = w[i]
        base = c0[i]
        hsi = hs[i]
        hii = hi[i]
        for j in range(probes.shape[1]):
            part = probes[i, j]
            if part < 0:
                continue
            for r in range(starts[part], starts[part + 1]):
                p = pos[r]
                if p < 0 or (masked and not mask[p]):
                    continue
                acc = np.float32(0.0)
                row = codes[r]
                for t in range(d):
                    acc += wi[t] * np.float32(row[t])
                acc += base
                if l2:
                    acc = np.float32(2.0) * acc - sq[r]
                elif scaled:
                    acc *= inv[r]
                _push_row(hsi, hii, acc, p)


#: rows of a partition whose integer sums :func:`scan_int8` takes at a time
_SUM_ROWS = 64


@njit(nogil=True, cache=True)
def int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``(v, scale)``: int16 weights ``(nq, d)`` and float64 scales ``(nq,)`` with ``v[i] * scale[i]``
    the nearest to the float32 weights ``w[i]``, ``|v| <= min(MAX_WEIGHT, (2**31 - 1) // (255 d))``
    (a row's integer sum stays within int32); the weights :func:`scan_int8` scores with."""
    nq, d = w.shape
    top = min(MAX_WEIGHT, (2**31 - 1) // (255 * max(d, 1)))
    v = np.zeros((nq, d), np.int16)
    scale = np.ones(nq)
    for i in range(nq):
        wmax = 0.0
        for t in range(d):
            wmax = max(wmax, abs(np.float64(w[i, t])))
        if wmax > 0:
            scale[i] = wmax / top
        for t in range(d):
            v[i, t] = min(top, max(-top, int(np.rint(np.float64(w[i, t]) / scale[i]))))
    return v, scale


@njit(nogil=True, cache=True)
def _push_sums(sums: np.ndarray, scores: np.ndarray, a: int, b: int, sc: float, base: float, pos: np.ndarray,
               mask: np.ndarray, sq: np.ndarray, inv: np.ndarray, hs: np.ndarray,
               hi: np.ndarray) -> None:  # pragma: no cover - compiled
    """Push rows ``a..b - 1`` of a codes file, their integer sums ``sums[:b - a]``, into the heap
    ``hs, hi`` of a query of scale ``sc`` and constant ``base`` (:func:`scan_int8`): the rows'
    float32 scores first, into ``scores`` (a loop that vectorises), then the rows that reach the
    heap's worst score (kept in a register) looked up and pushed: 12.4 ns a row and query of
    MiniLM's SOAR index at nprobe 16, against 15.1 testing and pushing row by row."""
    n = b - a
    if len(sq) > 0:
        for r in range(n):
            scores[r] = np.float32(2.0) * (np.float32(sc * sums[r]) + base) - sq[a + r]
    elif len(inv) > 0:
        for r in range(n):
            scores[r] = (np.float32(sc * sums[r]) + base) * inv[a + r]
    else:
        for r in range(n):
            scores[r] = np.float32(sc * sums[r]) + base
    masked = len(mask) > 0
    worst = hs[0]
    for r in range(n):
        if scores[r] >= worst:  # else it does not beat the heap's root (NaN neither)
            p = pos[a + r]
            if p < 0 or (masked and not mask[p]):
                continue
            _push_row(hs, hi, scores[r], p)
            worst = hs[0]


@njit(nogil=True, cache=True)
def scan_int8(v: np.ndarray, scale: np.ndarray, c0: np.ndarray, probes: np.ndarray, starts: np.ndarray,
              codes: np.ndarray, pos: np.ndarray, sq: np.ndarray, mask: np.ndarray, hs: np.ndarray,
              hi: np.ndarray, inv: np.ndarray) -> None:  # pragma: no cover - compiled
    """Scan int8 ``codes`` as :func:`scan_dense` scans float ones, query ``i`` scoring a row ``c``
    as ``float32(scale[i] * (v[i] . c)) + c0[i]`` (:func:`int8_weights`): the integer sums are
    exact (:func:`~embtools.kernels.code_sums_jit.signed_sums`, on AVX-512 VNNI where the host
    has it), so every host keeps the same rows. Several queries are scanned partition by
    partition, each block of rows scored for every query probing it while it is in cache (a
    heap keeps the same rows in any order of pushes: ties go to the lower position)."""
    nq, d = v.shape[0], codes.shape[1]
    sums = np.empty(_SUM_ROWS, np.int32)
    scores = np.empty(_SUM_ROWS, np.float32)
    splits = [split_weights(v[i], d) for i in range(nq)]
    if nq == 1:
        for part in probes[0]:
            if part < 0:
                continue
            for a in range(starts[part], starts[part + 1], _SUM_ROWS):
                b = min(a + _SUM_ROWS, starts[part + 1])
                signed_sums(v[0], splits[0], codes, a, b, sums)
                _push_sums(sums, scores, a, b, scale[0], c0[0], pos, mask, sq, inv, hs[0], hi[0])
        return
    parts = len(starts) - 1
    first = np.zeros(parts + 1, np.int64)  # the queries probing each partition, grouped
    for part in probes.ravel():
        if part >= 0:
            first[part + 1] += 1
    first = np.cumsum(first)
    at = first[:-1].copy()
    asking = np.empty(first[-1], np.int64)
    for i in range(nq):
        for part in probes[i]:
            if part >= 0:
                asking[at[part]] = i
                at[part] += 1
    for part in range(parts):
        if first[part] == first[part + 1]:
            continue
        for a in range(starts[part], starts[part + 1], _SUM_ROWS):
            b = min(a + _SUM_ROWS, starts[part + 1])
            for i in asking[first[part]:first[part + 1]]:
                signed_sums(v[i], splits[i], codes, a, b, sums)
                _push_sums(sums, scores, a, b, scale[i], c0[i], pos, mask, sq, inv, hs[i], hi[i])


def scan_codes(w: np.ndarray, c0: np.ndarray, v: np.ndarray, scale: np.ndarray, probes: np.ndarray,
               starts: np.ndarray, codes: np.ndarray, pos: np.ndarray, sq: np.ndarray, mask: np.ndarray,
               hs: np.ndarray, hi: np.ndarray, inv: np.ndarray) -> None:
    """:func:`scan_int8` (weights ``v, scale``) for int8 ``codes``, :func:`scan_dense` (weights
    ``w``) for float32 ones; in compiled code the choice is made by the codes' type."""
    if codes.dtype == np.int8:
        scan_int8(v, scale, c0, probes, starts, codes, pos, sq, mask, hs, hi, inv)
    else:
        scan_dense(w, c0, probes, starts, codes, pos, sq, mask, hs, hi, inv)


@overload(scan_codes, jit_options={"nogil": True})
def _scan_codes(w, c0, v, scale, probes, starts, codes, pos, sq, mask, hs, hi, inv):  # type: ignore[no-untyped-def]
    """The implementation of :func:`scan_codes` for the codes' type (numba's names: no annotations)."""
    if codes.dtype == types.int8:
        def by_sums(w, c0, v, scale, probes, starts, codes, pos, sq, mask, hs, hi, inv):  # type: ignore[no-untyped-def] # pragma: no cover
            scan_int8(v, scale, c0, probes, starts, codes, pos, sq, mask, hs, hi, inv)
        return by_sums

    def by_floats(w, c0, v, scale, probes, starts, codes, pos, sq, mask, hs, hi, inv):  # type: ignore[no-untyped-def] # pragma: no cover
        scan_dense(w, c0, probes, starts, codes, pos, sq, mask, hs, hi, inv)
    return by_floats


@njit(nogil=True, cache=True, fastmath=True)
def scan_signs(tables: np.ndarray, probes: np.ndarray, starts: np.ndarray, codes: np.ndarray,
               pos: np.ndarray, sq: np.ndarray, mask: np.ndarray, hs: np.ndarray,
               hi: np.ndarray) -> None:  # pragma: no cover - compiled
    """Scan packed sign ``codes`` ``(rows, bytes)`` as :func:`scan_dense` does, query ``i``
    scoring a row as the sum of ``tables[i, n, nibble n of the row]`` (:func:`nibble_tables`)."""
    l2 = len(sq) > 0
    masked = len(mask) > 0
    nbytes = codes.shape[1]
    for i in range(tables.shape[0]):
        ti = tables[i]
        hsi = hs[i]
        hii = hi[i]
        for j in range(probes.shape[1]):
            part = probes[i, j]
            if part < 0:
                continue
            for r in range(starts[part], starts[part + 1]):
                p = pos[r]
                if p < 0 or (masked and not mask[p]):
                    continue
                acc = np.float32(0.0)
                row = codes[r]
                for b in range(nbytes):
                    v = row[b]
                    acc += ti[2 * b, v >> 4] + ti[2 * b + 1, v & 15]
                if l2:
                    acc = np.float32(2.0) * acc - sq[r]
                _push_row(hsi, hii, acc, p)


@njit(nogil=True, cache=True)
def merge_heaps(hs: np.ndarray, hi: np.ndarray, hs2: np.ndarray, hi2: np.ndarray) -> None:  # pragma: no cover
    """Push every row of heaps ``hs2, hi2`` into heaps ``hs, hi`` (the same queries, row for
    row; unsorted heaps)."""
    for i in range(hs.shape[0]):
        for j in range(hs2.shape[1]):
            if hi2[i, j] != EMPTY:
                _push_row(hs[i], hi[i], hs2[i, j], hi2[i, j])


@njit(nogil=True, cache=True, fastmath=True)
def _dot(q: np.ndarray, row: np.ndarray) -> float:  # pragma: no cover - compiled
    """The float32 product of ``q`` and ``row``: the one both centroid passes score with."""
    acc = np.float32(0.0)
    for t in range(row.shape[0]):
        acc += q[t] * row[t]
    return acc


@njit(nogil=True, cache=True, fastmath=True)
def centroid_scores(q: np.ndarray, centroids: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[i, c] = q[i] . centroids[c]`` in float32, one row at a time (a few queries: no BLAS
    call, whose thread settings cost more than the product; 4000 x 384 takes ~0.1 ms)."""
    for i in range(q.shape[0]):
        qi = q[i]
        oi = out[i]
        for c in range(centroids.shape[0]):
            oi[c] = _dot(qi, centroids[c])


@njit(nogil=True, cache=True)
def screen_terms(q: np.ndarray, lo: np.ndarray, step: np.ndarray, err: np.ndarray,
                 cmax: np.ndarray) -> tuple[np.ndarray, float, float]:  # pragma: no cover - compiled
    """``(v, scale, margin)`` of :func:`screened_centroids` for the float32 query ``q`` against
    uint8 centroid codes of minima ``lo`` and steps ``step`` (float32), whose largest errors are
    ``err`` and largest magnitudes ``cmax`` per dimension (float64): int16 weights ``v``
    with ``v * scale`` the nearest to ``q * step``, small enough
    that a row's integer sum stays within int32; and the margin: twice
    a bound on the approximation's error (the codes' ``sum |q_t| err_t``, the weights'
    rounding ``255 sum |q_t step_t - v_t scale|``, the float rounding of the terms) and on the
    float32 product's."""
    d = q.shape[0]
    u = 2.0**-24
    top = min(MAX_WEIGHT, (2**31 - 1) // (255 * max(d, 1)))  # |v| <= top: 255 * top * d fits int32
    wmax = 0.0
    for t in range(d):
        wmax = max(wmax, abs(np.float64(q[t]) * np.float64(step[t])))
    scale = wmax / top if wmax > 0 else 1.0
    size = 0.0  # bounds the magnitude of the approximation's terms
    e = 0.0
    cm = 0.0
    rounding = 0.0
    v = np.empty(d, np.int16)
    for t in range(d):
        a = abs(np.float64(q[t]))
        size += a * (abs(np.float64(lo[t])) + 255.0 * np.float64(step[t]))
        e += a * err[t]
        cm += a * cmax[t]
        w = np.float64(q[t]) * np.float64(step[t])
        v[t] = min(top, max(-top, int(np.rint(w / scale))))
        rounding += abs(w - v[t] * scale)
    e += 255.0 * rounding
    margin = 2.0 * (e + 2.0 * (d + 4) * u * size + (d + 2) * u * cm) + 4.0 * u * size
    return v, scale, margin


@njit(nogil=True, cache=True)
def screened_centroids(q: np.ndarray, v: np.ndarray, scale: float, codes: np.ndarray, margin: float,
                       centroids: np.ndarray, n: int) -> np.ndarray:  # pragma: no cover - compiled
    """The ``n`` best centroids of query ``q`` by the float32 product, best first, ties to the lower
    column: ``q . lo + scale * (v . codes[c])`` approximates each score from ``uint8`` codes of the
    centroids (a quarter of their bytes; :func:`screen_terms`), and only the centroids within
    ``margin`` (a bound on twice the approximation's error plus the float32 product's) of the
    ``n``-th best approximation are scored from ``centroids``."""
    sums = np.empty(codes.shape[0], np.int32)
    code_sums(v, codes, sums)
    return _screened_pick(q, scale, sums, margin, centroids, n)


@njit(nogil=True, cache=True)
def _nth_largest(sums: np.ndarray, p: int, n: int) -> int:  # pragma: no cover - compiled
    """The ``n``-th largest of ``sums[:p]`` (very small where ``p < n``): a min-heap of ints."""
    best = np.full(n, -(2**62), np.int64)
    for c in range(p):
        s = np.int64(sums[c])
        if s > best[0]:
            _heap_replace_min(best, s)
    return int(best[0])


@njit(nogil=True, cache=True)
def _screened_pick(q: np.ndarray, scale: float, sums: np.ndarray, margin: float, centroids: np.ndarray,
                   n: int) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`screened_centroids` from the integer sums ``sums`` of its centroids' codes (the
    first ``len(centroids)`` read): the approximations are ``q . lo + scale * sums``, so those within
    ``margin`` of the ``n``-th best are the sums within ``margin / scale`` of the ``n``-th largest
    (one more kept against the rounding of the division)."""
    p = centroids.shape[0]
    floor = _nth_largest(sums, p, n) - margin / scale - 1.0
    top_s = np.full(n, -np.inf, np.float32)
    hi = np.full(n, EMPTY, np.int64)
    for c in range(p):
        if sums[c] >= floor:
            _push(top_s, hi, _dot(q, centroids[c]), c)
    _sort_heaps(top_s.reshape(1, n), hi.reshape(1, n))
    return hi


#: queries whose centroid sums :func:`screened_batch` holds at once (64 x 4,000 int32: 1 MiB)
_SCREEN_CHUNK = 64


@njit(nogil=True, cache=True)
def screened_batch(q: np.ndarray, lo: np.ndarray, step: np.ndarray, err: np.ndarray, cmax: np.ndarray,
                   packed: np.ndarray, centroids: np.ndarray, n: int) -> np.ndarray:  # pragma: no cover
    """:func:`screened_centroids` of each row of ``q`` (``(queries, n)`` int64), the codes'
    integer sums of a chunk of queries computed together (:func:`~embtools.kernels.code_sums_jit.padded_sums`
    of ``packed``, :func:`~embtools.kernels.codes.pack_codes` of the codes whose minima,
    steps, errors and magnitudes :func:`screen_terms` takes): the same centroids, each block of
    16 codes read once for 8 queries."""
    nq, d = q.shape
    out = np.empty((nq, n), np.int64)
    for a in range(0, nq, _SCREEN_CHUNK):
        b = min(nq, a + _SCREEN_CHUNK)
        v = np.empty((b - a, d), np.int16)
        terms = np.empty((b - a, 2))
        for i in range(a, b):
            v[i - a], terms[i - a, 0], terms[i - a, 1] = screen_terms(q[i], lo, step, err, cmax)
        sums = padded_sums(v, packed)
        for i in range(a, b):
            out[i] = _screened_pick(q[i], terms[i - a, 0], sums[i - a], terms[i - a, 1], centroids, n)
    return out


@njit(nogil=True, cache=True)
def _top_columns(scores: np.ndarray, hs: np.ndarray, hi: np.ndarray) -> None:  # pragma: no cover
    for i in range(scores.shape[0]):
        row, hsi, hii = scores[i], hs[i], hi[i]
        for c in range(scores.shape[1]):
            _push(hsi, hii, row[c], c)


def top_columns(scores: np.ndarray, n: int) -> np.ndarray:
    """``(rows, n)`` int64: the columns of the ``n`` highest scores of each row, best first, ties
    to the lower column (the nearest centroids of each query).

    Examples
    --------
    >>> top_columns(np.array([[0.1, 0.9, 0.5, 0.9]], np.float32), 3).tolist()
    [[1, 3, 2]]
    """
    hs, hi = new_heaps(scores.shape[0], n)
    _top_columns(scores, hs, hi)
    sort_heaps(hs, hi)
    return hi


@njit(nogil=True, cache=True)
def _sort_heaps(hs: np.ndarray, hi: np.ndarray) -> None:  # pragma: no cover - compiled
    n = hs.shape[1]
    for i in range(hs.shape[0]):
        s, p = hs[i], hi[i]
        for end in range(n - 1, 0, -1):  # heap sort: the worst to the end, one at a time
            ws, wp = s[0], p[0]
            s[0], p[0] = s[end], p[end]
            _sift_down(s, p, end)
            s[end], p[end] = ws, wp
        for t in range(n):
            if p[t] == EMPTY:
                p[t] = -1


def sort_heaps(hs: np.ndarray, hi: np.ndarray) -> None:
    """Order each heap best first, in place; empty slots end up last with position -1."""
    _sort_heaps(hs, hi)


@njit(nogil=True, cache=True)
def _scan_weights(q: np.ndarray, steps: np.ndarray, centers: np.ndarray,
                  program: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The scan weights and constants of the float32 queries ``q``: ``q`` and 0 for float codes
    (``steps`` empty), for int8 codes ``q * steps`` and ``q . centers`` (the bucket centres of
    code 0; float64 products summed in NumPy's pairwise order, rounded to float32), the bits of
    every scan of int8 codes (:func:`scan_weights`)."""
    nq = q.shape[0]
    c0 = np.zeros(nq, np.float32)
    if steps.shape[0] == 0:
        return q, c0
    w = np.empty_like(q)
    q64 = np.empty(q.shape[1])
    stack = np.empty(len(program))
    for i in range(nq):
        for t in range(q.shape[1]):
            w[i, t] = q[i, t] * steps[t]
            q64[t] = q[i, t]
        c0[i] = np.float32(terms_sum(centers, q64, 0, program, stack))
    return w, c0


def scan_weights(q: np.ndarray, steps: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weights and constants :func:`scan_dense` scores int8 codes with, for the float32
    queries ``q`` (C-contiguous) and the codes' per-dimension ``steps`` and bucket centres of
    code 0 (float32): ``q * steps`` and ``q . centers`` (float64 products summed in NumPy's
    pairwise order, rounded to float32), what the compiled single-query call computes too.

    Examples
    --------
    >>> w, c0 = scan_weights(np.array([[1, 2]], np.float32), np.array([0.5, 0.25], np.float32),
    ...                      np.array([1, 1], np.float32))
    >>> w.tolist(), c0.tolist()
    ([[0.5, 0.5]], [3.0])
    """
    out: tuple[np.ndarray, np.ndarray] = _scan_weights(q, steps, centers, sum_program(q.shape[1]))
    return out


@njit(nogil=True, cache=True)
def _certified_width(scores: np.ndarray, kk: int, eps: float) -> int:  # pragma: no cover - compiled
    """How many of a shortlist's float32 ``scores`` (sorted, best first) can hold a row of the
    exact top ``kk``: those within ``2 eps`` of the ``kk``-th (every one when ``eps`` is 0 or the
    shortlist holds ``kk`` or fewer); the rule of :meth:`embtools.index.IvfIndex._certified`."""
    width = scores.shape[0]
    if eps <= 0 or width <= kk:
        return width
    floor = scores[kk - 1] - np.float32(2 * eps)
    keep = kk
    while keep < width and scores[keep] >= floor:
        keep += 1
    return keep


@njit(nogil=True, cache=True)
def _widest_cut(hs: np.ndarray, kk: int, eps: float) -> int:  # pragma: no cover - compiled
    widest = 0
    for i in range(hs.shape[0]):
        widest = max(widest, _certified_width(hs[i], kk, eps))
    return widest


def certified_width(hs: np.ndarray, kk: int, eps: float) -> int:
    """The widest certified cut (:func:`_certified_width`) of the sorted heaps ``hs`` (one row per
    query): the columns a batch's shortlists keep.

    Examples
    --------
    >>> certified_width(np.array([[0.9, 0.8, 0.79, 0.5]], np.float32), 2, 0.01)
    3
    """
    return int(_widest_cut(hs, kk, eps)) if len(hs) else int(hs.shape[1])


def nibble_tables(queries: np.ndarray, nbytes: int) -> np.ndarray:
    """``(nq, 2 * nbytes, 16)`` float32: entry ``[i, n, e]`` is query ``i``'s score of nibble ``n``
    (dimensions ``4n .. 4n + 3``, the high bit first, as ``np.packbits`` packs) having bits ``e``:
    the sum of ``+q`` over its set bits and ``-q`` over its clear ones (0 past the dimension).

    Examples
    --------
    >>> t = nibble_tables(np.array([[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]], np.float32), 1)
    >>> float(t[0, 0, 0b1000]), float(t[0, 1, 0b0001])
    (-1.0, -1.0)
    """
    q = np.zeros((len(queries), nbytes * 8), np.float32)
    q[:, :queries.shape[1]] = queries
    signs = (((np.arange(16)[:, None] >> np.arange(3, -1, -1)[None, :]) & 1) * 2 - 1).astype(np.float32)
    return np.ascontiguousarray(q.reshape(len(q), nbytes * 2, 4) @ signs.T)


def warm() -> None:
    """Run each kernel once on tiny inputs, for the argument types the index uses."""
    parts, starts, pos = np.zeros((1, 1), np.int64), np.array([0, 1], np.int64), np.zeros(1, np.int64)
    empty_sq, empty_mask = np.zeros(0, np.float32), np.zeros(0, bool)
    hs, hi = new_heaps(1, 1)
    scan_dense(np.zeros((1, 8), np.float32), np.zeros(1, np.float32), parts, starts, np.zeros((1, 8), np.float32),
               pos, empty_sq, empty_mask, hs, hi, empty_sq)
    scan_int8(*int8_weights(np.ones((1, 8), np.float32)), np.zeros(1, np.float32), parts, starts,
              np.zeros((1, 8), np.int8), pos, empty_sq, empty_mask, hs, hi, empty_sq)
    hs, hi = new_heaps(1, 1)
    scan_signs(nibble_tables(np.zeros((1, 8), np.float32), 1), parts, starts, np.zeros((1, 1), np.uint8),
               pos, empty_sq, empty_mask, hs, hi)
    merge_heaps(hs, hi, *new_heaps(1, 1))
    sort_heaps(hs, hi)
    top_columns(np.zeros((1, 2), np.float32), 1)
    centroid_scores(np.zeros((1, 8), np.float32), np.zeros((2, 8), np.float32), np.zeros((1, 2), np.float32))
    v, scale, margin = screen_terms(np.ones(8, np.float32), np.zeros(8, np.float32), np.ones(8, np.float32),
                                    np.ones(8), np.ones(8))
    screened_centroids(np.zeros(8, np.float32), v, scale, np.zeros((2, 8), np.uint8), margin,
                       np.zeros((2, 8), np.float32), 1)
