"""QDQ insertion: the float emulation of the integer program, as an ONNX model onnxruntime runs.

For every activation tensor T in the plan, a QuantizeLinear/DequantizeLinear pair:
    producer -> T_float -> Q -> T_quantized -> DQ -> T -> consumers (and graph outputs)
so every reader of T (and the graph's output names) stays as it was. A graph input T keeps its
name: T -> Q -> T_quantized -> DQ -> T_dequantized -> consumers. Inside a fused group no Q/DQ
appears: the Q follows the fused activation. Weights become an integer initializer
``W_quantized`` behind a DequantizeLinear (per output channel where the table says so); a bias
becomes an int32 initializer behind a DequantizeLinear with scale float32(s_x * s_w).
An int16 bias (TDA4VM) is stored as an int32 initializer with the same values: the arithmetic is
the same, and DequantizeLinear before opset 21 takes no int16.
An int64 bias (every layer with a 16-bit input or 16-bit weights: compiler/scales.py,
``bias_dtype_for``) has no DequantizeLinear form (it takes no int64 input), so it becomes an int64
initializer ``B_quantized`` behind Cast(to float32) and Mul(s_b): float32(q_b) * float32(s_b) in
float32 arithmetic (``bias_float_values``), bit for bit what onnxruntime's DequantizeLinear computes
from an integer q_b (it converts q_b - 0 to float32 and multiplies by the float32 scale). The
integer stays in the model (bias correction rewrites it like any other bias); the IR adds the
exact int64 q_b, the QDQ model its float32 rounding, as it does for an int32 q_b above 2^24.
A layer without weights whose multipliers cannot represent its scale ratios exactly (Add, Concat,
average pooling with a short multiplier) reads its input through its own DequantizeLinear with the
effective scale of ``QParamTable.consumer_scales`` (tensor ``T_for_<node>``), so the QDQ model
describes the arithmetic the IR does, as a nudged weight scale does for Conv/Gemm. An effective
scale of 0 (m_i = 0: an Add input too narrow to reach the shared shift's grid is dropped) becomes
``Mul(T, 0)`` (tensor ``T_for_<node>``): never a DequantizeLinear with scale 0.
16-bit Q/DQ needs opset 21: a model below it is converted (onnx.version_converter) first.
Naming: ``quantized_name(T)`` is the integer tensor of T, ``prequant_name(T)`` the float tensor a
Q reads (for non-input tensors), used by tests to compare layer by layer.
"""
from __future__ import annotations

import heapq

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import GraphPass, PassResult
from .graph import GraphIndex, all_names, delete_where, opset_version, replace_all_uses
from .layer_plan import LayerPlan
from .qparams import QParams, QParamTable, quantize_constant

ONNX_DTYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
               "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16,
               "int32": onnx.TensorProto.INT32}


def quantized_name(tensor: str) -> str:
    return f"{tensor}_quantized"


def prequant_name(tensor: str) -> str:
    return f"{tensor}_float"


def dequantized_input_name(tensor: str) -> str:
    return f"{tensor}_dequantized"


def _qparam_initializers(tensor: str, qp: QParams) -> tuple[list[onnx.TensorProto], dict]:
    scale = qp.scale if qp.per_channel else qp.scale.reshape(())
    zp = qp.zero_point if qp.per_channel else qp.zero_point.reshape(())
    inits = [numpy_helper.from_array(scale.astype(np.float32), f"{tensor}_scale"),
             numpy_helper.from_array(zp.astype(np.dtype(qp.dtype)), f"{tensor}_zero_point")]
    attrs = {"axis": qp.axis} if qp.per_channel else {}
    return inits, attrs


def bias_float_values(q_b: np.ndarray, qp: QParams) -> np.ndarray:
    """float32(q_b) * float32(s_b) computed in float32 (per channel along ``qp.axis``): the output of
    DequantizeLinear(q_b, s_b, 0) in onnxruntime, for a bias whose integer type (int64) ONNX
    DequantizeLinear does not accept."""
    scale = qp.scale.astype(np.float32)
    if qp.per_channel:
        shape = [1] * q_b.ndim
        shape[qp.axis] = -1
        scale = scale.reshape(shape)
    else:
        scale = scale.reshape(())
    return (np.asarray(q_b).astype(np.float32) * scale).astype(np.float32)


class InsertQDQ(GraphPass):
    """Emit the QDQ model for a plan and its quantization-parameter table."""

    name = "insert_qdq"

    def __init__(self, plan: LayerPlan, qparams: QParamTable):
        self.plan = plan
        self.qparams = qparams

    def _needed_opset(self) -> int:
        activations = self.plan.activation_tensors()
        wide = any(self.qparams[t].dtype in ("int16", "uint16") for t in activations)
        weights = [g.weight for g in self.plan.groups if g.weight]
        wide = wide or any(self.qparams[t].dtype in ("int16", "uint16") for t in weights)
        return 21 if wide else 13

    def requires(self, model):
        if opset_version(model) < 13:
            raise self.fail(f"the model's opset {opset_version(model)} is below 13, which this QDQ form needs")

    def apply(self, model: onnx.ModelProto) -> PassResult:
        changes = []
        needed = self._needed_opset()
        if opset_version(model) < needed:
            from onnx import version_converter

            before = opset_version(model)
            try:
                model = version_converter.convert_version(model, needed)
            except (RuntimeError, ValueError) as exc:  # what onnx.version_converter raises
                raise self.fail(f"16-bit Q/DQ needs opset {needed}; converting from opset {before} failed: {exc}") from None
            changes.append(f"converted opset {before} -> {needed} for 16-bit Q/DQ")
        graph = model.graph
        taken = all_names(graph)
        index = GraphIndex(graph)
        new_nodes: list[onnx.NodeProto] = []
        inputs = set(self.plan.inputs)
        for tensor in self.plan.activation_tensors():
            qp = self.qparams[tensor]
            inits, attrs = _qparam_initializers(tensor, qp)
            graph.initializer.extend(inits)
            q_out = quantized_name(tensor)
            assert q_out not in taken, q_out
            if tensor in inputs:
                q_in, dq_out = tensor, dequantized_input_name(tensor)
                replace_all_uses(graph, tensor, dq_out)
            else:
                q_in, dq_out = prequant_name(tensor), tensor
                producer = index.producer[tensor]
                producer.output[list(producer.output).index(tensor)] = q_in
            new_nodes.append(helper.make_node("QuantizeLinear", [q_in, inits[0].name, inits[1].name], [q_out],
                                              name=f"{tensor}_QuantizeLinear", **attrs))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_out, inits[0].name, inits[1].name], [dq_out],
                                              name=f"{tensor}_DequantizeLinear", **attrs))
        by_name = {n.name: n for n in graph.node}
        for (node_name, tensor), scale in self.qparams.consumer_scales.items():
            node = by_name.get(node_name)
            if node is None:
                raise self.fail(f"consumer scale for '{tensor}' names no node '{node_name}'")
            qp = self.qparams[tensor]
            reader = f"{tensor}_for_{node_name}"
            read_as = dequantized_input_name(tensor) if tensor in inputs else tensor
            if not (np.isfinite(scale) and scale >= 0):
                raise self.fail(f"consumer scale {scale} for '{tensor}' at '{node_name}' is not finite and >= 0")
            if scale == 0:
                # m_i = 0: the layer drops this input (docs/ir.md, "dropped inputs"); the QDQ model
                # multiplies it by 0 (its finite values give exactly 0) instead of a scale-0 DQ.
                zero = numpy_helper.from_array(np.zeros((), np.float32), f"{reader}_zero")
                graph.initializer.append(zero)
                new_nodes.append(helper.make_node("Mul", [read_as, zero.name], [reader], name=f"{reader}_Mul"))
            else:
                own = QParams(np.float32(scale), qp.zero_point, qp.dtype, source="consumer")
                inits, attrs = _qparam_initializers(reader, own)
                graph.initializer.extend(inits)
                new_nodes.append(helper.make_node("DequantizeLinear",
                                                  [quantized_name(tensor), inits[0].name, inits[1].name],
                                                  [reader], name=f"{reader}_DequantizeLinear"))
            for i, name in enumerate(node.input):
                if name == read_as:
                    node.input[i] = reader
            changes.append(f"'{node_name}' reads '{tensor}' at its effective scale {float(scale):.9g}")
        constants = [g.weight for g in self.plan.groups if g.weight] + [g.bias for g in self.plan.groups if g.bias]
        biases = {g.bias for g in self.plan.groups if g.bias}
        quantized_constants: list[onnx.TensorProto] = []
        for tensor in dict.fromkeys(constants):
            qp = self.qparams[tensor]
            values = index.constant(tensor)
            if qp.dtype == "int64" and tensor in biases:  # no int64 DequantizeLinear: Cast + Mul
                q_init = numpy_helper.from_array(quantize_constant(values, qp), quantized_name(tensor))
                scale = qp.scale.astype(np.float32)
                s_init = numpy_helper.from_array(scale if qp.per_channel else scale.reshape(()), f"{tensor}_scale")
                quantized_constants += [q_init, s_init]
                new_nodes.append(helper.make_node("Cast", [q_init.name], [f"{tensor}_as_float"],
                                                  name=f"{tensor}_Cast", to=onnx.TensorProto.FLOAT))
                new_nodes.append(helper.make_node("Mul", [f"{tensor}_as_float", s_init.name], [tensor],
                                                  name=f"{tensor}_Mul"))
                changes.append(f"int64 bias '{tensor}': Cast + Mul (DequantizeLinear takes no int64)")
                continue
            if qp.dtype == "int16" and tensor in biases:
                qp = QParams(qp.scale, qp.zero_point, "int32", qp.axis, qp.source)  # same values, opset-13 DQ
            q_init = numpy_helper.from_array(quantize_constant(values, qp), quantized_name(tensor))
            inits, attrs = _qparam_initializers(tensor, qp)
            quantized_constants += [q_init] + inits
            new_nodes.append(helper.make_node("DequantizeLinear", [q_init.name, inits[0].name, inits[1].name],
                                              [tensor], name=f"{tensor}_DequantizeLinear", **attrs))
        # The float constants are replaced by their integer forms (deleted where they stand, so
        # the initializers that stay are not copied again).
        replaced = set(constants)
        delete_where(graph.initializer, lambda i: i.name in replaced)
        graph.initializer.extend(quantized_constants)
        # Place each DQ/Q right after its producer: a topological order onnxruntime accepts.
        try:
            ordered = _topological(list(graph.node) + new_nodes)
        except ValueError as exc:
            raise self.fail(str(exc)) from None
        del graph.node[:]
        graph.node.extend(ordered)
        del graph.value_info[:]
        n_act, n_const = len(self.plan.activation_tensors()), len(dict.fromkeys(constants))
        return PassResult(model, True, changes + [f"quantized {n_act} activation tensors (Q+DQ)",
                                                  f"quantized {n_const} weights/biases (DQ)"])


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's order over tensor dependencies, stable with respect to the given order: of the nodes
    whose inputs are all produced, the earliest in ``nodes`` comes next (the lexicographic
    topological order of the node positions)."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producer[out] = i
    readers: list[set[int]] = [set() for _ in nodes]
    waiting = [0] * len(nodes)  # distinct producers each node still waits for
    for i, node in enumerate(nodes):
        for inp in node.input:
            p = producer.get(inp) if inp else None
            if p is not None and i not in readers[p]:
                readers[p].add(i)
                waiting[i] += 1
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting[i]]
        raise ValueError(f"the QDQ graph has a cycle through {stuck[:5]}")
    return [nodes[i] for i in order]
