"""Golden test on the IR's text form: a small model lowered with fixed ranges (no onnxruntime in
the loop, so the text is the same on every machine). A change that claims no behaviour change
shows no diff here; one that does must update the golden file (QLOWER_UPDATE_GOLDEN=1) and the
reviewer reads the diff. A few numbers are also checked against an independent computation."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.calibration import TensorRange
from compiler.lowering import lower_program
from compiler.scales import choose_qparams
from passes.layer_plan import plan_layers
from passes.pipeline import run_default_pipeline
from passes.targets import get_target
from runtime.text import program_to_text

GOLDEN = Path(__file__).parent / "golden"


def tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 4, 3, 3, 3), init("b1", 4, scale=0.1), init("w2", 5, 4),
             numpy_helper.from_array(np.float32([1.2, 0.8, -0.9, 1.1]), "gamma"),
             numpy_helper.from_array(np.float32([0.1, -0.2, 0.3, 0.0]), "beta"),
             numpy_helper.from_array(np.float32([0.5, -0.5, 0.25, 1.0]), "mean"),
             numpy_helper.from_array(np.float32([1.5, 0.5, 2.0, 1.0]), "var"),
             numpy_helper.from_array(np.float32([0.0]), "lo"), numpy_helper.from_array(np.float32([6.0]), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Clip", ["bn1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p1"], ["g1"], name="gap"),
        helper.make_node("Flatten", ["g1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "w2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


RANGES = {"x": (-1.0, 1.0), "r1": (0.0, 6.0), "p1": (0.0, 6.0), "g1": (0.0, 3.0), "f1": (0.0, 3.0), "y": (-4.0, 4.0)}


def lowered(target: str):
    model = run_default_pipeline(tiny_model()).model
    plan = plan_layers(model)
    ranges = {k: TensorRange(lo, hi, "fixed") for k, (lo, hi) in RANGES.items()}
    preset = get_target(target)
    qparams = choose_qparams(model, plan, ranges, preset)
    return lower_program(model, plan, qparams, preset, {"target": target}), qparams


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("QLOWER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"IR text of {name} changed; review and set QLOWER_UPDATE_GOLDEN=1 to accept"


def test_golden_text_mmav2():
    program, _ = lowered("mmav2")
    check_golden("tiny_mmav2.txt", program_to_text(program))


def test_golden_text_mmav1():
    program, _ = lowered("mmav1")
    check_golden("tiny_mmav1.txt", program_to_text(program))


def test_golden_numbers_follow_the_contract():
    """Independent of the golden file: the scales and requant constants of the first conv."""
    program, qparams = lowered("mmav2")
    s_x = np.float32(1.0 / 127)  # symmetric int8 on [-1, 1]
    s_y = np.float32(6.0 / 255)  # uint8 after ReLU6 on [0, 6]
    assert qparams["x"].scale[0] == s_x and qparams["r1"].scale[0] == s_y and qparams["r1"].dtype == "uint8"
    conv = program.layers[0]
    first_weight = next(name for name, qp in qparams.items() if qp.source == "weights")  # conv1's
    s_w = qparams[first_weight].scale
    ratio = np.float64(s_x) * s_w.astype(np.float64) / np.float64(s_y)
    m, k = conv.params["multiplier"].astype(np.float64), conv.params["shift"].astype(np.float64)
    # mmav2's 8-bit multiplier (TIDL): m in [128, 255], and the weight scale was nudged so that
    # m / 2^k reproduces s_x * s_w / s_y to float32 precision (a few 2^-24 ulps).
    assert np.all((m >= 128) & (m <= 255))
    assert np.all(np.abs(m / 2.0**k - ratio) <= ratio * 2.0**-22)
    assert conv.params["clamp_lo"][0] == 0 and conv.params["clamp_hi"][0] == 255
    pool = program.layers[1]
    assert pool.op == "maxpool" and program.tensors["p1"].scale[0] == program.tensors["r1"].scale[0]
