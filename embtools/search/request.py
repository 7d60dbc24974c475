"""The search request: one immutable description of a search, built and checked once.

:meth:`SearchRequest.build` is called at the public boundary (``search_store``,
``compute_similarity``, ``similarity_join``): it checks ``k``, the metric, the dimension, the
queries (float32 ``(nq, dim)``, finite), the filter, ``batch_rows``, the funnel and the ``screen``
option, and resolves the filter to the selected positions. Internal functions take the request plus
a :class:`SearchContext` (source, backend, budget) and return a :class:`TopK`.

``screen`` forces (``"on"``) or forbids (``"off"``) the bfloat16 screen; ``"auto"`` lets the planner
decide. Its default comes from the ``EMBTOOLS_BF16_SCREEN`` environment variable, read once.

Examples
--------
>>> import numpy as np
>>> from embtools.storage.memory_source import ArraySource
>>> req = SearchRequest.build(ArraySource(np.eye(3, dtype=np.float32)), [1.0, 0.0, 0.0], k=2)
>>> req.nq, req.dim, req.k, req.metric, req.n_sel, req.screen in SCREEN_MODES
(1, 3, 2, 'cosine', 3, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.backends.base import check_k, check_metric
from embtools.backends.frameworks import is_foreign_array, to_numpy
from embtools.errors import (
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
    MemoryLimitError,
)
from embtools.memory import GB, MemoryBudget, format_bytes

__all__ = [
    "DEFAULT_RESCORE",
    "PRECISIONS",
    "SCREEN_MODES",
    "SearchContext",
    "SearchRequest",
    "TopK",
    "cap_error",
    "check_screen",
    "default_screen_mode",
    "is_store",
    "parse_funnel",
    "prepare_queries",
    "search_dimension",
    "smallest_cap_gb",
]

#: Values of the ``screen`` option: let the planner decide, force the bfloat16 screen, forbid
#: screens, or ask for the certified int8 screen (search/int8screen.py; needs int8 codes).
SCREEN_MODES = ("auto", "on", "off", "int8")
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


@functools.lru_cache(maxsize=1)
def default_screen_mode() -> str:
    """The ``screen`` default: ``EMBTOOLS_BF16_SCREEN`` (on/off/auto), read once per process."""
    mode = os.environ.get("EMBTOOLS_BF16_SCREEN", "auto").strip().lower()
    return "on" if mode in _ON else "off" if mode in _OFF else "auto"


def check_screen(screen: Any) -> str:
    """The ``screen`` option: ``"auto"``, ``"on"``, ``"off"`` or ``"int8"`` (None:
    :func:`default_screen_mode`)."""
    if screen is None:
        return default_screen_mode()
    if not isinstance(screen, str) or screen.lower() not in SCREEN_MODES:
        raise InvalidArgumentError(f"screen must be one of {SCREEN_MODES}, got {screen!r}")
    return screen.lower()


def smallest_cap_gb(budget: MemoryBudget, need_bytes: int) -> float:
    """The smallest ``max_memory_gb`` under which ``need_bytes`` more fit beside what ``budget``
    holds, rounded up to 9 decimals (a GiB fraction that, passed back, gives at least that many
    bytes).

    Examples
    --------
    >>> smallest_cap_gb(MemoryBudget(None), 1024**2)
    0.000976564
    """
    total = budget.held_bytes + int(need_bytes) + 1
    return math.ceil(total / GB * 1e9) / 1e9


def cap_error(budget: MemoryBudget, need_bytes: int, what: str) -> MemoryLimitError:
    """The error of a search whose smallest plan (``need_bytes`` of workspace) does not fit the
    cap: it names the smallest cap that works."""
    gb = smallest_cap_gb(budget, need_bytes)
    held = f", beside the {format_bytes(budget.held_bytes)} already held" if budget.held_bytes else ""
    cap = "no" if budget.cap_bytes is None else format_bytes(budget.cap_bytes)
    return MemoryLimitError(
        f"{what} needs at least {format_bytes(need_bytes)} of workspace{held}, over the memory cap "
        f"of {cap} (max_memory_gb={budget.max_memory_gb}); the smallest cap that works is "
        f"max_memory_gb={gb:.9f} ({format_bytes(gb * GB)})"
    )


def is_store(obj: Any) -> bool:
    """True for an EmbeddingStore-like object (it has ``source``, ``backend`` and ``budget``)."""
    return all(hasattr(obj, name) for name in ("source", "backend", "budget"))


@functools.lru_cache(maxsize=16)
def _tiny_weights(d: int) -> np.ndarray:
    """``d`` float32 weights of 2**-100 (read-only)."""
    w = np.full(d, 2.0**-100, np.float32)
    w.flags.writeable = False
    return w


def all_finite(q: np.ndarray) -> bool:
    """Whether the float32 matrix ``q`` holds no NaN or inf: the sums of its rows' magnitudes
    scaled by 2**-100 (one BLAS product, half a float64 sum's time) are finite exactly then, as
    ``d * 2**-100 * max|float32|`` overflows for no realistic ``d`` and a NaN or inf term keeps
    its sum NaN or inf (of one sign: no inf - inf, no warning).

    Examples
    --------
    >>> all_finite(np.array([[3e38, -3e38]], np.float32)), all_finite(np.array([[np.inf, -np.inf]], np.float32))
    (True, False)
    """
    sums = np.abs(q).dot(_tiny_weights(q.shape[1]))
    return math.isfinite(sums[0]) if len(sums) == 1 else bool(np.isfinite(sums).all())


def prepare_queries(queries: Any, dim: int | None = None) -> tuple[np.ndarray, bool]:
    """Any backend's query array as C-contiguous float32 NumPy ``(n, d)``, and whether it was 1-D.

    Raises InvalidEmbeddingsError for empty, non-numeric, NaN or inf queries, and
    DimensionMismatchError when ``dim`` is given and the queries have another dimension.

    Examples
    --------
    >>> q, one = prepare_queries([1.0, 2.0])
    >>> q.shape, one
    ((1, 2), True)
    """
    if isinstance(queries, np.ndarray):  # dense
        arr = queries
    else:
        from embtools.storage.ingest import reject_sparse

        reject_sparse(queries, "queries")
        if is_foreign_array(queries):
            arr = np.asarray(to_numpy(queries))
        else:
            try:
                arr = np.asarray(queries)
            except ValueError as err:
                raise InvalidEmbeddingsError(f"queries are not a regular array: {err}") from None
    if arr.dtype.kind not in "fiu":  # float, signed or unsigned integer
        raise InvalidEmbeddingsError(f"queries must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise InvalidEmbeddingsError(f"queries must be 1-D or 2-D, got shape {arr.shape}")
    one = arr.ndim == 1
    q = np.ascontiguousarray(arr.reshape(1, -1) if one else arr, dtype=np.float32)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise InvalidEmbeddingsError(f"queries are empty (shape {arr.shape})")
    if not all_finite(q):
        raise InvalidEmbeddingsError("queries contain NaN or inf values")
    if dim is not None and q.shape[1] != dim:
        raise DimensionMismatchError(
            f"queries have dimension {q.shape[1]} but the search uses dimension {dim}; "
            f"pass dimension={q.shape[1]} or slice the queries (Q[:, :{dim}])"
        )
    return q, one


def search_dimension(source: Any, dimension: Any, query_dim: int | None) -> int:
    """The dimension to search: ``dimension``, else the queries' own; it must be stored or a prefix
    of a stored dimension (DimensionMismatchError otherwise)."""
    stored = [int(d) for d in getattr(source, "dimensions", [])]
    if dimension is None:
        if query_dim is None:
            if not stored:
                raise DimensionMismatchError("the store holds no embeddings; pass dimension=")
            return max(stored)
        dim = query_dim
    else:
        dim = check_k(dimension, "dimension")
        if query_dim is not None and query_dim != dim:
            raise DimensionMismatchError(
                f"queries have dimension {query_dim} but dimension={dim} was asked for; "
                f"slice the queries (Q[:, :{dim}]) for a Matryoshka prefix"
            )
    if stored and dim > max(stored):
        raise DimensionMismatchError(
            f"dimension {dim} is larger than every stored dimension {sorted(stored)}"
        )
    return dim


#: the quantized funnel stages (codes of the search dimension), in the order they may come
CODE_STAGES = ("binary", "int8")


def _stage(d: Any, n: Any) -> tuple[int | str, int]:
    if isinstance(d, str):
        if d not in CODE_STAGES:
            raise ValueError(d)
        return d, int(n)
    if isinstance(d, bool):
        raise ValueError(d)
    return int(d), int(n)


def parse_funnel(funnel: Any, full_dim: int, k: int) -> list[tuple[int | str, int]]:
    """Validate ``funnel``: a non-empty list of ``(stage, shortlist)`` pairs: first the quantized
    stages (``"binary"`` then ``"int8"``, codes of the search dimension, each at most once), then
    Matryoshka dimensions increasing and below ``full_dim``; shortlists non-increasing and at
    least ``k``.

    Examples
    --------
    >>> parse_funnel([(64, 400), (128, 100)], full_dim=384, k=10)
    [(64, 400), (128, 100)]
    >>> parse_funnel([("binary", 400), ("int8", 40)], full_dim=384, k=10)
    [('binary', 400), ('int8', 40)]
    """
    try:
        stages = [_stage(d, n) for d, n in funnel]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"funnel must be a list of (dimension, shortlist) pairs, e.g. [(64, 400), (256, 100)], "
            f"or quantized stages [('binary', 400), ('int8', 40)], got {funnel!r}"
        ) from None
    if not stages:
        raise InvalidArgumentError("funnel is empty; pass None for an exact search")
    kinds = [d for d, _ in stages if isinstance(d, str)]
    if [d for d, _ in stages[: len(kinds)]] != kinds or kinds != [c for c in CODE_STAGES if c in kinds]:
        raise InvalidArgumentError(
            f"quantized funnel stages come first, 'binary' before 'int8', each once; got {funnel!r}")
    for i, (d, n) in enumerate(stages):
        check_k(n, "a funnel shortlist")
        if n < k:
            raise InvalidArgumentError(f"funnel shortlist {n} is smaller than k={k}")
        if i and n > stages[i - 1][1]:
            raise InvalidArgumentError(f"funnel shortlists must not grow, got {[s[1] for s in stages]}")
        if isinstance(d, str):
            continue
        check_k(d, "a funnel dimension")
        if d >= full_dim:
            raise InvalidArgumentError(
                f"funnel dimension {d} is not below the search dimension {full_dim}"
            )
        prev = stages[i - 1][0] if i else None
        if isinstance(prev, int) and d <= prev:
            raise InvalidArgumentError(f"funnel dimensions must increase, got {[s[0] for s in stages]}")
    return stages


#: values of ``precision=``, and the default ``rescore=`` multiplier of the quantized ones
#: (measured by benchmarks/quantized.py: recall@10 of binary -> float at 10 on MiniLM is >= 0.97)
PRECISIONS = ("float32", "int8", "binary")
DEFAULT_RESCORE = {"binary": 10, "int8": 4}


def _precision_funnel(precision: Any, rescore: Any, funnel: Any, k: int) -> tuple[str, Any]:
    """``(precision, funnel)``: a quantized precision becomes the funnel ``[(precision, r k)]``."""
    if precision is None:
        precision = "float32"
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        if rescore is not None:
            raise InvalidArgumentError("rescore= applies to precision='binary' or 'int8'")
        return precision, funnel
    if funnel is not None:
        raise InvalidArgumentError(
            f"pass either precision={precision!r} or funnel= (e.g. funnel=[('binary', 400), "
            "('int8', 40)]), not both")
    r = DEFAULT_RESCORE[precision] if rescore is None else check_k(rescore, "rescore")
    return precision, [(precision, r * k)]


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True)
class SearchRequest:
    """One search: ``queries`` float32 ``(nq, dim)`` (read-only), top ``k`` by ``metric`` over the
    selected ``positions`` (ascending int64; None: every row) of ``n_sel`` rows; ``batch_rows``
    caps the corpus rows per batch; ``screen`` is ``"auto"``, ``"on"`` or ``"off"``; ``funnel``
    the Matryoshka stages (None: exact). Build it with :meth:`build`."""

    queries: np.ndarray
    dim: int
    k: int
    metric: str
    positions: np.ndarray | None
    n_sel: int
    batch_rows: int | None = None
    screen: str = "auto"
    funnel: tuple[tuple[int | str, int], ...] | None = None
    nprobe: int | None = None
    refine: int | None = None
    exact: bool = False
    precision: str = "float32"

    @classmethod
    def build(
        cls,
        source: Any,
        queries: Any,
        k: Any = 10,
        *,
        dimension: Any = None,
        metric: Any = "cosine",
        where: Any = None,
        positions: np.ndarray | None = None,
        batch_rows: Any = None,
        screen: Any = None,
        funnel: Any = None,
        nprobe: Any = None,
        refine: Any = None,
        exact: Any = False,
        precision: Any = None,
        rescore: Any = None,
    ) -> SearchRequest:
        """Check every argument (typed errors from :mod:`embtools.errors`) and resolve ``where``
        to positions (or take ``positions`` already resolved). ``nprobe`` and ``refine`` (ints
        >= 1) tune an index search, ``exact=True`` forbids it. ``precision="binary"``/``"int8"``
        with ``rescore=r`` is the funnel ``[(precision, r * k)]``."""
        k = check_k(k)
        if nprobe is not None:
            nprobe = check_k(nprobe, "nprobe")
        if refine is not None:
            refine = check_k(refine, "refine")
        if not isinstance(exact, (bool, np.bool_)):
            raise InvalidArgumentError(f"exact must be True or False, got {exact!r}")
        metric = check_metric(metric)
        if batch_rows is not None:
            batch_rows = check_k(batch_rows, "batch_rows")
        screen = check_screen(screen)
        q, _ = prepare_queries(queries)
        dim = search_dimension(source, dimension, q.shape[1])
        if where is not None:
            from embtools.search.filters import select_positions

            positions = select_positions(source, where)
        precision, funnel = _precision_funnel(precision, rescore, funnel, k)
        stages = None if funnel is None else tuple(parse_funnel(funnel, dim, k))
        n_sel = int(source.num_rows if positions is None else len(positions))
        pos = None if positions is None else _read_only(np.asarray(positions, dtype=np.int64))
        return cls(_read_only(q), dim, k, metric, pos, n_sel, batch_rows, screen, stages,
                   nprobe, refine, bool(exact), precision)

    @property
    def nq(self) -> int:
        """Number of queries."""
        return int(self.queries.shape[0])

    @property
    def kk(self) -> int:
        """Rows each query gets: ``min(k, n_sel)``."""
        return min(self.k, self.n_sel)

    @property
    def largest(self) -> bool:
        """Whether larger scores are better (cosine, dot; not l2)."""
        return self.metric != "l2"

    def replace(self, **changes: Any) -> SearchRequest:
        """A copy with some fields changed (e.g. a subset of the queries, another ``k``)."""
        return dataclasses.replace(self, **changes)

    def subset(self, rows: Any) -> SearchRequest:
        """The same search for some of the queries (``rows``: indices or a slice)."""
        return self.replace(queries=_read_only(np.ascontiguousarray(self.queries[rows])))

    def at_dim(self, dim: int, k: int | None = None) -> SearchRequest:
        """The same search with the ``dim``-dimensional prefix of the queries (a funnel stage),
        for the top ``k`` (default ``self.k``)."""
        q = _read_only(np.ascontiguousarray(self.queries[:, :dim]))
        return self.replace(queries=q, dim=dim, k=self.k if k is None else k)

    def to_positions(self, ordinals: np.ndarray) -> np.ndarray:
        """Positions of ``ordinals`` into the selection."""
        return ordinals if self.positions is None else self.positions[ordinals]


@dataclass(frozen=True)
class SearchContext:
    """Where a search runs: the vector ``source``, the compute ``backend`` and the memory ``budget``."""

    source: Any
    backend: Any
    budget: MemoryBudget
    #: ``find_index(dim, metric)``: the store's index probe for the open version, or None
    find_index: Any = None

    @classmethod
    def of(cls, store: Any) -> SearchContext:
        """The context of an EmbeddingStore(-like object)."""
        return cls(store.source, store.backend, store.budget, getattr(store, "find_index", None))


@dataclass(frozen=True)
class TopK:
    """A search's result: ``scores`` float32 and ``positions`` int64, both ``(nq, kk)``, best first."""

    scores: np.ndarray
    positions: np.ndarray

    @classmethod
    def empty(cls, nq: int) -> TopK:
        """No rows for ``nq`` queries."""
        return cls(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64))

