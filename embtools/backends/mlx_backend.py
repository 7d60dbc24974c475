"""The MLX backend: Apple's array framework (Metal GPU on Apple silicon, CPU elsewhere).

mlx is imported only when this module is, i.e. when an MLX backend is created or an MLX array is
converted. Arrays cross between MLX and NumPy by copy. MLX has no ``nonzero``, so the per-row
selection of ``top_k``/``merge_top_k`` runs on NumPy (the scores are copied to the host: cheap in
Apple's unified memory); all other maths runs in MLX on the backend's device.

Examples
--------
>>> from embtools.backends import get_backend
>>> b = get_backend("mlx", device="cpu")
>>> b.name, b.device
('mlx', 'cpu')
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from embtools.backends.base import Backend, check_k
from embtools.backends.frameworks import mlx_to_numpy
from embtools.backends.numpy_backend import NumpyBackend
from embtools.errors import DeviceUnavailableError, InvalidArgumentError
from embtools.kernels import numpy_tiles

__all__ = ["MLXBackend", "available_devices", "mlx_to_numpy"]

#: merges run on the host through the NumPy backend's public merge_top_k
_HOST = NumpyBackend()

def available_devices() -> list[str]:
    """``["cpu"]`` plus ``"gpu"`` when MLX has a GPU here."""
    return ["cpu", "gpu"] if mx.is_available(mx.gpu) else ["cpu"]


def _on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a backend method with the backend's device as MLX's stream."""

    @functools.wraps(fn)
    def wrapper(self: MLXBackend, *args: Any, **kwargs: Any) -> Any:
        with mx.stream(self._mx_device):
            return fn(self, *args, **kwargs)

    return wrapper


class MLXBackend(Backend):
    """MLX arrays; every operation runs on the backend's device ("cpu" or "gpu").

    Examples
    --------
    >>> b = MLXBackend("cpu")
    >>> b.get_dtype(b.zeros((2, 2)))
    'float32'
    """

    name = "mlx"

    def __init__(self, device: str | None = None) -> None:
        present = available_devices()
        d = present[-1] if device is None else str(device).lower().strip()
        if d not in present:
            raise DeviceUnavailableError(
                f"mlx device {device!r} is not available here; available devices: {', '.join(present)}"
            )
        self.device = d
        self._mx_device = mx.gpu if d == "gpu" else mx.cpu
        self.xp = mx

    def is_array(self, x: Any) -> bool:
        return isinstance(x, mx.array)

    def resolve_dtype(self, dtype: Any) -> Any:
        if isinstance(dtype, mx.Dtype):
            return dtype
        name = str(dtype).removeprefix("torch.").removeprefix("mlx.core.")
        if name != "bfloat16":
            try:
                name = np.dtype(name).name
            except TypeError:
                raise InvalidArgumentError(f"unknown dtype {dtype!r}") from None
        value = getattr(mx, name, None)
        if not isinstance(value, mx.Dtype):
            raise InvalidArgumentError(f"mlx has no dtype {dtype!r}")
        return value

    def dtype_name(self, dtype: Any) -> str:
        return str(dtype).removeprefix("mlx.core.")

    def _asarray(self, data: Any, dtype: Any) -> Any:
        if isinstance(data, mx.array):
            return data.astype(dtype)
        a = np.asarray(data)
        if a.dtype.kind == "f" and dtype != mx.float64:
            a = a.astype(np.float32, copy=False)
        return mx.array(a, dtype=dtype)

    def from_numpy(self, a: np.ndarray) -> Any:
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise InvalidArgumentError(f"mlx cannot hold NumPy dtype {a.dtype}")
        return mx.array(a, dtype=self.resolve_dtype(a.dtype.name))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        return mlx_to_numpy(x)

    def zeros(self, shape: int | Sequence[int], dtype: Any = None) -> Any:
        return mx.zeros(shape, dtype=self.resolve_dtype(dtype or "float32"))

    def ones(self, shape: int | Sequence[int], dtype: Any = None) -> Any:
        return mx.ones(shape, dtype=self.resolve_dtype(dtype or "float32"))

    def random_normal(
        self, shape: int | Sequence[int], seed: int | None = None, dtype: Any = None
    ) -> Any:
        shape_t = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        target = self.resolve_dtype(dtype or "float32")
        key = mx.random.key(int(seed)) if seed is not None else None
        return mx.random.normal(shape_t, key=key).astype(target)

    def get_memory_usage(self, x: Any) -> int:
        return int(x.nbytes)

    def synchronize(self) -> None:
        mx.synchronize()

    # selection runs on the host (MLX has no nonzero); the results come back as MLX arrays
    def _kth_value(self, scores: Any, k: int) -> Any:
        return mx.array(numpy_tiles.kth_value(mlx_to_numpy(scores), k))

    def _select(self, s: Any, k: int, bound: Any) -> tuple[Any, Any]:
        values, indices = numpy_tiles.select_top_k(mlx_to_numpy(s), k)
        return mx.array(values), mx.array(indices)

    def merge_top_k(
        self,
        values_a: Any,
        indices_a: Any,
        values_b: Any,
        indices_b: Any,
        k: int,
        largest: bool = True,
    ) -> tuple[Any, Any]:
        check_k(k)
        va, ia, vb, ib = (
            self.to_numpy(self._coerce(x)) for x in (values_a, indices_a, values_b, indices_b)
        )
        values, indices = _HOST.merge_top_k(va, ia, vb, ib, k, largest)
        return mx.array(values), mx.array(indices)


for _name in (
    "create_array",
    "dot",
    "normalize",
    "cosine_similarity",
    "concatenate",
    "stack",
    "slice_last_dim",
    "matmul_t",
    "score_block",
    "top_k",
    "block_top_k",
    "top_k_cosine_neighbors",
    "take_along_axis",
    "zeros",
    "ones",
    "random_normal",
    "from_numpy",
    "load",
):
    setattr(MLXBackend, _name, _on_device(getattr(MLXBackend, _name)))
