"""Single indexed queries, side by side in one process: where a query's time goes, against FAISS.

A loop of single queries is what users of an index run most (one request, one query), and the
figure in which embtools trails FAISS most (``benchmarks/index.py``). The machines here are
noisy, so this script measures each form of the same search alternately, round after round, in one
process, and reports each one's best round (microseconds per query) and its speed against FAISS
``IndexIVFFlat`` (same partitions, same probes, one thread; above 1x is faster):

* ``search``: ``store.search(v, k, nprobe=)``, the polars result frame with the hits' metadata;
* ``arrays``: ``store.compute_similarity(v, d, k, nprobe=)``, positions and scores;
* ``arrays, full path``: the same with the single-query lane switched off (every call checked,
  planned and sized under the cap: :mod:`embtools.search.lane`);
* ``compiled call``: ``IvfIndex.top_whole`` on the query, the search without any of the API
  around it;
* ``FAISS``: ``index.search(v[None], k)``.

Usage::

    python benchmarks/single_query.py                      # 300,000 x 384, nprobe 2 and 16
    python benchmarks/single_query.py --rows 1000000 --nprobe 2,8,32
    python benchmarks/single_query.py --codes int8          # the index's default codes
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from index import clustered, faiss_ivf  # noqa: E402  (the index benchmark's data and FAISS build)


def forms(store: Any, index: Any, dim: int, k: int, nprobe: int) -> dict[str, Callable[[np.ndarray], Any]]:
    """The forms of one search timed side by side, by name."""
    import embtools.search.api as api
    from embtools.search.lane import cached_lane, lane_key

    store.compute_similarity(np.ones(dim, np.float32), dim, k, nprobe=nprobe)  # plans the lane
    lane = cached_lane(store, lane_key("arrays", dim, k, nprobe, None, False))
    if lane is None:
        raise SystemExit("no lane: the index does not serve this search in one compiled call")

    def full_path(v: np.ndarray) -> Any:
        keep = api.cached_lane
        api.cached_lane = lambda store, key: None  # the lane never answers: the full path
        try:
            return store.compute_similarity(v, dim, k, nprobe=nprobe)
        finally:
            api.cached_lane = keep

    return {
        "search": lambda v: store.search(v, k, nprobe=nprobe),
        "arrays": lambda v: store.compute_similarity(v, dim, k, nprobe=nprobe),
        "arrays, full path": full_path,
        "compiled call": lambda v: lane.probe.top_whole(v[None], lane.kk, lane.nprobe, lane.width),
        "FAISS": lambda v: index.search(v[None], k),
    }


def best_rounds(fns: dict[str, Callable[[np.ndarray], Any]], queries: np.ndarray,
                rounds: int) -> dict[str, float]:
    """Each form's best round, in microseconds per query (the forms alternate within a round, and
    the turns rotate from round to round: the first loop of a round runs slower here)."""
    best = {name: math.inf for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            t = time.perf_counter()
            for v in queries:
                fn(v)
            best[name] = min(best[name], (time.perf_counter() - t) / len(queries) * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="2,16", help="comma list of probes")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--codes", default="float", help="the index's codes: float (IVF-Flat, as FAISS's) or int8")
    args = p.parse_args()
    import faiss

    import embtools as et

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    x = clustered(rng, args.rows + args.queries, args.dim)
    x, queries = x[: args.rows], x[args.rows:]
    partitions = int(4 * math.sqrt(args.rows))
    workdir = tempfile.mkdtemp(prefix="embtools-single-bench-")
    try:
        store = et.EmbeddingStore(os.path.join(workdir, "s"), backend="numpy")
        store.add(x)
        store.create_index(dimension=args.dim, partitions=partitions, codes=args.codes, progress=False)
        index, _ = faiss_ivf(x, partitions, 64 * partitions)
        print(f"{args.rows:,} x {args.dim}, {partitions} partitions, {args.codes} codes, k={args.k}, {args.queries} queries "
              f"x {args.rounds} rounds, one thread each; load average {os.getloadavg()[0]:.1f}")
        print("| nprobe | form | us per query | speed vs FAISS |")
        print("|---|---|---:|---:|")
        for nprobe in [int(n) for n in args.nprobe.split(",")]:
            index.nprobe = nprobe
            fns = forms(store, index, args.dim, args.k, nprobe)
            for v in queries[:20]:  # warm: compiled kernels, mapped pages, the lanes
                for fn in fns.values():
                    fn(v)
            best = best_rounds(fns, queries, args.rounds)
            for name, us in best.items():
                print(f"| {nprobe} | {name} | {us:.0f} | {best['FAISS'] / us:.2f}x |")
            glue = best["arrays"] - best["compiled call"]
            print(f"| {nprobe} | arrays - compiled call (Python around the search) | {glue:.0f} | |")
        store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
