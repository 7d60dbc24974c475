"""Search over the quantized columns: shortlists from binary or int8 codes, re-ranked exactly.

``search(Q, k, precision="binary", rescore=10)`` is the funnel ``[("binary", 10 k)]``: the
selected rows' sign codes pick ``10 k`` candidates per query, and the float64 re-rank of
:mod:`embtools.search.refine` scores those from the float vectors and returns the top ``k``.
``precision="int8"`` shortlists from the int8 codes instead, and a funnel may chain quantized
stages before the float re-rank: ``funnel=[("binary", 400), ("int8", 40)]``.

- **binary**: a query's sign bits against the rows' (Hamming distance, ties to the lower
  position, equal to FAISS ``IndexBinaryFlat``; batches of queries use FAISS' ``knn_hamming``
  where FAISS is installed, the rows split over threads) keep ``BINARY_WIDEN`` times the shortlist, and the float query
  against those rows' +-1 sign vectors (asymmetric, ``q . sign(x)``, as usearch does) keeps the
  shortlist. ``BINARY_MODE = "hamming"`` skips the asymmetric step; on the MiniLM set the
  asymmetric order keeps far more of the exact top 10 at the same shortlist size (recall@10 of
  binary + float rescoring at x4: 0.97 against 0.89, ``benchmarks/quantized.py``), so it is
  the default. Scoring every row asymmetrically costs as much as the float32 search itself in
  NumPy; the Hamming pass reads 1/32 of the bytes.
- **int8**: each row's bucket centres (:func:`embtools.kernels.codes.decode_int8`) scored like
  float rows (cosine by their norms, dot, l2) with the tile kernel.

Every pass reads the codes in batches (views of the mapped files where the layout allows) and
holds a workspace that :func:`size_codes` fits under the memory cap.

Examples
--------
>>> import numpy as np, embtools as et
>>> store = et.EmbeddingStore(None, backend="numpy")
>>> x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
>>> _ = store.add_embeddings(x, dimension=16)
>>> _ = store.quantize(16)
>>> store.search(x[3], k=2, precision="binary")["row_id"].to_list()[0]
3
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtools.errors import InvalidArgumentError
from embtools.kernels.codes import decode_int8, int8_steps, pack_signs, sign_bytes
from embtools.kernels.hamming import (
    MATMUL_QUERIES,
    TILE_BYTES,
    HammingStream,
    merge_smallest,
    sign_scores,
    sign_scores64,
)
from embtools.kernels.jit import jit_kernels
from embtools.kernels.numpy_tiles import select_top_k, tile_bytes
from embtools.kernels.threads import one_blas_thread
from embtools.search.request import DEFAULT_RESCORE, PRECISIONS, SearchContext, SearchRequest
from embtools.storage.quantized import gather_codes, iter_codes
from embtools.storage.quantspec import code_column, code_width

__all__ = [
    "BINARY_MODES",
    "BINARY_WIDEN",
    "DEFAULT_RESCORE",
    "PRECISIONS",
    "CodeSizes",
    "code_rerank",
    "code_rerank_bytes",
    "code_shortlist",
    "codes_min_bytes",
    "quantized_spec",
    "size_codes",
]

#: how a binary stage ranks rows: Hamming distance then the asymmetric score of the best
#: ``BINARY_WIDEN`` x shortlist ("asymmetric"), or Hamming distance alone ("hamming")
BINARY_MODES = ("asymmetric", "hamming")
BINARY_MODE = "asymmetric"
BINARY_WIDEN = 4
#: rows decoded at a time by an int8 pass (its float32 tile stays a few MiB)
DECODE_BYTES = 4 * 1024**2
#: bytes of candidates' codes and decoded rows re-ranked at a time by a later funnel stage
RERANK_GROUP_BYTES = 64 * 1024**2
#: without a cap, a pass's workspace is kept about this size
DEFAULT_WORKSPACE_BYTES = 256 * 1024**2
#: rows read per batch at most (a batch's per-row workspace: distances or scores)
MAX_BATCH_ROWS = 1 << 18
#: queries of a binary pass up to which the compiled scan keeps its candidates' codes (a few
#: queries: no gather of the shortlist's codes afterwards; batches gather them, one pass)
KEEP_CODES_QUERIES = 16


def quantized_spec(source: Any, dim: int, kind: str) -> Any:
    """The :class:`~embtools.storage.quantspec.QuantSpec` of ``dim`` when the source holds
    ``kind`` codes of it, else InvalidArgumentError saying how to add them."""
    specs = getattr(source, "quantized", None) or {}
    spec = specs.get(dim)
    if spec is None or kind not in spec.kinds:
        have = {d: s.kinds for d, s in specs.items()}
        raise InvalidArgumentError(
            f"the store holds no {kind} codes of dimension {dim} (quantized: {have or 'none'}); "
            f"run store.quantize({dim}, kinds=[{kind!r}]) first")
    return spec


@dataclass(frozen=True)
class CodeSizes:
    """How a pass over the codes is cut: ``group`` queries per pass, ``rows`` per batch, and the
    bytes of workspace it holds."""

    group: int
    rows: int
    nbytes: int


def _fixed_bytes(kind: str, dim: int, group: int, m: int) -> int:
    """Workspace that does not grow with the batch: kernel tiles and running top-k buffers."""
    running = group * m * 24 * 2
    if kind == "int8":
        decode_rows = max(1, DECODE_BYTES // (4 * dim))
        return DECODE_BYTES + decode_rows * (group + 1) * 12 + group * dim * 8 + running
    widened = m * BINARY_WIDEN
    nbytes = sign_bytes(dim)
    tiles = 2 * TILE_BYTES + (tile_bytes(group, widened, 8 * nbytes) if group >= MATMUL_QUERIES
                              else nbytes * 256 * 4)  # batches: +-1 tiles; one query: its table
    gathered = group * widened * (nbytes + 24 * 2)  # the Hamming shortlist and its codes
    return tiles + gathered + running


def _row_bytes(kind: str, dim: int, group: int = 1) -> int:
    """Per batch row: the codes themselves (a mapped view counts) and a distance or score (int8:
    one per query of the group, and the selection's mask)."""
    return code_width(dim, kind) + 8 + (5 * group if kind == "int8" else 0)


def codes_min_bytes(kind: str, dim: int, m: int) -> int:
    """The fewest bytes a pass needs: one query, one row at a time."""
    return _fixed_bytes(kind, dim, 1, m) + _row_bytes(kind, dim)


def size_codes(avail: int | None, nq: int, kind: str, dim: int, m: int, n_rows: int,
               batch_rows: int | None = None) -> CodeSizes | None:
    """Size a pass keeping ``m`` rows per query for ``nq`` queries over ``n_rows`` rows in
    ``avail`` bytes (None: no cap); None when not even :func:`codes_min_bytes` fit."""
    if avail is not None and avail < codes_min_bytes(kind, dim, m):
        return None
    group = nq
    while True:
        fixed = _fixed_bytes(kind, dim, group, m)
        per_row = _row_bytes(kind, dim, group)
        room = None if avail is None else avail - fixed
        if room is not None and room >= per_row:
            break
        if room is None:
            break
        if group == 1:
            return None
        group = max(1, group // 2)
    rows = max(1, min(n_rows, MAX_BATCH_ROWS, batch_rows or MAX_BATCH_ROWS))
    if room is None:  # no cap: batches of about DEFAULT_WORKSPACE_BYTES
        room = max(per_row, DEFAULT_WORKSPACE_BYTES - fixed)
    rows = max(1, min(rows, room // per_row))
    return CodeSizes(group, rows, fixed + rows * per_row)


def _query_codes(req: SearchRequest) -> np.ndarray:
    return pack_signs(req.queries[:, : req.dim])


def _cos_queries(req: SearchRequest) -> np.ndarray:
    q = np.ascontiguousarray(req.queries[:, : req.dim], dtype=np.float32)
    if req.metric == "cosine":
        n = np.linalg.norm(q, axis=1, keepdims=True)
        q = (q / np.where(n == 0, 1, n)).astype(np.float32)
    return q


def code_shortlist(req: SearchRequest, ctx: SearchContext, kind: str, m: int,
                   sizes: CodeSizes, binary_mode: str | None = None) -> np.ndarray:
    """The best ``m`` selected positions per query ``(nq, min(m, n_sel))`` by ``kind`` codes
    (``binary_mode``: one of ``BINARY_MODES``, default ``BINARY_MODE``)."""
    m = min(m, req.n_sel)
    binary_mode = binary_mode or BINARY_MODE
    spec = quantized_spec(ctx.source, req.dim, kind)
    out = np.empty((req.nq, m), np.int64)
    with ctx.budget.holding(f"codes/{id(out)}", sizes.nbytes, f"a {kind} pass over the codes",
                            "raise max_memory_gb"):
        for a in range(0, req.nq, sizes.group):
            sub = req.subset(slice(a, a + sizes.group))
            if kind == "binary":
                ords = _binary_pass(sub, ctx, m, sizes.rows, binary_mode)
            else:
                ords = _int8_pass(sub, ctx, spec.ranges, m, sizes.rows)
            out[a : a + sizes.group] = req.to_positions(ords)
    return out


def _code_batches(source: Any, dim: int, kind: str, positions: np.ndarray | None, rows: int
                  ) -> Iterator[np.ndarray]:
    """The codes of :func:`~embtools.storage.quantized.iter_codes` without their positions:
    every row's codes (``positions`` None) come straight from the source's chunks, without
    the position array of each batch (8 bytes a row)."""
    chunks = getattr(source, "binary_chunks", None)
    if positions is not None or chunks is None:
        for _, codes in iter_codes(source, dim, kind, positions, rows):
            yield codes
        return
    for _, n, load, release in chunks(code_column(dim, kind)):
        if n == 0:
            continue
        codes = load()
        for a in range(0, n, rows):
            yield codes[a : a + rows]
        release()


def _binary_pass(req: SearchRequest, ctx: SearchContext, m: int, rows: int, mode: str) -> np.ndarray:
    """Ordinals (into the selection) of the best ``m`` rows per query by sign codes: the
    ``BINARY_WIDEN * m`` nearest by Hamming distance, re-ordered by the asymmetric score
    (``mode="asymmetric"``), or the ``m`` nearest (``"hamming"``); ties to the lower position."""
    nq, dim = req.nq, req.dim
    wide = m if mode == "hamming" else min(req.n_sel, m * BINARY_WIDEN)
    asymmetric = mode != "hamming" and wide > m
    stream = HammingStream(_query_codes(req), wide,
                           keep_codes=asymmetric and nq <= KEEP_CODES_QUERIES)
    for codes in _code_batches(ctx.source, dim, "binary", req.positions, rows):
        stream.add(codes)  # compiled kernel, FAISS knn_hamming or NumPy; rows split over threads
    best_i = stream.result()[1]
    if not asymmetric:
        return best_i[:, :m]
    # the asymmetric score of the Hamming shortlist picks the final m
    q = _cos_queries(req)
    kept = stream.codes()
    if kept is not None:  # copied by the scan as the rows entered its buffers
        codes = kept
    else:
        pos = req.to_positions(best_i)
        codes = gather_codes(ctx.source, dim, "binary", pos.reshape(-1)).reshape(nq, wide, -1)
    jit = jit_kernels("hamming_jit")
    if jit is not None:  # the same float64 order, in one compiled call
        return jit.sign_select(q, codes, best_i, m)  # type: ignore[no-any-return]
    out = np.empty((nq, m), np.int64)
    for r in range(nq):
        s = sign_scores64(q[r], codes[r], dim)  # float64, as the compiled kernel's
        order = np.lexsort((best_i[r], -s))[:m]
        out[r] = best_i[r][order]
    return out


def _int8_pass(req: SearchRequest, ctx: SearchContext, ranges: np.ndarray, m: int,
               rows: int) -> np.ndarray:
    """Ordinals of the best ``m`` rows per query by the int8 codes' bucket centres
    ``x = a + b c`` (``a = lo + 128.5 step``, ``b = step``): ``q . x = (q b) . c + q . a`` and
    ``|x|^2 = |a|^2 + 2 (a b) . c + b^2 . c^2``, so a tile of codes is converted to float32 once
    and multiplied, never decoded."""
    q = _cos_queries(req).astype(np.float64)
    starts, steps = int8_steps(ranges)
    b = steps.astype(np.float64)
    a = starts.astype(np.float64) + 128.5 * b
    g, dim = q.shape[0], req.dim
    weights = np.vstack([q * b, a * b]).astype(np.float32)  # (g + 1, dim)
    const = q @ a  # (g,)
    b2 = (b * b).astype(np.float32)
    aa = float(a @ a)
    qq = (q * q).sum(axis=1)
    step = max(1, DECODE_BYTES // (4 * dim))
    buf = np.empty((step, dim), np.float32)
    best_v = np.zeros((g, 0), np.float64)
    best_i = np.zeros((g, 0), np.int64)
    seen = 0
    # matrix-vector products of each tile: BLAS threads only cost (see one_blas_thread)
    with one_blas_thread() if g + 1 < MATMUL_QUERIES else contextlib.nullcontext():
        for _, codes in iter_codes(ctx.source, dim, "int8", req.positions, rows):
            n = codes.shape[0]
            scores = np.empty((g, n), np.float32)  # larger is better (l2: negated distance)
            for s in range(0, n, step):
                e = min(n, s + step)
                cf = buf[: e - s]
                np.copyto(cf, codes[s:e].view(np.int8), casting="unsafe")
                if g + 1 < MATMUL_QUERIES:  # one matrix-vector product each: BLAS' thin gemm is slow
                    prod = np.empty((g + 1, e - s), np.float32)
                    for j in range(g + 1):
                        np.matmul(cf, weights[j], out=prod[j])
                else:
                    prod = np.ascontiguousarray((cf @ weights.T).T)  # (g + 1, rows)
                dots = prod[:g] + const[:, None].astype(np.float32)
                if req.metric == "dot":
                    scores[:, s:e] = dots
                    continue
                np.square(cf, out=cf)
                norms2 = aa + 2.0 * prod[g] + cf @ b2
                if req.metric == "cosine":
                    norm = np.sqrt(np.maximum(norms2, 0.0))
                    scores[:, s:e] = dots / np.where(norm == 0, 1.0, norm)
                else:
                    scores[:, s:e] = 2.0 * dots - norms2 - qq[:, None].astype(np.float32)
            kk = min(m, n)
            v, i = select_top_k(scores, kk)
            best_v, best_i = merge_smallest(np.concatenate([best_v, -v.astype(np.float64)], axis=1),
                                            np.concatenate([best_i, i + seen], axis=1), m)
            seen += n
    return best_i


def code_rerank_bytes(kind: str, dim: int, width: int) -> int:
    """Bytes :func:`code_rerank` holds per query of ``width`` candidates (codes and float64 rows)."""
    return width * (code_width(dim, kind) + dim * 16 + 48)


def code_rerank(req: SearchRequest, ctx: SearchContext, candidates: np.ndarray, kind: str,
                keep: int) -> np.ndarray:
    """The best ``keep`` of each query's candidate positions by ``kind`` codes (a funnel stage
    after the first): positions ``(nq, keep)``. Queries go in groups that fit the cap."""
    spec = quantized_spec(ctx.source, req.dim, kind)
    nq, w = candidates.shape
    keep = min(keep, w)
    per_query = code_rerank_bytes(kind, req.dim, w)
    avail = ctx.budget.available_bytes
    limit = RERANK_GROUP_BYTES if avail is None else min(RERANK_GROUP_BYTES, avail)
    group = max(1, limit // per_query)
    out = np.empty((nq, keep), np.int64)
    q = _cos_queries(req)
    with ctx.budget.holding(f"code-rerank/{id(out)}", min(nq, group) * per_query,
                            f"re-ranking candidates by their {kind} codes", "raise max_memory_gb"):
        for a in range(0, nq, group):
            b = min(nq, a + group)
            codes = gather_codes(ctx.source, req.dim, kind, candidates[a:b].reshape(-1))
            _code_rerank_rows(req, spec, q[a:b], candidates[a:b], codes.reshape(b - a, w, -1),
                              kind, out[a:b])
    return out


def _code_rerank_rows(req: SearchRequest, spec: Any, q: np.ndarray, candidates: np.ndarray,
                      codes: np.ndarray, kind: str, out: np.ndarray) -> None:
    keep = out.shape[1]
    for r in range(q.shape[0]):
        if kind == "binary":
            s = sign_scores(q[r : r + 1], codes[r], req.dim)[0].astype(np.float64)
        else:
            x = decode_int8(codes[r].view(np.int8), spec.ranges).astype(np.float64)
            if req.metric == "l2":
                s = -((x - q[r]) ** 2).sum(axis=1)
            else:
                s = x @ q[r].astype(np.float64)
                if req.metric == "cosine":
                    n = np.linalg.norm(x, axis=1)
                    s = s / np.where(n == 0, 1, n)
        order = np.lexsort((candidates[r], -s))[:keep]
        out[r] = candidates[r][order]
