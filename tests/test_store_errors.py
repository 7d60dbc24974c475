"""Every bad input gets its typed error, and the store's version, files and content are unchanged."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import embtools as et
from embtools.errors import (
    DimensionMismatchError,
    DuplicateTextIdError,
    EmbtoolsError,
    FilterError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    LengthMismatchError,
    MemoryLimitError,
    ReadOnlyStoreError,
    SchemaMismatchError,
)

N = 10


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    path = tmp_path / "s" if request.param == "disk" else None
    s = et.EmbeddingStore(path, backend="numpy")
    s.add({8: _x(N, 8), 4: _x(N, 4, 1)}, text_ids=[f"t{i}" for i in range(N)],
          labels=[f"l{i % 3}" for i in range(N)], metadata={"year": list(range(N))})
    return s


def _state(store: et.EmbeddingStore) -> dict:
    out = {
        "version": store.version, "versions": store.versions(),
        "meta": store.metadata().collect(),
        "emb": {d: np.array(store.get_embeddings(d)) for d in store.dimensions},
        "properties": store.properties,
    }
    if store.path is not None:
        out["data"] = sorted(os.listdir(os.path.join(store.path, "data")))
        out["manifests"] = sorted(os.listdir(os.path.join(store.path, "_versions")))
        again = et.EmbeddingStore(store.path)
        out["reopened"] = (again.version, again.metadata().collect())
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":
            assert a[key].equals(b[key])
        elif key == "emb":
            assert a[key].keys() == b[key].keys()
            for d in a[key]:
                assert np.array_equal(a[key][d], b[key][d])
        elif key == "reopened":
            assert a[key][0] == b[key][0] and a[key][1].equals(b[key][1])
        else:
            assert a[key] == b[key], key


def _ids(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _both(d8: np.ndarray, **kw):
    return {8: d8, 4: np.ascontiguousarray(d8[:, :4])}


x_nan = _x(5, 8)
x_nan[3, 2] = np.nan
x_inf = _x(5, 8)
x_inf[4, 0] = -np.inf
x_big = _x(5, 8).astype(np.float64)
x_big[2, 1] = 1e39
ragged_fsl = pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))
null_row = pa.array([[1.0] * 8, None], pa.list_(pa.float32(), 8))
null_value = pa.array([[1.0] * 7 + [None], [1.0] * 8], pa.list_(pa.float32(), 8))

BAD_ADDS = [
    # (id, kwargs for add, error, message fragment)
    ("new-dim", dict(embeddings=_x(3, 5)), DimensionMismatchError, "[4, 8]"),
    ("missing-dim", dict(embeddings={8: _x(3, 8)}), DimensionMismatchError, "[4, 8]"),
    ("key-vs-columns", dict(embeddings={8: _x(3, 4), 4: _x(3, 4)}), DimensionMismatchError, "embeddings[8]"),
    ("bad-key", dict(embeddings={"8": _x(3, 8)}), InvalidArgumentError, "'8'"),
    ("rows-differ", dict(embeddings={8: _x(3, 8), 4: _x(2, 4)}), LengthMismatchError, "row counts"),
    ("nan", dict(embeddings=_both(x_nan)), InvalidEmbeddingsError, "row 3"),
    ("inf", dict(embeddings=_both(x_inf)), InvalidEmbeddingsError, "row 4"),
    ("float64-overflow", dict(embeddings=_both(x_big)), InvalidEmbeddingsError, "row 2"),
    ("int", dict(embeddings={8: np.ones((2, 8), np.int64), 4: np.ones((2, 4), np.float32)}),
     InvalidEmbeddingsError, "int64"),
    ("bool", dict(embeddings={8: np.ones((2, 8), bool), 4: _x(2, 4)}), InvalidEmbeddingsError, "bool"),
    ("complex", dict(embeddings={8: np.ones((2, 8), np.complex64), 4: _x(2, 4)}),
     InvalidEmbeddingsError, "complex"),
    ("object", dict(embeddings={8: np.array([[1.0] * 8, [2.0] * 8], dtype=object), 4: _x(2, 4)}),
     InvalidEmbeddingsError, "object"),
    ("strings", dict(embeddings={8: np.full((2, 8), "a"), 4: _x(2, 4)}), InvalidEmbeddingsError, "<U1"),
    ("int-lists", dict(embeddings={8: [[1] * 8, [2] * 8], 4: _x(2, 4)}), InvalidEmbeddingsError, "integer"),
    ("ragged-list", dict(embeddings={8: [[1.0] * 8, [1.0] * 7], 4: _x(2, 4)}), InvalidEmbeddingsError, "row 1"),
    ("ragged-arrow", dict(embeddings=ragged_fsl), InvalidEmbeddingsError, "row 1"),
    ("null-row", dict(embeddings={8: null_row, 4: _x(2, 4)}), InvalidEmbeddingsError, "row 1"),
    ("null-value", dict(embeddings={8: null_value, 4: _x(2, 4)}), InvalidEmbeddingsError, "row 0"),
    ("empty", dict(embeddings={8: np.zeros((0, 8), np.float32), 4: np.zeros((0, 4), np.float32)}),
     InvalidEmbeddingsError, "empty"),
    ("empty-list", dict(embeddings=[]), InvalidEmbeddingsError, "empty"),
    ("empty-mapping", dict(embeddings={}), InvalidEmbeddingsError, "empty"),
    ("one-d", dict(embeddings={8: np.ones(8, np.float32), 4: _x(1, 4)}), InvalidEmbeddingsError, "2-D"),
    ("not-array", dict(embeddings="abc"), InvalidEmbeddingsError, "str"),
    ("ids-length", dict(embeddings=_both(_x(3, 8)), text_ids=_ids(2)), LengthMismatchError, "2 text_ids"),
    ("labels-length", dict(embeddings=_both(_x(3, 8)), labels=["a"] * 4), LengthMismatchError, "4 labels"),
    ("meta-length", dict(embeddings=_both(_x(3, 8)), metadata={"year": [1, 2]}), LengthMismatchError, "'year'"),
    ("dup-in-batch", dict(embeddings=_both(_x(3, 8)), text_ids=["a", "b", "a"]), DuplicateTextIdError, "'a'"),
    ("dup-in-store", dict(embeddings=_both(_x(3, 8)), text_ids=["n0", "t7", "n2"]), DuplicateTextIdError, "'t7'"),
    ("null-id", dict(embeddings=_both(_x(2, 8)), text_ids=["a", None]), InvalidArgumentError, "row 1"),
    ("int-ids", dict(embeddings=_both(_x(2, 8)), text_ids=[1, 2]), InvalidArgumentError, "strings"),
    ("reserved-row_id", dict(embeddings=_both(_x(2, 8)), metadata={"row_id": [1, 2]}), SchemaMismatchError, "row_id"),
    ("reserved-text_id", dict(embeddings=_both(_x(2, 8)), metadata={"text_id": ["a", "b"]}), SchemaMismatchError, "text_id"),
    ("reserved-label", dict(embeddings=_both(_x(2, 8)), metadata={"label": ["a", "b"]}), SchemaMismatchError, "label"),
    ("reserved-emb", dict(embeddings=_both(_x(2, 8)), metadata={"emb_3": [1, 2]}), SchemaMismatchError, "emb_3"),
    ("type-change", dict(embeddings=_both(_x(2, 8)), metadata={"year": ["x", "y"]}), SchemaMismatchError, "'year'"),
    ("type-change-polars", dict(embeddings=_both(_x(2, 8)), metadata=pl.DataFrame({"year": [1.5, 2.5]})),
     SchemaMismatchError, "double"),
    ("label-type-change", dict(embeddings=_both(_x(2, 8)), labels=[1, 2]), SchemaMismatchError, "int64"),
    ("label-float", dict(embeddings=_both(_x(2, 8)), labels=[1.5, 2.5]), SchemaMismatchError, "double"),
    ("mixed-values", dict(embeddings=_both(_x(2, 8)), metadata={"z": [1, "a"]}), SchemaMismatchError, "'z'"),
    ("metadata-kind", dict(embeddings=_both(_x(2, 8)), metadata=[1, 2]), InvalidArgumentError, "list"),
    ("properties", dict(embeddings=_both(_x(2, 8)), properties={"f": object()}), InvalidArgumentError, "JSON"),
    ("properties-nan", dict(embeddings=_both(_x(2, 8)), properties={"f": float("nan")}), InvalidArgumentError, "JSON"),
]


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [c[1:] for c in BAD_ADDS], ids=[c[0] for c in BAD_ADDS])
def test_bad_add_raises_typed_error_and_changes_nothing(store, kwargs, error, fragment):
    before = _state(store)
    with pytest.raises(error) as info:
        store.add(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, EmbtoolsError)
    _same(before, _state(store))


@pytest.mark.parametrize(("args", "error"), [
    ((_x(2, 8), 4), DimensionMismatchError),
    ((_x(2, 8), 0), InvalidArgumentError),
    ((_x(2, 6), 6), DimensionMismatchError),
])
def test_bad_add_embeddings(store, args, error):
    before = _state(store)
    with pytest.raises(error):
        store.add_embeddings(*args)
    _same(before, _state(store))


@pytest.mark.parametrize(("call", "error"), [
    (lambda s: s.delete(None), InvalidArgumentError),
    (lambda s: s.delete("nosuch = 1"), FilterError),
    (lambda s: s.delete(pl.col("year") + 1), FilterError),
    (lambda s: s.delete(3), FilterError),
    (lambda s: s.compact(target_file_bytes=0), InvalidArgumentError),
    (lambda s: s.vacuum(retain_versions=0), InvalidArgumentError),
    (lambda s: s.vacuum(older_than=-1), InvalidArgumentError),
    (lambda s: s.get_embeddings(0), InvalidArgumentError),
    (lambda s: s.get_embeddings("8"), InvalidArgumentError),
    (lambda s: s.get_embeddings(9), DimensionMismatchError),
    (lambda s: s.iter_batches(8, batch_rows=0), InvalidArgumentError),
    (lambda s: s.source.take_metadata([0], columns=["nope"]), InvalidArgumentError),
    (lambda s: s.source.take_metadata([N]), InvalidArgumentError),
    (lambda s: list(s.source.iter_vectors(8, positions=[-1])), InvalidArgumentError),
])
def test_bad_calls_change_nothing(store, call, error):
    before = _state(store)
    with pytest.raises(error):
        call(store)
    _same(before, _state(store))


def test_memory_cap_on_add_in_memory_changes_nothing():
    s = et.EmbeddingStore(backend="numpy", max_memory_gb=1e-5)   # ~10 KiB
    s.add(_x(100, 8))
    before = _state(s)
    with pytest.raises(MemoryLimitError, match="adding 300 rows"):
        s.add(_x(300, 8, 2))
    _same(before, _state(s))


def test_read_only_snapshot_refuses_every_write(tmp_path):
    s = et.EmbeddingStore(tmp_path / "s")
    s.add(_x(3, 4))
    s.add(_x(3, 4, 1))
    old = et.EmbeddingStore(tmp_path / "s", version=1)
    assert old.read_only and old.version == 1 and old.num_rows == 3
    before = _state(s)
    for call in (lambda: old.add(_x(1, 4, 2)), lambda: old.add_embeddings(_x(1, 4, 3), 4),
                 lambda: old.delete(pl.lit(True)), old.compact, old.vacuum):
        with pytest.raises(ReadOnlyStoreError):
            call()
    _same(before, _state(s))
