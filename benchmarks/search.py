"""Search benchmark: embtools exact search against FAISS, sentence-transformers and LanceDB.

One table, every ratio measured in the same run:

1. 1000 queries in one batch over an in-memory corpus: embtools (numpy, torch) vs FAISS
   ``IndexFlatIP``, ``sentence_transformers.util.semantic_search`` and LanceDB flat search.
2. Single queries one at a time: embtools vs FAISS.
3. Streaming from a Parquet store with ``max_memory_gb`` a quarter of the corpus vs in memory.
4. Matryoshka funnel ``[(64, 400), (128, 100)]`` over a store with stored ``emb_64``/``emb_128``:
   speed-up over the exact full-dimension search and recall@10.

Usage::

    python benchmarks/search.py                  # 500,000 x 384, the issue's size
    python benchmarks/search.py --rows 100000    # smaller, when the machine is busy

Every figure is the best of ``--repeat`` timed runs after one warm-up; the corpus is generated
(clustered, unit-normalised) so that neighbours are meaningful.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int = 1000) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s : s + m] = centres[rng.integers(clusters, size=m)]
        x[s : s + m] += 0.6 * rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def matryoshka(rng: np.random.Generator, n: int, d: int, clusters: int = 1000) -> np.ndarray:
    """Clustered vectors whose variance decays along the dimensions, unit-normalised."""
    x = clustered(rng, n, d, clusters)
    x *= np.exp(-np.arange(d, dtype=np.float32) / (d / 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Best wall time of ``repeat`` runs after a warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip", default="", help="comma list of: st,lancedb,torch,stream,funnel")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import embtools as et
    from embtools.search import recall_at_k

    rng = np.random.default_rng(0)
    n, d, nq, k = args.rows, args.dim, args.queries, args.k
    corpus = clustered(rng, n, d)
    queries = corpus[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d)).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    single = queries[: args.single]
    rows: list[tuple[str, str, float, str]] = []  # (section, system, q/s, note)

    def add(section: str, system: str, seconds: float, count: int, note: str = "") -> float:
        qps = count / seconds
        rows.append((section, system, qps, note))
        print(f"  {section:<10} {system:<38} {qps:10.1f} q/s {note}", flush=True)
        return qps

    print(f"corpus {n:,} x {d} float32 ({n * d * 4 / 1024**2:.0f} MiB), k={k}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}", flush=True)

    # ---------------------------------------------------------------- 1. batch, in memory
    import faiss

    index = faiss.IndexFlatIP(d)
    index.add(corpus)
    faiss_batch = add("batch", "FAISS IndexFlatIP", best_of(lambda: index.search(queries, k), args.repeat), nq)

    mem = et.EmbeddingStore(None, backend="numpy")
    mem.add({d: corpus})
    et_batch = add("batch", "embtools numpy (in memory)",
                   best_of(lambda: mem.search(queries, k), args.repeat), nq)
    ours = mem.search(queries, k)
    _, fi = index.search(queries, k)
    agree = float(np.mean(ours["row_id"].to_numpy().reshape(nq, k) == fi))
    rows.append(("batch", "  ids equal to FAISS (fraction)", agree, ""))
    # the same search without the bfloat16 screen (float32 products only), chosen by the request
    et_f32 = add("batch", "embtools numpy, float32 only (screen off)",
                 best_of(lambda: mem.search(queries, k, screen="off"), args.repeat), nq)
    et_torch = float("nan")
    if "torch" not in skip:
        tstore = et.EmbeddingStore(None, backend="torch")
        tstore.add({d: corpus})
        et_torch = add("batch", "embtools torch cpu (in memory)",
                       best_of(lambda: tstore.search(queries, k), args.repeat), nq)
        del tstore
    if "st" not in skip:
        import torch
        from sentence_transformers import util

        tc, tq = torch.from_numpy(corpus), torch.from_numpy(queries)
        add("batch", "sentence_transformers semantic_search",
            best_of(lambda: util.semantic_search(tq, tc, top_k=k), args.repeat), nq)
    if "lancedb" not in skip:
        try:
            import lancedb
            import pyarrow as pa

            tmp = tempfile.mkdtemp(prefix="embtools-lance-")
            db = lancedb.connect(tmp)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(corpus.reshape(-1)), d)
            table = db.create_table("c", pa.table({"id": np.arange(n), "vector": vec}))
            lq = queries[:100]

            def lance() -> None:
                for q in lq:
                    table.search(q).metric("dot").limit(k).to_arrow()

            add("batch", "LanceDB flat (100 queries, one call each)", best_of(lance, 1), len(lq))
            shutil.rmtree(tmp, ignore_errors=True)
        except ImportError:
            print("  lancedb not installed", flush=True)
            rows.append(("batch", "LanceDB: lancedb not installed", float("nan"), ""))

    # ---------------------------------------------------------------- 2. single queries
    def faiss_single() -> None:
        for q in single:
            index.search(q[None], k)

    def et_single() -> None:
        for q in single:
            mem.search(q, k)

    f1 = add("single", "FAISS IndexFlatIP", best_of(faiss_single, args.repeat), len(single))
    e1 = add("single", "embtools numpy (in memory)", best_of(et_single, args.repeat), len(single))


    # ---------------------------------------------------------------- 3. streaming from disk
    tmpdir = tempfile.mkdtemp(prefix="embtools-bench-")
    try:
        if "stream" not in skip:
            cap = n * d * 4 / 4 / 1024**3
            disk = et.EmbeddingStore(os.path.join(tmpdir, "s"), backend="numpy")
            disk.add({d: corpus})
            streamed = et.EmbeddingStore(os.path.join(tmpdir, "s"), backend="numpy", max_memory_gb=cap)
            st = add("stream", f"embtools numpy, Parquet, cap {cap * 1024:.0f} MiB",
                     best_of(lambda: streamed.search(queries, k), args.repeat), nq)
            s1 = add("stream", "embtools numpy, Parquet, single queries",
                     best_of(lambda: [streamed.search(q, k) for q in single], 1), len(single))
            rows.append(("stream", "  streaming / in-memory (batch)", st / et_batch, "goal >= 0.8"))
            rows.append(("stream", "  streaming / in-memory (single)", s1 / e1, ""))
            del disk, streamed

        # ------------------------------------------------------------ 4. Matryoshka funnel
        if "funnel" not in skip:
            del mem
            mx = matryoshka(rng, n, d)
            mq = mx[rng.choice(n, nq, replace=False)] + 0.02 * rng.standard_normal((nq, d)).astype(np.float32)
            fstore = et.EmbeddingStore(os.path.join(tmpdir, "f"), backend="numpy")
            fstore.add({64: mx[:, :64], 128: mx[:, :128], d: mx})
            del mx
            stages = [(64, 400), (128, 100)]
            exact_s = best_of(lambda: fstore.search(mq, k), 1)
            funnel_s = best_of(lambda: fstore.search(mq, k, funnel=stages), 1)
            recall = recall_at_k(fstore.search(mq, k, funnel=stages), fstore.search(mq, k), k)
            add("funnel", f"exact {d}-dim (Parquet store)", exact_s, nq)
            add("funnel", "funnel [(64,400),(128,100)]", funnel_s, nq, f"recall@{k} = {recall:.4f}")
            rows.append(("funnel", "  funnel speed-up over exact", exact_s / funnel_s, ""))
            few = mq[:32]  # a small batch and single queries: the funnel reads 6x fewer bytes
            exact_few = best_of(lambda: fstore.search(few, k), 1)
            funnel_few = best_of(lambda: fstore.search(few, k, funnel=stages), 1)
            add("funnel", "exact, 32 queries", exact_few, len(few))
            add("funnel", "funnel, 32 queries", funnel_few, len(few))
            rows.append(("funnel", "  funnel speed-up over exact (32 queries)", exact_few / funnel_few, ""))
            one = mq[:20]
            exact_one = best_of(lambda: [fstore.search(q, k) for q in one], 1)
            funnel_one = best_of(lambda: [fstore.search(q, k, funnel=stages) for q in one], 1)
            add("funnel", "exact, single queries", exact_one, len(one))
            add("funnel", "funnel, single queries", funnel_one, len(one))
            rows.append(("funnel", "  funnel speed-up over exact (single)", exact_one / funnel_one, ""))
            del fstore
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    # ---------------------------------------------------------------- the table
    print()
    print(f"| section | system | queries/s or ratio | note |  (corpus {n:,} x {d}, k={k})")
    print("|---|---|---:|---|")
    for section, system, value, note in rows:
        print(f"| {section} | {system.strip()} | {value:,.2f} | {note} |")
    print()
    print(f"embtools numpy / FAISS, batch of {nq}: {et_batch / faiss_batch:.2f}x (goal >= 1.0)")
    print(f"embtools torch cpu / FAISS, batch of {nq}: {et_torch / faiss_batch:.2f}x (goal >= 1.0)")
    print(f"embtools numpy float32 only / FAISS, batch of {nq}: {et_f32 / faiss_batch:.2f}x")
    print(f"embtools numpy / FAISS, single queries: {e1 / f1:.2f}x (goal >= 1.0)")


if __name__ == "__main__":
    main()
