"""Pre-quantized (QDQ) models: the imported scales -> the quantization-parameter table.

``passes.qdq_import.ImportQDQ`` removes a model's Q/DQ nodes and keeps their parameters as
annotations; this module turns those annotations into the ``QParamTable`` that QDQ insertion and
lowering read, unchanged (``source="qdq:<tensor>"``), and checks them against the target:

- weights must be symmetric (zero point 0) on every preset; ``mmav1`` also needs per-tensor weights,
  symmetric activations (zero point 0) and power-of-2 scales. ``snap_scales`` rounds every scale up
  to the next power of two, 2^ceil(log2 s) (up: no value is clipped), and reports the largest
  relative change; the program then no longer matches the source QDQ model, only its own QDQ model.
- a pass-through op (MaxPool, Reshape, Flatten) cannot change an encoding: if the QDQ model
  quantizes its input and output differently, the producer-side and consumer-side QDQ disagree,
  which is an error naming the tensor. A standalone Relu/Clip may change it: it is lowered as a
  ``requantize`` layer with the activation's clamp (``PrequantizedLowering``).
- the bias is re-expressed in units of s_x * s_w (the accumulator's) when the QDQ model's bias
  scale is not float32(s_x * s_w), or when the bias is float (PyTorch exports): q_b = round(b / (s_x s_w)).
  A grouped ConvTranspose's per-channel weight scales lie on ONNX axis 1, which holds C_out/group
  channels: output channel o uses s_w[o mod (C_out/group)], so its bias scale is s_x * s_w[o mod (C_out/group)]
  (``output_channel_weight_qparams``; the lowering tiles the weight scales the same way).
- requantization: the scales are given, so nothing is nudged. A preset with a narrow multiplier
  (0 < bits < 31) is lowered with 31-bit multipliers instead, and the report says so; a shift-only
  preset keeps m = 1 (its scales are powers of two).
- 16-bit QDQ (int16/uint16) compiles with the 16-bit form of the preset (int64 accumulation).
- an activation the QDQ model leaves unquantized needs a scale: with calibration data it is
  calibrated like a float model's; without, it is an error listing the tensors. A pass-through op's
  output without QDQ inherits its input's encoding (exact). A float weight without QDQ is quantized
  by the preset's own weight policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper

from passes.graph import GraphIndex, get_attr
from passes.insert_qdq import ONNX_DTYPES
from passes.layer_plan import LayerGroup, LayerPlan
from passes.qdq_import import read_annotations
from passes.qparams import DTYPE_RANGES, QParams, QParamTable, quantize_constant
from passes.targets import TargetPreset
from runtime.executor import run_layer
from runtime.ir import Layer

from .calibration import TensorRange
from .errors import CompileError
from .lowering import Lowering, choose_multipliers
from .onnx_runner import make_session
from .scales import (
    activation_qparams,
    bias_qparams,
    round_up_power_of_two,
    weight_output_axis,
    weight_qparams,
)
from .verify import TIE_TOLERANCE_ABS, TIE_TOLERANCE_REL, LayerCheck, tie_distance

FULL_MULTIPLIER_BITS = 31  # the widest multiplier the kernels take: represents any given ratio to 2^-31
REQUANTIZING_PASS_THROUGH = ("Relu", "Clip")  # inherit-rule ops that may change the encoding


@dataclass
class PrequantizedScales:
    """The table for a pre-quantized model, the preset to lower it with, and what was decided."""

    qparams: QParamTable
    target: TargetPreset
    notes: list[str] = field(default_factory=list)
    largest_snap_change: float = 0.0
    native_multiplier_bits: int = 0


def annotation_qparams(name: str, ann: dict, source_prefix: str = "qdq") -> QParams:
    return QParams(np.asarray(ann["scale"], np.float32), np.asarray(ann["zero_point"], np.int64), ann["dtype"],
                   ann["axis"], source=f"{source_prefix}:{name}")


def uncovered_tensors(plan: LayerPlan, annotations: dict[str, dict]) -> list[str]:
    """Activation tensors whose scale must come from calibration: model inputs and outputs of
    calibrated-rule layers that the QDQ model does not quantize."""
    missing = [t for t in plan.inputs if t not in annotations]
    missing += [g.output for g in plan.groups if g.scale_rule == "calibrated" and g.output not in annotations]
    return missing


def _fail(group: LayerGroup, message: str) -> CompileError:
    return CompileError(f"node '{group.name}' ({group.op_type}): {message}")


def _same_encoding(a: QParams, b: QParams) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def _is_power_of_two(scale: np.ndarray) -> bool:
    e = np.log2(scale.astype(np.float64))
    return bool(np.all(e == np.round(e)))


def prequantized_qparams(model: onnx.ModelProto, plan: LayerPlan, target: TargetPreset,
                         ranges: dict[str, TensorRange] | None = None, snap_scales: bool = False) -> PrequantizedScales:
    """The quantization-parameter table of an imported QDQ model, checked against ``target``."""
    annotations = read_annotations(model)
    ranges = ranges or {}
    index = GraphIndex(model.graph)
    notes: list[str] = []
    bits16 = [n for n, a in annotations.items() if a["dtype"] in ("int16", "uint16")]
    if bits16 and target.activation_bits == 8:
        target = target.wide()
        notes.append(f"16-bit QDQ ({len(bits16)} tensors, e.g. '{bits16[0]}'): compiled with the 16-bit form of "
                     f"{target.name}")

    def activation(name: str) -> QParams:
        if name in annotations:
            return annotation_qparams(name, annotations[name])
        if name not in ranges:
            raise CompileError(f"tensor '{name}' has no scale in the QDQ model and no calibration data was given")
        return activation_qparams(ranges[name], target, f"calibration:{ranges[name].method}")

    table = QParamTable()
    for name in plan.inputs:
        table[name] = activation(name)
    weight_groups: list[LayerGroup] = []
    for group in plan.groups:
        out = group.output
        if group.scale_rule == "inherit":
            src = table[group.inputs[0]]
            if out not in annotations:
                table[out] = QParams(src.scale, src.zero_point, src.dtype, src.axis, source=f"aligned:{group.inputs[0]}")
            else:
                qp = annotation_qparams(out, annotations[out])
                if not _same_encoding(qp, src) and group.op_type not in REQUANTIZING_PASS_THROUGH:
                    raise _fail(group, f"producer-side and consumer-side QDQ disagree: its input "
                                       f"'{group.inputs[0]}' is {src.describe()} and the QDQ model quantizes its output "
                                       f"'{out}' as {qp.describe()}, but {group.op_type} passes its input's encoding "
                                       "through unchanged")
                table[out] = qp
        else:
            table[out] = activation(out)
        if group.weight is not None:
            weight_groups.append(group)
            _weight_and_bias(group, table, annotations, index, target, notes)
    _consumer_scales(table, plan, annotations, notes)
    _check_target(table, plan, weight_groups, target, snap_scales)
    largest = 0.0
    if snap_scales:
        largest = _snap(table, weight_groups, notes)
    for group in weight_groups:
        _finish_bias(group, table, annotations, index, target, notes)
    native = target.multiplier_bits
    if 0 < native < FULL_MULTIPLIER_BITS:
        target = replace(target, multiplier_bits=FULL_MULTIPLIER_BITS)
    n_imported = sum(1 for qp in table.values() if qp.source.startswith("qdq"))
    notes.insert(0, f"pre-quantized model: {n_imported} of {len(table)} tensors take the QDQ model's scales")
    return PrequantizedScales(table, target, notes, largest, native)


CONSUMER_SCALE_OPS = ("Add", "Concat", "AveragePool", "GlobalAveragePool")


def _consumer_scales(table: QParamTable, plan: LayerPlan, annotations: dict, notes: list[str]) -> None:
    """A tensor whose consumer-side DequantizeLinear reads it at another scale than its
    QuantizeLinear wrote it: reported, and kept as ``table.consumer_scales[(node, tensor)]`` when the
    reader is a layer without weights that requantizes each input by its own multiplier (what
    qlower's own QDQ models do for 8-bit Add/Concat/pooling multipliers); an error otherwise."""
    groups = {g.name: g for g in plan.groups}
    for tensor, ann in annotations.items():
        for reader, scale in ann.get("consumer_scales", {}).items():
            group = groups.get(reader)
            own = float(ann["scale"][0])
            what = (f"tensor '{tensor}': producer-side and consumer-side QDQ disagree: written at scale {own:.9g}, "
                    f"read by '{reader}' at {scale:.9g} (relative difference {abs(scale / own - 1):.3g})")
            if group is None or tensor not in group.inputs or group.op_type not in CONSUMER_SCALE_OPS:
                op = f" ({group.op_type})" if group is not None else ""
                raise CompileError(f"{what}; only an {'/'.join(CONSUMER_SCALE_OPS)} reader can take its own input "
                                   f"scale, '{reader}'{op} cannot")
            table.consumer_scales[(reader, tensor)] = np.float32(scale)
            notes.append(what + f"; '{reader}' requantizes from the scale it reads")


def _weight_and_bias(group: LayerGroup, table: QParamTable, annotations: dict, index: GraphIndex,
                     target: TargetPreset, notes: list[str]) -> None:
    weight = index.constant(group.weight)
    axis = weight_output_axis(group.node)
    ann = annotations.get(group.weight)
    if ann is not None:
        w_qp = annotation_qparams(group.weight, ann)
        if w_qp.per_channel and (w_qp.axis != axis or w_qp.scale.size != weight.shape[axis]):
            raise _fail(group, f"weight '{group.weight}' is quantized per channel on axis {w_qp.axis} "
                               f"({w_qp.scale.size} scales); this op's output channels are axis {axis} "
                               f"({weight.shape[axis]})")
        back = quantize_constant(weight, w_qp)
        again = (back.astype(np.float64) - _bcast(w_qp.zero_point, w_qp, weight.ndim)) * _bcast(
            w_qp.scale.astype(np.float64), w_qp, weight.ndim)
        if not np.allclose(again, weight, rtol=1e-6, atol=0):
            raise _fail(group, f"weight '{group.weight}' does not re-quantize to the QDQ model's integers "
                               "(was the weight changed after import, e.g. by BatchNorm folding?)")
    else:
        bias = index.constant(group.bias) if group.bias else None
        w_qp = weight_qparams(weight, axis, bias, table[group.inputs[0]].scale[0], target)
        notes.append(f"weight '{group.weight}' of '{group.name}' is float in the QDQ model: quantized by "
                     f"{target.name}'s weight policy")
    if group.weight in table and not table[group.weight].same_as(w_qp):
        raise _fail(group, f"weight '{group.weight}' is shared with another layer that needs a different encoding")
    table[group.weight] = w_qp


def _bcast(values: np.ndarray, qp: QParams, ndim: int) -> np.ndarray:
    if not qp.per_channel:
        return values.reshape(())
    shape = [1] * ndim
    shape[qp.axis] = -1
    return values.reshape(shape)


def output_channel_weight_qparams(group: LayerGroup, w_qp: QParams) -> QParams:
    """The weight encoding indexed by output channel, as the bias and the IR weight are.

    A grouped ConvTranspose's weight is [C_in, C_out/group, kh, kw]: its ONNX axis 1 holds only
    C_out/group channels, and output channel o = g * (C_out/group) + j takes scale s_w[j]
    (``Lowering._lower_convtranspose`` tiles it the same way), so the per-channel scales are
    repeated once per group: C_out entries, s_w[o mod (C_out/group)]. Any other op: unchanged."""
    groups = int(get_attr(group.node, "group", 1)) if group.op_type == "ConvTranspose" else 1
    if groups == 1 or not w_qp.per_channel:
        return w_qp
    return QParams(np.tile(w_qp.scale, groups), np.tile(w_qp.zero_point, groups), w_qp.dtype, axis=0,
                   source=w_qp.source)


def _finish_bias(group: LayerGroup, table: QParamTable, annotations: dict, index: GraphIndex,
                 target: TargetPreset, notes: list[str]) -> None:
    """Bias in the accumulator's units: scale float32(s_x * s_w[c]) per output channel c (for a
    grouped ConvTranspose s_w[c mod (C_out/group)], ``output_channel_weight_qparams``), zero
    point 0; its integers must fit the preset's bias type."""
    if not group.bias:
        return
    s_x = table[group.inputs[0]].scale[0]
    w_qp = output_channel_weight_qparams(group, table[group.weight])
    wanted = bias_qparams(s_x, w_qp, target)
    ann = annotations.get(group.bias)
    if ann is not None:
        given = annotation_qparams(group.bias, ann)
        if np.array_equal(np.broadcast_to(given.scale, wanted.scale.shape), wanted.scale) and not given.zero_point.any():
            wanted = QParams(wanted.scale, wanted.zero_point, given.dtype, wanted.axis, source=given.source)
        else:
            rel = float(np.max(np.abs(np.broadcast_to(given.scale, wanted.scale.shape).astype(np.float64)
                                      / wanted.scale - 1.0)))
            notes.append(f"bias '{group.bias}' of '{group.name}': the QDQ model's bias scale is not s_x*s_w "
                         f"(largest relative difference {rel:.3g}); re-expressed in s_x*s_w units")
    else:
        notes.append(f"bias '{group.bias}' of '{group.name}' is float in the QDQ model: quantized to s_x*s_w")
    q = quantize_constant(index.constant(group.bias).reshape(-1).astype(np.float64), replace_dtype(wanted, "int64"))
    lo, hi = DTYPE_RANGES[target.bias_dtype]
    if q.min() < lo or q.max() > hi:
        raise _fail(group, f"bias '{group.bias}' needs integers up to {int(np.abs(q).max())}, beyond {target.name}'s "
                           f"{target.bias_dtype} bias")
    table[group.bias] = wanted


def replace_dtype(qp: QParams, dtype: str) -> QParams:
    return QParams(qp.scale, qp.zero_point, dtype, qp.axis, qp.source)


def _check_target(table: QParamTable, plan: LayerPlan, weight_groups: list[LayerGroup], target: TargetPreset,
                  snap_scales: bool) -> None:
    """The preset's rules on the imported encodings, each failure naming the tensor."""
    for group in weight_groups:
        w_qp = table[group.weight]
        if w_qp.zero_point.any():
            raise _fail(group, f"weight '{group.weight}' has zero point(s) {sorted(set(w_qp.zero_point.tolist()))[:4]}; "
                               f"{target.name} needs symmetric weights (zero point 0): re-quantize with symmetric weights")
        depthwise = group.op_type == "Conv" and 1 < int(get_attr(group.node, "group", 1)) == w_qp.scale.size
        if w_qp.per_channel and not target.per_channel_weights and not (depthwise and target.depthwise_per_channel):
            raise _fail(group, f"weight '{group.weight}' has {w_qp.scale.size} per-channel scales; {target.name} "
                               "needs one scale per tensor: re-quantize per tensor (quantize_static per_channel=False)")
    if not target.power_of_two:
        return
    for name in plan.activation_tensors():
        qp = table[name]
        if qp.zero_point.any():
            raise CompileError(f"tensor '{name}': zero point {int(qp.zero_point[0])}; {target.name} needs symmetric "
                               "activations (zero point 0): re-quantize with ActivationSymmetric=True or unsigned "
                               "zero point 0 after ReLU")
    if snap_scales:
        return
    off = [n for n, qp in table.items() if qp.source.startswith("qdq") and qp.dtype not in ("int32", "int64") and not _is_power_of_two(qp.scale)]
    if off:
        listed = ", ".join(f"'{n}' ({float(table[n].scale.reshape(-1)[0]):.6g})" for n in off[:4])
        more = f" and {len(off) - 4} more" if len(off) > 4 else ""
        raise CompileError(f"{target.name} needs power-of-2 scales; {len(off)} tensor(s) are not: {listed}{more}. "
                           "Pass --snap-scales to round them up to powers of two (the report gives the largest "
                           "relative change)")


def _snap(table: QParamTable, weight_groups: list[LayerGroup], notes: list[str]) -> float:
    """Round every activation and weight scale up to a power of two; return the largest relative change."""
    biases = {g.bias for g in weight_groups if g.bias}
    largest, where, count = 0.0, "", 0
    for name, qp in list(table.items()):
        if name in biases:
            continue
        snapped = round_up_power_of_two(qp.scale).astype(np.float32)
        if np.array_equal(snapped, qp.scale):
            continue
        change = float(np.max(snapped.astype(np.float64) / qp.scale - 1.0))
        if change > largest:
            largest, where = change, name
        count += 1
        table[name] = QParams(snapped, qp.zero_point, qp.dtype, qp.axis, source=f"qdq-snapped:{name}")
    if count:
        notes.append(f"--snap-scales: {count} scale(s) rounded up to powers of two; largest relative change "
                     f"{100 * largest:.1f}% on '{where}'")
    else:
        notes.append("--snap-scales: every scale was already a power of two")
    return largest


class PrequantizedLowering(Lowering):
    """Lowering with one more rule that imported scales need: a standalone Relu/Clip whose output
    the QDQ model encodes differently from its input becomes a ``requantize`` layer,
    y = clamp(zp_y + requant(x - zp_x, m, k), lo, hi) with m / 2^k ~= s_x / s_y (round half up) and
    [lo, hi] the activation's bounds on the output encoding: Q(act(v)) = clamp(Q(v), Q(a), Q(b))."""

    def _clamp_or_requantize(self, group: LayerGroup) -> Layer:
        qx, qy = self.ctx.qparams[group.inputs[0]], self.ctx.qparams[group.output]
        if _same_encoding(qx, qy):
            return self._clamp_only(group)
        ratio = np.array([np.float64(qx.scale[0]) / np.float64(qy.scale[0])])
        params = self._requant_params(group, ratio)
        params.update(self._clamp_params(group, qy, group.node))
        layer = self._layer(group, "requantize", params=params, rounding=self.ctx.target.requant_rounding)
        layer.inputs = layer.inputs[:1]
        return layer

    _lower_relu = _clamp_or_requantize
    _lower_clip = _clamp_or_requantize

    def lower_group(self, group: LayerGroup) -> Layer:
        """Lower with each input read at its consumer scale, where the QDQ model gives one."""
        table = self.ctx.qparams
        consumer = getattr(table, "consumer_scales", {})
        saved = {t: table[t] for t in group.inputs if (group.name, t) in consumer}
        for t, qp in saved.items():
            table[t] = QParams(consumer[(group.name, t)], qp.zero_point, qp.dtype, qp.axis,
                               source=f"qdq-consumer:{group.name}")
        try:
            if group.weight is None and self.native_bits:
                return self._lower_at_native_bits(group)
            return super().lower_group(group)
        finally:
            table.update(saved)

    def _lower_at_native_bits(self, group: LayerGroup) -> Layer:
        """A layer without weights (Add, Concat, pooling, requantize) lowered at the preset's own
        multiplier width when that gives every effective multiplier m * 2^-k within 1e-3 of an
        output step of the 31-bit one (ties of such sums are frequent, so a QDQ model made for the
        target must get the target's exact m); otherwise the 31-bit form."""
        wide = super().lower_group(group)
        if "multiplier" not in wide.params:
            return wide
        full = self.ctx.target
        self.ctx.target = replace(full, multiplier_bits=self.native_bits)
        try:
            narrow = super().lower_group(group)
        except CompileError:
            narrow = None
        finally:
            self.ctx.target = full
        out = self.ctx.qparams[group.output]
        if narrow is not None and np.allclose(_effective(narrow), _effective(wide), rtol=1e-3 / (out.qmax - out.qmin),
                                              atol=0):
            return narrow
        self.widened.append(group.name)
        return wide

    def __init__(self, *args, native_bits: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_bits = native_bits
        self.widened: list[str] = []

    def _requant_params(self, group: LayerGroup, ratio: np.ndarray, bits: int | None = None) -> dict:
        """A weighted layer keeps the preset's own multiplier width (``native_bits``) when it
        represents every given ratio s_x * s_w[c] / s_y to 1e-3 of an output step (relative
        1e-3 / (qmax - qmin)): a QDQ model made for the target (nudged scales) lowers as the target
        runs it. Otherwise it gets the widest multiplier its accumulator bound allows (up to 31 bits,
        above a preset's 16-bit cap for 16-bit operands): the given ratio must be represented better
        than the QDQ model's float32 arithmetic, or outputs far from any tie differ."""
        if group.weight is None or bits is None or bits == 0:
            return super()._requant_params(group, ratio, bits)
        if self.native_bits:
            out = self.ctx.qparams[group.output]
            m, k = choose_multipliers(ratio, self.native_bits)
            err = np.abs(m.astype(np.float64) * np.exp2(-k.astype(np.float64)) / np.asarray(ratio, np.float64) - 1)
            if np.all(err <= 1e-3 / (out.qmax - out.qmin)):
                return super()._requant_params(group, ratio, self.native_bits)
            self.widened.append(group.name)
        if bits < FULL_MULTIPLIER_BITS:
            bits = max(bits, self._widest_multiplier_bits(group))
        return super()._requant_params(group, ratio, bits)

    def _widest_multiplier_bits(self, group: LayerGroup) -> int:
        """min(31, 61 - ceil(log2(B))) with B = max_c sum|q_w[c] - zp_w[c]| * max|q_x - zp_x| + 2^31
        (bias and folded zero point): |acc| * m stays below 2^61, clear of int64 overflow."""
        ctx = self.ctx
        qp_x, qp_w = ctx.qparams[group.inputs[0]], ctx.qparams[group.weight]
        weight = ctx.index.constant(group.weight)
        axis = weight_output_axis(group.node)
        q_w = quantize_constant(weight, qp_w).astype(np.int64) - _bcast(qp_w.zero_point, qp_w, weight.ndim)
        groups = int(get_attr(group.node, "group", 1)) if group.op_type == "ConvTranspose" else 1
        if groups > 1:  # [C_in, C_out/g, ...] -> output-major [C_out, C_in/g, ...]: each channel its own group's taps
            c_in, c_out_g = q_w.shape[:2]
            q_w = q_w.reshape(groups, c_in // groups, c_out_g, -1).transpose(0, 2, 1, 3).reshape(groups * c_out_g, -1)
            axis = 0
        per_channel = np.abs(np.moveaxis(q_w, axis, 0)).reshape(q_w.shape[axis], -1).sum(axis=1)
        zp_x = int(qp_x.zero_point[0])
        x_max = max(abs(qp_x.qmin - zp_x), abs(qp_x.qmax - zp_x))
        bound = float(per_channel.max()) * x_max + 2.0**31
        return int(min(FULL_MULTIPLIER_BITS, 61 - np.ceil(np.log2(bound))))


def _effective(layer: Layer) -> np.ndarray:
    """m * 2^-k of a layer, in float64 (a shift per multiplier entry, or one shared)."""
    m = layer.params["multiplier"].astype(np.float64)
    k = layer.params["shift"].astype(np.float64)
    k = k.reshape(m.shape) if k.size == m.size else k.reshape(-1)[0]
    return m * np.exp2(-k)


def lower_prequantized(model, plan, qparams, target, metadata=None, native_bits: int = 0,
                       notes: list[str] | None = None):
    """The integer program of an imported QDQ model (``PrequantizedLowering``); ``notes`` gets a
    line on the multiplier widths used."""
    lowering = PrequantizedLowering(model, plan, qparams, target, metadata, native_bits=native_bits)
    program = lowering.run()
    if notes is not None and native_bits:
        n_requant = sum(1 for layer in program.layers if "multiplier" in layer.params)
        if lowering.widened:
            names = ", ".join(repr(n) for n in lowering.widened[:4])
            notes.append(f"{len(lowering.widened)} of {n_requant} requantizing layers have scale ratios that "
                         f"{native_bits}-bit multipliers cannot represent ({names}...): lowered with wider "
                         f"multipliers (up to {FULL_MULTIPLIER_BITS} bits) so the given scales are honoured")
        else:
            notes.append(f"every layer's scale ratio fits {native_bits}-bit multipliers (the QDQ model was made "
                         "for this target)")
    return program


# ------------------------------------------------------------------ checking against the source QDQ model


def source_values(result, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Run the source QDQ model (onnxruntime, optimizations off) exposing, for every imported
    activation, its integer tensor (the Q output) and the float value its QuantizeLinear rounds."""
    annotations = read_annotations(result.float_model)
    model = onnx.ModelProto()
    model.CopyFrom(result.source_model)
    existing = {o.name for o in model.graph.output}
    for ann in annotations.values():
        if ann["role"] != "activation":
            continue
        for name, elem in ((ann["q_output"], ONNX_DTYPES[ann["dtype"]]), (ann["q_input"], onnx.TensorProto.FLOAT)):
            if name not in existing and name not in {i.name for i in model.graph.input}:
                model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
                existing.add(name)
    session = make_session(model, optimize=False)
    outs = [o.name for o in session.get_outputs()]
    values = dict(zip(outs, session.run(outs, feeds)))
    values.update({k: v for k, v in feeds.items()})
    return values, annotations


EXACT_TIE_TOLERANCE = 1e-3  # in output steps


def _rounded_float(result, layer: Layer, annotations: dict) -> str:
    """The source tensor whose rounding made a layer's output: the output Q's input, or for a fused
    activation that the QDQ model quantizes on both sides with one encoding (Conv -Q/DQ-> Relu -Q/DQ->),
    the inner Q's input (the Relu's input is already integral there)."""
    out = annotations[layer.outputs[0]]
    group = next((g for g in result.plan.groups if g.name == layer.name), None)
    if group is not None and group.activation is not None:
        inner = annotations.get(group.activation.input[0])
        if inner is not None and inner["role"] == "activation":
            return inner["q_input"]
    return out["q_input"]


def exact_conv_values(result, layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
    """The value a Conv/Gemm layer's output rounds, exactly: (acc + bias) * s_x * s_w[c] / s_y + zp_y,
    acc the integer accumulator (the reference kernels' accumulate primitives, int64), the scale
    ratio in float64 from the quantization table."""
    from runtime.kernels_reference import conv_accumulate, gemm_accumulate

    program = result.program
    group = next(g for g in result.plan.groups if g.name == layer.name)
    x_info, y_info = program.tensors[layer.inputs[0]], program.tensors[layer.outputs[0]]
    w, zp_w = layer.params["weight"], layer.params.get("weight_zero_point", np.zeros(1, np.int64))
    zp_x = int(x_info.zero_point[0])
    o = w.shape[0]
    bias = layer.params.get("bias", np.zeros(o, np.int64)).astype(np.int64).reshape(-1)
    if layer.attrs.get("input_zero_point_folded"):
        zp_w_c = np.broadcast_to(np.asarray(zp_w, np.int64).reshape(-1), (o,)).reshape(-1, *[1] * (w.ndim - 1))
        bias = bias + zp_x * (w.astype(np.int64) - zp_w_c).reshape(o, -1).sum(axis=1)
    if layer.op == "conv":
        acc = conv_accumulate(inputs[0], w, zp_x, zp_w, layer.attrs) + bias.reshape(1, -1, 1, 1)
        channel_axis = 1
    else:
        acc = gemm_accumulate(inputs[0], w, zp_x, zp_w) + bias
        channel_axis = acc.ndim - 1
    s_w = result.qparams[group.weight].scale.astype(np.float64)
    ratio = np.float64(x_info.scale[0]) * np.broadcast_to(s_w, (o,)) / np.float64(y_info.scale[0])
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    return acc.astype(np.float64) * ratio.reshape(shape) + int(y_info.zero_point[0])


def check_layers_against_source(result, feeds: dict[str, np.ndarray], kernels: str = "fast") -> list[LayerCheck]:
    """Per IR layer, fed the source QDQ model's integers: how many outputs differ from the source
    model's, and whether each is a genuine rounding tie (as ``compiler.verify.check_layers``). A
    layer whose output the source model does not quantize (a pass-through op without QDQ) is run on
    the source integers and its output passed on, but not counted.

    A Conv/Gemm mismatch is also excused when it is one step and the *exact* value lies within
    ``EXACT_TIE_TOLERANCE`` of a tie: v = (acc + bias) * s_x * s_w[c] / s_y + zp_y in float64 from
    the integer accumulator (``exact_conv_values``). With 16-bit operands onnxruntime's float32
    sums carry errors of a good fraction of an output step, so the float it rounds can sit far
    from the tie the exact value is at; this looks past that error, not around a real one."""
    program = result.program
    values, annotations = source_values(result, feeds)
    ints: dict[str, np.ndarray] = {}
    for name in program.inputs:
        ann = annotations.get(name)
        if ann is None:
            raise CompileError(f"input '{name}' is not quantized in the source QDQ model")
        ints[name] = values[ann["q_output"]]
    checks = []
    for layer in program.layers:
        (ours,) = run_layer(program, layer, [ints[t] for t in layer.inputs], kernels=kernels)
        out = layer.outputs[0]
        ann = annotations.get(out)
        if ann is None or ann["role"] != "activation":
            ints[out] = ours
            continue
        expected = values[ann["q_output"]]
        ints[out] = expected
        diff = ours.astype(np.int64) - expected.astype(np.int64)
        bad = diff != 0
        unexcused, worst, worst_excused = int(bad.sum()), 0.0, 0.0
        if bad.any():
            info = program.tensors[out]
            dist, magnitude = tie_distance(values[_rounded_float(result, layer, annotations)], info.scale[0],
                                           int(info.zero_point[0]))
            excused = bad & (np.abs(diff) == 1) & (dist <= TIE_TOLERANCE_ABS + TIE_TOLERANCE_REL * magnitude)
            if (bad & ~excused).any() and layer.op in ("conv", "gemm"):
                exact = exact_conv_values(result, layer, [ints[t] for t in layer.inputs])
                exact_dist = np.abs(exact - np.floor(exact) - 0.5)
                excused |= bad & (np.abs(diff) == 1) & (exact_dist <= EXACT_TIE_TOLERANCE)
                dist = np.minimum(dist, exact_dist)
            unexcused = int((bad & ~excused).sum())
            worst = float(dist[bad & ~excused].max()) if unexcused else 0.0
            worst_excused = float(dist[excused].max()) if excused.any() else 0.0
        checks.append(LayerCheck(layer.name, layer.op, int(diff.size), int(bad.sum()), unexcused, worst, worst_excused))
    return checks
