"""Scale-selection policies against direct computations of the rules in compiler/scales.py."""
from __future__ import annotations

import numpy as np
import pytest

from compiler.calibration import TensorRange
from compiler.scales import (
    activation_qparams,
    bias_qparams,
    round_up_power_of_two,
    weight_qparams,
)
from passes.qparams import quantize_constant
from passes.targets import get_target

MMAV2, MMAV1 = get_target("mmav2"), get_target("mmav1")


def test_non_negative_activation_is_unsigned_and_others_symmetric():
    relu = activation_qparams(TensorRange(0.0, 5.1, "minmax"), MMAV2, "t")
    assert relu.dtype == "uint8" and relu.zero_point[0] == 0 and relu.scale[0] == np.float32(5.1 / 255)
    signed = activation_qparams(TensorRange(-2.0, 0.5, "minmax"), MMAV2, "t")
    assert signed.dtype == "int8" and signed.scale[0] == np.float32(2.0 / 127)


def test_power_of_two_target_rounds_scales_up():
    qp = activation_qparams(TensorRange(-3.0, 1.0, "minmax"), MMAV1, "t")
    assert qp.scale[0] == 2.0**-5  # 3/127 = 0.0236 -> 2^-5 = 0.03125, the next power of two up
    assert np.array_equal(round_up_power_of_two(np.array([0.25, 0.26])), [0.25, 0.5])


def test_per_channel_weight_scales_and_zero_channel_floor():
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[0] = 1.27
    w[1, 0] = -0.5
    qp = weight_qparams(w, 0, None, 0.1, MMAV2)
    assert qp.axis == 0 and qp.scale.shape == (3,)
    # float32 storage plus at most one ulp of upward nudge: 2 ulps
    np.testing.assert_allclose(qp.scale[:2], [1.27 / 127, 0.5 / 127], rtol=2.5e-7)
    amax = np.float64(np.float32(1.27)), 0.5
    assert np.all(qp.scale[:2].astype(np.float64) >= np.array(amax) / 127)  # never clips
    assert qp.scale[2] == 1.0  # all-zero channel, no bias: any scale encodes it; never 0
    q = quantize_constant(w, qp)
    assert q[0].max() == 127 and q[1, 0, 0, 0] == -127 and not q[2].any()


def test_weight_scale_rises_until_the_bias_fits():
    w = np.full((1, 4, 1, 1), 1e-6, np.float32)
    bias = np.array([1000.0], np.float32)
    qp = weight_qparams(w, 0, bias, 1e-3, MMAV2)
    b_qp = bias_qparams(np.float32(1e-3), qp, MMAV2)
    q_b = quantize_constant(bias, b_qp)
    assert abs(int(q_b[0])) <= 2**30  # room left in int32 for the accumulated products
    assert abs(float(q_b[0]) * float(b_qp.scale[0]) - 1000.0) <= 1000.0 * 1e-6


def test_per_tensor_weights_on_mmav1():
    w = np.array([[1.0, -0.2], [0.1, 0.3]], np.float32)
    qp = weight_qparams(w, 0, None, 0.5, MMAV1)
    assert qp.scale.shape == (1,) and qp.axis is None and qp.scale[0] == 2.0**-6  # 1/127 -> 2^-6


@pytest.mark.parametrize("target", [MMAV2, MMAV1])
def test_weights_never_saturate(target):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    qp = weight_qparams(w, 0, None, 0.05, target)
    q = quantize_constant(w, qp).astype(np.int64)
    assert np.abs(q).max() <= 127


@pytest.mark.parametrize("axis, shape", [(0, (6, 4, 3, 3)), (1, (5, 6)), (1, (3, 6, 2, 2)), (0, (6,))])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weight_scale_per_channel_along_any_axis(axis, shape, dtype):
    """s_c = float32(max_i |w[c-slice]| / 127), one ulp up if float32 rounding lands below it:
    computed here with Python floats, channel by channel."""
    rng = np.random.default_rng(len(shape) + axis)
    w = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2, shape)).astype(dtype)
    qp = weight_qparams(w, axis, None, 0.05, MMAV2)
    assert qp.axis == axis and qp.scale.shape == (shape[axis],)
    for c in range(shape[axis]):
        amax = max(abs(float(v)) for v in np.take(w, c, axis=axis).reshape(-1))
        expected = np.float32(amax / 127)
        if float(expected) < amax / 127:
            expected = np.nextafter(expected, np.float32(np.inf))
        assert qp.scale[c] == expected, c
