"""Exact integer products of uint8 codes with int16 weights: the centroid screen's inner loop.

``code_sums(v, codes, out)`` sets ``out[c] = v . codes[c, :len(v)]`` in int32 (the caller keeps
``|v| <= MAX_WEIGHT`` and ``255 * MAX_WEIGHT * len(v)`` within int32). It is the largest step
of a single query on a million rows (4,000 centroids x 384 dimensions: 30 of 61 us).

Where the host has AVX-512 VNNI (Intel Ice Lake and later, AMD Zen 4 and later) the sums run on
``vpdpbusd``, four rows at a time: each weight is split as ``v = 128 * hi + lo`` (``hi`` and
``lo`` int8) and each 64-byte block of a row takes two instructions, against six for LLVM's
widening multiply-adds of the portable loop. Both give the same integers (the sums are exact);
the choice is made once, at import, from the CPU that numba compiles for (no choice is cached
for another CPU: numba's cache is keyed by it). Rows whose width is a multiple of 64 (the
padded centroid codes of :meth:`embtools.index.probe.IvfIndex._coarse_codes`) need no
per-row tail.

Load this module through :func:`embtools.kernels.jit.jit_kernels` (it imports numba).

Examples
--------
>>> import numpy as np
>>> out = np.empty(2, np.int32)
>>> code_sums(np.array([3, -2], np.int16), np.array([[1, 2, 0], [255, 0, 9]], np.uint8), out)
>>> out.tolist()
[-1, 765]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["MAX_WEIGHT", "code_sums", "host_has_vnni", "portable_code_sums", "vnni_code_sums"]

#: the largest ``|v|`` :func:`code_sums` takes: ``128 * hi + lo`` with ``hi`` in -128..127 and
#: ``lo`` in 0..127
MAX_WEIGHT = 16383
#: rows per ``vpdpbusd`` pass: eight independent accumulator chains hide the instruction's latency
_ROWS = 4


def host_has_vnni() -> bool:
    """Whether numba compiles for this host's CPU and it has AVX-512 VNNI (and BW)."""
    try:
        import llvmlite.binding as llb
        from numba.core import config

        if getattr(config, "CPU_NAME", None) or getattr(config, "CPU_FEATURES", None):  # a named target
            return False
        features = llb.get_host_cpu_features()
        return bool(features.get("avx512vnni")) and bool(features.get("avx512bw"))
    except Exception:  # no feature list on this platform
        return False


@njit(nogil=True, cache=True, fastmath=True)
def portable_code_sums(v: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """:func:`code_sums` in plain loops (LLVM's vector multiply-add of 16-bit lanes)."""
    for c in range(codes.shape[0]):
        row = codes[c]
        acc = np.int32(0)
        for t in range(v.shape[0]):
            acc += np.int32(row[t]) * np.int32(v[t])
        out[c] = acc


def _dpbusd_typing(typingctx: Any, codes: Any, first: Any, hi: Any, lo: Any, blocks: Any) -> Any:  # pragma: no cover
    """``(hi . codes[first + r], lo . codes[first + r])`` for ``r < _ROWS``, over the first
    ``64 * blocks`` bytes of each row (``codes`` uint8 C-contiguous, ``hi`` and ``lo`` int8
    C-contiguous), in ``vpdpbusd`` accumulators of sixteen int32 lanes."""
    sig = types.UniTuple(types.int32, 2 * _ROWS)(codes, first, hi, lo, blocks)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        cty, fty, hty, lty, bty = signature.args
        rows = context.make_array(cty)(context, builder, args[0])
        hi_a = context.make_array(hty)(context, builder, args[2])
        lo_a = context.make_array(lty)(context, builder, args[3])
        i32, i64 = ir.IntType(32), ir.IntType(64)
        lanes, block = ir.VectorType(i32, 16), ir.VectorType(ir.IntType(8), 64)
        stride = cgutils.unpack_tuple(builder, rows.strides)[0]
        start = context.cast(builder, args[1], fty, types.int64)
        bases = [builder.gep(rows.data, [builder.mul(builder.add(start, ir.Constant(i64, r)), stride)])
                 for r in range(_ROWS)]
        # the <16 x i32> form of LLVM 14-20; later LLVMs upgrade it to their <64 x i8> form
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(2 * _ROWS)]
        count = context.cast(builder, args[4], bty, types.int64)
        with cgutils.for_range(builder, count) as loop:
            offset = builder.mul(loop.index, ir.Constant(i64, 64))

            def load(ptr: Any) -> Any:
                at = builder.bitcast(builder.gep(ptr, [offset]), block.as_pointer())
                return builder.bitcast(builder.load(at, align=1), lanes)

            w_hi, w_lo = load(hi_a.data), load(lo_a.data)
            for r in range(_ROWS):
                x = load(bases[r])
                for acc, w in ((accs[2 * r], w_hi), (accs[2 * r + 1], w_lo)):
                    builder.store(builder.call(dp, [builder.load(acc), x, w]), acc)
        total = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [lanes]),
                                               "llvm.vector.reduce.add.v16i32")
        sums = [builder.call(total, [builder.load(acc)]) for acc in accs]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


_dpbusd_rows: Any = intrinsic(_dpbusd_typing)


@njit(nogil=True, cache=True)
def vnni_code_sums(v: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """:func:`code_sums` on ``vpdpbusd`` (only on hosts with AVX-512 VNNI: :func:`host_has_vnni`)."""
    p, width = codes.shape
    d = v.shape[0]
    hi = np.zeros(width, np.int8)
    lo = np.zeros(width, np.int8)
    for t in range(d):  # v = 128 * hi + lo, lo in 0..127 (|v| <= MAX_WEIGHT)
        hi[t] = np.int8(np.int32(v[t]) >> 7)
        lo[t] = np.int8(np.int32(v[t]) & 127)
    blocks = width // 64  # the weights are zero past d: padding adds nothing
    tail = min(blocks * 64, d)
    c = 0
    if codes.strides[1] == 1:
        while c + _ROWS <= p:
            s = _dpbusd_rows(codes, c, hi, lo, blocks)
            for r in range(_ROWS):
                out[c + r] = np.int32(128) * s[2 * r] + s[2 * r + 1]
            c += _ROWS
    else:  # rows not contiguous: every row by the loop below
        tail = 0
    for r in range(p):
        acc = np.int32(0) if r >= c else out[r]
        start = tail if r < c else 0
        row = codes[r]
        for t in range(start, d):
            acc += np.int32(row[t]) * np.int32(v[t])
        out[r] = acc


#: ``code_sums(v, codes, out)``: ``out[c] = v . codes[c, :len(v)]``, int32 (see the module docstring)
code_sums = vnni_code_sums if host_has_vnni() else portable_code_sums
