"""Near-duplicate finding with a self-join: every row's nearest other row, written to Parquet.

Builds an on-disk store of 5,000 generated 128-dim vectors, 25 of which are planted near-copies of
other rows (``copy-of-doc-XXXXX``). ``similarity_join(store, store, 1, exclude_self=True,
out=...)`` finds each row's nearest *other* row and writes the pairs as Parquet parts (resumable:
re-running the same job skips the parts already written). The pairs are read back with polars, and
those above a score threshold are the near-duplicates; the example checks they are exactly the
planted ones. Then a join of a second store (queries) against the corpus, restricted with
``where``. Run it with::

    python examples/similarity_join.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import polars as pl

import embtools as et

N, DIM, N_COPIES, THRESHOLD = 5000, 128, 25, 0.98


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    ids = [f"doc-{i:05d}" for i in range(N)]
    originals = sorted(rng.choice(N, size=N_COPIES, replace=False).tolist())
    copies = x[originals] + 0.03 * rng.standard_normal((N_COPIES, DIM)).astype(np.float32)
    copy_ids = [f"copy-of-{ids[i]}" for i in originals]
    planted = {tuple(sorted((ids[i], c))) for i, c in zip(originals, copy_ids, strict=True)}
    labels = ["a" if i % 2 else "b" for i in range(N)] + ["copy"] * N_COPIES

    with tempfile.TemporaryDirectory(prefix="embtools-example-") as tmp:
        store = et.EmbeddingStore(os.path.join(tmp, "corpus.store"), backend="numpy")
        store.add(np.concatenate([x, copies]), text_ids=ids + copy_ids, labels=labels)
        print(f"{store!r}: {N} rows and {N_COPIES} planted near-copies")

        out = os.path.join(tmp, "neighbours")
        t0 = time.perf_counter()
        path = et.similarity_join(store, store, 1, out=out, exclude_self=True, progress=False)
        elapsed = time.perf_counter() - t0
        pairs = pl.read_parquet(f"{path}/*.parquet")
        print(f"self-join (k=1, exclude_self=True) -> {path.name}/ in {elapsed:.2f} s: "
              f"{pairs.height} rows, columns {pairs.columns}")
        print(f"no row is its own neighbour: "
              f"{pairs.filter(pl.col('left_row_id') == pl.col('right_row_id')).height == 0}")

        # near-duplicates: pairs above the threshold, each pair once
        dups = (
            pairs.filter(pl.col("score") >= THRESHOLD)
            .with_columns(
                pl.min_horizontal("left_text_id", "right_text_id").alias("a"),
                pl.max_horizontal("left_text_id", "right_text_id").alias("b"),
            )
            .unique(["a", "b"])
            .sort("score", descending=True)
        )
        found = set(zip(dups["a"].to_list(), dups["b"].to_list(), strict=True))
        print(f"{len(found)} near-duplicate pairs with score >= {THRESHOLD}; "
              f"all planted pairs found: {found == planted}")
        print(dups.select("a", "b", "score").head(5))
        first = copy_ids[0]
        nn = pairs.filter(pl.col("left_text_id") == first)
        print(f"nearest neighbour of {first}: {nn['right_text_id'][0]} "
              f"(score {nn['score'][0]:.3f})")

        # the job is resumable: the same call again finds every part written and returns at once
        t0 = time.perf_counter()
        et.similarity_join(store, store, 1, out=out, exclude_self=True, progress=False)
        print(f"re-running the finished job took {time.perf_counter() - t0:.3f} s")

        # two different stores: queries against the corpus, only rows labelled 'a'
        qstore = et.EmbeddingStore(os.path.join(tmp, "queries.store"), backend="numpy")
        qstore.add(x[:100] + 0.01 * rng.standard_normal((100, DIM)).astype(np.float32),
                   text_ids=[f"q-{i:03d}" for i in range(100)])
        path2 = et.similarity_join(qstore, store, 3, out=os.path.join(tmp, "q_vs_a"),
                                   where="label = 'a'", progress=False)
        res = pl.read_parquet(f"{path2}/*.parquet")
        print(f"queries x corpus where label = 'a': {res.height} rows (100 queries x k=3), "
              f"labels searched: {sorted(set(labels[i] for i in res['right_row_id']))}")
        # q-i is a noisy copy of doc-i; doc-i is labelled 'a' for odd i, so those find their source
        top = res.filter(pl.col("rank") == 0).with_columns(
            pl.col("left_text_id").str.slice(2).cast(pl.Int64).alias("source")
        )
        odd = top.filter(pl.col("source") % 2 == 1)
        hits = odd.filter(pl.col("right_row_id") == pl.col("source")).height
        print(f"queries whose source row is labelled 'a': {hits} of {odd.height} find it first")
        qstore.close()
        store.close()
    print("similarity_join: done")


if __name__ == "__main__":
    main()
