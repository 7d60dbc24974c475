"""Search over quantized columns: binary (Hamming, equal to FAISS IndexBinaryFlat, and asymmetric)
and int8 shortlists re-ranked with exact float scores; quantized funnel stages; every metric, one
query and thousands, ``where``, tiny caps."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl
import pytest

import embtools as et
from embtools.errors import InvalidArgumentError, MemoryLimitError
from embtools.kernels import hamming as H
from embtools.kernels.codes import decode_int8, encode_int8, pack_signs
from embtools.kernels.jit import JIT_ENV
from embtools.search import quantized as Q
from embtools.search import recall_at_k
from tests.helpers import brute_force, check_frame, check_top_k

METRICS = ["cosine", "dot", "l2"]


def _corpus(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    c = rng.standard_normal((10, d)).astype(np.float32)
    x = c[rng.integers(0, 10, n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    x *= rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)  # not normalised: cosine differs from dot
    if n > 7:
        x[7] = x[3]  # an exact tie
    return x


def _queries(rng: np.random.Generator, x: np.ndarray, nq: int) -> np.ndarray:
    """Queries near corpus rows (in the corpus' clusters)."""
    q = x[rng.integers(0, len(x), nq)] + 0.3 * rng.standard_normal((nq, x.shape[1]))
    return q.astype(np.float32)


def _store(new_store, kind, x, labels=None, **kw):  # type: ignore[no-untyped-def]
    store = new_store(kind, **kw)
    store.add_embeddings(x, dimension=x.shape[1], labels=labels)
    store.quantize(x.shape[1])
    return store


def _restricted(s64: np.ndarray, cand: list[np.ndarray]) -> np.ndarray:
    """The brute-force matrix with every row outside each query's candidates set to NaN."""
    out = np.full_like(s64, np.nan)
    for r, c in enumerate(cand):
        out[r, c] = s64[r, c]
    return out


def _hamming_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """embtools' own kernels, checked against FAISS: the compiled one (skipped without numba),
    or NumPy's (``EMBTOOLS_JIT=0``, FAISS hidden)."""
    monkeypatch.setattr(H, "_faiss", lambda: None)
    if kernel == "jit":
        pytest.importorskip("numba")
        monkeypatch.delenv(JIT_ENV, raising=False)
    else:
        monkeypatch.setenv(JIT_ENV, "0")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 40])
@pytest.mark.parametrize("kernel", ["jit", "numpy"])
def test_hamming_shortlist_equals_faiss_then_exact(new_store, store_kind, rng, monkeypatch, metric, nq,
                                                   kernel):
    monkeypatch.setattr(Q, "BINARY_MODE", "hamming")
    _hamming_kernel(monkeypatch, kernel)
    n, d, k, r = 1500, 64, 10, 4
    x = _corpus(rng, n, d)
    labels = rng.choice(["a", "b"], n).tolist()
    store = _store(new_store, store_kind, x, labels)
    q = _queries(rng, x, nq)
    for where in (None, pl.col("label") == "a"):
        sel = np.arange(n) if where is None else np.flatnonzero(np.array(labels) == "a")
        got = store.search(q, k, metric=metric, where=where, precision="binary", rescore=r)
        check_frame(got, nq, k)
        index = faiss.IndexBinaryFlat(d)
        index.add(pack_signs(x[sel]))
        _, short = index.search(pack_signs(q), k * r)
        cand = [sel[row] for row in short]
        s64 = _restricted(brute_force(x, q, metric), cand)
        found = got["row_id"].to_numpy().reshape(nq, k)
        check_top_k(s64, got["score"].to_numpy().reshape(nq, k), found, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kernel", ["jit", "numpy"])
def test_asymmetric_shortlist(new_store, rng, monkeypatch, metric, kernel):
    """The asymmetric score re-orders FAISS's Hamming shortlist of BINARY_WIDEN x m (one query
    and a batch; the compiled kernels and NumPy's); exact scores come back."""
    _hamming_kernel(monkeypatch, kernel)
    n, d, k, r = 2000, 48, 5, 3
    x = _corpus(rng, n, d)
    store = _store(new_store, "disk", x)
    signs = np.where(x > 0, 1.0, -1.0)
    for nq in (1, 20):
        q = _queries(rng, x, nq)
        got = store.search(q, k, metric=metric, precision="binary", rescore=r)
        found = got["row_id"].to_numpy().reshape(nq, k)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
        asym = qn.astype(np.float64) @ signs.T
        index = faiss.IndexBinaryFlat(d)
        index.add(pack_signs(x))
        _, wide = index.search(pack_signs(q), k * r * Q.BINARY_WIDEN)
        for row in range(nq):
            p = wide[row]
            a = asym[row, p]
            kth = np.sort(a)[::-1][k * r - 1]
            allowed = set(p[a >= kth - 1e-4].tolist())
            assert set(found[row].tolist()) <= allowed
        s64 = brute_force(x, q, metric)
        np.testing.assert_allclose(
            got["score"].to_numpy().reshape(nq, k), np.take_along_axis(s64, found, 1), atol=1e-5
        )


@pytest.mark.parametrize("metric", METRICS)
def test_int8_shortlist(new_store, store_kind, rng, metric):
    n, d, k, r = 1200, 32, 10, 2
    x = _corpus(rng, n, d)
    store = _store(new_store, store_kind, x)
    ranges = store.source.quantized[d].ranges
    q = _queries(rng, x, 3)
    got = store.search(q, k, metric=metric, precision="int8", rescore=r)
    found = got["row_id"].to_numpy().reshape(3, k)
    # the shortlist: the best k * r rows by the codes' bucket centres (float64, up to 1e-4)
    centres = decode_int8(encode_int8(x, ranges), ranges)
    approx = brute_force(centres, q, metric)
    sign = -1.0 if metric == "l2" else 1.0
    for row in range(3):
        a = sign * approx[row]
        kth = np.sort(a)[::-1][k * r - 1]
        assert set(found[row].tolist()) <= set(np.flatnonzero(a >= kth - 1e-4).tolist())
    s64 = brute_force(x, q, metric)
    np.testing.assert_allclose(got["score"].to_numpy().reshape(3, k), np.take_along_axis(s64, found, 1),
                               atol=1e-5)
    # int8 keeps nearly all of the exact top k on clustered data
    assert recall_at_k(store.search(q, k, metric=metric, precision="int8", rescore=4),
                       store.search(q, k, metric=metric)) >= 0.8


COVERING = [(kind, metric, nq) for kind in ("disk", "memory") for metric in METRICS for nq in (1, 3)]
COVERING += [("disk", "cosine", 1500), ("memory", "l2", 1500)]  # thousands of queries


@pytest.mark.parametrize(("store_kind", "metric", "nq"), COVERING)
def test_covering_shortlists_give_the_exact_search(new_store, store_kind, rng, metric, nq):
    n, d, k = 300, 16, 7
    x = _corpus(rng, n, d)
    labels = rng.choice(["a", "b", "c"], n).tolist()
    store = _store(new_store, store_kind, x, labels)
    q = np.concatenate([x[[3]], _queries(rng, x, nq - 1)]) if nq > 1 else x[[3]]
    for where in (None, "label != 'c'"):
        exact = store.search(q, k, metric=metric, where=where)
        for kw in (
            dict(precision="binary", rescore=n),
            dict(precision="int8", rescore=n),
            dict(funnel=[("binary", n), ("int8", n)]),
            dict(funnel=[("binary", n), ("int8", n), (8, n)]),
        ):
            got = store.search(q, k, metric=metric, where=where, **kw)
            assert got.equals(exact), kw


def test_tiny_caps_and_explain(new_store, store_kind, rng):
    n, d, k = 3000, 64, 5
    x = _corpus(rng, n, d)
    store = _store(new_store, store_kind, x, max_memory_gb=None)
    q = _queries(rng, x, 20)
    free = store.search(q, k, precision="binary", rescore=8)
    funnel = store.search(q, k, funnel=[("binary", 60), ("int8", 20)])
    held = store.budget.held_bytes
    for extra_mb in (40, 20):  # the kernel tiles take ~16 MiB: small batches under these caps
        capped = new_store(store_kind, max_memory_gb=(held + extra_mb * 1024**2) / 1024**3)
        capped.add_embeddings(x, dimension=d)
        capped.quantize(d)
        assert capped.search(q, k, precision="binary", rescore=8).equals(free)
        assert capped.search(q, k, funnel=[("binary", 60), ("int8", 20)]).equals(funnel)
        text = capped.explain(q, k, precision="binary", rescore=8)
        assert "binary codes" in text and "quantized funnel" in text
    tiny = new_store(store_kind, max_memory_gb=held / 1024**3 + 1e-4)
    tiny.add_embeddings(x, dimension=d)
    tiny.quantize(d)
    with pytest.raises(MemoryLimitError, match="smallest cap"):
        tiny.search(q, k, precision="binary")


def test_funnel_arguments_are_checked(new_store, rng):
    x = _corpus(rng, 100, 16)
    store = _store(new_store, "memory", x)
    for funnel in (
        [("int8", 40), ("binary", 20)],  # binary first
        [(8, 40), ("binary", 20)],  # quantized stages first
        [("binary", 40), ("binary", 20)],
        [("int4", 40)],
        [("binary", 5)],  # smaller than k
        [("binary", 20), ("int8", 40)],  # growing
        [(True, 40)],
    ):
        with pytest.raises(InvalidArgumentError):
            store.search(x[0], 10, funnel=funnel)
    with pytest.raises(InvalidArgumentError):
        store.search(x[0], 10, precision="binary", funnel=[("binary", 40)])
    with pytest.raises(InvalidArgumentError):
        store.search(x[0], 10, precision="binary", rescore=0)
    with pytest.raises(InvalidArgumentError):
        store.search(x[0, :8], 10, dimension=8, precision="binary")  # no codes of the prefix
    other = et.EmbeddingStore(None, backend="numpy")
    other.add_embeddings(x, dimension=16)
    with pytest.raises(InvalidArgumentError):
        store.search(other, 3, precision="binary")


@pytest.mark.parametrize("metric", METRICS)
def test_certified_int8_screen_is_exact(new_store, store_kind, rng, monkeypatch, metric):
    """screen="int8": the same rows as the exact search, for every metric, with ``where``, when the
    codes cannot certify a query (MAX_CANDIDATES tiny: the float32 stream answers it), and for rows
    clipped by the sample's ranges (end codes)."""
    from embtools.search import int8screen

    n, d, k = 3000, 32, 10
    x = _corpus(rng, n, d)
    x[11] = 0.0  # a zero row
    x[12] *= 50.0  # far outside the sampled ranges: end codes
    labels = rng.choice(["a", "b"], n).tolist()
    store = new_store(store_kind)
    store.add_embeddings(x, dimension=d, labels=labels)
    store.quantize(d, kinds=["int8"], sample_rows=500)
    q = np.concatenate([x[[3, 12]], _queries(rng, x, 3)])
    for where in (None, pl.col("label") == "a"):
        exact = store.search(q, k, metric=metric, where=where)
        got = store.search(q, k, metric=metric, where=where, screen="int8")
        assert got.equals(exact)
        sel = None if where is None else np.flatnonzero(np.array(labels) == "a")
        scores = got["score"].to_numpy().reshape(5, k)
        tol = 1e-4 * max(1.0, float(np.abs(scores).max()))  # float32 scores of the far row
        check_top_k(brute_force(x, q, metric, sel), scores, got["row_id"].to_numpy().reshape(5, k),
                    k, metric, tol=tol)
    assert "certified int8 screen" in store.explain(q, k, metric=metric, screen="int8")
    monkeypatch.setattr(int8screen, "MAX_CANDIDATES", k)  # nothing certifiable: all fall back
    assert store.search(q, k, metric=metric, screen="int8").equals(store.search(q, k, metric=metric))


def test_int8_screen_steps_aside(new_store, rng):
    """Without int8 codes, or when the screen does not fit the cap, the exact float32 stream runs."""
    x = _corpus(rng, 2000, 16)
    store = new_store("disk")
    store.add_embeddings(x, dimension=16)
    store.quantize(16, kinds=["binary"])
    text = store.explain(x[:2], 5, screen="int8")
    assert "needs int8 codes" in text and "float32 stream" in text
    assert store.search(x[:2], 5, screen="int8").equals(store.search(x[:2], 5))
    capped = new_store("disk", max_memory_gb=0.005)  # below the screen's fixed tiles
    capped.add_embeddings(x, dimension=16)
    capped.quantize(16, kinds=["int8"])
    text = capped.explain(x[:2], 5, screen="int8")
    assert "does not fit the cap" in text
    assert capped.search(x[:2], 5, screen="int8").equals(store.search(x[:2], 5))


@pytest.mark.parametrize("metric", METRICS)
def test_binary_search_same_with_and_without_the_kernels(new_store, rng, monkeypatch, metric):
    """precision="binary" (Hamming shortlist, asymmetric order in float64, float re-rank) and a
    binary funnel stage give the same frames from the compiled kernels and from NumPy's (FAISS
    hidden), for single queries and a batch, with a filter."""
    pytest.importorskip("numba")
    monkeypatch.setattr(H, "_faiss", lambda: None)
    n, d = 3000, 64
    x = _corpus(rng, n, d)
    labels = rng.choice(["a", "b"], n).tolist()
    store = _store(new_store, "disk", x, labels)
    q = _queries(rng, x, 24)
    runs = [(q[:1], {}), (q[1:2], {"where": pl.col("label") == "a"}), (q, {}),
            (q, {"rescore": 3}), (q[:2], {"funnel": [("binary", 60), ("int8", 20)]})]
    frames = []
    for jit in ("0", "1"):
        monkeypatch.setenv(JIT_ENV, jit)
        frames.append([store.search(qq, 10, metric=metric, precision="binary", **kw)
                       if "funnel" not in kw else store.search(qq, 10, metric=metric, **kw)
                       for qq, kw in runs])
    for without, with_ in zip(*frames, strict=True):
        assert with_.equals(without)
