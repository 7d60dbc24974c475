"""Configuration versioning: short, stable SHA-256 hashes of experiment settings.

A configuration is turned into canonical JSON (sorted keys, no whitespace, tuples as lists, NumPy
scalars and arrays as plain numbers and lists, paths as strings, enums as their values, dataclasses as
dicts of their fields, sets as sorted lists) and hashed; the first 16 hex characters of the SHA-256 are
the config hash. Equal settings give equal hashes whatever the key order or container types.

Examples
--------
>>> compute_config_hash({"model": "m", "dims": [64, 384]}) == compute_param_hash(dims=(64, 384), model="m")
True
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["HASH_LENGTH", "canonical_json", "compute_config_hash", "compute_param_hash"]

HASH_LENGTH = 16


def _canonical(value: Any, path: str) -> Any:
    """Return a JSON-ready equivalent of ``value``; raise TypeError naming ``path`` if impossible."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, path)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite(value, path)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = _key(key, path)
            out[name] = _canonical(item, f"{path}[{name!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(item, f"{path}{{...}}") for item in value]
        return sorted(items, key=_dumps)
    if isinstance(value, os.PathLike):
        return os.fspath(value).replace(os.sep, "/")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _canonical(fields, path)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    numpy_value = _from_numpy(value, path)
    if numpy_value is not _NOT_NUMPY:
        return numpy_value
    raise TypeError(
        f"cannot hash {path}: unsupported type {type(value).__module__}.{type(value).__qualname__}; "
        "use JSON-like values (str, int, float, bool, None, lists, dicts), NumPy values, paths, "
        "enums or dataclasses"
    )


_NOT_NUMPY = object()


def _from_numpy(value: Any, path: str) -> Any:
    """NumPy scalars -> Python numbers, arrays -> nested lists; _NOT_NUMPY for anything else."""
    module = type(value).__module__
    if not module.startswith("numpy"):
        return _NOT_NUMPY
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot hash {path}: NumPy array of dtype {value.dtype}")
        return _canonical(value.tolist(), path)
    if isinstance(value, np.generic):
        return _canonical(value.item(), path)
    return _NOT_NUMPY


def _finite(value: float, path: str) -> float:
    if math.isnan(value) or math.isinf(value):
        raise TypeError(f"cannot hash {path}: {value!r} is not a finite number")
    return float(value)


def _key(key: Any, path: str) -> str:
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, str):
        return key
    raise TypeError(f"cannot hash {path}: mapping keys must be strings, got {key!r}")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(config: Any) -> str:
    """The canonical JSON text that :func:`compute_config_hash` hashes.

    Examples
    --------
    >>> canonical_json({"b": (1, 2), "a": 0.5})
    '{"a":0.5,"b":[1,2]}'
    """
    return _dumps(_canonical(config, "config"))


def compute_config_hash(config: Mapping[str, Any]) -> str:
    """First 16 hex characters of the SHA-256 of the canonical JSON of ``config``.

    Raises TypeError naming the key path of a value that cannot be hashed (a function, an open file,
    NaN).

    Examples
    --------
    >>> h = compute_config_hash({"model": "m", "dims": [64, 384]})
    >>> len(h), h == compute_config_hash({"dims": (64, 384), "model": "m"})
    (16, True)
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"compute_config_hash expects a mapping, got {type(config).__name__}")
    digest = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
    return digest[:HASH_LENGTH]


def compute_param_hash(**params: Any) -> str:
    """The config hash of keyword parameters: ``compute_param_hash(a=1) == compute_config_hash({"a": 1})``.

    Examples
    --------
    >>> compute_param_hash(model="m", dims=[64, 384]) == compute_config_hash({"model": "m", "dims": [64, 384]})
    True
    """
    return compute_config_hash(params)
