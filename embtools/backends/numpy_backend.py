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

from embtools.backends.base import Backend, check_k, check_metric
from embtools.errors import DeviceUnavailableError, DimensionMismatchError, InvalidArgumentError
from embtools.kernels import numpy_tiles as kernel

__all__ = ["NumpyBackend"]


class NumpyBackend(Backend):
    """NumPy arrays on the CPU; from_numpy/to_numpy are the identity (no copy).

    Its top-k is the fused tile kernel (:mod:`embtools.kernels.numpy_tiles`), which also scores
    scaled blocks and merges into a running top-k (:class:`SupportsScaledScores`,
    :class:`SupportsRunningTopK`).

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
        return self._normalize(x, axis, None)

    def _normalize_block(self, x: Any, scratch: dict[str, Any]) -> np.ndarray:
        return self._normalize(x, -1, scratch)

    def _normalize(self, x: Any, axis: int, scratch: dict[str, Any] | None) -> np.ndarray:
        x = self._float(x)
        if x.ndim == 2 and axis in (-1, 1) and x.size:
            # fast path: one pass for the norms, one for the scaling
            inv = kernel.inverse_norms(x)  # None: squares leave the safe range
            if inv is not None:
                out = None
                if scratch is not None:  # reuse one buffer per streaming loop
                    buf = scratch.get("normalize")
                    if buf is None or buf.size < x.size or buf.dtype != x.dtype:
                        buf = scratch["normalize"] = np.empty(x.size, dtype=x.dtype)
                    out = buf[: x.size].reshape(x.shape)
                return np.multiply(x, inv[:, None], out=out)  # type: ignore[no-any-return]
        # tiny or overflowing squares are handled by the rescaling path in Backend.normalize
        with np.errstate(over="ignore", invalid="ignore"):
            return super().normalize(x, axis)  # type: ignore[no-any-return]

    def take_along_axis(self, x: Any, indices: Any, axis: int = -1) -> np.ndarray:
        return np.take_along_axis(np.asarray(x), np.asarray(indices), axis=axis)

    def _kth_value(self, scores: Any, k: int) -> np.ndarray:
        return kernel.kth_value(scores, k)

    def _select(self, s: Any, k: int, bound: Any) -> tuple[np.ndarray, np.ndarray]:
        return kernel.select_top_k(np.asarray(s), k)

    def block_top_k(
        self, queries: Any, block: Any, k: int, metric: str = "cosine"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` of one block per query, scored and selected tile by tile (fused)."""
        return self._fused(queries, block, k, metric, None, None, 0)

    def block_top_k_scaled(
        self, queries: Any, block: Any, k: int, metric: str, scale: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`block_top_k` with each block row's scores multiplied by ``scale`` (cosine/dot),
        e.g. by its inverse norm so that cosine runs on an unnormalised block (the queries still
        come normalised)."""
        return self._fused(queries, block, k, metric, scale, None, 0)

    def block_top_k_running(
        self,
        queries: Any,
        block: Any,
        k: int,
        metric: str,
        running: tuple[np.ndarray, np.ndarray] | None,
        offset: int,
        scale: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of ``running`` (the sorted best ``k`` of the earlier blocks, global
        indices below ``offset``) and this block (indices offset by ``offset``); only rows better
        than the running k-th best are looked at. ``scale`` as in :meth:`block_top_k_scaled`."""
        return self._fused(queries, block, k, metric, scale, running, offset)

    def _fused(
        self,
        queries: Any,
        block: Any,
        k: int,
        metric: str,
        scale: np.ndarray | None,
        running: tuple[np.ndarray, np.ndarray] | None,
        offset: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The checks, then the fused tile kernel."""
        k = check_k(k)
        metric = check_metric(metric)
        if scale is not None and metric == "l2":
            raise InvalidArgumentError("block_top_k: scale applies to cosine and dot, not l2")
        q, c = self._block_pair(queries, block)
        if c.shape[0] == 0:
            if running is not None:
                return np.asarray(running[0]), np.asarray(running[1], dtype=np.int64)
            return np.zeros((q.shape[0], 0), q.dtype), np.zeros((q.shape[0], 0), np.int64)
        if scale is not None:
            scale = np.asarray(scale).reshape(-1)
            if scale.shape[0] != c.shape[0]:
                raise DimensionMismatchError(
                    f"block_top_k: {scale.shape[0]} scale factors for a block of {c.shape[0]} rows"
                )
        if running is not None:
            rv, ri = np.asarray(running[0]), np.asarray(running[1], dtype=np.int64)
            if rv.ndim != 2 or rv.shape != ri.shape or rv.shape[0] != q.shape[0]:
                raise DimensionMismatchError(
                    f"block_top_k: running lists of shape {rv.shape} for {q.shape[0]} queries"
                )
            running = (rv, ri)
        return kernel.block_top_k(q, c, k, metric, scale=scale, running=running, offset=offset)
