"""Float implementations of ONNX ops for float-fallback layers (kind "float"). numpy only.

A float layer is a node that has no integer lowering (or that the user denied): the runtime
dequantizes its inputs (x = float32(q - zp) * s), evaluates the ONNX op here in float, and
quantizes each float output with ONNX QuantizeLinear (round half to even, saturate) into the
output tensor's encoding. Outputs that are not real-valued (Shape, ArgMax, TopK indices -> int64;
Equal, Less -> bool; Cast to an integer type) are kept exactly as raw tensors (dtype int32, int64
or bool with scale 1, zero point 0: the value is the integer itself) and passed to later float
layers unchanged. See docs/ir.md, "float layers".

Semantics are those of the ONNX operator at opset 13 and later (the compiler upgrades older
models to 13); where a later opset moved an attribute to an input (axes of Reduce*/Squeeze,
Split's split, Pad's pads), both forms are read. Arithmetic is float32 for elementwise ops and
float64 accumulation (cast back to float32) for sums of products (Conv, MatMul, Gemm, pooling
means, normalizations), so results agree with onnxruntime to float32 rounding.

``FLOAT_OPS`` maps an op type to ``fn(inputs, attrs) -> list of outputs``; ``inputs`` holds one
entry per ONNX input position (None where the input is absent). ``evaluate`` runs one op and
raises ProgramError for an op outside the set; its ``n_outputs`` (the node's output count, which
``run_float_layer`` passes) gives Split of opsets 2-17 its equal-split part count.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ProgramError
from .fixed_point import dequantize, quantize

F32 = np.float32
RAW_DTYPES = ("int32", "int64", "bool")

# ONNX TensorProto element type -> numpy dtype (the ones Cast targets in practice).
ONNX_ELEM_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
                   7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _attr(attrs: dict, name: str, default=None):
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _axes(inputs: list, attrs: dict, position: int):
    """Axes given as an attribute (older opsets) or as input ``position`` (newer); None if absent."""
    if len(inputs) > position and inputs[position] is not None:
        return [int(a) for a in np.asarray(inputs[position]).reshape(-1)]
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    return None


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(F32, copy=False)


# ----------------------------------------------------------------------------- elementwise

def _unary(fn):
    def run(inputs, attrs):
        x = inputs[0]
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x, attrs)).astype(x.dtype, copy=False)]
    return run


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def _gelu(x, attrs):
    x64 = x.astype(np.float64)
    if _attr(attrs, "approximate", "none") == "tanh":
        return 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    return 0.5 * x64 * (1 + _erf(x64 / math.sqrt(2)))


def _sigmoid(x, attrs):
    x64 = x.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-x64))


UNARY = {
    "Relu": lambda x, a: np.maximum(x, 0),
    "Sigmoid": _sigmoid,
    "Tanh": lambda x, a: np.tanh(x),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Erf": lambda x, a: _erf(x),
    "Abs": lambda x, a: np.abs(x),
    "Neg": lambda x, a: np.negative(x),
    "Floor": lambda x, a: np.floor(x),
    "Ceil": lambda x, a: np.ceil(x),
    "Round": lambda x, a: np.rint(x),
    "Sign": lambda x, a: np.sign(x),
    "Reciprocal": lambda x, a: np.reciprocal(x),
    "Sin": lambda x, a: np.sin(x),
    "Cos": lambda x, a: np.cos(x),
    "Not": lambda x, a: np.logical_not(x),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, x * F32(_attr(a, "alpha", 0.01))),
    "Elu": lambda x, a: np.where(x > 0, x, F32(_attr(a, "alpha", 1.0)) * np.expm1(x)),
    "Selu": lambda x, a: F32(_attr(a, "gamma", 1.0507009873554805)) * np.where(
        x > 0, x, F32(_attr(a, "alpha", 1.6732632423543772)) * np.expm1(x)),
    "Celu": lambda x, a: np.maximum(x, 0) + np.minimum(0, F32(_attr(a, "alpha", 1.0)) * np.expm1(
        x / F32(_attr(a, "alpha", 1.0)))),
    "HardSigmoid": lambda x, a: np.clip(F32(_attr(a, "alpha", 0.2)) * x + F32(_attr(a, "beta", 0.5)), 0, 1),
    "HardSwish": lambda x, a: x * np.clip(x * F32(1 / 6) + F32(0.5), 0, 1),
    "Softplus": lambda x, a: np.logaddexp(0, x.astype(np.float64)),
    "Softsign": lambda x, a: x / (1 + np.abs(x)),
    "Gelu": _gelu,
    "Mish": lambda x, a: x * np.tanh(np.logaddexp(0, x.astype(np.float64))),
    "ThresholdedRelu": lambda x, a: np.where(x > F32(_attr(a, "alpha", 1.0)), x, 0),
    "Identity": lambda x, a: x,
}


def _binary(fn, bool_out=False):
    def run(inputs, attrs):
        a, b = inputs[0], inputs[1]
        with np.errstate(all="ignore"):
            y = fn(a, b)
        return [np.asarray(y) if bool_out else np.asarray(y).astype(np.result_type(a, b), copy=False)]
    return run


def _div(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(a / b)  # C++ integer division truncates toward zero
    return a / b


def _pow(a, b):
    return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


BINARY = {
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Pow": lambda i, a: [_pow(i[0], i[1])],
    "PRelu": _binary(lambda x, s: np.where(x >= 0, x, x * s)),
    "Equal": _binary(np.equal, True),
    "Less": _binary(np.less, True),
    "Greater": _binary(np.greater, True),
    "LessOrEqual": _binary(np.less_equal, True),
    "GreaterOrEqual": _binary(np.greater_equal, True),
    "And": _binary(np.logical_and, True),
    "Or": _binary(np.logical_or, True),
    "Xor": _binary(np.logical_xor, True),
}


def _variadic(fn):
    def run(inputs, attrs):
        arrays = [x for x in inputs if x is not None]
        y = arrays[0]
        for x in arrays[1:]:
            y = fn(y, x)
        return [np.asarray(y).astype(arrays[0].dtype, copy=False)]
    return run


def _mean(inputs, attrs):
    arrays = [x.astype(np.float64) for x in inputs if x is not None]
    total = arrays[0]
    for x in arrays[1:]:
        total = total + x
    return [(total / len(arrays)).astype(inputs[0].dtype)]


def _sum(inputs, attrs):
    arrays = [x for x in inputs if x is not None]
    total = arrays[0]
    for x in arrays[1:]:
        total = total + x
    return [total]


def _clip(inputs, attrs):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    if lo is not None:
        x = np.maximum(x, np.asarray(lo, x.dtype))
    if hi is not None:
        x = np.minimum(x, np.asarray(hi, x.dtype))
    return [x]


def _where(inputs, attrs):
    return [np.where(inputs[0].astype(bool), inputs[1], inputs[2])]


def _cast(inputs, attrs):
    to = int(attrs["to"])
    if to not in ONNX_ELEM_TYPES:
        raise ProgramError(f"Cast to ONNX type {to} is not supported")
    return [inputs[0].astype(ONNX_ELEM_TYPES[to])]


def _cast_like(inputs, attrs):
    return [inputs[0].astype(inputs[1].dtype)]


def _dropout(inputs, attrs):
    return [inputs[0], np.ones(inputs[0].shape, bool)]


# ----------------------------------------------------------------------------- reductions

def _reduce(fn):
    def run(inputs, attrs):
        x = inputs[0]
        axes = _axes(inputs, attrs, 1)
        keepdims = bool(_attr(attrs, "keepdims", 1))
        if not axes:
            if _attr(attrs, "noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.ndim))
        axes = tuple(a % x.ndim for a in axes)
        y = fn(x, axes, keepdims)
        return [np.asarray(y).astype(x.dtype, copy=False)]
    return run


REDUCE = {
    "ReduceMean": _reduce(lambda x, ax, k: np.mean(x.astype(np.float64), axis=ax, keepdims=k)),
    "ReduceSum": _reduce(lambda x, ax, k: np.sum(x.astype(np.float64) if x.dtype.kind == "f" else x, axis=ax,
                                                 keepdims=k)),
    "ReduceMax": _reduce(lambda x, ax, k: np.max(x, axis=ax, keepdims=k)),
    "ReduceMin": _reduce(lambda x, ax, k: np.min(x, axis=ax, keepdims=k)),
    "ReduceProd": _reduce(lambda x, ax, k: np.prod(x.astype(np.float64), axis=ax, keepdims=k)),
    "ReduceL2": _reduce(lambda x, ax, k: np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=ax, keepdims=k))),
    "ReduceL1": _reduce(lambda x, ax, k: np.sum(np.abs(x.astype(np.float64)), axis=ax, keepdims=k)),
    "ReduceSumSquare": _reduce(lambda x, ax, k: np.sum(x.astype(np.float64) ** 2, axis=ax, keepdims=k)),
    "ReduceLogSumExp": _reduce(lambda x, ax, k: _logsumexp(x.astype(np.float64), ax, k)),
}


def _logsumexp(x, axes, keepdims):
    m = np.max(x, axis=axes, keepdims=True)
    y = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return y if keepdims else np.squeeze(y, axis=axes)


def _arg(fn):
    def run(inputs, attrs):
        x = inputs[0]
        axis = int(_attr(attrs, "axis", 0)) % x.ndim
        if _attr(attrs, "select_last_index", 0):
            flipped = np.flip(x, axis)
            y = x.shape[axis] - 1 - fn(flipped, axis=axis)
        else:
            y = fn(x, axis=axis)
        y = y.astype(np.int64)
        return [np.expand_dims(y, axis) if _attr(attrs, "keepdims", 1) else y]
    return run


def _softmax(log: bool):
    def run(inputs, attrs):
        x = inputs[0].astype(np.float64)
        axis = int(_attr(attrs, "axis", -1))
        e = x - x.max(axis=axis, keepdims=True)
        if log:
            y = e - np.log(np.exp(e).sum(axis=axis, keepdims=True))
        else:
            y = np.exp(e)
            y = y / y.sum(axis=axis, keepdims=True)
        return [y.astype(inputs[0].dtype)]
    return run


def _topk(inputs, attrs):
    x, k = inputs[0], int(np.asarray(inputs[1]).reshape(-1)[0])
    axis = int(_attr(attrs, "axis", -1)) % x.ndim
    largest = bool(_attr(attrs, "largest", 1))
    # stable sort keeps the lower index first among equal values, as ONNX requires
    order = np.argsort(-x if largest else x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


# ----------------------------------------------------------------------------- linear algebra

def _matmul(inputs, attrs):
    a, b = inputs[0], inputs[1]
    return [np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.result_type(a, b))]


def _gemm(inputs, attrs):
    a, b = inputs[0].astype(np.float64), inputs[1].astype(np.float64)
    if _attr(attrs, "transA", 0):
        a = a.T
    if _attr(attrs, "transB", 0):
        b = b.T
    y = float(_attr(attrs, "alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(_attr(attrs, "beta", 1.0)) * inputs[2].astype(np.float64)
    return [y.astype(inputs[0].dtype)]


def _spatial_params(attrs: dict, x_spatial: tuple[int, ...], kernel: list[int]) -> tuple[list, list, list, list]:
    """strides, dilations, pads_begin, pads_end for a conv/pool window (auto_pad resolved)."""
    n = len(kernel)
    strides = list(_attr(attrs, "strides", [1] * n))
    dilations = list(_attr(attrs, "dilations", [1] * n))
    pads = list(_attr(attrs, "pads", [0] * (2 * n)))
    auto_pad = _attr(attrs, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n)
        for i in range(n):
            out = -(-x_spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_spatial[i])
            small, large = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    return strides, dilations, pads[:n], pads[n:]


def _tap_view(xp: np.ndarray, offsets: tuple[int, ...], strides: list[int], out: tuple[int, ...]) -> np.ndarray:
    """xp[..., off_i + s_i * o_i ...] for every output position o: one kernel tap as a strided view."""
    index = [slice(None), slice(None)] + [slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offsets, strides, out)]
    return xp[tuple(index)]


def _conv(inputs, attrs):
    x, w = inputs[0].astype(np.float64), inputs[1].astype(np.float64)
    b = inputs[2] if len(inputs) > 2 else None
    kernel = list(w.shape[2:])
    strides, dil, pb, pe = _spatial_params(attrs, x.shape[2:], kernel)
    group = int(_attr(attrs, "group", 1))
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pb, pe)))
    out = tuple((xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(len(kernel)))
    n, c = x.shape[:2]
    o = w.shape[0]
    cg, og = c // group, o // group
    y = np.zeros((n, o) + out)
    for tap in np.ndindex(*kernel):
        view = _tap_view(xp, tuple(t * d for t, d in zip(tap, dil)), strides, out)
        wt = w[(slice(None), slice(None)) + tap]  # [O, C/group]
        for g in range(group):
            y[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", view[:, g * cg:(g + 1) * cg],
                                                   wt[g * og:(g + 1) * og])
    if b is not None:
        y += b.astype(np.float64).reshape((1, -1) + (1,) * len(out))
    return [y.astype(inputs[0].dtype)]


def _conv_transpose(inputs, attrs):
    x, w = inputs[0].astype(np.float64), inputs[1].astype(np.float64)
    b = inputs[2] if len(inputs) > 2 else None
    n, c = x.shape[:2]
    kernel = list(w.shape[2:])
    nd = len(kernel)
    group = int(_attr(attrs, "group", 1))
    strides = list(_attr(attrs, "strides", [1] * nd))
    dil = list(_attr(attrs, "dilations", [1] * nd))
    out_pad = list(_attr(attrs, "output_padding", [0] * nd))
    pads = list(_attr(attrs, "pads", [0] * (2 * nd)))
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 + out_pad[i] for i in range(nd)]
    auto_pad = _attr(attrs, "auto_pad", "NOTSET")
    if "output_shape" in attrs:
        target = list(attrs["output_shape"])[-nd:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [x.shape[2 + i] * strides[i] for i in range(nd)]
    else:
        target = None
    if target is not None:
        pads = [0] * (2 * nd)
        for i in range(nd):
            total = full[i] - target[i]
            if auto_pad == "SAME_LOWER":
                pads[i], pads[i + nd] = total - total // 2, total // 2
            else:
                pads[i], pads[i + nd] = total // 2, total - total // 2
    cg = c // group
    og = w.shape[1]
    y = np.zeros((n, og * group) + tuple(full))
    in_sp = x.shape[2:]
    for tap in np.ndindex(*kernel):
        index = [slice(None), slice(None)] + [
            slice(t * d, t * d + s * (m - 1) + 1, s) for t, d, s, m in zip(tap, dil, strides, in_sp)]
        wt = w[(slice(None), slice(None)) + tap]  # [C, O/group]
        for g in range(group):
            contrib = np.einsum("nc...,co->no...", x[:, g * cg:(g + 1) * cg], wt[g * cg:(g + 1) * cg])
            y[(slice(None), slice(g * og, (g + 1) * og)) + tuple(index[2:])] += contrib
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    if b is not None:
        y = y + b.astype(np.float64).reshape((1, -1) + (1,) * nd)
    return [y.astype(inputs[0].dtype)]


def _pool(kind: str):
    def run(inputs, attrs):
        x = inputs[0]
        kernel = list(attrs["kernel_shape"])
        nd = len(kernel)
        strides, dil, pb, pe = _spatial_params(attrs, x.shape[2:], kernel)
        ceil = bool(_attr(attrs, "ceil_mode", 0))
        out = []
        for i in range(nd):
            span = x.shape[2 + i] + pb[i] + pe[i] - dil[i] * (kernel[i] - 1) - 1
            size = (-(-span // strides[i]) if ceil else span // strides[i]) + 1
            if ceil and (size - 1) * strides[i] >= x.shape[2 + i] + pb[i]:
                size -= 1  # a window may not start in the end padding
            out.append(size)
        extra = [max(0, (out[i] - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - (x.shape[2 + i] + pb[i] + pe[i]))
                 for i in range(nd)]
        widths = [(0, 0), (0, 0)] + [(pb[i], pe[i] + extra[i]) for i in range(nd)]
        if kind == "max":
            fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
            xp = np.pad(x, widths, constant_values=fill)
            y = None
            for tap in np.ndindex(*kernel):
                v = _tap_view(xp, tuple(t * d for t, d in zip(tap, dil)), strides, tuple(out))
                y = v.copy() if y is None else np.maximum(y, v)
            return [y]
        include_pad = bool(_attr(attrs, "count_include_pad", 0))
        xp = np.pad(x.astype(np.float64), widths)
        mask = np.zeros((1, 1) + xp.shape[2:])
        inner = tuple(slice(0, xp.shape[2 + i] - extra[i]) if include_pad else slice(pb[i], pb[i] + x.shape[2 + i])
                      for i in range(nd))
        mask[(0, 0) + inner] = 1.0
        total, count = 0.0, 0.0
        for tap in np.ndindex(*kernel):
            offsets = tuple(t * d for t, d in zip(tap, dil))
            total = total + _tap_view(xp, offsets, strides, tuple(out))
            count = count + _tap_view(mask, offsets, strides, tuple(out))
        return [(total / count).astype(x.dtype)]
    return run


def _global_pool(fn):
    def run(inputs, attrs):
        x = inputs[0]
        axes = tuple(range(2, x.ndim))
        return [fn(x.astype(np.float64), axis=axes, keepdims=True).astype(x.dtype)]
    return run


def _batchnorm(inputs, attrs):
    x, scale, bias, mean, var = (a.astype(np.float64) for a in inputs[:5])
    eps = float(_attr(attrs, "epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
    return [y.astype(inputs[0].dtype)]


def _instance_norm(inputs, attrs):
    x, scale, bias = (a.astype(np.float64) for a in inputs[:3])
    eps = float(_attr(attrs, "epsilon", 1e-5))
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean) / np.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return [y.astype(inputs[0].dtype)]


def _layer_norm(inputs, attrs):
    x = inputs[0].astype(np.float64)
    axis = int(_attr(attrs, "axis", -1)) % x.ndim
    eps = float(_attr(attrs, "epsilon", 1e-5))
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * inputs[1].astype(np.float64)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + inputs[2].astype(np.float64)
    return [y.astype(inputs[0].dtype)]


def _lrn(inputs, attrs):
    """y = x / (bias + alpha / size * sum over the channel window of x^2) ^ beta (ONNX LRN)."""
    x = inputs[0].astype(np.float64)
    size = int(attrs["size"])
    alpha, beta, bias = float(_attr(attrs, "alpha", 1e-4)), float(_attr(attrs, "beta", 0.75)), float(_attr(attrs, "bias", 1.0))
    sq = np.pad(x**2, [(0, 0), ((size - 1) // 2, size // 2)] + [(0, 0)] * (x.ndim - 2))
    window = sum(sq[:, i:i + x.shape[1]] for i in range(size))
    return [(x / (bias + alpha / size * window) ** beta).astype(inputs[0].dtype)]


# ----------------------------------------------------------------------------- data movement

def _shape(inputs, attrs):
    shape = np.array(inputs[0].shape, np.int64)
    start, end = int(_attr(attrs, "start", 0)), attrs.get("end")
    return [shape[start:None if end is None else int(end)]]


def _reshape(inputs, attrs):
    x, shape = inputs[0], [int(d) for d in inputs[1].reshape(-1)]
    if not _attr(attrs, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(inputs, attrs):
    x = inputs[0]
    axis = int(_attr(attrs, "axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


def _squeeze(inputs, attrs):
    x = inputs[0]
    axes = _axes(inputs, attrs, 1)
    if axes is None:
        return [np.squeeze(x)]
    return [np.squeeze(x, axis=tuple(a % x.ndim for a in axes))]


def _unsqueeze(inputs, attrs):
    x = inputs[0]
    axes = _axes(inputs, attrs, 1)
    rank = x.ndim + len(axes)
    y = x
    for a in sorted(a % rank for a in axes):
        y = np.expand_dims(y, a)
    return [y]


def _transpose(inputs, attrs):
    x = inputs[0]
    perm = attrs.get("perm")
    return [np.transpose(x, None if perm is None else list(perm))]


def _concat(inputs, attrs):
    arrays = [x for x in inputs if x is not None]
    return [np.concatenate(arrays, axis=int(attrs["axis"]))]


def _split(inputs, attrs):
    """ONNX Split in every opset form; the chunk sizes along ``axis`` (n = x.shape[axis]) are:

    - opset < 13: attribute ``split``; opset >= 13: optional input 1 ``split`` (the sizes as given);
    - opset 18+: attribute ``num_outputs`` = k: chunks of ceil(n / k), the last one smaller
      (n - (k - 1) * ceil(n / k));
    - no sizes and no ``num_outputs`` (opset < 18): k = the node's number of outputs, which must
      divide n (equal split). ``evaluate`` passes k as the private attribute ``_n_outputs``.
    """
    x = inputs[0]
    axis = int(_attr(attrs, "axis", 0)) % x.ndim
    n = x.shape[axis]
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(s) for s in np.asarray(inputs[1]).reshape(-1)]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    elif "num_outputs" in attrs:
        parts = int(attrs["num_outputs"])
        step = -(-n // parts) if parts > 0 else 0
        last = n - (parts - 1) * step
        if parts < 1 or last < 0:
            raise ProgramError(f"float Split: num_outputs={parts} cannot split a dimension of {n} into chunks "
                               f"of ceil({n}/{parts}) with a smaller last one; give the split sizes instead")
        sizes = [step] * (parts - 1) + [last]
    else:
        parts = attrs.get("_n_outputs")
        if parts is None:
            raise ProgramError("float Split: no 'split' sizes and no 'num_outputs'; the equal split needs the "
                               "node's number of outputs (pass n_outputs to float_ops.evaluate)")
        parts = int(parts)
        if parts < 1 or n % parts:
            raise ProgramError(f"float Split: a dimension of {n} cannot be split evenly into {parts} outputs; "
                               "give the split sizes as input 1 (or num_outputs at opset 18)")
        sizes = [n // parts] * parts
    if sum(sizes) != n or min(sizes, default=0) < 0:
        raise ProgramError(f"float Split: split sizes {sizes} do not add up to the dimension {n} of axis {axis}")
    bounds = np.cumsum(sizes)[:-1]
    return list(np.split(x, bounds, axis=axis))


def _slice(inputs, attrs):
    x = inputs[0]
    starts = [int(v) for v in inputs[1].reshape(-1)]
    ends = [int(v) for v in inputs[2].reshape(-1)]
    axes = [int(v) for v in inputs[3].reshape(-1)] if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = [int(v) for v in inputs[4].reshape(-1)] if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        dim = x.shape[a % x.ndim]
        # clamp as ONNX does: huge ends (INT64_MAX / INT64_MIN) mean "to the end"
        s = max(-dim - 1, min(dim, s))
        e = max(-dim - 1, min(dim, e))
        if st < 0 and e < -dim:
            e = None
        elif e is not None and e < -dim:
            e = 0
        index[a % x.ndim] = slice(s if s >= -dim else 0, e, st)
    return [x[tuple(index)]]


def _gather(inputs, attrs):
    x, idx = inputs[0], inputs[1].astype(np.int64)
    axis = int(_attr(attrs, "axis", 0)) % x.ndim
    return [np.take(x, idx, axis=axis)]


def _gather_elements(inputs, attrs):
    x, idx = inputs[0], inputs[1].astype(np.int64)
    axis = int(_attr(attrs, "axis", 0)) % x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return [np.take_along_axis(x, idx, axis=axis)]


def _expand(inputs, attrs):
    x, shape = inputs[0], [int(d) for d in inputs[1].reshape(-1)]
    target = np.broadcast_shapes(x.shape, tuple(shape))
    return [np.broadcast_to(x, target).copy()]


def _tile(inputs, attrs):
    return [np.tile(inputs[0], [int(r) for r in inputs[1].reshape(-1)])]


def _range(inputs, attrs):
    start, limit, delta = (np.asarray(v).reshape(()) for v in inputs[:3])
    n = max(int(np.ceil((limit - start) / delta)), 0)
    return [(start + delta * np.arange(n)).astype(start.dtype)]


def _constant_of_shape(inputs, attrs):
    value = attrs.get("value")
    value = np.zeros(1, F32) if value is None else np.asarray(value).reshape(-1)
    return [np.full([int(d) for d in inputs[0].reshape(-1)], value[0], dtype=value.dtype)]


def _constant(inputs, attrs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            value = attrs[key]
            if key.startswith("value_float"):
                return [np.asarray(value, F32)]
            if key.startswith("value_int"):
                return [np.asarray(value, np.int64)]
            return [np.asarray(value)]
    raise ProgramError("Constant without a supported value attribute")


def _pad(inputs, attrs):
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        pads = [int(p) for p in inputs[1].reshape(-1)]
        value = inputs[2].reshape(-1)[0] if len(inputs) > 2 and inputs[2] is not None and inputs[2].size else 0
    else:
        pads = [int(p) for p in attrs["pads"]]
        value = _attr(attrs, "value", 0.0)
    axes = [int(a) % x.ndim for a in inputs[3].reshape(-1)] if len(inputs) > 3 and inputs[3] is not None else list(
        range(x.ndim))
    n = len(axes)
    widths = [(0, 0)] * x.ndim
    for i, a in enumerate(axes):
        widths[a] = (pads[i], pads[i + n])
    # negative pads crop
    crop = tuple(slice(max(0, -b), x.shape[k] - max(0, -e)) for k, (b, e) in enumerate(widths))
    x = x[crop]
    widths = [(max(0, b), max(0, e)) for b, e in widths]
    mode = _attr(attrs, "mode", "constant")
    if mode == "constant":
        return [np.pad(x, widths, constant_values=np.asarray(value, x.dtype))]
    if mode in ("reflect", "edge", "wrap"):
        return [np.pad(x, widths, mode=mode)]
    raise ProgramError(f"Pad mode '{mode}' is not supported")


def _depth_to_space(inputs, attrs):
    x = inputs[0]
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    if _attr(attrs, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


def _space_to_depth(inputs, attrs):
    x = inputs[0]
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


def _nonzero(inputs, attrs):
    return [np.array(np.nonzero(inputs[0]), dtype=np.int64).reshape(inputs[0].ndim, -1)]


def _cumsum(inputs, attrs):
    x = inputs[0]
    axis = int(np.asarray(inputs[1]).reshape(-1)[0]) % x.ndim
    y = np.flip(x, axis) if _attr(attrs, "reverse", 0) else x
    y = np.cumsum(y.astype(np.float64) if x.dtype.kind == "f" else y, axis=axis)
    if _attr(attrs, "exclusive", 0):
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.take(y, range(x.shape[axis] - 1), axis=axis)],
                           axis=axis)
    y = np.flip(y, axis) if _attr(attrs, "reverse", 0) else y
    return [y.astype(x.dtype)]


# ----------------------------------------------------------------------------- Resize / Upsample

def _source_coordinate(mode: str, out_len: int, in_len: int, scale: float) -> np.ndarray:
    """ONNX Resize coordinate_transformation_mode: the input coordinate of each output index."""
    o = np.arange(out_len, dtype=np.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_len > 1 else np.zeros(out_len)
    if mode == "align_corners":
        return o * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros(out_len)
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        center = in_len / 2
        offset = center * (1 - adjustment)
        return offset + (o + 0.5) / scale - 0.5
    raise ProgramError(f"Resize coordinate_transformation_mode '{mode}' is not supported")


def _nearest_index(coord: np.ndarray, mode: str, in_len: int) -> np.ndarray:
    if mode == "round_prefer_floor":
        idx = np.where(coord - np.floor(coord) == 0.5, np.floor(coord), np.round(coord))
    elif mode == "round_prefer_ceil":
        idx = np.where(coord - np.floor(coord) == 0.5, np.ceil(coord), np.round(coord))
    elif mode == "floor":
        idx = np.floor(coord)
    elif mode == "ceil":
        idx = np.ceil(coord)
    else:
        raise ProgramError(f"Resize nearest_mode '{mode}' is not supported")
    return np.clip(idx, 0, in_len - 1).astype(np.int64)


def _resize_core(x: np.ndarray, scales: list[float], sizes: list[int], mode: str, transform: str,
                 nearest_mode: str) -> np.ndarray:
    """Separable resize: axis by axis, nearest pick or linear interpolation (edge values beyond the
    border: the coordinate is clamped to [0, len - 1])."""
    y = x.astype(np.float64) if mode == "linear" else x
    for axis in range(x.ndim):
        in_len, out_len, scale = x.shape[axis], sizes[axis], scales[axis]
        if in_len == out_len and scale == 1.0:
            continue
        coord = _source_coordinate(transform, out_len, in_len, scale)
        if mode == "nearest":
            y = np.take(y, _nearest_index(coord, nearest_mode, in_len), axis=axis)
        elif mode == "linear":
            coord = np.clip(coord, 0, in_len - 1)
            lo = np.floor(coord).astype(np.int64)
            hi = np.minimum(lo + 1, in_len - 1)
            frac = (coord - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
            y = np.take(y, lo, axis=axis) * (1 - frac) + np.take(y, hi, axis=axis) * frac
        else:
            raise ProgramError(f"Resize mode '{mode}' is not supported (nearest and linear are)")
    return y.astype(x.dtype)


def _resize(inputs, attrs):
    x = inputs[0]
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].size else None
    sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].size else None
    axes = attrs.get("axes")
    if _attr(attrs, "antialias", 0):
        raise ProgramError("Resize antialias=1 is not supported")
    if axes is not None:
        full_s, full_n = [1.0] * x.ndim, list(x.shape)
        for i, a in enumerate(axes):
            if scales is not None:
                full_s[a % x.ndim] = float(scales[i])
            if sizes is not None:
                full_n[a % x.ndim] = int(sizes[i])
        scales = np.array(full_s) if scales is not None else None
        sizes = np.array(full_n) if sizes is not None else None
    if sizes is not None:
        out = [int(s) for s in sizes]
        scl = [o / i for o, i in zip(out, x.shape)]
    else:
        scl = [float(s) for s in scales]
        out = [math.floor(i * s) for i, s in zip(x.shape, scl)]
    mode = _attr(attrs, "mode", "nearest")
    transform = _attr(attrs, "coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":
        raise ProgramError("Resize coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    return [_resize_core(x, scl, out, mode, transform, _attr(attrs, "nearest_mode", "round_prefer_floor"))]


def _upsample(inputs, attrs):
    x = inputs[0]
    scales = inputs[1] if len(inputs) > 1 and inputs[1] is not None else np.asarray(attrs["scales"])
    scl = [float(s) for s in scales.reshape(-1)]
    out = [math.floor(i * s) for i, s in zip(x.shape, scl)]
    mode = _attr(attrs, "mode", "nearest")
    mode = "linear" if mode in ("linear", "bilinear") else mode
    return [_resize_core(x, scl, out, mode, "asymmetric", "floor")]


# ----------------------------------------------------------------------------- the table

FLOAT_OPS: dict = {}
FLOAT_OPS.update({op: _unary(fn) for op, fn in UNARY.items()})
FLOAT_OPS.update(BINARY)
FLOAT_OPS.update(REDUCE)
FLOAT_OPS.update({
    "Max": _variadic(np.maximum), "Min": _variadic(np.minimum), "Sum": _sum, "Mean": _mean,
    "Clip": _clip, "Where": _where, "Cast": _cast, "CastLike": _cast_like, "Dropout": _dropout,
    "ArgMax": _arg(np.argmax), "ArgMin": _arg(np.argmin),
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True), "TopK": _topk,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool(np.mean), "GlobalMaxPool": _global_pool(np.max),
    "BatchNormalization": _batchnorm, "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm, "LRN": _lrn,
    "Shape": _shape, "Size": lambda i, a: [np.array(i[0].size, np.int64)],
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "Expand": _expand, "Tile": _tile,
    "Range": _range, "ConstantOfShape": _constant_of_shape, "Constant": _constant, "Pad": _pad,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth, "NonZero": _nonzero,
    "CumSum": _cumsum, "Resize": _resize, "Upsample": _upsample,
})


def evaluate(op: str, inputs: list, attrs: dict, n_outputs: int | None = None) -> list[np.ndarray]:
    """Run one ONNX op in float; ProgramError for an op outside ``FLOAT_OPS`` or a bad attribute.

    ``n_outputs`` is the node's number of outputs, which some ops need to know their result
    (Split with neither sizes nor ``num_outputs`` splits equally into that many parts).
    """
    fn = FLOAT_OPS.get(op)
    if fn is None:
        raise ProgramError(f"no float implementation of ONNX op '{op}' (known: {len(FLOAT_OPS)} ops, "
                           "see runtime.float_ops.FLOAT_OPS)")
    attrs = dict(attrs)
    if n_outputs is not None:
        attrs["_n_outputs"] = int(n_outputs)
    try:
        return fn(list(inputs), attrs)
    except ProgramError:
        raise
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise ProgramError(f"float {op}: {type(exc).__name__}: {exc}") from exc


def run_float_layer(layer, inputs: list[np.ndarray], in_infos: list, out_infos: list) -> list[np.ndarray]:
    """Dequantize the inputs, evaluate the ONNX op, quantize the outputs (see the module docstring).

    ``layer.attrs['input_slots']`` lists each ONNX input position: 't' (the next of the layer's
    runtime inputs), 'p' (the constant ``layer.params['input<position>']``) or '' (absent).
    Attributes whose ONNX value is a tensor are ``layer.params['attr.<name>']``.
    """
    runtime = iter(zip(inputs, in_infos))
    args: list = []
    for pos, slot in enumerate(layer.attrs.get("input_slots", [])):
        if slot == "t":
            q, info = next(runtime)
            args.append(q if info.dtype in RAW_DTYPES or info.dtype == "float32"
                        else dequantize(q, info.scale, info.zero_point, info.axis))
        elif slot == "p":
            args.append(layer.params[f"input{pos}"])
        else:
            args.append(None)
    attrs = {k: v for k, v in layer.attrs.get("onnx_attrs", {}).items()}
    attrs.update({k[5:]: v for k, v in layer.params.items() if k.startswith("attr.")})
    results = evaluate(layer.op, args, attrs, n_outputs=len(out_infos))
    if layer.attrs.get("clip") is not None:  # a fused Relu / Clip: [lo, hi], None = unbounded
        lo, hi = layer.attrs["clip"]
        results[0] = np.clip(results[0], -np.inf if lo is None else lo, np.inf if hi is None else hi)
    outputs = []
    for value, info in zip(results, out_infos):
        value = np.asarray(value)
        if info.dtype in RAW_DTYPES or info.dtype == "float32":
            outputs.append(value.astype(info.dtype, copy=False))
        else:
            outputs.append(quantize(value.astype(F32, copy=False), info.scale, info.zero_point, info.dtype, info.axis))
    return outputs
