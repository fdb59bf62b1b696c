"""Scale selection: calibrated ranges + a target preset -> the quantization-parameter table.

Pure numpy policy functions (a range -> a scale, a power-of-2 rounding, a weight's per-channel
scale) and one driver, ``choose_qparams``, that walks the layer plan in execution order.

Activations (per tensor): a tensor whose calibrated minimum is >= 0 uses the unsigned type when
the target allows (zero point 0, scale = max / qmax_u); otherwise the signed type, symmetric
(scale = max(|min|, |max|) / qmax_s), or with asymmetric activations (mmav2 ``--asymmetric``)
scale = (max - min) / (qmax - qmin) and a zero point. Pass-through layers (MaxPool, Reshape,
Flatten, ReLU/Clip standing alone) inherit their input's encoding exactly ("aligned").
Weights: symmetric, scale = max|w| / qmax per output channel (or per tensor), raised where the
bias would not fit its integer type: q_b = round(b / (s_x * s_w)) must satisfy |q_b| <= room
(BIAS_ROOM: 2^30 for int32, 2^15 - 1 for int16, 2^40 for the int64 bias of every layer with a
16-bit input or weights, ``bias_dtype_for``), so s_w >= |b| / (s_x * room); on power-of-2 targets (int16 bias on
TDA4VM) that raises s_w by whole powers of two, and the bits lost are recorded. An all-zero
channel with zero bias gets scale 1 (any positive value encodes it exactly), never a division by
zero. On power-of-2 targets every scale is rounded up to the next power of two (an activation
calibrated with a histogram takes, of that exponent and the two below, the one with the least
expected quantization MSE: ``range_estimators.best_power_of_two_scale``). Then, with a
short multiplier, the weight scale is nudged so that m / 2^k is exact (``nudge_weight_scale``).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from passes.graph import GraphIndex, get_attr
from passes.layer_plan import LayerPlan
from passes.qparams import DTYPE_RANGES, QParams, QParamTable, ScaleAdjustment
from passes.targets import TargetPreset
from runtime.fixed_point import quantize_multiplier

from .calibration import TensorRange
from .errors import CompileError
from .range_estimators import best_power_of_two_scale

BIAS_ROOM = {"int64": 2.0**40, "int32": 2.0**30, "int16": 2.0**15 - 1}
"""Largest |q_b|: int32 keeps a bit of headroom for the int32 accumulator the bias is added to;
int16 (TDA4VM) uses its whole range, the accumulator being wider than the bias. int64 (every
layer with a 16-bit operand, ``bias_dtype_for``) stops at 2^40: with |sum w x| <= 2^30 K
(16 x 16 bits) and a multiplier of at most 16 bits (``layer_multiplier_bits``), |acc| m stays
below 2^62 for K up to 2^15, so the lowering's overflow check holds."""

MIN_RANGE = 1e-6  # a tensor whose calibrated |range| is below this is treated as having this range


def round_up_power_of_two(scale: np.ndarray) -> np.ndarray:
    """2^ceil(log2(s)): the smallest power of two that does not clip the range."""
    return np.exp2(np.ceil(np.log2(np.asarray(scale, dtype=np.float64))))


def activation_qparams(rng: TensorRange, target: TargetPreset, source: str) -> QParams:
    """Per-tensor encoding of an activation from its calibrated range (see module docstring)."""
    bits = target.activation_bits
    if target.unsigned_after_relu and rng.min >= 0.0:
        dtype = f"uint{bits}"
    else:
        dtype = f"int{bits}"
    # A histogram estimator (percentile/entropy/mse) re-estimates for this grid's steps on |x|;
    # an asymmetric grid over [lo, hi] has about the step of the symmetric one, qmax_s.
    qmax = DTYPE_RANGES[dtype][1]
    rng = rng.for_grid(qmax)
    lo, hi = float(rng.min), float(rng.max)
    if dtype.startswith("uint"):
        scale = max(hi, MIN_RANGE) / qmax
    elif not target.symmetric_activations:
        return asymmetric_activation_qparams(min(lo, 0.0), max(hi, 0.0), dtype, source)
    else:
        scale = max(abs(lo), abs(hi), MIN_RANGE) / qmax
    if target.power_of_two:
        scale = float(round_up_power_of_two(scale))
        if rng.histogram is not None:  # the least-MSE exponent among 2^e, 2^(e-1), 2^(e-2)
            scale = best_power_of_two_scale(rng.histogram.counts, rng.histogram.bin_width, qmax,
                                            scale)
    return QParams(np.float32(scale), 0, dtype, source=source)


def asymmetric_activation_qparams(lo: float, hi: float, dtype: str, source: str) -> QParams:
    """Asymmetric encoding of [lo, hi] (lo <= 0 <= hi): s = (hi - lo) / (qmax - qmin),
    zp = round_half_even(qmin - lo / s) clipped to the type, so real 0 is exactly the integer zp
    (padding filled with zp is exactly 0)."""
    qmin, qmax = DTYPE_RANGES[dtype]
    scale = np.float32(max(hi - lo, MIN_RANGE) / (qmax - qmin))
    zp = int(np.clip(np.rint(qmin - lo / np.float64(scale)), qmin, qmax))
    return QParams(scale, zp, dtype, source=source)


def weight_output_axis(node: onnx.NodeProto) -> int:
    """The axis of the ONNX weight initializer that indexes output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1  # ONNX layout [C_in, C_out/group, kh, kw]
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    raise ValueError(node.op_type)


def weight_qparams(weight: np.ndarray, axis: int, bias: np.ndarray | None, input_scale: float,
                   target: TargetPreset, per_channel: bool | None = None) -> QParams:
    """Symmetric weight encoding, per output channel or per tensor (see module docstring).

    ``per_channel`` overrides the preset (depthwise convs with ``depthwise_per_channel``). The bias
    room is BIAS_ROOM of the bias type, less 1/128 on targets whose multiplier nudge may lower s_w
    by up to 2^-8 afterwards (``nudge_weight_scale``)."""
    dtype = f"int{target.weight_bits}"
    qmax = DTYPE_RANGES[dtype][1]
    bias_room = float(BIAS_ROOM[target.bias_dtype])
    if not target.shift_only:
        bias_room *= 1.0 - 2.0**-7
    per_channel = target.per_channel_weights if per_channel is None else per_channel
    # max |w| per channel in the weight's own float type, then widened: both steps are exact, so
    # this is max |float64(w)| without a float64 copy of the weights.
    others = tuple(i for i in range(weight.ndim) if i != range(weight.ndim)[axis])
    amax = np.abs(weight).max(axis=others).astype(np.float64).reshape(weight.shape[axis])
    b = np.zeros_like(amax) if bias is None else np.abs(bias.astype(np.float64)).reshape(-1)
    if not per_channel:
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


NUDGE_THRESHOLD = 2.0**-22
"""A weight scale is nudged when m / 2^k misses s_x * s_w / s_y by more than this, relatively:
a few float32 ulps (2^-24), the most the QDQ model's own float arithmetic can tell apart. An 8- or
16-bit multiplier (error up to 2^-8 / 2^-16) always crosses it; a 31-bit one (2^-31) never does."""

MAX_NUDGE = 0.02
"""The largest relative change of a weight scale the nudge may make (TIDL allows about 2%). With a
normalized b-bit multiplier the nudge is at most 2^-b (1/256 for 8 bits); only a shift driven out
of its range [-31, 62] could exceed this, and that is a CompileError."""


def nudge_weight_scale(s_x: float, s_w: np.ndarray, s_y: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight scales s_w' with s_x * s_w' / s_y == m / 2^k (to float32 precision), and |s_w'/s_w - 1|.

    m, k = quantize_multiplier(s_x * s_w / s_y, bits) (m rounded half up to ``bits`` bits, so
    |m/2^k - M| <= M * 2^-bits); where the relative miss exceeds NUDGE_THRESHOLD,
    s_w' = float32(m * 2^-k * s_y / s_x). The QDQ model then dequantizes the weights with s_w' and
    describes the same product the IR forms with m and k. Weights are quantized with s_w', so the
    largest may round to qmax + 1 and saturate (at most 0.5 step more error, like rounding).
    """
    s_w = np.asarray(s_w, dtype=np.float32)
    f64 = np.float64
    ratio = f64(np.float32(s_x)) * s_w.astype(f64) / f64(np.float32(s_y))
    m, k = quantize_multiplier(ratio, bits)
    exact = m.astype(f64) * np.exp2(-k.astype(f64))
    need = np.abs(exact - ratio) > NUDGE_THRESHOLD * ratio
    target_scale = (exact * f64(np.float32(s_y)) / f64(np.float32(s_x))).astype(np.float32)
    nudged = np.where(need, target_scale, s_w).astype(np.float32)
    return nudged, np.abs(nudged.astype(f64) / s_w.astype(f64) - 1.0)


def smallest_multiplier(bits: int) -> float:
    """The smallest ratio m / 2^k a ``bits``-bit multiplier represents normalized: m = 2^(bits-1)
    at the largest shift k = 62 (shift-only, bits = 0: 2^-62). Below it ``quantize_multiplier``
    loses normalization and finally rounds m to 0."""
    return 2.0 ** (max(int(bits), 1) - 1 - 62)


def raise_dead_channels(s_x: float, s_w: np.ndarray, s_y: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Raise the weight scale of every channel whose ratio M = s_x s_w / s_y is below
    ``smallest_multiplier(bits)`` to s_w' = M_min s_y / s_x (float32, one ulp up if it lands
    below): (scales, mask of raised channels).

    Such a channel (pruned weights of ~1e-20, say) cannot be requantized with a normalized m: the
    multiplier would round to 0, and the QDQ model would need a weight scale of 0. Since
    s_w = max|w| / qmax (or the bias room's |b| / (s_x room)), M < M_min means every weight's and
    the bias's contribution is below qmax M_min = qmax 2^(bits-63) output steps (<= 2^-48 for
    int8 / 8 bits): the channel's output is its zero point. With s_w' its weights quantize to
    (almost always) 0, q_b = round(b / (s_x s_w')) only shrinks (still fits its type), and
    m / 2^k = M_min is exact, so the QDQ model computes the same (zero) product as the IR. On a
    power-of-2 target s_w' is a power of two like s_x and s_y."""
    f64 = np.float64
    s_w = np.asarray(s_w, dtype=np.float32)
    floor = smallest_multiplier(bits)
    ratio = f64(np.float32(s_x)) * s_w.astype(f64) / f64(np.float32(s_y))
    dead = ratio < floor
    if not dead.any():
        return s_w, dead
    raised = np.float32(floor * f64(np.float32(s_y)) / f64(np.float32(s_x)))
    if f64(np.float32(s_x)) * f64(raised) / f64(np.float32(s_y)) < floor:
        raised = np.nextafter(raised, np.float32(np.inf))
    return np.where(dead, raised, s_w).astype(np.float32), dead


def _is_depthwise(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    return node.op_type == "Conv" and int(get_attr(node, "group", 1)) > 1 and weight.shape[1] == 1


def bias_qparams(input_scale: np.float32, w_qp: QParams, target: TargetPreset) -> QParams:
    """Bias encoding: scale float32(s_x * s_w) per output channel, zero point 0, the preset's type."""
    scale = (np.float32(input_scale) * w_qp.scale).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int64), target.bias_dtype,
                   axis=0 if scale.size > 1 else None, source="bias")


def choose_qparams(model: onnx.ModelProto, plan: LayerPlan, ranges: dict[str, TensorRange],
                   target: TargetPreset, shapes: dict[str, tuple[int, ...]] | None = None) -> QParamTable:
    """Fill the table for every activation tensor, weight and bias of the plan, in execution order.

    Per layer the preset is ``target.for_layer(name)`` (16-bit for ``layers_16bit``). After a
    weighted layer's weight scale is chosen it is nudged (``nudge_weight_scale``) where the
    layer's multiplier width cannot represent s_x * s_w / s_y; a layer without weights (Add,
    Concat, pooling) gets ``consumer_scales`` instead (see QParamTable). Every moved scale is
    recorded in ``table.adjustments``.
    """
    from .lowering import (  # lowering owns the integer rules of these layers
        rescale_ratios,
        tensor_shapes,
    )

    index = GraphIndex(model.graph)
    table = QParamTable()
    known = {g.name for g in plan.groups}
    unknown = [n for n in target.layers_16bit if n not in known]
    if unknown:
        raise CompileError(f"16-bit layer(s) {unknown} are not layers of the model; layers are named by their "
                           f"ONNX node (after BatchNorm folding and fusion): {', '.join(sorted(known)[:12])}"
                           + (", ..." if len(known) > 12 else ""))
    pools = any(g.op_type in ("AveragePool", "GlobalAveragePool") for g in plan.groups)
    if shapes is None:  # the caller may pass tensor_shapes(model), computed once per compile
        shapes = tensor_shapes(model) if pools else {}
    for name in plan.inputs:
        table[name] = activation_qparams(ranges[name], target, f"calibration:{ranges[name].method}")
    for group in plan.groups:
        preset = target.for_layer(group.name)
        if group.kind == "float":  # float fallback: float outputs calibrated, int/bool outputs raw
            _float_group_qparams(group, table, ranges, preset, plan.raw_tensors())
            continue
        missing = [i for i in group.inputs if i not in table]
        if missing:
            raise CompileError(f"node '{group.name}' ({group.op_type}): input(s) {missing} have no "
                               "quantization parameters (the graph is not in execution order)")
        if not group.quantized_outputs:  # ArgMax: an exact int64 index, no encoding
            continue
        if group.scale_rule == "inherit":
            src = table[group.inputs[0]]
            table[group.output] = QParams(src.scale, src.zero_point, src.dtype, src.axis,
                                          source=f"aligned:{group.inputs[0]}")
        else:
            rng = ranges[group.output]
            table[group.output] = activation_qparams(rng, preset, f"calibration:{rng.method}")
        if group.weight is not None:
            _weight_and_bias(group, index, table, preset)
        else:
            try:
                _nudge_output_scale(group, table, preset, shapes)
                effective = rescale_ratios(group, table, preset, model, shapes)
            except ValueError as exc:
                raise CompileError(f"node '{group.name}' ({group.op_type}): {exc}") from None
            for tensor, scale in effective.items():
                if scale != table[tensor].scale[0]:
                    table.consumer_scales[(group.name, tensor)] = scale
                if scale == 0:  # m_i = 0: the input is dropped (docs/ir.md, Add); say how much it held
                    qp_i = table[tensor]
                    reach = max(abs(qp_i.qmin - int(qp_i.zero_point[0])), abs(qp_i.qmax - int(qp_i.zero_point[0])))
                    amount = reach * float(qp_i.scale[0]) / float(table[group.output].scale[0])
                    table.adjustments.append(ScaleAdjustment(group.name, tensor, "dropped_input", amount))
    return table


def _float_group_qparams(group, table: QParamTable, ranges: dict[str, TensorRange], preset: TargetPreset,
                         raw: dict[str, str]) -> None:
    """A float layer's float outputs get calibrated encodings; its raw outputs none (exact values)."""
    missing = [i for i in group.inputs if i not in table and i not in raw]
    if missing:
        raise CompileError(f"node '{group.name}' ({group.op_type}): input(s) {missing} have no "
                           "quantization parameters (the graph is not in execution order)")
    for out in group.quantized_outputs:
        table[out] = activation_qparams(ranges[out], preset, f"calibration:{ranges[out].method}")


def _nudge_output_scale(group, table: QParamTable, preset: TargetPreset, shapes: dict) -> None:
    """A layer without weights (Add, Concat, average pooling with one divisor D) on a preset with a
    short multiplier: move its output scale s_y so that the ratio of its widest input,
    r = s_ref / s_y (pooling: s_x / (s_y * D)), is exactly m / 2^k: s_y' = float32(s_ref 2^k / m)
    (pooling: s_x 2^k / (m D)). That input is then read without any gain error; the others of an
    Add/Concat keep the bounded error of their own m_i (docs/ir.md). |s_y'/s_y - 1| <= 2^-bits,
    recorded as an ``output_nudge``. Shift-only presets need none (power-of-2 ratios are exact)."""
    from .lowering import (  # lowering owns these layers' integer rules
        add_preset,
        pool_divisors,
        pool_window_attrs,
    )

    if group.op_type in ("Add", "Sub"):  # a 16-bit input widens the multiplier (lowering.add_preset)
        preset = add_preset(preset, [table[i].dtype for i in group.inputs])
    bits = preset.multiplier_bits
    out = table[group.output]
    if bits == 0 or group.op_type not in ("Add", "Concat", "AveragePool", "GlobalAveragePool"):
        return
    scales = [np.float64(table[i].scale[0]) for i in group.inputs]
    s_y = np.float64(out.scale[0])
    divisor = 1
    if group.op_type in ("AveragePool", "GlobalAveragePool"):
        in_shape, out_shape = shapes[group.inputs[0]], shapes[group.output]
        d = pool_divisors(pool_window_attrs(group.node, in_shape), in_shape[2:], out_shape[2:])
        if not np.all(d == d.flat[0]):
            return  # per-position divisors: no single exact output scale
        divisor = int(d.flat[0])
    elif any(s == s_y for s in scales):
        return  # an input already at the output's scale passes through exactly
    s_ref = max(scales)
    ratio = s_ref / (s_y * divisor)
    m, k = quantize_multiplier(np.array([ratio]), bits)
    exact = float(m[0]) * 2.0 ** -int(k[0])
    if abs(exact - ratio) <= NUDGE_THRESHOLD * ratio:
        return
    new = np.float32(s_ref / (exact * divisor))
    change = abs(float(new) / s_y - 1.0)
    if change > MAX_NUDGE:
        return
    table[group.output] = QParams(new, out.zero_point, out.dtype, out.axis, source=out.source + "+nudged")
    table.adjustments.append(ScaleAdjustment(group.name, group.output, "output_nudge", change))


def bias_dtype_for(input_dtype: str, preset: TargetPreset) -> str:
    """The bias type of a weighted layer: int64 when its input or its weights are 16-bit, else the
    preset's (int32, or int16 on TDA4VM).

    Why: the bias is quantized at s_b = s_x * s_w. With a 16-bit s_x or s_w, s_b is ~2^8 (one 16-bit
    operand) or ~2^16 (both) times finer than in the 8-bit layer, so q_b = b / s_b of an ordinary
    BatchNorm-folded bias overflows int32; fitting it would raise s_w (``bias_fit``) by as many
    bits, throwing away the precision the 16-bit layer was promoted for (a 16 x 16-bit layer with
    |b| ~ 100 and s_x ~ 1e-4 lost ~6 of its 16 weight bits; on EfficientNet-Lite0 the worst
    channel of an 8-bit layer after a 16-bit one lost 13). The accumulator is int64 in these
    layers anyway; the QDQ model reads such a bias through Cast + Mul (passes/insert_qdq.py)."""
    if input_dtype.endswith("16") or preset.weight_bits == 16:
        return "int64"
    return preset.bias_dtype


def _weight_and_bias(group, index: GraphIndex, table: QParamTable, preset: TargetPreset) -> None:
    qp_x, qp_y = table[group.inputs[0]], table[group.output]
    bias_dtype = bias_dtype_for(qp_x.dtype, preset)
    if bias_dtype != preset.bias_dtype:
        preset = replace(preset, bias_dtype=bias_dtype)
    s_x = qp_x.scale[0]
    weight = index.constant(group.weight)
    bias = index.constant(group.bias) if group.bias else None
    if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
        raise CompileError(f"node '{group.name}' ({group.op_type}): weights or bias are not finite")
    axis = weight_output_axis(group.node)
    per_channel = True if (preset.depthwise_per_channel and _is_depthwise(group.node, weight)) else None
    if group.op_type == "ConvTranspose" and int(get_attr(group.node, "group", 1)) > 1:
        per_channel = False  # axis 1 holds C_out/group channels only: one scale for every group
    w_qp = weight_qparams(weight, axis, bias, s_x, preset, per_channel)
    if bias is not None:
        natural = weight_qparams(weight, axis, None, s_x, preset, per_channel).scale.astype(np.float64)
        lost = float(np.log2(w_qp.scale.astype(np.float64) / natural).max())
        if lost > 0:
            table.adjustments.append(ScaleAdjustment(group.name, group.weight, "bias_fit", lost))
    bits = preset.layer_multiplier_bits(qp_x.dtype, w_qp.dtype)
    raised, dead = raise_dead_channels(s_x, w_qp.scale, qp_y.scale[0], bits)
    if dead.any():
        lost = float(np.log2(raised.astype(np.float64) / w_qp.scale.astype(np.float64)).max())
        table.adjustments.append(ScaleAdjustment(group.name, group.weight, "dead_channel", lost))
        w_qp = QParams(raised, w_qp.zero_point, w_qp.dtype, w_qp.axis, source=w_qp.source)
    if bits > 0:
        nudged, change = nudge_weight_scale(s_x, w_qp.scale, qp_y.scale[0], bits)
        if change.max() > MAX_NUDGE:
            ratio = float(np.float64(s_x) * w_qp.scale.astype(np.float64).max() / np.float64(qp_y.scale[0]))
            raise CompileError(f"node '{group.name}' ({group.op_type}): s_x * s_w / s_y = {ratio:.3g} exceeds the "
                               f"largest {bits}-bit multiplier (2^{bits} - 1) * 2^31 and would need a weight-scale "
                               f"nudge of {change.max():.2%} (more than {MAX_NUDGE:.0%}); the output's calibrated "
                               "range is far too small for its input and weights: check its calibration data")
        if change.max() > 0:
            table.adjustments.append(ScaleAdjustment(group.name, group.weight, "nudge", float(change.max())))
        w_qp = QParams(nudged, w_qp.zero_point, w_qp.dtype, w_qp.axis, source=w_qp.source)
    if group.weight in table and not table[group.weight].same_as(w_qp):
        raise CompileError(f"node '{group.name}' ({group.op_type}): weight '{group.weight}' is "
                           "shared with another layer that needs a different encoding")
    table[group.weight] = w_qp
    if group.bias:
        table[group.bias] = bias_qparams(s_x, w_qp, preset)
