"""Regression tests of issue 16 (hardening): hostile ``where`` strings, stores whose files differ in
their metadata columns, maintenance races, bad inputs, the CLI's error handling and output escaping,
and the reader's memory within a large row group. Results are checked against NumPy brute force."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import embtools as et
from embtools.cli import cli
from embtools.errors import DuplicateTextIdError


def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _cosine_top(x: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray) -> list[list[int]]:
    """Row positions of the cosine top-k over ``rows`` by float64 brute force (ties to the lower)."""
    c = x[rows].astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ c.T
    order = np.lexsort((np.broadcast_to(rows, s.shape), -s), axis=1)[:, :k]
    return rows[order].tolist()


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
    top = np.array(_cosine_top(x, x[:2], 3, np.arange(2, 12))).ravel()
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
