"""Small helpers for editing an ONNX graph through producer/consumer links.

Passes work on ``onnx.ModelProto`` directly (onnx-graphsurgeon drops node ``metadata_props``,
which carry the fusion annotations, so it is not used inside the pipeline).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

META_PREFIX = "qlower."


class GraphIndex:
    """Producer, consumers and constants of every tensor name in a graph (a snapshot: rebuild it
    after editing)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return constant_node_value(node)
        return None

    def uses(self, name: str) -> int:
        """Readers of a tensor, counting a graph output as one."""
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node, whichever attribute form it uses."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise ValueError(f"Constant node '{node.name}' has no supported value attribute")


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def get_meta(node: onnx.NodeProto, key: str) -> str | None:
    """A ``qlower.<key>`` annotation of a node (node metadata_props, shown by Netron)."""
    for entry in node.metadata_props:
        if entry.key == META_PREFIX + key:
            return entry.value
    return None


def set_meta(node: onnx.NodeProto, key: str, value: str) -> None:
    for entry in node.metadata_props:
        if entry.key == META_PREFIX + key:
            entry.value = value
            return
    entry = node.metadata_props.add()
    entry.key = META_PREFIX + key
    entry.value = value


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 1


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The model's real inputs: graph inputs that are not initializers (old files list weights too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def replace_all_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` (nodes and graph outputs) read ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def remove_nodes(graph: onnx.GraphProto, doomed: list[onnx.NodeProto]) -> None:
    ids = {id(n) for n in doomed}
    keep = [n for n in graph.node if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(keep)


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_1``, ``base_2``, ... whichever is not taken yet; records the choice."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names
