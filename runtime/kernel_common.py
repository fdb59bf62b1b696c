"""What the reference and the fast kernels share: attribute defaults, window geometry, param
lookup and the output epilogue y = clamp(zp_y + r, lo, hi) saturated to the output dtype.

The arithmetic itself (accumulation) is not shared, so the reference stays an independent oracle.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ProgramError
from .fixed_point import DTYPE_LIMITS, dtype_limits
from .ir import Layer, TensorInfo


def tensor_zero_point(info: TensorInfo) -> int:
    """The per-tensor zero point of an activation (per-axis zero points are for weights only)."""
    zp = np.asarray(info.zero_point).ravel()
    if zp.size != 1:
        raise ProgramError(f"tensor '{info.name}': activations need one zero point, got {zp.size}")
    return int(zp[0])


def param(layer: Layer, name: str, default=None, *, required: bool = False) -> np.ndarray | None:
    """A layer param as an array; ProgramError if required and missing, or if not integer."""
    value = layer.params.get(name)
    if value is None:
        if required:
            raise ProgramError(f"missing param '{name}'")
        return default
    value = np.asarray(value)
    if value.dtype.kind not in "iu":
        raise ProgramError(f"param '{name}' must be an integer array, got {value.dtype}")
    return value


def per_channel(values: np.ndarray, n: int, name: str) -> np.ndarray:
    """Check that a per-channel param has 1 or n entries and return it flat, as int64."""
    values = np.asarray(values, dtype=np.int64).ravel()
    if values.size not in (1, n):
        raise ProgramError(f"param '{name}' has {values.size} entries, expected 1 or {n}")
    return values


def requant_params(layer: Layer, n: int) -> tuple[np.ndarray, np.ndarray]:
    """multiplier (m) and shift (k), each [1] or [n]."""
    m = per_channel(param(layer, "multiplier", required=True), n, "multiplier")
    k = per_channel(param(layer, "shift", required=True), n, "shift")
    return m, k


def clamp_bounds(layer: Layer, dtype: str, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """clamp_lo / clamp_hi ([1] or [n]) narrowed to the dtype's limits; absent = the limits."""
    tmin, tmax = dtype_limits(dtype)
    lo = param(layer, "clamp_lo")
    hi = param(layer, "clamp_hi")
    lo = np.array([tmin], np.int64) if lo is None else np.maximum(per_channel(lo, n, "clamp_lo"), tmin)
    hi = np.array([tmax], np.int64) if hi is None else np.minimum(per_channel(hi, n, "clamp_hi"), tmax)
    if np.any(lo > hi):
        raise ProgramError(f"clamp_lo > clamp_hi: {lo} > {hi}")
    return lo, hi


def along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Shape [1] or [n] values to broadcast along ``axis`` of an ndim-array."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def finish(r: np.ndarray, zp_y: int, lo: np.ndarray, hi: np.ndarray, dtype: str, axis: int = 1) -> np.ndarray:
    """y = clip(zp_y + r, lo, hi) cast to ``dtype`` (lo/hi already inside its limits)."""
    if dtype not in DTYPE_LIMITS:
        raise ProgramError(f"output dtype must be an integer dtype, got {dtype!r}")
    y = np.asarray(r, dtype=np.int64) + np.int64(zp_y)
    y = np.clip(y, along(lo, y.ndim, axis), along(hi, y.ndim, axis))
    return y.astype(dtype)


def check_same_qparams(a: TensorInfo, b: TensorInfo, op: str) -> None:
    """Pass-through ops (maxpool, clamp) need the output's quantization equal to the input's."""
    same = (
        a.dtype == b.dtype
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(a.zero_point, b.zero_point)
    )
    if not same:
        raise ProgramError(
            f"{op} needs output qparams equal to the input's: "
            f"{a.name} {a.dtype} s={a.scale} zp={a.zero_point} vs {b.name} {b.dtype} s={b.scale} zp={b.zero_point}"
        )


# --- window geometry -------------------------------------------------------------------------

def _pair(attrs: dict, name: str, default: int, n: int = 2) -> tuple[int, ...]:
    value = attrs.get(name)
    if value is None:
        return (default,) * n
    value = tuple(int(v) for v in np.atleast_1d(value))
    if len(value) != n:
        raise ProgramError(f"attr '{name}' needs {n} values, got {list(value)}")
    return value


def conv_geometry(attrs: dict, x_shape, w_shape) -> dict:
    """Strides, pads [top, left, bottom, right], dilations, group and the output size of a conv.

    H_out = floor((H + top + bottom - dh*(kh-1) - 1) / sh) + 1, and the same for W.
    """
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ProgramError(f"conv needs NCHW input and OIHW weight, got {tuple(x_shape)} and {tuple(w_shape)}")
    _n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    ks = _pair(attrs, "kernel_shape", 0)
    if attrs.get("kernel_shape") is not None and ks != (kh, kw):
        raise ProgramError(f"kernel_shape {list(ks)} does not match weight {tuple(w_shape)}")
    group = int(attrs.get("group", 1))
    if group < 1 or c != cg * group or o % group:
        raise ProgramError(f"group {group} does not fit input channels {c}, weight {tuple(w_shape)}")
    geo = {
        "kernel": (kh, kw),
        "strides": _pair(attrs, "strides", 1),
        "pads": _pair(attrs, "pads", 0, 4),
        "dilations": _pair(attrs, "dilations", 1),
        "group": group,
    }
    (pt, pl, pb, pr), (sh, sw), (dh, dw) = geo["pads"], geo["strides"], geo["dilations"]
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if min(geo["strides"] + geo["dilations"]) < 1 or min(geo["pads"]) < 0:
        raise ProgramError(f"bad conv attrs {geo}")
    if ho < 1 or wo < 1:
        raise ProgramError(f"conv output would be empty ({ho}x{wo}) for input {tuple(x_shape)}")
    geo["out"] = (ho, wo)
    return geo


def pool_geometry(attrs: dict, x_shape) -> dict:
    """Pool window geometry (ONNX / PyTorch rule) and the output size.

    H_out = floor or ceil((H + top + bottom - dh*(kh-1) - 1) / sh) + 1; in ceil mode a window that
    would start in the bottom/right padding is dropped. ``extra`` is how far the last window
    reaches past the padded input (ceil mode); that overhang, like padding, never contributes.
    """
    if len(x_shape) != 4:
        raise ProgramError(f"pooling needs an NCHW input, got {tuple(x_shape)}")
    if attrs.get("kernel_shape") is None:
        raise ProgramError("pooling needs attr 'kernel_shape'")
    geo = {
        "kernel": _pair(attrs, "kernel_shape", 1),
        "strides": _pair(attrs, "strides", 1),
        "pads": _pair(attrs, "pads", 0, 4),
        "dilations": _pair(attrs, "dilations", 1),
    }
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    out, extra = [], []
    for i, size in enumerate(x_shape[2:]):
        k, s, d = geo["kernel"][i], geo["strides"][i], geo["dilations"][i]
        begin, end = geo["pads"][i], geo["pads"][i + 2]
        span = d * (k - 1) + 1
        num = size + begin + end - span
        n_out = (math.ceil(num / s) if ceil_mode else num // s) + 1
        if ceil_mode and (n_out - 1) * s >= size + begin:
            n_out -= 1
        if n_out < 1:
            raise ProgramError(f"pool output would be empty for input {tuple(x_shape)} and {geo}")
        out.append(n_out)
        extra.append(max(0, (n_out - 1) * s + span - (size + begin + end)))
    geo["out"] = tuple(out)
    geo["extra"] = tuple(extra)
    return geo


def resolve_reshape(target, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """ONNX Reshape (allowzero = 0): 0 copies the input dim, one -1 is inferred."""
    target = [int(v) for v in np.atleast_1d(target)]
    out = [in_shape[i] if v == 0 else v for i, v in enumerate(target)]
    total = int(np.prod(in_shape, dtype=np.int64))
    if out.count(-1) > 1 or any(v < -1 for v in out):
        raise ProgramError(f"bad reshape target {target}")
    if -1 in out:
        known = int(np.prod([v for v in out if v != -1], dtype=np.int64))
        if known == 0 or total % known:
            raise ProgramError(f"cannot reshape {tuple(in_shape)} to {target}")
        out[out.index(-1)] = total // known
    if int(np.prod(out, dtype=np.int64)) != total:
        raise ProgramError(f"cannot reshape {tuple(in_shape)} to {target}")
    return tuple(out)
