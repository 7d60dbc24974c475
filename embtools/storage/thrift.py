"""Decoding of Parquet page headers and footers (Thrift compact protocol).

:func:`parse_page_header` decodes ``PageHeader`` and the headers nested in it; every other field is
skipped by its type, so headers written by newer writers still parse. :func:`decode_struct` decodes
any struct (the footer's ``FileMetaData``) into ``{field_id: value}`` dicts, lists, ints, floats and
bytes, for :mod:`embtools.storage.footer` to check before pyarrow sees it. The decoder never reads past the buffer it is
given, caps varints at 10 bytes and nesting at 32 levels, and raises :class:`ThriftError` (a
``ValueError``) on anything malformed; callers turn that into ``CorruptStoreError`` naming the file.

Examples
--------
>>> raw = bytes([0x15, 0x06, 0x15, 0x10, 0x15, 0x10, 0x00])   # DATA_PAGE_V2, sizes 8 and 8
>>> h = parse_page_header(raw)
>>> h.type == PAGE_DATA_V2, h.compressed_page_size, h.header_size
(True, 8, 7)
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ENCODING_PLAIN",
    "PAD_FIELD_ID",
    "PAGE_DATA",
    "PAGE_DATA_V2",
    "PAGE_DICTIONARY",
    "PAGE_INDEX",
    "DataPageHeader",
    "DataPageHeaderV2",
    "PageHeader",
    "ThriftError",
    "decode_struct",
    "pad_field",
    "parse_page_header",
    "rewrite_ints",
]

PAGE_DATA = 0
PAGE_INDEX = 1
PAGE_DICTIONARY = 2
PAGE_DATA_V2 = 3
ENCODING_PLAIN = 0

# Compact protocol type ids.
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)
_MAX_DEPTH = 32
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_INT_RANGE = {_I16: (-(2**15), 2**15 - 1), _I32: (_I32_MIN, _I32_MAX), _I64: (-(2**63), 2**63 - 1)}

PAD_FIELD_ID = 32_767
"""Field id of the padding that :func:`pad_field` appends to a page header (binary, unknown to every
Parquet reader, so skipped: the Thrift rule for fields a reader does not know)."""
PAD_MIN = 5
"""Fewest bytes :func:`pad_field` can add (a field header of 4 bytes and a 1-byte length)."""


class ThriftError(ValueError):
    """Malformed Thrift compact-protocol bytes."""


@dataclass(frozen=True)
class DataPageHeader:
    """``DataPageHeader`` (data page v1): levels are inline, each prefixed by a 4-byte length."""

    num_values: int
    encoding: int
    definition_level_encoding: int
    repetition_level_encoding: int


@dataclass(frozen=True)
class DataPageHeaderV2:
    """``DataPageHeaderV2``: level byte lengths are in the header, levels are never compressed."""

    num_values: int
    num_nulls: int
    num_rows: int
    encoding: int
    definition_levels_byte_length: int
    repetition_levels_byte_length: int
    is_compressed: bool = True


@dataclass(frozen=True)
class PageHeader:
    """``PageHeader`` plus ``header_size``, the number of bytes the header itself took."""

    type: int
    uncompressed_page_size: int
    compressed_page_size: int
    header_size: int
    crc: int | None = None
    data_page_header: DataPageHeader | None = None
    data_page_header_v2: DataPageHeaderV2 | None = None
    dictionary_num_values: int | None = None


class _Reader:
    """Cursor over a bytes-like buffer; all reads are bounds-checked."""

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ThriftError("unexpected end of header bytes")
        b = self.buf[self.pos]
        self.pos += 1
        return int(b)

    def varint(self) -> int:
        shift = 0
        value = 0
        for _ in range(10):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise ThriftError("varint longer than 10 bytes")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def i32(self) -> int:
        v = self.zigzag()
        if not _I32_MIN <= v <= _I32_MAX:
            raise ThriftError(f"i32 out of range: {v}")
        return v

    def skip_bytes(self, n: int) -> None:
        if n < 0 or n > self.end - self.pos:
            raise ThriftError(f"length {n} runs past the end of the header bytes")
        self.pos += n

    def field(self, last_id: int) -> tuple[int, int]:
        """Next field header: ``(type, field_id)``; type ``_STOP`` ends the struct."""
        b = self.byte()
        ftype = b & 0x0F
        if ftype == _STOP:
            return _STOP, 0
        delta = b >> 4
        fid = last_id + delta if delta else self.zigzag()
        return ftype, fid

    def skip(self, ftype: int, depth: int = 0) -> None:
        """Skip one value of compact type ``ftype``."""
        if depth > _MAX_DEPTH:
            raise ThriftError("nesting too deep")
        if ftype in (_TRUE, _FALSE):
            return
        if ftype == _BYTE:
            self.skip_bytes(1)
        elif ftype in (_I16, _I32, _I64):
            self.varint()
        elif ftype == _DOUBLE:
            self.skip_bytes(8)
        elif ftype == _BINARY:
            self.skip_bytes(self.varint())
        elif ftype in (_LIST, _SET):
            size, etype = self._list_header()
            for _ in range(size):
                self._skip_element(etype, depth + 1)
        elif ftype == _MAP:
            size = self.varint()
            if size:
                self._check_count(size)
                kv = self.byte()
                for _ in range(size):
                    self._skip_element(kv >> 4, depth + 1)
                    self._skip_element(kv & 0x0F, depth + 1)
        elif ftype == _STRUCT:
            last = 0
            while True:
                t, last = self.field(last)
                if t == _STOP:
                    return
                self.skip(t, depth + 1)
        else:
            raise ThriftError(f"unknown compact type {ftype}")

    def _skip_element(self, etype: int, depth: int) -> None:
        # Booleans inside containers take one byte each.
        if etype in (_TRUE, _FALSE):
            self.skip_bytes(1)
        else:
            self.skip(etype, depth)

    def _list_header(self) -> tuple[int, int]:
        """``(size, element type)`` of a list or set header (a long size follows as a varint)."""
        head = self.byte()
        size = head >> 4
        if size == 15:
            size = self.varint()
        self._check_count(size)
        return size, head & 0x0F

    def _check_count(self, size: int) -> None:
        # Every element takes at least one byte, so a count above the remaining bytes is corrupt.
        if size > self.end - self.pos:
            raise ThriftError(f"container of {size} elements cannot fit in the header bytes")

    def value(self, ftype: int, depth: int) -> object:
        """Decode one value of compact type ``ftype`` (a struct as ``{field_id: value}``)."""
        if depth > _MAX_DEPTH:
            raise ThriftError("nesting too deep")
        if ftype in (_TRUE, _FALSE):
            return ftype == _TRUE
        if ftype == _BYTE:
            self.skip_bytes(1)
            return self.buf[self.pos - 1]
        if ftype in (_I16, _I32, _I64):
            return self.zigzag()
        if ftype == _DOUBLE:
            self.skip_bytes(8)
            return struct.unpack("<d", bytes(self.buf[self.pos - 8:self.pos]))[0]
        if ftype == _BINARY:
            n = self.varint()
            self.skip_bytes(n)
            return bytes(self.buf[self.pos - n:self.pos])
        if ftype in (_LIST, _SET):
            size, etype = self._list_header()
            if etype in (_TRUE, _FALSE):  # booleans inside containers take one byte each
                out = []
                for _ in range(size):
                    out.append(self.byte() == _TRUE)
                return out
            return [self.value(etype, depth + 1) for _ in range(size)]
        if ftype == _MAP:
            size = self.varint()
            if not size:
                return []
            self._check_count(size)
            kv = self.byte()
            return [(self.value(kv >> 4, depth + 1), self.value(kv & 0x0F, depth + 1))
                    for _ in range(size)]
        if ftype == _STRUCT:
            fields: dict[int, object] = {}
            last = 0
            while True:
                t, last = self.field(last)
                if t == _STOP:
                    return fields
                fields[last] = self.value(t, depth + 1)
        raise ThriftError(f"unknown compact type {ftype}")

    def struct_i32s(self, wanted: dict[int, str], bools: dict[int, str]) -> dict[str, int]:
        """Read a struct, keeping i32 fields in ``wanted`` and bool fields in ``bools``."""
        out: dict[str, int] = {}
        last = 0
        while True:
            t, last = self.field(last)
            if t == _STOP:
                return out
            if last in wanted and t == _I32:
                out[wanted[last]] = self.i32()
            elif last in bools and t in (_TRUE, _FALSE):
                out[bools[last]] = int(t == _TRUE)
            elif last in wanted or last in bools:
                raise ThriftError(f"field {last} has unexpected type {t}")
            else:
                self.skip(t, 1)


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag_bytes(v: int) -> bytes:
    return _varint_bytes((v << 1) ^ (v >> 63) if v < 0 else v << 1)


def pad_field(nbytes: int) -> bytes:
    """A binary field of id :data:`PAD_FIELD_ID` that takes exactly ``nbytes`` bytes
    (:data:`PAD_MIN` to 131), to insert before a struct's STOP byte.

    Examples
    --------
    >>> raw = bytes([0x15, 0x06, 0x15, 0x10, 0x15, 0x10])       # a page header without its STOP
    >>> h = parse_page_header(raw + pad_field(9) + b"\\x00")
    >>> h.compressed_page_size, h.header_size
    (8, 16)
    """
    if not PAD_MIN <= nbytes <= PAD_MIN + 126:
        raise ValueError(f"a pad field takes {PAD_MIN} to {PAD_MIN + 126} bytes, not {nbytes}")
    head = bytes([_BINARY]) + _zigzag_bytes(PAD_FIELD_ID)  # long form: type, then the i16 id
    n = nbytes - len(head) - 1
    return head + _varint_bytes(n) + bytes(n)


class _Rewriter(_Reader):
    """Copies a struct byte for byte, passing each integer through a function (see rewrite_ints)."""

    def __init__(self, buf: bytes | bytearray | memoryview,
                 fn: Callable[[tuple[int, ...], int], int]) -> None:
        super().__init__(buf)
        self.fn = fn
        self.out = bytearray()

    def copy_from(self, start: int) -> None:
        self.out += self.buf[start:self.pos]

    def struct(self, path: tuple[int, ...]) -> None:
        if len(path) > 2 * _MAX_DEPTH:
            raise ThriftError("nesting too deep")
        last = 0
        while True:
            start = self.pos
            t, last = self.field(last)
            self.copy_from(start)
            if t == _STOP:
                return
            self.item(t, (*path, last))

    def item(self, t: int, path: tuple[int, ...]) -> None:
        start = self.pos
        if t in _INT_RANGE:
            v = self.zigzag()
            new = self.fn(path, v)
            if new == v:
                self.copy_from(start)
                return
            lo, hi = _INT_RANGE[t]
            if not lo <= new <= hi:
                raise ThriftError(f"value {new} does not fit the field's type")
            self.out += _zigzag_bytes(new)
        elif t == _STRUCT:
            self.struct(path)
        elif t in (_LIST, _SET):
            size, etype = self._list_header()
            self.copy_from(start)
            for i in range(size):
                if etype in (_TRUE, _FALSE):
                    s = self.pos
                    self.skip_bytes(1)
                    self.copy_from(s)
                else:
                    self.item(etype, (*path, i))
        else:
            self.skip(t, 1)
            self.copy_from(start)


def rewrite_ints(buf: bytes | bytearray | memoryview,
                 fn: Callable[[tuple[int, ...], int], int]) -> tuple[bytes, int]:
    """Copy the struct at the start of ``buf`` with each integer ``v`` replaced by ``fn(path, v)``:
    ``(new bytes, bytes of buf used)``.

    ``path`` holds the field ids from the outer struct down, with the index of each list element
    in between (``(4, 0, 1, 2, 3, 9)``: field 9 of field 3 of element 2 of list field 1 of element
    0 of list field 4). Everything else (maps included) is copied unchanged; an unchanged integer
    keeps its bytes. Raises :class:`ThriftError` on malformed bytes or a value outside its type.

    Examples
    --------
    >>> raw = bytes([0x15, 0x06, 0x18, 0x02, 0x61, 0x62, 0x00])  # {1: 3, 2: b"ab"}
    >>> new, used = rewrite_ints(raw, lambda path, v: v + 100 if path == (1,) else v)
    >>> decode_struct(new)[0], used
    ({1: 103, 2: b'ab'}, 7)
    """
    r = _Rewriter(buf, fn)
    r.struct(())
    return bytes(r.out), r.pos


_DATA_V1 = {1: "num_values", 2: "encoding", 3: "definition_level_encoding",
            4: "repetition_level_encoding"}
_DATA_V2 = {1: "num_values", 2: "num_nulls", 3: "num_rows", 4: "encoding",
            5: "definition_levels_byte_length", 6: "repetition_levels_byte_length"}


def _require(fields: dict[str, int], names: dict[int, str], what: str) -> None:
    missing = [n for n in names.values() if n not in fields]
    if missing:
        raise ThriftError(f"{what} lacks required field(s) {', '.join(missing)}")


def decode_struct(buf: bytes | bytearray | memoryview) -> tuple[dict[int, object], int]:
    """Decode the struct at the start of ``buf``: ``({field_id: value}, bytes used)``.

    Booleans become ``bool``, integers ``int``, binary and strings ``bytes``, lists lists, maps lists
    of pairs and structs dicts. Raises :class:`ThriftError` on malformed or truncated bytes.

    Examples
    --------
    >>> decode_struct(bytes([0x15, 0x06, 0x18, 0x02, 0x61, 0x62, 0x00]))
    ({1: 3, 2: b'ab'}, 7)
    """
    r = _Reader(buf)
    out = r.value(_STRUCT, 0)
    assert isinstance(out, dict)
    return out, r.pos


def parse_page_header(buf: bytes | bytearray | memoryview) -> PageHeader:
    """Decode the ``PageHeader`` at the start of ``buf``.

    Raises :class:`ThriftError` when the bytes are malformed, truncated, lack a required field,
    or hold a negative size or count.

    Examples
    --------
    >>> parse_page_header(b"\\x15\\x04\\x15\\x02\\x15\\x02\\x00").uncompressed_page_size
    1
    >>> parse_page_header(b"\\x15\\x04")
    Traceback (most recent call last):
    ...
    embtools.storage.thrift.ThriftError: unexpected end of header bytes
    """
    r = _Reader(buf)
    top: dict[str, int] = {}
    v1: DataPageHeader | None = None
    v2: DataPageHeaderV2 | None = None
    dict_values: int | None = None
    names = {1: "type", 2: "uncompressed_page_size", 3: "compressed_page_size", 4: "crc"}
    last = 0
    while True:
        t, last = r.field(last)
        if t == _STOP:
            break
        if last in names:
            if t != _I32:
                raise ThriftError(f"PageHeader field {last} has type {t}, expected i32")
            top[names[last]] = r.i32()
        elif last == 5 and t == _STRUCT:
            f = r.struct_i32s(_DATA_V1, {})
            _require(f, _DATA_V1, "DataPageHeader")
            v1 = DataPageHeader(**f)
        elif last == 8 and t == _STRUCT:
            f = r.struct_i32s(_DATA_V2, {7: "is_compressed"})
            _require(f, _DATA_V2, "DataPageHeaderV2")
            v2 = DataPageHeaderV2(
                **{k: v for k, v in f.items() if k != "is_compressed"},
                is_compressed=bool(f.get("is_compressed", 1)),
            )
        elif last == 7 and t == _STRUCT:
            f = r.struct_i32s({1: "num_values", 2: "encoding"}, {3: "is_sorted"})
            _require(f, {1: "num_values"}, "DictionaryPageHeader")
            dict_values = f["num_values"]
        elif last in (5, 6, 7, 8):
            raise ThriftError(f"PageHeader field {last} has type {t}, expected struct")
        else:
            r.skip(t, 1)
    for name in ("type", "uncompressed_page_size", "compressed_page_size"):
        if name not in top:
            raise ThriftError(f"PageHeader lacks required field {name}")
    if top["uncompressed_page_size"] < 0 or top["compressed_page_size"] < 0:
        raise ThriftError("negative page size")
    for sub in (v1, v2):
        if sub is not None and any(v < 0 for k, v in vars(sub).items() if k != "is_compressed"):
            raise ThriftError("negative count or length in a data page header")
    return PageHeader(
        type=top["type"],
        uncompressed_page_size=top["uncompressed_page_size"],
        compressed_page_size=top["compressed_page_size"],
        header_size=r.pos,
        crc=top.get("crc"),
        data_page_header=v1,
        data_page_header_v2=v2,
        dictionary_num_values=dict_values,
    )
