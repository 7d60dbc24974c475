"""Compiled float64 re-rank scores, bit for bit those of the NumPy re-rank.

:func:`embtools.search.refine.rerank` scores candidates in float64 by summing the elementwise
products (or squared differences) of a query and a row with ``np.sum`` along the last axis, which
is NumPy's pairwise summation: blocks of at most 128 values summed in eight interleaved
accumulators, longer runs split in two at a multiple of eight. :func:`pairwise_sum` follows the
same order (:func:`sum_program`), so :func:`rerank_scores` returns the same bits as the NumPy path (a test checks it on
every metric) without forming the ``(queries, candidates, dim)`` float64 block in memory.

Load this module through :func:`embtools.kernels.jit.jit_kernels` (it imports numba).

Examples
--------
>>> import numpy as np
>>> q = np.array([[0.6, 0.8]])
>>> rows = np.array([[1, 0], [0, 2]], np.float32)
>>> rerank_scores(q, rows, np.array([[0, 1]]), COSINE).tolist()
[[0.6, 0.8]]
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

__all__ = ["COSINE", "DOT", "L2", "METRICS", "pairwise_sum", "rerank_scores", "sum_program", "warm"]

DOT, COSINE, L2 = 0, 1, 2
#: the metric codes of :func:`rerank_scores`
METRICS = {"dot": DOT, "cosine": COSINE, "l2": L2}


@njit(nogil=True, cache=True)
def _block_sum(a: np.ndarray, lo: int, n: int) -> float:  # pragma: no cover - compiled
    """``a[lo:lo + n].sum()`` for ``n <= 128`` in NumPy's order: eight interleaved accumulators."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    m = n - n % 8
    while i < m:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@functools.lru_cache(maxsize=64)
def sum_program(n: int) -> np.ndarray:
    """NumPy's pairwise summation of ``n`` values as a postfix program ``(steps, 2)``: ``(lo, m)``
    sums the block ``a[lo:lo + m]`` (``m <= 128``), ``(0, -1)`` adds the last two sums (numba does
    not cache recursive functions, so the recursion is unrolled here, once per length).

    Examples
    --------
    >>> sum_program(384).tolist()
    [[0, 96], [96, 96], [0, -1], [192, 96], [288, 96], [0, -1], [0, -1]]
    """
    steps: list[tuple[int, int]] = []

    def split(lo: int, m: int) -> None:
        if m <= 128:
            steps.append((lo, m))
            return
        half = m // 2
        half -= half % 8
        split(lo, half)
        split(lo + half, m - half)
        steps.append((0, -1))

    split(0, int(n))
    return np.array(steps, np.int64).reshape(-1, 2)


@njit(nogil=True, cache=True)
def pairwise_sum(a: np.ndarray, program: np.ndarray, stack: np.ndarray) -> float:  # pragma: no cover
    """``a.sum()`` in NumPy's pairwise order, by the :func:`sum_program` of ``len(a)``
    (``stack``: room for its intermediate sums, ``len(program)`` floats)."""
    sp = 0
    for k in range(program.shape[0]):
        if program[k, 1] < 0:
            stack[sp - 2] += stack[sp - 1]
            sp -= 1
        else:
            stack[sp] = _block_sum(a, program[k, 0], program[k, 1])
            sp += 1
    return stack[0]


@njit(nogil=True, cache=True)
def _rerank_scores(q: np.ndarray, rows: np.ndarray, inv: np.ndarray, metric: int,
                   program: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`rerank_scores` with the :func:`sum_program` of the dimension."""
    g, w = inv.shape
    dim = q.shape[1]
    out = np.empty((g, w))
    buf = np.empty(dim)
    stack = np.empty(len(program))
    norms = np.ones(rows.shape[0])
    if metric == COSINE:
        for r in range(rows.shape[0]):
            for t in range(dim):
                v = np.float64(rows[r, t])
                buf[t] = v * v
            s = np.sqrt(pairwise_sum(buf, program, stack))
            norms[r] = 1.0 if s == 0 else s
    for i in range(g):
        for j in range(w):
            r = inv[i, j]
            if metric == L2:
                for t in range(dim):
                    v = np.float64(rows[r, t]) - q[i, t]
                    buf[t] = v * v
            else:
                for t in range(dim):
                    buf[t] = np.float64(rows[r, t]) * q[i, t]
            s = pairwise_sum(buf, program, stack)
            if metric == COSINE:
                s = min(1.0, max(-1.0, s / norms[r]))
            out[i, j] = s
    return out


def rerank_scores(q: np.ndarray, rows: np.ndarray, inv: np.ndarray, metric: int) -> np.ndarray:
    """float64 scores ``(g, w)`` of queries ``q`` (``(g, dim)`` float64, normalised for cosine)
    against ``rows[inv[i, j]]`` (float32 rows): the dot product, the cosine (divided by the row's
    norm and clipped to [-1, 1]) or the squared L2 distance (``metric``: :data:`METRICS`)."""
    out: np.ndarray = _rerank_scores(q, rows, inv, metric, sum_program(q.shape[1]))
    return out


def warm() -> None:
    """Run the kernel once on tiny inputs."""
    rerank_scores(np.zeros((1, 2)), np.zeros((1, 2), np.float32), np.zeros((1, 1), np.int64), DOT)
