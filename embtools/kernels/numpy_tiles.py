"""The NumPy tile kernels: exact top-k selection, ties to the lower index, fast on large blocks.

`select_top_k` picks the best k of each row of a score matrix from the entries that reach a lower
bound of the row's k-th best. `block_top_k` fuses scoring and selection: it scores the corpus block
in tiles of columns (sgemm through ``np.matmul``), keeps each query's current top k and threshold,
and only looks at the few entries of later tiles that beat the threshold, so the score matrix is
never held whole and the selection costs about one comparison per score.

Examples
--------
>>> import numpy as np
>>> values, indices = select_top_k(np.array([[0.5, 0.9, 0.5, 0.1]], dtype=np.float32), 3)
>>> indices.tolist()
[[1, 0, 2]]
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import numpy as np

from embtools.kernels.threads import ForkSafePool

__all__ = [
    "block_top_k",
    "inverse_norms",
    "kth_bound",
    "kth_value",
    "mask_positions",
    "matvec",
    "merge_sorted",
    "numpy_matmul_t",
    "row_dots",
    "select_top_k",
    "select_top_k_1d",
    "tile_bytes",
    "tile_cols",
]

MatmulT = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

#: columns of the corpus scored per tile (the scores of one tile, nq x TILE_COLS, stay in cache)
TILE_COLS = 4096
#: ... and up to this many columns per wanted result (k): a large k wants few, wide tiles
TILE_COLS_PER_K = 64
#: ... as long as a tile's scores and mask stay under this many bytes (per thread)
TILE_BYTES = 32 * 1024**2
#: queries per tile
TILE_ROWS = 1024
#: threads that split the rows of an unaligned matrix-vector product (einsum is single-threaded)
THREADS = min(2, os.cpu_count() or 1)
#: threads that split the queries of a large block. One: BLAS already spreads each tile's matrix
#: product over the cores, and a second Python thread oversubscribes them (on 2 cores, 1000 x
#: 200,000 x 384: 0.87-0.96x FAISS with one thread, 0.72-0.88x with two)
QUERY_THREADS = 1
#: fewest queries per thread
MIN_THREAD_ROWS = 64
#: fewest block rows per thread of an unaligned matrix-vector product
MIN_THREAD_MATVEC_ROWS = 8192


def mask_positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a sparse 2-D boolean mask, scanning it eight bytes at a time."""
    width = mask.shape[1]
    flat = np.ascontiguousarray(mask).reshape(-1)
    n8 = flat.size - flat.size % 8
    words = flat[:n8].view(np.uint64)
    hit_words = np.flatnonzero(words)
    sub_rows, sub_bytes = np.nonzero(flat[:n8].reshape(-1, 8)[hit_words])
    pos = hit_words[sub_rows] * 8 + sub_bytes
    if n8 < flat.size:
        pos = np.concatenate([pos, n8 + np.flatnonzero(flat[n8:])])
    rows, cols = np.divmod(pos, width)
    return rows, cols


def _best_per_group(
    groups: np.ndarray, n_groups: int, values: np.ndarray, index: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` entries of every group after ordering by value (descending) then index.

    ``groups`` labels each entry (0..n_groups-1, sorted ascending; every group has >= k entries
    and, within a group, entries in ascending ``index`` order).
    """
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    width = int(counts.max())
    if n_groups * width <= 4 * groups.size + 65536:
        # dense rows padded with -inf: a stable sort on the value keeps ties in index order
        rank = np.arange(groups.size) - starts[groups]
        dense_v = np.full((n_groups, width), -np.inf, dtype=values.dtype)
        dense_i = np.zeros((n_groups, width), dtype=np.int64)
        dense_v[groups, rank] = values
        dense_i[groups, rank] = index
        order = np.argsort(-dense_v, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dense_v, order, 1), np.take_along_axis(dense_i, order, 1)
    order = np.lexsort((index, -values, groups))  # a few groups hold many entries
    pick = order[starts[:, None] + np.arange(k)]
    return values[pick], index[pick]


def _sorted_fallback(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a full stable sort; NaN counts as the smallest value."""
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order.astype(np.int64)


def kth_value(s: np.ndarray, k: int) -> np.ndarray:
    """Per row of 2-D ``s``, its k-th largest value (``1 <= k <= columns``).

    Examples
    --------
    >>> kth_value(np.array([[0.5, 0.9, 0.1]]), 2).tolist()
    [0.5]
    """
    n = s.shape[1]
    return np.partition(s, n - k, axis=1)[:, n - k]


def kth_bound(s: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``s``, a value at most its k-th largest that few other entries reach.

    The columns are dealt into ``g >> k`` strided groups; the k-th largest group maximum is reached
    by k distinct entries, so it never exceeds the k-th largest entry, and with many groups only
    about k * k / g entries beyond the true top k reach it. Small rows use the exact k-th value.
    """
    n = s.shape[1]
    groups = max(256, 16 * k)
    if n < 4 * groups:
        return np.partition(s, n - k, axis=1)[:, n - k]
    width = n // groups
    maxima = s[:, : width * groups].reshape(s.shape[0], width, groups).max(axis=1)
    return np.partition(maxima, groups - k, axis=1)[:, groups - k]


def select_top_k(
    s: np.ndarray, k: int, bound: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (largest first, ties to the lower index) of each row of 2-D ``s``; k <= columns.

    ``bound`` is, per row, a value that at least k entries reach (default: :func:`kth_bound`).
    """
    nq = s.shape[0]
    if k == 0 or nq == 0:
        return s[:, :0].copy(), np.zeros((nq, 0), dtype=np.int64)
    if bound is None:
        bound = kth_bound(s, k)
    rows, cols = mask_positions(s >= bound[:, None])
    if rows.size < nq * k or np.bincount(rows, minlength=nq).min() < k:
        return _sorted_fallback(s, k)  # NaN in a row
    return _best_per_group(rows, nq, s[rows, cols], cols.astype(np.int64), k)


def select_top_k_1d(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (largest first, ties to the lower index) of a 1-D ``s``; ``k <= len(s)``.

    One ``np.partition`` for the k-th largest value, then only the entries above it (and the
    first of those equal to it) are sorted: about one pass over ``s``. NaN counts as the
    smallest value.

    Examples
    --------
    >>> v, i = select_top_k_1d(np.array([0.5, 0.9, 0.5, 0.1, 0.5], np.float32), 3)
    >>> i.tolist(), v.tolist()
    ([1, 0, 2], [0.8999999761581421, 0.5, 0.5])
    """
    n = s.shape[0]
    if k <= 0:
        return s[:0].copy(), np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(s, n - k)[n - k]  # NaN sorts last: a NaN here means NaN in s
        above = np.flatnonzero(s > kth)
        ties = np.flatnonzero(s == kth)[: k - above.size]
        if above.size + ties.size < k:  # NaN among the best k
            v, i = _sorted_fallback(s[None, :], k)
            return v[0], i[0]
        idx = np.concatenate([above, ties])
    else:
        if np.isnan(s).any():
            v, i = _sorted_fallback(s[None, :], k)
            return v[0], i[0]
        idx = np.arange(n, dtype=np.int64)
    vals = s[idx]
    order = np.lexsort((idx, -vals))  # value descending, then index ascending
    return vals[order], idx[order].astype(np.int64, copy=False)


def matvec(c: np.ndarray, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``c @ q`` for a 2-D ``c`` and 1-D ``q``: one BLAS gemv over the whole block.

    A single query's scores are a memory-bound matrix-vector product. One call per block (not
    one per tile of a few thousand rows) keeps BLAS's thread start-up off the critical path,
    which matters most when the other cores are busy. A block that is not 4-byte aligned (a
    zero-copy view of a data file whose values start at an odd offset) cannot go to BLAS, and
    NumPy's fallback matmul loop is slow: ``np.einsum`` streams it with unaligned SIMD loads.
    """
    if c.flags.aligned and q.flags.aligned:
        return np.matmul(c, q, out=out)  # type: ignore[no-any-return]
    n = c.shape[0]
    if out is None:
        out = np.empty(n, dtype=np.result_type(c.dtype, q.dtype))
    if THREADS < 2 or n < THREADS * MIN_THREAD_MATVEC_ROWS:
        return np.einsum("ij,j->i", c, q, out=out)  # type: ignore[no-any-return]
    # einsum runs on one thread (GIL released): split the rows over the kernel's threads
    cuts = [n * t // THREADS for t in range(THREADS + 1)]
    futures = [
        _POOL.get().submit(np.einsum, "ij,j->i", c[a:b], q, out=out[a:b])
        for a, b in itertools.pairwise(cuts[1:])
    ]
    np.einsum("ij,j->i", c[: cuts[1]], q, out=out[: cuts[1]])
    for f in futures:
        f.result()
    return out


#: smallest and largest squared row norm whose inverse norm scales float32 scores safely
_SAFE_SQ = (2.0**-100, 2.0**100)


def inverse_norms(block: np.ndarray) -> np.ndarray | None:
    """``1 / ||row||`` of a 2-D float block in its dtype (0 for zero rows); None when a row's
    squared norm is outside the safe range (tiny squares lose precision or underflow, large ones
    overflow), where the block must be normalised by rescaling first."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        sq = np.asarray(row_dots(np.asarray(block)))
    lo, hi = _SAFE_SQ
    nonzero = sq != 0
    if not bool(np.all((sq >= lo) & (sq <= hi) | ~nonzero)):
        return None
    if not bool(nonzero.all()) and bool(np.any(block[~nonzero])):
        return None  # a row of tiny values whose squares underflow to 0
    inv = np.sqrt(sq, out=sq)
    return np.divide(1.0, inv, out=inv, where=nonzero)


def row_dots(c: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Squared L2 norm of each row of 2-D ``c`` (one pass; aligned or not)."""
    return np.einsum("ij,ij->i", c, c, out=out)  # type: ignore[no-any-return]


def _merge_candidates(
    values: np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray,
    cand_values: np.ndarray,
    cand_indices: np.ndarray,
) -> None:
    """Merge candidates (rows ascending; within a row, indices ascending and above all current
    ones) into the running top-k ``values``/``indices`` in place."""
    k = values.shape[1]
    touched, labels = np.unique(rows, return_inverse=True)
    nt = touched.size
    groups = np.concatenate([np.repeat(np.arange(nt), k), labels])
    vals = np.concatenate([values[touched].reshape(-1), cand_values])
    idx = np.concatenate([indices[touched].reshape(-1), cand_indices])
    order = np.argsort(groups, kind="stable")
    new_v, new_i = _best_per_group(groups[order], nt, vals[order], idx[order], k)
    values[touched] = new_v
    indices[touched] = new_i


def _merge_pending(
    values: np.ndarray,
    indices: np.ndarray,
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Merge the candidates of several tiles (each in row-major order, tiles in column order)."""
    if len(pending) == 1:
        rows, cand_v, cand_i = pending[0]
    else:
        rows = np.concatenate([p[0] for p in pending])
        order = np.argsort(rows, kind="stable")  # by query; within one, tiles stay in order
        rows = rows[order]
        cand_v = np.concatenate([p[1] for p in pending])[order]
        cand_i = np.concatenate([p[2] for p in pending])[order]
    _merge_candidates(values, indices, rows, cand_v, cand_i)


def _block_rows(
    q: np.ndarray,
    c: np.ndarray,
    k: int,
    qq: np.ndarray | None,
    cc: np.ndarray | None,
    out_v: np.ndarray,
    out_i: np.ndarray,
    matmul: MatmulT,
    scale: np.ndarray | None = None,
    running: tuple[np.ndarray, np.ndarray] | None = None,
    offset: int = 0,
) -> None:
    """:func:`block_top_k` for the queries ``q``, written into ``out_v``/``out_i`` (indices
    + ``offset``); ``running`` (higher is better) is merged in: see :func:`block_top_k`."""
    nq, nb = q.shape[0], c.shape[0]
    # tiles widen with k: every merge re-sorts the k kept per query, so a large k (a funnel's
    # shortlist) wants few, wide tiles; the first tile holds at least k columns
    width = tile_cols(k, nq)
    first = min(nb, width)
    # one scores buffer and one mask buffer, reused by every tile (fresh pages are slow to fault in)
    size = min(nq, TILE_ROWS) * first
    scores_buf = np.empty(size, dtype=out_v.dtype)
    mask_buf = np.empty(size, dtype=bool)
    # a block that is not aligned (a view of a data file) cannot go to BLAS: copy tile by tile
    cbuf = None if c.flags.aligned else np.empty((first, c.shape[1]), dtype=c.dtype)

    def tile(qs: np.ndarray, q0: int, c0: int, c1: int) -> np.ndarray:
        width = min(c1, nb) - c0
        s = scores_buf[: qs.shape[0] * width].reshape(qs.shape[0], width)
        block = c[c0 : c0 + width]
        if cbuf is not None:
            block = cbuf[:width]
            np.copyto(block, c[c0 : c0 + width])
        matmul(qs, block, s)
        if scale is not None:
            s *= scale[c0 : c0 + width]
        if qq is not None and cc is not None:
            # l2, higher is better: the negated squared distance, clamped at 0 like score_block
            s *= 2
            s -= cc[:, c0 : c0 + width]
            s -= qq[q0 : q0 + qs.shape[0]]
            np.minimum(s, 0, out=s)
        return s

    for q0 in range(0, nq, TILE_ROWS):
        qs = q[q0 : q0 + TILE_ROWS]
        if running is None:
            values, indices = select_top_k(tile(qs, q0, 0, first), k)
            values = np.ascontiguousarray(values)
            indices += offset
            start = first
        else:
            # the k best of the earlier blocks (indices below offset): only entries strictly
            # above their k-th best are merged in, no full selection on a first tile
            values = running[0][q0 : q0 + qs.shape[0]].astype(out_v.dtype, copy=True)
            indices = running[1][q0 : q0 + qs.shape[0]].astype(np.int64, copy=True)
            start = 0
        threshold = values[:, -1:].copy()
        # candidates wait until about k/4 per query have come (a merge re-sorts the k kept per
        # query): the threshold lags a little, but a large k is merged a few times, not per tile
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        waiting = 0
        for c0 in range(start, nb, width):
            s = tile(qs, q0, c0, c0 + width)
            # strictly better than the k-th best: a tie loses to the earlier (lower) index
            mask = np.greater(s, threshold, out=mask_buf[: s.size].reshape(s.shape))
            rows, cols = mask_positions(mask)
            if rows.size:
                pending.append((rows, s[rows, cols], cols + (c0 + offset)))
                waiting += rows.size
            if pending and (waiting * 4 >= qs.shape[0] * k or c0 + width >= nb):
                _merge_pending(values, indices, pending)
                threshold = values[:, -1:].copy()
                pending, waiting = [], 0
        out_v[q0 : q0 + qs.shape[0]] = values
        out_i[q0 : q0 + qs.shape[0]] = indices


def tile_cols(k: int, nq: int) -> int:
    """Columns (block rows) per tile of :func:`block_top_k` for ``k`` results and ``nq``
    queries: wide for a large k (fewer merges), within TILE_BYTES of scores and mask."""
    wide = min(TILE_COLS_PER_K * k, TILE_BYTES // (5 * max(1, min(nq, TILE_ROWS))))
    return max(TILE_COLS, wide, k)


def tile_bytes(nq: int, k: int, dim: int) -> int:
    """Upper bound of :func:`block_top_k`'s workspace for ``nq`` queries, whatever the block
    size: per thread a tile of scores and its mask, and a tile of rows for unaligned blocks
    (a block shorter than a tile needs that fraction of it)."""
    cols = tile_cols(k, nq)
    return QUERY_THREADS * (min(nq, TILE_ROWS) * cols * 5 + cols * dim * 4)


def numpy_matmul_t(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = a @ b.T`` with NumPy (sgemm/dgemm)."""
    np.matmul(a, b.T, out=out)


def block_top_k(
    q: np.ndarray,
    c: np.ndarray,
    k: int,
    metric: str,
    matmul: MatmulT = numpy_matmul_t,
    scale: np.ndarray | None = None,
    running: tuple[np.ndarray, np.ndarray] | None = None,
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows of ``c`` per row of ``q``: ``(values, indices)``, best first, ties to the
    lower index; ``metric`` is "cosine"/"dot" (inner product, largest first) or "l2" (squared
    distance, smallest first). ``q``, ``c``: 2-D float arrays of one dtype; ``1 <= k``.
    ``matmul(a, b, out)`` writes ``a @ b.T`` into ``out`` (the torch backend passes torch's).
    ``scale`` (cosine/dot only): a per-row factor of ``c`` applied to the inner products, e.g. the
    inverse row norms, so that an unnormalised block scores as if normalised.
    ``offset`` is added to the returned indices (the block's first global position).
    ``running``: ``(values, indices)``, the best ``k`` of the earlier blocks per query (sorted,
    indices below ``offset``; l2 values are distances): the result is then the best ``k`` of
    those and this block together. Only entries strictly better than the running k-th best are
    looked at (ties go to the earlier rows), so every tile is one comparison, no full selection.

    A single query is scored in one matrix-vector pass and selected with one partition
    (:func:`select_top_k_1d`). Large problems are split by query rows over two threads: NumPy
    releases the GIL in matmul and in the comparisons, so one thread's selection overlaps the
    other's matrix product.
    """
    nq, nb = q.shape[0], c.shape[0]
    l2 = metric == "l2"
    if scale is not None and l2:
        raise ValueError("scale applies to inner products (cosine, dot), not to l2")
    if running is not None and (
        running[0].shape != (nq, k) or running[1].shape != (nq, k) or np.isnan(running[0]).any()
    ):  # a short running list (a first block under k rows) or NaN: score, then merge
        v, i = block_top_k(q, c, k, metric, matmul, scale, None, offset)
        return merge_sorted(running[0], running[1], v, i, k, largest=not l2)
    if nq == 1:
        v, i = _single_top_k(q, c, min(k, nb), l2, matmul, scale)
        i += offset
        if running is None:
            return v, i
        return merge_sorted(running[0], running[1], v, i, k, largest=not l2)
    if running is None:
        k = min(k, nb)
    elif l2:
        running = (-running[0], running[1])  # higher is better inside the kernel
    qq = np.einsum("ij,ij->i", q, q)[:, None] if l2 else None
    cc = np.einsum("ij,ij->i", c, c)[None, :] if l2 else None
    dtype = np.result_type(q.dtype, c.dtype)
    out_v = np.empty((nq, k), dtype=dtype)
    out_i = np.empty((nq, k), dtype=np.int64)
    if QUERY_THREADS > 1 and nq >= 2 * MIN_THREAD_ROWS and nb >= 2 * TILE_COLS:
        parts = np.array_split(np.arange(nq), QUERY_THREADS)
        futures = [
            _POOL.get().submit(
                _block_rows,
                q[p[0] : p[-1] + 1],
                c,
                k,
                None if qq is None else qq[p[0] : p[-1] + 1],
                cc,
                out_v[p[0] : p[-1] + 1],
                out_i[p[0] : p[-1] + 1],
                matmul,
                scale,
                None if running is None else (running[0][p[0] : p[-1] + 1], running[1][p[0] : p[-1] + 1]),
                offset,
            )
            for p in parts
        ]
        for f in futures:
            f.result()
    else:
        _block_rows(q, c, k, qq, cc, out_v, out_i, matmul, scale, running, offset)
    if l2:
        np.negative(out_v, out=out_v)
        out_v += 0.0  # no negative zeros
    return out_v, out_i


def merge_sorted(
    values_a: np.ndarray,
    indices_a: np.ndarray,
    values_b: np.ndarray,
    indices_b: np.ndarray,
    k: int,
    largest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` per row of two top-k lists (2-D, global indices): value order (descending
    when ``largest``), ties by lower index, NaN last."""
    values = np.concatenate([values_a, values_b], axis=1)
    indices = np.concatenate([indices_a, indices_b], axis=1).astype(np.int64, copy=False)
    key = -values if largest else values
    key = np.where(np.isnan(key), np.inf, key)
    order = np.lexsort((indices, key), axis=-1)[:, :k]
    return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)


def _single_top_k(
    q: np.ndarray,
    c: np.ndarray,
    k: int,
    l2: bool,
    matmul: MatmulT,
    scale: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`block_top_k` for one query: one pass for the scores, one partition to select."""
    dtype = np.result_type(q.dtype, c.dtype)
    if matmul is numpy_matmul_t and dtype in (np.float32, np.float64):
        s = matvec(c, q[0]).astype(dtype, copy=False)
    else:
        out = np.empty((1, c.shape[0]), dtype=dtype)
        matmul(q, c, out)
        s = out[0]
    if scale is not None:
        s *= scale
    if l2:
        # higher is better: the negated squared distance, clamped at 0 like score_block
        s *= 2
        s -= row_dots(c) if c.dtype == dtype else np.einsum("ij,ij->i", c, c).astype(dtype)
        s -= np.dot(q[0], q[0])
        np.minimum(s, 0, out=s)
    values, indices = select_top_k_1d(s, k)
    if l2:
        np.negative(values, out=values)
        values += 0.0  # no negative zeros
    return values[None, :], indices[None, :]


_POOL = ForkSafePool(max(THREADS, QUERY_THREADS), "embtools-topk")
