"""The footer of a data file, decoded and checked by embtools before pyarrow or polars read it.

pyarrow trusts the footer: a flipped codec aborts the process (a C++ exception escapes), and
flipped offsets or counts make it read the wrong bytes. :func:`parse_footer` decodes the Thrift
``FileMetaData`` itself (:func:`~embtools.storage.thrift.decode_struct`) and checks that it is
consistent: known physical types, codecs and encodings, every column chunk inside the data region
and none overlapping, row counts that add up, a column chunk for every schema leaf in every row
group, no references to other files. Anything else raises :class:`FooterError` (a ``ValueError``)
saying what; callers name the file in a :class:`~embtools.errors.CorruptStoreError`.

Examples
--------
>>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq, io
>>> buf = io.BytesIO()
>>> pq.write_table(pa.table({"x": np.arange(5)}), buf)
>>> f = parse_footer(buf.getvalue())
>>> f.num_rows, [rows for rows, _ in f.row_groups], f.row_groups[0][1][0].name
(5, [5], 'x')
>>> parse_footer(buf.getvalue()[:-20])
Traceback (most recent call last):
...
embtools.storage.footer.FooterError: bad Parquet magic or footer length
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from embtools.storage.thrift import ThriftError, decode_struct

__all__ = ["CODECS", "ChunkInfo", "Footer", "FooterError", "decode_footer", "footer_span", "parse_footer"]

Buffer = bytes | bytearray | memoryview | mmap.mmap

CODECS = {0: "UNCOMPRESSED", 1: "SNAPPY", 2: "GZIP", 4: "BROTLI", 5: "LZ4", 6: "ZSTD", 7: "LZ4_RAW"}
"""Parquet codecs pyarrow decodes, by id (LZO, 3, it does not)."""
_MAX_ENCODING = 9
_MAX_TYPE = 7
_MAX_FOOTER = 256 * 1024**2


class FooterError(ValueError):
    """A footer that is malformed or contradicts itself."""


@dataclass(frozen=True)
class ChunkInfo:
    """One column chunk: where its pages lie and what the footer says about them."""

    name: str
    path: tuple[str, ...]
    physical_type: int
    codec: int
    encodings: frozenset[int]
    num_values: int
    start: int
    length: int
    data_page_offset: int
    has_dictionary: bool
    stats_min: bytes | None = None
    stats_max: bytes | None = None


@dataclass(frozen=True)
class Footer:
    """A checked footer: rows, row groups ``(rows, chunks)``, where the data region ends."""

    num_rows: int
    row_groups: tuple[tuple[int, tuple[ChunkInfo, ...]], ...]
    data_end: int
    size: int
    columns: tuple[str, ...]


def footer_span(buf: Buffer) -> tuple[int, int]:
    """``(data_end, size)``: the footer with its length and magic is ``buf[data_end:size]``."""
    size = len(buf)
    if size < 12 or buf[:4] != b"PAR1" or buf[size - 4:size] != b"PAR1":
        raise FooterError("bad Parquet magic or footer length")
    footer_len = int.from_bytes(buf[size - 8:size - 4], "little")
    if footer_len > size - 12 or footer_len > _MAX_FOOTER:
        raise FooterError("bad Parquet magic or footer length")
    return size - 8 - footer_len, size


def _int(d: dict[int, object], fid: int, what: str, lo: int = 0, default: int | None = None) -> int:
    v = d.get(fid, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FooterError(f"{what} is missing or not an integer")
    if v < lo:
        raise FooterError(f"{what} is {v}")
    return v


def _text(v: object, what: str) -> str:
    if not isinstance(v, bytes):
        raise FooterError(f"{what} is not a string")
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise FooterError(f"{what} is not UTF-8") from None


def _leaves(schema: object) -> list[tuple[str, ...]]:
    """Leaf column paths of the flattened schema tree (element 0 is the root)."""
    if not isinstance(schema, list) or not schema or not all(isinstance(e, dict) for e in schema):
        raise FooterError("schema is missing or malformed")
    leaves: list[tuple[str, ...]] = []
    pos = 1

    def walk(prefix: tuple[str, ...], children: int, depth: int) -> None:
        nonlocal pos
        if depth > 32:
            raise FooterError("schema nested too deep")
        for _ in range(children):
            if pos >= len(schema):
                raise FooterError("schema has fewer elements than its children counts")
            e = schema[pos]
            pos += 1
            name = _text(e.get(4), "schema element name")
            n = _int(e, 5, f"children of {name!r}", default=0)
            if n:
                walk((*prefix, name), n, depth + 1)
            else:
                t = _int(e, 1, f"type of {name!r}")
                if t > _MAX_TYPE:
                    raise FooterError(f"column {name!r} has unknown type {t}")
                leaves.append((*prefix, name))

    walk((), _int(schema[0], 5, "root children count", default=0), 0)
    if pos != len(schema):
        raise FooterError("schema has more elements than its children counts")
    return leaves


def _chunk(cc: object, leaf: tuple[str, ...], data_end: int, where: str) -> ChunkInfo:
    if not isinstance(cc, dict) or not isinstance(cc.get(3), dict):
        raise FooterError(f"{where}: no column metadata")
    if cc.get(1) is not None:
        raise FooterError(f"{where}: refers to another file")
    md = cc[3]
    assert isinstance(md, dict)
    path = md.get(3)
    if not isinstance(path, list) or tuple(_text(p, "column path") for p in path) != leaf:
        raise FooterError(f"{where}: column path does not match the schema")
    ptype = _int(md, 1, f"{where}: type")
    codec = _int(md, 4, f"{where}: codec")
    if codec not in CODECS or ptype > _MAX_TYPE:
        raise FooterError(f"{where}: unknown codec {codec} or type {ptype}")
    encs = md.get(2)
    if not isinstance(encs, list) or not all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e <= _MAX_ENCODING for e in encs):
        raise FooterError(f"{where}: unknown encodings {encs!r}")
    num_values = _int(md, 5, f"{where}: num_values")
    length = _int(md, 7, f"{where}: total_compressed_size")
    _int(md, 6, f"{where}: total_uncompressed_size")
    data_off = _int(md, 9, f"{where}: data_page_offset")
    dict_off = md.get(11)
    has_dict = isinstance(dict_off, int) and not isinstance(dict_off, bool) and dict_off > 0
    start = data_off
    if has_dict:
        assert isinstance(dict_off, int)
        # an empty chunk (an empty table's row group) has only a dictionary page, at data offset 0
        if dict_off < 4 or not (dict_off < data_off or data_off == 0 == num_values):
            raise FooterError(f"{where}: dictionary page offset {dict_off} not before the data pages")
        start = dict_off
    elif data_off < 4 and (data_off, length, num_values) != (0, 0, 0):  # 0, 0, 0: no pages at all
        raise FooterError(f"{where}: data_page_offset is {data_off}")
    if start + length > data_end or (data_off and length and data_off >= start + length):
        raise FooterError(f"{where}: chunk [{start}, {start + length}) outside the data [4, {data_end})")
    stats = md.get(12)
    lo = hi = None
    if isinstance(stats, dict):
        lo_v, hi_v = stats.get(6), stats.get(5)
        lo = lo_v if isinstance(lo_v, bytes) else None
        hi = hi_v if isinstance(hi_v, bytes) else None
    return ChunkInfo(leaf[0], leaf, ptype, codec, frozenset(encs), num_values, start, length,
                     data_off, has_dict, lo, hi)


def parse_footer(buf: Buffer) -> Footer:
    """Decode and check the footer of the Parquet file ``buf`` (the whole file, e.g. an mmap)."""
    data_end, size = footer_span(buf)
    with memoryview(buf) as mv:
        return decode_footer(mv[data_end:size - 8], size)


def decode_footer(raw: bytes | memoryview, size: int) -> Footer:
    """Decode and check ``raw``, the Thrift footer of a file of ``size`` bytes (it ends 8 bytes
    before the end of the file)."""
    data_end = size - 8 - len(raw)
    try:
        meta, _ = decode_struct(raw)
    except ThriftError as exc:
        raise FooterError(f"footer does not decode ({exc})") from None
    leaves = _leaves(meta.get(2))
    num_rows = _int(meta, 3, "num_rows")
    groups_raw = meta.get(4, [])
    if not isinstance(groups_raw, list):
        raise FooterError("row groups are malformed")
    groups: list[tuple[int, tuple[ChunkInfo, ...]]] = []
    spans: list[tuple[int, int]] = []
    for g, rg in enumerate(groups_raw):
        if not isinstance(rg, dict) or not isinstance(rg.get(1), list):
            raise FooterError(f"row group {g} is malformed")
        rows = _int(rg, 3, f"row group {g} num_rows")
        ccs = rg[1]
        assert isinstance(ccs, list)
        if len(ccs) != len(leaves):
            raise FooterError(f"row group {g} has {len(ccs)} column chunks for {len(leaves)} columns")
        chunks = tuple(_chunk(cc, leaf, data_end, f"row group {g} column {'.'.join(leaf)}")
                       for cc, leaf in zip(ccs, leaves, strict=True))
        spans.extend((c.start, c.start + c.length) for c in chunks)
        groups.append((rows, chunks))
    if sum(rows for rows, _ in groups) != num_rows:
        raise FooterError(f"row groups hold {sum(r for r, _ in groups)} rows, footer says {num_rows}")
    spans.sort()
    for k in range(1, len(spans)):
        if spans[k][0] < spans[k - 1][1]:
            raise FooterError("column chunks overlap")
    return Footer(num_rows, tuple(groups), data_end, size, tuple(dict.fromkeys(p[0] for p in leaves)))
