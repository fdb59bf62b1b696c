"""quantize_multiplier, requantize and the quantize/dequantize ports: exact properties."""
from fractions import Fraction

import numpy as np
import pytest

from runtime.fixed_point import (
    DTYPE_LIMITS,
    dequantize,
    quantize,
    quantize_multiplier,
    requantize,
    saturate,
    shift_round_half_up,
)


def exact_requant(a: int, m: int, k: int) -> int:
    """floor(a*m/2^k + 1/2) for k > 0 (round half up), a*m*2^-k otherwise, in rationals."""
    value = Fraction(a * m) / Fraction(2) ** k
    if k <= 0:
        return int(value)
    return int(np.floor(value + Fraction(1, 2)))


# --- quantize_multiplier -----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 7, 8, 15, 16, 24, 31])
def test_multiplier_is_normalized_and_within_half_a_step(bits):
    rng = np.random.default_rng(bits)
    real = np.exp2(rng.uniform(-28, 20, 2000))  # keeps k inside [-31, 62] * rng.uniform(0.5, 1.0, 2000)
    m, k = quantize_multiplier(real, bits)
    assert m.dtype == np.int32 and k.dtype == np.int8
    assert np.all(m >= 2 ** (bits - 1)) and np.all(m <= 2**bits - 1)
    for r, mi, ki in zip(real[:300], m[:300], k[:300]):
        err = abs(Fraction(int(mi)) / Fraction(2) ** int(ki) - Fraction(float(r)))
        assert err <= Fraction(1, 2) / Fraction(2) ** int(ki)  # half a step of 2^-k
        assert err <= Fraction(float(r)) / 2**bits  # relative bound 2^-bits


def test_multiplier_rounds_half_up_and_carries():
    # 0.625 = 0.101b: with 2 bits, 2.5 rounds half up to 3 -> 3/4
    m, k = quantize_multiplier([0.625], 2)
    assert (int(m[0]), int(k[0])) == (3, 2)
    # 255.5/256 rounds to 256 = 2^8: the carry gives 128 / 2^7 = 1.0
    m, k = quantize_multiplier([255.5 / 256], 8)
    assert (int(m[0]), int(k[0])) == (128, 7)
    m, k = quantize_multiplier([(2**31 - 0.5) / 2**31], 31)
    assert (int(m[0]), int(k[0])) == (2**30, 30)


def test_multiplier_zero_large_small_and_negative_shift():
    m, k = quantize_multiplier([0.0, 3.0, 1e-30, 1e15], 8)
    assert (int(m[0]), int(k[0])) == (0, 0)
    assert (int(m[1]), int(k[1])) == (192, 6)  # 192 / 64 = 3
    assert int(k[2]) == 62 and int(m[2]) == 0  # clamped shift: underflows to 0
    assert int(k[3]) == -31 and int(m[3]) == 255  # clamped shift: saturated multiplier
    m, k = quantize_multiplier([1000.0], 8)  # real >= 2^(bits-1): negative shift
    assert int(k[0]) < 0 and int(m[0]) * 2 ** (-int(k[0])) == 1000
    with pytest.raises(ValueError):
        quantize_multiplier([-1.0], 8)
    with pytest.raises(ValueError):
        quantize_multiplier([1.0], 32)


def test_shift_only_multiplier_is_nearest_power_of_two():
    m, k = quantize_multiplier([1.0, 0.5, 0.75, 0.7, 3.0, 2.0**-10, 0.0], 0)
    assert m.tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert k.tolist() == [0, 1, 0, 1, -2, 10, 0]  # 0.75 -> 1 (log2 -0.415), 0.7 -> 0.5 (log2 -0.515)


# --- requantize --------------------------------------------------------------------------------

def test_requantize_ties_round_half_up():
    assert requantize(np.array([-3]), [1], [1]).tolist() == [-1]
    assert requantize(np.array([3]), [1], [1]).tolist() == [2]
    assert requantize(np.array([-1, 1, -5, 5, -4, 4]), [1], [1]).tolist() == [0, 1, -2, 3, -2, 2]
    assert shift_round_half_up(np.array([-3, 3]), 1).tolist() == [-1, 2]


def test_requantize_zero_and_negative_shift():
    a = np.array([-7, 0, 5], dtype=np.int64)
    assert requantize(a, [3], [0]).tolist() == [-21, 0, 15]
    assert requantize(a, [3], [-2]).tolist() == [-84, 0, 60]  # (a*m) << 2, no rounding term


def test_requantize_matches_rational_rule():
    rng = np.random.default_rng(7)
    acc = rng.integers(-(2**31), 2**31, size=(50, 6), dtype=np.int64)
    m = rng.integers(1, 2**31, size=6).astype(np.int32)
    k = np.array([-3, 0, 1, 17, 31, 40], dtype=np.int8)
    m[0] = 5  # keep the left shift inside int64
    acc[:, 5] //= 2**20
    got = requantize(acc, m, k, axis=1)
    for i in range(acc.shape[0]):
        for c in range(6):
            assert got[i, c] == exact_requant(int(acc[i, c]), int(m[c]), int(k[c]))


def test_requantize_error_bound():
    """|requant(acc) - acc*M| <= 0.5 + |m/2^k - M| * |acc| for m, k = quantize_multiplier(M)."""
    rng = np.random.default_rng(3)
    real = np.exp2(rng.uniform(-20, 2, 64))
    acc = rng.integers(-(2**24), 2**24, size=(200, 64), dtype=np.int64)
    for bits in (8, 16, 31):
        m, k = quantize_multiplier(real, bits)
        got = requantize(acc, m, k, axis=1).astype(np.float64)
        approx = m.astype(np.float64) * np.exp2(-k.astype(np.float64))
        bound = 0.5 + np.abs(approx - real) * np.abs(acc) + 1e-9 * np.abs(acc * real)
        assert np.all(np.abs(got - acc * real) <= bound)


def test_requantize_refuses_int64_overflow():
    with pytest.raises(OverflowError):
        requantize(np.array([2**40]), [2**30], [10])
    with pytest.raises(OverflowError):
        requantize(np.array([2**30]), [2**30], [-8])


def test_requantize_per_axis_last_and_2d_multiplier():
    acc = np.arange(12, dtype=np.int64).reshape(3, 4)
    got = requantize(acc, [1, 2, 3, 4], [0, 0, 0, 1], axis=-1)
    assert got.tolist() == [[0, 2, 6, 6], [4, 10, 18, 14], [8, 18, 30, 22]]
    grid = np.array([[1, 2, 3, 4]] * 3)
    assert requantize(acc, grid, [0]).tolist() == (acc * grid).tolist()


# --- ports -------------------------------------------------------------------------------------

def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0, np.nan], dtype=np.float32)
    assert quantize(x, 1.0, 0, "int8").tolist() == [0, 2, 2, 0, -2, 127, -128, 0]
    assert quantize(x, 1.0, 10, "uint8").tolist() == [10, 12, 12, 10, 8, 255, 0, 10]
    assert quantize(x, 0.5, -5, "int16").tolist() == [-4, -2, 0, -6, -8, 1995, -2005, -5]


def test_quantize_divides_in_float32():
    # 29.45f / 0.1f is 294.500003 in float64 (-> 295) but exactly 294.5 in float32 (-> 294, even)
    x, s = np.float32(29.45), np.float32(0.1)
    assert np.rint(np.float64(x) / np.float64(s)) == 295
    assert quantize([x], s, 0, "int16").tolist() == [294]


def test_quantize_per_axis_and_dequantize():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 12
    scale = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    zp = np.array([1, -2, 3])
    q = quantize(x, scale, zp, "int8", axis=1)
    expect = np.clip(np.rint(x / scale[None, :, None]) + zp[None, :, None], -128, 127)
    assert np.array_equal(q, expect)
    back = dequantize(q, scale, zp, axis=1)
    assert back.dtype == np.float32
    assert np.array_equal(back, ((q.astype(np.int64) - zp[None, :, None]) * scale[None, :, None]).astype(np.float32))


def test_saturate_and_limits():
    assert DTYPE_LIMITS["uint16"] == (0, 65535)
    assert saturate(np.array([-1, 70000, 5]), "uint16").tolist() == [0, 65535, 5]
    assert saturate(np.array([-1, 70000, 5]), "uint16").dtype == np.uint16
    with pytest.raises(ValueError):
        quantize([1.0], 1.0, 0, "int64")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_quantize_matches_onnxruntime(dtype):
    """The input port is bit-identical to onnxruntime's QuantizeLinear (opset 21), ties included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    tp = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int16": TensorProto.INT16, "uint16": TensorProto.UINT16}[dtype]
    zp = {"int8": -3, "uint8": 128, "int16": 5, "uint16": 30000}[dtype]
    scale = np.float32(0.0371)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 40, 40)) * 3).astype(np.float32)
    x.ravel()[:1000] = ((rng.integers(-200, 200, 1000) + 0.5) * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", tp, x.shape)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]), helper.make_tensor("z", tp, [], [zp])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    assert np.array_equal(quantize(x, scale, zp, dtype), expected)


def test_half_even_rounding_sends_exact_ties_to_the_even_neighbour():
    from runtime.fixed_point import shift_round

    acc = np.array([-7, -6, -5, -3, -1, 1, 3, 5, 6, 7, 10, 11, 12, 13, 14], np.int64)
    # k = 1 divides by 2 (ties at odd acc); k = 2 divides by 4 (ties at acc = 2 mod 4).
    np.testing.assert_array_equal(shift_round(acc, 1, "half_even"), np.rint(acc / 2).astype(np.int64))
    np.testing.assert_array_equal(shift_round(acc, 2, "half_even"), np.rint(acc / 4).astype(np.int64))
    np.testing.assert_array_equal(shift_round(acc, 1, "half_up"), np.floor(acc / 2 + 0.5).astype(np.int64))
    np.testing.assert_array_equal(shift_round(acc, -2, "half_even"), acc * 4)


def test_unknown_rounding_mode_is_refused():
    from runtime.fixed_point import shift_round

    with pytest.raises(ValueError, match="unknown rounding mode"):
        shift_round(np.array([1]), 1, "stochastic")
