"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), on the fused graph.

For a pair of weighted layers L1 -> L2 where the tensor between them is read by L2 alone, output
channel i of L1 is input channel i of L2. With r1_i = max|W1[i, ...]| (L1's output channel i) and
r2_i = max|W2[:, i, ...]| (every weight of L2 that reads channel i),

    s_i = sqrt(r1_i * r2_i) / r2_i          (= sqrt(r1_i / r2_i); s_i = 1 where r1_i or r2_i is 0)
    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i

leaves both channels with range sqrt(r1_i * r2_i), so a per-tensor weight scale (mmav1) and a
per-tensor activation scale no longer waste their levels on one large channel. The float function
is unchanged when what lies between the layers is scale-equivariant for s_i > 0: nothing, ReLU,
or a Clip with min 0 and no max. Clip with a max (ReLU6) is not: clip(y / s_i, 0, 6) differs from
clip(y, 0, 6) / s_i. Its per-channel bound 6 / s_i would be exact on the IR's per-channel clamp,
but ONNX Clip takes scalar bounds only, so the QDQ model (and the float model) could not express
it; such pairs are skipped and listed with that reason.

Pairs (producer, consumer): Conv -> Conv (group 1, or depthwise: group == input channels, any
channel multiplier), Gemm -> Gemm. Equalizing one pair changes the ranges of the next, so the pass
sweeps all pairs in order for up to ``max_rounds`` rounds, stopping early once every |s_i - 1|
is below ``tolerance``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .activation_fusion import activation_bounds, fused_activation_of
from .base import GraphPass, PassResult
from .graph import GraphIndex, get_attr, nodes_by_name


@dataclass
class EqualizationPair:
    """Two weighted nodes whose shared channel axis is equalized; ``between`` is the fused
    activation of the first (or None)."""

    first: onnx.NodeProto
    between: onnx.NodeProto | None
    second: onnx.NodeProto

    def describe(self) -> str:
        mid = f" + {self.between.op_type} '{self.between.name}'" if self.between is not None else ""
        return f"{self.first.op_type} '{self.first.name}'{mid} -> {self.second.op_type} '{self.second.name}'"


def output_axis(node: onnx.NodeProto) -> int:
    """Axis of the weight that indexes the node's output channels."""
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    return 0


def _first_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    if node.op_type not in ("Conv", "Gemm"):
        return "not a Conv or Gemm"
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return "weight is not a constant"
    if node.op_type == "Gemm" and (get_attr(node, "transA", 0) or get_attr(node, "alpha", 1.0) != 1.0
                                   or get_attr(node, "beta", 1.0) != 1.0):
        return "Gemm with transA, alpha or beta (normalize it first)"
    if len(node.input) > 2 and node.input[2]:
        bias = index.constant(node.input[2])
        if bias is None:
            return "bias is not a constant"
        if bias.ndim != 1:
            return f"bias of rank {bias.ndim} (expected 1-D)"
        if index.uses(node.input[2]) > 1:
            return f"bias '{node.input[2]}' is shared with another node"
    if index.uses(node.input[1]) > 1:
        return f"weight '{node.input[1]}' is shared with another node"
    return None


def _between_reason(act: onnx.NodeProto | None, index: GraphIndex) -> str | None:
    """None when the activation commutes with a positive per-channel scale."""
    if act is None or act.op_type == "Relu":
        return None
    if act.op_type == "Clip":
        lo, hi = activation_bounds(act, index)
        if lo == 0.0 and hi is None:
            return None
        return (f"Clip({lo}, {hi}) between them is not scale-equivariant, and ONNX Clip cannot hold "
                "the per-channel bound it would need")
    return f"{act.op_type} between them is not known to be scale-equivariant"


def _second_reason(node: onnx.NodeProto, channels: int, index: GraphIndex) -> str | None:
    if node.op_type not in ("Conv", "Gemm"):
        return "not a Conv or Gemm"
    if index.uses(node.input[1]) > 1 or not index.is_constant(node.input[1]):
        return "weight is shared or not a constant"
    w = index.constant(node.input[1])
    if node.op_type == "Conv":
        group = get_attr(node, "group", 1)
        if group not in (1, channels):
            return f"grouped conv (group={group}) other than depthwise"
        if group == channels and w.shape[0] % channels:
            return "depthwise output channels are not a multiple of the input channels"
        if group == 1 and w.shape[1] != channels:
            return f"weight reads {w.shape[1]} channels, the tensor between has {channels}"
    else:
        if get_attr(node, "transA", 0) or get_attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha (normalize it first)"
        if w.shape[1 - output_axis(node)] != channels:
            return "Gemm input width differs from the tensor between"
    return None


def find_pairs(model: onnx.ModelProto) -> tuple[list[EqualizationPair], list[str]]:
    """Every equalizable pair in graph order, and the reasons the near-misses were skipped."""
    index = GraphIndex(model.graph)
    by_name = nodes_by_name(model.graph)
    pairs, skipped = [], []
    for first in model.graph.node:
        if first.op_type not in ("Conv", "Gemm"):
            continue
        act_name = fused_activation_of(first)
        between = by_name.get(act_name) if act_name else None
        tensor = (between or first).output[0]
        readers = index.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in index.graph_outputs or readers[0].op_type not in ("Conv", "Gemm"):
            continue
        if between is None and len(index.consumers.get(first.output[0], [])) != 1:
            continue
        second = readers[0]
        if second.input[0] != tensor:
            continue
        pair = EqualizationPair(first, between, second)
        reason = _first_reason(first, index) or _between_reason(between, index)
        if reason is None:
            channels = index.constant(first.input[1]).shape[output_axis(first)]
            reason = _second_reason(second, channels, index)
        if reason:
            skipped.append(f"{pair.describe()} not equalized: {reason}")
        else:
            pairs.append(pair)
    return pairs, skipped


def channel_view(weight: np.ndarray, node: onnx.NodeProto, role: str, channels: int) -> np.ndarray:
    """``weight`` rearranged as [channels, -1]: row i holds every weight of output channel i
    (role 'out') or every weight that reads input channel i (role 'in'). Returns a copy."""
    if role == "out":
        return np.moveaxis(weight, output_axis(node), 0).reshape(channels, -1).copy()
    if node.op_type == "Gemm":
        return np.moveaxis(weight, 1 - output_axis(node), 0).reshape(channels, -1).copy()
    if get_attr(node, "group", 1) == 1:
        return np.moveaxis(weight, 1, 0).reshape(channels, -1).copy()
    return weight.reshape(channels, -1).copy()  # depthwise: outputs [i*m, (i+1)*m) read channel i


def scale_channels(weight: np.ndarray, node: onnx.NodeProto, role: str, factor: np.ndarray) -> np.ndarray:
    """``weight`` with output channel i (role 'out') or input channel i (role 'in') times factor[i]."""
    n = factor.size
    if role == "out":
        axis = output_axis(node)
    elif node.op_type == "Gemm":
        axis = 1 - output_axis(node)
    elif get_attr(node, "group", 1) == 1:
        axis = 1
    else:  # depthwise: output channel o reads input channel o // m
        m = weight.shape[0] // n
        return weight * np.repeat(factor, m).reshape(-1, *([1] * (weight.ndim - 1))).astype(weight.dtype)
    shape = [1] * weight.ndim
    shape[axis] = n
    return weight * factor.reshape(shape).astype(weight.dtype)


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i * r2_i) / r2_i, and 1 where either range is 0 (a dead channel)."""
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    s = np.ones_like(r1)
    live = (r1 > 0) & (r2 > 0)
    s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
    return s


class EqualizeLayers(GraphPass):
    """Cross-layer equalization of every pair ``find_pairs`` accepts (module docstring)."""

    name = "equalize_layers"

    def __init__(self, max_rounds: int = 20, tolerance: float = 1e-3):
        self.max_rounds = max_rounds
        self.tolerance = tolerance

    def apply(self, model: onnx.ModelProto) -> PassResult:
        pairs, skipped = find_pairs(model)
        if not pairs:
            return PassResult(model, False, skipped or ["no conv -> conv pair to equalize"])
        inits = {i.name: i for i in model.graph.initializer}
        values = {name: numpy_helper.to_array(inits[name]) for p in pairs
                  for name in [p.first.input[1], p.second.input[1]] + ([p.first.input[2]] if len(p.first.input) > 2
                                                                     and p.first.input[2] else [])
                  if name in inits}
        missing = [p for p in pairs if any(name and name not in values
                                           for name in (list(p.first.input[1:3]) + [p.second.input[1]]))]
        if missing:
            raise self.fail("weight is a Constant node, not an initializer (run constant folding first)",
                            missing[0].first)
        rounds, largest, moved = 0, 0.0, 0.0
        for rounds in range(1, self.max_rounds + 1):
            largest = 0.0
            for p in pairs:
                w1, w2 = values[p.first.input[1]], values[p.second.input[1]]
                n = w1.shape[output_axis(p.first)]
                r1 = np.abs(channel_view(w1, p.first, "out", n)).max(axis=1)
                r2 = np.abs(channel_view(w2, p.second, "in", n)).max(axis=1)
                s = equalization_scales(r1, r2)
                largest = max(largest, float(np.abs(s - 1.0).max()))
                values[p.first.input[1]] = scale_channels(w1, p.first, "out", 1.0 / s)
                values[p.second.input[1]] = scale_channels(w2, p.second, "in", s)
                if len(p.first.input) > 2 and p.first.input[2]:
                    b = values[p.first.input[2]]
                    values[p.first.input[2]] = (b / s).astype(b.dtype)
            moved = max(moved, largest)
            if largest < self.tolerance:
                break
        for name, value in values.items():
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        status = "converged" if largest < self.tolerance else f"stopped at the cap, last max|s-1| {largest:.2g}"
        changes = [f"equalized {len(pairs)} pairs in {rounds} rounds ({status})"]
        return PassResult(model, moved > 0.0, changes + skipped)


def _weight_out_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type == "MatMul" else output_axis(node)


class ClipWeightOutliers(GraphPass):
    """Clip weight outliers (TIDL clips weights far from the median) before scales are chosen.

    Per output channel c of every Conv / Gemm / MatMul constant weight, with median m_c and
    standard deviation sd_c of the channel's values: w <- clip(w, m_c - k sd_c, m_c + k sd_c).
    A symmetric scale is max|w| / qmax, so one far outlier coarsens every other weight of the
    channel; clipping trades that outlier's error for finer steps elsewhere. This changes the
    float function (slightly, by design); ``k`` is the trade-off (3 clips little, 2 clips more).
    """

    name = "clip_weight_outliers"

    def __init__(self, sigmas: float):
        if not sigmas > 0:
            raise ValueError(f"weight clipping needs a positive number of standard deviations, got {sigmas}")
        self.sigmas = float(sigmas)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model.graph)
        inits = {i.name: i for i in model.graph.initializer}
        clipped_layers, clipped_values = 0, 0
        for node in model.graph.node:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
                continue
            name = node.input[1]
            if name not in inits or index.uses(name) > 1:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.ndim < 2 or w.dtype.kind != "f":
                continue
            axis = _weight_out_axis(node)
            rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
            med = np.median(rows, axis=1, keepdims=True)
            sd = rows.std(axis=1, keepdims=True)
            new = np.clip(rows, med - self.sigmas * sd, med + self.sigmas * sd)
            n = int(np.count_nonzero(new != rows))
            if n == 0:
                continue
            shape = list(np.moveaxis(w, axis, 0).shape)
            out = np.moveaxis(new.reshape(shape), 0, axis).astype(w.dtype)
            inits[name].CopyFrom(numpy_helper.from_array(out, name))
            clipped_layers += 1
            clipped_values += n
        summary = (f"weight clipping at {self.sigmas:g} sigma: {clipped_values} values clipped in "
                   f"{clipped_layers} layers")
        changes = [summary]
        return PassResult(model, clipped_values > 0, changes)
