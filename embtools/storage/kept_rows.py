"""A row-by-row gather of a few rows from the mapped chunks an uncapped snapshot keeps.

Without a memory cap a snapshot keeps the read-only views of its mapped embedding chunks once
read (their pages stay mapped). A single search's re-rank gathers a few dozen rows from them;
through :meth:`~embtools.storage.source.ChunkedSource.take_rows` that is a dozen NumPy calls per
chunk touched (~100 us for 18 rows of a 1M-row store), here one row copy each (~25 us).
(A compiled gather over a numba typed list of the views took ~12 us, but building the first typed
list of a process compiles for about a second.)

Examples
--------
>>> import numpy as np
>>> chunks = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)]
>>> kept = KeptRows([0, 3, 5], lambda c: chunks[c])
>>> out = np.empty((2, 1), np.float32)
>>> kept.take(np.array([1, 4]), out), out.ravel().tolist()
(True, [2.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["KEPT_ROWS", "KeptRows"]

#: Gathers of at most this many rows are copied row by row (more: the chunked path).
KEPT_ROWS = 128


class KeptRows:
    """Rows of chunks starting at ``bounds[:-1]`` (``bounds[-1]``: the row count); ``load(c)``
    returns chunk ``c`` as a 2-D float32 array that stays valid as long as this object, or None
    when it cannot (then :meth:`take` declines from then on)."""

    def __init__(self, bounds: Sequence[int], load: Callable[[int], np.ndarray | None]) -> None:
        self.bounds = np.asarray(bounds, np.int64)
        self._starts = self.bounds.tolist()
        self._load = load
        self._views: list[np.ndarray | None] = [None] * (len(self._starts) - 1)
        self._usable = True

    def take(self, positions: np.ndarray, out: np.ndarray) -> bool:
        """Copy the rows at ``positions`` (ascending, distinct, in range) into ``out`` (``(n, d)``
        float32, ``d`` at most the chunks' width); False, with ``out`` undefined, when this path
        cannot (a chunk that is not kept, positions not as required)."""
        n = len(positions)
        if not self._usable or n != len(out) or n == 0:
            return False
        pos = positions.tolist()
        starts, views = self._starts, self._views
        if not isinstance(pos[0], int) or pos[0] < 0 or pos[-1] >= starts[-1]:
            return False
        d = out.shape[1]
        chunk = np.searchsorted(self.bounds, positions, side="right").tolist()
        prev = -1
        for j in range(n):
            p, c = pos[j], chunk[j] - 1
            if p <= prev:
                return False
            prev = p
            view = views[c]
            if view is None:
                view = self._load(c)
                if view is None or view.ndim != 2 or view.shape[0] != starts[c + 1] - starts[c] \
                        or view.shape[1] < d:
                    self._usable = False
                    return False
                views[c] = view
            out[j] = view[p - starts[c], :d]
        return True

    def clear(self) -> None:
        """Drop the kept views (before their files are closed)."""
        self._views = [None] * len(self._views)
