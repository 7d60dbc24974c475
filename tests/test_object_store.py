"""Stores on object storage: S3 through a local moto server (tests/conftest.py's ``s3_server``).

The storage conformance class runs on S3 and ``file://``; the commit races, a killed writer, faults
(a small proxy in front of moto that throttles or drops connections), damaged and missing objects,
a wrong secret against a server that checks it, and the bytes a search fetches.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import embtools as et
from embtools.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    StorageAccessError,
    StorageUnavailableError,
)
from embtools.storage import manifest as mf
from embtools.storage.object_store import ObjectStorage
from tests._store_writer import batch_data, batch_ids, go, spawn, wait_ready
from tests.conftest import S3Server
from tests.helpers import brute_force, check_top_k
from tests.test_storage_io import StorageTests


def _x(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _check(result: pl.DataFrame, q: np.ndarray, corpus: np.ndarray, k: int,
           rows: np.ndarray | None = None) -> None:
    """``result`` (row ids = positions) is the exact cosine top-k of ``q`` over ``corpus`` rows."""
    s64 = brute_force(corpus, q, "cosine", rows)
    found = result.sort("query", "rank")["row_id"].to_numpy().reshape(len(q), -1)
    scores = result.sort("query", "rank")["score"].to_numpy().reshape(len(q), -1)
    check_top_k(s64, scores, found, k, "cosine")


class TestS3Storage(StorageTests):
    @pytest.fixture
    def storage(self, s3_server: S3Server, tmp_path: Path) -> Iterator[ObjectStorage]:
        s = ObjectStorage(f"s3://{s3_server.bucket()}/some/prefix", s3_server.options())
        yield s
        s.close()


class TestFileUrlStorage(StorageTests):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[ObjectStorage]:
        s = ObjectStorage(f"file://{tmp_path}/store")
        yield s
        s.close()


# -- the store on S3 ------------------------------------------------------------------------------

def test_store_round_trip_on_s3_with_every_operation(s3_server: S3Server, tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket()}/team/corpus.store"
    opts = s3_server.options()
    x, y = _x(300, 16), _x(40, 16, 1)
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts, target_file_bytes=4096)
    assert store.path == url and store.version == 0
    store.add(x, text_ids=[f"t{i}" for i in range(300)], labels=["a", "b", "c"] * 100,
              metadata={"year": list(range(300))})
    store.add(y)                                             # default ids row-<row_id>
    reader = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    assert reader.num_rows == 340 and reader.versions() == [0, 1, 2]
    assert np.array_equal(reader.get_embeddings(16), np.vstack([x, y]))
    meta = reader.metadata().collect()
    assert meta["row_id"].to_list() == list(range(340))
    assert meta["text_id"].to_list()[300:] == [f"row-{i}" for i in range(300, 340)]
    q = _x(5, 16, 2)
    got = reader.search(q, k=7, dimension=16, where="label = 'b'")
    _check(got, q, np.vstack([x, y]), 7, rows=np.flatnonzero(meta["label"] == "b"))
    assert all(f.startswith(url + "/data/") and f.endswith(".parquet") for f in reader.files())
    store.delete(pl.col("year") < 100)
    store.compact(target_file_bytes=10**8)
    assert store.num_rows == 240 and len(store.files()) == 1
    old = et.EmbeddingStore(url, backend="numpy", storage_options=opts, version=2)
    assert old.num_rows == 340                                # an old version stays readable
    removed = store.vacuum(retain_versions=1, grace_seconds=0)
    assert removed["versions"] == [0, 1, 2, 3] and len(removed["files"]) >= 2
    fresh = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    assert fresh.versions() == [4] and np.array_equal(fresh.get_embeddings(16),
                                                      np.vstack([x[100:], y]))


def test_files_and_storage_options_for_polars_and_pyarrow(s3_server: S3Server) -> None:
    url = f"s3://{s3_server.bucket()}/c.store"
    store = et.EmbeddingStore(url, backend="numpy", storage_options=s3_server.options())
    store.add(_x(20, 4), text_ids=[f"t{i}" for i in range(20)], metadata={"k": list(range(20))})
    files, options = store.files(), store.storage_options
    lf = pl.scan_parquet(files, storage_options={k: str(v) for k, v in options.items()})
    assert lf.select("text_id", "k").collect()["k"].to_list() == list(range(20))
    from pyarrow import fs

    s3 = fs.S3FileSystem(access_key=options["access_key_id"], secret_key=options["secret_access_key"],
                         endpoint_override=options["endpoint"], region=options["region"])
    table = pq.read_table(files[0].removeprefix("s3://"), filesystem=s3, columns=["row_id", "emb_4"])
    assert table.column("row_id").to_pylist() == list(range(20))


def test_cache_dir_keeps_data_files_and_repeats_make_no_requests(s3_server: S3Server,
                                                                 tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket()}/c.store"
    opts = s3_server.options()
    x = {64: _x(3000, 64), 16: _x(3000, 16, 1)}
    et.EmbeddingStore(url, backend="numpy", storage_options=opts, target_file_bytes=300_000).add(
        x, text_ids=[f"t{i}" for i in range(3000)], metadata={"k": list(range(3000))})
    cache = tmp_path / "cache"
    q = _x(3, 16, 5)
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts, cache_dir=cache,
                              max_memory_gb=0.002)
    storage = store._state.storage
    storage.requests = storage.bytes_read = 0
    first = store.search(q, k=5, dimension=16)
    assert len(store.source.manifest.files) > 2
    needed = _bytes_needed(store, 16, first["row_id"].to_list())
    print(f"search fetched {storage.bytes_read} bytes in {storage.requests} requests; it needs "
          f"{needed} (ratio {storage.bytes_read / needed:.3f})")
    assert storage.bytes_read <= 1.1 * needed, (storage.bytes_read, needed)
    assert storage.bytes_read < 0.5 * sum(f.bytes for f in store.source.manifest.files)
    _check(first, q, x[16], 5)
    before = storage.requests
    assert store.search(q, k=5, dimension=16).equals(first)
    assert storage.requests == before                        # the same handle: no request at all
    again = et.EmbeddingStore(url, backend="numpy", storage_options=opts, cache_dir=cache,
                              max_memory_gb=0.002)
    s2 = again._state.storage
    s2.requests = s2.bytes_read = 0
    assert again.search(q, k=5, dimension=16).equals(first)
    assert s2.bytes_read < 4096                              # only the version listing and manifest
    assert sorted(os.listdir(cache)) and all(Path(p).is_dir() for p in cache.iterdir())


def _bytes_needed(store: et.EmbeddingStore, dim: int, hits: list[int]) -> int:
    """Footer, magic and the emb_<dim> chunks of every file, and the base metadata chunks of the
    row groups holding the hits: what an exact search must read."""
    storage = store._state.storage
    total = 0
    row = 0
    for entry in store.source.manifest.files:
        footer = storage.footer(entry.path, entry.bytes)
        total += entry.bytes - footer.data_end + 4
        for rows, chunks in footer.row_groups:
            hit = any(row <= h < row + rows for h in hits)
            for c in chunks:
                if c.name == f"emb_{dim}" or (hit and c.name in ("row_id", "text_id", "label")):
                    total += c.length
            row += rows
    return total


def test_storage_options_are_checked_and_translated(s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    # allow_http in the S3 config panics in obstore 0.12: it is moved to the client options
    opts = {**s3_server.options(), "allow_http": "true", "aws_allow_http": "true"}
    assert et.EmbeddingStore(f"s3://{bucket}/c", storage_options=opts).version == 0
    with pytest.raises(InvalidArgumentError, match="storage_options"):
        et.EmbeddingStore(f"s3://{bucket}/c", storage_options=["endpoint"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="directories"):
        et.EmbeddingStore("/tmp/x.store", storage_options={"region": "x"})
    with pytest.raises(InvalidArgumentError, match="unsupported URL scheme"):
        et.EmbeddingStore("ftp://host/x.store")
    with pytest.raises(InvalidArgumentError) as info:
        et.EmbeddingStore(f"s3://{bucket}/c", storage_options={**s3_server.options(), "no_such_key": 1})
    assert s3_server.options()["secret_access_key"] not in str(info.value)


def test_file_urls_open_the_directory(tmp_path: Path) -> None:
    store = et.EmbeddingStore(f"file://{tmp_path}/s", backend="numpy")
    store.add(_x(3, 4))
    assert store.path == str(tmp_path / "s")
    assert et.EmbeddingStore(tmp_path / "s").num_rows == 3


# -- commits from several processes -------------------------------------------------------------

def test_100_commit_races_from_4_processes_on_s3(s3_server: S3Server) -> None:
    workers, batches, rows, dim = 4, 25, 3, 4
    url = f"s3://{s3_server.bucket()}/race.store"
    opts = s3_server.options()
    et.EmbeddingStore(url, storage_options=opts)
    env = {"EMBTOOLS_TEST_STORAGE_OPTIONS": json.dumps(opts)}
    procs = [spawn("batches", url, {"seed": w + 1, "rows": rows, "dim": dim, "batches": batches,
                                    "prefix": f"w{w}"}, env) for w in range(workers)]
    for p in procs:
        wait_ready(p)
    for p in procs:
        go(p)
    lost = uploads = 0
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read() if p.stderr else ""
        out = p.stdout.read() if p.stdout else ""
        (stats,) = [line.split() for line in out.splitlines() if line.startswith("stats ")]
        lost += int(stats[1].split("=")[1])
        uploads += int(stats[2].split("=")[1])
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    meta = store.metadata().collect()
    commits = workers * batches
    # no lost or duplicated version: exactly one version per commit, each with one more batch
    assert store.versions() == list(range(commits + 1))
    counts = [et.EmbeddingStore(url, storage_options=opts, version=v).num_rows
              for v in range(0, commits + 1, 10)]
    assert counts == [v * rows for v in range(0, commits + 1, 10)]
    # every row exactly once, row ids unique, ascending and without gaps
    assert meta.height == commits * rows and meta["row_id"].to_list() == list(range(commits * rows))
    emb = store.get_embeddings(dim)
    by_id = {t: i for i, t in enumerate(meta["text_id"].to_list())}
    assert len(by_id) == commits * rows
    for w in range(workers):
        for j in range(batches):
            at = [by_id[t] for t in batch_ids(f"w{w}-b{j}", rows)]
            assert np.array_equal(emb[at], batch_data((w + 1) * 1000 + j, rows, dim))
    # each batch is one file; a writer whose ids another commit took uploads its file again
    assert uploads >= commits
    print(f"race: {commits} commits from {workers} processes -> versions 1..{store.version}, "
          f"{meta.height} rows, {meta['row_id'].n_unique()} distinct row ids; {lost} creates "
          f"refused (lost races), {uploads - commits} files written again with new row ids")


def test_writer_killed_between_upload_and_commit(s3_server: S3Server) -> None:
    url = f"s3://{s3_server.bucket()}/crash.store"
    opts = s3_server.options()
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    x = _x(10, 4)
    store.add(x, text_ids=[f"t{i}" for i in range(10)])
    env = {"EMBTOOLS_TEST_STORAGE_OPTIONS": json.dumps(opts), "EMBTOOLS_CRASH_AT": "after_data"}
    p = spawn("add", url, {"seed": 3, "rows": 50, "dim": 4, "prefix": "late", "target": 600}, env)
    wait_ready(p)
    go(p)
    assert p.wait(timeout=120) == -9                         # SIGKILL after its uploads
    data = store._state.storage.list("data/")
    assert len(data) > 1                                     # its files were uploaded...
    reader = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    assert reader.version == 1 and np.array_equal(reader.get_embeddings(4), x)   # ...not committed
    assert store.vacuum(grace_seconds=3600)["files"] == []  # in the grace period: kept
    removed = store.vacuum(grace_seconds=0)["files"]
    assert len(removed) == len(data) - 1 and len(store._state.storage.list("data/")) == 1
    assert np.array_equal(et.EmbeddingStore(url, storage_options=opts).get_embeddings(4), x)


# -- damaged and missing objects, faults, credentials ------------------------------------------

def test_damaged_and_missing_objects_are_typed_errors(s3_server: S3Server, tmp_path: Path) -> None:
    """Each reader gets a fresh cache (a cached copy of an immutable file is never re-read)."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/d.store"
    opts = s3_server.options()
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    store.add(_x(50, 8), text_ids=[f"t{i}" for i in range(50)])
    client = s3_server.client()
    (data_key,) = [o.key for o in store._state.storage.list("data/")]
    key = f"d.store/{data_key}"
    blob = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    entry = store.source.manifest.files[0]
    (emb,) = [c for _, cs in store._state.storage.footer(entry.path, entry.bytes).row_groups
              for c in cs if c.name == "emb_8"]
    damaged = bytearray(blob)
    damaged[emb.start + emb.length - 10] ^= 0xFF             # inside the embedding values
    client.put_object(Bucket=bucket, Key=key, Body=bytes(damaged))
    with pytest.raises(CorruptStoreError, match="CRC"):
        _fresh(url, opts, tmp_path).get_embeddings(8)
    client.put_object(Bucket=bucket, Key=key, Body=blob[:-30])          # truncated
    with pytest.raises(CorruptStoreError):
        _fresh(url, opts, tmp_path).get_embeddings(8)
    client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(CorruptStoreError, match="missing"):
        _fresh(url, opts, tmp_path).get_embeddings(8)
    client.put_object(Bucket=bucket, Key=key, Body=blob)
    manifest = f"d.store/_versions/{1:020d}.json"
    good = client.get_object(Bucket=bucket, Key=manifest)["Body"].read()
    client.put_object(Bucket=bucket, Key=manifest, Body=good[:40])
    with pytest.raises(CorruptStoreError, match="unreadable manifest"):
        _fresh(url, opts, tmp_path)
    client.put_object(Bucket=bucket, Key=manifest, Body=good)
    assert _fresh(url, opts, tmp_path).num_rows == 50


def _fresh(url: str, opts: dict[str, Any], tmp_path: Path) -> et.EmbeddingStore:
    cache = tmp_path / f"cache{len(list(tmp_path.glob('cache*')))}"
    return et.EmbeddingStore(url, backend="numpy", storage_options=opts, cache_dir=cache)


class FaultProxy:
    """An HTTP proxy in front of moto that answers the next ``throttle`` requests with 503
    SlowDown and drops the connection of the next ``drop`` requests (no response at all)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.throttle = self.drop = 0
        self.seen = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    proxy.seen += 1
                    fault = "throttle" if proxy.throttle > 0 else "drop" if proxy.drop > 0 else None
                    if fault == "throttle":
                        proxy.throttle -= 1
                    elif fault == "drop":
                        proxy.drop -= 1
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "throttle":
                    msg = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.close()


def test_throttling_and_dropped_connections_are_retried_or_typed(s3_server: S3Server,
                                                                  proxy: FaultProxy,
                                                                  tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket()}/f.store"
    opts = s3_server.options(endpoint=proxy.endpoint, max_retries=4, retry_timeout=20)
    x = _x(200, 8)
    q = _x(2, 8, 1)
    proxy.throttle = 3                                         # the first three: 503 SlowDown
    store = et.EmbeddingStore(url, backend="numpy", storage_options=opts)
    proxy.drop = 2                                             # then two dropped connections
    store.add(x, text_ids=[f"t{i}" for i in range(200)])
    assert proxy.throttle == 0 and proxy.drop == 0
    for fault in ("throttle", "drop"):
        reader = _fresh(url, opts, tmp_path)                     # reads its data over the proxy
        setattr(proxy, fault, 2)
        _check(reader.search(q, k=4, dimension=8), q, x, 4)   # retried: right answer
        assert getattr(proxy, fault) == 0
    proxy.throttle = 10**6                                     # a store that never recovers
    quick = s3_server.options(endpoint=proxy.endpoint, max_retries=1, retry_timeout=2)
    with pytest.raises(StorageUnavailableError, match="failed after retries"):
        et.EmbeddingStore(url, backend="numpy", storage_options=quick)
    proxy.throttle = 0
    proxy.drop = 10**6
    with pytest.raises(StorageUnavailableError):
        et.EmbeddingStore(url, backend="numpy", storage_options=quick)
    proxy.drop = 0
    _check(_fresh(url, quick, tmp_path).search(q, k=4), q, x, 4)


def test_wrong_secret_against_a_server_that_checks_credentials(s3_server: S3Server) -> None:
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, aws_access_key_id="a",
                       aws_secret_access_key="b", region_name="us-east-1")
    user = f"u{os.getpid()}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = s3_server.bucket()
    good = s3_server.options(access_key_id=key["AccessKeyId"], secret_access_key=key["SecretAccessKey"])
    wrong = {**good, "secret_access_key": "not-the-secret-0123456789"}
    _set_auth(s3_server, "0")                                  # moto checks every request now
    try:
        store = et.EmbeddingStore(f"s3://{bucket}/a.store", backend="numpy", storage_options=good)
        store.add(_x(4, 4))
        with pytest.raises(StorageAccessError, match="credentials") as info:
            et.EmbeddingStore(f"s3://{bucket}/a.store", storage_options=wrong)
        assert "not-the-secret-0123456789" not in str(info.value)
        assert key["SecretAccessKey"] not in str(info.value)
        assert et.EmbeddingStore(f"s3://{bucket}/a.store", storage_options=good).num_rows == 4
    finally:
        _set_auth(s3_server, "inf")


def _set_auth(server: S3Server, count: str) -> None:
    host, port = server.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/moto-api/reset-auth", body=count.encode())
    assert conn.getresponse().status == 200
    conn.close()


def test_listing_the_latest_version_is_one_request(s3_server: S3Server) -> None:
    url = f"s3://{s3_server.bucket()}/l.store"
    store = et.EmbeddingStore(url, storage_options=s3_server.options())
    for i in range(5):
        store.add(_x(1, 4, i))
    storage = store._state.storage
    storage.requests = 0
    assert mf.latest_version(storage) == 5 and storage.requests == 1
    assert mf.latest_version(storage, after=3) == 5 and storage.requests == 2


def test_cli_takes_urls(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from embtools.cli import cli

    url = f"s3://{s3_server.bucket()}/cli.store"
    monkeypatch.setenv("EMBTOOLS_STORAGE_OPTIONS", json.dumps(s3_server.options()))
    monkeypatch.setenv("EMBTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    x = _x(120, 8)
    pl.DataFrame({"id": [f"d{i}" for i in range(120)], "vec": x.tolist()}).write_parquet(tmp_path / "v.parquet")

    def run(*args: Any) -> Any:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    missing = CliRunner().invoke(cli, ["info", url])
    assert missing.exit_code == 1 and "no store at" in missing.output
    run("ingest", url, tmp_path / "v.parquet", "--id-column", "id", "--vector-column", "vec",
        "--commit-rows", "50")
    info = json.loads(run("info", url, "--json").output)
    assert info["rows"] == 120 and info["dimensions"] == [8] and info["files"] == 3
    assert info["versions"] == [0, 1, 2, 3] and info["bytes"] > 120 * 8 * 4
    q = _x(2, 8, 4)
    np.save(tmp_path / "q.npy", q)
    run("search", url, "--queries", tmp_path / "q.npy", "-k", "3", "--backend", "numpy",
        "--out", tmp_path / "hits.parquet")
    _check(pl.read_parquet(tmp_path / "hits.parquet"), q, x, 3)
    run("compact", url)
    run("vacuum", url, "--grace-seconds", "0")
    assert "ok" in run("verify", url).output.lower()
    store = et.EmbeddingStore(url, storage_options=s3_server.options())
    assert store.versions() == [4] and len(store.files()) == 1
