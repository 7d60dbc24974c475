"""Integrity checks of a store's data files: confined paths, checked footers, page CRC-32s.

Every data file a manifest lists is checked before any byte of it reaches pyarrow or polars:

- its path is ``data/<32 hex>.parquet`` (what the writer names files) and, by ``lstat`` and ``fstat``,
  a regular file (a symlink, FIFO, folder or device is refused; a FIFO is opened non-blocking, so it
  never hangs);
- its size equals the manifest's ``bytes``; its footer, CRC-32 included when the manifest records
  one (``footer_crc``), decodes and is consistent (:func:`~embtools.storage.footer.parse_footer`);
  its row count, row groups and ``row_id`` range match the manifest;
- each column chunk, before it is first read in this process, matches the CRC-32 the manifest
  records for it (``chunk_crcs``: page headers included), or, in files committed without those,
  each page matches the CRC-32 the writer stored in its header (``write_page_checksum``); the page
  headers agree with the footer (encodings, counts, sizes).

Results are cached per process by ``(path, device, inode, size, mtime)``, so each part of a file is
checked once; :func:`check_file` with ``full=True`` (used before ``compact``/``delete`` rewrite a
file, and by :func:`verify_store`) checks every page again. Any failure raises
:class:`~embtools.errors.CorruptStoreError` naming the file and what is wrong.

Examples
--------
>>> import tempfile, numpy as np, embtools as et
>>> store = et.EmbeddingStore(tempfile.mkdtemp() + "/s", backend="numpy")
>>> _ = store.add(np.eye(3, dtype=np.float32), text_ids=["a", "b", "c"])
>>> report = store.verify()
>>> report.ok, report.files_checked, report.damaged
(True, 1, [])
>>> check_path(store.path, "../other.store/data/x.parquet")
Traceback (most recent call last):
...
embtools.errors.CorruptStoreError: ...: not a data file path (data/<32 hex digits>.parquet)
"""

from __future__ import annotations

import os
import stat
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from embtools.errors import CorruptStoreError
from embtools.storage.footer import ChunkInfo, Footer, FooterError, decode_footer, parse_footer
from embtools.storage.manifest import DATA_FILE
from embtools.storage.thrift import (
    PAGE_DATA,
    PAGE_DATA_V2,
    PAGE_DICTIONARY,
    ThriftError,
    parse_page_header,
)

__all__ = [
    "DATA_FILE",
    "CheckedFile",
    "VerifyReport",
    "check_file",
    "check_path",
    "crc32",
    "file_checksums",
    "verify_store",
]


_STEP = 4 * 1024**2
_HEADER_WINDOW = 64 * 1024
_CACHE_FILES = 4096


def _crc_function() -> Callable[..., int]:
    try:
        from zlib_ng import zlib_ng  # about 7x zlib's speed (SIMD)

        return zlib_ng.crc32  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib is the fallback
        return zlib.crc32


crc32: Callable[..., int] = _crc_function()
"""CRC-32 (zlib's polynomial, as Parquet uses) of a bytes-like object: zlib-ng's, else zlib's."""


def check_path(root: str, rel: Any) -> str:
    """The absolute path of manifest entry ``rel``; CorruptStoreError unless it is a data file path."""
    if not isinstance(rel, str) or not DATA_FILE.match(rel):
        raise CorruptStoreError(
            f"{root}: manifest entry {rel!r}: not a data file path (data/<32 hex digits>.parquet)")
    return os.path.join(root, rel)


@dataclass
class _State:
    footer: Footer
    checked: set[tuple[int, int]] = field(default_factory=set)


_cache: OrderedDict[tuple[Any, ...], _State] = OrderedDict()
_lock = threading.Lock()


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptStoreError(f"{path}: listed by the manifest but missing (vacuumed?)") from None
    except OSError as exc:
        raise CorruptStoreError(f"{path}: cannot stat ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStoreError(f"{path}: not a regular file (symlink, folder, FIFO or device)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CorruptStoreError(f"{path}: cannot open ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptStoreError(f"{path}: not a regular file")
    return fd, st


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise FooterError(f"short read at byte {offset}")
    return data


def file_checksums(path: str | os.PathLike[str]) -> tuple[int, list[int]]:
    """``(footer_crc, chunk_crcs)`` of a data file, as a manifest records them: the CRC-32 of the
    footer with its length and magic, and of each column chunk (page headers included), in row
    group then column order."""
    with open(path, "rb") as fh:
        raw = fh.read()
    footer = parse_footer(raw)
    with memoryview(raw) as mv:
        chunks = [crc32(mv[c.start:c.start + c.length])
                  for _, cs in footer.row_groups for c in cs]
        return crc32(mv[footer.data_end:]), chunks


class CheckedFile:
    """An open data file whose path and footer were checked against its manifest entry.

    ``entry`` is a :class:`~embtools.storage.manifest.FileEntry`. ``check(columns, row_groups)``
    CRC-checks the pages of those column chunks (default: all) unless this process already did;
    ``full=True`` checks them again.
    """

    def __init__(self, root: str, entry: Any) -> None:
        self.path = check_path(root, entry.path)
        self.entry = entry
        fd, st = _open_regular(self.path)
        self._fd: int | None = fd
        try:
            self.key = (self.path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with _lock:
                state = _cache.get(self.key)
                if state is not None:
                    _cache.move_to_end(self.key)
            if state is None:
                state = _State(self._read_footer(st.st_size))
                with _lock:
                    _cache[self.key] = state
                    while len(_cache) > _CACHE_FILES:
                        _cache.popitem(last=False)
            self._state = state
            self._match_entry(state.footer)  # every time: the cache is per file, not per entry
        except BaseException:
            self.close()
            raise

    @property
    def footer(self) -> Footer:
        return self._state.footer

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.path}: {what}")

    def _read_footer(self, size: int) -> Footer:
        entry = self.entry
        if size != entry.bytes:
            raise self._corrupt(f"{size} bytes, the manifest says {entry.bytes}")
        assert self._fd is not None
        try:
            if size < 12:
                raise FooterError("too short for Parquet")
            n = int.from_bytes(_pread(self._fd, 4, size - 8), "little")
            if n > size - 12:
                raise FooterError("bad Parquet magic or footer length")
            tail = _pread(self._fd, n + 8, size - 8 - n)
            if entry.footer_crc is not None and crc32(tail) != entry.footer_crc:
                raise FooterError("footer CRC-32 mismatch (the footer is damaged)")
            if _pread(self._fd, 4, 0) != b"PAR1" or tail[-4:] != b"PAR1":
                raise FooterError("bad Parquet magic")
            footer = decode_footer(tail[:-8], size)
        except FooterError as exc:
            raise self._corrupt(f"bad footer: {exc}") from None
        except OSError as exc:
            raise self._corrupt(f"cannot read ({exc.strerror})") from None
        return footer

    def _match_entry(self, footer: Footer) -> None:
        entry = self.entry
        sizes = [len(chunks) for _, chunks in footer.row_groups]
        self._first_chunk = [sum(sizes[:g]) for g in range(len(sizes))]
        if entry.chunk_crcs is not None and len(entry.chunk_crcs) != sum(sizes):
            raise self._corrupt(f"{sum(sizes)} column chunks, the manifest has "
                                f"{len(entry.chunk_crcs)} checksums")
        if footer.size != entry.bytes:
            raise self._corrupt(f"{footer.size} bytes, the manifest says {entry.bytes}")
        if footer.num_rows != entry.num_rows:
            raise self._corrupt(f"{footer.num_rows} rows, the manifest says {entry.num_rows}")
        if [rows for rows, _ in footer.row_groups] != list(entry.row_groups):
            raise self._corrupt("row groups do not match the manifest")
        self._check_row_ids(footer)

    def _check_row_ids(self, footer: Footer) -> None:
        lo = hi = None
        for _, chunks in footer.row_groups:
            for c in chunks:
                if c.path == ("row_id",) and c.physical_type == 2 and c.stats_min and c.stats_max:
                    a = int.from_bytes(c.stats_min, "little", signed=True)
                    b = int.from_bytes(c.stats_max, "little", signed=True)
                    lo = a if lo is None else min(lo, a)
                    hi = b if hi is None else max(hi, b)
        if lo is not None and (lo, hi) != (self.entry.row_id_min, self.entry.row_id_max):
            raise self._corrupt(
                f"row ids {lo}..{hi}, the manifest says {self.entry.row_id_min}..{self.entry.row_id_max}")

    def check(self, columns: Iterable[str] | None = None, row_groups: Iterable[int] | None = None,
              *, full: bool = False) -> None:
        """CRC-check the pages of the chunks of ``columns`` (top-level names) in ``row_groups``."""
        wanted = None if columns is None else set(columns)
        groups = self.footer.row_groups
        crcs = self.entry.chunk_crcs
        for g in range(len(groups)) if row_groups is None else row_groups:
            for j, chunk in enumerate(groups[g][1]):
                if wanted is not None and chunk.name not in wanted:
                    continue
                if not full and (g, j) in self._state.checked:
                    continue
                expected = None if crcs is None else crcs[self._first_chunk[g] + j]
                self._check_chunk(chunk, f"row group {g} column {'.'.join(chunk.path)}", expected)
                with _lock:
                    self._state.checked.add((g, j))

    def _crc_range(self, buf: bytearray, lo: int, hi: int) -> int:
        """CRC-32 of file bytes ``[lo, hi)``, read in steps into ``buf``."""
        assert self._fd is not None
        crc = 0
        while lo < hi:
            n = min(len(buf), hi - lo)
            view = memoryview(buf)[:n]
            if os.preadv(self._fd, [view], lo) != n:
                raise FooterError(f"short read at byte {lo}")
            crc = crc32(view, crc)
            lo += n
        return crc

    def _check_chunk(self, chunk: ChunkInfo, where: str, expected: int | None) -> None:
        """Check one chunk: its CRC-32 as the manifest records it (headers included) when it does,
        else each page's CRC-32; and the page headers against the footer."""
        assert self._fd is not None
        fd = self._fd
        pos, end = chunk.start, chunk.start + chunk.length
        values = 0
        first = True
        buf = bytearray(min(_STEP, max(chunk.length, 1)))
        try:
            if expected is not None and self._crc_range(buf, pos, end) != expected:
                raise FooterError("CRC-32 mismatch (damaged values or page headers)")
            while pos < end:
                raw = os.pread(fd, min(_HEADER_WINDOW, end - pos), pos)
                try:
                    h = parse_page_header(raw)
                except ThriftError:
                    h = parse_page_header(os.pread(fd, min(16 * 1024**2, end - pos), pos))
                body, body_end = pos + h.header_size, pos + h.header_size + h.compressed_page_size
                if body_end > end:
                    raise FooterError(f"page at byte {pos} runs past its chunk")
                if h.crc is None:
                    raise FooterError(f"page at byte {pos} has no CRC-32")
                if expected is None and self._crc_range(buf, body, body_end) != h.crc & 0xFFFFFFFF:
                    raise FooterError(f"page at byte {pos}: CRC-32 mismatch (damaged values)")
                if h.type == PAGE_DICTIONARY:
                    if not (first and chunk.has_dictionary):
                        raise FooterError(f"unexpected dictionary page at byte {pos}")
                elif h.type == PAGE_DATA and h.data_page_header is not None:
                    v1 = h.data_page_header
                    self._encodings(chunk, pos, v1.encoding, v1.definition_level_encoding,
                                    v1.repetition_level_encoding)
                    values += v1.num_values
                elif h.type == PAGE_DATA_V2 and h.data_page_header_v2 is not None:
                    v2 = h.data_page_header_v2
                    self._encodings(chunk, pos, v2.encoding)
                    if v2.num_nulls > v2.num_values or (
                            v2.repetition_levels_byte_length + v2.definition_levels_byte_length
                            > h.compressed_page_size):
                        raise FooterError(f"page at byte {pos}: counts or level lengths do not fit")
                    values += v2.num_values
                else:
                    raise FooterError(f"page at byte {pos} has type {h.type}")
                first = False
                pos = body_end
        except ThriftError as exc:
            raise self._corrupt(f"{where}: bad page header ({exc})") from None
        except FooterError as exc:
            raise self._corrupt(f"{where}: {exc}") from None
        except OSError as exc:
            raise self._corrupt(f"{where}: cannot read ({exc.strerror})") from None
        if values != chunk.num_values:
            raise self._corrupt(f"{where}: pages hold {values} values, the footer says {chunk.num_values}")

    @staticmethod
    def _encodings(chunk: ChunkInfo, pos: int, *used: int) -> None:
        if not set(used) <= chunk.encodings:
            raise FooterError(f"page at byte {pos} uses encoding(s) {sorted(set(used) - chunk.encodings)} "
                              "that the footer does not list")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_file(root: str, entry: Any, columns: Iterable[str] | None = None, *,
               full: bool = False) -> Footer:
    """Check one data file's path and footer, and the pages of ``columns`` (default: all)."""
    with CheckedFile(root, entry) as f:
        f.check(columns, full=full)
        return f.footer


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: files checked, and ``(path, reason)`` of each damaged one."""

    version: int
    files_checked: int
    damaged: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_store(root: str, manifest: Any) -> VerifyReport:
    """Check every page of every file of ``manifest`` (ignoring the per-process cache)."""
    damaged: list[tuple[str, str]] = []
    files: Sequence[Any] = manifest.files
    for entry in files:
        try:
            check_file(root, entry, full=True)
        except CorruptStoreError as exc:
            damaged.append((os.path.join(root, str(entry.path)), str(exc)))
    return VerifyReport(manifest.version, len(files), damaged)
