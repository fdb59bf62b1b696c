"""The model zoo: valid opset-13 models that run in onnxruntime, with non-trivial BatchNorm
statistics, sane activations and logits that vary with the input; the examples regenerate
byte for byte."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tools import make_examples, model_zoo
from tools.model_zoo import MODELS, calibration_samples

N_SAMPLES = 24


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
    name = request.param
    model = MODELS[name]()
    samples = calibration_samples(model, N_SAMPLES, seed=7)
    names = [n.output[0] for n in model.graph.node]
    acts = dict(zip(names, model_zoo._run(model, names, samples)))
    return name, model, samples, acts


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_checker_opset_and_interface(built):
    _name, model, _, _ = built
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (inp,) = model.graph.input
    assert inp.name == "input"
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert len(dims) == 4 and dims[:2] == [1, 3] and all(d > 0 for d in dims)
    assert [o.name for o in model.graph.output] == ["logits"]
    node_names = [n.name for n in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)


def test_runs_in_onnxruntime_with_finite_varied_logits(built):
    _name, model, samples, _ = built
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = samples["input"]
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert logits.shape == (N_SAMPLES, 10)
    assert np.isfinite(logits).all()
    # every class's logit moves with the input (not a constant network)
    assert logits.std(axis=0).min() > 0.05, logits.std(axis=0)


def test_activations_sane_and_features_not_dominated(built):
    _name, _model, _, acts = built
    for tensor, a in acts.items():
        assert np.isfinite(a).all(), tensor
        assert np.abs(a).max() < 50, (tensor, np.abs(a).max())
    # the features the head reads: no single channel carries most of the signal
    head_in = acts["flatten"]
    energy = (head_in ** 2).mean(axis=0)
    assert energy.max() / energy.sum() < 0.25
    # no ReLU/ReLU6 output is dead everywhere for most channels
    for tensor, a in acts.items():
        if tensor.endswith((".relu", ".relu6")):
            axes = tuple(i for i in range(a.ndim) if i != 1)
            alive = (a.max(axis=axes) > 0).mean()
            assert alive > 0.9, (tensor, alive)


def test_batchnorm_statistics_non_trivial(built):
    _name, model, _, acts = built
    inits = _inits(model)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) >= 5
    producers = {n.output[0]: n for n in model.graph.node}
    gammas = []
    for bn in bns:
        gamma, beta, mean, var = (inits[i] for i in bn.input[1:])
        assert producers[bn.input[0]].op_type in ("Conv", "Gemm"), bn.name
        gammas.append(gamma)
        assert np.abs(mean).max() > 0.3, bn.name  # running mean far from 0
        assert np.ptp(beta) > 0.1, bn.name
        assert 0.25 <= var.min() and var.max() <= 3.5 and np.ptp(var) > 0.3, bn.name
        # statistics match the data the layer sees (as after training), up to the deliberate
        # mismatch and the sampling noise of a few dozen samples (large for a Gemm's BN, which
        # sees one value per sample and channel)
        x = acts[bn.input[0]]
        axes = tuple(i for i in range(x.ndim) if i != 1)
        mean_err = np.abs(x.mean(axis=axes) - mean) / np.sqrt(var)
        assert np.median(mean_err) < 0.5 and mean_err.max() < 1.5, (bn.name, mean_err)
        ratio = x.var(axis=axes) / var
        assert 0.67 < np.median(ratio) < 1.5 and ratio.min() > 0.2 and ratio.max() < 5, (
            bn.name, ratio)
    gammas = np.concatenate(gammas)
    assert (gammas < 0).any() and (gammas > 0).any()


def test_structure_per_model(built):
    name, model, _, _ = built
    ops = [n.op_type for n in model.graph.node]
    inits = _inits(model)
    if name == "resnet_tiny":
        for op in ("MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Relu"):
            assert op in ops, op
        proj = [n for n in model.graph.node if n.op_type == "Conv" and
                inits[n.input[1]].shape[2:] == (1, 1)]
        assert proj and any(a.name == "strides" and list(a.ints) == [2, 2]
                            for a in proj[0].attribute)
    elif name == "mobilenetv2_tiny":
        clips = [n for n in model.graph.node if n.op_type == "Clip"]
        assert clips and all(inits[n.input[1]] == 0 and inits[n.input[2]] == 6 for n in clips)
        groups = {n.name: a.i for n in model.graph.node for a in n.attribute
                  if n.op_type == "Conv" and a.name == "group" and a.i > 1}
        assert len(groups) >= 5  # depthwise convs: group = channels, one input channel each
        for n in model.graph.node:
            if n.name in groups:
                assert inits[n.input[1]].shape[:2] == (groups[n.name], 1), n.name
        assert ops.count("Add") >= 2 and "GlobalAveragePool" in ops and "Gemm" in ops
    elif name == "gemm_head_net":
        assert ops.count("Gemm") == 2 and "Concat" in ops
        (avg,) = [n for n in model.graph.node if n.op_type == "AveragePool"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in avg.attribute}
        assert attrs["pads"] == [1, 1, 1, 1] and attrs["count_include_pad"] == 1


def test_builders_are_deterministic_and_seeded():
    a = model_zoo.gemm_head_net(seed=3).SerializeToString()
    assert a == model_zoo.gemm_head_net(seed=3).SerializeToString()
    assert a != model_zoo.gemm_head_net(seed=4).SerializeToString()


def test_calibration_samples_image_like():
    model = model_zoo.resnet_tiny()
    s = calibration_samples(model, 8, seed=0)
    assert list(s) == ["input"]
    x = s["input"]
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, calibration_samples(model, 8, seed=0)["input"])
    assert not np.array_equal(x, calibration_samples(model, 8, seed=1)["input"])
    # smooth: horizontal neighbours strongly correlated (white noise would give ~0)
    corr = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert corr > 0.8
    # per-channel offsets, the same distribution for every seed
    means = calibration_samples(model, 64, seed=2)["input"].mean(axis=(0, 2, 3))
    assert np.ptp(means) > 0.3
    assert np.abs(x.mean(axis=(0, 2, 3)) - means).max() < 0.3
    assert 0.2 < x.std() < 2.0


def test_cli_writes_model_and_calibration(tmp_path):
    out, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    assert model_zoo.main(["gemm_head_net", "--out", str(out), "--calib", str(calib),
                           "--samples", "5"]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    with np.load(calib, allow_pickle=False) as data:
        assert list(data) == ["input"] and data["input"].shape == (5, 3, 16, 16)


def test_make_examples_deterministic_and_small(tmp_path):
    first = make_examples.make_examples(tmp_path / "a")
    second = make_examples.make_examples(tmp_path / "b")
    assert [p.name for p in first] == ["mobilenetv2_tiny.onnx", "mobilenetv2_tiny_calib.npz",
                                       "mobilenetv2_tiny_eval.npz"]
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), p.name
        assert p.stat().st_size < 1_000_000, p.name
    with np.load(first[1], allow_pickle=False) as calib, np.load(first[2]) as evals:
        assert calib["input"].shape == evals["input"].shape == (16, 3, 32, 32)
        assert not np.array_equal(calib["input"], evals["input"])


def test_bundled_examples_are_current(tmp_path):
    """The checked-in examples are what make_examples writes (numerically: onnxruntime kernels
    may differ in the last bits between CPUs, and the BN statistics are rounded to 3-4
    significant digits, so a weight may differ by one step in the 3rd digit)."""
    fresh = make_examples.make_examples(tmp_path)
    for path in fresh:
        bundled = make_examples.EXAMPLES_DIR / path.name
        assert bundled.exists(), f"{bundled} missing: run python -m tools.make_examples"
        if path.suffix == ".npz":
            with np.load(path) as a, np.load(bundled) as b:
                np.testing.assert_allclose(a["input"], b["input"], rtol=0, atol=1e-5)
        else:
            a, b = onnx.load(str(path)), onnx.load(str(bundled))
            assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
            ia, ib = _inits(a), _inits(b)
            assert ia.keys() == ib.keys()
            for k in ia:
                np.testing.assert_allclose(ia[k], ib[k], rtol=2e-3, atol=1e-6, err_msg=k)
