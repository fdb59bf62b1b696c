"""Constant folding: compute at compile time what does not depend on the model's inputs.

Constant nodes become initializers; a node whose inputs are all constants is evaluated with the
onnx reference evaluator (one node at a time, under the model's opsets) and replaced by
initializers; Shape (and Size) of a tensor whose shape shape inference knows statically becomes a
constant, so Shape -> Gather -> Concat -> Reshape chains collapse.

QuantizeLinear / DequantizeLinear are never folded: their scales and zero points are what the
compiler lowers (onnx-graphsurgeon learned this from a bug). Random ops are never folded either.
Initializers are treated as constants even when an old model also lists them as graph inputs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import GraphPass, PassResult
from .graph import (
    add_initializer,
    constant_node_value,
    get_attr,
    infer_tensor_info,
    remove_nodes,
    subgraphs,
)

NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a TensorProto named after its output, or None (sparse)."""
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            return tensor
        if attr.name == "value_string":
            return numpy_helper.from_array(np.array(attr.s, dtype=object), node.output[0])
        if attr.name == "value_strings":
            return numpy_helper.from_array(np.array(list(attr.strings), dtype=object), node.output[0])
        if attr.name == "sparse_value":
            return None
    return numpy_helper.from_array(constant_node_value(node), node.output[0])


def evaluate_node(node: onnx.NodeProto, values: dict[str, np.ndarray], model: onnx.ModelProto) -> list[np.ndarray]:
    """Run one node on constant inputs with ``onnx.reference`` under the model's opsets; one array
    per output (empty output names give None)."""
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(values[name].dtype),
                                            values[name].shape)
              for name in dict.fromkeys(i for i in node.input if i)]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version or onnx.IR_VERSION)
    feeds = {vi.name: values[vi.name] for vi in inputs}
    results = iter(ReferenceEvaluator(tiny).run(None, feeds))
    arrays: list[np.ndarray] = []
    for name in node.output:
        if not name:
            arrays.append(None)
            continue
        value = next(results)
        if not isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(f"output '{name}' is a {type(value).__name__}, not a tensor")
        arrays.append(np.asarray(value))
    return arrays


class FoldConstants(GraphPass):
    """Fold Constant nodes, Shape/Size of statically shaped tensors and all-constant nodes into
    initializers. A node whose output is a graph output folds into a Constant node instead (the
    graph output keeps a producer). A fold that would add more than ``max_growth_elements`` to
    the model beyond its inputs (Expand, Tile, ConstantOfShape of large shapes) is left alone.
    A node that fails to evaluate is left alone and named in the changes."""

    name = "fold_constants"

    def __init__(self, max_growth_elements: int = 1 << 22):
        self.max_growth_elements = max_growth_elements

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        outputs = {o.name for o in graph.output}
        changes: list[str] = []

        converted = 0
        for node in [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")]:
            if node.output[0] in outputs:
                continue
            tensor = _constant_tensor(node)
            if tensor is None:
                changes.append(f"kept Constant '{node.name}': sparse_value is not folded")
                continue
            add_initializer(model, tensor.name, tensor)
            remove_nodes(graph, [node])
            converted += 1

        info, error = infer_tensor_info(model)
        if error:
            changes.append(error)
        initializers = {i.name: i for i in graph.initializer}
        values: dict[str, np.ndarray] = {}

        def value(name: str) -> np.ndarray:
            if name not in values:
                values[name] = numpy_helper.to_array(initializers[name])
            return values[name]

        folded: Counter = Counter()
        failures: list[str] = []
        new_nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            results = self._fold(node, initializers, value, info, model, failures)
            if results is None:
                new_nodes.append(node)
                continue
            folded[node.op_type] += 1
            live_outputs = [o for o in node.output if o]
            for name, array in zip(node.output, results):
                if not name:
                    continue
                if name in outputs:
                    tensor = numpy_helper.from_array(array, name)
                    const_name = node.name if len(live_outputs) == 1 else f"{node.name}_{name}"
                    new_nodes.append(helper.make_node("Constant", [], [name], name=const_name, value=tensor))
                else:
                    initializers[name] = add_initializer(model, name, array)
                    values[name] = array
        del graph.node[:]
        graph.node.extend(new_nodes)

        if converted:
            changes.insert(0, f"converted {converted} Constant nodes to initializers")
        if folded:
            total = sum(folded.values())
            detail = ", ".join(f"{n} {op}" for op, n in sorted(folded.items()))
            changes.append(f"folded {total} nodes ({detail})")
        return PassResult(model, bool(converted or folded), changes + failures)

    def _fold(self, node, initializers, value, info, model, failures) -> list[np.ndarray] | None:
        """The folded outputs of ``node``, or None when it does not fold."""
        op = node.op_type
        if op == "Constant" or op in NEVER_FOLD or node.domain not in ("", "ai.onnx") or subgraphs(node):
            return None
        if op in ("Shape", "Size") and node.input[0] not in initializers:
            known = info.get(node.input[0])
            if known is None or not known.static:
                return None
            if op == "Size":
                return [np.array(int(np.prod(known.shape, dtype=np.int64)), dtype=np.int64)]
            start, end = get_attr(node, "start", 0), get_attr(node, "end")
            return [np.array(known.shape[start:end], dtype=np.int64)]
        used = [i for i in node.input if i]
        if not used or any(i not in initializers for i in used):
            return None
        if op == "ConstantOfShape":  # refuse before materializing a huge tensor
            size = int(np.prod(value(used[0]), dtype=np.int64))
            if size > self.max_growth_elements:
                failures.append(f"not folded {op} '{node.name}': would add {size} elements "
                                f"(limit {self.max_growth_elements})")
                return None
        try:
            feeds = {i: value(i) for i in used}
            results = evaluate_node(node, feeds, model)
        except Exception as exc:  # noqa: BLE001 (reported, not hidden: the node stays as it was)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failures.append(f"could not fold {op} '{node.name}': {reason[:200]}")
            return None
        grown = sum(r.size for r in results if r is not None) - sum(v.size for v in feeds.values())
        if grown > self.max_growth_elements:
            failures.append(f"not folded {op} '{node.name}': would add {grown} elements "
                            f"(limit {self.max_growth_elements})")
            return None
        for k, (name, array) in enumerate(zip(node.output, results)):
            declared = info.get(name)
            if array is None or declared is None or not declared.elem_type:
                continue
            want = helper.tensor_dtype_to_np_dtype(declared.elem_type)
            if array.dtype != want and array.dtype != object:
                results[k] = array.astype(want)
        return results
