"""Regression tests of issue 16 (hardening): hostile ``where`` strings, stores whose files differ in
their metadata columns, maintenance races, bad inputs, the CLI's error handling and output escaping,
and the reader's memory within a large row group. Results are checked against NumPy brute force."""

from __future__ import annotations

import errno
import os
import warnings

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import embtools as et
from embtools.cli import cli
from embtools.errors import (
    DuplicateTextIdError,
    FilterError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    SnapshotExpiredError,
    StorageFullError,
)
from embtools.storage import io as storage_io
from embtools.storage import manifest as mf
from embtools.storage import writer


def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _cosine_top(x: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """Row positions of the cosine top-k over ``rows`` by float64 brute force (ties to the lower)."""
    c = x[rows].astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ c.T
    order = np.lexsort((np.broadcast_to(rows, s.shape), -s), axis=1)[:, :k]
    return rows[order]


# ------------------------------------------------------------------- 4: metadata columns per file
def test_new_metadata_column_does_not_block_later_appends(tmp_path):
    path = tmp_path / "s"
    store = et.EmbeddingStore(path, backend="numpy")
    x = _rows(12, 8)
    store.add(x[:4], text_ids=list("abcd"), metadata={"year": [1, 2, 3, 4]})
    store.add(x[4:8], text_ids=list("efgh"), metadata={"year": [5, 6, 7, 8], "source": list("wxyz")})
    store.add(x[8:10], text_ids=["i", "j"], metadata={"year": [9, 10]})  # raw SchemaError before
    with pytest.raises(DuplicateTextIdError):
        store.add(x[10:11], text_ids=["f"])  # the duplicate check reads every file's text_id
    # and the CLI's ingest appends to it too
    pl.DataFrame({"id": ["k", "l"], "vec": x[10:12].tolist(), "year": [11, 12]}).write_parquet(
        tmp_path / "more.parquet")
    result = CliRunner().invoke(cli, ["ingest", str(path), str(tmp_path / "more.parquet"), "--id-column",
                                      "id", "--vector-column", "vec", "--metadata-columns", "year"])
    assert result.exit_code == 0, result.output
    store.refresh()
    assert len(store.files()) == 4
    meta = store.metadata().collect()
    assert meta["text_id"].to_list() == list("abcdefghijkl")
    assert meta["year"].to_list() == list(range(1, 13))
    assert meta["source"].to_list() == [None] * 4 + list("wxyz") + [None] * 4
    # filters and searches over a column some files lack: those rows are null (never match)
    assert np.array_equal(store.get_embeddings(8, where="source IN ('x', 'z')"), x[[5, 7]])
    res = store.search(x[:2], k=3, where=pl.col("year") > 2, columns=["source"])
    top = _cosine_top(x, x[:2], 3, np.arange(2, 12)).ravel()
    assert res["text_id"].to_list() == meta["text_id"].gather(top).to_list()
    assert res["source"].to_list() == meta["source"].gather(top).to_list()
    # joins, delete and compact keep working and keep the nulls
    from embtools.search.join import similarity_join

    out = similarity_join(store, store, 1, tmp_path / "join", where="source = 'w'")
    assert pl.read_parquet(f"{out}/*.parquet")["right_text_id"].unique().to_list() == ["e"]
    store.delete("source = 'y' OR year = 1")
    assert store.compact() > 0 and len(store.files()) == 1
    meta = et.EmbeddingStore(path, backend="numpy").metadata().collect()
    assert meta["text_id"].to_list() == list("bcdefhijkl")
    assert meta["source"].to_list() == [None] * 3 + ["w", "x", "z"] + [None] * 4
    assert np.array_equal(store.get_embeddings(8), x[[1, 2, 3, 4, 5, 7, 8, 9, 10, 11]])


# ------------------------------------------------------------------------- 1: safe where strings
@pytest.fixture()
def small_store(tmp_path):
    x = _rows(40, 8, 1)
    rng = np.random.default_rng(2)
    labels = rng.choice(["news", "paper", "Code"], 40).tolist()
    years = rng.integers(2000, 2024, 40).tolist()
    note = [None if i % 5 == 0 else f"n_{i}%" for i in range(40)]
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, text_ids=[f"t{i}" for i in range(40)], labels=labels,
              metadata={"year": years, "note": note})
    return store, x, np.array(labels), np.array(years), note


def test_where_grammar_matches_numpy(small_store):
    store, x, labels, years, note = small_store
    has_note = np.array([n is not None for n in note])
    cases = {
        "label = 'news' AND year >= 2010": (labels == "news") & (years >= 2010),
        "NOT (label <> 'paper') OR year < 2003": (labels == "paper") | (years < 2003),
        "year BETWEEN 2005 AND 2010": (years >= 2005) & (years <= 2010),
        "year NOT BETWEEN 2005 AND 2010": (years < 2005) | (years > 2010),
        "label IN ('news', 'Code') AND year % 2 = 0": np.isin(labels, ["news", "Code"]) & (years % 2 == 0),
        "label NOT IN ('news')": labels != "news",
        "lower(label) = 'code'": labels == "Code",
        "label ILIKE 'c%'": labels == "Code",
        "label LIKE 'pa_er'": labels == "paper",
        "note LIKE 'n\\_1%'": np.array([n is not None and n.startswith("n_1") for n in note]),
        "note IS NULL": ~has_note,
        "note IS NOT NULL AND length(note) = 4": np.array([n is not None and len(n) == 4 for n in note]),
        "(year - 2000) * 2 + 1 > 30 AND -year < -2010": ((years - 2000) * 2 + 1 > 30) & (years > 2010),
        "\"year\" = 2003 OR row_id IN (1, 2, 3)": (years == 2003) | np.isin(np.arange(40), [1, 2, 3]),
        "label || '!' = 'news!'": labels == "news",
        "TRUE": np.ones(40, dtype=bool),
    }
    for where, mask in cases.items():
        assert store.source.select(where).tolist() == np.flatnonzero(mask).tolist(), where
    q = _rows(3, 8, 9)
    res = store.search(q, k=4, where="label = 'news' AND year >= 2010")
    rows = np.flatnonzero(cases["label = 'news' AND year >= 2010"])
    assert res["row_id"].to_list() == _cosine_top(x, q, 4, rows).ravel().tolist()


_FRAME = pl.DataFrame({
    "year": [2001, 2005, None, 2010, 2020, 1999, 2005, 2015],
    "label": ["news", "paper", "Code", None, "news", "a_b", "50%", "paper"],
    "score": [0.5, -1.25, 3.0, 0.0, None, 2.5, -0.5, 1.0],
})


def _predicates():
    from hypothesis import strategies as st

    num = st.sampled_from(["year", "score", "1", "2005", "-3", "2.5", "(year - 2000)", "score * 2",
                           "year + score", "abs(score)", "NULL", "(2003 - year) % 4", "score % -2",
                           "year / 4", "-score / 3"])
    text = st.sampled_from(["label", "'news'", "'paper'", "lower(label)", "upper(label)", "NULL",
                            "label || 'x'"])
    op = st.sampled_from(["=", "<>", "!=", "<", "<=", ">", ">="])
    atom = st.one_of(
        st.tuples(num, op, num).map(" ".join),
        st.tuples(text, op, text).map(" ".join),
        st.tuples(st.sampled_from(["year", "score", "label"]), st.sampled_from(["IS NULL", "IS NOT NULL"])).map(" ".join),
        st.tuples(st.sampled_from(["year", "year + 1"]), st.sampled_from(["IN (2005, 2010)", "NOT IN (1999)", "BETWEEN 2000 AND 2010", "NOT BETWEEN 2004 AND 2016"])).map(" ".join),
        st.tuples(st.sampled_from(["label IN ('news', 'a_b')", "label NOT IN ('paper')"])).map(" ".join),
        # (a backslash escapes % and _ here, as in PostgreSQL; polars' SQL has no escape)
        st.sampled_from(["label LIKE 'p%'", "label LIKE '%e%'", "label NOT LIKE 'n___'",
                         "label LIKE 'a_b'", "label ILIKE 'CODE'", "label LIKE '50%'", "TRUE", "FALSE"]),
    )
    return st.recursive(atom, lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["AND", "OR"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda p: f"NOT ({p})"),
    ), max_leaves=6)


def test_where_parser_agrees_with_polars_sql_on_its_grammar():
    """The parser's predicates select what polars' own SQL would (run here on a frame in memory,
    never on a store), for random predicates of comparisons, arithmetic, IN, BETWEEN, IS NULL,
    LIKE, functions, AND, OR and NOT."""
    from hypothesis import given, settings

    from embtools.storage.predicate import parse_predicate

    @settings(max_examples=300, deadline=None)
    @given(_predicates())
    def check(where):
        ours = _FRAME.with_row_index("i").filter(parse_predicate(where, _FRAME.columns))["i"].to_list()
        theirs = _FRAME.with_row_index("i").filter(pl.sql_expr(where))["i"].to_list()
        assert ours == theirs, where

    check()


def test_where_cannot_read_files_or_leak_them(small_store, tmp_path):
    store, *_ = small_store
    secret = tmp_path / "secret.csv"
    secret.write_text("x\nTOPSECRET-LINE\n")
    hostile = [
        f"text_id = (SELECT x FROM read_csv('{secret}') LIMIT 1)",
        f"text_id IN (SELECT * FROM read_csv('{secret}'))",
        f"read_csv('{secret}') IS NOT NULL",
        f"text_id = 'a' UNION SELECT x FROM read_parquet('{secret}')",
        "year = 1; DROP TABLE t",
        "year = pg_read_file('/etc/passwd')",
        "(" * 10_000 + "year = 1" + ")" * 10_000,
        "NOT " * 10_000 + "year = 1",
        " OR ".join(["year = 1"] * 2_000),
        "no_such_column = 1",
        "year = = 1",
        "",
    ]
    for where in hostile:
        with pytest.raises(FilterError) as info:
            store.source.select(where)
        assert "TOPSECRET" not in str(info.value) and len(str(info.value)) < 1_000, where
    with pytest.raises(FilterError, match="unknown column"):
        store.search(_rows(1, 8), k=2, where=pl.col("secret_col") == 1)
    with pytest.raises(FilterError, match="unknown column"):
        store.delete(pl.col("year").is_in([1]) | (pl.col("nope") > 0))
    assert store.num_rows == 40  # nothing was deleted
    # the CLI: one clean line, no data from the file, no object repr
    np.save(tmp_path / "q.npy", _rows(1, 8))
    for where in (hostile[0], "nope > 1", "year = = 1"):
        for cmd in (["search", str(store.path), "--queries", str(tmp_path / "q.npy")],
                    ["delete", str(store.path)]):
            result = CliRunner().invoke(cli, [*cmd, "--where", where])
            assert result.exit_code == 1, (cmd, result.output)
            assert "TOPSECRET" not in result.output and "<Expr" not in result.output
            assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- 8: maintenance races
def _listing(root) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(os.path.join(root, "data"))), sorted(os.listdir(os.path.join(root, "_versions")))


def test_open_retries_when_vacuum_removes_the_newest_version_it_found(tmp_path, monkeypatch):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    x = _rows(6, 4)
    for i in range(3):
        store.add(x[2 * i:2 * i + 2])
    root = store.path
    # the race: an opener lists versions up to 3, then a writer commits 4 and vacuum removes 0..3
    stale = mf.list_versions(root)
    store.add(_rows(1, 4, 5))
    store.vacuum(retain_versions=1, grace_seconds=0)
    real = mf.list_versions
    calls = iter([stale])
    monkeypatch.setattr(mf, "list_versions", lambda r, after=None: next(calls, None) or real(r, after))
    opened = et.EmbeddingStore(root, backend="numpy")  # "has no version 3" before
    assert opened.version == 4 and opened.num_rows == 7
    assert np.array_equal(opened.get_embeddings(4)[:6], x)


def test_vacuums_tolerate_files_removed_by_a_racing_process(tmp_path, monkeypatch):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    x = _rows(8, 4)
    for i in range(4):
        store.add(x[2 * i:2 * i + 2])
    store.compact()
    root = store.path
    tmp = os.path.join(root, "_versions", ".tmp-abc.json")  # a writer's temporary manifest
    open(tmp, "w").close()
    real = os.path.getmtime
    seen: set[str] = set()

    def racing_getmtime(path):  # another vacuum (or the writer) removes each file just before
        if path not in seen:
            seen.add(path)
            if os.path.basename(path) != f"{store.version:020d}.json":
                os.unlink(path)
        return real(path)

    monkeypatch.setattr(os.path, "getmtime", racing_getmtime)
    store.vacuum(retain_versions=1, grace_seconds=0)  # raw FileNotFoundError before
    monkeypatch.undo()
    data, versions = _listing(root)
    assert versions == [f"{store.version:020d}.json"] and len(data) == 1
    assert np.array_equal(et.EmbeddingStore(root, backend="numpy").get_embeddings(4), x)


def test_commit_never_lands_below_versions_that_vacuum_left(tmp_path, monkeypatch):
    """A writer reads version N; others commit N+1 and N+2 and vacuum removes N and N+1: the
    writer's link of N+1 then succeeds, under N+2 (its rows were lost before: an add that returned
    a version no later version contained)."""
    path = tmp_path / "s"
    x = _rows(8, 4)
    slow = et.EmbeddingStore(path, backend="numpy")
    slow.add(x[:2], text_ids=["a", "b"])
    other = et.EmbeddingStore(path, backend="numpy")
    real = writer._merge_schema
    raced = []

    def racing_merge(latest, schema):  # runs inside the slow writer's rebase, after it read N
        if not raced:
            raced.append(latest.version)
            monkeypatch.setattr(writer, "_merge_schema", real)
            other.add(x[2:4], text_ids=["c", "d"])
            other.add(x[4:6], text_ids=["e", "f"])
            other.vacuum(retain_versions=1)
        return real(latest, schema)

    monkeypatch.setattr(writer, "_merge_schema", racing_merge)
    version = slow.add(x[6:8], text_ids=["g", "h"])
    assert raced == [1] and version == 4 and mf.list_versions(path) == [3, 4]
    fresh = et.EmbeddingStore(path, backend="numpy")
    assert fresh.version == 4
    # the others' commits took row ids 2..5 first: g and h were rewritten with ids 6, 7
    meta = fresh.metadata().collect()
    assert meta["text_id"].to_list() == list("abcdefgh") and meta["row_id"].to_list() == list(range(8))
    assert np.array_equal(fresh.get_embeddings(4), x)


def test_long_lived_handle_rebases_and_expired_reader_gets_a_typed_error(tmp_path):
    path = tmp_path / "s"
    x = _rows(9, 4)
    a = et.EmbeddingStore(path, backend="numpy")
    a.add(x[:2], text_ids=["a0", "a1"])
    reader = et.EmbeddingStore(path, backend="numpy")
    b = et.EmbeddingStore(path, backend="numpy")
    b.add(x[2:4], text_ids=["b0", "b1"])
    b.add(x[4:6], text_ids=["b2", "b3"])
    b.compact()
    b.vacuum(retain_versions=1, grace_seconds=0)
    with pytest.raises(DuplicateTextIdError):
        a.add(x[6:7], text_ids=["b1"])  # checked against the latest version, not a's gone files
    assert a.add(x[6:9], text_ids=["c0", "c1", "c2"]) == b.version + 1  # raw FileNotFoundError before
    assert np.array_equal(a.get_embeddings(4), x)
    assert a.metadata().collect()["text_id"].to_list() == ["a0", "a1", "b0", "b1", "b2", "b3", "c0", "c1", "c2"]
    # the reader's version 1 and its file were vacuumed away: one typed error that says so
    for read in (lambda: reader.get_embeddings(4), lambda: reader.search(x[:1], k=1),
                 lambda: reader.search(x[:1], k=1, where="text_id = 'a0'"),
                 lambda: reader.source.take_metadata([0])):
        with pytest.raises(SnapshotExpiredError, match="removed by vacuum"):
            read()
    assert reader.refresh() == a.version and reader.num_rows == 9


def test_failed_commits_leave_nothing_behind(tmp_path, monkeypatch):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=200)
    x = _rows(10, 4)
    store.add(x[:4], text_ids=[f"t{i}" for i in range(4)], metadata={"year": [1, 2, 3, 4]})
    before = _listing(store.path)
    version = store.version

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the disk fills while the manifest is written, then while the third data file is written
    monkeypatch.setattr(storage_io, "fsync_file", full)
    with pytest.raises(StorageFullError, match="store is unchanged"):
        store.add(x[4:], text_ids=[f"t{i}" for i in range(4, 10)])
    monkeypatch.undo()
    real_write = writer.write_data_file
    calls = []

    def fills_up(path, table, **kwargs):
        calls.append(path)
        if len(calls) >= 3:
            with open(path, "wb") as fh:
                fh.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, table, **kwargs)

    monkeypatch.setattr(writer, "write_data_file", fills_up)
    with pytest.raises(StorageFullError):
        store.add(x[4:], text_ids=[f"t{i}" for i in range(4, 10)])
    with pytest.raises(StorageFullError):
        store.compact(target_file_bytes=10**9)
    monkeypatch.undo()
    assert len(calls) >= 3
    assert _listing(store.path) == before and store.version == version
    # a commit that loses to a concurrent writer's duplicate id removes its files too
    other = et.EmbeddingStore(store.path, backend="numpy")
    real_finish = writer._finish_data

    def concurrent(root):
        real_finish(root)
        monkeypatch.setattr(writer, "_finish_data", real_finish)
        other.add(x[9:10], text_ids=["dup"])

    monkeypatch.setattr(writer, "_finish_data", concurrent)
    with pytest.raises(DuplicateTextIdError, match="concurrent"):
        store.add(x[4:9], text_ids=["u0", "u1", "u2", "u3", "dup"])
    monkeypatch.undo()
    store.refresh()
    assert sorted(os.listdir(os.path.join(store.path, "data"))) == sorted(
        os.path.basename(f) for f in store.files())
    assert store.metadata().collect()["text_id"].to_list() == ["t0", "t1", "t2", "t3", "dup"]
    assert np.array_equal(store.get_embeddings(4), x[[0, 1, 2, 3, 9]])


# ---------------------------------------------------------------------------------- 9: bad inputs
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_bad_inputs_give_typed_errors_and_write_nothing(tmp_path):
    torch = pytest.importorskip("torch")

    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    x = _rows(3, 4)
    store.add(x, text_ids=["a", "b", "c"], metadata={"score": [1.0, 2.0, 3.0], "rank": [1, 2, 3]})
    before = _listing(store.path)
    for grace in (float("nan"), -1.0, float("inf")):
        with pytest.raises(InvalidArgumentError, match="grace_seconds"):
            store.vacuum(grace_seconds=grace)
    with pytest.raises(InvalidArgumentError, match="older_than"):
        store.vacuum(older_than=float("nan"))
    for cap in (float("inf"), float("nan"), 0, -1.0):
        with pytest.raises(InvalidArgumentError, match="max_memory_gb"):
            et.EmbeddingStore(tmp_path / "s", max_memory_gb=cap)
    bad_ids = [("text_ids", dict(text_ids=["d", "\ud800", "f"])),
               ("labels", dict(text_ids=["d", "e", "f"], labels=["x", "y", "\udc00"])),
               ("metadata", dict(text_ids=["d", "e", "f"], metadata={"m": ["\ud83d", "y", "z"]}))]
    for what, kwargs in bad_ids:
        with pytest.raises(InvalidArgumentError, match=f"{what}.*not valid Unicode"):
            store.add(_rows(3, 4, 1), **kwargs)
    with pytest.raises(FilterError, match="Unicode"):
        store.source.select("text_id = '\ud800'")
    for sparse in (torch.from_numpy(x).to_sparse(), torch.from_numpy(x).to_sparse_csr()):
        with pytest.raises(InvalidEmbeddingsError, match="sparse"):
            store.add(sparse, text_ids=["d", "e", "f"])
        with pytest.raises(InvalidEmbeddingsError, match="sparse"):
            store.search(sparse, k=1)
    for bad in ("a\0b", os.fsencode(str(tmp_path)) + b"/x\0", 3.5):
        with pytest.raises(InvalidArgumentError):
            et.EmbeddingStore(bad)
    with pytest.raises(InvalidArgumentError, match="clash"):
        store.search(x[:1], k=2, columns=["score"])
    res = store.search(x[:1], k=2)
    assert res.columns == ["query", "rank", "row_id", "text_id", "label", "score"]
    assert res["score"].dtype == pl.Float32 and res["row_id"].to_list()[0] == 0
    assert _listing(store.path) == before and store.num_rows == 3


def test_seed_positional_backend_form_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="in-memory store"):
        store = et.EmbeddingStore("numpy", max_memory_gb=0.01)
    assert store.path is None and store.backend.name == "numpy"
    os.mkdir("numpy")  # a directory of that name exists: it is the store path, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_disk = et.EmbeddingStore("numpy")
        assert on_disk.path == str(tmp_path / "numpy") and os.path.isdir(tmp_path / "numpy" / "_versions")
        assert et.EmbeddingStore(backend="numpy").path is None


# ------------------------------------------------------------------------------------ 10: the CLI
def _one_line_error(result, match: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Aborted" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], result.stderr


def test_cli_user_errors_are_one_line_and_output_is_escaped(tmp_path):
    run = CliRunner().invoke
    x = _rows(3, 4)
    ids = ["plain", "red\x1b[31mX\x1b[0m", "rtl\u202eevil"]
    labels = ["[bold]markup[/bold]", "bell\x07", "ok"]
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, text_ids=ids, labels=labels)
    path = str(tmp_path / "s")
    q = tmp_path / "q.npy"
    np.save(q, x[:1])
    _one_line_error(run(cli, ["search", path, "--queries", str(q), "--max-memory-gb", "inf"]),
                    "finite")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 query\n".encode("latin-1"))
    _one_line_error(run(cli, ["search", path, "--queries", str(tmp_path / "latin1.txt")]), "UTF-8")
    (tmp_path / "empty.npy").write_bytes(b"")
    _one_line_error(run(cli, ["search", path, "--queries", str(tmp_path / "empty.npy")]), ".npy")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _one_line_error(run(cli, ["hash", str(deep)]), "nested too deeply")
    _one_line_error(run(cli, ["search", path, "--queries", str(q), "--where", "label = = 1"]), "where")
    assert run(cli, ["search", path, "--queries", str(q), "--format", "nope"]).exit_code == 2
    # table: escape sequences and rich markup from the store are shown escaped, not acted on
    table = run(cli, ["search", path, "--queries", str(q), "-k", "3", "--format", "table"])
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout and "\x07" not in table.stdout
    assert "\\x1b[31mX" in table.stdout and "\\u202eevil" in table.stdout
    assert "[bold]markup[/bold]" in table.stdout
    # csv: the data exactly as stored
    csv = run(cli, ["search", path, "--queries", str(q), "-k", "3", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    frame = pl.read_csv(csv.stdout_bytes)
    expected = _cosine_top(x, x[:1], 3, np.arange(3)).ravel()
    assert frame["text_id"].to_list() == [ids[i] for i in expected]
    assert frame["label"].to_list() == [labels[i] for i in expected]


# ------------------------------------------------------------------- 11: memory within a row group
_RSS_SCRIPT = r"""
import sys, threading, time, numpy as np, embtools as et

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

path, out = sys.argv[1], sys.argv[2]
q = np.random.default_rng(1).standard_normal((63, 384)).astype(np.float32)
store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=1 / 1024)   # a 1 MiB cap
for where in (None, "even"):
    first = store.search(q, k=10, where=where)   # imports and caches: not what is measured
    store.close()
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=1 / 1024)
    base = status("VmRSS")
    peak = [base]
    try:
        with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM
            fh.write("5")
        thread = None
    except OSError:                                      # no permission: sample VmRSS instead
        done = threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], status("VmRSS"))
                time.sleep(0.0005)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    res = store.search(q, k=10, where=where)
    if thread is None:
        peak[0] = status("VmHWM")
    else:
        done.set()
        thread.join()
    assert res.equals(first)
    np.save(f"{out}-{where}.npy", res["row_id"].to_numpy().reshape(63, 10))
    print(where, peak[0] - base)
"""


def test_search_memory_tracks_the_cap_inside_one_large_row_group(tmp_path):
    import subprocess
    import sys

    x = _rows(16_000, 384, 3)       # 23.4 MiB of vectors, written as a single row group
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, metadata={"even": (np.arange(16_000) % 3 == 0).tolist()})
    assert store.source.manifest.files[0].row_groups == [16_000]
    store.close()
    out = str(tmp_path / "rows")
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "s"), out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grew = dict(line.split() for line in proc.stdout.strip().splitlines())
    q = np.random.default_rng(1).standard_normal((63, 384)).astype(np.float32)
    for where, rows in (("None", np.arange(16_000)), ("even", np.arange(0, 16_000, 3))):
        # before: the refine's scattered reads faulted in (and kept) about the whole row group
        assert int(grew[where]) < 12 * 1024**2, f"where={where}: RSS grew {int(grew[where]) / 1024**2:.1f} MiB"
        assert np.load(f"{out}-{where}.npy").tolist() == _cosine_top(x, q, 10, rows).tolist()
