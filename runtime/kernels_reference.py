"""The oracle: plain int64 kernels of every IR op, written to be obviously right, not fast.

Each kernel is ``fn(layer, inputs, in_infos, out_infos) -> list[np.ndarray]`` and is listed in
``KERNELS``. No float appears anywhere; accumulators are int64, requantization rounds half up
(fixed_point.requantize). The rules are written out in docs/ir.md.
"""
from __future__ import annotations

import numpy as np

from .errors import ProgramError
from .fixed_point import dtype_limits, requantize, shift_round
from .kernel_common import (
    check_same_qparams,
    clamp_bounds,
    conv_geometry,
    finish,
    param,
    per_channel,
    pool_geometry,
    requant_params,
    resolve_reshape,
    tensor_zero_point,
)

# --- accumulate-only primitives (ConvInteger / MatMulInteger) ---------------------------------


def conv_accumulate(x, w, zp_x, zp_w, attrs: dict) -> np.ndarray:
    """acc[n,o,h,w] = sum_{c,i,j} (w[o,c,i,j] - zp_w[o]) * (xpad[n, g*Cg+c, h*sh+i*dh, w*sw+j*dw] - zp_x).

    xpad is x padded with zp_x (so padding contributes 0); one int64 einsum per kernel tap.
    """
    x, w = np.asarray(x), np.asarray(w)
    geo = conv_geometry(attrs, x.shape, w.shape)
    n, _c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    g = geo["group"]
    (pt, pl, pb, pr), (sh, sw), (dh, dw), (ho, wo) = geo["pads"], geo["strides"], geo["dilations"], geo["out"]
    zp_w = per_channel(zp_w, o, "weight_zero_point").reshape(-1, 1, 1, 1)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=int(zp_x))
    xs = (xp - int(zp_x)).reshape(n, g, cg, xp.shape[2], xp.shape[3])
    ws = (w.astype(np.int64) - zp_w).reshape(g, o // g, cg, kh, kw)
    acc = np.zeros((n, g, o // g, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = xs[:, :, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            acc += np.einsum("ngchw,goc->ngohw", tap, ws[:, :, :, i, j])
    return acc.reshape(n, o, ho, wo)


def matmul_accumulate(a, b, zp_a, zp_b) -> np.ndarray:
    """acc = (a - zp_a) @ (b - zp_b) in int64, numpy batched-matmul broadcasting (zero points per tensor)."""
    a = np.asarray(a).astype(np.int64) - np.asarray(zp_a, dtype=np.int64).reshape(())
    b = np.asarray(b).astype(np.int64) - np.asarray(zp_b, dtype=np.int64).reshape(())
    return np.matmul(a, b)


def gemm_accumulate(x, w, zp_x, zp_w) -> np.ndarray:
    """acc[..., o] = sum_k (w[o,k] - zp_w[o]) * (x[..., k] - zp_x) in int64."""
    w = np.asarray(w)
    zp_w = per_channel(zp_w, w.shape[0], "weight_zero_point").reshape(-1, 1)
    return np.einsum("...k,ok->...o", np.asarray(x).astype(np.int64) - int(zp_x), w.astype(np.int64) - zp_w)


# --- layer kernels ------------------------------------------------------------------------------


def _bias(layer, n: int) -> np.ndarray:
    bias = param(layer, "bias")
    if bias is None:
        return np.zeros(n, dtype=np.int64)
    bias = np.asarray(bias, dtype=np.int64).ravel()
    if bias.size != n:
        raise ProgramError(f"param 'bias' has {bias.size} entries, expected {n}")
    return bias


def _weight(layer) -> tuple[np.ndarray, np.ndarray]:
    w = param(layer, "weight", required=True)
    zp_w = param(layer, "weight_zero_point", np.zeros(1, np.int64))
    return w, zp_w


def _folded_zero_point_term(layer, w, zp_w, x_info) -> np.ndarray:
    """With attr ``input_zero_point_folded`` the bias already holds -zp_x * sum(w - zp_w) per
    output channel (acc = sum((w - zp_w) * xpad) + bias, xpad padded with zp_x, as the
    accelerator forms it); the accumulate primitives subtract zp_x themselves, so add the term
    back: sum((w - zp_w)(xpad - zp_x)) + zp_x * sum(w - zp_w) = sum((w - zp_w) * xpad). Exact."""
    o = w.shape[0]
    if not layer.attrs.get("input_zero_point_folded"):
        return np.zeros(o, dtype=np.int64)
    zp_w = per_channel(zp_w, o, "weight_zero_point").reshape(-1, *[1] * (w.ndim - 1))
    w_sum = (np.asarray(w).astype(np.int64) - zp_w).reshape(o, -1).sum(axis=1)
    return tensor_zero_point(x_info) * w_sum


def make_conv(accumulate):
    """A conv kernel around an accumulate primitive: y = clamp(zp_y + requant(acc + bias, m, k))."""

    def conv(layer, inputs, in_infos, out_infos):
        w, zp_w = _weight(layer)
        o = w.shape[0]
        acc = accumulate(inputs[0], w, tensor_zero_point(in_infos[0]), zp_w, layer.attrs)
        acc = acc + (_bias(layer, o) + _folded_zero_point_term(layer, w, zp_w, in_infos[0])).reshape(1, -1, 1, 1)
        m, k = requant_params(layer, o)
        dtype = out_infos[0].dtype
        lo, hi = clamp_bounds(layer, dtype, o)
        return [finish(requantize(acc, m, k, axis=1, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype, axis=1)]

    return conv


def make_gemm(accumulate):
    """A gemm kernel: acc[..., o] + bias[o], requantized per o (the last axis)."""

    def gemm(layer, inputs, in_infos, out_infos):
        w, zp_w = _weight(layer)
        if w.ndim != 2 or inputs[0].shape[-1] != w.shape[1]:
            raise ProgramError(f"gemm weight {w.shape} does not fit input {inputs[0].shape}")
        o = w.shape[0]
        acc = accumulate(inputs[0], w, tensor_zero_point(in_infos[0]), zp_w) + _bias(layer, o)
        acc = acc + _folded_zero_point_term(layer, w, zp_w, in_infos[0])
        m, k = requant_params(layer, o)
        dtype = out_infos[0].dtype
        lo, hi = clamp_bounds(layer, dtype, o)
        return [finish(requantize(acc, m, k, axis=-1, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype, axis=-1)]

    return gemm


def make_matmul(accumulate):
    """A matmul kernel (two activations): y = clamp(zp_y + requant((a - zp_a) @ (b - zp_b), m, k))."""

    def matmul(layer, inputs, in_infos, out_infos):
        acc = accumulate(inputs[0], inputs[1], tensor_zero_point(in_infos[0]), tensor_zero_point(in_infos[1]))
        m, k = requant_params(layer, 1)
        dtype = out_infos[0].dtype
        lo, hi = clamp_bounds(layer, dtype)
        return [finish(requantize(acc, m, k, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype)]

    return matmul


conv = make_conv(conv_accumulate)
gemm = make_gemm(gemm_accumulate)
matmul = make_matmul(matmul_accumulate)


def add(layer, inputs, in_infos, out_infos):
    """acc = (a - zp_a)*m_a + (b - zp_b)*m_b; y = clamp(zp_y + shift_round(acc, k, rounding))."""
    m = param(layer, "multiplier", required=True).astype(np.int64).ravel()
    k = per_channel(param(layer, "shift", required=True), 1, "shift")
    if m.size != 2:
        raise ProgramError(f"add needs multiplier [m_a, m_b], got {m.size} values")
    a = inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0])
    b = inputs[1].astype(np.int64) - tensor_zero_point(in_infos[1])
    acc = a * m[0] + b * m[1]
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [finish(shift_round(acc, k[0], layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype)]


def _windows(geo, h: int, w: int):
    """Every output position with the in-bounds input rows and columns of its window (pads and
    the ceil-mode overhang dropped)."""
    (kh, kw), (sh, sw), (dh, dw) = geo["kernel"], geo["strides"], geo["dilations"]
    pt, pl = geo["pads"][0], geo["pads"][1]
    for oh in range(geo["out"][0]):
        rows = [oh * sh - pt + i * dh for i in range(kh)]
        rows = [r for r in rows if 0 <= r < h]
        for ow in range(geo["out"][1]):
            cols = [ow * sw - pl + j * dw for j in range(kw)]
            cols = [c for c in cols if 0 <= c < w]
            yield oh, ow, rows, cols


def maxpool(layer, inputs, in_infos, out_infos):
    """y = max over the in-bounds window (padding never wins); a window with no input element
    gives the dtype's minimum. Output qparams equal the input's."""
    check_same_qparams(in_infos[0], out_infos[0], "maxpool")
    x = inputs[0]
    geo = pool_geometry(layer.attrs, x.shape)
    n, c, h, w = x.shape
    y = np.full((n, c) + geo["out"], dtype_limits(out_infos[0].dtype)[0], dtype=np.int64)
    for oh, ow, rows, cols in _windows(geo, h, w):
        if rows and cols:
            y[:, :, oh, ow] = x[:, :, rows][:, :, :, cols].astype(np.int64).max(axis=(2, 3))
    return [y.astype(out_infos[0].dtype)]


def avgpool(layer, inputs, in_infos, out_infos):
    """S = sum over the window of (x - zp_x) (padding = zp_x contributes 0);
    y = clamp(zp_y + requant(S, m, k)), m [1] or [H_out, W_out] (the divisor is folded into m, k)."""
    x = inputs[0]
    geo = pool_geometry(layer.attrs, x.shape)
    n, c, h, w = x.shape
    xs = x.astype(np.int64) - tensor_zero_point(in_infos[0])
    s = np.zeros((n, c) + geo["out"], dtype=np.int64)
    for oh, ow, rows, cols in _windows(geo, h, w):
        if rows and cols:
            s[:, :, oh, ow] = xs[:, :, rows][:, :, :, cols].sum(axis=(2, 3))
    m, k = _pool_requant(layer, geo["out"])
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [finish(requantize(s, m, k, rounding=layer.rounding), tensor_zero_point(out_infos[0]), lo, hi, dtype)]


def _pool_requant(layer, out_hw) -> tuple[np.ndarray, np.ndarray]:
    m = param(layer, "multiplier", required=True).astype(np.int64)
    k = per_channel(param(layer, "shift", required=True), 1, "shift")
    if m.size != 1 and m.shape != tuple(out_hw):
        raise ProgramError(f"avgpool multiplier must be [1] or [H_out, W_out] = {list(out_hw)}, got {list(m.shape)}")
    return (m.reshape(()) if m.size == 1 else m), k


def reshape(layer, inputs, in_infos, out_infos):
    """ONNX Reshape of integers. The target is resolved against the declared input shape; a
    different leading batch is carried through when the declared output keeps the batch dim."""
    x = inputs[0]
    declared_in = in_infos[0].shape
    target = layer.attrs.get("shape")
    if target is None:
        raise ProgramError("reshape needs attr 'shape'")
    declared_out = resolve_reshape(target, declared_in)
    if tuple(x.shape) == declared_in:
        shape = declared_out
    elif x.ndim == len(declared_in) and x.shape[1:] == declared_in[1:] and declared_out[:1] == declared_in[:1]:
        shape = (x.shape[0],) + declared_out[1:]
    else:
        raise ProgramError(f"reshape declared for {declared_in} -> {declared_out} cannot take batch {x.shape}")
    return [x.reshape(shape).astype(out_infos[0].dtype, copy=False)]


def concat(layer, inputs, in_infos, out_infos):
    """y_i = clamp(zp_y + requant(q_i - zp_i, m_i, k_i)) in the output dtype, concatenated on ``axis``."""
    m, k = requant_params(layer, len(inputs))
    if m.size != len(inputs) or k.size != len(inputs):
        raise ProgramError(f"concat needs one multiplier and shift per input ({len(inputs)})")
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    zp_y = tensor_zero_point(out_infos[0])
    parts = []
    for i, (q, info) in enumerate(zip(inputs, in_infos)):
        r = requantize(q.astype(np.int64) - tensor_zero_point(info), m[i: i + 1], k[i: i + 1], rounding=layer.rounding)
        parts.append(finish(r, zp_y, lo, hi, dtype))
    return [np.concatenate(parts, axis=int(layer.attrs.get("axis", 1)))]


def clamp(layer, inputs, in_infos, out_infos):
    """y = clip(x, lo, hi); output qparams equal the input's."""
    check_same_qparams(in_infos[0], out_infos[0], "clamp")
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [np.clip(inputs[0].astype(np.int64), lo[0], hi[0]).astype(dtype)]


def requantize_op(layer, inputs, in_infos, out_infos):
    """y = clamp(zp_y + requant(x - zp_x, m, k)): a change of scale, zero point or dtype."""
    m, k = requant_params(layer, 1)
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    r = requantize(inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0]), m, k, rounding=layer.rounding)
    return [finish(r, tensor_zero_point(out_infos[0]), lo, hi, dtype)]


KERNELS = {
    "conv": conv,
    "gemm": gemm,
    "matmul": matmul,
    "add": add,
    "maxpool": maxpool,
    "avgpool": avgpool,
    "reshape": reshape,
    "concat": concat,
    "clamp": clamp,
    "requantize": requantize_op,
}

# Op families kept in their own modules (imported last: they use the helpers above).
from .kernels_arith import KERNELS as _ARITH_KERNELS
from .kernels_shape import KERNELS as _SHAPE_KERNELS

KERNELS.update(_SHAPE_KERNELS)
KERNELS.update(_ARITH_KERNELS)
