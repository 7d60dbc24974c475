"""The lane of query loops (embtools.search.lane): one indexed query planned once per version
gives the full path's results bit for bit, checks every query, holds its workspace under the cap,
steps aside when it cannot take a query, and follows new versions."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

import embtools as et
import embtools.search.api as api_mod
from embtools.errors import DimensionMismatchError, InvalidArgumentError, InvalidEmbeddingsError
from tests.test_index import DIM, brute, clustered

pytestmark = pytest.mark.usefixtures("compiled")


@pytest.fixture
def compiled(monkeypatch):
    """The lane serves indexes the compiled kernels search whole (float codes, int8 codes uncapped)."""
    from embtools.kernels.jit import JIT_ENV, jit_kernels

    monkeypatch.setenv(JIT_ENV, "1")
    assert jit_kernels("ivf_few_jit") is not None


def _store(tmp_path, metric: str = "cosine", n: int = 3000, max_memory_gb=None, codes: str = "float"):
    x, q = clustered(n, seed=3)
    x[50:55] = x[40]  # exact duplicates: ties
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=max_memory_gb)
    store.add(x, text_ids=[f"t{i}" for i in range(n)])
    store.create_index(dimension=DIM, partitions=24, codes=codes, metric=metric)
    store.delete(where=pl.col("row_id") % 11 == 3)
    return store, x, np.concatenate([x[40:41], q[:20]])


def _lanes(store) -> dict:
    """The lanes kept on ``store`` (for any version: stale ones must be gone)."""
    lanes = store.__dict__.get("_lanes")
    return {} if lanes is None else lanes[1]


def _outcome(fn):
    """``fn()``'s frame, or the type of the error it raised."""
    try:
        return fn()
    except Exception as exc:  # compared with the other path's outcome
        return type(exc)


def _without_lane(monkeypatch, fn):
    """``fn()`` on the full path only (no lane is opened or used)."""
    with monkeypatch.context() as m:
        m.setattr(api_mod, "cached_lane", lambda store, key: None)
        m.setattr(api_mod, "open_lane", lambda req, ctx, plan=None: None)
        return fn()


@pytest.mark.parametrize(("metric", "codes"), [("cosine", "float"), ("dot", "float"), ("l2", "float"),
                                              ("cosine", "int8"), ("l2", "int8")])
def test_a_loop_of_single_queries_equals_the_full_path(tmp_path, monkeypatch, metric, codes):
    store, x, queries = _store(tmp_path, metric, codes=codes)
    before = queries.copy()
    loop = [store.search(v, k=12, nprobe=5, metric=metric) for v in queries]
    assert len(_lanes(store)) == 1  # the first call planned, the others took its lane
    full = _without_lane(monkeypatch, lambda: [store.search(v, k=12, nprobe=5, metric=metric)
                                               for v in queries])
    for a, b in zip(loop, full, strict=True):
        assert a.equals(b)
    assert np.array_equal(queries, before)  # the queries are read, never normalised in place
    alive = (np.arange(len(x)) % 11) != 3
    exact = brute(x, queries, 12, metric, alive)
    found = np.stack([f["row_id"].to_numpy() for f in loop])
    assert np.mean([len(set(a) & set(b)) / 12 for a, b in zip(found, exact, strict=True)]) > 0.9
    assert (found % 11 != 3).all()  # deleted rows never come back
    # every partition probed and enough refinement: the exact search's rows and scores
    wide = [store.search(v, k=12, nprobe=24, refine=300, metric=metric) for v in queries[:5]]
    for v, f in zip(queries[:5], wide, strict=True):
        assert f.equals(store.search(v, k=12, metric=metric, exact=True))


@pytest.mark.parametrize("codes", ["float", "int8"])
def test_the_lanes_bound_call_widens_through_the_full_search(tmp_path, monkeypatch, codes):
    """k past what one probed partition holds (3,000 rows in 24 partitions, k = 200, nprobe 1):
    the bound compiled call cannot answer some queries, which then take the widening search, and
    a loop gives the full path's frames, with k rows each."""
    store, _, queries = _store(tmp_path, codes=codes)
    loop = [store.search(v, k=200, nprobe=1) for v in queries]
    (lane,) = _lanes(store).values()
    assert lane.call is not None
    answered = [lane.call(v[None].astype(np.float32)) is not None for v in queries]
    assert not all(answered)  # some queries' partition holds fewer than 200 live rows
    full = _without_lane(monkeypatch, lambda: [store.search(v, k=200, nprobe=1) for v in queries])
    for a, b in zip(loop, full, strict=True):
        assert a.equals(b) and a.height == 200


def test_compute_similarity_loop_equals_the_full_path(tmp_path, monkeypatch):
    store, _, queries = _store(tmp_path)
    loop = [store.compute_similarity(v, DIM, 7, nprobe=4) for v in queries]
    assert len(_lanes(store)) == 1
    full = _without_lane(monkeypatch, lambda: [store.compute_similarity(v, DIM, 7, nprobe=4) for v in queries])
    for (s1, i1), (s2, i2) in zip(loop, full, strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
        assert s1.shape == (7,) and i1.dtype == np.int64
    # a 2-D query of one row takes the same lane: one row of results
    s, i = store.compute_similarity(queries[3:4], DIM, 7, nprobe=4)
    assert np.array_equal(i, loop[3][1][None]) and np.array_equal(s, loop[3][0][None])
    # a float64 query is searched as its float32 rounding (the planned call's dtype)
    s64, i64 = store.compute_similarity(queries[3].astype(np.float64), DIM, 7, nprobe=4)
    assert np.array_equal(i64, loop[3][1]) and np.array_equal(s64, loop[3][0])


def test_the_lane_plans_nothing(tmp_path, monkeypatch):
    store, _, queries = _store(tmp_path)
    store.search(queries[0], k=5, nprobe=3)

    def no_plan(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(api_mod, "plan_search", no_plan)
    for v in queries[1:]:
        assert store.search(v, k=5, nprobe=3).height == 5
    with pytest.raises(AssertionError, match="planned again"):  # other arguments: another plan
        store.search(queries[1], k=6, nprobe=3)


def test_every_query_is_checked_on_the_lane(tmp_path):
    store, _, queries = _store(tmp_path)
    store.search(queries[0], k=5, nprobe=3)
    store.compute_similarity(queries[0], DIM, 5, nprobe=3)
    bad = queries[1].copy()
    bad[3] = np.nan
    with pytest.raises(InvalidEmbeddingsError):
        store.search(bad, k=5, nprobe=3)
    with pytest.raises(InvalidEmbeddingsError):
        store.compute_similarity(bad, DIM, 5, nprobe=3)
    with pytest.raises(InvalidEmbeddingsError):
        store.search(queries[1].astype(str), k=5, nprobe=3)
    with pytest.raises(DimensionMismatchError):
        store.compute_similarity(queries[1][:10], DIM, 5, nprobe=3)
    # arguments equal as dict keys but not as arguments: the full path rejects them
    with pytest.raises(InvalidArgumentError):
        store.search(queries[1], k=5.0, nprobe=3)
    with pytest.raises(InvalidArgumentError):
        store.search(queries[1], k=5, nprobe=3.0)
    with pytest.raises(InvalidArgumentError):
        store.search(queries[1], k=5, nprobe=[3])  # unhashable: no lane key, the full path's error
    with pytest.raises(InvalidArgumentError):
        store.search(queries[1], k=5, nprobe=3, exact=True)
    assert store.search(queries[1], k=5, nprobe=3).height == 5


def test_the_lane_follows_new_versions(tmp_path, monkeypatch):
    store, x, queries = _store(tmp_path)
    store.search(queries[0], k=5, nprobe=3)
    assert _lanes(store)
    indexed = store.version
    new = np.random.default_rng(9).standard_normal((3, DIM)).astype(np.float32) * 5
    store.add(new)  # rows outside the index: searched exactly and merged, on the full path
    top = store.search(new[1], k=5, nprobe=3)
    assert top["row_id"][0] == len(x) + 1
    assert not _lanes(store)  # no lane serves a version with rows outside the index
    store.delete(where=pl.col("row_id") == len(x) + 1)
    assert (store.search(new[1], k=5, nprobe=3)["row_id"] != len(x) + 1).all()
    old = et.EmbeddingStore(tmp_path / "s", version=indexed, backend="numpy")  # a snapshot: its lane
    loop = [old.search(v, k=5, nprobe=3) for v in [new[1], *queries[:3]]]
    assert _lanes(old) and (loop[0]["row_id"] < len(x)).all()
    full = _without_lane(monkeypatch, lambda: [old.search(v, k=5, nprobe=3) for v in [new[1], *queries[:3]]])
    assert all(a.equals(b) for a, b in zip(loop, full, strict=True))


def test_the_lane_holds_its_workspace_and_steps_aside_under_the_cap(tmp_path, monkeypatch):
    store, _, queries = _store(tmp_path, max_memory_gb=0.05)
    first = store.search(queries[0], k=5, nprobe=3)
    ((key, lane),) = _lanes(store).items()
    seen = []
    assert lane.call is not None  # the compiled call, its arguments bound

    def spy(q):
        seen.append(store.budget.held_bytes)
        return lane.call(q)

    _lanes(store)[key] = dataclasses.replace(lane, call=spy)
    assert store.search(queries[0], k=5, nprobe=3).equals(first)
    assert seen == [lane.need] and store.budget.held_bytes == 0
    # the cap now leaves less than the lane's workspace: the full path decides (exact search)
    room = store.budget.available_bytes
    store.budget.hold("test/other", room - lane.need // 2)
    try:
        squeezed = _outcome(lambda: store.search(queries[0], k=5, nprobe=3))
        assert len(seen) == 1  # the lane stepped aside
        reference = _without_lane(monkeypatch, lambda: _outcome(
            lambda: store.search(queries[0], k=5, nprobe=3)))
        assert squeezed is reference if isinstance(reference, type) else squeezed.equals(reference)
    finally:
        store.budget.free("test/other")


def test_the_lane_steps_aside_when_the_kernels_are_switched_off(tmp_path, monkeypatch):
    from embtools.kernels.jit import JIT_ENV

    store, _, queries = _store(tmp_path)
    compiled = [store.search(v, k=8, nprobe=4) for v in queries[:4]]
    assert _lanes(store)
    monkeypatch.setenv(JIT_ENV, "0")  # the NumPy kernels: the full path, the same rows
    for v, f in zip(queries[:4], compiled, strict=True):
        assert store.search(v, k=8, nprobe=4)["row_id"].to_list() == f["row_id"].to_list()
