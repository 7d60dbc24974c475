"""The PyTorch backend: CPU, CUDA and MPS tensors.

torch is imported when this module is imported, which happens only when a torch backend is created
(``get_backend("torch")``) or a torch tensor is converted.

Examples
--------
>>> from embtools.backends import get_backend
>>> b = get_backend("torch", device="cpu")
>>> b.name, b.device
('torch', 'cpu')
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as xtorch
import numpy as np
import torch

from embtools.backends.base import Backend, check_k, check_metric
from embtools.backends.frameworks import tensor_to_numpy
from embtools.errors import DeviceUnavailableError, InvalidArgumentError
from embtools.kernels import numpy_tiles as kernel

__all__ = ["CudaTorchBackend", "TorchBackend", "available_devices", "make_torch_backend", "tensor_to_numpy"]


def available_devices() -> list[str]:
    """Devices torch can use here, e.g. ``["cpu", "cuda:0", "mps"]``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | None) -> str:
    """The canonical device string for ``device`` (None = cuda:0, else mps, else cpu).

    Raises DeviceUnavailableError naming the devices present.
    """
    present = available_devices()
    if device is None:
        return next((d for d in present if d != "cpu"), "cpu")
    d = str(device).lower().strip()
    if d == "cuda":
        d = "cuda:0"
    if d == "mps:0":
        d = "mps"
    if d not in present:
        raise DeviceUnavailableError(
            f"torch device {device!r} is not available here; available devices: {', '.join(present)}"
        )
    return d


class TorchBackend(Backend):
    """torch tensors on one device.

    ``from_numpy`` shares memory with the NumPy array on the CPU (read-only arrays included: the
    tensor must then not be written); other devices get a copy.

    Examples
    --------
    >>> b = TorchBackend("cpu")
    >>> b.get_dtype(b.ones(3))
    'float32'
    """

    name = "torch"

    def __init__(self, device: str | None = None) -> None:
        self.device = resolve_device(device)
        self._torch_device = torch.device(self.device)
        self.xp = xtorch

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def resolve_dtype(self, dtype: Any) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        name = str(dtype).removeprefix("torch.").removeprefix("mlx.core.")
        if name != "bfloat16":
            try:
                name = np.dtype(name).name
            except TypeError:
                raise InvalidArgumentError(f"unknown dtype {dtype!r}") from None
        value = getattr(torch, name, None)
        if not isinstance(value, torch.dtype):
            raise InvalidArgumentError(f"torch has no dtype {dtype!r}")
        return value

    def dtype_name(self, dtype: Any) -> str:
        return str(dtype).removeprefix("torch.")

    def move(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this backend's device (the same tensor when it is there already)."""
        if x.device.type == self._torch_device.type and (x.device.index or 0) == (
            self._torch_device.index or 0
        ):
            return x
        return x.to(self._torch_device)

    def _asarray(self, data: Any, dtype: Any) -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            return self.move(data).to(dtype=dtype, copy=True)
        a = np.asarray(data)
        if a.dtype.name != "float64" and dtype != torch.float64 and a.dtype.kind == "f":
            a = a.astype(np.float32, copy=False)
        return torch.tensor(a, dtype=dtype, device=self._torch_device)

    def from_numpy(self, a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a)
        if a.dtype.kind not in "biuf" or not a.dtype.isnative or any(s < 0 for s in a.strides):
            if a.dtype.kind not in "biuf":
                raise InvalidArgumentError(f"torch cannot hold NumPy dtype {a.dtype}")
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
        if a.flags.writeable:
            t = torch.from_numpy(a)
        else:
            # Memory-mapped store data is read-only. torch warns that it cannot protect it; the
            # tensor shares the memory and embtools only reads it, so the warning is silenced here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writ.*", category=UserWarning)
                t = torch.from_numpy(a)
        return t if self.device == "cpu" else t.to(self._torch_device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        return tensor_to_numpy(x)

    def zeros(self, shape: int | Sequence[int], dtype: Any = None) -> torch.Tensor:
        return torch.zeros(
            _shape(shape), dtype=self.resolve_dtype(dtype or "float32"), device=self._torch_device
        )

    def ones(self, shape: int | Sequence[int], dtype: Any = None) -> torch.Tensor:
        return torch.ones(
            _shape(shape), dtype=self.resolve_dtype(dtype or "float32"), device=self._torch_device
        )

    def random_normal(
        self, shape: int | Sequence[int], seed: int | None = None, dtype: Any = None
    ) -> torch.Tensor:
        target = self.resolve_dtype(dtype or "float32")
        gen = torch.Generator(device=self._torch_device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        x = torch.randn(
            _shape(shape), generator=gen, device=self._torch_device, dtype=torch.float32
        )
        return x.to(target)

    def get_memory_usage(self, x: Any) -> int:
        return int(x.element_size() * x.nelement())

    def normalize(self, x: Any, axis: int = -1) -> torch.Tensor:
        x = self._float(x)
        if x.numel():
            norm = torch.linalg.vector_norm(x, dim=axis, keepdim=True)  # one pass
            if bool(((norm >= 2.0**-50) & torch.isfinite(norm)).all()):
                return x / norm
        # zero or tiny vectors, overflowing squares, NaN/inf: the rescaling path
        return super().normalize(x, axis)  # type: ignore[no-any-return]

    def take_along_axis(self, x: Any, indices: Any, axis: int = -1) -> torch.Tensor:
        return torch.take_along_dim(self._coerce(x), self._coerce(indices), dim=axis)

    def synchronize(self) -> None:
        if self._torch_device.type == "cuda":
            torch.cuda.synchronize(self._torch_device)
        elif self._torch_device.type == "mps":
            torch.mps.synchronize()

    def block_top_k(
        self, queries: Any, block: Any, k: int, metric: str = "cosine"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` of one block per query. On the CPU, torch's matrix product feeds the tiled
        NumPy selection kernel through shared memory; on GPUs, score_block + torch.topk."""
        if self._torch_device.type != "cpu":
            return super().block_top_k(queries, block, k, metric)  # type: ignore[no-any-return]
        k = check_k(k)
        metric = check_metric(metric)
        q, c = self._block_pair(queries, block)
        if c.shape[0] == 0:
            return q[:, :0].clone(), torch.zeros((q.shape[0], 0), dtype=torch.int64)
        values, indices = kernel.block_top_k(
            q.detach().contiguous().numpy(), c.detach().contiguous().numpy(), k, metric, _torch_mm
        )
        return torch.from_numpy(values), torch.from_numpy(indices)

    def _kth_value(self, scores: Any, k: int) -> torch.Tensor:
        return torch.topk(scores, k, dim=1, largest=True, sorted=True).values[:, -1]

    def _select(self, s: Any, k: int, bound: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.topk, made exact about ties: rows whose k-th and (k+1)-th values differ have an
        unambiguous top-k set, which two stable sorts order by value then index; the rare rows
        with a tie at the boundary (or NaN) take the exact candidate path of the base class."""
        nq, n = int(s.shape[0]), int(s.shape[1])
        if k == 0 or nq == 0 or k >= n:
            return super()._select(s, k, bound) if k < n else _sort_rows(s, k)
        values, indices = torch.topk(s, k + 1, dim=1, largest=True, sorted=True)
        clean = values[:, k - 1] > values[:, k]
        indices, order = torch.sort(indices[:, :k], dim=1)
        values = values[:, :k].gather(1, order)
        values, order = torch.sort(values, dim=1, descending=True, stable=True)
        indices = indices.gather(1, order)
        if not bool(clean.all()):
            bad = torch.nonzero(~clean).squeeze(1)
            bad_v, bad_i = super()._select(s[bad], k, self._kth_value)
            values[bad] = bad_v
            indices[bad] = bad_i
        return values, indices


class CudaTorchBackend(TorchBackend):
    """torch tensors on a CUDA device; batches are staged to it asynchronously through pinned
    memory (:class:`~embtools.backends.abilities.SupportsAsyncUpload`)."""

    def async_uploader(self) -> Any:
        """A pinned-memory uploader on its own CUDA stream (:mod:`embtools.kernels.torch_cuda`)."""
        from embtools.kernels.torch_cuda import PinnedUploader

        return PinnedUploader(self.device)


def make_torch_backend(device: str | None = None) -> TorchBackend:
    """The torch backend for ``device``: a :class:`CudaTorchBackend` on CUDA devices.

    Examples
    --------
    >>> type(make_torch_backend("cpu")).__name__
    'TorchBackend'
    """
    d = resolve_device(device)
    return CudaTorchBackend(d) if d.startswith("cuda") else TorchBackend(d)


def _torch_mm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = a @ b.T`` with torch's CPU matrix product, on shared memory."""
    torch.mm(torch.from_numpy(a), torch.from_numpy(b).T, out=torch.from_numpy(out))


def _sort_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row by a full stable sort (NaN last)."""
    key = torch.where(torch.isnan(s), torch.full_like(s, -torch.inf), s)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
