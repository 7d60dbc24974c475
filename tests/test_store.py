"""EmbeddingStore on a real Parquet store: round trips, readers, dimensions, batches, in-memory form.

The tests that take ``location`` run on a local directory and on S3 (moto; tests/conftest.py)."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.backends import available_backends, convert
from embtools.errors import DimensionMismatchError, FilterError, StoreNotFoundError

BACKENDS = [b for b in ("numpy", "torch", "mlx") if b in available_backends()]


def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _meta(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(1)
    return pl.DataFrame({
        "i64": [None if i % 7 == 3 else int(v) for i, v in enumerate(rng.integers(-10**12, 10**12, n))],
        "i32": pl.Series(rng.integers(-1000, 1000, n), dtype=pl.Int32),
        "f64": [None if i % 5 == 2 else float(v) for i, v in enumerate(rng.standard_normal(n))],
        "f32": pl.Series(rng.standard_normal(n), dtype=pl.Float32),
        "s": [None if i % 4 == 1 else f"s-{i}-é" for i in range(n)],
        "b": [None if i % 6 == 0 else bool(i % 2) for i in range(n)],
        "d": [dt.date(2000, 1, 1) + dt.timedelta(days=i) for i in range(n)],
        "ts": [dt.datetime(2020, 1, 1, 12) + dt.timedelta(seconds=37 * i) for i in range(n)],
        "tz": pl.Series([dt.datetime(2021, 5, 1) + dt.timedelta(hours=i) for i in range(n)]).dt.replace_time_zone("UTC"),
        "lst": [None if i % 3 == 0 else list(range(i % 4)) for i in range(n)],
        "lstr": [["a", None, f"x{i}"] if i % 2 else [] for i in range(n)],
        "nul": pl.Series([None] * n, dtype=pl.String),
        "cat": pl.Series([f"c{i % 3}" for i in range(n)]),
    })


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_every_column_type_and_several_dims(location, backend):
    n = 37
    x = {48: _rows(n, 48, 2), 16: _rows(n, 16, 3), 3: _rows(n, 3, 4)}
    meta = _meta(n)
    labels = [None if i % 9 == 0 else f"lab{i % 4}" for i in range(n)]
    ids = [f"doc-{i:03d}" for i in range(n)]
    store = location.open("s", backend=backend)
    assert store.version == 0 and store.num_rows == 0 and store.dimensions == []
    arrays = {d: convert(a, backend) for d, a in x.items()}
    assert store.add(arrays, text_ids=ids, labels=labels, metadata=meta) == 1
    for reopened in (store, location.open("s", backend=backend)):
        assert reopened.dimensions == [3, 16, 48] and reopened.num_rows == n and reopened.version == 1
        got = reopened.metadata().collect()
        assert got["row_id"].to_list() == list(range(n))
        assert got["text_id"].to_list() == ids
        assert got["label"].to_list() == labels
        assert got.drop("row_id", "text_id", "label").equals(meta)
        for d, a in x.items():
            out = reopened.get_embeddings(d)
            assert type(out).__module__.split(".")[0] == backend
            got_x = np.asarray(convert(out, "numpy"))
            assert got_x.dtype == np.float32
            assert got_x.tobytes() == a.tobytes()  # bit-identical


def test_files_readable_by_pyarrow_polars_and_duckdb(tmp_path):
    n = 25
    x384, x8 = _rows(n, 24, 5), _rows(n, 8, 6)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=1500)
    store.add({24: x384, 8: x8}, text_ids=[f"t{i}" for i in range(n)], labels=list(range(n)),
              metadata={"year": np.arange(n) + 2000})
    files = store.files()
    assert len(files) > 1 and all(os.path.isabs(f) and os.path.exists(f) for f in files)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.field("emb_24").type == pa.list_(pa.field("element", pa.float32(), nullable=False), 24)
    assert not table.schema.field("emb_24").nullable
    assert table.column("text_id").to_pylist() == [f"t{i}" for i in range(n)]
    flat = table.column("emb_24").combine_chunks().flatten().to_numpy()
    assert flat.tobytes() == x384.tobytes()
    frame = pl.scan_parquet(files).collect()
    assert frame.schema["emb_24"] == pl.Array(pl.Float32, 24)
    assert frame.schema["emb_8"] == pl.Array(pl.Float32, 8)
    assert np.array_equal(frame["emb_8"].to_numpy(), x8)
    assert frame["label"].to_list() == list(range(n))
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"SELECT text_id, year, emb_8 FROM read_parquet({files!r}) ORDER BY row_id").fetchall()
    assert [r[0] for r in rows] == [f"t{i}" for i in range(n)]
    assert [r[1] for r in rows] == list(range(2000, 2000 + n))
    assert np.array_equal(np.array([r[2] for r in rows], dtype=np.float32), x8)


def test_parquet_layout_of_embedding_and_metadata_columns(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(_rows(10, 16), metadata={"s": [f"v{i}" for i in range(10)]})
    md = pq.ParquetFile(store.files()[0]).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    for i, name in enumerate(names):
        col = md.row_group(0).column(i)
        if name.startswith("emb_16"):
            assert col.compression == "UNCOMPRESSED" and not col.is_stats_set
            assert "PLAIN" in col.encodings and not col.has_dictionary_page
        else:
            assert col.compression == "ZSTD"


def test_inputs_of_every_kind(location):
    import torch

    x = _rows(6, 4)
    store = location.open("s", backend="numpy")
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(x[:2].reshape(-1)), 4)
    store.add(fsl, text_ids=["a0", "a1"])
    store.add(pa.chunked_array([fsl.slice(0, 1), fsl.slice(1, 1)]).cast(pa.list_(pa.float64(), 4)),
              text_ids=["b0", "b1"])
    store.add(pl.Series("e", x[2:4]), text_ids=pl.Series(["c0", "c1"]))
    store.add(torch.from_numpy(x[4:5].astype(np.float64)), text_ids=np.array(["d0"]))
    store.add(x[5:6].astype(np.float16), text_ids=("e0",))
    store.add_embeddings(x[:1].tolist(), dimension=4, text_ids=["f0"])
    got = store.get_embeddings(4)
    want = np.concatenate([x[:2], x[:2], x[2:4], x[4:5], x[5:6].astype(np.float16).astype(np.float32), x[:1]])
    assert np.array_equal(got, want)
    assert store.metadata().collect()["text_id"].to_list() == ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "e0", "f0"]
    assert store.versions() == list(range(7))


def test_generated_text_ids_are_unique_and_stable(location):
    store = location.open("s", backend="numpy")
    store.add(_rows(3, 2))
    store.add(_rows(2, 2, 1))
    meta = store.metadata().collect()
    assert meta["text_id"].to_list() == [f"row-{r}" for r in meta["row_id"].to_list()]
    assert meta["text_id"].n_unique() == 5


def test_metadata_lazyframe_pushes_projection_and_predicate_into_scan(location):
    store = location.open("s", backend="numpy")
    store.add(_rows(20, 8), metadata={"year": list(range(20)), "topic": [f"t{i % 3}" for i in range(20)]})
    lf = store.metadata().filter(pl.col("year") > 15).select("text_id")
    plan = lf.explain()
    assert "Parquet SCAN" in plan or "SCAN PARQUET" in plan.upper()
    scan_part = plan[plan.upper().find("PARQUET"):]
    assert "SELECTION" in scan_part.upper() or "FILTER" in scan_part.upper()
    assert "emb_8" not in plan
    assert "PROJECT" in scan_part.upper()
    assert lf.collect()["text_id"].to_list() == [f"row-{i}" for i in range(16, 20)]


def test_where_filters_polars_and_sql_and_bad_filters(location):
    x = _rows(30, 8)
    store = location.open("s", backend="numpy")
    store.add(x, labels=[f"l{i % 3}" for i in range(30)], metadata={"year": list(range(30))})
    want = np.array([i for i in range(30) if i % 3 == 1 and i >= 10])
    a = store.get_embeddings(8, where=(pl.col("label") == "l1") & (pl.col("year") >= 10))
    b = store.get_embeddings(8, where="label = 'l1' AND year >= 10")
    assert np.array_equal(a, x[want]) and np.array_equal(b, x[want])
    assert store.get_embeddings(8, where=pl.col("year") > 100).shape == (0, 8)
    for bad in ["nosuchcol > 3", "year >>> 3", 42, pl.col("nope") == 1, "   "]:
        with pytest.raises(FilterError):
            store.get_embeddings(8, where=bad)


def test_prefix_dimensions_and_slice_to_dimension(location):
    x64, x16 = _rows(12, 64), _rows(12, 16, 9)
    store = location.open("s", backend="numpy")
    store.add({64: x64, 16: x16})
    assert np.array_equal(store.get_embeddings(8), x16[:, :8])      # smallest stored above 8 is 16
    assert np.array_equal(store.get_embeddings(32), x64[:, :32])
    assert np.array_equal(store.get_embeddings(16), x16)
    with pytest.raises(DimensionMismatchError, match=r"\[16, 64\]"):
        store.get_embeddings(65)
    sl = store.slice_to_dimension(64, 20, normalize=True)
    ref = x64[:, :20].astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(sl, ref, rtol=1e-5, atol=1e-6)
    assert np.array_equal(store.slice_to_dimension(64, 20), x64[:, :20])  # the seed's raw prefix
    with pytest.raises(DimensionMismatchError):
        store.slice_to_dimension(64, 65)


@pytest.mark.parametrize("batch_rows", [1, 4, 7, 50])
def test_iter_batches_cover_selection_in_order(location, batch_rows):
    x = _rows(23, 8)
    store = location.open("s", backend="numpy", target_file_bytes=600)
    store.add(x, text_ids=[f"t{i}" for i in range(23)], metadata={"k": list(range(23))})
    assert len(store.files()) > 2
    where = pl.col("k") % 3 != 0
    sel = [i for i in range(23) if i % 3]
    metas, blocks = [], []
    for meta, block in store.iter_batches(8, where=where, batch_rows=batch_rows):
        assert len(meta) == block.shape[0] <= batch_rows
        metas.append(meta)
        blocks.append(np.array(block))
    meta = pl.concat(metas)
    assert meta["text_id"].to_list() == [f"t{i}" for i in sel]
    assert meta["k"].to_list() == sel
    assert np.array_equal(np.concatenate(blocks), x[sel])
    assert store.budget.held_bytes == 0


def test_snapshot_vector_source_contract(location):
    x = _rows(40, 8)
    store = location.open("s", backend="numpy", target_file_bytes=900)
    store.add(x, labels=[i % 2 for i in range(40)], metadata={"year": list(range(40))})
    src = store.source
    assert src.num_rows == 40 and src.dimensions == [8]
    pos = src.select(pl.col("year") >= 30)
    assert pos.dtype == np.int64 and pos.tolist() == list(range(30, 40))
    positions = np.array([1, 5, 6, 7, 20, 33, 39])
    got_pos, got = [], []
    for p, v in src.iter_vectors(4, positions=positions, batch_rows=3):
        assert v.shape == (len(p), 4) and v.dtype == np.float32
        got_pos.append(p.copy())
        got.append(np.array(v))
    assert np.concatenate(got_pos).tolist() == positions.tolist()
    assert np.array_equal(np.concatenate(got), x[positions, :4])
    meta = src.take_metadata([39, 0, 17], columns=["year"])
    assert meta.columns == ["row_id", "text_id", "label", "year"]
    assert meta["year"].to_list() == [39, 0, 17] and meta["label"].to_list() == [1, 0, 1]


def test_properties_merge_in_commit_and_config_hash(location):
    store = location.open("s", backend="numpy")
    h0 = store.config_hash
    store.add(_rows(2, 4), properties={"model": "m1", "note": 1})
    store.add(_rows(2, 4, 1), properties={"note": 2})
    again = location.open("s")
    assert again.properties == {"model": "m1", "note": 2}
    assert again.config_hash != h0
    manifest = json.loads(store._state.storage.read(f"_versions/{2:020d}.json"))
    assert manifest["properties"] == {"model": "m1", "note": 2}
    assert manifest["operation"] == "add" and manifest["parent"] == 1 and manifest["dimensions"] == [4]
    assert manifest["config_hash"] == et.compute_config_hash({
        "dimensions": [4], "schema": manifest["schema"]["columns"], "properties": {"model": "m1", "note": 2}})


def test_opening_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    assert et.EmbeddingStore(tmp_path / "empty").version == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(StoreNotFoundError):
        et.EmbeddingStore(tmp_path / "other")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreNotFoundError):
        et.EmbeddingStore(tmp_path / "f")
    with pytest.raises(StoreNotFoundError):
        et.EmbeddingStore(tmp_path / "missing", version=0)
    assert not (tmp_path / "missing").exists()
    et.EmbeddingStore(tmp_path / "s").add(_rows(2, 2))
    with pytest.raises(StoreNotFoundError, match=r"versions: \[0, 1\]"):
        et.EmbeddingStore(tmp_path / "s", version=5)
    with pytest.raises(StoreNotFoundError):
        et.EmbeddingStore.load_from_disk(tmp_path / "nowhere")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_memory_store_seed_api(tmp_path, backend):
    x, x2 = _rows(10, 16), _rows(10, 4, 3)
    store = et.EmbeddingStore(backend=backend, max_memory_gb=0.01)
    assert store.path is None and store.files() == []
    assert store.add_embeddings(convert(x, backend), dimension=16, text_ids=[f"t{i}" for i in range(10)],
                                labels=[i % 2 for i in range(10)]) == 1
    assert store.get_available_dimensions() == [16]
    assert np.array_equal(np.asarray(convert(store.get_embeddings(16), "numpy")), x)
    assert np.array_equal(np.asarray(convert(store.get_embeddings(8, where="label = 1"), "numpy")),
                          x[1::2, :8])
    info = store.get_memory_info()
    assert info["dimensions"][16]["held_bytes"] == x.nbytes and info["held_bytes"] == x.nbytes
    assert info["cap_bytes"] == int(0.01 * 1024**3)
    assert store.get_total_memory_usage() == x.nbytes  # bytes, as in the seed
    store.add(_rows(2, 16, 7), metadata={"extra": [1, 2]})
    meta = store.metadata().collect()
    assert meta["extra"].to_list() == [None] * 10 + [1, 2] and meta["row_id"].to_list() == list(range(12))
    assert store.delete(pl.col("row_id") < 2) == 3 and store.num_rows == 10
    assert store.versions() == [0, 1, 2, 3]
    v = store.save_to_disk(tmp_path / "saved")
    loaded = et.EmbeddingStore.load_from_disk(tmp_path / "saved", backend=backend)
    assert loaded.version == v and loaded.num_rows == 10
    assert np.array_equal(np.asarray(convert(loaded.get_embeddings(16), "numpy")),
                          np.asarray(convert(store.get_embeddings(16), "numpy")))
    assert loaded.metadata().collect().equals(store.metadata().collect())
    _ = x2


def test_in_memory_arrays_are_not_writable_through_get_embeddings():
    store = et.EmbeddingStore(backend="numpy")
    store.add(_rows(3, 4))
    out = store.get_embeddings(4)
    with pytest.raises(ValueError):
        out[0, 0] = 1.0


def test_seed_positional_backend_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = et.EmbeddingStore("numpy", max_memory_gb=1.0)
    assert store.path is None and store.backend.name == "numpy"
    assert not (tmp_path / "numpy").exists()


def test_save_disk_store_to_another_directory(tmp_path):
    x = _rows(9, 8)
    store = et.EmbeddingStore(tmp_path / "a", target_file_bytes=500)
    store.add(x, metadata={"k": list(range(9))}, properties={"model": "m"})
    store.save_to_disk(tmp_path / "b")
    other = et.EmbeddingStore(tmp_path / "b")
    assert np.array_equal(other.get_embeddings(8), x)
    assert other.metadata().collect().equals(store.metadata().collect())
    assert other.properties == {"model": "m"}
    other.add(_rows(1, 8, 5), text_ids=["new"])
    assert other.metadata().collect()["row_id"].to_list()[-1] == 9
