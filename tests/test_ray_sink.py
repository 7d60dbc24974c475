"""The StoreDatasink's write half (workers) and commit half (driver), called directly: no cluster."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("ray.data")

from ray.data.datasource import WriteResult

from embtools import EmbeddingStore
from embtools.errors import (
    DimensionMismatchError,
    DuplicateTextIdError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    SchemaMismatchError,
)
from embtools.ray import StoreDatasink


def _block(ids, x, **cols):
    d = x.shape[1]
    data = {"text_id": pa.array(ids, pa.string()),
            f"emb_{d}": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), d)}
    data.update(cols)
    return pa.table(data)


def _run(sink, blocks_per_task):
    """Ray's order: on_write_start on the driver, write per task, on_write_complete."""
    sink.on_write_start(blocks_per_task[0][0].schema)
    returns = [sink.write(blocks, None) for blocks in blocks_per_task]
    rows = sum(b.num_rows for blocks in blocks_per_task for b in blocks)
    sink.on_write_complete(WriteResult(rows, 0, returns))
    return returns


def _data_files(root):
    return sorted(os.listdir(os.path.join(root, "data")))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_tasks_commit_as_one_version_equal_to_add(tmp_path, rng):
    x = rng.standard_normal((300, 16)).astype(np.float32)
    ids = [f"t{i}" for i in range(300)]
    labels = [f"l{i % 3}" for i in range(300)]
    years = list(range(300))
    store = EmbeddingStore(tmp_path / "sink", backend="numpy")
    blocks = [[_block(ids[s:s + 50], x[s:s + 50], label=pa.array(labels[s:s + 50]),
                      year=pa.array(years[s:s + 50], pa.int64()))
               for s in range(t, t + 100, 50)] for t in range(0, 300, 100)]
    _run(StoreDatasink(store), blocks)
    assert store.versions() == [0, 1]  # one version for three tasks of two blocks
    store.refresh()
    ref = EmbeddingStore(tmp_path / "ref", backend="numpy")
    ref.add(x, text_ids=ids, labels=labels, metadata={"year": years})
    got = store.metadata().collect().sort("text_id")
    want = ref.metadata().collect().sort("text_id")
    assert got.drop("row_id").equals(want.drop("row_id"))
    assert got["row_id"].n_unique() == 300
    order = np.argsort(store.get_text_ids(), kind="stable")
    ref_order = np.argsort(ref.get_text_ids(), kind="stable")
    np.testing.assert_array_equal(np.asarray(store.get_embeddings(16))[order],
                                  np.asarray(ref.get_embeddings(16))[ref_order])
    report = store.verify()
    assert report.ok and report.files_checked == 6  # a file per block
    # the search sees the committed rows like any others
    hits = store.search(x[:3], k=1)
    assert hits["text_id"].to_list() == ids[:3]


def test_write_half_writes_files_and_commits_nothing(tmp_path, rng):
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    sink = StoreDatasink(store)
    block = _block(["a", "b"], rng.standard_normal((2, 4)))
    sink.on_write_start(block.schema)
    out = sink.write([block], None)
    assert len(out["files"]) == 1 and out["dims"] == [4]
    assert _data_files(store.path) == [os.path.basename(out["files"][0]["path"])]
    assert store.versions() == [0]  # written, not committed
    assert EmbeddingStore(store.path).num_rows == 0


def test_retried_task_lost_attempt_is_never_committed(tmp_path, rng):
    """A task's first attempt wrote files and died; only the retry's return reaches the commit."""
    x = rng.standard_normal((20, 4)).astype(np.float32)
    ids = [str(i) for i in range(20)]
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    sink = StoreDatasink(store)
    sink.on_write_start(_block(ids[:1], x[:1]).schema)
    sink.write([_block(ids[:10], x[:10])], None)  # the lost attempt
    retry = sink.write([_block(ids[:10], x[:10])], None)
    other = sink.write([_block(ids[10:], x[10:])], None)
    sink.on_write_complete(WriteResult(20, 0, [retry, other]))
    store.refresh()
    assert sorted(store.get_text_ids(), key=int) == ids and store.versions() == [0, 1]
    assert len(_data_files(store.path)) == 3  # the orphan waits for vacuum's grace period
    store.vacuum(grace_seconds=0)
    assert len(_data_files(store.path)) == 2 and store.num_rows == 20


def test_job_id_makes_a_rerun_commit_nothing(tmp_path, rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    first = StoreDatasink(store, job_id="job-1")
    _run(first, [[_block(list("abcd"), x[:4])]])
    assert first.committed and first.version == 1
    before = _data_files(store.path)
    again = StoreDatasink(store, job_id="job-1")
    _run(again, [[_block(list("efgh"), x[4:])]])  # even other rows: the job is done
    assert not again.committed and again.version == 1
    assert _data_files(store.path) == before  # its files were removed
    other = StoreDatasink(store, job_id="job-2")
    _run(other, [[_block(list("efgh"), x[4:])]])
    store.refresh()
    assert store.num_rows == 8 and store.versions() == [0, 1, 2]
    from embtools.storage.manifest import read_manifest

    assert read_manifest(store.path).jobs == ("job-1", "job-2")
    with pytest.raises(InvalidArgumentError, match="job id"):
        StoreDatasink(store, job_id="../bad id")


def test_duplicate_ids_across_tasks_and_with_the_store(tmp_path, rng):
    x = rng.standard_normal((6, 4)).astype(np.float32)
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x[:2], text_ids=["a", "b"])
    with pytest.raises(DuplicateTextIdError, match="'c'"):
        _run(StoreDatasink(store), [[_block(["c", "d"], x[2:4])], [_block(["c", "e"], x[4:])]])
    with pytest.raises(DuplicateTextIdError, match="'a'"):
        _run(StoreDatasink(store), [[_block(["x", "a"], x[2:4])]])
    with pytest.raises(DuplicateTextIdError, match="twice"):  # within one block: no file written
        _run(StoreDatasink(store), [[_block(["y", "y"], x[2:4])]])
    assert store.versions() == [0, 1] and len(_data_files(store.path)) == 1


def test_bad_input_is_refused_before_anything_is_written(tmp_path, rng):
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(rng.standard_normal((2, 4)), text_ids=["a", "b"], labels=["p", "q"])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(InvalidEmbeddingsError, match="NaN"):
        _run(StoreDatasink(store), [[_block(["c", "d"], bad)]])
    with pytest.raises(DimensionMismatchError):
        _run(StoreDatasink(store), [[_block(["c", "d"], rng.standard_normal((2, 8)))]])
    with pytest.raises(SchemaMismatchError):
        _run(StoreDatasink(store), [[_block(["c", "d"], x, label=pa.array([1, 2]))]])
    with pytest.raises(InvalidEmbeddingsError, match="emb_"):
        _run(StoreDatasink(store), [[pa.table({"text_id": ["c"], "v": [[1.0]]})]])
    # a failing second block removes the first block's files of the same task
    sink = StoreDatasink(store)
    sink.on_write_start(_block(["c"], x[:1]).schema)
    with pytest.raises(InvalidEmbeddingsError):
        sink.write([_block(["c", "d"], x), _block(["e", "f"], bad)], None)
    assert store.versions() == [0, 1] and len(_data_files(store.path)) == 1
    with pytest.raises(InvalidArgumentError, match="in-memory"):
        StoreDatasink(EmbeddingStore(None))


def test_tasks_with_different_dimensions_commit_nothing(tmp_path, rng):
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    sink = StoreDatasink(store)
    sink.on_write_start(None)  # no schema from Ray: each task takes its blocks' dimensions
    a = sink.write([_block(["a"], rng.standard_normal((1, 4)))], None)
    b = sink.write([_block(["b"], rng.standard_normal((1, 8)))], None)
    with pytest.raises(SchemaMismatchError, match="dimensions"):
        sink.on_write_complete(WriteResult(2, 0, [a, b]))
    assert store.versions() == [0] and _data_files(store.path) == []


def test_empty_dataset_commits_nothing(tmp_path):
    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    sink = StoreDatasink(store, job_id="empty")
    sink.on_write_start(None)
    sink.on_write_complete(WriteResult(0, 0, [sink.write([], None)]))
    assert sink.version == 0 and not sink.committed and store.versions() == [0]


def test_a_damaged_job_record_is_a_corrupt_store(tmp_path, rng):
    import json

    from embtools.errors import CorruptStoreError

    store = EmbeddingStore(tmp_path / "s", backend="numpy")
    _run(StoreDatasink(store, job_id="j"), [[_block(["a"], rng.standard_normal((1, 4)))]])
    path = os.path.join(store.path, "_versions", f"{1:020d}.json")
    with open(path) as f:
        data = json.load(f)
    assert data["jobs"] == ["j"]
    data["jobs"] = ["../../etc"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(CorruptStoreError, match="jobs"):
        EmbeddingStore(store.path)
