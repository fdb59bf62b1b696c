"""A QDQ model in the PyTorch export style, built with onnx.helper (torch is not a dependency).

PyTorch's quantized export (torch.ao / pt2e, ``torch.onnx.export`` of a converted model) writes
float weights behind a QuantizeLinear -> DequantizeLinear pair (per axis, int8, zero point 0, opset
13), keeps the bias float, quantizes activations with uint8/int8 Q -> DQ pairs (asymmetric
zero points), and may leave a ReLU after the conv's Q/DQ (two roundings) or fused before it. This
fixture has all of these, plus Add, MaxPool, Reshape and a Gemm with transB=0 (weight axis 1):

    input -Q/DQ-> conv1 -Q/DQ-> Relu -Q/DQ-> conv2(+Relu) -Q/DQ-> Add(relu1, conv2) -Q/DQ-> MaxPool -Q/DQ->
    Reshape -Q/DQ-> Gemm(transB=0) -Q/DQ-> logits

Activation scales are min/max over the samples (asymmetric uint8; int8 symmetric on conv1's output).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def _float_graph(rng: np.random.Generator) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    w = {
        "conv1.w": rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32),
        "conv1.b": rng.normal(0, 0.1, 6).astype(np.float32),
        "conv2.w": rng.normal(0, 0.25, (6, 6, 3, 3)).astype(np.float32),
        "conv2.b": rng.normal(0, 0.1, 6).astype(np.float32),
        "fc.w": rng.normal(0, 0.2, (6 * 4 * 4, 5)).astype(np.float32),
        "fc.b": rng.normal(0, 0.1, 5).astype(np.float32),
        "shape": np.array([1, 6 * 4 * 4], np.int64),
    }
    w["conv1.w"][2] *= 0.1  # very different per-channel ranges, as in trained nets
    nodes = [
        helper.make_node("Conv", ["input", "conv1.w", "conv1.b"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2.w", "conv2.b"], ["conv2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Add", ["relu1", "relu2"], ["add"], name="add"),
        helper.make_node("MaxPool", ["add"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pool", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    return nodes, w


def _model(nodes, inits: dict[str, np.ndarray], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _asym_uint8(lo: float, hi: float) -> tuple[np.float32, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def pytorch_style_fixture(seed: int = 0, n_samples: int = 8):
    """(qdq_model, float_model, samples): the PyTorch-export-style QDQ model, its float twin, and
    input samples (the first half set the activation ranges)."""
    rng = np.random.default_rng(seed)
    nodes, inits = _float_graph(rng)
    float_model = _model(nodes, inits, "pytorch_style_float")
    samples = {"input": rng.normal(0, 1, (n_samples, 3, 8, 8)).astype(np.float32)}
    acts = ["input", "conv1", "relu1", "relu2", "add", "pool", "flat", "logits"]
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    for name in acts[1:-1]:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in session.get_outputs()]
    values = {k: [] for k in outs + ["input"]}
    for i in range(n_samples // 2):
        feed = {"input": samples["input"][i:i + 1]}
        values["input"].append(feed["input"])
        for k, v in zip(outs, session.run(outs, feed)):
            values[k].append(v)
    ranges = {k: (float(np.min(v)), float(np.max(v))) for k, v in values.items()}

    qnodes, qinits = [], {k: v for k, v in inits.items() if not k.endswith(".w")}
    rename = {}

    def qdq_act(tensor: str, dtype: str = "uint8", share: str | None = None) -> str:
        key = share or tensor
        if f"{key}.scale" not in qinits:
            lo, hi = ranges[key]
            if dtype == "int8":
                scale, zp = np.float32(max(abs(lo), abs(hi)) / 127.0), 0
                qinits[f"{key}.zp"] = np.array(zp, np.int8)
            else:
                scale, zp = _asym_uint8(lo, hi)
                qinits[f"{key}.zp"] = np.array(zp, np.uint8)
            qinits[f"{key}.scale"] = np.array(scale, np.float32)
        out = tensor if tensor == "logits" else f"{tensor}.dq"
        src = "logits.pre" if tensor == "logits" else tensor
        qnodes.append(helper.make_node("QuantizeLinear", [src, f"{key}.scale", f"{key}.zp"], [f"{tensor}.q"],
                                       name=f"{tensor}.quant"))
        qnodes.append(helper.make_node("DequantizeLinear", [f"{tensor}.q", f"{key}.scale", f"{key}.zp"], [out],
                                       name=f"{tensor}.dequant"))
        rename[tensor] = out
        return out

    def qdq_weight(name: str, axis: int) -> str:
        w = inits[name]
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        qinits[f"{name}.scale"] = (amax / 127.0).astype(np.float32)
        qinits[f"{name}.zp"] = np.zeros(w.shape[axis], np.int8)
        qinits[f"{name}.float"] = w
        qnodes.append(helper.make_node("QuantizeLinear", [f"{name}.float", f"{name}.scale", f"{name}.zp"],
                                       [f"{name}.q"], name=f"{name}.quant", axis=axis))
        qnodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.scale", f"{name}.zp"], [name],
                                       name=f"{name}.dequant", axis=axis))
        return name

    qdq_act("input")
    qdq_weight("conv1.w", 0)
    qdq_weight("conv2.w", 0)
    qdq_weight("fc.w", 1)
    for node in nodes:
        node = helper.make_node(node.op_type, [rename.get(i, i) for i in node.input],
                                ["logits.pre" if o == "logits" else o for o in node.output], name=node.name,
                                **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        qnodes.append(node)
        out = node.output[0]
        if out == "conv1":
            qdq_act("conv1", "int8")  # a ReLU after the conv's Q/DQ: two roundings
        elif out == "conv2":
            continue  # conv2 + ReLU fused before the Q, as torch's fused ConvReLU2d exports
        elif out in ("pool", "flat"):
            qdq_act(out, share="add")  # pass-through ops keep their input's scale
        else:
            qdq_act("logits" if out == "logits.pre" else out)
    qdq_model = _model(qnodes, qinits, "pytorch_style_qdq")
    return qdq_model, float_model, samples


TORCH_FIXTURE_INPUT = (1, 3, 8, 8)


def export_torch_qat(path: str, float_path: str | None = None, seed: int = 0, n_calib: int = 8) -> None:
    """Export a small quantization-aware model with real PyTorch (``pip install torch``; not a test
    dependency) to ``path``: torch's own ONNX symbolics turn ``fake_quantize_per_tensor_affine``
    (activations, uint8, min/max observed on ``n_calib`` samples) and
    ``fake_quantize_per_channel_affine`` (weights, int8 per output channel, zero point 0) into
    QuantizeLinear -> DequantizeLinear pairs at opset 13, as a torch.ao QAT model exports:

        input -FQ-> conv1 -> ReLU -FQ-> conv2 -FQ-> Add(relu1) -> ReLU -FQ-> MaxPool -FQ->
        AdaptiveAvgPool(1) -FQ-> Flatten -> Linear -FQ-> logits

    ``float_path``, if given, receives the same network with every fake-quantization off (the float
    reference for accuracy).
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class FakeQuant(nn.Module):
        """Observes min/max in mode "observe"; fake-quantizes to uint8 (asymmetric) in "quant";
        passes through in "off"."""

        def __init__(self):
            super().__init__()
            self.mode, self.lo, self.hi = "observe", 0.0, 0.0
            self.scale, self.zero_point = 1.0, 0

        def forward(self, x):
            if self.mode == "observe":
                self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
            if self.mode != "quant":
                return x
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)

        def freeze(self, like: FakeQuant | None = None):
            src = like or self
            self.scale = (src.hi - src.lo) / 255.0
            self.zero_point = int(min(255, max(0, round(-src.lo / self.scale))))
            self.mode = "quant"

    quantize_weights = [True]

    def fq_weight(w):
        if not quantize_weights[0]:
            return w
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127.0).float()
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32),
                                                      0, -128, 127)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)
            self.fq = nn.ModuleList(FakeQuant() for _ in range(7))

        def forward(self, x):
            fq = self.fq
            x = fq[0](x)
            r1 = fq[1](torch.relu(nn.functional.conv2d(x, fq_weight(self.conv1.weight), self.conv1.bias, padding=1)))
            c2 = fq[2](nn.functional.conv2d(r1, fq_weight(self.conv2.weight), self.conv2.bias, padding=1))
            a = fq[3](torch.relu(c2 + r1))
            p = fq[4](nn.functional.max_pool2d(a, 2))
            g = fq[5](nn.functional.adaptive_avg_pool2d(p, 1))
            return fq[6](nn.functional.linear(torch.flatten(g, 1), fq_weight(self.fc.weight), self.fc.bias))

    net = Net().eval()
    with torch.no_grad():
        for _ in range(n_calib):
            net(torch.randn(*TORCH_FIXTURE_INPUT))
    for i, f in enumerate(net.fq):
        f.freeze(net.fq[3] if i == 4 else None)  # MaxPool keeps its input's encoding
    # The weight scales stay in the graph as Abs -> ReduceMax -> Div of the weights: constant
    # subgraphs that qlower folds before importing the QDQ.
    example = (torch.randn(*TORCH_FIXTURE_INPUT),)
    torch.onnx.export(net, example, path, opset_version=13, dynamo=False, input_names=["input"],
                      output_names=["logits"])
    if float_path:
        for f in net.fq:
            f.mode = "off"
        quantize_weights[0] = False
        torch.onnx.export(net, example, float_path, opset_version=13, dynamo=False, input_names=["input"],
                          output_names=["logits"])


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="write the PyTorch-style QDQ fixture (onnx.helper), or with "
                                                 "--torch a real PyTorch QAT export")
    parser.add_argument("--out", required=True)
    parser.add_argument("--torch", action="store_true", help="export with real PyTorch (needs torch installed)")
    parser.add_argument("--float-out", help="with --torch: also write the float twin here")
    args = parser.parse_args()
    if args.torch:
        export_torch_qat(args.out, args.float_out)
    else:
        onnx.save(pytorch_style_fixture()[0], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
