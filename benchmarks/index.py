"""IVF index benchmark: embtools' index against its exact search, FAISS IndexIVFFlat and LanceDB
IVF_PQ, in one run, on a synthetic clustered set and on the MiniLM docstring set.

For each data set:

1. build: ``store.create_index`` (``--codes``: int8 by default, as ``create_index``'s; ``float``
   for an IVF-Flat index like FAISS's; ``--soar``: the sets built with SOAR) in a child process,
   with ``max_memory_gb`` a quarter of the float data for the ``--capped`` sets (its peak RSS
   measured), vs FAISS ``IndexIVFFlat`` train + add with the same partitions, k-means iterations
   and training rows;
2. recall@10 (against the exact search) and queries per second for ``nprobe`` in a sweep: batches
   of ``--queries`` and single queries, embtools vs FAISS (same partitions, probes, threads); single
   queries vs LanceDB IVF_PQ with ``refine_factor=10``;
3. the exact search's single-query and batch speed, for the speed-up at recall >= 0.95;
4. 10% more rows appended without re-indexing: recall, and whether every new row finds itself;
5. an approximate self-join (k=10) through the index vs the exact join (timed on a slice of the
   query rows and extrapolated: the exact join of every row takes hours here).

A recall-vs-QPS plot (matplotlib) goes to ``docs/index_recall_qps.png``.

Usage::

    python benchmarks/index.py                      # 1,000,000 x 384 + MiniLM
    python benchmarks/index.py --rows 200000        # smaller, when the machine is busy
    python benchmarks/index.py --rows 200000 --skip search,minilm --resume   # build figures only
    python benchmarks/index.py --codes float        # float codes (the rows: IVF-Flat)
    python benchmarks/index.py --soar ""            # no SOAR on MiniLM either
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NPROBES = [2, 4, 8, 16, 32, 64, 128, 256]
#: rounds of the single queries, each party's best kept (:func:`single_rounds`)
SINGLE_ROUNDS = 5
#: rounds of each batch, each party's best kept (:func:`batch_rounds`): one batch of 1,000 at
#: nprobe 2 of 1M rows takes 35-60 ms here, and one round to the next moved by up to 40%
BATCH_ROUNDS = 5
#: rounds of the exact search's batch and of its 10 single queries, the best kept
EXACT_ROUNDS = 3
ITERATIONS = 10  # k-means iterations, embtools' default; FAISS gets the same


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int = 2000,
              noise: float = 1.0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (overlapping: the noise is larger than
    the centres, so that neighbours span partitions and recall depends on ``nprobe``)."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(clusters, size=m)]
        x[s:s + m] += noise * rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def single_rounds(store: Any, fidx: Any, single: np.ndarray, k: int, d: int, nprobe: int,
                  threads: int) -> tuple[float, float, float]:
    """Seconds of the best of :data:`SINGLE_ROUNDS` rounds of the ``single`` queries one at a
    time: ``store.search``, ``store.compute_similarity`` (the array form, as FAISS returns) and
    FAISS (its faster of 1 and ``threads`` OpenMP threads). The parties take turns within each
    round, so a slow spell of this shared machine falls on all of them, and the turns rotate
    from round to round, so none is always the one that runs after another has filled the
    caches with its own data (the first loop of a round ran up to 10% slower here)."""
    import faiss

    def faiss_loop(t: int) -> float:
        faiss.omp_set_num_threads(t)
        return timed(lambda: [fidx.search(v[None, :], k) for v in single])[0]

    parties: list[tuple[int, Callable[[], float]]] = [
        (0, lambda: timed(lambda: [store.search(v, k=k, nprobe=nprobe) for v in single])[0]),
        (1, lambda: timed(lambda: [store.compute_similarity(v, d, k, nprobe=nprobe) for v in single])[0]),
        *((2, lambda t=t: faiss_loop(t)) for t in sorted({1, threads}))]
    best = [float("inf")] * 3
    for r in range(SINGLE_ROUNDS):
        for who, run in parties[r % len(parties):] + parties[:r % len(parties)]:
            best[who] = min(best[who], run())
    faiss.omp_set_num_threads(threads)
    return best[0], best[1], best[2]


def batch_rounds(store: Any, fidx: Any, q: np.ndarray, k: int, nprobe: int,
                 threads: int) -> tuple[float, Any, float, np.ndarray]:
    """The batch of ``q`` at ``nprobe``: each party warmed once (embtools maps the probed codes'
    pages; FAISS holds its lists in memory), then :data:`BATCH_ROUNDS` rounds in which the two
    take turns, the other one first in the next round, each one's best kept: ``(seconds, frame)`` of
    ``store.search`` and ``(seconds, ids)`` of FAISS. The party right after the exact searches
    (or any other work on both cores) ran 10-15% slower here (a batch at nprobe 2 of 1M rows:
    16,400-20,400 q/s right after an exact batch, 18,500-24,000 after a 3 s rest)."""
    import faiss

    fidx.nprobe = nprobe
    faiss.omp_set_num_threads(threads)
    store.search(q, k=k, nprobe=nprobe)
    fidx.search(q, k)
    runs: dict[str, list[tuple[float, Any]]] = {"embtools": [], "faiss": []}
    turns = [("embtools", lambda: store.search(q, k=k, nprobe=nprobe)), ("faiss", lambda: fidx.search(q, k)[1])]
    for r in range(BATCH_ROUNDS):
        for who, run in turns[r % 2:] + turns[:r % 2]:
            runs[who].append(timed(run))
    (tb, res), (tfb, fi) = (min(runs[w], key=lambda t: t[0]) for w in ("embtools", "faiss"))
    return tb, res, tfb, fi


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


BUILD = """
import json, resource, sys, time, embtools as et
path, cap, partitions = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap or None)
base = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0] * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: a forked child starts with the parent's
t = time.perf_counter()
codes = sys.argv[5] if sys.argv[5] in ("int8", "float", "binary") else int(sys.argv[5])
soar = None if sys.argv[6] == "none" else float(sys.argv[6])
store.create_index(dimension=int(sys.argv[4]), partitions=partitions, codes=codes, soar_lambda=soar,
                   progress=False)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] * 1024
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak, "import_rss": base}))
"""


def build_embtools(path: str, cap_gb: float, partitions: int, dim: int, codes: str,
                   crash: str | None = None, soar: float | None = None) -> dict[str, float]:
    """``create_index`` in a child process under the cap: seconds, peak RSS, RSS before. With
    ``crash``, the child is killed at that crash point (``$EMBTOOLS_CRASH_AT``): its seconds only.
    ``soar``: ``create_index``'s ``soar_lambda``."""
    env = {**os.environ, **({"EMBTOOLS_CRASH_AT": crash} if crash else {})}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BUILD, path, str(cap_gb), str(partitions), str(dim), codes,
                          "none" if soar is None else str(soar)],
                         capture_output=True, text=True, check=crash is None, env=env)
    if crash:
        if out.returncode != -9:
            raise RuntimeError(f"the build was not killed at {crash}: {out.stderr[-2000:]}")
        return {"seconds": time.perf_counter() - t}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def faiss_ivf(x: np.ndarray, partitions: int, sample: int) -> tuple[Any, float]:
    import faiss

    d = x.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, partitions, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = ITERATIONS
    index.cp.max_points_per_centroid = max(1, sample // partitions)
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    train = x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))]
    index.train(train)
    index.add(x)
    return index, time.perf_counter() - t


def lance_ivfpq(x: np.ndarray, partitions: int, workdir: str) -> tuple[Any, float]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(os.path.join(workdir, "lance"))
    d = x.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    table = db.create_table("t", pa.table({"id": pa.array(np.arange(len(x))), "vector": vec}))
    t = time.perf_counter()
    table.create_index(metric="cosine", num_partitions=partitions, num_sub_vectors=d // 8,
                       vector_column_name="vector")
    return table, time.perf_counter() - t


def run_set(name: str, x: np.ndarray, q: np.ndarray, args: argparse.Namespace, workdir: str,
            plot: dict[str, list[tuple[float, float]]]) -> list[str]:
    import embtools as et
    from embtools.index.build import default_partitions

    n, d = x.shape
    k = args.k
    soar = args.soar_lambda if name in args.soar else None
    spilled = "" if soar is None else f", each row in a second partition too (SOAR, lambda {soar:g})"
    rows: list[str] = [f"### {name}: {n:,} x {d}, {len(q)} queries, k={k}, embtools {args.codes} codes "
                       f"(re-ranked exactly){spilled}, FAISS IndexIVFFlat"]
    path = os.path.join(workdir, name)
    cap = x.nbytes / 4 / 1024**3 if name in args.capped else 0.0  # 0: no cap
    store = et.EmbeddingStore(path, backend="numpy", max_memory_gb=cap or None)
    for s in range(0, n, 200_000):
        store.add(x[s:s + 200_000])
    partitions = args.partitions or default_partitions(n)
    build = build_embtools(path, cap, partitions, d, args.codes, soar=soar)
    store.close()  # searched like FAISS's in-memory index: no cap (the build above had it)
    store = et.EmbeddingStore(path, backend="numpy")
    sample = int(store.source.manifest.indexes[0].info["sample_rows"])  # FAISS trains on as many
    fidx, f_build = faiss_ivf(x, partitions, sample)
    growth = (build["peak_rss"] - build["import_rss"]) / 1024**2
    bound = cap * 1024 + 100
    held = (f"with the cap at {cap * 1024:.0f} MiB (bound: cap + 100 MiB = {bound:.0f} MiB, "
            f"{'within' if growth <= bound else 'OVER'}); {partitions} partitions, {sample:,} training rows "
            "(what the cap allows)") if cap else (
            f"no cap; {partitions} partitions, {sample:,} training rows (the default sample)")
    rows.append(f"build: embtools {build['seconds']:.1f} s, FAISS train+add {f_build:.1f} s "
                f"(ratio {build['seconds'] / f_build:.2f}x); embtools peak RSS "
                f"{build['peak_rss'] / 1024**2:.0f} MiB, {growth:.0f} MiB above the process before "
                f"the build ({build['import_rss'] / 1024**2:.0f} MiB), {held}, {ITERATIONS} k-means "
                "iterations for both")
    if args.resume:  # a build of the new version killed once its centroids are spilled, re-run
        store.close()
        killed = build_embtools(path, cap, partitions, d, args.codes, crash="after_index_centroids", soar=soar)
        resumed = build_embtools(path, cap, partitions, d, args.codes, soar=soar)
        store = et.EmbeddingStore(path, backend="numpy")
        rows.append(f"resume: a build killed after its k-means ({killed['seconds']:.1f} s, with the "
                    f"child's start), re-run: {resumed['seconds']:.1f} s, against "
                    f"{build['seconds']:.1f} s from scratch")
    if "search" in args.skip:
        store.close()
        return rows
    # the truth: embtools' exact search (float64 re-ranked)
    truth = store.search(q, k=k, exact=True)["row_id"].to_numpy().reshape(len(q), k)
    single = q[: args.single]
    # the exact search's best of EXACT_ROUNDS too, as the index's batches and single queries are
    t_exact_batch = min(timed(lambda: store.search(q, k=k, exact=True))[0] for _ in range(EXACT_ROUNDS))
    n_ex = min(len(single), 10)
    t_exact_one = min(timed(lambda: [store.search(v, k=k, exact=True) for v in single[:n_ex]])[0]
                      for _ in range(EXACT_ROUNDS))
    exact_qps_batch, exact_qps_one = len(q) / t_exact_batch, n_ex / t_exact_one
    rows.append(f"exact search: batch {exact_qps_batch:.1f} q/s, single {exact_qps_one:.1f} q/s")
    threads = os.cpu_count() or 1
    rows.append(f"threads: FAISS batch {threads} (OpenMP), FAISS single queries the faster of 1 and "
                f"{threads}; embtools batch up to {min(4, threads)} scoring threads with 1 BLAS thread, "
                "single queries 1 thread; LanceDB its defaults")
    rows.append("| nprobe | embtools recall | embtools batch q/s | FAISS recall | FAISS batch q/s | "
                "embtools single q/s | embtools single, arrays q/s | FAISS single q/s |")
    rows.append("|---|---|---|---|---|---|---|---|")
    sweep: list[dict[str, float]] = []
    for nprobe in [p for p in NPROBES if p <= partitions]:
        tb, res, tfb, fi = batch_rounds(store, fidx, q, k, nprobe, threads)
        r_e = recall(res["row_id"].to_numpy().reshape(len(q), k), truth)
        for v in single[:20]:  # warm the single-query path too (lazy tables, compiled kernels)
            store.search(v, k=k, nprobe=nprobe)
            store.compute_similarity(v, d, k, nprobe=nprobe)
        r_f = recall(fi, truth)
        ts, ta, tfs = single_rounds(store, fidx, single, k, d, nprobe, threads)
        e_b, f_b, e_s, f_s = len(q) / tb, len(q) / tfb, len(single) / ts, len(single) / tfs
        e_a = len(single) / ta
        rows.append(f"| {nprobe} | {r_e:.3f} | {e_b:.0f} | {r_f:.3f} | {f_b:.0f} | {e_s:.0f} | {e_a:.0f} "
                    f"| {f_s:.0f} |")
        plot.setdefault(f"embtools {args.codes} batch ({name})", []).append((r_e, e_b))
        plot.setdefault(f"FAISS IVFFlat batch ({name})", []).append((r_f, f_b))
        plot.setdefault(f"embtools {args.codes} single ({name})", []).append((r_e, e_s))
        plot.setdefault(f"FAISS IVFFlat single ({name})", []).append((r_f, f_s))
        sweep.append({"nprobe": nprobe, "recall": r_e, "batch": e_b, "single": e_s, "arrays": e_a,
                      "faiss_recall": r_f, "faiss_batch": f_b, "faiss_single": f_s})
    best = next((r for r in sweep if r["recall"] >= 0.95), {})
    fbest = next((r for r in sweep if r["faiss_recall"] >= 0.95), {})
    if best:
        rows.append(f"at recall >= 0.95 (nprobe={best['nprobe']}, recall {best['recall']:.3f}): "
                    f"single query {best['single'] / exact_qps_one:.1f}x the exact search, batch "
                    f"{best['batch'] / exact_qps_batch:.1f}x; vs FAISS at the same probes (recall "
                    f"{best['faiss_recall']:.3f}): batch {best['batch'] / best['faiss_batch']:.2f}x, "
                    f"single {best['single'] / best['faiss_single']:.2f}x (arrays "
                    f"{best['arrays'] / best['faiss_single']:.2f}x)")
    else:
        rows.append("recall 0.95 was not reached in the nprobe sweep")
    if best and fbest:
        rows.append(f"at equal recall (each at its smallest nprobe reaching 0.95: embtools "
                    f"{best['nprobe']}, FAISS {fbest['nprobe']}): batch "
                    f"{best['batch'] / fbest['faiss_batch']:.2f}x FAISS, single "
                    f"{best['single'] / fbest['faiss_single']:.2f}x FAISS (arrays "
                    f"{best['arrays'] / fbest['faiss_single']:.2f}x)")
    if "lancedb" not in args.skip and name in args.lancedb:
        table, l_build = lance_ivfpq(x, partitions, os.path.join(workdir, f"lance-{name}"))
        rows.append(f"LanceDB IVF_PQ build {l_build:.1f} s")
        lbest: dict[str, float] = {}
        for nprobe in [p for p in (8, 16, 32, 64, 128) if p <= partitions]:
            def lance(nprobe: int = nprobe) -> np.ndarray:
                return np.array([table.search(v).metric("cosine").nprobes(nprobe).refine_factor(10)
                                 .limit(k).to_arrow()["id"].to_numpy() for v in single])
            lance(nprobe)  # warm
            tl, found = timed(lance)
            r_l = recall(found, truth[: len(single)])
            rows.append(f"LanceDB IVF_PQ nprobes={nprobe} refine 10: recall {r_l:.3f}, single "
                        f"{len(single) / tl:.0f} q/s")
            plot.setdefault(f"LanceDB IVF_PQ single ({name})", []).append((r_l, len(single) / tl))
            if r_l >= 0.95 and not lbest:
                lbest = {"nprobe": nprobe, "single": len(single) / tl}
        if best and lbest:
            rows.append(f"at equal recall (>= 0.95; embtools nprobe {best['nprobe']}, LanceDB "
                        f"{lbest['nprobe']}): single query {best['single'] / lbest['single']:.2f}x LanceDB")
    if best:  # where= through the index: filtered within the probed partitions, or exact when small
        import polars as pl

        for label, where in (("half the rows", pl.col("row_id") % 2 == 0),
                             ("1% of the rows", pl.col("row_id") % 100 == 0)):
            t_w = store.search(q, k=k, where=where, exact=True)["row_id"].to_numpy().reshape(len(q), -1)
            got = store.search(q, k=k, where=where, nprobe=best["nprobe"])
            r_w = recall(got["row_id"].to_numpy().reshape(len(q), -1), t_w)
            te, _ = timed(lambda where=where: [store.search(v, k=k, where=where, exact=True)
                                               for v in single[:n_ex]])
            ti, _ = timed(lambda where=where: [store.search(v, k=k, where=where, nprobe=best["nprobe"])
                                               for v in single])
            route = "index" if "IVF index" in store.explain(q[:1], k=k, where=where,
                                                           nprobe=best["nprobe"]) else "exact"
            rows.append(f"where= selecting {label} (nprobe {best['nprobe']}, planner: {route}): recall "
                        f"{r_w:.3f} against the exact search with the same filter, single query "
                        f"{(len(single) / ti) / (n_ex / te):.1f}x it")
    # 10% more rows, not re-indexed
    if best:
        rng = np.random.default_rng(5)
        extra = x[rng.integers(0, n, n // 10)] + 0.05 * rng.standard_normal((n // 10, d)).astype(np.float32)
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        store.add(extra)
        truth2 = store.search(q, k=k, exact=True)["row_id"].to_numpy().reshape(len(q), k)
        r2 = recall(store.search(q, k=k, nprobe=best["nprobe"])["row_id"].to_numpy().reshape(len(q), k),
                    truth2)
        probe = extra[:1000]
        hits = store.search(probe, k=1, nprobe=best["nprobe"])["row_id"].to_numpy()
        found_self = float(np.mean(hits == np.arange(n, n + len(probe))))
        rows.append(f"after appending {n // 10:,} rows without re-indexing: recall {r2:.3f}, "
                    f"{found_self:.3f} of 1000 new rows find themselves first")
        # approximate self-join through the index vs the exact join (extrapolated from a slice)
        from embtools.search.join import similarity_join

        t_opt, _ = timed(lambda: store.optimize_index())
        rows.append(f"optimize_index (delta of the appended rows): {t_opt:.1f} s")
        left = et.EmbeddingStore(path, backend="numpy", version=store.version)
        t_join, _ = timed(lambda: similarity_join(left, store, k, out=os.path.join(workdir, f"j-{name}"),
                                                  nprobe=best["nprobe"], progress=False))
        t_slice, _ = timed(lambda: store.search(q, k=k, exact=True))  # batches of 1,000, as a join's
        t_exact_join = t_slice / len(q) * store.num_rows
        import polars as pl

        got = pl.read_parquet(os.path.join(workdir, f"j-{name}", "*.parquet"))
        check = np.sort(rng.choice(store.num_rows, 300, replace=False))
        qv = store.get_embeddings(d, where=pl.col("row_id").is_in(check.tolist()))
        t3 = store.search(np.asarray(qv), k=k, exact=True)["row_id"].to_numpy().reshape(-1, k)
        g3 = (got.filter(pl.col("left_row_id").is_in(check.tolist())).sort(["left_row_id", "rank"])
              ["right_row_id"].to_numpy().reshape(-1, k))
        rows.append(f"approximate self-join of {store.num_rows:,} rows, k={k}, nprobe={best['nprobe']}: "
                    f"{t_join:.0f} s vs the exact join extrapolated to {t_exact_join:.0f} s "
                    f"({t_exact_join / t_join:.1f}x), recall {recall(g3, t3):.3f} on 300 rows")
        left.close()
    store.close()
    return rows


def minilm(path: str, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    col = next(c for c in t.column_names if "emb" in c or "vector" in c)
    x = np.array(t[col].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
    x = x.reshape(t.num_rows, -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    held = np.zeros(len(x), bool)
    held[rng.choice(len(x), n_queries, replace=False)] = True
    return x[~held], x[held]


def _find_minilm() -> str:
    """``shared/data/docstrings-minilm/minilm.parquet`` beside the repository or a parent of it."""
    here = HERE
    for _ in range(5):
        here = os.path.dirname(here)
        path = os.path.join(here, "shared", "data", "docstrings-minilm", "minilm.parquet")
        if os.path.exists(path):
            return path
    return "minilm.parquet"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--partitions", type=int, default=None)
    p.add_argument("--codes", default="int8", help="embtools' probe codes: int8 (create_index's default), "
                   "float, binary or a Matryoshka dimension")
    p.add_argument("--minilm", default=_find_minilm())
    p.add_argument("--skip", default="", help="comma list of: lancedb,minilm,synthetic,search "
                   "(search: stop after the build figures)")
    p.add_argument("--resume", action="store_true",
                   help="also time a build killed after its k-means and resumed (two more builds)")
    p.add_argument("--soar", default="minilm",
                   help="data sets whose embtools index keeps each row in a second partition (SOAR; "
                   "on MiniLM's 885 partitions of 55 rows recall 0.95 takes 16 probes with it, 128 without; "
                   "the 1M set reaches 0.977 at 2 probes without it, so it would only double the index)")
    p.add_argument("--soar-lambda", type=float, default=1.0)
    p.add_argument("--capped", default="synthetic",
                   help="data sets built under max_memory_gb = a quarter of their float data (the issue's "
                   "build goal, stated at 1M rows); the others are built without a cap, so that their "
                   "k-means trains on the default sample (MiniLM under a quarter of its 75 MB: 7,350 rows, "
                   "8 a partition)")
    p.add_argument("--lancedb", default="synthetic,minilm",
                   help="data sets on which to build LanceDB IVF_PQ (slow: 10 minutes for 200k here)")
    p.add_argument("--plot", default=os.path.join(HERE, "..", "docs", "index_recall_qps.png"))
    args = p.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    args.lancedb = set(filter(None, args.lancedb.split(",")))
    args.soar = set(filter(None, args.soar.split(",")))
    args.capped = set(filter(None, args.capped.split(",")))
    workdir = tempfile.mkdtemp(prefix="embtools-index-bench-")
    plot: dict[str, list[tuple[float, float]]] = {}
    out: list[str] = [f"threads: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"]
    try:
        if "synthetic" not in args.skip:
            rng = np.random.default_rng(0)
            x = clustered(rng, args.rows + args.queries, args.dim)
            out += run_set("synthetic", x[: args.rows], x[args.rows:], args, workdir, plot)
            print("\n".join(out), flush=True)
            del x
        if "minilm" not in args.skip and os.path.exists(args.minilm):
            xm, qm = minilm(args.minilm, args.queries)
            out += run_set("minilm", xm, qm, args, workdir, plot)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(out))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for label, pts in plot.items():
            pts = sorted(pts)
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries per second")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("IVF search: recall vs queries per second (same partitions and probes)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {os.path.relpath(args.plot)}")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
