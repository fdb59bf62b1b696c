"""Lowering: the fused float graph + its quantization-parameter table -> the integer IR.

One IR layer per layer group of the plan. Weights and biases are quantized with the same
function the QDQ model uses (``passes.qparams.quantize_constant``), so both describe one integer
program. Requantization constants follow DESIGN.md: m / 2^k ~= s_x * s_w[c] / s_y with the
target's multiplier width (shift-only targets: m = 1, exact because every scale is a power of
two). Every layer's accumulator bound is checked at compile time: |acc| * m + 2^(k-1) < 2^63.
The integer rule of every op is written in docs/ir.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from passes.activation_fusion import activation_bounds
from passes.elementwise_fusion import chain_end_of
from passes.graph import GraphIndex, get_attr, without_large_weights
from passes.layer_plan import LayerGroup, LayerPlan
from passes.qparams import DTYPE_RANGES, QParams, QParamTable, quantize_constant
from passes.targets import TargetPreset
from runtime.fixed_point import quantize_multiplier
from runtime.ir import Layer, Program, TensorInfo

from .errors import CompileError
from .lower_arith_ops import ArithmeticOpLowering
from .lower_float import FloatFallbackLowering
from .lower_shape_ops import ShapeOpLowering

INT64_LIMIT = 2**63


@dataclass
class LoweringContext:
    model: onnx.ModelProto
    index: GraphIndex
    qparams: QParamTable
    target: TargetPreset
    shapes: dict[str, tuple[int, ...]]

    def fail(self, group: LayerGroup, message: str) -> CompileError:
        return CompileError(f"node '{group.name}' ({group.op_type}): {message}")


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor, from ONNX shape inference (inputs, value_info, outputs)."""
    return static_value_info(model)[0]


def static_value_info(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """(``tensor_shapes(model)``, element types) from one ONNX shape inference: the types are
    what ``calibration._element_types`` reads (every tensor with a recorded or inferred tensor
    type). Inference serializes and parses the whole model, so a compile runs it once for the
    calibration, scales and lowering stages, which all see the same graph. It runs on
    ``without_large_weights(model)`` (weights as typed inputs: their shapes, not their bytes), whose
    extra inputs are left out here."""
    inferred = onnx.shape_inference.infer_shapes(without_large_weights(model)).graph
    inputs = list(inferred.input)[:len(model.graph.input)]
    shapes, types = {}, {}
    for vi in inputs + list(inferred.value_info) + list(inferred.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return shapes, types


def choose_multipliers(ratio: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(m int32, k int8) per entry with m / 2^k ~= ratio; bits == 0 is shift-only (exact powers of 2)."""
    ratio = np.atleast_1d(np.asarray(ratio, dtype=np.float64))
    if bits == 0:
        exponent = np.log2(ratio)
        if not np.all(exponent == np.round(exponent)):
            raise ValueError(f"shift-only requant needs power-of-2 ratios, got {ratio[:4]}")
    return quantize_multiplier(ratio, bits)


def shared_shift_multipliers(ratios: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Integer multipliers m_i with one shared shift k, m_i / 2^k ~= ratios[i] (Add's rule).

    bits > 0: k normalizes the largest ratio to ``bits`` bits; the others are round(r_i * 2^k).
    bits == 0 (power-of-2 scales): k = -log2(min r), so every m_i = r_i / r_min is an exact power
    of two and the sum is exact before the final shift.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    if bits == 0:
        exps = np.log2(ratios)
        if not np.all(exps == np.round(exps)):
            raise ValueError(f"shift-only requant needs power-of-2 ratios, got {ratios}")
        k = int(-exps.min())
        m = np.exp2(exps + k)
    else:
        _, k_arr = quantize_multiplier(np.array([ratios.max()]), bits)
        k = int(k_arr[0])
        m = np.floor(ratios * 2.0**k + 0.5)
    return m.astype(np.int32), k


def add_multipliers(ratios: np.ndarray, preset: TargetPreset) -> tuple[np.ndarray, int]:
    """Add: (m_a, m_b) and one shift k with m_i / 2^k ~= s_i / s_y, the preset's multiplier width
    normalizing the larger ratio (shift-only: exact powers of two)."""
    return shared_shift_multipliers(ratios, preset.multiplier_bits)


def add_preset(preset: TargetPreset, input_dtypes) -> TargetPreset:
    """The preset whose multiplier width an Add uses: its own, widened to the 16-bit form's
    (``TargetPreset.wide``: at least 16 bits) when an input is 16-bit.

    Why: the shared shift normalizes the larger ratio to b bits, so an input whose ratio is 2^-d
    times smaller keeps only b - d bits. An 8-bit input (s ~ range/2^7) beside a 16-bit one
    (s ~ range/2^15) puts d ~ 8, and with TIDL's 8-bit multiplier the 16-bit input was read with
    ~1 bit (EfficientNet-Lite0, 16-bit block 1 into the block-2 Add: m_b = 1 for a ratio of 0.92,
    an 8% gain error, -6 dB at the output). 16 bits keep >= 8 bits for it; |acc| <= 2^16 * 2^16 *
    2 stays far inside int64. Shift-only presets are unchanged (power-of-2 ratios are exact)."""
    if preset.shift_only or not any(str(d).endswith("16") for d in input_dtypes):
        return preset
    return replace(preset, multiplier_bits=max(preset.multiplier_bits, preset.wide().multiplier_bits))


def concat_multipliers(ratios: np.ndarray, preset: TargetPreset) -> tuple[np.ndarray, np.ndarray]:
    """Concat: (m_i, k_i) per input with the preset's width; an input whose ratio is exactly 1
    (same scale as the output) passes through with m = 1, k = 0."""
    ratios = np.asarray(ratios, np.float64)
    m, k = choose_multipliers(ratios, preset.multiplier_bits)
    same = ratios == 1.0
    m[same], k[same] = 1, 0
    return m, k


def pool_multipliers(ratio: np.ndarray, preset: TargetPreset) -> tuple[np.ndarray, int]:
    """Average pooling: m (shaped like ``ratio``: [1] or [H_out, W_out]) and one shift k with
    m / 2^k ~= s_x / (s_y * D). The preset's width; on a shift-only target a power-of-2 ratio is a
    pure shift and any other uses ``pool_multiplier_bits``."""
    ratio = np.asarray(ratio, np.float64)
    bits = preset.multiplier_bits
    if preset.shift_only:
        exps = np.log2(ratio)
        bits = 0 if np.all(exps == np.round(exps)) else preset.pool_multiplier_bits
    m, k = shared_shift_multipliers(ratio.reshape(-1), bits)
    return m.reshape(ratio.shape), k


def pool_window_attrs(node: onnx.NodeProto, in_shape: tuple[int, ...]) -> dict:
    """IR attrs of a MaxPool/AveragePool/GlobalAveragePool (pads resolved, auto_pad included)."""
    if node.op_type == "GlobalAveragePool":
        return {"kernel_shape": list(in_shape[2:]), "strides": [1, 1], "pads": [0, 0, 0, 0],
                "dilations": [1, 1], "ceil_mode": 0, "count_include_pad": 0}
    kernel = list(get_attr(node, "kernel_shape"))
    strides = list(get_attr(node, "strides", [1, 1]))
    dilations = list(get_attr(node, "dilations", [1, 1]))
    pads = explicit_pads(node, in_shape[2:], kernel, strides, dilations)
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
             "ceil_mode": int(get_attr(node, "ceil_mode", 0))}
    if node.op_type == "AveragePool":
        attrs["count_include_pad"] = int(get_attr(node, "count_include_pad", 0))
    return attrs


def pool_divisors(attrs: dict, in_hw, out_hw) -> np.ndarray:
    """The divisor D of every output position [H_out, W_out] (in-bounds taps, or with the pads
    when count_include_pad)."""
    include_pad = bool(attrs.get("count_include_pad", 0))
    pads = attrs["pads"]
    counts = [_window_counts(in_hw[a], out_hw[a], attrs["kernel_shape"][a], attrs["strides"][a],
                             attrs["dilations"][a], pads[a], pads[a + 2], include_pad) for a in range(2)]
    return np.outer(counts[0], counts[1])


def rescale_ratios(group: LayerGroup, table: QParamTable, preset: TargetPreset, model: onnx.ModelProto,
                   shapes: dict | None = None) -> dict[str, np.float32]:
    """The scale at which a layer without weights effectively reads each input, given its integer
    multipliers: Add and Concat s_i' = m_i 2^-k_i s_y; average pooling with one divisor D
    s_x' = m 2^-k D s_y (per-position divisors cannot be folded into one input scale: {}).
    Scale selection puts these in ``QParamTable.consumer_scales`` so the QDQ model reads the
    inputs as the IR's arithmetic does. Other ops: {}."""
    op = group.op_type
    if chain_end_of(group.node):
        return {}  # a lookup table reads its input exactly as encoded
    s_y = np.float64(table[group.output].scale[0]) if group.output in table else None
    scales = [np.float64(table[i].scale[0]) for i in group.inputs]
    if op in ("Add", "Sub") and len(scales) == 2:  # Sub: the add rule with m_b < 0 (lower_arith_ops)
        preset = add_preset(preset, [table[i].dtype for i in group.inputs])
        m, k = add_multipliers(np.array(scales) / s_y, preset)
        return {t: np.float32(int(mi) * 2.0**-k * s_y) for t, mi in zip(group.inputs, m)}
    if op == "Concat":
        m, k = concat_multipliers(np.array(scales) / s_y, preset)
        return {t: np.float32(int(mi) * 2.0 ** -int(ki) * s_y) for t, mi, ki in zip(group.inputs, m, k)}
    if op in ("AveragePool", "GlobalAveragePool"):
        shapes = shapes if shapes is not None else tensor_shapes(model)
        in_shape, out_shape = shapes[group.inputs[0]], shapes[group.output]
        divisors = pool_divisors(pool_window_attrs(group.node, in_shape), in_shape[2:], out_shape[2:])
        if not np.all(divisors == divisors.flat[0]):
            return {}
        d = int(divisors.flat[0])
        m, k = pool_multipliers(np.array([scales[0] / (s_y * d)]), preset)
        return {group.inputs[0]: np.float32(int(m[0]) * 2.0**-k * d * s_y)}
    return {}


def clamp_bounds(activation: onnx.NodeProto | None, index: GraphIndex, out: QParams) -> tuple[int, int]:
    """Integer clamp [lo, hi] on the output: the type's limits narrowed by a fused activation.

    Q(clip(v, a, b)) = clip(Q(v), Q(a), Q(b)) because Q is monotonic, with
    Q(a) = saturate(round_half_even(float32(a) / s_y) + zp_y) as QuantizeLinear computes it.
    """
    lo, hi = out.qmin, out.qmax
    if activation is None:
        return lo, hi
    a, b = activation_bounds(activation, index)
    zp, s = int(out.zero_point[0]), np.float32(out.scale[0])

    def q(v: float) -> int:
        return int(np.clip(np.rint(np.float32(v) / s) + zp, out.qmin, out.qmax))

    if a is not None:
        lo = max(lo, q(a))
    if b is not None:
        hi = min(hi, q(b))
    return lo, hi


def explicit_pads(node: onnx.NodeProto, in_hw: tuple[int, int], kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """ONNX pads [top, left, bottom, right], resolving auto_pad SAME_UPPER/SAME_LOWER/VALID."""
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return list(get_attr(node, "pads", [0, 0, 0, 0]))
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    begins, ends = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _window_counts(size: int, out: int, k: int, s: int, d: int, pad_begin: int, pad_end: int,
                   include_pad: bool) -> np.ndarray:
    """Per output index along one axis: how many window taps fall inside the input (or the pads)."""
    start = np.arange(out)[:, None] * s - pad_begin + np.arange(k)[None, :] * d
    upper = size + (pad_end if include_pad else 0)
    lower = -pad_begin if include_pad else 0
    return ((start >= lower) & (start < upper)).sum(axis=1)


class Lowering(ShapeOpLowering, ArithmeticOpLowering, FloatFallbackLowering):
    """Lower every layer group; ``run()`` returns the Program.

    The methods ``_lower_<op type lowercased>`` are the per-op rules; the families of ops beyond
    the core (shape ops, arithmetic and lookup-table ops, float fallback) live in mixins, one
    module each."""

    def __init__(self, model: onnx.ModelProto, plan: LayerPlan, qparams: QParamTable, target: TargetPreset,
                 metadata: dict[str, str] | None = None, shapes: dict[str, tuple[int, ...]] | None = None):
        self.plan = plan
        shapes = tensor_shapes(model) if shapes is None else shapes
        self.ctx = LoweringContext(model, GraphIndex(model.graph), qparams, target, shapes)
        self.metadata = dict(metadata or {})

    def run(self) -> Program:
        ctx = self.ctx
        tensors = {}
        for name in self.plan.activation_tensors():
            qp = ctx.qparams[name]
            if name not in ctx.shapes:
                raise CompileError(f"tensor '{name}' has no static shape after shape inference")
            tensors[name] = TensorInfo(name, qp.dtype, ctx.shapes[name], qp.scale, qp.zero_point, qp.axis)
        tensors.update(self.raw_tensor_infos())  # float layers' int/bool outputs (lower_float.py)
        layers = [self.lower_group(g) for g in self.plan.groups]
        missing = [o for o in self.plan.outputs if o not in tensors]
        if missing:
            raise CompileError(f"graph output(s) {missing} are not produced by a lowered layer")
        return Program(list(self.plan.inputs), list(self.plan.outputs), tensors, layers, self.metadata)

    def lower_group(self, group: LayerGroup) -> Layer:
        if group.kind == "float":
            layer = self.lower_float_group(group)
            layer.source_nodes = group.source_nodes
            return layer
        if chain_end_of(group.node):
            lower = self._lower_lut  # an elementwise chain: one lookup table (lower_arith_ops.py)
        else:
            lower = getattr(self, f"_lower_{group.op_type.lower()}")
        layer = lower(group)
        layer.source_nodes = group.source_nodes
        return layer

    # -- helpers -----------------------------------------------------------------------------
    def _layer(self, group: LayerGroup, op: str, **kw) -> Layer:
        return Layer(name=group.name, op=op, inputs=list(group.inputs), outputs=[group.output], **kw)

    def _requant_params(self, group: LayerGroup, ratio: np.ndarray, bits: int | None = None) -> dict:
        bits = self.ctx.target.for_layer(group.name).multiplier_bits if bits is None else bits
        try:
            m, k = choose_multipliers(ratio, bits)
        except ValueError as exc:
            raise self.ctx.fail(group, str(exc)) from None
        return {"multiplier": m.astype(np.int32), "shift": k.astype(np.int8)}

    def _clamp_params(self, group: LayerGroup, out: QParams, activation=None) -> dict:
        lo, hi = clamp_bounds(activation, self.ctx.index, out)
        if lo > hi:
            raise self.ctx.fail(group, f"fused activation leaves an empty output range [{lo}, {hi}]")
        return {"clamp_lo": np.array([lo], np.int32), "clamp_hi": np.array([hi], np.int32)}

    def _check_accumulator(self, group: LayerGroup, acc_bound: np.ndarray, params: dict) -> str:
        """Check |acc| * m + 2^(k-1) < 2^63 per channel; return the accumulator dtype needed."""
        m = params["multiplier"].astype(np.float64)
        k = params["shift"].astype(np.float64)
        worst = acc_bound.astype(np.float64) * m * np.exp2(np.maximum(-k, 0)) + np.exp2(np.maximum(k - 1, 0))
        if np.any(worst >= INT64_LIMIT / 2):
            raise self.ctx.fail(group, f"accumulator bound {acc_bound.max():.3g} times multiplier overflows int64")
        return "int32" if acc_bound.max() < 2**31 else "int64"

    def _weighted(self, group: LayerGroup, weight_ir: np.ndarray, qp_w: QParams, op: str, attrs: dict) -> Layer:
        """Conv/Gemm/MatMul: integer weights [O, ...], bias, per-channel requant, fused clamp.

        The multiplier width is the layer's (``TargetPreset.layer_multiplier_bits``); scale
        selection nudged s_w so that m / 2^k reproduces s_x * s_w / s_y. With an input zero point
        (asymmetric activations) the zero-point term is folded into the bias, as the accelerator
        does: bias' = q_b - zp_x * sum(q_w - zp_w) per channel, attr ``input_zero_point_folded``,
        acc = sum((q_w - zp_w) * xpad) + bias' with xpad padded by zp_x; bias' must fit the bias
        type."""
        ctx = self.ctx
        preset = ctx.target.for_layer(group.name)
        qp_x, qp_y = ctx.qparams[group.inputs[0]], ctx.qparams[group.output]
        out_channels = weight_ir.shape[0]
        bias = np.zeros(out_channels, np.int64)
        bias_dtype = preset.bias_dtype
        if group.bias:
            qp_b = ctx.qparams[group.bias]
            bias_dtype = qp_b.dtype
            bias = quantize_constant(ctx.index.constant(group.bias).reshape(-1), qp_b).astype(np.int64)
        # q_w - zp_w of 8/16-bit weights fits int32 (|.| <= 2^16); sums are int64, so exact either way
        narrow = np.int32 if weight_ir.dtype.itemsize <= 2 else np.int64
        zp_w = qp_w.zero_point.astype(narrow).reshape(-1, *[1] * (weight_ir.ndim - 1))
        w_centered = weight_ir.astype(narrow) - zp_w
        zp_x = int(qp_x.zero_point[0])
        if zp_x != 0:
            w_sum = w_centered.reshape(out_channels, -1).sum(axis=1, dtype=np.int64)
            bias = bias - zp_x * w_sum
            attrs = dict(attrs, input_zero_point_folded=1)
            lo, hi = DTYPE_RANGES[bias_dtype]
            if bias.min() < lo or bias.max() > hi:
                raise ctx.fail(group, f"the bias with the input zero point {zp_x} folded in leaves {bias_dtype}")
        ratio = (np.float64(qp_x.scale[0]) * qp_w.scale.astype(np.float64)) / np.float64(qp_y.scale[0])
        params = {"weight": weight_ir, "weight_zero_point": qp_w.zero_point.astype(weight_ir.dtype),
                  "bias": bias.astype(np.dtype(bias_dtype))}
        params.update(self._requant_params(group, ratio, preset.layer_multiplier_bits(qp_x.dtype, qp_w.dtype)))
        params.update(self._clamp_params(group, qp_y, group.activation))
        x_max = max(abs(qp_x.qmin - zp_x), abs(qp_x.qmax - zp_x), abs(qp_x.qmin), abs(qp_x.qmax))
        acc_bound = np.abs(w_centered).reshape(out_channels, -1).sum(axis=1, dtype=np.int64) * x_max + np.abs(bias)
        acc_dtype = self._check_accumulator(group, acc_bound, params)
        return self._layer(group, op, attrs=attrs, params=params, acc_dtype=acc_dtype,
                           rounding=ctx.target.requant_rounding)

    def _weight_ir(self, group: LayerGroup) -> tuple[np.ndarray, QParams]:
        qp_w = self.ctx.qparams[group.weight]
        return quantize_constant(self.ctx.index.constant(group.weight), qp_w), qp_w

    # -- one method per ONNX op ----------------------------------------------------------------
    def _lower_conv(self, group: LayerGroup) -> Layer:
        node = group.node
        q_w, qp_w = self._weight_ir(group)
        kernel = list(get_attr(node, "kernel_shape", q_w.shape[2:]))
        strides = list(get_attr(node, "strides", [1, 1]))
        dilations = list(get_attr(node, "dilations", [1, 1]))
        in_shape = self.ctx.shapes[group.inputs[0]]
        pads = explicit_pads(node, in_shape[2:], kernel, strides, dilations)
        attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
                 "group": int(get_attr(node, "group", 1))}
        return self._weighted(group, q_w, qp_w, "conv", attrs)

    def _lower_gemm(self, group: LayerGroup) -> Layer:
        node = group.node
        if get_attr(node, "alpha", 1.0) != 1.0 or get_attr(node, "beta", 1.0) != 1.0:
            raise self.ctx.fail(group, "alpha/beta must be 1 after canonicalization")
        q_w, qp_w = self._weight_ir(group)
        if not get_attr(node, "transB", 0):
            q_w = np.ascontiguousarray(q_w.T)
        return self._weighted(group, q_w, qp_w, "gemm", {})

    def _lower_matmul(self, group: LayerGroup) -> Layer:
        if group.weight is None:
            return self._lower_matmul_activations(group)  # lower_arith_ops.py
        q_w, qp_w = self._weight_ir(group)
        return self._weighted(group, np.ascontiguousarray(q_w.T), qp_w, "gemm", {})

    def _lower_add(self, group: LayerGroup) -> Layer:
        if group.constants:
            return self._lower_add_constant(group)  # lower_arith_ops.py: the affine rule
        return self._two_input_add(group, sign_b=1)

    def _two_input_add(self, group: LayerGroup, sign_b: int) -> Layer:
        """a + sign_b * b between tensors (docs/ir.md, add): multipliers with one shared shift,
        the second negated for Sub; a 16-bit input widens the multiplier (``add_preset``)."""
        qa, qb = (self.ctx.qparams[i] for i in group.inputs)
        qy = self.ctx.qparams[group.output]
        ratios = np.array([qa.scale[0], qb.scale[0]], np.float64) / np.float64(qy.scale[0])
        try:
            m, k = add_multipliers(ratios, add_preset(self.ctx.target.for_layer(group.name), [qa.dtype, qb.dtype]))
        except ValueError as exc:
            raise self.ctx.fail(group, str(exc)) from None
        params = {"multiplier": np.array([m[0], sign_b * int(m[1])], np.int32), "shift": np.array([k], np.int8)}
        params.update(self._clamp_params(group, qy, group.activation))
        return self._layer(group, "add", params=params, acc_dtype="int64", rounding=self.ctx.target.requant_rounding)

    def _pool_attrs(self, group: LayerGroup) -> dict:
        return pool_window_attrs(group.node, self.ctx.shapes[group.inputs[0]])

    def _lower_maxpool(self, group: LayerGroup) -> Layer:
        return self._layer(group, "maxpool", attrs=self._pool_attrs(group))

    # Per-position divisors: the largest IR-vs-exact error (output steps) the multiplier may leave,
    # a quarter of compiler.verify's absolute tie tolerance (2e-3), the rest left to float32 noise.
    POOL_VARYING_ERROR = 2.0**-11

    def _avgpool(self, group: LayerGroup, attrs: dict) -> Layer:
        """One divisor D: m / 2^k ~= s_x / (s_y D) with the preset's width (scale selection nudged
        s_y so it is exact on mmav2). Divisors varying by position (count_include_pad = 0 at
        padded borders, ceil-mode edges): one m per position with a shared k, as wide as
        ``_varying_divisor_bits`` says, so the IR rounds S * s_x / (s_y D) as the QDQ model does
        except within POOL_VARYING_ERROR of a tie (docs/ir.md, avgpool)."""
        ctx = self.ctx
        qp_x, qp_y = ctx.qparams[group.inputs[0]], ctx.qparams[group.output]
        count = pool_divisors(attrs, ctx.shapes[group.inputs[0]][2:], ctx.shapes[group.output][2:])
        ratio = np.float64(qp_x.scale[0]) / (np.float64(qp_y.scale[0]) * count)
        preset = ctx.target.for_layer(group.name)
        try:
            if np.all(count == count.flat[0]):
                m, k = pool_multipliers(ratio.reshape(-1)[:1], preset)
            else:
                bits = self._varying_divisor_bits(group, count, qp_x, qp_y, preset)
                m, k = shared_shift_multipliers(ratio.reshape(-1), bits)
                m = m.reshape(count.shape)
        except ValueError as exc:
            raise ctx.fail(group, str(exc)) from None
        params = {"multiplier": m, "shift": np.array([k], np.int8)}
        params.update(self._clamp_params(group, qp_y))
        return self._layer(group, "avgpool", attrs=attrs, params=params, acc_dtype="int32",
                           rounding=ctx.target.requant_rounding)

    def _varying_divisor_bits(self, group: LayerGroup, count: np.ndarray, qp_x: QParams, qp_y: QParams,
                              preset: TargetPreset) -> int:
        """Multiplier width b for an average pool whose divisor D varies by position.

        k normalizes r_max = s_x / (s_y D_min) to b bits and m(p) = round(r(p) 2^k), so
        |m(p)/2^k - r(p)| <= 2^-(k+1) <= r_max 2^-b (1 + 2^-b) and, for v = S r(p) (output steps),
        |S m(p)/2^k - v| <= |v| (D_max / D_min) 2^-b (1 + 2^-b). Only |v| <= Y = 2^(output bits)
        can leave an output unsaturated, so b >= 11 + log2(Y D_max / D_min (1 + 2^-16)) keeps the
        error <= POOL_VARYING_ERROR: the IR's result then differs from round(v) only where v lies
        within 2^-11 of a tie. At least max(preset width, pool_multiplier_bits), at most 31 and at
        most what keeps |S| m + 2^(k-1) < 2^62 with |S| <= D_max max|q_x - zp_x| (int64 headroom).
        """
        spread = float(count.max()) / max(float(count.min()), 1.0)
        y_range = float(qp_y.qmax - qp_y.qmin + 1)
        needed = int(np.ceil(-np.log2(self.POOL_VARYING_ERROR) + np.log2(y_range * spread * (1 + 2.0**-16))))
        bits = min(31, max(preset.multiplier_bits, preset.pool_multiplier_bits, needed))
        zp_x = int(qp_x.zero_point[0])
        s_max = float(count.max()) * max(abs(qp_x.qmin - zp_x), abs(qp_x.qmax - zp_x), 1)
        return int(min(bits, 61 - np.ceil(np.log2(s_max))))

    def _lower_averagepool(self, group: LayerGroup) -> Layer:
        return self._avgpool(group, self._pool_attrs(group))

    def _lower_globalaveragepool(self, group: LayerGroup) -> Layer:
        return self._avgpool(group, self._pool_attrs(group))

    def _reshape_to_output(self, group: LayerGroup) -> Layer:
        in_shape, out_shape = self.ctx.shapes[group.inputs[0]], self.ctx.shapes[group.output]
        shape = list(out_shape)
        if out_shape and in_shape and out_shape[0] == in_shape[0]:
            shape[0] = 0  # ONNX: 0 copies the input's dim, so any batch size runs
        layer = self._layer(group, "reshape", attrs={"shape": shape})
        layer.inputs = layer.inputs[:1]
        return layer

    _lower_flatten = _reshape_to_output
    _lower_reshape = _reshape_to_output

    def _lower_concat(self, group: LayerGroup) -> Layer:
        qy = self.ctx.qparams[group.output]
        axis = int(get_attr(group.node, "axis"))
        rank = len(self.ctx.shapes[group.output])
        ratios = np.array([self.ctx.qparams[i].scale[0] for i in group.inputs], np.float64) / np.float64(qy.scale[0])
        try:
            m, k = concat_multipliers(ratios, self.ctx.target.for_layer(group.name))
        except ValueError as exc:
            raise self.ctx.fail(group, str(exc)) from None
        params = {"multiplier": m.astype(np.int32), "shift": k.astype(np.int8)}
        return self._layer(group, "concat", attrs={"axis": axis % rank}, params=params,
                           rounding=self.ctx.target.requant_rounding)

    def _clamp_only(self, group: LayerGroup) -> Layer:
        qp = self.ctx.qparams[group.inputs[0]]
        layer = self._layer(group, "clamp", params=self._clamp_params(group, qp, group.node))
        layer.inputs = layer.inputs[:1]
        return layer

    _lower_relu = _clamp_only
    _lower_clip = _clamp_only


def lower_program(model: onnx.ModelProto, plan: LayerPlan, qparams: QParamTable, target: TargetPreset,
                  metadata: dict[str, str] | None = None,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> Program:
    """The integer program for a fused float model and its quantization-parameter table.
    ``shapes`` is ``tensor_shapes(model)`` when the caller has it (one shape inference per compile)."""
    return Lowering(model, plan, qparams, target, metadata, shapes).run()
