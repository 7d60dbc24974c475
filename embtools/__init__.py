"""embtools: a Parquet-backed columnar embedding store with NumPy, PyTorch and MLX backends.

Importing embtools is cheap: torch, mlx and polars are imported only when a name that needs them is
first used (PEP 562 module ``__getattr__``).

Examples
--------
>>> import embtools as et
>>> et.compute_param_hash(model="m", dims=[64, 384]) == et.compute_config_hash({"dims": [64, 384], "model": "m"})
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "get_backend": "embtools.backends",
    "available_backends": "embtools.backends",
    "convert": "embtools.backends",
    "Backend": "embtools.backends",
    "compute_config_hash": "embtools.config",
    "compute_param_hash": "embtools.config",
    "EmbeddingStore": "embtools.store",
    "similarity_join": "embtools.search",
    "embed_texts": "embtools.embed",
    "embed_queries": "embtools.embed",
    "NumpyBackend": "embtools.backends.numpy_backend",
    "TorchBackend": "embtools.backends.torch_backend",
    "MLXBackend": "embtools.backends.mlx_backend",
}

# the seed's names for embtools objects
_ALIASES: dict[str, tuple[str, str]] = {"AbstractBackend": ("embtools.backends", "Backend")}

# the seed's flags: whether the framework is installed (found without importing it)
_FLAGS: dict[str, str] = {"TORCH_AVAILABLE": "torch", "MLX_AVAILABLE": "mlx"}

__all__ = [
    "MLX_AVAILABLE",
    "TORCH_AVAILABLE",
    "AbstractBackend",
    "Backend",
    "EmbeddingStore",
    "MLXBackend",
    "NumpyBackend",
    "TorchBackend",
    "__version__",
    "available_backends",
    "compute_config_hash",
    "compute_param_hash",
    "convert",
    "embed_queries",
    "embed_texts",
    "errors",
    "get_backend",
    "similarity_join",
]

if TYPE_CHECKING:  # pragma: no cover
    from embtools import errors
    from embtools.backends import Backend, available_backends, convert, get_backend
    from embtools.backends import Backend as AbstractBackend
    from embtools.backends.mlx_backend import MLXBackend
    from embtools.backends.numpy_backend import NumpyBackend
    from embtools.backends.torch_backend import TorchBackend
    from embtools.config import compute_config_hash, compute_param_hash
    from embtools.embed import embed_queries, embed_texts
    from embtools.search import similarity_join
    from embtools.store import EmbeddingStore


def __getattr__(name: str) -> Any:
    if name in ("errors", "ray"):  # embtools.ray imports ray: only when asked for
        return importlib.import_module(f"embtools.{name}")
    if name in _ALIASES:
        module_name, attr = _ALIASES[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    if name in _FLAGS:
        flag = _found(_FLAGS[name])
        globals()[name] = flag
        return flag
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embtools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _found(module: str) -> bool:
    """Whether the top-level ``module`` is installed (its spec is found; nothing is imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def __dir__() -> list[str]:
    return sorted(__all__)
