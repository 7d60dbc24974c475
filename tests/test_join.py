"""Batch similarity jobs: similarity_join against a brute force, self-joins, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embtools.errors import InvalidArgumentError
from embtools.search import search_store, similarity_join
from embtools.search.join import JOB_FILE, PROGRESS_FILE
from tests.helpers import brute_force, check_top_k, make_store, planted_corpus


def _read(out: Path) -> pl.DataFrame:
    return pl.read_parquet(f"{out}/*.parquet")


def _as_matrix(frame: pl.DataFrame, n_left: int) -> tuple[np.ndarray, np.ndarray]:
    frame = frame.sort("left_row_id", "rank")
    per = frame.height // n_left
    return (
        frame["score"].to_numpy().reshape(n_left, per),
        frame["right_row_id"].to_numpy().reshape(n_left, per),
    )


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_join_matches_brute_force(tmp_path, metric):
    rng = np.random.default_rng()
    a = planted_corpus(rng, 90, 12)
    b = planted_corpus(rng, 250, 12)
    labels = rng.choice(["x", "y"], size=250).tolist()
    left = make_store(tmp_path / "left", a, max_memory_gb=1e-5)
    right = make_store(tmp_path / "right", b, max_memory_gb=4e-5, labels=labels)
    out = similarity_join(left, right, 7, tmp_path / "out", metric=metric, where="label = 'y'",
                          chunk_rows=16)
    assert out == tmp_path / "out"
    assert len(list(out.glob("part-*.parquet"))) == -(-90 // 16)
    frame = _read(out)
    assert frame.columns[:4] == ["left_text_id", "right_text_id", "rank", "score"]
    scores, found = _as_matrix(frame, 90)
    positions = np.flatnonzero(np.array(labels) == "y")
    check_top_k(brute_force(b, a, metric, positions), scores, found, 7, metric)
    first = frame.filter(pl.col("left_row_id") == 0)
    assert first["left_text_id"].to_list() == ["t0"] * 7
    assert first["right_text_id"].to_list() == [f"t{i}" for i in found[0]]


def test_self_join_finds_planted_duplicates(tmp_path):
    rng = np.random.default_rng()
    n, d = 300, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    pairs = rng.choice(n, size=(20, 2), replace=False)
    x[pairs[:, 1]] = x[pairs[:, 0]] + rng.standard_normal((20, d)).astype(np.float32) * 1e-4
    store = make_store(tmp_path / "s", x, max_memory_gb=3e-5)
    out = similarity_join(store, store, 3, tmp_path / "nn", exclude_self=True, chunk_rows=50)
    frame = _read(out)
    assert frame.height == n * 3
    assert (frame["left_row_id"] != frame["right_row_id"]).all()
    top = frame.filter(pl.col("rank") == 0)
    best = dict(zip(top["left_row_id"].to_list(), top["right_row_id"].to_list(), strict=True))
    for i, j in pairs:
        assert best[int(i)] == int(j) and best[int(j)] == int(i)
    s64 = brute_force(x, x, "cosine")
    np.fill_diagonal(s64, np.nan)  # the own row is excluded
    scores, found = _as_matrix(frame, n)
    check_top_k(s64, scores, found, 3, "cosine")


def test_self_join_with_exact_duplicates_still_returns_k(tmp_path):
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    store = make_store(tmp_path / "s", x)
    frame = _read(similarity_join(store, store, 2, tmp_path / "nn", exclude_self=True))
    got = frame.sort("left_row_id", "rank").group_by("left_row_id", maintain_order=True).agg("right_row_id")
    assert got["right_row_id"].to_list() == [[1, 2], [0, 2], [0, 1], [0, 1]]


def test_search_with_a_store_as_queries_is_a_join(tmp_path):
    rng = np.random.default_rng()
    a = rng.standard_normal((30, 8)).astype(np.float32)
    b = rng.standard_normal((50, 8)).astype(np.float32)
    left, right = make_store(tmp_path / "l", a), make_store(tmp_path / "r", b)
    frame = search_store(right, left, 4)
    scores, found = _as_matrix(frame, 30)
    check_top_k(brute_force(b, a, "cosine"), scores, found, 4, "cosine")
    path = similarity_join(left, right, 4, out=tmp_path / "o")
    assert _read(path).sort("left_row_id", "rank").equals(frame.sort("left_row_id", "rank"))
    with pytest.raises(TypeError):  # one return type: the Parquet output is similarity_join's
        search_store(right, left, 4, out=tmp_path / "o2")


def test_other_arguments_on_the_same_out_are_refused(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((40, 8)).astype(np.float32)
    store = make_store(tmp_path / "s", x)
    out = similarity_join(store, store, 3, tmp_path / "o")
    before = _read(out)
    assert similarity_join(store, store, 3, tmp_path / "o") == out  # complete: nothing recomputed
    assert _read(out).equals(before)
    with pytest.raises(InvalidArgumentError):
        similarity_join(store, store, 4, tmp_path / "o")
    similarity_join(store, store, 4, tmp_path / "o", overwrite=True)
    assert _read(out).height == 40 * 4
    with pytest.raises(InvalidArgumentError):
        similarity_join(store, make_store(tmp_path / "t", x), 3, tmp_path / "p", exclude_self=True)
    with pytest.raises(InvalidArgumentError):
        similarity_join(store, store, 0, tmp_path / "q")


_JOB = textwrap.dedent(
    """
    import sys
    import embtools as et
    from embtools.search import similarity_join
    left = et.EmbeddingStore(sys.argv[1], max_memory_gb=2e-5)
    right = et.EmbeddingStore(sys.argv[2], max_memory_gb=2e-5)
    similarity_join(left, right, 5, sys.argv[3], chunk_rows=4, progress=False)
    """
)


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_output(tmp_path):
    rng = np.random.default_rng()
    a = rng.standard_normal((400, 16)).astype(np.float32)
    b = rng.standard_normal((1000, 16)).astype(np.float32)
    left = make_store(tmp_path / "left", a, max_memory_gb=2e-5)
    right = make_store(tmp_path / "right", b, max_memory_gb=2e-5)
    reference = _read(similarity_join(left, right, 5, tmp_path / "ref", chunk_rows=4))

    out = tmp_path / "killed"
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "left"), str(tmp_path / "right"), str(out)],
        env=env,
    )
    done_at_kill = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            progress = out / PROGRESS_FILE
            if progress.exists():
                try:
                    done_at_kill = len(json.loads(progress.read_text())["completed"])
                except (ValueError, KeyError):
                    done_at_kill = 0
                if done_at_kill >= 5:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert 5 <= done_at_kill < 100
    job = json.loads((out / JOB_FILE).read_text())
    assert "complete" not in job
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    resumed = _read(similarity_join(left, right, 5, out, chunk_rows=4))
    assert resumed.equals(reference)
    recorded = json.loads((out / PROGRESS_FILE).read_text())["completed"]
    assert sorted(recorded) == list(range(100))
    kept = [n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns == t]
    assert len(kept) >= done_at_kill, "completed chunks were recomputed"
    assert not list(out.glob(".*.tmp"))
