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

import numpy as np

from embtools.errors import InvalidArgumentError

__all__ = ["convert", "framework_of"]


def framework_of(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"mlx"`` for an array of that framework, else None.

    Looks at the type's module only, so it never imports a framework.
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    top = type(x).__module__.split(".")[0]
    return top if top in ("torch", "mlx") else None


def _to_numpy(x: Any) -> np.ndarray:
    """Any supported array as NumPy: zero-copy for NumPy and CPU torch tensors, else a copy."""
    source = framework_of(x)
    if source == "numpy":
        return x  # type: ignore[no-any-return]
    if source == "torch":
        from embtools.backends.torch_backend import tensor_to_numpy

        return tensor_to_numpy(x)
    if source == "mlx":
        from embtools.backends.mlx_backend import mlx_to_numpy

        return mlx_to_numpy(x)
    try:
        a = np.asarray(x)
    except ValueError as err:
        raise InvalidArgumentError(f"cannot convert {type(x).__name__}: {err}") from None
    if a.dtype == object:
        raise InvalidArgumentError(f"cannot convert {type(x).__name__} to a numeric array")
    return a


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
    from embtools.backends import get_backend

    target = get_backend(backend_name, device)
    source = framework_of(array)
    if source == target.name:
        if source == "numpy":
            return array
        if source == "torch":
            return array.to(target.device) if str(array.device) != target.device else array
        if source == "mlx":
            return array  # MLX arrays live in unified memory; the device is chosen per operation
    return target.from_numpy(_to_numpy(array))
