"""Load throughput of embedding vectors: embtools' zero-copy reader against the usual readers.

Writes ``--rows`` x ``--dim`` float32 vectors (default 1,000,000 x 384 = 1.5 GB) once as an embtools
data file, as ``.npy`` and (if pylance is installed) as a Lance dataset, then reads them back with
each reader. The page cache is warm (every reader runs once before timing); each figure is the best
of ``--repeat`` runs and is printed as GB/s and as a ratio to ``np.load``, all measured in one run.

embtools rows: "map" only maps and validates (no value is read); "map + touch pages" reads one float
per 4 KiB page of a fresh mapping (every page faulted in from the page cache); "map + sum" reads
every value; "map + copy" copies every value into a preallocated buffer (the work np.load does).
Each embtools variant releases each row group after use, as the store's batch reader does.

Examples
--------
    python benchmarks/load.py                  # 1.5 GB
    python benchmarks/load.py --rows 200000    # 300 MB, quicker
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embtools.storage.datafile import MappedParquetFile, embedding_array, write_data_file

__all__ = ["main"]

PAGE = 4096


def _embtools(path: str, col: str, mode: str, out: np.ndarray | None = None) -> float:
    acc = 0.0
    with MappedParquetFile(path) as f:
        pos = 0
        for g in range(len(f.row_group_rows)):
            a = f.embedding(col, g)
            if mode == "touch":
                flat = a.reshape(-1)
                acc += float(flat[:: PAGE // 4].sum())
            elif mode == "sum":
                acc += float(a.sum())
            elif mode == "copy" and out is not None:
                out[pos:pos + len(a)] = a
            pos += len(a)
            del a
            f.release(col, g)
    return acc


def _pyarrow(path: str, col: str) -> np.ndarray:
    arr = pq.read_table(path, columns=[col]).column(0).combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def _polars(path: str, col: str) -> np.ndarray:
    import polars as pl

    return pl.read_parquet(path, columns=[col]).to_series().to_numpy()


def _lance(path: str, col: str) -> np.ndarray:
    import lance

    arr = lance.dataset(path).to_table(columns=[col]).column(0).combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm the page cache and the code path
    gc.collect()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        del result
        gc.collect()
    return best


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="embtools-load-")
    os.makedirs(work, exist_ok=True)
    col = f"emb_{args.dim}"
    try:
        x = np.random.default_rng().standard_normal((args.rows, args.dim), dtype=np.float32)
        nbytes = x.nbytes
        data_path = os.path.join(work, "vectors.parquet")
        npy_path = os.path.join(work, "vectors.npy")
        write_data_file(data_path, pa.table({col: embedding_array(x)}))
        np.save(npy_path, x)
        lance_path: str | None = os.path.join(work, "vectors.lance")
        try:
            import lance

            lance.write_dataset(pa.table({col: embedding_array(x)}), lance_path)
        except ImportError:
            lance_path = None

        with MappedParquetFile(data_path) as f:  # correctness first
            groups = len(f.row_group_rows)
            zero_copy = all(f.zero_copy(col, g) for g in range(groups))
            assert np.array_equal(f.embedding_rows(col), x)
        assert np.array_equal(_pyarrow(data_path, col), x)
        assert np.array_equal(_polars(data_path, col), x)
        if lance_path:
            assert np.array_equal(_lance(lance_path, col), x)
        del x
        gc.collect()
        buf = np.empty((args.rows, args.dim), np.float32)
        buf.fill(0)  # fault the destination in before timing

        readers: list[tuple[str, Callable[[], object] | None]] = [
            ("np.load (.npy, copy into a new array)", lambda: np.load(npy_path)),
            ("embtools MappedParquetFile: map", lambda: _embtools(data_path, col, "map")),
            ("embtools: map + touch every page", lambda: _embtools(data_path, col, "touch")),
            ("embtools: map + sum every value", lambda: _embtools(data_path, col, "sum")),
            ("embtools: map + copy into a buffer", lambda: _embtools(data_path, col, "copy", buf)),
            ("pyarrow read_table + to_numpy", lambda: _pyarrow(data_path, col)),
            ("polars read_parquet + to_numpy", lambda: _polars(data_path, col)),
            ("lance to_table + to_numpy", (lambda: _lance(lance_path, col)) if lance_path else None),
        ]
        times = {}
        for name, fn in readers:
            times[name] = _time(fn, args.repeat) if fn is not None else None
        base = times["np.load (.npy, copy into a new array)"]
        print(f"{args.rows:,} x {args.dim} float32 = {nbytes / 1e9:.2f} GB; {groups} row groups; "
              f"zero-copy path: {zero_copy}; cpus: {os.cpu_count()}; best of {args.repeat}, warm cache")
        print(f"| {'reader':<42} | {'GB/s':>7} | {'vs np.load':>10} |")
        print(f"|{'-' * 44}|{'-' * 9}|{'-' * 12}|")
        for name, t in times.items():
            if t is None:
                print(f"| {name:<42} | {'not installed':>20} |")
                continue
            assert base is not None
            print(f"| {name:<42} | {nbytes / t / 1e9:7.2f} | {base / t:9.2f}x |")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
