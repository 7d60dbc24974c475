"""The quantization kernels against their references: sentence-transformers' ``quantize_embeddings``
(int8 and ubinary codes) and FAISS ``IndexBinaryFlat`` (Hamming distances and ids)."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest

from embtools.kernels import codes as C
from embtools.kernels import hamming as H
from embtools.kernels.jit import JIT_ENV, jit_kernels


def _quantize_embeddings():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.quantization import quantize_embeddings
    return quantize_embeddings


def _clustered(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    centres = rng.standard_normal((8, d)).astype(np.float32)
    x = centres[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    x[rng.integers(n)] = 0.0  # zero row: every sign bit clear
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("d", [384, 20, 8, 1])
def test_int8_codes_equal_sentence_transformers(rng: np.random.Generator, d: int) -> None:
    x = _clustered(rng, 3000, d)
    ranges = C.int8_ranges(x[rng.choice(3000, 500, replace=False)])  # a sample: some rows clip
    x[5, 0] = 40.0  # far outside the range
    x[6, -1] = -40.0
    ours = C.encode_int8(x, ranges)
    ref = _quantize_embeddings()(x, precision="int8", ranges=ranges)
    assert ours.dtype == np.int8 and ours.shape == (3000, d)
    np.testing.assert_array_equal(ours, ref)
    # a constant dimension (step 0 -> 1) too
    flat = np.array([[0.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    fr = C.int8_ranges(flat)
    np.testing.assert_array_equal(
        C.encode_int8(flat, fr), _quantize_embeddings()(flat, precision="int8", ranges=fr)
    )


@pytest.mark.parametrize("d", [384, 20, 3])
def test_sign_codes_equal_sentence_transformers_ubinary(rng: np.random.Generator, d: int) -> None:
    x = _clustered(rng, 500, d)
    x[0, 0] = 0.0  # zero is not > 0
    ours = C.pack_signs(x)
    ref = _quantize_embeddings()(x, precision="ubinary")
    assert ours.dtype == np.uint8 and ours.shape == (500, C.sign_bytes(d))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(C.unpack_signs(ours, d), np.where(x > 0, 1.0, -1.0))


def test_int8_radius_bounds_every_unclipped_value(rng: np.random.Generator) -> None:
    d = 64
    x = _clustered(rng, 20000, d) * rng.uniform(0.01, 100.0)
    x[:, 3] += 1000.0  # a far offset: rounding of lo matters
    ranges = C.int8_ranges(x[:5000])
    codes = C.encode_int8(x, ranges)
    err = np.abs(x.astype(np.float64) - C.decode_int8(codes, ranges).astype(np.float64))
    inner = (codes != -128) & (codes != 127)
    assert inner.mean() > 0.9
    radius = C.int8_radius(ranges)
    assert np.all(err[inner] <= np.broadcast_to(radius, err.shape)[inner])
    starts, steps = C.int8_steps(ranges)
    assert np.all(radius < 0.51 * steps + 1e-3 * np.abs(starts) + 1e-30)
    clipped = (x < ranges[0]) | (x > ranges[1])
    assert np.all(C.has_end_codes(codes)[clipped.any(axis=1)])


def test_int8_rejects_bad_sample() -> None:
    with pytest.raises(ValueError):
        C.int8_ranges(np.zeros((0, 4), dtype=np.float32))


def _faiss_search(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    return index.search(queries, k)


@pytest.mark.parametrize("nq", [1, 3, 40])
@pytest.mark.parametrize("nbytes", [48, 2, 5])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_hamming_top_k_equals_faiss(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, nq: int, nbytes: int, tiles: str
) -> None:
    if tiles == "small":  # many tiles, the last one shorter than k
        monkeypatch.setattr(H, "TILE_BYTES", 4 * 8 * nbytes * 97)
    n = 9000
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    codes[100:200] = codes[0]  # exact ties
    queries = rng.integers(0, 256, (nq, nbytes), dtype=np.uint8)
    queries[0] = codes[0]
    for k in (1, 10, 150):
        d_ref, i_ref = _faiss_search(queries, codes, k)
        d, i = H.hamming_top_k(queries, codes, k)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(i, i_ref)
    # the full distance matrix, both ways of computing it
    full = np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=-1).sum(axis=-1)
    np.testing.assert_array_equal(H.hamming_distances(queries, codes), full)
    np.testing.assert_array_equal(H.hamming_distances(queries[:1], codes), full[:1])


KERNELS = ["jit", "faiss", "numpy"]


def _use_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> bool:
    """Force one of threaded_hamming_top_k's kernels; returns its ``use_faiss``. The compiled
    one is skipped where numba is missing; ``EMBTOOLS_JIT=0`` turns it off for the others."""
    if kernel == "jit":
        pytest.importorskip("numba")
        monkeypatch.delenv(JIT_ENV, raising=False)
        assert jit_kernels("hamming_jit") is not None
    else:
        monkeypatch.setenv(JIT_ENV, "0")
    return kernel == "faiss"


@pytest.mark.parametrize("nq", [1, 20])
@pytest.mark.parametrize("nbytes", [48, 5, 16, 32, 64, 96, 40])
@pytest.mark.parametrize("kernel", KERNELS)
def test_threaded_hamming_top_k_equals_faiss(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, nq: int, nbytes: int, kernel: str
) -> None:
    """Rows split over 1 to 5 threads (parts of a few hundred rows), or a batch's queries split;
    the compiled kernel, FAISS knn_hamming or NumPy: the same distances and ids as
    IndexBinaryFlat, with ties straddling the parts. Widths of 2 to 12 words (and 5 bytes: no
    whole words, never compiled)."""
    use_faiss = _use_kernel(monkeypatch, kernel)
    monkeypatch.setattr(H, "MIN_THREAD_ROWS", 300)
    monkeypatch.setattr(H, "MIN_THREAD_QUERIES", 3)
    n = 2000
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    codes[rng.choice(n, 200, replace=False)] = codes[0]  # ties in every part
    codes[1500:] = codes[1]
    queries = rng.integers(0, 256, (nq, nbytes), dtype=np.uint8)
    queries[0] = codes[0]
    if nq > 1:
        queries[1] = codes[1]
    for k in (1, 7, 150, 450, 3000):
        d_ref, i_ref = _faiss_search(queries, codes, min(k, n))
        for threads in (1, 2, 3, 5):
            d, i = H.threaded_hamming_top_k(queries, codes, k, threads=threads, use_faiss=use_faiss)
            np.testing.assert_array_equal(d, d_ref)
            np.testing.assert_array_equal(i, i_ref)
            assert d.dtype == np.int32 and i.dtype == np.int64
    d, i = H.threaded_hamming_top_k(queries, codes, 0)
    assert d.shape == (nq, 0) and i.shape == (nq, 0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_threaded_hamming_thousands_of_queries(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """A batch of 3,000 queries (near rows, so the buffers fill and compact often) over clustered
    codes, default threads: IndexBinaryFlat's results; one row, and k = 1."""
    use_faiss = _use_kernel(monkeypatch, kernel)
    centres = rng.integers(0, 256, (20, 48), dtype=np.uint8)
    flips = np.packbits(rng.random((5000, 384)) < 0.1, axis=1)
    codes = centres[rng.integers(0, 20, 5000)] ^ flips
    queries = codes[rng.integers(0, 5000, 3000)] ^ np.packbits(rng.random((3000, 384)) < 0.02, axis=1)
    for k in (1, 40):
        d, i = H.threaded_hamming_top_k(queries, codes, k, use_faiss=use_faiss)
        d_ref, i_ref = _faiss_search(queries, codes, k)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(i, i_ref)
    d, i = H.threaded_hamming_top_k(queries[:3], codes[:1], 5, use_faiss=use_faiss)
    assert d.shape == (3, 1) and i.tolist() == [[0], [0], [0]]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nq", [1, 9])
def test_hamming_stream_batches_and_kept_codes(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, kernel: str, nq: int
) -> None:
    """Batches of rows added one after another (some shorter than k, one empty), rows split
    over threads: IndexBinaryFlat's results; with keep_codes, the compiled kernel returns the
    winners' codes in result order (None on the other paths)."""
    use_faiss = _use_kernel(monkeypatch, kernel)
    monkeypatch.setattr(H, "MIN_THREAD_ROWS", 50)
    codes = rng.integers(0, 256, (3000, 48), dtype=np.uint8)
    codes[rng.choice(3000, 300, replace=False)] = codes[3]  # ties across batches
    queries = rng.integers(0, 256, (nq, 48), dtype=np.uint8)
    queries[0] = codes[3]
    for k, threads in ((1, 1), (40, 2), (350, 3)):
        stream = H.HammingStream(queries, k, threads=threads, use_faiss=use_faiss, keep_codes=True)
        for a, b in ((0, 20), (20, 20), (20, 1400), (1400, 1430), (1430, 3000)):
            stream.add(codes[a:b])
        d, i = stream.result()
        d_ref, i_ref = _faiss_search(queries, codes, k)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(i, i_ref)
        kept = stream.codes()
        if kernel == "jit":
            assert kept is not None
            np.testing.assert_array_equal(kept, codes[i])
        else:
            assert kept is None


def test_jit_kernel_tiles_and_compactions(rng: np.random.Generator) -> None:
    """The compiled kernel directly: tiles of 1 to all rows, k from 1 to every row (buffers that
    compact every few rows, or never), offsets added; every width of 1 to 13 words."""
    pytest.importorskip("numba")
    J = jit_kernels("hamming_jit")
    assert J is not None
    for words in range(1, 14):
        codes = rng.integers(0, 256, (700, 8 * words), dtype=np.uint8)
        codes[rng.choice(700, 100, replace=False)] = codes[5]
        codes[:, 1:] &= np.uint8(0xF0) if words > 3 else np.uint8(0xFF)  # many equal distances
        queries = rng.integers(0, 256, (4, 8 * words), dtype=np.uint8)
        queries[1] = codes[5]
        for k in (1, 3, 256, 699, 700):
            d_ref, i_ref = _faiss_search(queries, codes, k)
            for tile in (1, 97, 700, 10_000):
                d, i = J.top_k(queries.view(np.uint64), codes.view(np.uint64), k, 1000, tile)
                np.testing.assert_array_equal(d, d_ref)
                np.testing.assert_array_equal(i, i_ref + 1000)


def test_hamming_lookup_table_path(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = rng.integers(0, 256, (3000, 48), dtype=np.uint8)
    queries = rng.integers(0, 256, (2, 48), dtype=np.uint8)
    monkeypatch.setattr(H, "HAS_BITWISE_COUNT", False)
    d, i = H.hamming_top_k(queries, codes, 20)
    d_ref, i_ref = _faiss_search(queries, codes, 20)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(i, i_ref)
    words = codes.view(np.uint64)
    np.testing.assert_array_equal(H.popcount(words), np.bitwise_count(words))


def test_hamming_k_clipped_and_shapes(rng: np.random.Generator) -> None:
    codes = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    d, i = H.hamming_top_k(codes[:1], codes, 50)
    assert d.shape == (1, 5) and sorted(i[0].tolist()) == list(range(5)) and d[0, 0] == 0
    d, i = H.hamming_top_k(codes[:1], codes, 0)
    assert d.shape == (1, 0)
    with pytest.raises(ValueError):
        H.hamming_distances(codes[:, :3], codes)


@pytest.mark.parametrize("nq", [1, 2, 30])
@pytest.mark.parametrize("d", [384, 13])
def test_sign_scores_asymmetric(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, nq: int, d: int
) -> None:
    monkeypatch.setattr(H, "TILE_BYTES", 4 * d * 300)  # tiles of about 300 rows
    x = _clustered(rng, 5000, d)
    q = _clustered(rng, nq, d)
    codes = C.pack_signs(x)
    ref = q.astype(np.float64) @ np.where(x > 0, 1.0, -1.0).T
    got = H.sign_scores(q, codes, d)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    k = 25
    s, i = H.sign_top_k(q, codes, d, k)
    for r in range(nq):
        # best first; the k-th best value matches and every returned row reaches it (a batch
        # scores in the tile kernel, whose float32 sums round differently from sign_scores':
        # rows whose exact scores are equal or a rounding apart may come in either order)
        order = np.lexsort((np.arange(5000), -ref[r]))[:k]
        np.testing.assert_allclose(s[r], ref[r][i[r]], atol=1e-4)
        assert np.all(np.diff(ref[r][i[r]]) <= 1e-4)
        assert len(set(i[r].tolist())) == k
        assert ref[r][i[r]].min() >= ref[r][order[-1]] - 1e-4
        if nq < H.MATMUL_QUERIES:  # the per-byte tables: sign_scores' own order
            np.testing.assert_array_equal(i[r], np.lexsort((np.arange(5000), -got[r]))[:k])


@pytest.mark.parametrize("d", [384, 13, 64])
def test_jit_sign_select_equals_float64(rng: np.random.Generator, d: int) -> None:
    """The compiled asymmetric re-order picks each query's best m candidates by the float64
    score against the +-1 sign vectors, ties (duplicate rows) to the lower id; one query and a
    batch, m from 1 to every candidate."""
    pytest.importorskip("numba")
    J = jit_kernels("hamming_jit")
    assert J is not None
    x = _clustered(rng, 3000, d)
    x[7] = x[5]
    codes = C.pack_signs(x)
    signs = np.where(x > 0, 1.0, -1.0)
    for nq in (1, 20):
        q = _clustered(rng, nq, d)
        ids = np.stack([rng.permutation(3000)[:400] for _ in range(nq)])
        ids[:, :2] = [7, 5]
        s64 = q.astype(np.float64) @ signs.T
        for m in (1, 100, 400):
            got = J.sign_select(q, codes[ids], ids, m)
            for r in range(nq):
                ref = ids[r][np.lexsort((ids[r], -s64[r, ids[r]]))[:m]]
                np.testing.assert_array_equal(got[r], ref)


def test_merge_smallest_int_keys_equal_lexsort(rng: np.random.Generator) -> None:
    """The int64-key merge of Hamming distances equals the lexicographic one (ties to the lower
    index), for k below, at and past the width; floats and negatives take the general path."""
    for _ in range(20):
        v = rng.integers(0, 6, (7, 40)).astype(np.int32)
        i = rng.permutation(7 * 40).reshape(7, 40).astype(np.int64)
        for k in (1, 5, 40, 60):
            order = np.lexsort((i, v), axis=-1)[:, :k]
            dv, di = H.merge_smallest(v, i, k)
            np.testing.assert_array_equal(dv, np.take_along_axis(v, order, axis=1))
            np.testing.assert_array_equal(di, np.take_along_axis(i, order, axis=1))
            assert dv.dtype == v.dtype and di.dtype == i.dtype
            _fv, fi = H.merge_smallest(-v.astype(np.float64), i, k)
            order = np.lexsort((i, -v), axis=-1)[:, :k]
            np.testing.assert_array_equal(fi, np.take_along_axis(i, order, axis=1))
