"""AveragePool whose divisor varies by position (count_include_pad = 0 at padded borders, as in
light_shufflenet's 3x3 pools): the lowering widens the multiplier so the IR rounds
S * s_x / (s_y * D) as the QDQ model does except at genuine ties (docs/ir.md, avgpool).

Checked two ways: compiler.verify.check_layers against onnxruntime running the QDQ model, and a
brute-force exact-rational computation written here (fractions.Fraction over the window sums of
random integer inputs across the whole input range), which must match wherever the exact value is
more than 2^-11 output steps from a tie. Pools with one divisor keep the preset's multiplier."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import helper

from compiler.api import compile_model
from compiler.verify import check_layers
from runtime.executor import run_layer

F = onnx.TensorProto.FLOAT
SHAPE = (1, 6, 7, 9)


def _pool_model(count_include_pad: int, pads=(1, 1, 1, 1), kernel=(3, 3)):
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=list(kernel), strides=[1, 1],
                            pads=list(pads), count_include_pad=count_include_pad)
    out = (SHAPE[0], SHAPE[1], SHAPE[2] + pads[0] + pads[2] - kernel[0] + 1, SHAPE[3] + pads[1] + pads[3] - kernel[1] + 1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, list(SHAPE))],
                              [helper.make_tensor_value_info("y", F, list(out))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calib():
    return {"x": np.random.default_rng(0).uniform(-1.0, 0.8, (16,) + SHAPE[1:]).astype(np.float32)}


TARGETS = {"mmav2": ("mmav2", {}), "mmav1": ("mmav1", {}), "mmav2-16bit": ("mmav2", {"bits": 16}),
           "mmav2-m16": ("mmav2", {"multiplier_bits": 16}), "mmav2-asym": ("mmav2", {"asymmetric": True})}


@pytest.fixture(scope="module", params=list(TARGETS))
def compiled(request):
    target, options = TARGETS[request.param]
    return request.param, compile_model(_pool_model(0), target, _calib(), **options)


def test_padded_pool_matches_the_qdq_model_except_at_ties(compiled):
    name, result = compiled
    (layer,) = [la for la in result.program.layers if la.op == "avgpool"]
    assert layer.params["multiplier"].shape == SHAPE[2:]  # one multiplier per output position
    rng = np.random.default_rng(1)
    checks = []
    for _ in range(4):
        checks += check_layers(result, {"x": rng.uniform(-1.0, 0.8, SHAPE).astype(np.float32)})
    assert checks and all(c.ok for c in checks), (name, checks)
    # the excused ones really are ties: within the 2^-11 bound (+ float32 noise) of x.5
    assert max(c.worst_excused_tie_distance for c in checks) <= 2.0**-11 + 1e-4


def _window_sums(q: np.ndarray, zp: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: sum of (x - zp) over each 3x3 window's in-bounds taps, and the tap count."""
    n, c, h, w = q.shape
    x = q.astype(np.int64) - zp
    sums = np.zeros((n, c, h, w), np.int64)
    counts = np.zeros((h, w), np.int64)
    for i in range(h):
        for j in range(w):
            rows = range(max(i - 1, 0), min(i + 2, h))
            cols = range(max(j - 1, 0), min(j + 2, w))
            counts[i, j] = len(rows) * len(cols)
            for r in rows:
                for s in cols:
                    sums[:, :, i, j] += x[:, :, r, s]
    return sums, counts


def test_padded_pool_equals_exact_rounding_away_from_ties(compiled):
    name, result = compiled
    program = result.program
    (layer,) = [la for la in program.layers if la.op == "avgpool"]
    info_x, info_y = program.tensors[layer.inputs[0]], program.tensors[layer.outputs[0]]
    zp_x, zp_y = int(info_x.zero_point[0]), int(info_y.zero_point[0])
    lo, hi = (int(v) for v in (np.iinfo(info_x.dtype).min, np.iinfo(info_x.dtype).max))
    ylo, yhi = np.iinfo(info_y.dtype).min, np.iinfo(info_y.dtype).max
    ratio = Fraction(float(np.float32(info_x.scale[0]))) / Fraction(float(np.float32(info_y.scale[0])))
    rng = np.random.default_rng(2)
    q = rng.integers(lo, hi + 1, (2,) + SHAPE[1:]).astype(info_x.dtype)
    q[0, 0] = hi  # constant extremes: the largest sums
    q[0, 1] = lo
    ours = run_layer(program, layer, [q])[0].astype(np.int64)
    sums, counts = _window_sums(q, zp_x)
    checked = 0
    for idx in np.ndindex(sums.shape):
        v = Fraction(int(sums[idx])) * ratio / int(counts[idx[2:]])
        frac = v - (v.numerator // v.denominator)
        if abs(frac - Fraction(1, 2)) <= Fraction(1, 2**11):
            continue  # within the stated bound of a tie: either neighbour is right
        want = min(max(zp_y + round(v), ylo), yhi)  # no tie here, so any rounding to nearest
        assert ours[idx] == want, (name, idx, float(v), ours[idx], want)
        checked += 1
    assert checked > 0.95 * sums.size


def test_multiplier_width_follows_the_documented_rule(compiled):
    name, result = compiled
    (layer,) = [la for la in result.program.layers if la.op == "avgpool"]
    y = result.program.tensors[layer.outputs[0]]
    m = layer.params["multiplier"].astype(np.int64)
    # D_max / D_min = 9 / 4: b = 21 for 8-bit outputs, 29 for 16-bit (docs/ir.md)
    bits = 29 if y.dtype.endswith("16") else 21
    assert 2 ** (bits - 1) <= m.max() < 2**bits, (name, int(m.max()))
    assert m.max() / m.min() == pytest.approx(9 / 4, rel=2.0**-18)  # corner over centre multiplier


@pytest.mark.parametrize("target,options", [("mmav2", {}), ("mmav1", {})])
def test_uniform_divisor_pool_keeps_the_preset_multiplier(target, options):
    # count_include_pad = 1: D = 9 everywhere, one multiplier (mmav2: 8 bits, scale nudged)
    result = compile_model(_pool_model(1), target, _calib(), **options)
    (layer,) = [la for la in result.program.layers if la.op == "avgpool"]
    m = layer.params["multiplier"]
    assert m.size == 1
    if target == "mmav2":
        assert 128 <= int(m[0]) <= 255
    else:
        assert 2**15 <= int(m[0]) < 2**16  # 1/9 is not a power of two: pool_multiplier_bits
    rng = np.random.default_rng(3)
    checks = check_layers(result, {"x": rng.uniform(-1.0, 0.8, SHAPE).astype(np.float32)})
    assert all(c.ok for c in checks), checks
