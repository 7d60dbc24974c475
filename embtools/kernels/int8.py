"""Certified score bounds from int8 codes (the kernel of the certified int8 screen).

A row whose int8 codes (:func:`embtools.kernels.codes.encode_int8`) avoid the two end codes has
every value ``x_j`` within ``r_j`` (:func:`embtools.kernels.codes.int8_radius`) of its bucket
centre ``x^_j = a_j + b_j c_j`` (``a_j = lo_j + 128.5 b_j``, ``b_j`` the step). So for a float64
query ``q``:

- ``|q . x - q . x^| <= sum_j |q_j| r_j`` (dot), and ``q . x^ = sum_j (q_j b_j) c_j + q . a``:
  one product of the codes with a query-dependent vector;
- ``| |x| - |x^| | <= |r|`` (cosine, l2), with ``|x^|^2`` from two more products of the codes;

The product with the query runs on integers: ``q b`` is rounded to an int8 vector ``alpha w``
(:func:`quantize_query`, whose rounding error times the largest code is added to the bound) and
:func:`int8_dot` returns the exact integer products ``w . c`` of every row, with simsimd's SIMD
int8 kernel (threads over the rows) where it is installed and NumPy float32 tiles otherwise
(exact: every partial sum is an integer below 2**24). The norms ``|x^|^2``
(:func:`int8_center_norms2`) do not depend on the query, so a search may compute them once and
keep them. :func:`int8_score_bounds` returns
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

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.kernels.codes import has_end_codes, int8_radius, int8_steps

__all__ = [
    "Int8Bounds",
    "QueryTerms",
    "int8_center_norms2",
    "int8_dot",
    "int8_inverse_norms",
    "int8_row_terms",
    "int8_score_bounds",
    "quantize_query",
]

_EPS = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
_METRICS = ("cosine", "dot", "l2")
#: threads of simsimd's int8 kernel (it splits the rows)
THREADS = max(1, min(8, os.cpu_count() or 1))
#: bytes of the float32 tile of the NumPy kernels
TILE_BYTES = 2 * 1024**2


def _simsimd() -> Any:
    """The ``simsimd`` module (SIMD int8 kernels: AVX-512 VNNI, NEON) where installed, else None."""
    try:
        import simsimd
    except ImportError:
        return None
    return simsimd



@dataclass(frozen=True)
class Int8Bounds:
    """What the bounds need from the ranges, made once per search: per dimension the step ``b``,
    the centre offset ``a`` and the radius ``r`` (float64); ``rho = |r|``, and ``e2``, the
    largest float32 rounding error of :func:`int8_center_norms2`.

    Examples
    --------
    >>> b = Int8Bounds.of(np.array([[0.0, -1.0], [255.0, 1.0]], np.float32))
    >>> b.step.tolist()[0], round(float(b.offset[0]), 3)
    (1.0, 128.5)
    """

    step: np.ndarray
    offset: np.ndarray
    radius: np.ndarray
    rho: float
    e2: float

    @classmethod
    def of(cls, ranges: np.ndarray) -> Int8Bounds:
        starts, steps = int8_steps(ranges)
        b = steps.astype(np.float64)
        a = starts.astype(np.float64) + 128.5 * b
        r = int8_radius(ranges)
        dim = b.shape[0]
        e2 = (dim + 8) * _EPS * (float(a @ a) + 256.0 * float(np.abs(a * b).sum())
                                 + 16384.0 * float(b @ b)) * 1.01
        return cls(b, a, r, float(np.sqrt(r @ r)), e2)


def _as_int8(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes)
    if c.dtype == np.uint8:
        return c.view(np.int8)
    if c.dtype != np.int8:
        raise TypeError(f"int8 codes must be int8 or uint8 bytes, not {c.dtype}")
    return c


def quantize_query(w: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(wi, alpha, slack)``: an int8 vector with ``w ~ alpha * wi`` and a bound ``slack`` on
    ``|w . c - alpha (wi . c)|`` for every int8 code vector ``c`` (``128 sum |w - alpha wi|``).

    Examples
    --------
    >>> wi, alpha, slack = quantize_query(np.array([1.0, -0.5, 0.25]))
    >>> wi.tolist(), round(alpha * 127, 6), slack < 128 * 3 * alpha / 2
    ([127, -64, 32], 1.0, True)
    """
    w = np.asarray(w, dtype=np.float64)
    top = float(np.abs(w).max()) if w.size else 0.0
    if top == 0.0 or not np.isfinite(top):
        return np.zeros(w.shape, np.int8), 0.0, (0.0 if top == 0.0 else np.inf)
    alpha = top / 127.0
    wi = np.clip(np.rint(w / alpha), -127, 127)
    absw = float(np.abs(w).sum())
    # the rounding, and a margin for float64 rounding of the products (relative 1e-12)
    slack = 128.0 * (float(np.abs(w - alpha * wi).sum()) * (1 + 1e-9) + 1e-12 * absw)
    return wi.astype(np.int8), alpha, slack


@dataclass(frozen=True)
class QueryTerms:
    """What the bounds need of one float64 query ``q``: its int8 vector ``wi`` (``q b ~ alpha
    wi``), the centre offset ``const = q . a``, the error ``e1`` of ``alpha (wi . c) + const``
    as ``q . x^`` (the int8 rounding, and float64 rounding), the radius ``rad = |q| . r + e1``
    of a dot score around it, and ``qq = q . q``.

    Examples
    --------
    >>> r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    >>> qt = QueryTerms.of(np.array([1.0, 0.0]), Int8Bounds.of(r))
    >>> qt.wi.tolist(), qt.qq
    ([127, 0], 1.0)
    """

    wi: np.ndarray
    alpha: float
    const: float
    e1: float
    rad: float
    qq: float

    @classmethod
    def of(cls, q: np.ndarray, bd: Int8Bounds) -> QueryTerms:
        dim = q.shape[0]
        b, a, r = bd.step, bd.offset, bd.radius
        wi, alpha, slack = quantize_query(q * b)
        e1 = slack + 8 * (dim + 8) * _EPS64 * (alpha * 128.0 * 127.0 * dim + float(np.abs(q * a).sum()))
        return cls(wi, alpha, float(q @ a), e1, float(np.abs(q) @ r) + e1, float(q @ q))

    def l2_slack(self, bd: Int8Bounds) -> float:
        """The error of ``|q - x^|^2`` computed from the kept centre norms (l2)."""
        return bd.e2 + 2.0 * self.e1 + 4 * _EPS * self.qq


def _tile_rows(dim: int) -> int:
    return max(1, TILE_BYTES // (4 * max(1, dim)))


def int8_dot(codes: np.ndarray, w: np.ndarray, *, use_simsimd: bool = True) -> np.ndarray:
    """Exact integer products ``codes @ w`` (float64 ``(n,)``) of int8 codes ``(n, d)`` (or their
    uint8 bytes) with an int8 vector ``w``: simsimd's int8 kernel (rows split over ``THREADS``)
    where it is installed and ``use_simsimd``, else NumPy float32 tiles (exact for
    ``d * 128 * 127 < 2**24``, float64 tiles beyond).

    Examples
    --------
    >>> c = np.array([[1, -2, 3], [127, -128, 0]], np.int8)
    >>> int8_dot(c, np.array([2, 1, -1], np.int8)).tolist()
    [-3.0, 126.0]
    >>> int8_dot(c, np.array([2, 1, -1], np.int8), use_simsimd=False).tolist()
    [-3.0, 126.0]
    """
    c8 = _as_int8(codes)
    wi = np.ascontiguousarray(np.asarray(w), dtype=np.int8)
    n, dim = c8.shape
    if wi.shape != (dim,):
        raise ValueError(f"codes {c8.shape} and weights {wi.shape} do not match")
    simsimd = _simsimd() if use_simsimd and n and dim else None
    if simsimd is not None and c8.flags.c_contiguous:
        out = simsimd.cdist(wi[None, :], c8, metric="dot", dtype="int8", threads=THREADS)
        return np.asarray(out, dtype=np.float64).reshape(n)
    exact32 = dim * 128 * 127 < 2**24
    ftype = np.float32 if exact32 else np.float64
    wf = wi.astype(ftype)
    out64 = np.empty(n, np.float64)
    step = _tile_rows(dim)
    buf = np.empty((min(n, step), dim), ftype)
    for s in range(0, n, step):
        cf = buf[: min(n, s + step) - s]
        np.copyto(cf, c8[s : s + step], casting="unsafe")
        out64[s : s + step] = cf @ wf
    return out64


def int8_center_norms2(codes: np.ndarray, bounds: Int8Bounds) -> np.ndarray:
    """``|x^|^2`` (float64 ``(n,)``) of the bucket centres of int8 codes (or their uint8 bytes),
    within ``bounds.e2`` (float32 tiles): ``|a|^2 + 2 (a b) . c + (b^2) . c^2``. They do not
    depend on the query (a search over many queries may keep them).

    Examples
    --------
    >>> from embtools.kernels.codes import decode_int8
    >>> r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    >>> c = np.array([[10, -20], [0, 5]], np.int8)
    >>> n2 = int8_center_norms2(c, Int8Bounds.of(r))
    >>> bool(np.allclose(n2, (decode_int8(c, r).astype(np.float64) ** 2).sum(axis=1)))
    True
    """
    c8 = _as_int8(codes)
    n, dim = c8.shape
    b, a = bounds.step, bounds.offset
    ab = (a * b).astype(np.float32)
    bb = (b * b).astype(np.float32)
    aa = float(a @ a)
    out = np.empty(n, np.float64)
    step = _tile_rows(dim)
    buf = np.empty((min(n, step), dim), np.float32)
    for s in range(0, n, step):
        cf = buf[: min(n, s + step) - s]
        np.copyto(cf, c8[s : s + step], casting="unsafe")
        cross = (cf @ ab).astype(np.float64)
        np.square(cf, out=cf)
        out[s : s + step] = aa + 2.0 * cross + (cf @ bb).astype(np.float64)
    return out


def int8_row_terms(codes: np.ndarray, bounds: Int8Bounds) -> np.ndarray:
    """What the bounds need of each row whatever the query: :func:`int8_center_norms2`, NaN for
    the rows holding an end code (float64 ``(n,)``; a search may keep them, 8 bytes a row).

    Examples
    --------
    >>> r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    >>> t = int8_row_terms(np.array([[0, 0], [127, 0], [-128, 3]], np.int8), Int8Bounds.of(r))
    >>> np.isnan(t).tolist()
    [False, True, True]
    """
    c8 = _as_int8(codes)
    terms = int8_center_norms2(c8, bounds)
    terms[has_end_codes(c8)] = np.nan
    return terms


def int8_inverse_norms(terms: np.ndarray, bounds: Int8Bounds) -> tuple[np.ndarray, np.ndarray]:
    """``(inv_lo, inv_hi)``: float64 bounds of ``1 / |x|`` of each row from its
    :func:`int8_row_terms` (for cosine; query-independent, so a search may keep them too). Rows
    that bound nothing (an end code, or a norm that may be zero) get NaN in both.

    Examples
    --------
    >>> r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    >>> bd = Int8Bounds.of(r)
    >>> lo, hi = int8_inverse_norms(int8_row_terms(np.array([[100, -100], [127, 0]], np.int8), bd), bd)
    >>> bool(lo[0] < 1 / np.hypot(0.79, 0.78) < hi[0]), bool(np.isnan(lo[1]))
    (True, True)
    """
    n2 = np.asarray(terms, np.float64)
    with np.errstate(invalid="ignore"):
        m_lo = np.sqrt(np.maximum(n2 - bounds.e2, 0.0)) - bounds.rho
        m_hi = np.sqrt(n2 + bounds.e2) + bounds.rho
        bad = ~(m_lo > 0)  # NaN terms (end codes) too
        inv_lo = (1.0 - 4 * _EPS64) / m_hi
        inv_hi = (1.0 + 4 * _EPS64) / np.where(bad, 1.0, m_lo)
    inv_lo[bad] = np.nan
    inv_hi[bad] = np.nan
    return inv_lo, inv_hi


def int8_score_bounds(
    query: np.ndarray,
    codes: np.ndarray,
    ranges: np.ndarray | Int8Bounds,
    metric: str,
    terms: np.ndarray | None = None,
    *,
    use_simsimd: bool = True,
    inverse_norms: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` float64 bounds of the exact scores of one query against int8 codes.

    ``query``: 1-D, float64 (for cosine, normalised by the caller; a zero query scores 0);
    ``codes``: ``(n, d)`` int8 or uint8 bytes; ``ranges``: the ``(2, d)`` ranges the codes were
    made with (or their :class:`Int8Bounds`); ``metric``: ``cosine``, ``dot`` or ``l2`` (larger
    is better: l2 bounds the negated squared distance); ``terms``: the rows'
    :func:`int8_row_terms` where the caller keeps them (else computed here as needed);
    ``inverse_norms``: for cosine, the rows'
    :func:`int8_inverse_norms` where the caller keeps them (fewer operations a row). Rows holding
    an end code get ``(-inf, inf)``.

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
    qt = QueryTerms.of(q, bd)
    dots = int8_dot(c8, qt.wi, use_simsimd=use_simsimd)
    dots *= qt.alpha
    dots += qt.const
    big = np.inf
    rad = qt.rad
    if metric == "dot":
        lo, hi = dots - rad, dots + rad
    elif metric == "cosine" and inverse_norms is not None:
        inv_lo, inv_hi = inverse_norms
        num_lo, num_hi = dots - rad, dots + rad
        # q . x / |x| with q . x in [num_lo, num_hi] and 1 / |x| in [inv_lo, inv_hi]
        hi = np.maximum(num_hi * inv_hi, num_hi * inv_lo)
        lo = np.minimum(num_lo * inv_hi, num_lo * inv_lo)
        np.minimum(hi, 1.0, out=hi)
        np.maximum(lo, -1.0, out=lo)
        return (np.nan_to_num(lo, copy=False, nan=-big, posinf=big, neginf=-big),
                np.nan_to_num(hi, copy=False, nan=big, posinf=big, neginf=-big))
    else:
        n2 = int8_center_norms2(c8, bd) if terms is None else np.asarray(terms, np.float64)
        e2, rho = bd.e2, bd.rho
        if metric == "cosine":
            num_lo, num_hi = dots - rad, dots + rad
            m_lo = np.sqrt(np.maximum(n2 - e2, 0.0)) - rho
            m_hi = np.sqrt(n2 + e2) + rho
            ok = m_lo > 0
            safe_lo = np.where(ok, m_lo, 1.0)
            hi = np.where(num_hi > 0, num_hi / safe_lo, num_hi / m_hi)
            lo = np.where(num_lo > 0, num_lo / m_hi, num_lo / safe_lo)
            hi = np.where(ok, np.minimum(hi, 1.0), big)
            lo = np.where(ok, np.maximum(lo, -1.0), -big)
        else:  # l2: |q - x| within rho of |q - x^|
            qq, e3 = qt.qq, qt.l2_slack(bd)
            v = qq + n2 - 2.0 * dots
            d_lo = np.maximum(np.sqrt(np.maximum(v - e3, 0.0)) - rho, 0.0)
            d_hi = np.sqrt(np.maximum(v + e3, 0.0)) + rho
            lo, hi = -(d_hi * d_hi) * (1 + 4 * _EPS), -(d_lo * d_lo) * (1 - 4 * _EPS)
    end = has_end_codes(c8) if terms is None else np.isnan(terms)
    if end.any():
        lo = np.where(end, -big, lo)
        hi = np.where(end, big, hi)
    return lo, hi
