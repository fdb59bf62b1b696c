"""runtime.float_ops against onnxruntime (the reference, written by others): one single-node
model per case, random inputs, every ONNX input fed as a graph input. Tolerance: float outputs
rtol 1e-5 / atol 1e-6 (both sides compute in float32 or better; transcendental functions differ
by a few float32 ulps); integer and boolean outputs exactly."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtime.errors import ProgramError
from runtime.fixed_point import dequantize, quantize
from runtime.float_ops import FLOAT_OPS, evaluate, run_float_layer
from runtime.ir import Layer, TensorInfo

R = np.random.default_rng(0)


def f(*shape, lo=-3.0, hi=3.0):
    return R.uniform(lo, hi, shape).astype(np.float32)


def i64(*values):
    return np.array(values, np.int64)


X4 = f(2, 3, 5, 6)
POS = f(2, 3, 4, lo=0.1, hi=4.0)

# (id, op, inputs (None = absent), attrs, opset)
CASES = [
    ("relu", "Relu", [f(3, 4)], {}, 17),
    ("sigmoid", "Sigmoid", [f(3, 4)], {}, 17),
    ("tanh", "Tanh", [f(3, 4)], {}, 17),
    ("exp", "Exp", [f(3, 4)], {}, 17),
    ("log", "Log", [POS], {}, 17),
    ("sqrt", "Sqrt", [POS], {}, 17),
    ("erf", "Erf", [f(3, 4)], {}, 17),
    ("abs", "Abs", [f(3, 4)], {}, 17),
    ("neg", "Neg", [f(3, 4)], {}, 17),
    ("floor", "Floor", [f(3, 4)], {}, 17),
    ("ceil", "Ceil", [f(3, 4)], {}, 17),
    ("reciprocal", "Reciprocal", [POS], {}, 17),
    ("not", "Not", [f(3, 4) > 0], {}, 17),
    ("leakyrelu", "LeakyRelu", [f(3, 4)], {"alpha": 0.2}, 17),
    ("elu", "Elu", [f(3, 4)], {"alpha": 0.7}, 17),
    ("selu", "Selu", [f(3, 4)], {}, 17),
    ("hardsigmoid", "HardSigmoid", [f(3, 4)], {"alpha": 0.25, "beta": 0.4}, 17),
    ("hardswish", "HardSwish", [f(3, 8, lo=-5, hi=5)], {}, 17),
    ("softplus", "Softplus", [f(3, 4)], {}, 17),
    ("softsign", "Softsign", [f(3, 4)], {}, 17),
    ("gelu", "Gelu", [f(3, 4)], {}, 20),
    ("gelu_tanh", "Gelu", [f(3, 4)], {"approximate": "tanh"}, 20),
    ("identity", "Identity", [f(3, 4)], {}, 17),
    ("dropout", "Dropout", [f(3, 4)], {}, 17),
    ("prelu", "PRelu", [X4, f(3, 1, 1)], {}, 17),
    ("add", "Add", [X4, f(6)], {}, 17),
    ("sub", "Sub", [X4, f(1, 3, 1, 1)], {}, 17),
    ("mul", "Mul", [X4, f(2, 1, 5, 1)], {}, 17),
    ("div", "Div", [X4, f(6, lo=0.5, hi=2)], {}, 17),
    ("pow", "Pow", [POS, f(4, lo=-2, hi=2)], {}, 17),
    ("equal", "Equal", [i64(1, 2, 3, 4), i64(1, 0, 3, 0)], {}, 17),
    ("less", "Less", [f(3, 4), f(3, 4)], {}, 17),
    ("greater", "Greater", [f(3, 4), f(4)], {}, 17),
    ("and", "And", [f(3, 4) > 0, f(3, 4) > 0], {}, 17),
    ("or", "Or", [f(3, 4) > 0, f(3, 4) > 0], {}, 17),
    ("where", "Where", [f(3, 4) > 0, f(3, 4), f(4)], {}, 17),
    ("max", "Max", [f(3, 4), f(4), f(3, 1)], {}, 17),
    ("min", "Min", [f(3, 4), f(3, 4)], {}, 17),
    ("sum", "Sum", [f(3, 4), f(3, 4), f(4)], {}, 17),
    ("mean", "Mean", [f(3, 4), f(3, 4)], {}, 17),
    ("clip", "Clip", [f(3, 4), np.array(-1.0, np.float32), np.array(0.5, np.float32)], {}, 17),
    ("clip_min_only", "Clip", [f(3, 4), np.array(-1.0, np.float32)], {}, 17),
    ("cast_int", "Cast", [f(3, 4)], {"to": TensorProto.INT64}, 17),
    ("cast_float", "Cast", [i64(1, -2, 3)], {"to": TensorProto.FLOAT}, 17),
    ("reducemean", "ReduceMean", [X4], {"axes": [2, 3], "keepdims": 1}, 17),
    ("reducemean_in", "ReduceMean", [X4, i64(1)], {"keepdims": 0}, 18),
    ("reducesum", "ReduceSum", [X4, i64(-1)], {"keepdims": 0}, 17),
    ("reducesum_all", "ReduceSum", [X4], {}, 17),
    ("reducemax", "ReduceMax", [X4], {"axes": [1]}, 17),
    ("reducemin", "ReduceMin", [X4], {"axes": [0, 2], "keepdims": 0}, 17),
    ("reducel2", "ReduceL2", [X4], {"axes": [3]}, 17),
    ("argmax", "ArgMax", [X4], {"axis": 1}, 17),
    ("argmax_last", "ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1, "select_last_index": 1,
                                                                               "keepdims": 0}, 17),
    ("argmin", "ArgMin", [X4], {"axis": -1, "keepdims": 0}, 17),
    ("softmax", "Softmax", [X4], {}, 17),
    ("softmax_axis1", "Softmax", [X4], {"axis": 1}, 17),
    ("logsoftmax", "LogSoftmax", [X4], {"axis": 2}, 17),
    ("topk", "TopK", [f(3, 7), i64(3)], {"axis": 1}, 17),
    ("topk_smallest", "TopK", [f(5, 4), i64(2)], {"axis": 0, "largest": 0}, 17),
    ("matmul", "MatMul", [f(2, 3, 4, 5), f(5, 6)], {}, 17),
    ("matmul_batched", "MatMul", [f(2, 3, 4, 5), f(3, 5, 2)], {}, 17),
    ("gemm", "Gemm", [f(3, 5), f(4, 5), f(4)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 17),
    ("gemm_transa", "Gemm", [f(5, 3), f(5, 4)], {"transA": 1}, 17),
    ("conv", "Conv", [f(2, 4, 9, 8), f(6, 2, 3, 3), f(6)], {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1]}, 17),
    ("conv_same_lower", "Conv", [f(1, 3, 8, 8), f(4, 3, 3, 3)], {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, 17),
    ("conv1d", "Conv", [f(2, 4, 10), f(5, 4, 3), f(5)], {"pads": [1, 2], "strides": [2]}, 17),
    ("conv3d", "Conv", [f(1, 2, 4, 5, 4), f(3, 2, 2, 3, 2)], {"pads": [0, 1, 0, 1, 1, 0]}, 17),
    ("convtranspose", "ConvTranspose", [f(1, 4, 5, 6), f(4, 3, 3, 3), f(3)], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                              "output_padding": [1, 1]}, 17),
    ("convtranspose_group", "ConvTranspose", [f(2, 4, 3, 4), f(4, 2, 2, 3)], {"group": 2, "strides": [2, 3],
                                                                              "dilations": [2, 1]}, 17),
    ("convtranspose_outshape", "ConvTranspose", [f(1, 2, 4, 4), f(2, 2, 3, 3)], {"strides": [2, 2],
                                                                                 "output_shape": [9, 9]}, 17),
    ("maxpool", "MaxPool", [X4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 17),
    ("maxpool_ceil", "MaxPool", [X4], {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1}, 17),
    ("maxpool_dilated_1d", "MaxPool", [f(1, 2, 20)], {"kernel_shape": [3], "dilations": [2], "pads": [1, 1]}, 17),
    ("avgpool", "AveragePool", [X4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 17),
    ("avgpool_incl_ceil", "AveragePool", [X4], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 0],
                                                "count_include_pad": 1, "ceil_mode": 1}, 17),
    ("avgpool3d", "AveragePool", [f(1, 2, 4, 5, 4)], {"kernel_shape": [2, 2, 2], "strides": [2, 1, 2]}, 17),
    ("globalavgpool", "GlobalAveragePool", [X4], {}, 17),
    ("globalmaxpool", "GlobalMaxPool", [X4], {}, 17),
    ("batchnorm", "BatchNormalization", [X4, f(3), f(3), f(3), f(3, lo=0.5, hi=2)], {"epsilon": 1e-3}, 15),
    ("instancenorm", "InstanceNormalization", [X4, f(3), f(3)], {"epsilon": 1e-4}, 17),
    ("lrn", "LRN", [f(2, 6, 4, 4)], {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 2.0}, 17),
    ("shape", "Shape", [X4], {}, 17),
    ("shape_slice", "Shape", [X4], {"start": 1, "end": -1}, 17),
    ("reshape", "Reshape", [X4, i64(0, -1, 6)], {}, 17),
    ("flatten", "Flatten", [X4], {"axis": 2}, 17),
    ("squeeze", "Squeeze", [f(2, 1, 3, 1), i64(1)], {}, 17),
    ("squeeze_all", "Squeeze", [f(2, 1, 3, 1)], {}, 17),
    ("unsqueeze", "Unsqueeze", [f(2, 3), i64(0, -1)], {}, 17),
    ("transpose", "Transpose", [X4], {"perm": [0, 2, 3, 1]}, 17),
    ("transpose_default", "Transpose", [f(2, 3, 4)], {}, 17),
    ("concat", "Concat", [f(2, 3, 4), f(2, 1, 4), f(2, 2, 4)], {"axis": 1}, 17),
    ("split", "Split", [f(2, 6, 4), i64(2, 4)], {"axis": 1}, 17),
    ("split_equal", "Split", [f(2, 6, 4)], {"axis": 1, "num_outputs": 3}, 18),
    ("split_uneven", "Split", [f(7, 2)], {"num_outputs": 3}, 18),
    ("slice", "Slice", [X4, i64(1, 0), i64(3, 100), i64(1, 3), i64(1, 2)], {}, 17),
    ("slice_negative", "Slice", [X4, i64(-1), i64(-1000), i64(2), i64(-2)], {}, 17),
    ("slice_default", "Slice", [f(5, 6), i64(1, -4), i64(4, -1)], {}, 17),
    ("gather", "Gather", [f(5, 4), i64(0, 4, -1)], {"axis": 0}, 17),
    ("gather_scalar", "Gather", [X4, np.array(2, np.int64)], {"axis": 3}, 17),
    ("gather_elements", "GatherElements", [f(3, 4), np.array([[0, 3], [1, 1], [2, 0]], np.int64)], {"axis": 1}, 17),
    ("expand", "Expand", [f(3, 1), i64(2, 3, 4)], {}, 17),
    ("tile", "Tile", [f(2, 3), i64(2, 3)], {}, 17),
    ("range", "Range", [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.7, np.float32)], {}, 17),
    ("range_int", "Range", [np.array(10, np.int64), np.array(2, np.int64), np.array(-3, np.int64)], {}, 17),
    ("constantofshape", "ConstantOfShape", [i64(2, 3)], {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])},
     17),
    ("pad", "Pad", [X4, i64(0, 0, 1, 2, 0, 0, 2, 0), np.array(0.5, np.float32)], {}, 17),
    ("pad_reflect", "Pad", [X4, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}, 17),
    ("pad_edge", "Pad", [X4, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}, 17),
    ("pad_negative", "Pad", [X4, i64(0, 0, -1, 2, 0, 0, 1, -2)], {}, 17),
    ("depthtospace_dcr", "DepthToSpace", [f(1, 8, 2, 3)], {"blocksize": 2}, 17),
    ("depthtospace_crd", "DepthToSpace", [f(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"}, 17),
    ("spacetodepth", "SpaceToDepth", [f(1, 2, 4, 6)], {"blocksize": 2}, 17),
    ("nonzero", "NonZero", [np.array([[1, 0, 2], [0, 3, 0]], np.float32)], {}, 17),
    ("resize_nearest_scales", "Resize", [f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)],
     {"mode": "nearest"}, 17),
    ("resize_nearest_asym_floor", "Resize", [f(1, 2, 3, 4), None, np.array([1, 1, 2.5, 1.5], np.float32)],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 17),
    ("resize_nearest_sizes_ceil", "Resize", [f(1, 2, 5, 4), None, None, i64(1, 2, 3, 7)],
     {"mode": "nearest", "nearest_mode": "ceil"}, 17),
    ("resize_linear_half_pixel", "Resize", [f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)],
     {"mode": "linear"}, 17),
    ("resize_linear_align", "Resize", [f(1, 2, 3, 4), None, None, i64(1, 2, 7, 5)],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 17),
    ("resize_linear_pytorch", "Resize", [f(1, 2, 3, 4), None, np.array([1, 1, 1.7, 0.6], np.float32)],
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 17),
    ("resize_linear_asym", "Resize", [f(1, 2, 3, 4), None, np.array([1, 1, 2, 3], np.float32)],
     {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, 17),
    ("upsample_nearest", "Upsample", [f(1, 2, 3, 4), np.array([1, 1, 2, 3], np.float32)], {"mode": "nearest"}, 9),
    ("upsample_linear", "Upsample", [f(1, 2, 3, 4), np.array([1, 1, 2, 2], np.float32)], {"mode": "linear"}, 9),
    ("cumsum", "CumSum", [f(3, 4), np.array(1, np.int64)], {}, 17),
    ("layernorm", "LayerNormalization", [f(2, 3, 8), f(8), f(8)], {"axis": -1}, 17),
]

ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
        np.dtype(np.bool_): TensorProto.BOOL}


def run_onnxruntime(op, inputs, attrs, opset, n_outputs):
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
    while names and not names[-1]:
        names.pop()
    outs = [f"out{k}" for k in range(n_outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, **attrs)], "g",
        [helper.make_tensor_value_info(n, ELEM[x.dtype], x.shape) for n, x in zip(names, inputs) if n],
        [helper.make_empty_tensor_value_info(o) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {n: x for n, x in zip(names, inputs) if n})


def _plain(attrs):
    """Attributes as the IR stores them: tensors as numpy arrays, strings as str."""
    from onnx import numpy_helper

    return {k: numpy_helper.to_array(v) if hasattr(v, "dims") else v for k, v in attrs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float_op_matches_onnxruntime(case):
    _, op, inputs, attrs, opset = case
    ours = evaluate(op, inputs, _plain(attrs))
    n_out = 1 if op == "Dropout" else len(ours)
    expected = run_onnxruntime(op, inputs, attrs, opset, n_out)
    for got, want in zip(ours, expected):
        assert got.shape == want.shape, (got.shape, want.shape)
        if want.dtype.kind == "f":
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_every_op_named_in_the_issue_has_a_float_implementation():
    named = ["Resize", "Upsample", "ConvTranspose", "Pad", "Transpose", "Reshape", "Flatten", "Squeeze",
             "Unsqueeze", "Slice", "Split", "Concat", "Mul", "Sub", "Div", "Add", "ReduceMean", "MatMul",
             "Softmax", "DepthToSpace", "SpaceToDepth", "ArgMax", "PRelu", "LeakyRelu", "Sigmoid", "Tanh",
             "HardSigmoid", "HardSwish", "Elu", "Erf", "Exp", "Sqrt", "Pow", "Gelu", "Shape", "Gather", "Cast",
             "Expand", "Range", "Where", "Equal", "Less", "Greater", "ReduceSum", "ReduceMax", "ReduceMin", "TopK",
             "Conv", "Gemm", "Relu", "Clip", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
             "GlobalMaxPool", "LRN", "InstanceNormalization", "Dropout", "Identity", "Constant", "ConstantOfShape",
             "Floor", "Ceil", "Abs", "Neg", "Reciprocal", "Log", "Not", "And", "Or", "Min", "Max", "Sum", "Mean",
             "Tile", "NonZero"]
    assert [op for op in named if op not in FLOAT_OPS] == []
    tested = {c[1] for c in CASES}
    assert [op for op in named if op not in tested and op != "Constant"] == []


def test_constant_op_and_unknown_op():
    np.testing.assert_array_equal(evaluate("Constant", [], {"value_ints": [1, 2]})[0], i64(1, 2))
    with pytest.raises(ProgramError, match="no float implementation of ONNX op 'Loop'"):
        evaluate("Loop", [f(2)], {})
    with pytest.raises(ProgramError, match="Resize mode 'cubic' is not supported"):
        evaluate("Resize", [f(1, 1, 2, 2), None, np.array([1, 1, 2, 2], np.float32)], {"mode": "cubic"})


# Split in each opset form: (id, inputs, attrs, opset, number of node outputs). The equal split of
# opsets 2-17 (no sizes) takes its part count from the node's outputs, passed as n_outputs.
SPLIT_FORMS = [
    ("attr_split_op11", [f(2, 6, 4)], {"axis": 1, "split": [1, 2, 3]}, 11, 3),
    ("attr_equal_op11", [f(2, 6, 4)], {"axis": -1}, 11, 2),
    ("input_split_op13", [f(2, 6, 4), i64(4, 2)], {"axis": 1}, 13, 2),
    ("input_equal_op13", [f(2, 6, 4)], {"axis": 1}, 13, 3),
    ("input_equal_default_axis_op13", [f(4, 3)], {}, 13, 4),
    ("input_split_op18", [f(5, 2), i64(2, 3)], {}, 18, 2),
    ("num_outputs_even_op18", [f(2, 6, 4)], {"axis": 1, "num_outputs": 2}, 18, 2),
    ("num_outputs_uneven_op18", [f(3, 10)], {"axis": 1, "num_outputs": 4}, 18, 4),
]


@pytest.mark.parametrize("case", SPLIT_FORMS, ids=[c[0] for c in SPLIT_FORMS])
def test_split_every_opset_form_matches_onnxruntime(case):
    _, inputs, attrs, opset, n_out = case
    ours = evaluate("Split", inputs, attrs, n_outputs=n_out)
    expected = run_onnxruntime("Split", inputs, attrs, opset, n_out)
    assert len(ours) == len(expected) == n_out
    for got, want in zip(ours, expected):
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_array_equal(got, want)


def test_split_equal_without_output_count_or_uneven_is_a_clear_error():
    with pytest.raises(ProgramError, match="number of outputs"):
        evaluate("Split", [f(2, 6)], {"axis": 1})
    with pytest.raises(ProgramError, match="cannot be split evenly into 4"):
        evaluate("Split", [f(2, 6)], {"axis": 1}, n_outputs=4)
    with pytest.raises(ProgramError, match="do not add up"):
        evaluate("Split", [f(2, 6), i64(2, 2)], {"axis": 1})


def test_float_split_layer_takes_its_part_count_from_its_outputs():
    """A float Split layer at opset 13 with no sizes (the KeyError 'num_outputs' case) runs through
    run_float_layer: three int8 outputs, each the quantized third of the dequantized input."""
    s = np.array(0.05, np.float32)
    z = np.array(0, np.int64)
    q = R.integers(-128, 128, (1, 6, 2), dtype=np.int64).astype(np.int8)
    info_in = TensorInfo("x", "int8", (1, 6, 2), s, z)
    outs = [TensorInfo(f"y{k}", "int8", (1, 2, 2), s, z) for k in range(3)]
    layer = Layer("split", "Split", ["x"], [o.name for o in outs], kind="float",
                  attrs={"input_slots": ["t"], "onnx_attrs": {"axis": 1}})
    got = run_float_layer(layer, [q], [info_in], outs)
    x = dequantize(q, s, z, None)
    want = run_onnxruntime("Split", [x], {"axis": 1}, 13, 3)
    assert len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, quantize(w, s, z, "int8", None))
