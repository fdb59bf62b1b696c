"""The onnx package's model test data (written by others) compiles and runs, for both targets.

pytorch-converted / pytorch-operator: each case's model is compiled for mmav2 and mmav1 and the
integer program (with float-fallback layers where an op has no integer lowering) is run on the
case's input_0.pb; its output is checked against the shipped output_0.pb.

Calibration: the case's input plus three copies scaled elementwise by (1 + 0.05 n), n ~ N(0, 1)
(a multiplicative perturbation keeps signs, so Sqrt/Log/Pow inputs stay in their domain).
Inputs whose leading dimension is not 1 get a new leading batch axis of 1 and a Reshape back
(tools.coverage_report.with_unit_batch: calibration samples replace the batch axis, and the cases
have fixed batch sizes like 2 or 20).

Tolerance, per output element, with s_y the output's quantization step and L the number of IR
layers:

    |y_ir - y_expected| <= P + (0.5 + 1.5 L) s_y

P = max |f(x_hat) - f(x)| is the input's own quantization error propagated exactly through the
float model (x_hat = dequantize(quantize(x)) at the input port's encoding, f run by onnxruntime
on the canonicalized float model the compiler lowers). Each layer then adds its output rounding (0.5 step) and up to one step for
weight quantization, multiplier rounding and ties (1 step), and the last layer's rounding is the
0.5; the L layers' errors are taken as reaching the output undamped (a step of an inner layer is
counted as one output step: the cases are 1-5 layers with gains near 1). Outputs that are raw
integers (ArgMax) must be equal.

light model-zoo graphs (opset 9, constant weights): coverage only - they compile and run. The
fastest (SqueezeNet, ~1 s) runs by default; the others (about 2.5 minutes in all)
run when QLOWER_SLOW_TESTS=1.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.api import compile_model
from compiler.errors import CompileError
from runtime.fixed_point import dequantize, quantize
from runtime.ir import RAW_DTYPES
from tools.coverage_report import load_pb, onnx_case

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
CASES = sorted(glob.glob(os.path.join(DATA, "pytorch-converted", "*")) + glob.glob(os.path.join(DATA, "pytorch-operator", "*")))

SKIP = {
    "test_Embedding": "int64 input (token indices); the compiler takes float32 inputs only",
    "test_Embedding_sparse": "int64 input (token indices); the compiler takes float32 inputs only",
    "test_operator_non_float_params": "int64 input; the compiler takes float32 inputs only",
    "test_operator_add_broadcast": "float64 inputs; the compiler takes float32 inputs only",
    "test_operator_add_size1_broadcast": "float64 inputs; the compiler takes float32 inputs only",
    "test_operator_add_size1_right_broadcast": "float64 inputs; the compiler takes float32 inputs only",
    "test_operator_add_size1_singleton_broadcast": "float64 inputs; the compiler takes float32 inputs only",
    "test_operator_addconstant": "float64 inputs; the compiler takes float32 inputs only",
    "test_operator_sqrt": "the expected output holds NaN (square roots of negative inputs); NaN has no quantized value",
    "test_operator_pow": "the expected output holds NaN (negative bases, fractional exponents); NaN has no "
                         "quantized value",
}


def _case(path: str):
    model, calib, feeds = onnx_case(path)
    expected = [load_pb(p) for p in sorted(glob.glob(os.path.join(path, "test_data_set_0", "output_*.pb")))]
    return model, feeds, calib, expected


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("target", ["mmav2", "mmav1"])
@pytest.mark.parametrize("path", CASES, ids=[os.path.basename(c) for c in CASES])
def test_case_compiles_runs_and_matches_the_shipped_output(path, target):
    name = os.path.basename(path)
    if name in SKIP:
        pytest.skip(SKIP[name])
    model, feeds, calib, expected = _case(path)
    result = compile_model(model, target, calib)
    program = result.program
    outputs = program.run(feeds)
    x_hat = {n: dequantize(quantize(x, program.tensors[n].scale, program.tensors[n].zero_point,
                                    program.tensors[n].dtype), program.tensors[n].scale, program.tensors[n].zero_point)
             for n, x in feeds.items()}
    float_outputs = _session(result.float_model).run(program.outputs, x_hat)
    layers = len(program.layers)
    assert len(program.outputs) == len(expected)
    for out_name, want, from_x_hat in zip(program.outputs, expected, float_outputs):
        got = outputs[out_name].reshape(want.shape)
        info = program.tensors[out_name]
        if info.dtype in RAW_DTYPES:
            np.testing.assert_array_equal(got, want)
            continue
        step = float(info.scale[0])
        propagated = float(np.abs(from_x_hat.reshape(want.shape) - want).max())
        tolerance = propagated + (0.5 + 1.5 * layers) * step
        error = float(np.abs(got - want).max())
        assert error <= tolerance, (f"{name} on {target}, output {out_name}: max error {error:.4g} > {tolerance:.4g} "
                                    f"(P {propagated:.4g}, step {step:.4g}, {layers} layers)")


def test_skip_list_names_real_cases():
    assert set(SKIP) <= {os.path.basename(c) for c in CASES}


def test_a_skipped_input_type_is_a_clear_compile_error():
    path = os.path.join(DATA, "pytorch-converted", "test_Embedding")
    with pytest.raises(CompileError, match="input '0' has element type INT64"):
        compile_model(os.path.join(path, "model.onnx"), "mmav2", {"0": np.zeros((1, 4), np.float32)})


LIGHT = sorted(glob.glob(os.path.join(DATA, "light", "*.onnx")))
FAST_LIGHT = ("light_squeezenet.onnx",)


@pytest.mark.parametrize("path", LIGHT, ids=[os.path.basename(p)[6:-5] for p in LIGHT])
def test_light_zoo_graph_compiles_and_runs(path):
    if os.path.basename(path) not in FAST_LIGHT and os.environ.get("QLOWER_SLOW_TESTS") != "1":
        pytest.skip("slow (5-40 s): set QLOWER_SLOW_TESTS=1")
    model = onnx.load(path)
    inits = {i.name for i in model.graph.initializer}
    (value,) = [i for i in model.graph.input if i.name not in inits]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([2] + shape[1:]).astype(np.float32)
    result = compile_model(path, "mmav2", {value.name: x})
    outputs = result.program.run({value.name: x[:1]})
    (y,) = outputs.values()
    assert y.shape == tuple(shape[:1]) + tuple(result.program.tensors[result.program.outputs[0]].shape[1:])
    assert np.all(np.isfinite(y))
    assert len(result.report.offload.integer) > len(result.report.offload.float)
