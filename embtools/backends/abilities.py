"""Optional backend abilities, as runtime-checkable Protocols tested with ``isinstance``.

Every :class:`~embtools.backends.base.Backend` has ``block_top_k(queries, block, k, metric)`` with
that one signature. A backend that can do more offers it as another method, named by a Protocol
here, and callers ask ``isinstance(backend, SupportsRunningTopK)`` instead of probing flags:

- :class:`SupportsScaledScores`: score an unnormalised block with per-row factors (cosine on raw
  rows times their inverse norms: no normalised copy of the block).
- :class:`SupportsRunningTopK`: merge a block into the running top-k of the earlier blocks inside
  the kernel (later blocks only look at rows that beat the running k-th best).
- :class:`SupportsAsyncUpload`: copy host batches to the device asynchronously (CUDA staging).

Examples
--------
>>> from embtools.backends import get_backend
>>> b = get_backend("numpy")
>>> isinstance(b, SupportsRunningTopK), isinstance(b, SupportsAsyncUpload)
(True, False)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["AsyncUploader", "SupportsAsyncUpload", "SupportsRunningTopK", "SupportsScaledScores"]


@runtime_checkable
class SupportsScaledScores(Protocol):
    """A backend whose top-k scores a block with a factor per block row (cosine, dot)."""

    def block_top_k_scaled(
        self, queries: Any, block: Any, k: int, metric: str, scale: np.ndarray
    ) -> tuple[Any, Any]:
        """``block_top_k`` with each block row's scores multiplied by ``scale`` (float32, one per
        row; e.g. inverse norms, so an unnormalised block scores as if normalised)."""
        ...


@runtime_checkable
class SupportsRunningTopK(Protocol):
    """A backend that merges each block into the running top-k itself."""

    def block_top_k_running(
        self,
        queries: Any,
        block: Any,
        k: int,
        metric: str,
        running: tuple[Any, Any] | None,
        offset: int,
        scale: np.ndarray | None = None,
    ) -> tuple[Any, Any]:
        """The best ``k`` per query of ``running`` (the sorted best of the earlier blocks, global
        indices below ``offset``; None for the first block) and this block, whose indices are
        offset by ``offset``. ``scale`` as in :class:`SupportsScaledScores`, only for a backend
        that supports that too."""
        ...


class AsyncUploader(Protocol):
    """Copies host batches to a device: ``start`` in a reader thread, ``finish`` where scored."""

    def start(self, x: np.ndarray) -> Any:
        """Start copying the float32 batch ``x``; returns a handle."""
        ...

    def finish(self, handle: Any) -> Any:
        """The backend array of a started copy, ready for the current stream."""
        ...


@runtime_checkable
class SupportsAsyncUpload(Protocol):
    """A backend that stages batches to its device asynchronously (CUDA pinned memory)."""

    def async_uploader(self) -> AsyncUploader:
        """A new uploader (one per streaming loop)."""
        ...
