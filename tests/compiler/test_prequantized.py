"""Pre-quantized QDQ models end to end: made by onnxruntime's ``quantize_static`` over the zoo
models (and a PyTorch-export-style fixture), compiled without calibration data, and compared with
onnxruntime running that same QDQ model (optimizations off): per layer fed the same integers
(equal except genuine ties), end to end statistically; plus the target checks and the errors."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compiler.api import compile_model
from compiler.cli import main as cli_main
from compiler.errors import CompileError
from compiler.metrics import sqnr_db
from compiler.onnx_runner import make_session
from compiler.prequantized import PrequantizedLowering, check_layers_against_source
from compiler.verify import check_layers
from passes.qdq_import import read_annotations
from tools import model_zoo
from tools.make_torch_qdq import pytorch_style_fixture
from tools.prequantized_report import (
    OrtOptions,
    decoder_net,
    decoder_samples,
    folded_float_model,
    grouped_transpose_net,
    measure,
    ort_qdq_model,
    run_rows,
)

EVAL = 4


@cache
def zoo(name: str):
    model = model_zoo.MODELS[name]()
    return model, folded_float_model(model), model_zoo.calibration_samples(model, 8, seed=0), \
        model_zoo.calibration_samples(model, EVAL, seed=1)


@cache
def ort_fixture(name: str, options: OrtOptions) -> onnx.ModelProto:
    _, folded, calib, _ = zoo(name)
    return ort_qdq_model(folded, calib, options)


def assert_ties_only(checks, max_fraction: float = 0.001):
    assert checks, "no layer was compared"
    failing = [c for c in checks if not c.ok]
    assert not failing, failing
    total = sum(c.elements for c in checks)
    assert sum(c.mismatches for c in checks) <= max_fraction * total


ORT_8BIT = [OrtOptions(per_channel=True, activation="uint8"),
            OrtOptions(per_channel=False, activation="uint8"),
            OrtOptions(per_channel=True, activation="int8", symmetric_activations=True),
            OrtOptions(per_channel=False, activation="int8")]


@pytest.mark.parametrize("options", ORT_8BIT, ids=lambda o: o.label)
@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny", "gemm_head_net"])
def test_ort_quantized_model_matches_onnxruntime(name, options):
    model, _, _, evaluation = zoo(name)
    qdq = ort_fixture(name, options)
    m, result = measure(name, qdq, model, evaluation)
    assert all(qp.source.startswith("qdq:") or qp.source.startswith("aligned:") for qp in result.qparams.values())
    assert_ties_only(check_layers_against_source(result, {"input": evaluation["input"][:1]}))
    assert m.layers == len(result.program.layers)
    # End to end: within 0.5 dB of onnxruntime on the same QDQ model, and close to it.
    assert abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5
    assert m.sqnr_runtime_vs_ort >= 30.0


@pytest.mark.parametrize("options", ORT_8BIT[:3], ids=lambda o: o.label)
def test_conv_transpose_resize_concat_reshape(options):
    model = decoder_net()
    qdq = ort_qdq_model(model, decoder_samples(8, 0), options)
    evaluation = decoder_samples(EVAL, 1)
    m, result = measure("decoder", qdq, model, evaluation)
    assert [la.op for la in result.program.layers] == ["conv", "conv_transpose", "resize_nearest", "concat",
                                                       "reshape", "gemm"]
    if options.per_channel:  # onnxruntime quantizes ConvTranspose weights per output channel: axis 1
        weight = next(g.weight for g in result.plan.groups if g.name == "up")
        assert result.qparams[weight].axis == 1 and result.qparams[weight].scale.size == 4
    assert_ties_only(check_layers_against_source(result, {"input": evaluation["input"][:1]}))
    assert abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5 and m.sqnr_runtime_vs_ort >= 30.0


def _with_int32_bias(qdq: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """``qdq`` with the float bias of ``node_name`` behind an int32 DequantizeLinear, per output
    channel on axis 0 at s_x * s_w[o mod (C_out/group)] (a ConvTranspose: weight scales on axis 1),
    computed here from the model's own scale initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    node = next(n for n in out.graph.node if n.name == node_name)
    s_x = inits[producers[node.input[0]].input[1]]
    s_w = inits[producers[node.input[1]].input[1]]
    bias = inits[node.input[2]]
    scale = (np.float32(s_x) * s_w[np.arange(bias.size) % s_w.size]).astype(np.float32)
    q = np.rint(bias.astype(np.float64) / scale).astype(np.int32)
    out.graph.initializer.extend([numpy_helper.from_array(q, "bias_q"), numpy_helper.from_array(scale, "bias_scale"),
                                  numpy_helper.from_array(np.zeros(bias.size, np.int32), "bias_zp")])
    out.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["bias_q", "bias_scale", "bias_zp"],
                                                   ["bias_dq"], name="bias_dequant", axis=0))
    node.input[2] = "bias_dq"
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out)


@pytest.mark.parametrize("bias", ["float", "int32"])
@pytest.mark.parametrize("group", [2, 3])
def test_grouped_conv_transpose_per_channel_weights_repeat_per_group(group, bias):
    """ONNX axis 1 of a grouped ConvTranspose weight holds C_out/group channels: output channel o
    takes weight scale s_w[o mod (C_out/group)], and its bias scale is s_x * s_w[o mod (C_out/group)]
    (computed here from the QDQ model's initializers). Per layer equal to onnxruntime on the same QDQ
    model; the bias integers differ if a scale is taken from the wrong channel."""
    model = grouped_transpose_net(group=group)
    options = OrtOptions(per_channel=True, activation="uint8", quantize_bias=False)
    qdq = ort_qdq_model(model, decoder_samples(8, 0), options)
    if bias == "int32":
        qdq = _with_int32_bias(qdq, "up")
    evaluation = decoder_samples(EVAL, 1)
    m, result = measure("grouped", qdq, model, evaluation)
    assert [la.op for la in result.program.layers] == ["conv", "conv_transpose"]
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    s_w = inits["wt_scale"]
    up = next(g for g in result.plan.groups if g.name == "up")
    assert s_w.shape == (6 // group,) and result.qparams[up.weight].axis == 1
    expected = (np.float32(inits["a_scale"]) * s_w[np.arange(6) % s_w.size]).astype(np.float32)
    np.testing.assert_array_equal(result.qparams[up.bias].scale, expected)
    assert result.qparams[up.bias].source.startswith("qdq:" if bias == "int32" else "bias")
    layer = next(la for la in result.program.layers if la.op == "conv_transpose")
    np.testing.assert_array_equal(layer.params["bias"], np.rint(inits["bt"].astype(np.float64) / expected)
                                  if bias == "float" else inits["bias_q"])
    # The widest multiplier the accumulator allows: min(31, 61 - ceil(log2 B)), B = max over output
    # channels of sum|q_w| over that channel's own group only (from the IR's output-major weight) * 255 + 2^31.
    bound = float(np.abs(layer.params["weight"].astype(np.int64)).reshape(6, -1).sum(axis=1).max()) * 255 + 2.0**31
    lowering = PrequantizedLowering(result.float_model, result.plan, result.qparams, result.target, native_bits=8)
    assert lowering._widest_multiplier_bits(up) == min(31, 61 - int(np.ceil(np.log2(bound))))
    checks = check_layers_against_source(result, {"input": evaluation["input"][:1]})
    assert_ties_only(checks, 0.002)
    assert m.sqnr_runtime_vs_ort >= 40.0 and abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5
    # The QDQ model qlower emits (int32 bias DQ with C_out scales on axis 0) imports back to the same program.
    again = compile_model(result.qdq_model, "mmav2")
    np.testing.assert_array_equal(result.program.run(evaluation, raw=True)["up_out"],
                                  again.program.run(evaluation, raw=True)["up_out"])


def test_grouped_conv_transpose_check_catches_a_bias_scale_from_the_wrong_channel():
    """Negative control for the test above: biases quantized with s_w[o // group] instead of
    s_w[o mod (C_out/group)] make the per-layer check against onnxruntime fail."""
    model = grouped_transpose_net(group=2)
    qdq = ort_qdq_model(model, decoder_samples(8, 0), OrtOptions(per_channel=True, quantize_bias=False))
    result = compile_model(qdq, "mmav2")
    layer = next(la for la in result.program.layers if la.op == "conv_transpose")
    s_w = result.qparams[next(g.weight for g in result.plan.groups if g.name == "up")].scale
    wrong = (np.float32(result.qparams["a"].scale[0]) * np.repeat(s_w, 2)).astype(np.float32)
    bt = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "bt")).astype(np.float64)
    layer.params["bias"] = np.rint(bt / wrong).astype(layer.params["bias"].dtype)
    checks = check_layers_against_source(result, {"input": decoder_samples(1, 1)["input"]})
    assert not next(c for c in checks if c.layer == "up").ok


def test_dump_dir_records_the_qdq_import_as_a_step(tmp_path):
    """--dump-dir: the import is step 00 (the model without its Q/DQ nodes, every QDQ parameter
    kept as an annotation), the pipeline's passes follow from 01, then the QDQ boundary fix-up and
    QDQ insertion; summary.txt has one line per file, the import's saying what it removed."""
    qdq = ort_fixture("resnet_tiny", ORT_8BIT[0])
    n_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in qdq.graph.node)
    result = compile_model(qdq, "mmav2", dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert files[0] == "00_import_qdq.onnx"
    assert [int(f[:2]) for f in files] == list(range(len(files)))
    assert files[-2:] == [f"{len(files) - 2:02d}_keep_qdq_boundaries.onnx", f"{len(files) - 1:02d}_insert_qdq.onnx"]
    imported = onnx.load(str(tmp_path / files[0]))
    assert not [n for n in imported.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(imported.graph.node) == len(qdq.graph.node) - n_qdq
    annotations = read_annotations(imported)
    scales = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    for node in qdq.graph.node:  # every activation Q's scale is in the dumped model's annotations
        if node.op_type == "QuantizeLinear" and node.input[0] in annotations:
            assert annotations[node.input[0]]["scale"] == [float(scales[node.input[1]])]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert f"{len(files)} pass runs" in lines[0] and len(lines) == 1 + len(files)
    first = lines[1]
    assert re.match(rf"00 import_qdq\s+round 0 nodes\s+{len(qdq.graph.node)} -> {len(imported.graph.node)}\s", first)
    assert first.split("ms  ", 1)[1] == "; ".join(next(r for r in result.report.pass_records
                                                       if r.name == "import_qdq").changes)
    n_q = sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node)  # weights are int8: DQ only
    assert f"imported {n_q} activation Q/DQ pairs and {n_qdq - 2 * n_q} quantized constants" in first, first
    assert [line.split()[1] for line in lines[1:]] == [f[3:-len(".onnx")] for f in files]


def test_denied_conv_of_a_qdq_model_runs_in_float_and_the_rest_matches_onnxruntime():
    """--deny-list on a pre-quantized model: the denied Conv is a float layer computing with the QDQ
    model's own dequantized weight and bias (q - zp) * s (checked against the initializers here),
    its output quantized at the QDQ model's scale; every layer, the float one included, equals
    onnxruntime on the same QDQ model per layer, and end to end the runtime stays close to it."""
    model, _, _, evaluation = zoo("resnet_tiny")
    qdq = ort_fixture("resnet_tiny", ORT_8BIT[0])
    denied = [n for n in qdq.graph.node if n.op_type == "Conv"][1]
    result = compile_model(qdq, "mmav2", deny_list=[denied.name])
    kinds = {la.name: la.kind for la in result.program.layers}
    assert kinds.pop(denied.name) == "float" and set(kinds.values()) == {"integer"}
    layer = next(la for la in result.program.layers if la.name == denied.name)
    assert layer.op == "Conv" and "denied by --deny-list" in layer.attrs["reason"]
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    for slot in (1, 2):
        q, s, zp = (inits[t] for t in producers[denied.input[slot]].input)
        shape = (-1,) + (1,) * (q.ndim - 1)
        expected = ((q.astype(np.int64) - zp.reshape(shape)) * s.reshape(shape).astype(np.float32)).astype(np.float32)
        np.testing.assert_array_equal(layer.params[f"input{slot}"], expected)
    assert result.program.tensors[layer.outputs[0]].scale[0] == inits[
        next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == denied.output[0]).input[1]]
    checks = check_layers_against_source(result, {"input": evaluation["input"][:1]})
    assert any(c.layer == denied.name for c in checks)
    assert_ties_only(checks)
    out = result.program.outputs[0]
    ort = run_rows(make_session(qdq, optimize=False), evaluation, out)
    float_out = run_rows(make_session(model, optimize=False), evaluation, out)
    ours = result.program.run(evaluation)[out]
    assert sqnr_db(ort, ours) >= 30.0 and abs(sqnr_db(float_out, ours) - sqnr_db(float_out, ort)) <= 0.5


def test_imported_scales_flow_unchanged_into_the_program():
    qdq = ort_fixture("resnet_tiny", ORT_8BIT[0])
    result = compile_model(qdq, "mmav2")
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        tensor = node.input[0] if node.input[0] in result.program.tensors else "logits"
        info = result.program.tensors[tensor]
        assert info.scale[0] == inits[node.input[1]] and info.zero_point[0] == inits[node.input[2]]
    # 31-bit multipliers are not needed: onnxruntime's scales fit nothing narrower, and the report says so.
    assert any("8-bit multipliers cannot represent" in n for n in result.report.notes)


def test_relu_kept_after_the_conv_qdq_is_a_requantize_layer():
    """ORT with ActivationSymmetric keeps a Relu after the conv's Q/DQ; the scales on both sides
    agree there (fused, exact). The PyTorch-style fixture has them differ: a requantize layer."""
    fixture, float_model, samples = pytorch_style_fixture()
    m, result = measure("pytorch", fixture, float_model, samples)
    ops = {layer.name: layer.op for layer in result.program.layers}
    assert ops["relu1"] == "requantize" and ops["conv1"] == "conv" and ops["conv2"] == "conv"
    assert "relu2" not in ops  # fused before its Q, as torch's ConvReLU2d exports
    assert_ties_only(check_layers_against_source(result, {"input": samples["input"][:1]}), 0.01)
    assert abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5 and m.sqnr_runtime_vs_ort >= 30.0
    assert any("'conv2.b'" in n and "float in the QDQ model" in n for n in result.report.notes)


FIXTURES = Path(__file__).parent / "fixtures"


def test_real_pytorch_qat_export_matches_onnxruntime():
    """tests/compiler/fixtures/torch_qat_tiny.onnx: exported by torch 2.13 (tools/make_torch_qdq.py
    --torch): per-channel int8 weights behind QuantizeLinear with in-graph scale computation, uint8
    asymmetric activations, float biases, Add, MaxPool, GlobalAveragePool, Flatten without QDQ, Linear."""
    qdq = onnx.load(FIXTURES / "torch_qat_tiny.onnx")
    float_model = onnx.load(FIXTURES / "torch_qat_tiny.float.onnx")
    samples = {"input": np.random.default_rng(3).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    m, result = measure("torch", qdq, float_model, samples)
    assert [la.op for la in result.program.layers] == ["conv", "conv", "add", "maxpool", "avgpool", "reshape", "gemm"]
    assert_ties_only(check_layers_against_source(result, {"input": samples["input"][:1]}), 0.01)
    assert abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5 and m.sqnr_runtime_vs_ort >= 30.0


@pytest.mark.parametrize("options", [OrtOptions(per_channel=True, activation="uint16", weight="int8"),
                                     OrtOptions(per_channel=True, activation="int16", weight="int16",
                                                symmetric_activations=True)], ids=lambda o: o.label)
def test_16bit_qdq_compiles_with_the_16bit_preset(options):
    model, _, _, evaluation = zoo("gemm_head_net")
    m, result = measure("gemm_head_net", ort_fixture("gemm_head_net", options), model, evaluation)
    assert any("16-bit QDQ" in n for n in result.report.notes)
    assert {result.program.tensors[t].dtype for t in result.program.tensors} == {options.activation}
    assert abs(m.sqnr_runtime - m.sqnr_ort_qdq) <= 0.5 and m.sqnr_runtime_vs_ort >= 60.0
    # The multipliers are wider than the 16-bit preset's 16 bits, else outputs far from ties differ.
    assert max(int(la.params["multiplier"].max()) for la in result.program.layers if la.op == "conv") >= 2**20
    assert_ties_only(check_layers_against_source(result, {"input": evaluation["input"][:1]}), 0.002)


def test_mmav1_needs_power_of_two_scales_and_snap_scales_reports_the_change():
    options = OrtOptions(per_channel=False, activation="int8", symmetric_activations=True)
    qdq = ort_fixture("gemm_head_net", options)
    with pytest.raises(CompileError, match=r"mmav1 needs power-of-2 scales; \d+ tensor\(s\) are not: '.*--snap-scales"):
        compile_model(qdq, "mmav1")
    result = compile_model(qdq, "mmav1", snap_scales=True)
    # The largest relative change, computed independently from the model's own scale initializers.
    scales = [numpy_helper.to_array(i).astype(np.float64) for i in qdq.graph.initializer
              if i.name.endswith("scale") and "bias" not in i.name]
    expected = max(float(np.max(np.exp2(np.ceil(np.log2(s))) / s - 1.0)) for s in scales)
    note = next(n for n in result.report.notes if n.startswith("--snap-scales"))
    assert f"largest relative change {100 * expected:.1f}%" in note
    for qp in result.qparams.values():
        e = np.log2(qp.scale.astype(np.float64))
        assert np.all(e == np.round(e))
    evaluation = zoo("gemm_head_net")[3]
    checks = check_layers(result, {"input": evaluation["input"][:1]})  # its own QDQ model now
    assert not [c for c in checks if not c.ok]
    assert max(c.worst_excused_tie_distance for c in checks) < 1e-9


@pytest.mark.parametrize("target", ["mmav1", "mmav2"])
def test_qlower_own_qdq_model_round_trips_to_the_same_program(target):
    """A QDQ model qlower emitted (power-of-2 for mmav1; nudged 8-bit-exact scales for mmav2)
    compiles back to a program with the same integer outputs."""
    model, _, calib, evaluation = zoo("gemm_head_net")
    first = compile_model(model, target, calib)
    again = compile_model(first.qdq_model, target)
    out = first.program.outputs[0]
    np.testing.assert_array_equal(first.program.run(evaluation, raw=True)[out],
                                  again.program.run(evaluation, raw=True)[out])
    assert_ties_only(check_layers_against_source(again, {"input": evaluation["input"][:1]}), 0.01)


def test_mmav1_rejects_per_channel_weights_and_asymmetric_activations():
    with pytest.raises(CompileError, match=r"weight '.*' has \d+ per-channel scales; mmav1 needs one scale per tensor"):
        compile_model(ort_fixture("gemm_head_net", ORT_8BIT[2]), "mmav1", snap_scales=True)
    with pytest.raises(CompileError, match=r"tensor 'input': zero point \d+; mmav1 needs symmetric activations"):
        compile_model(ort_fixture("gemm_head_net", ORT_8BIT[1]), "mmav1", snap_scales=True)


def _with_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return out


def test_weights_must_be_symmetric():
    qdq = ort_fixture("gemm_head_net", ORT_8BIT[1])
    zp_name = next(n.input[2] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0])
    broken = _with_initializer(qdq, zp_name, np.array(3, np.int8))
    with pytest.raises(CompileError, match=r"weight '.*' has zero point\(s\) \[3\]; mmav2 needs symmetric weights"):
        compile_model(broken, "mmav2")


def _without_qdq_on(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    nodes = [n for n in cut.graph.node if n.name not in (f"{tensor}.quant", f"{tensor}.dequant")]
    for n in nodes:
        for i, name in enumerate(n.input):
            if name == f"{tensor}.dq":
                n.input[i] = tensor
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    return cut


def test_a_tensor_the_qdq_model_leaves_float_needs_calibration_data():
    fixture, _, samples = pytorch_style_fixture()
    cut = _without_qdq_on(fixture, "relu2")  # the conv2+ReLU output is then float in the QDQ model
    with pytest.raises(CompileError, match=r"leaves 1 activation\(s\) unquantized \('relu2'\).*--calib"):
        compile_model(cut, "mmav2")
    result = compile_model(cut, "mmav2", samples)
    assert result.qparams["relu2"].source.startswith("calibration:")
    assert any("calibrated 1 tensors" in n for n in result.report.notes)


def test_pass_through_op_whose_input_and_output_qdq_disagree_is_an_error():
    fixture, _, samples = pytorch_style_fixture()
    cut = _without_qdq_on(fixture, "add")  # 'add' calibrated: MaxPool's output QDQ no longer agrees
    with pytest.raises(CompileError, match=r"node 'pool' \(MaxPool\): producer-side and consumer-side QDQ disagree"):
        compile_model(cut, "mmav2", samples)


def test_per_layer_check_fails_on_a_wrong_multiplier():
    """Negative control: a doubled requant multiplier in one layer is caught per layer."""
    evaluation = zoo("resnet_tiny")[3]
    result = compile_model(ort_fixture("resnet_tiny", ORT_8BIT[0]), "mmav2")
    layer = next(la for la in result.program.layers if la.op == "conv")
    layer.params["multiplier"] = layer.params["multiplier"] // 2
    checks = check_layers_against_source(result, {"input": evaluation["input"][:1]})
    assert not next(c for c in checks if c.layer == layer.name).ok


def test_cli_compiles_a_qdq_model_without_calib(tmp_path, capsys):
    path = tmp_path / "m.qdq.onnx"
    onnx.save(ort_fixture("gemm_head_net", OrtOptions(per_channel=False, activation="int8",
                                                      symmetric_activations=True)), path)
    assert cli_main(["compile", str(path), "--out", str(tmp_path / "v2")]) == 0
    assert (tmp_path / "v2" / "model.qir").exists()
    assert cli_main(["compile", str(path), "--target", "mmav1", "--out", str(tmp_path / "v1")]) == 2
    assert "--snap-scales" in capsys.readouterr().err
    assert cli_main(["compile", str(path), "--target", "mmav1", "--snap-scales", "--out", str(tmp_path / "v1")]) == 0
    assert "largest relative change" in (tmp_path / "v1" / "report.txt").read_text()


def test_cli_still_requires_calib_for_a_float_model(tmp_path, capsys):
    path = tmp_path / "f.onnx"
    onnx.save(zoo("gemm_head_net")[0], path)
    assert cli_main(["compile", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_bias_scale_other_than_sx_sw_is_re_expressed_and_noted():
    qdq = ort_fixture("gemm_head_net", ORT_8BIT[0])
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "fc2.bias")
    scale = next(numpy_helper.to_array(i) for i in qdq.graph.initializer if i.name == dq.input[1])
    broken = _with_initializer(qdq, dq.input[1], (scale * np.float32(1.5)).astype(np.float32))
    result = compile_model(broken, "mmav2")
    assert any("bias 'fc2.bias'" in n and "not s_x*s_w" in n for n in result.report.notes)
    evaluation = zoo("gemm_head_net")[3]
    assert_ties_only(check_layers_against_source(result, {"input": evaluation["input"][:1]}))


def test_bad_qdq_input_is_one_clear_compile_error():
    fixture, _, _ = pytorch_style_fixture()
    wrong_axis = onnx.ModelProto()
    wrong_axis.CopyFrom(fixture)
    for node in wrong_axis.graph.node:
        if node.name in ("fc.w.quant", "fc.w.dequant"):  # Gemm transB=0: output channels are axis 1
            node.attribute[0].i = 0
    wrong_axis = _with_initializer(wrong_axis, "fc.w.scale", np.full(96, 0.01, np.float32))
    wrong_axis = _with_initializer(wrong_axis, "fc.w.zp", np.zeros(96, np.int8))
    with pytest.raises(CompileError, match=r"pytorch_style_qdq: pass 'import_qdq'.*'fc.w' is quantized per channel "
                                           r"on axis 0, but input 1 of node 'fc' \(Gemm\) needs axis 1"):
        compile_model(wrong_axis, "mmav2")
    zero_scale = _with_initializer(fixture, "relu1.scale", np.array(0.0, np.float32))
    with pytest.raises(CompileError, match=r"node 'relu1.quant' \(QuantizeLinear\): scale 'relu1.scale' must be "
                                           "finite and positive"):
        compile_model(zero_scale, "mmav2")
