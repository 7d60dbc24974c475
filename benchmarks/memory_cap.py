"""Resident memory while streaming a store larger than its memory cap.

One subprocess builds a store of about ``--gb`` GB of ``--dim``-dimensional float32 embeddings (or
reuses ``--store`` if it already holds one). A fresh subprocess then opens it with
``max_memory_gb=--cap``, iterates every batch of ``iter_batches`` touching every value, and reports
its peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` after the imports) minus
its resident memory just before opening the store. Another fresh subprocess does the same for one
exact ``search`` of ``--queries`` random queries (k=10), which streams the store under the cap too,
and with ``--where`` a third iterates the batches of that filter (rows gathered, not views).
Goal: at most the cap plus 100 MB for each.

Examples
--------
    python benchmarks/memory_cap.py                     # 2 GB store, 0.25 GB cap
    python benchmarks/memory_cap.py --gb 0.4 --cap 0.05
    python benchmarks/memory_cap.py --where "row_id % 2 = 0"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["build", "main", "measure", "measure_search", "run"]

MB = 1024**2
SLACK_BYTES = 100 * MB


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(path: str, gb: float, dim: int) -> dict[str, float]:
    """Create a store of about ``gb`` GB at ``path``, adding at most 128 MiB at a time."""
    import numpy as np

    import embtools as et

    rows = int(gb * 1024**3) // (4 * dim)
    per_add = max(1, (128 * MB) // (4 * dim))
    store = et.EmbeddingStore(path, backend="numpy")
    rng = np.random.default_rng()
    t0 = time.perf_counter()
    done = 0
    checksum = 0.0
    while done < rows:
        n = min(per_add, rows - done)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        checksum += float(x.sum(dtype=np.float64))
        store.add({dim: x}, text_ids=[f"r{i}" for i in range(done, done + n)])
        done += n
    return {"rows": rows, "build_s": time.perf_counter() - t0, "checksum": checksum}


def _import_lazily_loaded_modules() -> None:
    """Load what libraries import on first use, so that module code is not counted as data:
    pyarrow's ``take`` imports pandas when it is installed (about 50 MiB resident); numba and
    LLVM load with the first compiled kernel (about 130 MiB)."""
    import pyarrow as pa

    from embtools.kernels.jit import warm

    pa.table({"a": [0]}).take(pa.array([0]))
    warm()


def measure(path: str, cap_gb: float, dim: int, where: str | None = None) -> dict[str, float]:
    """Stream every batch (of ``where``'s rows) of the store under ``cap_gb``; a fresh process."""
    import numpy as np

    import embtools as et

    et.EmbeddingStore  # noqa: B018 - resolve the lazy import before measuring
    import embtools.storage.snapshot
    import embtools.store

    _import_lazily_loaded_modules()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap_gb)
    rows = 0
    checksum = 0.0
    batches = 0
    for _meta, batch in store.iter_batches(dim, where=where):
        a = np.asarray(batch)
        checksum += float(a.sum(dtype=np.float64))  # touches every value
        rows += len(a)
        batches += 1
    elapsed = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    return {
        "rows": rows, "batches": batches, "seconds": elapsed, "bytes": rows * dim * 4,
        "rss_before": before, "peak_rss": peak, "peak_minus_before": peak - before,
        "cap_bytes": int(cap_gb * 1024**3), "checksum": checksum,
    }


def measure_search(path: str, cap_gb: float, dim: int, queries: int = 10) -> dict[str, float]:
    """One exact search of ``queries`` random queries (k=10) under ``cap_gb``; a fresh process."""
    import numpy as np

    import embtools as et

    et.EmbeddingStore  # noqa: B018 - resolve the lazy imports before measuring
    import embtools.search
    import embtools.storage.snapshot
    import embtools.store

    _import_lazily_loaded_modules()
    q = np.random.default_rng(0).standard_normal((queries, dim), dtype=np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap_gb)
    result = store.search(q, k=10)
    elapsed = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    return {
        "queries": queries, "results": result.height, "seconds": elapsed,
        "peak_minus_before": peak - before, "cap_bytes": int(cap_gb * 1024**3),
    }


def _subprocess(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(store: str, gb: float, cap: float, dim: int, queries: int = 10,
        where: str | None = None) -> dict[str, float]:
    """Build (if needed) and measure, each in its own subprocess; the measurement as a dict.

    When the store is built here, the result also has ``built_rows`` and ``built_checksum``.
    With ``queries`` > 0 it also has the search measurement: ``search_peak_minus_before``,
    ``search_seconds`` and ``search_results``; with ``where``, ``where_peak_minus_before``,
    ``where_rows`` and ``where_checksum``.
    """
    built: dict[str, float] = {}
    if not (os.path.isdir(store) and os.listdir(store)):
        built = _subprocess("_build", store, str(gb), str(dim))
    r = _subprocess("_measure", store, str(cap), str(dim))
    if built:
        r["built_rows"], r["built_checksum"] = built["rows"], built["checksum"]
    if queries > 0:
        s = _subprocess("_search", store, str(cap), str(dim), str(queries))
        r["search_peak_minus_before"] = s["peak_minus_before"]
        r["search_seconds"], r["search_results"] = s["seconds"], s["results"]
    if where:
        w = _subprocess("_measure", store, str(cap), str(dim), where)
        r["where_peak_minus_before"] = w["peak_minus_before"]
        r["where_rows"], r["where_checksum"] = w["rows"], w["checksum"]
    return r


def main(argv: list[str] | None = None) -> None:
    """Command line: build and measure, print the figures and whether the goal holds."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_search":
        print(json.dumps(measure_search(argv[1], float(argv[2]), int(argv[3]), int(argv[4]))))
        return
    if argv and argv[0] == "_measure":
        print(json.dumps(measure(argv[1], float(argv[2]), int(argv[3]), *argv[4:5])))
        return
    if argv and argv[0] == "_build":
        print(json.dumps(build(argv[1], float(argv[2]), int(argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="store size to build (GB)")
    ap.add_argument("--cap", type=float, default=0.25, help="max_memory_gb when reading")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--store", default=None, help="store directory (kept; reused if present)")
    ap.add_argument("--queries", type=int, default=10, help="queries of the search run (0: none)")
    ap.add_argument("--where", default=None, help="also stream the rows of this SQL filter")
    args = ap.parse_args(argv)
    tmp = None if args.store else tempfile.mkdtemp(prefix="embtools-memcap-")
    store = args.store or os.path.join(tmp or "", "store")
    try:
        r = run(store, args.gb, args.cap, args.dim, args.queries, args.where)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    goal = r["cap_bytes"] + SLACK_BYTES
    print(f"store: {r['rows']:,} x {args.dim} float32 = {r['bytes'] / 1e9:.2f} GB, "
          f"max_memory_gb={args.cap}, {r['batches']} batches in {r['seconds']:.2f} s "
          f"({r['bytes'] / r['seconds'] / 1e9:.2f} GB/s, every value touched)")
    print(f"peak RSS - RSS before opening: {r['peak_minus_before'] / MB:.1f} MiB; "
          f"goal <= cap + 100 MiB = {goal / MB:.1f} MiB: "
          f"{'OK' if r['peak_minus_before'] <= goal else 'EXCEEDED'}")
    if args.queries > 0:
        peak = r["search_peak_minus_before"]
        print(f"search of {args.queries} queries (k=10) in {r['search_seconds']:.2f} s: "
              f"peak RSS - RSS before opening: {peak / MB:.1f} MiB; "
              f"goal <= {goal / MB:.1f} MiB: {'OK' if peak <= goal else 'EXCEEDED'}")
    if args.where:
        peak = r["where_peak_minus_before"]
        print(f"iter_batches(where={args.where!r}): {r['where_rows']:,} rows; "
              f"peak RSS - RSS before opening: {peak / MB:.1f} MiB; "
              f"goal <= {goal / MB:.1f} MiB: {'OK' if peak <= goal else 'EXCEEDED'}")


if __name__ == "__main__":
    main()
