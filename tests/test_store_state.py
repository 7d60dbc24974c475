"""The StoreState interface: the directory and in-memory states behave alike, and EmbeddingStore
delegates to them."""

from __future__ import annotations

import numpy as np
import pytest

from embtools.errors import InvalidArgumentError, StoreNotFoundError
from embtools.memory import MemoryBudget
from embtools.storage.ingest import prepare_batch
from embtools.storage.memory_writer import MemoryState
from embtools.storage.state import DirectoryState, StoreState, open_state


def _state(kind: str, tmp_path) -> StoreState:
    path = str(tmp_path / "s") if kind == "disk" else None
    return open_state(path, None, MemoryBudget(None), 4096)


def _add(state: StoreState, x: np.ndarray, ids: list[str], props: dict | None = None) -> int:
    src = state.source
    batch = prepare_batch({x.shape[1]: x, 2: x[:, :2]}, ids, stored_dims=src.dimensions,
                          schema=src.schema, num_rows=src.num_rows)
    return state.add(batch, props or {})


def test_both_states_implement_the_interface(store_kind, tmp_path, rng):
    state = _state(store_kind, tmp_path)
    assert isinstance(state, StoreState)
    assert isinstance(state, DirectoryState if store_kind == "disk" else MemoryState)
    assert (state.version, state.versions(), state.source.num_rows) == (0, [0], 0)
    x = rng.standard_normal((30, 6)).astype(np.float32)
    assert _add(state, x[:20], [f"a{i}" for i in range(20)], {"model": "m"}) == 1
    assert _add(state, x[20:], [f"b{i}" for i in range(10)]) == 2
    src = state.source
    assert (src.num_rows, src.dimensions, state.properties) == (30, [2, 6], {"model": "m"})
    got = np.concatenate([v for _, v in src.iter_vectors(6)])
    np.testing.assert_array_equal(got, x)
    h0 = state.config_hash
    # delete: a new version, the rows gone, the old source object unchanged (immutable)
    assert state.delete(np.array([0, 5, 29])) == 3
    keep = np.setdiff1d(np.arange(30), [0, 5, 29])
    np.testing.assert_array_equal(np.concatenate([v for _, v in state.source.iter_vectors(6)]), x[keep])
    assert src.num_rows == 30 and state.source is not src
    assert state.config_hash == h0  # same dimensions, schema and properties
    assert state.versions() == [0, 1, 2, 3]
    compacted = state.compact(1 << 30)
    np.testing.assert_array_equal(np.concatenate([v for _, v in state.source.iter_vectors(6)]), x[keep])
    assert state.refresh() == compacted == state.version
    removed = state.vacuum(1, None, 0.0)
    assert set(removed) == {"versions", "files"}
    held = state.held_array(6)
    if store_kind == "disk":
        assert compacted == 4 and len(state.files()) == 1  # two data files merged into one
        assert held is None and removed["versions"] == [0, 1, 2, 3]
        assert state.versions() == [4] and all(f.startswith(str(tmp_path)) for f in state.files())
    else:
        assert compacted == 3 and state.files() == [] and removed == {"versions": [], "files": []}
        assert held is not None and not held.flags.writeable
        np.testing.assert_array_equal(held, x[keep])
    state.close()


def test_directory_state_refresh_sees_other_writers_and_read_only_does_not(tmp_path, rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    a = _state("disk", tmp_path)
    pinned = open_state(str(tmp_path / "s"), 0, MemoryBudget(None), 4096)
    b = open_state(str(tmp_path / "s"), None, MemoryBudget(None), 4096)
    _add(a, x, list("abcd"))
    assert b.version == 0 and b.refresh() == 1 and b.source.num_rows == 4
    assert pinned.read_only and pinned.refresh() == 0 and pinned.source.num_rows == 0
    for s in (a, b, pinned):
        s.close()


def test_open_state_refusals(tmp_path):
    with pytest.raises(InvalidArgumentError, match="needs a store path"):
        open_state(None, 1, MemoryBudget(None), 4096)
    with pytest.raises(StoreNotFoundError, match="no version 3"):
        open_state(str(tmp_path / "none"), 3, MemoryBudget(None), 4096)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(StoreNotFoundError, match="not an embtools store"):
        open_state(str(tmp_path / "junk"), None, MemoryBudget(None), 4096)
    assert sorted(p.name for p in (tmp_path / "junk").iterdir()) == ["f"]  # nothing written

