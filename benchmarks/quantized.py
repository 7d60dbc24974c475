"""Quantized columns benchmark: recall on real MiniLM embeddings, speed on a synthetic corpus.

1. Recall@10 against the exact float search on ``docstrings-minilm/minilm.parquet`` (50,000
   all-MiniLM-L6-v2 paragraphs; ``--holdout`` rows held out as queries): binary alone (Hamming,
   and asymmetric), binary + int8 rescoring, binary + float rescoring (Hamming and asymmetric
   shortlists), int8 + float rescoring, at rescore multipliers 1/4/10.
2. Speed on a clustered ``--rows`` x 384 store (default 1,000,000): single queries and a batch
   of 1,000, ``precision="binary"`` / ``"int8"`` / the funnel ``[("binary", 400), ("int8", 40)]``
   against the exact float32 search of the same store, side by side with FAISS
   ``IndexBinaryFlat`` and usearch (exact Hamming over the same codes) where installed.

Usage::

    python benchmarks/quantized.py                    # the issue's sizes
    python benchmarks/quantized.py --rows 100000      # smaller, when the machine is busy
    python benchmarks/quantized.py --skip-recall --scale-rows 5000000   # and the 5M run

3. With ``--scale-rows 5000000``: a store of that many rows (7.7 GB of float32 on disk, written
   chunk by chunk) searched with binary + float rescoring under ``max_memory_gb=1``
   (``--scale-cap-gb``) in a fresh process: single-query latency and that process' peak RSS.

Every time is the median of the timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search import best_of, clustered  # the same data and timing as the exact benchmark

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REL = os.path.join("shared", "data", "docstrings-minilm", "minilm.parquet")
#: the MiniLM set: ../shared beside the repository (or beside the worktrees' folder)
MINILM = next((p for p in (os.path.join(_ROOT, "..", _REL), os.path.join(_ROOT, "..", "..", _REL))
               if os.path.exists(p)), os.path.join(_ROOT, "..", _REL))


def per_query(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    """Median time of ``fn(q)`` over single queries (the first is a warm-up)."""
    fn(queries[0])
    times = []
    for q in queries[1:]:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def recall(got: Any, ref: Any) -> float:
    from embtools.search import recall_at_k

    return recall_at_k(got, ref, 10)


def recall_table(path: str, holdout: int, tmp: str) -> list[tuple[str, str]]:
    """Recall@10 of each quantized configuration on the MiniLM set."""
    import polars as pl

    import embtools as et
    from embtools.search import quantized as Q

    frame = pl.read_parquet(path, columns=["embedding"])
    x = np.asarray(frame["embedding"].to_list(), dtype=np.float32)
    rng = np.random.default_rng(0)
    held = rng.choice(len(x), holdout, replace=False)
    keep = np.setdiff1d(np.arange(len(x)), held)
    queries, corpus = x[held], x[keep]
    store = et.EmbeddingStore(os.path.join(tmp, "minilm"), backend="numpy")
    store.add_embeddings(corpus, dimension=384)
    store.quantize(384)
    ref = store.search(queries, 10)
    rows: list[tuple[str, str]] = []

    def row(name: str, values: list[float]) -> None:
        rows.append((name, " / ".join(f"{v:.3f}" for v in values)))

    for mode in ("hamming", "asymmetric"):
        Q.BINARY_MODE = mode
        row(f"binary alone ({mode}), top 10", [recall(store.search(queries, 10, precision="binary",
                                                                   rescore=1), ref)])
        row(f"binary ({mode}) + float rescoring, x1/x4/x10",
            [recall(store.search(queries, 10, precision="binary", rescore=r), ref) for r in (1, 4, 10)])
        row(f"binary ({mode}) + int8 rescoring, x1/x4/x10",
            [recall(store.search(queries, 10, funnel=[("binary", 10 * r), ("int8", 10)]), ref)
             for r in (1, 4, 10)])
    Q.BINARY_MODE = "asymmetric"
    row("int8 + float rescoring, x1/x4/x10",
        [recall(store.search(queries, 10, precision="int8", rescore=r), ref) for r in (1, 4, 10)])
    row("binary x40 -> int8 x4 -> float (funnel 400/40)",
        [recall(store.search(queries, 10, funnel=[("binary", 400), ("int8", 40)]), ref)])
    store.close()
    return rows


def _warm_hamming() -> None:
    """Load (or compile) the compiled Hamming kernels before anything is timed or measured."""
    from embtools.kernels.jit import jit_kernels

    mod = jit_kernels("hamming_jit")
    if mod is not None:
        mod.warm()


def speed_table(n: int, singles: int, batch: int, tmp: str) -> list[tuple[str, str, str]]:
    """Times and speed-ups over the exact float32 search of the same store."""
    import embtools as et
    from embtools.kernels.codes import pack_signs

    _warm_hamming()
    rng = np.random.default_rng(1)
    d = 384
    x = clustered(rng, n, d)
    qs = x[rng.integers(0, n, singles + batch)] + 0.05 * rng.standard_normal(
        (singles + batch, d)).astype(np.float32)
    store = et.EmbeddingStore(os.path.join(tmp, "synthetic"), backend="numpy")
    for s in range(0, n, 250_000):
        store.add_embeddings(x[s : s + 250_000], dimension=d,
                             text_ids=[f"t{i}" for i in range(s, min(n, s + 250_000))])
    t = time.perf_counter()
    store.quantize(d)
    quantize_s = time.perf_counter() - t
    codes = pack_signs(x)
    del x
    singles_q, batch_q = qs[:singles], qs[singles:]
    rows: list[tuple[str, str, str]] = [("quantize 384 (int8 + binary)", f"{quantize_s:.1f} s", "")]

    exact1 = per_query(lambda q: store.search(q, 10), singles_q)
    rows.append(("single query, exact float32", f"{exact1 * 1e3:.1f} ms", "1.00x"))
    ref_single = store.search(singles_q, 10)
    for name, kw in (("binary + float rescoring (x10)", dict(precision="binary")),
                     ("int8 + float rescoring (x4)", dict(precision="int8")),
                     ("funnel binary 400 -> int8 40 -> float",
                      dict(funnel=[("binary", 400), ("int8", 40)]))):
        t1 = per_query(lambda q, kw=kw: store.search(q, 10, **kw), singles_q)
        r = recall(store.search(singles_q, 10, **kw), ref_single)
        rows.append((f"single query, {name}", f"{t1 * 1e3:.1f} ms",
                     f"{exact1 / t1:.2f}x (recall@10 {r:.3f})"))
    t8 = per_query(lambda q: store.search(q, 10, screen="int8"), singles_q)
    same = store.search(singles_q, 10, screen="int8").equals(ref_single)
    rows.append(("single query, int8 certified exact (screen='int8')", f"{t8 * 1e3:.1f} ms",
                 f"{exact1 / t8:.2f}x ({'same rows as exact' if same else 'DIFFERENT ROWS'})"))
    try:
        import faiss

        index = faiss.IndexBinaryFlat(d)
        index.add(codes)
        qc = pack_signs(singles_q)
        tf = per_query(lambda q: index.search(q[None, :], 100), qc)
        rows.append(("single query, FAISS IndexBinaryFlat top 100 (Hamming only)",
                     f"{tf * 1e3:.1f} ms", f"{exact1 / tf:.2f}x"))
    except ImportError:
        index = None
    try:
        from usearch.index import search as usearch_search

        tu = per_query(lambda q: usearch_search(codes, q, 100, "hamming", exact=True),
                       pack_signs(singles_q))
        rows.append(("single query, usearch exact Hamming top 100", f"{tu * 1e3:.1f} ms",
                     f"{exact1 / tu:.2f}x"))
    except ImportError:
        pass

    exact_b = best_of(lambda: store.search(batch_q, 10), 1)
    rows.append((f"batch of {batch}, exact float32", f"{exact_b:.2f} s", "1.00x"))
    ref_batch = store.search(batch_q, 10)
    tb = best_of(lambda: store.search(batch_q, 10, precision="binary"), 1)
    rb = recall(store.search(batch_q, 10, precision="binary"), ref_batch)
    rows.append((f"batch of {batch}, binary + float rescoring (x10)", f"{tb:.2f} s",
                 f"{exact_b / tb:.2f}x (recall@10 {rb:.3f})"))
    if index is not None:
        qb = pack_signs(batch_q)
        tfb = best_of(lambda: index.search(qb, 100), 1)
        rows.append((f"batch of {batch}, FAISS IndexBinaryFlat top 100", f"{tfb:.2f} s",
                     f"{exact_b / tfb:.2f}x"))
    store.close()
    return rows


def build_scale_store(path: str, n: int, chunk: int = 250_000) -> None:
    """A clustered ``n`` x 384 store written chunk by chunk (never all rows in memory), quantized."""
    import embtools as et

    rng = np.random.default_rng(2)
    d = 384
    centres = clustered(rng, 1000, d)
    store = et.EmbeddingStore(path, backend="numpy")
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(1000, size=m)] + 0.03 * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.add_embeddings(x, dimension=d, text_ids=[f"t{i}" for i in range(s, s + m)])
    store.quantize(d)
    store.close()


def scale_search(path: str, cap_gb: float, singles: int) -> None:
    """In a fresh process: binary + float rescoring single queries under ``max_memory_gb``;
    prints the median latency, the growth of the peak RSS over the RSS before opening the store
    (the measure of ``benchmarks/memory_cap.py``) and the peak RSS."""
    from pathlib import Path

    from memory_cap import _import_lazily_loaded_modules, _status_kib

    import embtools as et

    et.EmbeddingStore  # noqa: B018 - resolve the lazy import before measuring
    _import_lazily_loaded_modules()
    _warm_hamming()
    rng = np.random.default_rng(3)
    q = rng.standard_normal((singles + 1, 384)).astype(np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap_gb)
    t = per_query(lambda v: store.search(v, 10, precision="binary"), q)
    peak = _status_kib("VmHWM") * 1024
    print(f"{t * 1e3:.1f} {peak - before} {peak}")


def scale_table(n: int, cap_gb: float, singles: int, tmp: str) -> list[tuple[str, str, str]]:
    """The ``n`` x 384 store searched with binary + float rescoring under ``max_memory_gb``."""
    import subprocess
    import sys

    path = os.path.join(tmp, "scale")
    t = time.perf_counter()
    build_scale_store(path, n)
    build_s = time.perf_counter() - t
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_scale-search", path,
                          "--scale-cap-gb", str(cap_gb), "--singles", str(singles)],
                         check=True, capture_output=True, text=True).stdout.split()
    latency_ms, grown, peak = float(out[-3]), int(out[-2]), int(out[-1])
    cap = int(cap_gb * 1024**3)
    over = (grown - cap) / 1024**2
    return [("build + quantize", f"{build_s:.1f} s", ""),
            (f"single query, binary + float rescoring, max_memory_gb={cap_gb}", f"{latency_ms:.1f} ms", ""),
            ("peak RSS - RSS before opening the store (as benchmarks/memory_cap.py)",
             f"{grown / 1024**2:.0f} MiB",
             f"cap {'+' if over >= 0 else '-'} {abs(over):.0f} MiB "
             f"({'within' if over <= 100 else 'OVER'} the cap + 100 MiB goal)"),
            ("peak RSS of the searching process", f"{peak / 1024**2:.0f} MiB", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--singles", type=int, default=30, help="single queries timed")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--holdout", type=int, default=1000, help="MiniLM rows held out as queries")
    parser.add_argument("--minilm", default=MINILM)
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--scale-rows", type=int, default=0,
                        help="also build a store of this many rows (the issue: 5000000, 7.7 GB) and "
                        "search it under --scale-cap-gb")
    parser.add_argument("--scale-cap-gb", type=float, default=1.0)
    parser.add_argument("--_scale-search", dest="scale_search", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_search:
        scale_search(args.scale_search, args.scale_cap_gb, args.singles)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, NumPy {np.__version__}")
    tmp = tempfile.mkdtemp(prefix="embtools-quantized-")
    try:
        if not args.skip_recall:
            print(f"\nrecall@10 against exact float search, MiniLM docstrings, {args.holdout} held-out"
                  " queries")
            for name, value in recall_table(args.minilm, args.holdout, tmp):
                print(f"  {name:<52} {value}")
        if not args.skip_speed:
            print(f"\nspeed on {args.rows:,} x 384 (clustered, unit norm), store on disk")
            for name, value, ratio in speed_table(args.rows, args.singles, args.batch, tmp):
                print(f"  {name:<62} {value:>10}  {ratio}")
        if args.scale_rows:
            print(f"\nscale: {args.scale_rows:,} x 384 (clustered, unit norm), store on disk")
            for name, value, ratio in scale_table(args.scale_rows, args.scale_cap_gb, args.singles, tmp):
                print(f"  {name:<62} {value:>10}  {ratio}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
