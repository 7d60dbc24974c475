"""Filters: a ``where`` (polars expression or SQL predicate string) to the row positions it selects.

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
import polars as pl

from embtools.errors import EmbtoolsError, FilterError

__all__ = ["select_positions", "to_expression", "where_key"]


def to_expression(where: Any) -> pl.Expr | None:
    """``where`` as a polars expression: None stays None, SQL strings go through ``pl.sql_expr``.

    Raises FilterError for a string that is not a SQL predicate, or anything that is neither a
    string nor a polars expression.
    """
    if where is None:
        return None
    if isinstance(where, pl.Expr):
        return where
    if isinstance(where, str):
        if not where.strip():
            raise FilterError("where is an empty string; pass None to search every row")
        try:
            return pl.sql_expr(where)
        except Exception as err:
            raise FilterError(f"cannot parse the SQL predicate {where!r}: {err}") from None
    raise FilterError(
        f"where must be a polars expression (pl.col('label') == 'x') or a SQL predicate string "
        f"(\"label = 'x'\"), got {type(where).__name__}"
    )


def select_positions(source: Any, where: Any) -> np.ndarray | None:
    """The ascending int64 positions of the rows matching ``where``; None when ``where`` is None
    (every row).

    Errors from the metadata scan (an unknown column, a type mismatch) become FilterError.
    """
    expr = to_expression(where)
    if expr is None:
        return None
    try:
        positions = source.select(expr)
    except EmbtoolsError:
        raise
    except Exception as err:
        raise FilterError(f"cannot apply the filter {where!r}: {err}") from None
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
