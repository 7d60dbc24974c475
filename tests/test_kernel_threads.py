"""The kernels' thread pools survive a fork: a child forked after the pools started gets its own
(the copied pool has none of the parent's threads, so work submitted to it would never run)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import numpy as np
import pytest

from embtools.kernels import hamming, numpy_tiles
from embtools.kernels.threads import ForkSafePool

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")

_POOL = ForkSafePool(2, "test-pool")


def _unaligned_matvec(a: np.ndarray) -> np.ndarray:
    """The threaded matrix-vector product of numpy_tiles: a block at an odd byte offset."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    block = raw[1:].view(np.float32).reshape(a.shape)
    block[...] = a
    assert not block.flags.aligned
    return numpy_tiles.matvec(block, np.ones(a.shape[1], np.float32))


def _work() -> list[Any]:
    """A task on a pool of its own, the split matvec, and the split Hamming top-k."""
    a = np.arange(20_000 * 8, dtype=np.float32).reshape(20_000, 8)
    codes = np.random.default_rng(5).integers(0, 256, (4000, 8), dtype=np.uint8)
    return [_POOL.get().submit(int, 7).result(), _unaligned_matvec(a).tolist(),
            hamming.threaded_hamming_top_k(codes[:1], codes, 5, threads=2)[1].tolist()]


def _child(conn) -> None:  # type: ignore[no-untyped-def]
    conn.send(_work())
    conn.close()


def test_pools_work_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hamming, "MIN_THREAD_ROWS", 100)  # two parts of the 4,000 codes
    expected = _work()  # the parent's pools are started
    assert expected[1] == np.arange(20_000 * 8, dtype=np.float32).reshape(20_000, 8).sum(axis=1).tolist()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the forked child hung"
        assert parent.recv() == expected
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
