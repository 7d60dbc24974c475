"""Resumable jobs (embtools.storage.jobs) and durable writes (embtools.storage.durable): resume after a
crash at any step, parameter checks, damaged records, and the CLI ingest's job record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import embtools as et
from embtools.cli import cli
from embtools.errors import InvalidArgumentError
from embtools.storage.durable import write_atomic
from embtools.storage.jobs import JOB_FILE, PROGRESS_FILE, Job, progress, read_json, write_json

PARAMS = {"kind": "squares", "n": 6}


def _write(i: int):
    return lambda f: f.write(f"{i * i}".encode())


def _run(out: Path, stop_after: int | None = None, **kw) -> Job:
    job = Job(out, PARAMS, suffix=".txt", **kw)
    for n, i in enumerate(job.todo(6)):
        if stop_after is not None and n == stop_after:
            break
        job.write_part(i, _write(i))
    return job


def test_resume_redoes_only_unrecorded_parts(tmp_path):
    out = tmp_path / "job"
    first = _run(out, stop_after=2)
    assert first.done == {0, 1} and not first.complete
    assert read_json(out / JOB_FILE)["n"] == 6
    # a crash after writing part 2 but before recording it, and a temporary file left behind
    (out / "part-000002.txt").write_text("stale")
    (out / ".part-000003.txt.tmp").write_text("half")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = Job(out, PARAMS, suffix=".txt")
    assert again.todo(6) == [2, 3, 4, 5]
    assert not list(out.glob(".*.tmp"))
    for i in again.todo(6):
        again.write_part(i, _write(i))
    again.finish()
    assert [p.read_text() for p in again.parts()] == [str(i * i) for i in range(6)]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[01]*")} == {
        k: v for k, v in mtimes.items() if k < "part-000002"}
    assert Job(out, PARAMS, suffix=".txt").complete
    assert read_json(out / PROGRESS_FILE)["completed"] == list(range(6))


def test_other_parameters_are_refused_until_overwrite(tmp_path):
    out = tmp_path / "job"
    _run(out, stop_after=3)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InvalidArgumentError, match="different squares"):
        Job(out, {**PARAMS, "n": 7}, suffix=".txt")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    fresh = Job(out, {**PARAMS, "n": 7}, suffix=".txt", overwrite=True)
    assert fresh.done == set() and not list(out.glob("part-*"))
    assert read_json(out / JOB_FILE)["n"] == 7


def test_parts_without_a_record_and_a_file_as_out(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "part-000000.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="unknown job"):
        Job(out, PARAMS, suffix=".txt")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        Job(tmp_path / "f", PARAMS)


@pytest.mark.parametrize("damage", [b"", b"{", b"[1, 2]", b"\xff\xfe", b'{"param_hash": 3}'])
def test_damaged_records_never_crash_or_skip_work(tmp_path, damage):
    out = tmp_path / "job"
    job = _run(out, stop_after=3)
    (out / PROGRESS_FILE).write_bytes(damage)
    assert Job(out, PARAMS, suffix=".txt").todo(6) == list(range(6))  # redo, never skip
    (out / JOB_FILE).write_bytes(damage)
    with pytest.raises(InvalidArgumentError, match=r"unknown job|different squares"):
        Job(out, PARAMS, suffix=".txt")
    write_json(out / JOB_FILE, job.params)
    for bad in ({"param_hash": job.param_hash, "completed": [0, "1", True, -1]},
                {"param_hash": job.param_hash, "completed": "012"}):
        write_json(out / PROGRESS_FILE, bad)
        assert Job(out, PARAMS, suffix=".txt").done == set()


def test_parts_kept_elsewhere_count_when_recorded(tmp_path):
    job = Job(tmp_path / "j", {"kind": "commits"}, part_files=False)
    job.record(0)
    job.record(4)
    assert Job(tmp_path / "j", {"kind": "commits"}, part_files=False).todo(6) == [1, 2, 3, 5]
    for bad in (-1, True, 1.0):
        with pytest.raises(InvalidArgumentError):
            job.record(bad)


def test_write_atomic_fsyncs_and_keeps_the_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd))[1])
    write_atomic(path, lambda f: f.write(b"old"))
    assert path.read_bytes() == b"old"
    assert synced == [str(tmp_path / ".state.json.tmp"), str(tmp_path)]

    def fail(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_progress_bar_on_and_off(capsys):
    with progress(3, "squares", enabled=False) as advance:
        advance(2)
    assert capsys.readouterr().err == ""
    with progress(10, "squares", enabled=True, unit="rows") as advance:
        advance(4)
        advance(6)
    err = capsys.readouterr().err
    assert "squares" in err and "10/10" in err and "rows/s" in err


def test_cli_ingest_resumes_from_its_job_record(tmp_path, monkeypatch, rng):
    n, d = 50, 4
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    src = tmp_path / "rows.parquet"
    pl.DataFrame({"id": [f"r{i}" for i in range(n)], "vec": vecs.tolist()}).write_parquet(src)
    store = tmp_path / "s.store"
    args = ["ingest", str(store), str(src), "--id-column", "id", "--vector-column", "vec",
            "--commit-rows", "10"]
    real_add = et.EmbeddingStore.add
    calls = []

    def add_then_die(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third commit
        return real_add(self, *a, **kw)

    monkeypatch.setattr(et.EmbeddingStore, "add", add_then_die)
    CliRunner().invoke(cli, args)
    monkeypatch.setattr(et.EmbeddingStore, "add", real_add)
    records = list((store / "_jobs").iterdir())
    assert len(records) == 1 and read_json(records[0] / PROGRESS_FILE)["completed"] == [0, 1]
    # a run with other options dies too: its record is another job's, removed once one finishes
    calls.clear()
    monkeypatch.setattr(et.EmbeddingStore, "add", add_then_die)
    CliRunner().invoke(cli, [*args[:-1], "7"])
    monkeypatch.setattr(et.EmbeddingStore, "add", real_add)
    assert len(list((store / "_jobs").iterdir())) == 2
    assert et.EmbeddingStore(store).num_rows == 28  # 20 rows, then rows 20 and 21-27
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "resuming: 2 chunks" in result.output and "(28 already present)" in result.output
    assert not (store / "_jobs").exists()  # a finished job leaves no record
    final = et.EmbeddingStore(store, backend="numpy")
    # creation, 2 + 2 commits before, then the chunks with rows left: 20-29 (2 rows), 30-39, 40-49
    assert final.versions() == list(range(8))
    np.testing.assert_array_equal(np.asarray(final.get_embeddings(d)), vecs)
    assert json.loads(json.dumps(final.properties)) == final.properties
