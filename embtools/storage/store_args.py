"""Checks of :class:`~embtools.store.EmbeddingStore`'s constructor arguments, before anything is
created on disk.

Examples
--------
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     seed_form("numpy", None)
(None, 'numpy')
>>> "in-memory" in str(caught[0].message)
True
>>> store_path("a\\0b")
Traceback (most recent call last):
...
embtools.errors.InvalidArgumentError: the store path 'a\\x00b' contains a NUL character
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from embtools.errors import InvalidArgumentError
from embtools.storage.io import is_url

__all__ = ["BACKEND_NAMES", "seed_form", "store_path"]

BACKEND_NAMES = ("numpy", "torch", "mlx")


def seed_form(path: Any, backend: Any) -> tuple[Any, Any]:
    """``(path, backend)``, reading the seed's ``EmbeddingStore("numpy")`` as ``backend="numpy"``.

    That happens when ``path`` is a backend name, no ``backend`` is given and no such file or
    directory exists; it warns (UserWarning), since a store directory of that name may have been
    meant (pass ``"./torch"`` for that, or ``backend="torch"`` for an in-memory store).
    """
    if isinstance(path, str) and path in BACKEND_NAMES and backend is None and not os.path.exists(path):
        warnings.warn(
            f"EmbeddingStore({path!r}) is read as the seed's EmbeddingStore(backend={path!r}): an "
            f"in-memory store. For a store directory named {path!r} pass './{path}'; for an "
            f"in-memory store pass backend={path!r}.", UserWarning, stacklevel=3)
        return None, path
    return path, backend


def store_path(path: Any) -> str | None:
    """The absolute store path of ``path`` (str, bytes or os.PathLike; None stays None; a URL
    such as ``s3://bucket/prefix`` stays as it is).

    InvalidArgumentError for another type, an empty path or one with a NUL character.
    """
    if path is None:
        return None
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidArgumentError(
            f"path must be a str or os.PathLike (or None for an in-memory store), got "
            f"{type(path).__name__}")
    try:
        text = os.fsdecode(os.fspath(path))
    except (TypeError, UnicodeError) as exc:
        raise InvalidArgumentError(f"the store path {path!r} is not a usable path: {exc}") from None
    if "\0" in text:
        raise InvalidArgumentError(f"the store path {text!r} contains a NUL character")
    if not text:
        raise InvalidArgumentError("the store path is an empty string (None for an in-memory store)")
    if is_url(text):
        return text
    return os.path.abspath(text)
