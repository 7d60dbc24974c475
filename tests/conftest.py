"""Shared fixtures: a replayable random generator and real stores (on disk or in memory).

Helper functions (data generators, the float64 brute force, ``check_top_k``) live in
:mod:`tests.helpers`; the crash and concurrency tests' writer child in ``tests/_store_writer.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embtools as et

# Ray reads these when it is first imported (a doctest or a test module may import it before
# tests/test_ray.py starts its cluster): the local node binds 127.0.0.1 and reports no usage.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator seeded from ``EMBTOOLS_TEST_SEED`` or fresh entropy (printed, to replay)."""
    seed = int(os.environ.get("EMBTOOLS_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed: {seed} (replay with EMBTOOLS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


@pytest.fixture(params=["disk", "memory"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """``"disk"`` (a store directory in tmp_path) and ``"memory"`` (``path=None``)."""
    return str(request.param)


@pytest.fixture
def new_store(tmp_path: Path) -> Iterator[Callable[..., et.EmbeddingStore]]:
    """``new_store(kind, **kwargs)``: a fresh EmbeddingStore of that kind (closed at teardown)."""
    made: list[et.EmbeddingStore] = []
    count = 0

    def make(kind: str = "disk", **kwargs: Any) -> et.EmbeddingStore:
        nonlocal count
        count += 1
        path = tmp_path / f"store{count}" if kind == "disk" else None
        kwargs.setdefault("backend", "numpy")
        store = et.EmbeddingStore(path, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
