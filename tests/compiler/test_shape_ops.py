"""Data-movement ops compiled end to end (compiler/lower_shape_ops.py), both targets.

Each case is a one-node (or small) float model built with onnx.helper, compiled on a few random
calibration samples. Checks:
- per layer, the IR equals onnxruntime on the emitted QDQ model (compiler.verify.check_layers);
  the pass-through ops have no mismatch at all; Resize linear and ConvTranspose only excused
  one-step mismatches at genuine rounding ties;
- end to end against the float model, elementwise, with a bound derived from the scales (stated
  per case): a pass-through op commutes with quantization, so its only error is the input's
  rounding, s/2; linear interpolation is a convex combination, so s/2 from the input plus s/2 from
  the final rounding plus the fixed-point weights' 2 * 2^-23 * 255 steps; ConvTranspose adds, per
  output, s_y/2 + (s_x/2) sum|w| + (s_w/2) sum|x| + s_x s_w / 2 over its taps (a bound on all taps).
The samples are the calibration samples, so nothing saturates.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.api import compile_model
from compiler.lower_shape_ops import LINEAR_FRACTION_BITS
from compiler.onnx_runner import make_session
from compiler.verify import check_layers
from passes.graph import GraphIndex
from passes.layer_plan import _unsupported_reason

TARGETS = ["mmav2", "mmav1"]
F32_SLACK = 1e-6  # float32 rounding of a dequantized value of magnitude ~4


def make_model(nodes, inits: dict, in_shape, output: str = "y", opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def samples(shape, n: int = 4, seed: int = 0, positive: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(0.0, 1.0, size=[n] + list(shape[1:])).astype(np.float32)
    return {"x": np.abs(x) if positive else x}


def compile_and_check(model, target, feeds, exact: bool, **options):
    """Compile, check every layer against the QDQ model, return (result, IR output, float output)."""
    result = compile_model(model, target, feeds, **options)
    checks = check_layers(result, {"x": feeds["x"][:1]})
    assert checks and all(c.ok for c in checks), checks
    if exact:
        assert all(c.mismatches == 0 for c in checks), checks
    out = result.program.outputs[0]
    # one sample at a time: a transpose that moves the batch axis runs at its declared batch only
    ours = np.concatenate([result.program.run({"x": feeds["x"][i:i + 1]})[out] for i in range(len(feeds["x"]))])
    session = make_session(model)
    expected = np.concatenate([session.run([out], {"x": feeds["x"][i:i + 1]})[0] for i in range(len(feeds["x"]))])
    assert ours.shape == expected.shape
    return result, ours, expected


def input_scale(result) -> float:
    return float(result.program.tensors[result.program.inputs[0]].scale[0])


PASS_THROUGH = {
    "transpose": ([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {}, [1, 3, 4, 5]),
    "transpose_default_perm": ([helper.make_node("Transpose", ["x"], ["y"])], {}, [1, 3, 4, 5]),
    "slice_neg_step": ([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])],
                       {"s": np.array([1, -1], np.int64), "e": np.array([100, -100], np.int64),
                        "a": np.array([2, 3], np.int64), "t": np.array([2, -2], np.int64)}, [1, 3, 6, 7]),
    "slice_channels": ([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])],
                       {"s": np.array([1], np.int64), "e": np.array([3], np.int64), "a": np.array([1], np.int64)},
                       [1, 4, 3, 3]),
    "squeeze": ([helper.make_node("Squeeze", ["x", "a"], ["y"])], {"a": np.array([2], np.int64)}, [1, 3, 1, 5]),
    "unsqueeze": ([helper.make_node("Unsqueeze", ["x", "a"], ["y"])], {"a": np.array([2], np.int64)}, [1, 3, 5]),
    "pad_reflect": ([helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
                    {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, [1, 2, 4, 4]),
    "pad_crop_reflect": ([helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
                         {"p": np.array([0, -1, 2, -1, 0, 0, -1, 2], np.int64)}, [1, 3, 4, 4]),
    "pad_edge": ([helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")],
                 {"p": np.array([0, 1, 1, 0, 0, 0, 0, 3], np.int64)}, [1, 2, 4, 4]),
    "depth_to_space_dcr": ([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="DCR")], {}, [1, 8, 3, 3]),
    "depth_to_space_crd": ([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD")], {}, [1, 8, 3, 3]),
    "space_to_depth": ([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)], {}, [1, 2, 4, 6]),
    "global_max_pool": ([helper.make_node("GlobalMaxPool", ["x"], ["y"])], {}, [1, 3, 4, 5]),
    "max_pool_ceil": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)],
                      {}, [1, 2, 6, 7]),
    "max_pool_ceil_pads": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1,
                                             pads=[1, 0, 0, 1])], {}, [1, 2, 5, 6]),
    "resize_nearest_scales": ([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest")],
                              {"sc": np.array([1, 1, 2, 3], np.float32)}, [1, 2, 3, 4]),
    "resize_nearest_sizes": ([helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="nearest",
                                               coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
                             {"sz": np.array([1, 2, 7, 3], np.int64)}, [1, 2, 3, 5]),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(PASS_THROUGH))
def test_pass_through_op_is_exact_and_within_half_a_step(case, target):
    nodes, inits, shape = PASS_THROUGH[case]
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model(nodes, inits, shape), target, feeds, exact=True)
    s = input_scale(result)
    assert result.program.tensors[result.program.outputs[0]].scale[0] == np.float32(s)  # inherited
    np.testing.assert_allclose(ours, expected, rtol=0, atol=s / 2 + F32_SLACK)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("axis", [1, 2, 3])
def test_concat_on_any_axis(axis, target):
    """x and a slice of x along the concat axis: the output's calibrated range is x's, so every
    input is already in the output's encoding and the concat is exact."""
    shape = [1, 3, 4, 5]
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["u"]),
             helper.make_node("Concat", ["x", "u"], ["y"], axis=axis)]
    inits = {"s": np.array([0], np.int64), "e": np.array([2], np.int64), "a": np.array([axis], np.int64)}
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model(nodes, inits, shape), target, feeds, exact=True)
    assert result.program.layers[-1].attrs["axis"] == axis
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) / 2 + F32_SLACK)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("axis", [2, 3])
def test_concat_requantizes_inputs_of_other_scales_on_spatial_axes(axis, target):
    """x and a 1x1 ConvTranspose of x (3x larger values, so its own scale) concatenated on H or
    W: one input is requantized to the output's encoding; per layer against the QDQ model."""
    shape = [1, 3, 4, 5]
    w = (3.0 * np.eye(3, dtype=np.float32)).reshape(3, 3, 1, 1)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["a"]),
             helper.make_node("Concat", ["x", "a"], ["y"], axis=axis)]
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model(nodes, {"w": w}, shape), target, feeds, exact=False)
    concat = result.program.layers[-1]
    assert concat.op == "concat" and concat.attrs["axis"] == axis
    s_y = float(result.program.tensors["y"].scale[0])
    assert s_y > 2 * input_scale(result)  # x really is requantized
    # x: s_x/2 then one requant rounding (s_y/2); a: the conv_transpose's own error (exact weights 3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) * 1.5 + s_y + F32_SLACK)


@pytest.mark.parametrize("target", TARGETS)
def test_split_gives_one_slice_layer_per_output(target):
    shape = [1, 5, 3, 3]
    nodes = [helper.make_node("Split", ["x", "sp"], ["a", "b"], axis=1),
             helper.make_node("Concat", ["b", "a"], ["y"], axis=1)]
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model(nodes, {"sp": np.array([2, 3], np.int64)}, shape),
                                               target, feeds, exact=True)
    slices = [layer for layer in result.program.layers if layer.op == "slice"]
    assert [layer.name for layer in slices] == ["Split_0:0", "Split_0:1"]
    assert [layer.attrs["starts"] for layer in slices] == [[0], [2]]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) / 2 + F32_SLACK)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("value", [0.0, 0.7, -1.3])
def test_constant_pad_fills_the_quantized_value(value, target):
    shape = [1, 2, 4, 4]
    nodes = [helper.make_node("Pad", ["x", "p", "v"], ["y"], mode="constant")]
    inits = {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "v": np.array(value, np.float32)}
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model(nodes, inits, shape), target, feeds, exact=True)
    info = result.program.tensors["x"]
    fill = int(result.program.layers[0].params["fill"][0])
    q = np.clip(np.rint(np.float32(value) / info.scale[0]) + info.zero_point[0], -128, 127)
    assert fill == q and (value != 0.0 or fill == info.zero_point[0])  # zero pads with the zero point
    np.testing.assert_allclose(ours, expected, rtol=0, atol=float(info.scale[0]) / 2 + F32_SLACK)


COORDINATE_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


@pytest.mark.parametrize("nearest", NEAREST_MODES)
@pytest.mark.parametrize("coord", COORDINATE_MODES)
def test_resize_nearest_tables_match_onnxruntime(coord, nearest):
    """Up- and downsampling by non-integer factors on the two axes; exact against the QDQ model."""
    shape = [1, 2, 5, 7]
    node = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest",
                            coordinate_transformation_mode=coord, nearest_mode=nearest)
    model = make_model([node], {"sc": np.array([1, 1, 1.7, 0.6], np.float32)}, shape)
    compile_and_check(model, "mmav2", samples(shape), exact=True)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("coord", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize("form", ["scales2", "sizes"])
def test_resize_linear_within_the_stated_bound(coord, form, target):
    shape = [1, 2, 5, 4]
    if form == "scales2":
        inputs, inits = ["x", "", "sc"], {"sc": np.array([1, 1, 2, 2], np.float32)}
    else:
        inputs, inits = ["x", "", "", "sz"], {"sz": np.array([1, 2, 7, 9], np.int64)}
    node = helper.make_node("Resize", inputs, ["y"], mode="linear", coordinate_transformation_mode=coord)
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model([node], inits, shape), target, feeds, exact=False)
    layer = result.program.layers[0]
    assert layer.op == "resize_linear" and layer.attrs["fraction_bits"] == LINEAR_FRACTION_BITS
    s = input_scale(result)
    bound = s * (1.0 + 2 * 2.0 ** -(LINEAR_FRACTION_BITS + 1) * 255) + F32_SLACK
    np.testing.assert_allclose(ours, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset18_axes_attribute(mode):
    shape = [1, 2, 4, 5]
    node = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode=mode, axes=[2, 3])
    model = make_model([node], {"sc": np.array([2, 1.5], np.float32)}, shape, opset=18)
    result, ours, expected = compile_and_check(model, "mmav2", samples(shape), exact=mode == "nearest")
    assert result.program.layers[0].attrs["axes"] == [2, 3] and ours.shape == (4, 2, 8, 7)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) * 1.0001 + F32_SLACK)


def test_identity_linear_resize_is_a_copy():
    shape = [1, 2, 4, 5]
    node = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")
    model = make_model([node], {"sc": np.ones(4, np.float32)}, shape)
    result, ours, expected = compile_and_check(model, "mmav1", samples(shape), exact=True)
    assert result.program.layers[0].op == "resize_nearest" and result.program.layers[0].attrs["axes"] == []
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) / 2 + F32_SLACK)


def test_resize_linear_downsampling_and_one_axis():
    shape = [1, 2, 8, 5]
    node = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")
    model = make_model([node], {"sc": np.array([1, 1, 0.5, 1], np.float32)}, shape)
    result, ours, expected = compile_and_check(model, "mmav2", samples(shape), exact=False)
    assert result.program.layers[0].attrs["axes"] == [2]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=input_scale(result) * 1.0001 + F32_SLACK)


LEGACY = {
    "upsample7_nearest": (helper.make_node("Upsample", ["x"], ["y"], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0]),
                          {}, 7, "resize_nearest"),
    "upsample9_linear": (helper.make_node("Upsample", ["x", "sc"], ["y"], mode="linear"),
                         {"sc": np.array([1, 1, 2, 2], np.float32)}, 9, "resize_linear"),
    "resize10_nearest_up": (helper.make_node("Resize", ["x", "sc"], ["y"], mode="nearest"),
                            {"sc": np.array([1, 1, 2, 1.5], np.float32)}, 10, "resize_nearest"),
    "resize10_nearest_down": (helper.make_node("Resize", ["x", "sc"], ["y"], mode="nearest"),
                              {"sc": np.array([1, 1, 0.6, 0.7], np.float32)}, 10, "resize_nearest"),
    "resize10_linear": (helper.make_node("Resize", ["x", "sc"], ["y"], mode="linear"),
                        {"sc": np.array([1, 1, 2, 1.5], np.float32)}, 10, "resize_linear"),
}


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_old_opset_upsample_and_resize_keep_their_meaning(case):
    """The loader upgrades opsets < 13 with onnx's converter, which drops Resize-10/Upsample's
    asymmetric coordinates (and old nearest rule); the float model here runs at its own opset in
    onnxruntime, so a changed meaning shows as errors of many steps."""
    node, inits, opset, op = LEGACY[case]
    shape = [1, 2, 5, 6]
    model = make_model([node], inits, shape, opset=opset)
    result, ours, expected = compile_and_check(model, "mmav2", samples(shape), exact=op == "resize_nearest")
    assert [layer.op for layer in result.program.layers] == [op]
    bound = input_scale(result) * (0.5 if op == "resize_nearest" else 1.0001) + F32_SLACK
    np.testing.assert_allclose(ours, expected, rtol=0, atol=bound)


CONV_TRANSPOSE = {
    "stride2_bias": ({"strides": [2, 2]}, (3, 4, 2, 2), True),
    "pads_output_padding": ({"strides": [2, 2], "pads": [1, 1, 0, 0], "output_padding": [1, 1]}, (3, 4, 3, 3), True),
    "dilation": ({"strides": [1, 1], "dilations": [2, 2], "pads": [1, 1, 1, 1]}, (3, 2, 3, 3), False),
    "grouped": ({"strides": [2, 2], "group": 3}, (3, 2, 3, 3), True),
    "depthwise": ({"strides": [2, 2], "group": 3, "pads": [1, 1, 1, 1]}, (3, 1, 4, 4), False),
    "output_shape": ({"strides": [2, 2], "output_shape": [8, 10]}, (3, 2, 3, 3), False),
    "same_upper": ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (3, 2, 3, 3), True),
    "same_lower": ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (3, 2, 3, 3), False),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CONV_TRANSPOSE))
def test_conv_transpose_matches_qdq_and_float(case, target):
    attrs, w_shape, with_bias = CONV_TRANSPOSE[case]
    rng = np.random.default_rng(5)
    shape = [1, 3, 4, 5]
    w = rng.normal(0, 0.3, w_shape).astype(np.float32)
    inits = {"w": w}
    if with_bias:
        inits["b"] = rng.normal(0, 0.2, w_shape[1] * attrs.get("group", 1)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x"] + list(inits), ["y"], **attrs)
    feeds = samples(shape)
    result, ours, expected = compile_and_check(make_model([node], inits, shape), target, feeds, exact=False)
    layer = result.program.layers[0]
    assert layer.op == "conv_transpose"
    s_x, s_y = input_scale(result), float(result.program.tensors["y"].scale[0])
    s_w = float(result.qparams["w"].scale.max())
    taps = w_shape[0] // attrs.get("group", 1) * w_shape[2] * w_shape[3]  # all taps of one output channel
    w_l1 = np.abs(w).reshape(w_shape[0], -1).sum(axis=0).max() * w_shape[1]  # >= max_o sum |w[:, o]|
    bound = s_y / 2 + s_x / 2 * w_l1 + s_w / 2 * np.abs(feeds["x"]).max() * taps + s_x * s_w / 2 + F32_SLACK
    np.testing.assert_allclose(ours, expected, rtol=0, atol=bound)
    assert np.abs(ours - expected).max() < 0.25 * np.abs(expected).max()  # the bound is not vacuous here


def test_conv_transpose_with_relu_fuses_a_clamp():
    shape = [1, 3, 4, 4]
    w = np.random.default_rng(6).normal(0, 0.3, (3, 2, 2, 2)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["y"])]
    result, ours, _expected = compile_and_check(make_model(nodes, {"w": w}, shape), "mmav2", samples(shape), exact=False)
    assert len(result.program.layers) == 1 and result.program.tensors["y"].dtype == "uint8"
    assert ours.min() >= 0


def _reason(node, inits: dict) -> str | None:
    graph = helper.make_graph([node], "g", [], [], [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return _unsupported_reason(node, GraphIndex(graph))


@pytest.mark.parametrize("node,inits,expected", [
    (helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic"), {"sc": np.ones(4, np.float32)}, "cubic"),
    (helper.make_node("Resize", ["x", "r", "sc"], ["y"], coordinate_transformation_mode="tf_crop_and_resize"),
     {"r": np.zeros(8, np.float32), "sc": np.ones(4, np.float32)}, "tf_crop_and_resize"),
    (helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear"),
     {"sc": np.array([1, 2, 2, 2], np.float32)}, "more than 2 axes"),
    (helper.make_node("Resize", ["x", "", "sc"], ["y"]), {"sc": np.array([2, 1, 2, 2], np.float32)}, "batch"),
    (helper.make_node("Resize", ["x", "", "sc"], ["y"], antialias=1), {"sc": np.ones(4, np.float32)}, "antialias"),
    (helper.make_node("Resize", ["x", "", "sc"], ["y"], axes=[0, 2]), {"sc": np.array([2, 2], np.float32)}, "batch"),
    (helper.make_node("Resize", ["x", "", "sc"], ["y"], axes=[-1]), {"sc": np.array([2], np.float32)}, "from the end"),
    (helper.make_node("Resize", ["x", "", "dyn"], ["y"]), {}, "not a constant"),
    (helper.make_node("Pad", ["x", "p"], ["y"]), {}, "not a constant"),
    (helper.make_node("Slice", ["x", "s", "e"], ["y"]), {"s": np.array([0], np.int64)}, "not a constant"),
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"]), {}, "weight is not a constant"),
])
def test_unsupported_forms_are_left_to_float_with_a_reason(node, inits, expected):
    reason = _reason(node, inits)
    assert reason is not None and expected in reason, reason


def test_supported_forms_have_no_reason():
    ones = {"sc": np.array([1, 1, 2, 2], np.float32)}
    assert _reason(helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear"), ones) is None
    assert _reason(helper.make_node("Pad", ["x", "p"], ["y"], mode="edge"), {"p": np.zeros(8, np.int64)}) is None
    assert _reason(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), {"w": np.ones((2, 2, 2, 2), np.float32)}) is None


OPTION_CASES = {
    "pad_zero": ([helper.make_node("Pad", ["x", "p", "v"], ["y"])],
                 {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "v": np.array(0.0, np.float32)}, True),
    "resize_linear": ([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")],
                      {"sc": np.array([1, 1, 2, 2], np.float32)}, False),
    "conv_transpose": ([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1])],
                       {"w": np.random.default_rng(7).normal(0, 0.3, (3, 4, 3, 3)).astype(np.float32),
                        "b": np.linspace(-0.3, 0.5, 4).astype(np.float32)}, False),
}
OPTIONS = {"asymmetric": {"asymmetric": True}, "16bit": {"bits": 16}, "8bit_multiplier": {"multiplier_bits": 8}}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_asymmetric_16bit_and_narrow_multipliers(case, option):
    """Shifted inputs (x + 0.8: asymmetric encodings get a non-zero zero point), 16-bit and an
    8-bit multiplier: per layer against the QDQ model, and a zero pad fills the zero point."""
    nodes, inits, exact = OPTION_CASES[case]
    shape = [1, 3, 4, 5]
    feeds = samples(shape)
    feeds["x"] = feeds["x"] + np.float32(0.8)
    result, ours, expected = compile_and_check(make_model(nodes, inits, shape), "mmav2", feeds, exact, **OPTIONS[option])
    x_info = result.program.tensors["x"]
    if option == "asymmetric":
        assert x_info.zero_point[0] != 0
    if case == "pad_zero":
        assert result.program.layers[0].params["fill"][0] == x_info.zero_point[0]
    if case != "conv_transpose":
        s = float(x_info.scale[0])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=s * 1.0001 + F32_SLACK)
    else:
        rel = np.abs(ours - expected).max() / np.abs(expected).max()
        # measured: 8-bit ~1%; 16-bit ~0.1% (its multiplier is 8 bits wide, the QDQ model's error too)
        assert rel < (0.05 if option != "16bit" else 5e-3), rel


# Output SQNR (dB) vs float of tools.architectures.unet_small at 64x64, 16 calibration and 8
# evaluation samples (python -m tools.accuracy_report, see the issue note): mmav2 20.6,
# mmav1 16.0. Here 8 + 4 samples; the floors are a few dB below, far above a broken layer.
UNET_MIN_SQNR_DB = {"mmav2": 16.0, "mmav1": 12.0}


@pytest.mark.parametrize("target", TARGETS)
def test_unet_small_compiles_for_both_targets(target):
    from compiler.evaluate import evaluate
    from tools.architectures import unet_small
    from tools.model_zoo import calibration_samples

    model = unet_small()
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvTranspose", "Resize", "Concat"} <= ops
    result = compile_model(model, target, calibration_samples(model, 8, seed=0))
    layer_ops = {layer.op for layer in result.program.layers}
    assert {"conv_transpose", "resize_linear", "concat"} <= layer_ops
    evaluation = calibration_samples(model, 4, seed=1)
    checks = check_layers(result, {"input": evaluation["input"][:1]})
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    from compiler.calibration_data import load_calibration

    ev = evaluate(result, load_calibration(evaluation, result.input_specs), batch_size=1)
    assert ev.runtime_sqnr_db > UNET_MIN_SQNR_DB[target], ev.text()
    assert abs(ev.runtime_sqnr_db - ev.qdq_sqnr_db) < 0.5, ev.text()


def test_a_chain_of_every_data_movement_op_saves_loads_and_prints(tmp_path):
    """One model through all the new IR ops: the .qir file round-trips (same integers out) and
    the text form names each op."""
    from runtime.serialize import load_program, save_program

    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["a"], strides=[2, 2]),
        helper.make_node("Pad", ["a", "p"], ["b"], mode="reflect"),
        helper.make_node("Resize", ["b", "", "sc"], ["c"], mode="linear"),
        helper.make_node("Resize", ["c", "", "sc"], ["d"], mode="nearest"),
        helper.make_node("SpaceToDepth", ["d"], ["e"], blocksize=2),
        helper.make_node("DepthToSpace", ["e"], ["f"], blocksize=2, mode="CRD"),
        helper.make_node("Slice", ["f", "s", "t", "ax"], ["g"]),
        helper.make_node("Transpose", ["g"], ["y"], perm=[0, 1, 3, 2]),
    ]
    inits = {"w": rng.normal(0, 0.4, (2, 4, 2, 2)).astype(np.float32), "p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "sc": np.array([1, 1, 2, 2], np.float32), "s": np.array([1], np.int64), "t": np.array([-1], np.int64),
             "ax": np.array([2], np.int64)}
    shape = [1, 2, 3, 3]
    feeds = samples(shape)
    result, _, _ = compile_and_check(make_model(nodes, inits, shape), "mmav1", feeds, exact=False)
    ops = [layer.op for layer in result.program.layers]
    assert ops == ["conv_transpose", "pad", "resize_linear", "resize_nearest", "space_to_depth", "depth_to_space",
                   "slice", "transpose"]
    path = tmp_path / "chain.qir"
    save_program(result.program, path)
    loaded = load_program(path)
    np.testing.assert_array_equal(loaded.run(feeds, raw=True)["y"], result.program.run(feeds, raw=True)["y"])
    text = loaded.to_text()
    assert all(f": {op} (integer)" in text for op in ops), text
