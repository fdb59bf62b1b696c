"""Cleanup passes: name every node, drop Identity/Dropout, remove what nothing reads.

Later passes and every error message refer to nodes by name, so ``NameNodes`` runs first.
"""
from __future__ import annotations

from collections import Counter

import onnx

from .base import GraphPass, PassResult
from .graph import (
    GraphIndex,
    drop_stale_value_info,
    node_reads,
    remove_initializers,
    remove_nodes,
    rename_output,
    replace_input_uses,
    subgraphs,
    unique_name,
)


def _all_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from _all_nodes(g)


def _count(ops: Counter) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))


class NameNodes(GraphPass):
    """Give every unnamed node the name ``<op_type>_<n>`` and make duplicate names unique
    (``name_1``, ``name_2``, ...; the first node keeps the name). Subgraph nodes included: node
    names are unique across the whole model."""

    name = "name_nodes"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        nodes = list(_all_nodes(model.graph))
        taken = {n.name for n in nodes if n.name}
        seen: set[str] = set()
        counters: Counter = Counter()
        unnamed = duplicates = 0
        for node in nodes:
            if not node.name:
                while True:
                    candidate = f"{node.op_type}_{counters[node.op_type]}"
                    counters[node.op_type] += 1
                    if candidate not in taken:
                        break
                taken.add(candidate)
                node.name = candidate
                unnamed += 1
            elif node.name in seen:
                node.name = unique_name(taken, node.name)
                duplicates += 1
            seen.add(node.name)
        changes = []
        if unnamed:
            changes.append(f"named {unnamed} unnamed nodes")
        if duplicates:
            changes.append(f"renamed {duplicates} duplicate node names")
        return PassResult(model, bool(changes), changes)

    def ensures(self, model: onnx.ModelProto) -> None:
        names = [n.name for n in _all_nodes(model.graph)]
        if not all(names):
            raise self.fail("a node is still unnamed")
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise self.fail(f"duplicate node names remain: {dup[:5]}")


class RemoveIdentity(GraphPass):
    """Drop Identity and (inference) Dropout of the main graph: readers of output 0 (also inside
    subgraphs) read the input instead.

    When output 0 is a graph output, the graph output keeps its name and the producer of the input
    is rewired to produce it. An Identity (or Dropout) whose input has no producer node (a graph
    input or an initializer) or is itself a graph output is kept: removing it would need a graph
    input or output to be renamed. A Dropout whose mask output is read, or that runs in training
    mode, is an error.
    """

    name = "remove_identity"
    OPS = ("Identity", "Dropout")

    def _check_dropout(self, node: onnx.NodeProto, index: GraphIndex) -> None:
        if len(node.output) > 1 and node.output[1] and index.uses(node.output[1]):
            raise self.fail(f"the mask output '{node.output[1]}' is read; a Dropout with a used mask "
                            "cannot be removed for inference", node)
        if len(node.input) > 2 and node.input[2]:
            mode = index.constant(node.input[2])
            if mode is None:
                raise self.fail(f"training_mode '{node.input[2]}' is not a constant", node)
            if bool(mode):
                raise self.fail("training_mode is true; only inference Dropout can be removed", node)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        removed: Counter = Counter()
        kept: list[str] = []
        for node in [n for n in graph.node if n.op_type in self.OPS]:
            index = GraphIndex(graph)
            if node.op_type == "Dropout":
                self._check_dropout(node, index)
            src, dst = node.input[0], node.output[0]
            if dst not in index.graph_outputs:
                replace_input_uses(graph, dst, src)
            else:
                producer = index.producer.get(src)
                if producer is None or src in index.graph_outputs:
                    why = "a graph output" if src in index.graph_outputs else "a graph input or initializer"
                    kept.append(f"kept {node.op_type} '{node.name}': its input '{src}' is {why} and "
                                f"its output '{dst}' a graph output")
                    continue
                rename_output(graph, producer, src, dst)
            remove_nodes(graph, [node])
            removed[node.op_type] += 1
        changes = [f"removed {_count(removed)}"] if removed else []
        return PassResult(model, bool(removed), changes + kept)

    def ensures(self, model: onnx.ModelProto) -> None:
        outputs = {o.name for o in model.graph.output}
        for node in model.graph.node:
            if node.op_type in self.OPS and node.output[0] not in outputs:
                raise self.fail("left in the graph although its output is not a graph output", node)


class RemoveDeadCode(GraphPass):
    """Remove nodes none of whose outputs is read (directly, from a subgraph, or as a graph
    output), initializers nothing reads (also their graph-input entries, as old models list
    weights among the inputs) and value_info of tensors that no longer exist. Real graph inputs
    stay: they are the model's interface."""

    name = "remove_dead_code"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        producer = {o: n for n in graph.node for o in n.output if o}
        live: set[str] = {o.name for o in graph.output}
        live_nodes: set[int] = set()
        work = list(live)
        while work:
            name = work.pop()
            node = producer.get(name)
            if node is None or id(node) in live_nodes:
                continue
            live_nodes.add(id(node))
            for read in node_reads(node):
                if read not in live:
                    live.add(read)
                    work.append(read)
        dead = [n for n in graph.node if id(n) not in live_nodes]
        remove_nodes(graph, dead)

        inits = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
        unused = {name for name in inits if name not in live}
        remove_initializers(model, unused)

        stale = drop_stale_value_info(graph)

        changes = []
        if dead:
            changes.append(f"removed {len(dead)} dead nodes ({_count(Counter(n.op_type for n in dead))})")
        if unused:
            changes.append(f"removed {len(unused)} unused initializers")
        if stale:
            changes.append(f"dropped {stale} stale value_info")
        return PassResult(model, bool(changes), changes)

    def ensures(self, model: onnx.ModelProto) -> None:
        index = GraphIndex(model.graph)
        for node in model.graph.node:
            if not any(o and index.uses(o) for o in node.output):
                raise self.fail("no output of this node is read", node)

