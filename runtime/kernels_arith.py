"""Reference integer kernels for arithmetic and lookup-table IR ops (see docs/ir.md). numpy only.

Registered into ``runtime.kernels_reference.KERNELS`` (and so into the fast set too). Like the
rest of the oracle, every kernel is int64 arithmetic only; requantization rounds by the layer's
``rounding`` mode (half up unless it says ``half_even``). Per-element params (``multiplier``,
``bias``, ...) of the elementwise ops hold either one value or an array that broadcasts against
the input with numpy's right-aligned rule (the shape of the ONNX constant it came from).

    affine       y = clamp(zp_y + shift_round((x - zp_x) * m + b, k))              (m signed)
    mul          y = clamp(zp_y + requant((a - zp_a) * (b - zp_b), m, k))
    prelu        y = clamp(zp_y + shift_round((x - zp_x) * (x >= zp_x ? m_pos : m_neg), k))
    reduce_mean  y = clamp(zp_y + requant(sum over axes of (x - zp_x), m, k))
    softmax      y = clamp(zp_y + requant(p, m, k)),  p = round(E[max - q] * 2^30 / sum E)
    argmax       y = index of the largest q along axis (int64)
    lut (kind)   y = table[q - qmin(x dtype)]
"""
from __future__ import annotations

import numpy as np

from .errors import ProgramError
from .fixed_point import dtype_limits, requantize, shift_round
from .kernel_common import clamp_bounds, finish, param, per_channel, tensor_zero_point

SOFTMAX_FRACTION_BITS = 30
"""Fixed-point fraction of the softmax probability p (p = 2^30 is 1.0); the exp table's too."""


def _broadcastable(values: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """A per-element param as int64, shaped to broadcast against an ndim-array (right-aligned)."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 1:
        return values.reshape(())
    if values.ndim > ndim:
        raise ProgramError(f"param '{name}' has rank {values.ndim}, more than the input's {ndim}")
    return values.reshape((1,) * (ndim - values.ndim) + values.shape)


def _shift(layer) -> int:
    return int(per_channel(param(layer, "shift", required=True), 1, "shift")[0])


def _epilogue(layer, r: np.ndarray, out_info) -> np.ndarray:
    dtype = out_info.dtype
    lo, hi = clamp_bounds(layer, dtype)
    return finish(r, tensor_zero_point(out_info), lo, hi, dtype)


def affine(layer, inputs, in_infos, out_infos):
    """y = clamp(zp_y + shift_round((x - zp_x) * m + b, k)); m (signed) and b broadcast against x.

    The rule of Mul/Div/Add/Sub by a constant: m / 2^k ~= s_x * c / s_y, b ~= d * 2^k / s_y.
    """
    x = inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0])
    m = _broadcastable(param(layer, "multiplier", required=True), x.ndim, "multiplier")
    b = _broadcastable(param(layer, "bias", np.zeros(1, np.int64)), x.ndim, "bias")
    acc = x * m + b
    if acc.shape != x.shape:
        raise ProgramError(f"params broadcast the input {x.shape} to {acc.shape}; affine keeps the shape")
    return [_epilogue(layer, shift_round(acc, _shift(layer), layer.rounding), out_infos[0])]


def mul(layer, inputs, in_infos, out_infos):
    """acc = (a - zp_a) * (b - zp_b) (numpy broadcasting); y = clamp(zp_y + requant(acc, m, k))."""
    a = inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0])
    b = inputs[1].astype(np.int64) - tensor_zero_point(in_infos[1])
    m = per_channel(param(layer, "multiplier", required=True), 1, "multiplier")
    acc = a * b
    return [_epilogue(layer, requantize(acc, m, [_shift(layer)], rounding=layer.rounding), out_infos[0])]


def prelu(layer, inputs, in_infos, out_infos):
    """d = x - zp_x; y = clamp(zp_y + shift_round(d * (m_pos if d >= 0 else m_neg), k)).

    m_pos / 2^k ~= s_x / s_y, m_neg / 2^k ~= slope * s_x / s_y (signed; per channel for PRelu).
    """
    d = inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0])
    m_pos = _broadcastable(param(layer, "multiplier", required=True), d.ndim, "multiplier")
    m_neg = _broadcastable(param(layer, "multiplier_negative", required=True), d.ndim, "multiplier_negative")
    acc = np.where(d >= 0, d * m_pos, d * m_neg)
    if acc.shape != d.shape:
        raise ProgramError(f"params broadcast the input {d.shape} to {acc.shape}; prelu keeps the shape")
    return [_epilogue(layer, shift_round(acc, _shift(layer), layer.rounding), out_infos[0])]


def _axes(layer, ndim: int) -> tuple[int, ...]:
    axes = layer.attrs.get("axes")
    if axes is None:
        return tuple(range(ndim))
    axes = [int(a) for a in np.atleast_1d(axes)]
    if any(not -ndim <= a < ndim for a in axes):
        raise ProgramError(f"axes {axes} out of range for rank {ndim}")
    return tuple(sorted({a % ndim for a in axes}))


def reduce_mean(layer, inputs, in_infos, out_infos):
    """S = sum over ``axes`` of (x - zp_x) (keepdims as the attr says); y = clamp(zp_y + requant(S, m, k)),
    m / 2^k ~= s_x / (s_y * count)."""
    x = inputs[0].astype(np.int64) - tensor_zero_point(in_infos[0])
    s = x.sum(axis=_axes(layer, x.ndim), keepdims=bool(layer.attrs.get("keepdims", 1)))
    m = per_channel(param(layer, "multiplier", required=True), 1, "multiplier")
    return [_epilogue(layer, requantize(s, m, [_shift(layer)], rounding=layer.rounding), out_infos[0])]


def _softmax_axes(layer, ndim: int) -> tuple[int, ...]:
    """The reduced axes: ``axis`` alone, or ``axis`` to the last one when ``flatten`` (opset < 13)."""
    axis = int(layer.attrs.get("axis", -1))
    if not -ndim <= axis < ndim:
        raise ProgramError(f"axis {axis} out of range for rank {ndim}")
    axis %= ndim
    return tuple(range(axis, ndim)) if layer.attrs.get("flatten", 0) else (axis,)


def softmax(layer, inputs, in_infos, out_infos):
    """Integer softmax over the reduced axes (docs/ir.md "softmax"):

        d = max(q) - q >= 0;  e = E[d] (E[d] = round(2^30 exp(-s_x d)), compile-time table)
        p = floor((e * 2^30 + floor(S / 2)) / S), S = sum e      (p / 2^30 ~= e / S, half up)
        y = clamp(zp_y + requant(p, m, k)),  m / 2^k ~= 2^-30 / s_y
    """
    q = inputs[0].astype(np.int64)
    axes = _softmax_axes(layer, q.ndim)
    table = param(layer, "exp_table", required=True).astype(np.int64).ravel()
    d = q.max(axis=axes, keepdims=True) - q
    if d.size and d.max() >= table.size:
        raise ProgramError(f"exp_table has {table.size} entries, the input spans {int(d.max()) + 1}")
    e = table[d]
    total = e.sum(axis=axes, keepdims=True)
    if np.any(total <= 0):
        raise ProgramError("exp_table[0] must be positive")
    if table.max() * 2.0**SOFTMAX_FRACTION_BITS >= 2.0**62 or total.max() >= 2.0**62:
        raise ProgramError("softmax fixed-point values would leave int64")
    p = (e * np.int64(2**SOFTMAX_FRACTION_BITS) + total // 2) // total
    m = per_channel(param(layer, "multiplier", required=True), 1, "multiplier")
    return [_epilogue(layer, requantize(p, m, [_shift(layer)], rounding=layer.rounding), out_infos[0])]


def argmax(layer, inputs, in_infos, out_infos):
    """Index of the largest integer along ``axis`` (first one; the last with select_last_index).

    Exact for any positive input scale: dequantization is increasing, so it keeps the order."""
    q = inputs[0]
    axis = int(layer.attrs.get("axis", 0))
    if not -q.ndim <= axis < q.ndim:
        raise ProgramError(f"axis {axis} out of range for rank {q.ndim}")
    axis %= q.ndim
    if layer.attrs.get("select_last_index", 0):
        flipped = np.flip(q, axis=axis)
        idx = q.shape[axis] - 1 - np.argmax(flipped, axis=axis)
    else:
        idx = np.argmax(q, axis=axis)
    if layer.attrs.get("keepdims", 1):
        idx = np.expand_dims(idx, axis)
    if out_infos[0].dtype != "int64":
        raise ProgramError(f"argmax output must be int64, declared {out_infos[0].dtype}")
    return [idx.astype(np.int64)]


def lut(layer, inputs, in_infos, out_infos):
    """y = table[q - qmin], one entry per value of the input's dtype (256 or 65536); the table holds
    output integers already (computed at compile time, see docs/ir.md "lut")."""
    x_dtype = in_infos[0].dtype
    lo, hi = dtype_limits(x_dtype)
    table = param(layer, "table", required=True).ravel()
    if table.size != hi - lo + 1:
        raise ProgramError(f"table has {table.size} entries, a {x_dtype} input needs {hi - lo + 1}")
    out_lo, out_hi = dtype_limits(out_infos[0].dtype)
    if table.min() < out_lo or table.max() > out_hi:
        raise ProgramError(f"table values [{table.min()}, {table.max()}] exceed {out_infos[0].dtype}")
    return [table.astype(out_infos[0].dtype)[inputs[0].astype(np.int64) - lo]]


KERNELS: dict = {
    "affine": affine,
    "mul": mul,
    "prelu": prelu,
    "reduce_mean": reduce_mean,
    "softmax": softmax,
    "argmax": argmax,
    "lut": lut,
}
