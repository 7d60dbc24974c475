"""Exact search screened by a bfloat16 product: fast on CPUs with bfloat16 instructions.

A large batch of queries is scored against the corpus in bfloat16 (torch's oneDNN matmul: several
times faster than a float32 ``sgemm`` on Intel AMX, about 2.3x on AMD Zen 4's AVX-512 BF16), which
keeps the best ``width`` rows per query.
Every bfloat16 score ``a`` is within a proven bound of the true score ``s``
(:func:`error_bound` + :func:`half_ulp`):

* the rounding of the inputs: ``|q.x - q~.x~| <= ||q~|| ||x - x~|| + ||q - q~|| ||x||``, with
  ``||x - x~|| <= u ||x||`` for the rows and the queries' rounding errors measured;
* the float32 accumulation of the exact products: ``gamma(2d) ||q~|| ||x~||``;
* the rounding of the result to bfloat16: half a unit in the last place of ``a``.

So ``s`` lies in ``[L(a), U(a)]``, and the ``k`` best rows all score at least ``L(a_k)`` (``a_k``:
the k-th best screened score). To keep the selection cheap, each batch's score columns are pooled
in groups by their maximum and only the best groups are expanded; every row not kept scores at most
the query's *floor* (a group maximum or a row dropped from the running best). When
``U(floor) < L(a_k)``, no row outside those kept can be in the exact top-k (the query is
*certified*) and re-ranking the kept rows with ``U(a) >= L(a_k)`` in float64
(:func:`~embtools.search.refine.rerank`) gives exactly the float64 brute force's answer. Queries that
are not certified (more than ``width`` rows within the bound of the k-th best: many duplicates, a
flat neighbourhood) are searched again with the float32 engine. The result is exact either way;
the screen only makes it faster. :func:`screened_shortlist` is the same pass without the
certificate: the first stage of a Matryoshka funnel, which is approximate by design.

Used by :func:`~embtools.search.refine.exact_top_k` for cosine and dot searches of at least
``SCREEN_MIN_QUERIES`` queries on the NumPy backend or torch on CPU, when torch is installed and the
CPU multiplies bfloat16 in hardware: AMX or AVX-512 BF16 (``EMBTOOLS_BF16_SCREEN=on`` forces it,
``off`` disables it).

Examples
--------
>>> import numpy as np
>>> from embtools.memory import MemoryBudget
>>> from embtools.storage.memory_source import ArraySource
>>> x = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
>>> s, p, ok = screened_top_k(ArraySource(x), MemoryBudget(None), x[:3], 32, 5, "cosine")
>>> p[:, 0].tolist(), bool(ok.all())
([0, 1, 2], True)
"""

from __future__ import annotations

import importlib.util
import math
import os
from types import ModuleType
from typing import Any

import numpy as np

from embtools.memory import MemoryBudget
from embtools.search.engine import normalize_rows
from embtools.search.refine import rerank
from embtools.storage.source import VectorSource

__all__ = [
    "SCREEN_MIN_QUERIES",
    "screen_enabled",
    "screen_width",
    "screened_shortlist",
    "screened_top_k",
]

#: Fewer queries than this are memory-bound: the float32 engine is as fast.
SCREEN_MIN_QUERIES = 64
#: Largest k screened (the screen keeps ``screen_width(k)`` rows per query).
SCREEN_MAX_K = 256
#: Queries screened together (one pass over the corpus each): 1,024 keeps batches of ~32k rows in
#: a score matrix of ``SCREEN_SCORE_BYTES``, where the selection costs little beside the product
#: (a self-join of 50k x 128 in query chunks of 4,096: 7.8 s instead of 10 s with one group).
SCREEN_QUERY_GROUP = 1024
#: Without a memory cap, aim for a bfloat16 score matrix of about this many bytes.
SCREEN_SCORE_BYTES = 64 * 1024**2
#: Certified queries are re-ranked in groups whose candidate counts round up to the same multiple.
RERANK_STEP = 16
#: A shortlist of ``n`` rows pools at most this many / ``n`` columns per group (expanded rows per
#: query and batch stay under it).
SHORTLIST_EXPANDED = 2048
#: Longest funnel shortlist picked by the screen (longer ones by the float32 engine).
SHORTLIST_MAX = 2048
#: Score columns pooled into one group (by their maximum) before the selection.
POOL = 16
#: Smallest selection screened (smaller corpora are searched in float32).
SCREEN_MIN_ROWS = 4096
_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def screen_width(k: int) -> int:
    """Rows kept per query by the screen for a top-``k``: room for the rows within the bound."""
    return max(64, 2 * k + 32)


def _kernel() -> ModuleType | None:
    """The torch screen kernel (:mod:`embtools.kernels.torch_screen`), or None without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    from embtools.kernels import torch_screen

    return torch_screen


def screen_enabled(backend: Any, nq: int, k: int, metric: str, rows: int) -> bool:
    """Whether :func:`exact_top_k` screens a search of ``nq`` queries over ``rows`` rows in
    bfloat16 (see the module docstring)."""
    mode = os.environ.get("EMBTOOLS_BF16_SCREEN", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    if metric not in ("cosine", "dot") or k > SCREEN_MAX_K:
        return False
    if nq < SCREEN_MIN_QUERIES or rows < SCREEN_MIN_ROWS:
        return False
    name = getattr(backend, "name", "")
    if not (name == "numpy" or (name == "torch" and str(backend.device) == "cpu")):
        return False
    kernel = _kernel()
    if kernel is None:
        return False
    fast = mode in ("1", "on", "true", "yes") or kernel.fast_bfloat16()
    return fast and kernel.accumulates_in_float32()  # else the bound would not hold: float32 path


def screened_top_k(
    source: VectorSource,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    k: int,
    metric: str,
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Screen ``queries`` (float32 ``(nq, dim)``) in bfloat16 and re-rank the certified ones.

    Returns ``(scores, positions, certified)``: for certified queries (``certified[i]``) the exact
    top-``min(k, rows)`` in float64 order (ties by lower position); the other rows of ``scores``
    and ``positions`` are undefined and must be searched again.
    """
    n_sel = source.num_rows if positions is None else len(positions)
    kk = min(k, n_sel)
    width = min(n_sel, max(kk, width or screen_width(kk)))
    nq = len(queries)
    scores = np.zeros((nq, kk), np.float32)
    found = np.zeros((nq, kk), np.int64)
    certified = np.zeros(nq, bool)
    for g in range(0, nq, SCREEN_QUERY_GROUP):
        q = queries[g : g + SCREEN_QUERY_GROUP, :dim]
        ordinals, need, ok = _screen_pass(
            source, budget, q, dim, kk, width, metric, positions, batch_rows
        )
        if positions is not None:
            ordinals = np.asarray(positions, dtype=np.int64)[ordinals]
        # re-rank queries with about as many candidates together (the best ``m`` of each)
        sizes = np.maximum(-(-need // RERANK_STEP) * RERANK_STEP, kk)
        real = (ordinals >= 0).sum(axis=1)  # padding (-1) sorts last, after every candidate
        for m in np.unique(sizes[ok]):
            sel = np.flatnonzero(ok & (sizes == m))
            m = int(min(m, real[sel].min()))
            s, p = rerank(source, budget, q[sel], dim, ordinals[sel, :m], kk, metric)
            scores[sel + g], found[sel + g], certified[sel + g] = s, p, True
    return scores, found, certified


def screened_shortlist(
    source: VectorSource,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    n: int,
    metric: str,
    positions: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> np.ndarray:
    """Positions ``(nq, min(n, rows))`` of each query's ``n`` best rows by bfloat16 score, best
    first: the first stage of a Matryoshka funnel, which is approximate by design (every row when
    ``n`` covers the selection)."""
    n_sel = source.num_rows if positions is None else len(positions)
    n = min(n, n_sel)
    pool = max(1, min(POOL, SHORTLIST_EXPANDED // n))
    out = []
    for g in range(0, len(queries), SCREEN_QUERY_GROUP):
        q = queries[g : g + SCREEN_QUERY_GROUP, :dim]
        ords, _, _ = _screen_pass(source, budget, q, dim, n, n, metric, positions, batch_rows, pool)
        if (ords[:, :n] < 0).any():
            raise RuntimeError("the screen kept fewer rows than the selection holds")
        out.append(ords[:, :n])
    found = np.concatenate(out, axis=0)
    return found if positions is None else np.asarray(positions, dtype=np.int64)[found]


def _screen_pass(
    source: VectorSource,
    budget: MemoryBudget,
    queries: np.ndarray,
    dim: int,
    k: int,
    width: int,
    metric: str,
    positions: np.ndarray | None,
    batch_rows: int | None,
    pool: int = POOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One bfloat16 pass: ``(ordinals, need, certified)``: per query the ``width`` best rows
    (ordinals into the selection, best first), how many of them may be in the exact top-k, and
    whether those are all the rows that may be. The torch work (bfloat16 products, pooled group
    maxima, the probe and the running best rows) is
    :func:`embtools.kernels.torch_screen.screen_pass`; the certificate is worked out here."""
    from embtools.kernels import torch_screen

    q32 = normalize_rows(queries) if metric == "cosine" else np.ascontiguousarray(queries)
    qb, qb_norm, dq_norm = torch_screen.round_queries(q32)
    n_sel = source.num_rows if positions is None else len(positions)
    rows, nbytes = _plan(budget, len(queries), dim, width, batch_rows, pool, n_sel)
    with budget.holding(f"screen/{id(queries)}", nbytes, "the bfloat16 screen", "raise max_memory_gb"):
        batches = source.iter_vectors(dim, positions=positions, batch_rows=rows, views=True)
        vals, ords, floor, max_x, seen = torch_screen.screen_pass(
            (vec for _pos, vec in batches), qb, rows, dim, width, pool, metric, normalize_rows
        )
    if seen != n_sel:
        raise RuntimeError(f"the vector source yielded {seen} rows, expected {n_sel}")
    with np.errstate(over="ignore", invalid="ignore"):  # inf scores (dot overflow): not certified
        return _certify(vals, ords, floor, error_bound(qb_norm, dq_norm, max_x, dim), k)


def _certify(
    vals: np.ndarray, ords: np.ndarray, floor: np.ndarray, bound: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ords, need, certified)`` from the kept bfloat16 scores (sorted, float64), the floors and
    the per-query error bounds (see the module docstring)."""
    bound = bound[:, None]
    lower_k = vals[:, k - 1 : k] - bound - half_ulp(vals[:, k - 1 : k])
    upper = vals + bound + half_ulp(vals)
    fl = floor.astype(np.float64)[:, None]
    upper_floor = fl + bound + half_ulp(fl)
    ok = upper_floor[:, 0] < lower_k[:, 0]
    ok &= np.isfinite(vals[:, :k]).all(axis=1) & np.isfinite(bound[:, 0])  # no overflow (dot)
    need = (upper >= lower_k).sum(axis=1)  # a prefix: the values are sorted
    return ords, need, ok


def error_bound(qb_norm: np.ndarray, dq_norm: np.ndarray, max_x: float, dim: int) -> np.ndarray:
    """Per query, a bound on ``|s - a|`` before the result is rounded to bfloat16 (add
    :func:`half_ulp` of ``a``): ``s`` the exact score (of the normalised vectors for cosine), ``a``
    the bfloat16 product of the rounded vectors, over rows of norm at most ``max_x``.

    Rows: ``|x - x~| <= u |x|`` elementwise, plus 2e-6 relative for their float32 normalisation
    (rows within 1e-6 of unit norm are used as they are);
    queries: their measured rounding error; the float32 accumulation of ``2 dim`` terms; subnormal
    inputs and partial sums flushed to zero.

    Examples
    --------
    >>> float(error_bound(np.array([1.0]), np.array([0.0]), 1.0, 384)[0]) < 2 ** -8 * 1.02
    True
    """
    gamma = 2 * dim * 2.0**-24 / (1 - 2 * dim * 2.0**-24)
    bound = qb_norm * max_x * (_U + 2e-6 + gamma * (1 + _U)) + dq_norm * max_x
    # subnormal inputs and partial sums may be flushed to zero (DAZ/FTZ in AMX and AVX-512 BF16)
    tiny = 2.0**-126
    underflow = math.sqrt(dim) * tiny * (qb_norm + max_x) + 2 * dim * tiny
    return np.asarray((bound + underflow) * (1 + 1e-6), dtype=np.float64)


def half_ulp(a: np.ndarray) -> np.ndarray:
    """Half a bfloat16 unit in the last place at each value (float64): the most that rounding a
    result to that value can have changed it.

    Examples
    --------
    >>> half_ulp(np.array([0.75, 1.0, -3.0])).tolist() == [2.0**-9, 2.0**-8, 2.0**-7]
    True
    """
    _, exp = np.frexp(a)  # a = m * 2**exp with 0.5 <= |m| < 1
    return np.where(a == 0, 2.0**-126, np.ldexp(1.0, exp - 1 - 8))


def _plan(
    budget: MemoryBudget,
    nq: int,
    dim: int,
    width: int,
    batch_rows: int | None,
    pool: int,
    n_rows: int,
) -> tuple[int, int]:
    """Rows per batch (a multiple of ``pool``, at most the ``n_rows`` searched) and the bytes the
    pass holds: the bfloat16 rows and scores, the pooled scores, a normalised float32 copy of the
    rows, the expanded groups and the running best rows. Score matrices of about
    ``SCREEN_SCORE_BYTES``, smaller when the memory cap says so."""
    per_row = dim * 6 + nq * 2 + nq * 2 // pool + 8
    fixed = nq * dim * 18 + nq * width * pool * 26 + nq * width * 60
    rows = max(pool, SCREEN_SCORE_BYTES // (nq * 2))
    avail = budget.available_bytes
    if avail is not None:
        if (avail - fixed) // per_row < pool:
            budget.check(fixed + per_row * pool, "the bfloat16 screen", "raise max_memory_gb")
        rows = min(rows, (avail - fixed) // per_row)
    rows = min(rows, -(-n_rows // pool) * pool)
    if batch_rows is not None:
        rows = min(rows, batch_rows)
    rows = max(pool, rows // pool * pool)
    return int(rows), int(fixed + rows * per_row)
