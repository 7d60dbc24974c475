"""Few-query search paths: the one-query kernel, cosine on unnormalised blocks with inverse row
norms (cached per immutable source), differential against the float64 brute force and against
the batched (normalise-every-block) path."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.backends import get_backend
from embtools.kernels import numpy_tiles as numpy_kernel
from embtools.memory import MemoryBudget
from embtools.search import engine
from embtools.search.engine import stream_top_k
from embtools.search.request import SearchContext, SearchRequest
from embtools.storage.memory_source import ArraySource
from tests.helpers import brute_force, check_top_k, make_store, planted_corpus

METRICS = ["cosine", "dot", "l2"]


def _ref_top_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest first, ties by lower index, NaN last (stable sort on the negated key)."""
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-key, kind="stable")[:k]
    return s[order], order


def _frame_arrays(frame: pl.DataFrame, nq: int) -> tuple[np.ndarray, np.ndarray]:
    per = frame.height // nq
    return (frame["score"].to_numpy().reshape(nq, per), frame["row_id"].to_numpy().reshape(nq, per))


# ---------------------------------------------------------------------------- kernel
def test_select_top_k_1d_ties_and_nan():
    rng = np.random.default_rng()
    for _ in range(50):
        n = int(rng.integers(1, 300))
        s = rng.integers(-3, 4, size=n).astype(np.float32)  # heavy exact ties
        if rng.random() < 0.3:
            s[rng.choice(n, size=int(rng.integers(1, n + 1)), replace=True)] = np.nan
        for k in {1, 2, 7, n, n + 3}:
            kk = min(k, n)
            v, i = numpy_kernel.select_top_k_1d(s, kk)
            ev, ei = _ref_top_k(s, kk)
            np.testing.assert_array_equal(i, ei)
            np.testing.assert_array_equal(v, ev)
            assert i.dtype == np.int64


@pytest.mark.parametrize("metric", METRICS)
def test_one_query_kernel_exact_with_ties(metric):
    """Integer data (exact float32 scores): the one-query path equals the float64 reference and
    the tiled path (the same query as a 1-row slice of a many-query block)."""
    rng = np.random.default_rng()
    c = rng.integers(-2, 3, size=(5000, 6)).astype(np.float32)
    q = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    ref = -((q64[:, None] - c64[None]) ** 2).sum(-1) if metric == "l2" else q64 @ c64.T
    many_v, many_i = numpy_kernel.block_top_k(q, c, 25, metric)
    for j in range(3):
        v, i = numpy_kernel.block_top_k(q[j : j + 1], c, 25, metric)
        ev, ei = _ref_top_k(ref[j], 25)
        np.testing.assert_array_equal(i[0], ei)
        np.testing.assert_array_equal(v[0], -ev if metric == "l2" else ev)
        np.testing.assert_array_equal(i[0], many_i[j])
        np.testing.assert_array_equal(v[0], many_v[j])


@pytest.mark.parametrize("nq", [1, 3])
def test_kernel_scale_is_an_unnormalised_cosine(nq):
    rng = np.random.default_rng()
    c = rng.integers(-2, 3, size=(3000, 5)).astype(np.float32)
    q = rng.integers(-2, 3, size=(nq, 5)).astype(np.float32)
    scale = rng.integers(1, 4, size=3000).astype(np.float32)  # exact products: exact ties
    ref = (q.astype(np.float64) @ c.astype(np.float64).T) * scale
    b = et.get_backend("numpy")
    v, i = b.block_top_k_scaled(q, c, 30, "dot", scale)
    for j in range(nq):
        ev, ei = _ref_top_k(ref[j], 30)
        np.testing.assert_array_equal(i[j], ei)
        np.testing.assert_array_equal(v[j], ev)
    with pytest.raises(et.errors.InvalidArgumentError):
        b.block_top_k_scaled(q, c, 3, "l2", scale)
    with pytest.raises(et.errors.DimensionMismatchError):
        b.block_top_k_scaled(q, c, 3, "dot", scale[:-1])


def _unaligned(x: np.ndarray) -> np.ndarray:
    """A read-only copy of ``x`` starting 2 bytes into a buffer (like a data file's values)."""
    raw = np.zeros(x.nbytes + 8, np.uint8)
    out = np.frombuffer(raw[2 : 2 + x.nbytes].data, dtype=x.dtype).reshape(x.shape)
    np.copyto(out, x)
    out.flags.writeable = False
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 3])
def test_kernel_on_unaligned_blocks(monkeypatch, metric, nq):
    """Zero-copy views of data files need not be 4-byte aligned (no BLAS): the einsum
    matrix-vector product (split over threads) and the tile copies give the aligned results."""
    monkeypatch.setattr(numpy_kernel, "MIN_THREAD_MATVEC_ROWS", 100)
    monkeypatch.setattr(numpy_kernel, "TILE_COLS", 256)
    rng = np.random.default_rng()
    c = rng.integers(-3, 4, size=(3001, 7)).astype(np.float32)  # exact scores in any order
    q = rng.integers(-3, 4, size=(nq, 7)).astype(np.float32)
    scale = None if metric == "l2" else rng.integers(1, 3, size=3001).astype(np.float32)
    want = numpy_kernel.block_top_k(q, c, 40, metric, scale=scale)
    got = numpy_kernel.block_top_k(q, _unaligned(c), 40, metric, scale=scale)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    ref = (c.astype(np.float64) @ q[0].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(numpy_kernel.matvec(_unaligned(c), q[0]), ref)
    np.testing.assert_array_equal(numpy_kernel.row_dots(_unaligned(c)), np.sum(c * c, axis=1))


def test_inverse_norms_safe_range():
    x = np.array([[3, 4], [0, 0], [1e-30, 0], [1e30, 1e30], [0.5, 0]], np.float32)
    assert engine.inverse_norms(x) is None  # tiny and huge rows: the block is normalised instead
    inv = engine.inverse_norms(x[[0, 1, 4]])
    assert inv is not None and inv.dtype == np.float32
    np.testing.assert_allclose(inv, [0.2, 0.0, 2.0])


# ---------------------------------------------------------------------------- engine and stores
@pytest.mark.parametrize("where_store", ["memory", "disk"])
@pytest.mark.parametrize("metric", METRICS)
def test_single_queries_equal_the_batch_path_and_brute_force(tmp_path, where_store, metric):
    """One query at a time (the few-query path) gives exactly the rows and scores of the same
    queries searched together (the normalise-every-block path), and the float64 brute force."""
    rng = np.random.default_rng()
    n, d, k = 1500, 12, 10
    x = planted_corpus(rng, n, d)
    labels = rng.choice(["a", "b"], size=n).tolist()
    path = None if where_store == "memory" else tmp_path / "s"
    store = make_store(path, x, labels=labels)
    # queries equal to stored rows (their planted duplicates tie exactly) and random ones
    q = np.concatenate([x[rng.choice(n, 10)], rng.standard_normal((10, d)).astype(np.float32)])
    for where, positions in [(None, None), ("label = 'a'", np.flatnonzero(np.array(labels) == "a"))]:
        batch = store.search(q, k, metric=metric, where=where)
        assert len(q) >= engine.PREFETCH_MIN_QUERIES
        s64 = brute_force(x, q, metric, positions)
        for rep in range(2):  # the second round reads the cached norms
            singles = pl.concat(
                [store.search(qi, k, metric=metric, where=where).with_columns(pl.lit(j).alias("query"))
                 for j, qi in enumerate(q)]
            )
            assert singles.equals(batch), (where, rep)
        scores, found = _frame_arrays(batch, len(q))
        check_top_k(s64, scores, found, k, metric)
    if metric == "cosine":
        cached = engine._NORM_CACHE.get(store.source, {})
        assert d in cached and cached[d].shape == (n,)


@pytest.mark.parametrize("where_store", ["memory", "disk"])
def test_single_query_prefix_dimension_and_ties(tmp_path, where_store):
    """A Matryoshka prefix of the stored column (strided views, norms of the prefix), exact ties
    from duplicated rows broken by row id."""
    rng = np.random.default_rng()
    n, d = 900, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[500:600] = x[100:200]  # exact duplicates: exact ties, the lower row id first
    store = make_store(None if where_store == "memory" else tmp_path / "s", x)
    for dim in (6, d):
        q = x[150, :dim] + 0.0
        frame = store.search(q, 20, dimension=dim)
        s64 = brute_force(x[:, :dim], q[None], "cosine")
        scores, found = _frame_arrays(frame, 1)
        check_top_k(s64, scores, found, 20, "cosine")
        assert found[0][0] == 150 and 550 in found[0]
        assert list(found[0]).index(150) < list(found[0]).index(550)
        assert dim in engine._NORM_CACHE.get(store.source, {})


def test_single_query_rows_outside_the_safe_norm_range():
    """Rows whose squared norms underflow or overflow float32 are normalised, not scaled: the
    result still equals the brute force, and no norm cache is kept for that source."""
    rng = np.random.default_rng()
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x[7] = x[3] * 2.0**-90  # powers of two: exact scalings, so rows 3, 7 and 9 tie exactly
    x[9] = x[3] * 2.0**90
    x[11] = 0.0
    store = make_store(None, x)
    q = x[3] + 0.0
    frame = store.search(q, 6)
    scores, found = _frame_arrays(frame, 1)
    check_top_k(brute_force(x, q[None], "cosine"), scores, found, 6, "cosine")
    assert {3, 7, 9} <= set(found[0].tolist())
    assert 8 not in engine._NORM_CACHE.get(store.source, {})


def test_norm_cache_follows_the_version_and_the_cap(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    store = make_store(None, x)
    q = x[5] + 0.0
    store.search(q, 3)
    old = store.source
    assert 8 in engine._NORM_CACHE.get(old, {})
    y = rng.standard_normal((50, 8)).astype(np.float32) * 100
    store.add({8: y})
    assert store.source is not old  # a new version: its own norms
    frame = store.search(q, 3)
    scores, found = _frame_arrays(frame, 1)
    check_top_k(brute_force(np.concatenate([x, y]), q[None], "cosine"), scores, found, 3, "cosine")
    assert engine._NORM_CACHE[store.source][8].shape == (2050,)
    # under a tight cap: no cache, and nothing left in the ledger after the search
    disk = make_store(tmp_path / "s", x, max_memory_gb=x.nbytes / 4 / 1024**3)
    frame = disk.search(q, 3)
    scores, found = _frame_arrays(frame, 1)
    check_top_k(brute_force(x, q[None], "cosine"), scores, found, 3, "cosine")
    assert 8 not in engine._NORM_CACHE.get(disk.source, {})
    assert disk.budget.held_bytes == 0


def test_array_sources_are_not_cached():
    """An ArraySource wraps a caller's (mutable) array: norms are computed every time."""
    rng = np.random.default_rng()
    x = rng.standard_normal((300, 5)).astype(np.float32)
    src = ArraySource(x)
    b = et.get_backend("numpy")
    q = rng.standard_normal((1, 5)).astype(np.float32)
    s1, p1 = stream_top_k(src, b, MemoryBudget(None), q, 5, 4, "cosine")
    check_top_k(brute_force(x, q, "cosine"), s1, p1, 4, "cosine")
    assert src not in engine._NORM_CACHE
    src.vectors[p1[0, 0]] *= -1.0  # the caller changes the data in place
    s2, p2 = stream_top_k(src, b, MemoryBudget(None), q, 5, 4, "cosine")
    check_top_k(brute_force(src.vectors, q, "cosine"), s2, p2, 4, "cosine")
    assert p2[0, 0] != p1[0, 0]


def test_compute_similarity_single_query_matches_brute_force():
    rng = np.random.default_rng()
    x = planted_corpus(rng, 700, 10)
    store = make_store(None, x)
    q = rng.standard_normal(10).astype(np.float32)
    sims, idx = store.compute_similarity(q, 10, top_k=15)
    assert idx.shape == (15,)
    check_top_k(brute_force(x, q[None], "cosine"), np.asarray(sims)[None], idx[None], 15, "cosine")


# ---------------------------------------------------------------------------- float64 re-ranking
@pytest.mark.parametrize("metric", METRICS)
def test_rerank_scores_are_shape_independent(monkeypatch, metric):
    """The re-ranking scores equal, bit for bit, the elementwise float64 reference whatever the
    query groups, column blocks and cache-sized product blocks (so duplicates tie exactly)."""
    from embtools.search import refine

    rng = np.random.default_rng()
    n, d, nq, m = 500, 24, 7, 40
    x = planted_corpus(rng, n, d)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    cand = np.stack([rng.choice(n, m, replace=False) for _ in range(nq)]).astype(np.int64)
    q64 = q.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    g = x.astype(np.float64)[np.sort(cand, axis=1)]
    if metric == "l2":
        ref = np.sum((g - q64[:, None, :]) * (g - q64[:, None, :]), axis=-1)
    else:
        ref = np.sum(g * q64[:, None, :], axis=-1)
    if metric == "cosine":
        norms = np.sqrt(np.sum(g * g, axis=-1))
        ref = np.clip(ref / np.where(norms == 0, 1.0, norms), -1.0, 1.0)
    key = ref if metric == "l2" else -ref
    order = np.argsort(key, axis=1, kind="stable")[:, :m]
    src = ArraySource(x)
    for chunk, sub in [(None, None), (40_000, 3000), (9_000, 200)]:
        if chunk is not None:
            monkeypatch.setattr(refine, "RERANK_CHUNK_BYTES", chunk)
            monkeypatch.setattr(refine, "SUB_BLOCK_BYTES", sub)
        req = SearchRequest.build(src, q, m, metric=metric)
        top = refine.rerank(req, SearchContext(src, get_backend("numpy"), MemoryBudget(None)), cand)
        s, p = top.scores, top.positions
        np.testing.assert_array_equal(p, np.take_along_axis(np.sort(cand, axis=1), order, axis=1))
        np.testing.assert_array_equal(s, np.take_along_axis(ref, order, axis=1).astype(np.float32))
    ctx = SearchContext(src, get_backend("numpy"), MemoryBudget(None))
    for i in range(nq):  # one query at a time: the compiled single-query re-rank, the same bits
        one = refine.rerank(SearchRequest.build(src, q[i], m, metric=metric), ctx, cand[i:i + 1], 9)
        np.testing.assert_array_equal(one.positions[0], np.sort(cand[i])[order[i, :9]])
        np.testing.assert_array_equal(one.scores[0], ref[i, order[i, :9]].astype(np.float32))
    for sub in (1, 5000, 10**7):  # the float64 scores themselves, product blocks of any size
        got = refine._score(src, q64, d, np.sort(cand, axis=1), metric, sub)
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------- running top-k
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 13])
def test_kernel_running_top_k_over_blocks(monkeypatch, metric, nq):
    """Blocks merged into the running top-k by the kernel (only rows beating its k-th best are
    looked at) give exactly the one-block result; small tiles force pending merges; blocks
    shorter than k and a running list shorter than k go through the plain merge."""
    monkeypatch.setattr(numpy_kernel, "TILE_COLS", 32)
    monkeypatch.setattr(numpy_kernel, "TILE_COLS_PER_K", 1)
    monkeypatch.setattr(numpy_kernel, "TILE_ROWS", 8)
    rng = np.random.default_rng()
    b = et.get_backend("numpy")
    c = rng.integers(-2, 3, size=(2000, 5)).astype(np.float32)  # exact scores, many ties
    q = rng.integers(-2, 3, size=(nq, 5)).astype(np.float32)
    for k in (1, 7, 40):
        want = b.block_top_k(q, c, k, metric)
        for cuts in ([0, 450, 900, 1350, 1800, 2000], [0, 3, 20, 1000, 1990, 2000]):
            best = None
            for a, e in itertools.pairwise(cuts):
                best = b.block_top_k_running(q, c[a:e], k, metric, best, a)
            np.testing.assert_array_equal(best[1], want[1])
            np.testing.assert_array_equal(best[0], want[0])
    with pytest.raises(et.errors.DimensionMismatchError):
        b.block_top_k_running(q, c, 3, metric, (np.zeros((nq + 1, 3)), np.zeros((nq + 1, 3))), 0)


def test_merge_sorted_nan_last_ties_by_index():
    va = np.array([[3.0, 1.0, np.nan]]), np.array([[5, 2, 9]])
    vb = np.array([[3.0, 1.0, 0.0]]), np.array([[4, 8, 1]])
    v, i = numpy_kernel.merge_sorted(*va, *vb, 5)
    assert i.tolist() == [[4, 5, 2, 8, 1]] and v[0, 0] == 3.0
    v, i = numpy_kernel.merge_sorted(*va, *vb, 6, largest=False)
    assert i.tolist() == [[1, 2, 8, 4, 5, 9]]


def test_engine_many_blocks_large_k_exact(tmp_path):
    """A funnel-sized shortlist over many batches (running merges in the kernel)."""
    rng = np.random.default_rng()
    n, d = 3000, 8
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    q = rng.integers(-3, 4, size=(20, d)).astype(np.float32)
    for metric in ("dot", "l2"):
        s, p = stream_top_k(ArraySource(x), et.get_backend("numpy"), MemoryBudget(None), q, d, 300,
                            metric, batch_rows=700)
        check_top_k(brute_force(x, q, metric), s, p, 300, metric, exact=True)


# ---------------------------------------------------------------------------- reading for search
def _grouped_store(tmp_path, n=2400, d=16):
    """A disk store of several files with several row groups each (small cap)."""
    rng = np.random.default_rng()
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.choice(["a", "b", None], size=n).tolist()
    store = make_store(tmp_path / "s", x, labels=labels, metadata={"year": np.arange(n) % 50},
                       max_memory_gb=n * d * 4 / 8 / 1024**3)
    groups = [rg for f in store.source.manifest.files for rg in f.row_groups]
    assert len(store.source.manifest.files) >= 3 and len(groups) >= 6
    return store, x, labels


def test_iter_vectors_views_end_batches_at_row_groups(tmp_path):
    store, x, _ = _grouped_store(tmp_path)
    src = store.source
    groups = [rg for f in src.manifest.files for rg in f.row_groups]
    ends = set(np.cumsum(groups).tolist())
    batch = max(groups) + 7  # a batch straddles row groups unless it ends at one
    seen = []
    for pos, v in src.iter_vectors(16, batch_rows=batch, views=True):
        assert len(pos) <= batch
        np.testing.assert_array_equal(v, x[pos])
        if not v.flags.owndata:  # a view of one row group
            assert int(pos[-1]) + 1 in ends or len(pos) == batch
        seen.append(pos)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(len(x)))
    # without views: full batches (copies across row groups), same rows
    sizes = [len(p) for p, _ in src.iter_vectors(16, batch_rows=batch)]
    assert sizes[:-1] == [batch] * (len(sizes) - 1)
    # a selection with gaps and a prefix dimension: the same rows either way
    sel = np.flatnonzero(np.random.default_rng().random(len(x)) < 0.6)
    for views in (False, True):
        got = [(p, np.array(v)) for p, v in src.iter_vectors(5, sel, batch_rows=300, views=views)]
        np.testing.assert_array_equal(np.concatenate([p for p, _ in got]), sel)
        np.testing.assert_array_equal(np.concatenate([v for _, v in got]), x[sel, :5])


def test_take_metadata_cached_row_groups(tmp_path, monkeypatch):
    from embtools.storage import snapshot

    store, x, labels = _grouped_store(tmp_path)
    src = store.source
    rng = np.random.default_rng()
    n = len(x)
    for rep in range(3):
        if rep == 2:  # a cache that holds about one row group: evictions, same answers
            one = max(int(t.nbytes) for t in src._meta_groups.values())
            monkeypatch.setattr(snapshot, "META_CACHE_BYTES", one * 3 // 2)
            src.close()
        pos = rng.integers(0, n, size=40)  # any order, repeats
        frame = src.take_metadata(pos)
        assert frame["row_id"].to_list() == pos.tolist()
        assert frame["text_id"].to_list() == [f"t{i}" for i in pos]
        assert frame["label"].to_list() == [labels[i] for i in pos]
        extra = src.take_metadata(pos, ["year"])
        assert extra["year"].to_list() == (pos % 50).tolist()
        assert extra.select("row_id", "text_id", "label").equals(frame)
    assert src._meta_groups and all(key[2] == snapshot._BASE for key in src._meta_groups)
    assert 0 < src._meta_bytes <= snapshot.META_CACHE_BYTES
    # the search results carry the same metadata as the brute force's rows
    q = x[rng.choice(n, 3)]
    res = store.search(q, 5, columns=["year"])
    assert res["text_id"].to_list() == [f"t{i}" for i in res["row_id"].to_list()]
    assert res["year"].to_list() == [i % 50 for i in res["row_id"].to_list()]
    src.close()
    assert not src._meta_groups and not src._meta_files


def test_plan_for_tiled_kernel_counts_tiles_not_scores_per_row():
    """The NumPy kernel holds a few tiles of scores, not one score per (query, row) of a batch:
    larger batches without a cap, and the tiles counted (up to one tile) under a cap."""
    from embtools.search.engine import MAX_TILED_BATCH_ROWS, size_stream

    free = size_stream(None, 1000, 64, 400, 10**6, "cosine", tiled=True)
    old = size_stream(None, 1000, 64, 400, 10**6, "cosine")
    assert free is not None and old is not None
    assert free.rows == MAX_TILED_BATCH_ROWS > old.rows
    for cap_mb in (0.05, 0.5, 5, 50, 500):
        cap = cap_mb / 1024
        for nq, k in [(1, 10), (10, 10), (1000, 400), (3000, 18)]:
            p = size_stream(MemoryBudget(cap).available_bytes, nq, 64, k, 10**6, "cosine", tiled=True)
            assert p is not None and p.rows >= 1 and p.nbytes <= cap * 1024**3, (cap_mb, nq, k, p)
            width = numpy_kernel.tile_cols(k, max(1, p.chunk // numpy_kernel.QUERY_THREADS))
            tiles = min(p.rows, width) * numpy_kernel.tile_bytes(p.chunk, k, 64) // (
                numpy_kernel.tile_cols(k, p.chunk))
            assert p.nbytes >= tiles
