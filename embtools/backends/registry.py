"""Creating and caching backends: ``get_backend(name, device)``.

The framework modules (``numpy_backend``, ``torch_backend``, ``mlx_backend``) are imported only
when their backend is first created, so torch and mlx load lazily.

Examples
--------
>>> get_backend("numpy") is get_backend("numpy", "cpu")
True
"""

from __future__ import annotations

import threading

from embtools.backends.base import Backend
from embtools.backends.detect import BACKEND_NAMES, choose_backend, gather_facts
from embtools.errors import BackendUnavailableError, InvalidArgumentError

__all__ = ["get_backend"]

_CACHE: dict[tuple[str, str | None], Backend] = {}
_LOCK = threading.Lock()


def _create(name: str, device: str | None) -> Backend:
    if name == "numpy":
        from embtools.backends.numpy_backend import NumpyBackend

        return NumpyBackend(device)
    try:
        if name == "torch":
            import torch  # noqa: F401

            from embtools.backends.torch_backend import make_torch_backend

            return make_torch_backend(device)
        import mlx.core  # noqa: F401

        from embtools.backends.mlx_backend import MLXBackend

        return MLXBackend(device)
    except ImportError as err:
        raise BackendUnavailableError(
            f"the {name} backend needs {name}, which is not importable here ({err}); "
            f'install it with: pip install "embtools[{name}]"'
        ) from err


def get_backend(name: str | None = None, device: str | None = None) -> Backend:
    """The backend ``name`` ("numpy", "torch", "mlx"; None = auto) on ``device``.

    Devices: numpy "cpu"; torch "cpu", "cuda", "cuda:N", "mps"; mlx "cpu", "gpu". ``device=None``
    picks the best one present. Backends are cached per (name, device).

    Raises InvalidArgumentError (a ValueError whose message starts with "Unknown backend", as the
    seed's did) for an unknown name, BackendUnavailableError when the framework is
    not installed (the message says which extra to install) and DeviceUnavailableError for a device
    that is not present (the message lists those that are).

    Examples
    --------
    >>> get_backend("NumPy").name
    'numpy'
    """
    if name is None:
        auto_name, auto_device = choose_backend(gather_facts())
        if device is None:
            name, device = auto_name, auto_device
        else:
            name = _backend_for_device(device, auto_name)
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise InvalidArgumentError(
            f"Unknown backend {name!r}; use one of {', '.join(BACKEND_NAMES)}"
        )
    key = (name.lower(), None if device is None else str(device).lower())
    with _LOCK:
        backend = _CACHE.get(key)
        if backend is None:
            created = _create(*key)
            backend = _CACHE.setdefault((created.name, created.device), created)
            _CACHE[key] = backend
    return backend


def _backend_for_device(device: str, auto_name: str) -> str:
    """The backend auto-detection uses for an explicit device."""
    d = str(device).lower()
    if d.startswith(("cuda", "mps")):
        return "torch"
    if d == "gpu":
        return "mlx"
    return auto_name if auto_name == "mlx" else "numpy"
