"""Compute backends: NumPy, PyTorch (CPU/CUDA/MPS) and MLX behind one `Backend` interface.

``get_backend(name=None, device=None)`` picks a backend (auto: MLX on Apple silicon, else torch with
CUDA, else torch with MPS, else NumPy); ``available_backends()`` lists the installed ones;
``convert(array, name, device=None)`` moves arrays between them; ``framework_of(x)`` names the
library of an object. Optional abilities are Protocols checked with ``isinstance``
(``SupportsScaledScores``, ``SupportsRunningTopK``, ``SupportsAsyncUpload``). torch and mlx are
imported only when their backend is created.

Examples
--------
>>> from embtools.backends import get_backend
>>> b = get_backend("numpy")
>>> b.name, b.device
('numpy', 'cpu')
"""

from __future__ import annotations

from embtools.backends.abilities import (
    SupportsAsyncUpload,
    SupportsRunningTopK,
    SupportsScaledScores,
)
from embtools.backends.base import Backend
from embtools.backends.convert import convert
from embtools.backends.detect import available_backends
from embtools.backends.frameworks import framework_of
from embtools.backends.registry import get_backend

__all__ = [
    "Backend",
    "SupportsAsyncUpload",
    "SupportsRunningTopK",
    "SupportsScaledScores",
    "available_backends",
    "convert",
    "framework_of",
    "get_backend",
]
