"""Conformance tests for the compute backends, against a NumPy float64 reference.

`BackendTests` runs once per installed backend and per device present (cpu always; cuda/mps/gpu
when there). Every test draws fresh random data; the seed is printed so a failure can be replayed
with EMBTOOLS_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embtools
from embtools.backends import (
    Backend,
    SupportsAsyncUpload,
    SupportsRunningTopK,
    SupportsScaledScores,
    available_backends,
    convert,
    get_backend,
)
from embtools.backends.detect import Facts, choose_backend
from embtools.errors import (
    BackendUnavailableError,
    DeviceUnavailableError,
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
)


def _devices(name: str) -> list[str]:
    if name == "numpy":
        return ["cpu"]
    if name == "torch":
        from embtools.backends.torch_backend import available_devices

        return available_devices()
    from embtools.backends.mlx_backend import available_devices as mlx_devices

    return mlx_devices()


PAIRS = [(name, dev) for name in available_backends() for dev in _devices(name)]


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("EMBTOOLS_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed: {seed} (replay with EMBTOOLS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def f64(b: Backend, x: Any) -> np.ndarray:
    """A backend array as a NumPy float64 array (for comparing with the reference)."""
    return np.asarray(b.to_numpy(x), dtype=np.float64)


def ref_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def ref_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ref_normalize(np.atleast_2d(a)) @ ref_normalize(np.atleast_2d(b)).T


def ref_top_k(s: np.ndarray, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Stable full sort: ties to the lower index."""
    order = np.argsort(-s if largest else s, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, order, axis=-1), order


def assert_top_k(ref: np.ndarray, values: np.ndarray, indices: np.ndarray, k: int, largest=True):
    """Values are the reference's best k (to float32 precision) and sit at the returned indices."""
    expect_v, _ = ref_top_k(ref, k, largest)
    assert indices.shape == expect_v.shape
    np.testing.assert_allclose(values, expect_v, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, indices, -1), values, atol=2e-5, rtol=1e-5)
    for row in indices.reshape(-1, indices.shape[-1]):
        assert len(set(row.tolist())) == row.size


@pytest.mark.parametrize(
    "backend", [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in PAIRS], indirect=True
)
class BackendTests:
    """Every backend must pass these; subclass or parametrize ``backend`` to run a new one."""

    # ---------------------------------------------------------------- creation and metadata
    def test_identity(self, backend: Backend):
        assert backend.name in ("numpy", "torch", "mlx")
        assert isinstance(backend.device, str)

    @pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4)])
    def test_create_array_shape_dtype(self, backend: Backend, rng, shape):
        data = rng.standard_normal(shape)
        x = backend.create_array(data)
        assert backend.get_shape(x) == shape
        assert backend.get_dtype(x) == "float32"
        np.testing.assert_allclose(f64(backend, x), data, rtol=1e-6, atol=1e-7)
        assert backend.get_memory_usage(x) == int(np.prod(shape)) * 4
        h = backend.create_array(data.tolist(), dtype="float16")
        assert backend.get_dtype(h) == "float16"
        assert backend.get_memory_usage(h) == int(np.prod(shape)) * 2

    def test_create_array_rejects_ragged(self, backend: Backend):
        with pytest.raises(InvalidEmbeddingsError):
            backend.create_array([[1.0, 2.0], [3.0]])

    def test_zeros_ones(self, backend: Backend):
        z, o = backend.zeros((3, 5)), backend.ones(4, dtype="int64")
        assert backend.get_shape(z) == (3, 5) and backend.get_dtype(z) == "float32"
        assert backend.get_dtype(o) == "int64"
        assert (f64(backend, z) == 0).all() and (f64(backend, o) == 1).all()

    def test_random_normal(self, backend: Backend, rng):
        seed = int(rng.integers(2**31))
        a = backend.random_normal((64, 64), seed=seed)
        b = backend.random_normal((64, 64), seed=seed)
        c = backend.random_normal((64, 64), seed=seed + 1)
        assert backend.get_dtype(a) == "float32" and backend.get_shape(a) == (64, 64)
        np.testing.assert_array_equal(f64(backend, a), f64(backend, b))
        assert not np.array_equal(f64(backend, a), f64(backend, c))
        values = f64(backend, a)
        assert abs(values.mean()) < 0.1 and 0.9 < values.std() < 1.1

    def test_numpy_round_trip(self, backend: Backend, rng):
        for dtype in (np.float32, np.float64, np.int64, np.float16):
            a = (rng.standard_normal((4, 3)) * 10).astype(dtype)
            x = backend.from_numpy(a)
            assert backend.get_dtype(x) == np.dtype(dtype).name
            back = backend.to_numpy(x)
            assert back.dtype == a.dtype
            np.testing.assert_array_equal(back, a)

    # ---------------------------------------------------------------- maths
    @pytest.mark.parametrize(
        "shapes", [((5,), (5,)), ((3, 5), (5,)), ((5,), (5, 4)), ((3, 5), (5, 4))]
    )
    def test_dot(self, backend: Backend, rng, shapes):
        a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
        out = backend.dot(backend.create_array(a), backend.create_array(b))
        expect = np.dot(
            a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
        )
        assert backend.get_shape(out) == np.shape(expect)
        np.testing.assert_allclose(f64(backend, out), expect, rtol=1e-5, atol=1e-5)

    def test_dot_mismatch(self, backend: Backend):
        with pytest.raises(DimensionMismatchError):
            backend.dot(backend.ones((2, 3)), backend.ones((4,)))

    @pytest.mark.parametrize("n,m,d", [(1, 1, 3), (7, 5, 16), (13, 29, 33)])
    def test_cosine_similarity_2d(self, backend: Backend, rng, n, m, d):
        a = rng.standard_normal((n, d)).astype(np.float32)
        b = rng.standard_normal((m, d)).astype(np.float32)
        a[0] = 0.0  # a zero vector has similarity 0, never NaN
        out = f64(backend, backend.cosine_similarity(backend.from_numpy(a), backend.from_numpy(b)))
        assert out.shape == (n, m)
        np.testing.assert_allclose(out, ref_cosine(a, b), atol=1e-5)
        assert (out[0] == 0).all()

    def test_cosine_similarity_1d_squeezes(self, backend: Backend, rng):
        v, w = rng.standard_normal(9), rng.standard_normal(9)
        m = rng.standard_normal((4, 9))
        cs = backend.cosine_similarity
        arr = backend.create_array
        assert backend.get_shape(cs(arr(v), arr(w))) == ()
        np.testing.assert_allclose(
            f64(backend, cs(arr(v), arr(w))), ref_cosine(v, w)[0, 0], atol=1e-5
        )
        np.testing.assert_allclose(f64(backend, cs(arr(v), arr(m))), ref_cosine(v, m)[0], atol=1e-5)
        np.testing.assert_allclose(
            f64(backend, cs(arr(m), arr(v))), ref_cosine(m, v)[:, 0], atol=1e-5
        )
        assert float(f64(backend, cs(arr(v), backend.zeros(9)))) == 0.0

    def test_cosine_similarity_float16_input(self, backend: Backend, rng):
        a = rng.standard_normal((6, 24)).astype(np.float16)
        b = rng.standard_normal((8, 24)).astype(np.float16)
        out = backend.cosine_similarity(backend.from_numpy(a), backend.from_numpy(b))
        assert backend.get_dtype(out) == "float32"
        np.testing.assert_allclose(f64(backend, out), ref_cosine(a, b), atol=1e-5)

    def test_cosine_similarity_mismatch(self, backend: Backend):
        with pytest.raises(DimensionMismatchError):
            backend.cosine_similarity(backend.ones((2, 3)), backend.ones((2, 4)))

    @pytest.mark.parametrize("shape,axis", [((11,), -1), ((6, 17), -1), ((6, 17), 0)])
    def test_normalize(self, backend: Backend, rng, shape, axis):
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2:
            x[2] = 0.0
        out = f64(backend, backend.normalize(backend.from_numpy(x), axis=axis))
        np.testing.assert_allclose(out, ref_normalize(x, axis), atol=1e-6)
        assert np.isfinite(out).all()

    @pytest.mark.parametrize("scale", [1e30, 1e-22, 1e-30])
    def test_normalize_huge_and_bad_values(self, backend: Backend, rng, scale):
        # squares that overflow float32 (1e30), lose precision (1e-22) or underflow to 0 (1e-30)
        x = (rng.standard_normal((3, 8)) * scale).astype(np.float32)
        x[0] = 0.0
        out = f64(backend, backend.normalize(backend.from_numpy(x)))
        np.testing.assert_allclose(out, ref_normalize(x.astype(np.float64)), atol=1e-6)
        x[1, 2] = np.nan
        with pytest.raises(InvalidEmbeddingsError):
            backend.normalize(backend.from_numpy(x))

    @pytest.mark.parametrize("axis", [0, 1])
    def test_concatenate_stack(self, backend: Backend, rng, axis):
        a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
        xa, xb = backend.create_array(a), backend.create_array(b)
        np.testing.assert_allclose(
            f64(backend, backend.concatenate([xa, xb], axis=axis)),
            np.concatenate([a, b], axis=axis),
            rtol=1e-6,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            f64(backend, backend.stack([xa, xb], axis=axis)),
            np.stack([a, b], axis=axis),
            rtol=1e-6,
            atol=1e-7,
        )

    def test_concatenate_stack_errors(self, backend: Backend):
        with pytest.raises(InvalidArgumentError):
            backend.concatenate([])
        with pytest.raises(DimensionMismatchError):
            backend.stack([backend.ones((2, 3)), backend.ones((3, 2))])
        with pytest.raises(DimensionMismatchError):
            backend.concatenate([backend.ones((2, 3)), backend.ones((2, 4))], axis=0)

    def test_slice_last_dim(self, backend: Backend, rng):
        x = rng.standard_normal((5, 12)).astype(np.float32)
        for d in (1, 7, 12):
            np.testing.assert_array_equal(
                backend.to_numpy(backend.slice_last_dim(backend.from_numpy(x), d)), x[:, :d]
            )
        for bad in (0, 13, 2.5):
            with pytest.raises(DimensionMismatchError):
                backend.slice_last_dim(backend.from_numpy(x), bad)  # type: ignore[arg-type]

    def test_matmul_t_and_half_inputs(self, backend: Backend, rng):
        a = rng.standard_normal((7, 10)).astype(np.float16)
        b = rng.standard_normal((9, 10)).astype(np.float16)
        out = backend.matmul_t(backend.from_numpy(a), backend.from_numpy(b))
        assert backend.get_dtype(out) == "float32"
        np.testing.assert_allclose(
            f64(backend, out), a.astype(np.float64) @ b.astype(np.float64).T, atol=1e-4
        )

    def test_bfloat16_input(self, backend: Backend, rng):
        if backend.name == "numpy":
            with pytest.raises(InvalidArgumentError):
                backend.create_array([1.0], dtype="bfloat16")
            return
        a = backend.create_array(rng.standard_normal((5, 8)), dtype="bfloat16")
        assert backend.get_dtype(a) == "bfloat16"
        host = backend.to_numpy(a)
        assert host.dtype == np.float32  # NumPy has no bfloat16
        out = backend.cosine_similarity(a, a)
        assert backend.get_dtype(out) == "float32"
        np.testing.assert_allclose(f64(backend, out), ref_cosine(host, host), atol=1e-5)

    @pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
    def test_score_block(self, backend: Backend, rng, metric):
        q = rng.standard_normal((4, 12)).astype(np.float32)
        c = rng.standard_normal((15, 12)).astype(np.float32)
        q64, c64 = q.astype(np.float64), c.astype(np.float64)
        if metric == "l2":
            expect = ((q64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
        else:
            expect = q64 @ c64.T
        out = f64(
            backend, backend.score_block(backend.from_numpy(q), backend.from_numpy(c), metric)
        )
        np.testing.assert_allclose(out, expect, atol=1e-4, rtol=1e-5)
        with pytest.raises(InvalidArgumentError):
            backend.score_block(backend.from_numpy(q), backend.from_numpy(c), "hamming")

    # ---------------------------------------------------------------- top-k
    @pytest.mark.parametrize("n", [1, 2, 17, 100])
    @pytest.mark.parametrize("largest", [True, False])
    def test_top_k_random(self, backend: Backend, rng, n, largest):
        s = rng.standard_normal((5, n)).astype(np.float32)
        for k in sorted({1, max(1, n // 3), n, n + 4}):
            values, indices = backend.top_k(backend.from_numpy(s), k, largest=largest)
            assert backend.get_dtype(indices) == "int64"
            ev, ei = ref_top_k(s.astype(np.float64), min(k, n), largest)
            np.testing.assert_array_equal(backend.to_numpy(indices), ei)
            np.testing.assert_array_equal(f64(backend, values), ev)
        v1, i1 = backend.top_k(backend.from_numpy(s[0]), 3, largest=largest)
        ev, ei = ref_top_k(s[0].astype(np.float64), min(3, n), largest)
        np.testing.assert_array_equal(backend.to_numpy(i1), ei)
        np.testing.assert_array_equal(f64(backend, v1), ev)

    @pytest.mark.parametrize("largest", [True, False])
    def test_top_k_ties_go_to_lower_index(self, backend: Backend, rng, largest):
        s = rng.integers(0, 4, size=(6, 50)).astype(np.float32)  # many exact ties
        for k in (1, 5, 50):
            values, indices = backend.top_k(backend.from_numpy(s), k, largest=largest)
            ev, ei = ref_top_k(s.astype(np.float64), k, largest)
            np.testing.assert_array_equal(backend.to_numpy(indices), ei)
            np.testing.assert_array_equal(f64(backend, values), ev)

    @pytest.mark.parametrize("largest", [True, False])
    def test_top_k_nan_ranks_last(self, backend: Backend, rng, largest):
        s = rng.standard_normal((3, 9)).astype(np.float32)
        s[0, 4] = np.nan
        s[2, [0, 7]] = np.nan
        values, indices = backend.top_k(backend.from_numpy(s), 9, largest=largest)
        key = np.where(np.isnan(s), np.inf if not largest else -np.inf, s)
        expect = np.argsort(-key if largest else key, axis=1, kind="stable")
        np.testing.assert_array_equal(backend.to_numpy(indices), expect)
        np.testing.assert_array_equal(f64(backend, values), np.take_along_axis(s, expect, 1))

    def test_top_k_bad_k(self, backend: Backend):
        s = backend.ones((2, 3))
        for bad in (0, -1, 1.5, True):
            with pytest.raises(InvalidArgumentError):
                backend.top_k(s, bad)  # type: ignore[arg-type]

    @pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
    @pytest.mark.parametrize("nb,k", [(5, 10), (40, 1), (3000, 10)])
    def test_block_top_k(self, backend: Backend, rng, metric, nb, k):
        if backend.name == "mlx" and nb > 100:
            nb = 300  # MLX on CPU is slow; the large-block bound is exercised on numpy and torch
        q = rng.standard_normal((3, 16)).astype(np.float32)
        c = rng.standard_normal((nb, 16)).astype(np.float32)
        if metric == "cosine":
            q, c = ref_normalize(q).astype(np.float32), ref_normalize(c).astype(np.float32)
        q64, c64 = q.astype(np.float64), c.astype(np.float64)
        ref = ((q64[:, None] - c64[None]) ** 2).sum(-1) if metric == "l2" else q64 @ c64.T
        values, indices = backend.block_top_k(
            backend.from_numpy(q), backend.from_numpy(c), k, metric
        )
        assert backend.get_dtype(indices) == "int64"
        assert_top_k(
            ref, f64(backend, values), backend.to_numpy(indices), min(k, nb), metric != "l2"
        )

    def test_block_top_k_ties_in_large_block(self, backend: Backend, rng):
        nb = 300 if backend.name == "mlx" else 4096
        q = np.eye(4, dtype=np.float32)
        c = rng.integers(-2, 3, size=(nb, 4)).astype(np.float32)  # integer scores: many ties
        values, indices = backend.block_top_k(
            backend.from_numpy(q), backend.from_numpy(c), 7, "dot"
        )
        ev, ei = ref_top_k(q.astype(np.float64) @ c.astype(np.float64).T, 7)
        np.testing.assert_array_equal(backend.to_numpy(indices), ei)
        np.testing.assert_array_equal(f64(backend, values), ev)

    @pytest.mark.parametrize("largest", [True, False])
    def test_merge_top_k(self, backend: Backend, rng, largest):
        n, k = 40, 6
        s = rng.integers(0, 8, size=(5, n)).astype(np.float32)  # ties across the two halves
        cut = int(rng.integers(1, n))
        va, ia = ref_top_k(s[:, :cut], k, largest)
        vb, ib = ref_top_k(s[:, cut:], k, largest)
        ib = ib + cut
        v, i = backend.merge_top_k(
            backend.from_numpy(va.astype(np.float32)),
            backend.from_numpy(ia),
            backend.from_numpy(vb.astype(np.float32)),
            backend.from_numpy(ib),
            k,
            largest=largest,
        )
        ev, ei = ref_top_k(s.astype(np.float64), k, largest)
        np.testing.assert_array_equal(backend.to_numpy(i), ei)
        np.testing.assert_array_equal(f64(backend, v), ev)

    def test_take_along_axis(self, backend: Backend, rng):
        x = rng.standard_normal((4, 9)).astype(np.float32)
        idx = rng.integers(0, 9, size=(4, 3)).astype(np.int64)
        out = backend.take_along_axis(backend.from_numpy(x), backend.from_numpy(idx), axis=1)
        np.testing.assert_array_equal(backend.to_numpy(out), np.take_along_axis(x, idx, axis=1))

    @pytest.mark.parametrize("batch_size", [None, 1, 7, 64])
    def test_top_k_cosine_neighbors(self, backend: Backend, rng, batch_size):
        n = 60 if backend.name == "mlx" and batch_size == 1 else 150
        q = rng.standard_normal((6, 20)).astype(np.float32)
        c = rng.standard_normal((n, 20)).astype(np.float32)
        c[3] = 0.0  # zero rows score 0
        q[1] = 0.0  # a zero query scores 0 against everything: ties, lowest indices first
        ref = ref_cosine(q, c)
        for k in (1, 10, n):
            idx, sims = backend.top_k_cosine_neighbors(
                backend.from_numpy(q), backend.from_numpy(c), k, batch_size=batch_size
            )
            idx_np, sims_np = backend.to_numpy(idx), f64(backend, sims)
            assert idx_np.dtype == np.int64 and idx_np.shape == (6, k)
            assert_top_k(ref, sims_np, idx_np, k)
            np.testing.assert_array_equal(idx_np[1], np.arange(k))
            np.testing.assert_array_equal(sims_np[1], 0.0)

    def test_top_k_cosine_neighbors_exact_ties_half_input(self, backend: Backend, rng):
        # rows with four entries of +-2**m: normalised entries are exactly +-0.5, so every cosine is
        # an exact multiple of 1/4 and ties are exact whatever the summation order
        n, d = 40, 16
        c = np.zeros((n, d))
        for row in c:
            cols = rng.choice(d, size=4, replace=False)
            row[cols] = rng.choice([-1.0, 1.0], size=4) * 2.0 ** int(rng.integers(-3, 4))
        c[int(rng.integers(n))] = 0.0
        q = c[: 5 if backend.name == "mlx" else 9].copy()
        ref = ref_cosine(q, c)
        for batch_size in (None, 3):
            for k in (1, 4, n):
                idx, sims = backend.top_k_cosine_neighbors(
                    backend.from_numpy(q.astype(np.float16)),
                    backend.from_numpy(c.astype(np.float16)),
                    k,
                    batch_size=batch_size,
                )
                ev, ei = ref_top_k(ref, k)
                np.testing.assert_array_equal(backend.to_numpy(idx), ei)
                np.testing.assert_array_equal(f64(backend, sims), ev)
        idx1, sims1 = backend.top_k_cosine_neighbors(
            backend.from_numpy(q[0]), backend.from_numpy(c), 5, batch_size=7
        )
        assert backend.get_shape(idx1) == (1, 5) and backend.get_shape(sims1) == (1, 5)
        np.testing.assert_array_equal(backend.to_numpy(idx1)[0], ref_top_k(ref[0], 5)[1])

    def test_top_k_cosine_neighbors_errors(self, backend: Backend):
        q, c = backend.ones((2, 4)), backend.ones((5, 4))
        with pytest.raises(DimensionMismatchError):
            backend.top_k_cosine_neighbors(q, backend.ones((5, 3)), 2)
        with pytest.raises(InvalidArgumentError):
            backend.top_k_cosine_neighbors(q, c, 0)
        with pytest.raises(InvalidArgumentError):
            backend.top_k_cosine_neighbors(q, c, 2, batch_size=0)
        with pytest.raises(InvalidArgumentError):
            backend.top_k_cosine_neighbors(q, backend.ones((0, 4)), 2)
        with pytest.raises(InvalidArgumentError, match="exceeds the corpus size"):
            backend.top_k_cosine_neighbors(q, c, 6)

    # ---------------------------------------------------------------- files
    @pytest.mark.parametrize("suffix", [".npy", ".npz"])
    @pytest.mark.parametrize("dtype", ["float32", "float16", "int64"])
    def test_save_load_round_trip(self, backend: Backend, rng, tmp_path: Path, suffix, dtype):
        x = backend.create_array(rng.standard_normal((7, 5)) * 100, dtype=dtype)
        path = tmp_path / f"x{suffix}"
        backend.save(x, path)
        y = backend.load(path)
        assert backend.get_dtype(y) == dtype
        np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(x))

    def test_save_load_refuses_other_suffixes_and_pickles(self, backend: Backend, tmp_path: Path):
        with pytest.raises(InvalidArgumentError):
            backend.save(backend.ones(3), tmp_path / "x.pt")
        with pytest.raises(InvalidArgumentError):
            backend.load(tmp_path / "x.pkl")
        evil = tmp_path / "evil.npy"
        np.save(evil, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(InvalidArgumentError, match="pickle"):
            backend.load(evil)
        with pytest.raises(FileNotFoundError):
            backend.load(tmp_path / "missing.npy")
        pickle_npz = tmp_path / "evil.npz"
        np.savez(pickle_npz, array=np.array([object()], dtype=object))
        with pytest.raises(InvalidArgumentError):
            backend.load(pickle_npz)

    def test_block_top_k_has_one_signature(self, backend: Backend):
        import inspect

        def params(fn: Any) -> list[tuple[str, Any, Any]]:
            return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

        assert params(type(backend).block_top_k) == params(Backend.block_top_k)
        assert not hasattr(backend, "supports_scale") and not hasattr(backend, "supports_running")

    @pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
    def test_running_top_k_ability(self, backend: Backend, rng, metric):
        """A backend that SupportsRunningTopK merges block after block into the same top-k as
        the float64 reference over the whole corpus (exact ties across the cuts included)."""
        if not isinstance(backend, SupportsRunningTopK):
            assert not hasattr(backend, "block_top_k_running")
            return
        q = rng.integers(-2, 3, size=(4, 8)).astype(np.float32)
        c = rng.integers(-2, 3, size=(700, 8)).astype(np.float32)  # exact scores, many ties
        if metric == "cosine":
            q = ref_normalize(q).astype(np.float32)
            c = ref_normalize(c).astype(np.float32)
        q64, c64 = q.astype(np.float64), c.astype(np.float64)
        ref = ((q64[:, None] - c64[None]) ** 2).sum(-1) if metric == "l2" else q64 @ c64.T
        best = None
        for a, e in [(0, 3), (3, 250), (250, 251), (251, 700)]:
            best = backend.block_top_k_running(
                backend.from_numpy(q), backend.from_numpy(c[a:e]), 9, metric, best, a
            )
        assert best is not None
        assert_top_k(ref, f64(backend, best[0]), backend.to_numpy(best[1]), 9, metric != "l2")
        if metric != "cosine":  # exact float32 scores: the very order of the reference, ties too
            want = ref_top_k(ref, 9, metric != "l2")[1]
            np.testing.assert_array_equal(backend.to_numpy(best[1]), want)

    @pytest.mark.parametrize("metric", ["cosine", "dot"])
    def test_scaled_scores_ability(self, backend: Backend, rng, metric):
        """A backend that SupportsScaledScores scores raw rows times their factors: with inverse
        norms, cosine on an unnormalised block equals the reference cosine."""
        if not isinstance(backend, SupportsScaledScores):
            assert not hasattr(backend, "block_top_k_scaled")
            return
        q = ref_normalize(rng.standard_normal((3, 8))).astype(np.float32)
        c = (rng.standard_normal((300, 8)) * rng.uniform(0.1, 10, (300, 1))).astype(np.float32)
        c64 = c.astype(np.float64)
        scale = (1 / np.linalg.norm(c64, axis=1)).astype(np.float32)
        ref = q.astype(np.float64) @ (c64 * scale[:, None].astype(np.float64)).T
        values, indices = backend.block_top_k_scaled(
            backend.from_numpy(q), backend.from_numpy(c), 7, metric, scale
        )
        assert_top_k(ref, f64(backend, values), backend.to_numpy(indices), 7)
        with pytest.raises(InvalidArgumentError):
            backend.block_top_k_scaled(q, c, 7, "l2", scale)

    def test_async_upload_ability(self, backend: Backend, rng):
        """CUDA torch backends stage batches through pinned memory; no other backend claims to."""
        assert isinstance(backend, SupportsAsyncUpload) == backend.device.startswith("cuda")
        if not isinstance(backend, SupportsAsyncUpload):
            return
        uploader = backend.async_uploader()
        xs = [rng.standard_normal((50, 6)).astype(np.float32) for _ in range(3)]
        handles = [uploader.start(x) for x in xs]
        for x, h in zip(xs, handles, strict=True):
            out = uploader.finish(h)
            assert backend.is_array(out) and str(out.device) == backend.device
            np.testing.assert_array_equal(backend.to_numpy(out), x)


@pytest.fixture
def backend(request) -> Backend:
    name, device = request.param
    return get_backend(name, device)


TestBackends = BackendTests  # collected by pytest under the usual Test* name


# -------------------------------------------------------------------- NumPy kernel internals
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_kernel_tiles_and_threads(monkeypatch, rng, metric, threads):
    """Small tiles force many tiles per block, candidate merges and the two-thread split."""
    from embtools.kernels import numpy_tiles as numpy_kernel

    monkeypatch.setattr(numpy_kernel, "TILE_COLS", 16)
    monkeypatch.setattr(numpy_kernel, "TILE_COLS_PER_K", 1)
    monkeypatch.setattr(numpy_kernel, "TILE_ROWS", 8)
    monkeypatch.setattr(numpy_kernel, "MIN_THREAD_ROWS", 4)
    monkeypatch.setattr(numpy_kernel, "QUERY_THREADS", threads)
    b = get_backend("numpy")
    q = rng.integers(-2, 3, size=(21, 6)).astype(np.float32)  # integer scores: exact ties
    c = rng.integers(-2, 3, size=(203, 6)).astype(np.float32)
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    ref = ((q64[:, None] - c64[None]) ** 2).sum(-1) if metric == "l2" else q64 @ c64.T
    for k in (1, 5, 17, 203, 300):
        values, indices = b.block_top_k(q, c, k, metric)
        ev, ei = ref_top_k(ref, min(k, 203), largest=metric != "l2")
        np.testing.assert_array_equal(indices, ei)
        np.testing.assert_array_equal(values, ev)
    # random data through top_k_cosine_neighbors with blocks that are not multiples of the tiles
    qr, cr = rng.standard_normal((19, 10)), rng.standard_normal((157, 10))
    idx, sims = b.top_k_cosine_neighbors(qr, cr, 7, batch_size=50)
    assert_top_k(ref_cosine(qr, cr), sims.astype(np.float64), idx, 7)


def test_numpy_kernel_heavy_tie_rows(rng):
    """A row where every score ties takes the sparse (lexsort) path; results stay exact."""
    from embtools.kernels import numpy_tiles as numpy_kernel

    s = rng.standard_normal((4, 5000)).astype(np.float32)
    s[1] = 0.25
    values, indices = numpy_kernel.select_top_k(s, 12)
    ev, ei = ref_top_k(s.astype(np.float64), 12)
    np.testing.assert_array_equal(indices, ei)
    np.testing.assert_array_equal(values, ev)


# -------------------------------------------------------------------- conversion
@pytest.mark.parametrize("src", available_backends())
@pytest.mark.parametrize("dst", available_backends())
def test_convert_all_pairs(rng, src, dst):
    a = rng.standard_normal((4, 6)).astype(np.float32)
    x = get_backend(src, "cpu").from_numpy(a)
    y = convert(x, dst)
    b = get_backend(dst, "cpu")
    assert b.is_array(y)
    np.testing.assert_array_equal(b.to_numpy(y), a)
    i = convert(get_backend(src, "cpu").from_numpy(np.arange(5)), dst)
    assert b.get_dtype(i) == "int64"


@pytest.mark.skipif("torch" not in available_backends(), reason="torch not installed")
def test_convert_numpy_torch_share_memory_and_read_only_arrays_work(rng):
    a = rng.standard_normal((8, 3)).astype(np.float32)
    t = convert(a, "torch", "cpu")
    t[0, 0] = 42.0
    assert a[0, 0] == 42.0  # zero-copy: one buffer
    back = convert(t, "numpy")
    back[1, 1] = -7.0
    assert float(t[1, 1]) == -7.0
    ro = np.ascontiguousarray(a)
    ro.flags.writeable = False  # like a memory-mapped store column
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t_ro = convert(ro, "torch", "cpu")
    assert t_ro.data_ptr() == ro.ctypes.data
    np.testing.assert_array_equal(t_ro.numpy(), ro)
    strided = a[::-1, ::2]  # negative strides: torch cannot view them, so a copy is made
    np.testing.assert_array_equal(convert(strided, "torch", "cpu").numpy(), strided)


def test_convert_nested_list_and_bad_input():
    np.testing.assert_array_equal(convert([[1, 2], [3, 4]], "numpy"), [[1, 2], [3, 4]])
    with pytest.raises(InvalidArgumentError):
        convert([{"a": 1}], "numpy")


# -------------------------------------------------------------------- get_backend
def test_get_backend_names_and_errors():
    assert get_backend("NumPy").name == "numpy"
    assert get_backend("numpy") is get_backend("numpy", "cpu")
    with pytest.raises(InvalidArgumentError, match="numpy, torch, mlx"):
        get_backend("jax")
    with pytest.raises(DeviceUnavailableError, match="cpu"):
        get_backend("numpy", "cuda")
    if "torch" in available_backends():
        with pytest.raises(DeviceUnavailableError, match="available devices: cpu"):
            get_backend("torch", "cuda:7")
        with pytest.raises(DeviceUnavailableError):
            get_backend("torch", "tpu")
    if "mlx" in available_backends():
        from embtools.backends.mlx_backend import available_devices

        if "gpu" not in available_devices():
            with pytest.raises(DeviceUnavailableError, match="cpu"):
                get_backend("mlx", "gpu")


def test_get_backend_auto_returns_a_working_backend(rng):
    b = get_backend()
    assert b.name in available_backends()
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        f64(b, b.cosine_similarity(b.from_numpy(x), b.from_numpy(x))), ref_cosine(x, x), atol=1e-5
    )
    assert get_backend(device="cpu").device == "cpu"


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_missing_framework_names_the_extra(monkeypatch, name):
    from embtools.backends import registry

    monkeypatch.setitem(sys.modules, "torch" if name == "torch" else "mlx.core", None)
    monkeypatch.setattr(registry, "_CACHE", {})
    with pytest.raises(BackendUnavailableError, match=rf'pip install "embtools\[{name}\]"'):
        get_backend(name)
    with pytest.raises(ImportError):  # also the standard exception
        get_backend(name)


def test_available_backends_matches_find_spec():
    import importlib.util

    expect = ["numpy"] + [
        n for n, mod in (("torch", "torch"), ("mlx", "mlx")) if importlib.util.find_spec(mod)
    ]
    assert available_backends() == expect
    assert embtools.available_backends() == expect


@pytest.mark.parametrize(
    "facts,expect",
    [
        (Facts("Darwin", "arm64", True, True, False, True), ("mlx", "gpu")),
        (Facts("Darwin", "arm64", False, True, False, True), ("torch", "mps")),
        (Facts("Darwin", "x86_64", True, True, False, False), ("numpy", "cpu")),
        (Facts("Linux", "x86_64", True, True, True, False), ("torch", "cuda:0")),
        (Facts("Linux", "aarch64", True, True, False, False), ("numpy", "cpu")),
        (Facts("Linux", "x86_64", False, False, False, False), ("numpy", "cpu")),
        (Facts("Windows", "AMD64", False, True, True, False), ("torch", "cuda:0")),
        (Facts("Darwin", "arm64", False, False, False, False), ("numpy", "cpu")),
    ],
)
def test_choose_backend_decision(facts, expect):
    assert choose_backend(facts) == expect


def test_import_embtools_and_numpy_backend_import_no_frameworks():
    code = (
        "import sys, embtools; b = embtools.get_backend('numpy'); "
        "b.top_k_cosine_neighbors([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], 1); "
        "bad = [m for m in ('torch', 'mlx', 'mlx.core', 'polars', 'ray') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_numpy_store_search_never_imports_torch():
    """A NumPy-backend store's float32 search (few queries: no screen) runs on the NumPy kernels
    only; torch and mlx stay unimported (the kernels that need them are imported where used)."""
    code = (
        "import sys, numpy as np, embtools as et\n"
        "x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)\n"
        "st = et.EmbeddingStore(None, backend='numpy', max_memory_gb=0.01)\n"
        "st.add(x)\n"
        "x64, n = x.astype(np.float64), np.linalg.norm(x.astype(np.float64), axis=1)\n"
        "ref = {'cosine': (x64[:5] @ x64.T) / n[:5, None] / n[None], 'dot': x64[:5] @ x64.T,\n"
        "       'l2': -((x64[:5, None] - x64[None]) ** 2).sum(-1)}\n"
        "for metric, s in ref.items():\n"
        "    res = st.search(x[:5], k=3, metric=metric)\n"
        "    got = res.sort('query', 'rank')['row_id'].to_numpy().reshape(5, 3)\n"
        "    assert (got == np.argsort(-s, axis=1, kind='stable')[:, :3]).all(), metric\n"
        "bad = [m for m in ('torch', 'mlx', 'mlx.core', 'embtools.kernels.torch_screen') "
        "if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_in_backends():
    root = Path(embtools.__file__).parent
    for path in [*(root / "backends").glob("*.py"), *(root / "kernels").glob("*.py")]:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path


@pytest.mark.parametrize("scale_of_odd_rows", [0.0, 1e-30, 1e30, 3.0])
def test_numpy_top_k_cosine_neighbors_raw_blocks(rng, scale_of_odd_rows):
    """The fused path (raw float32 blocks scaled by inverse norms, running merges across blocks)
    matches the float64 reference, including zero rows (cosine 0) and norms whose squares leave
    float32's range (those blocks are normalised instead), with duplicate rows as exact ties."""
    b = get_backend("numpy")
    c = rng.standard_normal((1000, 12)).astype(np.float32)
    c[::97] = (c[::97] * np.float32(scale_of_odd_rows)).astype(np.float32)
    c[500:510] = c[3]  # exact ties across blocks
    q = np.concatenate([rng.standard_normal((6, 12)), c[[3, 500]].astype(np.float64)]).astype(np.float32)
    idx, sims = b.top_k_cosine_neighbors(q, c, 15, batch_size=128)
    ref = ref_cosine(q.astype(np.float64), c.astype(np.float64))
    assert not np.isnan(sims).any()
    assert_top_k(ref, sims.astype(np.float64), idx, 15)
    assert idx[6].tolist()[:11] == [3, *range(500, 510)]   # the tied copies in index order


# -------------------------------------------------------------------- one framework detection
def test_framework_of_names_each_library_without_importing_it():
    import polars as pl
    import torch

    from embtools.backends.frameworks import framework_of, is_foreign_array, to_numpy

    assert framework_of(np.zeros(2)) == "numpy"
    assert framework_of(torch.zeros(2)) == "torch"
    assert framework_of(pl.Series([1.0])) == "polars"
    assert framework_of(pl.DataFrame({"a": [1]})) == "polars"
    for other in ([1.0], (1.0,), "x", 3.0, np.float32(1.0), None):
        assert framework_of(other) is None
    assert is_foreign_array(torch.zeros(2)) and not is_foreign_array(np.zeros(2))
    assert not is_foreign_array([1.0])
    t = torch.arange(4, dtype=torch.bfloat16)
    assert to_numpy(t).dtype == np.float32 and to_numpy(t).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(InvalidArgumentError):
        to_numpy([[1.0], [1.0, 2.0]])
    if "mlx" in available_backends():
        import mlx.core as mx

        assert framework_of(mx.zeros(2)) == "mlx" and is_foreign_array(mx.zeros(2))
        assert to_numpy(mx.array([1.5], dtype=mx.bfloat16)).tolist() == [1.5]


def test_framework_detection_is_written_once():
    """Only backends/frameworks.py tells libraries apart by a type's module name."""
    root = Path(embtools.__file__).parent
    found = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if ".__module__.split(" in p.read_text() and p.name != "frameworks.py"
    ]
    assert not found, found


# -------------------------------------------------------------------- embed uses the backend
@pytest.mark.parametrize("scale", [1e-30, 1e-22, 1.0, 1e30])
def test_embed_normalisation_is_the_backends(rng, scale):
    """Model outputs are normalised by the NumPy backend: rows whose squares underflow (1e-30 in
    float32) or overflow come out unit-length like the float64 reference, zero rows stay zero."""
    from embtools.embed import _normalize

    x = (rng.standard_normal((5, 16)) * scale).astype(np.float32)
    x[1] = 0.0
    out = _normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_normalize(x.astype(np.float64)), atol=1e-6)
    assert np.abs(np.linalg.norm(out[[0, 2, 3, 4]].astype(np.float64), axis=1) - 1).max() < 1e-6
    assert not out[1].any()
    unit = rng.standard_normal((3, 8))
    wide = unit * 1e-300  # float64 model outputs far below float32's range
    np.testing.assert_allclose(_normalize(wide), ref_normalize(unit), atol=1e-6)
