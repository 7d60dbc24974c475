"""Reading a directory written by the seed package's ``EmbeddingStore.save_to_disk``.

The seed (``embedding_tools``) wrote one ``embeddings_<d>d.npy`` per dimension, ``metadata.json``,
and, when it had them, ``text_ids.txt`` and ``labels.txt`` (one value per line). Every file is
hostile input: arrays are read with ``allow_pickle=False`` (memory-mapped first, so a header that
claims more data than the file holds is refused before anything is allocated), must be 2-D
float16/32/64 with ``d`` columns, finite, and agree on the row count; the text files must be UTF-8
with one line per row. Anything else raises :class:`~embtools.errors.CorruptStoreError`.
Labels that are all integers are read as integers (the seed wrote ``str(label)``).

Examples
--------
>>> import json, os, tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> np.save(os.path.join(d, "embeddings_4d.npy"), np.ones((2, 4), np.float32))
>>> with open(os.path.join(d, "metadata.json"), "w") as f:
...     json.dump({"dimensions": [4], "backend": "numpy"}, f)
>>> with open(os.path.join(d, "text_ids.txt"), "w") as f:
...     _ = f.write("a\\nb")
>>> with open(os.path.join(d, "labels.txt"), "w") as f:
...     _ = f.write("0\\n1\\n")
>>> is_seed_directory(d)
True
>>> seed = read_seed(d)
>>> {k: v.shape for k, v in seed.arrays.items()}, seed.text_ids, seed.labels
({4: (2, 4)}, ['a', 'b'], [0, 1])
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embtools.errors import CorruptStoreError, StoreNotFoundError

__all__ = ["SeedData", "is_seed_directory", "read_seed"]

_ARRAY = re.compile(r"^embeddings_([1-9][0-9]{0,8})d\.npy$")
_INT = re.compile(r"^-?[0-9]{1,18}$")
METADATA = "metadata.json"
TEXT_IDS = "text_ids.txt"
LABELS = "labels.txt"
_MAX_TEXT_BYTES = 1 << 30
_MAX_JSON_BYTES = 16 << 20


@dataclass
class SeedData:
    """What a seed directory holds: ``{dim: (n, dim) array}``, text ids, labels, metadata.json."""

    arrays: dict[int, np.ndarray]
    text_ids: list[str] | None
    labels: list[Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _arrays_in(directory: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir(directory):
        m = _ARRAY.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(directory, name)
    return out


def is_seed_directory(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` looks like the seed's save_to_disk output (its metadata.json or an
    ``embeddings_<d>d.npy``)."""
    path = os.fspath(directory)
    if not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, METADATA)) or bool(_arrays_in(path))


def _read_bytes(path: str, limit: int) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise CorruptStoreError(f"{path}: {size} bytes, more than the {limit} a seed file may hold")
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CorruptStoreError(f"{path}: cannot read ({exc})") from exc


def _read_metadata(path: str) -> dict[str, Any]:
    try:
        data = json.loads(_read_bytes(path, _MAX_JSON_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptStoreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptStoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_array(path: str, dim: int) -> np.ndarray:
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as exc:
        raise CorruptStoreError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(mapped, np.ndarray):
        raise CorruptStoreError(f"{path}: not a single .npy array")
    if mapped.dtype.kind != "f" or mapped.dtype.itemsize not in (2, 4, 8):
        raise CorruptStoreError(f"{path}: dtype {mapped.dtype} is not float16/32/64")
    if mapped.ndim != 2 or mapped.shape[1] != dim:
        raise CorruptStoreError(f"{path}: shape {mapped.shape}, expected (rows, {dim})")
    arr = np.array(mapped, dtype=mapped.dtype.newbyteorder("="), order="C")
    del mapped
    if not np.isfinite(arr).all():
        raise CorruptStoreError(f"{path}: contains NaN or inf")
    if arr.dtype.itemsize == 8 and arr.size and float(np.abs(arr).max()) > np.finfo(np.float32).max:
        raise CorruptStoreError(f"{path}: values outside the float32 range")
    return arr


def _read_lines(path: str, rows: int) -> list[str] | None:
    if not os.path.exists(path):
        return None
    try:
        text = _read_bytes(path, _MAX_TEXT_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptStoreError(f"{path}: not UTF-8 text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != rows:
        raise CorruptStoreError(f"{path}: {len(lines)} lines for {rows} embedding rows")
    return lines


def read_seed(directory: str | os.PathLike[str]) -> SeedData:
    """Read the seed directory at ``directory`` (StoreNotFoundError when it is not one)."""
    path = os.fspath(directory)
    if not is_seed_directory(path):
        raise StoreNotFoundError(f"{path!r} is not a directory written by embedding_tools")
    meta_path = os.path.join(path, METADATA)
    metadata = _read_metadata(meta_path) if os.path.exists(meta_path) else {}
    files = _arrays_in(path)
    listed = metadata.get("dimensions")
    if listed is not None:
        if not isinstance(listed, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in listed):
            raise CorruptStoreError(f"{meta_path}: 'dimensions' is not a list of integers")
        if sorted(set(listed)) != sorted(files):
            raise CorruptStoreError(
                f"{meta_path} lists dimensions {sorted(listed)}, the directory holds "
                f"{sorted(files)}")
    arrays = {d: _read_array(files[d], d) for d in sorted(files)}
    counts = {d: int(a.shape[0]) for d, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise CorruptStoreError(f"{path}: dimensions hold different row counts {counts}")
    rows = next(iter(counts.values()), 0)
    text_ids = _read_lines(os.path.join(path, TEXT_IDS), rows)
    raw_labels = _read_lines(os.path.join(path, LABELS), rows)
    labels: list[Any] | None = raw_labels
    if raw_labels is not None and raw_labels and all(_INT.match(v) for v in raw_labels):
        labels = [int(v) for v in raw_labels]
    if not arrays and (text_ids or labels):
        raise CorruptStoreError(f"{path}: text ids or labels without embeddings")
    return SeedData(arrays, text_ids, labels, metadata)
