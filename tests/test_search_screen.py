"""The bfloat16 screen of large query batches (embtools.search.screen): its error bound holds on
real bfloat16 products, certified queries get the float64 brute force's exact answer, queries it
cannot certify fall back to the float32 path, and store.search gives the same results with the
screen on and off."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from embtools.backends import get_backend
from embtools.errors import MemoryLimitError
from embtools.kernels import torch_screen
from embtools.memory import MemoryBudget
from embtools.search import funnel as funnel_module
from embtools.search import plan as plan_module
from embtools.search import screen
from embtools.search.plan import plan_search, run_search
from embtools.search.request import SearchContext, SearchRequest
from embtools.storage.memory_source import ArraySource
from tests.helpers import brute_force, check_top_k, make_store, planted_corpus


def _req(src, queries, k, metric, positions=None, batch_rows=None, mode="auto"):
    return SearchRequest.build(
        src, queries, k, metric=metric, positions=positions, batch_rows=batch_rows, screen=mode
    )


def _ctx(src, budget=None):
    return SearchContext(src, get_backend("numpy"), budget or MemoryBudget(None))


def _screened(src, budget, queries, k, metric, positions=None, batch_rows=None, sizes=None):
    top, ok = screen.screened_top_k(
        _req(src, queries, k, metric, positions, batch_rows), _ctx(src, budget), sizes
    )
    return top.scores, top.positions, ok


def _shortlist(src, budget, queries, n, metric, positions=None, batch_rows=None, sizes=None):
    req = _req(src, queries, n, metric, positions, batch_rows)
    return screen.screened_shortlist(req, _ctx(src, budget), n, sizes)


def _exact(src, queries, k, metric, mode):
    """The planner's exact search with the screen forced on or forbidden, and its path."""
    req, ctx = _req(src, queries, k, metric, mode=mode), _ctx(src)
    plan = plan_search(req, ctx)
    top = run_search(req, ctx, plan)
    return top.scores, top.positions, plan.path


def _queries_near(rng: np.random.Generator, corpus: np.ndarray, nq: int, noise: float) -> np.ndarray:
    q = corpus[rng.choice(len(corpus), nq, replace=False)].astype(np.float32)
    return q + noise * rng.standard_normal(q.shape).astype(np.float32)


def _varied_norms(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Rows scaled over several orders of magnitude (and a few tiny ones: cosine must rescale)."""
    x = x * np.exp(rng.uniform(-3, 3, size=(len(x), 1))).astype(np.float32)
    x[rng.choice(len(x), 5, replace=False)] *= np.float32(1e-30)
    return x


@pytest.mark.parametrize("metric", ["cosine", "cosine-unit-rows", "dot"])
def test_error_bound_holds_for_every_score(metric):
    """|exact - bfloat16| <= error_bound + half_ulp for every (query, row) of a real product
    (unit rows: used as they are, without the normalising multiply)."""
    rng = np.random.default_rng()
    d = int(rng.choice([7, 48, 384]))
    x = rng.standard_normal((3000, d)).astype(np.float32)
    if metric == "cosine-unit-rows":
        metric = "cosine"
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    if metric == "dot":
        x *= np.exp(rng.uniform(-2, 2, size=(len(x), 1))).astype(np.float32)
    q = rng.standard_normal((70, d)).astype(np.float32) * np.float32(rng.uniform(0.1, 10))
    q32 = screen.normalize_rows(q) if metric == "cosine" else q
    qb, qb_norm, dq_norm = torch_screen.round_queries(q32)
    xb = torch.empty((len(x), d), dtype=torch.bfloat16)
    scratch = torch.empty((len(x), d), dtype=torch.float32)
    max_x = torch_screen.prepare_batch(x, metric, xb, scratch, screen.normalize_rows)
    a = (qb @ xb.T).float().numpy().astype(np.float64)
    exact = brute_force(x, q, metric)
    bound = screen.error_bound(qb_norm, dq_norm, max_x, d)[:, None] + screen.half_ulp(a)
    err = np.abs(exact - a)
    assert (err <= bound).all(), float((err - bound).max())
    # the bound is a proof, not slack: the worst error uses a good part of it
    assert err.max() > 0.05 * bound.max()


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("cap_gb", [None, 0.004])
def test_certified_queries_equal_float64_brute_force(metric, filtered, cap_gb):
    rng = np.random.default_rng()
    corpus = planted_corpus(rng, 9000, 32)
    if metric == "dot" or rng.random() < 0.5:
        corpus = _varied_norms(rng, corpus)
    elif rng.random() < 0.5:  # unit rows (and the zero row): no normalising multiply
        norms = np.linalg.norm(corpus, axis=1, keepdims=True)
        corpus /= np.where(norms == 0, 1, norms)
    queries = _queries_near(rng, corpus, 90, 0.3)
    positions = np.sort(rng.choice(len(corpus), 6000, replace=False)) if filtered else None
    k = int(rng.choice([1, 10, 25]))
    budget = MemoryBudget(cap_gb)
    s, p, ok = _screened(ArraySource(corpus), budget, queries, k, metric, positions=positions)
    assert budget.held_bytes == 0
    assert ok.mean() > 0.5, ok.mean()
    s64 = brute_force(corpus, queries, metric, positions)
    tol = 1e-6 * max(1.0, float(np.nanmax(np.abs(s64))))  # float32 scores of large dot products
    check_top_k(s64[ok], s[ok], p[ok], k, metric, tol=tol)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_uncertified_queries_fall_back_and_stay_exact(metric):
    """More exact copies of a row than the screen keeps: its queries cannot be certified, and
    the planner's fallback answers them with the float32 path: copies only, in position order
    among equal float32 scores (which copies: sgemm may round identical rows in different
    column blocks differently, by an ulp, as OpenBLAS's AVX2 kernels do)."""
    rng = np.random.default_rng()
    corpus = rng.standard_normal((8000, 24)).astype(np.float32)
    copies = rng.choice(len(corpus), 300, replace=False)
    corpus[copies] = 3 * corpus[copies[0]]  # the longest rows: they win under dot too
    queries = np.concatenate(
        [np.repeat(corpus[copies[:1]], 10, axis=0), _queries_near(rng, corpus, 60, 0.5)]
    )
    _, _, ok = _screened(ArraySource(corpus), MemoryBudget(None), queries, 5, metric)
    assert not ok[:10].any() and ok[10:].mean() > 0.5
    s, p, path = _exact(ArraySource(corpus), queries, 5, metric, "on")
    assert path == "screen"
    assert np.isin(p[:10], copies).all()
    assert (np.diff(p[:10], axis=1)[np.diff(s[:10], axis=1) == 0] > 0).all()
    s64 = brute_force(corpus, queries, metric)
    check_top_k(s64, s, p, 5, metric, tol=1e-6 * max(1.0, float(np.abs(s64).max())))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_store_search_same_with_screen_on_and_off(tmp_path, monkeypatch, backend, metric):
    rng = np.random.default_rng()
    corpus = planted_corpus(rng, 9000, 40)
    group = np.arange(len(corpus)) % 3
    store = make_store(tmp_path / "s", corpus, backend=backend, metadata={"group": group})
    queries = _queries_near(rng, corpus, 100, 0.2)
    where = pl.col("group") != 0
    certified: list[float] = []
    real = screen.screened_top_k

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        certified.append(float(out[1].mean()))
        return out

    monkeypatch.setattr(plan_module, "screened_top_k", spy)
    on = store.search(queries, 10, metric=metric, where=where, screen="on")
    assert certified == [] if metric == "l2" else certified[0] > 0.5, certified
    off = store.search(queries, 10, metric=metric, where=where, screen="off")
    assert len(certified) == (0 if metric == "l2" else 1)
    assert on["row_id"].to_list() == off["row_id"].to_list()
    np.testing.assert_allclose(on["score"].to_numpy(), off["score"].to_numpy(), rtol=0, atol=1e-6)


def test_screen_enabled_conditions():
    numpy_backend = get_backend("numpy")
    assert screen.screen_enabled(numpy_backend, 1000, 10, "cosine", 100_000, "on")
    assert screen.screen_enabled(get_backend("torch", device="cpu"), 1000, 10, "dot", 100_000, "on")
    assert not screen.screen_enabled(numpy_backend, 1000, 10, "l2", 100_000, "on")
    assert not screen.screen_enabled(
        numpy_backend, screen.SCREEN_MIN_QUERIES - 1, 10, "cosine", 10**6, "on"
    )
    assert not screen.screen_enabled(
        numpy_backend, 1000, 10, "cosine", screen.SCREEN_MIN_ROWS - 1, "on"
    )
    assert not screen.screen_enabled(
        numpy_backend, 1000, screen.SCREEN_MAX_K + 1, "cosine", 10**6, "on"
    )
    assert not screen.screen_enabled(numpy_backend, 1000, 10, "cosine", 100_000, "off")
    expected = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert screen.screen_enabled(numpy_backend, 1000, 10, "cosine", 100_000, "auto") is expected


def test_screen_mode_default_comes_from_the_environment_once(monkeypatch):
    """EMBTOOLS_BF16_SCREEN sets the request's default ``screen`` (read once per process); an
    explicit ``screen=`` wins; a bad value is refused at the boundary."""
    from embtools.errors import InvalidArgumentError
    from embtools.search import request

    src = ArraySource(np.eye(4, dtype=np.float32))
    request.default_screen_mode.cache_clear()
    try:
        monkeypatch.setenv("EMBTOOLS_BF16_SCREEN", "off")
        assert SearchRequest.build(src, np.eye(4)[:1], 1).screen == "off"
        monkeypatch.setenv("EMBTOOLS_BF16_SCREEN", "on")  # read once: still off
        assert SearchRequest.build(src, np.eye(4)[:1], 1).screen == "off"
        assert SearchRequest.build(src, np.eye(4)[:1], 1, screen="ON").screen == "on"
        with pytest.raises(InvalidArgumentError, match="screen"):
            SearchRequest.build(src, np.eye(4)[:1], 1, screen="fast")
    finally:
        request.default_screen_mode.cache_clear()


def test_screen_off_where_bfloat16_products_do_not_sum_in_float32(monkeypatch):
    """A torch whose bfloat16 matmul summed in bfloat16 would break the error bound: the probe
    product catches it and every search takes the float32 path."""
    assert torch_screen.accumulates_in_float32()  # the installed torch sums in float32
    backend = get_backend("numpy")
    assert screen.screen_enabled(backend, 1000, 10, "cosine", 100_000, "on")
    real_mm = torch.mm

    def bfloat16_sums(a, b, out=None):  # what a bfloat16 accumulator would return
        result = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.bfloat16)
        for j in range(a.shape[1]):
            result += a[:, j : j + 1] * b[j : j + 1, :]
        return result if out is None else out.copy_(result)

    torch_screen.accumulates_in_float32.cache_clear()
    monkeypatch.setattr(torch, "mm", bfloat16_sums)
    try:
        assert not torch_screen.accumulates_in_float32()
        assert not screen.screen_enabled(backend, 1000, 10, "cosine", 100_000, "on")
    finally:
        monkeypatch.setattr(torch, "mm", real_mm)
        torch_screen.accumulates_in_float32.cache_clear()
    assert screen.screen_enabled(backend, 1000, 10, "cosine", 100_000, "on")


def test_screen_refuses_a_cap_too_small():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((5000, 64)).astype(np.float32)
    with pytest.raises(MemoryLimitError):
        _screened(ArraySource(corpus), MemoryBudget(0.0001), corpus[:100], 10, "cosine")


@pytest.mark.parametrize("filtered", [False, True])
def test_screened_shortlist_keeps_the_best_rows(filtered):
    """The funnel's first stage: the n best rows by bfloat16 score. Every row clearly above the
    exact n-th best score is kept and nothing clearly below it; n covering the selection keeps
    every row."""
    rng = np.random.default_rng()
    corpus = planted_corpus(rng, 8000, 16)
    queries = _queries_near(rng, corpus, 70, 0.3)
    positions = np.sort(rng.choice(len(corpus), 5000, replace=False)) if filtered else None
    n = int(rng.choice([50, 300]))
    found = _shortlist(ArraySource(corpus), MemoryBudget(None), queries, n, "cosine", positions)
    assert found.shape == (len(queries), n)
    s64 = brute_force(corpus, queries, "cosine", positions)
    for qi, row in enumerate(s64):
        assert len(set(found[qi].tolist())) == n and not np.isnan(row[found[qi]]).any()
        nth = np.sort(row[~np.isnan(row)])[::-1][n - 1]
        assert (row[found[qi]] >= nth - 0.02).all()
        clearly = np.flatnonzero(row > nth + 0.02)
        assert np.isin(clearly, found[qi]).all()
    every = _shortlist(ArraySource(corpus), MemoryBudget(None), queries, 9000, "cosine", positions)
    expected = np.arange(len(corpus)) if positions is None else positions
    assert (np.sort(every, axis=1) == expected).all()


def test_funnel_picks_its_shortlist_with_the_screen(tmp_path, monkeypatch):
    from embtools.search import recall_at_k

    rng = np.random.default_rng()
    d = 64
    x = rng.standard_normal((6000, d)).astype(np.float32) * np.exp(-np.arange(d) / 10)
    x = x.astype(np.float32)
    store = make_store(tmp_path / "s", {16: x[:, :16], d: x})
    queries = _queries_near(rng, x, 80, 0.05)
    calls: list[int] = []
    real = screen.screened_shortlist
    monkeypatch.setattr(
        funnel_module, "screened_shortlist", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    fast = store.search(queries, 10, funnel=[(16, 300)], screen="on")
    assert calls == [1]
    assert "bfloat16 screen at dimension 16" in store.explain(queries, 10, funnel=[(16, 300)],
                                                              screen="on")
    exact = store.search(queries, 10, screen="off")
    float32_funnel = store.search(queries, 10, funnel=[(16, 300)], screen="off")
    assert calls == [1]
    assert recall_at_k(fast, exact, 10) >= recall_at_k(float32_funnel, exact, 10) - 0.01
    assert recall_at_k(fast, exact, 10) > 0.9


def test_dot_scores_that_overflow_bfloat16_are_not_certified():
    """Rows near float32's largest values overflow the bfloat16 product (inf): those queries are
    not certified and take the float32 path, so the answer is the one without the screen."""
    rng = np.random.default_rng()
    corpus = rng.standard_normal((6000, 32)).astype(np.float32)
    big = rng.choice(len(corpus), 20, replace=False)
    corpus[big] = np.abs(corpus[big]) * np.float32(3e37)  # positive dot products overflow
    queries = np.abs(rng.standard_normal((70, 32))).astype(np.float32)
    _, _, ok = _screened(ArraySource(corpus), MemoryBudget(None), queries, 5, "dot")
    assert not ok.any()
    with np.errstate(over="ignore", invalid="ignore"):
        on = _exact(ArraySource(corpus), queries, 5, "dot", "on")
        off = _exact(ArraySource(corpus), queries, 5, "dot", "off")
    assert (on[2], off[2]) == ("screen", "float32")
    np.testing.assert_array_equal(on[1], off[1])
    assert set(on[1].ravel().tolist()) <= set(big.tolist())


@pytest.mark.parametrize("order", ["random", "improving"])
def test_probe_of_a_few_groups_settles_or_opens_queries(monkeypatch, order):
    """Many small batches: once a query holds its ``width`` rows, a batch first expands only a
    few groups. In random order most queries are settled by that probe; when every batch beats
    the last ("improving": rows sorted by their score for the queries), the probe cannot settle
    them and they expand all their groups. Either way certified queries get the float64 brute
    force's answer and the shortlist holds the best rows."""
    rng = np.random.default_rng()
    d = 24
    direction = rng.standard_normal(d).astype(np.float32)
    corpus = rng.standard_normal((20_000, d)).astype(np.float32) + 0.5 * direction
    queries = direction + 0.2 * rng.standard_normal((80, d)).astype(np.float32)
    if order == "improving":
        corpus = corpus[np.argsort(brute_force(corpus, queries[:1], "cosine")[0], kind="stable")]
    calls: list[tuple[bool, int]] = []  # (a subset of the queries, how many)
    real = torch_screen._Batch.merge

    def spy(self, best_v, best_i, groups, width, rows=None):
        calls.append((rows is not None, len(best_v) if rows is None else len(rows)))
        return real(self, best_v, best_i, groups, width, rows)

    monkeypatch.setattr(torch_screen._Batch, "merge", spy)
    source = ArraySource(corpus)
    s, p, ok = _screened(source, MemoryBudget(None), queries, 10, "cosine", batch_rows=512)
    opened = sum(m for subset, m in calls if subset)  # (query, batch) pairs expanded in full
    batches = -(-len(corpus) // 512)
    if order == "random":
        assert opened < 0.05 * len(queries) * batches, opened
    else:
        assert opened > 0.25 * len(queries) * batches, opened
    assert ok.mean() > 0.5
    s64 = brute_force(corpus, queries, "cosine")
    check_top_k(s64[ok], s[ok], p[ok], 10, "cosine", tol=1e-6)
    n = 200
    found = _shortlist(source, MemoryBudget(None), queries, n, "cosine", batch_rows=512)
    for qi, row in enumerate(s64):
        nth = np.sort(row)[::-1][n - 1]
        assert np.isin(np.flatnonzero(row > nth + 0.02), found[qi]).all()
        assert (row[found[qi]] >= nth - 0.02).all()


def test_queries_screened_in_several_groups():
    """More queries than one group: each group streams the corpus on its own and the answers
    land on the right query rows (certified ones equal the brute force, shortlists hold the best)."""
    import dataclasses

    rng = np.random.default_rng()
    corpus = planted_corpus(rng, 6000, 16)
    queries = _queries_near(rng, corpus, 90, 0.2)  # groups of 32, 32 and 26
    sizes = screen.size_screen(None, 90, 16, screen.screen_width(5), len(corpus))
    assert sizes is not None
    sizes = dataclasses.replace(sizes, group=32)
    s, p, ok = _screened(ArraySource(corpus), MemoryBudget(None), queries, 5, "dot", sizes=sizes)
    assert ok.mean() > 0.5 and ok[64:].any()
    s64 = brute_force(corpus, queries, "dot")
    check_top_k(s64[ok], s[ok], p[ok], 5, "dot", tol=1e-5)
    short = screen.size_screen(None, 90, 16, 50, len(corpus), pool=16)
    assert short is not None
    short = dataclasses.replace(short, group=32)
    found = _shortlist(ArraySource(corpus), MemoryBudget(None), queries, 50, "dot", sizes=short)
    best = np.argsort(-s64, axis=1, kind="stable")[:, 0]
    assert (found == best[:, None]).any(axis=1).all()  # each query's own shortlist
