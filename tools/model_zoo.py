"""A small zoo of float CNNs built with onnx.helper (no torch): test models and the bundled example.

Every builder returns an opset-13 ``onnx.ModelProto`` with one static NCHW float input named
``input`` (batch 1), one output ``logits``, and a name on every node. Weights are He-initialised
from a seeded ``numpy.random.Generator``.

BatchNormalization stays a separate node with statistics the way training leaves them, so that
folding it is not a no-op: the running mean and variance are *measured* on image-like samples
(see ``calibration_samples``) layer by layer in onnxruntime, with a small deliberate mismatch;
before measuring, each conv's weights are rescaled per output channel so that the variance it
produces lands on a random target in [0.3, 3] (per-channel weight scales differ, as in trained
nets). gamma is random with some negative entries and beta is random. The measured statistics are
rounded to a few significant digits so that a rebuild gives the same bytes.

    python -m tools.model_zoo mobilenetv2_tiny --out m.onnx --calib calib.npz --samples 32
"""
from __future__ import annotations

import argparse
import io
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.calibration_data import model_input_specs

OPSET = 13
IR_VERSION = 8  # the lowest IR version that opset 13 allows; read by every onnxruntime since 1.10
BN_SAMPLES = 64  # image-like samples the BatchNormalization statistics are measured on


# --------------------------------------------------------------------------- graph building


@dataclass
class _PendingBN:
    """A BatchNormalization whose running statistics are still to be measured."""

    node: str
    x: str  # the tensor it normalises (the producer's output)
    weight: str  # producer's weight initializer, output channel on axis 0
    bias: str | None  # producer's bias initializer, if any
    target_var: np.ndarray
    mean_jitter: np.ndarray  # running-mean mismatch, in units of the channel's std
    var_jitter: np.ndarray  # running-variance mismatch, a factor


class _Net:
    """Accumulates nodes and initializers; tensor names equal the names of the nodes making them."""

    def __init__(self, name: str, seed: int, input_shape: tuple[int, ...], doc: str):
        self.name = name
        self.seed = seed
        self.doc = doc
        self.rng = np.random.default_rng(seed)
        self.input_shape = input_shape
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.bns: list[_PendingBN] = []
        self.output: str | None = None

    # -- primitives
    def param(self, name: str, value) -> str:
        assert name not in self.inits, name
        self.inits[name] = np.asarray(value, dtype=np.float32)
        return name

    def node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # -- layers
    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, stride: int = 1,
             group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))
        return self.node("Conv", [x, self.param(f"{name}.weight", w)], name, kernel_shape=[k, k],
                         strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, channels: int, name: str, weight: str, bias: str | None = None,
           gamma_scale: float = 1.0) -> str:
        """A BatchNormalization with random affine terms; statistics measured later."""
        rng = self.rng
        sign = np.where(rng.random(channels) < 0.15, -1.0, 1.0)
        gamma = sign * rng.uniform(0.5, 1.5, channels) * gamma_scale
        beta = rng.normal(0.1, 0.3, channels)
        target_var = np.exp(rng.uniform(np.log(0.3), np.log(3.0), channels))
        self.bns.append(_PendingBN(name, x, weight, bias, target_var,
                                   mean_jitter=rng.normal(0.0, 0.1, channels),
                                   var_jitter=rng.uniform(0.85, 1.15, channels)))
        inputs = [x, self.param(f"{name}.scale", gamma), self.param(f"{name}.bias", beta),
                  self.param(f"{name}.mean", np.zeros(channels)),
                  self.param(f"{name}.var", np.ones(channels))]
        return self.node("BatchNormalization", inputs, name, epsilon=1e-5, momentum=0.9)

    def conv_bn(self, x: str, cin: int, cout: int, name: str, act: str | None, k: int = 3,
                stride: int = 1, group: int = 1, gamma_scale: float = 1.0) -> str:
        y = self.conv(x, cin, cout, f"{name}.conv", k=k, stride=stride, group=group)
        y = self.bn(y, cout, f"{name}.bn", f"{name}.conv.weight", gamma_scale=gamma_scale)
        if act == "relu":
            y = self.relu(y, f"{name}.relu")
        elif act == "relu6":
            y = self.relu6(y, f"{name}.relu6")
        return y

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        """Clip(0, 6) with constant min and max inputs, as PyTorch exports ReLU6 at opset >= 11."""
        lo = self.param(f"{name}.min", np.float32(0.0))
        hi = self.param(f"{name}.max", np.float32(6.0))
        return self.node("Clip", [x, lo, hi], name)

    def gemm(self, x: str, fin: int, fout: int, name: str, out: str | None = None) -> str:
        w = self.rng.normal(0.0, np.sqrt(2.0 / fin), (fout, fin))
        b = self.rng.normal(0.0, 0.05, fout)
        inputs = [x, self.param(f"{name}.weight", w), self.param(f"{name}.bias", b)]
        return self.node("Gemm", inputs, name, out=out, transB=1)

    def classifier(self, x: str, features: int, num_classes: int) -> str:
        y = self.node("GlobalAveragePool", [x], "pool")
        y = self.node("Flatten", [y], "flatten", axis=1)
        return self.gemm(y, features, num_classes, "fc", out="logits")

    # -- finishing
    def proto(self, outputs: list[str] | None = None) -> onnx.ModelProto:
        """The model as it stands (statistics possibly not yet measured)."""
        assert self.output is not None
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.input_shape))
        outs = [helper.make_tensor_value_info(self.output, TensorProto.FLOAT, None)]
        graph = helper.make_graph(
            self.nodes, self.name, [inp], outs,
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="qlower.tools.model_zoo", doc_string=self.doc)
        model.ir_version = IR_VERSION
        return model

    def finish(self, output: str) -> onnx.ModelProto:
        self.output = output
        self._measure_bn_statistics()
        model = onnx.shape_inference.infer_shapes(self.proto(), strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model

    def _measure_bn_statistics(self) -> None:
        """Set each BatchNormalization's running statistics from the tensor it sees, in graph order
        (each measurement runs the network with all earlier BNs already set)."""
        probe = self.proto()
        samples = calibration_samples(probe, BN_SAMPLES, seed=_stream(self.seed, 1))
        for pending in self.bns:
            (acts,) = _run(self.proto(), [pending.x], samples)
            axes = tuple(i for i in range(acts.ndim) if i != 1)
            mean = acts.mean(axis=axes, dtype=np.float64)
            var = acts.var(axis=axes, dtype=np.float64)
            factor = _round_sig(np.sqrt(pending.target_var / np.maximum(var, 1e-12)), 3)
            w = self.inits[pending.weight]
            self.inits[pending.weight] = (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(
                np.float32)
            if pending.bias is not None:
                self.inits[pending.bias] = (self.inits[pending.bias] * factor).astype(np.float32)
            std = np.sqrt(pending.target_var)
            self.inits[f"{pending.node}.mean"] = _round_sig(
                mean * factor + pending.mean_jitter * std, 4).astype(np.float32)
            self.inits[f"{pending.node}.var"] = _round_sig(
                pending.target_var * pending.var_jitter, 4).astype(np.float32)


def _round_sig(x: np.ndarray, digits: int) -> np.ndarray:
    """Round to ``digits`` significant digits (keeps a rebuild byte-identical despite last-bit
    differences between onnxruntime kernels)."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.where(x == 0, 1.0, np.abs(x))
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(mag)))
    return np.round(x * scale) / scale


def _stream(seed: int, k: int) -> int:
    """An independent seed derived from ``seed`` (so BN measurement never shares samples)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list:
    """Run ``model`` in onnxruntime on a batch of any size, returning the named tensors.
    Single-threaded and unoptimised, so the numbers do not depend on the thread count."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        inp.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                          for n in outputs)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


# --------------------------------------------------------------------------- the models


def resnet_tiny(seed: int = 0, input_size: int = 32, num_classes: int = 10) -> onnx.ModelProto:
    """A ResNet-18-shaped toy: stem conv-BN-ReLU, MaxPool, three basic blocks (the second with
    stride 2 and a 1x1 conv-BN projection shortcut), GlobalAveragePool, Flatten, Gemm."""
    net = _Net("resnet_tiny", seed, (1, 3, input_size, input_size), resnet_tiny.__doc__)
    x = net.conv_bn("input", 3, 16, "stem", act="relu")
    x = net.node("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)

    def basic_block(x: str, cin: int, cout: int, stride: int, name: str) -> str:
        y = net.conv_bn(x, cin, cout, f"{name}.1", act="relu", stride=stride)
        y = net.conv_bn(y, cout, cout, f"{name}.2", act=None, gamma_scale=0.6)
        if stride != 1 or cin != cout:
            x = net.conv_bn(x, cin, cout, f"{name}.proj", act=None, k=1, stride=stride,
                            gamma_scale=0.6)
        y = net.node("Add", [y, x], f"{name}.add")
        return net.relu(y, f"{name}.relu")

    x = basic_block(x, 16, 16, 1, "layer1")
    x = basic_block(x, 16, 32, 2, "layer2")
    x = basic_block(x, 32, 32, 1, "layer3")
    return net.finish(net.classifier(x, 32, num_classes))


# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
_MOBILENETV2_TINY_CFG = [(1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1)]


def mobilenetv2_tiny(seed: int = 0, input_size: int = 32, num_classes: int = 10) -> onnx.ModelProto:
    """A MobileNetV2-shaped toy: stem conv-BN-ReLU6 (stride 2), inverted residual blocks (1x1
    expand conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 linear projection conv-BN, residual
    Add where shapes match), 1x1 conv-BN-ReLU6, GlobalAveragePool, Flatten, Gemm. ReLU6 is
    Clip(0, 6) with constant min/max inputs."""
    net = _Net("mobilenetv2_tiny", seed, (1, 3, input_size, input_size), mobilenetv2_tiny.__doc__)
    x = net.conv_bn("input", 3, 16, "stem", act="relu6", stride=2)
    cin, index = 16, 0
    for t, c, n, s in _MOBILENETV2_TINY_CFG:
        for i in range(n):
            stride = s if i == 0 else 1
            name = f"block{index}"
            hidden = cin * t
            y = x
            if t != 1:
                y = net.conv_bn(y, cin, hidden, f"{name}.expand", act="relu6", k=1)
            y = net.conv_bn(y, hidden, hidden, f"{name}.dw", act="relu6", stride=stride,
                            group=hidden)
            y = net.conv_bn(y, hidden, c, f"{name}.project", act=None, k=1)
            if stride == 1 and cin == c:
                y = net.node("Add", [x, y], f"{name}.add")
            x, cin, index = y, c, index + 1
    x = net.conv_bn(x, cin, 128, "last", act="relu6", k=1)
    return net.finish(net.classifier(x, 128, num_classes))


def gemm_head_net(seed: int = 0, input_size: int = 16, num_classes: int = 10) -> onnx.ModelProto:
    """A conv feature extractor with two branches joined by Concat (one branch an AveragePool with
    pads, count_include_pad=1, then a 1x1 conv), MaxPool, a stride-2 conv, then Flatten and two
    Gemm layers with a BatchNormalization and ReLU between them."""
    net = _Net("gemm_head_net", seed, (1, 3, input_size, input_size), gemm_head_net.__doc__)
    x = net.conv_bn("input", 3, 16, "stem", act="relu")
    a = net.conv_bn(x, 16, 16, "branch_a", act="relu")
    b = net.node("AveragePool", [x], "branch_b.pool", kernel_shape=[3, 3], strides=[1, 1],
                 pads=[1] * 4, count_include_pad=1)
    b = net.conv_bn(b, 16, 16, "branch_b", act="relu", k=1)
    x = net.node("Concat", [a, b], "concat", axis=1)
    x = net.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = net.conv_bn(x, 32, 32, "reduce", act="relu", stride=2)
    side = (input_size // 2 + 1) // 2
    features = 32 * side * side
    x = net.node("Flatten", [x], "flatten", axis=1)
    x = net.gemm(x, features, 64, "fc1")
    x = net.bn(x, 64, "fc1.bn", "fc1.weight", bias="fc1.bias")
    x = net.relu(x, "fc1.relu")
    return net.finish(net.gemm(x, 64, num_classes, "fc2", out="logits"))


MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet_tiny": resnet_tiny,
    "mobilenetv2_tiny": mobilenetv2_tiny,
    "gemm_head_net": gemm_head_net,
}


# --------------------------------------------------------------------------- sample data


def _dataset_offsets(channels: int) -> np.ndarray:
    """Per-channel means of the synthetic 'dataset' (the same for every seed, so calibration and
    evaluation sets drawn with different seeds share one distribution)."""
    return np.random.default_rng(20240917).uniform(-0.6, 0.6, channels)


def _interp_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) linear-interpolation weights, corners aligned."""
    pos = np.linspace(0.0, coarse - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - lo
    m = np.zeros((size, coarse))
    m[np.arange(size), lo] = 1.0 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _image_like(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    """Smooth, channel-correlated images around normalised-image values (roughly -2..2): coarse
    noise (shared across channels plus per channel) upsampled bilinearly, per-sample brightness,
    the dataset's per-channel offsets, and a little fine-grained noise."""
    gh, gw = max(2, h // 8), max(2, w // 8)
    coarse = 0.7 * rng.normal(size=(n, 1, gh, gw)) + 0.5 * rng.normal(size=(n, c, gh, gw))
    smooth = np.einsum("hi,ncij,wj->nchw", _interp_matrix(h, gh), coarse, _interp_matrix(w, gw))
    brightness = rng.normal(0.0, 0.3, size=(n, 1, 1, 1))
    offsets = _dataset_offsets(c).reshape(1, c, 1, 1)
    fine = 0.05 * rng.normal(size=(n, c, h, w))
    return (offsets + brightness + 0.7 * smooth + fine).astype(np.float32)


def calibration_samples(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random but image-like samples for each model input, stacked on axis 0 (which
    replaces the model's batch axis), keyed by input name. 4-D float inputs get smooth NCHW
    images; other float inputs get smooth sequences along the last axis."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in model_input_specs(model).items():
        dims = list(shape[1:])
        if any(not isinstance(d, int) for d in dims):
            raise ValueError(f"input '{name}' has a symbolic non-batch dimension: {dims}")
        if len(dims) == 3 and np.issubdtype(dtype, np.floating):
            x = _image_like(rng, n, *dims)
        elif np.issubdtype(dtype, np.floating):
            flat = int(np.prod(dims[:-1], dtype=np.int64)) if len(dims) > 1 else 1
            last = dims[-1] if dims else 1
            x = _image_like(rng, n, 1, flat, last).reshape((n, *dims))
        else:
            x = rng.integers(0, 10, size=(n, *dims))
        feeds[name] = x.astype(dtype)
    return feeds


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` with fixed zip timestamps (numpy stamps the current time), so the same
    arrays always give the same bytes. Members are stored uncompressed, as numpy does."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))


def builder_main(registry: dict, argv: list[str] | None, prog: str, description: str,
                 default_samples: int, input_size: bool) -> int:
    """The command line of a model builder: build ``registry[name]``, write it, optionally with
    image-like calibration samples (``--calib``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("name", choices=sorted(registry))
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    if input_size:
        parser.add_argument("--input-size", type=int, default=None, help="input height and width")
    parser.add_argument("--calib", help="also write --samples image-like samples to this .npz")
    parser.add_argument("--samples", type=int, default=default_samples,
                        help=f"samples in --calib (default {default_samples})")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the samples")
    args = parser.parse_args(argv)
    kwargs = {"seed": args.seed}
    if input_size and args.input_size is not None:
        kwargs["input_size"] = args.input_size
    model = registry[args.name](**kwargs)
    save_model(model, args.out)
    print(f"wrote {args.out} ({args.name}, seed {args.seed})")
    if args.calib:
        save_npz(args.calib, calibration_samples(model, args.samples, args.calib_seed))
        print(f"wrote {args.calib} ({args.samples} samples, seed {args.calib_seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return builder_main(MODELS, argv, "python -m tools.model_zoo",
                        "Build a small float ONNX model from the zoo.", default_samples=16, input_size=True)


if __name__ == "__main__":
    raise SystemExit(main())
