"""Fast kernels: the same integers as kernels_reference, computed with BLAS where it pays.

Exactness of the float products. A convolution or matmul of integer operands is computed as a
float matmul on integer-valued floats. That is exact when every partial sum is an integer below
2^p (p = 24 for float32, 53 for float64): each product and each sum is then representable,
whatever order or FMA use the BLAS picks (OpenBLAS/MKL sum products by additions only; no
Strassen). For output channel o and a slice S of the reduction axis, every partial sum is bounded
by

    B(o, S) = max|x - zp_x| * sum_{k in S} |w[o, k] - zp_w[o]|

(max|x - zp_x| from x's dtype, the weight sums from the data: tighter than K * max|w|). The
reduction axis is cut into the fewest contiguous chunks with max_o B(o, chunk) < 2^24 and each
chunk is one float32 matmul; the chunk results (each exact) are summed in int64. When even single
columns break 2^24 (16-bit operands), float64 is used the same way (2^53), and past that int64.

Fused requantization. For 8/16-bit outputs with half-up rounding and k >= 0, the epilogue
y = clamp(zp_y + ((acc + b) * m + 2^(k-1)) >> k, lo, hi) is computed as

    t = acc * m + c,  c = b * m + 2^(k-1) + zp_y * 2^k   (per channel, precomputed)
    y = clip(t >> k, lo, hi)                              ((V + zp * 2^k) >> k = (V >> k) + zp)

on cache-sized blocks, in place, right after each matmul, in int32 where a bound proves it safe
(else int64). It is used only where a static bound, |acc + b| <= max|x - zp_x| *
sum_k |w[o, k] - zp_w[o]| + |b|, proves that no value leaves int64 (so neither the reference's
overflow check nor any wrap-around can apply); everything else (other rounding modes, negative
shifts, layers with params this module does not know) goes through the reference epilogue on an
exact int64 accumulator. Two rewrites keep it cheap without changing an integer: per-channel
shifts become one (m * 2^d, c * 2^d, d = max k - k) where that keeps int32, and a channel whose
output is the same integer for every reachable accumulator becomes a constant (m = 0). Depthwise
convs whose int32 bound holds statically fold m into the weights instead (w' = (w - zp_w) * m,
see ``_DepthwiseFused``): the taps sum acc * m, and the epilogue is add c, shift, clip on each
channel block while it is in cache.

Layouts: 1x1 convs skip im2col. Other convs split the padded input once into stride-phase planes
(``_tap_runs``) in which every kernel tap is one contiguous run per channel: im2col is then one
long copy per tap (in output-row chunks bounded by ``IM2COL_BUDGET_BYTES``; images with few
output pixels share one matmul), and depthwise convs (one input channel per group) are one
multiply-add per tap on cache-sized channel blocks (channels-last on small maps, where
per-channel rows are too short for numpy to stream); nothing loops over pixels. A layer's chunk
plan, epilogue constants and float weights are prepared once and kept on the layer object
(``_fast_plan``; the float weights only while ``KEEP_FLOAT_WEIGHTS`` is set, else they are
converted at each call); params are treated as read-only after a layer's first run. Ops with no
faster formulation (reshape, concat, clamp, requantize, ...) reuse the reference.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import numpy as np

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the loop on a cache block
    from numpy._core.umath import clip as clip_ufunc
except ImportError:  # numpy 1.x
    from numpy.core.umath import clip as clip_ufunc

from . import kernels_reference as ref
from .fixed_point import dtype_limits, requantize
from .kernel_common import (
    check_same_qparams,
    clamp_bounds,
    conv_geometry,
    finish,
    param,
    per_channel,
    pool_geometry,
    requant_params,
    tensor_zero_point,
)

EXACT_FLOAT32 = 2**24
EXACT_FLOAT64 = 2**53
IM2COL_BUDGET_BYTES = 64 * 2**20  # im2col of one image is built in output-row chunks of at most this
BLOCK_ELEMENTS = 2**15  # int64 elements per epilogue block (256 KiB: stays in L2)
MIN_FLOAT32_CHUNK = 64  # shorter reduction chunks than this: float64 in one piece instead
PITCHED_IM2COL_WASTE = 16  # im2col keeps whole tap runs when the dropped columns are <= 1/16 of W_out
STACK_COLUMNS = 512  # convs with fewer output pixels per image stack images into one matmul
SAFE_INT64 = 2.0**61  # static bound under which the fused epilogue cannot leave int64 (float64 margin)
FUSE_DEPTHWISE = True  # depthwise convs with the multiplier folded into the taps (_DepthwiseFused)
KEEP_FLOAT_WEIGHTS = contextvars.ContextVar("keep_float_weights", default=True)
"""Whether a layer's plan keeps its dense weights as float copies (4 bytes per int8 weight) after
the first run, or converts them from the integer weights at every call (less memory, one more
pass over the weights per call). Set per run by ``executor.execute(keep_float_weights=...)``."""

LONG_ROW = 128  # per-channel operands broadcast along rows at least this long: _long_rows
CHANNELS_LAST_MAX_SPAN = LONG_ROW - 1  # depthwise maps this small (H_out x width) run channels-last


@contextlib.contextmanager
def _long_rows(row_length: int):
    """Run numpy ops that broadcast a per-channel operand along rows of ``row_length`` elements
    with the ufunc buffer smaller than a row.

    With the default buffer (8192 elements) numpy's iterator copies a broadcast operand into
    buffers when its rows are shorter than the buffer, which measured 2-2.5x slower than a scalar
    operand (int32 multiply on a 32K-element block: 7.5-8.7 us vs 3.3-4 us). With the buffer below
    the row length each row is one inner loop with a stride-0 operand, as fast as a scalar. Only
    the iteration changes, never a value; short rows (7x7 maps) keep the default, which is faster
    there. The setting is numpy's per-thread buffer size, restored on exit."""
    if row_length < LONG_ROW:
        yield
        return
    saved = np.getbufsize()
    np.setbufsize(16)
    try:
        yield
    finally:
        np.setbufsize(saved)


_CONV_ATTRS = {"kernel_shape", "strides", "pads", "dilations", "group", "input_zero_point_folded"}
_CONV_PARAMS = {"weight", "weight_zero_point", "bias", "multiplier", "shift", "clamp_lo", "clamp_hi"}


# --------------------------------------------------------------------------- exactness bounds


def compute_dtype(x_bound: int, w_bound: int, k: int) -> np.dtype:
    """The cheapest dtype in which sum of k products |x| <= x_bound, |w| <= w_bound is exact:
    float32 below 2^24, float64 below 2^53, else int64."""
    bound = int(x_bound) * int(w_bound) * int(k)
    if bound < EXACT_FLOAT32:
        return np.dtype(np.float32)
    if bound < EXACT_FLOAT64:
        return np.dtype(np.float64)
    return np.dtype(np.int64)


def dtype_bound(dtype, zp: int) -> int:
    """max |q - zp| over every value q of an integer dtype."""
    lo, hi = dtype_limits(np.dtype(dtype).name)
    return max(abs(lo - int(zp)), abs(hi - int(zp)))


def _greedy_chunks(cum: np.ndarray, limit: int) -> list[tuple[int, int]] | None:
    """Cut [0, K) into the fewest contiguous chunks with max_row(cum[:, end] - cum[:, start]) <=
    limit (cum: per-row cumulative sums with a leading 0 column); None if one column exceeds it.
    Each chunk's end is found by bisection (the reach is non-decreasing in end), which reads a
    few columns instead of building a [rows, K] difference."""
    k = cum.shape[1] - 1
    chunks, start = [], 0
    while start < k:
        base = cum[:, start]
        lo, hi = start, k  # the largest end in [start, k] whose reach is within the limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int((cum[:, mid] - base).max()) <= limit:
                lo = mid
            else:
                hi = mid - 1
        if lo == start:
            return None
        chunks.append((start, lo))
        start = lo
    return chunks


def _narrow_int(bound: int) -> np.dtype:
    """The narrowest signed integer dtype holding every value of magnitude <= bound."""
    for dtype in (np.int16, np.int32):
        if bound <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _weights_minus_zero_point(w: np.ndarray, zp_w, axis_shape) -> np.ndarray:
    """w - zp_w[o] in the narrowest integer dtype that holds it (int16 for 8-bit weights), so that
    preparing a large layer does not hold several int64 copies of its weights at once."""
    zp = per_channel(zp_w, w.shape[0], "weight_zero_point")
    wt = _narrow_int(dtype_bound(w.dtype, 0) + int(np.abs(zp).max(initial=0)))
    return np.subtract(w, zp.astype(wt).reshape(axis_shape), dtype=wt)


def reduction_plan(abs_w: np.ndarray, x_bound: int, force_dtype=None) -> tuple[np.dtype, list[tuple[int, int]]]:
    """Compute dtype and reduction chunks for rows of |w - zp_w| (shape [rows, K]) against inputs
    with |x - zp_x| <= x_bound: every partial sum of a chunk stays below 2^24 (float32) or 2^53
    (float64); int64 when neither holds. ``force_dtype`` (tests) takes one chunk in that dtype."""
    k = abs_w.shape[1]
    if force_dtype is not None:
        return np.dtype(force_dtype), [(0, k)]
    if k == 0 or abs_w.size == 0:
        return np.dtype(np.float32), [(0, max(k, 0))]
    xb = int(x_bound)
    row_sums = abs_w.sum(axis=1, dtype=np.int64)
    peak = xb * int(row_sums.max())
    if peak < EXACT_FLOAT32:
        return np.dtype(np.float32), [(0, k)]
    cum = None
    cum_dtype = _narrow_int(int(row_sums.max())) if row_sums.size else np.dtype(np.int64)
    cum_dtype = np.dtype(np.int32) if cum_dtype == np.int16 else cum_dtype
    if xb * int(abs_w.max()) < EXACT_FLOAT32:
        cum = np.zeros((abs_w.shape[0], k + 1), dtype=cum_dtype)
        np.cumsum(abs_w, axis=1, out=cum[:, 1:], dtype=cum_dtype)
        chunks = _greedy_chunks(cum, (EXACT_FLOAT32 - 1) // xb)
        if chunks is not None and min(b - a for a, b in chunks[:-1] or [(0, MIN_FLOAT32_CHUNK)]) >= MIN_FLOAT32_CHUNK:
            return np.dtype(np.float32), chunks
    if peak < EXACT_FLOAT64:
        return np.dtype(np.float64), [(0, k)]
    if xb * int(abs_w.max()) < EXACT_FLOAT64:
        if cum is None:
            cum = np.zeros((abs_w.shape[0], k + 1), dtype=cum_dtype)
            np.cumsum(abs_w, axis=1, out=cum[:, 1:], dtype=cum_dtype)
        chunks = _greedy_chunks(cum, (EXACT_FLOAT64 - 1) // xb)
        if chunks is not None:
            return np.dtype(np.float64), chunks
    return np.dtype(np.int64), [(0, k)]


# --------------------------------------------------------------------------- fused epilogue


@dataclass
class Epilogue:
    """Per-channel constants of y = clip((acc * m + c) >> k, lo, hi), c = b*m + 2^(k-1) + zp_y*2^k.

    Arrays are int64, shape [1] or [O]; ``shift`` is a Python int when k is one value for the
    layer. Per-channel shifts are made one where that costs nothing: with K = max k and
    d = K - k[o], m'[o] = m[o] * 2^d and c'[o] = c[o] * 2^d give the same integers,
    (t * 2^d) >> (k + d) = t >> k, and a scalar shift is a cheaper numpy op than a broadcast one.
    The work is done in int32 where |acc| * |m| + |c| < 2^31 is certain (``limit32``: the
    largest |acc| for which it holds, per channel; proved statically for the whole layer, or
    checked on each block's max |acc|), else in int64."""

    m: np.ndarray
    c: np.ndarray
    shift: np.ndarray | int
    lo: np.ndarray
    hi: np.ndarray
    lo32: np.ndarray  # lo, hi taken into int32's range (for the int32 work dtype)
    hi32: np.ndarray
    limit32: np.ndarray  # float64 [O]: max |acc| with which int32 cannot overflow
    static32: bool  # the static |acc| bound is within limit32 for every channel
    typed: dict = field(default_factory=dict, repr=False)  # (work dtype, ndim) -> constants

    @staticmethod
    def _variant(bias, m, k, zp_y: int, acc_bound, constant=None):
        """(c, limit32, static32) for multipliers m and shifts k, or None when a value could
        leave int64. ``constant`` = (mask, v): those channels output v whatever acc is (m = 0
        and c = v * 2^k there)."""
        half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
        worst = ((acc_bound + np.abs(bias).astype(np.float64)) * np.abs(m).astype(np.float64)
                 + half.astype(np.float64) + abs(int(zp_y)) * np.exp2(k.astype(np.float64)))
        if not np.all(worst < SAFE_INT64):
            return None
        c = bias * m + half + np.left_shift(np.int64(zp_y), k)
        if constant is not None:
            c = np.where(constant[0], np.left_shift(constant[1], k), c)
        # int32 work: |acc| * |m| + |c| < 2^31 (with a 2^-20 margin for the float64 division),
        # k <= 30, and the clamp bounds taken inside int32 (t lies there anyway)
        room = 2.0**31 * (1 - 2.0**-20) - np.abs(c).astype(np.float64)
        mf = np.broadcast_to(np.abs(m).astype(np.float64), c.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            limit32 = np.where(mf > 0, np.floor(room / np.where(mf > 0, mf, 1.0)), np.inf)
        kk = np.broadcast_to(k, c.shape)
        limit32 = np.where((room > 0) & (kk <= 30), limit32, -1.0)
        static32 = bool(np.all(np.broadcast_to(acc_bound, limit32.shape) <= limit32))
        return c, limit32, static32

    @staticmethod
    def build(bias, m, k, lo, hi, zp_y: int, acc_bound: np.ndarray, rounding) -> Epilogue | None:
        """The fused constants, or None when the fused form is not provably identical to the
        reference (other rounding, k < 0, or a value that could leave int64)."""
        if rounding not in (None, "half_up"):
            return None
        m = np.asarray(m, dtype=np.int64)
        k = np.asarray(k, dtype=np.int64)
        if np.any(k < 0) or np.any(k > 62):
            return None
        bias = np.asarray(bias, dtype=np.int64)
        acc_bound = np.asarray(acc_bound, dtype=np.float64)
        chosen = Epilogue._variant(bias, m, k, zp_y, acc_bound)
        if chosen is None:
            return None
        constant = Epilogue._constant_channels(bias, m, k, lo, hi, chosen[0], acc_bound)
        if constant is not None:  # m = 0 there, and a shift that costs the others nothing
            mask, _ = constant
            size = mask.size
            m, bias, k = (np.array(np.broadcast_to(v, (size,))) for v in (m, bias, k))
            m[mask], bias[mask] = 0, 0
            k[mask] = int(k[~mask].max()) if not mask.all() else 0
            chosen = Epilogue._variant(bias, m, k, zp_y, acc_bound, constant)
        if k.size > 1 and np.any(k != k.flat[0]):  # one shift for all channels, unless it costs int32
            top = int(k.max())
            m_one = m * np.left_shift(np.int64(1), top - k)
            one = Epilogue._variant(bias, m_one, np.full_like(k, top), zp_y, acc_bound, constant)
            if one is not None and (one[2] or not chosen[2]) and np.abs(m_one).max() < 2**31:
                m, k, chosen = m_one, np.full_like(k, top), one
        c, limit32, static32 = chosen
        shift = int(k.flat[0]) if np.all(k == k.flat[0]) else k
        lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        lo32, hi32 = np.clip(lo, -(2**31), 2**31 - 1), np.clip(hi, -(2**31), 2**31 - 1)
        return Epilogue(m, c, shift, lo, hi, lo32, hi32, limit32, static32)

    @staticmethod
    def _constant_channels(bias, m, k, lo, hi, c, acc_bound):
        """(mask, v) of the channels whose output is the same integer v for every accumulator
        the layer can produce, or None. y = clip((acc*m + c) >> k, lo, hi) is monotonic in acc
        and |acc| <= acc_bound, so the channel is constant when both ends of the range give the
        same y (a near-dead channel whose bias saturates it, say). Computed in int64: every term
        is below 2^61 once the int64 bound has been checked (_variant)."""
        reach = np.floor(acc_bound).astype(np.int64) * np.abs(m)
        lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        y_low = np.clip(np.right_shift(c - reach, k), lo, hi)
        y_high = np.clip(np.right_shift(c + reach, k), lo, hi)
        mask = np.broadcast_to(y_low == y_high, np.broadcast(y_low, y_high).shape)
        if mask.ndim != 1 or mask.size < 2 or not mask.any():
            return None
        return np.array(mask), np.array(np.broadcast_to(y_low, mask.shape))

    def _consts(self, ndim: int, wt: np.dtype) -> tuple:
        """(m, c, k, lo, hi) in the work dtype: a numpy scalar where the value is one for the
        layer, else a column shaped to broadcast along axis 0 of an ndim-block (built once)."""
        key = (wt, ndim)
        if key not in self.typed:
            shape = (-1,) + (1,) * (ndim - 1)
            lo, hi = (self.lo32, self.hi32) if wt == np.int32 else (self.lo, self.hi)
            out = []
            for v in (self.m, self.c, self.shift, lo, hi):
                v = np.asarray(v)
                if v.size == 1 or np.all(v == v.flat[0]):
                    out.append(wt.type(v.flat[0]))
                else:
                    out.append(np.ascontiguousarray(v.astype(wt).reshape(shape)))
            self.typed[key] = tuple(out)
        return self.typed[key]

    def _fits32(self, parts: list[np.ndarray], o0: int, o1: int) -> bool:
        if self.static32:
            return True
        if parts[0].size == 0:
            return False
        limit = float(self.limit32[o0:o1].min()) if self.limit32.size > 1 else float(self.limit32[0])
        if limit < 1:
            return False
        total = 0.0  # |sum of parts| <= sum of max |part|; every partial sum stays below it too
        for p in parts:
            total += max(abs(float(p.max())), abs(float(p.min())))
        return total <= limit

    def apply(self, parts: list[np.ndarray], dest: np.ndarray, o0: int = 0, scratch: bool = False) -> None:
        """dest[r] = epilogue(sum of parts[r]) for channel o0 + r, r along axis 0; parts are
        exact integer-valued accumulators (float or integer) of dest's shape, or wider on the last
        axis (the leading columns are written). ``scratch``: the single part may be overwritten
        (used in place when its dtype is the work dtype)."""
        rows = parts[0].shape[0]
        per_row = max(1, int(np.prod(parts[0].shape[1:], dtype=np.int64)))
        with _long_rows(per_row):
            self._apply_blocks(parts, dest, o0, scratch, rows, max(1, BLOCK_ELEMENTS // per_row), per_row)

    def _apply_blocks(self, parts, dest, o0: int, scratch: bool, rows: int, step: int, per_row: int) -> None:
        """apply() in blocks of ``step`` rows (``per_row`` elements each)."""
        ndim = parts[0].ndim
        narrow = parts[0].shape[-1] != dest.shape[-1]  # parts wider than dest: extra columns dropped
        bufs = {}
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = [p[r0:r1] for p in parts]
            wt = np.dtype(np.int32) if self._fits32(block, o0 + r0, o0 + r1) else np.dtype(np.int64)
            m, c, k, lo, hi = (v if v.ndim == 0 else v[o0 + r0:o0 + r1] for v in self._consts(ndim, wt))
            if scratch and len(block) == 1 and block[0].dtype == wt:
                t = block[0]
            else:
                if wt not in bufs:
                    bufs[wt] = np.empty(min(rows, step) * per_row, dtype=wt)
                t = bufs[wt][: (r1 - r0) * per_row].reshape(block[0].shape)
                np.copyto(t, block[0], casting="unsafe")
                if len(block) > 1:
                    u = np.empty_like(t)
                    for p in block[1:]:  # each part is an exact integer inside the work dtype
                        np.copyto(u, p, casting="unsafe")
                        np.add(t, u, out=t)
            np.multiply(t, m, out=t)
            np.add(t, c, out=t)
            np.right_shift(t, k, out=t)
            clip_ufunc(t, lo, hi, out=t)
            np.copyto(dest[r0:r1], t[..., : dest.shape[-1]] if narrow else t, casting="unsafe")


def _known_layer(layer, attrs: set[str], params: set[str]) -> bool:
    return set(layer.attrs) <= attrs and set(layer.params) <= params


# --------------------------------------------------------------------------- conv


@dataclass
class _ConvPlan:
    """What a conv layer needs besides its input: float weights per group and chunk, the
    reduction chunks, the compute dtype and (optionally) the fused epilogue."""

    key: tuple
    keep: tuple  # the arrays the key's ids refer to (so the ids cannot be reused)
    ct: np.dtype
    chunks: list[tuple[int, int]]
    wmats: list[list[np.ndarray]] | None  # [group][chunk] -> [og, chunk] (dense); depthwise: [[g, og, kh, kw]]
    depthwise: bool
    epilogue: Epilogue | None
    row_l1: np.ndarray  # [O] sum_k |w[o, k] - zp_w[o]| (float64), for the static bound
    og: int = 0  # output channels per group
    source: tuple | None = None  # dense weights not kept in float: (w [g, og, K], zp_w [g, og, 1])
    dw_fused: _DepthwiseFused | None = None

    def weight_chunks(self, gi: int) -> list[np.ndarray]:
        """Group gi's weights minus their zero points in the compute dtype, one [og, chunk] array
        per reduction chunk: the kept copies, or converted from the integer weights for this
        call when float copies are not kept (``keep_float_weights``)."""
        if self.wmats is not None:
            return self.wmats[gi]
        w, zp = self.source
        return [_minus_zero_point(w[gi, :, a:b], zp[gi], self.ct) for a, b in self.chunks]


@dataclass
class _DepthwiseFused:
    """A depthwise conv with the requantization multiplier folded into the taps.

    With w'[o] = (w[o] - zp_w[o]) * m[o] the taps sum acc * m directly, so the epilogue
    y = clip((acc * m + c) >> k, lo, hi) is one add, one shift, one clip and the copy into the
    output, on each cache-sized channel block right after its taps: one pass (the multiply) and
    the per-block dispatch of ``Epilogue.apply`` fewer. Used only in int32 when the epilogue's static
    bound holds for every channel (``Epilogue.static32``): every partial tap sum is bounded by
    max|x - zp_x| * sum_k |w[o, k] - zp_w[o]| * |m[o]| = acc_bound[o] * |m[o]| <= 2^31 - |c[o]|
    (so adding c stays in int32 too), and integer arithmetic without overflow gives the same
    value in any order: (sum x * w * m + c) >> k is exactly the reference's integer."""

    weights: np.ndarray  # int32 [g, og, kh, kw]: (w - zp_w) * m
    c: np.ndarray  # int32 [O, 1, 1]: b*m + 2^(k-1) + zp_y * 2^k
    shift: np.ndarray | np.int32  # a scalar, or int32 [O, 1, 1]
    lo: np.ndarray | np.int32  # clamp bounds: scalars, or int32 [O, 1, 1]
    hi: np.ndarray | np.int32

    @staticmethod
    def build(plan: _ConvPlan) -> _DepthwiseFused | None:
        e = plan.epilogue
        if e is None or not plan.depthwise or plan.ct != np.int32 or not e.static32:
            return None
        w = plan.wmats[0][0]
        o = w.shape[0] * w.shape[1]

        def column(v):
            return np.ascontiguousarray(np.broadcast_to(np.asarray(v, np.int64).ravel(), (o,))).reshape(o, 1, 1)

        def scalar_or_column(v):
            v = np.asarray(v, np.int64).ravel()
            return np.int32(v[0]) if np.all(v == v[0]) else column(v).astype(np.int32)

        wm = w.astype(np.int64) * column(e.m).reshape(w.shape[:2] + (1, 1))
        c = column(e.c)
        if np.abs(wm).max(initial=0) >= 2**31 or np.abs(c).max(initial=0) >= 2**31:
            return None  # cannot happen when static32 holds; kept as a guard
        return _DepthwiseFused(wm.astype(np.int32), c.astype(np.int32), scalar_or_column(e.shift),
                               scalar_or_column(e.lo32), scalar_or_column(e.hi32))

    def finish(self, acc: np.ndarray, dest: np.ndarray, o0: int, o1: int) -> None:
        """dest = clip((acc + c) >> k, lo, hi) for channels o0..o1; acc (int32 scratch, holding
        acc * m) may be wider than dest on the last axis (the extra columns are dropped)."""
        def rows(v):
            return v if v.ndim == 0 else v[o0:o1]

        np.add(acc, self.c[o0:o1], out=acc)
        np.right_shift(acc, rows(self.shift), out=acc)
        clip_ufunc(acc, rows(self.lo), rows(self.hi), out=acc)
        np.copyto(dest, acc[:, :, : dest.shape[-1]], casting="unsafe")  # exact: inside [lo, hi]


def _prepare_conv(w, zp_w, x_dtype, zp_x: int, force_dtype=None):
    """Weights minus their zero points, the compute dtype and the chunks for an input dtype."""
    w = np.asarray(w)
    o, cg, kh, kw = w.shape
    ws = _weights_minus_zero_point(w, zp_w, (-1, 1, 1, 1))
    abs_w = np.abs(ws.reshape(o, cg * kh * kw))
    x_bound = dtype_bound(x_dtype, zp_x)
    if cg == 1:  # depthwise: taps summed in one accumulator, so the whole row sum must fit
        peak = x_bound * int(abs_w.sum(axis=1, dtype=np.int64).max(initial=0))
        if force_dtype is not None:
            ct = np.dtype(force_dtype)
        else:
            ct = np.dtype(np.int32 if peak < 2**31 else np.int64)  # elementwise: integers are as fast
        chunks = [(0, kh * kw)]
    else:
        ct, chunks = reduction_plan(abs_w, x_bound, force_dtype)
    return ws, abs_w, ct, chunks, x_bound


def _minus_zero_point(w: np.ndarray, zp: np.ndarray, ct: np.dtype) -> np.ndarray:
    """w - zp (zp broadcast along w's rows) in the compute dtype; a plain conversion (the cheap
    loop) when every zero point is 0, as for symmetric weights."""
    if not zp.any():
        return w.astype(ct)
    out = w.astype(ct)
    out -= zp.astype(ct)  # exact: integers far below 2^24
    return out


def _conv_plan(w, zp_w, x_dtype, zp_x: int, attrs: dict, force_dtype=None, keep_float: bool = True) -> _ConvPlan:
    """The conv's plan; ``keep_float`` False keeps no float copy of dense weights (depthwise
    weights, a few per channel, are always kept)."""
    o, cg, kh, kw = w.shape
    g = int(attrs.get("group", 1))
    ws, abs_w, ct, chunks, _ = _prepare_conv(w, zp_w, x_dtype, zp_x, force_dtype)
    row_l1 = abs_w.sum(axis=1).astype(np.float64)
    if cg == 1:
        return _ConvPlan((), (), ct, chunks, [[ws.reshape(g, o // g, kh, kw).astype(ct)]], True, None, row_l1, o // g)
    flat = ws.reshape(g, o // g, cg * kh * kw)
    if not keep_float:
        zp = np.broadcast_to(per_channel(zp_w, o, "weight_zero_point"), (o,)).astype(ws.dtype).reshape(g, o // g, 1)
        source = (np.asarray(w).reshape(g, o // g, cg * kh * kw), zp)
        return _ConvPlan((), (), ct, chunks, None, False, None, row_l1, o // g, source)
    wmats = [[np.ascontiguousarray(flat[gi, :, a:b], dtype=ct) for a, b in chunks] for gi in range(g)]
    return _ConvPlan((), (), ct, chunks, wmats, False, None, row_l1, o // g)


def _run_conv(x, plan: _ConvPlan, geo: dict, zp_x: int, emit, emit_dw) -> None:
    """Drive the conv: ``emit(parts, b0, b1, o0, o1, r0, r1, scratch)`` receives exact
    accumulators of shape [o1 - o0, b1 - b0, r1 - r0, W] (W >= W_out: the columns past W_out are
    not part of the output) for images b0..b1, channels o0..o1 and output rows r0..r1 (parts sum
    to the accumulator; ``scratch``: they may be overwritten); depthwise convs call
    ``emit_dw(acc, b, o0, o1)`` with acc [o1 - o0, H_out, W] (a scratch view)."""
    n, c = x.shape[:2]
    g = geo["group"]
    (sh, sw), (ho, wo), (kh, kw) = geo["strides"], geo["out"], geo["kernel"]
    ct = plan.ct
    cg = c // g

    if kh == kw == 1 and not any(geo["pads"]) and (sh, sw) != (1, 1):
        x = x[:, :, : sh * (ho - 1) + 1: sh, : sw * (wo - 1) + 1: sw]  # 1x1 strided: subsample first
        sh = sw = 1
    if plan.depthwise:
        _run_depthwise(x, zp_x, plan, geo, (sh, sw), emit_dw, plan.dw_fused.weights if plan.dw_fused else None)
        return

    og = plan.og
    k_total = cg * kh * kw
    weights = [plan.weight_chunks(gi) for gi in range(g)]  # converted once per call when not kept
    if kh == kw == 1 and (sh, sw) == (1, 1) and not any(geo["pads"]) and x.shape[2:] == (ho, wo):
        xs = np.empty(x.shape, dtype=ct)  # pointwise: x - zp_x is the matmul operand as it is
        if zp_x == 0:
            np.copyto(xs, x, casting="unsafe")  # a plain conversion is the cheaper loop
        else:
            np.subtract(x, zp_x, out=xs, dtype=ct, casting="unsafe")
        stack = 1 if ho * wo >= STACK_COLUMNS else min(n, -(-STACK_COLUMNS // (ho * wo)))
        for b0 in range(0, n, stack):  # images with few pixels are stacked side by side
            b1 = min(n, b0 + stack)
            for gi in range(g):
                xg = xs[b0:b1, gi * cg:(gi + 1) * cg].reshape(b1 - b0, cg, ho * wo)
                if b1 - b0 > 1:
                    xg = np.ascontiguousarray(xg.transpose(1, 0, 2))
                xg = xg.reshape(cg, (b1 - b0) * ho * wo)
                parts = [np.matmul(wm, xg[a:bb]).reshape(og, b1 - b0, ho, wo)
                         for wm, (a, bb) in zip(weights[gi], plan.chunks)]
                emit(parts, b0, b1, gi * og, (gi + 1) * og, 0, ho, False)
        return

    # im2col from tap runs (_tap_runs): [K, images, rows, cols], in output-row chunks; images with
    # few pixels share one matmul. Wide outputs keep every run whole (cols = width: contiguous
    # copies; the columns past W_out are computed and dropped), narrow ones copy W_out columns
    # per row (cols = W_out), where the padding columns would cost more matmul than they save
    flat, runs, width = _tap_runs(x, zp_x, geo, (sh, sw), ct)
    cols = width if (width - wo) * PITCHED_IM2COL_WASTE <= wo else wo
    per_row = k_total * cols * ct.itemsize
    row_step = max(1, min(ho, IM2COL_BUDGET_BYTES // max(per_row, 1)))
    stack = 1
    if row_step >= ho and ho * wo < STACK_COLUMNS:
        stack = max(1, min(n, STACK_COLUMNS // (ho * wo), IM2COL_BUDGET_BYTES // max(per_row * ho, 1)))
    for b0 in range(0, n, stack):
        b1 = min(n, b0 + stack)
        nb = b1 - b0
        for r0 in range(0, ho, row_step):
            r1 = min(ho, r0 + row_step)
            for gi in range(g):
                im = np.empty((cg, len(runs), nb, r1 - r0, cols), dtype=ct)
                src = flat[b0:b1, gi * cg:(gi + 1) * cg].transpose(1, 0, 2, 3)  # [c, images, phase, run]
                for t, (p, start) in enumerate(runs):
                    s0 = start + r0 * width
                    run = src[:, :, p, s0:s0 + (r1 - r0) * width]
                    im[:, t] = run.reshape(cg, nb, r1 - r0, width)[..., :cols]
                mat = im.reshape(k_total, nb * (r1 - r0) * cols)
                parts = [np.matmul(wm, mat[a:bb]).reshape(og, nb, r1 - r0, cols)
                         for wm, (a, bb) in zip(weights[gi], plan.chunks)]
                emit(parts, b0, b1, gi * og, (gi + 1) * og, r0, r1, False)


def _tap_runs(x: np.ndarray, zp_x: int, geo: dict, strides, ct: np.dtype, channels_last: bool = False):
    """Every kernel tap as one contiguous run per channel, so that copies and multiply-adds stream
    long rows instead of W_out-long pieces.

    The padded input minus zp_x is split into its stride phases ("planes", plane (a, b)[y, q] =
    xpad[y*sh + a, q*sw + b]; one plane when the stride is 1), each plane W_out + max column offset
    wide ("width"). Tap (i, j) is then the flat run of its plane starting at row i*dh // sh, column
    j*dw // sw: output row r, column q of the tap is run element r*width + q (q < W_out; the
    columns past W_out read padding or the next row and are dropped by the caller). Returns
    (planes flattened to [N, C, phases, height * width], [(phase, run start)] for the taps in
    (i, j) order, width); ``channels_last``: planes [N, phases, height * width, C] instead, where
    a tap's run is a block of rows (position-major, channels contiguous)."""
    n, c, h, w = x.shape
    (pt, pl, _, _), (sh, sw), (dh, dw), (ho, wo), (kh, kw) = geo["pads"], strides, geo["dilations"], geo["out"], geo["kernel"]
    taps = [((i * dh) % sh, (j * dw) % sw, (i * dh) // sh, (j * dw) // sw) for i in range(kh) for j in range(kw)]
    phases = sorted({(a, b) for a, b, _, _ in taps})
    width = wo + max(t[3] for t in taps)
    height = ho + max(t[2] for t in taps) + 1  # + 1: the last row's extra columns run past it
    planes = np.empty((n, len(phases), height, width, c) if channels_last else (n, c, len(phases), height, width),
                      dtype=ct)
    view = planes.transpose(0, 4, 1, 2, 3) if channels_last else planes  # [N, C, phases, height, width]
    for p, (a, b) in enumerate(phases):  # plane row y holds input row y*sh + a - pt (if inside)
        y0, x0 = max(0, -(-(pt - a) // sh)), max(0, -(-(pl - b) // sw))
        y1 = min(height, (h - 1 + pt - a) // sh + 1)
        x1 = min(width, (w - 1 + pl - b) // sw + 1)
        plane = view[:, :, p]
        if y1 <= y0 or x1 <= x0:
            plane.fill(0)
            continue
        plane[:, :, :y0] = 0  # padding (x - zp_x = 0 there): only the border is written twice
        plane[:, :, y1:] = 0
        plane[:, :, y0:y1, :x0] = 0
        plane[:, :, y0:y1, x1:] = 0
        src = x[:, :, y0 * sh + a - pt: (y1 - 1) * sh + a - pt + 1: sh, x0 * sw + b - pl: (x1 - 1) * sw + b - pl + 1: sw]
        if zp_x == 0:
            np.copyto(plane[:, :, y0:y1, x0:x1], src, casting="unsafe")
        else:
            np.subtract(src, zp_x, out=plane[:, :, y0:y1, x0:x1], dtype=ct, casting="unsafe")
    flat = planes.reshape((n, len(phases), height * width, c) if channels_last else (n, c, len(phases), height * width))
    return flat, [(phases.index((a, b)), oi * width + oj) for a, b, oi, oj in taps], width


def _run_depthwise(x: np.ndarray, zp_x: int, plan: _ConvPlan, geo: dict, strides, emit_dw, weights=None) -> None:
    """One input channel per group: acc[g, j] = sum over taps of (x - zp_x)[g, tap] * w[g, j, tap].

    Each tap is a contiguous run (``_tap_runs``), so the accumulator lives on the H_out x width
    grid whose first W_out columns are the output (the rest, never emitted, read padding or the
    next row). Channel blocks stay in cache; first tap written, the rest added. ``weights``
    ([g, og, kh, kw] in the compute dtype) replaces the plan's (the fused path's w * m)."""
    n, g = x.shape[:2]
    ho, kw = geo["out"][0], geo["kernel"][1]
    wt = plan.wmats[0][0] if weights is None else weights  # [g, og, kh, kw]
    og, ct = wt.shape[1], plan.ct
    span = ho * (geo["out"][1] + ((kw - 1) * geo["dilations"][1]) // strides[1])  # = ho * width
    if og == 1 and span <= CHANNELS_LAST_MAX_SPAN:
        _run_depthwise_channels_last(x, zp_x, geo, strides, wt, ct, emit_dw)
        return
    flat, tap_runs, width = _tap_runs(x, zp_x, geo, strides, ct)
    runs = [(t // kw, t % kw, p, start) for t, (p, start) in enumerate(tap_runs)]
    gb = max(1, min(g, BLOCK_ELEMENTS // max(1, og * span)))
    acc = np.empty((gb, og, span), dtype=ct)
    tmp = np.empty((gb, og, span), dtype=ct)
    with _long_rows(span):
        for b in range(n):
            for g0 in range(0, g, gb):
                g1 = min(g, g0 + gb)
                a, t = acc[: g1 - g0], tmp[: g1 - g0]
                for index, (i, j, p, start) in enumerate(runs):
                    src = flat[b, g0:g1, None, p, start:start + span]
                    wij = wt[g0:g1, :, i, j, None]
                    if index == 0:
                        np.multiply(src, wij, out=a)
                    else:
                        np.multiply(src, wij, out=t)
                        np.add(a, t, out=a)
                emit_dw(a.reshape((g1 - g0) * og, ho, width), b, g0 * og, g1 * og)


def _run_depthwise_channels_last(x: np.ndarray, zp_x: int, geo: dict, strides, wt: np.ndarray, ct: np.dtype,
                                 emit_dw) -> None:
    """_run_depthwise for small maps (H_out x width <= CHANNELS_LAST_MAX_SPAN): the same sums
    with channels as the contiguous axis. A tap's run is then [span, channels], and its weights a
    contiguous row broadcast down the positions, so each multiply-add streams rows of hundreds of
    channels instead of per-channel rows of a few dozen positions (which numpy iterates slowly,
    see _long_rows). emit_dw receives the accumulator as a [channels, H_out, width] view.
    EfficientNet-Lite0's 7x7 5x5 depthwise layers: 1.7 -> 1.2 ms each, MobileNetV2's 7x7
    layers 0.6 -> 0.4 ms (one thread)."""
    n, g = x.shape[:2]
    ho, (kh, kw) = geo["out"][0], geo["kernel"]
    flat, tap_runs, width = _tap_runs(x, zp_x, geo, strides, ct, channels_last=True)
    span = ho * width
    w_rows = np.ascontiguousarray(wt[:, 0].reshape(g, kh * kw).T)  # [taps, g]
    gb = max(1, min(g, max(LONG_ROW, BLOCK_ELEMENTS // span)))
    acc = np.empty((span, gb), dtype=ct)
    tmp = np.empty((span, gb), dtype=ct)
    with _long_rows(gb):
        for b in range(n):
            for g0 in range(0, g, gb):
                g1 = min(g, g0 + gb)
                a, t = acc[:, : g1 - g0], tmp[:, : g1 - g0]
                for index, (p, start) in enumerate(tap_runs):
                    src = flat[b, p, start:start + span, g0:g1]
                    if index == 0:
                        np.multiply(src, w_rows[index, g0:g1], out=a)
                    else:
                        np.multiply(src, w_rows[index, g0:g1], out=t)
                        np.add(a, t, out=a)
                emit_dw(a.reshape(ho, width, g1 - g0).transpose(2, 0, 1), b, g0, g1)


def conv_accumulate(x, w, zp_x, zp_w, attrs: dict, *, force_dtype=None) -> np.ndarray:
    """acc[n,o,h,w] = sum (w - zp_w[o]) * (xpad - zp_x), xpad = x padded with zp_x; int64 result.

    ``force_dtype`` (tests) overrides the compute dtype chosen by the exactness bound.
    """
    x, w = np.asarray(x), np.asarray(w)
    geo = conv_geometry(attrs, x.shape, w.shape)
    plan = _conv_plan(w, zp_w, x.dtype, int(zp_x), attrs, force_dtype)
    n, o = x.shape[0], w.shape[0]
    ho, wo = geo["out"]
    out = np.empty((n, o, ho * wo), dtype=np.int64)

    def emit(parts, b0, b1, o0, o1, r0, r1, scratch):
        dest = out.reshape(n, o, ho, wo)[b0:b1, o0:o1, r0:r1].transpose(1, 0, 2, 3)
        np.copyto(dest, parts[0][..., :wo], casting="unsafe")
        for p in parts[1:]:
            np.add(dest, p[..., :wo], out=dest, casting="unsafe")

    def emit_dw(acc, b, o0, o1):
        np.copyto(out.reshape(n, o, ho, wo)[b, o0:o1], acc[:, :, :wo], casting="unsafe")

    _run_conv(x, plan, geo, int(zp_x), emit, emit_dw)
    return out.reshape(n, o, ho, wo)


_generic_conv = ref.make_conv(conv_accumulate)


def _cached(layer, key: tuple, keep: tuple, build):
    """The layer's prepared plan for ``key`` (ids of params + scalars), built on first use."""
    cached = layer.__dict__.get("_fast_plan")
    if cached is not None and cached.key == key:
        return cached
    plan = build()
    plan.key, plan.keep = key, keep
    layer.__dict__["_fast_plan"] = plan
    return plan


def _ids_key(arrays: tuple) -> tuple:
    return tuple((id(a), getattr(a, "shape", None), getattr(a, "dtype", None)) for a in arrays)


def _plan_key(layer, x: np.ndarray, zp_x: int, out_info, *extra) -> tuple[tuple, tuple, bool]:
    """(params, cache key, keep float weights) of a conv/gemm layer's plan: the key changes, and
    the plan is rebuilt, when a param array is replaced or the input dtype or zero point, the
    output's dtype or zero point, the rounding, the folded-zero-point attr, the float-weight
    mode or ``extra`` (the conv's group) changes."""
    params = tuple(layer.params.get(n) for n in sorted(_CONV_PARAMS))
    keep_float = KEEP_FLOAT_WEIGHTS.get()
    key = (_ids_key(params), x.dtype.str, zp_x, out_info.dtype, tensor_zero_point(out_info), layer.rounding,
           bool(layer.attrs.get("input_zero_point_folded")), keep_float, *extra)
    return params, key, keep_float



def _weighted_epilogue(layer, plan, w, zp_w, x_dtype, zp_x: int, in_info, out_info):
    """The fused requantization of a conv/gemm layer: bias (+ the folded input-zero-point term),
    per-channel m and k, clamp bounds and the accumulator bound |x - zp_x| * sum|w - zp_w| that
    decides whether it may run in int32."""
    o = w.shape[0]
    bias = ref._bias(layer, o) + ref._folded_zero_point_term(layer, w, zp_w, in_info)
    m, k = requant_params(layer, o)
    lo, hi = clamp_bounds(layer, out_info.dtype, o)
    acc_bound = dtype_bound(x_dtype, zp_x) * plan.row_l1
    return Epilogue.build(bias, m, k, lo, hi, tensor_zero_point(out_info), acc_bound, layer.rounding)


def conv(layer, inputs, in_infos, out_infos):
    """y = clamp(zp_y + requant(acc + bias, m[o], k[o]), lo[o], hi[o]) (the reference rule), with
    the fused epilogue applied block by block right after each matmul."""
    if not _known_layer(layer, _CONV_ATTRS, _CONV_PARAMS):
        return _generic_conv(layer, inputs, in_infos, out_infos)
    x = inputs[0]
    w, zp_w = ref._weight(layer)
    geo = conv_geometry(layer.attrs, x.shape, w.shape)
    zp_x = tensor_zero_point(in_infos[0])
    out_info = out_infos[0]
    params, key, keep_float = _plan_key(layer, x, zp_x, out_info, int(layer.attrs.get("group", 1)))

    def build():
        plan = _conv_plan(w, zp_w, x.dtype, zp_x, layer.attrs, keep_float=keep_float)
        plan.epilogue = _weighted_epilogue(layer, plan, w, zp_w, x.dtype, zp_x, in_infos[0], out_info)
        plan.dw_fused = _DepthwiseFused.build(plan) if FUSE_DEPTHWISE else None
        return plan

    plan = _cached(layer, key, params, build)
    if plan.epilogue is None:
        return _generic_conv(layer, inputs, in_infos, out_infos)
    n, o = x.shape[0], w.shape[0]
    ho, wo = geo["out"]
    y = np.empty((n, o, ho * wo), dtype=out_info.dtype)

    def emit(parts, b0, b1, o0, o1, r0, r1, scratch):
        plan.epilogue.apply(parts, y.reshape(n, o, ho, wo)[b0:b1, o0:o1, r0:r1].transpose(1, 0, 2, 3), o0, scratch)

    fused = plan.dw_fused

    def emit_dw(acc, b, o0, o1):
        if fused is None:
            plan.epilogue.apply([acc], y.reshape(n, o, ho, wo)[b, o0:o1], o0, True)
        else:
            fused.finish(acc, y.reshape(n, o, ho, wo)[b, o0:o1], o0, o1)

    _run_conv(x, plan, geo, zp_x, emit, emit_dw)
    return [y.reshape(n, o, ho, wo)]


# --------------------------------------------------------------------------- gemm / matmul


def matmul_accumulate(a, b, zp_a, zp_b, *, force_dtype=None) -> np.ndarray:
    """acc = (a - zp_a) @ (b - zp_b), exact via float BLAS when the bound allows; int64 result."""
    a, b = np.asarray(a), np.asarray(b)
    zp_a = int(np.asarray(zp_a).reshape(()))
    zp_b = int(np.asarray(zp_b).reshape(()))
    k = a.shape[-1]
    bounds = dtype_bound(a.dtype, zp_a), dtype_bound(b.dtype, zp_b)
    ct = np.dtype(force_dtype) if force_dtype else compute_dtype(*bounds, k)
    av = a.astype(ct)
    av -= ct.type(zp_a)
    bv = b.astype(ct)
    bv -= ct.type(zp_b)
    acc = np.matmul(av, bv)
    return acc if acc.dtype == np.int64 else acc.astype(np.int64)


@dataclass
class _GemmPlan:
    key: tuple
    keep: tuple
    ct: np.dtype
    chunks: list[tuple[int, int]]
    wts: list[np.ndarray] | None  # per chunk: (w - zp_w)[:, chunk].T as [chunk, O]
    epilogue: Epilogue | None
    row_l1: np.ndarray
    source: tuple | None = None  # weights not kept in float: (w [O, K], zp_w [O, 1])

    def weight_chunks(self) -> list[np.ndarray]:
        """(w - zp_w)[:, chunk].T per chunk in the compute dtype: kept, or converted for this call."""
        if self.wts is not None:
            return self.wts
        w, zp = self.source
        return [_minus_zero_point(w[:, a:b], zp, self.ct).T for a, b in self.chunks]


def _gemm_plan(w, zp_w, x_dtype, zp_x: int, force_dtype=None, keep_float: bool = True) -> _GemmPlan:
    w = np.asarray(w)
    ws = _weights_minus_zero_point(w, zp_w, (-1, 1))
    abs_w = np.abs(ws)
    ct, chunks = reduction_plan(abs_w, dtype_bound(x_dtype, zp_x), force_dtype)
    row_l1 = abs_w.sum(axis=1).astype(np.float64)
    if not keep_float:
        zp = per_channel(zp_w, w.shape[0], "weight_zero_point").astype(ws.dtype).reshape(-1, 1)
        return _GemmPlan((), (), ct, chunks, None, None, row_l1, (w, zp))
    wts = [np.ascontiguousarray(ws[:, a:b].T, dtype=ct) for a, b in chunks]
    return _GemmPlan((), (), ct, chunks, wts, None, row_l1)


def _gemm_parts(x: np.ndarray, plan: _GemmPlan, zp_x: int) -> list[np.ndarray]:
    xv = np.empty(x.shape, dtype=plan.ct)
    np.subtract(x, zp_x, out=xv, dtype=plan.ct, casting="unsafe")
    return [np.matmul(xv[..., a:b], wt) for wt, (a, b) in zip(plan.weight_chunks(), plan.chunks)]


def gemm_accumulate(x, w, zp_x, zp_w, *, force_dtype=None) -> np.ndarray:
    """acc[..., o] = sum_k (w[o,k] - zp_w[o]) * (x[..., k] - zp_x), via float BLAS when exact."""
    x, w = np.asarray(x), np.asarray(w)
    parts = _gemm_parts(x, _gemm_plan(w, zp_w, x.dtype, int(zp_x), force_dtype), int(zp_x))
    acc = parts[0].astype(np.int64)
    for p in parts[1:]:
        np.add(acc, p, out=acc, casting="unsafe")
    return acc


_generic_gemm = ref.make_gemm(gemm_accumulate)
_GEMM_ATTRS = {"input_zero_point_folded"}


def gemm(layer, inputs, in_infos, out_infos):
    """acc[..., o] + bias[o], requantized per o (the last axis): the reference rule, fused."""
    if not _known_layer(layer, _GEMM_ATTRS, _CONV_PARAMS):
        return _generic_gemm(layer, inputs, in_infos, out_infos)
    x = inputs[0]
    w, zp_w = ref._weight(layer)
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        return _generic_gemm(layer, inputs, in_infos, out_infos)  # the reference names the error
    zp_x = tensor_zero_point(in_infos[0])
    out_info = out_infos[0]
    params, key, keep_float = _plan_key(layer, x, zp_x, out_info)

    def build():
        plan = _gemm_plan(w, zp_w, x.dtype, zp_x, keep_float=keep_float)
        plan.epilogue = _weighted_epilogue(layer, plan, w, zp_w, x.dtype, zp_x, in_infos[0], out_info)
        return plan

    plan = _cached(layer, key, params, build)
    if plan.epilogue is None:
        return _generic_gemm(layer, inputs, in_infos, out_infos)
    o = w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    parts = [p.T for p in _gemm_parts(x2, plan, zp_x)]  # [O, M]
    y = np.empty((x2.shape[0], o), dtype=out_info.dtype)
    plan.epilogue.apply(parts, y.T)
    return [y.reshape(x.shape[:-1] + (o,))]


matmul = ref.make_matmul(matmul_accumulate)


# --------------------------------------------------------------------------- add


def add(layer, inputs, in_infos, out_infos):
    """acc = (a - zp_a)*m_a + (b - zp_b)*m_b; y = clamp(zp_y + shift_round(acc, k)) (the
    reference rule), fused on cache-sized blocks as t = a*m_a + b*m_b + c, y = clip(t >> k),
    c = 2^(k-1) - zp_a*m_a - zp_b*m_b + zp_y*2^k, when a static bound keeps t inside int64."""
    a, b = inputs[0], inputs[1]
    m = param(layer, "multiplier", required=True).astype(np.int64).ravel()
    k = per_channel(param(layer, "shift", required=True), 1, "shift")
    if (m.size != 2 or a.shape != b.shape or layer.rounding not in (None, "half_up")
            or not 0 <= int(k[0]) <= 62 or set(layer.params) - {"multiplier", "shift", "clamp_lo", "clamp_hi"}):
        return ref.add(layer, inputs, in_infos, out_infos)
    k = int(k[0])
    zp_a, zp_b = tensor_zero_point(in_infos[0]), tensor_zero_point(in_infos[1])
    zp_y = tensor_zero_point(out_infos[0])
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    half = (1 << (k - 1)) if k > 0 else 0
    c = half - zp_a * int(m[0]) - zp_b * int(m[1]) + (zp_y << k)
    bound = (dtype_bound(a.dtype, 0) * abs(int(m[0])) + dtype_bound(b.dtype, 0) * abs(int(m[1]))
             + abs(c) + (half + abs(zp_a * int(m[0])) + abs(zp_b * int(m[1]))))
    if bound >= 2**62 or abs(zp_y << k) >= 2**62:
        return ref.add(layer, inputs, in_infos, out_infos)
    wt = np.dtype(np.int32 if bound < 2**31 - 2**11 and k <= 30 else np.int64)
    lo0, hi0 = int(lo[0]), int(hi[0])
    if wt == np.int32:
        lo0, hi0 = max(lo0, -(2**31)), min(hi0, 2**31 - 1)
    lo0, hi0 = wt.type(lo0), wt.type(hi0)
    fa, fb = a.reshape(-1), b.reshape(-1)
    y = np.empty(a.shape, dtype=dtype)
    fy = y.reshape(-1)
    step = BLOCK_ELEMENTS
    ma, mb, cc, kk = wt.type(m[0]), wt.type(m[1]), wt.type(c), wt.type(k)

    t = np.empty(min(step, fa.size), dtype=wt)
    u = np.empty_like(t)
    for s in range(0, fa.size, step):  # cache-sized element blocks
        e = min(fa.size, s + step)
        tt, uu = t[: e - s], u[: e - s]
        np.copyto(tt, fa[s:e])  # a plain widening copy, then a same-type multiply: faster
        np.multiply(tt, ma, out=tt)  # than one multiply that casts its input in buffers
        np.copyto(uu, fb[s:e])
        np.multiply(uu, mb, out=uu)
        np.add(tt, uu, out=tt)
        np.add(tt, cc, out=tt)
        np.right_shift(tt, kk, out=tt)
        clip_ufunc(tt, lo0, hi0, out=tt)
        np.copyto(fy[s:e], tt, casting="unsafe")
    return [y]


# --------------------------------------------------------------------------- pooling


def _padded_taps(x: np.ndarray, geo: dict, fill: int):
    """x padded with ``fill`` (pads plus the ceil-mode overhang), and a generator of the strided
    view of every kernel tap: one [N, C, H_out, W_out] view per tap."""
    (pt, pl, pb, pr), (eh, ew) = geo["pads"], geo["extra"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb + eh), (pl, pr + ew)), constant_values=fill)
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = geo["kernel"], geo["strides"], geo["dilations"], geo["out"]

    def taps():
        for i in range(kh):
            for j in range(kw):
                yield xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]

    return taps()


def maxpool(layer, inputs, in_infos, out_infos):
    """Max over the window in the input's own dtype, padding filled with the dtype's minimum:
    it never wins over an input element, and an all-padding window gives the minimum."""
    check_same_qparams(in_infos[0], out_infos[0], "maxpool")
    x = inputs[0].astype(out_infos[0].dtype, copy=False)
    geo = pool_geometry(layer.attrs, x.shape)
    y = None
    for tap in _padded_taps(x, geo, dtype_limits(out_infos[0].dtype)[0]):
        y = tap.copy() if y is None else np.maximum(y, tap, out=y)
    return [y]


def avgpool(layer, inputs, in_infos, out_infos):
    """S = window sum of (x - zp_x) (padding contributes 0); y = clamp(zp_y + requant(S, m, k))."""
    x = inputs[0]
    geo = pool_geometry(layer.attrs, x.shape)
    whole = geo["kernel"] == x.shape[2:] and not any(geo["pads"]) and geo["dilations"] == (1, 1)
    zp_x = tensor_zero_point(in_infos[0])
    if whole and geo["out"] == (1, 1):  # global average pooling: sum the raw values, then shift
        s = x.sum(axis=(2, 3), keepdims=True, dtype=np.int64) - np.int64(zp_x) * (x.shape[2] * x.shape[3])
    else:
        xs = x.astype(np.int64) - zp_x
        s = None
        for tap in _padded_taps(xs, geo, 0):
            s = tap.copy() if s is None else np.add(s, tap, out=s)
    m, k = ref._pool_requant(layer, geo["out"])
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [finish(requantize(s, m, k, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype)]


KERNELS = dict(ref.KERNELS)
KERNELS.update(conv=conv, gemm=gemm, matmul=matmul, add=add, maxpool=maxpool, avgpool=avgpool)
