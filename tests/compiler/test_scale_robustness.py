"""Scale selection on real-model corner cases (issue 3 follow-up), checked against onnxruntime:

- an Add whose inputs' scales differ by 2^12: the narrow input's multiplier rounds to 0 under the
  shared shift; it is dropped (m = 0) and the QDQ model multiplies it by 0, never a scale-0 DQ;
- a Conv with a near-dead channel (weights ~1e-25, as pruned PP-OCR channels): its ratio
  s_x s_w / s_y is below the smallest normalized multiplier; its weight scale is raised instead of
  a "100% nudge", and the other channels keep the honest nudge bound 2^-b;
- compiler.verify.check_layers on float layers with several outputs (Split, TopK).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from scale_cases import F, add_of_inputs_2_pow_12_apart, model_from

from compiler.api import compile_model
from compiler.onnx_runner import make_session
from compiler.verify import check_layers


def _qdq_scales_ok(model: onnx.ModelProto) -> None:
    """Every DequantizeLinear/QuantizeLinear scale of the emitted QDQ model is finite and > 0."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = inits[node.input[1]]
            assert np.all(np.isfinite(scale)) and np.all(scale > 0), node.name


def _float_run(model, feeds):
    session = make_session(model, optimize=False)
    return session.run(None, feeds)


@pytest.mark.parametrize("target,options", [("mmav2", {}), ("mmav2", {"multiplier_bits": 16}),
                                            ("mmav1", {})])
def test_add_of_inputs_2_pow_12_apart_drops_the_narrow_one(target, options):
    model, calib = add_of_inputs_2_pow_12_apart()
    result = compile_model(model, target, calib, **options)
    _qdq_scales_ok(result.qdq_model)
    layer = next(la for la in result.program.layers if la.name == "add")
    m = layer.params["multiplier"].astype(np.int64)
    k = int(layer.params["shift"][0])
    s = {t: np.float64(result.qparams[t].scale[0]) for t in ("a", "b", "y")}
    # independent rounding of each ratio at the shared shift: what the narrow input gets
    narrow = int(np.floor(s["b"] / s["y"] * 2.0**k + 0.5))
    assert m[1] == narrow
    if narrow == 0:  # dropped: reported with its bound, and the QDQ model multiplies it by 0
        dropped = [a for a in result.qparams.adjustments if a.kind == "dropped_input"]
        assert [(a.layer, a.tensor) for a in dropped] == [("add", "b")]
        assert dropped[0].amount == pytest.approx(128 * s["b"] / s["y"])  # int8: |q - zp| <= 128
        assert dropped[0].amount < 1.0
        muls = [n for n in result.qdq_model.graph.node if n.op_type == "Mul"]
        assert len(muls) == 1 and muls[0].output[0] in next(n for n in result.qdq_model.graph.node
                                                            if n.name == "add").input
    else:
        assert target == "mmav1" or options  # 8-bit mmav2 must drop it at 2^12 apart
    for seed in (1, 2):
        r = np.random.default_rng(seed)
        feeds = {"a": r.uniform(-1, 1, (1, 4, 8)).astype(np.float32),
                 "b": r.uniform(-2.0**-12, 2.0**-12, (1, 4, 8)).astype(np.float32)}
        checks = check_layers(result, feeds)
        assert all(c.ok for c in checks), checks
        # against the float model: input rounding (a: half a step of s_a) plus the output's half
        # step, the 8-bit wide multiplier's gain (2^-(b+1)) and the narrow input's whole value
        got = result.program.run(feeds)["y"].astype(np.float64)
        want = _float_run(model, feeds)[0].astype(np.float64)
        bound = 0.5 * s["a"] + 0.5 * s["b"] + 0.5 * s["y"] + 2.0**-8 + 2.0**-12 + 1e-6
        assert np.abs(got - want).max() <= bound


def _conv_with_dead_channel(bias_dead: float):
    rng = np.random.default_rng(3)
    w = rng.uniform(-0.5, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w[2] = rng.uniform(-1e-25, 1e-25, (3, 3, 3)).astype(np.float32)  # a pruned, near-dead channel
    b = np.array([0.1, -0.2, bias_dead, 0.05], np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    model = model_from([node], [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                   [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    calib = {"x": rng.uniform(-1, 1, (8, 3, 6, 6)).astype(np.float32)}
    return model, calib


@pytest.mark.parametrize("target,options,bits", [("mmav2", {}, 8), ("mmav2", {"multiplier_bits": 31}, 31),
                                                 ("mmav2", {"asymmetric": True}, 8), ("mmav1", {}, 0)])
@pytest.mark.parametrize("bias_dead", [0.0, 1e-30])
def test_near_dead_conv_channel_raises_its_weight_scale(target, options, bits, bias_dead):
    model, calib = _conv_with_dead_channel(bias_dead)
    result = compile_model(model, target, calib, **options)  # used to need "a 100% nudge"
    _qdq_scales_ok(result.qdq_model)
    table = result.qparams
    s_x, s_y = np.float64(table["x"].scale[0]), np.float64(table["y"].scale[0])
    s_w = table["w"].scale.astype(np.float64)
    ratio = s_x * s_w / s_y
    floor = 2.0 ** (max(bits, 1) - 1 - 62)
    dead = [a.tensor for a in table.adjustments if a.kind == "dead_channel"]
    if s_w.size == 1:  # mmav1: per-tensor weights, the live channels set the scale: nothing to raise
        assert dead == [] and target == "mmav1"
    else:
        assert ratio[2] >= floor and ratio[2] < floor * (1 + 2.0**-20)  # raised to the smallest multiplier
        assert dead == ["w"]
    # the live channels keep the nudge bound |s_w'/s_w - 1| <= 2^-b against the natural max|w|/127
    if bits > 0:
        w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.float64)
        natural = np.abs(w.reshape(4, -1)).max(axis=1) / 127
        live = [0, 1, 3]
        bound = max(2.0**-bits, 2.0**-22)  # 31 bits: no nudge, only float32 storage of max|w|/127
        assert np.all(np.abs(s_w[live] / natural[live] - 1) <= bound * (1 + 1e-6))
        assert table.largest("nudge") <= bound * (1 + 1e-6)
    layer = result.program.layers[0]
    assert np.all(layer.params["multiplier"] > 0)  # normalized multipliers, never 0
    for seed in (5, 6):
        feeds = {"x": np.random.default_rng(seed).uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)}
        assert all(c.ok for c in check_layers(result, feeds))
        got = result.program.run(feeds)["y"]
        want = _float_run(model, feeds)[0]
        # the dead channel's output is exactly 0 (its zero point), as the float model's ~1e-24 rounds
        assert np.all(got[:, 2] == 0.0) and np.abs(want[:, 2]).max() < 1e-20
        live = np.abs(got[:, [0, 1, 3]] - want[:, [0, 1, 3]]).max()
        assert live <= 0.08 * np.abs(want).max()  # 8-bit quantization (mmav1: power-of-2 scales)


def test_check_layers_covers_every_output_of_multi_output_float_layers():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["s0", "s1"], name="split", axis=2),
             helper.make_node("TopK", ["s1", "kk"], ["vals", "idx"], name="topk", axis=-1)]
    model = model_from(nodes, [helper.make_tensor_value_info("x", F, [1, 2, 8, 5])],
                   [helper.make_tensor_value_info("s0", F, [1, 2, 4, 5]), helper.make_tensor_value_info("vals", F, [1, 2, 4, 3]),
                    helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [1, 2, 4, 3])],
                   [numpy_helper.from_array(np.array([3], np.int64), "kk"),
                    numpy_helper.from_array(np.array([4, 4], np.int64), "sizes")])
    rng = np.random.default_rng(7)
    calib = {"x": rng.uniform(-1, 1, (8, 2, 8, 5)).astype(np.float32)}
    result = compile_model(model, "mmav2", calib, deny_list=["Split"])
    layers = {la.name: la for la in result.program.layers}
    multi = [la for la in result.program.layers if len(la.outputs) > 1]
    assert multi and all(la.kind == "float" for la in multi)
    feeds = {"x": rng.uniform(-1, 1, (1, 2, 8, 5)).astype(np.float32)}
    checks = check_layers(result, feeds)
    assert len(checks) == sum(len(la.outputs) for la in layers.values())
    names = {c.layer for c in checks}
    for la in multi:
        assert la.name in names and all(f"{la.name}:{o}" in names for o in la.outputs[1:])
    assert all(c.ok for c in checks), checks
    # the second output really is compared: quantizing it at another scale is caught
    broken = copy.deepcopy(result.program)
    second = multi[0].outputs[1]
    if broken.tensors[second].dtype in ("int8", "uint8"):
        broken.tensors[second].scale = np.asarray(broken.tensors[second].scale, np.float32) * 2
        bad = [c for c in check_layers(result, feeds, program=broken) if not c.ok]
        assert f"{multi[0].name}:{second}" in [c.layer for c in bad] and multi[0].name not in [c.layer for c in bad]
