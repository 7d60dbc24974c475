"""Compiled kernel of the certified int8 screen (numba; see :mod:`embtools.kernels.jit`).

:func:`screen_rows` does in one pass over a block of int8 codes what
:func:`embtools.kernels.int8.int8_score_bounds` and the screen's selection do with many NumPy
calls: each row's exact integer product with the query's int8 vector (float32 sums of integer
products, exact below ``2**24``: the caller checks ``dim * 128 * 127 < 2**24``), its score
interval (the same formulas, from the terms the screen keeps per row), a running heap of the
``k`` largest lower bounds, and the list of rows whose upper bound reaches the heap's minimum.
Rows ruled out are never written anywhere, so the screen reads ``d`` bytes a row and nothing
else. A :class:`ScreenState` holds one thread's heap and kept rows; two states (two halves of
the rows, on two threads) are combined by :func:`finish`.

Examples
--------
>>> import numpy as np
>>> st = ScreenState.new(k=1, capacity=8)
>>> codes = np.array([[1, 2], [3, 4], [-5, 0]], np.int8)
>>> inv = np.ones(3)
>>> screen_rows(codes, np.array([1.0, 1.0], np.float32), np.arange(3), 1.0, 0.0, 0.5, METRIC_DOT,
...             inv, inv, np.zeros(3), 0.0, 0.0, 0.0, False, *st.arrays, 100)
>>> finish([st]).tolist()  # rows whose upper bound reaches the best lower bound (7 - 0.5)
[1]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["METRIC_COSINE", "METRIC_DOT", "METRIC_L2", "ScreenState", "finish", "screen_rows", "warm"]

METRIC_COSINE, METRIC_DOT, METRIC_L2 = 0, 1, 2
_EPS = float(np.finfo(np.float32).eps)
#: state slots: kept count, failed (more than ``limit`` kept rows after a compaction)
_COUNT, _FAILED = 0, 1


@dataclass
class ScreenState:
    """One thread's running state: a min-heap of the best lower bounds (``heap``, ``k`` slots,
    -inf until filled, so its root is the threshold), the kept rows (``kept_pos``, ``kept_hi``,
    ``capacity`` slots) and the counters."""

    heap: np.ndarray
    kept_pos: np.ndarray
    kept_hi: np.ndarray
    state: np.ndarray

    @classmethod
    def new(cls, k: int, capacity: int) -> ScreenState:
        return cls(np.full(k, -np.inf), np.empty(capacity, np.int64), np.empty(capacity),
                   np.zeros(2, np.int64))

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.heap, self.kept_pos, self.kept_hi, self.state

    @property
    def failed(self) -> bool:
        return bool(self.state[_FAILED])


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _int_dot(codes: np.ndarray, i: int, w: np.ndarray) -> float:
    """``codes[i] . w`` of int8 codes and an integer-valued float32 vector: every partial sum is
    an integer below ``2**24``, so the float32 sum is exact in any order (hence ``reassoc``,
    which lets LLVM vectorise it)."""
    acc = np.float32(0.0)
    for j in range(codes.shape[1]):
        acc += np.float32(codes[i, j]) * w[j]
    return float(acc)


@njit(nogil=True, cache=True)
def _heap_replace_min(heap: np.ndarray, value: float) -> None:
    """Replace the smallest value of the full min-heap ``heap`` by ``value`` (larger)."""
    n = heap.shape[0]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[c] >= value:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = value


@njit(nogil=True, cache=True)
def screen_rows(codes: np.ndarray, w: np.ndarray, pos: np.ndarray, alpha: float, const: float,
                rad: float, metric: int, inv_lo: np.ndarray, inv_hi: np.ndarray, terms: np.ndarray,
                qq: float, e3: float, rho: float, skip_end: bool, heap: np.ndarray, kept_pos: np.ndarray,
                kept_hi: np.ndarray, state: np.ndarray, limit: int) -> None:
    """Bound each row of ``codes`` (int8 ``(n, d)``; positions ``pos``) and keep those whose
    upper bound reaches the ``k``-th largest lower bound so far (see the module docstring).

    ``alpha``, ``w``: the query's int8 vector as float32 and its scale; ``const``, ``rad``: the
    centre offset and the radius of :func:`embtools.kernels.int8.int8_score_bounds`. Per row:
    ``inv_lo``/``inv_hi`` (cosine) and ``terms`` (dot: NaN marks an end code; l2: the centres'
    squared norms), ``qq``/``e3``/``rho`` for l2. ``skip_end``: rows that bound nothing (NaN
    ``terms`` or ``inv_lo``) are left out (the caller scores them exactly), else they are kept
    with bounds ``(-inf, inf)``. When the kept rows fill ``kept_pos`` they
    are compacted against the current threshold; more than ``limit`` left sets the failed flag
    and the scan stops."""
    cap = kept_pos.shape[0]
    count = state[_COUNT]
    kth = heap[0]
    inf = np.inf
    for i in range(codes.shape[0]):
        if skip_end and (terms[i] != terms[i] or inv_lo[i] != inv_lo[i]):
            continue
        dot = _int_dot(codes, i, w) * alpha + const
        if metric == METRIC_COSINE:
            a, b = inv_lo[i], inv_hi[i]
            if a != a:  # an end code or a norm that may be zero: bounds nothing
                lo, hi = -inf, inf
            else:
                n_lo, n_hi = dot - rad, dot + rad
                hi = min(max(n_hi * b, n_hi * a), 1.0)
                lo = max(min(n_lo * b, n_lo * a), -1.0)
        elif metric == METRIC_DOT:
            if terms[i] != terms[i]:
                lo, hi = -inf, inf
            else:
                lo, hi = dot - rad, dot + rad
        else:
            n2 = terms[i]
            if n2 != n2:
                lo, hi = -inf, inf
            else:
                v = qq + n2 - 2.0 * dot
                d_lo = max(np.sqrt(max(v - e3, 0.0)) - rho, 0.0)
                d_hi = np.sqrt(max(v + e3, 0.0)) + rho
                lo = -(d_hi * d_hi) * (1 + 4 * _EPS)
                hi = -(d_lo * d_lo) * (1 - 4 * _EPS)
        if lo > kth:
            _heap_replace_min(heap, lo)
            kth = heap[0]
        if hi >= kth:
            if count == cap:  # compact against the threshold reached so far
                kept = 0
                for j in range(count):
                    if kept_hi[j] >= kth:
                        kept_pos[kept] = kept_pos[j]
                        kept_hi[kept] = kept_hi[j]
                        kept += 1
                count = kept
                if count > limit or count == cap:
                    state[_COUNT], state[_FAILED] = count, 1
                    return
            kept_pos[count] = pos[i]
            kept_hi[count] = hi
            count += 1
    state[_COUNT] = count


def finish(states: list[ScreenState],
           extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The kept positions of all ``states`` (ascending) whose upper bound reaches the ``k``-th
    largest lower bound of them all; ``extra``: ``(positions, lower, upper)`` of rows bounded
    outside the kernel (the rows it skipped), taken in the same way."""
    lows = [s.heap for s in states]
    kept = [(s.kept_pos[: s.state[_COUNT]], s.kept_hi[: s.state[_COUNT]]) for s in states]
    if extra is not None:
        lows.append(extra[1])
        kept.append((extra[0], extra[2]))
    low = np.concatenate(lows)
    k = states[0].heap.shape[0]
    kth = float(np.partition(low, low.size - k)[low.size - k])  # -inf: fewer than k rows
    return np.sort(np.concatenate([pos[hi >= kth] for pos, hi in kept]))


def warm() -> None:
    """Run the kernel once on tiny inputs, for the argument types the screen uses."""
    one = np.ones(1)
    for metric in (METRIC_COSINE, METRIC_DOT, METRIC_L2):
        st = ScreenState.new(1, 2)
        screen_rows(np.zeros((1, 4), np.int8), np.ones(4, np.float32), np.zeros(1, np.int64), 1.0,
                    0.0, 0.0, metric, one, one, one, 1.0, 0.0, 0.0, False, *st.arrays, 1)
