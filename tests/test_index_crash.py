"""An index build killed with SIGKILL at each commit point leaves the old version readable (or
the new one whole); orphaned index files and build spills are removed by vacuum. (Resuming from
the spills: tests/test_index_build.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import embtools as et

DIM = 16
SCRIPT = """
import sys, embtools as et
store = et.EmbeddingStore(sys.argv[1], backend="numpy")
store.{call}
"""

POINTS = [("after_index_files", "old"), ("after_manifest_tmp", "old"), ("before_dir_fsync", "new")]
#: the build's own points before any file is committed: centroids trained, a chunk assigned
BUILD_POINTS = [("after_index_centroids", "old"), ("after_index_chunk", "old"), *POINTS]
#: optimize_index's delta assigns chunks too (it trains nothing)
OPTIMIZE_POINTS = [("after_index_chunk", "old"), *POINTS]


def _run(path: str, point: str, call: str) -> int:
    env = {**os.environ, "EMBTOOLS_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(call=call), path], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    x = np.random.default_rng(0).standard_normal((600, DIM)).astype(np.float32)
    store = et.EmbeddingStore(root / "base", backend="numpy")
    store.add(x)
    q = x[:5] + 0.01
    return root, x, q, store.search(q, k=5).to_dicts()


@pytest.mark.parametrize(("point", "outcome"), BUILD_POINTS)
def test_build_killed_at_each_commit_point(base, point, outcome):
    root, x, q, exact = base
    path = root / point
    shutil.copytree(root / "base", path)
    code = _run(str(path), point, f"create_index(dimension={DIM}, partitions=8, codes='float')")
    assert code == -signal.SIGKILL
    store = et.EmbeddingStore(path, backend="numpy")
    assert store.num_rows == len(x)
    assert store.search(q, k=5, exact=True).to_dicts() == exact
    if outcome == "old":
        assert store.version == 1 and store.indexes() == []
        store.vacuum(grace_seconds=0)  # the orphaned index files and spills go
        assert os.listdir(path / "_index" / f"emb_{DIM}_cosine") == []
    else:
        assert store.version == 2 and store.indexes()[0]["indexed_rows"] == len(x)
        # a re-run would not resume a committed build: its spills are gone or vacuum takes them
        store.vacuum(grace_seconds=0)
        assert not [n for n in os.listdir(path / "_index" / f"emb_{DIM}_cosine") if n.startswith("build-")]
        assert store.search(q, k=5, nprobe=8).to_dicts() == exact


@pytest.mark.parametrize(("point", "outcome"), OPTIMIZE_POINTS)
def test_optimize_killed_at_each_commit_point(base, point, outcome):
    root, x, _q, _exact = base
    path = root / f"opt-{point}"
    shutil.copytree(root / "base", path)
    store = et.EmbeddingStore(path, backend="numpy")
    store.create_index(dimension=DIM, partitions=8, codes="float")
    extra = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    store.add(extra)
    v = store.version
    code = _run(str(path), point, "optimize_index()")
    assert code == -signal.SIGKILL
    store = et.EmbeddingStore(path, backend="numpy")
    assert store.version == (v if outcome == "old" else v + 1)
    info = store.indexes()[0]
    assert info["unindexed_rows"] == (20 if outcome == "old" else 0)
    hits = store.search(extra, k=1, nprobe=1)["row_id"].to_numpy()
    assert np.array_equal(hits, np.arange(len(x), len(x) + 20))
