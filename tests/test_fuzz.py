"""Seeded fuzz test (issue 16): single-byte flips and truncations of a data file, read by every call.

300 cases across the footer, page headers, level bytes, values and metadata pages (and one in ten a
truncation), each read by get_embeddings, get_embeddings(where=), search, metadata(), delete and
compact in child processes (tests/_fuzz_child.py; each case on a fresh copy of the store, under a
per-case alarm). Every outcome is the undamaged store's data (checked against a NumPy float64
reference) or an EmbtoolsError: never a signal, a panic, a hang, a foreign exception or wrong data,
and every flipped value byte is caught (CorruptStoreError) by each call that reads the vectors.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import embtools as et

CHILD = Path(__file__).with_name("_fuzz_child.py")
CASES = 300
CHILDREN = 3
SEED = 16
ERRORS = {"CorruptStoreError"}
VECTOR_CALLS = {"get", "where", "search", "delete", "compact"}


def _store(path: Path) -> None:
    x = np.random.default_rng(SEED).standard_normal((80, 8)).astype(np.float32)
    s = et.EmbeddingStore(path, backend="numpy")
    for f in range(2):
        ids = range(f * 40, (f + 1) * 40)
        s.add(x[f * 40:(f + 1) * 40], text_ids=[f"t{i}" for i in ids],
              labels=[f"l{i % 3}" for i in ids], metadata={"year": [2000 + i for i in ids]})


@pytest.mark.fuzz
def test_fuzzed_data_file_never_crashes_or_returns_wrong_data(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _store(store)
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)}
    per = CASES // CHILDREN
    procs = []
    for k in range(CHILDREN):
        work = tmp_path / f"w{k}"
        work.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, str(CHILD), str(store), str(work), str(SEED), str(k * per), str(per)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    lines: list[dict] = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        got = [json.loads(line) for line in out.splitlines() if line.strip()]
        started = [d["start"] for d in got if "start" in d]
        assert p.returncode == 0, (
            f"child died (return code {p.returncode}) in case {started[-1] if started else None}: "
            f"{err[-3000:]}")
        lines.extend(d for d in got if "case" in d)
    assert len(lines) == CASES * 6
    counts = collections.Counter((d["region"], d["outcome"]) for d in lines)
    bad = [d for d in lines if d["outcome"] != "ok" and d["outcome"] not in ERRORS]
    assert not bad, (bad[:10], counts)
    missed = [d for d in lines if d["region"] == "values" and d["call"] in VECTOR_CALLS
              and d["outcome"] != "CorruptStoreError"]
    assert not missed, missed[:10]
    # a damaged footer (its CRC is in the manifest) or a truncated file fails every call
    assert counts[("footer", "ok")] == counts[("truncate", "ok")] == 0, counts
    assert {r for r, _ in counts} == {"footer", "page_header", "levels", "values", "metadata_page",
                                      "truncate"}
