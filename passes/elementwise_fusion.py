"""Elementwise-chain fusion: mark a subgraph of elementwise ops of ONE tensor as one lookup table.

Swish/SiLU (x * Sigmoid(x)), GELU (the Erf form x * 0.5 * (1 + Erf(x / sqrt 2)) and the Tanh
form 0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))), HardSwish written out as
x * Clip(x + 3, 0, 6) / 6, Mish, ... are each a function y = f(x) of a single tensor x spread over
several nodes. On an 8-bit (or 16-bit) x, the whole of f is one table y_q = T[x_q]; computing it
from the nodes themselves needs no pattern per exporter. The rule: a *chain* is a set of nodes
with

- every node an elementwise op of ``CHAIN_OPS`` whose constant inputs are scalars (size 1);
- exactly one non-constant tensor x read from outside the set (the *source*);
- exactly one tensor read outside the set or a graph output: the last node's output y;
- at least two nodes (a single op is its own layer anyway);
- no node annotated by activation fusion, and no Relu/Clip that reads a Conv/ConvTranspose/Gemm/
  MatMul output (that pair is a fused clamp, which is cheaper than a table).

Chains are grown backwards from each candidate last node, latest first, so each is maximal.
Like activation fusion, this pass *annotates*: the first node of the chain in graph order (the
*head*, which reads x) gets ``qlower.lut_chain_end = <last node>``, the others
``qlower.lut_chain_head = <head>``. The graph stays runnable by onnxruntime; the layer plan
reads the chain as one group (head + last node as its ``activation``), QDQ insertion puts a Q/DQ
pair on x and y only, so the QDQ model computes Q(f(DQ(x))) — exactly what the table holds.
Annotations are recomputed on every run, so the pass can follow any other pass.
"""
from __future__ import annotations

import onnx

from .base import GraphPass, PassResult
from .graph import GraphIndex, del_meta, get_meta, set_meta

LUT_CHAIN_END = "lut_chain_end"
LUT_CHAIN_HEAD = "lut_chain_head"

# activation-fusion annotations (passes/activation_fusion.py; not imported: it imports this module)
_FUSION_KEYS = ("fused_activation", "fused_into")

CHAIN_OPS = frozenset({
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Exp", "Log", "Sqrt",
    "Reciprocal", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Relu", "LeakyRelu",
    "ThresholdedRelu", "Clip", "PRelu", "Add", "Sub", "Mul", "Div", "Pow",
})
WEIGHTED_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def chain_end_of(node: onnx.NodeProto) -> str | None:
    """Name of the last node of the chain ``node`` heads, or None."""
    return get_meta(node, LUT_CHAIN_END)


def is_chain_member(node: onnx.NodeProto) -> bool:
    """True for a node of a chain other than its head (it belongs to the head's layer)."""
    return get_meta(node, LUT_CHAIN_HEAD) is not None


def in_chain(node: onnx.NodeProto) -> bool:
    return chain_end_of(node) is not None or is_chain_member(node)


def chain_nodes(graph: onnx.GraphProto, head: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The head and every member of its chain, in graph order."""
    return [n for n in graph.node if n is head or get_meta(n, LUT_CHAIN_HEAD) == head.name]


def _eligible(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in CHAIN_OPS or len(node.output) != 1:
        return False
    if any(get_meta(node, key) is not None for key in _FUSION_KEYS):
        return False
    for name in node.input:
        if name and index.is_constant(name):
            value = index.constant(name)
            if value is None or value.size != 1:
                return False
    if node.op_type in ("Relu", "Clip"):
        producer = index.producer.get(node.input[0])
        if producer is not None and producer.op_type in WEIGHTED_PRODUCERS:
            return False
    return True


def _variable_inputs(node: onnx.NodeProto, index: GraphIndex) -> list[str]:
    return [i for i in node.input if i and not index.is_constant(i)]


def grow_chain(last: onnx.NodeProto, index: GraphIndex, taken: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The largest set of eligible nodes ending at ``last`` whose inner tensors are read only inside
    it, and the set's sources (non-constant tensors it reads from outside)."""
    chain = {last.name: last}
    changed = True
    while changed:
        changed = False
        produced = {o for n in chain.values() for o in n.output}
        sources = {t for n in chain.values() for t in _variable_inputs(n, index) if t not in produced}
        for t in sorted(sources):
            producer = index.producer.get(t)
            if (producer is None or producer.name in taken or producer.name in chain
                    or t in index.graph_outputs or not _eligible(producer, index)):
                continue
            if all(c.name in chain for c in index.consumers.get(t, [])):
                chain[producer.name] = producer
                changed = True
    produced = {o for n in chain.values() for o in n.output}
    sources = {t for n in chain.values() for t in _variable_inputs(n, index) if t not in produced}
    return list(chain.values()), sources


class FuseElementwiseChains(GraphPass):
    """Annotate every maximal elementwise chain of one tensor (see the module docstring)."""

    name = "fuse_elementwise_chains"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        index = GraphIndex(graph)
        before = {(n.name, k, get_meta(n, k)) for n in graph.node for k in (LUT_CHAIN_END, LUT_CHAIN_HEAD)
                  if get_meta(n, k) is not None}
        for node in graph.node:
            del_meta(node, LUT_CHAIN_END)
            del_meta(node, LUT_CHAIN_HEAD)
        order = {n.name: i for i, n in enumerate(graph.node)}
        taken: set[str] = set()
        found = []
        for last in reversed(list(graph.node)):
            if last.name in taken or not last.name or not _eligible(last, index):
                continue
            nodes, sources = grow_chain(last, index, taken)
            if len(nodes) < 2 or len(sources) != 1:
                continue
            nodes.sort(key=lambda n: order[n.name])
            head = nodes[0]
            set_meta(head, LUT_CHAIN_END, last.name)
            for member in nodes[1:]:
                set_meta(member, LUT_CHAIN_HEAD, head.name)
            taken.update(n.name for n in nodes)
            found.append(f"{'+'.join(n.op_type for n in nodes)} ending at '{last.name}'")
        after = {(n.name, k, get_meta(n, k)) for n in graph.node for k in (LUT_CHAIN_END, LUT_CHAIN_HEAD)
                 if get_meta(n, k) is not None}
        changes = [f"lookup-table chain {c}" for c in reversed(found)] if after != before else []
        return PassResult(model, after != before, changes)
