"""Bias correction (TIDL's "bias calibration"): remove the mean output shift that quantization adds.

Quantizing a layer's weights and input changes its output by e = y_float - y_quant. Part of e is
systematic: E[e] = E[(W - W_q) x] + ... is not zero when the input has a non-zero mean (after a
ReLU it always has) and the weight rounding errors of a channel do not cancel — small depthwise
kernels after BatchNorm folding are the classic case. Adding the per-output-channel mean of e to
the bias removes that part:

    b[c] <- b[c] + mean over samples and positions of (y_float[c] - y_quant[c])

measured at the layer's accumulator output (before its fused activation and its output Q), with
y_float from the float model and y_quant from the QDQ model (onnxruntime, optimizations off: the
float emulation of the integer program), both over the calibration set. Layers are corrected in
execution order, each measured on a QDQ model that already holds every earlier correction, so a
layer sees its inputs as they will really be. The corrected bias is requantized with the
unchanged bias encoding (q_b = round_half_even(b / (s_x * s_w)), saturated to the bias type).

Cost: one float pass for all layers, then one QDQ pass run segment by segment: the nodes up to
a layer run, the layer's mean gives its correction, the cached accumulator gets the corrected
bias added, and the next segment starts there, so each node runs once per sample. Memory: the
tensors that cross a segment boundary, for every sample (budgeted by ``cache_mb``; past it the
remaining layers are each measured on the QDQ model prefix that produces them, from the inputs,
which keeps memory constant and costs about half a model pass per layer).
Layers without a bias (MatMul, Conv/Gemm without a bias input) or whose bias another layer shares
are left alone and listed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.insert_qdq import InsertQDQ, quantized_name
from passes.layer_plan import LayerGroup, LayerPlan
from passes.qparams import QParamTable, quantize_constant

from .calibration_data import CalibrationSet
from .errors import CompileError
from .onnx_runner import make_session


@dataclass
class BiasCorrection:
    """What bias correction did: the delta added to each corrected bias, and the layers skipped."""

    deltas: dict[str, np.ndarray] = field(default_factory=dict)  # layer name -> per-channel delta
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.deltas:
            return f"bias correction: no layer corrected ({len(self.skipped)} skipped)"
        largest = max(self.deltas.items(), key=lambda kv: float(np.abs(kv[1]).max()))
        return (f"bias correction: {len(self.deltas)} layers corrected in {self.seconds:.1f} s, "
                f"largest |delta| {float(np.abs(largest[1]).max()):.4g} in '{largest[0]}'"
                + (f"; skipped {len(self.skipped)}: {'; '.join(self.skipped)}" if self.skipped else ""))


class ChannelMean:
    """Streaming per-channel mean over every axis but ``axis`` (float64 sums; fixed-size state)."""

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, y: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        axes = tuple(a for a in range(y.ndim) if a != self.axis)
        part = y.sum(axis=axes)
        self.sum = part if self.sum is None else self.sum + part
        self.count += y.size // y.shape[self.axis]

    def mean(self) -> np.ndarray:
        if self.sum is None or self.count == 0:
            raise ValueError("no values observed")
        return self.sum / self.count


def accumulator_output(group: LayerGroup) -> str:
    """The float model's name of a layer's accumulator output (the main node's, before any fused
    activation)."""
    return group.node.output[0]


def prefix_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (nodes in their order, the initializers they
    read, every graph input), with ``outputs`` as its graph outputs. onnxruntime runs every node of
    a graph whatever is fetched, so this is what makes a per-layer measurement cost a prefix."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in keep]
    read = {i for n in nodes for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in read]
    graph = helper.make_graph(nodes, f"{model.graph.name}_prefix", list(model.graph.input),
                              [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def _channel_means(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet,
                   batch_size: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of each tensor over the calibration set, one streamed pass."""
    session = make_session(prefix_model(model, tensors), optimize=False)
    means = {t: ChannelMean() for t in tensors}
    for feeds in data.batches(batch_size):
        for name, value in zip(tensors, session.run(tensors, feeds)):
            means[name].update(value)
    return {t: m.mean() for t, m in means.items()}


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace an initializer's values, keeping its element type (QDQ insertion stores an int16
    bias as int32, since DequantizeLinear before opset 21 takes no int16)."""
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
            return
    raise CompileError(f"bias '{name}' is not an initializer of the model")


class _CacheFull(Exception):
    """The segment runner's per-sample cache outgrew its budget."""


class _SegmentRunner:
    """Runs the QDQ model one node range at a time over the calibration batches, keeping for
    each batch only the tensors that a later node still reads, so every node runs once per
    batch over the whole correction. Memory: those live tensors for every batch (budgeted)."""

    def __init__(self, qdq: onnx.ModelProto, data: CalibrationSet, batch_size: int, budget_bytes: int):
        self.model, self.data, self.batch_size, self.budget = qdq, data, batch_size, budget_bytes
        self.nodes = list(qdq.graph.node)
        self.inits = {i.name for i in qdq.graph.initializer}
        self.inputs = {i.name: i for i in qdq.graph.input}
        self.last_read: dict[str, int] = {}
        for pos, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.last_read[name] = pos
        self.position = 0
        n_batches = -(-data.num_samples // batch_size)
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in range(n_batches)]

    def run_through(self, end: int, fetch: str) -> list[np.ndarray]:
        """Run nodes [position, end]; return ``fetch`` per batch (kept in the cache)."""
        seg = self.nodes[self.position:end + 1]
        produced = {o for n in seg for o in n.output if o}
        needed = list(dict.fromkeys(i for n in seg for i in n.input
                                    if i and i not in produced and i not in self.inits))
        keep = list(dict.fromkeys([fetch] + [t for n in seg for t in n.output
                                             if t and self.last_read.get(t, -1) > end]))
        first = self.cache[0] if self.cache else {}
        inputs = [self.inputs[t] if t in self.inputs else helper.make_tensor_value_info(
            t, helper.np_dtype_to_tensor_dtype(first[t].dtype), None) for t in needed]
        read = {i for n in seg for i in n.input}
        graph = helper.make_graph(seg, "segment", inputs, [onnx.ValueInfoProto(name=t) for t in keep],
                                  [i for i in self.model.graph.initializer if i.name in read])
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        sub.ir_version = self.model.ir_version
        session = make_session(sub, optimize=False)
        for b, feeds in enumerate(self.data.batches(self.batch_size)):
            cached = self.cache[b]
            outs = session.run(keep, {t: feeds[t] if t in self.inputs else cached[t] for t in needed})
            self.cache[b] = {t: v for t, v in cached.items() if self.last_read.get(t, -1) > end}
            self.cache[b].update(zip(keep, outs))
        self.position = end + 1
        if sum(v.nbytes for c in self.cache for v in c.values()) > self.budget:
            raise _CacheFull
        return [c[fetch] for c in self.cache]

    def add_to(self, tensor: str, per_channel: np.ndarray) -> None:
        """Add a per-channel (axis 1) offset to a cached tensor in every batch."""
        for c in self.cache:
            v = c[tensor]
            c[tensor] = (v + per_channel.reshape([1, -1] + [1] * (v.ndim - 2)).astype(v.dtype)).astype(v.dtype)


def correct_biases(model: onnx.ModelProto, plan: LayerPlan, qparams: QParamTable, data: CalibrationSet,
                   batch_size: int = 1, cache_mb: float = 1024.0) -> BiasCorrection:
    """Correct every biased Conv/Gemm layer of ``plan`` in execution order (module docstring).

    Edits the bias initializers of ``model`` in place (``plan`` refers to its nodes) and returns
    the deltas. ``qparams`` is the table the QDQ model is built from; its bias encodings are kept,
    so the caller re-runs scale selection only if a bias type is narrow enough to care.
    The QDQ model runs segment by segment (``_SegmentRunner``), each node once per batch, while
    the live tensors of all batches fit in ``cache_mb``; past that, each remaining layer is
    measured on the QDQ prefix that produces it, from the inputs (slower, constant memory).
    """
    start = time.perf_counter()
    result = BiasCorrection()
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups = []
    for group in plan.groups:
        if group.weight is None or getattr(group, "kind", "integer") == "float":
            continue
        if not group.bias:
            result.skipped.append(f"'{group.name}' ({group.op_type}) has no bias")
        elif readers.get(group.bias, 0) > 1:
            result.skipped.append(f"'{group.name}' ({group.op_type}) shares bias '{group.bias}'")
        else:
            groups.append(group)
    if not groups:
        result.seconds = time.perf_counter() - start
        return result

    float_means = _channel_means(model, [accumulator_output(g) for g in groups], data, batch_size)
    qdq = InsertQDQ(plan, qparams)(model).model
    position = {n.name: i for i, n in enumerate(qdq.graph.node)}
    runner: _SegmentRunner | None = _SegmentRunner(qdq, data, batch_size, int(cache_mb * 2**20))
    bias_values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for group in groups:
        qdq_output = qdq.graph.node[position[group.name]].output[0]
        if runner is not None:
            try:
                mean = ChannelMean()
                for value in runner.run_through(position[group.name], qdq_output):
                    mean.update(value)
                quant_mean = mean.mean()
            except _CacheFull:
                runner = None
                result.skipped.append(f"(cache over {cache_mb:g} MB from '{group.name}' on: prefix runs)")
        if runner is None:
            quant_mean = _channel_means(qdq, [qdq_output], data, batch_size)[qdq_output]
        delta = float_means[accumulator_output(group)] - quant_mean
        bias = bias_values[group.bias]
        if delta.shape != (bias.size,):
            raise CompileError(f"node '{group.name}' ({group.op_type}): output has {delta.size} channels "
                               f"but bias '{group.bias}' has {bias.size} values")
        corrected = (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype)
        qp = qparams[group.bias]
        old_q, new_q = quantize_constant(bias, qp), quantize_constant(corrected, qp)
        _set_initializer(model, group.bias, corrected)
        _set_initializer(qdq, quantized_name(group.bias), new_q)
        if runner is not None:  # the cached accumulator, as if the layer had run with the new bias
            runner.add_to(qdq_output, (new_q.astype(np.float64) - old_q.astype(np.float64)).reshape(-1)
                          * qp.scale.astype(np.float64))
        result.deltas[group.name] = delta
    result.seconds = time.perf_counter() - start
    return result
