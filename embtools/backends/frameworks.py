"""Which library an object comes from, and any framework's array as NumPy.

:func:`framework_of` is the one place embtools tells NumPy, torch, MLX and polars objects apart.
It looks at the object's type only, so it never imports a framework; :func:`to_numpy` imports
torch or mlx only for an object that is already one of their arrays.

Examples
--------
>>> import numpy as np
>>> framework_of(np.zeros(2)), framework_of([1.0])
('numpy', None)
>>> to_numpy([1.0, 2.0]).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embtools.errors import InvalidArgumentError

__all__ = [
    "framework_of",
    "is_foreign_array",
    "mlx_to_numpy",
    "tensor_to_numpy",
    "to_numpy",
]

_KNOWN = ("torch", "mlx", "polars")


def framework_of(x: Any) -> str | None:
    """``"numpy"`` for a NumPy array; ``"torch"``, ``"mlx"`` or ``"polars"`` for an object of
    that library (a tensor, an array, a DataFrame or Series); else None. Never imports a framework.

    Examples
    --------
    >>> framework_of(np.zeros(1)), framework_of(np.float32(1.0)), framework_of("text")
    ('numpy', None, None)
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    top = type(x).__module__.split(".")[0]
    return top if top in _KNOWN else None


def is_foreign_array(x: Any) -> bool:
    """True for a torch or MLX array, or another object that exports DLPack (not NumPy)."""
    return framework_of(x) in ("torch", "mlx") or (
        not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__")
    )


def tensor_to_numpy(x: Any) -> np.ndarray:
    """A torch tensor as NumPy: shares memory for CPU tensors; copies from GPUs and for bfloat16."""
    import torch

    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.to(torch.float32)
    if x.device.type != "cpu":
        x = x.cpu()
    return x.numpy()  # type: ignore[no-any-return]


def mlx_to_numpy(x: Any) -> np.ndarray:
    """An MLX array as a new NumPy array (bfloat16 becomes float32)."""
    import mlx.core as mx

    if x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)
    return np.array(x, copy=True)


def to_numpy(x: Any) -> np.ndarray:
    """Any supported array (NumPy, torch, MLX, nested lists) as NumPy: zero-copy for NumPy and
    CPU torch tensors, else a copy. InvalidArgumentError for what is not a numeric array."""
    source = framework_of(x)
    if source == "numpy":
        return x  # type: ignore[no-any-return]
    if source == "torch":
        return tensor_to_numpy(x)
    if source == "mlx":
        return mlx_to_numpy(x)
    try:
        a = np.asarray(x)
    except ValueError as err:
        raise InvalidArgumentError(f"cannot convert {type(x).__name__}: {err}") from None
    if a.dtype == object:
        raise InvalidArgumentError(f"cannot convert {type(x).__name__} to a numeric array")
    return a
