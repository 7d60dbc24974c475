"""Data file format and zero-copy reader, checked against pyarrow's own decoding.

Every test draws fresh random data; the reference is always what pyarrow decodes from the same file.
"""

from __future__ import annotations

import io
import mmap
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embtools.errors import CorruptStoreError, InvalidArgumentError, InvalidEmbeddingsError
from embtools.storage.datafile import (
    MappedParquetFile,
    embedding_array,
    embedding_type,
    write_data_file,
)
from embtools.storage.pages import LayoutError, plain_value_spans
from embtools.storage.thrift import (
    PAGE_DATA,
    PAGE_DATA_V2,
    PAGE_DICTIONARY,
    ThriftError,
    parse_page_header,
)


def _rng() -> np.random.Generator:
    return np.random.default_rng()


def _table(n: int, dims: list[int], rng: np.random.Generator) -> tuple[pa.Table, dict[int, np.ndarray]]:
    xs = {d: rng.standard_normal((n, d)).astype(np.float32) for d in dims}
    cols: dict[str, pa.Array] = {
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "text_id": pa.array([f"t{i}-{rng.integers(1 << 30)}" for i in range(n)]),
        "label": pa.array(rng.choice(["a", "b", None], size=n).tolist()),
    }
    cols.update({f"emb_{d}": embedding_array(x) for d, x in xs.items()})
    return pa.table(cols), xs


def _reference(path: Path | str, column: str, row_group: int) -> np.ndarray:
    """pyarrow's decoding of one chunk, as (rows, d) float32."""
    col = pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)
    col = col.combine_chunks()
    d = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(col), d if d is not None else -1)


def _backed_by_mmap(a: np.ndarray) -> bool:
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def _emb_chunk(path: Path, column: str, row_group: int = 0) -> pq.ColumnChunkMetaData:
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_columns):
        if pf.schema.column(i).path.split(".")[0] == column:
            return pf.metadata.row_group(row_group).column(i)
    raise KeyError(column)


# -- writing --------------------------------------------------------------------------------------


def test_write_layout_and_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = _rng()
    table, _ = _table(500, [8, 32], rng)
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    path = tmp_path / "f.parquet"
    nbytes = write_data_file(path, table, row_group_rows=200)
    assert synced == [str(path)]
    assert nbytes == path.stat().st_size
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 3
    assert pf.schema_arrow.field("emb_8").type == embedding_type(8)
    assert not pf.schema_arrow.field("emb_8").nullable
    for g in range(pf.metadata.num_row_groups):
        for i in range(pf.metadata.num_columns):
            cc = pf.metadata.row_group(g).column(i)
            if cc.path_in_schema.startswith("emb_"):
                assert cc.compression == "UNCOMPRESSED"
                assert not cc.has_dictionary_page and not cc.is_stats_set
                assert "PLAIN" in cc.encodings and "RLE_DICTIONARY" not in cc.encodings
            else:
                assert cc.compression == "ZSTD" and cc.is_stats_set
    assert pq.read_table(path).equals(table.cast(pf.schema_arrow))


def test_default_is_one_row_group_below_the_chunk_limit(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    x = _rng().standard_normal((50_000, 768)).astype(np.float32)  # 146 MiB
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table({"emb_768": embedding_array(x)}))
    with MappedParquetFile(path) as f:
        assert f.row_group_rows == [50_000] and f.aligned("emb_768", 0)
        assert np.array_equal(f.embedding_rows("emb_768"), x)
    import embtools.storage.datafile as datafile

    monkeypatch.setattr(datafile, "MAX_CHUNK_BYTES", 64 * 1024**2)  # the widest column decides
    t = pa.table({"emb_768": embedding_array(x[:30_000]), "emb_8": embedding_array(x[:30_000, :8])})
    write_data_file(path, t)
    with MappedParquetFile(path) as f:
        assert f.row_group_rows == [21845, 8155]
        assert all(f.aligned(c, g) for c in ("emb_768", "emb_8") for g in range(2))
        assert np.array_equal(f.embedding_rows("emb_768"), x[:30_000])


def test_write_rejects_bad_embedding_columns(tmp_path: Path) -> None:
    x = _rng().standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(InvalidArgumentError, match="emb_4"):
        write_data_file(tmp_path / "a.parquet", pa.table({"emb_4": embedding_array(x)}))
    with pytest.raises(InvalidArgumentError, match="emb_3"):
        write_data_file(tmp_path / "b.parquet", pa.table({"emb_3": pa.array(x.ravel())}))
    nulls = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3, mask=pa.array([False, True, False, False]))
    with pytest.raises(InvalidEmbeddingsError):
        write_data_file(tmp_path / "c.parquet", pa.table({"emb_3": nulls}))
    with pytest.raises(InvalidArgumentError):
        write_data_file(tmp_path / "d.parquet", pa.table({"emb_3": embedding_array(x)}), row_group_rows=0)
    assert not any(tmp_path.iterdir())


def test_write_sliced_and_chunked_input(tmp_path: Path) -> None:
    x = _rng().standard_normal((30, 4)).astype(np.float32)
    values = x.ravel().copy()
    values[:4] = np.nan  # row 0 is sliced away below, so its values must not matter...
    arr = pa.FixedSizeListArray.from_arrays(
        pa.array(values, mask=np.arange(values.size) < 4), type=pa.list_(pa.float32(), 4))
    col = pa.chunked_array([arr.slice(1, 10), arr.slice(11, 19)])
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table({"emb_4": col}), row_group_rows=7)
    with MappedParquetFile(path) as f:
        np.testing.assert_array_equal(f.embedding_rows("emb_4"), x[1:])
        assert all(f.zero_copy("emb_4", g) for g in range(len(f.row_group_rows)))


def test_write_casts_nullable_float64_lists(tmp_path: Path) -> None:
    x = _rng().standard_normal((9, 5))
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 5)  # float64, nullable
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table({"emb_5": col}))
    with MappedParquetFile(path) as f:
        assert f.zero_copy("emb_5", 0)
        assert np.array_equal(f.embedding("emb_5", 0), x.astype(np.float32))


# -- reading: differential against pyarrow --------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "dims", "rows"),
    [
        (1, [1], None),
        (1, [1536], None),
        (1000, [7], 333),
        (257, [1, 7], 1),
        (300, [384, 1536], 97),
        (4096, [384], None),
    ],
)
def test_zero_copy_matches_pyarrow(tmp_path: Path, n: int, dims: list[int], rows: int | None) -> None:
    rng = _rng()
    table, xs = _table(n, dims, rng)
    path = tmp_path / "f.parquet"
    write_data_file(path, table, row_group_rows=rows)
    f = MappedParquetFile(path)
    assert f.num_rows == n and sum(f.row_group_rows) == n
    for d in dims:
        col = f"emb_{d}"
        start = 0
        for g, r in enumerate(f.row_group_rows):
            a = f.embedding(col, g)
            assert f.zero_copy(col, g)
            assert a.shape == (r, d) and a.dtype == np.float32 and a.flags.c_contiguous
            assert not a.flags.writeable and not a.flags.owndata and _backed_by_mmap(a)
            np.testing.assert_array_equal(a, _reference(path, col, g))
            np.testing.assert_array_equal(a, xs[d][start:start + r])
            start += r
        np.testing.assert_array_equal(f.embedding_rows(col), xs[d])
    f.close()


def test_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    write_data_file(path, pa.table({"row_id": pa.array([], pa.int64()),
                                    "emb_4": embedding_array(np.zeros((0, 4), np.float32))}))
    assert pq.read_table(path).num_rows == 0
    with MappedParquetFile(path) as f:
        assert f.num_rows == 0
        assert f.embedding_rows("emb_4").shape == (0, 4)
        for g in range(len(f.row_group_rows)):
            assert f.embedding("emb_4", g).shape == (0, 4)
            f.release("emb_4", g)


def test_views_are_read_only_and_outlive_close(tmp_path: Path) -> None:
    table, xs = _table(50, [16], _rng())
    path = tmp_path / "f.parquet"
    write_data_file(path, table)
    f = MappedParquetFile(path)
    a = f.embedding("emb_16", 0)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    f.close()
    np.testing.assert_array_equal(a, xs[16])  # the mapping lives as long as the view
    with pytest.raises(InvalidArgumentError, match="closed"):
        f.embedding("emb_16", 0)


def test_torch_shares_the_mapped_memory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    table, xs = _table(64, [24], _rng())
    path = tmp_path / "f.parquet"
    write_data_file(path, table)
    with MappedParquetFile(path) as f:
        a = f.embedding("emb_24", 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "array is not writable"
            t = torch.from_numpy(a)
        assert t.data_ptr() == a.ctypes.data
        assert torch.equal(t, torch.from_numpy(xs[24]))


def test_several_pages_per_chunk_v1_and_v2(tmp_path: Path) -> None:
    rng = _rng()
    d = 48
    x = rng.standard_normal((2000, d)).astype(np.float32)
    schema = pa.schema([pa.field("emb_48", embedding_type(d), nullable=False)])
    table = pa.table({"emb_48": embedding_array(x)}, schema=schema)
    for version in ("1.0", "2.0"):
        path = tmp_path / f"pages-{version}.parquet"
        pq.write_table(table, path, compression="none", use_dictionary=False,
                       write_statistics=False, data_page_size=20_000, max_rows_per_page=150,
                       row_group_size=1500, data_page_version=version)
        with MappedParquetFile(path) as f:
            for g in range(2):
                cc = _emb_chunk(path, "emb_48", g)
                spans = plain_value_spans(f._map(), cc.data_page_offset, cc.total_compressed_size,
                                          rows=f.row_group_rows[g], dim=d, max_rep=1, max_def=1)
                assert spans is not None and len(spans) > 1
                assert not f.zero_copy("emb_48", g)
                a = f.embedding("emb_48", g)
                assert a.flags.writeable and not _backed_by_mmap(a)
                np.testing.assert_array_equal(a, _reference(path, "emb_48", g))
            np.testing.assert_array_equal(f.embedding_rows("emb_48"), x)


def test_single_v1_page_is_zero_copy(tmp_path: Path) -> None:
    x = _rng().standard_normal((300, 10)).astype(np.float32)
    schema = pa.schema([pa.field("emb_10", embedding_type(10), nullable=False)])
    path = tmp_path / "v1.parquet"
    pq.write_table(pa.table({"emb_10": embedding_array(x)}, schema=schema), path,
                   compression="none", use_dictionary=False, data_page_version="1.0")
    with MappedParquetFile(path) as f:
        assert f.zero_copy("emb_10", 0)
        np.testing.assert_array_equal(f.embedding("emb_10", 0), x)


def _foreign_files(tmp_path: Path, x: np.ndarray) -> dict[str, Path]:
    import polars as pl

    d = x.shape[1]
    col = f"emb_{d}"
    nullable = pa.table({col: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)})
    out = {}
    out["pyarrow-defaults"] = tmp_path / "defaults.parquet"
    pq.write_table(nullable, out["pyarrow-defaults"], row_group_size=70)
    out["pyarrow-plain-nullable"] = tmp_path / "plain-nullable.parquet"
    pq.write_table(nullable, out["pyarrow-plain-nullable"], compression="none", use_dictionary=False)
    strict = pa.table({col: embedding_array(x)},
                      schema=pa.schema([pa.field(col, embedding_type(d), nullable=False)]))
    out["pyarrow-snappy-dict"] = tmp_path / "snappy-dict.parquet"
    pq.write_table(strict, out["pyarrow-snappy-dict"], compression="snappy", use_dictionary=True)
    out["pyarrow-zstd-v2"] = tmp_path / "zstd-v2.parquet"
    pq.write_table(strict, out["pyarrow-zstd-v2"], compression="zstd", use_dictionary=False,
                   data_page_version="2.0")
    out["variable-list"] = tmp_path / "list.parquet"
    pq.write_table(pa.table({col: pa.array(x.tolist(), pa.list_(pa.float32()))}), out["variable-list"])
    out["float64"] = tmp_path / "f64.parquet"
    pq.write_table(pa.table({col: pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float64).ravel()), d)}),
                   out["float64"], compression="none", use_dictionary=False)
    frame = pl.DataFrame({col: x}, schema={col: pl.Array(pl.Float32, d)})
    out["polars-default"] = tmp_path / "polars.parquet"
    frame.write_parquet(out["polars-default"])
    out["polars-uncompressed"] = tmp_path / "polars-raw.parquet"
    frame.write_parquet(out["polars-uncompressed"], compression="uncompressed", statistics=False)
    return out


@pytest.mark.parametrize("d", [1, 7, 384])
def test_foreign_files_take_the_fallback(tmp_path: Path, d: int) -> None:
    x = _rng().standard_normal((211, d)).astype(np.float32)
    for name, path in _foreign_files(tmp_path, x).items():
        with MappedParquetFile(path) as f:
            got = []
            for g in range(len(f.row_group_rows)):
                assert not f.zero_copy(f"emb_{d}", g), name
                a = f.embedding(f"emb_{d}", g)
                assert a.flags.owndata and a.flags.writeable and a.dtype == np.float32, name
                np.testing.assert_array_equal(a, _reference(path, f"emb_{d}", g), err_msg=name)
                got.append(a)
                f.release(f"emb_{d}", g)  # a no-op for decoded copies
            np.testing.assert_array_equal(np.concatenate(got), x, err_msg=name)


def test_ragged_or_null_foreign_lists_are_corrupt(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"emb_3": pa.array([[1.0, 2.0, 3.0], [1.0, 2.0]], pa.list_(pa.float32()))}), ragged)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"emb_2": pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))}), nulls)
    inner = tmp_path / "inner.parquet"
    pq.write_table(pa.table({"emb_2": pa.array([[1.0, None]], pa.list_(pa.float32(), 2))}), inner)
    for path, col in ((ragged, "emb_3"), (nulls, "emb_2"), (inner, "emb_2")):
        with MappedParquetFile(path) as f, pytest.raises(CorruptStoreError, match=path.name):
            f.embedding(col, 0)


def test_bad_arguments(tmp_path: Path) -> None:
    table, _ = _table(10, [4], _rng())
    path = tmp_path / "f.parquet"
    write_data_file(path, table)
    with MappedParquetFile(path) as f:
        for col, g in (("emb_4", 1), ("emb_4", -1), ("emb_8", 0), ("label", 0), ("emb_4", True)):
            with pytest.raises(InvalidArgumentError):
                f.embedding(col, g)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        MappedParquetFile(tmp_path / "missing.parquet")


# -- release ------------------------------------------------------------------------------------


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_release_drops_mapped_pages(tmp_path: Path) -> None:
    x = _rng().standard_normal((16_384, 1024)).astype(np.float32)  # 64 MiB, one row group
    path = tmp_path / "f.parquet"
    write_data_file(path, pa.table({"emb_1024": embedding_array(x)}))
    with MappedParquetFile(path) as f:
        a = f.embedding("emb_1024", 0)
        before = _rss_file_kib()
        assert float(a.sum(dtype=np.float64)) == pytest.approx(float(x.sum(dtype=np.float64)), rel=1e-6)
        touched = _rss_file_kib()
        f.release("emb_1024", 0)
        released = _rss_file_kib()
        assert touched - before > 48 * 1024  # the touched pages were resident...
        assert touched - released > 48 * 1024  # ...and release gave them back
        np.testing.assert_array_equal(a, x)  # the view still reads right (pages fault back in)
        f.release("emb_1024", 0)
        base = _rss_file_kib()
        float(a[:8192].sum())  # first half resident again
        f.release("emb_1024", 0, 0, 4096)  # give back the first quarter only
        quarter = _rss_file_kib()
        assert 12 * 1024 < base + 32 * 1024 - quarter < 20 * 1024
        with pytest.raises(InvalidArgumentError):
            f.release("emb_1024", 0, 5, 20_000)
        np.testing.assert_array_equal(a[:8192], x[:8192])


# -- damage ---------------------------------------------------------------------------------------


def _written(tmp_path: Path, n: int = 120, d: int = 12) -> tuple[Path, np.ndarray, bytes]:
    table, xs = _table(n, [d], _rng())
    path = tmp_path / "good.parquet"
    write_data_file(path, table)
    return path, xs[d], path.read_bytes()


def _read_or_corrupt(path: Path, column: str, expected: np.ndarray, **kw: bool) -> str:
    """Read every row group: equal to ``expected`` or CorruptStoreError naming the file."""
    try:
        with MappedParquetFile(path, **kw) as f:
            got = np.concatenate([f.embedding(column, g) for g in range(len(f.row_group_rows))])
    except CorruptStoreError as exc:
        assert path.name in str(exc)
        return "corrupt"
    np.testing.assert_array_equal(got, expected)
    return "equal"


def test_truncated_files_are_corrupt(tmp_path: Path) -> None:
    path, _, raw = _written(tmp_path)
    cc = _emb_chunk(path, "emb_12")
    cuts = {0, 3, 11, cc.data_page_offset + 5, cc.data_page_offset + cc.total_compressed_size // 2,
            len(raw) - 9, len(raw) - 1}
    for cut in sorted(cuts):
        bad = tmp_path / f"cut-{cut}.parquet"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CorruptStoreError, match=bad.name), MappedParquetFile(bad) as f:
            f.embedding("emb_12", 0)


def test_truncated_page_with_intact_footer_is_corrupt(tmp_path: Path) -> None:
    # The embedding column is the last chunk, so a shortened page now overlaps the footer.
    x = _rng().standard_normal((80, 6)).astype(np.float32)
    path = tmp_path / "good.parquet"
    write_data_file(path, pa.table({"row_id": pa.array(np.arange(80)), "emb_6": embedding_array(x)}))
    raw = path.read_bytes()
    cc = _emb_chunk(path, "emb_6")
    end = cc.data_page_offset + cc.total_compressed_size
    for k in (1, 4, 100):
        bad = tmp_path / f"short-{k}.parquet"
        bad.write_bytes(raw[:end - k] + raw[end:])
        assert _read_or_corrupt(bad, "emb_6", x) == "corrupt"


def test_every_header_byte_flip_is_caught_or_harmless(tmp_path: Path) -> None:
    path, x, raw = _written(tmp_path)
    cc = _emb_chunk(path, "emb_12")
    start = cc.data_page_offset
    header = parse_page_header(raw[start:start + 256])
    assert header.type == PAGE_DATA_V2 and header.crc is not None
    outcomes = set()
    for i in range(start, start + header.header_size + 8):  # the header and the first level bytes
        for mask in (0x01, 0x10, 0x80, 0xFF):
            bad = tmp_path / f"flip-{i}-{mask}.parquet"
            bad.write_bytes(raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:])
            outcomes.add(_read_or_corrupt(bad, "emb_12", x))
            bad.unlink()
    assert "corrupt" in outcomes


def test_checksums_catch_flipped_values(tmp_path: Path) -> None:
    path, x, raw = _written(tmp_path)
    cc = _emb_chunk(path, "emb_12")
    i = cc.data_page_offset + cc.total_compressed_size - 7  # inside the float values
    bad = tmp_path / "value-flip.parquet"
    bad.write_bytes(raw[:i] + bytes([raw[i] ^ 0x40]) + raw[i + 1:])
    with pytest.raises(OSError):  # pyarrow with checksum verification agrees that it is damaged
        pq.ParquetFile(bad, page_checksum_verification=True).read()
    assert _read_or_corrupt(bad, "emb_12", x, verify_checksums=True) == "corrupt"
    assert _read_or_corrupt(path, "emb_12", x, verify_checksums=True) == "equal"


def _patch_footer_codec(raw: bytes, codec: int) -> bytes:
    """Set the codec of the ``emb_*.list.element`` ColumnMetaData in the footer to ``codec``."""
    footer_len = int.from_bytes(raw[-8:-4], "little")
    start = len(raw) - 8 - footer_len
    # path_in_schema ends with the string "element"; the codec (field 4, i32) follows: 0x15 <zigzag>.
    i = raw.index(b"\x07element\x15\x00", start) + 9
    return raw[:i] + bytes([codec * 2]) + raw[i + 1:]


@pytest.mark.parametrize("codec", [1, 2, 6])  # SNAPPY, GZIP, ZSTD
def test_wrong_codec_in_footer(tmp_path: Path, codec: int) -> None:
    _, x, raw = _written(tmp_path)
    bad = tmp_path / "codec.parquet"
    bad.write_bytes(_patch_footer_codec(raw, codec))
    assert _emb_chunk(bad, "emb_12").compression != "UNCOMPRESSED"
    with MappedParquetFile(bad) as f:
        assert not f.zero_copy("emb_12", 0)
    # pyarrow skips decompression of v2 pages flagged is_compressed=false, so equal is correct here.
    assert _read_or_corrupt(bad, "emb_12", x) in ("equal", "corrupt")


def test_compressed_flag_in_page_header(tmp_path: Path) -> None:
    path, x, raw = _written(tmp_path)
    start = _emb_chunk(path, "emb_12").data_page_offset
    h = parse_page_header(raw[start:start + 256])
    assert h.data_page_header_v2 is not None and not h.data_page_header_v2.is_compressed
    # is_compressed=false is field 7 (bool) of the v2 header: type nibble 2 (false) -> 1 (true).
    window = raw[start:start + h.header_size]
    pad = window.find(bytes([0x08, 0xFE, 0xFF, 0x03]))  # the alignment padding field comes last
    j = (window if pad < 0 else window[:pad]).rindex(b"\x12")
    bad = tmp_path / "flag.parquet"
    bad.write_bytes(raw[:start + j] + b"\x11" + raw[start + j + 1:])
    hb = parse_page_header(bad.read_bytes()[start:start + 256])
    assert hb.data_page_header_v2 is not None and hb.data_page_header_v2.is_compressed
    assert _read_or_corrupt(bad, "emb_12", x) == "equal"  # the codec is UNCOMPRESSED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_header_region(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "fuzz-base.parquet"
    if not path.exists():
        x = np.random.default_rng().standard_normal((40, 5)).astype(np.float32)
        write_data_file(path, pa.table({"row_id": pa.array(np.arange(40)), "emb_5": embedding_array(x)}))
        np.save(tmp_path / "x.npy", x)
    x = np.load(tmp_path / "x.npy")
    raw = path.read_bytes()
    start = _emb_chunk(path, "emb_5").data_page_offset
    length = data.draw(st.integers(1, 48))
    offset = data.draw(st.integers(start, start + 40))
    junk = data.draw(st.binary(min_size=length, max_size=length))
    bad = tmp_path / "fuzz.parquet"
    bad.write_bytes(raw[:offset] + junk + raw[offset + length:])
    _read_or_corrupt(bad, "emb_5", x, verify_checksums=True)  # the CRC covers levels and values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_header_bytes_without_checksums(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "fuzz-base.parquet"
    if not path.exists():
        x = np.random.default_rng().standard_normal((40, 5)).astype(np.float32)
        write_data_file(path, pa.table({"row_id": pa.array(np.arange(40)), "emb_5": embedding_array(x)}))
        np.save(tmp_path / "x.npy", x)
    x = np.load(tmp_path / "x.npy")
    raw = path.read_bytes()
    start = _emb_chunk(path, "emb_5").data_page_offset
    size = parse_page_header(raw[start:start + 256]).header_size
    offset = data.draw(st.integers(start, start + size - 1))
    length = data.draw(st.integers(1, start + size - offset))
    junk = data.draw(st.binary(min_size=length, max_size=length))
    bad = tmp_path / "fuzz.parquet"
    bad.write_bytes(raw[:offset] + junk + raw[offset + length:])
    _read_or_corrupt(bad, "emb_5", x)


# -- page headers and page walking against pyarrow's metadata -----------------------------------


def _walk(raw: bytes, start: int, length: int) -> list:
    pos, headers = start, []
    while pos < start + length:
        h = parse_page_header(raw[pos:pos + (1 << 16)])
        headers.append(h)
        pos += h.header_size + h.compressed_page_size
    assert pos == start + length
    return headers


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_page_headers_of_rich_files(version: str) -> None:
    rng = _rng()
    n = 3000
    table = pa.table({
        "i": pa.array(rng.integers(0, 50, n)),
        "s": pa.array([f"s{v}" * int(rng.integers(1, 4)) for v in rng.integers(0, 9, n)]),
        "f": pa.array(np.where(rng.random(n) < 0.1, np.nan, rng.random(n))),
        "nested": pa.array([[float(v)] * int(k) for v, k in zip(rng.random(n), rng.integers(0, 4, n), strict=True)]),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, data_page_size=4096, data_page_version=version,
                   write_page_checksum=True, write_statistics=True, row_group_size=1000)
    raw = buf.getvalue()
    meta = pq.ParquetFile(io.BytesIO(raw)).metadata
    kinds = set()
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            cc = meta.row_group(g).column(c)
            start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
            headers = _walk(raw, start, cc.total_compressed_size)
            data = [h for h in headers if h.type in (PAGE_DATA, PAGE_DATA_V2)]
            counts = [(h.data_page_header or h.data_page_header_v2).num_values for h in data]
            assert sum(counts) == cc.num_values
            assert all(h.crc is not None for h in headers)
            kinds |= {h.type for h in headers}
            if cc.has_dictionary_page:
                assert headers[0].type == PAGE_DICTIONARY and headers[0].dictionary_num_values
    assert PAGE_DICTIONARY in kinds and (PAGE_DATA if version == "1.0" else PAGE_DATA_V2) in kinds


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x15",
        b"\x15\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # varint of 11 bytes
        b"\x15\x04\x15\x02\x15\x02\x98\xff\xff\xff\x0f",  # field 9: binary of absurd length
        b"\x15\x04\x15\x02\x15\x02\x99\xf8\xff\xff\xff\x0f",  # list of absurd size
        b"\x15\x04\x15\x02\x15\x02" + b"\x9c" + b"\x1c" * 40,  # nesting deeper than 32
        b"\x15\x04\x15\x02\x15\x02\x9d",  # compact type 13 is unknown
        b"\x15\x04\x15\x03\x15\x02\x00",  # negative uncompressed size
        b"\x15\x04\x15\x02\x00",  # compressed size missing
        b"\x16\x04\x15\x02\x15\x02\x00",  # type field as i64
        b"\x15\x06\x15\x02\x15\x02\x5c\x15\x02\x00\x00",  # v2 header missing required fields
        b"\x15\x80\x80\x80\x80\x10\x15\x02\x15\x02\x00",  # i32 out of range
    ],
)
def test_malformed_headers_raise_thrift_error(raw: bytes) -> None:
    with pytest.raises(ThriftError):
        parse_page_header(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_header_parser_never_fails_otherwise(raw: bytes) -> None:
    try:
        h = parse_page_header(raw)
    except ThriftError:
        return
    assert 0 < h.header_size <= len(raw)
    assert h.compressed_page_size >= 0 and h.uncompressed_page_size >= 0


def test_plain_value_spans_rejects_out_of_file_chunk() -> None:
    with pytest.raises(LayoutError):
        plain_value_spans(b"PAR1", 2, 10, rows=1, dim=1, max_rep=1, max_def=1)
