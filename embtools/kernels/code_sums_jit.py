"""Exact integer products of 8-bit codes with int16 weights: the inner loops of the centroid
screen and of the int8 scan.

``code_sums(v, codes, out)`` sets ``out[c] = v . codes[c, :len(v)]`` for uint8 ``codes`` (the
centroid screen: 4,000 centroids x 384 dimensions, the largest step of a single query on a
million rows); ``signed_sums(v, split, codes, a, b, out)`` sets ``out[r - a] = v . codes[r]`` for
rows ``a..b - 1`` of int8 ``codes`` (an int8 index's partitions); ``padded_sums(v, packed)`` the
centroid screen of a batch, every query's ``v`` against every row of uint8 codes packed by
:func:`~embtools.kernels.codes.pack_codes`. All in int32: the caller keeps ``|v| <= MAX_WEIGHT``
and ``255 * MAX_WEIGHT * len(v)`` within int32.

Where the host has AVX-512 VNNI (Intel Ice Lake and later, AMD Zen 4 and later) the sums run on
``vpdpbusd`` (unsigned bytes times signed bytes): each weight is split as ``v = 128 * hi + lo``
(``hi`` and ``lo`` int8), so each 64-byte block of a row takes two instructions, against six for
LLVM's widening multiply-adds of the portable loop; int8 codes go in with their top bit flipped
(the code plus 128) and ``128 * sum(v)`` comes off. Rows of up to eight blocks keep the weights
in registers and run one after another: the scan's rows, streamed from memory, ran 3-4x slower
four rows at a time. A batch's screen runs in tiles of 8 queries by 16 codes (a 64-byte load
holds four bytes of 16 codes, multiplied by each query's four weights broadcast: 16 accumulators,
no sum across lanes): 7 ms for 500 queries by 4,000 codes of 384 on one core here, where NumPy's
float32 product of the same shapes takes 16 ms. Both forms give the same integers (the sums are exact); the choice is made
once, at import, from the CPU that numba compiles for (no choice is cached for another CPU:
numba's cache is keyed by it).

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

from embtools.kernels.codes import PACK_LANES

__all__ = ["MAX_WEIGHT", "code_sums", "host_has_vnni", "padded_sums", "portable_code_sums",
           "portable_padded_sums", "portable_signed_sums", "signed_sums", "split_weights", "vnni_code_sums",
           "vnni_padded_sums", "vnni_signed_sums"]

#: the largest ``|v|`` :func:`code_sums` takes: ``128 * hi + lo`` with ``hi`` in -128..127 and
#: ``lo`` in 0..127
MAX_WEIGHT = 16383
#: the most 64-byte blocks of weights :func:`_block_sums` holds in registers (2 x 8 of the 32)
_HELD_BLOCKS = 8


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


def _vpdpbusd(builder: Any) -> Any:  # pragma: no cover - compiled
    """``llvm.x86.avx512.vpdpbusd.512`` in the builder's module: ``(acc, unsigned bytes, signed
    bytes)`` as ``<16 x i32>`` each (the form of LLVM 14-20; later LLVMs upgrade it to their
    ``<64 x i8>`` form)."""
    lanes = ir.VectorType(ir.IntType(32), 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                          "llvm.x86.avx512.vpdpbusd.512")


def _block_sums(flip: bool) -> Any:
    """An intrinsic ``(codes, a, b, hi, lo, blocks, out)``: ``out[r - a]`` for rows ``a..b - 1``
    of ``codes`` (C-contiguous rows of bytes) the sum over their first ``64 * blocks`` bytes
    ``x`` of ``(128 * hi + lo) * x`` (``hi`` and ``lo`` int8 C-contiguous, ``out`` int32), on
    ``vpdpbusd``; ``x`` is the byte as uint8, or with ``flip`` the int8 byte plus 128 (its top
    bit flipped: ``vpdpbusd`` multiplies unsigned bytes by signed ones). Up to
    :data:`_HELD_BLOCKS` blocks the weights are loaded into registers once and the rows run one
    after another (streamed rows ran 3-4x slower four at a time); wider rows load them per block."""

    def typing(typingctx: Any, codes: Any, a: Any, b: Any, hi: Any, lo: Any, blocks: Any,
               out: Any) -> Any:  # pragma: no cover - compiled
        sig = types.none(codes, a, b, hi, lo, blocks, out)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            cty, aty, bty, hty, lty, kty, oty = signature.args
            rows = context.make_array(cty)(context, builder, args[0])
            hi_a = context.make_array(hty)(context, builder, args[3])
            lo_a = context.make_array(lty)(context, builder, args[4])
            out_a = context.make_array(oty)(context, builder, args[6])
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            lanes, block = ir.VectorType(i32, 16), ir.VectorType(i8, 64)
            stride = cgutils.unpack_tuple(builder, rows.strides)[0]
            first = context.cast(builder, args[1], aty, types.int64)
            count = builder.sub(context.cast(builder, args[2], bty, types.int64), first)
            nblocks = context.cast(builder, args[5], kty, types.int64)
            data = builder.bitcast(rows.data, i8.as_pointer())
            sums = builder.bitcast(out_a.data, i32.as_pointer())
            dp = _vpdpbusd(builder)
            total = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [lanes]),
                                                   "llvm.vector.reduce.add.v16i32")
            top_bits = ir.Constant(block, [0x80] * 64)

            def load(ptr: Any, offset: Any, flipped: bool = False) -> Any:
                at = builder.bitcast(builder.gep(builder.bitcast(ptr, i8.as_pointer()), [offset]), block.as_pointer())
                x = builder.load(at, align=1)
                return builder.bitcast(builder.xor(x, top_bits) if flipped else x, lanes)

            def store(index: Any, acc: list[Any]) -> None:
                """The row's sum: lane by lane ``128 * hi + lo`` (each lane a partial sum within
                the caller's bound), then across the lanes."""
                h, lo_ = builder.add(acc[0], acc[2]), builder.add(acc[1], acc[3])
                both = builder.add(builder.shl(h, ir.Constant(lanes, [7] * 16)), lo_)
                builder.store(builder.call(total, [both]), builder.gep(sums, [index]))

            def row_at(index: Any) -> Any:
                return builder.gep(data, [builder.mul(builder.add(first, index), stride)])

            done = builder.append_basic_block("done")
            wide = builder.append_basic_block("wide")
            switch = builder.switch(nblocks, wide)
            for k in range(1, _HELD_BLOCKS + 1):  # the weights held in registers
                case = builder.append_basic_block(f"blocks{k}")
                switch.add_case(ir.Constant(i64, k), case)
                builder.position_at_end(case)
                w_hi = [load(hi_a.data, ir.Constant(i64, 64 * j)) for j in range(k)]
                w_lo = [load(lo_a.data, ir.Constant(i64, 64 * j)) for j in range(k)]
                with cgutils.for_range(builder, count) as loop:
                    base = row_at(loop.index)
                    acc = [ir.Constant(lanes, None)] * 4  # even and odd blocks: two chains each
                    for j in range(k):
                        x = load(base, ir.Constant(i64, 64 * j), flip)
                        c = 2 * (j % 2)
                        acc[c] = builder.call(dp, [acc[c], x, w_hi[j]])
                        acc[c + 1] = builder.call(dp, [acc[c + 1], x, w_lo[j]])
                    store(loop.index, acc)
                builder.branch(done)
            builder.position_at_end(wide)  # no blocks, or more than are held
            with cgutils.for_range(builder, count) as loop:
                base = row_at(loop.index)
                accs = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(2)]
                for acc in accs:
                    builder.store(ir.Constant(lanes, None), acc)
                with cgutils.for_range(builder, nblocks) as inner:
                    offset = builder.mul(inner.index, ir.Constant(i64, 64))
                    x = load(base, offset, flip)
                    for acc, w in ((accs[0], load(hi_a.data, offset)), (accs[1], load(lo_a.data, offset))):
                        builder.store(builder.call(dp, [builder.load(acc), x, w]), acc)
                zero = ir.Constant(lanes, None)
                store(loop.index, [builder.load(accs[0]), builder.load(accs[1]), zero, zero])
            builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typing)


#: queries per tile of :func:`_tile_sums` (two accumulators each: 16 of the 32 registers)
TILE_QUERIES = 8


def _tile_typing(typingctx: Any, packed: Any, hi: Any, lo: Any, r0: Any, b0: Any, b1: Any,
                 out: Any) -> Any:  # pragma: no cover - compiled
    """An intrinsic ``(packed, hi, lo, r0, b0, b1, out)``: for queries ``r0 .. r0 + 7`` (rows of
    ``hi`` and ``lo``, int8 C-contiguous ``(queries, 4 * words)``) and blocks ``b0 .. b1 - 1``
    of ``packed`` (:func:`~embtools.kernels.codes.pack_codes`: uint8 ``(blocks, words, 64)``), ``out[r, 16 b + j]`` (int32,
    C-contiguous) the sum over the words ``g`` and bytes ``t`` of
    ``(128 * hi[r, 4 g + t] + lo[r, 4 g + t]) * packed[b, g, 4 j + t]``: a block of 16 codes
    loaded once per word and multiplied by each query's four weights (broadcast) on
    ``vpdpbusd``, 16 accumulators in registers, no sum across lanes."""
    sig = types.none(packed, hi, lo, r0, b0, b1, out)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pty, hty, lty, r0ty, b0ty, b1ty, oty = signature.args
        packed_a = context.make_array(pty)(context, builder, args[0])
        hi_a = context.make_array(hty)(context, builder, args[1])
        lo_a = context.make_array(lty)(context, builder, args[2])
        out_a = context.make_array(oty)(context, builder, args[6])
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        lanes = ir.VectorType(i32, PACK_LANES)
        words = cgutils.unpack_tuple(builder, packed_a.shape)[1]
        w_stride = cgutils.unpack_tuple(builder, hi_a.strides)[0]
        o_stride = cgutils.unpack_tuple(builder, out_a.strides)[0]
        r0 = context.cast(builder, args[3], r0ty, types.int64)
        b0 = context.cast(builder, args[4], b0ty, types.int64)
        count = builder.sub(context.cast(builder, args[5], b1ty, types.int64), b0)
        codes = builder.bitcast(packed_a.data, i8.as_pointer())
        dp = _vpdpbusd(builder)
        rows = [(builder.gep(builder.bitcast(a.data, i8.as_pointer()),
                             [builder.mul(builder.add(r0, ir.Constant(i64, r)), w_stride)]))
                for r in range(TILE_QUERIES) for a in (hi_a, lo_a)]
        accs = [cgutils.alloca_once(builder, lanes) for _ in rows]
        undef = ir.Constant(lanes, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, PACK_LANES), [0] * PACK_LANES)

        def weight(row: Any, g: Any) -> Any:
            at = builder.bitcast(builder.gep(row, [builder.mul(g, ir.Constant(i64, 4))]), i32.as_pointer())
            one = builder.insert_element(undef, builder.load(at, align=1), ir.Constant(i32, 0))
            return builder.shuffle_vector(one, undef, splat)

        with cgutils.for_range(builder, count) as blocks:
            b = builder.add(b0, blocks.index)
            for acc in accs:
                builder.store(ir.Constant(lanes, None), acc)
            base = builder.gep(codes, [builder.mul(builder.mul(b, words), ir.Constant(i64, 64))])
            with cgutils.for_range(builder, words) as word:
                at = builder.gep(base, [builder.mul(word.index, ir.Constant(i64, 64))])
                x = builder.load(builder.bitcast(at, lanes.as_pointer()), align=1)
                for row, acc in zip(rows, accs, strict=True):
                    builder.store(builder.call(dp, [builder.load(acc), x, weight(row, word.index)]), acc)
            column = builder.mul(b, ir.Constant(i64, 4 * PACK_LANES))  # bytes into an out row
            out_base = builder.bitcast(out_a.data, i8.as_pointer())
            for r in range(TILE_QUERIES):
                h, lo_ = builder.load(accs[2 * r]), builder.load(accs[2 * r + 1])
                both = builder.add(builder.shl(h, ir.Constant(lanes, [7] * PACK_LANES)), lo_)
                line = builder.mul(builder.add(r0, ir.Constant(i64, r)), o_stride)
                at = builder.gep(out_base, [builder.add(line, column)])
                builder.store(both, builder.bitcast(at, lanes.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


_tile_sums: Any = intrinsic(_tile_typing)


#: blocks of 16 packed codes per pass of :func:`vnni_padded_sums` (512 centroids of 384
#: dimensions: 192 KiB, kept in a core's L2 while every query of the batch is scored)
_PASS_BLOCKS = 32


@njit(nogil=True, cache=True)
def _padded_weights(v: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``(hi, lo)`` int8 of ``ceil(queries / 8) * 8`` rows of ``4 * words`` with ``v = 128 * hi + lo``
    (zero past ``v``)."""
    rows = -(-v.shape[0] // TILE_QUERIES) * TILE_QUERIES
    hi = np.zeros((rows, 4 * words), np.int8)
    lo = np.zeros((rows, 4 * words), np.int8)
    for i in range(v.shape[0]):
        hi[i], lo[i], _ = split_weights(v[i], 4 * words)
    return hi, lo


@njit(nogil=True, cache=True)
def vnni_padded_sums(v: np.ndarray, packed: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`padded_sums` on ``vpdpbusd`` (only on hosts with AVX-512 VNNI: :func:`host_has_vnni`):
    each pass scores every query against :data:`_PASS_BLOCKS` blocks, 8 queries at a time."""
    if v.shape[1] > 4 * packed.shape[1] or packed.shape[2] != 4 * PACK_LANES:  # the tiles read no further
        raise ValueError("the weights are wider than the packed codes")
    hi, lo = _padded_weights(v, packed.shape[1])
    sums = np.empty((hi.shape[0], packed.shape[0] * PACK_LANES), np.int32)
    for b0 in range(0, packed.shape[0], _PASS_BLOCKS):
        b1 = min(b0 + _PASS_BLOCKS, packed.shape[0])
        for r0 in range(0, hi.shape[0], TILE_QUERIES):
            _tile_sums(packed, hi, lo, r0, b0, b1, sums)
    return sums


@njit(nogil=True, cache=True, fastmath=True)
def portable_padded_sums(v: np.ndarray, packed: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`padded_sums` in plain loops."""
    nq, d = v.shape
    if d > 4 * packed.shape[1] or packed.shape[2] != 4 * PACK_LANES:
        raise ValueError("the weights are wider than the packed codes")
    sums = np.zeros((-(-nq // TILE_QUERIES) * TILE_QUERIES, packed.shape[0] * PACK_LANES), np.int32)
    for i in range(nq):
        for block in range(packed.shape[0]):
            for lane in range(PACK_LANES):
                acc = np.int32(0)
                for t in range(d):
                    acc += np.int32(packed[block, t // 4, 4 * lane + t % 4]) * np.int32(v[i, t])
                sums[i, PACK_LANES * block + lane] = acc
    return sums


_unsigned_sums: Any = _block_sums(False)
_signed_sums: Any = _block_sums(True)


@njit(nogil=True, cache=True)
def split_weights(v: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled
    """``(hi, lo, shift)``: int8 of ``width`` (zero past ``len(v)``) with ``v = 128 * hi + lo`` and
    ``lo`` in 0..127 (``|v| <= MAX_WEIGHT``), and ``128 * sum(v)`` over the whole 64-byte blocks
    of ``v`` (:func:`vnni_signed_sums` takes the codes plus 128)."""
    hi = np.zeros(width, np.int8)
    lo = np.zeros(width, np.int8)
    shift = np.int32(0)
    for t in range(v.shape[0]):
        hi[t] = np.int8(np.int32(v[t]) >> 7)
        lo[t] = np.int8(np.int32(v[t]) & 127)
        if t < v.shape[0] // 64 * 64:
            shift += np.int32(v[t])
    return hi, lo, np.int32(128) * shift


@njit(nogil=True, cache=True)
def vnni_code_sums(v: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """:func:`code_sums` on ``vpdpbusd`` (only on hosts with AVX-512 VNNI: :func:`host_has_vnni`)."""
    p, width = codes.shape
    d = v.shape[0]
    hi, lo, _ = split_weights(v, width)
    blocks = width // 64  # the weights are zero past d: padding adds nothing
    tail = min(blocks * 64, d)
    if codes.strides[1] == 1:
        _unsigned_sums(codes, 0, p, hi, lo, blocks, out)
    else:  # rows not contiguous: every row by the loop below
        tail = 0
        out[:] = 0
    for r in range(p):
        acc = out[r]
        row = codes[r]
        for t in range(tail, d):
            acc += np.int32(row[t]) * np.int32(v[t])
        out[r] = acc


@njit(nogil=True, cache=True, fastmath=True)
def portable_signed_sums(v: np.ndarray, split: tuple[np.ndarray, np.ndarray, int], codes: np.ndarray, a: int,
                         b: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """:func:`signed_sums` in plain loops."""
    for r in range(a, b):
        row = codes[r]
        acc = np.int32(0)
        for t in range(v.shape[0]):
            acc += np.int32(row[t]) * np.int32(v[t])
        out[r - a] = acc


@njit(nogil=True, cache=True)
def vnni_signed_sums(v: np.ndarray, split: tuple[np.ndarray, np.ndarray, int], codes: np.ndarray, a: int, b: int,
                     out: np.ndarray) -> None:  # pragma: no cover - compiled
    """:func:`signed_sums` on ``vpdpbusd`` (only on hosts with AVX-512 VNNI): the rows' bytes
    plus 128 (unsigned) times the weights, less ``128 * sum(v)``, each row's bytes past its last
    whole 64 in a plain loop."""
    hi, lo, shift = split
    d = v.shape[0]
    head = d // 64 * 64 if codes.strides[1] == 1 else 0
    if head:
        _signed_sums(codes, a, b, hi, lo, head // 64, out)
    for r in range(a, b):
        acc = out[r - a] - shift if head else np.int32(0)
        row = codes[r]
        for t in range(head, d):
            acc += np.int32(row[t]) * np.int32(v[t])
        out[r - a] = acc


#: ``code_sums(v, codes, out)``: ``out[c] = v . codes[c, :len(v)]``, int32 (see the module docstring)
code_sums = vnni_code_sums if host_has_vnni() else portable_code_sums
#: ``signed_sums(v, split, codes, a, b, out)``: ``out[r - a] = v . codes[r]`` for rows ``a``..``b - 1``
#: of int8 ``codes``, int32, ``split = split_weights(v, len(v))`` (see the module docstring)
signed_sums = vnni_signed_sums if host_has_vnni() else portable_signed_sums
#: ``padded_sums(v, packed)``: int32 ``sums[i, c] = v[i] . codes[c, :v.shape[1]]`` for int16 weights
#: ``(queries, d)`` and ``packed = pack_codes(codes, d)`` (:func:`~embtools.kernels.codes.pack_codes`),
#: in an array of ``ceil(queries / 8) * 8`` rows and ``16 * blocks`` columns (those past the queries
#: and codes hold sums of zero weights or zero codes)
padded_sums = vnni_padded_sums if host_has_vnni() else portable_padded_sums
