"""The layer plan: the cleaned, fused ONNX graph read as a list of future IR layers.

A layer group is one main node plus, optionally, the activation fused into it (see
activation_fusion). The group's output is the tensor that gets quantized: the activation's output
when there is one. Scale selection, QDQ insertion and lowering all walk this one plan, so they
agree on which tensors are quantized. Every node outside the supported set is reported at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .activation_fusion import activation_bounds, fused_activation_of, is_fused_activation
from .errors import PassError
from .graph import GraphIndex, get_attr, graph_input_names

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
    # --- arithmetic and lookup-table ops (issue 4; lowered in compiler/lower_arith_ops.py) ---
}

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


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

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def scale_rule(self) -> str:
        return SUPPORTED_OPS[self.op_type]

    @property
    def source_nodes(self) -> list[str]:
        return [self.node.name] + ([self.activation.name] if self.activation is not None else [])


@dataclass
class LayerPlan:
    groups: list[LayerGroup]
    inputs: list[str]
    outputs: list[str]

    def activation_tensors(self) -> list[str]:
        """Every tensor that is quantized as an activation, inputs first, in execution order."""
        return list(self.inputs) + [g.output for g in self.groups]


def _unsupported_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    if op not in SUPPORTED_OPS:
        return "no integer lowering for this op yet"
    if op == "Conv":
        if not index.is_constant(node.input[1]):
            return "weight is not a constant"
        if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
            return "bias is not a constant"
        w = index.constant(node.input[1])
        if w is not None and w.ndim != 4:
            return f"only 2-D convolution is lowered (weight rank {w.ndim})"
    if op == "Gemm":
        if get_attr(node, "transA", 0):
            return "transA=1 is not supported"
        if not index.is_constant(node.input[1]):
            return "weight (B) is not a constant"
        if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
            return "bias (C) is not a constant"
    if op == "MatMul":
        if not index.is_constant(node.input[1]):
            return "MatMul between two activations is not lowered yet (weight must be a constant)"
        w = index.constant(node.input[1])
        if w is not None and w.ndim != 2:
            return f"MatMul weight must be 2-D, got rank {w.ndim}"
    if op in ("Add", "Concat"):
        if any(index.is_constant(i) for i in node.input if i):
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
    return None


def plan_layers(model: onnx.ModelProto) -> LayerPlan:
    """Read the graph as layer groups; raise one PassError listing every unsupported node."""
    graph = model.graph
    index = GraphIndex(graph)
    problems = []
    groups: list[LayerGroup] = []
    for node in graph.node:
        if node.op_type == "Constant" or is_fused_activation(node):
            continue
        reason = _unsupported_reason(node, index)
        if reason:
            problems.append(f"  node '{node.name}' ({node.op_type}): {reason}")
            continue
        act_name = fused_activation_of(node)
        activation = None
        if act_name:
            activation = next(n for n in graph.node if n.name == act_name)
        output = (activation or node).output[0]
        inputs = [i for i in node.input if i and not index.is_constant(i)]
        constants = [i for i in node.input if i and index.is_constant(i)]
        group = LayerGroup(node, activation, inputs, output, constants=constants)
        if node.op_type in WEIGHTED_OPS:
            group.weight = node.input[1]
            if len(node.input) > 2 and node.input[2]:
                group.bias = node.input[2]
        groups.append(group)
    if problems:
        raise PassError(
            f"{len(problems)} node(s) have no integer lowering:\n" + "\n".join(problems)
            + "\nRemove or replace them, or wait for float fallback (--deny-list) support."
        )
    return LayerPlan(groups, graph_input_names(model), [o.name for o in graph.output])
