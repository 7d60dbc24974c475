"""A compiled gather of a few rows from the mapped chunks an uncapped snapshot keeps.

Without a memory cap a snapshot keeps the read-only views of its mapped embedding chunks once
read (their pages stay mapped). A search's re-rank gathers a few dozen rows from them; through
:meth:`~embtools.storage.source.ChunkedSource.take_rows` that is a dozen NumPy calls per chunk
touched (~100 us for 18 rows of a 1M-row store), here one compiled call (~10 us):
:class:`KeptRows` holds the views in a numba typed list, one slot per chunk, filled as chunks are
first needed.

Examples
--------
>>> import numpy as np
>>> chunks = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)]
>>> for c in chunks: c.setflags(write=False)  # mapped files' views are read-only
>>> kept = KeptRows([0, 3, 5], 2, lambda c: chunks[c])
>>> out = np.empty((2, 1), np.float32)
>>> kept.take(np.array([1, 4]), out), out.ravel().tolist()
(True, [2.0, 1.0])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embtools.kernels.jit import jit_kernels

__all__ = ["KEPT_ROWS", "KeptRows"]

#: Gathers of at most this many rows use the compiled path (more: the chunked, threaded one).
KEPT_ROWS = 4096


class KeptRows:
    """Rows of chunks starting at ``bounds[:-1]`` (``bounds[-1]``: the row count), ``stored``
    values each; ``load(c)`` returns chunk ``c`` as a read-only C-contiguous float32 view that
    stays valid as long as this object, or None when it cannot (then :meth:`take` declines)."""

    def __init__(self, bounds: Sequence[int], stored: int,
                 load: Callable[[int], np.ndarray | None]) -> None:
        self._jit = jit_kernels("rerank_jit")
        self.bounds = np.asarray(bounds, np.int64)
        self.stored = int(stored)
        self._load = load
        self._loaded = np.zeros(max(len(self.bounds) - 1, 0), bool)
        self._views: Any = None  # the typed list, made on first use (numba imported then)
        self._usable = self._jit is not None
        self._lock = threading.Lock()

    def _slots(self) -> Any:
        if self._views is None:
            from numba import typed

            empty = np.empty((0, self.stored), np.float32)
            empty.setflags(write=False)
            self._views = typed.List([empty] * len(self._loaded))
        return self._views

    def take(self, positions: np.ndarray, out: np.ndarray) -> bool:
        """Copy the rows at ``positions`` (int64, ascending, distinct, in range) into ``out``
        (``(n, d)`` float32, ``d <= stored``); False, with ``out`` undefined, when this path
        cannot (no numba, a chunk that is not a kept view, positions not as required)."""
        if not self._usable or positions.dtype != np.int64 or out.dtype != np.float32 \
                or out.shape[1] > self.stored or len(positions) != len(out):
            return False
        jit = self._jit
        assert jit is not None
        with self._lock:  # one gather at a time: a slot may be filled meanwhile
            views = self._slots()
            while True:
                got = jit.gather_kept(views, self.bounds, self._loaded, positions, out)
                if got == -1:
                    return True
                if got == -2:
                    return False
                arr = self._load(got)
                rows = int(self.bounds[got + 1] - self.bounds[got])
                if arr is None or arr.dtype != np.float32 or arr.flags.writeable \
                        or not arr.flags.c_contiguous or arr.shape != (rows, self.stored):
                    self._usable = False
                    return False
                views[got] = arr
                self._loaded[got] = True

    def clear(self) -> None:
        """Drop the kept views (before their files are closed)."""
        with self._lock:
            self._views = None
            self._loaded[:] = False
