"""embtools as a drop-in for the seed package ``embedding_tools`` (issue 11).

The seed's five examples and an installation check like the seed's, on every installed backend,
written from the seed's description with ``embedding_tools`` renamed to ``embtools``; then one test
per numbered point of issue 11. Results are compared with NumPy float64 references.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import embtools
from embtools import EmbeddingStore, compute_config_hash, get_backend
from embtools.backends import convert
from embtools.errors import (
    CorruptStoreError,
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    LengthMismatchError,
    MemoryLimitError,
    ReadOnlyStoreError,
    StoreNotFoundError,
)
from tests.helpers import available, brute_force, check_top_k

BACKENDS = available()


def _tiny(name: str, n: int, d: int) -> tuple[int, int]:
    """MLX's CPU matmul is slow here: keep its data tiny."""
    return (min(n, 40), min(d, 16)) if name == "mlx" else (n, d)


def _np(backend: object, x: object) -> np.ndarray:
    return np.asarray(convert(x, "numpy"), dtype=np.float64)


def _check(q: np.ndarray, c: np.ndarray, sims: object, idx: object, k: int) -> None:
    """``(sims, idx)`` is the exact cosine top-k of ``q`` (1-D or 2-D) in ``c`` (float64 reference;
    positions may differ only among scores within 1e-4 of each other)."""
    s64 = brute_force(c, np.atleast_2d(q), "cosine")
    found = np.atleast_2d(np.asarray(convert(idx, "numpy")))
    scores = np.atleast_2d(np.asarray(convert(sims, "numpy"), dtype=np.float64))
    check_top_k(s64, scores, found, k, "cosine")


def _seed_dir(path: Path, arrays: dict[int, np.ndarray], text_ids: list[str] | None = None,
              labels: list[object] | None = None) -> Path:
    """A directory as the seed's save_to_disk wrote it (one .npy per dimension, metadata.json,
    text_ids.txt and labels.txt, one value per line)."""
    path.mkdir(parents=True, exist_ok=True)
    for d, a in arrays.items():
        np.save(path / f"embeddings_{d}d.npy", a)
    meta = {"dimensions": sorted(arrays), "backend": "numpy", "max_memory_gb": 1.0,
            "num_embeddings": {str(d): len(a) for d, a in arrays.items()}}
    (path / "metadata.json").write_text(json.dumps(meta))
    if text_ids is not None:
        (path / "text_ids.txt").write_text("\n".join(text_ids))
    if labels is not None:
        (path / "labels.txt").write_text("\n".join(str(v) for v in labels))
    return path


# ------------------------------------------------------------------ the seed's installation check
@pytest.mark.parametrize("name", BACKENDS)
def test_installation_check(name, rng):
    """Like the seed's validate.py: imports, version, the backend, the store, config versioning."""
    assert embtools.__version__ == "0.1.0"
    from embtools import MLX_AVAILABLE, TORCH_AVAILABLE, EmbeddingStore, get_backend  # noqa: F401

    backend = get_backend(name)
    assert isinstance(backend, embtools.Backend) and backend.name == name
    assert isinstance(get_backend(), embtools.Backend)  # auto-detection gives a working backend
    n, d = _tiny(name, 30, 8)
    x = rng.standard_normal((n, d)).astype(np.float32)
    arr = backend.create_array(x)
    assert backend.get_shape(arr) == (n, d) and backend.get_dtype(arr) == "float32"
    norms = np.linalg.norm(_np(backend, backend.normalize(arr)), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    store = EmbeddingStore(backend=name, max_memory_gb=0.1)
    store.add_embeddings(x, dimension=d, text_ids=[f"t{i}" for i in range(n)])
    assert store.get_available_dimensions() == [d]
    np.testing.assert_array_equal(_np(backend, store.get_embeddings(d)), x)
    h = compute_config_hash({"model": "m", "dims": [d]})
    assert re.fullmatch(r"[0-9a-f]{16}", h) and h == compute_config_hash({"dims": [d], "model": "m"})


# ------------------------------------------------------------------ the seed's five examples
@pytest.mark.parametrize("name", BACKENDS)
def test_example_1_array_backend_operations(name, rng):
    b = get_backend(name)
    n, d = _tiny(name, 50, 12)
    c = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((3, d)).astype(np.float32)
    ca, qa = b.create_array(c), b.create_array(q)
    np.testing.assert_allclose(_np(b, b.dot(qa[0], ca[0])), q[0].astype(np.float64) @ c[0], rtol=1e-4)
    ref = brute_force(c, q, "cosine")
    np.testing.assert_allclose(_np(b, b.cosine_similarity(qa, ca)), ref, atol=1e-5)
    idx, sims = b.top_k_cosine_neighbors(qa, ca, k=5)
    _check(q, c, sims, idx, 5)
    sliced = b.slice_last_dim(ca, d // 2)
    np.testing.assert_array_equal(_np(b, sliced), c[:, : d // 2])
    both = b.concatenate([ca, ca])
    assert b.get_shape(both) == (2 * n, d) and b.get_memory_usage(ca) == c.nbytes


@pytest.mark.parametrize("name", BACKENDS)
def test_example_2_store_with_two_dimensions_and_memory_info(name, rng, tmp_path):
    n, d = _tiny(name, 200, 64)
    big = rng.standard_normal((n, d)).astype(np.float32)
    small = rng.standard_normal((n, d // 2)).astype(np.float32)
    ids = [f"doc{i}" for i in range(n)]
    store = EmbeddingStore(backend=name, max_memory_gb=1.0)
    store.add_embeddings(big, dimension=d, text_ids=ids, labels=[i % 3 for i in range(n)])
    store.add_embeddings(small, dimension=d // 2, text_ids=ids)  # the same texts, another model
    assert store.get_available_dimensions() == [d // 2, d]
    info = store.get_memory_info()
    assert info["total_bytes"] == big.nbytes + small.nbytes
    assert info["dimensions"][d]["shape"] == (n, d) and info["dimensions"][d // 2]["memory_bytes"] == small.nbytes
    sims, idx = store.compute_similarity(big[7], dimension=d, top_k=3)
    assert idx.shape == (3,) and idx[0] == 7
    _check(big[7], big, sims, idx, 3)
    store.save_to_disk(tmp_path / "saved")
    loaded = EmbeddingStore(backend=name)
    loaded.load_from_disk(tmp_path / "saved")  # the seed's instance form
    assert loaded.get_text_ids() == ids and loaded.get_labels() == [i % 3 for i in range(n)]
    for dim, x in ((d, big), (d // 2, small)):
        np.testing.assert_array_equal(_np(loaded.backend, loaded.get_embeddings(dim)), x)


@pytest.mark.parametrize("name", BACKENDS)
def test_example_3_matryoshka_slicing(name, rng):
    n, d = _tiny(name, 100, 64)
    full = rng.standard_normal((n, d)).astype(np.float32)
    store = EmbeddingStore(backend=name)
    store.add_embeddings(full, dimension=d)
    for target in (d // 4, d // 2):
        sliced = store.slice_to_dimension(d, target)
        np.testing.assert_array_equal(_np(store.backend, sliced), full[:, :target])
        sims, idx = store.compute_similarity(full[3, :target], dimension=target, top_k=4)
        _check(full[3, :target], full[:, :target], sims, idx, 4)
    assert store.get_available_dimensions() == [d // 4, d // 2, d]


@pytest.mark.parametrize("name", BACKENDS)
def test_example_4_configuration_versioning(name):
    config = {"model": "all-MiniLM-L6-v2", "dims": [64, 384], "backend": name,
              "nested": {"a": 1, "b": [1, 2]}}
    h = compute_config_hash(config)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert compute_config_hash(dict(reversed(list(config.items())))) == h
    assert compute_config_hash({**config, "dims": [64, 385]}) != h
    assert embtools.compute_param_hash(**config) == h


@pytest.mark.parametrize("name", BACKENDS)
def test_example_5_cross_backend_conversion(name, rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    arr = get_backend(name).create_array(x)
    for other in BACKENDS:
        moved = convert(arr, other)
        assert get_backend(other).is_array(moved)
        np.testing.assert_array_equal(np.asarray(convert(moved, "numpy")), x)


# ------------------------------------------------------------------ issue 11, point by point
def test_seed_positional_store_arguments():
    with pytest.warns(UserWarning, match="in-memory"):  # the seed's EmbeddingStore(backend, max_memory_gb)
        store = EmbeddingStore("numpy", 0.25)
    assert store.path is None and store.backend.name == "numpy" and store.max_memory_gb == 0.25
    with pytest.warns(UserWarning, match="in-memory"):
        store = EmbeddingStore("numpy", 0.5, "cpu")
    assert store.backend.device == "cpu" and store.budget.cap_bytes == int(0.5 * 1024**3)


def test_point_1_backend_classes_and_flags_exported():
    from embtools import MLX_AVAILABLE, TORCH_AVAILABLE, MLXBackend, NumpyBackend, TorchBackend

    assert TORCH_AVAILABLE is (importlib.util.find_spec("torch") is not None)
    assert MLX_AVAILABLE is (importlib.util.find_spec("mlx") is not None)
    for cls in (NumpyBackend, TorchBackend, MLXBackend):
        assert issubclass(cls, embtools.Backend) and issubclass(cls, embtools.AbstractBackend)
    b = NumpyBackend()
    np.testing.assert_allclose(b.to_numpy(b.normalize(b.create_array([[3.0, 4.0]]))), [[0.6, 0.8]])
    if TORCH_AVAILABLE:
        assert TorchBackend(device="cpu").device == "cpu"
    # importing embtools and reading the flags stays light
    code = ("import sys, embtools; embtools.TORCH_AVAILABLE; embtools.MLX_AVAILABLE; "
            "print([m for m in ('torch', 'mlx.core', 'polars') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "[]"


def test_point_2_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"^Unknown backend 'invalid'") as err:
        get_backend("invalid")
    assert all(n in str(err.value) for n in ("numpy", "torch", "mlx"))
    with pytest.raises(ValueError, match=r"^Unknown backend"):
        EmbeddingStore(backend="invalid")


@pytest.mark.parametrize("name", BACKENDS)
def test_point_3_one_dim_query_gives_one_row(name, rng):
    b = get_backend(name)
    n, d = _tiny(name, 60, 10)
    c = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)
    idx, sims = b.top_k_cosine_neighbors(b.create_array(q), b.create_array(c), 4)
    assert b.get_shape(idx) == (1, 4) and b.get_shape(sims) == (1, 4)
    _check(q, c, sims, idx, 4)


@pytest.mark.parametrize("name", BACKENDS)
def test_point_4_k_past_the_corpus_raises(name, rng):
    b = get_backend(name)
    c = b.create_array(rng.standard_normal((7, 4)))
    with pytest.raises(ValueError, match="k=8 exceeds the corpus size"):
        b.top_k_cosine_neighbors(c[:2], c, 8)
    idx, _ = b.top_k_cosine_neighbors(c[:2], c, 7)  # all rows is fine
    assert sorted(np.asarray(convert(idx, "numpy"))[0].tolist()) == list(range(7))


def test_point_5_second_dimension_for_the_same_texts(store_kind, new_store, rng):
    n = 1000
    e64 = rng.standard_normal((n, 64)).astype(np.float32)
    e32 = rng.standard_normal((n, 32)).astype(np.float32)
    ids = [f"text-{i}" for i in range(n)]
    store = new_store(store_kind, target_file_bytes=60_000)  # several data files on disk
    v1 = store.add_embeddings(e64, dimension=64, text_ids=ids)
    v2 = store.add_embeddings(e32, dimension=32, text_ids=ids)
    assert v2 == v1 + 1 and store.get_available_dimensions() == [32, 64]
    assert store.get_text_ids() == ids and store.num_rows == n
    np.testing.assert_array_equal(store.get_embeddings(32), e32)
    np.testing.assert_array_equal(store.get_embeddings(64), e64)
    got = store.search(e32[:3], k=5, dimension=32)
    found = np.array([int(t.split("-")[1]) for t in got["text_id"]]).reshape(3, 5)
    _check(e32[:3], e32, got["score"].to_numpy().reshape(3, 5), found, 5)
    # rows added afterwards give both dimensions, as any add does
    store.add({64: e64[:2] * 2, 32: e32[:2] * 2}, text_ids=["new-0", "new-1"])
    np.testing.assert_array_equal(store.get_embeddings(32)[n:], e32[:2] * 2)
    if store_kind == "memory":
        return
    assert len(store.files()) > 1
    report = store.verify()  # the rewritten files carry their checksums like any other
    assert report.ok and report.files_checked == len(store.files())
    again = EmbeddingStore(store.path, backend="numpy")
    np.testing.assert_array_equal(again.get_embeddings(32)[:n], e32)
    assert EmbeddingStore(store.path, version=v1, backend="numpy").dimensions == [64]
    # the data files stay plain Parquet: polars and DuckDB read the new column
    frame = pl.read_parquet(store.files(), columns=["row_id", "text_id", "emb_32"])
    frame = frame.sort("row_id")
    np.testing.assert_array_equal(np.stack(frame["emb_32"].to_numpy())[:n], e32)
    duckdb = pytest.importorskip("duckdb")
    files = ", ".join(f"'{f}'" for f in store.files())
    rows = duckdb.sql(f"SELECT text_id, emb_32 FROM read_parquet([{files}]) "
                      "WHERE text_id = 'text-17'").fetchall()
    np.testing.assert_array_equal(np.array(rows[0][1], dtype=np.float32), e32[17])
    assert store.compact(10**9) > store.version - 1
    np.testing.assert_array_equal(store.get_embeddings(32)[:n], e32)


def test_point_5_add_dimension_explicit_and_ambiguous_calls_change_nothing(store_kind, new_store,
                                                                             rng):
    x = rng.standard_normal((20, 8)).astype(np.float32)
    ids = [f"t{i}" for i in range(20)]
    empty = new_store(store_kind)
    with pytest.raises(InvalidArgumentError, match="no rows"):
        empty.add_dimension(4, x[:, :4])
    store = new_store(store_kind, target_file_bytes=300)
    store.add_embeddings(x, dimension=8, text_ids=ids, labels=[i % 2 for i in range(20)])
    before = (store.version, store.dimensions, store.files())
    data_dir = None if store.path is None else Path(store.path) / "data"
    n_files = None if data_dir is None else len(os.listdir(data_dir))
    y = rng.standard_normal((20, 4)).astype(np.float32)
    y_nan = y.copy()
    y_nan[3, 1] = np.nan
    bad = [
        (DimensionMismatchError, lambda: store.add_embeddings(y[:19], dimension=4, text_ids=ids[:19])),
        (LengthMismatchError, lambda: store.add_dimension(4, np.vstack([y, y[:1]]))),
        (InvalidArgumentError, lambda: store.add_embeddings(y, dimension=4, text_ids=ids[::-1])),
        (InvalidArgumentError, lambda: store.add_embeddings(y, dimension=4,
                                                            text_ids=[f"u{i}" for i in range(20)])),
        (InvalidArgumentError, lambda: store.add_embeddings(y, dimension=4, text_ids=ids,
                                                            labels=[7] * 20)),
        (DimensionMismatchError, lambda: store.add_dimension(8, x)),
        (DimensionMismatchError, lambda: store.add_dimension(5, y)),
        (InvalidEmbeddingsError, lambda: store.add_dimension(4, y_nan)),
        (InvalidArgumentError, lambda: store.add_dimension(0, y)),
    ]
    for error, call in bad:
        with pytest.raises(error):
            call()
        assert (store.version, store.dimensions, store.files()) == before
        if data_dir is not None:
            assert len(os.listdir(data_dir)) == n_files
    v = store.add_dimension(4, y, text_ids=ids)
    assert v == before[0] + 1 and store.dimensions == [4, 8]
    np.testing.assert_array_equal(store.get_embeddings(4), y)
    np.testing.assert_array_equal(store.get_embeddings(8), x)
    assert store.get_labels() == [i % 2 for i in range(20)]
    if store.path is not None:
        snapshot = EmbeddingStore(store.path, version=v, backend="numpy")
        with pytest.raises(ReadOnlyStoreError):
            snapshot.add_dimension(2, y[:, :2])


def test_point_6_slice_is_the_raw_prefix_and_is_kept(store_kind, new_store, rng):
    x = rng.standard_normal((30, 48)).astype(np.float32) * 3
    store = new_store(store_kind, target_file_bytes=2_000)
    v = store.add_embeddings(x, dimension=48)
    sliced = store.slice_to_dimension(48, 24)
    np.testing.assert_array_equal(sliced, x[:, :24])  # not re-normalised, as the seed's
    assert store.get_available_dimensions() == [24, 48] and store.version == v + 1
    np.testing.assert_array_equal(store.get_embeddings(24), x[:, :24])
    unit = store.slice_to_dimension(48, 12, normalize=True)
    ref = x[:, :12].astype(np.float64)
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    assert store.get_available_dimensions() == [12, 24, 48]
    np.testing.assert_array_equal(store.get_embeddings(12), x[:, :12])  # the raw prefix is kept
    if store.path is not None:
        assert EmbeddingStore(store.path, backend="numpy").dimensions == [12, 24, 48]
        old = EmbeddingStore(store.path, version=v, backend="numpy")
        np.testing.assert_array_equal(old.slice_to_dimension(48, 6), x[:, :6])
        assert old.dimensions == [48]  # a read-only snapshot only returns the slice


def test_point_7_memory_info_and_the_seed_accessors(rng, tmp_path):
    a = rng.standard_normal((40, 16)).astype(np.float32)
    b = rng.standard_normal((40, 8)).astype(np.float32)
    store = EmbeddingStore(backend="numpy", max_memory_gb=0.5)
    store.add_embeddings(a, dimension=16, text_ids=[f"x{i}" for i in range(40)],
                         labels=[f"l{i % 4}" for i in range(40)])
    store.add_embeddings(b, dimension=8)
    info = store.get_memory_info()
    total = a.nbytes + b.nbytes
    assert info["total_bytes"] == total and info["total_gb"] == pytest.approx(total / 1024**3)
    assert info["max_gb"] == 0.5 and info["utilization"] == pytest.approx(total / (0.5 * 1024**3))
    for d, arr in ((16, a), (8, b)):
        entry = info["dimensions"][d]
        assert entry["memory_bytes"] == arr.nbytes and entry["shape"] == arr.shape
        assert entry["memory_mb"] == pytest.approx(arr.nbytes / 1024**2) and entry["dtype"] == "float32"
    assert info["held_bytes"] == total and info["cap_bytes"] == int(0.5 * 1024**3)  # our keys stay
    usage = store.get_total_memory_usage()
    assert isinstance(usage, int) and usage == total
    assert store.get_text_ids() == [f"x{i}" for i in range(40)]
    assert store.get_labels() == [f"l{i % 4}" for i in range(40)]
    text = repr(store)
    assert "'numpy'" in text and "[8, 16]" in text and "GB" in text
    # the instance form of load_from_disk replaces the rows; the classmethod form still opens
    store.save_to_disk(tmp_path / "s")
    other = EmbeddingStore(backend="numpy")
    other.add_embeddings(b[:3], dimension=8)
    assert other.load_from_disk(tmp_path / "s") is other
    np.testing.assert_array_equal(other.get_embeddings(16), a)
    assert other.get_text_ids() == store.get_text_ids()
    assert EmbeddingStore.load_from_disk(tmp_path / "s", backend="numpy").dimensions == [8, 16]
    tiny = EmbeddingStore(backend="numpy", max_memory_gb=1e-6)
    with pytest.raises(MemoryLimitError):
        tiny.load_from_disk(tmp_path / "s")
    assert tiny.num_rows == 0
    store.clear()
    assert store.num_rows == 0 and store.get_available_dimensions() == []
    assert store.get_total_memory_usage() == 0 and store.get_text_ids() == []
    store.add_embeddings(b, dimension=8)  # a cleared store takes new rows of any dimension
    disk = EmbeddingStore(tmp_path / "s", backend="numpy")
    v = disk.version
    assert disk.clear() == v + 1 and disk.dimensions == [] and disk.num_rows == 0
    assert EmbeddingStore(tmp_path / "s", version=v, backend="numpy").num_rows == 40


def test_point_8_seed_directory_opens_and_imports(tmp_path, rng):
    from click.testing import CliRunner

    from embtools.cli.app import cli

    e64 = rng.standard_normal((25, 64)).astype(np.float32)
    e32 = rng.standard_normal((25, 32)).astype(np.float64)
    ids = [f"doc {i}" for i in range(25)]
    seed = _seed_dir(tmp_path / "seed", {64: e64, 32: e32}, ids, [i % 5 for i in range(25)])
    store = EmbeddingStore.load_from_disk(seed, backend="numpy")
    assert store.path is None and store.get_available_dimensions() == [32, 64]
    np.testing.assert_array_equal(store.get_embeddings(64), e64)
    np.testing.assert_array_equal(store.get_embeddings(32), e32.astype(np.float32))
    assert store.get_text_ids() == ids and store.get_labels() == [i % 5 for i in range(25)]
    result = CliRunner().invoke(cli, ["import-seed", str(seed), str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "Imported 25 rows" in result.output
    imported = EmbeddingStore(tmp_path / "store", backend="numpy")
    assert imported.dimensions == [32, 64] and imported.get_text_ids() == ids
    np.testing.assert_array_equal(imported.get_embeddings(64), e64)
    frame = pl.read_parquet(imported.files()).sort("row_id")
    np.testing.assert_array_equal(np.stack(frame["emb_32"].to_numpy()), e32.astype(np.float32))
    again = CliRunner().invoke(cli, ["import-seed", str(seed), str(tmp_path / "store")])
    assert again.exit_code == 1 and "already holds 25 rows" in again.output
    # the seed's instance form on a store directory: a new version holding the seed's rows
    disk = EmbeddingStore(tmp_path / "disk", backend="numpy")
    disk.add_embeddings(e64[:2, :8], dimension=8)
    v = disk.version
    disk.load_from_disk(seed)
    assert disk.version > v and disk.dimensions == [32, 64] and disk.get_text_ids() == ids
    np.testing.assert_array_equal(disk.get_embeddings(64), e64)
    # a seed directory without text ids or labels
    bare = _seed_dir(tmp_path / "bare", {8: e64[:, :8]})
    assert EmbeddingStore.load_from_disk(bare, backend="numpy").num_rows == 25
    with pytest.raises(StoreNotFoundError):
        EmbeddingStore.load_from_disk(tmp_path / "nothing-here")


def _truncated(p: Path) -> None:
    data = (p / "embeddings_8d.npy").read_bytes()
    (p / "embeddings_8d.npy").write_bytes(data[: len(data) - 40])


def _pickled(p: Path) -> None:
    np.save(p / "embeddings_8d.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)


def _lying_header(p: Path) -> None:
    data = (p / "embeddings_8d.npy").read_bytes().replace(b"(5, 8)", b"(9999999999, 8)")
    (p / "embeddings_8d.npy").write_bytes(data)


DAMAGE = {
    "truncated array": _truncated,
    "pickled object array": _pickled,
    "header claims more rows": _lying_header,
    "wrong width": lambda p: np.save(p / "embeddings_8d.npy", np.ones((5, 7), np.float32)),
    "three dimensions": lambda p: np.save(p / "embeddings_8d.npy", np.ones((5, 1, 8), np.float32)),
    "integer array": lambda p: np.save(p / "embeddings_8d.npy", np.ones((5, 8), np.int32)),
    "nan": lambda p: np.save(p / "embeddings_8d.npy", np.full((5, 8), np.nan, np.float32)),
    "not an npy": lambda p: (p / "embeddings_8d.npy").write_bytes(b"garbage" * 10),
    "too few text ids": lambda p: (p / "text_ids.txt").write_text("a\nb"),
    "text ids not utf-8": lambda p: (p / "text_ids.txt").write_bytes(b"\xff\xfe\n" * 5),
    "metadata not json": lambda p: (p / "metadata.json").write_text("{not json"),
    "metadata lists other dims": lambda p: (p / "metadata.json").write_text('{"dimensions": [8, 16]}'),
    "row counts differ": lambda p: np.save(p / "embeddings_4d.npy", np.ones((6, 4), np.float32)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_point_8_damaged_seed_files_are_corrupt_store_errors(tmp_path, damage):
    seed = _seed_dir(tmp_path / "seed", {8: np.ones((5, 8), np.float32)}, list("abcde"), [1] * 5)
    DAMAGE[damage](seed)
    with pytest.raises(CorruptStoreError):
        EmbeddingStore.load_from_disk(seed, backend="numpy")
    from click.testing import CliRunner

    from embtools.cli.app import cli

    result = CliRunner().invoke(cli, ["import-seed", str(seed), str(tmp_path / "store")])
    assert result.exit_code == 1 and "Error:" in result.output
    assert not (tmp_path / "store").exists()  # nothing written


def test_readme_has_the_migration_section():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Coming from embedding_tools", 1)[1].split("\n## ", 1)[0]
    for needle in ("from embtools import", "import-seed", "differs on purpose", "add_dimension"):
        assert needle in section
