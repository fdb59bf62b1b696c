"""Float fallback: nodes without an integer lowering, or denied by the user, become float layers
(dequantize -> ONNX op in float -> quantize), and the offload report says which and why.

The reference is onnxruntime running the QDQ model (graph optimizations off): per layer, a float
layer fed the QDQ model's integer inputs must give the QDQ model's integers, except one step
where the value QuantizeLinear rounds lies within 1e-3 steps of a tie (numpy and onnxruntime
compute the float op with different float32 roundings); raw int64/bool outputs must be equal.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.api import compile_model
from compiler.cli import main
from compiler.verify import tie_distance
from passes.insert_qdq import prequant_name, quantized_name
from runtime.executor import run_layer
from runtime.serialize import load_program, save_program

RNG = np.random.default_rng(7)


def _w(*shape):
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def conv_net() -> onnx.ModelProto:
    """x -> conv1 -> relu -> LRN -> conv2 -> Sigmoid -> ArgMax (int64 output) and y (float output),
    plus Greater(x, 0.2) (bool) -> Where(., x, 0) -> ReduceSum: ops with no integer lowering."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("LRN", ["r1"], ["l1"], name="lrn", size=3),
        helper.make_node("Conv", ["l1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
        helper.make_node("Sigmoid", ["y"], ["s"], name="sig"),
        helper.make_node("ArgMax", ["s"], ["cls"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Greater", ["x", "thr"], ["mask"], name="greater"),
        helper.make_node("Where", ["mask", "x", "zero"], ["kept"], name="where"),
        helper.make_node("ReduceSum", ["kept", "axes"], ["total"], name="rsum", keepdims=1),
    ]
    inits = [numpy_helper.from_array(_w(6, 3, 3, 3), "w1"), numpy_helper.from_array(_w(6), "b1"),
             numpy_helper.from_array(_w(4, 6, 3, 3), "w2"), numpy_helper.from_array(np.float32(0.2), "thr"),
             numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    graph = helper.make_graph(nodes, "fallback", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("cls", TensorProto.INT64, [1, 8, 8]),
                               helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 3, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


CALIB = {"x": RNG.normal(size=(12, 3, 8, 8)).astype(np.float32)}
FEED = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module", params=["mmav2", "mmav1"])
def result(request):
    return compile_model(conv_net(), request.param, CALIB, deny_list=["conv2", "argmax"])


def qdq_tensors(result, names):
    model = onnx.ModelProto()
    model.CopyFrom(result.qdq_model)
    for name in names:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, FEED)))


def test_offload_report_names_every_float_layer_and_why(result):
    offload = result.report.offload
    kinds = {e.node: (e.kind, e.reason) for e in offload.entries}
    assert kinds["conv1"] == ("integer", "")
    assert kinds["conv2"] == ("float", "denied by --deny-list (node name 'conv2')")
    assert kinds["argmax"] == ("float", "denied by --deny-list (node name 'argmax')")
    assert kinds["lrn"] == ("float", "op unsupported (no integer lowering for LRN)")
    for node in ("greater", "where"):  # bool tensors have no integer encoding
        assert kinds[node][0] == "float" and kinds[node][1].startswith("op unsupported"), node
    for node, (kind, reason) in kinds.items():  # every other node: integer, or float with a reason
        assert (kind == "integer" and not reason) or (kind == "float" and reason), node
    assert "LRN" in offload.not_lowered_ops() and "Conv" not in offload.not_lowered_ops()
    text = result.report.text()
    assert "denied by --deny-list (node name 'conv2')" in text and offload.text() in text


def test_raw_outputs_are_int64_and_bool_tensors(result):
    program = result.program
    assert program.tensors["cls"].dtype == "int64"
    assert program.tensors["mask"].dtype == "bool"
    assert program.layer("conv2").kind == "float" and program.layer("conv2").attrs["clip"] == [0.0, None]
    outputs = program.run(FEED)
    assert outputs["cls"].dtype == np.int64 and outputs["cls"].shape == (1, 8, 8)


def test_every_float_layer_matches_the_qdq_model(result):
    program = result.program
    float_layers = [layer for layer in program.layers if layer.kind == "float"]
    assert len(float_layers) == len(result.report.offload.float) >= 5
    names = set()
    for layer in float_layers:
        for t in layer.inputs + layer.outputs:
            raw = program.tensors[t].dtype in ("int64", "bool")
            names.add(t if raw else quantized_name(t))
            if not raw and t not in program.inputs:
                names.add(prequant_name(t))
    values = qdq_tensors(result, sorted(names))
    checked = 0
    for layer in float_layers:
        raw = {t: program.tensors[t].dtype in ("int64", "bool") for t in layer.inputs + layer.outputs}
        inputs = [values[t] if raw[t] else values[quantized_name(t)] for t in layer.inputs]
        (ours,) = run_layer(program, layer, inputs)
        out = layer.outputs[0]
        if raw[out]:
            np.testing.assert_array_equal(ours, values[out])
            continue
        expected = values[quantized_name(out)]
        diff = ours.astype(np.int64) - expected.astype(np.int64)
        info = program.tensors[out]
        dist, _ = tie_distance(values[prequant_name(out)], info.scale[0], int(info.zero_point[0]))
        assert np.all((diff == 0) | ((np.abs(diff) == 1) & (dist <= 1e-3))), (layer.name, diff[diff != 0], dist[diff != 0])
        checked += ours.size
    assert checked > 0


def test_program_with_float_layers_round_trips_through_a_file(result, tmp_path):
    path = tmp_path / "model.qir"
    save_program(result.program, path)
    loaded = load_program(path)
    a, b = result.program.run(FEED), loaded.run(FEED)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert "layer lrn: LRN (float)" in loaded.to_text()


def test_deny_by_op_type_moves_every_conv_to_float():
    result = compile_model(conv_net(), "mmav2", CALIB, deny_list=["Conv", "no_such_node"])
    offload = result.report.offload
    convs = [e for e in offload.entries if e.op == "Conv"]
    assert len(convs) == 2 and all(e.kind == "float" and e.reason == "denied by --deny-list (op type Conv)"
                                   for e in convs)
    assert offload.unmatched_deny == ["no_such_node"]
    assert all(layer.op != "conv" for layer in result.program.layers)


def test_an_unsupported_attribute_is_named_in_the_reason():
    """Gemm with transA=1 has no integer lowering: a float layer, y = x^T w, within the output's
    rounding (0.5 step) plus the input's (0.5 step of x times max|w|, one term per output: K = 1)."""
    w = _w(1, 3)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result = compile_model(model, "mmav2", {"x": RNG.normal(size=(6, 2)).astype(np.float32)})
    (entry,) = result.report.offload.entries
    assert entry.kind == "float" and entry.reason == "unsupported form: transA=1 is not supported"
    x = RNG.normal(size=(1, 2)).astype(np.float32)
    got = result.program.run({"x": x})["y"]
    tensors = result.program.tensors
    bound = 0.5 * float(tensors["y"].scale[0]) + 0.5 * float(tensors["x"].scale[0]) * float(np.abs(w).max())
    assert np.abs(got - x.T @ w).max() <= bound * (1 + 1e-6)


def test_cli_deny_list_writes_the_offload_report(tmp_path, capsys):
    model_path, calib_path, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "out"
    onnx.save(conv_net(), str(model_path))
    np.savez(calib_path, x=CALIB["x"])
    rc = main(["compile", str(model_path), "--calib", str(calib_path), "--out", str(out), "--deny-list", "conv1, Sigmoid"])
    assert rc == 0
    text = (out / "offload.txt").read_text()
    assert "denied by --deny-list (node name 'conv1')" in text and "denied by --deny-list (op type Sigmoid)" in text
    data = json.loads((out / "offload.json").read_text())
    kinds = {n["node"]: n["kind"] for n in data["nodes"]}
    assert kinds["conv1"] == "float" and kinds["sig"] == "float" and kinds["conv2"] == "integer"
    assert data["float_layers"] == sum(k == "float" for k in kinds.values())
    assert "offload:" in capsys.readouterr().out
