"""The certified int8 screen: exact search that skips rows the int8 codes prove cannot score well.

Every value ``x_j`` of a row whose codes avoid the two end codes lies within ``r_j``
(:func:`embtools.kernels.codes.int8_radius`) of its bucket centre ``x^_j``, so its score has a
bounded error: ``|q . x - q . x^| <= sum_j |q_j| r_j`` and ``| |x| - |x^| | <= |r|``. The screen
computes each row's score interval from the codes (``d`` bytes a row instead of ``4 d``; float32
rounding of that computation is bounded too), takes the k-th largest lower bound ``T`` and keeps
only the rows whose upper bound reaches ``T`` (every row with an end code, whose value may have
been clipped, is kept). At least k rows truly score ``>= T``, so every row of the exact top k is
kept; the float64 re-rank of the kept rows (:func:`embtools.search.refine.rerank`) is therefore
the exact answer: the same rows as the float32 / float64 search. When more rows survive than
``MAX_CANDIDATES`` allows (queries that the codes cannot separate) the query returns None and the
planner's float32 stream answers it.

``store.search(Q, k, screen="int8")`` asks for it (the store must hold int8 codes of the search
dimension, ``store.quantize``). The planner does not choose it by itself: in NumPy on the
development machine, converting the codes to float32 costs more than the float32 product reads
(see the README's quantized figures).

Examples
--------
>>> import numpy as np, embtools as et
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
>>> _ = store.add_embeddings(x, dimension=16)
>>> _ = store.quantize(16, kinds=["int8"])
>>> store.search(x[:2], k=3, screen="int8").equals(store.search(x[:2], k=3))
True
"""

from __future__ import annotations

import numpy as np

from embtools.kernels.codes import has_end_codes, int8_radius, int8_steps
from embtools.search.quantized import DECODE_BYTES, CodeSizes, quantized_spec
from embtools.search.refine import rerank
from embtools.search.request import SearchContext, SearchRequest, TopK
from embtools.storage.quantized import iter_codes

__all__ = ["MAX_CANDIDATES", "certified_int8_top_k", "int8_screen_bytes"]

#: most rows kept per query (beyond it the query goes to the float32 stream)
MAX_CANDIDATES = 20_000
_EPS = float(np.finfo(np.float32).eps)


def int8_screen_bytes(dim: int) -> int:
    """Bytes held for a query's kept rows (position and bound) and their float64 re-rank."""
    return MAX_CANDIDATES * (16 + dim * 12)


def _bounds(req: SearchRequest, q: np.ndarray, ranges: np.ndarray, codes: np.ndarray,
            buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` float64 bounds of the exact scores of one query ``q`` (float64,
    normalised for cosine) against a tile of int8 codes; larger is better (l2: negated)."""
    dim = q.shape[0]
    starts, steps = int8_steps(ranges)
    b = steps.astype(np.float64)
    a = starts.astype(np.float64) + 128.5 * b
    r = int8_radius(ranges)
    n = codes.shape[0]
    cf = buf[:n]
    np.copyto(cf, codes.view(np.int8), casting="unsafe")
    w = (q * b).astype(np.float32)
    const = float(q @ a)
    dots = (cf @ w).astype(np.float64) + const
    # float32 rounding of the product (d + 4 roundings of terms at most 128 |w_j|)
    e1 = (dim + 8) * _EPS * (128.0 * float(np.abs(q * b).sum()) * 1.01 + abs(const))
    big = np.float64(np.inf)
    if req.metric == "dot":
        rad = float(np.abs(q) @ r) + e1
        lo, hi = dots - rad, dots + rad
    else:
        ab = (a * b).astype(np.float32)
        cross = (cf @ ab).astype(np.float64)
        np.square(cf, out=cf)
        sq = (cf @ (b * b).astype(np.float32)).astype(np.float64)
        aa = float(a @ a)
        norms2 = aa + 2.0 * cross + sq
        e2 = (dim + 8) * _EPS * (aa + 256.0 * float(np.abs(a * b).sum()) + 16384.0 * float(b @ b)) * 1.01
        rho = float(np.sqrt(r @ r))
        if req.metric == "cosine":
            rad = float(np.abs(q) @ r) + e1
            num_lo, num_hi = dots - rad, dots + rad
            m_lo = np.sqrt(np.maximum(norms2 - e2, 0.0)) - rho
            m_hi = np.sqrt(norms2 + e2) + rho
            ok = m_lo > 0
            safe_lo = np.where(ok, m_lo, 1.0)
            hi = np.where(num_hi > 0, num_hi / safe_lo, num_hi / m_hi)
            lo = np.where(num_lo > 0, num_lo / m_hi, num_lo / safe_lo)
            hi = np.where(ok, np.minimum(hi, 1.0), big)
            lo = np.where(ok, np.maximum(lo, -1.0), -big)
        else:  # l2: |q - x| within rho of |q - x^|
            qq = float(q @ q)
            v = qq + norms2 - 2.0 * dots
            e3 = e2 + 2.0 * e1 + 4 * _EPS * qq
            d_lo = np.maximum(np.sqrt(np.maximum(v - e3, 0.0)) - rho, 0.0)
            d_hi = np.sqrt(np.maximum(v + e3, 0.0)) + rho
            lo, hi = -(d_hi * d_hi) * (1 + 4 * _EPS), -(d_lo * d_lo) * (1 - 4 * _EPS)
    end = has_end_codes(codes)
    if end.any():
        lo = np.where(end, -big, lo)
        hi = np.where(end, big, hi)
    return lo, hi


def certified_int8_top_k(req: SearchRequest, ctx: SearchContext, sizes: CodeSizes
                         ) -> tuple[TopK, np.ndarray]:
    """The exact top-k of each query (float64 re-rank of the rows the codes cannot rule out), and
    per query whether it was certified (False: the caller searches it another way)."""
    spec = quantized_spec(ctx.source, req.dim, "int8")
    ranges = spec.ranges
    kk = req.kk
    queries = req.queries[:, : req.dim].astype(np.float64)
    if req.metric == "cosine":
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1.0, norms)
    out_s = np.zeros((req.nq, kk), np.float32)
    out_p = np.zeros((req.nq, kk), np.int64)
    ok = np.zeros(req.nq, bool)
    step = max(1, DECODE_BYTES // (4 * req.dim))
    buf = np.empty((step, req.dim), np.float32)
    with ctx.budget.holding(f"int8-screen/{id(out_p)}", sizes.nbytes + int8_screen_bytes(req.dim),
                            "the certified int8 screen", "raise max_memory_gb"):
        for qi in range(req.nq):
            kept = _screen_one(req, ctx, queries[qi], ranges, kk, sizes.rows, step, buf)
            if kept is None:
                continue
            top = rerank(req.subset(slice(qi, qi + 1)), ctx, kept[None, :], kk)
            out_s[qi], out_p[qi] = top.scores[0], top.positions[0]
            ok[qi] = True
    return TopK(out_s, out_p), ok


def _screen_one(req: SearchRequest, ctx: SearchContext, q: np.ndarray, ranges: np.ndarray, kk: int,
                rows: int, step: int, buf: np.ndarray) -> np.ndarray | None:
    """Positions of the rows one query keeps (ascending), or None past MAX_CANDIDATES."""
    best_lo = np.full(0, -np.inf)
    kth = -np.inf
    kept_pos: list[np.ndarray] = []
    kept_hi: list[np.ndarray] = []
    count = 0
    for pos, codes in iter_codes(ctx.source, req.dim, "int8", req.positions, rows):
        for s in range(0, len(pos), step):
            lo, hi = _bounds(req, q, ranges, codes[s : s + step], buf)
            both = np.concatenate([best_lo, lo])
            if both.size > kk:
                best_lo = np.partition(both, both.size - kk)[both.size - kk :]
            else:
                best_lo = both
            if best_lo.size >= kk:
                kth = float(best_lo.min())
            keep = np.flatnonzero(hi >= kth)
            count += keep.size
            kept_pos.append(pos[s : s + step][keep])
            kept_hi.append(hi[keep])
            if count > 4 * MAX_CANDIDATES:  # the final threshold would have to prune a lot
                pos_all, hi_all = np.concatenate(kept_pos), np.concatenate(kept_hi)
                sel = hi_all >= kth
                kept_pos, kept_hi, count = [pos_all[sel]], [hi_all[sel]], int(sel.sum())
                if count > MAX_CANDIDATES:
                    return None
    pos_all = np.concatenate(kept_pos) if kept_pos else np.zeros(0, np.int64)
    hi_all = np.concatenate(kept_hi) if kept_hi else np.zeros(0)
    final = pos_all[hi_all >= kth]
    if final.size > MAX_CANDIDATES or final.size < kk:
        return None
    return np.sort(final)
