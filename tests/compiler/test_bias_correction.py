"""Bias correction: the deltas equal a brute-force numpy computation of E[y_float - y_quant],
layer after layer, and they remove a deliberate systematic quantization bias.

Model: x[1,4,6,6] -> conv1 (1x1, 4->6) -> Relu -> conv2 (1x1, 6->3) -> y. conv1's weights sit
0.45 of a quantization step above a grid point, so every weight rounds down and conv1's output
is shifted by a fixed amount per channel (the input is positive with a small spread).
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.api import compile_model
from compiler.bias_correction import ChannelMean, correct_biases, prefix_model
from compiler.calibration import collect_ranges
from compiler.calibration_data import load_calibration
from compiler.loader import load_model
from compiler.onnx_runner import make_session
from compiler.scales import choose_qparams
from passes.insert_qdq import InsertQDQ
from passes.layer_plan import plan_layers
from passes.pipeline import run_default_pipeline
from passes.targets import get_target


def biased_model() -> onnx.ModelProto:
    steps = np.array([[127, 2.45, 3.45, 1.45], [1.45, 127, 4.45, 2.45], [3.45, 1.45, 127, 1.45],
                      [2.45, 2.45, 1.45, 127], [127, 4.45, 4.45, 4.45], [1.45, 3.45, 127, 2.45]])
    w1 = (steps / 127.0).astype(np.float32).reshape(6, 4, 1, 1)
    b1 = np.array([0.1, -0.2, 0.05, 0.0, -0.1, 0.2], np.float32)
    w2 = np.random.default_rng(5).uniform(-1, 1, (3, 6, 1, 1)).astype(np.float32)
    b2 = np.array([0.3, -0.1, 0.0], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["t1"], name="conv1"),
             helper.make_node("Relu", ["t1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [numpy_helper.from_array(v, n) for n, v in
                               [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def samples(n, seed):
    rng = np.random.default_rng(seed)
    return {"x": (0.6 + 0.05 * rng.standard_normal((n, 4, 6, 6))).astype(np.float32)}


def prepared(target="mmav2"):
    loaded = load_model(biased_model())
    model = run_default_pipeline(loaded.model).model
    plan = plan_layers(model)
    data = load_calibration(samples(16, 0), loaded.inputs)
    ranges = collect_ranges(model, plan.activation_tensors(), data)
    qparams = choose_qparams(model, plan, ranges, get_target(target))
    return loaded, model, plan, data, qparams, ranges


def fake_quant(v, qp):
    """ONNX QuantizeLinear then DequantizeLinear: float32 division, round half to even, saturate."""
    s, zp = np.float32(qp.scale[0]), int(qp.zero_point[0])
    q = np.clip(np.rint(np.asarray(v, np.float32) / s) + zp, qp.qmin, qp.qmax)
    return ((q - zp) * s).astype(np.float64)


def weight_fake_quant(w, qp):
    s = qp.scale.astype(np.float64).reshape(-1, *([1] * (w.ndim - 1)))
    return np.clip(np.rint(w / s), qp.qmin, qp.qmax) * s


def bias_fake_quant(b, qp):
    s = qp.scale.astype(np.float64)
    return np.clip(np.rint(b.astype(np.float64) / s), qp.qmin, qp.qmax) * s


def conv1x1(w, x, b):
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + b.reshape(1, -1, 1, 1)


def test_deltas_equal_a_brute_force_sequential_mean():
    _, model, plan, data, qp, _ = prepared()
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    x = samples(16, 0)["x"].astype(np.float64)
    result = correct_biases(model, plan, qp, data)

    # Layer 1: float vs quantized (input, weights and bias quantized as the QDQ model does).
    y1_f = conv1x1(w["w1"], x, w["b1"])
    w1_q = weight_fake_quant(w["w1"], qp["w1"])
    y1_q = conv1x1(w1_q, fake_quant(x, qp["x"]), bias_fake_quant(w["b1"], qp["b1"]))
    delta1 = (y1_f - y1_q).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(result.deltas["conv1"], delta1, rtol=1e-4, atol=1e-7)
    assert np.all(delta1 > 0.002)  # the deliberate bias: every weight rounded down

    # Layer 2 sees layer 1 with its corrected bias.
    b1_corrected = w["b1"] + delta1
    a1_q = fake_quant(np.maximum(conv1x1(w1_q, fake_quant(x, qp["x"]), bias_fake_quant(b1_corrected, qp["b1"])), 0),
                      qp["a1"])
    y2_f = conv1x1(w["w2"], np.maximum(y1_f, 0), w["b2"])
    y2_q = conv1x1(weight_fake_quant(w["w2"], qp["w2"]), a1_q, bias_fake_quant(w["b2"], qp["b2"]))
    delta2 = (y2_f - y2_q).mean(axis=(0, 2, 3))
    # One activation landing on the other side of a rounding tie moves a mean by at most
    # s_a * max|w2| / (samples * positions); allow three of them.
    tie = 3 * float(qp["a1"].scale[0]) * np.abs(w["w2"]).max() / (16 * 36)
    np.testing.assert_allclose(result.deltas["conv2"], delta2, rtol=1e-4, atol=tie)

    # The model now holds the corrected biases.
    got = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(got["b1"], (w["b1"] + delta1).astype(np.float32), rtol=1e-5, atol=1e-6)


def _mean_channel_error(model, qparams, plan, feeds):
    """|mean over samples and positions of (float - QDQ)| per output channel, on new data."""
    qdq = InsertQDQ(plan, qparams)(model).model
    ref_session = make_session(biased_model())
    q_session = make_session(qdq)
    err = ChannelMean()
    for i in range(len(feeds["x"])):
        f = {"x": feeds["x"][i:i + 1]}
        err.update(ref_session.run(["y"], f)[0] - q_session.run(["y"], f)[0])
    return np.abs(err.mean())


def test_correction_removes_the_mean_error_on_evaluation_data():
    _, model, plan, data, qp, ranges = prepared()
    evaluation = samples(16, 1)
    before = _mean_channel_error(model, qp, plan, evaluation)
    correct_biases(model, plan, qp, data)
    qp_after = choose_qparams(model, plan, ranges, get_target("mmav2"))
    after = _mean_channel_error(model, qp_after, plan, evaluation)
    assert before.max() > 0.003
    assert after.mean() < 0.3 * before.mean()
    assert after.max() < 0.5 * before.max()


def test_channel_mean_streams_exactly():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((2, 3, 4, 5)) for _ in range(3)]
    m = ChannelMean()
    for p in parts:
        m.update(p)
    np.testing.assert_allclose(m.mean(), np.concatenate(parts).mean(axis=(0, 2, 3)), rtol=1e-12)


def test_prefix_model_keeps_only_what_the_output_needs():
    model = run_default_pipeline(load_model(biased_model()).model).model
    sub = prefix_model(model, ["t1"])
    assert [n.name for n in sub.graph.node] == ["conv1"]
    assert sorted(i.name for i in sub.graph.initializer) == ["b1", "w1"]


def test_compile_model_option_reports_and_changes_the_program():
    calib = samples(16, 0)
    plain = compile_model(biased_model(), "mmav2", calib)
    corrected = compile_model(biased_model(), "mmav2", calib, bias_correction=True)
    assert any(n.startswith("bias correction: 2 layers corrected") for n in corrected.report.notes)
    b_plain = {i.name: numpy_helper.to_array(i) for i in plain.float_model.graph.initializer}["b1"]
    b_corr = {i.name: numpy_helper.to_array(i) for i in corrected.float_model.graph.initializer}["b1"]
    assert np.all(b_corr > b_plain)  # every conv1 weight rounded down: the correction adds
    x = samples(4, 2)
    ref = make_session(biased_model()).run(["y"], {"x": x["x"][:1]})[0]
    out_plain = plain.program.run({"x": x["x"][:1]})["y"]
    out_corr = corrected.program.run({"x": x["x"][:1]})["y"]
    assert abs(float((ref - out_corr).mean())) < abs(float((ref - out_plain).mean()))


def test_cli_flags(tmp_path):
    from compiler.cli import main

    onnx.save(biased_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **samples(8, 0))
    status = main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--out",
                   str(tmp_path / "out"), "--bias-correction", "--equalize", "--weight-clip", "3"])
    assert status == 0
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "bias correction: 2 layers corrected" in report
    assert "equalized 1 pairs" in report
    assert "weight clipping at 3 sigma" in report


def test_segment_runs_equal_prefix_runs_on_a_residual_net():
    """The cached segment-by-segment QDQ runs (default) and the per-layer prefix runs from the
    inputs (``cache_mb=0`` forces them) give the same corrections, skip connections included."""
    from tools import model_zoo

    source = model_zoo.MODELS["resnet_tiny"]()
    results = []
    for cache_mb in (1024.0, 0.0):
        loaded = load_model(source)
        model = run_default_pipeline(loaded.model).model
        plan = plan_layers(model)
        data = load_calibration(model_zoo.calibration_samples(source, 6, seed=0), loaded.inputs)
        ranges = collect_ranges(model, plan.activation_tensors(), data)
        qp = choose_qparams(model, plan, ranges, get_target("mmav1"))
        results.append(correct_biases(model, plan, qp, data, cache_mb=cache_mb))
    cached, prefix = results
    assert any("prefix runs" in s for s in prefix.skipped) and not any("prefix" in s for s in cached.skipped)
    assert list(cached.deltas) == list(prefix.deltas) and len(cached.deltas) >= 5
    for name in cached.deltas:
        scale = float(np.abs(prefix.deltas[name]).max()) + 1e-6
        np.testing.assert_allclose(cached.deltas[name], prefix.deltas[name], atol=1e-3 * scale)
