"""A lazily started thread pool that a forked child replaces with its own.

A ``ThreadPoolExecutor`` copied into a forked child keeps the parent's bookkeeping but none of its
threads: work submitted there waits forever. :class:`ForkSafePool` starts its pool on first use
and forgets it in every forked child, which then starts a fresh one.

Examples
--------
>>> pool = ForkSafePool(2, "example")
>>> pool.get().submit(sum, [1, 2, 3]).result()
6
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["ForkSafePool", "one_blas_thread"]

_ALL: weakref.WeakSet[ForkSafePool] = weakref.WeakSet()


class ForkSafePool:
    """A ``ThreadPoolExecutor`` of ``workers`` threads named ``name-*``, started on first use."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = max(1, workers)
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _ALL.add(self)

    def get(self) -> ThreadPoolExecutor:
        """The pool, started on the first call (in this process)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            return self._pool

    def _forget(self) -> None:
        """In a forked child: the parent's threads do not exist here; start anew on next use."""
        self._pool, self._lock = None, threading.Lock()


def _after_fork_in_child() -> None:
    for pool in list(_ALL):
        pool._forget()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread() -> Any:
    """A context in which BLAS runs one thread (threadpoolctl; the library scan is done once).

    For loops of small products (matrix-vector, thin matrices): waking BLAS's threads for each
    costs more than it gains, and on a busy machine, where one of them is descheduled, a
    product waits for it (measured: 30x slower int8 shortlists with two OpenBLAS threads while
    other processes ran).

    Examples
    --------
    >>> import numpy as np
    >>> with one_blas_thread():
    ...     float(np.ones(3) @ np.ones(3))
    3.0
    """
    return _controller().limit(limits=1, user_api="blas")
