"""QDQ insertion for the target options: 16-bit Q/DQ (opset conversion to 21, run by onnxruntime),
an int16 bias carried as int32, and a consumer's own DequantizeLinear at its effective scale."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from compiler.calibration import TensorRange
from compiler.scales import choose_qparams
from passes.graph import opset_version
from passes.insert_qdq import InsertQDQ, quantized_name
from passes.layer_plan import plan_layers
from passes.pipeline import run_default_pipeline
from passes.qparams import QParams
from passes.targets import get_target


def residual_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array(np.float32([0.1, -0.2, 0.05, 0.3]), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


RANGES = {"x": (-1.0, 1.0), "c": (-2.0, 2.5), "y": (-3.0, 3.1)}


def qdq(target):
    model = run_default_pipeline(residual_model()).model
    plan = plan_layers(model)
    table = choose_qparams(model, plan, {k: TensorRange(lo, hi, "fixed") for k, (lo, hi) in RANGES.items()}, target)
    return InsertQDQ(plan, table)(model), table


def run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_16bit_qdq_is_converted_to_opset_21_and_runs():
    result, table = qdq(get_target("mmav2", 16))
    assert opset_version(result.model) == 21 and any("opset 13 -> 21" in c for c in result.changes)
    assert table["y"].dtype == "int16" and table["w"].dtype == "int16"
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 5, 5)).astype(np.float32)
    y = run(result.model, x)
    float_y = run(residual_model(), x)
    assert np.abs(y - float_y).max() < 1e-3  # 16-bit steps of ~1e-4 on [-3, 3]


def test_int16_bias_is_an_int32_initializer_with_the_same_values():
    result, table = qdq(get_target("mmav1"))
    assert table["b"].dtype == "int16"
    init = next(i for i in result.model.graph.initializer if i.name == quantized_name("b"))
    assert init.data_type == onnx.TensorProto.INT32
    expected = np.rint(np.float32([0.1, -0.2, 0.05, 0.3]).astype(np.float64) / table["b"].scale.astype(np.float64))
    np.testing.assert_array_equal(numpy_helper.to_array(init), expected.astype(np.int32))
    assert opset_version(result.model) == 13


def test_add_reads_its_narrower_input_at_the_effective_scale():
    result, table = qdq(get_target("mmav2"))
    keys = list(table.consumer_scales)
    assert len(keys) == 1 and keys[0][0] == "add"
    tensor = keys[0][1]
    scale = table.consumer_scales[keys[0]]
    # the Add node reads the dedicated DQ, whose scale is the effective one; other readers do not
    add = next(n for n in result.model.graph.node if n.name == "add")
    reader = f"{tensor}_for_add"
    assert reader in add.input
    dq = next(n for n in result.model.graph.node if n.output[0] == reader)
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == quantized_name(tensor)
    init = next(i for i in result.model.graph.initializer if i.name == dq.input[1])
    assert numpy_helper.to_array(init) == scale and scale != table[tensor].scale[0]
    # docs/ir.md: the narrower input's gain error is <= 2^-(b+1) * s_wide / s_narrow (shared k)
    other = next(t for t in ("c", "x") if t != tensor)
    wide_over_narrow = float(table[other].scale[0]) / float(table[tensor].scale[0])
    assert wide_over_narrow > 1
    assert abs(float(scale) / float(table[tensor].scale[0]) - 1) <= 2.0**-9 * wide_over_narrow * (1 + 1e-6)
    # and the reference: Add's wider input is exact, its output scale nudged for it
    ratio = np.float64(table[other].scale[0]) / np.float64(table["y"].scale[0])
    frac, _ = np.frexp(ratio)
    assert abs(frac * 256 - np.rint(frac * 256)) < 1e-4  # an exact 8-bit m / 2^k
    assert isinstance(table["y"], QParams) and table["y"].source.endswith("+nudged")
