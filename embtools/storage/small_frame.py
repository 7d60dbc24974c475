"""``small_frame``: a polars DataFrame of a few columns, built without polars' Python dispatch.

A single search returns ten rows. polars' public constructors spend ~10 us a column inferring
and checking types in Python (~50 us for a result frame in a loop of searches, a third of an
indexed query); the typed column constructors under them take ~1 us. ``small_frame`` calls
those when the installed polars has them and they build the same frame as the public path,
which it checks once on sample columns (nulls, non-ASCII text, NaN); otherwise, or on any
error, it uses the public constructors.

Examples
--------
>>> import numpy as np, polars as pl
>>> small_frame([("id", pl.Int64, np.array([3, 4])), ("text", pl.String, ["a", None]),
...              ("score", pl.Float32, np.array([0.5, 0.25], np.float32))]).rows()
[(3, 'a', 0.5), (4, None, 0.25)]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

__all__ = ["small_frame"]

#: ``(name, dtype, values)``: dtype pl.Int64 (an int64 array or a list of int or None),
#: pl.Float32 (a float32 array) or pl.String (a list of str or None)
Column = tuple[str, Any, Any]


def _public(columns: Sequence[Column]) -> pl.DataFrame:
    """The frame through polars' public constructors."""
    return pl.DataFrame([pl.Series(name, values, dtype) for name, dtype, values in columns])


def _typed_constructors() -> Callable[[Sequence[Column]], pl.DataFrame] | None:
    """The builder through polars' typed column constructors, or None when this polars has none."""
    try:
        from polars._plr import PyDataFrame, PySeries  # polars >= 1.32
    except ImportError:
        try:
            from polars.polars import PyDataFrame, PySeries  # type: ignore[no-redef]
        except ImportError:
            return None

    try:
        new_str, new_i64, new_opt_i64, new_f32 = (PySeries.new_str, PySeries.new_i64, PySeries.new_opt_i64,
                                                  PySeries.new_f32)
        from_pydf = pl.DataFrame._from_pydf
    except AttributeError:
        return None

    def build(columns: Sequence[Column]) -> pl.DataFrame:
        series = []  # one loop, no call per column: a search in a loop builds a frame each time
        for name, dtype, values in columns:
            if dtype == pl.String:
                series.append(new_str(name, values, True))
            elif not isinstance(values, np.ndarray):
                series.append(new_opt_i64(name, values, True))
            elif dtype == pl.Float32:
                series.append(new_f32(name, np.ascontiguousarray(values, np.float32), False))
            else:
                series.append(new_i64(name, np.ascontiguousarray(values, np.int64), False))
        return from_pydf(PyDataFrame(series))

    return build


_SAMPLE: list[Column] = [
    ("i", pl.Int64, np.array([-(2**62), 0, 7], np.int64)),
    ("j", pl.Int64, [5, None, -1]),
    ("t", pl.String, ["ä€😀", None, ""]),
    ("f", pl.Float32, np.array([np.nan, -0.0, 3.5], np.float32)),
]


@functools.cache
def _builder() -> Callable[[Sequence[Column]], pl.DataFrame]:
    """The typed builder if it makes exactly the public frame on :data:`_SAMPLE`, else the public."""
    fast = _typed_constructors()
    if fast is None:
        return _public
    try:
        same = _same(fast(_SAMPLE), _public(_SAMPLE))
    except Exception:  # a polars whose private constructors differ: the public path
        return _public
    return fast if same else _public


def _same(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    """Whether ``a`` and ``b`` have one schema and equal values (floats bit for bit)."""
    if a.schema != b.schema:
        return False
    return all(np.array_equal(a[c].to_numpy().view(np.uint32), b[c].to_numpy().view(np.uint32))
               if a.schema[c] == pl.Float32 else a[c].to_list() == b[c].to_list() for c in a.columns)


def small_frame(columns: Sequence[Column]) -> pl.DataFrame:
    """The DataFrame of ``columns`` (``(name, dtype, values)``, equal lengths, distinct names)."""
    return _builder()(columns)
