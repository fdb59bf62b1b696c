"""Lowering rules for data-movement ops (Transpose, Squeeze/Unsqueeze, Slice/Split, Pad,
DepthToSpace/SpaceToDepth, Resize/Upsample, GlobalMaxPool, ConvTranspose): a mixin of
``compiler.lowering.Lowering``.

Each ``_lower_<op>`` method takes a LayerGroup and returns one IR Layer; see docs/ir.md for the
integer rule of each IR op. Every op here except ConvTranspose keeps its input's encoding
("inherit" in passes.layer_plan), so the integers move without arithmetic (Resize linear
interpolates between them with fixed-point weights and rounds once). Attributes are resolved at
compile time against the static shapes: slice bounds clamped by ONNX's rules, pads expanded to all
axes, Resize coordinates turned into integer index tables and weights.
"""
from __future__ import annotations

import numpy as np

from passes.graph import get_attr, opset_version
from passes.layer_plan import LayerGroup
from passes.qparams import QParams
from runtime.ir import Layer

# Fraction bits of each 1-D linear-interpolation weight. With n <= 2 resized axes the accumulator
# is at most 2^16 * 2^(2F) = 2^60 for 16-bit inputs, so requant(acc, 1, n*F) stays inside int64.
LINEAR_FRACTION_BITS = 22


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def normalize_slice(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice bounds -> (start, stop) for a python slice on an axis of size ``dim``: negative
    values count from the end, then clamp to [0, dim] (step > 0) or start to [0, dim-1] and end to
    [-1, dim-1] (step < 0; -1 means "through index 0")."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def resize_coordinates(out_size: int, in_size: int, scale: np.float32, mode: str) -> np.ndarray:
    """Input coordinate of each output index (ONNX Resize's coordinate_transformation_mode),
    computed in float32 in the operation order onnxruntime uses, so the tables agree with it."""
    f32 = np.float32
    x = np.arange(out_size, dtype=f32)
    half = f32(0.5)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_size > 1 else np.zeros(out_size, f32)
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if mode == "align_corners":
        if out_size == 1:
            return np.zeros(1, f32)
        return x * f32(in_size - 1) / f32(out_size - 1)
    raise ValueError(f"coordinate_transformation_mode '{mode}' is not lowered")


def nearest_indices(coords: np.ndarray, in_size: int, nearest_mode: str, downsample: bool) -> np.ndarray:
    """Nearest input index per coordinate (ONNX nearest_mode; 'simple' is Resize-10/Upsample:
    ceil when downsampling, truncation otherwise), clamped to [0, in_size - 1]."""
    c = coords.astype(np.float64)  # exact: every float32 is a float64, and c + 0.5 is exact too
    if nearest_mode == "round_prefer_floor":
        idx = np.where(c == np.trunc(c) + 0.5, np.floor(c), np.sign(c) * np.floor(np.abs(c) + 0.5))
    elif nearest_mode == "round_prefer_ceil":
        idx = np.sign(c) * np.floor(np.abs(c) + 0.5)  # std::round: half away from zero
    elif nearest_mode == "floor":
        idx = np.floor(c)
    elif nearest_mode == "ceil":
        idx = np.ceil(c)
    elif nearest_mode == "simple":
        idx = np.ceil(c) if downsample else np.trunc(c)
    else:
        raise ValueError(f"nearest_mode '{nearest_mode}' is not lowered")
    return np.clip(idx, 0, in_size - 1).astype(np.int32)


def linear_taps(coords: np.ndarray, in_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, weight of upper in F-bit fixed point) per coordinate, as onnxruntime's
    linear mode: the coordinate is clamped to [0, in_size - 1], lower = trunc, upper = lower + 1
    (capped), fraction t = c - lower in float32; u = round_half_up(t * 2^F) in float64 (exact
    product), so |u / 2^F - t| <= 2^-(F+1)."""
    c = np.clip(coords, np.float32(0), np.float32(in_size - 1)).astype(np.float32)
    lower = np.minimum(c.astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    t = (c - lower.astype(np.float32)).astype(np.float64)
    u = np.floor(t * 2.0**bits + 0.5).astype(np.int64)
    return lower.astype(np.int32), upper.astype(np.int32), u.astype(np.int32)


class ShapeOpLowering:
    """Per-op lowering methods for data-movement ops (mixed into Lowering)."""

    # -- helpers -------------------------------------------------------------------------------
    def _single_input(self, group: LayerGroup, op: str, **kw) -> Layer:
        layer = self._layer(group, op, **kw)
        layer.inputs = layer.inputs[:1]
        return layer

    def _const_input(self, group: LayerGroup, position: int):
        node = group.node
        if len(node.input) > position and node.input[position]:
            return self.ctx.index.constant(node.input[position])
        return None

    def _in_shape(self, group: LayerGroup) -> tuple[int, ...]:
        return self.ctx.shapes[group.inputs[0]]

    # -- pure permutations and views -------------------------------------------------------------
    def _lower_transpose(self, group: LayerGroup) -> Layer:
        rank = len(self._in_shape(group))
        perm = get_attr(group.node, "perm")
        perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
        return self._single_input(group, "transpose", attrs={"perm": perm})

    # Squeeze/Unsqueeze only change the shape: the reshape rule (docs/ir.md) with the inferred shape.
    def _lower_squeeze(self, group: LayerGroup) -> Layer:
        return self._reshape_to_output(group)

    _lower_unsqueeze = _lower_squeeze

    def _lower_depthtospace(self, group: LayerGroup) -> Layer:
        mode = _text(get_attr(group.node, "mode"), "DCR")
        return self._single_input(group, "depth_to_space",
                                  attrs={"blocksize": int(get_attr(group.node, "blocksize")), "mode": mode})

    def _lower_spacetodepth(self, group: LayerGroup) -> Layer:
        return self._single_input(group, "space_to_depth", attrs={"blocksize": int(get_attr(group.node, "blocksize"))})

    def _lower_globalmaxpool(self, group: LayerGroup) -> Layer:
        hw = list(self._in_shape(group)[2:])
        attrs = {"kernel_shape": hw, "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "ceil_mode": 0}
        return self._single_input(group, "maxpool", attrs=attrs)

    # -- Slice and Split ------------------------------------------------------------------------
    def _slice_layer(self, group: LayerGroup, axes, starts, ends, steps) -> Layer:
        shape = self._in_shape(group)
        rank = len(shape)
        out = {"axes": [], "starts": [], "stops": [], "steps": []}
        for axis, start, end, step in zip(axes, starts, ends, steps):
            axis, step = int(axis) % rank, int(step)
            if step == 0:
                raise self.ctx.fail(group, "slice step must not be 0")
            begin, stop = normalize_slice(int(start), int(end), step, shape[axis])
            out["axes"].append(axis)
            out["starts"].append(begin)
            out["stops"].append(stop)
            out["steps"].append(step)
        layer = self._single_input(group, "slice", attrs=out)
        expected = self.ctx.shapes.get(group.output)
        sliced = list(shape)
        for axis, begin, stop, step in zip(out["axes"], out["starts"], out["stops"], out["steps"]):
            sliced[axis] = len(range(begin, stop, step))  # range's -1 is an index, as "stop" means
        if expected is not None and tuple(sliced) != tuple(expected):
            raise self.ctx.fail(group, f"slice gives shape {tuple(sliced)}, shape inference says {expected}")
        return layer

    def _lower_slice(self, group: LayerGroup) -> Layer:
        node = group.node
        if opset_version(self.ctx.model) < 10:
            starts, ends = get_attr(node, "starts"), get_attr(node, "ends")
            axes = get_attr(node, "axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = self._const_input(group, 1), self._const_input(group, 2)
            axes = self._const_input(group, 3)
            axes = list(range(len(starts))) if axes is None else axes.tolist()
            steps = self._const_input(group, 4)
            steps = [1] * len(starts) if steps is None else steps.tolist()
        return self._slice_layer(group, axes, list(starts), list(ends), steps)

    def _lower_split(self, group: LayerGroup) -> Layer:
        """One slice layer per output of the Split (the plan gives each output its own group):
        the output's offset along the axis is the sum of the sizes of the outputs before it."""
        node = group.node
        rank = len(self._in_shape(group))
        axis = int(get_attr(node, "axis", 0)) % rank
        position = list(node.output).index(group.output)
        sizes = []
        for name in node.output[:position + 1]:
            if name not in self.ctx.shapes:
                raise self.ctx.fail(group, f"output '{name}' has no static shape")
            sizes.append(self.ctx.shapes[name][axis])
        start = sum(sizes[:-1])
        return self._slice_layer(group, [axis], [start], [start + sizes[-1]], [1])

    # -- Pad ----------------------------------------------------------------------------------
    def _lower_pad(self, group: LayerGroup) -> Layer:
        node = group.node
        rank = len(self._in_shape(group))
        mode = _text(get_attr(node, "mode"), "constant")
        if opset_version(self.ctx.model) < 11:
            pads, value = list(get_attr(node, "pads")), float(get_attr(node, "value", 0.0))
        else:
            pads = self._const_input(group, 1).astype(np.int64).reshape(-1).tolist()
            value = self._const_input(group, 2)
            value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
            axes = self._const_input(group, 3)
            if axes is not None:
                full = [0] * (2 * rank)
                n = axes.size
                for i, a in enumerate(int(a) % rank for a in axes.reshape(-1)):
                    full[a], full[a + rank] = pads[i], pads[i + n]
                pads = full
        if len(pads) != 2 * rank:
            raise self.ctx.fail(group, f"pads {pads} must be {2 * rank} values")
        params = {}
        if mode == "constant":
            qp: QParams = self.ctx.qparams[group.inputs[0]]
            # Q(value) exactly as QuantizeLinear computes it: float32 division, half to even, saturate
            q = np.rint(np.float32(value) / np.float32(qp.scale[0])) + int(qp.zero_point[0])
            params["fill"] = np.array([int(np.clip(q, qp.qmin, qp.qmax))], np.int32)
        return self._single_input(group, "pad", attrs={"pads": [int(p) for p in pads], "mode": mode}, params=params)

    # -- Resize / Upsample ----------------------------------------------------------------------
    def _resize_form(self, group: LayerGroup) -> tuple[str, str, str, list[np.float32]]:
        """(mode, coordinate mode, nearest mode, float32 scale per axis) for any Resize/Upsample form."""
        node = group.node
        in_shape, out_shape = self._in_shape(group), self.ctx.shapes[group.output]
        opset = opset_version(self.ctx.model)
        mode = _text(get_attr(node, "mode"), "nearest")
        legacy = node.op_type == "Upsample" or opset < 11
        if legacy:
            coord, nearest = "asymmetric", "simple"
            scales = get_attr(node, "scales")
            scales = self._const_input(group, 1) if scales is None else np.asarray(scales, np.float32)
            sizes = None
        else:
            coord = _text(get_attr(node, "coordinate_transformation_mode"), "half_pixel")
            nearest = _text(get_attr(node, "nearest_mode"), "round_prefer_floor")
            scales, sizes = self._const_input(group, 2), self._const_input(group, 3)
        axes = get_attr(node, "axes")  # opset 18: scales/sizes for these axes only
        if scales is not None and scales.size and axes is not None:
            full = np.ones(len(in_shape), np.float32)
            full[[int(a) % len(in_shape) for a in axes]] = scales.reshape(-1)
            scales = full
        if scales is not None and scales.size:
            scale = [np.float32(s) for s in scales.reshape(-1)]
        elif sizes is not None and sizes.size:
            scale = [np.float32(o) / np.float32(i) for o, i in zip(out_shape, in_shape)]
        else:
            raise self.ctx.fail(group, "Resize needs constant scales or sizes")
        if len(scale) != len(in_shape):
            raise self.ctx.fail(group, f"{len(scale)} scales for a rank-{len(in_shape)} input")
        return mode, coord, nearest, scale

    def _lower_resize(self, group: LayerGroup) -> Layer:
        in_shape, out_shape = self._in_shape(group), self.ctx.shapes[group.output]
        mode, coord, nearest, scales = self._resize_form(group)
        axes = [a for a in range(len(in_shape)) if in_shape[a] != out_shape[a] or scales[a] != 1]
        if 0 in axes:
            raise self.ctx.fail(group, "resizing the batch axis is not lowered")
        params = {}
        try:
            for a in axes:
                coords = resize_coordinates(out_shape[a], in_shape[a], scales[a], coord)
                if mode == "nearest":
                    params[f"index_{a}"] = nearest_indices(coords, in_shape[a], nearest, scales[a] < 1)
                else:
                    lower, upper, u = linear_taps(coords, in_shape[a], LINEAR_FRACTION_BITS)
                    params.update({f"lower_{a}": lower, f"upper_{a}": upper, f"weight_{a}": u})
        except ValueError as exc:
            raise self.ctx.fail(group, str(exc)) from None
        if mode == "nearest" or not axes:  # no axis changes: an identity, whatever the mode
            return self._single_input(group, "resize_nearest", attrs={"axes": axes}, params=params)
        if mode != "linear":
            raise self.ctx.fail(group, f"mode '{mode}' is not lowered")
        if len(axes) > 2:
            raise self.ctx.fail(group, f"linear resize of {len(axes)} axes {axes}; at most 2 are lowered")
        attrs = {"axes": axes, "fraction_bits": LINEAR_FRACTION_BITS}
        return self._single_input(group, "resize_linear", attrs=attrs, params=params,
                                  acc_dtype="int64", rounding=self.ctx.target.requant_rounding)

    _lower_upsample = _lower_resize

    # -- ConvTranspose --------------------------------------------------------------------------
    def _lower_convtranspose(self, group: LayerGroup) -> Layer:
        """Integer weights re-laid output-major [O, C_in/group, kh, kw] (ONNX stores
        [C_in, C_out/group, kh, kw]); bias, requant and clamp as conv (``_weighted``)."""
        node = group.node
        q_w, qp_w = self._weight_ir(group)
        if q_w.ndim != 4:
            raise self.ctx.fail(group, f"only 2-D ConvTranspose is lowered (weight rank {q_w.ndim})")
        g = int(get_attr(node, "group", 1))
        c_in, c_out_g, kh, kw = q_w.shape
        if g > 1 and qp_w.scale.size == c_out_g > 1:
            # per-channel along ONNX axis 1 (a pre-quantized model): channel g*C_out/group + j uses scale j
            qp_w = QParams(np.tile(qp_w.scale, g), np.tile(qp_w.zero_point, g), qp_w.dtype, axis=0, source=qp_w.source)
        if qp_w.scale.size not in (1, c_out_g * g):
            raise self.ctx.fail(group, f"weight has {qp_w.scale.size} scales for {c_out_g * g} output channels")
        w_ir = q_w.reshape(g, c_in // g, c_out_g, kh, kw).transpose(0, 2, 1, 3, 4).reshape(g * c_out_g, c_in // g, kh, kw)
        attrs = {
            "strides": [int(v) for v in get_attr(node, "strides", [1, 1])],
            "dilations": [int(v) for v in get_attr(node, "dilations", [1, 1])],
            "pads": [int(v) for v in get_attr(node, "pads", [0, 0, 0, 0])],
            "output_padding": [int(v) for v in get_attr(node, "output_padding", [0, 0])],
            "group": g,
        }
        auto_pad = _text(get_attr(node, "auto_pad"), "NOTSET")
        if auto_pad == "VALID":
            attrs["pads"] = [0, 0, 0, 0]
        elif get_attr(node, "output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            attrs["pads"] = self._conv_transpose_pads(group, attrs, (kh, kw), auto_pad)
        layer = self._weighted(group, np.ascontiguousarray(w_ir), qp_w, "conv_transpose", attrs)
        if layer.attrs.pop("input_zero_point_folded", 0):
            # Folding -zp_x * sum(w) into the bias is exact for conv (its padding is zp_x) but not
            # here: border outputs receive fewer taps. The kernel subtracts zp_x itself instead.
            zp_x = int(self.ctx.qparams[group.inputs[0]].zero_point[0])
            w = layer.params["weight"].astype(np.int64)
            zp_w = layer.params["weight_zero_point"].astype(np.int64).reshape(-1, 1)
            w_sum = (w.reshape(w.shape[0], -1) - zp_w).sum(axis=1)
            bias = layer.params["bias"]
            layer.params["bias"] = (bias.astype(np.int64) + zp_x * w_sum).astype(bias.dtype)
        out_hw = self.ctx.shapes[group.output][2:]
        in_hw = self._in_shape(group)[2:]
        for a in range(2):
            size = (attrs["strides"][a] * (in_hw[a] - 1) + attrs["output_padding"][a]
                    + attrs["dilations"][a] * ((kh, kw)[a] - 1) + 1 - attrs["pads"][a] - attrs["pads"][a + 2])
            if size != out_hw[a]:
                raise self.ctx.fail(group, f"output size {size} on spatial axis {a} differs from the inferred {out_hw[a]}")
        return layer

    def _conv_transpose_pads(self, group: LayerGroup, attrs: dict, kernel: tuple[int, int], auto_pad: str) -> list[int]:
        """Pads for ``output_shape`` / auto_pad SAME_*, as the ONNX spec states them:
        total = s (in - 1) + output_padding + (k - 1) d + 1 - out (out: the inferred output size);
        SAME_UPPER puts total // 2 first, otherwise total - total // 2 goes first."""
        in_hw, out_hw = self._in_shape(group)[2:], self.ctx.shapes[group.output][2:]
        begin, end = [], []
        for a in range(2):
            total = (attrs["strides"][a] * (in_hw[a] - 1) + attrs["output_padding"][a]
                     + (kernel[a] - 1) * attrs["dilations"][a] + 1 - out_hw[a])
            if total < 0:
                raise self.ctx.fail(group, f"output size {out_hw[a]} exceeds the full transposed-conv extent "
                                           "(would need negative pads)")
            first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(first)
            end.append(total - first)
        return begin + end
