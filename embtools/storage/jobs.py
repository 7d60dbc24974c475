"""Resumable jobs: numbered parts, an atomic JSON record of the parameters and of the parts done.

A :class:`Job` owns a directory. ``_job.json`` holds the job's parameters and their hash
(:func:`embtools.config.compute_param_hash`); ``_progress.json`` lists the parts completed. A part
is either a file the job writes (``part-000012.parquet``: written under a temporary name, fsynced,
renamed) or work kept elsewhere (a commit to a store, ``part_files=False``); it is recorded only
once it is durable. So a job killed at any moment, run again with the same parameters, redoes only
the parts not recorded. Other parameters on the same directory are refused unless
``overwrite=True``. Every JSON file is replaced atomically
(:func:`embtools.storage.durable.write_atomic`). :func:`progress` is the shared progress bar.

Used by :func:`embtools.similarity_join` and ``embtools ingest``; callable for any loop of parts.

Examples
--------
>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "squares"
>>> job = Job(out, {"kind": "squares", "n": 5}, suffix=".txt")
>>> for i in job.todo(5)[:3]:   # the first run stops after three parts
...     _ = job.write_part(i, lambda f: f.write(str(i * i).encode()))
>>> again = Job(out, {"kind": "squares", "n": 5}, suffix=".txt")
>>> again.todo(5)
[3, 4]
>>> for i in again.todo(5):
...     _ = again.write_part(i, lambda f: f.write(str(i * i).encode()))
>>> again.finish()
>>> [p.read_text() for p in again.parts()], Job(out, {"kind": "squares", "n": 5}, suffix=".txt").complete
(['0', '1', '4', '9', '16'], True)
>>> Job(out, {"kind": "squares", "n": 6})
Traceback (most recent call last):
...
embtools.errors.InvalidArgumentError: ... holds the results of a different squares (other arguments ...
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from embtools.errors import InvalidArgumentError
from embtools.storage.durable import TMP_PREFIX, TMP_SUFFIX, write_atomic

__all__ = ["JOB_FILE", "PROGRESS_FILE", "Job", "progress", "read_json", "write_json"]

JOB_FILE = "_job.json"
PROGRESS_FILE = "_progress.json"


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temporary file, fsync, rename, directory fsync)."""
    raw = json.dumps(dict(data), sort_keys=True).encode("utf-8")
    write_atomic(path, lambda f: f.write(raw))


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recorded(progress: dict[str, Any] | None, param_hash: str) -> set[int]:
    """The part numbers a progress record of the job ``param_hash`` lists (nothing if damaged)."""
    if progress is None or progress.get("param_hash") != param_hash:
        return set()
    parts = progress.get("completed")
    if not isinstance(parts, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in parts):
        return set()
    return set(parts)


class Job:
    """A resumable job in directory ``out`` with parameters ``params`` (JSON values).

    Opening it creates ``out``, or checks that it holds the same job (same parameter hash) and
    collects the parts done (:attr:`done`); temporary files of a killed run are removed. A
    directory holding another job's record, or part files without a record, raises
    InvalidArgumentError unless ``overwrite=True``, which starts afresh. ``params["kind"]`` names
    the job in messages.
    """

    def __init__(self, out: str | os.PathLike[str], params: Mapping[str, Any], *,
                 overwrite: bool = False, suffix: str = ".parquet", part_files: bool = True) -> None:
        from embtools.config import compute_param_hash

        self.path = Path(out)
        self.suffix = suffix
        self.part_files = part_files
        self.params: dict[str, Any] = {**params, "param_hash": compute_param_hash(**params)}
        self.param_hash: str = self.params["param_hash"]
        self.kind = str(params.get("kind", "job")).replace("_", " ")
        self._pattern = re.compile(r"^part-(\d{6,})" + re.escape(suffix) + "$")
        self.done: set[int] = self._open(overwrite)

    def _open(self, overwrite: bool) -> set[int]:
        if self.path.exists() and not self.path.is_dir():
            raise InvalidArgumentError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX) and p.is_file():
                p.unlink()
        existing = read_json(self.path / JOB_FILE)
        files = self._part_files()
        if existing is not None and existing.get("param_hash") == self.param_hash and not overwrite:
            recorded = _recorded(read_json(self.path / PROGRESS_FILE), self.param_hash)
            return {c for c in recorded if c in files} if self.part_files else recorded
        if existing is None and files and not overwrite:
            raise InvalidArgumentError(
                f"{self.path} holds part files of an unknown job; pass overwrite=True")
        if existing is not None and not overwrite:
            raise InvalidArgumentError(
                f"{self.path} holds the results of a different {self.kind} (other arguments or "
                "data); pass overwrite=True to replace them, or choose another out=")
        for p in files.values():
            p.unlink()
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
        write_json(self.path / JOB_FILE, self.params)
        return set()

    def _part_files(self) -> dict[int, Path]:
        return {int(m.group(1)): p for p in self.path.iterdir()
                if (m := self._pattern.match(p.name)) and p.is_file()}

    # -- parts ----------------------------------------------------------------------------------
    def part_path(self, part: int) -> Path:
        """Where part ``part`` is written."""
        return self.path / f"part-{int(part):06d}{self.suffix}"

    def todo(self, total: int) -> list[int]:
        """Parts ``0..total-1`` not done yet, ascending."""
        return [c for c in range(int(total)) if c not in self.done]

    def write_part(self, part: int, write: Callable[[IO[bytes]], Any]) -> Path:
        """Write part ``part`` atomically with ``write(binary file)``, then record it; its path."""
        path = self.part_path(part)
        write_atomic(path, write)
        self.record(part)
        return path

    def record(self, part: int) -> None:
        """Record part ``part`` as done (call once its result is durable)."""
        if isinstance(part, bool) or not isinstance(part, int) or part < 0:
            raise InvalidArgumentError(f"a part number is an int >= 0, got {part!r}")
        self.done.add(part)
        write_json(self.path / PROGRESS_FILE,
                   {"param_hash": self.param_hash, "completed": sorted(self.done)})

    def parts(self) -> list[Path]:
        """The files of the parts done, in part order."""
        return [self.part_path(c) for c in sorted(self.done)]

    def finish(self) -> None:
        """Mark the job complete in its record (``"complete": true`` in the job file)."""
        write_json(self.path / JOB_FILE, {**self.params, "complete": True})

    @property
    def complete(self) -> bool:
        """Whether :meth:`finish` ran for this job's parameters."""
        record = read_json(self.path / JOB_FILE)
        return bool(record and record.get("param_hash") == self.param_hash
                    and record.get("complete") is True)


@contextmanager
def progress(total: int, description: str, *, enabled: bool | None = None, done: int = 0,
             unit: str = "") -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n=1)``.

    ``enabled`` defaults to whether stderr is a terminal (off: ``advance`` does nothing). ``unit``
    (e.g. ``"rows"``) adds a rate column. ``done`` counts work finished before (a resumed job).
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:

        def skip(n: int = 1) -> None:
            """No bar: nothing to advance."""

        yield skip
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"-- {unit}/s" if speed is None else f"{speed:,.0f} {unit}/s")

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(Rate())
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, completed=done)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
