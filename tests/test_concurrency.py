"""Concurrent writer processes: appends never lose or duplicate rows; duplicate ids lose cleanly."""

from __future__ import annotations

import numpy as np

import embtools as et
from tests._store_writer import batch_data, batch_ids, go, spawn, wait_ready

WORKERS, BATCHES, ROWS, DIM = 4, 20, 10, 8


def test_four_processes_adding_20_batches_each(tmp_path):
    path = str(tmp_path / "s")
    et.EmbeddingStore(path)                                   # version 0
    procs = [spawn("batches", path, {"seed": w + 1, "rows": ROWS, "dim": DIM, "batches": BATCHES,
                                     "prefix": f"w{w}"}) for w in range(WORKERS)]
    for p in procs:
        wait_ready(p)
    for p in procs:                                           # start them together
        go(p)
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    store = et.EmbeddingStore(path, backend="numpy")
    meta = store.metadata().collect()
    assert store.num_rows == WORKERS * BATCHES * ROWS == meta.height
    assert store.versions() == list(range(WORKERS * BATCHES + 1))
    assert meta["row_id"].is_unique().all() and meta["row_id"].is_sorted()
    assert meta["text_id"].is_unique().all()
    emb = store.get_embeddings(DIM)
    by_id = {t: i for i, t in enumerate(meta["text_id"].to_list())}
    for w in range(WORKERS):
        for j in range(BATCHES):
            ids = batch_ids(f"w{w}-b{j}", ROWS)
            rows = [by_id[t] for t in ids]                    # every row present exactly once
            assert np.array_equal(emb[rows], batch_data((w + 1) * 1000 + j, ROWS, DIM))
            assert meta["label"].gather(rows).to_list() == [f"w{w}"] * ROWS
    # each worker's batches keep their order (row ids ascending within a worker)
    for w in range(WORKERS):
        mine = meta.filter(meta["label"] == f"w{w}")
        assert mine["text_id"].to_list() == [t for j in range(BATCHES) for t in batch_ids(f"w{w}-b{j}", ROWS)]


def test_racing_writers_of_the_same_text_id_exactly_one_wins(tmp_path):
    path = str(tmp_path / "s")
    et.EmbeddingStore(path)
    procs = [spawn("shared", path, {"seed": w, "dim": DIM, "prefix": f"p{w}"}) for w in range(WORKERS)]
    for p in procs:
        wait_ready(p)
    for p in procs:
        go(p)
    codes, outs = [], []
    for p in procs:
        codes.append(p.wait(timeout=60))
        outs.append(p.stdout.read() if p.stdout else "")
    assert sorted(codes) == [0] + [3] * (WORKERS - 1), outs
    assert all("DuplicateTextIdError" in o and "'shared'" in o for o, c in zip(outs, codes, strict=True) if c == 3)
    store = et.EmbeddingStore(path)
    meta = store.metadata().collect()
    winner = codes.index(0)
    assert meta["text_id"].to_list() == [f"p{winner}", "shared"]
    assert store.versions() == [0, 1]
