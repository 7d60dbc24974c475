"""IVF index build: the exact nearest-centroid assignment (every metric, tiled under tiny caps,
against a float64 reference), resuming a killed build from its spill files (identical result,
the finished work skipped, damaged spills recomputed), and peak RSS under the memory cap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import embtools as et
import embtools.index.build as build
import embtools.index.kmeans as kmeans
from embtools.backends import get_backend
from embtools.index.kmeans import Top1, assign_batch_rows
from embtools.index.spill import Spill

DIM = 16


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((30, dim))
    return (c[rng.integers(0, 30, n)] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)


def reference_top1(x: np.ndarray, c: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 nearest centroid (ties to the lower index) and the margin to the runner-up."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    s = -((x64[:, None, :] - c64[None]) ** 2).sum(-1) if metric == "l2" else x64 @ c64.T
    best = s.argmax(1)
    top2 = np.sort(s, axis=1)[:, -2:]
    return best, top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("cols", [None, 7, 64])
def test_top1_is_the_exact_nearest_centroid(metric, cols):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    c = rng.standard_normal((150, 24)).astype(np.float32)
    c[100] = c[3]  # an exact tie: the lower centroid wins, in every tile layout
    x[0] = c[3]
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
    out, best = np.empty(len(x), np.int32), np.empty(len(x), np.float32)
    top = Top1(c, metric, get_backend("numpy"), rows=1000, cols=cols)
    for a in range(0, len(x), 1000):
        top(x[a:a + 1000], out[a:a + 1000], best[a:a + 1000])
    ref, margin = reference_top1(x, c, metric)
    clear = margin > 1e-4  # float32 products may order near-ties differently from float64
    assert clear.mean() > 0.95
    assert np.array_equal(out[clear], ref[clear])
    assert out[0] == 3
    x64, c64 = x.astype(np.float64), c[out].astype(np.float64)
    want = ((x64 - c64) ** 2).sum(1) if metric == "l2" else (x64 * c64).sum(1)
    assert np.allclose(best, want, atol=1e-3)


def test_batch_plan_fits_the_room():
    for avail in (10_000, 200_000, 5_000_000, None):
        rows, cols = assign_batch_rows(384, 1000, avail)
        assert 1 <= rows <= kmeans.BATCH_ROWS and 1 <= cols <= 1000
        if avail is not None and rows > 1:
            assert rows * (384 * 4 + cols * 4 + 16) <= avail // 4


def index_rows(store: et.EmbeddingStore) -> dict[int, tuple[int, bytes]]:
    """row_id -> (partition, codes bytes) over the index's codes files, checking their order."""
    entry = store.source.manifest.indexes[0]
    out: dict[int, tuple[int, bytes]] = {}
    for f in entry.files[1:]:
        t = pq.read_table(os.path.join(store.path, f))
        rid, part = t["row_id"].to_numpy(), t["partition"].to_numpy()
        assert (np.diff(part) >= 0).all() and (np.diff(rid)[np.diff(part) == 0] > 0).all()
        codes = t.column(2).combine_chunks()
        for i, r in enumerate(rid.tolist()):
            out[r] = (int(part[i]), repr(codes[i].as_py()).encode())
    return out


@pytest.mark.parametrize(("metric", "codes"), [("cosine", "float"), ("l2", "int8"), ("dot", "binary")])
def test_final_assignment_is_the_exact_nearest_centroid_under_a_tiny_cap(tmp_path, metric, codes):
    x = clustered(2500)
    roomy = et.EmbeddingStore(tmp_path / "roomy", backend="numpy")
    roomy.add(x)
    roomy.create_index(dimension=DIM, partitions=20, codes=codes, metric=metric, sample_rows=800)
    tight = et.EmbeddingStore(tmp_path / "tight", backend="numpy", max_memory_gb=60_000 / 1024**3)
    tight.add(x)
    tight.create_index(dimension=DIM, partitions=20, codes=codes, metric=metric, sample_rows=800)
    files = tight.source.manifest.indexes[0].files
    assert len(files) > (1 if codes == "binary" else 3)  # the cap split the codes into files
    for store in (roomy, et.EmbeddingStore(tight.path, backend="numpy")):  # searched uncapped
        got = index_rows(store)
        assert sorted(got) == list(range(len(x)))
        idx = store.find_index(DIM, metric)
        xs = x / np.linalg.norm(x, axis=1, keepdims=True) if metric != "l2" else x
        ref, margin = reference_top1(xs, idx.centroids, metric)
        parts = np.array([got[i][0] for i in range(len(x))])
        clear = margin > 1e-4
        assert np.array_equal(parts[clear], ref[clear])
        q = x[:20] + 0.01
        full = store.search(q, k=5, nprobe=20, refine=10_000, metric=metric)
        assert full.to_dicts() == store.search(q, k=5, exact=True, metric=metric).to_dicts()


SCRIPT = """
import sys, embtools as et
store = et.EmbeddingStore(sys.argv[1], backend="numpy", max_memory_gb=float(sys.argv[2]))
store.create_index(dimension=DIM, partitions=8, codes="int8")
""".replace("DIM", str(DIM))
CAP_GB = 150_000 / 1024**3  # several chunks of 16-dim rows


def _killed_build(path: str, point: str) -> None:
    env = {**os.environ, "EMBTOOLS_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, path, str(CAP_GB)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    store = et.EmbeddingStore(root / "base", backend="numpy", max_memory_gb=CAP_GB)
    store.add(clustered(6000, seed=3))
    shutil.copytree(root / "base", root / "fresh")
    done = et.EmbeddingStore(root / "fresh", backend="numpy", max_memory_gb=CAP_GB)
    done.create_index(dimension=DIM, partitions=8, codes="int8")
    assert [n for n in os.listdir(root / "fresh" / "_index" / f"emb_{DIM}_cosine")
            if n.startswith("build-")] == []  # the spills went with the commit
    return root, index_rows(done), done.indexes()[0]


def _resume(path, monkeypatch, *, train: bool) -> tuple[et.EmbeddingStore, list[int]]:
    assigned: list[int] = []
    call = Top1.__call__

    def counting(self, x, out, best=None):
        if best is None:  # the rows' assignment (k-means passes best)
            assigned.append(len(x))
        return call(self, x, out, best)

    monkeypatch.setattr(Top1, "__call__", counting)
    if not train:
        def no_training(*a, **k):
            raise AssertionError("the centroids were trained again")
        monkeypatch.setattr(build, "train_centroids", no_training)
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=CAP_GB)
    store.create_index(dimension=DIM, partitions=8, codes="int8")
    return store, assigned


@pytest.mark.parametrize("point", ["after_index_centroids", "after_index_chunk"])
def test_killed_build_resumes_from_its_spills(fresh, monkeypatch, point):
    root, want, info = fresh
    path = root / point
    shutil.copytree(root / "base", path)
    _killed_build(str(path), point)
    folder = path / "_index" / f"emb_{DIM}_cosine"
    spills = sorted(n for n in os.listdir(folder) if n.startswith("build-"))
    assert any("centroids" in n for n in spills)
    chunks = sum("-parts-" in n for n in spills)
    assert chunks == (1 if point == "after_index_chunk" else 0)
    store, assigned = _resume(path, monkeypatch, train=False)
    if chunks:
        assert 0 < sum(assigned) < 6000  # the spilled chunk was not assigned again
    else:
        assert sum(assigned) == 6000
    assert index_rows(store) == want  # the same index as a build that was never killed
    got = store.indexes()[0]
    assert got["partitions"] == info["partitions"] and got["files"] == info["files"]
    assert [n for n in os.listdir(folder) if n.startswith("build-")] == []


def test_damaged_spills_are_recomputed_not_used(fresh, monkeypatch):
    root, want, _info = fresh
    path = root / "damaged"
    shutil.copytree(root / "base", path)
    _killed_build(str(path), "after_index_chunk")
    folder = path / "_index" / f"emb_{DIM}_cosine"
    for name in os.listdir(folder):
        if name.startswith("build-") and ("-codes-" in name or "centroids" in name):
            with open(folder / name, "r+b") as f:  # flip a byte past the .npy header
                f.seek(-3, os.SEEK_END)
                b = f.read(1)
                f.seek(-3, os.SEEK_END)
                f.write(bytes([b[0] ^ 0xFF]))
    store, assigned = _resume(path, monkeypatch, train=True)
    assert sum(assigned) == 6000  # nothing damaged was trusted
    assert index_rows(store) == want


def test_other_settings_do_not_pick_up_the_spills(fresh):
    root, _want, _info = fresh
    path = root / "other"
    shutil.copytree(root / "base", path)
    _killed_build(str(path), "after_index_centroids")
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=CAP_GB)
    store.create_index(dimension=DIM, partitions=6, codes="int8")
    assert store.indexes()[0]["partitions"] == 6
    folder = path / "_index" / f"emb_{DIM}_cosine"
    stale = [n for n in os.listdir(folder) if n.startswith("build-")]
    assert stale  # the other build's spills stay until vacuum
    store.vacuum(grace_seconds=0)
    assert [n for n in os.listdir(folder) if n.startswith("build-")] == []
    roomy = et.EmbeddingStore(path, backend="numpy")
    assert roomy.search(clustered(5, seed=9), k=3, nprobe=6).height == 15


def test_spill_refuses_pickles_and_wrong_shapes(tmp_path):
    spill = Spill(str(tmp_path), Spill.key(a=1))
    spill.save("x", np.arange(6, dtype=np.int32))
    name = next(n for n in os.listdir(tmp_path))
    assert spill.load("x", np.int32, (6,)).tolist() == list(range(6))
    assert spill.load("x", np.int64, (6,)) is None and os.listdir(tmp_path) == []
    np.save(tmp_path / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert spill.load("x", np.int32, (6,)) is None and os.listdir(tmp_path) == []


BUILD = """
import json, sys, numpy as np, embtools as et
path, cap = sys.argv[1], float(sys.argv[2])
store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap)
rss = lambda key: [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)][0] * 1024
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
store.create_index(dimension=384, codes=sys.argv[3], progress=False)
print(json.dumps({"growth": rss("VmHWM") - base, "rows": store.indexes()[0]["indexed_rows"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_build_peak_rss_stays_under_the_cap_plus_100_mib(tmp_path):
    n = 60_000
    rng = np.random.default_rng(0)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    for _ in range(0, n, 20_000):
        store.add(rng.standard_normal((20_000, 384)).astype(np.float32))
    store.close()
    cap_gb = n * 384 * 4 / 4 / 1024**3  # a quarter of the float data (22 MiB)
    out = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "s"), str(cap_gb), "float"],
                         capture_output=True, text=True, timeout=300, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rows"] == n
    # a build that held its codes, the data or a full score matrix would pass this bound
    assert r["growth"] <= cap_gb * 1024**3 + 100 * 1024**2, r
