"""Writer subprocess for the crash and concurrency tests (and their shared helpers).

Run as ``python tests/_store_writer.py MODE STORE JSON_ARGS``: the child imports embtools, opens the
store, prepares its data, prints ``ready``, waits for a line on stdin, runs the operation and prints
``done <seconds>``. An embtools error is printed as ``error <ErrorClass> <message>`` (exit code 3).
The crash tests kill it with SIGKILL at a random moment, or set ``EMBTOOLS_CRASH_AT``.

Object stores: the storage options come as JSON in ``$EMBTOOLS_TEST_STORAGE_OPTIONS``.

Modes: ``add`` (one add of ``rows`` rows in many small files), ``batches`` (``batches`` adds of
``rows`` rows, ids ``<prefix>-b<j>-<i>``), ``delete`` (rows with ``k % mod == 0``), ``compact``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def batch_data(seed: int, rows: int, dim: int) -> np.ndarray:
    """The deterministic embeddings of one batch."""
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def batch_ids(prefix: str, rows: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(rows)]


def store_state(path: str, version: int | None = None) -> dict[str, Any]:
    """What a reader sees: version, metadata rows, embeddings per dimension."""
    import embtools as et

    store = et.EmbeddingStore(path, backend="numpy", version=version)
    meta = store.metadata().collect()
    return {"version": store.version, "meta": meta,
            "emb": {d: np.array(store.get_embeddings(d)) for d in store.dimensions}}


def spawn(mode: str, store: str, args: dict[str, Any], env: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    """Start a writer child (it prints ``ready`` when prepared)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_store_writer.py"), mode, store, json.dumps(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=full_env)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"writer did not start: {line!r} {err}")


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _main(argv: list[str]) -> int:
    mode, path, raw = argv[1], argv[2], argv[3]
    args = json.loads(raw)
    import polars as pl

    import embtools as et
    from embtools.errors import EmbtoolsError

    options = json.loads(os.environ.get("EMBTOOLS_TEST_STORAGE_OPTIONS", "null"))
    store = et.EmbeddingStore(path, backend="numpy", target_file_bytes=args.get("target"),
                              storage_options=options)
    work: Any
    if mode == "add":
        x = batch_data(args["seed"], args["rows"], args["dim"])
        ids = batch_ids(args["prefix"], args["rows"])
        ks = list(range(args["rows"]))

        def work() -> None:
            store.add(x, text_ids=ids, labels=[args["prefix"]] * len(ids), metadata={"k": ks})
    elif mode == "batches":
        data = [batch_data(args["seed"] * 1000 + j, args["rows"], args["dim"]) for j in range(args["batches"])]

        def work() -> None:
            for j, x in enumerate(data):
                ids = batch_ids(f"{args['prefix']}-b{j}", args["rows"])
                store.add(x, text_ids=ids, labels=[args["prefix"]] * len(ids),
                          metadata={"k": list(range(len(ids)))})
    elif mode == "shared":
        x = batch_data(args["seed"], 2, args["dim"])

        def work() -> None:
            store.add(x, text_ids=[args["prefix"], "shared"], labels=[args["prefix"]] * 2,
                      metadata={"k": [0, 1]})
    elif mode == "delete":
        def work() -> None:
            store.delete(pl.col("k") % args["mod"] == 0)
    elif mode == "compact":
        def work() -> None:
            store.compact(target_file_bytes=args["target_compact"])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    try:
        work()
    except EmbtoolsError as exc:
        print(f"error {type(exc).__name__} {exc}", flush=True)
        return 3
    print(f"done {time.perf_counter() - start:.4f}", flush=True)
    storage = store._state.storage
    if hasattr(storage, "create_conflicts"):  # an object store: its commit races
        print(f"stats lost_creates={storage.create_conflicts} uploads={storage.uploads}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
