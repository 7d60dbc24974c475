"""Column names, reserved names and Arrow types of the embtools data files.

A data file holds ``row_id`` (int64), ``text_id`` (string), ``label`` (string or integer, nullable),
user metadata columns, and one ``emb_<d>`` column per stored dimension
(``fixed_size_list<float32 not null>[d]``). The store's schema (everything but the embedding columns)
is kept in the manifest as JSON: readable type strings plus the Arrow IPC schema in base64.

Examples
--------
>>> emb_column(384), parse_emb_column("emb_64"), parse_emb_column("year")
('emb_384', 64, None)
>>> import pyarrow as pa
>>> normalize_type(pa.large_list(pa.large_string()))
ListType(list<item: string>)
>>> s = pa.schema([("row_id", pa.int64()), ("text_id", pa.string())])
>>> schema_from_json(schema_to_json(s)).equals(s)
True
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pyarrow as pa

__all__ = [
    "EMB_PREFIX",
    "LABEL",
    "RESERVED",
    "ROW_ID",
    "TEXT_ID",
    "base_schema",
    "emb_column",
    "embedding_type",
    "empty_table",
    "is_reserved",
    "normalize_type",
    "parse_emb_column",
    "schema_from_json",
    "schema_to_json",
    "type_string",
]

ROW_ID = "row_id"
TEXT_ID = "text_id"
LABEL = "label"
EMB_PREFIX = "emb_"
RESERVED = (ROW_ID, TEXT_ID, LABEL)
_EMB = re.compile(r"^emb_([1-9][0-9]*)$")


def emb_column(dim: int) -> str:
    """The name of the embedding column of dimension ``dim``."""
    return f"{EMB_PREFIX}{int(dim)}"


def parse_emb_column(name: str) -> int | None:
    """The dimension of an ``emb_<d>`` column name, or None for any other name."""
    m = _EMB.match(name)
    return int(m.group(1)) if m else None


def is_reserved(name: str) -> bool:
    """Whether a user metadata column may not use ``name`` (row_id, text_id, label, emb_*)."""
    return name in RESERVED or name.startswith(EMB_PREFIX)


def embedding_type(dim: int) -> pa.FixedSizeListType:
    """The Arrow type of an ``emb_<dim>`` column: ``fixed_size_list<float32 not null>[dim]``."""
    return pa.list_(pa.field("element", pa.float32(), nullable=False), int(dim))


def normalize_type(t: pa.DataType) -> pa.DataType:
    """Canonical form of a metadata type: large/view strings and lists become the plain ones."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(normalize_type(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(normalize_type(t.value_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(normalize_type(t.value_type), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, normalize_type(f.type), f.nullable) for f in t])
    if pa.types.is_dictionary(t):
        return normalize_type(t.value_type)
    return t


def type_string(t: pa.DataType) -> str:
    """A readable type name for the manifest and error messages, e.g. ``'int64'``."""
    return str(t)


def base_schema(label_type: pa.DataType | None = None) -> pa.Schema:
    """The schema of a store with no user columns: row_id, text_id, label."""
    return pa.schema([
        pa.field(ROW_ID, pa.int64(), nullable=False),
        pa.field(TEXT_ID, pa.string(), nullable=False),
        pa.field(LABEL, label_type or pa.string()),
    ])


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table of no rows with ``schema``.

    ``pa.Schema.empty_table()`` imports pandas when it is installed (about 50 MiB of resident
    memory, counted against nothing); this does not.

    Examples
    --------
    >>> empty_table(base_schema()).num_rows, empty_table(base_schema()).column_names
    (0, ['row_id', 'text_id', 'label'])
    """
    return pa.Table.from_batches([], schema=schema)


def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    """JSON-able form: ``{"columns": {name: type string}, "arrow": base64 IPC schema}``."""
    return {
        "columns": {f.name: type_string(f.type) for f in schema},
        "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
    }


def schema_from_json(data: dict[str, Any]) -> pa.Schema:
    """Inverse of :func:`schema_to_json`."""
    raw = base64.b64decode(data["arrow"])
    return pa.ipc.read_schema(pa.py_buffer(raw))
