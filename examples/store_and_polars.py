"""An on-disk store: versions, snapshots, metadata queries with polars, the files read by others.

Creates a store in a temporary directory, adds rows with text ids, labels, metadata columns and two
Matryoshka dimensions (two commits), queries the metadata with polars (``store.metadata()`` is a
LazyFrame), opens an old version as a read-only snapshot, reads the committed Parquet files
(``store.files()``) with ``pl.scan_parquet`` and with DuckDB (when it is installed), then deletes
rows, compacts the small files and vacuums old versions. The data is generated. Run it with::

    python examples/store_and_polars.py
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import numpy as np
import polars as pl

import embtools as et
from embtools.errors import ReadOnlyStoreError

TOPICS = ["sports", "science", "music", "spam"]


def make_rows(start: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    full = rng.standard_normal((n, 256)).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    ids = [f"doc-{i:05d}" for i in range(start, start + n)]
    return {
        "embeddings": {256: full, 64: np.ascontiguousarray(full[:, :64])},
        "text_ids": ids,
        "labels": [TOPICS[i % len(TOPICS)] for i in range(start, start + n)],
        "metadata": {
            "year": [2018 + i % 7 for i in range(start, start + n)],
            "n_words": rng.integers(5, 500, n).tolist(),
        },
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="embtools-example-") as tmp:
        path = os.path.join(tmp, "corpus.store")
        store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=0.5)
        print(f"created {path}: version {store.version}, {store.num_rows} rows")

        # two commits: each add() is one atomic version
        v1 = store.add(**make_rows(0, 3000, seed=0))
        v2 = store.add(**make_rows(3000, 1000, seed=1), properties={"source": "example"})
        print(f"add -> version {v1}, add -> version {v2}: {store!r}")
        print(f"dimensions {store.dimensions}, versions {store.versions()}, "
              f"properties {store.properties}, config hash {store.config_hash}")

        # polars on the metadata: a LazyFrame over the committed files
        meta = store.metadata()
        print(f"metadata schema: {dict(meta.collect_schema())}")
        per_label = (
            meta.filter(pl.col("year") >= 2020)
            .group_by("label")
            .agg(pl.len().alias("rows"), pl.col("n_words").mean().round(1).alias("mean_words"))
            .sort("label")
            .collect()
        )
        print("rows per label since 2020:")
        print(per_label)

        # the same where-filters select embeddings
        science = (pl.col("label") == "science") & (pl.col("year") > 2022)
        sci = store.get_embeddings(64, where=science)
        sql = store.get_embeddings(64, where="label = 'science' AND year > 2022")
        print(f"get_embeddings(64, where=...) -> {sci.shape}; the SQL form gives the same rows: "
              f"{bool(np.array_equal(sci, sql))}")

        # an old version stays readable as a read-only snapshot
        old = et.EmbeddingStore(path, version=v1)
        print(f"snapshot of version {old.version}: {old.num_rows} rows "
              f"(latest has {store.num_rows})")
        try:
            old.add(**make_rows(9000, 1, seed=2))
        except ReadOnlyStoreError as err:
            print(f"writing to a snapshot is refused: {type(err).__name__}")
        old.close()

        # the committed files are plain Parquet: any engine can read them
        files = store.files()
        print(f"{len(files)} committed Parquet files, e.g. {os.path.relpath(files[0], path)}")
        scanned = (
            pl.scan_parquet(files)
            .group_by("label")
            .agg(pl.len().alias("rows"))
            .sort("label")
            .collect()
        )
        print(f"pl.scan_parquet(store.files()): {dict(scanned.iter_rows())}")
        first = (
            pl.scan_parquet(files)
            .select("row_id", "text_id", pl.col("emb_64").arr.head(3).alias("emb_64[:3]"))
            .head(2)
            .collect()
        )
        print(f"the embedding columns are fixed-size lists (emb_64, emb_256):\n{first}")
        if importlib.util.find_spec("duckdb") is not None:
            import duckdb

            listed = ", ".join(f"'{f}'" for f in files)
            rows = duckdb.sql(
                f"SELECT label, count(*) AS n, min(year) AS first_year "
                f"FROM read_parquet([{listed}]) GROUP BY label ORDER BY label"
            ).fetchall()
            print(f"DuckDB over the same files: {rows}")
        else:
            print("DuckDB is not installed; skipping the DuckDB query (pip install duckdb)")

        # delete, compact, vacuum: each write is a new version
        def row_id_of(text_id: str) -> int:
            row = store.metadata().filter(pl.col("text_id") == text_id).select("row_id")
            return int(row.collect().item())

        before, kept_id = store.num_rows, row_id_of("doc-03001")
        v3 = store.delete(pl.col("label") == "spam")
        print(f"delete(label == 'spam') -> version {v3}: {before} -> {store.num_rows} rows")
        n_files = len(store.files())
        v4 = store.compact()
        print(f"compact() -> version {v4}: {n_files} -> {len(store.files())} data files")
        spam = store.metadata().filter(pl.col("label") == "spam")
        spam_left = spam.select(pl.len()).collect().item()
        print(f"spam rows left: {spam_left}; row ids are stable: doc-03001 had row_id {kept_id}, "
              f"has {row_id_of('doc-03001')}")
        removed = store.vacuum(retain_versions=1, grace_seconds=0)
        print(f"vacuum(retain_versions=1) removed versions {removed['versions']} and "
              f"{len(removed['files'])} unreferenced files; versions now {store.versions()}")

        reopened = et.EmbeddingStore.load_from_disk(path, backend="numpy")
        print(f"reopened: {reopened!r}")
        reopened.close()
        store.close()
    print("store_and_polars: done")


if __name__ == "__main__":
    main()
