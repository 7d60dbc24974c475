"""The numba kernels against NumPy references: the re-rank's float64 scores bit for bit, the IVF
scans' heaps against a brute-force selection (ties, deleted rows, filters, L2, several files),
the nearest-centroid selection, the sign codes' nibble tables, and the switch that turns them off."""

from __future__ import annotations

import numpy as np
import pytest

from embtools.kernels.codes import pack_codes, pack_signs
from embtools.kernels.hamming import sign_scores
from embtools.kernels.jit import JIT_ENV, jit_kernels

ivf = jit_kernels("ivf_jit")
rr = jit_kernels("rerank_jit")
code_sums_jit = jit_kernels("code_sums_jit")
MAX_WEIGHT = code_sums_jit.MAX_WEIGHT
host_has_vnni = code_sums_jit.host_has_vnni


def test_the_kernels_load_and_the_switch_turns_them_off(monkeypatch):
    assert ivf is not None and rr is not None  # numba is part of the [all] extra the tests install
    monkeypatch.setenv(JIT_ENV, "0")
    assert jit_kernels("ivf_jit") is None


@pytest.mark.parametrize("n", [1, 5, 8, 9, 63, 127, 128, 129, 200, 384, 385, 768, 1000, 1536, 4096])
def test_terms_sum_is_numpys_pairwise_sum_to_the_bit(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((300, n)) * 10.0 ** rng.integers(-8, 8, (300, 1))
    stack = np.empty(64)
    ones = np.ones(n)  # x * 1.0 is x exactly: the sum of the row itself
    got = np.array([rr.terms_sum(row, ones, 0, rr.sum_program(n), stack) for row in a])
    assert np.array_equal(got, np.sum(a, axis=-1))


@pytest.mark.parametrize("n", [3, 8, 15, 96, 128, 130, 384, 1000])
def test_each_term_summed_from_float32_rows_is_numpys_to_the_bit(n):
    """``x*y``, ``(x-y)**2`` and ``x*x`` of float32 rows and float64 queries, widened and summed in
    eight vector lanes (:func:`~embtools.kernels.rerank_jit._eight_lanes`), give the bits of
    NumPy's float64 expressions, for contiguous rows and for strided ones (a prefix of wider
    rows, every other value) read value by value."""
    rng = np.random.default_rng(n)
    wide = (rng.standard_normal((50, 2 * n + 3)) * 10.0 ** rng.integers(-6, 6, (50, 1))).astype(np.float32)
    y = rng.standard_normal(n)
    program, stack = rr.sum_program(n), np.empty(64)
    for rows in (np.ascontiguousarray(wide[:, :n]), wide[:, :n], wide[:, : 2 * n : 2]):
        x64 = rows.astype(np.float64)
        for mode, want in ((0, np.sum(x64 * y, axis=-1)), (1, np.sum((x64 - y) ** 2, axis=-1)),
                           (2, np.sum(x64 * x64, axis=-1))):
            got = np.array([rr.terms_sum(row, y, mode, program, stack) for row in rows])
            assert np.array_equal(got.view(np.uint64), want.view(np.uint64)), (n, mode, rows.strides)


@pytest.mark.parametrize("dim", [1, 7, 32, 129, 384, 1000])
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_the_single_query_call_prepares_queries_as_the_probe_and_the_rerank_do(dim, metric):
    """The compiled search divides the queries by their norms itself: the float32 queries of
    the probe's batch path (unit_queries) and the float64 ones of the re-rank (float64_queries),
    to the bit, at any scale, zero queries included."""
    from embtools.kernels.rerank_jit import METRICS, sum_program
    from embtools.search.refine import float64_queries, unit_queries

    few = jit_kernels("ivf_few_jit")
    rng = np.random.default_rng(dim)
    q = (rng.standard_normal((40, dim)) * 10.0 ** rng.integers(-15, 15, (40, 1))).astype(np.float32)
    q[3] = 0.0
    q[4, 0] = np.float32(1e-30) if dim > 1 else q[4, 0]
    got32, got64 = few._prepared(q, METRICS[metric] == METRICS["cosine"], sum_program(dim))
    want32 = unit_queries(q, dim) if metric == "cosine" else q
    assert np.array_equal(got32.view(np.uint32), want32.view(np.uint32))
    assert np.array_equal(got64.view(np.uint64), float64_queries(q, dim, metric).view(np.uint64))


@pytest.mark.parametrize("dim", [8, 384, 3000])
def test_screened_centroids_are_the_float32_nearest_at_any_width(dim):
    """The integer screen of uint8 centroid codes picks the partitions of a float32 pass over every
    centroid, in its order, at widths where the int16 weights must shrink to keep each row's sum
    within int32 (3,000 dimensions: at most 2,806), for near ties and duplicate centroids too."""
    rng = np.random.default_rng(dim)
    c = rng.standard_normal((300, dim)).astype(np.float32)
    c[10:20] = c[5]  # exact duplicates: ties to the lower column
    c[30:40] = c[25] + np.float32(1e-6) * rng.standard_normal((10, dim)).astype(np.float32)
    c64 = c.astype(np.float64)
    lo, hi = c64.min(axis=0), c64.max(axis=0)
    step = np.where(hi > lo, (hi - lo) / 255, 1.0).astype(np.float32)
    lo32 = lo.astype(np.float32)
    codes = np.clip(np.rint((c64 - lo32) / step), 0, 255)
    err = np.abs(c64 - (lo32 + codes * step.astype(np.float64))).max(axis=0)
    codes = codes.astype(np.uint8)
    padded = np.zeros((len(c), -(-dim // 64) * 64), np.uint8)  # as the index keeps them
    padded[:, :dim] = codes
    queries = np.concatenate([rng.standard_normal((20, dim)), c[[5, 25]], 1e4 * rng.standard_normal((2, dim))])
    for q in queries.astype(np.float32):
        v, scale, margin = ivf.screen_terms(q, lo32, step, err, np.abs(c64).max(axis=0))
        assert np.abs(v).max() <= min(MAX_WEIGHT, (2**31 - 1) // (255 * dim))
        full = np.empty((1, len(c)), np.float32)
        ivf.centroid_scores(q[None], c, full)
        for n in (1, 3, 17):
            for cc in (codes, padded):
                got = ivf.screened_centroids(q, v, scale, cc, margin, c, n)
                assert np.array_equal(got, ivf.top_columns(full, n)[0]), (dim, n)
    full = np.empty((len(queries), len(c)), np.float32)
    ivf.centroid_scores(queries.astype(np.float32), c, full)
    for n in (1, 3, 17):  # the batch form: the same centroids for every query
        got = ivf.screened_batch(queries.astype(np.float32), lo32, step, err, np.abs(c64).max(axis=0),
                                 pack_codes(codes, dim), c, n)
        assert np.array_equal(got, ivf.top_columns(full, n)), (dim, n)


_SUMS = ["portable"] + (["vnni"] if host_has_vnni() else [])


@pytest.mark.parametrize("kind", _SUMS)
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 301])
@pytest.mark.parametrize(("dim", "width"), [(1, 1), (8, 64), (63, 64), (64, 64), (100, 100), (100, 128),
                                            (384, 384), (300, 384), (3000, 3008)])
def test_code_sums_are_the_exact_integer_products(kind, rows, dim, width):
    """Both forms of the centroid screen's integer sums (``vpdpbusd`` where the host has AVX-512
    VNNI, plain loops elsewhere) give NumPy's int64 products exactly: any row count, widths with
    and without whole 64-byte blocks (up to 8 held in registers, and 47), padding past the
    weights (whatever it holds), the extreme codes and weights, and strided rows."""
    sums = {"portable": code_sums_jit.portable_code_sums, "vnni": code_sums_jit.vnni_code_sums}[kind]
    rng = np.random.default_rng(rows * 7 + dim)
    top = min(MAX_WEIGHT, (2**31 - 1) // (255 * dim))
    codes = rng.integers(0, 256, (rows, width), dtype=np.uint8)
    v = rng.integers(-top, top + 1, dim).astype(np.int16)
    if rows:
        codes[0, :dim], v[: dim // 2] = 255, top  # the largest sum of one sign
        codes[-1] = 255 if rows > 1 else codes[-1]
    if dim > 1:
        v[-1] = -top
    want = codes[:, :dim].astype(np.int64) @ v.astype(np.int64)
    for cc in (codes, np.ascontiguousarray(codes[::-1])[::-1], np.repeat(codes, 2, axis=1)[:, ::2]):
        out = np.full(rows, -7, np.int32)
        sums(v, cc, out)
        assert np.array_equal(out, want), (kind, rows, dim, width)


@pytest.mark.parametrize("kind", _SUMS)
@pytest.mark.parametrize(("queries", "rows", "dim"), [(1, 1, 1), (1, 16, 4), (3, 17, 5), (8, 15, 63), (9, 33, 64),
                                                      (17, 100, 384), (70, 530, 384), (2, 40, 3000)])
def test_padded_sums_are_the_exact_integer_products(kind, queries, rows, dim):
    """The batch form of the centroid screen's sums (tiles of 8 queries by 16 packed codes, passes
    of 512 codes; plain loops without VNNI) gives NumPy's int64 products exactly, with the
    extreme codes and weights, and zero sums in its padding (rows past the queries, columns past
    the codes)."""
    sums = {"portable": code_sums_jit.portable_padded_sums, "vnni": code_sums_jit.vnni_padded_sums}[kind]
    rng = np.random.default_rng(queries * 31 + rows + dim)
    top = min(MAX_WEIGHT, (2**31 - 1) // (255 * dim))
    codes = rng.integers(0, 256, (rows, dim), dtype=np.uint8)
    v = rng.integers(-top, top + 1, (queries, dim)).astype(np.int16)
    codes[0], v[0, : dim // 2 + 1] = 255, top  # the largest sum of one sign
    v[-1, -1] = -top
    want = v.astype(np.int64) @ codes.astype(np.int64).T
    got = sums(v, pack_codes(codes, dim))
    assert got.shape == (-(-queries // 8) * 8, -(-rows // 16) * 16)
    assert np.array_equal(got[:queries, :rows], want)
    assert not got[queries:].any() and not got[:, rows:].any()
    with pytest.raises(ValueError, match="wider"):  # weights past the packed codes: refused, not read
        sums(np.zeros((1, dim + 4), np.int16), pack_codes(codes, dim))


def test_pack_codes_puts_four_bytes_of_sixteen_rows_in_each_block():
    codes = np.arange(17 * 6, dtype=np.uint8).reshape(17, 6)
    packed = pack_codes(codes, 5)  # the sixth byte is past the dimensions: left out
    assert packed.shape == (2, 2, 64)
    for r in range(17):
        for t in range(8):
            want = codes[r, t] if t < 5 else 0
            assert packed[r // 16, t // 4, 4 * (r % 16) + t % 4] == want
    assert not packed[1, :, 4:].any()  # rows past the last


def test_code_sums_pick_vnni_where_the_host_has_it(monkeypatch):
    from numba.core import config

    assert (code_sums_jit.code_sums is code_sums_jit.vnni_code_sums) == host_has_vnni()
    monkeypatch.setattr(config, "CPU_NAME", "generic")  # a named target: the portable loops
    assert not host_has_vnni()


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("dim", [3, 64, 384])
def test_rerank_scores_equal_the_numpy_rerank(monkeypatch, metric, dim):
    from embtools.search import refine
    from embtools.storage.memory_source import ArraySource

    rng = np.random.default_rng(dim)
    x = rng.standard_normal((500, dim)).astype(np.float32)
    x[7] = 0  # a zero row (cosine: norm 1 by convention)
    x[9] = x[8]  # exact duplicates tie exactly
    q = rng.standard_normal((40, dim))
    if metric == "cosine":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    cand = np.sort(rng.choice(500, (40, 30)), axis=1)
    cand[:, :4] = [7, 8, 9, 10]
    source = ArraySource(x)
    monkeypatch.setenv(JIT_ENV, "0")
    want = refine._score(source, q, dim, cand, metric)
    monkeypatch.setenv(JIT_ENV, "1")
    for threads in (False, True):
        got = refine._score(source, q, dim, cand, metric, threads=threads)
        assert got.dtype == np.float64 and np.array_equal(got, want)
    one = np.unique(cand[:1])[None, :]  # one query: its candidates distinct and ascending
    monkeypatch.setenv(JIT_ENV, "0")
    want = refine._score(source, q[:1], dim, one, metric)
    monkeypatch.setenv(JIT_ENV, "1")
    assert np.array_equal(refine._score(source, q[:1], dim, one, metric), want)


def test_threaded_rerank_of_many_candidates(monkeypatch):
    from embtools.search import refine
    from embtools.storage.memory_source import ArraySource

    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 48)).astype(np.float32)
    q = rng.standard_normal((300, 48))
    cand = np.sort(rng.choice(20_000, (300, 20)), axis=1)
    monkeypatch.setenv(JIT_ENV, "0")
    want = refine._score(ArraySource(x), q, 48, cand, "dot")
    monkeypatch.setenv(JIT_ENV, "1")
    assert len(np.unique(cand)) >= refine.THREADED_RERANK_ROWS
    assert np.array_equal(refine._score(ArraySource(x), q, 48, cand, "dot", threads=True), want)


def reference_heap(scores: np.ndarray, pos: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``width`` (score, position) pairs, ties to the lower position, padded with -1."""
    order = np.lexsort((pos, -scores))[:width]
    s = np.full(width, -np.inf, np.float32)
    p = np.full(width, -1, np.int64)
    s[:len(order)], p[:len(order)] = scores[order], pos[order]
    return s, p


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_code_top_is_the_rerank_of_rows_read_from_several_tables(metric):
    """code_top's scores are rerank_scores' bits and its order theirs (ties to the lower position),
    rows read through their addresses in several tables; -1 candidates skipped, short lists padded."""
    from embtools.kernels.codes import CODE_SHIFT

    rng = np.random.default_rng(17)
    rows = rng.integers(-3, 4, (60, 24)).astype(np.float32)  # a coarse grid: many ties
    rows[7] = rows[3]
    rows[11] = 0  # a zero row (cosine 0)
    tables = [rows[:25], rows[25:26], rows[26:]]
    n = 100  # positions: rows placed at random positions of a version
    pos_of = rng.permutation(n)[:60]
    where = np.full(n, -1, np.int64)
    for t, (a, b) in enumerate([(0, 25), (25, 26), (26, 60)]):
        where[pos_of[a:b]] = (t << CODE_SHIFT) | np.arange(b - a)
    q = rng.standard_normal((5, 24))
    if metric == "cosine":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[4] = 0  # a zero query: every score ties
    cand = np.stack([rng.permutation(pos_of)[:30] for _ in range(5)])
    cand[1, 5:] = -1  # a short list
    keep = 8
    norms = [np.sqrt((t.astype(np.float64) ** 2).sum(axis=1)) for t in tables]  # 0 for the zero row
    assert np.array_equal(np.concatenate(norms)[np.arange(60) != 11], rr.row_norms(rows)[np.arange(60) != 11])
    s, p = rr.code_top(q, cand, where, *rr.code_tables(tables, norms), rr.METRICS[metric], keep)
    for i in range(5):
        c = cand[i][cand[i] >= 0]
        c = np.sort(c)
        inv = np.searchsorted(np.sort(pos_of), c)
        ref = rr.rerank_scores(q[i:i + 1], rows[np.argsort(pos_of)], inv[None, :], rr.METRICS[metric])[0]
        order = np.argsort(ref if metric == "l2" else -ref, kind="stable")[:keep]
        m = len(order)
        assert np.array_equal(p[i, :m], c[order]), i
        assert np.array_equal(s[i, :m], ref[order].astype(np.float32)), i
        assert (p[i, m:] == -1).all() and (s[i, m:] == (np.inf if metric == "l2" else -np.inf)).all()


@pytest.mark.parametrize("kind", ["float", "l2", "masked", "scaled"])
def test_scan_dense_keeps_the_best_rows_of_the_probed_partitions(kind):
    rng = np.random.default_rng(11)
    rows, dim, parts = 400, 16, 10
    starts = np.r_[0, np.sort(rng.integers(0, rows, parts - 1)), rows].astype(np.int64)
    starts[3] = starts[4]  # an empty partition
    codes = rng.integers(-2, 3, (rows, dim)).astype(np.float32)  # a coarse grid: many ties
    pos = rng.permutation(1000)[:rows].astype(np.int64)
    pos[::13] = -1  # deleted rows
    w = rng.integers(-2, 3, (6, dim)).astype(np.float32)
    c0 = rng.integers(-3, 3, 6).astype(np.float32)
    sq = (codes.astype(np.float32) ** 2).sum(1).astype(np.float32) if kind == "l2" else np.zeros(0, np.float32)
    mask = rng.random(1001) < 0.5 if kind == "masked" else np.zeros(0, bool)
    # cosine over rows as stored: each row's product times its inverse norm (powers of two: exact)
    inv = (2.0 ** -rng.integers(0, 3, rows)).astype(np.float32) if kind == "scaled" else np.zeros(0, np.float32)
    probes = np.array([[0, 3, 5], [9, -1, -1], [3, -1, -1], [1, 2, 4], [8, 7, 6], [0, 1, 9]], np.int64)
    width = 12
    hs, hi = ivf.new_heaps(6, width)
    half = rows // 2  # the same heaps fed by two "files" (an index and its delta)
    first = np.minimum(starts, half)
    ivf.scan_dense(w, c0, probes, first, codes[:half], pos[:half], sq[:half], mask, hs, hi, inv[:half])
    ivf.scan_dense(w, c0, probes, np.maximum(starts - half, 0), codes[half:], pos[half:], sq[half:], mask, hs,
                   hi, inv[half:])
    ivf.sort_heaps(hs, hi)
    for i in range(6):
        r = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in probes[i] if p >= 0] or [np.zeros(0, int)])
        r = r[pos[r] >= 0]
        if kind == "masked":
            r = r[mask[pos[r]]]
        s = codes[r].astype(np.float32) @ w[i] + c0[i]
        if kind == "l2":
            s = 2 * s - sq[r]
        if kind == "scaled":
            s = s * inv[r]
        ws, wp = reference_heap(s.astype(np.float32), pos[r], width)
        assert np.array_equal(hi[i], wp), i
        assert np.allclose(hs[i][wp >= 0], ws[wp >= 0], atol=1e-4)


@pytest.mark.parametrize("kind", _SUMS)
@pytest.mark.parametrize("dim", [1, 8, 63, 64, 100, 384, 520, 768])
def test_signed_sums_are_the_exact_integer_products_of_int8_codes(kind, dim):
    """The int8 scan's integer sums (``vpdpbusd`` on the codes plus 128 where the host has AVX-512
    VNNI, plain loops elsewhere) are NumPy's int64 products, for any run of rows: rows of fewer
    than 64 bytes, whole blocks and a tail, weights held in registers (up to 8 blocks) or not,
    the extreme codes and weights, and strided rows (the plain loop)."""
    sums = {"portable": code_sums_jit.portable_signed_sums, "vnni": code_sums_jit.vnni_signed_sums}[kind]
    rng = np.random.default_rng(dim)
    top = min(MAX_WEIGHT, (2**31 - 1) // (255 * dim))
    codes = rng.integers(-128, 128, (70, dim)).astype(np.int8)
    codes[0], codes[1], codes[2, ::2] = -128, 127, -128
    v = rng.integers(-top, top + 1, dim).astype(np.int16)
    v[: (dim + 1) // 2] = top
    v[-1] = -top
    want = codes.astype(np.int64) @ v.astype(np.int64)
    split = code_sums_jit.split_weights(v, dim)
    for cc in (codes, np.repeat(codes, 2, axis=1)[:, ::2]):
        for a, b in [(0, 70), (0, 1), (2, 5), (65, 70), (9, 9)]:
            out = np.full(b - a, 7, np.int32)
            sums(v, split, cc, a, b, out)
            assert np.array_equal(out, want[a:b]), (kind, dim, a, b)


def test_int8_weights_round_the_weights_within_the_bound():
    rng = np.random.default_rng(4)
    for dim in (1, 16, 384, 2000):
        w = (rng.standard_normal((5, dim)) * 10.0 ** rng.integers(-6, 3, (5, 1))).astype(np.float32)
        w[4] = 0  # a zero query: weights 0, scale 1
        v, scale = ivf.int8_weights(w)
        top = min(MAX_WEIGHT, (2**31 - 1) // (255 * dim))
        assert v.dtype == np.int16 and np.abs(v).max() == top
        assert np.array_equal(np.abs(v).max(axis=1)[:4], [top] * 4) and not v[4].any() and scale[4] == 1
        assert (np.abs(v[:4] * scale[:4, None] - w[:4]) <= scale[:4, None] / 2 * (1 + 1e-9)).all()


@pytest.mark.parametrize("kind", ["int8", "l2", "masked", "scaled"])
@pytest.mark.parametrize("nq", [1, 6])
def test_scan_int8_keeps_the_best_rows_by_their_integer_sums(kind, nq):
    """scan_int8's heaps hold the best rows by ``float32(scale * (v . codes)) + c0`` (then L2's
    ``2 s - |x|^2`` or the inverse norm), computed in NumPy from int64 products: the same rows and
    bits, for one query and for several (scanned partition by partition), over two files."""
    rng = np.random.default_rng(12)
    rows, dim, parts = 500, 100, 10  # 100: one block and a tail
    starts = np.r_[0, np.sort(rng.integers(0, rows, parts - 1)), rows].astype(np.int64)
    starts[3] = starts[4]  # an empty partition
    codes = rng.integers(-3, 4, (rows, dim)).astype(np.int8)  # a coarse grid: ties
    pos = rng.permutation(1000)[:rows].astype(np.int64)
    pos[::13] = -1  # deleted rows
    v, scale = ivf.int8_weights(rng.standard_normal((6, dim)).astype(np.float32))
    c0 = rng.standard_normal(6).astype(np.float32)
    sq = rng.random(rows).astype(np.float32) if kind == "l2" else np.zeros(0, np.float32)
    mask = rng.random(1001) < 0.5 if kind == "masked" else np.zeros(0, bool)
    inv = rng.random(rows).astype(np.float32) if kind == "scaled" else np.zeros(0, np.float32)
    probes = np.array([[0, 3, 5], [9, -1, -1], [3, -1, -1], [1, 2, 4], [8, 7, 6], [0, 1, 9]], np.int64)
    width = 12
    for first in range(0, 6, nq):
        q = slice(first, first + nq)
        hs, hi = ivf.new_heaps(nq, width)
        half = rows // 2  # the same heaps fed by two "files" (an index and its delta)
        ivf.scan_int8(v[q], scale[q], c0[q], probes[q], np.minimum(starts, half), codes[:half], pos[:half],
                      sq[:half], mask, hs, hi, inv[:half])
        ivf.scan_int8(v[q], scale[q], c0[q], probes[q], np.maximum(starts - half, 0), codes[half:], pos[half:],
                      sq[half:], mask, hs, hi, inv[half:])
        ivf.sort_heaps(hs, hi)
        for j, i in enumerate(range(first, first + nq)):
            r = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in probes[i] if p >= 0])
            r = r[pos[r] >= 0]
            if kind == "masked":
                r = r[mask[pos[r]]]
            s = (scale[i] * (codes[r].astype(np.int64) @ v[i].astype(np.int64))).astype(np.float32) + c0[i]
            if kind == "l2":
                s = np.float32(2) * s - sq[r]
            if kind == "scaled":
                s = s * inv[r]
            ws, wp = reference_heap(s, pos[r], width)
            assert np.array_equal(hi[j], wp), i
            assert np.array_equal(hs[j], ws), i


def test_scan_signs_scores_equal_sign_scores():
    rng = np.random.default_rng(5)
    dim, rows = 44, 300  # not a multiple of 8: padding bits score nothing
    codes = pack_signs(rng.standard_normal((rows, dim)))
    q = rng.standard_normal((4, dim)).astype(np.float32)
    tables = ivf.nibble_tables(q, codes.shape[1])
    starts = np.array([0, rows], np.int64)
    hs, hi = ivf.new_heaps(4, rows)
    ivf.scan_signs(tables, np.zeros((4, 1), np.int64), starts, codes, np.arange(rows, dtype=np.int64),
                   np.zeros(0, np.float32), np.zeros(0, bool), hs, hi)
    ivf.sort_heaps(hs, hi)
    want = sign_scores(q, codes, dim)
    for i in range(4):
        assert np.allclose(hs[i], want[i][hi[i]], atol=1e-4)
        assert sorted(hi[i].tolist()) == list(range(rows))


def test_top_columns_ties_to_the_lower_column():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, (50, 40)).astype(np.float32)
    got = ivf.top_columns(scores, 7)
    want = np.lexsort((np.broadcast_to(np.arange(40), scores.shape), -scores), axis=1)[:, :7]
    assert np.array_equal(got, want)


def test_centroid_scores_are_the_float32_products():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 37)).astype(np.float32)
    c = rng.standard_normal((101, 37)).astype(np.float32)
    out = np.empty((3, 101), np.float32)
    ivf.centroid_scores(q, c, out)
    want = q.astype(np.float64) @ c.T.astype(np.float64)
    assert np.allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_store_search_results_are_the_same_with_and_without_the_kernels(tmp_path, monkeypatch, metric):
    """A committed store (a frozen source, whose row norms the compiled re-rank keeps): the same
    frames from the NumPy kernels, the compiled ones cold and warm, and a Matryoshka prefix."""
    import embtools as et

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    x[5] = 0
    x[11] = x[10]
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    q = np.concatenate([x[:3], rng.standard_normal((400, 24)).astype(np.float32)])
    monkeypatch.setenv(JIT_ENV, "0")
    want = [store.search(q[:, :d], k=12, metric=metric, dimension=d) for d in (24, 8)]
    monkeypatch.setenv(JIT_ENV, "1")
    for _ in range(2):
        for d, frame in zip((24, 8), want, strict=True):
            assert store.search(q[:, :d], k=12, metric=metric, dimension=d).equals(frame)
