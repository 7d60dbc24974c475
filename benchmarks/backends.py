"""Throughput of exact top-k cosine search per backend, side by side with FAISS and plain NumPy.

For each installed backend, times ``backend.top_k_cosine_neighbors(queries, corpus, k)`` on raw
(unnormalised) float32 vectors, next to FAISS ``IndexFlatIP`` on pre-normalised vectors (if faiss is
installed), a plain NumPy matmul + argpartition over corpus blocks, and the bare matmul (the
ceiling). All methods run in one process, interleaved round by round; the best time of each is
reported, with queries/s and the ratio to FAISS. Results are checked against FAISS.

MLX on a CPU is far slower than the others, so it runs on a smaller problem (``--mlx-rows``) with its
own FAISS reference; ``--mlx-rows 0`` skips it.

Run::

    python benchmarks/backends.py                       # 1000 queries x 200,000 x 384, k=10
    python benchmarks/backends.py --rows 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embtools.backends import available_backends, get_backend

Result = tuple[np.ndarray, np.ndarray]  # (indices, similarities) as NumPy


def numpy_plain(q: np.ndarray, c: np.ndarray, k: int, block: int = 16384) -> Result:
    """Reference method: matmul + argpartition per corpus block, then a final sort."""
    best_i = np.empty((q.shape[0], 0), dtype=np.int64)
    best_s = np.empty((q.shape[0], 0), dtype=np.float32)
    for start in range(0, c.shape[0], block):
        s = q @ c[start : start + block].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_i = np.concatenate([best_i, part + start], axis=1)
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_i = np.take_along_axis(best_i, keep, axis=1)
        best_s = np.take_along_axis(best_s, keep, axis=1)
    return best_i, best_s


def matmul_only(q: np.ndarray, c: np.ndarray, block: int = 16384) -> None:
    """The ceiling: the score matrix alone, in the same blocks."""
    for start in range(0, c.shape[0], block):
        np.matmul(q, c[start : start + block].T)


def normalized(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1)).astype(np.float32)


def agreement(result: Result, reference: Result) -> str:
    """Share of identical neighbour ids and the largest similarity difference."""
    idx, sims = result
    ridx, rsims = reference
    same = np.mean(
        [len(set(a) & set(b)) / len(b) for a, b in zip(idx.tolist(), ridx.tolist(), strict=True)]
    )
    return f"ids {same:.4%}, max |dsim| {np.abs(sims - rsims).max():.1e}"


def run_table(
    title: str, q: np.ndarray, c: np.ndarray, k: int, repeats: int, backends: list[str]
) -> None:
    qn, cn = normalized(q), normalized(c)
    methods: dict[str, Callable[[], Any]] = {}
    try:
        import faiss

        index = faiss.IndexFlatIP(c.shape[1])
        index.add(cn)

        def run_faiss() -> Result:
            sims, idx = index.search(qn, k)
            return idx.astype(np.int64), sims

        methods["faiss IndexFlatIP"] = run_faiss
    except ImportError:
        print("faiss is not installed: ratios are to plain NumPy instead")
    for name in backends:
        b = get_backend(name, "cpu")
        qb, cb = b.from_numpy(q), b.from_numpy(c)

        def run_backend(b: Any = b, qb: Any = qb, cb: Any = cb) -> Result:
            idx, sims = b.top_k_cosine_neighbors(qb, cb, k)
            b.synchronize()
            return np.asarray(b.to_numpy(idx)), np.asarray(b.to_numpy(sims))

        methods[f"embtools {name}"] = run_backend
    methods["numpy matmul+argpartition"] = lambda: numpy_plain(qn, cn, k)
    methods["numpy matmul only (ceiling)"] = lambda: matmul_only(qn, cn)

    times: dict[str, float] = {m: float("inf") for m in methods}
    results: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved, so that load from other processes hits all alike
        for label, fn in methods.items():
            start = time.perf_counter()
            results[label] = fn()
            times[label] = min(times[label], time.perf_counter() - start)

    base = "faiss IndexFlatIP" if "faiss IndexFlatIP" in times else "numpy matmul+argpartition"
    print(
        f"\n{title}: {q.shape[0]} queries x {c.shape[0]} x {c.shape[1]} float32, k={k}, "
        f"best of {repeats}"
    )
    print(
        f"{'method':32s} {'seconds':>8s} {'queries/s':>10s} {'vs ' + base.split()[0]:>9s}  agreement"
    )
    for label, seconds in times.items():
        check = ""
        if results[label] is not None and label != base:
            check = agreement(results[label], results[base])
        print(
            f"{label:32s} {seconds:8.3f} {q.shape[0] / seconds:10.0f} "
            f"{times[base] / seconds:8.2f}x  {check}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mlx-rows", type=int, default=5000)
    parser.add_argument("--mlx-queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    installed = available_backends()
    c = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    main_backends = [b for b in installed if b != "mlx"]
    run_table("CPU backends", q, c, args.k, args.repeats, main_backends)
    if "mlx" not in installed:
        print("\nmlx: skipped (not installed)")
    elif args.mlx_rows <= 0:
        print("\nmlx: skipped (--mlx-rows 0)")
    else:
        print("\nmlx: MLX on this CPU is ~80x slower than NumPy, so it runs on a smaller problem")
        run_table(
            "MLX (small)",
            q[: args.mlx_queries],
            c[: args.mlx_rows],
            args.k,
            args.repeats,
            ["numpy", "mlx"],
        )


if __name__ == "__main__":
    main()
