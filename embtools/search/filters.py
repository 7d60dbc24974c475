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

import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from embtools.errors import EmbtoolsError, FilterError
from embtools.storage.predicate import check_expression_columns, describe, to_expression

__all__ = ["check_expression_columns", "describe", "select_positions", "to_expression", "where_key"]


#: positions of recent filters per immutable source: {source: {where_key: read-only positions}}
_CACHE: weakref.WeakKeyDictionary[Any, OrderedDict[str, np.ndarray]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()
#: filters kept per source, and the most bytes of positions kept per source (under a memory cap
#: also at most 1/16 of what the cap leaves: the positions are outside the memory ledger)
CACHE_FILTERS = 8
CACHE_BYTES = 16 * 1024**2


def select_positions(source: Any, where: Any) -> np.ndarray | None:
    """The ascending int64 positions of the rows matching ``where`` (read-only); None when
    ``where`` is None (every row).

    Errors from the metadata scan (an unknown column, a type mismatch) become FilterError. The
    positions of the last few filters of an immutable source (``source.frozen``: a committed
    version) are kept, so repeating a filtered search scans the metadata once.

    Examples
    --------
    >>> import numpy as np, embtools as et
    >>> store = et.EmbeddingStore(None, backend="numpy")
    >>> _ = store.add(np.eye(3, dtype=np.float32), labels=["a", "b", "a"])
    >>> select_positions(store.source, "label = 'a'").tolist()
    [0, 2]
    """
    if where is None:
        return None
    key = _key(source, where)
    if key is not None:
        with _CACHE_LOCK:
            kept = _CACHE.get(source)
            hit = None if kept is None else kept.get(key)
            if hit is not None:
                kept.move_to_end(key)  # type: ignore[union-attr]
                return hit
    try:
        positions = source.select(where)
    except EmbtoolsError:
        raise
    except Exception as err:
        raise FilterError(f"cannot apply the filter {describe(where)}: {err}") from None
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(positions) > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        positions = np.unique(positions)
    positions = positions.view()
    positions.setflags(write=False)
    if key is not None and positions.nbytes <= _room(source):
        with _CACHE_LOCK:
            kept = _CACHE.setdefault(source, OrderedDict())
            kept[key] = positions
            total = sum(int(p.nbytes) for p in kept.values())
            while len(kept) > CACHE_FILTERS or total > CACHE_BYTES:
                total -= int(kept.popitem(last=False)[1].nbytes)
    return positions


def _key(source: Any, where: Any) -> str | None:
    """The cache key of ``where`` on ``source``, or None when its positions are not kept."""
    if not getattr(source, "frozen", False):
        return None
    try:
        key = where_key(where)
    except Exception:  # not a filter: the scan raises the typed error
        return None
    # an expression that does not serialise has only its text, which may be abridged: not kept
    return key if key is not None and not key.startswith("str:") else None


def _room(source: Any) -> int:
    budget = getattr(source, "budget", None)
    avail = None if budget is None else budget.available_bytes
    return CACHE_BYTES if avail is None else min(CACHE_BYTES, avail // 16)


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
