"""Certified score bounds from int8 codes (the kernel of the certified int8 screen).

A row whose int8 codes (:func:`embtools.kernels.codes.encode_int8`) avoid the two end codes has
every value ``x_j`` within ``r_j`` (:func:`embtools.kernels.codes.int8_radius`) of its bucket
centre ``x^_j = a_j + b_j c_j`` (``a_j = lo_j + 128.5 b_j``, ``b_j`` the step). So for a float64
query ``q``:

- ``|q . x - q . x^| <= sum_j |q_j| r_j`` (dot), and ``q . x^ = sum_j (q_j b_j) c_j + q . a``:
  one product of the codes with a query-dependent vector;
- ``| |x| - |x^| | <= |r|`` (cosine, l2), with ``|x^|^2`` from two more products of the codes;

and the float32 rounding of those products is bounded too. :func:`int8_score_bounds` returns
``(lower, upper)`` of every row's exact score, larger is better (l2: the negated squared
distance). Rows with an end code (a value that may have been clipped by the sampled ranges,
which bounds nothing) get ``(-inf, inf)``. Codes may be given as int8 or as the raw uint8 bytes
of the ``emb_<d>_i8`` column.

Examples
--------
>>> import numpy as np
>>> from embtools.kernels.codes import encode_int8, int8_ranges
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(200, 8)).astype(np.float32)
>>> ranges = int8_ranges(x[:50])  # a sample: some rows are clipped
>>> codes = encode_int8(x, ranges)
>>> q = rng.normal(size=8)
>>> lo, hi = int8_score_bounds(q, codes, ranges, "dot")
>>> exact = x.astype(np.float64) @ q
>>> bool(np.all((lo <= exact) & (exact <= hi)))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embtools.kernels.codes import has_end_codes, int8_radius, int8_steps

__all__ = ["Int8Bounds", "int8_score_bounds"]

_EPS = float(np.finfo(np.float32).eps)
_METRICS = ("cosine", "dot", "l2")


@dataclass(frozen=True)
class Int8Bounds:
    """What the bounds of one query need from the ranges: per dimension the step ``b``, the
    centre offset ``a`` and the radius ``r`` (float64), made once per search.

    Examples
    --------
    >>> b = Int8Bounds.of(np.array([[0.0, -1.0], [255.0, 1.0]], np.float32))
    >>> b.step.tolist()[0], round(float(b.offset[0]), 3)
    (1.0, 128.5)
    """

    step: np.ndarray
    offset: np.ndarray
    radius: np.ndarray

    @classmethod
    def of(cls, ranges: np.ndarray) -> Int8Bounds:
        starts, steps = int8_steps(ranges)
        b = steps.astype(np.float64)
        return cls(b, starts.astype(np.float64) + 128.5 * b, int8_radius(ranges))


def _as_int8(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes)
    if c.dtype == np.uint8:
        return c.view(np.int8)
    if c.dtype != np.int8:
        raise TypeError(f"int8 codes must be int8 or uint8 bytes, not {c.dtype}")
    return c


def int8_score_bounds(
    query: np.ndarray,
    codes: np.ndarray,
    ranges: np.ndarray | Int8Bounds,
    metric: str,
    buf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` float64 bounds of the exact scores of one query against int8 codes.

    ``query``: 1-D, float64 (for cosine, normalised by the caller; a zero query scores 0);
    ``codes``: ``(n, d)`` int8 or uint8 bytes; ``ranges``: the ``(2, d)`` ranges the codes were
    made with (or their :class:`Int8Bounds`); ``metric``: ``cosine``, ``dot`` or ``l2`` (larger
    is better: l2 bounds the negated squared distance); ``buf``: an optional float32 ``(>= n, d)``
    workspace. Rows holding an end code get ``(-inf, inf)``.

    Examples
    --------
    >>> r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    >>> lo, hi = int8_score_bounds(np.array([1.0, 0.0]), np.array([[0, 0], [127, 0]], np.int8), r, "dot")
    >>> bool(lo[0] <= 0.005 <= hi[0]), float(hi[1])  # code 0 holds 0.005
    (True, inf)
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, not {metric!r}")
    bd = ranges if isinstance(ranges, Int8Bounds) else Int8Bounds.of(ranges)
    c8 = _as_int8(codes)
    q = np.asarray(query, dtype=np.float64)
    dim = q.shape[0]
    if c8.ndim != 2 or c8.shape[1] != dim:
        raise ValueError(f"codes {c8.shape} do not match a query of dimension {dim}")
    n = c8.shape[0]
    if buf is None or buf.shape[0] < n or buf.shape[1] != dim:
        buf = np.empty((n, dim), np.float32)
    cf = buf[:n]
    np.copyto(cf, c8, casting="unsafe")
    b, a, r = bd.step, bd.offset, bd.radius
    w = (q * b).astype(np.float32)
    const = float(q @ a)
    dots = (cf @ w).astype(np.float64) + const
    # float32 rounding of the product: d + 8 roundings of partial sums of terms <= 128 |w_j|
    e1 = (dim + 8) * _EPS * (128.0 * float(np.abs(q * b).sum()) * 1.01 + abs(const))
    big = np.inf
    if metric == "dot":
        rad = float(np.abs(q) @ r) + e1
        lo, hi = dots - rad, dots + rad
    else:
        cross = (cf @ (a * b).astype(np.float32)).astype(np.float64)
        np.square(cf, out=cf)
        sq = (cf @ (b * b).astype(np.float32)).astype(np.float64)
        aa = float(a @ a)
        norms2 = aa + 2.0 * cross + sq
        e2 = (dim + 8) * _EPS * (aa + 256.0 * float(np.abs(a * b).sum()) + 16384.0 * float(b @ b)) * 1.01
        rho = float(np.sqrt(r @ r))
        if metric == "cosine":
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
    end = has_end_codes(c8)
    if end.any():
        lo = np.where(end, -big, lo)
        hi = np.where(end, big, hi)
    return lo, hi
