"""Pre-quantized QDQ models: make them with onnxruntime's ``quantize_static`` and measure qlower on them.

For each fixture (a zoo model quantized by onnxruntime with the given options, or the PyTorch-style
fixture), compile it with qlower (no calibration data: the QDQ scales are used) and report:
the per-layer mismatch count against onnxruntime running that same QDQ model with optimizations
off (``compiler.prequantized.check_layers_against_source``) and whether every mismatch is a genuine
tie, and the end-to-end SQNR against the float model of the runtime and of onnxruntime on the QDQ model.

    python -m tools.prequantized_report [--samples 8] [--target mmav2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from compiler.api import compile_model
from compiler.metrics import sqnr_db
from compiler.onnx_runner import make_session
from compiler.prequantized import check_layers_against_source
from compiler.verify import check_layers
from passes.pipeline import run_default_pipeline
from tools import model_zoo


@dataclass(frozen=True)
class OrtOptions:
    """The ``quantize_static`` options of one fixture."""

    per_channel: bool = True
    activation: str = "uint8"  # uint8 | int8 | uint16 | int16
    weight: str = "int8"
    symmetric_activations: bool = False
    quantize_bias: bool = True  # False: biases stay float (QuantizeBias=False)

    @property
    def label(self) -> str:
        return (f"{'per-channel' if self.per_channel else 'per-tensor'} act={self.activation} w={self.weight}"
                + (" ActivationSymmetric" if self.symmetric_activations else "")
                + ("" if self.quantize_bias else " float-bias"))


def folded_float_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The zoo model with BatchNorm folded (qlower's own pipeline; annotations stripped): what a
    user quantizes after onnxruntime's pre-processing."""
    folded = run_default_pipeline(model).model
    for node in folded.graph.node:
        del node.metadata_props[:]
    return folded


def decoder_net(seed: int = 0) -> onnx.ModelProto:
    """A small float net with the ops the zoo lacks: Conv+Relu -> ConvTranspose(stride 2)+Relu ->
    Resize(nearest, x0.5) -> Concat(with the conv output) -> Reshape -> Gemm (opset 13)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(0, .3, (6, 3, 3, 3)), "b1": rng.normal(0, .1, 6), "wt": rng.normal(0, .3, (6, 4, 2, 2)),
             "bt": rng.normal(0, .1, 4), "roi": np.zeros(0), "scales": np.array([1, 1, .5, .5]),
             "wf": rng.normal(0, .1, (5, 640)), "bf": np.zeros(5)}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    inits["shape"] = np.array([1, 640], np.int64)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["t"], name="up", strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["ta"], name="relu2"),
             helper.make_node("Resize", ["ta", "roi", "scales"], ["down"], name="resize", mode="nearest"),
             helper.make_node("Concat", ["down", "a"], ["cat"], name="cat", axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "decoder_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def grouped_transpose_net(seed: int = 0, group: int = 2) -> onnx.ModelProto:
    """Conv+Relu -> grouped ConvTranspose (stride 2, 6 -> 6 channels, ``group`` groups; weight
    [6, 6/group, 2, 2]) with a bias, opset 13. The weight's channels along axis 1 have very
    different ranges (x1, x3, x0.2), so per-channel scales differ and a bias scale taken from the
    wrong channel shows. onnxruntime's ``quantize_static`` cannot quantize its bias per channel
    (it divides the 6 biases by the 6/group weight scales): quantize it with ``quantize_bias=False``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c_out_g = 6 // group
    spread = np.resize(np.array([1.0, 3.0, 0.2]), c_out_g).reshape(1, c_out_g, 1, 1)
    inits = {"w1": rng.normal(0, .3, (6, 3, 3, 3)), "b1": rng.normal(0, .1, 6),
             "wt": rng.normal(0, .3, (6, c_out_g, 2, 2)) * spread, "bt": rng.normal(0, .5, 6)}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["up_out"], name="up", strides=[2, 2], group=group)]
    graph = helper.make_graph(nodes, "grouped_transpose_net",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("up_out", TensorProto.FLOAT, [1, 6, 16, 16])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def decoder_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)}


def ort_qdq_model(model: onnx.ModelProto, samples: dict[str, np.ndarray], options: OrtOptions) -> onnx.ModelProto:
    """``model`` quantized by onnxruntime's ``quantize_static`` in QDQ format over ``samples``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16,
             "int16": QuantType.QInt16}

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(samples.values())))
            self.feeds = iter([{k: v[i:i + 1] for k, v in samples.items()} for i in range(n)])

        def get_next(self):
            return next(self.feeds, None)

    wide = options.activation.endswith("16") or options.weight.endswith("16")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "qdq.onnx")
        source = model
        if wide:  # 16-bit Q/DQ needs opset 21
            source = onnx.ModelProto()
            source.CopyFrom(model)
            for op in source.opset_import:
                if op.domain in ("", "ai.onnx"):
                    op.version = 21
            source.ir_version = max(source.ir_version, 10)
        onnx.save(source, src)
        extra = {"ActivationSymmetric": options.symmetric_activations, "QuantizeBias": options.quantize_bias}
        if wide:
            extra["UseQDQContribOps"] = False
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
                        activation_type=types[options.activation], weight_type=types[options.weight],
                        extra_options=extra)
        return onnx.load(dst)


def run_rows(session, samples: dict[str, np.ndarray], output: str) -> np.ndarray:
    n = len(next(iter(samples.values())))
    return np.concatenate([session.run([output], {k: v[i:i + 1] for k, v in samples.items()})[0] for i in range(n)])


@dataclass
class Measurement:
    fixture: str
    target: str
    layers: int
    mismatches: int
    unexcused: int
    elements: int
    sqnr_runtime: float
    sqnr_ort_qdq: float
    sqnr_runtime_vs_ort: float
    reference: str = "source QDQ"
    sqnr_ort_source: float | None = None


def measure(name: str, qdq: onnx.ModelProto, float_model: onnx.ModelProto, samples: dict[str, np.ndarray],
            target: str = "mmav2", snap_scales: bool = False) -> tuple[Measurement, object]:
    """Compile ``qdq`` (no calibration) and compare it with onnxruntime on the same QDQ model. With
    ``snap_scales`` the scales change, so the reference is the QDQ model qlower emits for the
    snapped scales (``compiler.verify.check_layers``); the source model's SQNR is kept beside it."""
    result = compile_model(qdq, target, snap_scales=snap_scales)
    feeds = {k: v[:1] for k, v in samples.items()}
    checks = check_layers(result, feeds) if snap_scales else check_layers_against_source(result, feeds)
    reference = result.qdq_model if snap_scales else qdq
    out = result.program.outputs[0]
    ref = run_rows(make_session(float_model, optimize=False), samples, out)
    ort_q = run_rows(make_session(reference, optimize=False), samples, out)
    ours = result.program.run(samples)[out]
    m = Measurement(name, target, len(checks), sum(c.mismatches for c in checks), sum(c.unexcused for c in checks),
                    sum(c.elements for c in checks), sqnr_db(ref, ours), sqnr_db(ref, ort_q), sqnr_db(ort_q, ours))
    if snap_scales:
        m.reference = "own QDQ (snapped)"
        m.sqnr_ort_source = sqnr_db(ref, run_rows(make_session(qdq, optimize=False), samples, out))
    return m, result


FIXTURES = [
    OrtOptions(per_channel=True, activation="uint8"),
    OrtOptions(per_channel=False, activation="uint8"),
    OrtOptions(per_channel=True, activation="int8"),
    OrtOptions(per_channel=True, activation="int8", symmetric_activations=True),
    OrtOptions(per_channel=False, activation="uint8", symmetric_activations=True),
    OrtOptions(per_channel=True, activation="uint16", weight="int8"),
    OrtOptions(per_channel=True, activation="int16", weight="int16", symmetric_activations=True),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="evaluation samples (calibration uses 8 others)")
    parser.add_argument("--models", nargs="*", default=["resnet_tiny", "mobilenetv2_tiny", "gemm_head_net"])
    args = parser.parse_args(argv)
    print(f"{'fixture':<64} {'target':<6} {'layers':>6} {'mismatch':>8} {'unexcused':>9} "
          f"{'SQNR rt':>8} {'SQNR ort':>8} {'rt~ort':>7}  reference")
    rows = []
    for model_name in args.models:
        model = model_zoo.MODELS[model_name]()
        float_model = folded_float_model(model)
        calib = model_zoo.calibration_samples(model, 8, seed=0)
        evaluation = model_zoo.calibration_samples(model, args.samples, seed=1)
        for options in FIXTURES:
            qdq = ort_qdq_model(float_model, calib, options)
            rows.append(measure(f"{model_name} {options.label}", qdq, model, evaluation)[0])
        sym = ort_qdq_model(float_model, calib, OrtOptions(per_channel=False, activation="int8",
                                                           symmetric_activations=True))
        rows.append(measure(f"{model_name} per-tensor act=int8 sym, --snap-scales", sym, model, evaluation,
                            target="mmav1", snap_scales=True)[0])
    decoder = decoder_net()
    for options in FIXTURES[:5]:
        qdq = ort_qdq_model(decoder, decoder_samples(8, 0), options)
        rows.append(measure(f"decoder_net {options.label}", qdq, decoder, decoder_samples(args.samples, 1))[0])
    for group in (2, 3):  # per-channel weights on axis 1 hold C_out/group scales; biases stay float in ORT
        net = grouped_transpose_net(group=group)
        qdq = ort_qdq_model(net, decoder_samples(8, 0), OrtOptions(quantize_bias=False))
        rows.append(measure(f"grouped ConvTranspose group={group} per-channel act=uint8 float-bias", qdq, net,
                            decoder_samples(args.samples, 1))[0])
    from tools.make_torch_qdq import pytorch_style_fixture

    fixture, float_fixture, samples = pytorch_style_fixture()
    rows.append(measure("pytorch-style (onnx.helper, opset 13 per-axis)", fixture, float_fixture, samples)[0])
    fixtures = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "compiler", "fixtures")
    torch_samples = {"input": np.random.default_rng(3).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    rows.append(measure("torch 2.13 QAT export (tests/compiler/fixtures/torch_qat_tiny.onnx)",
                        onnx.load(os.path.join(fixtures, "torch_qat_tiny.onnx")),
                        onnx.load(os.path.join(fixtures, "torch_qat_tiny.float.onnx")), torch_samples)[0])
    for m in rows:
        extra = f" (ORT on the source QDQ: {m.sqnr_ort_source:.2f} dB)" if m.sqnr_ort_source is not None else ""
        print(f"{m.fixture:<64} {m.target:<6} {m.layers:>6} {m.mismatches:>8} {m.unexcused:>9} "
              f"{m.sqnr_runtime:>8.2f} {m.sqnr_ort_qdq:>8.2f} {m.sqnr_runtime_vs_ort:>7.1f}  {m.reference}{extra}")
    print("columns: per-layer mismatches over all layers fed the reference QDQ model's integers (one sample), "
          "how many are not genuine ties; end-to-end SQNR (dB) vs the float model of the runtime and of "
          "onnxruntime on the reference QDQ model (optimizations off), and of the runtime vs that ORT output")
    return 0 if all(m.unexcused == 0 for m in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
