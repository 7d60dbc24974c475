"""Exact search: metrics, where-filters, the Matryoshka funnel and the memory cap.

Builds an on-disk store of 20,000 generated 256-dim vectors (with the 64-dim prefix stored too)
whose variance falls off along the dimensions, as Matryoshka embeddings' does, and queries made by
perturbing known rows. Then shows:

- exact top-k with ``metric="cosine"``, ``"dot"`` and ``"l2"`` (squared Euclidean, smallest first);
- ``where=`` filters as a polars expression and as a SQL string (applied before scoring);
- the Matryoshka funnel (shortlist with 64 dims, re-rank with 256) and its ``recall_at_k``;
- the memory cap: ``max_memory_gb``, ``get_memory_info``, ``MemoryLimitError`` from
  ``get_embeddings``, streaming with ``iter_batches``, and ``search`` under the cap.

The data is generated. Run it with::

    python examples/search.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import polars as pl

import embtools as et
from embtools.errors import MemoryLimitError
from embtools.search import recall_at_k

N, DIM, SHORT = 20_000, 256, 64
LABELS = ["news", "blog", "paper", "forum"]


def make_corpus(seed: int = 0) -> tuple[np.ndarray, list[str], list[str], list[int]]:
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1.0 + np.arange(DIM) / 8.0)  # early dimensions carry most of the signal
    x = (rng.standard_normal((N, DIM)) * scale).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"doc-{i:05d}" for i in range(N)]
    labels = [LABELS[i % len(LABELS)] for i in range(N)]
    years = (2015 + rng.integers(0, 10, N)).tolist()
    return x, ids, labels, years


def main() -> None:
    x, ids, labels, years = make_corpus()
    rng = np.random.default_rng(1)
    planted = [11, 4242, 17_001]  # the queries are noisy copies of these rows
    queries = x[planted] + 0.02 * rng.standard_normal((len(planted), DIM)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="embtools-example-") as tmp:
        path = os.path.join(tmp, "search.store")
        store = et.EmbeddingStore(path, backend="numpy")
        store.add({DIM: x, SHORT: np.ascontiguousarray(x[:, :SHORT])}, text_ids=ids,
                  labels=labels, metadata={"year": years})
        print(f"{store!r}")

        # 1. exact search with three metrics
        print("\n== exact search ==")
        for metric in ("cosine", "dot", "l2"):
            hits = store.search(queries, k=3, dimension=DIM, metric=metric)
            top = hits.filter(pl.col("rank") == 0)
            print(f"metric={metric:<6}: top hits {top['text_id'].to_list()}, "
                  f"scores {[round(float(s), 4) for s in top['score']]}")
        print(f"planted rows:          {[ids[i] for i in planted]}")
        print(store.search(queries[0], k=3, dimension=DIM))

        # 2. where filters (polars expression or SQL string), applied before scoring
        print("\n== filtered search ==")
        expr = (pl.col("label") == "paper") & (pl.col("year") >= 2020)
        by_expr = store.search(queries, k=5, dimension=DIM, where=expr, columns=["year"])
        by_sql = store.search(queries, k=5, dimension=DIM,
                              where="label = 'paper' AND year >= 2020", columns=["year"])
        ok = by_expr.filter((pl.col("label") != "paper") | (pl.col("year") < 2020)).height == 0
        print(f"where=polars expr: {by_expr.height} rows, all match the filter: {ok}; "
              f"SQL string gives the same rows: {by_expr.equals(by_sql)}")
        print(by_expr.head(5))

        # 3. the Matryoshka funnel vs exact search
        print("\n== Matryoshka funnel ==")
        fq = x[rng.choice(N, size=100, replace=False)]
        fq = fq + 0.05 * rng.standard_normal(fq.shape).astype(np.float32)
        k = 10
        t0 = time.perf_counter()
        exact = store.search(fq, k=k, dimension=DIM)
        t1 = time.perf_counter()
        for shortlist in (20, 100, 400):
            t2 = time.perf_counter()
            funnel = store.search(fq, k=k, dimension=DIM, funnel=[(SHORT, shortlist)])
            t3 = time.perf_counter()
            recall = recall_at_k(funnel, exact, k)
            print(f"funnel [({SHORT}, {shortlist})]: recall@{k} {recall:.3f} "
                  f"({(t3 - t2) * 1000:.0f} ms; exact {(t1 - t0) * 1000:.0f} ms)")
        store.close()

        # 4. the memory cap: at most ~2 MiB of embeddings at once, for 20 MiB stored
        print("\n== memory cap ==")
        capped = et.EmbeddingStore(path, backend="numpy", max_memory_gb=2 / 1024)
        info = capped.get_memory_info()
        print(f"stored {info['stored_bytes'] / 1024**2:.1f} MiB of embeddings, cap "
              f"{info['cap_bytes'] / 1024**2:.1f} MiB, held now {info['held_bytes']} bytes")
        try:
            capped.get_embeddings(DIM)
        except MemoryLimitError as err:
            print(f"get_embeddings({DIM}) raised MemoryLimitError: {err}")
        small = capped.get_embeddings(DIM, where="year = 2015 AND label = 'news'")
        print(f"get_embeddings with a selective where fits: shape {small.shape}")
        n_batches, n_rows, norms = 0, 0, []
        for meta, block in capped.iter_batches(DIM):
            n_batches += 1
            n_rows += meta.height
            norms.append(float(np.linalg.norm(capped.backend.to_numpy(block), axis=1).mean()))
        print(f"iter_batches({DIM}): {n_rows} rows in {n_batches} batches "
              f"(mean norm {np.mean(norms):.3f}), never more than the cap in memory")
        under_cap = capped.search(queries, k=3, dimension=DIM)
        uncapped = et.EmbeddingStore(path, backend="numpy").search(queries, k=3, dimension=DIM)
        same = under_cap.select("query", "row_id").equals(uncapped.select("query", "row_id"))
        top = under_cap.filter(pl.col("rank") == 0)["text_id"].to_list()
        print(f"search under the cap streams the store: top hits {top}, same as uncapped: {same}")
        capped.close()
    print("search: done")


if __name__ == "__main__":
    main()
