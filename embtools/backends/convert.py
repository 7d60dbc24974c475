"""Cross-backend conversion of arrays.

Examples
--------
>>> import numpy as np
>>> from embtools.backends.convert import convert, framework_of
>>> framework_of(convert([1.0, 2.0], "numpy"))
'numpy'
"""

from __future__ import annotations

from typing import Any

from embtools.backends.frameworks import framework_of, to_numpy
from embtools.backends.registry import get_backend

__all__ = ["convert", "framework_of"]


def convert(array: Any, backend_name: str, device: str | None = None) -> Any:
    """``array`` (NumPy, torch, MLX, or a nested list) as an array of another backend.

    No copy is made for NumPy -> NumPy, NumPy <-> torch on the CPU (the two share memory: writing one
    changes the other) and torch -> torch on the same device. A copy is made for a device move
    (CPU <-> CUDA/MPS), to or from MLX, for bfloat16 going to NumPy (it becomes float32), and for
    NumPy arrays torch cannot view (negative strides, non-native byte order). Read-only NumPy arrays
    (memory-mapped store data) become torch tensors that share the read-only memory: do not write
    to such tensors. dtypes are kept.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(3, dtype=np.float32)
    >>> convert(a, "numpy") is a
    True
    """
    target = get_backend(backend_name, device)
    source = framework_of(array)
    if source == target.name:
        if source == "numpy":
            return array
        if source == "torch":
            return array.to(target.device) if str(array.device) != target.device else array
        if source == "mlx":
            return array  # MLX arrays live in unified memory; the device is chosen per operation
    return target.from_numpy(to_numpy(array))
