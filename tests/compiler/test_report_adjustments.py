"""compiler.report lists every scale adjustment of passes.qparams, not only nudges and bias fits:
a compile that drops an Add input (multiplier 0 under the shared shift) and one that raises a
near-dead Conv channel's weight scale each show it in report.text(), with the layer, the tensor
and the amount (recomputed here from the chosen scales, not read back from the adjustment)."""
from __future__ import annotations

import re

import numpy as np
from onnx import helper, numpy_helper
from scale_cases import F, add_of_inputs_2_pow_12_apart, model_from

from compiler.api import compile_model


def _section(text: str) -> list[str]:
    """The lines of the report's 'scale adjustments:' section."""
    lines = text.splitlines()
    start = lines.index("scale adjustments:")
    end = lines.index("", start)
    return lines[start + 1:end]


def test_dropped_add_input_is_in_the_report_text():
    # inputs 2^12 apart: on mmav2's 8-bit multiplier the narrow input's m rounds to 0
    model, calib = add_of_inputs_2_pow_12_apart()
    result = compile_model(model, "mmav2", calib)
    layer = next(la for la in result.program.layers if la.name == "add")
    assert int(layer.params["multiplier"][1]) == 0  # the input really is dropped in the IR
    s_b, s_y = (float(result.qparams[t].scale[0]) for t in ("b", "y"))
    bound = 128 * s_b / s_y  # int8 input: |q - zp| <= 128 steps of s_b, in steps of s_y
    section = _section(result.report.text())
    hits = [line for line in section if line.startswith("  add: input b dropped (m = 0)")]
    assert len(hits) == 1, section
    shown = float(re.search(r"at most ([0-9.eE+-]+) output steps", hits[0]).group(1))
    assert abs(shown - bound) <= 5e-3 * bound  # printed with 3 significant digits
    assert "1 Add input(s) dropped" in result.report.summary()


def test_dead_conv_channel_is_in_the_report_text():
    rng = np.random.default_rng(3)
    w = rng.uniform(-0.5, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w[2] = rng.uniform(-1e-25, 1e-25, (3, 3, 3)).astype(np.float32)  # pruned channel
    b = np.array([0.1, -0.2, 0.0, 0.05], np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    model = model_from([node], [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                   [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    calib = {"x": rng.uniform(-1, 1, (8, 3, 6, 6)).astype(np.float32)}
    result = compile_model(model, "mmav2", calib)
    # bits raised on the dead channel: log2 of the chosen scale over its natural max|w|/127
    natural = np.abs(w[2].astype(np.float64)).max() / 127
    raised = np.log2(float(result.qparams["w"].scale[2]) / natural)
    assert raised > 20  # far more than any nudge
    section = _section(result.report.text())
    hits = [line for line in section if line.startswith("  conv: weight scale w raised") and "near-dead" in line]
    assert len(hits) == 1, section
    shown = float(re.search(r"raised ([0-9.]+) bits", hits[0]).group(1))
    assert abs(shown - raised) <= 0.1
    assert "1 layer(s) with near-dead channels raised" in result.report.summary()
