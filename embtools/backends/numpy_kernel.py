"""NumPy top-k selection kernels: exact, ties to the lower index, fast on large score blocks.

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

import numpy as np

__all__ = ["block_top_k", "mask_positions", "select_top_k"]

#: columns of the corpus scored per tile (the scores of one tile, nq x TILE_COLS, stay in cache)
TILE_COLS = 4096
#: queries per tile
TILE_ROWS = 1024


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

    ``groups`` (sorted ascending, 0..n_groups-1) labels each entry; every group has >= k entries.
    """
    order = np.lexsort((index, -values, groups))
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    pick = order[starts[:, None] + np.arange(k)]
    return values[pick], index[pick]


def _sorted_fallback(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a full stable sort; NaN counts as the smallest value."""
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order.astype(np.int64)


def select_top_k(
    s: np.ndarray, k: int, bound: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (largest first, ties to the lower index) of each row of 2-D ``s``; k <= columns.

    ``bound`` is, per row, a value that at least k entries reach (default: the exact k-th value).
    """
    nq, n = s.shape
    if k == 0 or nq == 0:
        return s[:, :0].copy(), np.zeros((nq, 0), dtype=np.int64)
    if bound is None:
        bound = np.partition(s, n - k, axis=1)[:, n - k]
    rows, cols = mask_positions(s >= bound[:, None])
    if rows.size < nq * k or np.bincount(rows, minlength=nq).min() < k:
        return _sorted_fallback(s, k)  # NaN in a row
    return _best_per_group(rows, nq, s[rows, cols], cols.astype(np.int64), k)


def _merge_candidates(
    values: np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray,
    cand_values: np.ndarray,
    cand_indices: np.ndarray,
) -> None:
    """Merge candidates (rows sorted ascending, indices above all current ones) into the running
    top-k ``values``/``indices`` in place."""
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


def block_top_k(q: np.ndarray, c: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows of ``c`` per row of ``q``: ``(values, indices)``, best first, ties to the
    lower index; ``metric`` is "cosine"/"dot" (inner product, largest first) or "l2" (squared
    distance, smallest first). ``q``, ``c``: 2-D float arrays of one dtype; ``1 <= k``.
    """
    nq, nb = q.shape[0], c.shape[0]
    k = min(k, nb)
    l2 = metric == "l2"
    qq = np.einsum("ij,ij->i", q, q)[:, None] if l2 else None
    cc = np.einsum("ij,ij->i", c, c)[None, :] if l2 else None
    dtype = np.result_type(q.dtype, c.dtype)
    out_v = np.empty((nq, k), dtype=dtype)
    out_i = np.empty((nq, k), dtype=np.int64)

    def tile(qs: np.ndarray, q0: int, c0: int, c1: int) -> np.ndarray:
        s = np.matmul(qs, c[c0:c1].T)
        if l2:  # higher is better: the negated squared distance, clamped at 0 like score_block
            assert qq is not None and cc is not None
            s *= 2
            s -= cc[:, c0:c1]
            s -= qq[q0 : q0 + qs.shape[0]]
            np.minimum(s, 0, out=s)
        return s

    for q0 in range(0, nq, TILE_ROWS):
        qs = q[q0 : q0 + TILE_ROWS]
        first = min(nb, max(TILE_COLS, k))
        values, indices = select_top_k(tile(qs, q0, 0, first), k)
        values = np.ascontiguousarray(values)
        threshold = values[:, -1].copy()
        for c0 in range(first, nb, TILE_COLS):
            s = tile(qs, q0, c0, c0 + TILE_COLS)
            # strictly better than the k-th best: a tie loses to the earlier (lower) index
            rows, cols = mask_positions(s > threshold[:, None])
            if rows.size:
                _merge_candidates(values, indices, rows, s[rows, cols], cols + c0)
                threshold = values[:, -1].copy()
        out_v[q0 : q0 + qs.shape[0]] = values
        out_i[q0 : q0 + qs.shape[0]] = indices
    if l2:
        np.negative(out_v, out=out_v)
        out_v += 0.0  # no negative zeros
    return out_v, out_i
