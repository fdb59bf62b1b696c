"""Fixed-point helpers of the IR: multipliers, requantization, and the quantize/dequantize ports.

Everything here is pure numpy. Requantization is integer-only and rounds half up (add 2^(k-1),
then an arithmetic right shift), as TIDL does; the ports follow ONNX QuantizeLinear /
DequantizeLinear (opset 21, per tensor or per axis; no blocked quantization).
"""
from __future__ import annotations

import numpy as np

DTYPE_LIMITS: dict[str, tuple[int, int]] = {
    "int8": (-(2**7), 2**7 - 1),
    "uint8": (0, 2**8 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}
"""Inclusive (min, max) of every integer dtype a tensor of the IR may have."""

QUANT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")
"""The dtypes a float may be quantized to at a port."""

SHIFT_MIN, SHIFT_MAX = -31, 62
"""The range of a requantization shift k: 2^(k-1) and a left shift by 31 both stay in int64."""


def dtype_limits(dtype: str) -> tuple[int, int]:
    """(min, max) of an integer dtype name; ValueError for anything else."""
    try:
        return DTYPE_LIMITS[str(dtype)]
    except KeyError:
        raise ValueError(f"not an integer dtype of the IR: {dtype!r}") from None


def saturate(x: np.ndarray, dtype: str) -> np.ndarray:
    """Clip integers to the limits of ``dtype`` and cast to it (saturation, no wrap-around)."""
    lo, hi = dtype_limits(dtype)
    x = np.asarray(x)
    if np.dtype(x.dtype) == np.dtype(dtype):
        return x
    return np.clip(x, lo, hi).astype(dtype)


def quantize_multiplier(real, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Split real multipliers into integers m (int32) and k (int8) with m / 2^k ~= real.

    ``bits`` in 1..31: m is normalized into [2^(bits-1), 2^bits - 1] and rounded half up, so
    |m / 2^k - real| <= 2^-(k+1) <= real * 2^-bits; a rounding carry to 2^bits becomes
    m = 2^(bits-1), k - 1. k is clamped into [-31, 62]: below 2^-62 * 2^(bits-1) the
    multiplier loses normalization (m = round_half_up(real * 2^62), possibly 0); above
    (2^bits - 1) * 2^31 m saturates at 2^bits - 1. real == 0 gives m = 0, k = 0.
    ``bits`` == 0 is shift-only: m = 1 and k = -round(log2(real)), the nearest power of two in
    the log domain (clamped the same way).
    """
    real = np.atleast_1d(np.asarray(real, dtype=np.float64))
    if real.ndim != 1:
        real = real.ravel()
    if not np.all(np.isfinite(real)) or np.any(real < 0):
        raise ValueError(f"multipliers must be finite and >= 0, got {real}")
    if not 0 <= int(bits) <= 31:
        raise ValueError(f"multiplier bits must be in 0..31, got {bits}")
    bits = int(bits)
    zero = real == 0
    safe = np.where(zero, 1.0, real)
    if bits == 0:
        k = -np.floor(np.log2(safe) + 0.5)
        k = np.clip(k, SHIFT_MIN, SHIFT_MAX)
        m = np.ones_like(real)
    else:
        frac, exp = np.frexp(safe)  # safe = frac * 2^exp, frac in [0.5, 1)
        m = np.floor(np.ldexp(frac, bits) + 0.5)  # exact: frac * 2^bits < 2^31
        k = (bits - exp).astype(np.float64)
        carry = m == 2.0**bits
        m = np.where(carry, 2.0 ** (bits - 1), m)
        k = np.where(carry, k - 1, k)
        low = k > SHIFT_MAX
        high = k < SHIFT_MIN
        m = np.where(low, np.floor(np.ldexp(safe, SHIFT_MAX) + 0.5), m)
        m = np.where(high, np.minimum(np.floor(np.ldexp(safe, SHIFT_MIN) + 0.5), 2.0**bits - 1), m)
        k = np.clip(k, SHIFT_MIN, SHIFT_MAX)
    m = np.where(zero, 0, m).astype(np.int32)
    k = np.where(zero, 0, k).astype(np.int8)
    return m, k


def _along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a 1-D per-axis array so that it broadcasts along ``axis`` of an ndim-array."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    if values.ndim != 1:
        return values  # already shaped for broadcasting (e.g. avgpool's [H_out, W_out])
    if axis is None:
        raise ValueError(f"{values.size} per-axis values need an axis")
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def shift_round_half_up(acc: np.ndarray, k) -> np.ndarray:
    """acc / 2^k rounded half up for k > 0 ((acc + 2^(k-1)) >> k), acc << -k for k <= 0.

    ``k`` broadcasts against ``acc``; the shift is arithmetic (floor), so ties go up:
    -3 / 2 -> -1, 3 / 2 -> 2.
    """
    acc = np.asarray(acc, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    right = np.maximum(k, 0)
    left = np.maximum(-k, 0)
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    return np.left_shift(np.right_shift(acc + half, right), left)


def shift_round_half_even(acc: np.ndarray, k) -> np.ndarray:
    """acc / 2^k rounded half to even for k > 0 (ties go to the even neighbour, as ONNX
    QuantizeLinear rounds), acc << -k for k <= 0."""
    acc = np.asarray(acc, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    up = shift_round_half_up(acc, k)
    right = np.maximum(k, 0)
    mask = np.left_shift(np.int64(1), right) - 1
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), -1)
    tie = (k > 0) & ((acc & mask) == half)
    return np.where(tie & (up % 2 != 0), up - 1, up)


ROUNDING_MODES = ("half_up", "half_even")
"""Requantization rounding modes: TIDL's half_up (the presets' choice) and half_even (ONNX's)."""


def shift_round(acc: np.ndarray, k, rounding: str | None = "half_up") -> np.ndarray:
    """acc / 2^k rounded by the named mode (None means half_up)."""
    if rounding in (None, "half_up"):
        return shift_round_half_up(acc, k)
    if rounding == "half_even":
        return shift_round_half_even(acc, k)
    raise ValueError(f"unknown rounding mode {rounding!r}; known: {', '.join(ROUNDING_MODES)}")


def requantize(acc: np.ndarray, m, k, axis: int | None = None, rounding: str | None = "half_up") -> np.ndarray:
    """requant(a, m, k) of the arithmetic contract, in int64.

    (a*m + 2^(k-1)) >> k for k > 0 (round half up; ``rounding="half_even"`` sends exact ties
    to the even neighbour instead), a*m for k = 0, (a*m) << -k for k < 0.
    ``m`` and ``k`` are 1-D (length 1 = per tensor, or one per slice along ``axis`` of acc) or
    already shaped to broadcast against acc. Raises OverflowError when a*m (or the shifted
    value) could leave int64, judged from max |acc| per slice.
    """
    acc = np.asarray(acc, dtype=np.int64)
    m = _along(np.asarray(m, dtype=np.int64), acc.ndim, axis)
    k = _along(np.asarray(k, dtype=np.int64), acc.ndim, axis)
    if acc.size:
        _check_no_overflow(acc, m, k)
    return shift_round(acc * m, k, rounding)


def _check_no_overflow(acc: np.ndarray, m: np.ndarray, k: np.ndarray) -> None:
    """Refuse |acc|*m*2^max(-k,0) + 2^(k-1) >= 2^63 (float64 bound with a 2^-40 margin)."""
    peak = float(np.max(np.abs(acc)))  # |int64 min| wraps; the float bound below catches it
    if peak < 0:
        peak = 2.0**63
    worst = peak * np.abs(m).astype(np.float64) * np.exp2(np.maximum(-k, 0)) + np.exp2(k - 1.0)
    if np.any(worst >= 2.0**63 * (1 - 2.0**-40)):
        raise OverflowError(
            f"requantization leaves int64: max |acc| = {int(peak)}, max m = {int(np.max(m))}, "
            f"k in [{int(np.min(k))}, {int(np.max(k))}]"
        )


def _check_dtype(dtype: str) -> str:
    dtype = str(dtype)
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"cannot quantize to {dtype!r}; supported: {', '.join(QUANT_DTYPES)}")
    return dtype


def quantize(x, scale, zero_point, dtype: str, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point) to ``dtype``.

    x / scale is computed in float32 (as ONNX does); scale and zero point are one value or one per
    slice along ``axis``. NaN quantizes to the zero point.
    """
    dtype = _check_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    scale = _along(np.asarray(scale, dtype=np.float32), x.ndim, _norm_axis(axis, x.ndim))
    zp = _along(np.asarray(zero_point, dtype=np.int64), x.ndim, _norm_axis(axis, x.ndim))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.rint(np.divide(x, scale, dtype=np.float32)).astype(np.float64)
    r = np.where(np.isnan(r), 0.0, r) + zp  # exact: |zp| < 2^32, rint values are integers
    lo, hi = DTYPE_LIMITS[dtype]
    return np.clip(r, lo, hi).astype(dtype)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale in float32.

    q - zero_point is exact (int64), converted to float32 once, then multiplied by the float32
    scale: the same bits as ONNX for 8/16-bit, and as onnxruntime for int32.
    """
    q = np.asarray(q)
    ax = _norm_axis(axis, q.ndim)
    scale = _along(np.asarray(scale, dtype=np.float32), q.ndim, ax)
    zp = _along(np.asarray(zero_point, dtype=np.int64), q.ndim, ax)
    return (q.astype(np.int64) - zp).astype(np.float32) * scale


def _norm_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim if ndim else 0
