"""The `Backend` base class: every operation written once over an array namespace.

A backend wraps one array framework (NumPy, PyTorch, MLX) on one device. The maths (dot products,
cosine similarity, normalisation, scoring, the top-k kernel) is written here once against the
framework's array namespace ``self.xp`` (array-api-compat for NumPy and torch, ``mlx.core`` for MLX);
subclasses supply only what really differs: array creation and dtypes, device moves, random numbers,
memory size and the fast per-row selection used by ``top_k``.

Examples
--------
>>> from embtools.backends import get_backend
>>> b = get_backend("numpy")
>>> x = b.create_array([[3.0, 4.0], [0.0, 0.0]])
>>> b.to_numpy(b.normalize(x)).tolist()
[[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embtools.backends.abilities import SupportsRunningTopK, SupportsScaledScores
from embtools.backends.frameworks import is_foreign_array, to_numpy
from embtools.errors import (
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidEmbeddingsError,
)
from embtools.kernels.numpy_tiles import inverse_norms

__all__ = ["DEFAULT_BLOCK_ROWS", "METRICS", "Backend"]

#: Corpus rows scored per block by :meth:`Backend.top_k_cosine_neighbors` when no batch size is given.
DEFAULT_BLOCK_ROWS = 16384
#: Metrics understood by :meth:`Backend.score_block`; ``l2`` is smaller-is-better.
METRICS = ("cosine", "dot", "l2")
_HALF = ("float16", "bfloat16")


def check_k(k: Any, name: str = "k") -> int:
    """Return ``k`` as an int, or raise InvalidArgumentError unless it is a positive integer
    (booleans refused; ``name`` is the argument named in the message)."""
    if isinstance(k, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {k!r}")
    try:
        k_int = operator.index(k)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {k!r}") from None
    if k_int <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {k_int}")
    return k_int


def check_metric(metric: Any) -> str:
    """Return ``metric`` lower-cased, or raise InvalidArgumentError naming the known metrics."""
    if not isinstance(metric, str) or metric.lower() not in METRICS:
        raise InvalidArgumentError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric.lower()


class Backend(ABC):
    """One array framework on one device, with the seed's operations and the top-k kernel.

    Arrays passed in may be this backend's arrays or NumPy arrays (converted with
    :meth:`from_numpy`, zero-copy where the framework allows). Floating results are float32 unless
    both inputs are float64; float16/bfloat16 inputs are computed in float32.

    Examples
    --------
    >>> from embtools.backends import get_backend
    >>> b = get_backend("numpy")
    >>> idx, sim = b.top_k_cosine_neighbors(b.create_array([[1.0, 0.0]]),
    ...                                     b.create_array([[0.0, 1.0], [2.0, 0.1]]), k=1)
    >>> b.to_numpy(idx).tolist()
    [[1]]
    """

    #: "numpy" | "torch" | "mlx"
    name: str = ""
    #: "cpu", "cuda:0", "mps", "gpu"
    device: str = "cpu"
    #: the array namespace the shared maths runs on
    xp: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"

    # ------------------------------------------------------------------ per-framework hooks
    @abstractmethod
    def is_array(self, x: Any) -> bool:
        """True when ``x`` is this framework's array type (on any device)."""

    @abstractmethod
    def resolve_dtype(self, dtype: Any) -> Any:
        """The framework dtype for a name (``"float32"``, ``"bfloat16"``...), NumPy or framework dtype."""

    @abstractmethod
    def dtype_name(self, dtype: Any) -> str:
        """The canonical name (``"float32"``) of a framework dtype."""

    @abstractmethod
    def _asarray(self, data: Any, dtype: Any) -> Any:
        """Data (lists, NumPy or this framework's arrays) as a new array of ``dtype`` on the device."""

    @abstractmethod
    def from_numpy(self, a: np.ndarray) -> Any:
        """A NumPy array as this backend's array on its device (zero-copy where possible)."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """This backend's array as NumPy (zero-copy where possible; bfloat16 becomes float32)."""

    @abstractmethod
    def zeros(self, shape: int | Sequence[int], dtype: Any = None) -> Any:
        """An array of zeros (float32 unless ``dtype`` says otherwise)."""

    @abstractmethod
    def ones(self, shape: int | Sequence[int], dtype: Any = None) -> Any:
        """An array of ones (float32 unless ``dtype`` says otherwise)."""

    @abstractmethod
    def random_normal(
        self, shape: int | Sequence[int], seed: int | None = None, dtype: Any = None
    ) -> Any:
        """Standard normal samples (float32 unless ``dtype`` says otherwise); same seed, same values."""

    @abstractmethod
    def get_memory_usage(self, x: Any) -> int:
        """Bytes held by the elements of ``x``."""

    @abstractmethod
    def _kth_value(self, scores: Any, k: int) -> Any:
        """Per row of 2-D ``scores``, its k-th largest value (1 <= k <= columns)."""

    def _block_bound(self, scores: Any, k: int) -> Any:
        """Per row, a value <= the k-th largest, such that few values are above it."""
        return self._kth_value(scores, k)

    def _normalize_block(self, x: Any, scratch: dict[str, Any]) -> Any:
        """:meth:`normalize` for a corpus block of a streaming loop; the result is only used until
        the next call, so a backend may reuse memory kept in ``scratch`` (one dict per loop)."""
        return self.normalize(x)

    def take_along_axis(self, x: Any, indices: Any, axis: int = -1) -> Any:
        """Elements of ``x`` at ``indices`` along ``axis`` (NumPy ``take_along_axis``)."""
        return self.xp.take_along_axis(self._coerce(x), self._coerce(indices), axis=axis)

    def synchronize(self) -> None:
        """Wait until queued work on the device is done (a no-op on synchronous devices)."""
        return None

    # ------------------------------------------------------------------ conversion helpers
    def _coerce(self, x: Any) -> Any:
        """``x`` as this backend's array: own arrays as they are, NumPy zero-copy, others converted."""
        if self.is_array(x):
            return x
        return self.from_numpy(x if isinstance(x, np.ndarray) else to_numpy(x))

    def _float(self, x: Any) -> Any:
        """``x`` as a float array for computing: float64 stays, everything else becomes float32."""
        x = self._coerce(x)
        name = self.get_dtype(x)
        if name in ("float32", "float64"):
            return x
        if name == "bool" or name.startswith(("complex", "object", "str")):
            raise InvalidArgumentError(f"expected a real numeric array, got dtype {name}")
        return self.xp.astype(x, self.resolve_dtype("float32"))

    def _pair(self, a: Any, b: Any) -> tuple[Any, Any]:
        """Both as float arrays of one dtype (float64 only when both are float64)."""
        a, b = self._float(a), self._float(b)
        f32 = self.resolve_dtype("float32")
        if self.get_dtype(a) != self.get_dtype(b):
            a, b = self.xp.astype(a, f32), self.xp.astype(b, f32)
        return a, b

    def _block_pair(self, queries: Any, block: Any) -> tuple[Any, Any]:
        """:meth:`_pair` of a fused ``block_top_k``'s 2-D queries and block of one dimension."""
        q, c = self._pair(queries, block)
        if q.ndim != 2 or c.ndim != 2:
            raise InvalidArgumentError("block_top_k takes 2-D queries and a 2-D block")
        if q.shape[1] != c.shape[1]:
            raise DimensionMismatchError(
                f"block_top_k: dimensions differ ({q.shape[1]} != {c.shape[1]})"
            )
        return q, c

    # ------------------------------------------------------------------ the seed's operations
    def create_array(self, data: Any, dtype: Any = None) -> Any:
        """A new array from lists, NumPy or any backend's array; float32 unless ``dtype`` is given.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> get_backend("numpy").create_array([1, 2]).dtype.name
        'float32'
        """
        target = self.resolve_dtype("float32" if dtype is None else dtype)
        if not isinstance(data, np.ndarray) and not self.is_array(data):
            if is_foreign_array(data):
                data = to_numpy(data)
            else:
                try:
                    data = np.asarray(data)
                except ValueError as err:
                    raise InvalidEmbeddingsError(
                        f"cannot make an array from the data: {err}"
                    ) from None
                if data.dtype == object:
                    raise InvalidEmbeddingsError(
                        "ragged or non-numeric data cannot become an array"
                    )
        return self._asarray(data, target)

    def get_shape(self, x: Any) -> tuple[int, ...]:
        """The shape as a tuple of ints."""
        return tuple(int(s) for s in x.shape)

    def get_dtype(self, x: Any) -> str:
        """The dtype's canonical name, e.g. ``"float32"`` (the same string on every backend)."""
        return self.dtype_name(x.dtype)

    def dot(self, a: Any, b: Any) -> Any:
        """``np.dot`` semantics: inner product of vectors, matrix-vector and matrix products.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> float(b.dot(b.create_array([1, 2]), b.create_array([3, 4])))
        11.0
        """
        a, b = self._pair(a, b)
        if a.ndim == 0 or b.ndim == 0:
            raise InvalidArgumentError("dot needs arrays of at least one dimension")
        axis_b = 0 if b.ndim == 1 else b.ndim - 2
        if a.shape[-1] != b.shape[axis_b]:
            raise DimensionMismatchError(
                f"dot: shapes {self.get_shape(a)} and {self.get_shape(b)} are not aligned "
                f"({a.shape[-1]} != {b.shape[axis_b]})"
            )
        return self.xp.tensordot(a, b, axes=([a.ndim - 1], [axis_b]))

    def normalize(self, x: Any, axis: int = -1) -> Any:
        """L2-normalise along ``axis``; zero vectors stay zero (never NaN).

        Raises InvalidEmbeddingsError for NaN or infinite values.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> b.to_numpy(b.normalize(b.create_array([0.0, 2.0]))).tolist()
        [0.0, 1.0]
        """
        xp = self.xp
        x = self._float(x)
        norm = xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))
        if not bool(xp.all(xp.isfinite(norm))) or bool(xp.any(norm < 2.0**-50)):
            # squares that overflow, or that underflow or lose precision (tiny vectors; zero
            # vectors land here too), or NaN/inf in the data: scale by the largest magnitude first
            if not bool(xp.all(xp.isfinite(x))):
                raise InvalidEmbeddingsError("cannot normalize: the array contains NaN or inf")
            scale = xp.max(xp.abs(x), axis=axis, keepdims=True)
            x = x / xp.where(scale > 0, scale, xp.ones_like(scale))
            norm = xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))
        safe = xp.where(norm > 0, norm, xp.ones_like(norm))
        return x / safe

    def cosine_similarity(self, a: Any, b: Any) -> Any:
        """Cosine similarity of every row of ``a`` with every row of ``b``: shape ``(n, m)``.

        1-D inputs are one row and their axis is dropped from the result (two vectors give a
        0-d array). A zero vector has similarity 0 with everything.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> b.to_numpy(b.cosine_similarity(b.create_array([1, 0]), b.create_array([[1, 0], [0, 0]]))).tolist()
        [1.0, 0.0]
        """
        a, b = self._pair(a, b)
        if a.ndim not in (1, 2) or b.ndim not in (1, 2):
            raise InvalidArgumentError("cosine_similarity takes 1-D or 2-D arrays")
        if a.shape[-1] != b.shape[-1]:
            raise DimensionMismatchError(
                f"cosine_similarity: dimensions differ ({a.shape[-1]} != {b.shape[-1]})"
            )
        a2 = a if a.ndim == 2 else self.xp.reshape(a, (1, -1))
        b2 = b if b.ndim == 2 else self.xp.reshape(b, (1, -1))
        sims = self.xp.clip(self.matmul_t(self.normalize(a2), self.normalize(b2)), -1.0, 1.0)
        if b.ndim == 1:
            sims = sims[:, 0]
        if a.ndim == 1:
            sims = sims[0, ...]
        return sims

    def concatenate(self, arrays: Sequence[Any], axis: int = 0) -> Any:
        """Join arrays along an existing axis."""
        xs = self._many(arrays, "concatenate")
        try:
            return self.xp.concat(xs, axis=axis)
        except (ValueError, RuntimeError, IndexError) as err:
            raise DimensionMismatchError(f"concatenate: {err}") from None

    def stack(self, arrays: Sequence[Any], axis: int = 0) -> Any:
        """Join arrays of equal shape along a new axis."""
        xs = self._many(arrays, "stack")
        if len({self.get_shape(x) for x in xs}) > 1:
            raise DimensionMismatchError(
                f"stack needs equal shapes, got {[self.get_shape(x) for x in xs]}"
            )
        return self.xp.stack(xs, axis=axis)

    def _many(self, arrays: Sequence[Any], what: str) -> list[Any]:
        xs = [self._coerce(x) for x in arrays]
        if not xs:
            raise InvalidArgumentError(f"{what} needs at least one array")
        names = {self.get_dtype(x) for x in xs}
        if len(names) > 1:
            xs = [self._float(x) for x in xs]
            if len({self.get_dtype(x) for x in xs}) > 1:
                f32 = self.resolve_dtype("float32")
                xs = [self.xp.astype(x, f32) for x in xs]
        return xs

    def slice_last_dim(self, x: Any, d: int) -> Any:
        """The first ``d`` entries of the last axis (a Matryoshka prefix); a view where possible."""
        x = self._coerce(x)
        full = int(x.shape[-1]) if x.ndim else 0
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= full:
            raise DimensionMismatchError(
                f"slice_last_dim: d must be an integer in 1..{full}, got {d!r}"
            )
        return x[..., : int(d)]

    def save(self, x: Any, path: str | Path) -> None:
        """Write ``x`` to ``.npy`` (or ``.npz``, key ``"array"``); bfloat16 is stored as float32."""
        p = Path(path)
        a = np.ascontiguousarray(self.to_numpy(self._coerce(x)))
        suffix = p.suffix.lower()
        if suffix == ".npy":
            np.save(p, a, allow_pickle=False)
        elif suffix == ".npz":
            np.savez(p, array=a)
        else:
            raise InvalidArgumentError(f"save writes .npy or .npz files, not {p.name!r}")

    def load(self, path: str | Path) -> Any:
        """Read a ``.npy`` or ``.npz`` file written by :meth:`save` (never unpickles anything)."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".npy", ".npz"):
            raise InvalidArgumentError(f"load reads .npy or .npz files, not {p.name!r}")
        try:
            loaded = np.load(p, allow_pickle=False)
            if suffix == ".npz":
                with loaded as archive:
                    keys = list(archive.keys())
                    if len(keys) != 1 and "array" not in keys:
                        raise InvalidArgumentError(
                            f"{p.name} holds {len(keys)} arrays {keys}; expected one"
                        )
                    loaded = archive["array" if "array" in keys else keys[0]]
        except ValueError as err:
            if isinstance(err, InvalidArgumentError):
                raise
            raise InvalidArgumentError(
                f"cannot load {p.name}: {err} (pickled object arrays are refused)"
            ) from None
        return self.from_numpy(loaded)

    # ------------------------------------------------------------------ the top-k kernel
    def matmul_t(self, a: Any, b: Any) -> Any:
        """``a @ b.T`` for 2-D arrays; float32 result unless both are float64."""
        a, b = self._pair(a, b)
        if a.ndim != 2 or b.ndim != 2:
            raise InvalidArgumentError("matmul_t takes 2-D arrays")
        if a.shape[1] != b.shape[1]:
            raise DimensionMismatchError(
                f"matmul_t: dimensions differ ({a.shape[1]} != {b.shape[1]})"
            )
        return self.xp.matmul(a, self.xp.matrix_transpose(b))

    def score_block(self, queries: Any, block: Any, metric: str = "cosine") -> Any:
        """Scores ``(nq, nb)``: ``q @ c.T`` for cosine (inputs already normalised) and dot,
        squared Euclidean distance for l2."""
        metric = check_metric(metric)
        scores = self.matmul_t(queries, block)
        if metric != "l2":
            return scores
        xp = self.xp
        q, c = self._pair(queries, block)
        qq = xp.sum(q * q, axis=1, keepdims=True)
        cc = xp.reshape(xp.sum(c * c, axis=1), (1, -1))
        d = qq + cc - 2 * scores
        return xp.where(d > 0, d, xp.zeros_like(d))

    def top_k(self, scores: Any, k: int, largest: bool = True) -> tuple[Any, Any]:
        """Per row of 1-D or 2-D ``scores``: ``(values, indices)`` of the best ``k``, sorted.

        Descending when ``largest`` (else ascending); ties go to the lower index; indices are int64;
        ``k`` is clipped to the row length; ``k <= 0`` raises InvalidArgumentError.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> v, i = b.top_k(b.create_array([0.5, 0.9, 0.5, 0.1]), 3)
        >>> i.tolist(), [round(float(x), 2) for x in v]
        ([1, 0, 2], [0.9, 0.5, 0.5])
        """
        k = check_k(k)
        s = self._coerce(scores)
        if s.ndim not in (1, 2):
            raise InvalidArgumentError("top_k takes a 1-D or 2-D array of scores")
        s2 = s if s.ndim == 2 else self.xp.reshape(s, (1, -1))
        if not largest:
            s2 = -s2
        values, indices = self._select(s2, min(k, int(s2.shape[1])), self._kth_value)
        if not largest:
            values = -values
        if s.ndim == 1:
            return values[0], indices[0]
        return values, indices

    def _select(self, s: Any, k: int, bound: Any) -> tuple[Any, Any]:
        """Top ``k`` (largest first, ties by lower index) of each row of 2-D ``s``.

        ``bound(s, k)`` gives per row a value that at least ``k`` entries reach; every entry that
        reaches it becomes a candidate and the candidates are ordered exactly. Rows holding NaN
        fall back to a full stable sort (NaN last).
        """
        xp = self.xp
        nq = int(s.shape[0])
        if k == 0 or nq == 0:
            return s[:, :0], xp.astype(
                xp.zeros((nq, 0), dtype=s.dtype), self.resolve_dtype("int64")
            )
        lb = bound(s, k)
        rows, cols = xp.nonzero(s >= xp.reshape(lb, (-1, 1)))
        counts = xp.bincount(rows, minlength=nq) if hasattr(xp, "bincount") else None
        if counts is None or int(xp.min(counts)) < k:
            return self._select_sorted(s, k)
        vals = s[rows, cols]
        # order by row, then value descending, then column (nonzero gives rows, cols ascending)
        order = xp.argsort(-vals, stable=True)
        order = order[xp.argsort(rows[order], stable=True)]
        starts = xp.cumulative_sum(counts) - counts
        arange_k = xp.arange(k, dtype=starts.dtype, device=_device_of(starts))
        pick = order[xp.reshape(starts, (-1, 1)) + xp.reshape(arange_k, (1, -1))]
        int64 = self.resolve_dtype("int64")
        return vals[pick], xp.astype(cols[pick], int64)

    def _select_sorted(self, s: Any, k: int) -> tuple[Any, Any]:
        """Exact top-k by a full stable sort per row; NaN counts as the smallest value."""
        xp = self.xp
        key = xp.where(xp.isnan(s), xp.full_like(s, -math.inf), s)
        order = xp.argsort(-key, axis=1, stable=True)[:, :k]
        return xp.take_along_axis(s, order, axis=1), xp.astype(order, self.resolve_dtype("int64"))

    def block_top_k(
        self, queries: Any, block: Any, k: int, metric: str = "cosine"
    ) -> tuple[Any, Any]:
        """Best ``k`` of one block per query: ``(values, local_indices)``, best first, ties by
        lower index (l2: smallest first)."""
        k = check_k(k)
        metric = check_metric(metric)
        scores = self.score_block(queries, block, metric)
        if metric == "l2":
            scores = -scores
        values, indices = self._select(scores, min(k, int(scores.shape[1])), self._block_bound)
        return (-values if metric == "l2" else values), indices

    def merge_top_k(
        self,
        values_a: Any,
        indices_a: Any,
        values_b: Any,
        indices_b: Any,
        k: int,
        largest: bool = True,
    ) -> tuple[Any, Any]:
        """Merge two sorted top-k lists (2-D, one row per query, global indices) into one.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> import numpy as np
        >>> v, i = b.merge_top_k(np.array([[0.9, 0.5]]), np.array([[4, 7]]),
        ...                      np.array([[0.5, 0.2]]), np.array([[2, 9]]), k=3)
        >>> i.tolist()
        [[4, 2, 7]]
        """
        k = check_k(k)
        xp = self.xp
        values = xp.concat([self._coerce(values_a), self._coerce(values_b)], axis=-1)
        int64 = self.resolve_dtype("int64")
        indices = xp.concat(
            [xp.astype(self._coerce(indices_a), int64), xp.astype(self._coerce(indices_b), int64)],
            axis=-1,
        )
        key = values if largest else -values
        order = xp.argsort(indices, axis=-1, stable=True)
        key = xp.take_along_axis(key, order, axis=-1)
        order2 = xp.argsort(-key, axis=-1, stable=True)[..., :k]
        order = xp.take_along_axis(order, order2, axis=-1)
        return xp.take_along_axis(values, order, axis=-1), xp.take_along_axis(
            indices, order, axis=-1
        )

    def top_k_cosine_neighbors(
        self, queries: Any, corpus: Any, k: int, batch_size: int | None = None
    ) -> tuple[Any, Any]:
        """Exact k nearest rows of ``corpus`` by cosine similarity: ``(indices, similarities)``.

        Streams the corpus in blocks of ``batch_size`` rows (default 16384) through
        :meth:`block_top_k` and :meth:`merge_top_k`: the same kernel the search engine uses.
        As in the seed, a 1-D query is one row (results of shape ``(1, k)``) and a ``k`` above the
        number of corpus rows raises InvalidArgumentError (a ValueError). Ties go to the lower
        corpus index.

        Examples
        --------
        >>> from embtools.backends import get_backend
        >>> b = get_backend("numpy")
        >>> idx, sim = b.top_k_cosine_neighbors([1.0, 0.0], [[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]], k=2)
        >>> idx.tolist()
        [[2, 1]]
        """
        k = check_k(k)
        q = self._float(queries)
        c = self._coerce(corpus)
        if q.ndim not in (1, 2) or c.ndim != 2:
            raise InvalidArgumentError("queries must be 1-D or 2-D and the corpus 2-D")
        q2 = q if q.ndim == 2 else self.xp.reshape(q, (1, -1))
        if q2.shape[1] != c.shape[1]:
            raise DimensionMismatchError(
                f"queries have dimension {q2.shape[1]} but the corpus has {c.shape[1]}"
            )
        n = int(c.shape[0])
        if n == 0:
            raise InvalidArgumentError("the corpus is empty")
        if k > n:
            raise InvalidArgumentError(f"k={k} exceeds the corpus size ({n} rows)")
        rows = DEFAULT_BLOCK_ROWS if batch_size is None else check_k(batch_size)
        qn = self.normalize(q2)
        best: tuple[Any, Any] | None = None
        scratch: dict[str, Any] = {}
        # fused kernels score raw float32 blocks scaled by inverse row norms (no normalised copy)
        # and merge each block into the running top-k themselves
        fused = (
            isinstance(self, SupportsScaledScores)
            and isinstance(self, SupportsRunningTopK)
            and self.dtype_name(c.dtype) == "float32"
        )
        for start in range(0, n, rows):
            raw = c[start : start + rows]
            scale = inverse_norms(raw) if fused else None
            if scale is not None:
                assert isinstance(self, SupportsRunningTopK)
                best = self.block_top_k_running(qn, raw, k, "cosine", best, start, scale)
                continue
            blk = self._normalize_block(raw, scratch)
            values, local = self.block_top_k(qn, blk, k, "cosine")
            glob = local + start
            best = (values, glob) if best is None else self.merge_top_k(*best, values, glob, k)
        assert best is not None
        sims, idx = best
        sims = self.xp.clip(sims, -1.0, 1.0)
        return idx, sims


def _device_of(x: Any) -> Any:
    """The array-API device of ``x`` (None when the framework has no device attribute)."""
    try:
        from array_api_compat import device

        return device(x)
    except Exception:  # pragma: no cover - frameworks without array-API devices
        return None
