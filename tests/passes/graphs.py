"""Tiny test graphs built with onnx.helper, and onnxruntime before/after comparisons."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
OPSET = 17


def vi(name: str, shape, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, ir_version: int | None = None,
               list_initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """A model from nodes; ``inputs``/``outputs`` are ValueInfoProtos or (name, shape) pairs.
    Opsets <= 8 get IR version 3, the IR of that era, where initializers are graph inputs too."""
    if ir_version is None and opset <= 8:
        ir_version = 3
    inputs = [i if isinstance(i, onnx.ValueInfoProto) else vi(*i) for i in inputs]
    outputs = [o if isinstance(o, onnx.ValueInfoProto) else vi(*o) for o in outputs]
    inits = [i if isinstance(i, onnx.TensorProto) else init(*i) for i in initializers]
    if list_initializers_as_inputs or (ir_version is not None and ir_version < 4):
        inputs = inputs + [vi(t.name, list(t.dims), t.data_type) for t in inits]
    graph = helper.make_graph(list(nodes), "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with graph optimizations off, so it does no fusing of its own."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray],
                        rtol: float, atol: float) -> None:
    """Every graph output of ``after`` equals ``before`` (by output name) within the tolerance."""
    names_before = [o.name for o in before.graph.output]
    names_after = [o.name for o in after.graph.output]
    assert names_before == names_after, "graph outputs must keep their names"
    for name, a, b in zip(names_before, run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"output '{name}'")


def rand(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bn_stats(rng: np.random.Generator, channels: int, shape=None) -> list[np.ndarray]:
    """gamma, beta, mean, var far from the trivial 0/1: mean and beta up to +-3, var from 0.05
    to 20, about half the gammas negative."""
    shape = (channels,) if shape is None else shape
    gamma = rng.uniform(0.3, 2.5, shape) * np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    gamma.flat[0] = -abs(gamma.flat[0])  # at least one negative channel
    beta = rng.uniform(-3, 3, shape)
    mean = rng.uniform(-3, 3, shape)
    var = np.exp(rng.uniform(np.log(0.05), np.log(20.0), shape))
    return [a.astype(np.float32) for a in (gamma, beta, mean, var)]


def bn_node(name: str, x: str, y: str, prefix: str | None = None, **attrs) -> onnx.NodeProto:
    p = prefix or name
    return helper.make_node("BatchNormalization", [x, f"{p}_gamma", f"{p}_beta", f"{p}_mean", f"{p}_var"],
                            [y], name=name, **attrs)


def bn_inits(rng: np.random.Generator, prefix: str, channels: int, shape=None) -> list[onnx.TensorProto]:
    return [init(f"{prefix}_{k}", a) for k, a in zip(("gamma", "beta", "mean", "var"),
                                                      bn_stats(rng, channels, shape))]
