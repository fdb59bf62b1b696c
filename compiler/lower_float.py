"""Lowering of float-fallback layers (dequantize -> float op -> quantize): a mixin of
``compiler.lowering.Lowering``. See docs/ir.md, "float layers".

A float group (``LayerGroup.kind == "float"``: no integer lowering, an unsupported form, or
denied by the user) becomes one IR layer of kind "float" whose ``op`` is the ONNX op type. The
layer keeps the node's ONNX attributes as JSON values (``attrs['onnx_attrs']``; tensor-valued
attributes as ``params['attr.<name>']``), its constant inputs (weights of a denied Conv, shapes,
axes) as ``params['input<position>']`` in their ONNX dtype, and ``attrs['input_slots']`` saying
for each ONNX input position whether it is a runtime input ('t'), a constant ('p') or absent ('').
A fused Relu/Clip becomes ``attrs['clip'] = [lo, hi]`` (None: unbounded), applied in float before
quantizing. The runtime (runtime/float_ops.py) evaluates the op in float; the output encoding is
calibrated like any activation and quantized with ONNX QuantizeLinear (round half to even), so
the QDQ model describes the same computation.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.activation_fusion import activation_bounds
from passes.layer_plan import LayerGroup
from runtime.float_ops import FLOAT_OPS
from runtime.ir import Layer, TensorInfo

from .errors import CompileError


def _json_attr(node: onnx.NodeProto, attr: onnx.AttributeProto):
    """An ONNX attribute as a JSON value (str, int, float, lists of them) or a numpy array
    (tensor-valued attributes); subgraphs are refused."""
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise CompileError(f"node '{node.name}' ({node.op_type}): attribute '{attr.name}' is a subgraph; "
                           "control flow has no float fallback (fold it away or re-export without it)")
    value = helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        if any(isinstance(v, onnx.TensorProto) for v in value):
            raise CompileError(f"node '{node.name}' ({node.op_type}): tensor-list attribute '{attr.name}' "
                               "is not supported in a float layer")
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


class FloatFallbackLowering:
    """Lowering of nodes that run in float on the host (mixed into Lowering)."""

    def raw_tensor_infos(self) -> dict[str, TensorInfo]:
        """TensorInfos of the float layers' raw outputs: int32/int64/bool, scale 1, zero point 0."""
        infos = {}
        for name, dtype in self.plan.raw_tensors().items():
            if name not in self.ctx.shapes:
                raise CompileError(f"tensor '{name}' (a {dtype} output of a float layer) has no static shape "
                                   "after shape inference")
            infos[name] = TensorInfo(name, dtype, self.ctx.shapes[name], 1.0, 0)
        return infos

    def lower_float_group(self, group: LayerGroup) -> Layer:
        node, ctx = group.node, self.ctx
        if node.op_type not in FLOAT_OPS:
            raise CompileError(
                f"node '{node.name}' ({node.op_type}): {group.reason}, and runtime/float_ops.py has no float "
                f"implementation of {node.op_type} either; replace the op or add it to runtime/float_ops.py")
        slots, params = [], {}
        for pos, name in enumerate(node.input):
            if not name:
                slots.append("")
            elif ctx.index.is_constant(name):
                slots.append("p")
                params[f"input{pos}"] = np.ascontiguousarray(ctx.index.constant(name))
            else:
                slots.append("t")
        onnx_attrs = {}
        for attr in node.attribute:
            value = _json_attr(node, attr)
            if isinstance(value, np.ndarray):
                params[f"attr.{attr.name}"] = np.ascontiguousarray(value)
            else:
                onnx_attrs[attr.name] = value
        attrs = {"input_slots": slots, "onnx_attrs": onnx_attrs, "reason": group.reason or ""}
        if group.activation is not None:
            lo, hi = activation_bounds(group.activation, ctx.index)
            attrs["clip"] = [lo, hi]
        return Layer(name=group.name, op=node.op_type, inputs=list(group.inputs), outputs=list(group.outputs),
                     kind="float", attrs=attrs, params=params, rounding="half_even")
