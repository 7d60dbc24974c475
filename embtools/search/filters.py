"""Filters: a ``where`` (polars expression or SQL predicate string) to the row positions it selects.

A SQL string is parsed by :mod:`embtools.search.predicate` (a predicate over the store's own columns:
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

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from embtools.errors import EmbtoolsError, FilterError
from embtools.search.predicate import parse_predicate

__all__ = ["check_expression_columns", "describe", "select_positions", "to_expression", "where_key"]


def to_expression(where: Any, columns: Sequence[str] | None = None) -> pl.Expr | None:
    """``where`` as a polars expression: None stays None, SQL strings go through the safe parser
    (:func:`embtools.search.predicate.parse_predicate`; no SQL engine ever sees them).

    ``columns``: the store's column names; a SQL string or polars expression naming any other
    column is a FilterError (None: not checked). Raises FilterError for a string that is not a
    predicate, or anything that is neither a string nor a polars expression.
    """
    if where is None:
        return None
    if isinstance(where, pl.Expr):
        if columns is not None:
            check_expression_columns(where, columns)
        return where
    if isinstance(where, str):
        if not where.strip():
            raise FilterError("where is an empty string; pass None to search every row")
        return parse_predicate(where, columns)
    raise FilterError(
        f"where must be a polars expression (pl.col('label') == 'x') or a SQL predicate string "
        f"(\"label = 'x'\"), got {type(where).__name__}"
    )


def check_expression_columns(expr: pl.Expr, columns: Sequence[str]) -> None:
    """FilterError when the polars expression ``expr`` reads a column not in ``columns``."""
    try:
        roots = expr.meta.root_names()
    except Exception as err:  # polars refuses to list them for some expressions
        raise FilterError(f"cannot inspect the filter {describe(expr)}: {type(err).__name__}") from None
    unknown = [name for name in roots if name not in columns]
    if unknown:
        raise FilterError(f"the filter {describe(expr)} names unknown column(s) {unknown}; "
                          f"the store's columns: {list(columns)}")


def describe(where: Any, limit: int = 200) -> str:
    """A short, printable description of ``where`` for messages (never an object repr)."""
    text = repr(where) if isinstance(where, str) else str(where)
    return text if len(text) <= limit else text[:limit] + "..."


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
