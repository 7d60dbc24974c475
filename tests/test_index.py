"""IVF index: recall against the float64 brute force, identity at full probe, consistency with
appends, deletes, compaction and snapshots, the memory cap, every backend, bad input, damage."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.errors import CorruptStoreError, InvalidArgumentError, MemoryLimitError

DIM = 32


def clustered(n: int, dim: int = DIM, centers: int = 40, seed: int = 0, noise: float = 0.35):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, dim))
    q = c[rng.integers(0, centers, 64)] + noise * rng.standard_normal((64, dim))
    return x.astype(np.float32), q.astype(np.float32)


def brute(x: np.ndarray, q: np.ndarray, k: int, metric: str = "cosine", alive=None) -> np.ndarray:
    """Row positions of the float64 brute-force top-k (ties by lower position)."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    key = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1) if metric == "l2" else -(q64 @ x64.T)
    if alive is not None:
        key[:, ~alive] = np.inf
    return np.lexsort((np.broadcast_to(np.arange(len(x)), key.shape), key), axis=1)[:, :k]


def ids(frame: pl.DataFrame, nq: int) -> np.ndarray:
    return frame["row_id"].to_numpy().reshape(nq, -1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """Each test using it runs twice: with the numba kernels and with the NumPy ones."""
    from embtools.kernels.jit import JIT_ENV, jit_kernels

    monkeypatch.setenv(JIT_ENV, "1" if request.param == "compiled" else "0")
    assert (jit_kernels("ivf_jit") is not None) == (request.param == "compiled")
    return request.param


@pytest.fixture
def indexed(tmp_path):
    x, q = clustered(3000)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, text_ids=[f"t{i}" for i in range(len(x))])
    store.create_index(dimension=DIM, partitions=40, codes="float")
    return store, x, q


def test_recall_against_brute_force_on_clustered_data(indexed):
    store, x, q = indexed
    truth = brute(x, q, 10)
    found = ids(store.search(q, k=10, nprobe=6), len(q))
    assert recall(found, truth) >= 0.95
    # more probes never hurt, and the shortlist scores are the exact ones
    found_all = store.search(q, k=10, nprobe=20)
    assert recall(ids(found_all, len(q)), truth) >= recall(found, truth)
    exact = store.search(q, k=10, exact=True)
    same = found_all.join(exact, on=["query", "row_id"], suffix="_exact")
    assert np.allclose(same["score"], same["score_exact"])


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_full_probe_equals_exact_search(tmp_path, metric, kernels):
    x, q = clustered(1500, seed=3)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=16, codes="float", metric=metric)
    for k in (1, 10, 37):
        got = store.search(q, k=k, nprobe=16, metric=metric)
        want = store.search(q, k=k, metric=metric, exact=True)
        assert got.equals(want)
        assert np.array_equal(ids(got, len(q)), brute(x, q, k, metric))
    one = store.search(q[0], k=5, nprobe=16, metric=metric)  # a single 1-D query
    assert one["row_id"].to_list() == brute(x, q[:1], 5, metric)[0].tolist()


def test_matryoshka_codes_shortlist_then_exact_rerank(tmp_path):
    x, q = clustered(2000, seed=5)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add({DIM: x, 8: x[:, :8]})
    store.create_index(dimension=DIM, partitions=20, codes=8)
    info = store.indexes()[0]
    assert (info["codes"], info["code_dim"]) == ("8", 8)
    got = store.search(q, k=5, nprobe=20, refine=400)  # every row shortlisted: exact
    assert got.equals(store.search(q, k=5, exact=True))
    assert recall(ids(store.search(q, k=5, nprobe=20, refine=20), len(q)), brute(x, q, 5)) >= 0.9


def test_appended_rows_are_searched_exactly_and_merged(indexed):
    store, x, q = indexed
    rng = np.random.default_rng(9)
    extra = (x[rng.integers(0, len(x), 300)] + 0.01 * rng.standard_normal((300, DIM))).astype(np.float32)
    store.add(extra)
    assert store.indexes()[0]["unindexed_rows"] == 300
    every = np.concatenate([x, extra])
    # each new row finds itself first, through the exact part of the search
    hits = store.search(extra[:50], k=1, nprobe=1)["row_id"].to_numpy()
    assert np.array_equal(hits, np.arange(len(x), len(x) + 50))
    truth = brute(every, q, 10)
    assert recall(ids(store.search(q, k=10, nprobe=6), len(q)), truth) >= 0.95
    assert store.search(q, k=10, nprobe=40).equals(store.search(q, k=10, exact=True))
    # optimize_index: a delta assigns them to the existing centroids
    store.optimize_index()
    info = store.indexes()[0]
    assert info["unindexed_rows"] == 0 and info["indexed_rows"] == len(every)
    assert store.search(q, k=10, nprobe=40).equals(store.search(q, k=10, exact=True))
    hits = store.search(extra[50:80], k=1, nprobe=2)["row_id"].to_numpy()
    assert np.array_equal(hits, np.arange(len(x) + 50, len(x) + 80))


def test_optimize_retrains_past_the_share(indexed):
    store, _x, _q = indexed
    store.add(clustered(1500, seed=11)[0])
    before = store.indexes()[0]
    store.optimize_index(retrain_share=0.2)
    after = store.indexes()[0]
    assert after["built_version"] > before["built_version"] and after["unindexed_rows"] == 0
    assert store.optimize_index() == store.version  # nothing to do


def test_deleted_rows_are_never_returned(indexed):
    store, x, q = indexed
    top = ids(store.search(q, k=5, nprobe=40), len(q))
    gone = np.unique(top[:, :2])
    store.delete(pl.col("row_id").is_in(gone.tolist()))
    alive = ~np.isin(np.arange(len(x)), gone)
    got = store.search(q, k=5, nprobe=40)
    assert not np.isin(got["row_id"].to_numpy(), gone).any()
    assert np.array_equal(ids(got, len(q)), brute(x, q, 5, alive=alive))
    assert store.indexes()[0]["deleted_rows"] == len(gone)
    store.compact(target_file_bytes=1 << 40)  # row ids kept: the index still covers every row
    assert store.indexes()[0]["unindexed_rows"] == 0
    assert np.array_equal(ids(store.search(q, k=5, nprobe=40), len(q)), brute(x, q, 5, alive=alive))


def test_snapshots_keep_their_index_and_vacuum_keeps_what_they_need(indexed, tmp_path):
    store, _x, q = indexed
    v_index = store.version
    before = store.search(q, k=10, nprobe=3)
    store.drop_index()
    assert store.indexes() == []
    with pytest.raises(InvalidArgumentError, match="create_index"):
        store.search(q, k=10, nprobe=3)
    old = et.EmbeddingStore(store.path, backend="numpy", version=v_index)
    assert old.search(q, k=10, nprobe=3).equals(before)
    files = sorted(os.listdir(os.path.join(store.path, "_index", f"emb_{DIM}_cosine")))
    store.vacuum(retain_versions=2, grace_seconds=0)  # keeps v_index: its index files stay
    assert sorted(os.listdir(os.path.join(store.path, "_index", f"emb_{DIM}_cosine"))) == files
    assert old.search(q, k=10, nprobe=3).equals(before)
    old.close()
    store.vacuum(retain_versions=1, grace_seconds=0)
    assert os.listdir(os.path.join(store.path, "_index", f"emb_{DIM}_cosine")) == []


@pytest.mark.parametrize("backend", et.available_backends())
def test_every_backend_builds_and_searches(tmp_path, backend):
    x, q = clustered(400, seed=7)
    store = et.EmbeddingStore(tmp_path / backend, backend=backend)
    store.add(x)
    store.create_index(dimension=DIM, partitions=8, codes="float")
    got = store.search(q[:8], k=5, nprobe=8)
    assert np.array_equal(ids(got, 8), brute(x, q[:8], 5))
    assert recall(ids(store.search(q[:8], k=5, nprobe=2), 8), brute(x, q[:8], 5)) >= 0.8


def test_memory_cap_during_build_and_search(tmp_path, kernels):
    x, q = clustered(4000, dim=128, seed=2)
    cap_gb = x.nbytes / 4 / 1024**3  # a quarter of the float data
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=cap_gb)
    store.add(x)
    seen: list[int] = []
    hold = store.budget.hold

    def spy(key, nbytes, *a, **kw):
        hold(key, nbytes, *a, **kw)
        seen.append(store.budget.held_bytes)

    store.budget.hold = spy  # type: ignore[method-assign]
    store.create_index(dimension=128, partitions=30, codes="float")
    assert store.indexes()[0]["partitions"] == 30
    got = store.search(q, k=10, nprobe=30)
    assert np.array_equal(ids(got, len(q)), brute(x, q, 10))
    assert seen and max(seen) <= store.budget.cap_bytes
    assert store.budget.held_bytes == 0
    tiny = et.EmbeddingStore(tmp_path / "t", backend="numpy", max_memory_gb=2e-6)
    tiny.add(x[:200])
    with pytest.raises(MemoryLimitError):
        tiny.create_index(dimension=128, partitions=100, codes="float")
    assert tiny.indexes() == [] and tiny.version == 1


def test_bad_arguments_raise_before_anything_is_written(indexed, tmp_path):
    store, _x, q = indexed
    version = store.version
    for kwargs in ({"dimension": 64}, {"dimension": DIM, "codes": "pq"}, {"dimension": DIM, "codes": 0},
                   {"dimension": DIM, "partitions": 0}, {"dimension": DIM, "metric": "hamming"},
                   {"dimension": DIM, "sample_rows": -1}):
        with pytest.raises((InvalidArgumentError, et.errors.DimensionMismatchError)):
            store.create_index(**kwargs)
    for kwargs in ({"nprobe": 0}, {"refine": 0}, {"exact": "yes"}, {"nprobe": 3, "exact": True}):
        with pytest.raises(InvalidArgumentError):
            store.search(q, k=3, **kwargs)
    assert store.version == version
    with pytest.raises(InvalidArgumentError):
        et.EmbeddingStore(backend="numpy").create_index(dimension=DIM)
    empty = et.EmbeddingStore(tmp_path / "empty", backend="numpy")
    with pytest.raises((InvalidArgumentError, et.errors.DimensionMismatchError)):
        empty.create_index(dimension=DIM)


def test_where_filter_and_funnel_fall_back_to_exact(indexed):
    store, _x, q = indexed
    got = store.search(q, k=5, where=pl.col("row_id") < 500)
    assert (got["row_id"] < 500).all()
    assert "IVF index" not in store.explain(q, k=5, where=pl.col("row_id") < 500)
    assert store.search(q, k=5, where=pl.col("row_id") < 500, nprobe=2).equals(got)
    assert "IVF index" in store.explain(q, k=5)


def test_damaged_index_file_is_corrupt_store_error(indexed):
    store, _x, q = indexed
    entry = store.source.manifest.indexes[0]
    path = os.path.join(store.path, entry.files[-1])
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 7)
    fresh = et.EmbeddingStore(store.path, backend="numpy")
    with pytest.raises(CorruptStoreError):
        fresh.search(q, k=3)
    assert fresh.search(q, k=3, exact=True).height == 3 * len(q)


def test_thousands_of_queries_and_one(indexed, kernels):
    store, x, _ = indexed
    rng = np.random.default_rng(12)
    q = (x[rng.integers(0, len(x), 2500)] + 0.05 * rng.standard_normal((2500, DIM))).astype(np.float32)
    got = store.search(q, k=3, nprobe=40)  # every partition: the exact answer, threads and all
    assert np.array_equal(ids(got, len(q)), brute(x, q, 3))
    assert recall(ids(store.search(q, k=3, nprobe=4), len(q)), brute(x, q, 3)) >= 0.95
    assert store.search(q[7], k=3, nprobe=40)["row_id"].to_list() == brute(x, q[7:8], 3)[0].tolist()


@pytest.mark.parametrize(("codes", "metric"), [("int8", "cosine"), ("int8", "l2"), ("int8", "dot"),
                                               ("binary", "cosine"), ("binary", "dot")])
def test_quantized_codes(tmp_path, codes, metric, kernels):
    x, q = clustered(2000, seed=21)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=20, codes=codes, metric=metric)
    assert store.indexes()[0]["codes"] == codes
    # every partition and every row re-ranked: the exact answer
    got = store.search(q, k=5, nprobe=20, refine=400, metric=metric)
    assert got.equals(store.search(q, k=5, metric=metric, exact=True))
    assert np.array_equal(ids(got, len(q)), brute(x, q, 5, metric))
    found = ids(store.search(q, k=10, nprobe=4, metric=metric), len(q))
    assert recall(found, brute(x, q, 10, metric)) >= (0.9 if codes == "int8" else 0.8)
    # the delta of optimize_index is encoded with the same ranges
    extra = (x[:40] + 0.01).astype(np.float32)
    store.add(extra)
    store.optimize_index(retrain_share=0.5)
    assert store.indexes()[0]["unindexed_rows"] == 0
    hits = store.search(extra, k=1, nprobe=20, refine=2000, metric=metric)["row_id"].to_numpy()
    assert np.array_equal(hits, brute(np.concatenate([x, extra]), extra, 1, metric)[:, 0])


def test_binary_codes_refuse_l2(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(clustered(100)[0])
    with pytest.raises(InvalidArgumentError, match="l2"):
        store.create_index(dimension=DIM, codes="binary", metric="l2")


@pytest.mark.parametrize(("codes", "metric"), [("float", "cosine"), ("float", "l2"), ("int8", "dot"),
                                               ("int8", "l2"), ("binary", "cosine")])
def test_one_query_and_grouped_shortlists_agree(tmp_path, monkeypatch, codes, metric):
    """Without numba small batches are shortlisted one query at a time, big ones grouped by
    partition; with it, by the compiled scan: each gives the exact answer at full probe, nearly
    the same shortlists at a partial probe, and none returns a deleted row."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import JIT_ENV

    x, q = clustered(2500, seed=31)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x[:1500])
    store.add(x[1500:])  # two data files
    store.create_index(dimension=DIM, partitions=25, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 7 == 3)
    alive = np.arange(len(x)) % 7 != 3
    store.add(x[:30] + np.float32(0.01))  # rows outside the index, merged
    xa = np.concatenate([x, x[:30] + np.float32(0.01)])
    alive = np.r_[alive, np.ones(30, bool)]
    results = {}
    for name, share in (("one", 1e9), ("grouped", 0.0), ("compiled", None)):
        monkeypatch.setenv(JIT_ENV, "1" if share is None else "0")
        monkeypatch.setattr(probe_mod, "GROUP_MIN_SHARE", share)
        full = store.search(q, k=5, nprobe=25, refine=3000, metric=metric)
        assert np.array_equal(ids(full, len(q)), brute(xa, q, 5, metric, alive=alive)), name
        part = ids(store.search(q, k=10, nprobe=5, metric=metric), len(q))
        assert alive[part].all()
        results[name] = part
        one = store.search(q[3], k=10, nprobe=5, metric=metric)["row_id"].to_numpy()
        assert np.array_equal(one, part[3])
    assert recall(results["one"], results["grouped"]) >= 0.98
    assert recall(results["one"], results["compiled"]) >= 0.98
    assert recall(results["one"], brute(xa, q, 10, metric, alive=alive)) >= 0.8


@pytest.mark.parametrize(("codes", "metric"), [("float", "cosine"), ("float", "l2"), ("int8", "dot")])
def test_where_filter_through_the_index(tmp_path, monkeypatch, codes, metric, kernels):
    """A where= filter is applied within the probed partitions (widened by its selectivity); the
    planner searches a small selection exactly; edges: nothing, one row, everything."""
    import embtools.search.plan as plan_mod

    x, q = clustered(3000, seed=41)
    q = q[:20]
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, labels=[["a", "b", "c"][i % 3] for i in range(len(x))])
    store.create_index(dimension=DIM, partitions=30, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 11 == 0)
    extra = x[:40] + np.float32(0.02)
    store.add(extra, labels=[["a", "b"][i % 2] for i in range(40)])  # outside the index
    xa = np.concatenate([x, extra])
    labels = np.array([["a", "b", "c"][i % 3] for i in range(len(x))] + [["a", "b"][i % 2] for i in range(40)])
    alive = np.r_[np.arange(len(x)) % 11 != 0, np.ones(40, bool)]
    where = pl.col("label") != "c"
    sel = alive & (labels != "c")
    plan = store.explain(q, k=10, where=where, metric=metric, nprobe=3)
    assert "IVF index" in plan and "widened from 3" in plan
    got = ids(store.search(q, k=10, where=where, metric=metric, nprobe=3), len(q))
    assert sel[got].all()
    assert recall(got, brute(xa, q, 10, metric, alive=sel)) >= 0.9
    # the filtered index path at full probe with every row re-ranked is the exact answer
    monkeypatch.setattr(plan_mod, "exact_is_cheaper", lambda *a: False)
    full = store.search(q, k=10, where=where, metric=metric, nprobe=30, refine=3000)
    assert "IVF index" in store.explain(q, k=10, where=where, metric=metric, nprobe=30, refine=3000)
    assert full.equals(store.search(q, k=10, where=where, metric=metric, exact=True))
    one_row = pl.col("row_id") == 7
    assert ids(store.search(q, k=3, where=one_row, metric=metric, nprobe=30), len(q)).tolist() == [[7]] * len(q)
    deleted_only = pl.col("row_id") == 11
    assert store.search(q, k=3, where=deleted_only, metric=metric, nprobe=30).height == 0
    monkeypatch.undo()
    # edges: nothing, one row (exact: the planner says why), everything
    nothing = pl.col("row_id") < 0
    assert store.search(q, k=5, where=nothing, metric=metric, nprobe=3).height == 0
    assert "exact search of the selection" in store.explain(q, k=5, where=one_row, metric=metric)
    assert ids(store.search(q[:1], k=5, where=one_row, metric=metric), 1).tolist() == [[7]]
    everything = pl.col("row_id") >= 0
    assert store.search(q, k=10, where=everything, metric=metric, nprobe=3).equals(
        store.search(q, k=10, metric=metric, nprobe=3))
    assert store.search(q[4], k=10, where=where, metric=metric, nprobe=3).equals(
        store.search(q[4:5], k=10, where=where, metric=metric, nprobe=3))


@pytest.mark.parametrize(("codes", "metric"), [("float", "cosine"), ("int8", "l2"), ("binary", "dot")])
def test_compiled_scan_of_one_query_split_over_two_threads(tmp_path, monkeypatch, codes, metric):
    """A few queries with many rows to scan have their partitions dealt to two threads and the
    heaps merged: the same results as one thread, ties included, deleted rows never returned."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import JIT_ENV

    monkeypatch.setenv(JIT_ENV, "1")
    x, q = clustered(2000, seed=8)
    x[100:110] = x[90]  # exact duplicates: ties across the threads' heaps
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=20, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 9 == 4)
    queries = np.concatenate([x[90:91], q[:5]])
    got = {}
    for rows in (10**9, 0):  # one thread (float codes: one compiled call), or the scan split
        monkeypatch.setattr(probe_mod, "JIT_SPLIT_ROWS", rows)
        monkeypatch.setattr(probe_mod, "ONE_CALL_ROWS", rows)
        got[rows] = [store.search(v, k=15, nprobe=7, metric=metric) for v in queries]
        got[rows].append(store.search(queries, k=15, nprobe=7, metric=metric))
    for one, two in zip(got[10**9], got[0], strict=True):
        assert one.equals(two)
        assert (one["row_id"] % 9 != 4).all()
    exact = store.search(queries, k=15, nprobe=20, refine=2000, metric=metric)
    monkeypatch.setattr(probe_mod, "JIT_SPLIT_ROWS", 0)
    assert exact.equals(store.search(queries, k=15, metric=metric, exact=True))


def test_codes_file_of_the_wrong_width_is_corrupt_store_error(tmp_path):
    """A codes file that is valid Parquet but holds codes of another width than the index's
    (the compiled scans read that many bytes a row) is refused before any scan."""
    from dataclasses import replace

    from embtools.index.files import write_codes
    from embtools.index.probe import IvfIndex

    x, _ = clustered(300, seed=2)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=4, codes="binary")
    src = store.source
    entry = src.manifest.indexes[0]
    wide = np.zeros((300, DIM // 8 + 1), np.uint8)  # one byte a row too many
    rel, size = write_codes(src.root, entry.name, np.arange(300), np.zeros(300, np.int32), wide)
    bad = replace(entry, files=[entry.files[0], rel], file_bytes=[entry.file_bytes[0], size])
    with pytest.raises(CorruptStoreError, match="codes of shape"):
        IvfIndex(src, bad, store.budget, np.arange(300, dtype=np.int64))


@pytest.mark.parametrize(("codes", "metric"), [("float", "cosine"), ("float", "l2"), ("int8", "dot"),
                                               ("binary", "cosine")])
def test_scans_skip_codes_files_without_the_probed_partitions(tmp_path, monkeypatch, codes, metric):
    """An index of many codes files (runs of partitions): the compiled scan reads only the files
    holding the probed partitions, and gives the frames of a scan of every file; at full probe
    the exact answer."""
    import embtools.index.build as build_mod
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import JIT_ENV

    monkeypatch.setenv(JIT_ENV, "1")
    monkeypatch.setattr(build_mod, "CODES_FILE_BYTES", 2048)
    x, q = clustered(2000, seed=5)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=30, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 11 == 2)
    alive = np.arange(len(x)) % 11 != 2
    scanned: list[int] = []
    real_scan = probe_mod.IvfIndex._scan

    def counting(self, jit, weights, c0, parts, *rest):
        scanned.append(int(self._part_files[parts[parts >= 0]].any(axis=0).sum()))
        assert len(self.files) > 2
        return real_scan(self, jit, weights, c0, parts, *rest)

    monkeypatch.setattr(probe_mod.IvfIndex, "_scan", counting)
    # float codes too through _scan (the data-file re-rank), not the compiled calls of ivf_few_jit
    monkeypatch.setattr(probe_mod.IvfIndex, "searches_whole", lambda self, dim, m: False)
    queries = [q[i] for i in range(6)] + [q]
    skip = [store.search(v, k=10, nprobe=3, metric=metric) for v in queries]
    assert scanned and min(scanned) < len(store.find_index(DIM, metric).files)
    real_init = probe_mod.IvfIndex.__init__

    def every_file(self, *a, **kw):
        real_init(self, *a, **kw)
        self._part_files[:] = True  # the reference: every codes file scanned
        opened.append(self)

    opened: list = []
    monkeypatch.setattr(probe_mod.IvfIndex, "__init__", every_file)
    store2 = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for one, ref in zip(skip, [store2.search(v, k=10, nprobe=3, metric=metric) for v in queries], strict=True):
        assert one.equals(ref)
    assert opened
    full = store.search(q, k=5, nprobe=30, refine=2000, metric=metric)
    assert np.array_equal(ids(full, len(q)), brute(x, q, 5, metric, alive=alive))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_screened_centroids_pick_the_float32_nearest(tmp_path, monkeypatch, metric):
    """A few queries of an index of many partitions pick their partitions from uint8 codes of
    the centroids, then exactly within a certified margin: the same partitions, in the same
    order, as scoring every centroid in float32, for near ties and exact duplicates too, and
    the same search results."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import JIT_ENV, jit_kernels

    monkeypatch.setenv(JIT_ENV, "1")
    jit = jit_kernels("ivf_jit")
    x, q = clustered(3000, seed=5)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=300, codes="float", metric=metric)
    probe = store.find_index(DIM, metric)
    assert probe._screens(4) and not probe._screens(10) and not probe._screens(300)
    rng = np.random.default_rng(6)
    original = probe.centroids
    c = probe.centroids.copy()
    c[10:20] = c[5]  # exact duplicates: ties go to the lower partition
    c[30:40] = c[25] + np.float32(1e-6) * rng.standard_normal((10, DIM)).astype(np.float32)  # near ties
    queries = np.concatenate([q, c[[5, 25]], 3 * q[:4]]).astype(np.float32)  # dot: unnormalised too
    for cents in (probe.centroids, c):
        probe.centroids, probe._coarse, probe._packed = cents, None, None
        prepared = probe._queries(queries, DIM)
        full = np.empty((len(prepared), probe.partitions), np.float32)
        jit.centroid_scores(prepared, cents, full)
        for nprobe in (1, 2, 7, 40):
            want = jit.top_columns(full, nprobe)
            for v, row in zip(prepared, want, strict=True):
                assert np.array_equal(probe._screened(jit, v, nprobe), row), nprobe
            # a batch's sums computed together (chunks of 64 queries, tiles of 8): the same rows
            assert np.array_equal(probe._screened_batch(jit, prepared, nprobe), want), nprobe
            assert np.array_equal(probe._screened_batch(jit, prepared[:1], nprobe), want[:1]), nprobe
    probe.centroids, probe._coarse, probe._packed = original, None, None
    screened = [store.search(v, k=10, nprobe=4, metric=metric) for v in q[:8]]
    batch = store.search(q, k=10, nprobe=4, metric=metric)
    monkeypatch.setattr(jit, "FAST_BATCH_SCREEN", True)  # the batch screen on hosts without VNNI too
    assert store.search(q, k=10, nprobe=4, metric=metric).equals(batch)
    monkeypatch.setattr(probe_mod, "SCREEN_CENTROIDS", 10**9)
    for v, got in zip(q[:8], screened, strict=True):
        assert got.equals(store.search(v, k=10, nprobe=4, metric=metric))
    assert store.search(q, k=10, nprobe=4, metric=metric).equals(batch)  # every centroid in float32


def test_certified_cut_of_float_shortlists_keeps_the_exact_top_k(tmp_path, monkeypatch):
    """Unit float codes of the full vectors (cosine) re-rank only the shortlisted rows whose codes'
    score is within twice the codes' error of the k-th: the same results as re-ranking the whole
    shortlist, with exact duplicates and rows an ulp apart, one query and many, and the exact
    search's at full probe."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import JIT_ENV

    monkeypatch.setenv(JIT_ENV, "1")
    x, q = clustered(2000, seed=12)
    x[200:230] = x[199]  # exact duplicates: float32 ties
    x[230:260] = x[199] * np.float32(1 + 2**-22)  # the same direction, another length
    x[260:290] = x[199] + np.float32(1e-6) * np.sign(x[199])  # near ties in float32
    queries = np.concatenate([x[199:200], q[:20]])
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=20, codes="float")
    widths = []
    cut = probe_mod.IvfIndex._certified

    def spy(self, jit, hs, hi, kk):
        out = cut(self, jit, hs, hi, kk)
        widths.append(out.shape[1])
        return out

    def searches() -> list[pl.DataFrame]:
        return [store.search(queries, k=10, nprobe=3), *(store.search(v, k=10, nprobe=3) for v in queries)]

    fused = searches()  # single queries cut inside search_few
    monkeypatch.setattr(probe_mod, "ONE_CALL_ROWS", 0)
    split = searches()  # the scan split over two threads, cut inside finish_few
    monkeypatch.setattr(probe_mod.IvfIndex, "_certified", spy)
    monkeypatch.setattr(probe_mod.IvfIndex, "searches_whole", lambda self, dim, m: False)  # through _certified
    got = searches()
    assert widths[1] == 18 and min(widths) == 10 and max(widths) <= 18  # the ties keep all 18
    full = store.search(queries, k=10, nprobe=20, refine=100)
    monkeypatch.setattr(probe_mod.IvfIndex, "_cut_error", lambda self: 0.0)  # no cut anywhere
    want = searches()
    monkeypatch.undo()
    monkeypatch.setenv(JIT_ENV, "1")
    monkeypatch.setattr(probe_mod.IvfIndex, "_cut_error", lambda self: 0.0)
    uncut = searches()
    for a, b, c, d, e in zip(got, want, fused, uncut, split, strict=True):
        assert a.equals(b) and c.equals(b) and d.equals(b) and e.equals(b)
    assert full.equals(store.search(queries, k=10, exact=True))


def test_compute_similarity_goes_through_the_index(indexed):
    """The seed's array form takes nprobe, refine and exact like search: the same rows and scores
    as the search frame at the same probes, exact at full probe and with exact=True."""
    store, x, q = indexed
    for nprobe in (1, 6, 40):
        frame = store.search(q, k=7, nprobe=nprobe)
        sims, idx = store.compute_similarity(q, DIM, top_k=7, nprobe=nprobe)
        assert np.array_equal(idx, ids(frame, len(q)))  # positions are row ids here: no deletes
        np.testing.assert_array_equal(sims, frame["score"].to_numpy().reshape(len(q), -1))
    assert np.array_equal(store.compute_similarity(q, DIM, top_k=7, nprobe=40)[1], brute(x, q, 7))
    assert np.array_equal(store.compute_similarity(q, DIM, top_k=7, exact=True)[1], brute(x, q, 7))
    few = store.compute_similarity(q, DIM, top_k=7, nprobe=1)[1]
    assert recall(few, brute(x, q, 7)) < 1.0  # one probe misses rows: the index served it
    one_s, one_i = store.compute_similarity(q[3], DIM, top_k=4, nprobe=6)
    one = store.search(q[3], k=4, nprobe=6)
    assert one_i.shape == (4,) and one_i.tolist() == one["row_id"].to_list()
    np.testing.assert_array_equal(one_s, one["score"].to_numpy())
    with pytest.raises(InvalidArgumentError, match="top_k=None"):
        store.compute_similarity(q, DIM, nprobe=3)
    with pytest.raises(InvalidArgumentError, match="exact=True"):
        store.compute_similarity(q, DIM, top_k=3, nprobe=3, exact=True)


def _gathered_frames_equal(monkeypatch, store, cases: list[dict], got: list[pl.DataFrame], **kw) -> int:
    """Search each case again with the shortlists re-ranked from rows gathered from the data files
    (the compiled whole searches switched off): every frame equals ``got``'s; returns how many
    re-ranks gathered rows (the index's compiled calls are switched back on after)."""
    import embtools.index.probe as probe_mod
    import embtools.search.ivf as ivf_mod

    gathered = []
    with monkeypatch.context() as m:
        m.setattr(probe_mod.IvfIndex, "searches_whole", lambda self, dim, metric: False)
        real_ragged = ivf_mod._rerank_ragged
        m.setattr(ivf_mod, "_rerank_ragged", lambda *a: gathered.append(1) or real_ragged(*a))
        for c, frame in zip(cases, got, strict=True):
            c = dict(c)
            assert frame.equals(store.search(c.pop("queries"), **kw, **c)), c
    return len(gathered)


def _store_with_history(path, x: np.ndarray, codes: str, metric: str):
    """A store of ``x`` (2,000 rows) indexed (20 partitions, ``codes``, ``metric``) with a history:
    rows deleted since the build (``row_id % 11 == 4``, below 1,700), a delta codes file (rows
    1,700-1,899) and rows outside the index (1,900 on)."""
    store = et.EmbeddingStore(path, backend="numpy")
    store.add(x[:1200])
    store.add(x[1200:1700])
    store.create_index(dimension=DIM, partitions=20, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 11 == 4)
    store.add(x[1700:1900])
    store.optimize_index(retrain_share=0.9)  # a delta codes file
    store.add(x[1900:])  # rows outside the index
    return store


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_rerank_from_the_codes_equals_the_data_files_rerank(tmp_path, monkeypatch, metric):
    """Float codes of the search dimension are the rows as stored: a shortlist is re-ranked from
    them (nothing read from the data files) to the same frame, bit for bit, as the re-rank of the
    gathered rows: duplicate rows (ties by position), rows of very different norms, deleted rows,
    a delta codes file, rows outside the index, a filter, one query and a batch, k past the rows."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import jit_kernels

    x, q = clustered(2000, seed=51)
    x[::5] *= np.float32(40.0)  # norms from ~1 to ~40: cosine codes are not unit rows
    x[100:110] = x[90]  # exact duplicates
    q = np.concatenate([q, x[90:91]])
    store = _store_with_history(tmp_path / "s", x, "float", metric)
    assert store.indexes()[0]["partitions"] == 20 and len(store.source.manifest.indexes[0].files) >= 3
    if metric == "cosine":  # the stored norms are the re-rank's own bits
        from embtools.index.files import CodesFile
        from embtools.kernels.jit import jit_kernels

        entry = store.source.manifest.indexes[0]
        for rel, size in zip(entry.files[1:], entry.file_bytes[1:], strict=True):
            f = CodesFile(os.path.join(store.path, rel), size, partitions=20)
            assert np.array_equal(np.where(f.norms == 0, 1, f.norms), jit_kernels("rerank_jit").row_norms(f.codes))
            f.close()
    fused = []
    real = probe_mod.IvfIndex.top_whole
    monkeypatch.setattr(probe_mod.IvfIndex, "top_whole", lambda self, *a: fused.append(1) or real(self, *a))
    few = jit_kernels("ivf_few_jit")
    calls = []
    real_few = few.search_with
    monkeypatch.setattr(few, "search_with", lambda *a: calls.append(1) or real_few(*a))
    cases = [dict(queries=q, k=10, nprobe=4), dict(queries=q, k=10, nprobe=20, refine=50),
             dict(queries=q[-1], k=12, nprobe=3), dict(queries=q[:3], k=3000, nprobe=20),
             dict(queries=q, k=7, nprobe=3, where=pl.col("row_id") % 5 != 0),
             # one compiled call (search_with): one query, a few, a filter, k beyond two partitions
             dict(queries=q[0], k=10, nprobe=2), dict(queries=q[:2], k=5, nprobe=2),
             dict(queries=q[1], k=7, nprobe=3, where=pl.col("row_id") % 5 != 0),
             dict(queries=q[2], k=300, nprobe=2)]
    got = [store.search(c.pop("queries"), metric=metric, **c) for c in [dict(c) for c in cases]]
    assert len(fused) == len(cases) and len(calls) >= 5
    monkeypatch.setattr(probe_mod, "ONE_CALL_ROWS", 0)  # a few queries' scan split over two threads
    store.__dict__.pop("_lanes", None)  # the loops' kept calls were bound to the single call
    one_call = len(calls)
    for c, frame in zip(cases, got, strict=True):
        c = dict(c)
        assert frame.equals(store.search(c.pop("queries"), metric=metric, **c)), c
    assert len(calls) == one_call and len(fused) == 2 * len(cases)
    monkeypatch.undo()
    assert _gathered_frames_equal(monkeypatch, store, cases, got, metric=metric) == len(cases)
    assert len(fused) == 2 * len(cases)
    exact = store.search(q, k=10, metric=metric, exact=True)
    assert store.search(q, k=10, nprobe=20, refine=200, metric=metric).equals(exact)


def test_an_index_of_unit_codes_is_still_searched_and_extended(tmp_path, monkeypatch):
    """Cosine indexes built before the codes were the rows hold unit rows (and no norms): they
    re-rank from the data files, their deltas stay unit rows, and full probes are exact."""
    import embtools.index.build as build_mod
    import embtools.index.probe as probe_mod

    x, q = clustered(1500, seed=53)
    x[::4] *= np.float32(9.0)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x[:1200])
    monkeypatch.setattr(build_mod, "raw_codes", lambda codes, code_dim, dimension: False)
    store.create_index(dimension=DIM, partitions=15, codes="float")
    monkeypatch.undo()
    store.add(x[1200:])
    store.optimize_index()
    opened = []
    real = probe_mod.IvfIndex.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        opened.append(self)

    monkeypatch.setattr(probe_mod.IvfIndex, "__init__", spy)
    full = store.search(q, k=10, nprobe=15, refine=1500)
    index = opened[-1]
    assert not index.raw and len(index.files) >= 2 and all(v is None for v in index._inv)
    for f in index.files:  # unit rows
        assert np.allclose(np.linalg.norm(f.codes, axis=1), 1, atol=1e-5)
    assert full.equals(store.search(q, k=10, exact=True))
    assert recall(ids(store.search(q, k=10, nprobe=5), len(q)), brute(x, q, 10)) >= 0.9


def test_codes_file_with_bad_norms_is_corrupt_store_error(tmp_path):
    from embtools.index.files import CodesFile, write_codes

    os.makedirs(tmp_path / "_index" / "i")
    codes = np.ones((3, 4), np.float32)
    for bad in ([2.0, np.nan, 2.0], [2.0, np.inf, 2.0], [2.0, -1.0, 2.0]):
        rel, size = write_codes(str(tmp_path), "i", np.arange(3), np.zeros(3, np.int32), codes,
                                norms=np.array(bad))
        with pytest.raises(CorruptStoreError, match="norm"):
            CodesFile(os.path.join(tmp_path, rel), size, partitions=1)
    rel, size = write_codes(str(tmp_path), "i", np.arange(3), np.zeros(3, np.int32), codes,
                            norms=np.full(3, 2.0))
    f = CodesFile(os.path.join(tmp_path, rel), size, partitions=1)
    assert f.norms.tolist() == [2.0] * 3 and f.codes.shape == (3, 4)
    f.close()


@pytest.mark.parametrize(("metric", "stored"), [("cosine", DIM), ("dot", DIM), ("l2", DIM), ("cosine", 48)])
def test_int8_codes_searched_whole_equal_the_gathered_rerank(tmp_path, monkeypatch, metric, stored):
    """int8 codes of the search dimension, without a memory cap, are searched in compiled calls
    that re-rank the shortlist from the mapped data files (a prefix of longer stored rows where
    the index is of a Matryoshka dimension): the same frames, bit for bit, as the shortlist
    re-ranked from gathered rows, for one query, a few and a batch, with deleted rows, a delta
    codes file, rows outside the index, a filter and k past the probed rows; under a cap the
    gathered re-rank serves."""
    import embtools.index.probe as probe_mod
    from embtools.kernels.jit import jit_kernels

    rng = np.random.default_rng(61)
    x, q = clustered(2000, dim=stored, seed=61)
    x[::7] *= np.float32(25.0)  # rows of very different norms
    x[100:110] = x[90]  # exact duplicates: ties by position
    q = np.concatenate([q, x[90:91], rng.standard_normal((1, stored)).astype(np.float32)])
    store = _store_with_history(tmp_path / "s", x, "int8", metric)
    probe = store.find_index(DIM, metric)
    assert probe.kind == "int8" and len(probe.files) >= 2 and len(probe.uncovered) == 100
    assert probe.searches_whole(DIM, metric)
    fused = []
    few = jit_kernels("ivf_few_jit")
    real_few = few.search_with
    monkeypatch.setattr(few, "search_with", lambda *a: fused.append(1) or real_few(*a))
    qd = q[:, :DIM]
    cases = [dict(queries=qd, k=10, nprobe=4), dict(queries=qd[-1], k=12, nprobe=3),
             dict(queries=qd[-2], k=10, nprobe=2), dict(queries=qd[:3], k=5, nprobe=2),
             dict(queries=qd[1], k=7, nprobe=3, where=pl.col("row_id") % 5 != 0),
             dict(queries=qd, k=7, nprobe=3, where=pl.col("row_id") % 5 != 0),
             dict(queries=qd[2], k=300, nprobe=2), dict(queries=qd[:4], k=3000, nprobe=20)]
    got = [store.search(c.pop("queries"), metric=metric, dimension=DIM, **c) for c in [dict(c) for c in cases]]
    assert len(fused) >= 5
    arrays = store.compute_similarity(qd[0], DIM, 10, nprobe=3) if metric == "cosine" else None
    monkeypatch.undo()
    assert _gathered_frames_equal(monkeypatch, store, cases, got, metric=metric, dimension=DIM) == len(cases)
    if arrays is not None:  # the seed's array form too
        with monkeypatch.context() as m:
            m.setattr(probe_mod.IvfIndex, "searches_whole", lambda self, dim, metric: False)
            ref = store.compute_similarity(qd[0], DIM, 10, nprobe=3)
        assert np.array_equal(arrays[0], ref[0]) and np.array_equal(arrays[1], ref[1])
    alive = (np.arange(len(x)) % 11 != 4) | (np.arange(len(x)) >= 1700)
    full = store.search(qd, k=5, nprobe=20, refine=2000, metric=metric, dimension=DIM)
    assert np.array_equal(ids(full, len(qd)), brute(x[:, :DIM], qd, 5, metric, alive=alive))
    capped = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=0.05)
    assert not capped.find_index(DIM, metric).searches_whole(DIM, metric)
    for c, frame in zip(cases[:4], got[:4], strict=True):
        c = dict(c)
        assert frame.equals(capped.search(c.pop("queries"), metric=metric, dimension=DIM, **c)), c


def test_int8_search_of_a_damaged_data_file_is_corrupt_store_error(tmp_path):
    """The single compiled call re-ranks from views of the mapped data files: a flipped value in
    one of them is CorruptStoreError (its CRC checked before the first view is kept), never a
    wrong score; the other search forms say the same."""
    from embtools.storage.footer import parse_footer

    x, q = clustered(1500, seed=67)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=12, codes="int8")
    path = os.path.join(store.path, store.source.manifest.files[0].path)
    with open(path, "rb") as fh:
        footer = parse_footer(fh.read())
    chunk = next(c for c in footer.row_groups[0][1] if c.name == f"emb_{DIM}")
    with open(path, "r+b") as fh:
        fh.seek(chunk.start + chunk.length - 4 * 9 - 2)  # a byte of a row's values
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))
    again = et.EmbeddingStore(tmp_path / "s", backend="numpy")  # raises at every call, not only the first
    for call in (lambda s: s.search(q[0], k=5, nprobe=3), lambda s: s.search(q, k=5, nprobe=3),
                 lambda s: s.compute_similarity(q[1], DIM, 5, nprobe=3)):
        for store in (et.EmbeddingStore(tmp_path / "s", backend="numpy"), again):
            with pytest.raises(CorruptStoreError):
                call(store)
