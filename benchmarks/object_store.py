"""A store on S3 (a local moto server) against the same store on local disk.

Builds a store of ``--rows`` rows of ``--dims`` dimensions (float32, metadata columns) twice: in a
local directory and in a bucket of a moto ``ThreadedMotoServer`` on 127.0.0.1 (started here; no
network). Then, for each, in a fresh handle: one cold search of ``--queries`` random queries on the
first dimension (k=10; the S3 handle starts with an empty cache, so it fetches the footers and the
chunks it scores) and ``--repeat`` warm repeats, reporting queries per second and the bytes and
requests fetched from S3 against the bytes the search needs (the footers, the scored dimension's
column chunks, the metadata chunks of the row groups holding the hits). Commit latency: the median
of ``--commits`` small adds (``--commit-rows`` rows each) on each. The S3 numbers include moto's
own CPU time on the same machine (a real S3 is further away and not on this CPU).

Examples
--------
    python benchmarks/object_store.py --rows 20000 --dims 384 --queries 10   # quick check
    python benchmarks/object_store.py                                        # 200k rows, 384+64
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

__all__ = ["main", "run"]


def _server() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _needed(store: Any, dim: int, hits: list[int]) -> int:
    storage = store._state.storage
    total, row = 0, 0
    for entry in store.source.manifest.files:
        footer = storage.footer(entry.path, entry.bytes)
        total += entry.bytes - footer.data_end + 4
        for rows, chunks in footer.row_groups:
            hit = any(row <= h < row + rows for h in hits)
            total += sum(c.length for c in chunks
                         if c.name == f"emb_{dim}" or (hit and c.name in ("row_id", "text_id", "label")))
            row += rows
    return total


def run(rows: int, dims: list[int], queries: int, repeat: int, commits: int, commit_rows: int,
        cap_gb: float | None) -> dict[str, Any]:
    """Build, search and commit on local disk and on S3; the measurements as a dict."""
    import boto3

    import embtools as et

    server, endpoint = _server()
    tmp = tempfile.mkdtemp(prefix="embtools-bench-s3-")
    try:
        opts = {"endpoint": endpoint, "allow_http": True, "access_key_id": "bench",
                "secret_access_key": "bench-secret", "region": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                     aws_secret_access_key="bench-secret", region_name="us-east-1").create_bucket(Bucket="bench")
        where = {"disk": (f"{tmp}/local.store", None), "s3": ("s3://bench/corpus.store", opts)}
        rng = np.random.default_rng(0)
        out: dict[str, Any] = {"rows": rows, "dims": dims, "queries": queries}
        per_add = 50_000
        for name, (url, o) in where.items():
            store = et.EmbeddingStore(url, backend="numpy", storage_options=o, max_memory_gb=cap_gb)
            t0 = time.perf_counter()
            for s in range(0, rows, per_add):
                n = min(per_add, rows - s)
                r = np.random.default_rng(s)
                store.add({d: r.standard_normal((n, d), dtype=np.float32) for d in dims},
                          text_ids=[f"t{i}" for i in range(s, s + n)], labels=[f"l{i % 7}" for i in range(n)],
                          metadata={"year": (np.arange(n) % 30 + 1995).tolist()})
            out[f"{name}_build_s"] = time.perf_counter() - t0
            store.close()
        q = rng.standard_normal((queries, dims[0]), dtype=np.float32)
        results = {}
        for name, (url, o) in where.items():
            cache = f"{tmp}/cache-{name}"
            store = et.EmbeddingStore(url, backend="numpy", storage_options=o, max_memory_gb=cap_gb,
                                      cache_dir=cache if o else None)
            storage = store._state.storage
            if o:
                storage.requests = storage.bytes_read = 0
            t0 = time.perf_counter()
            res = store.search(q, k=10, dimension=dims[0])
            cold = time.perf_counter() - t0
            if o:
                out["s3_bytes_fetched"] = storage.bytes_read
                out["s3_requests"] = storage.requests
                out["s3_bytes_needed"] = _needed(store, dims[0], res["row_id"].to_list())
                out["s3_store_bytes"] = sum(f.bytes for f in store.source.manifest.files)
                before = storage.requests
            warm = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                again = store.search(q, k=10, dimension=dims[0])
                warm.append(time.perf_counter() - t0)
                assert again.equals(res)
            if o:
                out["s3_requests_on_repeat"] = storage.requests - before
            out[f"{name}_cold_qps"] = queries / cold
            out[f"{name}_warm_qps"] = queries / statistics.median(warm) if warm else None
            results[name] = res
            store.close()
        assert results["disk"].equals(results["s3"]), "S3 and disk results differ"
        for name, (url, o) in where.items():
            store = et.EmbeddingStore(url, backend="numpy", storage_options=o)
            times = []
            for c in range(commits):
                x = {d: rng.standard_normal((commit_rows, d), dtype=np.float32) for d in dims}
                t0 = time.perf_counter()
                store.add(x, text_ids=[f"c{c}-{i}" for i in range(commit_rows)])
                times.append(time.perf_counter() - t0)
            out[f"{name}_commit_ms"] = 1000 * statistics.median(times)
            store.close()
        return out
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dims", default="384,64", help="stored dimensions; the first is searched")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--commits", type=int, default=20)
    p.add_argument("--commit-rows", type=int, default=100)
    p.add_argument("--cap", type=float, default=None, help="max_memory_gb of the handles")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a.rows, [int(d) for d in a.dims.split(",")], a.queries, a.repeat, a.commits,
            a.commit_rows, a.cap)
    if a.json:
        print(json.dumps(r, indent=1))
        return
    mb = 1024**2
    print(f"{r['rows']:,} rows, dims {r['dims']}, {r['queries']} queries (k=10) on dim {r['dims'][0]}")
    print(f"{'':28}{'local disk':>14}{'S3 (moto)':>14}{'S3 / disk':>11}")
    for key, label in (("cold_qps", "search, cold (queries/s)"), ("warm_qps", "search, warm (queries/s)"),
                       ("commit_ms", "commit latency (ms, median)"), ("build_s", "build (s)")):
        d, s = r[f"disk_{key}"], r[f"s3_{key}"]
        print(f"{label:28}{d:>14.1f}{s:>14.1f}{s / d:>10.2f}x")
    print(f"S3 bytes fetched by the cold search: {r['s3_bytes_fetched'] / mb:.1f} MiB in "
          f"{r['s3_requests']} requests; needed {r['s3_bytes_needed'] / mb:.1f} MiB "
          f"({r['s3_bytes_fetched'] / r['s3_bytes_needed']:.3f}x); the store holds "
          f"{r['s3_store_bytes'] / mb:.1f} MiB; requests on repeat: {r['s3_requests_on_repeat']}")


if __name__ == "__main__":
    main()
