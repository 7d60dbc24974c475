"""Durable writes: the one fsync helper of the codebase and atomic file replacement.

A file written with :func:`write_atomic` is either absent or complete, with its old content or its
new one, after a crash or a power loss: the bytes go to a temporary name in the same directory, are
fsynced, renamed over the target, and the directory is fsynced so the rename survives too.

Examples
--------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "state.json")
>>> write_atomic(path, lambda f: f.write(b'{"done": 3}'))
>>> open(path, "rb").read(), sorted(os.listdir(os.path.dirname(path)))
(b'{"done": 3}', ['state.json'])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import IO, Any

__all__ = ["fsync_dir", "fsync_file", "fsync_path", "write_atomic"]

TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


def fsync_file(fh: IO[Any]) -> None:
    """Flush ``fh`` and fsync it: its bytes are on disk when this returns."""
    fh.flush()
    os.fsync(fh.fileno())


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync what is at ``path``: a file written earlier, and closed, without its fsync
    (:func:`~embtools.storage.datafile.write_data_file`'s ``durable=False``), or a directory."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that entries created, renamed or removed in it survive a power loss."""
    fsync_path(path)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Replace ``path`` atomically with what ``write(binary file)`` writes (see the module doc).

    The temporary file is ``.<name>.tmp`` in the same directory; it is removed if ``write`` fails.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fsync_file(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
