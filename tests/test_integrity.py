"""Issue 16, items 2, 3, 5, 6, 7: hostile manifests and damaged data files give CorruptStoreError
naming the file from every call, never wrong rows, a crash or a hang; compact/delete never rewrite
damage; ``store.verify()`` / ``embtools verify`` report it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import embtools as et
from embtools.cli import cli
from embtools.errors import CorruptStoreError, FilterError
from embtools.storage.footer import parse_footer
from embtools.storage.manifest import list_versions

D = 8
N = 40  # rows per file; two files


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2 * N, D)).astype(np.float32)


def _make(path: Path) -> tuple[et.EmbeddingStore, np.ndarray]:
    x = _x()
    s = et.EmbeddingStore(path, backend="numpy")
    for f in range(2):
        rows = slice(f * N, (f + 1) * N)
        s.add(x[rows], text_ids=[f"t{i}" for i in range(f * N, (f + 1) * N)],
              metadata={"year": list(range(2000 + f * N, 2000 + (f + 1) * N))})
    return s, x


@pytest.fixture
def made(tmp_path: Path) -> tuple[str, np.ndarray]:
    s, x = _make(tmp_path / "s")
    assert s.path is not None
    return s.path, x


def _latest(root: str) -> Path:
    return Path(root) / "_versions" / f"{list_versions(root)[-1]:020d}.json"


def _edit(root: str, fn) -> None:
    p = _latest(root)
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def _first_file(root: str, i: int = 0) -> Path:
    m = json.loads(_latest(root).read_text())
    return Path(root) / m["files"][i]["path"]


def _calls() -> dict:
    q = np.ones(D, np.float32)
    return {
        "get_embeddings": lambda s: s.get_embeddings(D),
        "iter_batches": lambda s: list(s.iter_batches(D)),
        "search": lambda s: s.search(q, k=3),
        "search_where": lambda s: s.search(q, k=3, where="year > 2010"),
        "metadata": lambda s: s.metadata().collect(),
        "delete": lambda s: s.delete("year < 2003"),
        "compact": lambda s: s.compact(),
        "files": lambda s: s.files(),
    }


def _all_corrupt(root: str, name: str | None, skip: tuple[str, ...] = ()) -> None:
    """Every call (but ``skip``) raises CorruptStoreError naming ``name``; nothing is committed."""
    versions = list_versions(root)
    for call, fn in _calls().items():
        if call in skip:
            continue
        s = et.EmbeddingStore(root, backend="numpy")
        with pytest.raises(CorruptStoreError) as info:
            fn(s)
        if name is not None:
            assert name in str(info.value), (call, str(info.value))
        assert list_versions(root) == versions, call


# -- item 2: manifest paths confined ------------------------------------------------------------

@pytest.mark.parametrize("bad", ["/etc/passwd", "../other.store/data/{hex}.parquet", "data",
                                 "data/", "data/{hex}.parquet/../{hex}.parquet", "data/x.parquet"])
def test_manifest_path_outside_data_files(made, bad) -> None:
    root, _ = made
    other, _ = _make(Path(root).parent / "other.store")  # a real store next door
    hexname = Path(other.files()[0]).stem
    _edit(root, lambda m: {**m, "files": [{**m["files"][0], "path": bad.format(hex=hexname)},
                                          *m["files"][1:]]})
    with pytest.raises(CorruptStoreError, match=r"data/<32 hex digits>\.parquet"):
        et.EmbeddingStore(root, backend="numpy")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder", "missing"])
def test_data_file_that_is_not_a_regular_file(made, kind) -> None:
    root, _ = made
    f = _first_file(root)
    os.unlink(f)
    if kind == "fifo":
        os.mkfifo(f)  # opening it for reading would block forever
    elif kind == "symlink":
        os.symlink("/etc/passwd", f)
    elif kind == "folder":
        os.mkdir(f)
    _all_corrupt(root, f.name)


def test_compact_never_commits_a_file_from_outside(made) -> None:
    """Another store's file linked in under a valid name is refused, never copied in."""
    root, _ = made
    other, _ = _make(Path(root).parent / "other.store")
    s = et.EmbeddingStore(root, backend="numpy")
    versions = list_versions(root)
    f = _first_file(root)
    os.unlink(f)
    os.symlink(other.files()[0], f)
    with pytest.raises(CorruptStoreError, match="not a regular file"):
        s.compact(target_file_bytes=10**9)
    assert list_versions(root) == versions


# -- item 3: manifest counts cross-checked --------------------------------------------------------

def _set_file(i: int, **kw):
    def fn(m):
        m["files"][i].update(kw)
        return m
    return fn


@pytest.mark.parametrize("edit", [
    _set_file(1, num_rows=N + 1, row_groups=[N + 1], row_id_max=2 * N),     # more rows than the file
    _set_file(1, num_rows=N - 1, row_groups=[N - 1]),                        # fewer rows than the file
    _set_file(1, num_rows=2**50, row_groups=[2**50], row_id_max=2**51),      # huge: no allocation
    _set_file(1, row_id_min=1000, row_id_max=1000 + N - 1),                 # ids not the file's
    _set_file(1, bytes=12345),                                               # size
    _set_file(1, footer_crc=12345),                                          # footer checksum
])
def test_manifest_counts_checked_against_the_footer(made, edit) -> None:
    root, _ = made
    _edit(root, edit)
    _all_corrupt(root, _first_file(root, 1).name)


@pytest.mark.parametrize("edit", [
    _set_file(0, num_rows=-1),
    _set_file(0, num_rows="40"),
    _set_file(0, num_rows=40.0),
    _set_file(0, row_groups=[N, 1]),
    _set_file(0, row_groups="40"),
    _set_file(0, footer_crc=-5),
    lambda m: {**m, "files": [m["files"][0], m["files"][0], m["files"][1]]},             # repeated
    lambda m: {**m, "files": [m["files"][0], {**m["files"][1], "row_id_min": 5}]},       # overlapping
    lambda m: {**m, "files": m["files"][::-1]},                                          # out of order
    lambda m: None,
    lambda m: [m],
    lambda m: "x",
    lambda m: {**m, "files": None},
    lambda m: {**m, "files": [None]},
    lambda m: {**m, "version": True},
    lambda m: {**m, "dimensions": [8, 8]},
    lambda m: {**m, "properties": [1]},
    lambda m: {k: v for k, v in m.items() if k != "schema"},
])
def test_malformed_manifest(made, edit) -> None:
    root, _ = made
    _edit(root, edit)
    with pytest.raises(CorruptStoreError, match="unreadable manifest"):
        et.EmbeddingStore(root, backend="numpy")


def test_deeply_nested_manifest(made) -> None:
    root, _ = made
    _latest(root).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptStoreError, match="unreadable manifest"):
        et.EmbeddingStore(root, backend="numpy")


# -- item 5: damaged values detected --------------------------------------------------------------

def _chunk(path: Path, column: str, rg: int = 0):
    footer = parse_footer(path.read_bytes())
    return next(c for c in footer.row_groups[rg][1] if c.name == column)


def _flip(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x10]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_value_is_never_returned(made) -> None:
    root, x = made
    f = _first_file(root)
    c = _chunk(f, f"emb_{D}")
    _flip(f, c.start + c.length - 4 * 7 - 1)  # a byte of row N-2's values
    # every call that reads the vectors (metadata() and files() read none)
    _all_corrupt(root, f.name, skip=("metadata", "files"))
    s = et.EmbeddingStore(root, backend="numpy")
    assert s.metadata().collect().height == 2 * N
    np.testing.assert_array_equal(s.get_embeddings(D, where=f"year >= {2000 + N}"), x[N:])
    report = et.EmbeddingStore(root, backend="numpy").verify()
    assert not report.ok and report.files_checked == 2
    assert [p for p, _ in report.damaged] == [str(f)]
    assert "CRC-32" in report.damaged[0][1]


def test_flipped_metadata_page_is_caught_before_filters(made) -> None:
    root, _ = made
    f = _first_file(root)
    c = _chunk(f, "year")
    _flip(f, c.start + c.length - 3)  # inside the zstd data page of the year column
    s = et.EmbeddingStore(root, backend="numpy")
    for fn in (lambda: s.delete("year < 2003"), lambda: s.get_embeddings(D, where="year < 2003"),
               lambda: s.metadata()):
        with pytest.raises(CorruptStoreError, match=f.name):
            fn()
    assert s.num_rows == 2 * N


def test_flipped_footer_statistic_is_caught(made) -> None:
    """A flipped ``year`` max would make a filter skip the row group: the footer CRC catches it."""
    root, _ = made
    f = _first_file(root)
    raw = f.read_bytes()
    footer_start = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    stat = (2000 + N - 1).to_bytes(8, "little")  # the year column's max statistic
    at = raw.index(stat, footer_start)
    _flip(f, at)
    _all_corrupt(root, f.name)


def test_compact_and_delete_verify_even_after_a_cached_read(made) -> None:
    """A file read (and verified) earlier in the process, then damaged in place with the same size
    and mtime: reads may trust the cache, but compact and delete check every page again."""
    root, x = made
    s = et.EmbeddingStore(root, backend="numpy")
    np.testing.assert_array_equal(s.get_embeddings(D), x)
    f = _first_file(root)
    c = _chunk(f, f"emb_{D}")
    _flip(f, c.start + c.length - 2, keep_mtime=True)
    versions = list_versions(root)
    for fn in (lambda: s.compact(target_file_bytes=10**9), lambda: s.delete("year = 2001")):
        with pytest.raises(CorruptStoreError, match="CRC-32"):
            fn()
    assert list_versions(root) == versions
    assert not s.verify().ok


def test_verify_clean_store_and_cli(made) -> None:
    root, _ = made
    s = et.EmbeddingStore(root, backend="numpy")
    report = s.verify()
    assert report.ok and report.files_checked == 2 and report.damaged == []
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", root])
    assert ok.exit_code == 0 and "2 files checked" in ok.output
    f = _first_file(root)
    c = _chunk(f, "text_id")
    _flip(f, c.start + c.length - 2)
    bad = runner.invoke(cli, ["verify", root])
    assert bad.exit_code == 1
    assert f"DAMAGED {f}" in bad.output and "1 of 2 files damaged" in bad.output
    # the undamaged file still reads correctly
    assert et.EmbeddingStore(root, backend="numpy").verify().damaged[0][0] == str(f)


def test_reads_are_exact_with_verification(made) -> None:
    root, x = made
    s = et.EmbeddingStore(root, backend="numpy")
    np.testing.assert_array_equal(s.get_embeddings(D), x)
    np.testing.assert_array_equal(s.get_embeddings(D, where="year >= 2070"), x[70:])
    meta = s.metadata().collect()
    assert meta["year"].to_list() == list(range(2000, 2000 + 2 * N))


# -- item 6: damaged footers never abort the process ---------------------------------------------

_CHILD = """
import sys, numpy as np, embtools as et
from embtools.errors import EmbtoolsError
root = sys.argv[1]
for name, fn in [("get", lambda s: s.get_embeddings(8)), ("where", lambda s: s.get_embeddings(8, where="year > 2001")),
                 ("meta", lambda s: s.metadata().collect()), ("delete", lambda s: s.delete("year < 2003")),
                 ("compact", lambda s: s.compact(10**9))]:
    try:
        fn(et.EmbeddingStore(root, backend="numpy"))
        print(name, "ok")
    except EmbtoolsError as e:
        print(name, type(e).__name__)
"""


@pytest.mark.parametrize("codec", [3, 8, 100])
def test_flipped_codec_in_a_legacy_footer(made, codec) -> None:
    """A file committed without a footer CRC: the codec id is checked by embtools before pyarrow
    (which aborts the process on an unknown one)."""
    root, _ = made
    _edit(root, lambda m: {**m, "files": [{k: v for k, v in f.items() if k != "footer_crc"}
                                          for f in m["files"]]})
    f = _first_file(root)
    raw = bytearray(f.read_bytes())
    footer_start = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    at = raw.index(b"\x15\x0c\x16", footer_start)  # ColumnMetaData.codec = ZSTD (6), zigzag 0x0c
    raw[at + 1] = 2 * codec
    f.write_bytes(bytes(raw))
    out = subprocess.run([sys.executable, "-c", _CHILD, root], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [w for name in ("get", "where", "meta", "delete", "compact")
                                  for w in (name, "CorruptStoreError")], out.stdout


# -- item 7: the same missing or truncated file, the same error from every call --------------------

@pytest.mark.parametrize("damage", ["missing", "truncated", "emptied", "garbage"])
def test_missing_or_truncated_file_same_error_everywhere(made, damage) -> None:
    root, _ = made
    f = _first_file(root)
    raw = f.read_bytes()
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "emptied":
        f.write_bytes(b"")
    else:
        f.write_bytes(b"\xff" * len(raw))
    _all_corrupt(root, f.name)


def test_where_errors_stay_filter_errors(made) -> None:
    root, _ = made
    s = et.EmbeddingStore(root, backend="numpy")
    with pytest.raises(FilterError):
        s.get_embeddings(D, where=pl.col("nope") > 1)


def test_legacy_entries_without_checksums_use_the_page_crcs(made) -> None:
    """Entries committed before the manifest recorded checksums: reads are exact, row-group
    statistics are not trusted, and each page is checked against the CRC-32 in its header."""
    root, x = made
    _edit(root, lambda m: {**m, "files": [{k: v for k, v in f.items()
                                           if k not in ("footer_crc", "chunk_crcs")}
                                          for f in m["files"]]})
    s = et.EmbeddingStore(root, backend="numpy")
    assert s.verify().ok
    np.testing.assert_array_equal(s.get_embeddings(D, where="year >= 2075"), x[75:])
    f = _first_file(root)
    c = _chunk(f, f"emb_{D}")
    _flip(f, c.start + c.length - 5)
    _all_corrupt(root, f.name, skip=("metadata", "files"))
    assert "page at byte" in et.EmbeddingStore(root, backend="numpy").verify().damaged[0][1]
