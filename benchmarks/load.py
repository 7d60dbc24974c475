"""Zero-copy reads of a store's embeddings, against ``np.load`` and against the in-memory store.

Issue 12 part 1, one run, one table of ratios (warm page cache: every reader runs once before it
is timed; each figure is the best of ``--repeat`` runs):

1. Load and touch ``--rows`` x ``--dim`` float32 vectors (default 1,000,000 x 384 = 1.5 GB):
   ``np.load`` of a ``.npy`` file (a copy into new memory) against ``store.get_embeddings(d)`` of a
   store holding them in one data file (an aligned, read-only view of the mapped file), and
   against ``iter_batches`` over a store of the default 256 MiB files (every batch a view).
   "touch" reads one float in every 4 KiB page (every page faulted in), "sum" reads every value.
   Goal: load and touch >= 1.5x ``np.load``.
2. Single-query exact search (k=10, cosine) streamed from the Parquet store against the same
   search over the in-memory store (``EmbeddingStore(path=None)``); goal >= 0.9x. The same rows
   for a store written by the writer before pages were placed (``--old``), to show the change,
   and under a memory cap of a quarter of the rows (the mapped pages of each batch are given back
   and mapped again by the next query).

Ratios above 1 mean embtools is faster. The machine is shared: quote the ratios, not the times.

Examples
--------
    python benchmarks/load.py                  # 1,000,000 x 384, the issue's size
    python benchmarks/load.py --rows 200000    # quicker
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["main"]

PAGE_FLOATS = 4096 // 4


def _touch(a: Any) -> float:
    """Read one float in every 4 KiB page of ``a`` (C-contiguous rows)."""
    return float(np.asarray(a).reshape(-1)[::PAGE_FLOATS].sum())


def _sum(a: Any) -> float:
    return float(np.asarray(a).sum(dtype=np.float32))


def best_of(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best wall time of each of ``fns`` over ``repeat`` rounds after a warm-up round; each
    round runs every function once, so a busy spell on the machine hits them all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for r in range(repeat + 1):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def per_query(stores: dict[str, Any], queries: np.ndarray, k: int, repeat: int) -> dict[str, float]:
    """Median over ``queries`` of each store's best time for one single-query search; each query
    runs on every store in turn (interleaved, like :func:`best_of`)."""
    for s in stores.values():
        s.search(queries[0], k=k)  # warm-up: page cache, row-norm cache
    times: dict[str, list[float]] = {name: [] for name in stores}
    for q in queries:
        best = dict.fromkeys(stores, float("inf"))
        for _ in range(repeat):
            for name, s in stores.items():
                t0 = time.perf_counter()
                s.search(q, k=k)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in stores:
            times[name].append(best[name])
    return {name: statistics.median(t) for name, t in times.items()}


def old_write_data_file(path: str | os.PathLike[str], table: pa.Table, *,
                        row_group_rows: int | None = None) -> int:
    """The data file writer before embtools placed its pages: pyarrow alone, 64 MiB row groups."""
    from embtools.storage.durable import fsync_file

    emb = [n for n in table.column_names if n.startswith("emb_")]
    widest = max((table.schema.field(n).type.list_size * 4 for n in emb), default=4)
    rows = max(1, min(row_group_rows or max(1, 64 * 1024**2 // widest), table.num_rows))
    others = [n for n in table.column_names if n not in emb]
    schema = pa.schema([pa.field(f.name, f.type, nullable=f.name not in emb) for f in table.schema])
    with open(path, "wb") as fh:
        pq.write_table(table.cast(schema), fh, row_group_size=rows, use_dictionary=others,
                       compression={**{n: "zstd" for n in others}, **{n: "none" for n in emb}},
                       write_statistics=others, column_encoding={n: "PLAIN" for n in emb},
                       data_page_size=1 << 30, max_rows_per_page=rows, data_page_version="2.0",
                       write_page_checksum=True, store_schema=True)
        fsync_file(fh)
        return fh.tell()


def _build(path: str, x: np.ndarray, old: bool = False, step: int = 250_000, **kw: Any) -> Any:
    import embtools as et
    import embtools.storage.writer as writer

    real = writer.write_data_file
    if old:
        writer.write_data_file = old_write_data_file  # type: ignore[assignment]
    try:
        store = et.EmbeddingStore(path, backend="numpy", **kw)
        for s in range(0, len(x), step):
            store.add(x[s:s + step])
    finally:
        writer.write_data_file = real  # type: ignore[assignment]
    return et.EmbeddingStore(path, backend="numpy")


def main(argv: list[str] | None = None) -> None:
    """Build the stores, run every reader, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--queries", type=int, default=20, help="single queries timed one at a time")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--old", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure a store written before pages were placed")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)

    import embtools as et

    work = args.dir or tempfile.mkdtemp(prefix="embtools-load-")
    os.makedirs(work, exist_ok=True)
    d = args.dim
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        nbytes = x.nbytes
        npy = os.path.join(work, "vectors.npy")
        np.save(npy, x)
        one = _build(os.path.join(work, "one-file"), x, step=len(x), target_file_bytes=4 * 1024**3)
        default = _build(os.path.join(work, "default"), x)
        old = _build(os.path.join(work, "old"), x, old=True) if args.old else None
        memory = et.EmbeddingStore(backend="numpy")
        memory.add(x)
        queries = rng.standard_normal((args.queries, d), dtype=np.float32)
        # correctness first: the same values through every path
        view = one.get_embeddings(d)
        assert len(one.files()) == 1 and not view.flags.owndata and view.ctypes.data % 64 == 0
        assert np.array_equal(view, x)
        del view
        assert np.array_equal(np.concatenate([np.array(b) for _, b in default.iter_batches(d)]), x)
        ref = memory.search(queries[:3], k=args.k)
        for s in (one, default, old):
            if s is not None:
                assert s.search(queries[:3], k=args.k)["row_id"].to_list() == ref["row_id"].to_list()
        del x
        gc.collect()

        def fresh(store: Any) -> Any:
            return et.EmbeddingStore(store.path, backend="numpy")

        def batches(store: Any, fn: Callable[[Any], float]) -> float:
            return sum(fn(b) for _, b in fresh(store).iter_batches(d))

        rows: list[tuple[str, float, str]] = []
        nfiles = len(default.files())
        for what, fn in (("touch", _touch), ("sum", _sum)):
            # each run opens the store afresh: its pages are mapped again (from the page cache)
            readers: dict[str, Callable[[], object]] = {
                "np.load": partial(lambda f: f(np.load(npy)), fn),
                "get_embeddings, one file (view)": partial(lambda f: f(fresh(one).get_embeddings(d)), fn),
                f"iter_batches, {nfiles} files (views)": partial(batches, default, fn),
                f"get_embeddings, {nfiles} files (copy)":
                    partial(lambda f: f(fresh(default).get_embeddings(d)), fn),
            }
            if old is not None:
                readers["get_embeddings, old store (copy)"] = partial(
                    lambda f: f(fresh(old).get_embeddings(d)), fn)
            t = best_of(readers, args.repeat)
            base = t.pop("np.load")
            rows.append((f"np.load + {what}", base, "baseline"))
            for name, v in t.items():
                goal = "goal >= 1.5" if what == "touch" and "one file" in name else ""
                rows.append((f"{name} + {what}", base / v, goal))

        cap = et.EmbeddingStore(default.path, backend="numpy", max_memory_gb=nbytes / 4 / 1024**3)
        stores = {"in memory": memory, "Parquet, default files": default, "Parquet, one file": one,
                  "Parquet, cap a quarter of the rows": cap}
        if old is not None:
            stores["Parquet, old store (unaligned)"] = old
        t = per_query(stores, queries, args.k, args.repeat)
        mem = t.pop("in memory")
        rows.append(("single query, in memory", mem, "baseline"))
        for name, v in t.items():
            rows.append((f"single query, {name}", mem / v, "goal >= 0.9" if name.endswith("default files") else ""))

        print(f"{args.rows:,} x {d} float32 = {nbytes / 1e9:.2f} GB; cpus: {os.cpu_count()}; "
              f"best of {args.repeat}, warm page cache; single queries: median of {args.queries}, k={args.k}")
        print(f"| {'reader':<52} | {'ratio':>9} | {'':<11} |")
        print(f"|{'-' * 54}|{'-' * 11}|{'-' * 13}|")
        for name, value, note in rows:
            if note == "baseline":
                print(f"| {name:<52} | {value * 1000:7.1f}ms | {'baseline':<11} |")
            else:
                print(f"| {name:<52} | {value:8.2f}x | {note:<11} |")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
