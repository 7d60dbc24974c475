"""Spill files of an index build: the work a killed build finished, picked up by a re-run.

A build keeps its finished steps (the trained centroids, each chunk of rows assigned and encoded)
as ``build-<key>-<what>-<crc32>.npy`` files in the index's folder, where ``key`` hashes everything
the result depends on (the version and its data files, dimension, metric, partitions, training
rows, codes, chunk size). A re-run with the same settings finds them and skips those steps; other
settings never see them. A file appears whole (written under a temporary name, then renamed) and
is read back only when its CRC-32 (in its name) and its ``.npy`` header (dtype, shape, no
pickles) check out; anything else is removed and recomputed, so a torn or damaged file costs time,
never a wrong index. Spill files are not fsynced (after a power loss the CRC catches what did not
reach the disk). The build removes them once its version is committed; those of a build that is
never resumed are unreferenced files, which ``vacuum`` removes after its grace period.

Examples
--------
>>> import tempfile
>>> spill = Spill(tempfile.mkdtemp(), Spill.key(version=3, partitions=8))
>>> spill.save("centroids", np.eye(2, dtype=np.float32))
>>> spill.load("centroids", np.float32, (2, 2)).tolist()
[[1.0, 0.0], [0.0, 1.0]]
>>> spill.load("centroids", np.float32, (3, 2)) is None      # not what this step expects
True
>>> spill.remove(); spill.load("centroids", np.float32, (2, 2)) is None
True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

import numpy as np

from embtools.errors import CorruptStoreError

__all__ = ["Spill", "read_rows"]

_READ_BYTES = 8 * 1024**2


class _Writer:
    """Rows appended to an open ``.npy`` file, with the running CRC-32 of everything written."""

    def __init__(self, f: BinaryIO, header: bytes) -> None:
        self.f = f
        self.crc = zlib.crc32(header)
        self.offset = len(header)
        #: ``(path, offset of the data)`` once the file is in place (see :meth:`Spill.path`)
        self.written: tuple[str, int] = ("", 0)
        f.write(header)

    def write(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8).data
        self.crc = zlib.crc32(data, self.crc)
        self.f.write(data)


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


class Spill:
    """The spill files of one build (``folder``: the index's folder, ``key``: :meth:`key`)."""

    def __init__(self, folder: str, key: str) -> None:
        self.folder = folder
        self.prefix = f"build-{key}-"

    @staticmethod
    def key(**settings: Any) -> str:
        """16 hex digits of the SHA-256 of ``settings`` (JSON-serialisable values)."""
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _names(self, what: str) -> list[str]:
        stem = f"{self.prefix}{what}-"
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(stem) and n.endswith(".npy")
                      and len(n) == len(stem) + 12)

    @contextmanager
    def writer(self, what: str, dtype: Any, shape: tuple[int, ...]) -> Iterator[_Writer]:
        """Write ``what`` row block by row block (``writer.write(rows)``); it appears under its
        final name when the block exits without an error and exactly ``shape`` was written."""
        dtype = np.dtype(dtype)
        fd, tmp = tempfile.mkstemp(prefix=f"{self.prefix}{what}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                header = _header(dtype, shape)
                w = _Writer(f, header)
                yield w
                size = f.tell()
            if size != len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(f"spill {what}: {size} bytes written for {shape} of {dtype}")
            for old in self._names(what):
                os.unlink(os.path.join(self.folder, old))
            final = os.path.join(self.folder, f"{self.prefix}{what}-{w.crc:08x}.npy")
            os.replace(tmp, final)
            w.written = (final, w.offset)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def save(self, what: str, array: np.ndarray) -> None:
        """Spill a whole array."""
        array = np.ascontiguousarray(array)
        with self.writer(what, array.dtype, array.shape) as w:
            w.write(array)

    def path(self, what: str, dtype: Any, shape: tuple[int, ...]) -> tuple[str, int] | None:
        """``(path, offset of the data)`` of a checked spill of ``what`` holding ``shape`` of
        ``dtype``, or None (a file that fails a check is removed)."""
        want = (np.lib.format.dtype_to_descr(np.dtype(dtype)), tuple(int(s) for s in shape))
        found = None
        for name in self._names(what):
            path = os.path.join(self.folder, name)
            try:
                crc = int(name[-12:-4], 16)
                with open(path, "rb") as f:
                    major, _minor = np.lib.format.read_magic(f)
                    if major != 1:
                        raise ValueError("not a version 1 .npy header")
                    shape_, fortran, dt = np.lib.format.read_array_header_1_0(f, max_header_size=1024)
                    offset = f.tell()
                    if fortran or dt.hasobject or (np.lib.format.dtype_to_descr(dt), shape_) != want:
                        raise ValueError("unexpected header")
                    if os.fstat(f.fileno()).st_size != offset + int(np.prod(shape_, dtype=np.int64)) * dt.itemsize:
                        raise ValueError("wrong size")
                    f.seek(0)
                    running = 0
                    while chunk := f.read(_READ_BYTES):
                        running = zlib.crc32(chunk, running)
                if running != crc:
                    raise ValueError("CRC mismatch")
                found = (path, offset)
            except (OSError, ValueError, SyntaxError, TypeError):
                with suppress(FileNotFoundError):
                    os.unlink(path)
        return found

    def load(self, what: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        """The spilled array ``what`` if there is a checked one of ``shape`` and ``dtype``."""
        hit = self.path(what, dtype, shape)
        if hit is None:
            return None
        out = np.empty(shape, dtype)
        read_rows(hit, out, 0)
        return out

    def remove(self) -> None:
        """Remove every spill file of this build (and its temporary files)."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(self.prefix):
                with suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))


def read_rows(spill: tuple[str, int], out: np.ndarray, first: int) -> None:
    """Fill ``out`` with the rows of a spilled 2-D (or 1-D) array from row ``first`` on
    (``spill``: :meth:`Spill.path`'s answer; a file cut short since is CorruptStoreError)."""
    path, offset = spill
    row_bytes = int(out.itemsize * (int(np.prod(out.shape[1:], dtype=np.int64)) if out.ndim > 1 else 1))
    view = out.reshape(-1).view(np.uint8).data
    with open(path, "rb", buffering=0) as f:
        f.seek(offset + first * row_bytes)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:
                raise CorruptStoreError(f"{path}: spill file cut short while the build read it")
            done += got
