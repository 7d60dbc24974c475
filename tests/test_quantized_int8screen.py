"""The certified int8 screen (``screen="int8"``): its per-row score bounds hold for every row and
metric (clipped values at both ends included, codes given as the column's raw bytes), and its
answers are the exact top k (NumPy float64 brute force) for one query and thousands, every
metric, ``where`` and tiny caps."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.kernels.codes import encode_int8, has_end_codes, int8_ranges
from embtools.kernels.int8 import Int8Bounds, int8_inverse_norms, int8_row_terms, int8_score_bounds
from tests.helpers import brute_force, check_top_k

METRICS = ["cosine", "dot", "l2"]


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """Each test using it runs twice: with the numba kernel and with the NumPy one."""
    from embtools.kernels.jit import JIT_ENV, jit_kernels

    monkeypatch.setenv(JIT_ENV, "1" if request.param == "compiled" else "0")
    assert (jit_kernels("int8_jit") is not None) == (request.param == "compiled")
    return request.param


def _corpus(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Clustered rows of varied norms, an exact tie, a zero row, and rows far outside any sample's
    ranges (at the low and the high end of their dimensions)."""
    c = rng.standard_normal((8, d)).astype(np.float32)
    x = c[rng.integers(0, 8, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    x *= rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    x[7] = x[3]
    x[11] = 0.0
    x[12] *= 50.0
    x[13] = -np.abs(x[13]) * 30.0  # every value clipped at the low end: codes -128
    x[14, rng.integers(0, d)] = 1e4
    return x


def _expected_scores(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    s = brute_force(x, q[None, :], metric)[0]
    return -s if metric == "l2" else s  # larger is better, as the bounds


@pytest.mark.parametrize("metric", METRICS)
def test_bounds_contain_exact_scores(rng, metric):
    """Every row's exact float64 score lies in its bounds, over many random corpora, sample sizes,
    dimensions and query scales; rows with an end code are unbounded, the others are finite."""
    for trial in range(25):
        d = int(rng.choice([3, 17, 64]))
        n = int(rng.integers(40, 400))
        x = _corpus(rng, n, d) * np.float32(10.0 ** rng.uniform(-3, 3))
        ranges = int8_ranges(x[20 + rng.choice(n - 20, max(2, n // 8), replace=False)])  # not 11-14
        codes = encode_int8(x, ranges).view(np.uint8)  # the column's raw bytes
        q = rng.standard_normal(d) * 10.0 ** rng.uniform(-2, 2)
        if trial == 0:
            q = x[12].astype(np.float64)  # the query of the failing seed: a far row itself
        if metric == "cosine":
            q = q / np.linalg.norm(q)
        bd = Int8Bounds.of(ranges)
        terms = int8_row_terms(codes, bd)
        exact = _expected_scores(x, q, metric)
        for lo, hi in (int8_score_bounds(q, codes, ranges if trial % 2 else bd, metric),
                       int8_score_bounds(q, codes, bd, metric, terms),  # kept row terms
                       int8_score_bounds(q, codes, bd, metric, terms,
                                         inverse_norms=int8_inverse_norms(terms, bd)),
                       int8_score_bounds(q, codes, bd, metric, use_simsimd=False)):
            bad = (lo > exact) | (exact > hi) | np.isnan(lo) | np.isnan(hi)
            assert not bad.any(), (trial, np.flatnonzero(bad))
        end = has_end_codes(codes)
        assert end[13] and np.all(np.isinf(hi[end]))
        if metric != "cosine":  # cosine leaves rows near zero unbounded too
            assert np.all(np.isfinite(lo[~end]))


def test_bounds_arguments():
    r = np.array([[-1.0, -1.0], [1.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="metric"):
        int8_score_bounds(np.ones(2), np.zeros((1, 2), np.int8), r, "hamming")
    with pytest.raises(ValueError, match="dimension"):
        int8_score_bounds(np.ones(3), np.zeros((1, 2), np.int8), r, "dot")
    with pytest.raises(TypeError):
        int8_score_bounds(np.ones(2), np.zeros((1, 2), np.int16), r, "dot")
    with pytest.raises(TypeError):
        has_end_codes(np.zeros((1, 2), np.int16))


def _check_exact(store: et.EmbeddingStore, x: np.ndarray, q: np.ndarray, k: int, metric: str,
                 where=None, sel=None) -> None:  # type: ignore[no-untyped-def]
    exact = store.search(q, k, metric=metric, where=where)
    got = store.search(q, k, metric=metric, where=where, screen="int8")
    assert got.equals(exact)
    nq = len(q)
    per = min(k, len(x) if sel is None else len(sel))
    scores = got["score"].to_numpy().reshape(nq, per)
    tol = 1e-4 * max(1.0, float(np.abs(scores).max()))  # float32 scores of the far rows
    check_top_k(brute_force(x, q, metric, sel), scores, got["row_id"].to_numpy().reshape(nq, per),
                per, metric, tol=tol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [87126921, 1, 2])
def test_screen_exact_one_query(new_store, store_kind, metric, seed, kernels):
    """One query at a time (far rows, near rows, a zero query), with and without ``where``; seed
    87126921 once returned a wrong row for ``dot`` (a row clipped at the low end, code -128, was
    bounded as if it were not: the codes arrive as uint8 bytes)."""
    rng = np.random.default_rng(seed)
    n, d, k = 3000, 32, 10
    x = _corpus(rng, n, d)
    labels = rng.choice(["a", "b"], n).tolist()
    store = new_store(store_kind)
    store.add_embeddings(x, dimension=d, labels=labels)
    store.quantize(d, kinds=["int8"], sample_rows=500)
    sel = np.flatnonzero(np.array(labels) == "a")
    near = x[rng.integers(0, n, 3)] + 0.3 * rng.standard_normal((3, d)).astype(np.float32)
    for q in (x[12], x[13], x[3], near[0], near[1], np.zeros(d, np.float32)):
        _check_exact(store, x, q[None, :], k, metric)
        _check_exact(store, x, q[None, :], k, metric, pl.col("label") == "a", sel)


@pytest.mark.parametrize("metric", METRICS)
def test_screen_exact_thousands_of_queries_tiny_cap(new_store, rng, metric, kernels):
    """2,000 queries under a cap that cuts the codes into small batches, k from 1 to past the rows
    of the ``where`` selection."""
    n, d = 1200, 24
    x = _corpus(rng, n, d)
    labels = np.where(np.arange(n) % 100 == 0, "rare", "common").tolist()
    store = new_store("disk", max_memory_gb=0.02)
    store.add_embeddings(x, dimension=d, labels=labels)
    store.quantize(d, kinds=["int8"], sample_rows=300)
    q = np.concatenate([x[rng.integers(0, n, 1000)] + 0.2 * rng.standard_normal((1000, d)),
                        rng.standard_normal((1000, d)) * 3.0]).astype(np.float32)
    assert "certified int8 screen" in store.explain(q, 5, metric=metric, screen="int8")
    _check_exact(store, x, q, 5, metric)
    sel = np.flatnonzero(np.array(labels) == "rare")
    _check_exact(store, x, q[:50], 1, metric, pl.col("label") == "rare", sel)
    _check_exact(store, x, q[:50], 20, metric, pl.col("label") == "rare", sel)  # k > selection


@pytest.mark.parametrize("d", [1, 7, 384, 1100])
def test_int8_dot_is_exact(rng, d):
    """simsimd's int8 kernel (where installed) and the NumPy tiles (float32, float64 past d = 1031)
    give the exact integer products, the end codes included; uint8 bytes read as int8."""
    from embtools.kernels import int8 as K

    c = rng.integers(-128, 128, (3000, d), dtype=np.int8)
    c[0] = -128
    w = rng.integers(-127, 128, d, dtype=np.int8)
    w[0] = -127
    ref = c.astype(np.int64) @ w.astype(np.int64)
    for use in (True, False):
        np.testing.assert_array_equal(K.int8_dot(c, w, use_simsimd=use), ref.astype(np.float64))
        np.testing.assert_array_equal(K.int8_dot(c.view(np.uint8), w, use_simsimd=use), ref)
    np.testing.assert_array_equal(K.int8_dot(c[::2], w), ref[::2])  # not contiguous: NumPy
    assert K.int8_dot(c[:0], w).shape == (0,)
    with pytest.raises(ValueError):
        K.int8_dot(c, w[:-1] if d > 1 else np.zeros(2, np.int8))


def test_quantize_query_bounds_the_rounding(rng):
    """``|w . c - alpha (wi . c)| <= slack`` for every int8 code vector (the worst one included)."""
    from embtools.kernels.int8 import quantize_query

    for _ in range(50):
        w = rng.standard_normal(int(rng.integers(1, 50))) * 10.0 ** rng.uniform(-6, 6)
        wi, alpha, slack = quantize_query(w)
        assert wi.dtype == np.int8 and np.abs(wi.astype(int)).max() <= 127
        err = w - alpha * wi.astype(np.float64)
        worst = np.where(err > 0, 128, -128) * err  # codes that add every rounding up
        assert worst.sum() <= slack
        c = rng.integers(-128, 128, (100, w.size))
        assert np.all(np.abs(c @ w - alpha * (c @ wi.astype(np.float64))) <= slack)
    wi, alpha, slack = quantize_query(np.zeros(4))
    assert alpha == 0.0 and slack == 0.0 and not wi.any()


@pytest.mark.parametrize("metric", METRICS)
def test_screen_numpy_kernels_and_no_kept_terms(new_store, rng, monkeypatch, metric):
    """Without simsimd (the NumPy int8 tiles) and without the kept row terms (a cap too small to
    keep them): the same exact answers."""
    from embtools.kernels import int8 as K
    from embtools.search import int8screen as S

    n, d = 2500, 40
    x = _corpus(rng, n, d)
    store = new_store("disk", max_memory_gb=0.2)
    store.add_embeddings(x, dimension=d)
    store.quantize(d, kinds=["int8"], sample_rows=400)
    q = np.concatenate([x[[3, 12, 13]], rng.standard_normal((20, d)).astype(np.float32)])
    monkeypatch.setattr(K, "_simsimd", lambda: None)
    _check_exact(store, x, q, 10, metric)
    monkeypatch.setattr(S, "TERMS_CAP_FRACTION", 10**12)
    S._TERMS.clear()
    _check_exact(store, x, q, 10, metric)
    assert not S._TERMS


def _compiled_screen(jit, codes, qt, bd, metric, terms, inv, k, capacity, limit):
    """Run the compiled screen over ``codes`` in blocks of 700 rows, each split over two states:
    the kept positions, or None when the scan failed."""
    n = len(codes)
    states = [jit.ScreenState.new(k, capacity) for _ in range(2)]
    code = {"cosine": jit.METRIC_COSINE, "dot": jit.METRIC_DOT, "l2": jit.METRIC_L2}[metric]
    w = qt.wi.astype(np.float32)
    for a in range(0, n, 700):
        m = a + min(350, n - a)
        for st, s, e in ((states[0], a, m), (states[1], m, min(n, a + 700))):
            jit.screen_rows(codes[s:e], w, np.arange(s, e), qt.alpha, qt.const, qt.rad, code,
                            inv[0][s:e], inv[1][s:e], terms[s:e], qt.qq, qt.l2_slack(bd), bd.rho,
                            False, *st.arrays, limit)
    return None if any(st.failed for st in states) else jit.finish(states)


@pytest.mark.parametrize("metric", METRICS)
def test_compiled_screen_keeps_what_the_numpy_bounds_keep(rng, metric):
    """The compiled kernel (two states, kept lists compacted when they fill) keeps exactly the
    rows whose NumPy upper bound reaches the k-th largest NumPy lower bound; a limit below that
    many rows fails the scan instead of dropping any."""
    from embtools.kernels.int8 import QueryTerms
    from embtools.kernels.jit import jit_kernels

    jit = jit_kernels("int8_jit")
    if jit is None:
        pytest.skip("numba is not installed")  # the [jit] extra; CI installs it
    n, d, k = 4000, 48, 25
    x = _corpus(rng, n, d)
    ranges = int8_ranges(x[:600])
    codes = encode_int8(x, ranges).view(np.int8)
    bd = Int8Bounds.of(ranges)
    terms = int8_row_terms(codes, bd)
    inv = int8_inverse_norms(terms, bd)
    for q in (x[5] + 0.1, x[12], rng.standard_normal(d), np.zeros(d)):
        q = q.astype(np.float64)
        if metric == "cosine" and q.any():
            q = q / np.linalg.norm(q)
        lo, hi = int8_score_bounds(q, codes, bd, metric, terms, inverse_norms=inv)
        want = np.flatnonzero(hi >= np.sort(lo)[-k])
        qt = QueryTerms.of(q, bd)
        args = (jit, codes, qt, bd, metric, terms, inv, k)
        np.testing.assert_array_equal(_compiled_screen(*args, capacity=n + 1, limit=n), want)
        got = _compiled_screen(*args, capacity=len(want) + 40, limit=n)  # compacted when full
        if got is not None:  # a list still full after compacting fails the scan
            np.testing.assert_array_equal(got, want)
        if len(want) > 2:
            assert _compiled_screen(*args, capacity=2, limit=1) is None


@pytest.mark.parametrize("metric", METRICS)
def test_screen_mostly_end_code_rows(new_store, rng, metric, kernels):
    """Ranges sampled from 5 of 40 rows: most rows hold an end code and are scored exactly from
    the kept vectors; k past the rows the codes bound, and k past every row."""
    n, d = 40, 12
    x = _corpus(rng, n, d)
    store = new_store("disk")
    store.add_embeddings(x, dimension=d)
    store.quantize(d, kinds=["int8"], sample_rows=5)
    q = np.concatenate([x[[3, 12, 13]], rng.standard_normal((4, d)).astype(np.float32)])
    for k in (1, 20, 50):
        _check_exact(store, x, q, k, metric)
