"""The torch bfloat16 screen pass: bfloat16 products summed in float32, and the best rows kept.

The maths that makes the screen exact (the error bound, the certificate, the memory plan) lives in
:mod:`embtools.search.screen`; this module holds only the torch work it calls: rounding the
queries and the corpus batches to bfloat16, the bfloat16 matrix products, the pooled group maxima
and the running best ``width`` rows per query. torch is imported with this module, so import it
only where the planner chose the screen.

Examples
--------
>>> import numpy as np
>>> x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
>>> qb, _, _ = round_queries(x[:2] / np.linalg.norm(x[:2], axis=1, keepdims=True))
>>> vals, ords, floor, max_x, seen = screen_pass([x], qb, rows=256, dim=16, width=4, pool=16,
...                                              metric="cosine", normalize=None)
>>> ords[:, 0].tolist(), seen
([0, 1], 256)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from embtools.kernels.numpy_tiles import inverse_norms, row_dots

__all__ = [
    "PROBE_GROUPS",
    "accumulates_in_float32",
    "fast_bfloat16",
    "prepare_batch",
    "round_queries",
    "screen_pass",
]

#: Groups of a batch probed first, beyond twice the rows expected to enter, once a query holds
#: ``width`` rows: when the least of them is below its ``width``-th best row, no other can enter.
PROBE_GROUPS = 16


@functools.lru_cache(maxsize=1)
def fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AMX tiles (Intel Sapphire Rapids and
    later) or AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake), where oneDNN's
    bfloat16 matmul is at least twice as fast as a float32 ``sgemm``."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@functools.lru_cache(maxsize=1)
def accumulates_in_float32() -> bool:
    """Whether torch's bfloat16 ``mm`` (as the screen calls it) sums in float32, as the error
    bound assumes: 4,096 ones sum to 4,096 in float32, but stall at 256 in bfloat16.

    Examples
    --------
    >>> accumulates_in_float32()
    True
    """
    ones = torch.ones((8, 4096), dtype=torch.bfloat16)
    out = torch.empty((8, 8), dtype=torch.bfloat16)
    torch.mm(ones, ones.T, out=out)
    return bool((out == 4096).all())


def round_queries(q32: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """The float32 queries ``q32`` (already normalised for cosine) in bfloat16, the norms of the
    rounded queries and the norms of their rounding errors (float64)."""
    q32 = np.ascontiguousarray(q32, dtype=np.float32)
    qt = torch.from_numpy(q32).double()
    qb = torch.from_numpy(q32).bfloat16()
    qb_norm = torch.linalg.vector_norm(qb.double(), dim=1).numpy()
    dq_norm = torch.linalg.vector_norm(qt - qb.double(), dim=1).numpy()
    return qb, qb_norm, dq_norm


def prepare_batch(
    vec: np.ndarray,
    metric: str,
    out: Any,
    scratch: Any,
    normalize: Callable[[np.ndarray], np.ndarray] | None,
) -> float:
    """Round a batch to bfloat16 into ``out`` (rows normalised for cosine, in ``scratch``);
    returns the largest row norm before rounding. ``normalize`` (cosine): the rescaling
    normalisation for rows whose squared norms leave float32's safe range."""
    x = np.ascontiguousarray(vec, dtype=np.float32)
    if metric == "cosine":
        inv = inverse_norms(x)
        if inv is None:
            if normalize is None:
                raise ValueError("cosine rows out of float32's safe range need normalize=")
            x = normalize(x)
        elif float(np.max(np.abs(inv - 1), initial=0)) > 1e-6:  # not unit rows already
            # multiplied in float32 (two quick passes beat one mixed-type pass)
            normed = scratch[: len(x)]
            torch.mul(_tensor(x), torch.from_numpy(inv)[:, None], out=normed)
            out.copy_(normed)
            return 1.0
        out.copy_(_tensor(x))
        return 1.0
    out.copy_(_tensor(x))
    return math.sqrt(float(np.max(row_dots(x)))) * (1 + 1e-5) if len(x) else 0.0


def screen_pass(
    batches: Iterable[np.ndarray],
    qb: Any,
    rows: int,
    dim: int,
    width: int,
    pool: int,
    metric: str,
    normalize: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """Score the corpus ``batches`` (float32 row blocks, in order) against the bfloat16 queries
    ``qb`` in batches of at most ``rows`` rows (a multiple of ``pool``).

    Returns per query the ``width`` best bfloat16 scores (float64, sorted, best first) and their
    ordinals (``-1``: padding), the *floor* (a bound on every row not kept, float32), the largest
    row norm seen and the number of rows seen.

    Each batch's scores are pooled: column ``j`` of the pooled matrix is the largest score of
    the batch columns ``j, j + w, j + 2w, ...`` (``pool`` of them). The ``width`` best groups of a
    batch are expanded and merged into the running best ``width`` rows; every row of a group left
    out scores at most that batch's ``width``-th group maximum. Once a query holds ``width`` rows,
    only a few of its best groups are expanded first (``PROBE_GROUPS`` plus twice the rows
    expected to enter): when the least of them is below its ``width``-th best row, no other row of
    the batch can enter; the queries for which it is not expand all ``width``.
    """
    nq = int(qb.shape[0])
    neg_inf = float("-inf")
    best_v = torch.empty((nq, 0), dtype=torch.bfloat16)
    best_i = torch.empty((nq, 0), dtype=torch.int64)
    floor = torch.full((nq,), neg_inf, dtype=torch.float32)
    spread = torch.arange(pool, dtype=torch.int64)
    seen = 0
    max_x = 0.0
    rounded = torch.empty((rows, dim), dtype=torch.bfloat16)
    scratch = torch.empty((rows, dim), dtype=torch.float32)
    flat = torch.empty(nq * rows, dtype=torch.bfloat16)
    pooled_flat = torch.empty(nq * (rows // pool), dtype=torch.bfloat16)
    for vec in batches:
        for start in range(0, len(vec), rows):
            x = vec[start : start + rows]
            n = len(x)
            padded = -(-n // pool) * pool
            xb = rounded[:padded]
            max_x = max(max_x, prepare_batch(x, metric, xb[:n], scratch, normalize))
            xb[n:].zero_()
            a = flat[: nq * padded].view(nq, padded)
            torch.mm(qb, xb.T, out=a)
            a[:, n:] = neg_inf
            w = padded // pool
            pooled = pooled_flat[: nq * w].view(nq, w)
            pooled.copy_(a[:, :w])
            for j in range(1, pool):
                torch.maximum(pooled, a[:, j * w : (j + 1) * w], out=pooled)
            batch = _Batch(a, pooled, spread, seen, n)
            groups = min(width, w)
            # about width * n / (seen + n) rows of this batch enter: probe twice that
            probe = min(groups, PROBE_GROUPS + -(-2 * width * n // max(seen, 1)))
            if probe < groups and best_v.shape[1] == width:
                # most queries are settled by the probe: no other group of theirs can enter
                v, i, least, lift = batch.merge(best_v, best_i, probe, width)
                open_ = torch.nonzero(least >= best_v.amin(dim=1)).view(-1)
                if len(open_):  # the others expand every group they need
                    merged = batch.merge(best_v[open_], best_i[open_], groups, width, open_)
                    v[open_], i[open_], lift[open_] = merged[0], merged[1], merged[3]
            else:
                v, i, _, lift = batch.merge(best_v, best_i, groups, width)
            best_v, best_i = v, i
            torch.maximum(floor, lift, out=floor)
            seen += n
    vals = best_v.float().numpy().astype(np.float64)
    order = np.argsort(-vals, axis=1, kind="stable")
    vals = np.take_along_axis(vals, order, axis=1)
    ords = np.take_along_axis(best_i.numpy(), order, axis=1)
    return vals, ords, floor.numpy(), max_x, seen


@dataclasses.dataclass
class _Batch:
    """One batch's bfloat16 scores ``a`` (queries x padded rows, padding ``-inf``), their pooled
    group maxima (column ``j``: the largest of columns ``j, j + w, ...``), the columns ``spread``
    of a group (``0 .. pool - 1``), the ordinal of its first row and its ``n`` real rows."""

    a: Any
    pooled: Any
    spread: Any
    seen: int
    n: int

    def merge(
        self, best_v: Any, best_i: Any, groups: int, width: int, rows: Any = None
    ) -> tuple[Any, Any, Any, Any]:
        """Expand the ``groups`` best groups of each query (of the queries ``rows``, when given)
        and merge them into the running best ``width`` rows. Returns the new best values and
        ordinals, the least expanded group maximum and a bound on every row left out (float32,
        ``-inf`` when none is)."""
        a, pool = self.a, len(self.spread)
        pooled = self.pooled if rows is None else self.pooled[rows]
        nq, w = pooled.shape
        gv, gi = torch.topk(pooled, groups, dim=1, sorted=False)
        least = gv.amin(dim=1)
        lift = torch.full((nq,), float("-inf"), dtype=torch.float32)
        if groups < w:  # rows of the other groups score at most the least expanded maximum
            lift = least.float()
        cols = (gi[:, :, None] + w * self.spread).view(nq, groups * pool)
        if rows is None:
            expanded = torch.gather(a, 1, cols)
        else:  # ``a`` is contiguous: flat offsets of the queries' rows
            expanded = torch.take(a, cols + rows[:, None] * a.shape[1])
        v = torch.cat([best_v, expanded], dim=1)
        ordinal = cols + self.seen
        if pool * w > self.n:
            ordinal = torch.where(cols < self.n, ordinal, -1)
        i = torch.cat([best_i, ordinal], dim=1)  # -1: a padding column (-inf)
        if v.shape[1] > width:
            v, j_best = torch.topk(v, width, dim=1, sorted=False)  # sorted at the end
            i = torch.gather(i, 1, j_best)
            lift = torch.maximum(lift, v.amin(dim=1).float())  # rows dropped here
        return v, i, least, lift


def _tensor(x: np.ndarray) -> Any:
    """A torch view of ``x``, read-only arrays (memory maps) included: it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)
