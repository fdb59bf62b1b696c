"""Scale selection: calibrated ranges + a target preset -> the quantization-parameter table.

Pure numpy policy functions (a range -> a scale, a power-of-2 rounding, a weight's per-channel
scale) and one driver, ``choose_qparams``, that walks the layer plan in execution order.

Activations (per tensor): a tensor whose calibrated minimum is >= 0 uses the unsigned type when
the target allows (zero point 0, scale = max / qmax_u); otherwise the signed type, symmetric
(scale = max(|min|, |max|) / qmax_s). Pass-through layers (MaxPool, Reshape, Flatten, ReLU/Clip
standing alone) inherit their input's encoding exactly ("aligned").
Weights: symmetric, scale = max|w| / qmax per output channel (or per tensor), raised where the
bias would not fit its integer type: q_b = round(b / (s_x * s_w)) must satisfy
|q_b| <= 2^(bias_bits - 2), so s_w >= |b| / (s_x * 2^(bias_bits - 2)). An all-zero channel with
zero bias gets scale 1 (any positive value encodes it exactly), never a division by zero.
On power-of-2 targets every scale is rounded up to the next power of two.
"""
from __future__ import annotations

import numpy as np
import onnx

from passes.graph import GraphIndex, get_attr
from passes.layer_plan import LayerPlan
from passes.qparams import DTYPE_RANGES, QParams, QParamTable
from passes.targets import TargetPreset

from .calibration import TensorRange
from .errors import CompileError

MIN_RANGE = 1e-6  # a tensor whose calibrated |range| is below this is treated as having this range


def round_up_power_of_two(scale: np.ndarray) -> np.ndarray:
    """2^ceil(log2(s)): the smallest power of two that does not clip the range."""
    return np.exp2(np.ceil(np.log2(np.asarray(scale, dtype=np.float64))))


def activation_qparams(rng: TensorRange, target: TargetPreset, source: str) -> QParams:
    """Per-tensor encoding of an activation from its calibrated range (see module docstring)."""
    bits = target.activation_bits
    lo, hi = float(rng.min), float(rng.max)
    if target.unsigned_after_relu and lo >= 0.0:
        dtype = f"uint{bits}"
        scale = max(hi, MIN_RANGE) / DTYPE_RANGES[dtype][1]
    else:
        dtype = f"int{bits}"
        scale = max(abs(lo), abs(hi), MIN_RANGE) / DTYPE_RANGES[dtype][1]
    if target.power_of_two:
        scale = float(round_up_power_of_two(scale))
    return QParams(np.float32(scale), 0, dtype, source=source)


def weight_output_axis(node: onnx.NodeProto) -> int:
    """The axis of the ONNX weight initializer that indexes output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    raise ValueError(node.op_type)


def weight_qparams(weight: np.ndarray, axis: int, bias: np.ndarray | None, input_scale: float,
                   target: TargetPreset) -> QParams:
    """Symmetric weight encoding, per output channel or per tensor (see module docstring)."""
    dtype = f"int{target.weight_bits}"
    qmax = DTYPE_RANGES[dtype][1]
    bias_room = 2.0 ** (int(target.bias_dtype[3:]) - 2)
    w = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(w).max(axis=1)
    b = np.zeros_like(amax) if bias is None else np.abs(bias.astype(np.float64)).reshape(-1)
    if not target.per_channel_weights:
        amax, b = amax.max(keepdims=True), b.max(keepdims=True)
    scale = np.maximum(amax / qmax, b / (input_scale * bias_room))
    scale[scale == 0] = 1.0
    if target.power_of_two:
        scale = round_up_power_of_two(scale)
    scale = scale.astype(np.float32)
    # float32 rounding may land a hair below the bound; nudge up by one ulp where it does.
    too_small = scale.astype(np.float64) < amax / qmax
    scale = np.where(too_small, np.nextafter(scale, np.float32(np.inf)), scale)
    return QParams(scale, np.zeros(scale.shape, np.int64), dtype,
                   axis=axis if scale.size > 1 else None, source="weights")


def bias_qparams(input_scale: np.float32, w_qp: QParams, target: TargetPreset) -> QParams:
    """Bias encoding: scale float32(s_x * s_w) per output channel, zero point 0, the preset's type."""
    scale = (np.float32(input_scale) * w_qp.scale).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int64), target.bias_dtype,
                   axis=0 if scale.size > 1 else None, source="bias")


def choose_qparams(model: onnx.ModelProto, plan: LayerPlan, ranges: dict[str, TensorRange],
                   target: TargetPreset) -> QParamTable:
    """Fill the table for every activation tensor, weight and bias of the plan, in execution order."""
    index = GraphIndex(model.graph)
    table = QParamTable()
    for name in plan.inputs:
        table[name] = activation_qparams(ranges[name], target, f"calibration:{ranges[name].method}")
    for group in plan.groups:
        missing = [i for i in group.inputs if i not in table]
        if missing:
            raise CompileError(f"node '{group.name}' ({group.op_type}): input(s) {missing} have no "
                               "quantization parameters (the graph is not in execution order)")
        if group.scale_rule == "inherit":
            src = table[group.inputs[0]]
            table[group.output] = QParams(src.scale, src.zero_point, src.dtype, src.axis,
                                          source=f"aligned:{group.inputs[0]}")
        else:
            rng = ranges[group.output]
            table[group.output] = activation_qparams(rng, target, f"calibration:{rng.method}")
        if group.weight is not None:
            s_x = table[group.inputs[0]].scale[0]
            weight = index.constant(group.weight)
            bias = index.constant(group.bias) if group.bias else None
            if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
                raise CompileError(f"node '{group.name}' ({group.op_type}): weights or bias are not finite")
            w_qp = weight_qparams(weight, weight_output_axis(group.node), bias, s_x, target)
            if group.weight in table and not table[group.weight].same_as(w_qp):
                raise CompileError(f"node '{group.name}' ({group.op_type}): weight '{group.weight}' is "
                                   "shared with another layer that needs a different encoding")
            table[group.weight] = w_qp
            if group.bias:
                table[group.bias] = bias_qparams(s_x, w_qp, target)
    return table

