"""QDQ insertion: the float emulation of the integer program, as an ONNX model onnxruntime runs.

For every activation tensor T in the plan, a QuantizeLinear/DequantizeLinear pair:
    producer -> T_float -> Q -> T_quantized -> DQ -> T -> consumers (and graph outputs)
so every reader of T (and the graph's output names) stays as it was. A graph input T keeps its
name: T -> Q -> T_quantized -> DQ -> T_dequantized -> consumers. Inside a fused group no Q/DQ
appears: the Q follows the fused activation. Weights become an integer initializer
``W_quantized`` behind a DequantizeLinear (per output channel where the table says so); a bias
becomes an int32 initializer behind a DequantizeLinear with scale float32(s_x * s_w).
Naming: ``quantized_name(T)`` is the integer tensor of T, ``prequant_name(T)`` the float tensor a
Q reads (for non-input tensors), used by tests to compare layer by layer.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import GraphPass, PassResult
from .graph import GraphIndex, all_names, opset_version, replace_all_uses
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


class InsertQDQ(GraphPass):
    """Emit the QDQ model for a plan and its quantization-parameter table."""

    name = "insert_qdq"

    def __init__(self, plan: LayerPlan, qparams: QParamTable):
        self.plan = plan
        self.qparams = qparams

    def requires(self, model):
        needed = 21 if any(qp.dtype in ("int16", "uint16") for qp in self.qparams.values()) else 13
        if opset_version(model) < needed:
            raise self.fail(f"the model's opset {opset_version(model)} is below {needed}, which this QDQ form needs")

    def apply(self, model: onnx.ModelProto) -> PassResult:
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
        constants = [g.weight for g in self.plan.groups if g.weight] + [g.bias for g in self.plan.groups if g.bias]
        for tensor in dict.fromkeys(constants):
            qp = self.qparams[tensor]
            values = index.constant(tensor)
            q_init = numpy_helper.from_array(quantize_constant(values, qp), quantized_name(tensor))
            inits, attrs = _qparam_initializers(tensor, qp)
            keep = [i for i in graph.initializer if i.name != tensor]
            del graph.initializer[:]
            graph.initializer.extend(keep + [q_init] + inits)
            new_nodes.append(helper.make_node("DequantizeLinear", [q_init.name, inits[0].name, inits[1].name],
                                              [tensor], name=f"{tensor}_DequantizeLinear", **attrs))
        # Place each DQ/Q right after its producer: a topological order onnxruntime accepts.
        ordered = _topological(list(graph.node) + new_nodes, {i.name for i in graph.initializer} | inputs)
        del graph.node[:]
        graph.node.extend(ordered)
        del graph.value_info[:]
        n_act, n_const = len(self.plan.activation_tensors()), len(dict.fromkeys(constants))
        return PassResult(model, True, [f"quantized {n_act} activation tensors (Q+DQ)",
                                        f"quantized {n_const} weights/biases (DQ)"])


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order over tensor dependencies, stable with respect to the given order."""
    import networkx as nx

    g = nx.DiGraph()
    producer = {}
    for i, node in enumerate(nodes):
        g.add_node(i)
        for out in node.output:
            producer[out] = i
    for i, node in enumerate(nodes):
        for inp in node.input:
            if inp and inp in producer:
                g.add_edge(producer[inp], i)
    return [nodes[i] for i in nx.lexicographical_topological_sort(g)]
