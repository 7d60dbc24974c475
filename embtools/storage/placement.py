"""Page placement: copy a Parquet file so that chosen columns' values start at 64-byte offsets.

pyarrow decides where pages go; it cannot align them. :func:`aligned_copy` copies a file pyarrow
wrote, and in each data page of the chosen columns appends a padding field to the page header
(field id :data:`~embtools.storage.thrift.PAD_FIELD_ID`, a binary that Parquet readers skip as an
unknown field, the Thrift rule) just long enough that the page's values start at a multiple of
:data:`ALIGNMENT` in the file. The footer is copied with every file offset and chunk size moved by
the padding before it (:func:`~embtools.storage.thrift.rewrite_ints`); page bodies, their CRC-32s
(which cover the body only) and every other byte are unchanged, so the file stays standard Parquet.
A memory map of the file starts at a page boundary, so the values are 64-byte aligned in memory
too: NumPy views of them are aligned and BLAS uses them in place.

Only data pages v2 are placed (what :func:`~embtools.storage.datafile.write_data_file` writes:
their level bytes are counted in the header); page indexes must be off (their offsets would move).

Examples
--------
>>> import io, os, tempfile, numpy as np, pyarrow as pa, pyarrow.parquet as pq
>>> t = pa.table({"id": ["a", "bb", "ccc"], "v": pa.array([b"xy", b"zw", b"uv"], pa.binary(2))})
>>> src, dst = tempfile.TemporaryFile(), tempfile.TemporaryFile()
>>> pq.write_table(t, src, data_page_version="2.0", use_dictionary=["id"], compression="none")
>>> src.flush()
>>> size = aligned_copy(src.fileno(), os.fstat(src.fileno()).st_size, dst.fileno(), {"v"})
>>> raw = os.pread(dst.fileno(), size, 0)
>>> from embtools.storage.footer import parse_footer
>>> [value_offsets(raw, c)[0] % ALIGNMENT for c in parse_footer(raw).row_groups[0][1] if c.name == "v"]
[0]
>>> pq.read_table(io.BytesIO(raw)).equals(t)
True
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterable

from embtools.storage.footer import ChunkInfo, Footer, FooterError, decode_footer
from embtools.storage.thrift import (
    PAD_MIN,
    PAGE_DATA_V2,
    ThriftError,
    pad_field,
    parse_page_header,
    rewrite_ints,
)

__all__ = ["ALIGNMENT", "PlacementError", "aligned_copy", "copy_range", "value_offsets"]

ALIGNMENT = 64
"""Byte alignment of the values of placed pages (a cache line; AVX-512 loads)."""

_HEADER_WINDOW = 64 * 1024
_COPY_STEP = 8 * 1024**2
#: :func:`aligned_copy` writes in steps of this many bytes at offsets that are multiples of it (the
#: size of a PMD-mapped huge page on x86-64 and arm64)
WRITE_STEP = 2 * 1024**2

Buffer = bytes | bytearray | memoryview


class PlacementError(ValueError):
    """A file that :func:`aligned_copy` cannot place (not a file our writer produced)."""


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise PlacementError(f"short read at byte {offset}")
    return data


def copy_range(src_fd: int, dst_fd: int, offset: int, n: int) -> None:
    """Copy ``n`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``'s current position
    (``os.copy_file_range`` where the system has it: no copy through user memory)."""
    end = offset + n
    fast = hasattr(os, "copy_file_range")
    while offset < end:
        if fast:
            try:
                done = os.copy_file_range(src_fd, dst_fd, min(end - offset, 1 << 30), offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                     errno.EPERM):
                    raise
                fast = False
                continue
            if done == 0:
                raise PlacementError(f"short read at byte {offset}")
        else:
            block = _pread(src_fd, min(end - offset, _COPY_STEP), offset)
            view = memoryview(block)
            while view:
                view = view[os.write(dst_fd, view):]
            done = len(block)
        offset += done


def _page_inserts(fd: int, chunk: ChunkInfo, shift: int) -> list[tuple[int, int]]:
    """``(stop byte of a page header, padding)`` for each data page of ``chunk``, so that each
    page's values start at a multiple of ALIGNMENT once ``shift`` bytes (and the padding of the
    pages before) are inserted before the chunk."""
    out: list[tuple[int, int]] = []
    pos, end = chunk.start, chunk.start + chunk.length
    while pos < end:
        raw = _pread(fd, min(_HEADER_WINDOW, end - pos), pos)
        h = parse_page_header(raw)
        v2 = h.data_page_header_v2
        if h.type != PAGE_DATA_V2 or v2 is None or raw[h.header_size - 1] != 0:
            raise PlacementError(f"column {chunk.name!r}: page at byte {pos} is not a data page v2")
        values = pos + h.header_size + v2.repetition_levels_byte_length \
            + v2.definition_levels_byte_length
        pad = -(values + shift) % ALIGNMENT
        if pad:
            pad += ALIGNMENT if pad < PAD_MIN else 0
            out.append((pos + h.header_size - 1, pad))
            shift += pad
        pos += h.header_size + h.compressed_page_size
    return out


def _read_footer(fd: int, size: int) -> tuple[bytes, Footer]:
    if size < 12:
        raise PlacementError("too short for Parquet")
    n = int.from_bytes(_pread(fd, 4, size - 8), "little")
    if n > size - 12:
        raise PlacementError("bad footer length")
    raw = _pread(fd, n, size - 8 - n)
    return raw, decode_footer(raw, size)


def aligned_copy(src_fd: int, size: int, dst_fd: int, columns: Iterable[str]) -> int:
    """Copy the Parquet file ``src_fd`` (``size`` bytes) to ``dst_fd`` (from its current
    position) with the data page values of ``columns`` (top-level names) at multiples of
    :data:`ALIGNMENT`; return the bytes written. Raises :class:`PlacementError` on a file our
    writer would not produce (dictionary pages or v1 pages in those columns, page indexes)."""
    wanted = set(columns)
    try:
        footer_raw, footer = _read_footer(src_fd, size)
        inserts: list[tuple[int, int]] = []
        placed = [c for _, chunks in footer.row_groups for c in chunks if c.name in wanted and c.length]
        for c in sorted(placed, key=lambda c: c.start):
            inserts += _page_inserts(src_fd, c, sum(p for _, p in inserts))
    except (FooterError, ThriftError) as exc:
        raise PlacementError(str(exc)) from None
    positions = [p for p, _ in inserts]
    before = [0]
    for _, pad in inserts:
        before.append(before[-1] + pad)

    def shift(x: int) -> int:
        """Where byte ``x`` of the source lands (pads are inserted before header STOP bytes)."""
        return x + before[bisect.bisect_left(positions, x)]

    def grown(start: int, length: int) -> int:
        return shift(start + length) - shift(start) - length

    groups = footer.row_groups

    def move(path: tuple[int, ...], v: int) -> int:
        if len(path) == 6 and path[0] == 4 and path[2] == 1 and path[4] == 3:  # ColumnMetaData
            c = groups[path[1]][1][path[3]]
            if path[5] in (9, 10, 11, 14):  # data, index, dictionary page; bloom filter
                return shift(v) if v > 0 else v
            if path[5] in (6, 7):  # total uncompressed / compressed size (headers included)
                return v + grown(c.start, c.length)
        elif len(path) == 5 and path[0] == 4 and path[2] == 1:  # ColumnChunk
            if path[4] == 2:
                return shift(v) if v > 0 else v
            if path[4] in (4, 6) and v:
                raise PlacementError("page indexes are not supported")
        elif len(path) == 3 and path[0] == 4:  # RowGroup
            if path[2] == 5:
                return shift(v) if v > 0 else v
            if path[2] in (2, 6):
                return v + sum(grown(c.start, c.length) for c in groups[path[1]][1])
        return v

    try:
        new_footer, used = rewrite_ints(footer_raw, move)
    except ThriftError as exc:
        raise PlacementError(f"footer: {exc}") from None
    if used != len(footer_raw):
        raise PlacementError("bytes after the footer struct")
    out = _StepWriter(dst_fd)
    prev = 0
    for pos, pad in inserts:
        out.copy(src_fd, prev, pos - prev)
        out.write(pad_field(pad))
        prev = pos
    out.copy(src_fd, prev, footer.data_end - prev)
    out.write(new_footer + len(new_footer).to_bytes(4, "little") + b"PAR1")
    out.flush()
    return size + before[-1] + len(new_footer) - len(footer_raw)


class _StepWriter:
    """Writes a file in steps of WRITE_STEP bytes that start at multiples of WRITE_STEP (the
    last one shorter), through one buffer: the page cache then holds the file in 2 MiB folios,
    which a reader's memory map maps 2 MiB at a time (``copy_file_range`` and small writes
    leave 4 KiB pages, and a scan of mapped vectors runs about 20% slower on them, bound by
    TLB misses)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray(WRITE_STEP)
        self.fill = 0
        self.room = WRITE_STEP - os.lseek(fd, 0, os.SEEK_CUR) % WRITE_STEP  # up to a boundary

    def write(self, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self.room - self.fill)
            self.buf[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.room:
                self.flush()

    def copy(self, src_fd: int, offset: int, n: int) -> None:
        """Copy ``n`` bytes of ``src_fd`` from ``offset`` (read straight into the buffer)."""
        end = offset + n
        while offset < end:
            k = min(end - offset, self.room - self.fill)
            got = os.preadv(src_fd, [memoryview(self.buf)[self.fill:self.fill + k]], offset)
            if got <= 0:
                raise PlacementError(f"short read at byte {offset}")
            self.fill += got
            offset += got
            if self.fill == self.room:
                self.flush()

    def flush(self) -> None:
        _write_all(self.fd, memoryview(self.buf)[:self.fill])
        self.fill = 0
        self.room = WRITE_STEP


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def value_offsets(buf: Buffer, chunk: ChunkInfo) -> list[int]:
    """File offsets where the values of each data page v2 of ``chunk`` start (``buf``: the file)."""
    out = []
    pos, end = chunk.start, chunk.start + chunk.length
    while pos < end:
        h = parse_page_header(buf[pos:min(end, pos + _HEADER_WINDOW)])
        v2 = h.data_page_header_v2
        assert v2 is not None
        out.append(pos + h.header_size + v2.repetition_levels_byte_length
                   + v2.definition_levels_byte_length)
        pos += h.header_size + h.compressed_page_size
    return out
