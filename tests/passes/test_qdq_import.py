"""ImportQDQ / KeepQDQBoundaries on tiny QDQ graphs: structure (no Q/DQ left, names kept,
annotations), numbers (the imported float graph reproduces the QDQ model exactly when its Q/DQ are
applied by an independent numpy implementation of the ONNX formulas), and every bad-input error."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import make_model, run, vi
from onnx import TensorProto, helper, numpy_helper

from passes.activation_fusion import fused_activation_of
from passes.errors import PassError
from passes.pipeline import run_default_pipeline
from passes.qdq_import import ImportQDQ, KeepQDQBoundaries, has_qdq, read_annotations

RNG = np.random.default_rng(7)
X = RNG.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)


def q_np(x, scale, zp, lo, hi):
    """ONNX QuantizeLinear written out: saturate(round_half_even(x / scale) + zp)."""
    return np.clip(np.rint(np.float32(x) / np.float32(scale)) + zp, lo, hi)


def dq_np(q, scale, zp):
    return ((q - zp).astype(np.float32) * np.float32(scale)).astype(np.float32)


def scalar(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def conv_qdq_model(weight_style="int", relu_between=False, act_dtype=np.uint8, out_as_graph_output=True,
                   relu_scale=None, weight_axis=0, opset=13):
    """input -Q/DQ-> Conv(W: int8 per-channel DQ or float->Q->DQ; bias int32 DQ) -Q/DQ-> [Relu -Q/DQ->] y."""
    w = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    s_w = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    s_x, zp_x = np.float32(0.02), 128 if act_dtype == np.uint8 else 0
    s_y, zp_y = np.float32(0.05), 120 if act_dtype == np.uint8 else 0
    b = RNG.normal(0, 0.1, 4).astype(np.float32)
    s_b = (s_x * s_w).astype(np.float32)
    inits = [scalar("x.s", s_x, np.float32), scalar("x.zp", zp_x, act_dtype),
             scalar("y.s", s_y, np.float32), scalar("y.zp", zp_y, act_dtype),
             numpy_helper.from_array(s_w, "w.s"), numpy_helper.from_array(np.zeros(4, np.int8), "w.zp"),
             numpy_helper.from_array(np.rint(b / s_b).astype(np.int32), "b.q"), numpy_helper.from_array(s_b, "b.s"),
             numpy_helper.from_array(np.zeros(4, np.int32), "b.zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.s", "x.zp"], ["x.q"], name="x.quant"),
             helper.make_node("DequantizeLinear", ["x.q", "x.s", "x.zp"], ["x.dq"], name="x.dequant")]
    if weight_style == "int":
        q_w = np.rint(w / s_w.reshape(-1, 1, 1, 1)).astype(np.int8)
        inits.append(numpy_helper.from_array(q_w, "w.q"))
    else:  # PyTorch style: float weight behind a QuantizeLinear
        inits.append(numpy_helper.from_array(w, "w.f"))
        nodes.append(helper.make_node("QuantizeLinear", ["w.f", "w.s", "w.zp"], ["w.q"], name="w.quant",
                                      axis=weight_axis))
    nodes += [helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.zp"], ["w"], name="w.dequant", axis=weight_axis),
              helper.make_node("DequantizeLinear", ["b.q", "b.s", "b.zp"], ["b"], name="b.dequant", axis=0),
              helper.make_node("Conv", ["x.dq", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("QuantizeLinear", ["c", "y.s", "y.zp"], ["c.q"], name="c.quant"),
              helper.make_node("DequantizeLinear", ["c.q", "y.s", "y.zp"], ["y" if not relu_between else "c.dq"],
                               name="c.dequant")]
    if relu_between:
        r_s = np.float32(relu_scale if relu_scale is not None else s_y)
        inits += [scalar("r.s", r_s, np.float32), scalar("r.zp", zp_y, act_dtype)]
        nodes += [helper.make_node("Relu", ["c.dq"], ["r"], name="relu"),
                  helper.make_node("QuantizeLinear", ["r", "r.s", "r.zp"], ["r.q"], name="r.quant"),
                  helper.make_node("DequantizeLinear", ["r.q", "r.s", "r.zp"], ["y"], name="r.dequant")]
    model = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 4, 6, 6])], inits, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    return model, {"w": w, "s_w": s_w, "s_x": s_x, "zp_x": zp_x, "s_y": s_y, "zp_y": zp_y, "b": b, "s_b": s_b}


def test_imports_int8_weights_and_activations_exactly():
    model, p = conv_qdq_model("int")
    assert has_qdq(model)
    result = ImportQDQ()(model)
    out = result.model
    assert not has_qdq(out) and result.modified
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert [o.name for o in out.graph.output] == ["y"]  # the graph output keeps its name
    ann = read_annotations(out)
    assert ann["x"]["dtype"] == "uint8" and ann["x"]["zero_point"] == [128]
    assert np.float32(ann["x"]["scale"][0]) == p["s_x"]
    assert ann["y"]["zero_point"] == [120] and ann["y"]["q_input"] == "c" and ann["y"]["q_output"] == "c.q"
    assert ann["w"]["role"] == "weight" and ann["w"]["axis"] == 0 and len(ann["w"]["scale"]) == 4
    assert ann["b"]["role"] == "bias" and ann["b"]["dtype"] == "int32"
    # Numbers: the QDQ model equals Q/DQ (numpy) around the imported float conv (onnxruntime).
    x_dq = dq_np(q_np(X, p["s_x"], 128, 0, 255), p["s_x"], 128)
    (conv_out,) = run(out, {"x": x_dq})
    expected = dq_np(q_np(conv_out, p["s_y"], 120, 0, 255), p["s_y"], 120)
    (qdq_out,) = run(model, {"x": X})
    np.testing.assert_array_equal(qdq_out, expected)


def test_pytorch_style_float_weight_behind_quantize_linear():
    model, p = conv_qdq_model("float")
    out = ImportQDQ()(model).model
    weight = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "w"))
    s = p["s_w"].reshape(-1, 1, 1, 1)
    q = np.clip(np.rint(p["w"] / s), -128, 127)  # independent QuantizeLinear
    np.testing.assert_array_equal(weight, (q.astype(np.float32) * s).astype(np.float32))
    assert {i.name for i in out.graph.initializer} == {"w", "b"}  # scales, zero points, w.f all dropped


def test_per_channel_axis_must_match_the_op():
    model, _ = conv_qdq_model("float", weight_axis=1)
    with pytest.raises(PassError, match=r"'w'.*axis 1.*node 'conv' \(Conv\) needs axis 0"):
        ImportQDQ()(model)


@pytest.mark.parametrize("trans_b, axis, ok", [(0, 1, True), (0, 0, False), (1, 0, True), (1, 1, False)])
def test_gemm_weight_axis_follows_transB(trans_b, axis, ok):
    w = RNG.normal(0, 1, (8, 5) if not trans_b else (5, 8)).astype(np.float32)
    n = w.shape[axis]
    inits = [numpy_helper.from_array(w, "w.f"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "w.s"),
             numpy_helper.from_array(np.zeros(n, np.int8), "w.zp")]
    nodes = [helper.make_node("QuantizeLinear", ["w.f", "w.s", "w.zp"], ["w.q"], name="wq", axis=axis),
             helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.zp"], ["w"], name="wdq", axis=axis),
             helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b)]
    model = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 5])], inits, opset=13)
    if ok:
        ann = read_annotations(ImportQDQ()(model).model)
        assert ann["w"]["axis"] == axis and len(ann["w"]["scale"]) == n
    else:
        with pytest.raises(PassError, match=r"'fc' \(Gemm\) needs axis"):
            ImportQDQ()(model)


def test_conv_transpose_weight_axis_is_one():
    w = RNG.normal(0, 1, (3, 4, 2, 2)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w.f"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "w.s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w.zp")]
    nodes = [helper.make_node("QuantizeLinear", ["w.f", "w.s", "w.zp"], ["w.q"], name="wq", axis=1),
             helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.zp"], ["w"], name="wdq", axis=1),
             helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 8, 8])], inits, opset=13)
    assert read_annotations(ImportQDQ()(model).model)["w"]["axis"] == 1


def _break(model, field, value):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    for init in broken.graph.initializer:
        if init.name == field:
            init.CopyFrom(value)
            init.name = field
    return broken


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_scale_zero_or_negative_is_an_error(scale):
    model, _ = conv_qdq_model()
    broken = _break(model, "y.s", numpy_helper.from_array(np.array(scale, np.float32)))
    with pytest.raises(PassError, match=r"node 'c.quant' \(QuantizeLinear\).*'y.s' must be finite and positive"):
        ImportQDQ()(broken)


def test_zero_point_outside_its_type_is_an_error():
    model, _ = conv_qdq_model(act_dtype=np.int8)
    zp = onnx.TensorProto()
    zp.data_type = TensorProto.INT8
    zp.int32_data.append(200)  # storable in the protobuf field, outside int8
    broken = _break(model, "x.zp", zp)
    with pytest.raises(PassError, match=r"zero point 'x.zp' = \[200\] is outside the int8 range"):
        ImportQDQ()(broken)


def test_quantize_without_dequantize_is_an_error():
    model, _ = conv_qdq_model()
    # The conv reads the integer tensor directly: a Q without its DQ.
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.input[0] = "x.q"
    with pytest.raises(PassError, match=r"QuantizeLinear without its DequantizeLinear.*'x.q' is read by 'conv'"):
        ImportQDQ()(model)


def test_producer_and_consumer_qdq_with_different_zero_points_are_reported():
    model, _ = conv_qdq_model()
    model.graph.initializer.append(scalar("other.zp", 7, np.uint8))
    for node in model.graph.node:
        if node.name == "c.dequant":
            node.input[2] = "other.zp"
    with pytest.raises(PassError, match=r"tensor 'c': producer-side QuantizeLinear 'c.quant'.*zp=120.*"
                                        r"'c.dequant'.*zp=7\) disagree"):
        ImportQDQ()(model)


def test_consumer_dequantize_at_another_scale_is_recorded_per_reader():
    model, _ = conv_qdq_model()
    model.graph.initializer.append(scalar("other.s", 0.03, np.float32))
    for node in model.graph.node:
        if node.name == "x.dequant":
            node.input[1] = "other.s"
    ann = read_annotations(ImportQDQ()(model).model)
    assert ann["x"]["consumer_scales"] == {"conv": float(np.float32(0.03))}


def test_tensor_quantized_twice_differently_is_an_error():
    model, _ = conv_qdq_model()
    model.graph.initializer.append(scalar("x2.s", 0.04, np.float32))
    model.graph.node.insert(2, helper.make_node("QuantizeLinear", ["x", "x2.s", "x.zp"], ["x2.q"], name="x2.quant"))
    model.graph.node.insert(3, helper.make_node("DequantizeLinear", ["x2.q", "x2.s", "x.zp"], ["x2.dq"],
                                                name="x2.dequant"))
    model.graph.node.append(helper.make_node("Relu", ["x2.dq"], ["z"], name="other"))
    model.graph.output.append(vi("z", [1, 3, 6, 6]))
    with pytest.raises(PassError, match=r"tensor 'x' is quantized twice with different parameters"):
        ImportQDQ()(model)


def test_opset21_int16_qdq_is_imported():
    model, _ = conv_qdq_model(opset=21)
    for name in ("x.zp", "y.zp"):  # re-type the activation Q/DQ to int16
        model = _break(model, name, scalar(name, 0, np.int16))
    onnx.checker.check_model(model, full_check=True)
    out = ImportQDQ()(model).model
    ann = read_annotations(out)
    assert ann["x"]["dtype"] == "int16" and ann["y"]["dtype"] == "int16"
    (qdq_out,) = run(model, {"x": X})
    s_x, s_y = np.float32(ann["x"]["scale"][0]), np.float32(ann["y"]["scale"][0])
    (conv_out,) = run(out, {"x": dq_np(q_np(X, s_x, 0, -32768, 32767), s_x, 0)})
    np.testing.assert_array_equal(qdq_out, dq_np(q_np(conv_out, s_y, 0, -32768, 32767), s_y, 0))


def _fused_pairs(model):
    return {n.name: fused_activation_of(n) for n in model.graph.node if fused_activation_of(n)}


def test_relu_after_the_conv_qdq_stays_apart_when_the_scales_differ():
    model, _ = conv_qdq_model(relu_between=True, relu_scale=0.03)
    fused = run_default_pipeline(ImportQDQ()(model).model).model
    assert _fused_pairs(fused) == {"conv": "relu"}  # activation fusion fuses it ...
    kept = KeepQDQBoundaries()(fused)
    assert kept.modified and _fused_pairs(kept.model) == {}  # ... and the QDQ boundary splits it again


def test_relu_after_the_conv_qdq_fuses_when_the_encodings_agree():
    model, _ = conv_qdq_model(relu_between=True)  # same scale and zero point on both sides: exact
    fused = run_default_pipeline(ImportQDQ()(model).model).model
    kept = KeepQDQBoundaries()(fused)
    assert not kept.modified and _fused_pairs(kept.model) == {"conv": "relu"}
