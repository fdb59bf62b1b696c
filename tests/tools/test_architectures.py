"""The full-size architectures: valid opset-13 models of the published layer counts that run in
onnxruntime with sane activations, and that qlower compiles and runs (ResNet-50's compile is left
to tools/benchmark.py: it takes ~20 s)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from compiler.api import compile_model
from tools.architectures import ARCHITECTURES
from tools.model_zoo import calibration_samples

# name -> (Conv nodes, depthwise Conv nodes, parameters in millions as published)
EXPECTED = {
    "resnet18": (20, 0, 11.69),
    "resnet50": (53, 0, 25.56),
    "mobilenetv2": (52, 17, 3.50),
    "efficientnet_lite0": (49, 16, 4.65),
}
COMPILED = ["resnet18", "mobilenetv2", "efficientnet_lite0"]


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = ARCHITECTURES[name]()
    return models[name]


def _run(model, outputs, x):
    """Float outputs one sample at a time (the models have a static batch of 1)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate(parts) for parts in
            zip(*[sess.run(outputs, {"input": x[i:i + 1]}) for i in range(len(x))])]


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                          for n in names)
    return m


def test_registry_matches_expected():
    assert sorted(EXPECTED) == sorted(n for n in ARCHITECTURES if n in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_structure_checker_and_onnxruntime(models, name):
    model = _model(models, name)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (inp,) = model.graph.input
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, 224, 224]
    assert [o.name for o in model.graph.output] == ["logits"]

    ops = collections.Counter(n.op_type for n in model.graph.node)
    convs, depthwise, params_m = EXPECTED[name]
    assert ops["Conv"] == convs
    assert ops["BatchNormalization"] == convs  # every conv is followed by its own BN
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dw = [n for n in model.graph.node if n.op_type == "Conv"
          and inits[n.input[1]].shape[1] == 1 and inits[n.input[1]].shape[0] > 1]
    assert len(dw) == depthwise
    learned = sum(v.size for k, v in inits.items()
                  if not k.endswith((".mean", ".var", ".min", ".max")))
    assert learned / 1e6 == pytest.approx(params_m, abs=0.01)
    if name in ("mobilenetv2", "efficientnet_lite0"):
        assert ops["Clip"] > 0 and ops["Relu"] == 0  # ReLU6 as Clip(0, 6)

    # BN inputs are steered to unit-order variance; the network's tensors stay finite and bounded
    x = calibration_samples(model, 2, seed=11)["input"]
    probes = [n.output[0] for n in model.graph.node if n.op_type in ("Add", "Relu", "Clip")][-6:]
    logits, *acts = _run(_with_outputs(model, probes), ["logits"] + probes, x)
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert np.abs(logits).max() < 100
    assert (logits.std(axis=0) > 0).mean() > 0.99  # logits depend on the input
    for probe, a in zip(probes, acts):
        assert np.isfinite(a).all() and 1e-3 < a.std() < 20, (probe, a.std())


def test_rebuild_is_deterministic(models):
    again = ARCHITECTURES["mobilenetv2"]()
    assert again.SerializeToString(deterministic=True) == _model(models, "mobilenetv2").SerializeToString(
        deterministic=True)


@pytest.mark.parametrize("name", COMPILED)
def test_compiles_for_mmav2_and_runs(models, name):
    model = _model(models, name)
    calib = calibration_samples(model, 2, seed=1)
    result = compile_model(model, "mmav2", calib)
    layers = collections.Counter(layer.op for layer in result.program.layers)
    assert layers["conv"] == EXPECTED[name][0]  # BN folded, activations fused: one layer per conv
    x = calibration_samples(model, 2, seed=2)["input"]
    got = result.program.run({"input": x})["logits"]
    (want,) = _run(model, ["logits"], x)
    assert got.shape == want.shape == (2, 1000)
    sqnr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want).astype(np.float64) ** 2))
    assert sqnr > 10, sqnr  # 8-bit with 2 calibration samples: coarse, but the same function
