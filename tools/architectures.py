"""Full-size ImageNet architectures built with onnx.helper: benchmark models of realistic shape.

Every builder returns an opset-13 ``onnx.ModelProto`` with one static float input ``input``
(1x3x224x224, NCHW) and one output ``logits`` (1x1000), names on every node, He-initialised
weights from a seeded generator, and BatchNormalization kept as separate nodes (so folding them is
exercised). The weights are random, so the models classify nothing; what they share with the
trained networks is the graph, the layer sizes and sensibly scaled activations.

BatchNormalization statistics are measured as in ``tools.model_zoo`` (each conv's output variance
is steered per channel to a random target in [0.3, 3], then the running statistics are set from
what the BN sees, with a small deliberate mismatch), but in one incremental forward pass: the
nodes added since the previous BN run in onnxruntime on cached activations of a few image-like
samples, so building ResNet-50 costs about one forward pass instead of one per BN.

    python -m tools.architectures resnet50 --out resnet50.onnx --calib calib.npz --samples 32

Other builders (``ARCHITECTURES``) may be appended below; use ``_ArchNet`` and end with
``net.finish(...)``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tools.model_zoo import (
    _image_like,
    _PendingBN,
    _round_sig,
    _stream,
    builder_main,
)
from tools.model_zoo import _Net as _ZooNet

INPUT_SIZE = 224
NUM_CLASSES = 1000
BN_SAMPLES = 2  # samples the BN statistics are measured on (2 x 224 x 224 pixels per channel)


class _ArchNet(_ZooNet):
    """A ``model_zoo._Net`` whose BatchNormalization statistics are measured while the graph is
    built: ``bn()`` first runs the pending nodes in onnxruntime (on cached activations), rescales
    the producer's weight so that the channel variance meets its target, then sets the BN's
    running mean and variance from that tensor."""

    def __init__(self, name: str, seed: int, doc: str, input_size: int = INPUT_SIZE):
        super().__init__(name, seed, (1, 3, input_size, input_size), doc)
        rng = np.random.default_rng(_stream(seed, 1))
        self._cache: dict[str, np.ndarray] = {
            "input": _image_like(rng, BN_SAMPLES, 3, input_size, input_size)}
        self._done = 0  # nodes [0, _done) have been run
        self._transient: set[str] = set()  # tensors read once, by the next node only

    def conv_bn(self, x: str, cin: int, cout: int, name: str, act: str | None, k: int = 3,
                stride: int = 1, group: int = 1, gamma_scale: float = 1.0) -> str:
        y = super().conv_bn(x, cin, cout, name, act, k=k, stride=stride, group=group,
                            gamma_scale=gamma_scale)
        self._transient.add(f"{name}.conv")  # read by its BN alone
        if act is not None:
            self._transient.add(f"{name}.bn")  # read by the activation alone
        return y

    def bn(self, x: str, channels: int, name: str, weight: str, bias: str | None = None,
           gamma_scale: float = 1.0) -> str:
        out = super().bn(x, channels, name, weight, bias=bias, gamma_scale=gamma_scale)
        pending = self.bns.pop()
        bn_node = self.nodes.pop()
        self._advance()
        self._measure(pending)
        self.nodes.append(bn_node)
        return out

    def finish(self, output: str) -> onnx.ModelProto:
        self._cache.clear()
        self.output = output
        model = onnx.shape_inference.infer_shapes(self.proto(), strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model

    def _advance(self) -> None:
        """Run nodes [_done, len(nodes)) on the cached tensors and cache what they produce
        (transient tensors consumed within the run are not kept, nor are they kept once read)."""
        todo = self.nodes[self._done:]
        if not todo:
            return
        produced = {o for n in todo for o in n.output}
        needed = [t for n in todo for t in n.input if t and t not in produced and t not in self.inits]
        needed = list(dict.fromkeys(needed))
        consumed_inside = {t for n in todo for t in n.input if t in produced}
        outputs = [o for n in todo for o in n.output
                   if not (o in self._transient and o in consumed_inside)]
        used_inits = {t for n in todo for t in n.input if t in self.inits}
        graph = helper.make_graph(
            todo, f"{self.name}_part",
            [helper.make_tensor_value_info(t, TensorProto.FLOAT, list(self._cache[t].shape))
             for t in needed],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=[numpy_helper.from_array(self.inits[t], t) for t in sorted(used_inits)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = sess.run(outputs, {t: self._cache[t] for t in needed})
        for t in needed:
            if t in self._transient:
                del self._cache[t]
        self._cache.update(zip(outputs, values))
        self._done = len(self.nodes)

    def _measure(self, pending: _PendingBN) -> None:
        """As ``model_zoo._Net._measure_bn_statistics`` for one BN, on the cached tensor."""
        acts = self._cache[pending.x]
        axes = tuple(i for i in range(acts.ndim) if i != 1)
        mean = acts.mean(axis=axes, dtype=np.float64)
        var = acts.var(axis=axes, dtype=np.float64)
        factor = _round_sig(np.sqrt(pending.target_var / np.maximum(var, 1e-12)), 3)
        w = self.inits[pending.weight]
        shape = (-1,) + (1,) * (w.ndim - 1)
        self.inits[pending.weight] = (w * factor.reshape(shape)).astype(np.float32)
        if pending.bias is not None:
            self.inits[pending.bias] = (self.inits[pending.bias] * factor).astype(np.float32)
        # the producer has no bias in these builders, so its output scales by the same factor
        self._cache[pending.x] = (acts * factor.reshape((1, -1) + (1,) * (acts.ndim - 2))).astype(
            np.float32)
        std = np.sqrt(pending.target_var)
        self.inits[f"{pending.node}.mean"] = _round_sig(
            mean * factor + pending.mean_jitter * std, 4).astype(np.float32)
        self.inits[f"{pending.node}.var"] = _round_sig(
            pending.target_var * pending.var_jitter, 4).astype(np.float32)


# --------------------------------------------------------------------------- ResNet


def _resnet(name: str, block: str, layers: list[int], seed: int, doc: str) -> onnx.ModelProto:
    """ResNet v1.5 (torchvision): 7x7/2 stem, 3x3/2 MaxPool, four stages of basic or bottleneck
    blocks (stride 2 on the 3x3 conv of each stage's first block from stage 2, 1x1 conv-BN
    projection shortcut where the shape changes), GlobalAveragePool, Flatten, Gemm."""
    net = _ArchNet(name, seed, doc)
    x = net.conv_bn("input", 3, 64, "stem", act="relu", k=7, stride=2)
    x = net.node("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    expansion = 4 if block == "bottleneck" else 1
    cin = 64
    for stage, (width, repeats) in enumerate(zip([64, 128, 256, 512], layers)):
        for i in range(repeats):
            stride = 2 if stage > 0 and i == 0 else 1
            cout = width * expansion
            prefix = f"layer{stage + 1}.{i}"
            if block == "bottleneck":
                y = net.conv_bn(x, cin, width, f"{prefix}.1", act="relu", k=1)
                y = net.conv_bn(y, width, width, f"{prefix}.2", act="relu", stride=stride)
                y = net.conv_bn(y, width, cout, f"{prefix}.3", act=None, k=1, gamma_scale=0.6)
            else:
                y = net.conv_bn(x, cin, width, f"{prefix}.1", act="relu", stride=stride)
                y = net.conv_bn(y, width, cout, f"{prefix}.2", act=None, gamma_scale=0.6)
            if stride != 1 or cin != cout:
                x = net.conv_bn(x, cin, cout, f"{prefix}.downsample", act=None, k=1, stride=stride,
                                gamma_scale=0.6)
            y = net.node("Add", [y, x], f"{prefix}.add")
            x, cin = net.relu(y, f"{prefix}.relu"), cout
    return net.finish(net.classifier(x, cin, NUM_CLASSES))


def resnet18(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18: basic blocks [2, 2, 2, 2]; 20 convs (incl. 3 projection shortcuts), 11.7M params."""
    return _resnet("resnet18", "basic", [2, 2, 2, 2], seed, resnet18.__doc__)


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 v1.5: bottleneck blocks [3, 4, 6, 3]; 53 convs (incl. 4 projection shortcuts),
    25.6M params."""
    return _resnet("resnet50", "bottleneck", [3, 4, 6, 3], seed, resnet50.__doc__)


# --------------------------------------------------------------------------- inverted residuals


def _inverted_residual(net: _ArchNet, x: str, cin: int, cout: int, expand: int, k: int,
                       stride: int, name: str) -> str:
    """1x1 expand conv-BN-ReLU6 (when expand > 1), kxk depthwise conv-BN-ReLU6, 1x1 linear
    projection conv-BN, residual Add when stride 1 and cin == cout."""
    hidden = cin * expand
    y = x
    if expand != 1:
        y = net.conv_bn(y, cin, hidden, f"{name}.expand", act="relu6", k=1)
    y = net.conv_bn(y, hidden, hidden, f"{name}.dw", act="relu6", k=k, stride=stride, group=hidden)
    residual = stride == 1 and cin == cout
    y = net.conv_bn(y, hidden, cout, f"{name}.project", act=None, k=1,
                    gamma_scale=0.6 if residual else 1.0)
    if residual:
        y = net.node("Add", [x, y], f"{name}.add")
    return y


# (expansion t, output channels c, repeats n, first stride s), MobileNetV2 paper, width 1.0
_MOBILENETV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2, width 1.0: 3x3/2 stem (32), 17 inverted residual blocks with 3x3 depthwise
    convs, 1x1 conv to 1280, GlobalAveragePool, Flatten, Gemm; ReLU6 as Clip(0, 6). 52 convs
    (17 depthwise), 3.5M params."""
    net = _ArchNet("mobilenetv2", seed, mobilenetv2.__doc__)
    x = net.conv_bn("input", 3, 32, "stem", act="relu6", stride=2)
    cin, index = 32, 0
    for t, c, n, s in _MOBILENETV2_CFG:
        for i in range(n):
            x = _inverted_residual(net, x, cin, c, t, 3, s if i == 0 else 1, f"block{index}")
            cin, index = c, index + 1
    x = net.conv_bn(x, cin, 1280, "last", act="relu6", k=1)
    return net.finish(net.classifier(x, 1280, NUM_CLASSES))


# (expansion, kernel, first stride, output channels, repeats): EfficientNet-B0's stages
_EFFICIENTNET_LITE0_CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def efficientnet_lite0(seed: int = 0) -> onnx.ModelProto:
    """EfficientNet-Lite0: EfficientNet-B0's stages without squeeze-excitation, with ReLU6
    (Clip(0, 6)) instead of swish: 3x3/2 stem (32), 16 MBConv blocks with 3x3 and 5x5 depthwise
    convs (symmetric padding), 1x1 conv to 1280, GlobalAveragePool, Flatten, Gemm. 49 convs
    (16 depthwise), 4.7M params."""
    net = _ArchNet("efficientnet_lite0", seed, efficientnet_lite0.__doc__)
    x = net.conv_bn("input", 3, 32, "stem", act="relu6", stride=2)
    cin, index = 32, 0
    for t, k, s, c, n in _EFFICIENTNET_LITE0_CFG:
        for i in range(n):
            x = _inverted_residual(net, x, cin, c, t, k, s if i == 0 else 1, f"block{index}")
            cin, index = c, index + 1
    x = net.conv_bn(x, cin, 1280, "head", act="relu6", k=1)
    return net.finish(net.classifier(x, 1280, NUM_CLASSES))


# --------------------------------------------------------------------------- segmentation


def unet_small(seed: int = 0, input_size: int = 64, num_classes: int = 5) -> onnx.ModelProto:
    """A small U-Net for segmentation (input 1x3x64x64, output ``logits`` 1x5x64x64 per pixel):
    two encoder stages of two conv-BN-ReLU (16, 32 channels) each followed by a 2x2 MaxPool, a
    bottleneck of two conv-BN-ReLU (64), then a decoder that upsamples once with a learned
    ConvTranspose (2x2, stride 2, bias) and once with a bilinear Resize (scales 2, half_pixel),
    each followed by a Concat with the encoder's skip connection and conv-BN-ReLU, and a 1x1 conv
    head with bias. 9 convs, 1 ConvTranspose, 1 Resize, 2 Concats; about 0.1M params."""
    net = _ArchNet("unet_small", seed, unet_small.__doc__, input_size=input_size)
    e1 = net.conv_bn("input", 3, 16, "enc1.1", act="relu")
    e1 = net.conv_bn(e1, 16, 16, "enc1.2", act="relu")
    x = net.node("MaxPool", [e1], "enc1.pool", kernel_shape=[2, 2], strides=[2, 2])
    e2 = net.conv_bn(x, 16, 32, "enc2.1", act="relu")
    e2 = net.conv_bn(e2, 32, 32, "enc2.2", act="relu")
    x = net.node("MaxPool", [e2], "enc2.pool", kernel_shape=[2, 2], strides=[2, 2])
    x = net.conv_bn(x, 32, 64, "mid.1", act="relu")
    x = net.conv_bn(x, 64, 64, "mid.2", act="relu")
    # learned 2x upsampling: each output pixel gets exactly one tap per input channel
    w = net.rng.normal(0.0, np.sqrt(1.0 / 64), (64, 32, 2, 2))
    up = net.node("ConvTranspose", [x, net.param("up2.deconv.weight", w),
                                    net.param("up2.deconv.bias", net.rng.normal(0.0, 0.1, 32))],
                  "up2.deconv", kernel_shape=[2, 2], strides=[2, 2])
    x = net.node("Concat", [up, e2], "up2.concat", axis=1)
    x = net.conv_bn(x, 64, 32, "dec2.1", act="relu")
    x = net.conv_bn(x, 32, 32, "dec2.2", act="relu")
    scales = net.param("up1.resize.scales", np.array([1.0, 1.0, 2.0, 2.0]))
    up = net.node("Resize", [x, "", scales], "up1.resize", mode="linear",
                  coordinate_transformation_mode="half_pixel")
    x = net.node("Concat", [up, e1], "up1.concat", axis=1)
    x = net.conv_bn(x, 48, 16, "dec1.1", act="relu")
    w = net.rng.normal(0.0, np.sqrt(1.0 / 16), (num_classes, 16, 1, 1))
    head = [x, net.param("head.weight", w), net.param("head.bias", net.rng.normal(0.0, 0.1, num_classes))]
    return net.finish(net.node("Conv", head, "head", out="logits", kernel_shape=[1, 1]))


# --------------------------------------------------------------------------- MobileNetV3, detection


def _hardswish(net: _ArchNet, x: str, name: str) -> str:
    """x * HardSigmoid(x, alpha=1/6, beta=0.5): how PyTorch exports hardswish below opset 14."""
    gate = net.node("HardSigmoid", [x], f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)
    return net.node("Mul", [x, gate], name)


def _conv_bn_act(net: _ArchNet, x: str, cin: int, cout: int, name: str, act: str, k: int = 1,
                 stride: int = 1, group: int = 1) -> str:
    y = net.conv_bn(x, cin, cout, name, act="relu" if act == "RE" else None, k=k, stride=stride, group=group)
    return _hardswish(net, y, f"{name}.hswish") if act == "HS" else y


def _squeeze_excite(net: _ArchNet, x: str, channels: int, name: str) -> str:
    """GlobalAveragePool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> HardSigmoid -> Mul(x, gate),
    squeeze width make_divisible(channels / 4, 8) as in torchvision."""
    squeeze = max(8, int(channels / 4 + 4) // 8 * 8)
    pooled = net.node("GlobalAveragePool", [x], f"{name}.pool")
    w1 = net.rng.normal(0.0, np.sqrt(2.0 / channels), (squeeze, channels, 1, 1))
    h = net.node("Conv", [pooled, net.param(f"{name}.fc1.weight", w1),
                          net.param(f"{name}.fc1.bias", net.rng.normal(0.1, 0.1, squeeze))], f"{name}.fc1")
    h = net.node("Relu", [h], f"{name}.relu")
    w2 = net.rng.normal(0.0, np.sqrt(1.0 / squeeze), (channels, squeeze, 1, 1))
    g = net.node("Conv", [h, net.param(f"{name}.fc2.weight", w2),
                          net.param(f"{name}.fc2.bias", net.rng.normal(0.5, 0.5, channels))], f"{name}.fc2")
    g = net.node("HardSigmoid", [g], f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)
    return net.node("Mul", [x, g], f"{name}.scale")


# (kernel, expanded channels, output channels, squeeze-excite, activation, stride): torchvision's
# mobilenet_v3_small, width 1.0
_MOBILENETV3_SMALL_CFG = [(3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
                          (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
                          (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
                          (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)]


def mobilenetv3_small(seed: int = 0, input_size: int = INPUT_SIZE, num_classes: int = NUM_CLASSES) -> onnx.ModelProto:
    """MobileNetV3-Small (torchvision layout, opset 13): 3x3/2 stem (16) with hardswish, 11
    bottlenecks (1x1 expand, 3x3 or 5x5 depthwise, squeeze-excite in 9 of them, 1x1 linear
    projection, residual Add where the shape allows), ReLU or hardswish, 1x1 conv to 576 with
    hardswish, GlobalAveragePool, Flatten, Gemm 576 -> 1024 with hardswish, Gemm to the classes.
    Hardswish is x * HardSigmoid(x) (PyTorch's export below opset 14); squeeze-excite is
    GlobalAveragePool -> Conv -> ReLU -> Conv -> HardSigmoid -> Mul. 2.5M params at 1000 classes."""
    net = _ArchNet("mobilenetv3_small", seed, mobilenetv3_small.__doc__, input_size=input_size)
    x = _conv_bn_act(net, "input", 3, 16, "stem", "HS", k=3, stride=2)
    cin = 16
    for i, (k, exp, cout, se, act, stride) in enumerate(_MOBILENETV3_SMALL_CFG):
        name = f"block{i}"
        y = x
        if exp != cin:
            y = _conv_bn_act(net, y, cin, exp, f"{name}.expand", act)
        y = _conv_bn_act(net, y, exp, exp, f"{name}.dw", act, k=k, stride=stride, group=exp)
        if se:
            y = _squeeze_excite(net, y, exp, f"{name}.se")
        residual = stride == 1 and cin == cout
        y = net.conv_bn(y, exp, cout, f"{name}.project", act=None, gamma_scale=0.6 if residual else 1.0)
        x = net.node("Add", [x, y], f"{name}.add") if residual else y
        cin = cout
    x = _conv_bn_act(net, x, cin, 576, "last", "HS")
    x = net.node("GlobalAveragePool", [x], "pool")
    x = net.node("Flatten", [x], "flatten", axis=1)
    x = _hardswish(net, net.gemm(x, 576, 1024, "fc1"), "fc1.hswish")
    return net.finish(net.gemm(x, 1024, num_classes, "fc2", out="logits"))


def detection_head(seed: int = 0, input_size: int = 128, num_classes: int = 4, anchors: int = 3) -> onnx.ModelProto:
    """A YOLO-style single-shot detector (input 1x3xSxS, output ``detections``
    1 x (anchors * cells) x (5 + classes), every value through a Sigmoid): a conv-BN-ReLU backbone
    down to strides 8, 16 and 32, at each scale a 1x1 prediction conv (bias) with
    anchors * (5 + classes) channels reshaped to [1, anchors, 5 + classes, H*W] and transposed to
    [1, anchors, H*W, 5 + classes], then flattened to [1, anchors*H*W, 5 + classes]; the three
    scales are concatenated (axis 1) and a Sigmoid gives objectness, box offsets and class scores.
    S = 128 gives 3 * (256 + 64 + 16) = 1008 boxes."""
    net = _ArchNet("detection_head", seed, detection_head.__doc__, input_size=input_size)
    x = net.conv_bn("input", 3, 16, "stem", act="relu", stride=2)
    features = []  # stages at strides 4, 8, 16, 32; the last three feed the heads
    for i, (cin, cout) in enumerate([(16, 24), (24, 32), (32, 64), (64, 96)]):
        x = net.conv_bn(x, cin, cout, f"stage{i}.down", act="relu", stride=2)
        x = net.conv_bn(x, cout, cout, f"stage{i}.conv", act="relu")
        if i >= 1:
            features.append((x, cout, input_size // (2 ** (i + 2))))
    per_box = 5 + num_classes
    parts = []
    for j, (feat, channels, size) in enumerate(features):
        w = net.rng.normal(0.0, np.sqrt(1.0 / channels), (anchors * per_box, channels, 1, 1))
        b = net.rng.normal(0.0, 0.5, anchors * per_box)
        p = net.node("Conv", [feat, net.param(f"head{j}.weight", w), net.param(f"head{j}.bias", b)], f"head{j}",
                     kernel_shape=[1, 1])
        net.inits[f"head{j}.shape4"] = np.array([1, anchors, per_box, size * size], np.int64)  # Reshape targets
        net.inits[f"head{j}.shape3"] = np.array([1, anchors * size * size, per_box], np.int64)
        p = net.node("Reshape", [p, f"head{j}.shape4"], f"head{j}.split")
        p = net.node("Transpose", [p], f"head{j}.boxes", perm=[0, 1, 3, 2])
        p = net.node("Reshape", [p, f"head{j}.shape3"], f"head{j}.flat")
        parts.append(p)
    x = net.node("Concat", parts, "concat", axis=1)
    return net.finish(net.node("Sigmoid", [x], "sigmoid", out="detections"))


ARCHITECTURES: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "efficientnet_lite0": efficientnet_lite0,
    "unet_small": unet_small,
    "mobilenetv3_small": mobilenetv3_small,
    "detection_head": detection_head,
}


def main(argv: list[str] | None = None) -> int:
    return builder_main(ARCHITECTURES, argv, "python -m tools.architectures",
                        "Build a full-size ImageNet architecture (random weights).", default_samples=32,
                        input_size=False)


if __name__ == "__main__":
    raise SystemExit(main())
