"""benchmarks/quantized.py's scale run (``--scale-rows``) at a small size: the store is built chunk
by chunk, searched under the cap in a fresh process, and the peak RSS is reported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

import embtools as et

ROOT = Path(__file__).resolve().parents[1]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_quantized", ROOT / "benchmarks" / "quantized.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_run_small(tmp_path):
    bench = _bench()
    rows = bench.scale_table(3000, 0.05, 2, str(tmp_path))
    names = [r[0] for r in rows]
    assert "peak RSS of the searching process" in names
    latency = next(r for r in rows if r[0].startswith("single query"))
    assert latency[1].endswith(" ms") and float(latency[1].split()[0]) > 0
    grown = next(r for r in rows if r[0].startswith("peak RSS - RSS before"))
    assert "the cap + 100 MiB goal" in grown[2]
    store = et.EmbeddingStore(tmp_path / "scale", backend="numpy")
    assert store.num_rows == 3000 and store.quantized == {384: ("binary", "int8")}
    x = store.get_embeddings(384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    store.close()
