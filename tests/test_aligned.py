"""Issue 12 part 1: fixed-width pages at 64-byte aligned offsets, read zero-copy.

Every kind of file the store writes (add, add_dimension, delete, compact, save_to_disk, ingest,
fixed_size_binary columns) has its embedding and binary values at 64-byte aligned file offsets and
stays standard Parquet: pyarrow, polars and DuckDB read the same values the store returns (checked
against the arrays written). ``get_embeddings`` of rows in one file and every ``iter_batches``
batch are read-only aligned views of the mapped file, counted against the memory cap while they
live. Stores written before (unaligned pages, 64 MiB row groups: the old writer is kept below as a
helper) still open through the copying path, and ``compact()`` rewrites them aligned. Damaged
padding or page headers give CorruptStoreError.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import embtools as et
import embtools.storage.writer as writer_module
from embtools.cli import cli
from embtools.errors import CorruptStoreError, MemoryLimitError
from embtools.storage.datafile import MappedParquetFile, embedding_array, write_data_file
from embtools.storage.durable import fsync_file
from embtools.storage.footer import parse_footer
from embtools.storage.manifest import list_versions
from embtools.storage.placement import ALIGNMENT, value_offsets
from embtools.storage.thrift import PAD_FIELD_ID, parse_page_header

# the padding field's header, long form: compact type 8 (binary) with delta 0, then the field id
# as a zigzag varint (32767 -> 65534 -> fe ff 03)
_PAD_MARKER = bytes([0x08, 0xFE, 0xFF, 0x03])
assert PAD_FIELD_ID == 32_767


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _mapped(a: np.ndarray) -> mmap.mmap | None:
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def _is_aligned_view(a: np.ndarray) -> bool:
    mm = _mapped(a)
    return (mm is not None and np.shares_memory(a, np.frombuffer(mm, np.uint8))
            and a.flags.aligned and not a.flags.writeable and not a.flags.owndata
            and a.ctypes.data % ALIGNMENT == 0)


def _fixed_chunks(path: str | Path) -> list:
    raw = Path(path).read_bytes()
    schema = pq.read_schema(path)
    fixed = {f.name for f in schema
             if pa.types.is_fixed_size_list(f.type) or pa.types.is_fixed_size_binary(f.type)}
    return [(c, value_offsets(raw, c)) for _, cs in parse_footer(raw).row_groups for c in cs
            if c.name in fixed and c.length]


def _assert_placed(path: str | Path) -> None:
    chunks = _fixed_chunks(path)
    assert chunks
    for c, offsets in chunks:
        assert offsets and all(o % ALIGNMENT == 0 for o in offsets), (path, c.name, offsets)
    with MappedParquetFile(path) as f:
        assert f.all_aligned()


def _readers(files: list[str], column: str, width: int) -> dict[str, np.ndarray]:
    """``column`` of ``files`` (in order) as each reader decodes it."""
    out = {}
    out["pyarrow"] = np.concatenate([
        np.asarray(pq.read_table(f, columns=[column]).column(0).to_pylist(), dtype=np.float32)
        .reshape(-1, width) for f in files])
    out["polars"] = np.concatenate([
        pl.read_parquet(f, columns=[column]).to_series().to_numpy().astype(np.float32) for f in files])
    con = duckdb.connect()
    rows = []
    for f in files:
        rows += con.execute(f"SELECT {column} FROM read_parquet(?)", [f]).fetchall()
    out["duckdb"] = np.asarray([r[0] for r in rows], dtype=np.float32).reshape(-1, width)
    return out


def _check_store(store: et.EmbeddingStore, expected: dict[int, np.ndarray]) -> None:
    """Every file placed; pyarrow, polars, DuckDB and the store agree with ``expected``."""
    files = store.files()
    for f in files:
        _assert_placed(f)
    for d, x in expected.items():
        for name, got in _readers(files, f"emb_{d}", d).items():
            np.testing.assert_array_equal(got, x, err_msg=f"{name} emb_{d}")
        np.testing.assert_array_equal(store.get_embeddings(d), x)
    assert store.verify().ok


# -- writing: every kind of file is placed and readable by every reader ---------------------------


def test_every_file_the_store_writes_is_placed_and_standard(tmp_path: Path) -> None:
    x = _x(300, 24)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=100 * 24 * 4)
    store.add(x[:150], text_ids=[f"t{i}" for i in range(150)], metadata={"n": list(range(150))})
    store.add(x[150:], text_ids=[f"t{i}" for i in range(150, 300)], metadata={"n": list(range(150, 300))})
    assert len(store.files()) > 2
    _check_store(store, {24: x})  # add

    x7 = _x(300, 7, seed=1)
    store.add_dimension(7, x7)
    _check_store(store, {24: x, 7: x7})  # add_dimension

    store.delete(pl.col("n") % 3 == 0)
    keep = np.arange(300) % 3 != 0
    _check_store(store, {24: x[keep], 7: x7[keep]})  # delete rewrite

    store.compact(target_file_bytes=10**8)
    assert len(store.files()) == 1
    _check_store(store, {24: x[keep], 7: x7[keep]})  # compact

    store.save_to_disk(tmp_path / "saved")
    _check_store(et.EmbeddingStore(tmp_path / "saved", backend="numpy"), {24: x[keep], 7: x7[keep]})

    mem = et.EmbeddingStore(backend="numpy")
    mem.add({24: x, 7: x7})
    mem.save_to_disk(tmp_path / "from-memory")
    _check_store(et.EmbeddingStore(tmp_path / "from-memory", backend="numpy"), {24: x, 7: x7})


def test_ingest_writes_placed_files(tmp_path: Path) -> None:
    x = _x(250, 16, seed=3)
    src = tmp_path / "vectors.parquet"
    pl.DataFrame({"id": [f"d{i}" for i in range(250)], "vec": x.tolist()}).write_parquet(src)
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "s"), str(src), "--id-column", "id",
                                      "--vector-column", "vec", "--commit-rows", "100"])
    assert result.exit_code == 0, result.output
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    assert len(store.files()) == 3
    _check_store(store, {16: x})


@pytest.mark.parametrize("nullable", [False, True])
def test_fixed_size_binary_columns_are_placed_and_mapped(tmp_path: Path, nullable: bool) -> None:
    rng = np.random.default_rng(5)
    n, d = 777, 40
    x = _x(n, d)
    i8 = rng.integers(-128, 128, (n, d), dtype=np.int8).view(np.uint8)
    b1 = np.packbits(x > 0, axis=1)  # d / 8 bytes
    cols = {
        "row_id": pa.array(np.arange(n)),
        "text_id": pa.array([f"t{i}" for i in range(n)]),
        f"emb_{d}": embedding_array(x),
        f"emb_{d}_i8": pa.FixedSizeBinaryArray.from_buffers(pa.binary(d), n, [None, pa.py_buffer(i8)]),
        f"emb_{d}_b1": pa.FixedSizeBinaryArray.from_buffers(pa.binary(d // 8), n, [None, pa.py_buffer(b1)]),
    }
    schema = pa.schema([pa.field(k, v.type, nullable=nullable or not k.endswith(("_i8", "_b1")))
                        for k, v in cols.items()])
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table(cols, schema=schema), row_group_rows=300)
    _assert_placed(path)
    with MappedParquetFile(path) as f:
        assert f.row_group_rows == [300, 300, 177]
        for name, want in ((f"emb_{d}_i8", i8), (f"emb_{d}_b1", b1)):
            start = 0
            for g, rows in enumerate(f.row_group_rows):
                a = f.array(name, g)
                assert a.dtype == np.uint8 and a.shape == (rows, want.shape[1]) and _is_aligned_view(a)
                np.testing.assert_array_equal(a, want[start:start + rows])
                start += rows
            np.testing.assert_array_equal(f.embedding_rows(name), want)
    for name, want in ((f"emb_{d}_i8", i8), (f"emb_{d}_b1", b1)):
        ref = pq.read_table(path, columns=[name]).column(0).to_pylist()
        assert ref == [bytes(r) for r in want]
        assert pl.read_parquet(path, columns=[name]).to_series().to_list() == ref
        assert [r[0] for r in duckdb.execute(f"SELECT {name} FROM read_parquet(?)", [str(path)]
                                             ).fetchall()] == ref


def test_padding_is_an_unknown_header_field(tmp_path: Path) -> None:
    """The page header carries the padding as field PAD_FIELD_ID (a binary readers skip)."""
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table({"text_id": ["a", "bb", "ccc"],
                                    "emb_5": embedding_array(_x(3, 5))}))
    raw = path.read_bytes()
    (c, (values,)), = _fixed_chunks(path)
    h = parse_page_header(raw[c.start:values])
    assert raw[c.start + h.header_size - 1] == 0  # the header's STOP byte, after the padding
    assert _PAD_MARKER in raw[c.start:c.start + h.header_size]
    assert values % ALIGNMENT == 0 and values == c.start + h.header_size + (
        h.data_page_header_v2.repetition_levels_byte_length
        + h.data_page_header_v2.definition_levels_byte_length)


# -- reading: zero-copy views ---------------------------------------------------------------------


def test_get_embeddings_of_one_file_is_an_aligned_view(tmp_path: Path) -> None:
    x = _x(5000, 384)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, metadata={"year": list(range(5000))})
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=0.05)
    a = store.get_embeddings(384)
    assert _is_aligned_view(a) and a.flags.c_contiguous
    np.testing.assert_array_equal(a, x)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    part = store.get_embeddings(384, where="year >= 1000 AND year < 1500")  # one contiguous run
    assert _is_aligned_view(part)
    np.testing.assert_array_equal(part, x[1000:1500])
    prefix = store.get_embeddings(64)  # a prefix of a stored dimension: a strided view
    assert _mapped(prefix) is not None and not prefix.flags.owndata
    np.testing.assert_array_equal(prefix, x[:, :64])
    scattered = store.get_embeddings(384, where="year % 2 = 0")
    assert scattered.flags.owndata
    np.testing.assert_array_equal(scattered, x[::2])


def test_views_count_against_the_cap_while_they_live(tmp_path: Path) -> None:
    x = _x(4000, 256)  # 4 MB
    et.EmbeddingStore(tmp_path / "s").add(x)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=6e6 / 1024**3)
    a = store.get_embeddings(256)
    assert _is_aligned_view(a)
    info = store.get_memory_info()
    assert info["held_bytes"] == x.nbytes and info["dimensions"][256]["held_bytes"] == x.nbytes
    with pytest.raises(MemoryLimitError):
        store.get_embeddings(256)  # a second view would pass the cap while the first lives
    with pytest.raises(MemoryLimitError):
        list(store.iter_batches(256, batch_rows=2000))
    del a
    gc.collect()
    assert store.get_memory_info()["held_bytes"] == 0
    b = store.get_embeddings(256)
    np.testing.assert_array_equal(b, x)


def test_several_files_are_concatenated(tmp_path: Path) -> None:
    x = _x(600, 32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=200 * 200)
    store.add(x)
    assert len(store.files()) == 3
    a = store.get_embeddings(32)
    assert a.flags.owndata and a.flags.writeable
    np.testing.assert_array_equal(a, x)
    assert store.get_memory_info()["held_bytes"] == 0


@pytest.mark.parametrize("cap", [None, 1e5 / 1024**3])
def test_every_batch_of_iter_batches_is_an_aligned_view(tmp_path: Path, cap: float | None) -> None:
    x = _x(1000, 48)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=300 * 256)
    for s in range(0, 1000, 400):
        store.add(x[s:s + 400], metadata={"n": list(range(s, min(s + 400, 1000)))})
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=cap)
    got, ns = [], []
    for meta, batch in store.iter_batches(48, batch_rows=128):
        assert _is_aligned_view(batch) and len(batch) <= 128
        got.append(np.array(batch))
        ns += meta["n"].to_list()
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert ns == list(range(1000))
    sel = [(m["n"].to_list(), np.array(b)) for m, b in store.iter_batches(48, where="n % 7 = 0")]
    assert [n for ns_, _ in sel for n in ns_] == list(range(0, 1000, 7))
    np.testing.assert_array_equal(np.concatenate([b for _, b in sel]), x[::7])


def test_torch_batches_share_the_mapped_memory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    x = _x(300, 64)
    et.EmbeddingStore(tmp_path / "s").add(x)
    store = et.EmbeddingStore(tmp_path / "s", backend="torch")
    t = store.get_embeddings(64)
    assert isinstance(t, torch.Tensor) and t.data_ptr() % ALIGNMENT == 0
    assert torch.equal(t, torch.from_numpy(x))
    (_, b), = list(store.iter_batches(64))
    assert b.data_ptr() == t.data_ptr()


def test_search_on_aligned_store_matches_float64_brute_force(tmp_path: Path) -> None:
    x = _x(3000, 96)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=1000 * 450)
    store.add(x)
    q = _x(5, 96, seed=9)
    xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    for queries in (q[:1], q):
        res = store.search(queries, k=7)
        ref = np.argsort(-(queries.astype(np.float64) @ xn.T), axis=1, kind="stable")[:, :7]
        assert res["row_id"].to_numpy().reshape(len(queries), 7).tolist() == ref.tolist()


# -- stores written before: the copying path, and compact() rewrites them aligned ----------------


def _old_write_data_file(path: str | os.PathLike[str], table: pa.Table, *,
                         row_group_rows: int | None = None) -> int:
    """The writer before pages were placed: pyarrow only, row groups of about 64 MiB."""
    emb = [n for n in table.column_names if n.startswith("emb_")]
    widest = max((table.schema.field(n).type.list_size * 4 for n in emb), default=4)
    rows = max(1, min(row_group_rows or max(1, 64 * 1024**2 // widest), table.num_rows))
    others = [n for n in table.column_names if n not in emb]
    schema = pa.schema([pa.field(f.name, f.type, nullable=f.name not in emb) for f in table.schema])
    with open(path, "wb") as fh:
        pq.write_table(table.cast(schema), fh, row_group_size=rows, use_dictionary=others,
                       compression={**{n: "zstd" for n in others}, **{n: "none" for n in emb}},
                       write_statistics=others, column_encoding={n: "PLAIN" for n in emb},
                       data_page_size=1 << 30, max_rows_per_page=rows, data_page_version="2.0",
                       write_page_checksum=True, store_schema=True)
        fsync_file(fh)
        return fh.tell()


def test_old_stores_open_copying_and_compact_rewrites_them_aligned(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(900, 20)
    with monkeypatch.context() as m:
        m.setattr(writer_module, "write_data_file", _old_write_data_file)
        old = et.EmbeddingStore(tmp_path / "s", backend="numpy")
        for s in range(0, 900, 300):
            old.add(x[s:s + 300], text_ids=[f"id-{i:05d}" for i in range(s, s + 300)])
        old.add_dimension(8, np.ascontiguousarray(x[:, :8] * 2))
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    unaligned = []
    for f in store.files():
        with MappedParquetFile(f) as mf:
            unaligned.append(not mf.all_aligned())
    assert all(unaligned)  # the old writer's values sit after headers of arbitrary length
    one = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    a = one.get_embeddings(20, where="row_id < 300")  # one old file: a copy
    assert a.flags.owndata and a.flags.aligned
    np.testing.assert_array_equal(a, x[:300])
    np.testing.assert_array_equal(one.get_embeddings(8), x[:, :8] * 2)
    batches = [np.array(b) for _, b in one.iter_batches(20, batch_rows=128)]
    np.testing.assert_array_equal(np.concatenate(batches), x)

    version = store.version
    assert store.compact(target_file_bytes=10) == version + 1  # nothing to merge: rewritten alone
    assert len(store.files()) == 3
    _check_store(store, {20: x, 8: x[:, :8] * 2})
    a = store.get_embeddings(20, where="row_id >= 300 AND row_id < 600")
    assert _is_aligned_view(a)
    np.testing.assert_array_equal(a, x[300:600])
    assert store.compact(target_file_bytes=10) == version + 1  # aligned now: nothing to do


# -- damage ----------------------------------------------------------------------------------------


def _pad_bytes(path: Path) -> tuple[int, int]:
    """(offset of the padding length byte, offset of the first padding byte) of the first placed
    page that has a padding payload."""
    raw = path.read_bytes()
    marker = _PAD_MARKER
    for c, _ in _fixed_chunks(path):
        at = raw.find(marker, c.start, c.start + 200)
        if at >= 0 and raw[at + 4] > 0:
            return at + 4, at + 5
    raise AssertionError("no padding payload")


def _flip(path: Path, at: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["length", "payload", "field"])
def test_damaged_padding_is_corrupt(tmp_path: Path, where: str) -> None:
    x = _x(200, 12)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    path = Path(store.files()[0])
    length_at, payload_at = _pad_bytes(path)
    _flip(path, {"length": length_at, "payload": payload_at, "field": length_at - 2}[where],
          0x40 if where == "length" else 0x01)
    versions = list_versions(str(tmp_path / "s"))
    for call in (lambda s: s.get_embeddings(12), lambda s: list(s.iter_batches(12)),
                 lambda s: s.search(x[:1], k=3)):
        with pytest.raises(CorruptStoreError, match=path.name):
            call(et.EmbeddingStore(tmp_path / "s", backend="numpy"))
    try:  # one aligned file: compact has nothing to rewrite (it reads no values to decide)
        et.EmbeddingStore(tmp_path / "s", backend="numpy").compact()
    except CorruptStoreError as exc:
        assert path.name in str(exc)
    assert list_versions(str(tmp_path / "s")) == versions
    assert not et.EmbeddingStore(tmp_path / "s", backend="numpy").verify().ok


def test_damaged_padding_without_manifest_checksums_is_never_wrong_data(tmp_path: Path) -> None:
    """Entries without chunk CRCs: a flipped padding byte is harmless (the padding is skipped),
    a flipped length byte breaks the header: an error, never other values."""
    x = _x(200, 12)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    root = tmp_path / "s"
    latest = root / "_versions" / f"{list_versions(str(root))[-1]:020d}.json"
    m = json.loads(latest.read_text())
    m["files"] = [{k: v for k, v in f.items() if k not in ("footer_crc", "chunk_crcs")} for f in m["files"]]
    latest.write_text(json.dumps(m))
    path = Path(store.files()[0])
    length_at, payload_at = _pad_bytes(path)
    _flip(path, payload_at)
    np.testing.assert_array_equal(et.EmbeddingStore(root, backend="numpy").get_embeddings(12), x)
    for mask in (0x01, 0x02, 0x04, 0x10, 0x40):
        _flip(path, length_at, mask)
        try:
            got = et.EmbeddingStore(root, backend="numpy").get_embeddings(12)
        except CorruptStoreError:
            pass
        else:
            np.testing.assert_array_equal(got, x)
        _flip(path, length_at, mask)


# -- mapped pages: kept without a cap, given back under one ---------------------------------------


def test_pages_stay_mapped_without_a_cap_and_are_given_back_under_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(3000, 64)
    et.EmbeddingStore(tmp_path / "s").add(x)
    released: list[tuple[int | None, int | None]] = []
    orig = MappedParquetFile.release_rows

    def spy(self, column, row_group, start=None, stop=None):
        released.append((start, stop))
        return orig(self, column, row_group, start, stop)

    monkeypatch.setattr(MappedParquetFile, "release_rows", spy)
    for cap, gives_back in ((None, False), (1e6 / 1024**3, True)):
        released.clear()
        store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=cap)
        got = np.concatenate([np.array(b) for _, b in store.iter_batches(64, batch_rows=500)])
        np.testing.assert_array_equal(got, x)
        q = _x(1, 64, seed=4)
        ref = np.argsort(-(x.astype(np.float64) @ q[0] / np.linalg.norm(x, axis=1)), kind="stable")[:5]
        assert store.search(q, k=5)["row_id"].to_list() == ref.tolist()
        assert bool(released) == gives_back, cap


def test_reads_without_madvise_populate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without MADV_POPULATE_READ (EINVAL): pages fault in as they are read."""
    import embtools.storage.datafile as datafile

    x = _x(2000, 32)
    et.EmbeddingStore(tmp_path / "s").add(x)
    monkeypatch.setattr(datafile, "_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", max_memory_gb=0.01)
    np.testing.assert_array_equal(np.concatenate([np.array(b) for _, b in store.iter_batches(32)]), x)
    assert datafile._POPULATE_READ is None
    a = store.get_embeddings(32)
    assert _is_aligned_view(a)
    np.testing.assert_array_equal(a, x)


@pytest.mark.parametrize("step", [7, 64, 4096])
def test_placed_copy_is_written_in_aligned_steps(tmp_path: Path, monkeypatch, step: int) -> None:
    # the copy goes out in WRITE_STEP pieces at multiples of WRITE_STEP (2 MiB folios in the page
    # cache, mapped 2 MiB at a time): the bytes are those of one copy, whatever the step
    from embtools.storage import placement

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    table = pa.table({"id": [f"r{i}" for i in range(len(x))], "emb_24": embedding_array(x)})
    src = tmp_path / "src.parquet"
    pq.write_table(table, src, data_page_version="2.0", use_dictionary=["id"],
                   column_encoding={"emb_24": "PLAIN"}, compression={"id": "zstd", "emb_24": "none"})
    size = os.path.getsize(src)

    def copy(offset: int) -> tuple[bytes, list[tuple[int, int]]]:
        writes: list[tuple[int, int]] = []
        real = placement._write_all

        def spy(fd: int, data) -> None:
            writes.append((os.lseek(fd, 0, os.SEEK_CUR), len(data)))
            real(fd, data)

        monkeypatch.setattr(placement, "_write_all", spy)
        with open(src, "rb") as s, open(tmp_path / "dst", "wb+") as d:
            d.write(b"x" * offset)
            d.flush()
            n = placement.aligned_copy(s.fileno(), size, d.fileno(), {"emb_24"})
            d.seek(0)
            raw = d.read()
        monkeypatch.setattr(placement, "_write_all", real)
        assert len(raw) == offset + n and raw[:offset] == b"x" * offset
        return raw[offset:], writes

    whole, _ = copy(0)
    monkeypatch.setattr(placement, "WRITE_STEP", step)
    for offset in (0, 5, step + 3):
        raw, writes = copy(offset)
        assert raw == whole
        assert all(pos % step == 0 for pos, _ in writes[1:])  # every write after the first starts on a step
        assert all(pos + n == (pos // step + 1) * step for pos, n in writes[:-1])  # and ends on the next
    assert pq.read_table(pa.BufferReader(whole)).equals(table)
    col = next(c for c in parse_footer(whole).row_groups[0][1] if c.name == "emb_24")
    assert all(v % ALIGNMENT == 0 for v in value_offsets(whole, col))
