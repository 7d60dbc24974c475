"""Quantization codes: int8 per-dimension buckets and packed sign bits.

The codes equal sentence-transformers' ``quantize_embeddings`` bit for bit: :func:`encode_int8`
is ``precision="int8"`` with the given ``ranges`` (a ``(2, d)`` array of per-dimension minima and
maxima, :func:`int8_ranges` of a sample), :func:`pack_signs` is ``precision="ubinary"`` (bit set
when the value is > 0, first dimension in the most significant bit).

An int8 code ``c`` of dimension ``j`` stands for the bucket ``[lo_j + (c + 128) * step_j,
lo_j + (c + 129) * step_j)`` with ``step_j = (hi_j - lo_j) / 255``; :func:`decode_int8` returns
the bucket centres and :func:`int8_radius` the largest distance of a value from its centre
(float rounding included) for the codes -127..126. The two end codes also hold every value that
was clipped (below ``lo`` or above ``hi``), so they bound nothing: :func:`has_end_codes` finds
the rows that use them (the float32 rounding of ``(hi - lo) / step`` usually puts ``hi`` itself
in bucket 254, code 126, as in sentence-transformers).

Examples
--------
>>> import numpy as np
>>> x = np.array([[0.5, -1.0, 0.25], [-0.5, 1.0, 0.0]], dtype=np.float32)
>>> ranges = int8_ranges(x)
>>> encode_int8(x, ranges).tolist()
[[126, -128, 126], [-128, 126, -128]]
>>> pack_signs(x).tolist()
[[160], [64]]
>>> unpack_signs(pack_signs(x), 3).tolist()
[[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CODE_SHIFT",
    "PACK_LANES",
    "decode_int8",
    "encode_int8",
    "has_end_codes",
    "int8_radius",
    "int8_ranges",
    "int8_steps",
    "pack_codes",
    "pack_signs",
    "sign_bytes",
    "unpack_signs",
]

#: An index row's address in its codes: ``file << CODE_SHIFT | row`` (2**40 rows a file).
CODE_SHIFT = 40

#: rows encoded per pass (bounds the float32 temporaries of :func:`encode_int8`)
ENCODE_ROWS = 16384


def sign_bytes(dim: int) -> int:
    """Bytes of one row's packed sign bits: ``ceil(dim / 8)``.

    Examples
    --------
    >>> sign_bytes(384), sign_bytes(20)
    (48, 3)
    """
    return (int(dim) + 7) // 8


def int8_ranges(sample: np.ndarray) -> np.ndarray:
    """Per-dimension ``[min, max]`` of a 2-D sample, as a float32 ``(2, d)`` array.

    Examples
    --------
    >>> int8_ranges(np.array([[1.0, 2.0], [3.0, -2.0]])).tolist()
    [[1.0, -2.0], [3.0, 2.0]]
    """
    a = np.asarray(sample)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError("int8 ranges need a non-empty 2-D sample")
    return np.vstack((a.min(axis=0), a.max(axis=0))).astype(np.float32)


def int8_steps(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, steps)`` float32 of the buckets, computed as sentence-transformers does.

    Examples
    --------
    >>> starts, steps = int8_steps(np.array([[0.0, 1.0], [255.0, 1.0]]))
    >>> starts.tolist(), steps.tolist()
    ([0.0, 1.0], [1.0, 1.0])
    """
    r = np.asarray(ranges).astype(np.float32, copy=False)
    starts = r[0, :]
    steps = (r[1, :] - starts) / np.float32(255)
    steps = np.where(steps == 0, np.float32(1), steps).astype(np.float32, copy=False)
    return starts, steps


def encode_int8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """int8 codes ``(n, d)`` of float rows ``x``: ``floor((x - lo) / step)`` clipped to 0..255, minus 128.

    Examples
    --------
    >>> r = np.array([[0.0], [255.0]], dtype=np.float32)
    >>> encode_int8(np.array([[0.0], [1.5], [300.0], [-4.0]], dtype=np.float32), r).ravel().tolist()
    [-128, -127, 127, -128]
    """
    a = np.asarray(x)
    starts, steps = int8_steps(ranges)
    out = np.empty(a.shape, dtype=np.int8)
    if a.ndim == 1:
        return encode_int8(a[None, :], ranges)[0]
    for s in range(0, a.shape[0], ENCODE_ROWS):
        block = a[s : s + ENCODE_ROWS].astype(np.float32, copy=False)
        q = np.floor((block - starts) / steps)
        np.clip(q, 0, 255, out=q)
        q -= 128
        out[s : s + ENCODE_ROWS] = q
    return out


def decode_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Float32 bucket centres of int8 codes: ``lo + (c + 128.5) * step``.

    Examples
    --------
    >>> r = np.array([[0.0], [255.0]], dtype=np.float32)
    >>> decode_int8(np.array([[-128], [0]], dtype=np.int8), r).ravel().tolist()
    [0.5, 128.5]
    """
    starts, steps = int8_steps(ranges)
    c = np.asarray(codes).astype(np.float32)
    return (starts + (c + np.float32(128.5)) * steps).astype(np.float32, copy=False)


def int8_radius(ranges: np.ndarray) -> np.ndarray:
    """Per dimension, the largest ``|x - decode_int8(encode_int8(x))|`` (float64) of a value ``x``
    whose code is not an end code (-128 or 127).

    Half a step, widened for the float32 rounding of ``(x - lo) / step`` (which can put a value
    just past a bucket edge into the neighbouring bucket) and of the centre itself.

    Examples
    --------
    >>> r = int8_radius(np.array([[0.0], [255.0]], dtype=np.float32))
    >>> bool(0.5 < r[0] < 0.51)
    True
    """
    starts, steps = int8_steps(ranges)
    lo = np.abs(starts.astype(np.float64))
    span = lo + 256.0 * steps.astype(np.float64)
    eps = float(np.finfo(np.float32).eps)
    # floor((x - lo) / step) is off by at most one ulp of a quotient <= 256 each way: a step
    # fraction of 256 * 4 eps; the centre and x - lo carry a few ulps of |lo| + 256 step
    return 0.5 * steps * (1.0 + 2048.0 * eps) + 8.0 * eps * span


def has_end_codes(codes: np.ndarray) -> np.ndarray:
    """Per row of 2-D int8 codes, True when some code is -128 or 127 (a possibly clipped value).

    The codes may also come as the raw ``uint8`` bytes of the ``emb_<d>_i8`` column (how
    :func:`embtools.storage.quantized.iter_codes` yields them): they are read as int8, so that
    the byte 128 (code -128) counts as an end code.

    Examples
    --------
    >>> has_end_codes(np.array([[0, 5], [127, 0], [-128, 3]], dtype=np.int8)).tolist()
    [False, True, True]
    >>> has_end_codes(np.array([[0, 5], [127, 0], [128, 3]], dtype=np.uint8)).tolist()
    [False, True, True]
    """
    c = np.asarray(codes)
    if c.dtype != np.int8:
        if c.dtype != np.uint8:
            raise TypeError(f"int8 codes must be int8 or uint8 bytes, not {c.dtype}")
        c = c.view(np.int8)
    out = np.zeros(c.shape[0], dtype=bool)
    step = max(1, ENCODE_ROWS * 16 // max(1, c.shape[1]))  # bool temporaries of about 256 KiB
    for s in range(0, c.shape[0], step):
        block = c[s : s + step]
        out[s : s + step] = (block.min(axis=1) == -128) | (block.max(axis=1) == 127)
    return out


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Packed sign bits ``(n, ceil(d / 8))`` uint8 of float rows: bit set where the value is > 0.

    Examples
    --------
    >>> pack_signs(np.array([[1.0, 0.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])).tolist()
    [[144, 128]]
    """
    return np.packbits(np.asarray(x) > 0, axis=-1)


def unpack_signs(codes: np.ndarray, dim: int, dtype: type = np.float32) -> np.ndarray:
    """``(n, dim)`` array of +1 (bit set) and -1 (bit clear) from packed sign bits.

    Examples
    --------
    >>> unpack_signs(np.array([[144, 128]], dtype=np.uint8), 9).tolist()
    [[1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]]
    """
    bits = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=-1, count=int(dim))
    out: np.ndarray = bits.astype(dtype)
    out *= 2
    out -= 1
    return out


#: rows per 64-byte block of :func:`pack_codes`' layout (16 lanes of 4 bytes)
PACK_LANES = 16


def pack_codes(codes: np.ndarray, dim: int) -> np.ndarray:
    """uint8 codes ``(rows, >= dim)`` in the layout of
    :func:`~embtools.kernels.code_sums_jit.padded_sums`: ``(blocks, words, 64)`` with
    ``out[b, g, 4 j + t] = codes[16 b + j, 4 g + t]`` (``words = ceil(dim / 4)``; rows past the
    last and bytes past ``dim`` zero), so that one 64-byte load holds four bytes of 16 rows.

    Examples
    --------
    >>> pack_codes(np.arange(6, dtype=np.uint8).reshape(2, 3), 3)[0, :, :8].tolist()
    [[0, 1, 2, 0, 3, 4, 5, 0]]
    """
    rows = codes.shape[0]
    words = -(-dim // 4)
    padded = np.zeros((-(-rows // PACK_LANES) * PACK_LANES, words * 4), np.uint8)
    padded[:rows, :dim] = codes[:, :dim]
    blocks = padded.reshape(-1, PACK_LANES, words, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(-1, words, 4 * PACK_LANES)
