"""quantize_constant against an element-by-element computation in Python floats, and the QDQ
node order (insert_qdq._topological) against a brute-force lexicographic topological sort."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from passes.insert_qdq import _topological
from passes.qparams import DTYPE_RANGES, QParams, quantize_constant


def reference(values: np.ndarray, qp: QParams) -> np.ndarray:
    """saturate(round_half_even(v / s) + zp), one element at a time: Python's float division is
    IEEE double division and round() rounds half to even."""
    lo, hi = DTYPE_RANGES[qp.dtype]
    out = np.empty(values.shape, dtype=qp.dtype)
    for idx in np.ndindex(values.shape):
        c = idx[qp.axis] if qp.per_channel else 0
        q = round(float(values[idx]) / float(qp.scale[c])) + int(qp.zero_point[c])
        out[idx] = min(max(q, lo), hi)
    return out


CASES = [  # (shape, per-channel axis or None, dtype): shapes below, at and above the 32768-element block
    ((4, 3, 3, 3), 0, "int8"),
    ((6, 5), 1, "int8"),
    ((5, 6), None, "uint8"),
    ((70000,), None, "int32"),  # 1-D: several blocks of rows
    ((3, 40000), 0, "int16"),  # rows longer than a block: one row per block
    ((40000, 2), 1, "uint16"),
    ((7,), 0, "int32"),  # a bias, per channel
]


@pytest.mark.parametrize("shape,axis,dtype", CASES)
def test_quantize_constant_matches_element_by_element(shape, axis, dtype):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    lo, hi = DTYPE_RANGES[dtype]
    channels = shape[axis] if axis is not None else 1
    scale = (np.abs(rng.standard_normal(channels)) * 0.02 + 1e-3).astype(np.float32)
    zero_point = rng.integers(lo, min(hi, lo + 8), size=channels) if lo == 0 else rng.integers(-3, 4, size=channels)
    qp = QParams(scale, zero_point, dtype, axis=axis if channels > 1 else None)
    values = (rng.standard_normal(shape) * 0.02 * (hi - lo) / 100).astype(np.float32)
    values.flat[:6] = [0.5 * scale[0], -0.5 * scale[0], 1.5 * scale[0], 2.5 * scale[0], 1e9, -1e9]  # ties, saturation
    original = values.copy()
    got = quantize_constant(values, qp)
    assert got.dtype == np.dtype(dtype) and got.shape == values.shape
    np.testing.assert_array_equal(got, reference(values, qp))
    np.testing.assert_array_equal(values, original)  # the input is not written


def test_quantize_constant_of_a_scalar_has_one_element():
    qp = QParams(np.float32(0.5), 0, "int32")
    got = quantize_constant(np.array(1.25, np.float32), qp)
    assert got.shape == (1,) and got.tolist() == [2]  # 2.5 rounds half to even


def brute_force_order(nodes):
    """Lexicographic topological order by position: each time, the first node (in list order)
    whose inputs are all produced by already placed nodes or by nothing in the list."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    placed, order = set(), []
    while len(order) < len(nodes):
        for i, n in enumerate(nodes):
            if i not in placed and all(produced_by.get(x) in placed or x not in produced_by for x in n.input if x):
                placed.add(i)
                order.append(i)
                break
        else:
            raise AssertionError("cycle")
    return order


@pytest.mark.parametrize("seed", range(6))
def test_topological_order_is_the_lexicographic_one(seed):
    rng = np.random.default_rng(seed)
    count = 40
    nodes = []
    for i in range(count):  # a random DAG: node i reads outputs of earlier nodes (and graph inputs)
        reads = [f"t{j}" for j in rng.choice(i, size=min(i, int(rng.integers(0, 4))), replace=False)] if i else []
        nodes.append(helper.make_node("Sum", reads + ["x"], [f"t{i}"], name=f"n{i}"))
    shuffled = [nodes[i] for i in rng.permutation(count)]
    got = _topological(shuffled)
    assert [n.name for n in got] == [shuffled[i].name for i in brute_force_order(shuffled)]


def test_topological_order_reports_a_cycle():
    nodes = [helper.make_node("Neg", ["b"], ["a"], name="first"), helper.make_node("Neg", ["a"], ["b"], name="second")]
    with pytest.raises(ValueError, match="cycle"):
        _topological(nodes)
