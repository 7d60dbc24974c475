"""The kernels' thread pools survive a fork: a child forked after a pool started gets its own
(the copied pool has none of the parent's threads, so work submitted to it would never run)."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from embtools.kernels import numpy_tiles
from embtools.kernels.threads import ForkSafePool

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")

_POOL = ForkSafePool(2, "test-pool")


def _child(conn) -> None:  # type: ignore[no-untyped-def]
    a = np.arange(20_000 * 8, dtype=np.float32).reshape(20_000, 8)
    conn.send([_POOL.get().submit(int, 7).result(), _unaligned_matvec(a).tolist()])
    conn.close()


def _unaligned_matvec(a: np.ndarray) -> np.ndarray:
    """The threaded matrix-vector product of numpy_tiles: a block at an odd byte offset."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    block = raw[1:].view(np.float32).reshape(a.shape)
    block[...] = a
    assert not block.flags.aligned
    return numpy_tiles.matvec(block, np.ones(a.shape[1], np.float32))


def test_pools_work_in_a_forked_child() -> None:
    a = np.arange(20_000 * 8, dtype=np.float32).reshape(20_000, 8)
    assert _POOL.get().submit(int, 7).result() == 7  # the parent's pools are started
    expected = _unaligned_matvec(a).tolist()
    assert expected == a.sum(axis=1).tolist()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the forked child hung"
        assert parent.recv() == [7, expected]
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
