"""The layer plan: the cleaned, fused ONNX graph read as a list of future IR layers.

A layer group is one main node plus, optionally, the activation fused into it (see
activation_fusion). The group's output is the tensor that gets quantized: the activation's output
when there is one. Scale selection, QDQ insertion and lowering all walk this one plan, so they
agree on which tensors are quantized. A node outside the supported set (or a form of it the
lowering does not handle, or a node the user denies) becomes a float group (kind "float", with
the reason): a float-fallback layer on the host (compiler/lower_float.py, docs/ir.md "float").
Custom-domain nodes have no fallback; every one of them is reported at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .activation_fusion import (
    activation_bounds,
    fused_activation_of,
    is_fused_activation,
)
from .elementwise_fusion import (
    LUT_CHAIN_END,
    LUT_CHAIN_HEAD,
    chain_end_of,
    chain_nodes,
    is_chain_member,
)
from .errors import PassError
from .graph import GraphIndex, del_meta, get_attr, graph_input_names, infer_tensor_info

# Elementwise functions of one tensor lowered as lookup tables (compiler/lower_arith_ops.py LUT_OPS).
ARITH_LUT_OPS = ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Exp", "Log", "Sqrt",
                 "Reciprocal", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Pow")

# op type -> how the layer's output scale is chosen: "calibrated" (own range) or "inherit"
# (pass-through: the output keeps the input's encoding exactly).
SUPPORTED_OPS: dict[str, str] = {
    "Conv": "calibrated",
    "Gemm": "calibrated",
    "MatMul": "calibrated",
    "Add": "calibrated",
    "Concat": "calibrated",
    "AveragePool": "calibrated",
    "GlobalAveragePool": "calibrated",
    "MaxPool": "inherit",
    "Flatten": "inherit",
    "Reshape": "inherit",
    "Relu": "inherit",
    "Clip": "inherit",
    # --- data-movement ops (issue 4; lowered in compiler/lower_shape_ops.py) ---
    "Transpose": "inherit",
    "Squeeze": "inherit",
    "Unsqueeze": "inherit",
    "Slice": "inherit",
    "Split": "inherit",  # one group (one slice layer) per output
    "Pad": "inherit",
    "DepthToSpace": "inherit",
    "SpaceToDepth": "inherit",
    "Resize": "inherit",  # nearest: a gather; linear: a convex combination, inside the input's range
    "Upsample": "inherit",
    "GlobalMaxPool": "inherit",
    "ConvTranspose": "calibrated",
    # --- arithmetic and lookup-table ops (issue 4; lowered in compiler/lower_arith_ops.py) ---
    "Sub": "calibrated",
    "Mul": "calibrated",
    "Div": "calibrated",
    "ReduceMean": "calibrated",
    "PRelu": "calibrated",
    "LeakyRelu": "calibrated",
    "Softmax": "calibrated",
    "ArgMax": "calibrated",  # its output is raw (an exact int64 index): see plan_layers
    **{op: "calibrated" for op in ARITH_LUT_OPS},  # 8/16-bit lookup tables (kind "lut")
}

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass
class LayerGroup:
    """One future IR layer: ``node`` (+ fused ``activation``), its activation inputs, its output."""

    node: onnx.NodeProto
    activation: onnx.NodeProto | None
    inputs: list[str]
    output: str
    weight: str | None = None
    bias: str | None = None
    constants: list[str] = field(default_factory=list)
    part: str = ""  # name suffix when one node gives several groups (Split: one per output)
    # --- float fallback (issue 4): kind "float" runs the ONNX op in float on the host ---
    kind: str = "integer"
    reason: str | None = None  # why a float group is not an integer layer
    extra_outputs: list[str] = field(default_factory=list)  # float groups: outputs after the first
    raw_outputs: dict[str, str] = field(default_factory=dict)  # tensor -> int32|int64|bool, not quantized
    members: list[str] = field(default_factory=list)  # a lookup-table chain's nodes between head and last

    @property
    def outputs(self) -> list[str]:
        return [self.output] + self.extra_outputs

    @property
    def quantized_outputs(self) -> list[str]:
        """The outputs that get an activation encoding (the raw int/bool outputs do not)."""
        return [o for o in self.outputs if o not in self.raw_outputs]

    @property
    def name(self) -> str:
        return self.node.name + self.part

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def scale_rule(self) -> str:
        if self.kind == "float" or chain_end_of(self.node):  # a lookup-table chain: f's own range
            return "calibrated"
        return SUPPORTED_OPS[self.op_type]

    @property
    def source_nodes(self) -> list[str]:
        return [self.node.name] + self.members + ([self.activation.name] if self.activation is not None else [])


@dataclass
class LayerPlan:
    groups: list[LayerGroup]
    inputs: list[str]
    outputs: list[str]

    def activation_tensors(self) -> list[str]:
        """Every tensor that is quantized as an activation, inputs first, in execution order."""
        return list(self.inputs) + [o for g in self.groups for o in g.quantized_outputs]

    def raw_tensors(self) -> dict[str, str]:
        """Float-layer outputs kept as exact integers or booleans (Shape, ArgMax, Equal): name -> dtype."""
        return {name: dtype for g in self.groups for name, dtype in g.raw_outputs.items()}

    def float_groups(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.kind == "float"]


def _constant_2d_kernel_reason(node: onnx.NodeProto, index: GraphIndex, what: str) -> str | None:
    """Why a Conv/ConvTranspose cannot be an integer layer: its weight or bias is computed at run
    time, or it is not 2-D; None when it can."""
    if not index.is_constant(node.input[1]):
        return "weight is not a constant"
    if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
        return "bias is not a constant"
    w = index.constant(node.input[1])
    if w is not None and w.ndim != 4:
        return f"only 2-D {what} is lowered (weight rank {w.ndim})"
    return None


def _unsupported_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    if chain_end_of(node):
        return None  # the head of a lookup-table chain (elementwise_fusion): one table
    if op not in SUPPORTED_OPS:
        return "no integer lowering for this op yet"
    if op == "Conv":
        reason = _constant_2d_kernel_reason(node, index, "convolution")
        if reason:
            return reason
    if op == "Gemm":
        if get_attr(node, "transA", 0):
            return "transA=1 is not supported"
        if not index.is_constant(node.input[1]):
            return "weight (B) is not a constant"
        if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
            return "bias (C) is not a constant"
    if op == "MatMul":
        if index.is_constant(node.input[0]):
            return "MatMul with a constant first operand is not lowered (transpose it into a Gemm)"
        w = index.constant(node.input[1])
        if w is not None and w.ndim != 2:
            return f"MatMul weight must be 2-D, got rank {w.ndim}"
    if op == "Concat" and any(index.is_constant(i) for i in node.input if i):
        return f"{op} with a constant input is not lowered yet"
    if op in ("MaxPool", "AveragePool"):
        if len(node.output) > 1 and node.output[1]:
            return "MaxPool indices output is not supported"
        if len(get_attr(node, "kernel_shape", [])) != 2:
            return "only 2-D pooling is lowered"
    if op == "Reshape" and not index.is_constant(node.input[1]):
        return "shape input is not a constant (fold it or fix the input shape)"
    if op == "Clip":
        try:
            activation_bounds(node, index)
        except (PassError, ValueError) as exc:
            return str(exc)
    return _data_movement_reason(node, index) or _arithmetic_reason(node, index)


def _arithmetic_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Forms of the arithmetic and lookup-table ops that compiler/lower_arith_ops.py does not lower."""
    op = node.op_type
    constant = [bool(i) and index.is_constant(i) for i in node.input]
    if op in ("Add", "Sub", "Mul", "Div") and all(constant[:2]):
        return "both operands are constants (constant folding should have removed it)"
    if op == "Div" and not any(constant[:2]):
        return "Div between two activations is not lowered (only division by a constant)"
    if op == "Div" and constant[0] and index.constant(node.input[0]).size != 1:
        return "a non-scalar constant divided by an activation is not lowered"
    if op == "PRelu" and not constant[1]:
        return "the slope is not a constant"
    if op == "ReduceMean":
        if len(node.input) > 1 and node.input[1] and not constant[1]:
            return "axes input is not a constant"
        axes = get_attr(node, "axes") if len(node.input) < 2 or not node.input[1] else index.constant(node.input[1])
        if get_attr(node, "noop_with_empty_axes", 0) and (axes is None or len(axes) == 0):
            return "noop_with_empty_axes with no axes (an identity) is not lowered"
    if op in ARITH_LUT_OPS:
        if any(constant[1:]) and any(index.constant(i).size != 1 for i, c in zip(node.input[1:], constant[1:]) if c):
            return f"{op} with a non-scalar constant operand is not a lookup table"
        if op == "Pow" and not constant[1]:
            return "Pow with a non-constant exponent is not lowered"
    return None



_RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = get_attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _data_movement_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Forms of the data-movement ops that compiler/lower_shape_ops.py does not lower, with why."""
    op = node.op_type

    def non_constant(positions) -> str | None:
        for k in positions:
            if len(node.input) > k and node.input[k] and not index.is_constant(node.input[k]):
                return node.input[k]
        return None

    if op in ("Squeeze", "Unsqueeze", "Slice", "Split", "Pad", "Resize", "Upsample"):
        name = non_constant(range(1, len(node.input)))
        if name:
            return f"input '{name}' is not a constant (fold it or fix the input shape)"
    if op == "Pad":
        mode = _text_attr(node, "mode", "constant")
        if mode not in _PAD_MODES:
            return f"pad mode '{mode}' is not lowered"
    if op == "DepthToSpace" and _text_attr(node, "mode", "DCR") not in ("DCR", "CRD"):
        return f"DepthToSpace mode '{_text_attr(node, 'mode', 'DCR')}' is not lowered"
    if op in ("Resize", "Upsample"):
        mode = _text_attr(node, "mode", "nearest")
        if mode not in ("nearest", "linear"):
            return f"mode '{mode}' is not lowered (nearest and linear are)"
        coord = _text_attr(node, "coordinate_transformation_mode", "half_pixel")
        if op == "Resize" and coord not in _RESIZE_COORDINATE_MODES:
            return f"coordinate_transformation_mode '{coord}' is not lowered"
        if get_attr(node, "antialias", 0):
            return "antialias=1 is not lowered"
        if _text_attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            return "keep_aspect_ratio_policy other than 'stretch' is not lowered"
        scales = get_attr(node, "scales")
        position = 2 if op == "Resize" and len(node.input) > 2 else 1
        if scales is None and len(node.input) > position and node.input[position]:
            scales = index.constant(node.input[position])
        scales = [] if scales is None else [float(v) for v in np.asarray(scales).reshape(-1)]
        axes = get_attr(node, "axes")
        if scales and axes is not None:  # opset 18: scales for these axes only
            if min(axes) < 0:
                return "Resize axes counted from the end are not lowered (give non-negative axes)"
            scales = [scales[list(axes).index(a)] if a in axes else 1.0 for a in range(max(axes) + 1)]
        if scales:
            if scales[0] != 1.0:
                return "resizing the batch axis is not lowered"
            if mode == "linear" and sum(v != 1.0 for v in scales) > 2:
                return "linear resize of more than 2 axes is not lowered"
    if op == "ConvTranspose":
        reason = _constant_2d_kernel_reason(node, index, "ConvTranspose")
        if reason:
            return reason
    return None

# ONNX element types a float layer may output without quantization (kept exact, scale 1, zp 0).
_RAW_ELEM_TYPES = {onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}
_FLOAT_ELEM_TYPES = (0, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                     onnx.TensorProto.BFLOAT16)


def denied_reason(node: onnx.NodeProto, deny: frozenset[str]) -> str | None:
    """'denied by --deny-list ...' when the node's op type or name is on the deny list."""
    if node.op_type in deny:
        return f"denied by --deny-list (op type {node.op_type})"
    if node.name in deny:
        return f"denied by --deny-list (node name '{node.name}')"
    return None


def _float_group(node: onnx.NodeProto, index: GraphIndex, reason: str, elem_types: dict[str, int]) -> LayerGroup:
    """A float-fallback group: every ONNX output is an output of the layer; outputs whose ONNX
    type is int32/int64/bool are raw (exact), float ones are quantized like any activation."""
    activation = None
    act_name = fused_activation_of(node)
    if act_name:
        activation = next(n for n in index.graph.node if n.name == act_name)
    outputs = [o for o in node.output if o]
    if activation is not None:
        outputs[0] = activation.output[0]
    raw = {}
    for out in outputs:
        elem = elem_types.get(out, 0)
        if elem in _RAW_ELEM_TYPES:
            raw[out] = _RAW_ELEM_TYPES[elem]
        elif elem not in _FLOAT_ELEM_TYPES:
            raise PassError(f"node '{node.name}' ({node.op_type}): output '{out}' has element type "
                            f"{onnx.TensorProto.DataType.Name(elem)}, which a float layer cannot carry")
    inputs = [i for i in node.input if i and not index.is_constant(i)]
    constants = [i for i in node.input if i and index.is_constant(i)]
    return LayerGroup(node, activation, inputs, outputs[0], constants=constants, kind="float", reason=reason,
                      extra_outputs=outputs[1:], raw_outputs=raw)


def dissolve_denied_chains(graph: onnx.GraphProto, deny: frozenset[str]) -> None:
    """Drop the chain annotations of every lookup-table chain that holds a denied node."""
    for head in [n for n in graph.node if chain_end_of(n)]:
        members = chain_nodes(graph, head)
        if any(denied_reason(n, deny) for n in members):
            for n in members:
                del_meta(n, LUT_CHAIN_END)
                del_meta(n, LUT_CHAIN_HEAD)


def plan_layers(model: onnx.ModelProto, deny=(), float_fallback: bool = True) -> LayerPlan:
    """Read the graph as layer groups. A node without an integer lowering, or whose op type or name
    is in ``deny``, becomes a float group (kind "float", with the reason); with
    ``float_fallback=False`` one PassError lists every such node instead. A lookup-table chain
    (elementwise_fusion) with a denied node is dissolved first (its annotations are removed from
    ``model``), so each of its nodes is planned on its own."""
    graph = model.graph
    deny = frozenset(deny)
    if deny:
        dissolve_denied_chains(graph, deny)
    index = GraphIndex(graph)
    problems = []
    groups: list[LayerGroup] = []
    elem_types: dict[str, int] | None = None
    for node in graph.node:
        if node.op_type == "Constant" or is_fused_activation(node) or is_chain_member(node):
            continue
        reason = denied_reason(node, deny) or _unsupported_reason(node, index)
        if reason and float_fallback and node.domain in ("", "ai.onnx"):
            if not reason.startswith("denied"):
                reason = (f"op unsupported (no integer lowering for {node.op_type})"
                          if node.op_type not in SUPPORTED_OPS else f"unsupported form: {reason}")
            if elem_types is None:
                elem_types = {name: info.elem_type for name, info in infer_tensor_info(model)[0].items()}
            groups.append(_float_group(node, index, reason, elem_types))
            continue
        if reason:
            problems.append(f"  node '{node.name}' ({node.op_type}): {reason}")
            continue
        act_name = fused_activation_of(node) or chain_end_of(node)
        activation = None
        if act_name:
            activation = next(n for n in graph.node if n.name == act_name)
        output = (activation or node).output[0]
        inputs = [i for i in node.input if i and not index.is_constant(i)]
        constants = [i for i in node.input if i and index.is_constant(i)]
        group = LayerGroup(node, activation, inputs, output, constants=constants)
        if node.op_type == "ArgMax":
            group.raw_outputs = {output: "int64"}  # an exact index: no encoding, no Q/DQ
        if chain_end_of(node):
            group.members = [n.name for n in chain_nodes(graph, node)][1:-1]
        if node.op_type in WEIGHTED_OPS and index.is_constant(node.input[1]):
            group.weight = node.input[1]
            if len(node.input) > 2 and node.input[2]:
                group.bias = node.input[2]
        if node.op_type == "Split":
            groups.extend(LayerGroup(node, None, inputs, out, constants=constants, part=f":{i}")
                          for i, out in enumerate(node.output))
            continue
        groups.append(group)
    if problems:
        raise PassError(
            f"{len(problems)} node(s) have no integer lowering:\n" + "\n".join(problems)
            + "\nRemove or replace them (custom-domain ops have no float fallback either)."
        )
    return LayerPlan(groups, graph_input_names(model), [o.name for o in graph.output])
