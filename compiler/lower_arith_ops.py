"""Lowering rules for arithmetic and lookup-table ops (Mul/Sub/Div/Add with constants and
broadcasting, ReduceMean, MatMul between activations, PRelu/LeakyRelu, Softmax, ArgMax and the
8/16-bit lookup tables): a mixin of ``compiler.lowering.Lowering``.

Each ``_lower_<op>`` method takes a LayerGroup and returns one IR Layer; see docs/ir.md for the
integer rule of each IR op. Every output here is "calibrated" (its own range) except ArgMax's,
an exact int64 index.

Multipliers. These layers have no weights whose scale could be nudged, so their real multipliers
(s_x * c / s_y, s_a * s_b / s_y, s_x / (s_y * N), ...) are represented with ARITH_MULTIPLIER_BITS
(24) bits on every target: relative error <= 2^-24, far below the QDQ model's own float32
rounding of one step (the per-layer check's tie tolerance is 2e-3 of a step). Where a
shift-only target's ratios are all exact powers of two (Mul of two tensors, a power-of-2 mean
divisor, Add/Sub of a constant) the multiplier is an exact power of two: a shift. Sub between
two tensors is the ``add`` rule with a negative second multiplier and the preset's multiplier
width, like Add (its input scales take part in ``rescale_ratios``).

Lookup tables (kind "lut"). For an elementwise function f of one tensor (a single op such as
Sigmoid, or a chain marked by passes/elementwise_fusion.py such as x * Sigmoid(x)), the table is

    T[q] = QuantizeLinear(f(DequantizeLinear(q, s_x, zp_x)), s_y, zp_y)   for every q of x's dtype

computed by onnxruntime itself (graph optimizations off, as the QDQ model is run) on the group's
own nodes. So the table holds exactly what the QDQ model computes for each input integer: the
IR layer equals the QDQ layer bit for bit (onnxruntime's float kernels give the same value for a
given input whatever the tensor's shape). 8-bit inputs give 256 entries, 16-bit ones 65536.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.elementwise_fusion import chain_end_of, chain_nodes
from passes.graph import get_attr, opset_version
from passes.layer_plan import ARITH_LUT_OPS, LayerGroup
from passes.qparams import QParams
from runtime.fixed_point import quantize_multiplier
from runtime.ir import Layer
from runtime.kernels_arith import SOFTMAX_FRACTION_BITS

from .errors import CompileError
from .onnx_runner import make_session

ARITH_MULTIPLIER_BITS = 24
INT62 = 2.0**62  # accumulators (plus rounding terms) are kept below this, half of int64's range

# Ops whose single-node groups are lookup tables (one list, kept in passes/layer_plan.py).
LUT_OPS = ARITH_LUT_OPS

_ONNX_ELEM = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
              "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16}


def _span(qp: QParams) -> int:
    """max |q - zp| over the dtype's values."""
    zp = int(qp.zero_point[0])
    return max(abs(qp.qmin - zp), abs(qp.qmax - zp))


def _power_of_two(values: np.ndarray) -> bool:
    values = np.abs(np.asarray(values, np.float64))
    values = values[values != 0]
    return values.size > 0 and bool(np.all(np.exp2(np.round(np.log2(values))) == values))


def _shared_shift(ratios: np.ndarray, bits: int) -> int:
    """k normalizing the largest |ratio| to ``bits`` bits (ratio 0: k = bits)."""
    amax = float(np.max(np.abs(ratios))) if np.size(ratios) else 0.0
    if amax == 0.0:
        return bits
    return int(quantize_multiplier(np.array([amax]), bits)[1][0])


def _signed_multipliers(ratios: np.ndarray, k: int) -> np.ndarray:
    """m = round_half_up(ratio * 2^k), signed; ValueError when |m| leaves int32 (k clamped)."""
    m = np.floor(np.asarray(ratios, np.float64) * 2.0**k + 0.5)
    if m.size and np.abs(m).max() >= 2.0**31:
        raise ValueError(f"multiplier {np.abs(m).max():.3g} does not fit int32 (scales too far apart)")
    return m


class ArithmeticOpLowering:
    """Per-op lowering methods for arithmetic and lookup-table ops (mixed into Lowering)."""

    # -- helpers -----------------------------------------------------------------------------
    def _arith_requant(self, group: LayerGroup, ratio: float, acc_bound: float) -> dict:
        """m, k for one positive ratio: an exact shift on a shift-only target when the ratio is a
        power of two, else ARITH_MULTIPLIER_BITS bits; the accumulator bound is checked."""
        bits = 0 if (self.ctx.target.shift_only and _power_of_two([ratio])) else ARITH_MULTIPLIER_BITS
        m, k = quantize_multiplier(np.array([ratio], np.float64), bits)
        params = {"multiplier": m.astype(np.int32), "shift": k.astype(np.int8)}
        self._check_bound(group, acc_bound * float(m[0]) * 2.0 ** max(-int(k[0]), 0) + 2.0 ** max(int(k[0]) - 1, 0))
        return params

    def _check_bound(self, group: LayerGroup, worst: float) -> None:
        if worst >= INT62:
            raise self.ctx.fail(group, f"integer accumulator bound {worst:.3g} exceeds 2^62; "
                                       "the scales are too far apart for this op (float fallback: --deny-list)")

    def _broadcast_constant(self, group: LayerGroup, value: np.ndarray, x: str, what: str) -> np.ndarray:
        """A constant operand as float64, refused when broadcasting would change x's shape."""
        value = np.asarray(value, np.float64)
        x_shape = self.ctx.shapes[x]
        try:
            shape = np.broadcast_shapes(x_shape, value.shape)
        except ValueError:
            shape = None
        if shape != tuple(x_shape):
            raise self.ctx.fail(group, f"{what} of shape {list(value.shape)} would broadcast the input "
                                       f"{list(x_shape)} to another shape; only constants that broadcast into "
                                       "the input are lowered")
        while value.ndim > 1 and value.shape[0] == 1:
            value = value[0]  # drop leading unit dims: right-aligned broadcasting is unchanged
        return value

    def _affine(self, group: LayerGroup, scale: np.ndarray, offset: np.ndarray) -> Layer:
        """y = x * scale + offset with constant scale/offset (broadcast into x):

            m / 2^k ~= s_x * scale / s_y (signed),  b = round(offset * 2^k / s_y),
            y = clamp(zp_y + shift_round((x - zp_x) * m + b, k))

        k normalizes the largest |m| to ARITH_MULTIPLIER_BITS bits."""
        ctx = self.ctx
        x = group.inputs[0]
        qx, qy = ctx.qparams[x], ctx.qparams[group.output]
        scale = self._broadcast_constant(group, scale, x, "constant")
        offset = self._broadcast_constant(group, offset, x, "constant")
        s_x, s_y = np.float64(qx.scale[0]), np.float64(qy.scale[0])
        ratio = s_x * scale / s_y
        k = _shared_shift(ratio, ARITH_MULTIPLIER_BITS)
        try:
            m = _signed_multipliers(ratio, k)
        except ValueError as exc:
            raise ctx.fail(group, str(exc)) from None
        b = np.floor(offset / s_y * 2.0**k + 0.5)
        self._check_bound(group, _span(qx) * float(np.abs(m).max()) + float(np.abs(b).max())
                          + 2.0 ** max(k - 1, 0))
        if not -31 <= k <= 62:
            raise ctx.fail(group, f"shift {k} is outside [-31, 62] (scales too far apart)")
        params = {"multiplier": m.astype(np.int32).reshape(m.shape or (1,)),
                  "bias": b.astype(np.int64).reshape(b.shape or (1,)), "shift": np.array([k], np.int8)}
        params.update(self._clamp_params(group, qy, group.activation))
        return self._layer(group, "affine", params=params, acc_dtype="int64", rounding=ctx.target.requant_rounding)

    def _constant_operand(self, group: LayerGroup) -> tuple[np.ndarray, int]:
        """The constant input of a binary op and its position (0 or 1)."""
        node = group.node
        for pos in (0, 1):
            if self.ctx.index.is_constant(node.input[pos]):
                return self.ctx.index.constant(node.input[pos]).astype(np.float64), pos
        raise self.ctx.fail(group, "no constant operand")

    # -- Add / Sub / Mul / Div -----------------------------------------------------------------
    def _lower_add_constant(self, group: LayerGroup) -> Layer:
        """x + c: the affine rule with scale 1 (the constant becomes a bias at the accumulator's
        scale s_y / 2^k, so the add rule applies with the constant as an exact integer)."""
        c, _ = self._constant_operand(group)
        return self._affine(group, np.ones(1), c)

    def _lower_sub(self, group: LayerGroup) -> Layer:
        """x - c and c - x: affine; a - b between tensors: the add rule with m_b < 0."""
        if len(group.inputs) == 1 and group.constants:
            c, pos = self._constant_operand(group)
            return self._affine(group, np.ones(1), -c) if pos == 1 else self._affine(group, -np.ones(1), c)
        return self._two_input_add(group, sign_b=-1)  # lowering.py

    def _lower_mul(self, group: LayerGroup) -> Layer:
        """x * c: affine (per-channel c gives per-channel multipliers, BatchNorm-like scales);
        a * b: acc = (a - zp_a)(b - zp_b), requant by s_a s_b / s_y."""
        if len(group.inputs) == 1 and group.constants:
            c, _ = self._constant_operand(group)
            return self._affine(group, c, np.zeros(1))
        ctx = self.ctx
        qa, qb = (ctx.qparams[i] for i in group.inputs)
        qy = ctx.qparams[group.output]
        ratio = np.float64(qa.scale[0]) * np.float64(qb.scale[0]) / np.float64(qy.scale[0])
        params = self._arith_requant(group, ratio, _span(qa) * _span(qb))
        params.update(self._clamp_params(group, qy, group.activation))
        return self._layer(group, "mul", params=params, acc_dtype="int64", rounding=ctx.target.requant_rounding)

    def _lower_div(self, group: LayerGroup) -> Layer:
        """x / c: affine with scale 1/c (c / x, the reciprocal, is a lookup table)."""
        c, pos = self._constant_operand(group)
        if pos == 0:
            return self._lower_lut(group)
        if np.any(c == 0):
            raise self.ctx.fail(group, "division by a constant that contains 0")
        return self._affine(group, 1.0 / c, np.zeros(1))

    # -- PRelu / LeakyRelu ---------------------------------------------------------------------
    def _prelu(self, group: LayerGroup, slope: np.ndarray) -> Layer:
        """d = x - zp_x; m_pos / 2^k ~= s_x / s_y, m_neg / 2^k ~= slope * s_x / s_y (one shared k);
        y = clamp(zp_y + shift_round(d * (m_pos if d >= 0 else m_neg), k))."""
        ctx = self.ctx
        x = group.inputs[0]
        qx, qy = ctx.qparams[x], ctx.qparams[group.output]
        slope = self._broadcast_constant(group, slope, x, "slope")
        s = np.float64(qx.scale[0]) / np.float64(qy.scale[0])
        k = _shared_shift(np.append(np.abs(slope).ravel() * s, s), ARITH_MULTIPLIER_BITS)
        try:
            m_pos = _signed_multipliers(np.array([s]), k)
            m_neg = _signed_multipliers(slope * s, k)
        except ValueError as exc:
            raise ctx.fail(group, str(exc)) from None
        self._check_bound(group, _span(qx) * max(float(m_pos.max()), float(np.abs(m_neg).max())) + 2.0 ** max(k - 1, 0))
        params = {"multiplier": m_pos.astype(np.int32),
                  "multiplier_negative": m_neg.astype(np.int32).reshape(m_neg.shape or (1,)),
                  "shift": np.array([k], np.int8)}
        params.update(self._clamp_params(group, qy, group.activation))
        return self._layer(group, "prelu", params=params, acc_dtype="int64", rounding=ctx.target.requant_rounding)

    def _lower_leakyrelu(self, group: LayerGroup) -> Layer:
        return self._prelu(group, np.array([float(get_attr(group.node, "alpha", 0.01))]))

    def _lower_prelu(self, group: LayerGroup) -> Layer:
        return self._prelu(group, self.ctx.index.constant(group.node.input[1]).astype(np.float64))

    # -- reductions ----------------------------------------------------------------------------
    def _lower_reducemean(self, group: LayerGroup) -> Layer:
        """S = sum over axes of (x - zp_x); y = clamp(zp_y + requant(S, m, k)), m/2^k ~= s_x / (s_y N)."""
        ctx, node = self.ctx, group.node
        x = group.inputs[0]
        in_shape = ctx.shapes[x]
        axes = get_attr(node, "axes")
        if len(node.input) > 1 and node.input[1]:
            axes = ctx.index.constant(node.input[1])
        axes = list(range(len(in_shape))) if axes is None or len(axes) == 0 else [int(a) % len(in_shape) for a in axes]
        keepdims = int(get_attr(node, "keepdims", 1))
        count = int(np.prod([in_shape[a] for a in axes]))
        qx, qy = ctx.qparams[x], ctx.qparams[group.output]
        ratio = np.float64(qx.scale[0]) / (np.float64(qy.scale[0]) * count)
        params = self._arith_requant(group, ratio, _span(qx) * count)
        params.update(self._clamp_params(group, qy))
        return self._layer(group, "reduce_mean", attrs={"axes": sorted(axes), "keepdims": keepdims}, params=params,
                           acc_dtype="int64", rounding=ctx.target.requant_rounding)

    # -- MatMul between two activations ----------------------------------------------------------
    def _lower_matmul_activations(self, group: LayerGroup) -> Layer:
        """acc = (a - zp_a) @ (b - zp_b); y = clamp(zp_y + requant(acc, m, k)), m/2^k ~= s_a s_b / s_y."""
        ctx = self.ctx
        if len(group.inputs) != 2:
            raise ctx.fail(group, "MatMul needs two activation inputs here")
        qa, qb = (ctx.qparams[i] for i in group.inputs)
        qy = ctx.qparams[group.output]
        inner = ctx.shapes[group.inputs[0]][-1]
        ratio = np.float64(qa.scale[0]) * np.float64(qb.scale[0]) / np.float64(qy.scale[0])
        params = self._arith_requant(group, ratio, _span(qa) * _span(qb) * inner)
        params.update(self._clamp_params(group, qy, group.activation))
        return self._layer(group, "matmul", params=params, acc_dtype="int64", rounding=ctx.target.requant_rounding)

    # -- Softmax / ArgMax ------------------------------------------------------------------------
    def _lower_softmax(self, group: LayerGroup) -> Layer:
        """Integer softmax (docs/ir.md): E[d] = round(2^30 exp(-s_x d)) for d = 0..qmax-qmin,
        p = round(E[max - q] 2^30 / sum E), y = zp_y + requant(p, m, k), m / 2^k ~= 2^-30 / s_y."""
        ctx, node = self.ctx, group.node
        qx, qy = ctx.qparams[group.inputs[0]], ctx.qparams[group.output]
        old = opset_version(ctx.model) < 13
        axis = int(get_attr(node, "axis", 1 if old else -1))
        d = np.arange(qx.qmax - qx.qmin + 1, dtype=np.float64)
        table = np.floor(np.exp(-np.float64(qx.scale[0]) * d) * 2.0**SOFTMAX_FRACTION_BITS + 0.5).astype(np.int64)
        ratio = 2.0**-SOFTMAX_FRACTION_BITS / np.float64(qy.scale[0])
        params = self._arith_requant(group, ratio, 2.0**SOFTMAX_FRACTION_BITS)
        params["exp_table"] = table
        params.update(self._clamp_params(group, qy))
        rank = len(ctx.shapes[group.inputs[0]])
        return self._layer(group, "softmax", attrs={"axis": axis % rank, "flatten": int(old)}, params=params,
                           acc_dtype="int64", rounding=ctx.target.requant_rounding)

    def _lower_argmax(self, group: LayerGroup) -> Layer:
        """The index of the largest integer: exact, since dequantization (s > 0) keeps the order."""
        attrs = {"axis": int(get_attr(group.node, "axis", 0)), "keepdims": int(get_attr(group.node, "keepdims", 1)),
                 "select_last_index": int(get_attr(group.node, "select_last_index", 0))}
        return self._layer(group, "argmax", attrs=attrs, acc_dtype="int64")

    # -- lookup tables -------------------------------------------------------------------------
    def _lower_lut(self, group: LayerGroup) -> Layer:
        """T[q] = Q_y(f(DQ_x(q))) for every q of x's dtype, computed by onnxruntime on the group's
        nodes (see the module docstring); y = T[x - qmin]."""
        ctx = self.ctx
        if len(set(group.inputs)) != 1:
            raise ctx.fail(group, f"a lookup table needs one input tensor, got {group.inputs}")
        x, y = group.inputs[0], group.output
        qx, qy = ctx.qparams[x], ctx.qparams[y]
        if qx.dtype not in _ONNX_ELEM or qy.dtype not in _ONNX_ELEM:
            raise ctx.fail(group, f"lookup tables map 8/16-bit integers, got {qx.dtype} -> {qy.dtype}")
        if ctx.shapes.get(x) != ctx.shapes.get(y):
            raise ctx.fail(group, f"not elementwise: input {ctx.shapes.get(x)} and output {ctx.shapes.get(y)}")
        nodes = chain_nodes(ctx.index.graph, group.node) if chain_end_of(group.node) else [group.node]
        table = self._lut_table(group, nodes, x, y, qx, qy)
        return self._layer(group, "lut", kind="lut", params={"table": table})

    def _lut_table(self, group, nodes, x, y, qx: QParams, qy: QParams) -> np.ndarray:
        ctx = self.ctx
        q = np.arange(qx.qmin, qx.qmax + 1).astype(qx.dtype)
        rank = len(ctx.shapes[x])
        feed = q.reshape((q.size,) + (1,) * (rank - 1))
        copies, inits, needed = [], [], set()
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.metadata_props[:]
            copies.append(copy)
            needed.update(i for i in node.input if i and ctx.index.is_constant(i))
        for name in sorted(needed):
            inits.append(numpy_helper.from_array(np.asarray(ctx.index.constant(name)), name))
        inits += [numpy_helper.from_array(qx.scale.reshape(()).astype(np.float32), "lut.x_scale"),
                  numpy_helper.from_array(qx.zero_point.reshape(()).astype(qx.dtype), "lut.x_zero_point"),
                  numpy_helper.from_array(qy.scale.reshape(()).astype(np.float32), "lut.y_scale"),
                  numpy_helper.from_array(qy.zero_point.reshape(()).astype(qy.dtype), "lut.y_zero_point")]
        dq = helper.make_node("DequantizeLinear", ["lut.q", "lut.x_scale", "lut.x_zero_point"], [x], name="lut.dq")
        qn = helper.make_node("QuantizeLinear", [y, "lut.y_scale", "lut.y_zero_point"], ["lut.out"], name="lut.q")
        graph = helper.make_graph(
            [dq] + copies + [qn], "lut",
            [helper.make_tensor_value_info("lut.q", _ONNX_ELEM[qx.dtype], list(feed.shape))],
            [helper.make_tensor_value_info("lut.out", _ONNX_ELEM[qy.dtype], None)], initializer=inits)
        opset = max(opset_version(ctx.model), 21 if "16" in qx.dtype + qy.dtype else 13)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        try:
            (out,) = make_session(model, optimize=False).run(["lut.out"], {"lut.q": feed})
        except Exception as exc:  # noqa: BLE001 (onnxruntime's exception types are not public)
            raise CompileError(f"node '{group.name}' ({group.op_type}): computing its lookup table in "
                               f"onnxruntime failed: {str(exc).splitlines()[0]}") from None
        out = np.asarray(out).reshape(-1)
        if out.size != q.size:
            raise ctx.fail(group, f"the function's output has {out.size} values for {q.size} inputs (not elementwise)")
        return out.astype(qy.dtype)  # QuantizeLinear saturated it into the dtype already


for _op in LUT_OPS:
    setattr(ArithmeticOpLowering, f"_lower_{_op.lower()}", ArithmeticOpLowering._lower_lut)
