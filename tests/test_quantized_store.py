"""store.quantize: code columns for every row as a new version, equal to sentence-transformers'
codes with the ranges the manifest records; filled by later adds, kept by delete / compact / save;
plain Parquet that pyarrow, polars and DuckDB read; bad input and damage give typed errors."""

from __future__ import annotations

import json
import os
import warnings

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.errors import (
    CorruptStoreError,
    DimensionMismatchError,
    EmbtoolsError,
    InvalidArgumentError,
)
from embtools.kernels.codes import sign_bytes
from embtools.storage.quantized import gather_codes


def _st_codes(x: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.quantization import quantize_embeddings
    return quantize_embeddings(x, precision=precision, ranges=ranges)


def _vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    c = rng.standard_normal((6, d)).astype(np.float32)
    x = c[rng.integers(0, 6, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _check_codes(store: et.EmbeddingStore, x: np.ndarray, dim: int = 24) -> None:
    """Every stored row's codes equal sentence-transformers' of its vector."""
    src = store.source
    n = src.num_rows
    spec = src.quantized[dim]
    assert n == len(x)
    b1 = gather_codes(src, dim, "binary", np.arange(n))
    np.testing.assert_array_equal(b1, _st_codes(x, "ubinary"))
    i8 = gather_codes(src, dim, "int8", np.arange(n)).view(np.int8)
    np.testing.assert_array_equal(i8, _st_codes(x, "int8", spec.ranges))


def test_quantize_add_delete_compact_keep_codes(new_store, store_kind, rng):
    d = 24
    x = _vectors(rng, 900, d)
    store = new_store(store_kind, target_file_bytes=40_000)
    for s in range(0, 600, 200):  # several files
        store.add({d: x[s : s + 200], 8: x[s : s + 200, :8]}, text_ids=[f"t{i}" for i in range(s, s + 200)])
    before = store.version
    version = store.quantize(d, kinds=["int8", "binary"], sample_rows=300)
    assert version == before + 1 and store.quantized == {d: ("binary", "int8")}
    spec = store.source.quantized[d]
    assert spec.sample_rows == 300 and spec.ranges.shape == (2, d)
    # the ranges are the min/max of a sample of the stored rows
    assert (spec.ranges[0] >= x[:600].min(axis=0)).all() and (spec.ranges[1] <= x[:600].max(axis=0)).all()
    _check_codes(store, x[:600])
    store.add({d: x[600:], 8: x[600:, :8]}, text_ids=[f"t{i}" for i in range(600, 900)])
    assert store.source.quantized[d] == spec  # new rows encoded with the recorded ranges
    _check_codes(store, x)
    store.delete(pl.col("text_id").is_in(["t3", "t650", "t899"]))
    keep = np.ones(900, bool)
    keep[[3, 650, 899]] = False
    _check_codes(store, x[keep])
    store.compact()
    _check_codes(store, x[keep])
    if store_kind == "disk":
        again = et.EmbeddingStore(store.path, backend="numpy")
        assert again.quantized == {d: ("binary", "int8")}
        _check_codes(again, x[keep])
        old = et.EmbeddingStore(store.path, version=before, backend="numpy")
        assert old.quantized == {}
    # quantizing again replaces the codes (one kind now)
    store.quantize(d, kinds=("binary",))
    assert store.quantized == {d: ("binary",)}
    with pytest.raises(InvalidArgumentError, match="no int8 codes"):
        store.search(x[0], k=3, precision="int8")
    store.clear()
    assert store.quantized == {}


def test_save_to_disk_carries_the_codes(tmp_path, rng):
    d = 16
    x = _vectors(rng, 300, d)
    mem = et.EmbeddingStore(None, backend="numpy")
    mem.add_embeddings(x, dimension=d)
    mem.quantize(d)
    mem.save_to_disk(str(tmp_path / "saved"))
    disk = et.EmbeddingStore.load_from_disk(str(tmp_path / "saved"))
    assert disk.quantized == {d: ("binary", "int8")}
    np.testing.assert_array_equal(disk.source.quantized[d].ranges, mem.source.quantized[d].ranges)
    _check_codes(disk, x, d)


def test_files_stay_plain_parquet(tmp_path, rng):
    d = 20  # not a multiple of 8: the sign codes are padded to 3 bytes
    x = _vectors(rng, 257, d)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add_embeddings(x, dimension=d)
    store.quantize(d)
    path = store.files()[0]
    schema = pq.read_schema(path)
    assert str(schema.field(f"emb_{d}_i8").type) == f"fixed_size_binary[{d}]"
    assert str(schema.field(f"emb_{d}_b1").type) == f"fixed_size_binary[{sign_bytes(d)}]"
    frame = pl.read_parquet(path)
    codes = np.array([np.frombuffer(b, np.uint8) for b in frame[f"emb_{d}_b1"].to_list()])
    np.testing.assert_array_equal(codes, _st_codes(x, "ubinary"))
    got = duckdb.sql(f"select octet_length(emb_{d}_i8), count(*) from '{path}' group by 1").fetchall()
    assert got == [(d, 257)]
    assert store.verify().damaged == []
    # the metadata frame does not show the code columns
    assert not [c for c in store.metadata().collect_schema().names() if c.startswith("emb_")]


def test_bad_arguments_change_nothing(new_store, store_kind, rng):
    store = new_store(store_kind)
    with pytest.raises(DimensionMismatchError):
        store.quantize(8)  # nothing stored yet
    store.add_embeddings(_vectors(rng, 50, 8), dimension=8)
    version = store.version
    for call, error in [
        (lambda: store.quantize(16), DimensionMismatchError),
        (lambda: store.quantize(4), DimensionMismatchError),  # a prefix is not stored
        (lambda: store.quantize(8, kinds=("int4",)), InvalidArgumentError),
        (lambda: store.quantize(8, kinds=[]), InvalidArgumentError),
        (lambda: store.quantize(8, kinds=5), InvalidArgumentError),
        (lambda: store.quantize(8, sample_rows=1), InvalidArgumentError),
        (lambda: store.quantize("8"), InvalidArgumentError),
        (lambda: store.search(np.ones(8), k=2, precision="binary"), InvalidArgumentError),
        (lambda: store.search(np.ones(8), k=2, precision="int4"), InvalidArgumentError),
        (lambda: store.search(np.ones(8), k=2, rescore=3), InvalidArgumentError),
    ]:
        with pytest.raises(error):
            call()
        assert store.version == version and store.quantized == {}
    empty = new_store(store_kind)
    empty.add_embeddings(_vectors(rng, 3, 8), dimension=8)
    empty.delete(pl.col("row_id") >= 0)
    with pytest.raises(InvalidArgumentError, match="no rows"):
        empty.quantize(8)


def test_read_only_snapshot_refuses(tmp_path, rng):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add_embeddings(_vectors(rng, 20, 8), dimension=8)
    old = et.EmbeddingStore(tmp_path / "s", version=store.version, backend="numpy")
    with pytest.raises(EmbtoolsError):
        old.quantize(8)


def test_damaged_manifest_record_is_corrupt(tmp_path, rng):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add_embeddings(_vectors(rng, 20, 8), dimension=8)
    store.quantize(8)
    vdir = tmp_path / "s" / "_versions"
    latest = sorted(os.listdir(vdir))[-1]
    good = json.loads((vdir / latest).read_text())
    for bad in (
        {"8": {"kinds": ["int8"], "ranges": [[0.0] * 8]}},  # one row of ranges
        {"8": {"kinds": ["int8"], "ranges": [[1.0] * 8, [0.0] * 8]}},  # min > max
        {"8": {"kinds": ["int4"]}},
        {"16": {"kinds": ["binary"]}},  # not a stored dimension
        {"8": {"kinds": ["binary"], "ranges": [[0.0] * 8, [1.0] * 8]}},
        {"8": {"kinds": ["int8"], "ranges": [["x"] * 8, [1.0] * 8]}},
        ["8"],
    ):
        (vdir / latest).write_text(json.dumps({**good, "quantized": bad}))
        with pytest.raises(CorruptStoreError):
            et.EmbeddingStore(tmp_path / "s", backend="numpy")


def test_damaged_code_bytes_are_corrupt(tmp_path, rng):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    x = _vectors(rng, 400, 16)
    store.add_embeddings(x, dimension=16)
    store.quantize(16, kinds=("binary",))
    path = store.files()[0]
    md = pq.read_metadata(path)
    col = next(i for i in range(md.num_columns) if md.schema.column(i).name == "emb_16_b1")
    start = md.row_group(0).column(col).data_page_offset
    size = md.row_group(0).column(col).total_compressed_size
    with open(path, "r+b") as fh:  # flip a byte inside the page body
        fh.seek(start + size - 5)
        b = fh.read(1)
        fh.seek(start + size - 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    fresh = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    with pytest.raises(CorruptStoreError):
        fresh.search(x[0], k=5, precision="binary")
    assert [p for p, _ in fresh.verify().damaged] == [path]


def test_distributed_add_writes_the_codes(tmp_path, rng):
    """write_files / commit_files (the Ray sink's add) encode the codes of a quantized store; files
    written before the store was quantized are refused by the commit."""
    from embtools.memory import MemoryBudget
    from embtools.storage.ingest import prepare_batch
    from embtools.storage.writer import commit_files, write_files

    d = 16
    x = _vectors(rng, 300, d)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add_embeddings(x[:100], dimension=d)

    def batch(rows: np.ndarray, prefix: str):  # type: ignore[no-untyped-def]
        src = store.source
        return prepare_batch({d: rows}, [f"{prefix}{i}" for i in range(len(rows))],
                             stored_dims=src.dimensions, schema=src.schema, num_rows=src.num_rows)

    early = write_files(store.path, batch(x[100:200], "e"), MemoryBudget(None), 1 << 20)
    store.quantize(d)
    with pytest.raises(DimensionMismatchError, match="quantized"):
        commit_files(store.path, early, [d], store.source.schema, {})
    late = write_files(store.path, batch(x[200:], "l"), MemoryBudget(None), 1 << 20)
    commit_files(store.path, late, [d], store.source.schema, {})
    store.refresh()
    _check_codes(store, np.concatenate([x[:100], x[200:]]), d)


@pytest.mark.parametrize("operation", ["quantize", "add_dimension"])
def test_rewrite_refused_when_a_writer_changed_the_store(tmp_path, operation):
    """quantize and add_dimension rewrite every file from one version; when another writer
    committed meanwhile, the commit is refused (CommitConflictError) and the store keeps the
    other writer's version, every row of it."""
    from embtools.errors import CommitConflictError
    from embtools.storage.columns import add_dimension_files
    from embtools.storage.quantized import quantize_files

    x = np.random.default_rng(4).standard_normal((50, 8)).astype(np.float32)
    store = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy")
    store.add_embeddings(x, dimension=8)
    base, source = store.source.manifest, store.source
    other = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy")
    other.add_embeddings(x[:5] * 2, dimension=8)  # the concurrent writer
    with pytest.raises(CommitConflictError, match=f"{operation}: a concurrent writer"):
        if operation == "quantize":
            quantize_files(store.path, base, 8, ("int8",), source)
        else:
            add_dimension_files(store.path, base, 4, x[:, :4])
    after = et.EmbeddingStore(str(tmp_path / "s"), backend="numpy")
    assert after.version == other.version and after.num_rows == 55
    assert not after.quantized and after.dimensions == [8]
