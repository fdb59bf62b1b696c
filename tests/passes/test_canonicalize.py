"""NormalizeGemm and FoldPadIntoConv: structure, and numbers in onnxruntime before vs after
(float32 with optimizations off; the rewrites reorder no sums in the conv, and alpha/beta folding
changes one float32 rounding per weight, so rtol/atol 1e-5)."""
from __future__ import annotations

import numpy as np
import pytest
from graphs import assert_same_outputs, init, make_model, node, ops, rand
from onnx import helper

from passes.canonicalize import FoldPadIntoConv, NormalizeGemm
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
