"""The fixed cost of one search: a single query (k = 10) on a tiny store, every path.

On ``--rows`` x ``--dim`` vectors (default 1,000 x 384) scoring takes a few microseconds, so the
time of one ``store.search(q, 10)`` is what every search pays besides scoring: checking the
request, planning, the stream's set-up, the float64 re-rank, the metadata of the hits and the
result frame. Paths: exact (a store directory and the in-memory store), ``precision="binary"``
and ``"int8"`` (quantized shortlists re-ranked), a Matryoshka funnel, an IVF index, and an exact
search with ``where=``. Each figure is the best over ``--rounds`` of the mean over ``--n``
searches, wall time and CPU time of this process (the CPU time is less sensitive to other jobs on
the machine).

Examples
--------
    python benchmarks/overhead.py                 # 1,000 x 384
    python benchmarks/overhead.py --rows 200000   # the same paths on a larger store
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Any

import numpy as np

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Build the stores, time every path, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--n", type=int, default=200, help="searches per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import embtools as et

    work = tempfile.mkdtemp(prefix="embtools-overhead-")
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        labels = [("a", "b")[i % 2] for i in range(args.rows)]
        disk = et.EmbeddingStore(work + "/store", backend="numpy")
        disk.add(x, labels=labels)
        disk.quantize(dimension=args.dim, kinds=("int8", "binary"))
        indexed = et.EmbeddingStore(work + "/indexed", backend="numpy")
        indexed.add(x, labels=labels)
        indexed.create_index(dimension=args.dim, metric="cosine")
        memory = et.EmbeddingStore(backend="numpy")
        memory.add(x, labels=labels)
        q = rng.standard_normal(args.dim).astype(np.float32)
        half = max(8, args.dim // 6)
        cases: dict[str, tuple[Any, dict[str, Any]]] = {
            "exact, store directory": (disk, {}),
            "exact, in memory": (memory, {}),
            'precision="binary"': (disk, {"precision": "binary"}),
            'precision="int8"': (disk, {"precision": "int8"}),
            f"funnel [({half}, 100)]": (disk, {"funnel": [(half, 100)]}),
            "IVF index": (indexed, {}),
            "exact, where=\"label = 'a'\"": (disk, {"where": "label = 'a'"}),
        }
        best = {name: (float("inf"), float("inf")) for name in cases}
        for _ in range(args.rounds):
            for name, (store, kw) in cases.items():  # interleaved: a busy spell hits every path
                store.search(q, 10, **kw)
                w, c = time.perf_counter(), time.process_time()
                for _ in range(args.n):
                    store.search(q, 10, **kw)
                wall = (time.perf_counter() - w) / args.n * 1e3
                cpu = (time.process_time() - c) / args.n * 1e3
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        print(f"single query, k=10, {args.rows:,} x {args.dim}; best of {args.rounds} rounds of "
              f"{args.n} searches")
        print(f"| {'path':<28} | {'wall ms':>8} | {'CPU ms':>8} |")
        print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|")
        for name, (wall, cpu) in best.items():
            print(f"| {name:<28} | {wall:8.3f} | {cpu:8.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
