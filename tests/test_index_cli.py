"""The index from the command line and in similarity_join: `embtools index`, `search --nprobe`,
`info`, `join --nprobe`; the approximate k-NN graph against the exact one."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from click.testing import CliRunner

import embtools as et
from embtools.cli.app import cli
from tests.test_index import brute, clustered, recall

DIM = 32


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_index_search_info_join(tmp_path):
    x, q = clustered(1200, seed=4)
    path = tmp_path / "s"
    store = et.EmbeddingStore(path, backend="numpy")
    store.add(x)
    res = run("index", path, "--dim", DIM, "--partitions", 12, "--codes", "float")
    assert res.exit_code == 0, res.output
    assert "12 partitions" in res.output and "1,200 rows indexed" in res.output
    info = json.loads(run("info", path, "--json").output)
    assert info["indexes"][0]["partitions"] == 12 and info["indexes"][0]["indexed_rows"] == 1200
    assert "covers 1,200 rows (100%)" in run("info", path).output
    np.save(tmp_path / "q.npy", q[:3])
    res = run("search", path, "--queries", tmp_path / "q.npy", "-k", 4, "--nprobe", 12,
              "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[0])
    assert [r["row_id"] for r in rows] == brute(x, q[:3], 4).reshape(-1).tolist()
    assert run("search", path, "--queries", tmp_path / "q.npy", "--nprobe", 0).exit_code == 1
    res = run("join", path, path, "-k", 3, "--out", tmp_path / "knn", "--exclude-self", "--nprobe", 12)
    assert res.exit_code == 0, res.output
    pairs = pl.read_parquet(tmp_path / "knn" / "*.parquet").sort(["left_row_id", "rank"])
    want = brute(x, x, 4)[:, 1:]
    assert np.array_equal(pairs["right_row_id"].to_numpy().reshape(-1, 3), want)
    assert run("index", path, "--optimize").exit_code == 0
    res = run("index", path, "--dim", DIM, "--drop")
    assert res.exit_code == 0 and json.loads(run("info", path, "--json").output)["indexes"] == []
    assert run("index", path, "--dim", DIM, "--codes", "pq").exit_code == 1


def test_approximate_knn_graph_through_the_index(tmp_path):
    x, _ = clustered(3000, seed=8)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x)
    store.create_index(dimension=DIM, partitions=40, codes="float")
    out = et.similarity_join(store, store, 5, out=tmp_path / "g", exclude_self=True, nprobe=6)
    got = pl.read_parquet(f"{out}/*.parquet").sort(["left_row_id", "rank"])
    found = got["right_row_id"].to_numpy().reshape(-1, 5)
    assert not (found == np.arange(len(x))[:, None]).any()  # never itself
    assert recall(found, brute(x, x, 6)[:, 1:]) >= 0.95
    # without nprobe the join stays exact even though an index exists
    exact = et.similarity_join(store, store, 5, out=tmp_path / "e", exclude_self=True)
    e = pl.read_parquet(f"{exact}/*.parquet").sort(["left_row_id", "rank"])
    assert np.array_equal(e["right_row_id"].to_numpy().reshape(-1, 5), brute(x, x, 6)[:, 1:])


def test_filtered_knn_graph_through_the_index(tmp_path):
    """A self-join through the index with where= (the rows searched) and left_where: only
    selected rows are returned, never a row itself, and nearly the exact filtered graph."""
    x, _ = clustered(2000, seed=9)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, labels=[["a", "b", "c"][i % 3] for i in range(len(x))])
    store.create_index(dimension=DIM, partitions=30, codes="int8")
    where, left_where = pl.col("label") != "c", pl.col("row_id") < 600
    out = et.similarity_join(store, store, 5, out=tmp_path / "g", exclude_self=True, nprobe=6,
                             where=where, left_where=left_where)
    got = pl.read_parquet(f"{out}/*.parquet").sort(["left_row_id", "rank"])
    assert got["left_row_id"].unique().to_list() == list(range(600))
    right = got["right_row_id"].to_numpy()
    assert (right % 3 != 2).all() and not (right == got["left_row_id"].to_numpy()).any()
    alive = np.arange(len(x)) % 3 != 2
    truth = brute(x, x[:600], 6, alive=alive)
    truth = np.array([[t for t in row if t != i][:5] for i, row in enumerate(truth)])
    assert recall(right.reshape(600, 5), truth) >= 0.9
