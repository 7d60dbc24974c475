"""The memory cap bounds resident memory while streaming a store larger than the cap.

A subprocess builds a ~400 MB store; a fresh subprocess opens it with ``max_memory_gb=0.05``,
iterates ``iter_batches`` touching every value, and reports peak RSS minus RSS before opening
(see ``benchmarks/memory_cap.py``); another runs one exact search of 10 queries, which streams the
store through the same reader, and a third iterates the batches of a filter keeping every other row
(gathered copies, not views). The bound is the cap plus 100 MiB for each.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_cap.py"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status and clear_refs"
)


def _load_benchmark():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("embtools_bench_memory_cap", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streaming_stays_under_cap_plus_100_mib(tmp_path: Path) -> None:
    bench = _load_benchmark()
    cap_gb, store_gb = 0.05, 0.4
    r = bench.run(str(tmp_path / "store"), store_gb, cap_gb, 384, where="row_id % 2 = 0")
    # Every row was read and every value touched: same rows and sum as what was written.
    assert r["rows"] == r["built_rows"] and r["rows"] * 384 * 4 > 0.35 * 1024**3
    assert r["checksum"] == pytest.approx(r["built_checksum"], rel=1e-9, abs=1e-3)
    # A reader that kept everything it read would sit near the store size, far above the bound.
    bound = r["cap_bytes"] + bench.SLACK_BYTES
    assert r["peak_minus_before"] <= bound, (
        f"peak RSS grew by {r['peak_minus_before'] / 2**20:.1f} MiB while streaming "
        f"{r['bytes'] / 2**20:.0f} MiB under max_memory_gb={cap_gb}; bound {bound / 2**20:.1f} MiB"
    )
    assert r["search_results"] == 10 * 10
    assert r["search_peak_minus_before"] <= bound, (
        f"peak RSS grew by {r['search_peak_minus_before'] / 2**20:.1f} MiB while searching "
        f"{r['bytes'] / 2**20:.0f} MiB under max_memory_gb={cap_gb}; bound {bound / 2**20:.1f} MiB"
    )
    assert r["where_rows"] == (r["rows"] + 1) // 2
    assert r["where_peak_minus_before"] <= bound, (
        f"peak RSS grew by {r['where_peak_minus_before'] / 2**20:.1f} MiB while streaming every "
        f"other row under max_memory_gb={cap_gb}; bound {bound / 2**20:.1f} MiB"
    )
