"""Compiled float64 re-rank scores, bit for bit those of the NumPy re-rank.

:func:`embtools.search.refine.rerank` scores candidates in float64 by summing the elementwise
products (or squared differences) of a query and a row with ``np.sum`` along the last axis, which
is NumPy's pairwise summation: blocks of at most 128 values summed in eight interleaved
accumulators, longer runs split in two at a multiple of eight. :func:`terms_sum` follows the
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
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from embtools.kernels.codes import CODE_SHIFT

__all__ = ["CODE_SHIFT", "COSINE", "DOT", "L2", "METRICS", "code_tables", "code_top", "frozen_list", "rerank_scores", "row_norms",
           "sum_program", "terms_sum", "warm"]

DOT, COSINE, L2 = 0, 1, 2
#: the metric codes of :func:`rerank_scores`
METRICS = {"dot": DOT, "cosine": COSINE, "l2": L2}


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


def _lanes(context: Any, builder: Any, aryty: Any, ary: Any, idx: Any) -> Any:
    """LLVM IR: ``ary[idx:idx + 8]`` as ``<8 x double>`` (float32 values widened exactly): one
    vector load from a contiguous array, eight strided loads from another."""
    ety = context.get_data_type(aryty.dtype)
    if aryty.layout == "C":
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False)
        vec = builder.load(builder.bitcast(ptr, ir.VectorType(ety, 8).as_pointer()),
                           align=aryty.dtype.bitwidth // 8)
    else:
        vec = ir.Constant(ir.VectorType(ety, 8), ir.Undefined)
        for j in range(8):
            at = builder.add(idx, ir.Constant(idx.type, j))
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [at], wraparound=False)
            vec = builder.insert_element(vec, builder.load(ptr), ir.Constant(ir.IntType(32), j))
    f64x8 = ir.VectorType(ir.DoubleType(), 8)
    return vec if ety == ir.DoubleType() else builder.fpext(vec, f64x8)


def _eight_lanes(term: str) -> Any:
    """A compiled ``f(x, y, lo, n)`` (``n >= 8``): NumPy's pairwise block over the first
    ``n - n % 8`` terms of ``x[lo:]`` and ``y[lo:]`` (``term``: ``"dot"``, ``x*y``; ``"l2"``,
    ``(x-y)**2``; ``"sq"``, ``x*x``; in float64): eight accumulators, each summing every
    eighth term, added as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``.

    The eight accumulators are written as one ``<8 x double>`` vector (LLVM's vectorisers do not
    form it from eight scalar chains): the same IEEE operations lane by lane, in the same order,
    so the same bits, about three times faster."""

    @intrinsic
    def block(typingctx: Any, x: Any, y: Any, lo: Any, n: Any) -> Any:  # pragma: no cover - compiled
        if not all(isinstance(a, types.Array) and isinstance(a.dtype, types.Float) for a in (x, y)):
            return None  # float rows and queries only (a typing error names the call)
        sig = types.float64(x, y, lo, n)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            xty, yty, loty, nty = signature.args
            xa = context.make_array(xty)(context, builder, args[0])
            ya = context.make_array(yty)(context, builder, args[1])
            start = context.cast(builder, args[2], loty, types.int64)
            count = context.cast(builder, args[3], nty, types.int64)
            i64, f64x8 = ir.IntType(64), ir.VectorType(ir.DoubleType(), 8)

            def terms(idx: Any) -> Any:
                a = _lanes(context, builder, xty, xa, idx)
                if term == "sq":
                    return builder.fmul(a, a)
                b = _lanes(context, builder, yty, ya, idx)
                if term == "dot":
                    return builder.fmul(a, b)
                diff = builder.fsub(a, b)
                return builder.fmul(diff, diff)

            acc = cgutils.alloca_once(builder, f64x8)
            builder.store(terms(start), acc)
            more = builder.sub(builder.sdiv(count, ir.Constant(i64, 8)), ir.Constant(i64, 1))
            with cgutils.for_range(builder, more) as loop:
                idx = builder.add(start, builder.shl(builder.add(loop.index, ir.Constant(i64, 1)),
                                                     ir.Constant(i64, 3)))
                builder.store(builder.fadd(builder.load(acc), terms(idx)), acc)
            r = [builder.extract_element(builder.load(acc), ir.Constant(ir.IntType(32), j))
                 for j in range(8)]
            return builder.fadd(builder.fadd(builder.fadd(r[0], r[1]), builder.fadd(r[2], r[3])),
                                builder.fadd(builder.fadd(r[4], r[5]), builder.fadd(r[6], r[7])))

        return sig, codegen

    return block


_dot8, _l2_8, _sq8 = _eight_lanes("dot"), _eight_lanes("l2"), _eight_lanes("sq")


@njit(nogil=True, cache=True, inline="always")
def _dot_block(x: np.ndarray, y: np.ndarray, lo: int, n: int) -> float:  # pragma: no cover
    """``sum(x[t] * y[t] for t in lo .. lo + n)``, ``n <= 128``, in NumPy's order: eight
    interleaved accumulators (:func:`_eight_lanes`), then the last ``n % 8`` terms in turn."""
    res = 0.0 if n < 8 else _dot8(x, y, lo, n)
    for i in range(lo + (0 if n < 8 else n - n % 8), lo + n):
        res += np.float64(x[i]) * y[i]
    return res


@njit(nogil=True, cache=True, inline="always")
def _l2_block(x: np.ndarray, y: np.ndarray, lo: int, n: int) -> float:  # pragma: no cover
    """The same of ``(x[t] - y[t]) ** 2``."""
    res = 0.0 if n < 8 else _l2_8(x, y, lo, n)
    for i in range(lo + (0 if n < 8 else n - n % 8), lo + n):
        res += (np.float64(x[i]) - y[i]) ** 2
    return res


@njit(nogil=True, cache=True, inline="always")
def _sq_block(x: np.ndarray, y: np.ndarray, lo: int, n: int) -> float:  # pragma: no cover
    """The same of ``x[t] * x[t]`` (``y`` unused)."""
    res = 0.0 if n < 8 else _sq8(x, y, lo, n)
    for i in range(lo + (0 if n < 8 else n - n % 8), lo + n):
        res += np.float64(x[i]) * np.float64(x[i])
    return res


@njit(nogil=True, cache=True, inline="always")
def terms_sum(x: np.ndarray, y: np.ndarray, mode: int, program: np.ndarray,
               stack: np.ndarray) -> float:  # pragma: no cover - compiled
    """The sum, in NumPy's pairwise order (:func:`sum_program`; ``stack``: ``len(program)``
    floats), of the terms of ``x`` and ``y``: ``x*y`` (``mode`` 0), ``(x-y)**2``
    (1) or ``x*x`` (2), each in float64."""
    sp = 0
    for k in range(program.shape[0]):
        if program[k, 1] < 0:
            stack[sp - 2] += stack[sp - 1]
            sp -= 1
        else:
            lo, n = program[k, 0], program[k, 1]
            if mode == 0:
                stack[sp] = _dot_block(x, y, lo, n)
            elif mode == 1:
                stack[sp] = _l2_block(x, y, lo, n)
            else:
                stack[sp] = _sq_block(x, y, lo, n)
            sp += 1
    return stack[0]


@njit(nogil=True, cache=True)
def _row_norms(rows: np.ndarray, program: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """float64 norms of float32 ``rows`` (0 read as 1), NumPy's bits (see :func:`row_norms`)."""
    stack = np.empty(len(program))
    norms = np.empty(rows.shape[0])
    for r in range(rows.shape[0]):
        s = np.sqrt(terms_sum(rows[r], rows[r], 2, program, stack))
        norms[r] = 1.0 if s == 0 else s
    return norms


@njit(nogil=True, cache=True)
def _rerank_scores(q: np.ndarray, rows: np.ndarray, inv: np.ndarray, metric: int,
                   program: np.ndarray, norms: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`rerank_scores` with the :func:`sum_program` of the dimension and, for cosine, the
    rows' norms."""
    g, w = inv.shape
    out = np.empty((g, w))
    stack = np.empty(len(program))
    mode = 1 if metric == L2 else 0
    for i in range(g):
        qi = q[i]
        for j in range(w):
            r = inv[i, j]
            s = terms_sum(rows[r], qi, mode, program, stack)
            if metric == COSINE:
                s = min(1.0, max(-1.0, s / norms[r]))
            out[i, j] = s
    return out


def row_norms(rows: np.ndarray) -> np.ndarray:
    """float64 norms of float32 ``rows``, zero norms read as 1: the NumPy re-rank's
    ``np.sqrt(np.sum(v64 * v64, axis=-1))`` to the bit.

    Examples
    --------
    >>> row_norms(np.array([[3, 4], [0, 0]], np.float32)).tolist()
    [5.0, 1.0]
    """
    out: np.ndarray = _row_norms(rows, sum_program(rows.shape[1]))
    return out


def rerank_scores(q: np.ndarray, rows: np.ndarray, inv: np.ndarray, metric: int,
                  norms: np.ndarray | None = None) -> np.ndarray:
    """float64 scores ``(g, w)`` of queries ``q`` (``(g, dim)`` float64, normalised for cosine)
    against ``rows[inv[i, j]]`` (float32 rows): the dot product, the cosine (divided by the row's
    norm, :func:`row_norms` unless given, and clipped to [-1, 1]) or the squared L2 distance
    (``metric``: :data:`METRICS`)."""
    if metric == COSINE and norms is None:
        norms = row_norms(rows)
    out: np.ndarray = _rerank_scores(q, rows, inv, metric, sum_program(q.shape[1]),
                                     np.zeros(0) if norms is None else norms)
    return out


@intrinsic
def _prefetch(typingctx: Any, arr: Any, idx: Any) -> Any:  # pragma: no cover - compiled
    """Hint the CPU to load the cache line of ``arr[idx]`` into its L2 cache (``llvm.prefetch``:
    a read, locality 2, ``prefetcht1``); no load is waited for and nothing changes."""
    sig = types.void(arr, idx)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


#: candidates whose rows :func:`_code_top` asks the CPU for before it scores them: the rows are
#: read at random, and a query's whole shortlist of 20 asked for at once into L2 (36 KiB of 384
#: float32 values) re-ranked 500 queries of 1M rows in 4.1-5.1 ms here, against 7.2-9.1 ms four
#: rows ahead into L1 (whose few outstanding misses the other lines wait for)
PREFETCH_AHEAD = 24


@njit(nogil=True, cache=True)
def _prefetch_row(where: np.ndarray, tables: Any, p: int, d: int) -> None:  # pragma: no cover - compiled
    """Prefetch the ``d`` first values of position ``p``'s row (none for ``p < 0``)."""
    if p < 0:
        return
    at = where[p]
    row = tables[at >> CODE_SHIFT][at & ((1 << CODE_SHIFT) - 1)]
    for t in range(0, d, 16):  # a 64-byte line holds 16 float32 values
        _prefetch(row, t)  # type: ignore[call-arg]  # numba passes the typing context


@njit(nogil=True, cache=True)
def _code_top(q: np.ndarray, cand: np.ndarray, where: np.ndarray, tables: Any, norms: Any, metric: int,
              program: np.ndarray, out_s: np.ndarray, out_p: np.ndarray) -> None:  # pragma: no cover
    """:func:`code_top` into ``out_s, out_p`` (``(nq, keep)``)."""
    nq, w = cand.shape
    keep = out_s.shape[1]
    stack = np.empty(len(program))
    mode = 1 if metric == L2 else 0
    mask = (1 << CODE_SHIFT) - 1
    keys = np.empty(keep)  # the kept rows' keys (smaller is better) and scores, best first
    vals = np.empty(keep)
    kept = np.empty(keep, np.int64)
    d = q.shape[1]
    for i in range(nq):
        qi = q[i]
        n = 0
        for j in range(min(PREFETCH_AHEAD, w)):
            _prefetch_row(where, tables, cand[i, j], d)
        for j in range(w):
            if j + PREFETCH_AHEAD < w:
                _prefetch_row(where, tables, cand[i, j + PREFETCH_AHEAD], d)
            p = cand[i, j]
            if p < 0:
                continue
            at = where[p]
            table, r = at >> CODE_SHIFT, at & mask
            row = tables[table][r]
            s = terms_sum(row, qi, mode, program, stack)
            if metric == COSINE:
                known = norms[table]  # empty: the row's norm computed here, as row_norms does
                norm = known[r] if known.shape[0] else np.sqrt(terms_sum(row, row, 2, program, stack))
                s = min(1.0, max(-1.0, s / (1.0 if norm == 0 else norm)))
            key = s if metric == L2 else -s
            if n == keep and (key > keys[n - 1] or (key == keys[n - 1] and p > kept[n - 1])):
                continue
            t = min(n, keep - 1)  # insert at t, shifting the worse rows right (the last drops)
            while t > 0 and (keys[t - 1] > key or (keys[t - 1] == key and kept[t - 1] > p)):
                keys[t], vals[t], kept[t] = keys[t - 1], vals[t - 1], kept[t - 1]
                t -= 1
            keys[t], vals[t], kept[t] = key, s, p
            n = min(n + 1, keep)
        for t in range(keep):
            if t < n:
                out_s[i, t] = np.float32(vals[t])
                out_p[i, t] = kept[t]
            else:
                out_s[i, t] = np.inf if metric == L2 else -np.inf
                out_p[i, t] = -1


def frozen_list(arrays: list[np.ndarray], dtype: Any) -> Any:
    """A numba typed list of read-only contiguous ``dtype`` views of ``arrays`` (one list type
    whether the arrays are mapped, read-only, or in memory)."""
    from numba.typed import List

    out = List()
    for a in arrays:
        view = np.ascontiguousarray(a, dtype=dtype).view()
        view.flags.writeable = False
        out.append(view)
    return out


def code_tables(arrays: list[np.ndarray], norms: list[np.ndarray]) -> tuple[Any, Any]:
    """The tables of :func:`code_top`: numba typed lists of the float32 rows and of their float64
    norms (:func:`row_norms`' bits, 0 read as 1; empty arrays where the metric needs none, or
    to have :func:`code_top` compute them)."""
    return frozen_list(arrays, np.float32), frozen_list(norms, np.float64)


def code_top(q: np.ndarray, cand: np.ndarray, where: np.ndarray, tables: Any, norms: Any, metric: int,
             keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``keep`` of each query's candidate positions ``cand`` (``(nq, w)``, -1: none) by
    float64 scores against their float32 rows, read where ``where[position]`` says
    (``table << CODE_SHIFT | row`` in ``tables``, whose rows may be longer than the queries:
    their first ``q.shape[1]`` values are read; cosine divided by ``norms``, or by the norms of
    :func:`row_norms` where a table's norms are empty; see :func:`code_tables`): the scores and order of :func:`rerank_scores` (ties to the lower
    position), float32 scores and positions ``(nq, keep)``, padded with -1 (and -inf, or inf
    for l2)."""
    out_s = np.empty((len(cand), keep), np.float32)
    out_p = np.empty((len(cand), keep), np.int64)
    if keep:
        _code_top(q, cand, where, tables, norms, metric, sum_program(q.shape[1]), out_s, out_p)
    return out_s, out_p


def warm() -> None:
    """Run the kernel once on tiny inputs."""
    for metric in (DOT, COSINE):
        rerank_scores(np.zeros((1, 2)), np.zeros((1, 2), np.float32), np.zeros((1, 1), np.int64), metric)
    code_top(np.zeros((1, 2)), np.zeros((1, 1), np.int64), np.zeros(1, np.int64),
             *code_tables([np.zeros((1, 2), np.float32)], [np.ones(1)]), COSINE, 1)
