"""Lowering's arithmetic helpers against direct computations, and the compile-time overflow check."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from compiler.errors import CompileError
from compiler.lowering import (
    _window_counts,
    choose_multipliers,
    clamp_bounds,
    explicit_pads,
    shared_shift_multipliers,
    static_value_info,
)
from passes.graph import GraphIndex
from passes.qparams import QParams


def test_shared_shift_multipliers_with_bits():
    m, k = shared_shift_multipliers(np.array([0.75, 0.1]), 15)
    assert m[0] < 2**15 and abs(m[0] / 2**k - 0.75) <= 0.75 * 2**-15
    assert abs(m[1] / 2**k - 0.1) <= 2.0 ** -(k + 1)


def test_shared_shift_multipliers_shift_only_are_exact_powers_of_two():
    m, k = shared_shift_multipliers(np.array([2.0, 0.25]), 0)
    assert list(m) == [8, 1] and k == 2
    with pytest.raises(ValueError, match="power-of-2"):
        shared_shift_multipliers(np.array([0.3, 0.25]), 0)
    with pytest.raises(ValueError, match="power-of-2"):
        choose_multipliers(np.array([0.3]), 0)


def test_clamp_bounds_follow_quantizelinear_on_the_clip_limits():
    out = QParams(np.float32(0.05), 10, "uint8")
    graph = helper.make_graph([], "g", [], [], [onnx.numpy_helper.from_array(np.float32(-0.2), "lo"),
                                                 onnx.numpy_helper.from_array(np.float32(6.0), "hi")])
    clip = helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")
    lo, hi = clamp_bounds(clip, GraphIndex(graph), out)
    assert lo == 10 + int(np.rint(np.float32(-0.2) / np.float32(0.05)))  # -4 steps below zp
    assert hi == min(255, 10 + int(np.rint(np.float32(6.0) / np.float32(0.05))))
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    assert clamp_bounds(relu, GraphIndex(graph), out) == (10, 255)


def test_same_upper_and_lower_pads():
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    assert explicit_pads(node, (7, 8), [3, 3], [2, 2], [1, 1]) == [1, 0, 1, 1]
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER")
    assert explicit_pads(node, (7, 8), [3, 3], [2, 2], [1, 1]) == [1, 1, 1, 0]


def test_window_counts_with_and_without_pads():
    # 5 inputs, kernel 3, stride 2, pads 1/1 -> 3 outputs covering [-1..1], [1..3], [3..5]
    assert list(_window_counts(5, 3, 3, 2, 1, 1, 1, include_pad=False)) == [2, 3, 2]
    assert list(_window_counts(5, 3, 3, 2, 1, 1, 1, include_pad=True)) == [3, 3, 3]


def test_accumulator_overflow_is_refused_at_compile_time():
    from compiler.lowering import Lowering
    from passes.layer_plan import LayerGroup

    lowering = Lowering.__new__(Lowering)
    lowering.ctx = type("Ctx", (), {"fail": lambda self, g, msg: CompileError(f"node 'c' (Conv): {msg}")})()
    group = LayerGroup(helper.make_node("Conv", ["x", "w"], ["y"], name="c"), None, ["x"], "y")
    params = {"multiplier": np.array([2**31 - 1], np.int64), "shift": np.array([0], np.int8)}
    with pytest.raises(CompileError, match="overflows int64"):
        lowering._check_accumulator(group, np.array([2.0**33]), params)
    assert lowering._check_accumulator(group, np.array([1000.0]), params) == "int32"


def test_static_value_info_matches_inference_on_the_whole_model():
    """Inference on the light view (weights as typed inputs) gives the whole model's shapes and
    types, and no entries for the weights themselves."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "target"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "target"),
             numpy_helper.from_array(rng.standard_normal((10, 8 * 6 * 6)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shapes, types = static_value_info(model)
    whole = onnx.shape_inference.infer_shapes(model).graph
    expected = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
                for v in list(whole.input) + list(whole.value_info) + list(whole.output)}
    assert shapes == expected == {"x": (1, 3, 8, 8), "c": (1, 8, 6, 6), "flat": (1, 288), "y": (1, 10)}
    assert types == dict.fromkeys(expected, onnx.TensorProto.FLOAT)
