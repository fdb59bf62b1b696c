"""Canonical forms of what exporters emit (issue 4), one small pass each.

- ``SimplifyCasts``: a Cast to the type its input already has is removed; Cast(Cast(x, B), C)
  reads x directly when A -> B is exact (every A value is representable in B), since then
  C(B(x)) = C(x) value for value.
- ``MatMulAddToGemm``: MatMul(A, W) + C with A 2-D, W a 2-D constant [K, N] and C a constant
  broadcastable to [N] is Gemm(A, W, C) (y = A W + C, the same sums in the same order).
- ``SumToAdd``: Sum(a, b, c, ...) is the chain Add(Add(a, b), c) (float addition in the order ONNX
  Sum defines); Sum of one input is that input.
- ``PReluSlopePerChannel``: an opset<7 PRelu slope of shape [C] on an NCHW... input (C = dim 1)
  that does not broadcast numpy-style is reshaped to [C, 1, ..., 1], the per-channel meaning of
  the old unidirectional broadcast (the version converter leaves the slope as it was).

Constant nodes, Shape/Gather/Concat chains of static shapes, and all-constant subgraphs are folded
by passes.constant_folding.FoldConstants; Clip/Pad/BatchNormalization attribute forms of old opsets
are rewritten by the onnx version converter (the loader upgrades every model below opset 13), and
Upsample (which it turns into a Resize with the wrong coordinate mode) is fixed in the loader.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .base import GraphPass, PassResult
from .graph import (
    GraphIndex,
    add_initializer,
    all_names,
    get_attr,
    infer_tensor_info,
    remove_nodes,
    replace_all_uses,
    unique_name,
)

T = onnx.TensorProto
# A -> types that hold every value of A exactly.
EXACT_WIDENING = {
    T.BOOL: {T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT8: {T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.UINT8: {T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT16: {T.INT32, T.INT64, T.FLOAT, T.DOUBLE},
    T.UINT16: {T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT, T.DOUBLE},
    T.INT32: {T.INT64, T.DOUBLE},
    T.UINT32: {T.INT64, T.UINT64, T.DOUBLE},
    T.FLOAT16: {T.FLOAT, T.DOUBLE},
    T.BFLOAT16: {T.FLOAT, T.DOUBLE},
    T.FLOAT: {T.DOUBLE},
}


def _nodes_with_shapes(model: onnx.ModelProto, op_type: str):
    """(the graph's ``op_type`` nodes, inferred tensor info, a GraphIndex), or None when the graph
    has no such node, so that a pass with nothing to do skips the shape inference."""
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    if not nodes:
        return None
    info, _ = infer_tensor_info(model)
    return nodes, info, GraphIndex(model.graph)


class SimplifyCasts(GraphPass):
    name = "simplify_casts"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        found = _nodes_with_shapes(model, "Cast")
        if found is None:
            return PassResult(model, False, [])
        casts, info, index = found
        removed, bypassed = [], []
        for node in casts:
            src = info.get(node.input[0])
            to = int(get_attr(node, "to"))
            if src is not None and src.elem_type == to and node.output[0] not in index.graph_outputs:
                replace_all_uses(graph, node.output[0], node.input[0])
                removed.append(node)
                continue
            inner = index.producer.get(node.input[0])
            if inner is None or inner.op_type != "Cast" or inner in removed:
                continue
            origin = info.get(inner.input[0])
            if origin is not None and int(get_attr(inner, "to")) in EXACT_WIDENING.get(origin.elem_type, ()):
                node.input[0] = inner.input[0]
                bypassed.append(node.name)
        remove_nodes(graph, removed)
        changes = []
        if removed:
            changes.append(f"removed {len(removed)} Cast to the same type ({', '.join(n.name for n in removed)})")
        if bypassed:
            changes.append(f"Cast after an exact Cast reads the source directly: {', '.join(bypassed)}")
        return PassResult(model, bool(removed or bypassed), changes)


class MatMulAddToGemm(GraphPass):
    name = "matmul_add_to_gemm"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        found = _nodes_with_shapes(model, "MatMul")
        if found is None:
            return PassResult(model, False, [])
        matmuls, info, index = found
        taken = all_names(graph)
        fused, skipped, doomed = [], [], []
        for mm in matmuls:
            readers = index.consumers.get(mm.output[0], [])
            if len(readers) != 1 or readers[0].op_type != "Add" or mm.output[0] in index.graph_outputs:
                continue
            add = readers[0]
            bias_name = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            a_info, w = info.get(mm.input[0]), index.constant(mm.input[1])
            c = index.constant(bias_name)
            if c is None or w is None:
                continue
            if a_info is None or a_info.rank != 2 or w.ndim != 2:
                skipped.append(f"MatMul '{mm.name}' + Add not fused: input and weight must both be 2-D")
                continue
            n_out = w.shape[1]
            if c.size not in (1, n_out) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
                skipped.append(f"MatMul '{mm.name}' + Add not fused: bias shape {list(c.shape)} is not [N]")
                continue
            vector = np.broadcast_to(c.reshape(-1), (n_out,)).astype(c.dtype)
            c_name = unique_name(taken, f"{mm.name}_bias")
            add_initializer(model, c_name, vector)
            gemm = helper.make_node("Gemm", [mm.input[0], mm.input[1], c_name], [add.output[0]], name=mm.name)
            mm.CopyFrom(gemm)
            doomed.append(add)
            fused.append(mm.name)
        remove_nodes(graph, doomed)
        changes = [f"fused {len(fused)} MatMul+Add into Gemm ({', '.join(fused)})"] if fused else []
        return PassResult(model, bool(fused), changes + skipped)


class SumToAdd(GraphPass):
    name = "sum_to_add"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        taken = all_names(graph)
        new_nodes, rewritten = [], []
        identity = []
        for node in graph.node:
            inputs = [i for i in node.input if i]
            if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
                new_nodes.append(node)
                continue
            rewritten.append(node.name)
            if len(inputs) == 1:
                identity.append((node.output[0], inputs[0]))
                continue
            acc = inputs[0]
            for k, nxt in enumerate(inputs[1:], start=1):
                last = k == len(inputs) - 1
                out = node.output[0] if last else unique_name(taken, f"{node.name}_partial{k}")
                name = node.name if last else unique_name(taken, f"{node.name}_add{k}")
                new_nodes.append(helper.make_node("Add", [acc, nxt], [out], name=name))
                acc = out
        if not rewritten:
            return PassResult(model, False, [])
        del graph.node[:]
        graph.node.extend(new_nodes)
        for out, src in identity:
            if out in {o.name for o in graph.output}:
                graph.node.append(helper.make_node("Identity", [src], [out], name=f"{out}_identity"))
            else:
                replace_all_uses(graph, out, src)
        return PassResult(model, True, [f"rewrote {len(rewritten)} Sum as Add chains ({', '.join(rewritten[:8])})"])


class PReluSlopePerChannel(GraphPass):
    name = "prelu_slope_per_channel"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        found = _nodes_with_shapes(model, "PRelu")
        if found is None:
            return PassResult(model, False, [])
        prelus, info, index = found
        taken = all_names(graph)
        fixed = []
        for node in prelus:
            x, slope = info.get(node.input[0]), index.constant(node.input[1])
            if x is None or not x.static or slope is None or slope.ndim != 1 or len(x.shape) < 3:
                continue
            try:
                np.broadcast_shapes(x.shape, slope.shape)
                continue  # already a valid (numpy-broadcast) slope: leave its meaning alone
            except ValueError:
                pass
            if slope.size != x.shape[1]:
                continue
            name = unique_name(taken, f"{node.name}_slope")
            add_initializer(model, name, slope.reshape((-1,) + (1,) * (len(x.shape) - 2)))
            node.input[1] = name
            fixed.append(node.name)
        changes = [f"per-channel PRelu slope reshaped to [C, 1, ...]: {', '.join(fixed)}"] if fixed else []
        return PassResult(model, bool(fixed), changes)
