"""Filters: a ``where`` (polars expression or SQL predicate string) to the row positions it selects.

A SQL string is parsed by :mod:`embtools.storage.predicate` (a predicate over the store's own columns:
no SQL engine, tables, files or subqueries); a polars expression may name only the store's columns.
Filters are applied *before* scoring: the source's metadata scan picks the matching positions
(``source.select``, predicate pushed into Parquet), and the engine reads only those rows. A search
therefore always returns ``min(k, matches)`` rows per query.

Examples
--------
>>> import polars as pl
>>> df = pl.DataFrame({"label": ["a", "b", "a"], "year": [2019, 2021, 2022]})
>>> df.filter(to_expression("label = 'a' AND year > 2020"))["year"].to_list()
[2022]
>>> to_expression(None) is None
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embtools.errors import EmbtoolsError, FilterError
from embtools.storage.predicate import check_expression_columns, describe, to_expression

__all__ = ["check_expression_columns", "describe", "select_positions", "to_expression", "where_key"]


def select_positions(source: Any, where: Any) -> np.ndarray | None:
    """The ascending int64 positions of the rows matching ``where``; None when ``where`` is None
    (every row).

    Errors from the metadata scan (an unknown column, a type mismatch) become FilterError.
    """
    if where is None:
        return None
    try:
        positions = source.select(where)
    except EmbtoolsError:
        raise
    except Exception as err:
        raise FilterError(f"cannot apply the filter {describe(where)}: {err}") from None
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(positions) > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        positions = np.unique(positions)
    return positions


def where_key(where: Any) -> str | None:
    """A stable text form of ``where`` for parameter hashes (resumable jobs)."""
    if where is None:
        return None
    if isinstance(where, str):
        return "sql:" + where.strip()
    expr = to_expression(where)
    assert expr is not None
    try:
        return "json:" + expr.meta.serialize(format="json")
    except Exception:
        return "str:" + str(expr)
