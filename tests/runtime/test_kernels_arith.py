"""The arithmetic and lookup-table kernels (runtime/kernels_arith.py) against independent numpy
computations: exact rational rounding in float64 (every value is an integer below 2^53, so
floor(v + 1/2) and rint are exact), numpy's own mean/softmax/argmax, and a Python loop for tables."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import info, layer, rand_int, run_kernel, single_layer_program

from runtime import kernels as fast
from runtime import kernels_reference as ref
from runtime.errors import ProgramError
from runtime.executor import execute

KERNEL_SETS = [ref.KERNELS, fast.KERNELS]


def half_up(num: np.ndarray, k: int) -> np.ndarray:
    """round_half_up(num / 2^k) computed on exact float64 values."""
    return np.floor(num.astype(np.float64) / 2.0**k + 0.5).astype(np.int64)


@pytest.mark.parametrize("kernels", KERNEL_SETS)
def test_affine_per_channel_signed_multipliers_and_bias(kernels):
    rng = np.random.default_rng(0)
    x = rand_int(rng, "int8", (2, 3, 4, 5))
    m = np.array([[[900]], [[-1500]], [[0]]], np.int32)  # [3, 1, 1]: per channel, one negative
    b = np.array([[[70000]], [[-12345]], [[5000]]], np.int64)
    lay = layer("affine", multiplier=m, bias=b, shift=np.array([12], np.int8))
    (y,) = run_kernel(kernels, lay, [x], [info("x", "int8", x.shape, 0.1, -3)], [info("y", "int8", x.shape, 0.2, 4)])
    expected = np.clip(4 + half_up((x.astype(np.int64) + 3) * m + b, 12), -128, 127)
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == np.int8


def test_affine_half_even_rounding_and_clamp():
    x = np.arange(-8, 8, dtype=np.int8).reshape(1, 16)
    lay = layer("affine", multiplier=np.array([1]), bias=np.array([0]), shift=np.array([1], np.int8),
                clamp_lo=np.array([-3]), clamp_hi=np.array([2]))
    lay.rounding = "half_even"
    (y,) = run_kernel(ref.KERNELS, lay, [x], [info("x", "int8", x.shape)], [info("y", "int8", x.shape)])
    np.testing.assert_array_equal(y, np.clip(np.rint(x / 2.0), -3, 2))


def test_affine_refuses_params_that_broadcast_the_input_up():
    x = np.zeros((1, 3), np.int8)
    lay = layer("affine", multiplier=np.ones((2, 3), np.int32), shift=np.array([0], np.int8))
    with pytest.raises(ProgramError, match="affine keeps the shape"):
        run_kernel(ref.KERNELS, lay, [x], [info("x", "int8", x.shape)], [info("y", "int8", x.shape)])


@pytest.mark.parametrize("kernels", KERNEL_SETS)
def test_mul_broadcasts_and_requantizes(kernels):
    rng = np.random.default_rng(1)
    a = rand_int(rng, "uint8", (2, 4, 3, 3))
    b = rand_int(rng, "int8", (2, 4, 1, 1))
    lay = layer("mul", ["a", "b"], multiplier=np.array([23456]), shift=np.array([22], np.int8))
    (y,) = run_kernel(kernels, lay, [a, b], [info("a", "uint8", a.shape, 1, 10), info("b", "int8", b.shape, 1, -2)],
                      [info("y", "int8", a.shape, 1, 1)])
    acc = (a.astype(np.int64) - 10) * (b.astype(np.int64) + 2)
    np.testing.assert_array_equal(y, np.clip(1 + half_up(acc * 23456, 22), -128, 127))


def test_prelu_uses_the_negative_multiplier_below_the_zero_point():
    x = np.tile(np.arange(0, 256, dtype=np.int64), 2).astype(np.uint8).reshape(1, 2, 16, 16)
    m_neg = np.array([[[-300]], [[500]]], np.int32)  # a negative slope in channel 0
    lay = layer("prelu", multiplier=np.array([2000]), multiplier_negative=m_neg, shift=np.array([10], np.int8))
    (y,) = run_kernel(ref.KERNELS, lay, [x], [info("x", "uint8", x.shape, 1, 128)], [info("y", "int16", x.shape, 1, 0)])
    d = x.astype(np.int64) - 128
    expected = np.where(d >= 0, half_up(d * 2000, 10), half_up(d * m_neg, 10))
    np.testing.assert_array_equal(y, expected)
    neg0, neg1 = y[0, 0][d[0, 0] < 0], y[0, 1][d[0, 1] < 0]
    assert (neg0 >= 0).all() and neg0.max() > 30 and (neg1 <= 0).all() and neg1.min() < -50


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("kernels", KERNEL_SETS)
def test_reduce_mean_against_numpy_sum(kernels, keepdims):
    rng = np.random.default_rng(2)
    x = rand_int(rng, "int8", (2, 3, 4, 5))
    lay = layer("reduce_mean", attrs={"axes": [-1, 2], "keepdims": keepdims},
                multiplier=np.array([3355443]), shift=np.array([26], np.int8))  # ~ 1/20
    out_shape = (2, 3, 1, 1) if keepdims else (2, 3)
    (y,) = run_kernel(kernels, lay, [x], [info("x", "int8", x.shape, 1, 5)], [info("y", "int8", out_shape, 1, 0)])
    s = (x.astype(np.int64) - 5).sum(axis=(2, 3), keepdims=bool(keepdims))
    np.testing.assert_array_equal(y, np.clip(half_up(s * 3355443, 26), -128, 127))
    # and the rule is a mean: within one step of numpy's
    assert np.abs(y - np.clip((x.astype(np.float64) - 5).mean(axis=(2, 3), keepdims=bool(keepdims)), -128, 127)).max() <= 0.51


def _softmax_layer(s_x: float, s_y: float, n: int, axis: int, flatten: int = 0):
    d = np.arange(n, dtype=np.float64)
    table = np.floor(np.exp(-s_x * d) * 2.0**30 + 0.5).astype(np.int64)
    m = round(2.0**-30 / s_y * 2.0**54)  # 2^-30 / s_y with k = 54
    return layer("softmax", attrs={"axis": axis, "flatten": flatten}, exp_table=table, multiplier=np.array([m]),
                 shift=np.array([54], np.int8))


@pytest.mark.parametrize("flatten", [0, 1])
def test_softmax_within_half_a_step_of_float64(flatten):
    rng = np.random.default_rng(3)
    x = rand_int(rng, "int8", (3, 4, 2, 5))
    s_x, s_y = 0.05, 1 / 255
    lay = _softmax_layer(s_x, s_y, 256, 1, flatten)
    (y,) = run_kernel(ref.KERNELS, lay, [x], [info("x", "int8", x.shape, s_x, 0)], [info("y", "uint8", x.shape, s_y, 0)])
    v = s_x * x.astype(np.float64)
    axes = (1, 2, 3) if flatten else (1,)
    p = np.exp(v - v.max(axis=axes, keepdims=True))
    p /= p.sum(axis=axes, keepdims=True)
    # fixed point: table and p are 2^-30 exact, m/2^k to 2^-24 relative: far below 1e-3 of a step
    assert np.abs(y - p / s_y).max() <= 0.5 + 1e-3
    assert np.allclose(y.astype(np.float64).sum(axis=axes) * s_y, 1.0, atol=x[0].size / 2 * s_y / x[0, 0].size + 0.05)


def test_softmax_refuses_a_short_table():
    x = np.array([[-100, 100]], np.int8)
    lay = _softmax_layer(0.1, 1 / 255, 16, 1)
    with pytest.raises(ProgramError, match="exp_table has 16 entries"):
        run_kernel(ref.KERNELS, lay, [x], [info("x", "int8", x.shape)], [info("y", "uint8", x.shape)])


@pytest.mark.parametrize("last", [0, 1])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_argmax_ties_keepdims_and_last_index(keepdims, last):
    x = np.array([[[3, 7, 7, -1], [5, 5, 0, 5]]], np.int8)  # ties on purpose
    lay = layer("argmax", attrs={"axis": -1, "keepdims": keepdims, "select_last_index": last})
    out_shape = (1, 2, 1) if keepdims else (1, 2)
    (y,) = run_kernel(ref.KERNELS, lay, [x], [info("x", "int8", x.shape)], [info("y", "int64", out_shape)])
    expected = np.array([[2, 3]] if last else [[1, 0]])
    np.testing.assert_array_equal(y, expected.reshape(out_shape))
    assert y.dtype == np.int64


@pytest.mark.parametrize("dtype,out", [("int8", "uint8"), ("uint8", "int8"), ("int16", "int16")])
def test_lut_indexes_by_the_input_value(dtype, out):
    rng = np.random.default_rng(4)
    lo = {"int8": -128, "uint8": 0, "int16": -32768}[dtype]
    n = 65536 if dtype == "int16" else 256
    table = rand_int(rng, out, (n,))
    x = rand_int(rng, dtype, (2, 3, 7), extreme=False)
    x.flat[0], x.flat[1] = lo, lo + n - 1
    lay = layer("lut", table=table)
    lay.kind = "lut"
    (y,) = run_kernel(ref.KERNELS, lay, [x], [info("x", dtype, x.shape)], [info("y", out, x.shape)])
    expected = np.array([table[int(v) - lo] for v in x.ravel()]).reshape(x.shape)
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(ProgramError, match="needs"):
        run_kernel(ref.KERNELS, layer("lut", table=table[:10]), [x], [info("x", dtype, x.shape)],
                   [info("y", out, x.shape)])


def test_a_lut_layer_runs_in_a_program_and_its_kind_is_checked():
    table = np.arange(256, dtype=np.int64)[::-1].astype(np.uint8)  # y = 255 - (x + 128)
    lay = layer("lut", table=table)
    lay.kind = "lut"
    prog = single_layer_program(lay, [info("x", "int8", (1, 4), 0.5, 0)], [info("y", "uint8", (1, 4), 0.5, 0)])
    out = execute(prog, {"x": np.array([[-128, -1, 0, 127]], np.int8)}, raw_inputs=True, raw_outputs=True)
    np.testing.assert_array_equal(out["y"], [[255, 128, 127, 0]])
    lay.kind = "integer"
    with pytest.raises(ProgramError, match="kind 'lut' and op 'lut' go together"):
        execute(prog, {"x": np.zeros((1, 4), np.int8)}, raw_inputs=True)
