"""NormalizeGemm, FoldPadIntoConv and the exporter forms (canonicalize_forms): structure, and numbers in onnxruntime before vs after
(float32 with optimizations off; the rewrites reorder no sums in the conv, and alpha/beta folding
changes one float32 rounding per weight, so rtol/atol 1e-5)."""
from __future__ import annotations

import numpy as np
import pytest
from graphs import assert_same_outputs, init, make_model, node, ops, rand, run
from onnx import TensorProto, helper

from passes.canonicalize import FoldPadIntoConv, NormalizeGemm
from passes.canonicalize_forms import (
    MatMulAddToGemm,
    PReluSlopePerChannel,
    SimplifyCasts,
    SumToAdd,
)
from passes.constant_folding import FoldConstants
from passes.graph import get_attr


def pad_conv_model(pads, value=0.0, mode="constant", conv_pads=(0, 0, 0, 0)):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"], name="pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", strides=[2, 2], pads=list(conv_pads))]
    inits = [init("pads", np.array(pads, np.int64)), init("value", np.array(value, np.float32)),
             init("w", rand(rng, 4, 3, 3, 3))]
    out_hw = (8 + pads[2] + pads[6] + conv_pads[0] + conv_pads[2] - 3) // 2 + 1
    out_ww = (8 + pads[3] + pads[7] + conv_pads[1] + conv_pads[3] - 3) // 2 + 1
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, out_hw, out_ww])], inits)
    return model, {"x": rand(rng, 1, 3, 8, 8)}


def test_zero_pad_folds_into_the_conv_pads():
    model, feeds = pad_conv_model([0, 0, 0, 0, 0, 0, 1, 1], conv_pads=(1, 0, 0, 0))
    result = FoldPadIntoConv()(model)
    assert result.modified and ops(result.model) == ["Conv"]
    assert list(get_attr(node(result.model, "conv"), "pads")) == [1, 0, 1, 1]
    assert_same_outputs(model, result.model, feeds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, reason", [
    ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 0.5}, "pad value is not 0"),
    ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"}, "mode is not constant"),
    ({"pads": [0, 1, 1, 1, 0, 0, 1, 1]}, "batch or channel"),
])
def test_pads_that_do_not_mean_zero_padding_stay(kwargs, reason):
    model, _ = pad_conv_model(**kwargs)
    result = FoldPadIntoConv()(model)
    assert not result.modified and "Pad" in ops(result.model)
    assert any(reason in c for c in result.changes)


def test_gemm_alpha_beta_and_bias_shape_are_normalized():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=1)]
    model = make_model(nodes, [("x", [2, 6])], [("y", [2, 4])], [init("w", rand(rng, 4, 6)), init("c", rand(rng, 1, 4))])
    result = NormalizeGemm()(model)
    fc = node(result.model, "fc")
    assert result.modified and get_attr(fc, "alpha") == 1.0 and get_attr(fc, "beta") == 1.0
    c = next(i for i in result.model.graph.initializer if i.name == fc.input[2])
    assert list(c.dims) == [4]
    assert_same_outputs(model, result.model, {"x": rand(rng, 2, 6)}, rtol=1e-5, atol=1e-5)
    assert not NormalizeGemm()(result.model).modified


# --------------------------------------------------------------------- exporter forms (issue 4)


def test_cast_to_the_same_type_is_removed_and_exact_cast_chains_are_bypassed():
    nodes = [helper.make_node("Cast", ["x"], ["a"], name="same", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["a"], ["b"], name="widen", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["b"], ["y"], name="back", to=TensorProto.FLOAT)]
    model = make_model(nodes, [("x", [2, 3])], [("y", [2, 3])])
    result = SimplifyCasts()(model)
    assert result.modified
    assert node(result.model, "back").input[0] == "x"  # float -> double is exact: read x directly
    assert "same" not in [n.name for n in result.model.graph.node]
    assert_same_outputs(model, result.model, {"x": rand(np.random.default_rng(1), 2, 3)}, rtol=0, atol=0)


def test_a_lossy_cast_chain_stays():
    nodes = [helper.make_node("Cast", ["x"], ["i"], name="to_int", to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    model = make_model(nodes, [("x", [4])], [("y", [4])])
    result = SimplifyCasts()(model)
    assert not result.modified and ops(result.model) == ["Cast", "Cast"]
    x = np.array([1.7, -2.5, 0.2, 3.9], np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], np.trunc(x))


def test_matmul_plus_constant_becomes_gemm():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])], [init("w", rand(rng, 5, 4)), init("b", rand(rng, 1, 4))])
    result = MatMulAddToGemm()(model)
    assert result.modified and ops(result.model) == ["Gemm"]
    gemm = node(result.model, "mm")
    assert gemm.output[0] == "y"
    assert_same_outputs(model, result.model, {"x": rand(rng, 3, 5)}, rtol=1e-5, atol=1e-6)


def test_matmul_add_on_a_3d_input_is_not_a_gemm():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    model = make_model(nodes, [("x", [2, 3, 5])], [("y", [2, 3, 4])], [init("w", rand(rng, 5, 4)), init("b", rand(rng, 4))])
    result = MatMulAddToGemm()(model)
    assert not result.modified and ops(result.model) == ["MatMul", "Add"]
    assert any("must both be 2-D" in c for c in result.changes)


def test_sum_becomes_a_chain_of_adds():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Sum", ["a", "b", "c"], ["y"], name="sum")]
    model = make_model(nodes, [("a", [2, 3]), ("b", [2, 3]), ("c", [3])], [("y", [2, 3])])
    result = SumToAdd()(model)
    assert result.modified and ops(result.model) == ["Add", "Add"]
    assert node(result.model, "sum").op_type == "Add"  # the last Add keeps the node's name
    feeds = {"a": rand(rng, 2, 3), "b": rand(rng, 2, 3), "c": rand(rng, 3)}
    assert_same_outputs(model, result.model, feeds, rtol=0, atol=0)


def test_old_per_channel_prelu_slope_is_reshaped():
    rng = np.random.default_rng(5)
    slope = rand(rng, 3)
    nodes = [helper.make_node("PRelu", ["x", "s"], ["y"], name="prelu")]
    model = make_model(nodes, [("x", [2, 3, 4, 5])], [("y", [2, 3, 4, 5])], [init("s", slope)], opset=13)
    result = PReluSlopePerChannel()(model)
    assert result.modified
    x = rand(rng, 2, 3, 4, 5)
    expected = np.where(x >= 0, x, x * slope.reshape(1, 3, 1, 1))  # PyTorch's per-channel PReLU
    np.testing.assert_allclose(run(result.model, {"x": x})[0], expected, rtol=1e-6, atol=0)
    valid = make_model(nodes, [("x", [2, 3, 4, 3])], [("y", [2, 3, 4, 3])], [init("s", slope)], opset=13)
    assert not PReluSlopePerChannel()(valid).modified  # a slope that broadcasts keeps its meaning


def test_pytorch_flatten_shape_chain_folds_to_a_constant_reshape():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as torch.flatten exports at opset 13."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = [init("zero", np.array(0, np.int64)), init("axes", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 12])], inits, opset=13)
    result = FoldConstants()(model)
    assert ops(result.model) == ["Reshape"]
    target = next(i for i in result.model.graph.initializer if i.name == "target")
    np.testing.assert_array_equal(np.frombuffer(target.raw_data, np.int64), [2, -1])
