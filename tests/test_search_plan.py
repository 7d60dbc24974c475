"""The search planner (embtools.search.plan): every search that can stream under the memory cap
does, with the float64 brute force's answer; below the smallest plan, MemoryLimitError names the
smallest cap, and that cap works.

The cap sweep walks caps from the smallest feasible plan upward (doubling), for 1 / 64 / 200 /
2,000 queries, every metric, the NumPy and torch backends, with and without ``where``, the screen
allowed and forbidden: every cap gets a plan whose buffers fit it, and searches run (at the smallest
cap for one query, at the first cap where a run is quick, where the screen is sized down, and
without a cap) give the brute force's rows.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.errors import MemoryLimitError
from embtools.memory import GB, MemoryBudget
from embtools.search import similarity_join
from embtools.search.plan import plan_search, run_search
from embtools.search.request import SearchContext, SearchRequest
from tests.helpers import brute_force, make_store, planted_corpus

N, D, K = 4500, 16, 10
QUERY_COUNTS = (1, 64, 200, 2000)
#: a run is quick enough for the sweep when it takes at most this many batches in all
QUICK_BATCHES = 64
_CAP = re.compile(r"smallest cap that works is max_memory_gb=([0-9.]+) \(")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(7)
    x = planted_corpus(rng, N, D)
    x *= np.exp(rng.uniform(-1, 1, size=(N, 1))).astype(np.float32)  # varied norms (dot, l2)
    path = tmp_path_factory.mktemp("plan") / "s"
    make_store(path, x, metadata={"group": np.arange(N) % 3})
    queries = x[rng.choice(N, max(QUERY_COUNTS), replace=False)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32)
    return str(path), x, queries


def _smallest_cap(req: SearchRequest, source, backend) -> float:
    """The smallest cap, as the error at a cap far too small names it."""
    with pytest.raises(MemoryLimitError) as info:
        plan_search(req, SearchContext(source, backend, MemoryBudget(1e-9)))
    match = _CAP.search(str(info.value))
    assert match, str(info.value)
    return float(match.group(1))


_REFERENCE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _check(scores, found, x, q, metric, positions):
    """The float64 brute force's top-K (ties by lower position), vectorised: the same score at
    every rank (so the same rows, up to scores within ``tol``), distinct rows of the selection,
    exactly tied scores in position order."""
    key = (len(q), metric, None if positions is None else len(positions), float(q[0, 0]))
    if key not in _REFERENCE:
        s64 = brute_force(x, q, metric, positions)
        order = np.argsort(np.where(np.isnan(s64), np.inf, s64 if metric == "l2" else -s64),
                           axis=1, kind="stable")[:, :K]
        _REFERENCE[key] = (s64, order)
    s64, order = _REFERENCE[key]
    tol = 1e-4 * max(1.0, float(np.nanmax(np.abs(s64))))
    rows = np.arange(len(q))[:, None]
    assert found.shape == order.shape
    got, want = s64[rows, found], s64[rows, order]
    assert not np.isnan(got).any(), "a row outside the selection"
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    np.testing.assert_allclose(scores, got, rtol=0, atol=tol)
    assert (np.diff(np.sort(found, axis=1), axis=1) > 0).all(), "a row twice"
    tied = np.diff(got, axis=1) == 0
    assert (np.diff(found, axis=1)[tied] > 0).all(), "exact ties not in position order"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_cap_sweep_equals_brute_force(corpus, backend, metric):
    path, x, queries = corpus
    store = et.EmbeddingStore(path, backend=backend)
    where_positions = np.flatnonzero(np.arange(N) % 3 != 0)
    for nq in QUERY_COUNTS:
        q = queries[:nq]
        for where in (None, pl.col("group") != 0):
            positions = None if where is None else where_positions
            for mode in ("auto", "off"):
                if mode == "off" and (metric == "l2" or nq < 64):
                    continue  # the screen is never a choice: the same plans as "auto"
                req = SearchRequest.build(store.source, q, K, metric=metric, where=where,
                                          screen=mode)
                _sweep(store, req, x, positions)
    # the public entry point, with every option, at a cap of a few batches
    kw = dict(metric=metric, where=pl.col("group") != 0, screen="off")
    low = _smallest_cap(SearchRequest.build(store.source, queries[:64], K, **kw), store.source,
                        store.backend)
    capped = et.EmbeddingStore(path, backend=backend, max_memory_gb=low * 64)
    frame = capped.search(queries[:64], K, **kw)
    scores = frame["score"].to_numpy().reshape(64, K)
    _check(scores, frame["row_id"].to_numpy().reshape(64, K), x, queries[:64], metric,
           where_positions)


def _sweep(store, req, x, positions):
    source, backend = store.source, store.backend
    low = _smallest_cap(req, source, backend)
    # just below the smallest plan: refused, naming that same cap
    below = MemoryBudget((int(low * GB) - 3) / GB)
    with pytest.raises(MemoryLimitError, match=re.escape(f"max_memory_gb={low:.9f}")):
        plan_search(req, SearchContext(source, backend, below))
    cap, ran_quick, ran_sized, paths = low, False, False, set()
    while True:
        ctx = SearchContext(source, backend, MemoryBudget(cap))
        plan = plan_search(req, ctx)  # no MemoryLimitError above the smallest plan
        avail = ctx.budget.available_bytes
        for sizes in (plan.stream, plan.screen, plan.rerank):
            assert sizes is None or avail is None or sizes.nbytes <= avail, (cap, plan)
        paths.add(plan.path)
        rows = (plan.screen or plan.stream).rows
        batches = plan.passes * -(-req.n_sel // rows)
        sized_down = plan.screen is not None and plan.screen.group < min(req.nq, 1024)
        if (
            (cap == low and req.nq == 1)
            or (not ran_quick and batches <= QUICK_BATCHES)
            or (sized_down and not ran_sized)
            or cap is None
        ):
            top = run_search(req, ctx, plan)
            assert ctx.budget.held_bytes == 0
            _check(top.scores, top.positions, x, req.queries, req.metric, positions)
            ran_quick |= batches <= QUICK_BATCHES
            ran_sized |= sized_down
        if cap is None:
            break
        cap = cap * 2 if cap < 0.25 else None
    if req.screen == "off":
        assert "screen" not in paths


def test_regression_search_of_200_queries_under_a_4_mib_cap(tmp_path):
    """The screen needed 6.3 MiB here and raised; the planner streams the search in float32."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20_000, 128)).astype(np.float32)
    make_store(tmp_path / "s", x)
    store = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy", max_memory_gb=0.004)
    frame = store.search(x[:200], k=10)
    scores, found = frame["score"].to_numpy(), frame["row_id"].to_numpy()
    _check(scores.reshape(200, 10), found.reshape(200, 10), x, x[:200], "cosine", None)
    text = store.explain(x[:200], k=10)
    assert "path: float32 stream" in text and "note: the bfloat16 screen needs" in text


def test_regression_self_join_under_a_1_mib_cap(tmp_path):
    """The self-join of 8,000 x 64 rows under max_memory_gb=0.001 raised in the screen."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8000, 64)).astype(np.float32)
    make_store(tmp_path / "s", x)
    store = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy", max_memory_gb=0.001)
    out = similarity_join(store, store, 1, out=tmp_path / "nn", exclude_self=True, progress=False)
    pairs = pl.read_parquet(f"{out}/*.parquet").sort("left_row_id")
    assert pairs["left_row_id"].to_list() == list(range(8000))
    s64 = brute_force(x, x, "cosine")
    np.fill_diagonal(s64, -np.inf)
    best = s64.max(axis=1)
    got = s64[np.arange(8000), pairs["right_row_id"].to_numpy()]
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-6)  # the nearest other row (or a tie)
    np.testing.assert_allclose(pairs["score"].to_numpy(), best, rtol=0, atol=1e-5)


def test_explain_describes_the_plan(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    text = store.explain(x[:300], k=5, screen="on")
    assert "path: bfloat16 screen" in text and "torch: yes" in text and "NumPy store" in text
    text = store.explain(x[:300], k=5, screen="off", batch_rows=1000)
    assert "path: float32 stream" in text and "batches of 1,000 rows" in text
    assert "torch: no" in text and "passes over the rows: 1" in text
    low = float(re.search(r"smallest cap for this search: max_memory_gb=([0-9.]+)", text)[1])
    capped = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy", max_memory_gb=low)
    assert capped.search(x[:2], k=5, screen="off").height == 10
    assert "funnel" in store.explain(x[:3], k=5, funnel=[(8, 50)])


_RSS_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
import embtools as et
import embtools.search, embtools.storage.snapshot, embtools.store
from embtools.kernels.jit import warm
warm()  # numba and LLVM: a library's fixed memory, counted with the imports
sys.path.insert(0, sys.argv[4])
import memory_cap as bench

path, cap, what = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
q = rng.standard_normal((300, 128), dtype=np.float32)
left = et.EmbeddingStore(tempfile.mkdtemp() + "/left", backend="numpy")
left.add_embeddings(q[:40], dimension=128)
Path("/proc/self/clear_refs").write_text("5")
before = bench._status_kib("VmRSS") * 1024
store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap)
if what == "search":
    n = store.search(q, k=10).height
else:
    out = et.similarity_join(left, store, 5, out=tempfile.mkdtemp() + "/j", progress=False)
    import polars as pl
    n = pl.read_parquet(f"{out}/*.parquet").height
peak = bench._status_kib("VmHWM") * 1024
print(json.dumps({"rows": n, "grew": peak - before, "torch": "torch" in sys.modules,
                  "bound": int(cap * 1024**3) + bench.SLACK_BYTES}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_of_capped_search_and_join(tmp_path):
    """A search of 300 queries (the screen's size of batch) and a join, each in a fresh process
    over a 140 MiB store under a 20 MiB cap: peak RSS grows by at most the cap plus 100 MiB, the
    bound of tests/test_memory_cap.py (a search holding the store would pass it). The screen
    does not fit this cap, so the planner does not even import torch (which alone takes more)."""
    path = str(tmp_path / "big")
    store = et.EmbeddingStore(path, backend="numpy")
    rng = np.random.default_rng(0)
    for _ in range(5):
        store.add_embeddings(rng.standard_normal((57_344, 128), dtype=np.float32), dimension=128)
    del store
    bench_dir = str(Path(__file__).resolve().parent.parent / "benchmarks")
    for what, rows in (("search", 3000), ("join", 200)):
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, path, "0.02", what, bench_dir],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["rows"] == rows and not r["torch"]
        assert r["grew"] <= r["bound"], (what, r["grew"] / 2**20, r["bound"] / 2**20)
