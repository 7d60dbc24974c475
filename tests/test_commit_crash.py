"""Crash safety: writers killed with SIGKILL at each named commit point and at random moments.

After every kill the store must open and read back exactly the old or the new version.
"""

from __future__ import annotations

import random
import shutil
import signal
import time

import numpy as np
import polars as pl
import pytest

import embtools as et
from tests._store_writer import batch_data, batch_ids, go, spawn, store_state, wait_ready

DIM = 16
ROWS = 80
TARGET = 1280          # 10 rows per data file -> 8 files per add


def _base(path) -> dict:
    store = et.EmbeddingStore(path, backend="numpy")
    x = batch_data(999, 30, DIM)
    store.add(x, text_ids=batch_ids("base", 30), labels=["base"] * 30, metadata={"k": list(range(30))})
    return store_state(str(path))


def _assert_same(a: dict, b: dict) -> None:
    assert a["meta"].equals(b["meta"])
    assert a["emb"].keys() == b["emb"].keys()
    for d in a["emb"]:
        assert np.array_equal(a["emb"][d], b["emb"][d])


def _is_old_plus_add(state: dict, old: dict, prefix: str, seed: int) -> bool:
    meta, n_old = state["meta"], old["meta"].height
    if meta.height != n_old + ROWS or state["version"] <= old["version"]:
        return False
    if not meta.head(n_old).equals(old["meta"]):
        return False
    new = meta.tail(ROWS)
    row_ids = new["row_id"].to_numpy()
    assert (np.diff(row_ids) == 1).all() and row_ids[0] > old["meta"]["row_id"].max()
    assert new["text_id"].to_list() == batch_ids(prefix, ROWS)
    assert new["label"].to_list() == [prefix] * ROWS and new["k"].to_list() == list(range(ROWS))
    want = np.concatenate([old["emb"][DIM], batch_data(seed, ROWS, DIM)])
    assert np.array_equal(state["emb"][DIM], want)
    return True


def _outcome(path, old: dict, prefix: str, seed: int) -> tuple[str, dict]:
    state = store_state(str(path))
    if state["version"] == old["version"]:
        _assert_same(state, old)
        return "old", state
    assert _is_old_plus_add(state, old, prefix, seed), "store shows neither the old nor the new version"
    return "new", state


def _run_to_kill(proc, crash: bool) -> None:
    go(proc)
    code = proc.wait(timeout=60)
    if crash:
        assert code == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""


ADD_POINTS = [("after_data", "old"), ("after_manifest_tmp", "old"), ("before_dir_fsync", "new")]


def test_add_killed_at_each_named_commit_point(tmp_path):
    _base(tmp_path / "base")
    procs = []
    for point, _ in ADD_POINTS:
        path = tmp_path / point
        shutil.copytree(tmp_path / "base", path)
        args = {"seed": 7, "rows": ROWS, "dim": DIM, "prefix": "new", "target": TARGET}
        procs.append(spawn("add", str(path), args, {"EMBTOOLS_CRASH_AT": point}))
    old = store_state(str(tmp_path / "base"))
    for proc, (point, expected) in zip(procs, ADD_POINTS, strict=True):
        wait_ready(proc)
        _run_to_kill(proc, crash=True)
        assert _outcome(tmp_path / point, old, "new", 7)[0] == expected, point
        store = et.EmbeddingStore(tmp_path / point)
        store.add(batch_data(8, 2, DIM), text_ids=["after-1", "after-2"])   # still writable
        assert store.num_rows == old["meta"].height + (ROWS if expected == "new" else 0) + 2


@pytest.mark.parametrize(("mode", "point", "expected"), [
    ("delete", "after_data", "old"), ("delete", "before_dir_fsync", "new"),
    ("compact", "after_manifest_tmp", "old"), ("compact", "before_dir_fsync", "new"),
])
def test_delete_and_compact_killed_at_commit_points(tmp_path, mode, point, expected):
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=TARGET)
    x = batch_data(5, 60, DIM)
    store.add(x, text_ids=batch_ids("r", 60), labels=["r"] * 60, metadata={"k": list(range(60))})
    old = store_state(str(tmp_path / "s"))
    proc = spawn(mode, str(tmp_path / "s"), {"mod": 3, "target_compact": 10**8},
                 {"EMBTOOLS_CRASH_AT": point})
    wait_ready(proc)
    _run_to_kill(proc, crash=True)
    state = store_state(str(tmp_path / "s"))
    if expected == "old":
        assert state["version"] == old["version"]
        _assert_same(state, old)
    else:
        assert state["version"] == old["version"] + 1
        keep = np.arange(60) % 3 != 0 if mode == "delete" else np.ones(60, bool)
        assert state["meta"].equals(old["meta"].filter(pl.Series(keep)))
        assert np.array_equal(state["emb"][DIM], x[keep])
        if mode == "compact":
            assert len(et.EmbeddingStore(tmp_path / "s").files()) == 1


def test_add_killed_at_50_random_moments(tmp_path):
    """50 trials on one store; children are started ahead so that imports overlap the checks."""
    path = tmp_path / "s"
    _base(path)
    rng = random.Random(20261125)
    trials, ahead = 50, 2
    pending = []

    def start(i: int):
        args = {"seed": 100 + i, "rows": ROWS, "dim": DIM, "prefix": f"t{i}", "target": TARGET}
        return spawn("add", str(path), args)

    # Calibrate under the same load (a child importing alongside): how long from "go" to "done"?
    cal = spawn("add", str(path), {"seed": 0, "rows": ROWS, "dim": DIM, "prefix": "cal", "target": TARGET})
    for i in range(min(ahead, trials)):
        pending.append(start(i))
    wait_ready(cal)
    t0 = time.perf_counter()
    go(cal)
    assert cal.stdout is not None and cal.stdout.readline().startswith("done")
    duration = time.perf_counter() - t0
    assert cal.wait(timeout=60) == 0
    outcomes: dict[str, int] = {"old": 0, "new": 0}
    state = store_state(str(path))
    for i in range(trials):
        proc = pending.pop(0)
        if i + ahead < trials:
            pending.append(start(i + ahead))
        wait_ready(proc)
        # mostly during the add, some around its commit and end
        delay = rng.uniform(0.0, duration) if rng.random() < 0.75 else rng.uniform(0.7 * duration, 2 * duration)
        go(proc)
        if i % 10 == 9:
            # every tenth child is killed right after it reports its commit, whatever the load
            assert proc.stdout is not None and proc.stdout.readline().startswith("done")
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        outcome, state = _outcome(path, state, f"t{i}", 100 + i)
        outcomes[outcome] += 1
    assert sum(outcomes.values()) == trials
    assert outcomes["old"] > 0 and outcomes["new"] > 0    # kills before and after the commit
    print(f"random kills: {outcomes}")
    # the orphans of crashed writers are the only difference vacuum makes
    before = store_state(str(path))
    store = et.EmbeddingStore(path)
    orphans = {p.name for p in (path / "data").iterdir()} - {f.rsplit("/", 1)[-1] for f in store.files()}
    removed = store.vacuum(retain_versions=1, grace_seconds=0)
    assert {f.rsplit("/", 1)[-1] for f in removed["files"]} == orphans
    _assert_same(store_state(str(path)), before)
    assert {f.rsplit("/", 1)[-1] for f in store.files()} == set(
        p.name for p in (path / "data").iterdir())
