"""Reference integer kernels for data-movement IR ops (see docs/ir.md). numpy only.

Registered into ``runtime.kernels_reference.KERNELS`` (and so into the fast set too).

Pass-through ops (transpose, slice, pad, depth_to_space, space_to_depth, resize_nearest) move
integers without arithmetic: their output keeps the input's encoding (checked), so they are exact.
``resize_linear`` interpolates with fixed-point weights and rounds once; ``conv_transpose`` is
the transpose of conv with the same requantization epilogue.
"""
from __future__ import annotations

import numpy as np

from .errors import ProgramError
from .fixed_point import requantize
from .kernel_common import (
    check_same_qparams,
    clamp_bounds,
    finish,
    param,
    per_channel,
    requant_params,
    tensor_zero_point,
)


def _ints(layer, name: str, n: int | None = None) -> list[int]:
    value = layer.attrs.get(name)
    if value is None:
        raise ProgramError(f"needs attr '{name}'")
    value = [int(v) for v in np.atleast_1d(value)]
    if n is not None and len(value) != n:
        raise ProgramError(f"attr '{name}' needs {n} values, got {value}")
    return value


def transpose(layer, inputs, in_infos, out_infos):
    """y = numpy.transpose(x, perm): a permutation of the axes; exact."""
    check_same_qparams(in_infos[0], out_infos[0], "transpose")
    x = inputs[0]
    perm = _ints(layer, "perm", x.ndim)
    if sorted(perm) != list(range(x.ndim)):
        raise ProgramError(f"perm {perm} is not a permutation of {x.ndim} axes")
    return [np.ascontiguousarray(np.transpose(x, perm))]


def slice_op(layer, inputs, in_infos, out_infos):
    """y = x[start:stop:step] on each listed axis, with the bounds already clamped by the compiler
    (ONNX Slice rules); a negative ``stop`` with a negative step means "through index 0". Exact."""
    check_same_qparams(in_infos[0], out_infos[0], "slice")
    x = inputs[0]
    axes = _ints(layer, "axes")
    starts, stops, steps = (_ints(layer, name, len(axes)) for name in ("starts", "stops", "steps"))
    index = [slice(None)] * x.ndim
    for axis, start, stop, step in zip(axes, starts, stops, steps):
        if not 0 <= axis < x.ndim or step == 0:
            raise ProgramError(f"bad slice axis {axis} or step {step} for rank {x.ndim}")
        index[axis] = slice(start, stop if stop >= 0 else None, step)
    return [np.ascontiguousarray(x[tuple(index)])]


_NUMPY_PAD_MODES = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad(layer, inputs, in_infos, out_infos):
    """ONNX Pad of integers, pads [x1_begin, x2_begin, ..., x1_end, ...].

    Negative pads crop first, then the non-negative ones pad what is left (onnxruntime's order).
    Mode ``constant`` fills with param ``fill`` (the compiler's Q(value) = saturate(round_half_even
    (value / s) + zp), so a zero pad value fills zp); ``reflect``, ``edge``, ``wrap`` copy input
    elements (numpy's modes of the same names are ONNX's). Exact."""
    check_same_qparams(in_infos[0], out_infos[0], "pad")
    x = inputs[0]
    rank = x.ndim
    pads = _ints(layer, "pads", 2 * rank)
    crop = tuple(slice(max(-pads[i], 0), x.shape[i] - max(-pads[i + rank], 0)) for i in range(rank))
    x = x[crop]
    if min(x.shape, default=1) < 1:
        raise ProgramError(f"pads {pads} crop the whole input")
    widths = [(max(pads[i], 0), max(pads[i + rank], 0)) for i in range(rank)]
    mode = layer.attrs.get("mode", "constant")
    if mode == "constant":
        fill = per_channel(param(layer, "fill", required=True), 1, "fill")[0]
        lo, hi = clamp_bounds(layer, out_infos[0].dtype)
        if not lo[0] <= fill <= hi[0]:
            raise ProgramError(f"pad fill {fill} is outside {out_infos[0].dtype}")
        return [np.pad(x, widths, mode="constant", constant_values=x.dtype.type(fill))]
    if mode not in _NUMPY_PAD_MODES:
        raise ProgramError(f"unknown pad mode '{mode}'")
    if mode == "reflect" and any(max(w) >= d for w, d in zip(widths, x.shape) if max(w) > 0):
        raise ProgramError(f"reflect pads {pads} must be smaller than the input dims {x.shape}")
    return [np.pad(x, widths, mode=_NUMPY_PAD_MODES[mode])]


def depth_to_space(layer, inputs, in_infos, out_infos):
    """ONNX DepthToSpace (NCHW), block b: DCR reads the channel as (b1, b2, c), CRD as (c, b1, b2);
    y[n, c, h*b + i, w*b + j] = x[n, channel(i, j, c), h, w]. Exact."""
    check_same_qparams(in_infos[0], out_infos[0], "depth_to_space")
    x = inputs[0]
    b = _ints(layer, "blocksize", 1)[0]
    n, c, h, w = x.shape
    if c % (b * b):
        raise ProgramError(f"depth_to_space: {c} channels are not divisible by blocksize^2 = {b * b}")
    mode = layer.attrs.get("mode", "DCR")
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        raise ProgramError(f"depth_to_space mode must be DCR or CRD, got '{mode}'")
    return [np.ascontiguousarray(y.reshape(n, c // (b * b), h * b, w * b))]


def space_to_depth(layer, inputs, in_infos, out_infos):
    """ONNX SpaceToDepth (NCHW), block b: y[n, (i*b + j)*C + c, h, w] = x[n, c, h*b + i, w*b + j]. Exact."""
    check_same_qparams(in_infos[0], out_infos[0], "space_to_depth")
    x = inputs[0]
    b = _ints(layer, "blocksize", 1)[0]
    n, c, h, w = x.shape
    if h % b or w % b:
        raise ProgramError(f"space_to_depth: {h}x{w} is not divisible by blocksize {b}")
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return [np.ascontiguousarray(y.reshape(n, c * b * b, h // b, w // b))]


def _index_table(layer, name: str, size: int) -> np.ndarray:
    table = param(layer, name, required=True).astype(np.int64).ravel()
    if table.size and (table.min() < 0 or table.max() >= size):
        raise ProgramError(f"param '{name}' indexes outside [0, {size})")
    return table


def resize_nearest(layer, inputs, in_infos, out_infos):
    """y = x gathered along each axis a of attr ``axes`` by param ``index_<a>`` (one input index
    per output index, computed by the compiler from the ONNX coordinate and nearest modes). Exact."""
    check_same_qparams(in_infos[0], out_infos[0], "resize_nearest")
    y = inputs[0]
    for axis in _ints(layer, "axes"):
        if not 0 < axis < y.ndim:
            raise ProgramError(f"resize_nearest axis {axis} must be a non-batch axis of rank {y.ndim}")
        y = np.take(y, _index_table(layer, f"index_{axis}", y.shape[axis]), axis=axis)
    return [np.ascontiguousarray(y)]


def resize_linear(layer, inputs, in_infos, out_infos):
    """Separable (bi)linear interpolation with F-bit fixed-point weights (attr ``fraction_bits``).

    Per resized axis a (attr ``axes``, at most 2) and output index o: input indices
    i0 = ``lower_a``[o], i1 = ``upper_a``[o] and the weight of i1, u = ``weight_a``[o] in
    [0, 2^F] (i0 gets 2^F - u). With d = x - zp_x:
        acc = sum over the 2^n corners of prod_a (weight of the corner on a) * d[corner]   (int64)
        y   = clamp(zp_y + requant(acc, 1, n*F))            (the layer's rounding, half up)
    The output keeps the input's encoding (checked)."""
    check_same_qparams(in_infos[0], out_infos[0], "resize_linear")
    x = inputs[0]
    axes = _ints(layer, "axes")
    bits = _ints(layer, "fraction_bits", 1)[0]
    if not 1 <= len(axes) <= 2 or not 0 < bits <= 24:
        raise ProgramError(f"resize_linear needs 1 or 2 axes and 1..24 fraction bits, got {axes}, {bits}")
    zp = tensor_zero_point(in_infos[0])
    acc = x.astype(np.int64) - zp
    one = np.int64(1) << bits
    for axis in axes:
        if not 0 < axis < x.ndim:
            raise ProgramError(f"resize_linear axis {axis} must be a non-batch axis of rank {x.ndim}")
        lower = _index_table(layer, f"lower_{axis}", acc.shape[axis])
        upper = _index_table(layer, f"upper_{axis}", acc.shape[axis])
        u = param(layer, f"weight_{axis}", required=True).astype(np.int64).ravel()
        if not (lower.size == upper.size == u.size) or u.min(initial=0) < 0 or u.max(initial=0) > one:
            raise ProgramError(f"resize_linear params of axis {axis} are inconsistent")
        shape = [1] * acc.ndim
        shape[axis] = u.size
        acc = (np.take(acc, lower, axis=axis) * (one - u).reshape(shape)
               + np.take(acc, upper, axis=axis) * u.reshape(shape))
    r = requantize(acc, np.array([1]), np.array([bits * len(axes)]), rounding=layer.rounding)
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype)
    return [finish(r, tensor_zero_point(out_infos[0]), lo, hi, dtype)]


def conv_transpose_accumulate(x, w, zp_x, zp_w, attrs: dict) -> np.ndarray:
    """acc[n, o, h*sh - pt + i*dh, w*sw - pl + j*dw] += (w[o, c, i, j] - zp_w[o]) * (x[n, g*Cg + c, h, w] - zp_x)

    for o in group g; w is output-major [O, C/group, kh, kw]. The full output canvas is
    sh*(H-1) + dh*(kh-1) + 1 + output_padding rows (and columns alike); the result is the canvas
    cropped by pads [top, left, bottom, right]. One int64 einsum per kernel tap."""
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim != 4 or w.ndim != 4:
        raise ProgramError(f"conv_transpose needs NCHW input and [O, C/group, kh, kw] weight, got {x.shape}, {w.shape}")
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = int(attrs.get("group", 1))
    if g < 1 or c != cg * g or o % g:
        raise ProgramError(f"group {g} does not fit input channels {c} and weight {w.shape}")
    sh, sw = (int(v) for v in attrs.get("strides", [1, 1]))
    dh, dw = (int(v) for v in attrs.get("dilations", [1, 1]))
    pt, pl, pb, pr = (int(v) for v in attrs.get("pads", [0, 0, 0, 0]))
    oph, opw = (int(v) for v in attrs.get("output_padding", [0, 0]))
    if min(sh, sw, dh, dw) < 1 or min(pt, pl, pb, pr, oph, opw) < 0:
        raise ProgramError(f"bad conv_transpose attrs {attrs}")
    full_h = sh * (h - 1) + dh * (kh - 1) + 1 + oph
    full_w = sw * (wd - 1) + dw * (kw - 1) + 1 + opw
    if full_h - pt - pb < 1 or full_w - pl - pr < 1:
        raise ProgramError(f"conv_transpose output would be empty for input {x.shape} and {attrs}")
    zp_w = per_channel(zp_w, o, "weight_zero_point").reshape(-1, 1, 1, 1)
    xs = (x.astype(np.int64) - int(zp_x)).reshape(n, g, cg, h, wd)
    ws = (w.astype(np.int64) - zp_w).reshape(g, o // g, cg, kh, kw)
    canvas = np.zeros((n, g, o // g, full_h, full_w), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            contrib = np.einsum("ngchw,goc->ngohw", xs, ws[:, :, :, i, j])
            canvas[:, :, :, i * dh: i * dh + sh * (h - 1) + 1: sh, j * dw: j * dw + sw * (wd - 1) + 1: sw] += contrib
    canvas = canvas.reshape(n, o, full_h, full_w)
    return canvas[:, :, pt: full_h - pb, pl: full_w - pr]


def conv_transpose(layer, inputs, in_infos, out_infos):
    """y = clamp(zp_y + requant(conv_transpose_accumulate(x, w) + bias, m[o], k[o]), lo[o], hi[o])."""
    w = param(layer, "weight", required=True)
    zp_w = param(layer, "weight_zero_point", np.zeros(1, np.int64))
    o = w.shape[0]
    acc = conv_transpose_accumulate(inputs[0], w, tensor_zero_point(in_infos[0]), zp_w, layer.attrs)
    bias = param(layer, "bias")
    if bias is not None:
        if np.size(bias) != o:
            raise ProgramError(f"param 'bias' has {np.size(bias)} entries, expected {o}")
        acc = acc + np.asarray(bias, dtype=np.int64).reshape(1, -1, 1, 1)
    m, k = requant_params(layer, o)
    dtype = out_infos[0].dtype
    lo, hi = clamp_bounds(layer, dtype, o)
    r = requantize(acc, m, k, axis=1, rounding=layer.rounding)
    return [finish(r, tensor_zero_point(out_infos[0]), lo, hi, dtype, axis=1)]


KERNELS: dict = {
    "transpose": transpose,
    "slice": slice_op,
    "pad": pad,
    "depth_to_space": depth_to_space,
    "space_to_depth": space_to_depth,
    "resize_nearest": resize_nearest,
    "resize_linear": resize_linear,
    "conv_transpose": conv_transpose,
}
