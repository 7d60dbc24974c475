"""``embtools quantize``, ``search --precision`` / quantized ``--funnel`` stages, and ``info``'s
quantized columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from click.testing import CliRunner

import embtools as et
from embtools.cli import cli


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    path = tmp_path / "s"
    et.EmbeddingStore(path, backend="numpy").add_embeddings(x, dimension=32)
    np.save(tmp_path / "q.npy", x[:3])
    return path, x


def test_quantize_info_and_search(tmp_path):
    path, x = _store(tmp_path)
    result = run("quantize", path, "--dim", 32, "--kinds", "int8,binary")
    assert result.exit_code == 0, result.output
    assert "emb_32_b1" in result.output and "emb_32_i8" in result.output
    store = et.EmbeddingStore(path, backend="numpy")
    assert store.quantized == {32: ("binary", "int8")}
    info = run("info", path, "--json")
    assert info.exit_code == 0, info.output
    quantized = json.loads(info.output)["quantized"]
    # 400 codes of 32 bytes and of 4 bytes (plus page headers)
    assert 400 * 32 <= quantized["emb_32_i8"]["bytes"] < 400 * 32 + 1024
    assert 400 * 4 <= quantized["emb_32_b1"]["bytes"] < 400 * 4 + 1024
    assert "emb_32_i8" in run("info", path).output
    out = tmp_path / "r.parquet"
    for extra in (["--precision", "binary", "--rescore", "400"],
                  ["--funnel", "binary:400,int8:400"], []):
        result = run("search", path, "--queries", tmp_path / "q.npy", "-k", 5, "--out", out, *extra)
        assert result.exit_code == 0, result.output
        got = pl.read_parquet(out)
        # shortlists covering the store: the exact answer (each query's own row first)
        assert got.filter(pl.col("rank") == 0)["row_id"].to_list() == [0, 1, 2]
        assert got.equals(store.search(x[:3], 5)), extra


def test_bad_arguments_are_one_line_errors(tmp_path):
    path, _ = _store(tmp_path)
    for args in (
        ["quantize", path, "--dim", 33],
        ["quantize", path, "--dim", 32, "--kinds", "int4"],
        ["search", path, "--queries", tmp_path / "q.npy", "--precision", "binary"],  # not quantized
        ["search", path, "--queries", tmp_path / "q.npy", "--funnel", "bits:40"],
    ):
        result = run(*args)
        assert result.exit_code != 0
        assert "Traceback" not in result.output
    assert et.EmbeddingStore(path, backend="numpy").quantized == {}
