"""Canonical forms the lowering relies on.

``NormalizeGemm``: Gemm(A, B, C; alpha, beta) with constant B and C becomes
Gemm(A, alpha * B, beta * C; alpha = beta = 1) with C as a 1-D vector of the output features
(a scalar or [1, N] C is broadcast to [N]), so the weight and bias each have one quantization
along the output-feature axis.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .base import GraphPass, PassResult
from .graph import GraphIndex, all_names, get_attr, set_attr, unique_name


class NormalizeGemm(GraphPass):
    name = "normalize_gemm"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        index = GraphIndex(graph)
        taken = all_names(graph)
        changed = []
        for node in graph.node:
            if node.op_type != "Gemm" or not index.is_constant(node.input[1]):
                continue
            alpha = float(get_attr(node, "alpha", 1.0))
            beta = float(get_attr(node, "beta", 1.0))
            has_c = len(node.input) > 2 and bool(node.input[2])
            if has_c and not index.is_constant(node.input[2]):
                continue
            w = index.constant(node.input[1])
            n_out = w.shape[0] if get_attr(node, "transB", 0) else w.shape[1]
            c = index.constant(node.input[2]) if has_c else None
            c_is_vector = c is None or c.shape == (n_out,)
            if alpha == 1.0 and beta == 1.0 and c_is_vector:
                continue
            if c is not None and c.size not in (1, n_out):
                raise self.fail(f"bias C of shape {list(c.shape)} varies along the batch axis", node)
            if alpha != 1.0:
                node.input[1] = self._add_constant(graph, taken, f"{node.name}_B", (alpha * w.astype(np.float64)).astype(w.dtype))
            if c is not None:
                vector = np.broadcast_to(beta * c.astype(np.float64).reshape(-1), (n_out,)).astype(c.dtype)
                node.input[2] = self._add_constant(graph, taken, f"{node.name}_C", vector)
            set_attr(node, "alpha", 1.0)
            set_attr(node, "beta", 1.0)
            changed.append(node.name)
        return PassResult(model, bool(changed), [f"normalized Gemm {', '.join(changed)}"] if changed else [])

    @staticmethod
    def _add_constant(graph: onnx.GraphProto, taken: set[str], base: str, value: np.ndarray) -> str:
        name = unique_name(taken, base)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name
