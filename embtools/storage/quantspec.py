"""Quantized columns: their names, Arrow types, and the manifest record of how they were made.

A store quantized at dimension ``d`` holds, beside ``emb_<d>``, the columns ``emb_<d>_i8``
(``fixed_size_binary(d)``: one int8 code per dimension) and/or ``emb_<d>_b1``
(``fixed_size_binary(ceil(d / 8))``: packed sign bits). A :class:`QuantSpec` per quantized
dimension is recorded in the manifest (``"quantized"``): the kinds, and the int8 per-dimension
ranges the codes were made with, so that every later ``add`` encodes its rows the same way. The
codes are :mod:`embtools.kernels.codes`' (equal to sentence-transformers' ``quantize_embeddings``).

Examples
--------
>>> code_column(384, "int8"), code_column(384, "binary"), parse_code_column("emb_64_b1")
('emb_384_i8', 'emb_384_b1', (64, 'binary'))
>>> code_width(384, "binary"), code_width(20, "binary"), code_width(20, "int8")
(48, 3, 20)
>>> spec = QuantSpec(2, ("int8",), np.array([[0.0, -1.0], [1.0, 1.0]], np.float32), 2)
>>> QuantSpec.from_json(2, spec.to_json()) == spec
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from embtools.errors import InvalidArgumentError
from embtools.kernels.codes import encode_int8, pack_signs

__all__ = [
    "KINDS",
    "QuantSpec",
    "add_code_columns",
    "check_kinds",
    "code_array",
    "code_column",
    "code_type",
    "code_width",
    "encode",
    "parse_code_column",
    "specs_from_json",
    "specs_to_json",
]

#: the kinds of quantized columns, and their column name suffixes
KINDS = ("int8", "binary")
_SUFFIX = {"int8": "i8", "binary": "b1"}
_KIND = {v: k for k, v in _SUFFIX.items()}
_CODE = re.compile(r"^emb_([1-9][0-9]*)_(i8|b1)$")
#: rows encoded per pass
ENCODE_ROWS = 65_536


def code_column(dim: int, kind: str) -> str:
    """The column name of ``kind`` codes of dimension ``dim``."""
    return f"emb_{int(dim)}_{_SUFFIX[kind]}"


def parse_code_column(name: str) -> tuple[int, str] | None:
    """``(dim, kind)`` of a quantized column name, or None for any other name."""
    m = _CODE.match(name)
    return (int(m.group(1)), _KIND[m.group(2)]) if m else None


def code_width(dim: int, kind: str) -> int:
    """Bytes per row of ``kind`` codes of dimension ``dim``."""
    return int(dim) if kind == "int8" else (int(dim) + 7) // 8


def code_type(dim: int, kind: str) -> pa.DataType:
    """The Arrow type of a quantized column: ``fixed_size_binary(code_width(dim, kind))``."""
    return pa.binary(code_width(dim, kind))


def code_array(codes: np.ndarray) -> pa.FixedSizeBinaryArray:
    """A 2-D uint8/int8 code array ``(n, w)`` as an Arrow ``fixed_size_binary(w)`` array.

    Examples
    --------
    >>> code_array(np.array([[1, 2], [3, 4]], np.uint8)).to_pylist()
    [b'\\x01\\x02', b'\\x03\\x04']
    """
    c = np.ascontiguousarray(codes)
    n, w = c.shape
    buf = pa.py_buffer(c.view(np.uint8).reshape(-1).tobytes() if n else b"")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(w), n, [None, buf])


def check_kinds(kinds: Any) -> tuple[str, ...]:
    """``kinds`` as a sorted tuple of distinct known kinds (InvalidArgumentError otherwise).

    Examples
    --------
    >>> check_kinds(["int8", "binary"]), check_kinds("binary")
    (('binary', 'int8'), ('binary',))
    """
    items: Iterable[Any] = (kinds,) if isinstance(kinds, str) else kinds
    try:
        out = tuple(sorted(set(items)))
    except TypeError:
        raise InvalidArgumentError(f"kinds must be a list of {KINDS}, got {kinds!r}") from None
    if not out or any(not isinstance(k, str) or k not in KINDS for k in out):
        raise InvalidArgumentError(f"kinds must be a non-empty list of {KINDS}, got {kinds!r}")
    return out


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """How the quantized columns of dimension ``dim`` are made: ``kinds`` (sorted), the int8
    ``ranges`` (float32 ``(2, dim)`` minima and maxima; None without int8) and the number of
    rows they were computed from (``sample_rows``)."""

    dim: int
    kinds: tuple[str, ...]
    ranges: np.ndarray | None
    sample_rows: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantSpec):
            return NotImplemented
        same_ranges = (self.ranges is None and other.ranges is None) or (
            self.ranges is not None and other.ranges is not None
            and np.array_equal(self.ranges, other.ranges)
        )
        return (self.dim, self.kinds, self.sample_rows) == (
            other.dim, other.kinds, other.sample_rows
        ) and same_ranges

    def __hash__(self) -> int:
        return hash((self.dim, self.kinds, self.sample_rows))

    @property
    def columns(self) -> list[str]:
        """The column names of this spec's kinds."""
        return [code_column(self.dim, k) for k in self.kinds]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kinds": list(self.kinds), "sample_rows": self.sample_rows}
        if self.ranges is not None:
            out["ranges"] = [[float(v) for v in row] for row in self.ranges]
        return out

    @classmethod
    def from_json(cls, dim: int, d: Any) -> QuantSpec:
        """Parse one manifest record (ValueError/TypeError when malformed)."""
        if not isinstance(d, dict):
            raise TypeError("a quantized record is not an object")
        kinds = d.get("kinds")
        if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"quantized dimension {dim}: bad kinds {kinds!r}")
        if len(set(kinds)) != len(kinds) or kinds != sorted(kinds):
            raise ValueError(f"quantized dimension {dim}: kinds {kinds!r} not sorted and distinct")
        rows = d.get("sample_rows", 0)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"quantized dimension {dim}: bad sample_rows {rows!r}")
        raw = d.get("ranges")
        ranges = None
        if "int8" in kinds:
            if not isinstance(raw, list) or len(raw) != 2:
                raise ValueError(f"quantized dimension {dim}: int8 needs ranges [[min...], [max...]]")
            if any(not isinstance(r, list) or len(r) != dim for r in raw) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for r in raw for v in r
            ):
                raise ValueError(f"quantized dimension {dim}: ranges are not 2 lists of {dim} numbers")
            ranges = np.array(raw, dtype=np.float32)
            if not np.isfinite(ranges).all() or (ranges[0] > ranges[1]).any():
                raise ValueError(f"quantized dimension {dim}: ranges not finite or min > max")
            ranges.setflags(write=False)
        elif raw is not None:
            raise ValueError(f"quantized dimension {dim}: ranges without int8")
        return cls(int(dim), tuple(kinds), ranges, rows)


def specs_to_json(specs: dict[int, QuantSpec]) -> dict[str, Any]:
    """The manifest's ``quantized`` object: ``{"<dim>": record}``."""
    return {str(d): specs[d].to_json() for d in sorted(specs)}


def specs_from_json(d: Any, dimensions: Iterable[int]) -> dict[int, QuantSpec]:
    """Parse the manifest's ``quantized`` object; every dimension must be a stored one."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise TypeError("quantized is not an object")
    stored = set(dimensions)
    out: dict[int, QuantSpec] = {}
    for key, rec in d.items():
        if not isinstance(key, str) or not key.isdigit() or int(key) not in stored:
            raise ValueError(f"quantized dimension {key!r} is not a stored dimension")
        out[int(key)] = QuantSpec.from_json(int(key), rec)
    return out


def encode(spec: QuantSpec, kind: str, x: np.ndarray) -> np.ndarray:
    """The ``kind`` codes of float rows ``x`` as uint8 ``(n, width)``."""
    if kind == "int8":
        assert spec.ranges is not None
        return encode_int8(x, spec.ranges).view(np.uint8)
    return pack_signs(x)


def _encoded_columns(spec: QuantSpec, x: np.ndarray) -> list[tuple[pa.Field, pa.Array]]:
    n = x.shape[0]
    out = []
    for kind in spec.kinds:
        codes = np.empty((n, code_width(spec.dim, kind)), np.uint8)
        for s in range(0, n, ENCODE_ROWS):
            codes[s : s + ENCODE_ROWS] = encode(spec, kind, x[s : s + ENCODE_ROWS])
        field = pa.field(code_column(spec.dim, kind), code_type(spec.dim, kind), nullable=False)
        out.append((field, code_array(codes)))
    return out


def _float_rows(table: pa.Table, dim: int) -> np.ndarray:
    col = table.column(f"emb_{dim}")
    flat = col.combine_chunks().flatten() if col.num_chunks != 1 else col.chunk(0).flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def add_code_columns(table: pa.Table, specs: dict[int, QuantSpec]) -> pa.Table:
    """``table`` (with its ``emb_<d>`` columns) with the code columns of ``specs`` appended
    (replacing any code columns of those dimensions it had)."""
    for dim in sorted(specs):
        spec = specs[dim]
        stale = [n for n in table.column_names if (parse_code_column(n) or (0, ""))[0] == dim]
        if stale:
            table = table.drop_columns(stale)
        for field, arr in _encoded_columns(spec, _float_rows(table, dim)):
            table = table.append_column(field, arr)
    return table
