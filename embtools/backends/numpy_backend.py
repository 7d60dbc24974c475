"""The NumPy backend (CPU only, always available).

Examples
--------
>>> from embtools.backends.numpy_backend import NumpyBackend
>>> b = NumpyBackend()
>>> b.name, b.device
('numpy', 'cpu')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat.numpy as xnp
import numpy as np

from embtools.backends.base import Backend
from embtools.errors import DeviceUnavailableError, InvalidArgumentError

__all__ = ["NumpyBackend"]

# a column group this wide gives each row ~GROUPS group maxima to bound its k-th best score
_GROUP_MIN = 8


class NumpyBackend(Backend):
    """NumPy arrays on the CPU; from_numpy/to_numpy are the identity (no copy).

    Examples
    --------
    >>> b = NumpyBackend()
    >>> b.get_shape(b.zeros((2, 3)))
    (2, 3)
    """

    name = "numpy"

    def __init__(self, device: str | None = None) -> None:
        if device not in (None, "cpu"):
            raise DeviceUnavailableError(
                f"the numpy backend runs only on 'cpu', not {device!r}; available devices: cpu"
            )
        self.device = "cpu"
        self.xp = xnp

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def resolve_dtype(self, dtype: Any) -> Any:
        if str(dtype).removeprefix("torch.").removeprefix("mlx.core.") == "bfloat16":
            raise InvalidArgumentError(
                "NumPy has no bfloat16; use float32 or the torch/mlx backend"
            )
        try:
            return np.dtype(str(dtype).removeprefix("torch.").removeprefix("mlx.core."))
        except TypeError:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}") from None

    def dtype_name(self, dtype: Any) -> str:
        return np.dtype(dtype).name

    def _asarray(self, data: Any, dtype: Any) -> np.ndarray:
        return np.array(data, dtype=dtype, copy=True)

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: int | Sequence[int], dtype: Any = None) -> np.ndarray:
        return np.zeros(shape, dtype=self.resolve_dtype(dtype or "float32"))

    def ones(self, shape: int | Sequence[int], dtype: Any = None) -> np.ndarray:
        return np.ones(shape, dtype=self.resolve_dtype(dtype or "float32"))

    def random_normal(
        self, shape: int | Sequence[int], seed: int | None = None, dtype: Any = None
    ) -> np.ndarray:
        target = self.resolve_dtype(dtype or "float32")
        rng = np.random.default_rng(seed)
        if target in (np.float32, np.float64):
            return rng.standard_normal(shape, dtype=target)
        return rng.standard_normal(shape, dtype=np.float32).astype(target)

    def get_memory_usage(self, x: Any) -> int:
        return int(np.asarray(x).nbytes)

    def normalize(self, x: Any, axis: int = -1) -> np.ndarray:
        # overflowing squares are handled by the rescaling path in Backend.normalize
        with np.errstate(over="ignore", invalid="ignore"):
            return super().normalize(x, axis)  # type: ignore[no-any-return]

    def take_along_axis(self, x: Any, indices: Any, axis: int = -1) -> np.ndarray:
        return np.take_along_axis(np.asarray(x), np.asarray(indices), axis=axis)

    def _kth_value(self, scores: Any, k: int) -> np.ndarray:
        n = scores.shape[1]
        return np.partition(scores, n - k, axis=1)[:, n - k]

    def _block_bound(self, scores: Any, k: int) -> np.ndarray:
        """A cheap lower bound on each row's k-th best score.

        The columns are split into ``g`` strided groups; the k-th largest of the ``g`` group maxima
        is k distinct entries deep, so it never exceeds the k-th largest score, and with ``g >> k``
        only a few entries beyond the true top k reach it.
        """
        n = scores.shape[1]
        groups = max(8 * k, 256)
        if n < groups * _GROUP_MIN:
            return self._kth_value(scores, k)
        width = n // groups
        maxima = scores[:, : width * groups].reshape(scores.shape[0], width, groups).max(axis=1)
        return np.partition(maxima, groups - k, axis=1)[:, groups - k]
