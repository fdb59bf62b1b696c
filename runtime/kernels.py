"""Fast kernels: the same integers as kernels_reference, computed with BLAS where it pays.

A convolution or matmul of integer operands is computed as a float matmul on integer-valued
floats. That is exact when every partial sum is an integer below 2^p (p = 24 for float32, 53 for
float64): each product and each sum is then representable, whatever order or FMA use the BLAS
picks (OpenBLAS/MKL sum products by additions only; no Strassen). The bound used is
max|x - zp_x| (from x's dtype) * max|w - zp_w| (from the data) * K; past 2^53 the kernel falls
back to int64 arithmetic. 1x1 convs skip im2col; depthwise convs (one input channel per group)
are sums of strided windows, one numpy op per kernel tap; nothing loops over pixels or channels.
Ops with no faster formulation (add, reshape, concat, clamp, requantize) reuse the reference.
"""
from __future__ import annotations

import numpy as np

from . import kernels_reference as ref
from .fixed_point import dtype_limits, requantize
from .kernel_common import (
    check_same_qparams,
    clamp_bounds,
    conv_geometry,
    finish,
    per_channel,
    pool_geometry,
    tensor_zero_point,
)

EXACT_FLOAT32 = 2**24
EXACT_FLOAT64 = 2**53
IM2COL_BUDGET_BYTES = 256 * 2**20  # im2col is done in batch chunks of at most this size


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


def _to_int64(acc: np.ndarray) -> np.ndarray:
    return acc if acc.dtype == np.int64 else acc.astype(np.int64)


def conv_accumulate(x, w, zp_x, zp_w, attrs: dict, *, force_dtype=None) -> np.ndarray:
    """acc[n,o,h,w] = sum (w - zp_w[o]) * (xpad - zp_x), xpad = x padded with zp_x; int64 result.

    ``force_dtype`` (tests) overrides the compute dtype chosen by the exactness bound.
    """
    x, w = np.asarray(x), np.asarray(w)
    geo = conv_geometry(attrs, x.shape, w.shape)
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    g, og = geo["group"], o // geo["group"]
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (ho, wo) = geo["pads"], geo["strides"], geo["dilations"], geo["out"]
    ws = w.astype(np.int64) - per_channel(zp_w, o, "weight_zero_point").reshape(-1, 1, 1, 1)
    w_bound = int(np.abs(ws).max()) if ws.size else 0
    ct = np.dtype(force_dtype) if force_dtype else compute_dtype(dtype_bound(x.dtype, zp_x), w_bound, cg * kh * kw)

    xs = x.astype(ct)
    xs -= ct.type(zp_x)
    if pt or pl or pb or pr:  # x - zp_x padded with 0 == x padded with zp_x, minus zp_x
        xs = np.pad(xs, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ws = ws.astype(ct)
    rows = lambda i: slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)  # noqa: E731
    cols = lambda j: slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)  # noqa: E731

    if cg == 1:  # depthwise (any channel multiplier): one multiply-add per tap over all pixels
        xg = xs.reshape(n, g, 1, xs.shape[2], xs.shape[3])
        wg = ws.reshape(g, og, kh, kw)
        acc = np.zeros((n, g, og, ho, wo), dtype=ct)
        for i in range(kh):
            for j in range(kw):
                acc += xg[:, :, :, rows(i), cols(j)] * wg[None, :, :, i, j, None, None]
        return _to_int64(acc).reshape(n, o, ho, wo)

    wg = ws.reshape(g, og, cg * kh * kw)
    if kh == kw == 1:  # 1x1: a strided view, no im2col
        xv = np.ascontiguousarray(xs[:, :, rows(0), cols(0)]).reshape(n, g, cg, ho * wo)
        return _to_int64(np.matmul(wg, xv)).reshape(n, o, ho, wo)

    per_item = c * kh * kw * ho * wo * ct.itemsize
    chunk = max(1, IM2COL_BUDGET_BYTES // max(per_item, 1))
    out = np.empty((n, o, ho, wo), dtype=np.int64)
    for start in range(0, n, chunk):  # batch chunks bound im2col's memory
        part = xs[start: start + chunk]
        b = part.shape[0]
        im = np.empty((b, g, cg, kh, kw, ho, wo), dtype=ct)
        pg = part.reshape(b, g, cg, part.shape[2], part.shape[3])
        for i in range(kh):
            for j in range(kw):
                im[:, :, :, i, j] = pg[:, :, :, rows(i), cols(j)]
        acc = np.matmul(wg, im.reshape(b, g, cg * kh * kw, ho * wo))
        out[start: start + b] = acc.reshape(b, o, ho, wo)
    return out


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
    return _to_int64(np.matmul(av, bv))


def gemm_accumulate(x, w, zp_x, zp_w, *, force_dtype=None) -> np.ndarray:
    """acc[..., o] = sum_k (w[o,k] - zp_w[o]) * (x[..., k] - zp_x), via float BLAS when exact."""
    x, w = np.asarray(x), np.asarray(w)
    ws = w.astype(np.int64) - per_channel(zp_w, w.shape[0], "weight_zero_point").reshape(-1, 1)
    w_bound = int(np.abs(ws).max()) if ws.size else 0
    ct = np.dtype(force_dtype) if force_dtype else compute_dtype(dtype_bound(x.dtype, zp_x), w_bound, w.shape[1])
    xv = x.astype(ct)
    xv -= ct.type(zp_x)
    return _to_int64(np.matmul(xv, ws.astype(ct).T))


conv = ref.make_conv(conv_accumulate)
gemm = ref.make_gemm(gemm_accumulate)
matmul = ref.make_matmul(matmul_accumulate)


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
    xs = x.astype(np.int64) - tensor_zero_point(in_infos[0])
    whole = geo["kernel"] == x.shape[2:] and not any(geo["pads"]) and geo["dilations"] == (1, 1)
    if whole and geo["out"] == (1, 1):  # global average pooling
        s = xs.sum(axis=(2, 3), keepdims=True)
    else:
        s = None
        for tap in _padded_taps(xs, geo, 0):
            s = tap.copy() if s is None else np.add(s, tap, out=s)
    m, k = ref._pool_requant(layer, geo["out"])
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [finish(requantize(s, m, k, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype)]


KERNELS = dict(ref.KERNELS)
KERNELS.update(conv=conv, gemm=gemm, matmul=matmul, maxpool=maxpool, avgpool=avgpool)
