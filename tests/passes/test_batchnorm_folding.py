"""FoldBatchNorm: folding into Conv / ConvTranspose / Gemm / MatMul, lone BatchNormalization as a
depthwise 1x1 Conv or a diagonal Gemm, old opsets, and the errors.

Numbers: onnxruntime (optimizations off) on the model before vs after, float32, random inputs,
statistics far from 0/1 and negative gammas (graphs.bn_stats). Tolerance rtol 1e-5, atol 1e-5:
before, onnxruntime computes the layer then (x - mean) / sqrt(var + eps) * gamma + beta in float32;
after, it computes the layer with W * s rounded once to float32 (s from float64). Both sides are a
few float32 roundings (2^-24 ~ 6e-8 relative each) of sums of at most ~60 products; with |s| up
to ~11 (var down to 0.05) outputs reach ~100, and the measured differences stay below ~2e-7
relative (2e-5 absolute at 130). 1e-5 relative leaves headroom without hiding a wrong channel
or axis, which is off by O(1).
"""
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import (
    assert_same_outputs,
    bn_inits,
    bn_node,
    bn_stats,
    check,
    init,
    make_model,
    node,
    ops,
    rand,
    run,
    vi,
)
from onnx import helper, numpy_helper

from passes.batchnorm_folding import FoldBatchNorm
from passes.errors import PassError
from passes.graph import get_attr, get_meta

RTOL = ATOL = 1e-5


def fold(model):
    result = FoldBatchNorm()(model)
    check(result.model)
    assert "BatchNormalization" not in ops(result.model)
    return result


@pytest.mark.parametrize("group, bias", [(1, True), (1, False), (2, True), (6, True), (6, False)])
def test_bn_after_conv_any_group(group, bias):
    rng = np.random.default_rng(group * 10 + bias)
    cin, cout = 6, 6
    w = rand(rng, cout, cin // group, 3, 3)
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
             bn_node("bn", "c", "y")]
    inits = [init("w", w)] + ([init("b", rand(rng, cout))] if bias else []) + bn_inits(rng, "bn", cout)
    model = make_model(nodes, [("x", [2, cin, 5, 5])], [("y", [2, cout, 5, 5])], inits)
    result = fold(model)
    assert ops(result.model) == ["Conv"]
    conv = node(result.model, "conv")
    assert list(conv.output) == ["y"]  # the producer now produces the BatchNormalization's output
    assert get_attr(conv, "group") == group and len(conv.input) == 3
    assert get_meta(conv, "folded_batchnorm") == "bn"
    assert result.changes == ["folded 1 BatchNormalization (1 into Conv)"]
    # the replaced weights and the statistics are gone; the folded ones are new tensors
    assert sorted(i.name for i in result.model.graph.initializer) == sorted(conv.input[1:])
    assert conv.input[1] == "w_bn"
    assert_same_outputs(model, result.model, {"x": rand(rng, 2, cin, 5, 5)}, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_after_conv_transpose(group):
    rng = np.random.default_rng(20 + group)
    cin, cout = 4, 6
    w = rand(rng, cin, cout // group, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", group=group,
                              strides=[2, 2]),
             bn_node("bn", "c", "y")]
    inits = [init("w", w), init("b", rand(rng, cout))] + bn_inits(rng, "bn", cout)
    model = make_model(nodes, [("x", [1, cin, 4, 4])], [("y", [1, cout, 9, 9])], inits)
    result = fold(model)
    assert ops(result.model) == ["ConvTranspose"]
    assert_same_outputs(model, result.model, {"x": rand(rng, 1, cin, 4, 4)}, rtol=RTOL, atol=ATOL)


def test_conv_transpose_scaling_is_per_output_channel_not_input():
    # group = 2, C_in 4, M 6: a wrong axis would scale W[:, j] by s[j] for j < 3 only
    rng = np.random.default_rng(5)
    w = rand(rng, 4, 3, 1, 1)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", group=2), bn_node("bn", "c", "y")]
    gamma, beta, mean, var = bn_stats(rng, 6)
    inits = [init("w", w), init("bn_gamma", gamma), init("bn_beta", beta), init("bn_mean", mean), init("bn_var", var)]
    model = make_model(nodes, [("x", [1, 4, 2, 2])], [("y", [1, 6, 2, 2])], inits)
    out = fold(model).model
    new_w = next(i for i in out.graph.initializer if i.name == node(out, "deconv").input[1])
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    expected = w.astype(np.float64).copy()
    expected[:2] *= s[:3].reshape(1, 3, 1, 1)
    expected[2:] *= s[3:].reshape(1, 3, 1, 1)
    np.testing.assert_allclose(numpy_helper.to_array(new_w), expected.astype(np.float32), rtol=1e-7)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (3, 5), (1, 5)])
def test_bn_after_gemm(trans_b, bias_shape):
    rng = np.random.default_rng(30 + trans_b)
    k, n = 7, 5
    w = rand(rng, n, k) if trans_b else rand(rng, k, n)
    inputs = ["x", "w"] + (["c"] if bias_shape else [])
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             bn_node("bn", "g", "y")]
    inits = [init("w", w)] + ([init("c", rand(rng, *bias_shape))] if bias_shape else []) + bn_inits(rng, "bn", n)
    model = make_model(nodes, [("x", [3, k])], [("y", [3, n])], inits)
    result = fold(model)
    assert ops(result.model) == ["Gemm"]
    gemm = node(result.model, "gemm")
    assert get_attr(gemm, "transB") == trans_b and get_attr(gemm, "beta") == 1.0
    assert abs(get_attr(gemm, "alpha") - 0.7) < 1e-7
    assert_same_outputs(model, result.model, {"x": rand(rng, 3, k)}, rtol=RTOL, atol=ATOL)


def test_bn_after_matmul_becomes_gemm_with_bias():
    rng = np.random.default_rng(40)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), bn_node("bn", "m", "y")]
    inits = [init("w", rand(rng, 8, 4))] + bn_inits(rng, "bn", 4)
    model = make_model(nodes, [("x", [3, 8])], [("y", [3, 4])], inits)
    result = fold(model)
    assert ops(result.model) == ["Gemm"]
    gemm = node(result.model, "fc")  # keeps the MatMul's name
    assert len(gemm.input) == 3 and get_attr(gemm, "transB", 0) == 0
    assert result.changes == ["folded 1 BatchNormalization (1 into MatMul)"]
    assert_same_outputs(model, result.model, {"x": rand(rng, 3, 8)}, rtol=RTOL, atol=ATOL)


def test_bn_after_rank3_matmul_is_a_lone_bn():
    # [B, T, K] @ [K, N] -> [B, T, N]: BatchNormalization's channel is T, not the output feature
    rng = np.random.default_rng(41)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), bn_node("bn", "m", "y")]
    inits = [init("w", rand(rng, 8, 4))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [2, 3, 8])], [("y", [2, 3, 4])], inits)
    result = fold(model)
    assert ops(result.model) == ["MatMul", "Conv"]
    assert "BatchNormalization 'bn' -> depthwise 1x1 Conv: producer MatMul 'fc'" in result.changes[0]
    assert get_attr(node(result.model, "bn"), "kernel_shape") == [1]
    assert_same_outputs(model, result.model, {"x": rand(rng, 2, 3, 8)}, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_lone_bn_after_graph_input_is_depthwise_conv(rank):
    rng = np.random.default_rng(50 + rank)
    c = 5
    shape = [2, c] + [4] * (rank - 2)
    model = make_model([bn_node("bn", "x", "y", epsilon=1e-3)], [("x", shape)], [("y", shape)],
                       bn_inits(rng, "bn", c))
    result = fold(model)
    assert ops(result.model) == ["Conv"]
    conv = node(result.model, "bn")  # keeps the BatchNormalization's name
    assert get_attr(conv, "group") == c and get_attr(conv, "kernel_shape") == [1] * (rank - 2)
    assert get_meta(conv, "folded_batchnorm") == "bn"
    assert "input 'x' is a graph input or initializer" in result.changes[0]
    assert_same_outputs(model, result.model, {"x": rand(rng, *shape, scale=3.0)}, rtol=RTOL, atol=ATOL)


def test_lone_bn_rank2_after_add_is_diagonal_gemm():
    rng = np.random.default_rng(60)
    nodes = [helper.make_node("Add", ["x", "x2"], ["a"], name="add"), bn_node("bn", "a", "y")]
    model = make_model(nodes, [("x", [4, 6]), ("x2", [4, 6])], [("y", [4, 6])], bn_inits(rng, "bn", 6))
    result = fold(model)
    assert ops(result.model) == ["Add", "Gemm"]
    assert "producer Add 'add' is not one of Conv, ConvTranspose, Gemm, MatMul" in result.changes[0]
    feeds = {"x": rand(rng, 4, 6), "x2": rand(rng, 4, 6)}
    assert_same_outputs(model, result.model, feeds, rtol=RTOL, atol=ATOL)


def test_shared_conv_output_is_not_folded():
    rng = np.random.default_rng(70)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             bn_node("bn", "c", "b"),
             helper.make_node("Add", ["b", "c"], ["y"], name="add3")]
    inits = [init("w", rand(rng, 3, 3, 1, 1))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])], inits)
    result = fold(model)
    assert ops(result.model) == ["Conv", "Conv", "Add"]
    assert "producer Conv 'conv''s output is also read by 'add3'" in result.changes[0]
    assert_same_outputs(model, result.model, {"x": rand(rng, 1, 3, 4, 4)}, rtol=RTOL, atol=ATOL)


def test_conv_output_that_is_a_graph_output_is_not_folded():
    rng = np.random.default_rng(71)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    inits = [init("w", rand(rng, 3, 3, 1, 1))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4]), ("c", [1, 3, 4, 4])], inits)
    result = fold(model)
    assert ops(result.model) == ["Conv", "Conv"]
    assert "also read by 'a graph output'" in result.changes[0]
    assert_same_outputs(model, result.model, {"x": rand(rng, 1, 3, 4, 4)}, rtol=RTOL, atol=ATOL)


def test_conv_with_non_constant_weights_is_not_folded():
    rng = np.random.default_rng(72)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(nodes, [("x", [1, 3, 4, 4]), ("w", [3, 3, 1, 1])], [("y", [1, 3, 4, 4])],
                       bn_inits(rng, "bn", 3))
    result = fold(model)
    assert ops(result.model) == ["Conv", "Conv"]
    assert "has non-constant weights" in result.changes[0]
    feeds = {"x": rand(rng, 1, 3, 4, 4), "w": rand(rng, 3, 3, 1, 1)}
    assert_same_outputs(model, result.model, feeds, rtol=RTOL, atol=ATOL)


def test_chained_bns_both_fold_and_shared_weights_are_not_edited():
    rng = np.random.default_rng(80)
    w = rand(rng, 4, 4, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn1", "c", "b1"), bn_node("bn2", "b1", "y1"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="conv_shared_w", pads=[1, 1, 1, 1])]
    inits = [init("w", w)] + bn_inits(rng, "bn1", 4) + bn_inits(rng, "bn2", 4)
    model = make_model(nodes, [("x", [1, 4, 5, 5])], [("y1", [1, 4, 5, 5]), ("y2", [1, 4, 5, 5])], inits)
    result = fold(model)
    assert ops(result.model) == ["Conv", "Conv"]
    assert node(result.model, "conv_shared_w").input[1] == "w"
    assert result.changes == ["folded 2 BatchNormalization (2 into Conv)"]
    assert_same_outputs(model, result.model, {"x": rand(rng, 1, 4, 5, 5)}, rtol=RTOL, atol=ATOL)


def test_opset7_bn_with_spatial_attribute():
    rng = np.random.default_rng(90)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             bn_node("bn", "c", "y", spatial=1, epsilon=1e-4),
             ]
    inits = [init("w", rand(rng, 4, 3, 3, 3)), init("b", rand(rng, 4))] + bn_inits(rng, "bn", 4)
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 4, 4])], inits, opset=7)
    check(model)
    result = fold(model)
    assert ops(result.model) == ["Conv"]
    graph_inputs = {i.name for i in result.model.graph.input}
    assert {i.name for i in result.model.graph.initializer} <= graph_inputs  # IR 3 rule kept
    assert_same_outputs(model, result.model, {"x": rand(rng, 1, 3, 6, 6)}, rtol=RTOL, atol=ATOL)


def test_opset7_lone_bn_rank2_uses_gemm_that_opset_runs():
    rng = np.random.default_rng(91)
    model = make_model([bn_node("bn", "x", "y", spatial=1)], [("x", [3, 4])], [("y", [3, 4])],
                       bn_inits(rng, "bn", 4), opset=7)
    result = fold(model)
    assert ops(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model, {"x": rand(rng, 3, 4)}, rtol=RTOL, atol=ATOL)


def test_opset6_bn_with_is_test_and_consumed_inputs():
    # onnxruntime has no BatchNormalization-6 kernel: the reference is the formula in numpy
    rng = np.random.default_rng(92)
    gamma, beta, mean, var = bn_stats(rng, 3)
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["y"], name="bn",
                              is_test=1, spatial=1, epsilon=1e-5, consumed_inputs=[0, 0, 0, 1, 1])]
    inits = [init("g", gamma), init("be", beta), init("m", mean), init("v", var)]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [2, 3, 4, 4])], inits, opset=6)
    result = fold(model)
    assert ops(result.model) == ["Conv"]
    x = rand(rng, 2, 3, 4, 4, scale=2.0)
    c = (1, 3, 1, 1)
    expected = (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + 1e-5) * gamma.reshape(c) + beta.reshape(c)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], expected, rtol=RTOL, atol=ATOL)


def test_spatial_zero_with_per_channel_stats_folds_and_per_position_stats_fail():
    rng = np.random.default_rng(93)
    per_channel = make_model([bn_node("bn", "x", "y", spatial=0)], [("x", [1, 3, 2, 2])], [("y", [1, 3, 2, 2])],
                             bn_inits(rng, "bn", 3), opset=7)
    assert ops(fold(per_channel).model) == ["Conv"]
    per_position = make_model([bn_node("bn", "x", "y", spatial=0)], [("x", [1, 3, 2, 2])], [("y", [1, 3, 2, 2])],
                              bn_inits(rng, "bn", 3, shape=(3, 2, 2)), opset=7)
    with pytest.raises(PassError, match="node 'bn' \\(BatchNormalization\\): spatial = 0 with per-position"):
        FoldBatchNorm()(per_position)


def test_training_outputs_are_an_error():
    rng = np.random.default_rng(94)
    bn = helper.make_node("BatchNormalization", ["x", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
                          ["y", "running_mean", "running_var"], name="bn", training_mode=1)
    model = make_model([bn], [("x", [2, 3, 2, 2])], [("y", [2, 3, 2, 2])], bn_inits(rng, "bn", 3), opset=15)
    with pytest.raises(PassError) as err:
        FoldBatchNorm()(model)
    message = str(err.value)
    assert "pass 'fold_batchnorm', node 'bn' (BatchNormalization)" in message
    assert "training-mode outputs ['running_mean', 'running_var']" in message


def test_training_mode_attribute_is_an_error():
    rng = np.random.default_rng(95)
    model = make_model([bn_node("bn", "x", "y", training_mode=1)], [("x", [2, 3, 2, 2])], [("y", [2, 3, 2, 2])],
                       bn_inits(rng, "bn", 3), opset=15)
    with pytest.raises(PassError, match="training_mode = 1"):
        FoldBatchNorm()(model)


def test_non_constant_statistics_are_an_error():
    rng = np.random.default_rng(96)
    inits = [i for i in bn_inits(rng, "bn", 3) if i.name != "bn_var"]
    model = make_model([bn_node("bn", "x", "y")], [("x", [2, 3, 2, 2]), ("bn_var", [3])], [("y", [2, 3, 2, 2])],
                       inits)
    with pytest.raises(PassError, match="var 'bn_var' is not a constant"):
        FoldBatchNorm()(model)


def test_unknown_rank_lone_bn_is_an_error():
    rng = np.random.default_rng(97)
    model = make_model([bn_node("bn", "x", "y")], [vi("x", None)], [vi("y", None)], bn_inits(rng, "bn", 3))
    with pytest.raises(PassError, match="rank of its input 'x' is unknown"):
        FoldBatchNorm()(model)


def test_no_bn_means_no_change():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2])], [("y", [2])])
    result = FoldBatchNorm()(model)
    assert not result.modified and result.changes == []


def test_ensures_no_batchnorm_left():
    model = make_model([bn_node("bn", "x", "y")], [("x", [1, 3, 2, 2])], [("y", [1, 3, 2, 2])],
                       bn_inits(np.random.default_rng(0), "bn", 3))
    with pytest.raises(PassError, match="BatchNormalization left after folding"):
        FoldBatchNorm().ensures(model)


def test_negative_variance_is_an_error():
    rng = np.random.default_rng(98)
    gamma, beta, mean, var = bn_stats(rng, 3)
    var[1] = -1.0
    inits = [init("bn_gamma", gamma), init("bn_beta", beta), init("bn_mean", mean), init("bn_var", var)]
    model = make_model([bn_node("bn", "x", "y")], [("x", [1, 3, 2, 2])], [("y", [1, 3, 2, 2])], inits)
    with pytest.raises(PassError, match="var \\+ epsilon must be positive"):
        FoldBatchNorm()(model)


PYTORCH_CONVERTED = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
PYTORCH_BN_CASES = sorted(p.name for p in PYTORCH_CONVERTED.glob("test_BatchNorm*_eval"))


@pytest.mark.skipif(not PYTORCH_BN_CASES, reason="onnx package ships no pytorch-converted test data")
@pytest.mark.parametrize("case", PYTORCH_BN_CASES)
def test_pytorch_converted_opset6_bn_matches_reference_output(case):
    # the onnx package's own conformance data: opset-6 BatchNormalization exported by PyTorch, with
    # reference outputs (onnxruntime cannot run BatchNormalization-6, but it runs the replacement).
    # The reference was computed in float32 by PyTorch: a few ulps of outputs of size ~1-10.
    folder = PYTORCH_CONVERTED / case
    model = onnx.load(str(folder / "model.onnx"))
    result = fold(model)
    assert ops(result.model) == ["Conv"]
    x = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    got = run(result.model, {result.model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["conv", "gemm", "gemm_transb", "matmul"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_folded_weights_are_the_float64_product_rounded_once(kind, dtype):
    # Exactly float(float64(W) * s) and float(float64(b) * s + t) in the weight's type, s and t
    # in float64: computed here element by element in Python floats (IEEE doubles).
    rng = np.random.default_rng(60)
    c, k = 5, 4
    shapes = {"conv": (c, k, 3, 3), "gemm": (k, c), "gemm_transb": (c, k), "matmul": (k, c)}
    w = (rng.standard_normal(shapes[kind]) * 10.0 ** rng.uniform(-3, 3, shapes[kind])).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    gamma, beta, mean, var = bn_stats(rng, c)
    if kind == "conv":
        layer = helper.make_node("Conv", ["x", "w", "b"], ["p"], name="layer")
        x_shape, y_shape = [1, k, 3, 3], [1, c, 1, 1]
    elif kind == "matmul":
        layer = helper.make_node("MatMul", ["x", "w"], ["p"], name="layer")
        x_shape, y_shape = [2, k], [2, c]
    else:
        layer = helper.make_node("Gemm", ["x", "w", "b"], ["p"], name="layer", transB=int(kind == "gemm_transb"))
        x_shape, y_shape = [2, k], [2, c]
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    stats = [init(f"bn_{n}", v.astype(dtype)) for n, v in zip(("gamma", "beta", "mean", "var"), (gamma, beta, mean, var))]
    model = make_model([layer, bn_node("bn", "p", "y")], [vi("x", x_shape, elem)], [vi("y", y_shape, elem)],
                       [init("w", w), init("b", b)] + stats)
    out = FoldBatchNorm()(model).model
    folded = node(out, "layer")
    values = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    new_w, new_b = values[folded.input[1]], values[folded.input[2]]
    g64, b64, m64, v64 = (float_list(v.astype(dtype)) for v in (gamma, beta, mean, var))
    s = [g / math.sqrt(v + 1e-5) for g, v in zip(g64, v64)]
    t = [bb - m * ss for bb, m, ss in zip(b64, m64, s)]
    channel_axis = 1 if kind in ("gemm", "matmul") else 0
    expected_w = np.empty(w.shape, dtype)
    for idx in np.ndindex(w.shape):
        expected_w[idx] = float(w[idx]) * s[idx[channel_axis]]
    bias = float_list(b) if kind != "matmul" else [0.0] * c
    expected_b = np.array([bb * ss + tt if kind != "matmul" else tt for bb, ss, tt in zip(bias, s, t)], dtype)
    assert new_w.dtype == dtype and new_b.dtype == dtype
    np.testing.assert_array_equal(new_w, expected_w)
    np.testing.assert_array_equal(new_b, expected_b)


def float_list(values: np.ndarray) -> list[float]:
    return [float(v) for v in values.reshape(-1)]


def test_one_run_folds_chains_through_replaced_and_converted_nodes():
    # bn_in reads the graph input (replaced by a depthwise Conv) and bn_after folds into that
    # Conv; mm's MatMul becomes a Gemm and the next BatchNormalization folds into the Gemm too;
    # bn_a and bn_b share the Conv output (both replaced); the Conv keeps its output.
    rng = np.random.default_rng(81)
    nodes = [bn_node("bn_in", "x", "xn"), bn_node("bn_after", "xn", "xa"),
             helper.make_node("Conv", ["xa", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn_a", "c", "ya"), bn_node("bn_b", "c", "yb"),
             helper.make_node("MatMul", ["v", "m"], ["mm"], name="fc"), bn_node("bn_m1", "mm", "m1"),
             bn_node("bn_m2", "m1", "m2")]
    inits = ([init("w", rand(rng, 4, 3, 3, 3)), init("m", rand(rng, 6, 5))] + bn_inits(rng, "bn_in", 3)
             + bn_inits(rng, "bn_after", 3) + bn_inits(rng, "bn_a", 4) + bn_inits(rng, "bn_b", 4)
             + bn_inits(rng, "bn_m1", 5) + bn_inits(rng, "bn_m2", 5))
    model = make_model(nodes, [("x", [1, 3, 5, 5]), ("v", [2, 6])],
                       [("ya", [1, 4, 5, 5]), ("yb", [1, 4, 5, 5]), ("m2", [2, 5])], inits)
    result = fold(model)
    out = result.model
    assert ops(out) == ["Conv", "Conv", "Conv", "Conv", "Gemm"]
    assert [get_meta(n, "folded_batchnorm") for n in out.graph.node] == ["bn_after", None, "bn_a", "bn_b", "bn_m2"]
    assert result.changes[0] == "folded 3 BatchNormalization (1 into Conv, 1 into Gemm, 1 into MatMul)"
    assert [c.split(":")[0] for c in result.changes[1:]] == [
        "BatchNormalization 'bn_in' -> depthwise 1x1 Conv", "BatchNormalization 'bn_a' -> depthwise 1x1 Conv",
        "BatchNormalization 'bn_b' -> depthwise 1x1 Conv"]
    read = {i for n in out.graph.node for i in n.input} - {o for n in out.graph.node for o in n.output}
    assert {i.name for i in out.graph.initializer} == read - {"x", "v"}  # nothing stale is left
    feeds = {"x": rand(rng, 1, 3, 5, 5), "v": rand(rng, 2, 6)}
    assert_same_outputs(model, out, feeds, rtol=RTOL, atol=ATOL)
