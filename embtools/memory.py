"""The memory budget: how many embedding bytes a store may hold at once.

A :class:`MemoryBudget` keeps a ledger of what is held (cached arrays, the batch being processed, the
search workspace) and refuses, with :class:`~embtools.errors.MemoryLimitError`, anything that would take
the total past ``max_memory_gb``. Batch readers ask it how many rows fit.

Examples
--------
>>> budget = MemoryBudget(max_memory_gb=0.001)          # 0.001 GiB, about 1 MiB
>>> budget.rows_per_batch(bytes_per_row=384 * 4)
699
>>> budget.hold("cache/384", 500_000)
>>> budget.held_bytes
500000
>>> budget.free("cache/384")
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from embtools.errors import InvalidArgumentError, MemoryLimitError

__all__ = ["GB", "MemoryBudget", "check_max_memory_gb", "format_bytes"]

GB = 1024**3


def format_bytes(nbytes: float) -> str:
    """Human-readable size, e.g. ``format_bytes(3 * 1024**2) == '3.0 MiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_max_memory_gb(max_memory_gb: object) -> None:
    """InvalidArgumentError unless ``max_memory_gb`` is None (no cap) or a finite number > 0.

    ``inf`` is refused rather than read as "no cap": pass None for that.
    """
    if max_memory_gb is None:
        return
    if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float, np.integer,
                                                                         np.floating)):
        raise InvalidArgumentError(f"max_memory_gb must be a number, got {max_memory_gb!r}")
    if not math.isfinite(float(max_memory_gb)) or not max_memory_gb > 0:
        raise InvalidArgumentError(
            f"max_memory_gb must be a finite number > 0 (None for no cap), got {max_memory_gb!r}")


class MemoryBudget:
    """A cap on embedding bytes held at once, with a ledger of what is held.

    ``max_memory_gb=None`` means no cap (everything fits); otherwise a finite number > 0.
    """

    def __init__(self, max_memory_gb: float | None) -> None:
        check_max_memory_gb(max_memory_gb)
        self.max_memory_gb = max_memory_gb
        self.cap_bytes: int | None = None if max_memory_gb is None else int(float(max_memory_gb) * GB)
        self._held: dict[str, int] = {}

    @property
    def held_bytes(self) -> int:
        """Total bytes currently held."""
        return sum(self._held.values())

    @property
    def available_bytes(self) -> int | None:
        """Bytes that may still be held, or None when there is no cap."""
        if self.cap_bytes is None:
            return None
        return max(self.cap_bytes - self.held_bytes, 0)

    def held(self) -> dict[str, int]:
        """A copy of the ledger: key -> bytes."""
        return dict(self._held)

    def check(self, nbytes: int, what: str, hint: str = "") -> None:
        """Raise MemoryLimitError if holding ``nbytes`` more would pass the cap."""
        if self.cap_bytes is None:
            return
        if self.held_bytes + nbytes > self.cap_bytes:
            held = f" (already holding {format_bytes(self.held_bytes)})" if self._held else ""
            message = (
                f"{what} needs {format_bytes(nbytes)}, over the memory cap of "
                f"{format_bytes(self.cap_bytes)} (max_memory_gb={self.max_memory_gb}){held}"
            )
            raise MemoryLimitError(message + (f"; {hint}" if hint else ""))

    def hold(self, key: str, nbytes: int, what: str | None = None, hint: str = "") -> None:
        """Record ``nbytes`` held under ``key`` (replacing what that key held), checking the cap."""
        previous = self._held.pop(key, 0)
        try:
            self.check(nbytes, what or key, hint)
        except MemoryLimitError:
            if previous:
                self._held[key] = previous
            raise
        self._held[key] = int(nbytes)

    def free(self, key: str) -> None:
        """Forget what ``key`` held (no error if it held nothing)."""
        self._held.pop(key, None)

    @contextmanager
    def holding(self, key: str, nbytes: int, what: str | None = None, hint: str = "") -> Iterator[None]:
        """Hold ``nbytes`` for the duration of a ``with`` block."""
        self.hold(key, nbytes, what, hint)
        try:
            yield
        finally:
            self.free(key)

    def rows_per_batch(self, bytes_per_row: int, reserved: int = 0, minimum: int = 1) -> int:
        """How many rows of ``bytes_per_row`` fit in what is left after ``reserved`` more bytes.

        Raises MemoryLimitError when not even ``minimum`` rows fit. Without a cap, returns a
        default of 65,536 rows.
        """
        if bytes_per_row <= 0:
            raise InvalidArgumentError(f"bytes_per_row must be > 0, got {bytes_per_row}")
        if self.cap_bytes is None:
            return 65_536
        free = self.cap_bytes - self.held_bytes - reserved
        rows = free // bytes_per_row
        if rows < minimum:
            self.check(reserved + minimum * bytes_per_row, f"a batch of {minimum} row(s)")
        return int(rows)

    def __repr__(self) -> str:
        cap = "unlimited" if self.cap_bytes is None else format_bytes(self.cap_bytes)
        return f"MemoryBudget(cap={cap}, held={format_bytes(self.held_bytes)})"
