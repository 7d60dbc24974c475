"""CUDA staging: asynchronous host-to-device copies through pinned memory on a side stream.

A reader thread calls :meth:`PinnedUploader.start` on each prepared batch (it copies the batch
into page-locked memory and queues the copy to the GPU on the uploader's own stream); the thread
that scores calls :meth:`PinnedUploader.finish`, which makes its current stream wait for that copy
and returns the device tensor. The copy of the next batch so overlaps the scoring of this one.
torch is imported with this module: only CUDA torch backends use it.

Examples
--------
>>> up = PinnedUploader("cuda:0") if torch.cuda.is_available() else None
>>> up is None or up.finish(up.start(np.ones(3, np.float32))).is_cuda
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["PinnedUploader"]


class PinnedUploader:
    """Uploads NumPy batches to one CUDA device on a side stream (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)

    def start(self, x: np.ndarray) -> tuple[Any, Any, Any]:
        """Start copying ``x`` to the device; returns a handle for :meth:`finish` (it keeps the
        pinned buffer alive until the copy is done)."""
        pinned = torch.from_numpy(x).pin_memory()
        with torch.cuda.stream(self.stream):
            t = pinned.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return (t, event, pinned)

    def finish(self, handle: tuple[Any, Any, Any]) -> Any:
        """The device tensor of a :meth:`start` handle, once the current stream may use it."""
        t, event, _pinned = handle
        torch.cuda.current_stream(t.device).wait_event(event)
        return t
