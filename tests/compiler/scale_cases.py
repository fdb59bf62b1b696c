"""Float models whose scales stress the compiler, shared by the scale-robustness and report tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

F = onnx.TensorProto.FLOAT


def model_from(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def add_of_inputs_2_pow_12_apart() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = a + b with calibration ranges exactly 2^12 apart: on mmav2's 8-bit multiplier the
    narrow input's multiplier rounds to 0. Returns (model, calibration samples)."""
    model = model_from([helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                       [helper.make_tensor_value_info("a", F, [1, 4, 8]),
                        helper.make_tensor_value_info("b", F, [1, 4, 8])],
                       [helper.make_tensor_value_info("y", F, [1, 4, 8])])
    rng = np.random.default_rng(0)
    calib = {"a": rng.uniform(-1, 1, (8, 4, 8)).astype(np.float32),
             "b": rng.uniform(-2.0**-12, 2.0**-12, (8, 4, 8)).astype(np.float32)}
    calib["a"][0, 0, 0], calib["b"][0, 0, 0] = 1.0, 2.0**-12
    return model, calib
