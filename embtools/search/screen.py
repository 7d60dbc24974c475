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

The planner (:mod:`embtools.search.plan`) uses it for cosine and dot searches of at least
``SCREEN_MIN_QUERIES`` queries on the NumPy backend or torch on CPU, when torch is installed and the
CPU multiplies bfloat16 in hardware: AMX or AVX-512 BF16 (the request's ``screen="on"`` forces it,
``"off"`` forbids it), and only when :func:`size_screen` fits it under the memory cap (in query
groups of at least ``SCREEN_MIN_QUERIES``); otherwise the search takes the float32 path.

Examples
--------
>>> import numpy as np
>>> from embtools.backends import get_backend
>>> from embtools.memory import MemoryBudget
>>> from embtools.search.request import SearchContext, SearchRequest
>>> from embtools.storage.memory_source import ArraySource
>>> x = ArraySource(np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32))
>>> ctx = SearchContext(x, get_backend("numpy"), MemoryBudget(None))
>>> top, ok = screened_top_k(SearchRequest.build(x, x.vectors[:3], k=5), ctx)
>>> top.positions[:, 0].tolist(), bool(ok.all())
([0, 1, 2], True)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from types import ModuleType
from typing import Any

import numpy as np

from embtools.search.engine import normalize_rows
from embtools.search.refine import rerank
from embtools.search.request import SearchContext, SearchRequest, TopK, cap_error

__all__ = [
    "SCREEN_MIN_QUERIES",
    "ScreenSizes",
    "screen_enabled",
    "screen_possible",
    "screen_width",
    "screened_shortlist",
    "screened_top_k",
    "size_screen",
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
#: Smallest batch the screen is sized down to under a memory cap (before it steps aside for the
#: float32 stream): smaller batches expand most of their pooled groups and lose the screen's gain.
SCREEN_MIN_BATCH_ROWS = 32768
#: Smallest query group the screen is sized down to under a memory cap (for the same reason: the
#: bfloat16 product pays off on large query groups).
SCREEN_MIN_GROUP = 256
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


def screen_possible(backend: Any, nq: int, k: int, metric: str, rows: int, mode: str = "auto") -> bool:
    """The cheap half of :func:`screen_enabled` (no torch import): the ``screen`` option, metric,
    ``k``, query and row counts and backend allow the screen."""
    if mode == "off" or metric not in ("cosine", "dot") or k > SCREEN_MAX_K:
        return False
    if nq < SCREEN_MIN_QUERIES or rows < SCREEN_MIN_ROWS:
        return False
    name = getattr(backend, "name", "")
    return name == "numpy" or (name == "torch" and str(backend.device) == "cpu")


def screen_enabled(backend: Any, nq: int, k: int, metric: str, rows: int, mode: str = "auto") -> bool:
    """Whether a search of ``nq`` queries over ``rows`` rows may be screened in bfloat16 (see the
    module docstring): ``mode`` is the request's ``screen`` option; ``"on"`` skips the hardware
    check (not the float32-accumulation check, on which the bound rests). Imports torch."""
    if not screen_possible(backend, nq, k, metric, rows, mode):
        return False
    kernel = _kernel()
    if kernel is None:
        return False
    fast = mode == "on" or kernel.fast_bfloat16()
    return fast and kernel.accumulates_in_float32()  # else the bound would not hold: float32 path


@dataclasses.dataclass(frozen=True)
class ScreenSizes:
    """How a screen pass is cut up: queries screened together (``group``: one corpus pass each),
    rows per batch (a multiple of ``pool``), rows kept per query (``width``) and the bytes held."""

    group: int
    rows: int
    width: int
    pool: int
    nbytes: int

    @staticmethod
    def fixed_bytes(group: int, dim: int, width: int, pool: int) -> int:
        """Bytes of a pass that do not grow with the batch: the rounded queries and their norms,
        the expanded groups and the running best rows."""
        return group * dim * 18 + group * width * pool * 26 + group * width * 60

    @staticmethod
    def row_bytes(group: int, dim: int, pool: int) -> int:
        """Bytes per batch row: the bfloat16 row and its normalised float32 copy, its scores and
        pooled scores."""
        return dim * 6 + group * 2 + group * 2 // pool + 8


def size_screen(
    avail: int | None,
    nq: int,
    dim: int,
    width: int,
    n_rows: int,
    batch_rows: int | None = None,
    pool: int = POOL,
    min_group: int = SCREEN_MIN_GROUP,
) -> ScreenSizes | None:
    """Size the screen of ``nq`` queries over ``n_rows`` rows keeping ``width`` per query, in
    ``avail`` bytes (None: no cap): query groups of at most ``SCREEN_QUERY_GROUP`` (fewer when the
    cap says so, balanced), batches with a bfloat16 score matrix of about ``SCREEN_SCORE_BYTES``
    (smaller under a cap, down to ``SCREEN_MIN_BATCH_ROWS``). None when groups of
    ``min(min_group, nq)`` queries do not fit.

    Examples
    --------
    >>> size_screen(None, 3000, 128, 64, 10**6).group     # three balanced groups
    1000
    >>> s = size_screen(80 * 2**20, 600, 128, 64, 50_000)  # two groups under an 80 MiB cap
    >>> s.group, s.rows, s.nbytes <= 80 * 2**20
    (300, 50000, True)
    >>> size_screen(4 * 2**20, 200, 128, 64, 20_000) is None
    True
    """
    padded = max(pool, -(-n_rows // pool) * pool)
    want = min(padded, SCREEN_MIN_BATCH_ROWS)
    fixed, per_row = ScreenSizes.fixed_bytes, ScreenSizes.row_bytes

    def cost(g: int, rows: int) -> int:
        return fixed(g, dim, width, pool) + rows * per_row(g, dim, pool)

    group = min(nq, SCREEN_QUERY_GROUP)
    if avail is not None:
        per_query = cost(1, want) - cost(0, want) + want  # an upper bound of one query's bytes
        group = min(group, max(0, (avail - cost(0, want)) // per_query))
        while group < nq and cost(group + 1, want) <= avail and group < SCREEN_QUERY_GROUP:
            group += 1
        while group > 0 and cost(group, want) > avail:
            group -= 1
        if group < min(min_group, nq):
            return None
    passes = -(-nq // group)
    group = -(-nq // passes)  # balanced groups, no larger than what fits
    rows = max(pool, SCREEN_SCORE_BYTES // (group * 2))
    if avail is not None:
        rows = min(rows, (avail - fixed(group, dim, width, pool)) // per_row(group, dim, pool))
    rows = min(rows, padded)
    if batch_rows is not None:
        rows = min(rows, batch_rows)
    rows = max(pool, rows // pool * pool)
    return ScreenSizes(group, int(rows), width, pool, int(cost(group, rows)))


def screen_min_bytes(
    nq: int, dim: int, width: int, n_rows: int, pool: int = POOL, min_group: int = SCREEN_MIN_GROUP
) -> int:
    """The fewest bytes :func:`size_screen` accepts for groups of ``min(min_group, nq)``."""
    g = min(min_group, nq)
    want = min(max(pool, -(-n_rows // pool) * pool), SCREEN_MIN_BATCH_ROWS)
    return ScreenSizes.fixed_bytes(g, dim, width, pool) + want * ScreenSizes.row_bytes(g, dim, pool)


def _sizes(
    req: SearchRequest, ctx: SearchContext, width: int, pool: int, sizes: ScreenSizes | None
) -> ScreenSizes:
    if sizes is not None:
        return sizes
    avail = ctx.budget.available_bytes
    found = size_screen(avail, req.nq, req.dim, width, req.n_sel, req.batch_rows, pool, 1)
    if found is None:
        need = screen_min_bytes(1, req.dim, width, req.n_sel, pool, 1)
        raise cap_error(ctx.budget, need, "the bfloat16 screen")
    return found


def screened_top_k(
    req: SearchRequest, ctx: SearchContext, sizes: ScreenSizes | None = None
) -> tuple[TopK, np.ndarray]:
    """Screen ``req``'s queries in bfloat16 and re-rank the certified ones.

    Returns ``(top, certified)``: for certified queries (``certified[i]``) the exact
    top-``min(k, rows)`` in float64 order (ties by lower position); the other rows of ``top`` are
    undefined and must be searched again. ``sizes`` (from the planner; sized from the budget when
    None) gives the query groups and batches.
    """
    kk = req.kk
    width = min(req.n_sel, max(kk, screen_width(kk)))
    sizes = _sizes(req, ctx, width, POOL, sizes)
    nq = req.nq
    scores = np.zeros((nq, kk), np.float32)
    found = np.zeros((nq, kk), np.int64)
    certified = np.zeros(nq, bool)
    for g in range(0, nq, sizes.group):
        q = req.queries[g : g + sizes.group, : req.dim]
        ordinals, need, ok = _screen_pass(req, ctx, q, kk, sizes)
        ordinals = req.to_positions(ordinals)
        # re-rank queries with about as many candidates together (the best ``m`` of each)
        need_m = np.maximum(-(-need // RERANK_STEP) * RERANK_STEP, kk)
        real = (ordinals >= 0).sum(axis=1)  # padding (-1) sorts last, after every candidate
        for m in np.unique(need_m[ok]):
            sel = np.flatnonzero(ok & (need_m == m))
            m = int(min(m, real[sel].min()))
            top = rerank(req.subset(sel + g), ctx, ordinals[sel, :m], kk)
            scores[sel + g], found[sel + g], certified[sel + g] = top.scores, top.positions, True
    return TopK(scores, found), certified


def shortlist_sizes(avail: int | None, req: SearchRequest, n: int) -> ScreenSizes | None:
    """:func:`size_screen` for a funnel shortlist of ``n`` rows per query."""
    n = min(n, req.n_sel)
    pool = max(1, min(POOL, SHORTLIST_EXPANDED // max(n, 1)))
    return size_screen(avail, req.nq, req.dim, n, req.n_sel, req.batch_rows, pool)


def screened_shortlist(
    req: SearchRequest, ctx: SearchContext, n: int, sizes: ScreenSizes | None = None
) -> np.ndarray:
    """Positions ``(nq, min(n, rows))`` of each query's ``n`` best rows by bfloat16 score at
    ``req.dim``, best first: the first stage of a Matryoshka funnel, which is approximate by
    design (every row when ``n`` covers the selection)."""
    n = min(n, req.n_sel)
    pool = max(1, min(POOL, SHORTLIST_EXPANDED // n))
    sizes = _sizes(req, ctx, n, pool, sizes)
    out = []
    for g in range(0, req.nq, sizes.group):
        q = req.queries[g : g + sizes.group, : req.dim]
        ords, _, _ = _screen_pass(req, ctx, q, n, sizes)
        if (ords[:, :n] < 0).any():
            raise RuntimeError("the screen kept fewer rows than the selection holds")
        out.append(ords[:, :n])
    return req.to_positions(np.concatenate(out, axis=0))


def _screen_pass(
    req: SearchRequest, ctx: SearchContext, queries: np.ndarray, k: int, sizes: ScreenSizes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One bfloat16 pass of ``queries`` (a group of ``req``'s): ``(ordinals, need, certified)``:
    per query the ``sizes.width`` best rows (ordinals into the selection, best first), how many of
    them may be in the exact top-``k``, and whether those are all the rows that may be. The torch
    work (bfloat16 products, pooled group maxima, the probe and the running best rows) is
    :func:`embtools.kernels.torch_screen.screen_pass`; the certificate is worked out here."""
    from embtools.kernels import torch_screen

    dim, metric = req.dim, req.metric
    q32 = normalize_rows(queries) if metric == "cosine" else np.ascontiguousarray(queries)
    qb, qb_norm, dq_norm = torch_screen.round_queries(q32)
    budget = ctx.budget
    with budget.holding(f"screen/{id(queries)}", sizes.nbytes, "the bfloat16 screen", "raise max_memory_gb"):
        batches = ctx.source.iter_vectors(dim, positions=req.positions, batch_rows=sizes.rows,
                                          views=True)
        vals, ords, floor, max_x, seen = torch_screen.screen_pass(
            (vec for _pos, vec in batches), qb, sizes.rows, dim, sizes.width, sizes.pool, metric,
            normalize_rows,
        )
    if seen != req.n_sel:
        raise RuntimeError(f"the vector source yielded {seen} rows, expected {req.n_sel}")
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
