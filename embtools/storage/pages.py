"""Locating the raw values of a PLAIN, uncompressed Parquet column chunk of fixed-width values.

:func:`plain_value_spans` walks the page headers of one column chunk of a required
``fixed_size_list<float32 not null>`` column (or of a ``fixed_size_binary`` column without nulls)
and returns where each data page's values lie in the file. It returns ``None`` when the chunk is valid Parquet but not the plain layout (dictionary or
index pages, another encoding), and raises :class:`LayoutError` when the chunk contradicts itself
(sizes that do not add up, a header that does not parse, counts that disagree with the footer,
definition levels that are not all 1). Repetition levels are not read: rows are cut every ``dim``
values, as the fixed-size type says.

Handled: max repetition and definition levels (1, 1) (a required list of required floats; rows
are ``dim`` values), (0, 0) (a required fixed-size binary) and (0, 1) (a nullable one without
nulls; rows are one value); the value bytes of a page are exactly ``value_bytes`` x num_values:

- data page v1: ``[4-byte len][rep levels][4-byte len][def levels][values]`` (a level block only
  where its max level is above 0)
- data page v2: ``[rep levels][def levels][values]`` with the level lengths in the header.

Examples
--------
>>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq, io
>>> x = np.arange(6, dtype=np.float32)
>>> typ = pa.list_(pa.field("element", pa.float32(), nullable=False), 3)
>>> col = pa.FixedSizeListArray.from_arrays(pa.array(x), type=typ)
>>> schema = pa.schema([pa.field("e", typ, nullable=False)])
>>> buf = io.BytesIO()
>>> pq.write_table(pa.table({"e": col}, schema=schema), buf, compression="none",
...                use_dictionary=False)
>>> raw = buf.getvalue()
>>> cc = pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0).column(0)
>>> (off, n), = plain_value_spans(raw, cc.data_page_offset, cc.total_compressed_size,
...                               rows=2, dim=3, max_rep=1, max_def=1)
>>> np.frombuffer(raw, np.float32, n, off).tolist()
[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
"""

from __future__ import annotations

import mmap

import numpy as np

from embtools.storage.thrift import (
    ENCODING_PLAIN,
    PAGE_DATA,
    PAGE_DATA_V2,
    PAGE_DICTIONARY,
    PAGE_INDEX,
    PageHeader,
    ThriftError,
    parse_page_header,
)
from embtools.storage.verify import crc32

__all__ = ["ENCODING_IDS", "LayoutError", "plain_value_spans"]

FLOAT_BYTES = 4
RLE = 3
_LEVELS = ((1, 1), (0, 0), (0, 1))
ENCODING_IDS = {
    "PLAIN": 0, "PLAIN_DICTIONARY": 2, "RLE": 3, "BIT_PACKED": 4, "DELTA_BINARY_PACKED": 5,
    "DELTA_LENGTH_BYTE_ARRAY": 6, "DELTA_BYTE_ARRAY": 7, "RLE_DICTIONARY": 8,
    "BYTE_STREAM_SPLIT": 9,
}
"""Parquet ``Encoding`` ids by the names pyarrow's metadata reports."""
_HEADER_WINDOW = 64 * 1024
_MAX_HEADER = 16 * 1024 * 1024

Buffer = bytes | bytearray | memoryview | mmap.mmap


class LayoutError(ValueError):
    """A column chunk whose pages contradict themselves or the footer."""


def _read_header(buf: Buffer, pos: int, end: int) -> PageHeader:
    window = min(end, pos + _HEADER_WINDOW)
    while True:
        try:
            return parse_page_header(buf[pos:window])
        except ThriftError as exc:
            if window >= min(end, pos + _MAX_HEADER):
                raise LayoutError(f"page header at byte {pos}: {exc}") from exc
            window = min(end, pos + _MAX_HEADER)


def _level_block(buf: Buffer, p: int, body_end: int, what: str) -> tuple[int, int]:
    """A v1 ``[4-byte length][levels]`` block at ``p``: ``(levels_start, levels_end)``."""
    if p + 4 > body_end:
        raise LayoutError(f"{what} length runs past the page")
    n = int.from_bytes(buf[p:p + 4], "little")
    if p + 4 + n > body_end:
        raise LayoutError(f"{what} ({n} bytes) run past the page")
    return p + 4, p + 4 + n


def _varint(buf: Buffer, p: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if p >= end:
            raise LayoutError("level run header runs past the level bytes")
        b = buf[p]
        p += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, p
    raise LayoutError("level run header longer than 10 bytes")


def _check_all_ones(buf: Buffer, p: int, end: int, n: int) -> None:
    """Check that the 1-bit RLE/bit-packed hybrid levels in ``buf[p:end]`` are ``n`` ones.

    Definition levels of a required list of required floats are all 1; anything else means the
    level or length fields are damaged. Writers use one RLE run here, so this is cheap.
    """
    seen = 0
    while p < end:
        head, p = _varint(buf, p, end)
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values, one byte each at width 1
            nbytes = head >> 1
            if p + nbytes > end:
                raise LayoutError("bit-packed levels run past the level bytes")
            want = min(n - seen, nbytes * 8)
            if want > 0:
                bits = np.unpackbits(np.frombuffer(buf[p:p + nbytes], np.uint8), bitorder="little")
                if not bits[:want].all():
                    raise LayoutError("definition levels are not all 1 (nulls or damage)")
            seen += nbytes * 8
            p += nbytes
        else:  # RLE: (head >> 1) copies of one 1-byte value
            count = head >> 1
            if p >= end:
                raise LayoutError("RLE level value runs past the level bytes")
            if count and seen < n and buf[p] != 1:
                raise LayoutError("definition levels are not all 1 (nulls or damage)")
            seen += count
            p += 1
    if seen < n:
        raise LayoutError(f"{seen} definition levels for {n} values")


def _check_encodings(allowed: frozenset[int] | None, pos: int, *used: int) -> None:
    if allowed is not None and not set(used) <= allowed:
        raise LayoutError(
            f"page at byte {pos} uses encoding(s) {sorted(set(used) - allowed)} "
            f"that the footer does not list"
        )


def plain_value_spans(buf: Buffer, start: int, length: int, *, rows: int, dim: int,
                      max_rep: int, max_def: int,
                      verify_crc: bool = False,
                      encodings: frozenset[int] | None = None,
                      value_bytes: int = FLOAT_BYTES) -> list[tuple[int, int]] | None:
    """``[(byte_offset, n_values), ...]`` of the values of each data page of a chunk (``dim``
    values a row, ``value_bytes`` bytes each: 4 for floats, the width of a fixed-size binary).

    ``buf`` is the whole file (an ``mmap`` or bytes), the chunk is ``buf[start:start + length]``,
    which the caller has checked lies inside the file. Returns ``None`` if the chunk is not
    PLAIN-encoded data pages only; raises :class:`LayoutError` if it is inconsistent. With
    ``verify_crc``, pages that carry a CRC-32 (``write_page_checksum=True``) are checked against it.
    ``encodings`` (the footer's list for the chunk) makes any page encoding outside it an error.
    The caller only calls this for chunks whose footer declares no dictionary page and no codec,
    so a dictionary page, or sizes that differ, are damage.
    """
    if start < 0 or length < 0 or start + length > len(buf):
        raise LayoutError(f"chunk [{start}, {start + length}) lies outside the file")
    if (max_rep, max_def) not in _LEVELS or value_bytes < 1:
        return None
    end = start + length
    pos = start
    spans: list[tuple[int, int]] = []
    total = 0
    total_rows = 0
    while pos < end:
        h = _read_header(buf, pos, end)
        body = pos + h.header_size
        body_end = body + h.compressed_page_size
        if body_end > end:
            raise LayoutError(
                f"page at byte {pos} ({h.compressed_page_size} bytes) runs past its chunk's end {end}"
            )
        if verify_crc and h.crc is not None:
            with memoryview(buf) as mv:
                crc = crc32(mv[body:body_end])
            if crc != h.crc & 0xFFFFFFFF:
                raise LayoutError(f"page at byte {pos}: CRC-32 mismatch")
        if h.type == PAGE_INDEX:
            return None
        if h.type == PAGE_DICTIONARY:
            raise LayoutError(f"dictionary page at byte {pos} in a chunk declared without one")
        if h.type not in (PAGE_DATA, PAGE_DATA_V2):
            raise LayoutError(f"page at byte {pos} has unknown type {h.type}")
        if h.uncompressed_page_size != h.compressed_page_size:
            raise LayoutError(f"page at byte {pos}: sizes differ in an uncompressed chunk")
        if h.type == PAGE_DATA:
            v1 = h.data_page_header
            if v1 is None:
                raise LayoutError(f"data page at byte {pos} lacks its DataPageHeader")
            _check_encodings(encodings, pos, v1.encoding, v1.definition_level_encoding,
                             v1.repetition_level_encoding)
            if v1.encoding != ENCODING_PLAIN:
                return None
            if v1.definition_level_encoding != RLE or v1.repetition_level_encoding != RLE:
                return None  # deprecated BIT_PACKED levels have no length prefix
            n = v1.num_values
            p = body
            if max_rep:
                _, p = _level_block(buf, p, body_end, "repetition levels")
            if max_def:
                def_start, p = _level_block(buf, p, body_end, "definition levels")
                _check_all_ones(buf, def_start, p, n)
            if n % dim:
                raise LayoutError(f"data page at byte {pos}: {n} values is not a multiple of {dim}")
            page_rows = n // dim
        else:
            v2 = h.data_page_header_v2
            if v2 is None:
                raise LayoutError(f"data page at byte {pos} lacks its DataPageHeaderV2")
            _check_encodings(encodings, pos, v2.encoding)
            if v2.encoding != ENCODING_PLAIN:
                return None
            n = v2.num_values
            if v2.num_nulls:
                raise LayoutError(f"data page at byte {pos}: {v2.num_nulls} nulls in a required column")
            if n != v2.num_rows * dim:
                raise LayoutError(
                    f"data page at byte {pos}: {n} values for {v2.num_rows} rows of {dim}"
                )
            if (v2.repetition_levels_byte_length and not max_rep) or (
                    v2.definition_levels_byte_length and not max_def):
                raise LayoutError(f"data page at byte {pos}: levels in a column without them")
            def_start = body + v2.repetition_levels_byte_length
            p = def_start + v2.definition_levels_byte_length
            if p > body_end:
                raise LayoutError(f"data page at byte {pos}: levels run past the page")
            if max_def:
                _check_all_ones(buf, def_start, p, n)
            page_rows = v2.num_rows
        if body_end - p != n * value_bytes:
            raise LayoutError(
                f"data page at byte {pos}: {body_end - p} value bytes for {n} values of "
                f"{value_bytes} bytes"
            )
        spans.append((p, n))
        total += n
        total_rows += page_rows
        pos = body_end
    if total != rows * dim or total_rows != rows:
        raise LayoutError(f"chunk holds {total} values in {total_rows} rows, expected {rows} x {dim}")
    return spans
