"""The commit protocol: exclusive version creation, rebase on conflict, row-id reservation, junk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import embtools as et
from embtools.errors import CorruptStoreError, StoreNotFoundError
from embtools.storage import manifest as mf


def _x(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _state(path) -> tuple:
    s = et.EmbeddingStore(path, backend="numpy")
    return s.version, s.metadata().collect(), {d: np.array(s.get_embeddings(d)) for d in s.dimensions}


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1].equals(b[1]) and a[2].keys() == b[2].keys()
    assert all(np.array_equal(a[2][d], b[2][d]) for d in a[2])


def test_manifest_is_plain_json_with_the_documented_fields(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s")
    store.add({4: _x(5), 2: _x(5, 2)}, metadata={"y": [1, 2, 3, 4, 5]}, properties={"model": "m"})
    raw = (tmp_path / "s" / "_versions" / f"{1:020d}.json").read_text()
    m = json.loads(raw)
    assert m["format"] == "embtools/1" and m["version"] == 1 and m["parent"] == 0
    assert m["operation"] == "add" and m["dimensions"] == [2, 4] and m["properties"] == {"model": "m"}
    assert m["schema"]["columns"] == {"row_id": "int64", "text_id": "string", "label": "string", "y": "int64"}
    (entry,) = m["files"]
    assert entry["num_rows"] == 5 and entry["row_id_min"] == 0 and entry["row_id_max"] == 4
    assert entry["bytes"] == os.path.getsize(tmp_path / "s" / entry["path"])
    assert entry["row_groups"] == [5] and entry["path"].startswith("data/")
    parsed = mf.read_manifest(tmp_path / "s", 1)
    assert parsed.to_json() == m and parsed.settings_hash() == m["config_hash"]


def test_commit_loses_race_then_rebases(tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    et.EmbeddingStore(root)
    real_link = os.link
    calls: list[int | None] = []

    def racing_link(src, dst):
        if len(calls) == 1:      # another writer publishes the same version first
            real_link(src, dst.replace(".json", ".json.other"))
            os.rename(dst.replace(".json", ".json.other"), dst)
        return real_link(src, dst)

    def rebase(latest):
        calls.append(None if latest is None else latest.version)
        return dataclasses.replace(latest, operation=f"op{len(calls)}")

    monkeypatch.setattr(os, "link", racing_link)
    result = mf.commit(root, rebase)
    assert calls == [0, 1] and result.version == 2 and result.parent == 1
    assert mf.list_versions(root) == [0, 1, 2]
    assert not [n for n in os.listdir(os.path.join(root, "_versions")) if n.startswith(".tmp")]


def test_version_files_are_created_exclusively(tmp_path):
    root = str(tmp_path / "s")
    et.EmbeddingStore(root)
    results: list[int] = []
    lock = threading.Lock()

    def writer():
        m = mf.commit(root, lambda latest: dataclasses.replace(latest, operation="noop"))
        with lock:
            results.append(m.version)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 9))
    assert mf.list_versions(root) == list(range(9))


def test_row_ids_are_assigned_by_the_commit_and_never_reused(tmp_path):
    root = str(tmp_path / "s")
    store = et.EmbeddingStore(root)
    got: list[list[int]] = []
    lock = threading.Lock()

    def add(w: int) -> None:            # handles opened before the others commit: ids taken meanwhile
        s = et.EmbeddingStore(root)
        for j in range(5):
            s.add(_x(4, seed=10 * w + j), text_ids=[f"w{w}-{j}-{i}" for i in range(4)])
            meta = s.metadata().collect()
            mine = meta.filter(meta["text_id"].str.starts_with(f"w{w}-{j}-"))["row_id"].to_list()
            with lock:
                got.append(mine)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for ids in got for r in ids) == list(range(80))       # no gap, no duplicate
    assert all(ids == list(range(ids[0], ids[0] + 4)) for ids in got)     # each add contiguous
    assert not os.path.exists(os.path.join(root, "_rowids"))              # no counter file, no lock
    store.refresh()
    assert store.source.manifest.next_row_id == 80
    store.delete(pl_col("row_id") >= 76)                                 # the newest ids go
    store.add(_x(1, seed=99))
    assert store.metadata().collect()["row_id"].to_list()[-1] == 80        # never reused
    assert store.metadata().collect()["text_id"].to_list()[-1] == "row-80"


def pl_col(name: str):
    import polars as pl

    return pl.col(name)


def test_manifests_written_before_next_row_id_was_recorded_still_open(tmp_path):
    root = str(tmp_path / "s")
    store = et.EmbeddingStore(root)
    store.add(_x(3))
    path = os.path.join(root, "_versions", f"{1:020d}.json")
    m = json.loads(Path(path).read_text())
    del m["next_row_id"]
    Path(path).write_text(json.dumps(m))
    assert mf.read_manifest(root, 1).next_row_id == 3
    store = et.EmbeddingStore(root)
    store.add(_x(2, seed=1))
    assert store.metadata().collect()["row_id"].to_list() == [0, 1, 2, 3, 4]
    m["next_row_id"] = 1                                   # below a stored id: the files' ids count
    Path(path).write_text(json.dumps(m))
    assert mf.read_manifest(root, 1).next_row_id == 3
    m["next_row_id"] = -1
    Path(path).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError, match="next_row_id"):
        mf.read_manifest(root, 1)


def test_junk_files_change_nothing_and_vacuum_removes_them(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s", target_file_bytes=300)
    store.add(_x(20), metadata={"k": list(range(20))})
    before = _state(tmp_path / "s")
    data, versions = tmp_path / "s" / "data", tmp_path / "s" / "_versions"
    live = store.files()
    blob = Path(live[0]).read_bytes()
    (data / "truncated.parquet").write_bytes(blob[: len(blob) // 2])
    (data / "notes.txt").write_text("hello")
    shutil.copy(live[1], data / "copy-of-a-live-file.parquet")
    (versions / ".tmp-deadbeef.json").write_text('{"format": "embtools/1", "vers')
    (versions / "README").write_text("junk")
    (versions / "00000000000000000007.json.partial").write_text("{")
    _same(before, _state(tmp_path / "s"))
    assert et.EmbeddingStore(tmp_path / "s").versions() == [0, 1]
    store.add(_x(1, seed=3), text_ids=["late"])                 # still writable: version 2
    assert store.versions() == [0, 1, 2]
    removed = store.vacuum(retain_versions=3, grace_seconds=0)
    assert {os.path.basename(f) for f in removed["files"]} == {
        "truncated.parquet", "notes.txt", "copy-of-a-live-file.parquet"}
    assert not (versions / ".tmp-deadbeef.json").exists()
    assert (versions / "README").exists()                       # not ours: left alone
    assert store.metadata().collect()["text_id"].to_list()[-1] == "late"


def test_damaged_manifest_or_data_file_is_reported(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s")
    store.add(_x(4))
    path = tmp_path / "s" / "_versions" / f"{1:020d}.json"
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(CorruptStoreError, match=f"{1:020d}.json"):
        et.EmbeddingStore(tmp_path / "s")
    path.write_text(good.replace('"version": 1', '"version": 5'))
    with pytest.raises(CorruptStoreError):
        et.EmbeddingStore(tmp_path / "s")
    path.write_text(good)
    (data_file,) = et.EmbeddingStore(tmp_path / "s").files()
    blob = Path(data_file).read_bytes()
    Path(data_file).write_bytes(blob[:100])
    s = et.EmbeddingStore(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=os.path.basename(data_file)):
        s.get_embeddings(4)
    os.unlink(data_file)
    with pytest.raises(CorruptStoreError, match="missing"):
        et.EmbeddingStore(tmp_path / "s").get_embeddings(4)


def test_versions_and_missing_version_listing(tmp_path):
    store = et.EmbeddingStore(tmp_path / "s")
    for i in range(3):
        store.add(_x(1, seed=i))
    assert mf.list_versions(tmp_path / "s") == [0, 1, 2, 3] == store.versions()
    assert mf.latest_version(tmp_path / "s") == 3
    with pytest.raises(StoreNotFoundError, match=r"\[0, 1, 2, 3\]"):
        mf.read_manifest(tmp_path / "s", 9)
    assert [et.EmbeddingStore(tmp_path / "s", version=v).num_rows for v in range(4)] == [0, 1, 2, 3]


def test_commit_files_assigns_row_ids_to_files_written_apart(tmp_path):
    """Two workers write files before either commits: their provisional ids overlap; the commit
    gives each file its final ids (default text ids follow) and one version holds both."""
    from embtools.memory import MemoryBudget
    from embtools.storage import writer
    from embtools.storage.ingest import prepare_batch
    from embtools.storage.schema import base_schema

    root = str(tmp_path / "s")
    store = et.EmbeddingStore(root, backend="numpy")
    store.add(_x(3), text_ids=["a", "b", "c"])
    x1, x2 = _x(4, seed=1), _x(5, seed=2)
    b1 = prepare_batch(x1, stored_dims=[4], schema=base_schema(), num_rows=3)
    b2 = prepare_batch(x2, text_ids=[f"t{i}" for i in range(5)], stored_dims=[4],
                       schema=base_schema(), num_rows=3)
    f1 = writer.write_files(root, b1, MemoryBudget(None), 2**20)
    f2 = writer.write_files(root, b2, MemoryBudget(None), 2**20)
    assert f1[0].row_id_min == f2[0].row_id_min == 3                     # provisional: the same ids
    m = writer.commit_files(root, [*f2, *f1], [4], base_schema(), {}, job_id="job-1")
    assert m is not None and m.next_row_id == 12
    store.refresh()
    meta = store.metadata().collect()
    assert meta["row_id"].to_list() == list(range(12))
    assert meta["text_id"].to_list() == ["a", "b", "c", *[f"t{i}" for i in range(5)],
                                         "row-8", "row-9", "row-10", "row-11"]
    assert np.array_equal(store.get_embeddings(4), np.vstack([_x(3), x2, x1]))
    data = {p.name for p in (tmp_path / "s" / "data").iterdir()}
    assert data == {os.path.basename(f) for f in store.files()}           # the old copies are gone
