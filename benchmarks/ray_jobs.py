"""Ray jobs benchmark: embedding through Ray against single-process add_texts, the distributed
join against the local join, and the time to start a local cluster.

1. cluster start: ``ray.init(num_cpus=CPUS)`` on the loopback address, wall time;
2. embedding: the same ``--texts`` standard-library docstrings (``embtools.corpus``) embedded with
   the packaged all-MiniLM-L6-v2 into a new store, (a) by ``store.add_texts`` in this process
   (the model loaded first, not timed, as Ray loads it in its actor) and (b) by
   ``embtools.ray.embed_to_store`` with the default pool (end to end: actor start and model load
   included, then reads, embedding, writes and the commit); the overhead is b / a - 1; and (c)
   ``embed_to_store`` of 8 texts, the fixed cost of a job, so that b - c is the marginal time;
3. join: a self-join (k=10) of ``--join-rows`` random 384-d rows, ``embtools.similarity_join``
   against ``embtools.ray.similarity_join`` (same chunks; each task under a 1 GB cap).

Each timing is the best of ``--repeat`` runs. Prints a Markdown table and, with ``--json``, writes
the figures to a file.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/ray_jobs.py                 # 4,000 texts, 20,000-row join
    HF_HUB_OFFLINE=1 python benchmarks/ray_jobs.py --texts 500 --join-rows 4000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=4000)
    ap.add_argument("--join-rows", type=int, default=20000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    import ray
    import ray.data

    import embtools as et
    from embtools.corpus import stdlib_corpus
    from embtools.models import load_model, resolve_model
    from embtools.ray import embed_to_store
    from embtools.ray import similarity_join as ray_join
    from embtools.ray.embed import pool_defaults

    tmp = tempfile.mkdtemp(prefix="embtools-ray-bench-")
    fig: dict[str, Any] = {"texts": args.texts, "join_rows": args.join_rows, "cpus": args.cpus,
                           "load": os.getloadavg()}
    try:
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        fig["cluster_start_s"] = time.perf_counter() - t
        ray.data.DataContext.get_current().enable_progress_bars = False
        fig["nodes"] = [n["NodeManagerAddress"] for n in ray.nodes()]
        fig["pool"] = dict(zip(("num_cpus", "num_gpus", "actors", "threads"),
                               pool_defaults(None, None, None, None), strict=True))

        corpus = stdlib_corpus(limit=args.texts)
        texts, ids = list(corpus.texts), list(corpus.text_ids)
        fig["texts"] = len(texts)
        load_model(resolve_model(None), device=None)  # the single process's model, loaded once
        run = [0]

        def local() -> None:
            run[0] += 1
            store = et.EmbeddingStore(f"{tmp}/local-{run[0]}", backend="numpy")
            store.add_texts(texts, text_ids=ids, cache_dir=False)

        def distributed(n: int) -> None:
            run[0] += 1
            store = et.EmbeddingStore(f"{tmp}/ray-{run[0]}", backend="numpy")
            ds = ray.data.from_items([{"id": i, "text": x}
                                      for i, x in zip(ids[:n], texts[:n], strict=True)])
            embed_to_store(ds, store, text_column="text", id_column="id")

        fig["add_texts_s"] = best(local, args.repeat)
        fig["embed_to_store_s"] = best(lambda: distributed(len(texts)), args.repeat)
        fig["embed_overhead"] = fig["embed_to_store_s"] / fig["add_texts_s"] - 1
        # the fixed cost of a job (actor start, model load in the actor, planning, commit): a
        # job of 8 texts; what remains is the marginal throughput
        fig["embed_fixed_s"] = best(lambda: distributed(8), args.repeat)
        marginal = max(1e-9, fig["embed_to_store_s"] - fig["embed_fixed_s"])
        fig["embed_marginal_overhead"] = marginal / fig["add_texts_s"] - 1

        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.join_rows, 384)).astype(np.float32)
        store = et.EmbeddingStore(f"{tmp}/join.store", backend="numpy", max_memory_gb=1.0)
        store.add(x, text_ids=[f"r{i}" for i in range(args.join_rows)])
        chunk = max(1, args.join_rows // 8)

        def join_local() -> None:
            run[0] += 1
            et.similarity_join(store, store, 10, out=f"{tmp}/jl-{run[0]}", exclude_self=True,
                               chunk_rows=chunk)

        def join_ray() -> None:
            run[0] += 1
            ray_join(store, store, 10, out=f"{tmp}/jr-{run[0]}", exclude_self=True,
                     chunk_rows=chunk, max_memory_gb=1.0)

        fig["join_local_s"] = best(join_local, args.repeat)
        fig["join_ray_s"] = best(join_ray, args.repeat)
        fig["join_ratio"] = fig["join_ray_s"] / fig["join_local_s"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    n = fig["texts"]
    print(f"machine: {args.cpus} CPUs for Ray, load average {fig['load'][0]:.1f} at the start; "
          f"nodes {fig['nodes']}; default pool {fig['pool']}")
    print()
    print("| measurement | time (s) | rate | vs local |")
    print("|---|---|---|---|")
    print(f"| local cluster start (`ray.init`) | {fig['cluster_start_s']:.1f} | | |")
    print(f"| `add_texts`, one process ({n} texts) | {fig['add_texts_s']:.1f} | "
          f"{n / fig['add_texts_s']:.0f} texts/s | 1.00 |")
    print(f"| `embed_to_store`, Ray end to end | {fig['embed_to_store_s']:.1f} | "
          f"{n / fig['embed_to_store_s']:.0f} texts/s | {1 + fig['embed_overhead']:.2f} "
          f"(overhead {100 * fig['embed_overhead']:+.0f}%) |")
    print(f"| `embed_to_store` of 8 texts (the fixed cost of a job) | {fig['embed_fixed_s']:.1f} | | |")
    print(f"| `embed_to_store` less that fixed cost | "
          f"{fig['embed_to_store_s'] - fig['embed_fixed_s']:.1f} | | "
          f"{1 + fig['embed_marginal_overhead']:.2f} "
          f"(overhead {100 * fig['embed_marginal_overhead']:+.0f}%) |")
    print(f"| `similarity_join`, local ({args.join_rows} x 384, k=10) | {fig['join_local_s']:.1f} | "
          f"{args.join_rows / fig['join_local_s']:.0f} rows/s | 1.00 |")
    print(f"| `similarity_join`, Ray tasks | {fig['join_ray_s']:.1f} | "
          f"{args.join_rows / fig['join_ray_s']:.0f} rows/s | {fig['join_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
