"""Compiled Hamming top-k over packed sign codes: XOR + popcount of 64-bit words, exact selection.

The result equals FAISS ``IndexBinaryFlat`` (distances, and ids with ties to the lower index), as
:func:`embtools.kernels.hamming.hamming_top_k` does, in one pass over the codes that keeps no
distance array: each query holds a buffer of candidates, in row order, and a threshold ``t``;
a row enters only when its distance is below ``t``. When the buffer fills, a histogram of its
distances (small integers, ``0..bits``) finds the ``k``-th smallest, ``v``; the rows below ``v``
and the first rows at ``v`` (the lowest indices) are kept, ``k`` in all, and ``t = v``: a later
row at distance ``v`` has a higher index than every kept one, so it could not enter. The popcount
is LLVM's ``ctpop`` (one ``popcnt`` instruction per word where the CPU has it).

For a batch, :func:`scan` walks the codes in tiles of ``tile_rows`` rows (they stay in L1/L2)
and scans each tile for every query before the next tile is read. The buffers persist across
calls (:func:`new_state`), so batches of rows read one after another (the row groups of a
store) go into the same buffers; :func:`finish` merges the buffers of the threads that scanned
parts of the rows and sorts. :func:`top_k` is the three in one call.

:func:`sign_select` re-orders each query's Hamming shortlist by the asymmetric score of the
float query against the candidates' sign codes (the binary search path's second step).

Load this module through :func:`embtools.kernels.jit.jit_kernels` (it imports numba). The kernels
release the GIL: the caller splits rows or queries over its threads.

Examples
--------
>>> import numpy as np
>>> codes = np.array([[0], [3], [1], [1]], dtype=np.uint64)
>>> d, i = top_k(np.array([[1]], dtype=np.uint64), codes, 3, 0, 64)
>>> d.tolist(), i.tolist()
([[0, 0, 1]], [[2, 3, 0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["EMPTY_LIMIT", "TILE_ROWS", "finish", "new_state", "scan", "sign_select", "top_k", "warm"]

#: rows of a tile that every query of a batch scans before the next (48-byte codes: 96 KiB)
TILE_ROWS = 2048
#: words read ahead of the scan (software prefetch): the hardware prefetcher stops at each 4 KiB
#: page, and a scan of mapped codes is bound by memory (1M x 48 bytes: 6.4 ms without, 4.9 ms
#: with, on a 2-core AMD EPYC VM)
PREFETCH_WORDS = 512


def _ctpop(typingctx, x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``llvm.ctpop`` of a 64-bit word (as int64): one ``popcnt`` where the target has it."""
    if not isinstance(x, types.Integer) or getattr(x, "bitwidth", 0) != 64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = builder.module.declare_intrinsic("llvm.ctpop", [args[0].type])
        return builder.call(fn, args)

    return types.int64(x), codegen


_popcount: Any = intrinsic(_ctpop)


def _prefetch_read(typingctx, arr, index):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``llvm.prefetch`` (read, keep in all cache levels) of ``arr.flat[index]`` (a C-contiguous
    1-D array; no bounds check: a prefetch never faults)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        name = "llvm.prefetch.p0" if getattr(ptr.type, "is_opaque", False) else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


_prefetch: Any = intrinsic(_prefetch_read)


@njit(nogil=True, cache=True)
def _compact(bd: np.ndarray, bi: np.ndarray, count: int, k: int, hist: np.ndarray,
             bc: np.ndarray) -> int:  # pragma: no cover - compiled
    """Keep the best ``k`` of the ``count`` buffered candidates (in row order, kept in order;
    ``bc``: their codes' words, or ``(cap, 0)``); returns the ``k``-th smallest distance, the
    new threshold."""
    hist[:] = 0
    for j in range(count):
        hist[bd[j]] += 1
    below = 0
    v = 0
    while below + hist[v] < k:
        below += hist[v]
        v += 1
    ties = k - below
    w = 0
    for j in range(count):
        d = bd[j]
        if d < v or (d == v and ties > 0):
            if d == v:
                ties -= 1
            bd[w] = d
            bi[w] = bi[j]
            for x in range(bc.shape[1]):
                bc[w, x] = bc[j, x]
            w += 1
    return v


@njit(nogil=True, cache=True)
def _scan(flat: np.ndarray, a: int, b: int, q, t: int, c: int,  # type: ignore[no-untyped-def]
          qd: np.ndarray, qi: np.ndarray, k: int, offset: int, hist: np.ndarray, qc: np.ndarray
          ) -> tuple[int, int]:  # pragma: no cover - compiled
    """Rows ``a:b`` of the codes (``flat``: the ``(n, w)`` words in one row) into one query's
    buffer ``qd, qi`` (``c`` entries, threshold ``t``); returns the new ``(t, c)``. ``q``: the
    query's words as a tuple (the usual widths: a compiled version per width, the words held in
    registers, the distance one straight line of ``popcnt``) or an array. ``qc``: the buffer's
    codes (``(cap, w)`` words, copied with each row that enters), or ``(cap, 0)``."""
    cap = qd.shape[0]
    nw = len(q)
    last = flat.shape[0] - PREFETCH_WORDS
    for row in range(a, b):
        p = row * nw
        if p < last:
            _prefetch(flat, p + PREFETCH_WORDS)
        d = 0
        for j in range(nw):
            d += _popcount(flat[p + j] ^ q[j])
        if d < t:
            qd[c] = d
            qi[c] = row + offset
            for x in range(qc.shape[1]):
                qc[c, x] = flat[p + x]
            c += 1
            if c == cap:
                t = _compact(qd, qi, c, k, hist, qc)
                c = k
    return t, c


@njit(nogil=True, cache=True)
def _scan_query(flat: np.ndarray, a: int, b: int, q: np.ndarray, t: int, c: int, qd: np.ndarray,
                qi: np.ndarray, k: int, offset: int, hist: np.ndarray, qc: np.ndarray
                ) -> tuple[int, int]:  # pragma: no cover - compiled
    """:func:`_scan` with the query's words as a tuple for 1 to 8, 12 and 16 words (64 to 512,
    768 and 1024 bits), as the array otherwise."""
    nw = q.shape[0]
    if nw == 6:
        return _scan(flat, a, b, (q[0], q[1], q[2], q[3], q[4], q[5]), t, c, qd, qi, k, offset,
                     hist, qc)
    if nw == 4:
        return _scan(flat, a, b, (q[0], q[1], q[2], q[3]), t, c, qd, qi, k, offset, hist, qc)
    if nw == 8:
        return _scan(flat, a, b, (q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]), t, c, qd, qi,
                     k, offset, hist, qc)
    if nw == 12:
        return _scan(flat, a, b, (q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9],
                                  q[10], q[11]), t, c, qd, qi, k, offset, hist, qc)
    if nw == 16:
        return _scan(flat, a, b, (q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9],
                                  q[10], q[11], q[12], q[13], q[14], q[15]), t, c, qd, qi, k,
                     offset, hist, qc)
    if nw == 2:
        return _scan(flat, a, b, (q[0], q[1]), t, c, qd, qi, k, offset, hist, qc)
    if nw == 1:
        return _scan(flat, a, b, (q[0],), t, c, qd, qi, k, offset, hist, qc)
    return _scan(flat, a, b, q, t, c, qd, qi, k, offset, hist, qc)


@njit(inline="always")
def _push(d: int, index: int, t: int, c: int, qd: np.ndarray, qi: np.ndarray, k: int,
          hist: np.ndarray, qc: np.ndarray, flat: np.ndarray, p: int
          ) -> tuple[int, int]:  # pragma: no cover - compiled
    """Append a row (its words at ``flat[p:]``) to a query's buffer (compacting it when full):
    the new ``(t, c)``."""
    qd[c] = d
    qi[c] = index
    for x in range(qc.shape[1]):
        qc[c, x] = flat[p + x]
    c += 1
    if c == qd.shape[0]:
        t = _compact(qd, qi, c, k, hist, qc)
        c = k
    return t, c


@njit(nogil=True, cache=True)
def _scan4(flat: np.ndarray, a: int, b: int, q0, q1, q2, q3, r: int,  # type: ignore[no-untyped-def]
           limits: np.ndarray, counts: np.ndarray, bd: np.ndarray, bi: np.ndarray, k: int,
           offset: int, hist: np.ndarray, bc: np.ndarray) -> None:  # pragma: no cover - compiled
    """:func:`_scan` for the four queries ``r .. r + 3`` at once (their words as tuples ``q0 ..
    q3``): each row's words are loaded once for the four (10-20% faster for batches)."""
    nw = len(q0)
    t0, t1, t2, t3 = limits[r], limits[r + 1], limits[r + 2], limits[r + 3]
    c0, c1, c2, c3 = counts[r], counts[r + 1], counts[r + 2], counts[r + 3]
    for row in range(a, b):
        p = row * nw
        d0 = 0
        d1 = 0
        d2 = 0
        d3 = 0
        for j in range(nw):
            x = flat[p + j]
            d0 += _popcount(x ^ q0[j])
            d1 += _popcount(x ^ q1[j])
            d2 += _popcount(x ^ q2[j])
            d3 += _popcount(x ^ q3[j])
        if d0 < t0:
            t0, c0 = _push(d0, row + offset, t0, c0, bd[r], bi[r], k, hist,
                            bc[r], flat, p)
        if d1 < t1:
            t1, c1 = _push(d1, row + offset, t1, c1, bd[r + 1], bi[r + 1], k, hist,
                            bc[r + 1], flat, p)
        if d2 < t2:
            t2, c2 = _push(d2, row + offset, t2, c2, bd[r + 2], bi[r + 2], k, hist,
                            bc[r + 2], flat, p)
        if d3 < t3:
            t3, c3 = _push(d3, row + offset, t3, c3, bd[r + 3], bi[r + 3], k, hist,
                            bc[r + 3], flat, p)
    limits[r], limits[r + 1], limits[r + 2], limits[r + 3] = t0, t1, t2, t3
    counts[r], counts[r + 1], counts[r + 2], counts[r + 3] = c0, c1, c2, c3


@njit(inline="always")
def _t4(q: np.ndarray):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return (q[0], q[1], q[2], q[3])


@njit(inline="always")
def _t6(q: np.ndarray):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return (q[0], q[1], q[2], q[3], q[4], q[5])


@njit(inline="always")
def _t8(q: np.ndarray):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return (q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7])


@njit(nogil=True, cache=True)
def _scan_block(flat: np.ndarray, a: int, b: int, queries: np.ndarray, r: int,
                limits: np.ndarray, counts: np.ndarray, bd: np.ndarray, bi: np.ndarray, k: int,
                offset: int, hist: np.ndarray, bc: np.ndarray) -> bool:  # pragma: no cover - compiled
    """:func:`_scan4` of the queries ``r .. r + 3`` for codes of 4, 6 or 8 words (256, 384 and
    512 bits); False (nothing scanned) for other widths."""
    Q = queries
    nw = Q.shape[1]
    if nw == 6:
        _scan4(flat, a, b, _t6(Q[r]), _t6(Q[r + 1]), _t6(Q[r + 2]), _t6(Q[r + 3]), r, limits,
               counts, bd, bi, k, offset, hist, bc)
    elif nw == 8:
        _scan4(flat, a, b, _t8(Q[r]), _t8(Q[r + 1]), _t8(Q[r + 2]), _t8(Q[r + 3]), r, limits,
               counts, bd, bi, k, offset, hist, bc)
    elif nw == 4:
        _scan4(flat, a, b, _t4(Q[r]), _t4(Q[r + 1]), _t4(Q[r + 2]), _t4(Q[r + 3]), r, limits,
               counts, bd, bi, k, offset, hist, bc)
    else:
        return False
    return True


#: the threshold of an empty buffer: every distance is below it
EMPTY_LIMIT = 1 << 62


def new_state(parts: int, nq: int, k: int, words: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Empty buffers of the ``k`` best rows for ``nq`` queries, ``parts`` times (one per thread
    that scans a share of the rows): ``(distances int32 (parts, nq, cap), indices int64 (parts,
    nq, cap), counts int64 (parts, nq), thresholds int64 (parts, nq), codes uint64 (parts, nq,
    cap, words))``, ``cap = max(2 k, k + 256)``; with ``words`` (the codes' width) the buffers
    keep each candidate's code, which saves gathering the winners' codes afterwards."""
    cap = max(2 * k, k + 256)
    return (np.empty((parts, nq, cap), np.int32), np.empty((parts, nq, cap), np.int64),
            np.zeros((parts, nq), np.int64), np.full((parts, nq), EMPTY_LIMIT, np.int64),
            np.empty((parts, nq, cap, words), np.uint64))


@njit(nogil=True, cache=True)
def scan(queries: np.ndarray, codes: np.ndarray, offset: int, k: int, tile_rows: int,
         bd: np.ndarray, bi: np.ndarray, counts: np.ndarray, limits: np.ndarray, bc: np.ndarray
         ) -> None:  # pragma: no cover - compiled
    """Scan the rows ``codes`` (uint64 ``(n, w)``, indices counted from ``offset``) into the
    buffers of the queries (uint64 ``(nq, w)``): one part of :func:`new_state`, ``bd[p]`` etc.
    Rows must come in ascending index order across calls on the same buffers."""
    nq, nw = queries.shape
    n = codes.shape[0]
    flat = codes.reshape(-1)
    hist = np.empty(64 * nw + 2, np.int64)
    for a in range(0, n, tile_rows):
        b = min(n, a + tile_rows)
        first = 0
        while first + 4 <= nq and _scan_block(flat, a, b, queries, first, limits, counts, bd, bi,
                                              k, offset, hist, bc):
            first += 4
        for r in range(first, nq):
            t, c = _scan_query(flat, a, b, queries[r], limits[r], counts[r], bd[r], bi[r], k,
                               offset, hist, bc[r])
            limits[r] = t
            counts[r] = c


@njit(nogil=True, cache=True)
def finish(bd: np.ndarray, bi: np.ndarray, counts: np.ndarray, k: int, bits: int, bc: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The ``k`` best of every part's buffers per query, nearest first, ties to the lower index:
    ``(distances int32 (nq, k), indices int64 (nq, k))``; ``k`` at most the rows scanned. The
    buffers are left holding (at most) their ``k`` best, in row order, with their codes."""
    parts, nq = counts.shape
    hist = np.empty(bits + 2, np.int64)
    starts = np.empty(bits + 2, np.int64)
    out_d = np.empty((nq, k), np.int32)
    out_i = np.empty((nq, k), np.int64)
    for r in range(nq):
        for p in range(parts):
            if counts[p, r] > k:
                _compact(bd[p, r], bi[p, r], counts[p, r], k, hist, bc[p, r])
                counts[p, r] = k
        if parts == 1:
            # a stable counting sort by distance: equal distances stay in row order
            qd = bd[0, r]
            qi = bi[0, r]
            c = counts[0, r]
            hist[:] = 0
            for j in range(c):
                hist[qd[j]] += 1
            s = 0
            for v in range(bits + 2):
                starts[v] = s
                s += hist[v]
            for j in range(c):
                p = starts[qd[j]]
                starts[qd[j]] = p + 1
                out_d[r, p] = qd[j]
                out_i[r, p] = qi[j]
            continue
        total = 0
        for p in range(parts):
            total += counts[p, r]
        keys = np.empty(total, np.int64)
        j = 0
        for p in range(parts):
            for e in range(counts[p, r]):
                keys[j] = (np.int64(bd[p, r, e]) << 40) | bi[p, r, e]
                j += 1
        keys.sort()
        for e in range(k):
            out_d[r, e] = keys[e] >> 40
            out_i[r, e] = keys[e] & ((np.int64(1) << 40) - 1)
    return out_d, out_i


def top_k(queries: np.ndarray, codes: np.ndarray, k: int, offset: int = 0,
          tile_rows: int = TILE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of the rows ``codes`` (uint64 ``(n, w)``) to each query (uint64
    ``(nq, w)``) by Hamming distance: ``(distances int32 (nq, k), indices int64 (nq, k))``,
    nearest first, ties to the lower index, indices counted from ``offset``; ``k <= n``."""
    bd, bi, counts, limits, bc = new_state(1, queries.shape[0], k)
    scan(queries, codes, offset, k, tile_rows, bd[0], bi[0], counts[0], limits[0], bc[0])
    return finish(bd, bi, counts, k, 64 * queries.shape[1], bc)  # type: ignore[no-any-return]


@njit(nogil=True, cache=True)
def sign_select(queries: np.ndarray, codes: np.ndarray, ids: np.ndarray, m: int
                ) -> np.ndarray:  # pragma: no cover - compiled
    """Per query, the ``m`` of its candidates ``ids`` (int64 ``(nq, w)``) with the best
    asymmetric score ``q . s`` (``s`` the +-1 vector of the candidate's packed sign code,
    ``codes`` uint8 ``(nq, w, bytes)``; queries float32 ``(nq, dim)``, padding bits ignored),
    best first, ties to the lower id: int64 ``(nq, m)``. Scores are float64 sums of per-nibble
    tables of the query's partial sums (16 entries for every 4 dimensions)."""
    nq, dim = queries.shape
    w, nb = codes.shape[1], codes.shape[2]
    table = np.zeros((2 * nb, 16), np.float64)
    scores = np.empty(w, np.float64)
    out = np.empty((nq, m), np.int64)
    for r in range(nq):
        table[:] = 0.0
        for h in range(2 * nb):  # nibble h holds dimensions 4h .. 4h + 3, the first in bit 3
            for v in range(16):
                s = 0.0
                for b in range(4):
                    i = 4 * h + b
                    if i < dim:
                        x = np.float64(queries[r, i])
                        s += x if (v >> (3 - b)) & 1 else -x
                table[h, v] = s
        for e in range(w):
            s = 0.0
            for j in range(nb):
                byte = codes[r, e, j]
                s += table[2 * j, byte >> 4] + table[2 * j + 1, byte & 15]
            scores[e] = s
        by_id = np.argsort(ids[r])
        order = by_id[np.argsort(-scores[by_id], kind="mergesort")]
        for e in range(m):
            out[r, e] = ids[r, order[e]]
    return out


def warm() -> None:
    """Run each kernel once on tiny inputs, for the argument types the search uses."""
    codes = np.zeros((8, 6), np.uint64)
    for nq, parts, words in ((1, 2, 6), (4, 1, 0)):
        bd, bi, counts, limits, bc = new_state(parts, nq, 2, words)
        for p in range(parts):
            scan(codes[:nq], codes[4 * p : 4 * p + 4], 4 * p, 2, 4, bd[p], bi[p], counts[p],
                 limits[p], bc[p])
        finish(bd, bi, counts, 2, 384, bc)
    sign_select(np.zeros((1, 384), np.float32), np.zeros((1, 2, 48), np.uint8),
                np.arange(2, dtype=np.int64)[None, :], 1)
