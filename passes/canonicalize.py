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


class FoldPadIntoConv(GraphPass):
    """Pad(constant 0 on the spatial dims) -> Conv becomes Conv with the pads added to its own.

    Exporters emit this for TF-style "SAME" padding before strided convs. The integer conv pads
    with the input's zero point, which is the real value 0 the Pad writes, so the fold is exact in
    the integer program as well as in float.
    """

    name = "fold_pad_into_conv"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        index = GraphIndex(graph)
        folded, skipped = [], []
        for pad in [n for n in graph.node if n.op_type == "Pad"]:
            reason = self._check(pad, index)
            if reason:
                skipped.append(f"Pad '{pad.name}' not folded: {reason}")
                continue
            spatial = self._spatial_pads(pad, index)
            for conv in index.consumers[pad.output[0]]:
                pads = list(get_attr(conv, "pads", [0, 0, 0, 0]))
                set_attr(conv, "pads", [a + b for a, b in zip(pads, spatial)])
                conv.input[0] = pad.input[0]
            graph.node.remove(pad)
            folded.append(pad.name)
        changes = [f"folded {len(folded)} Pad into Conv"] if folded else []
        return PassResult(model, bool(folded), changes + skipped)

    @staticmethod
    def _pads_and_value(pad: onnx.NodeProto, index: GraphIndex):
        if len(pad.input) > 1 and pad.input[1]:
            pads = index.constant(pad.input[1])
            value = index.constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
            axes = index.constant(pad.input[3]) if len(pad.input) > 3 and pad.input[3] else None
            return pads, value, axes
        return np.array(get_attr(pad, "pads", [])), np.array(get_attr(pad, "value", 0.0)), None

    def _check(self, pad: onnx.NodeProto, index: GraphIndex) -> str | None:
        mode = get_attr(pad, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return "mode is not constant"
        pads, value, axes = self._pads_and_value(pad, index)
        if pads is None or value is None or (len(pad.input) > 3 and pad.input[3] and axes is None):
            return "pads, value or axes are not constants"
        if axes is not None:
            return "Pad with axes is not folded"
        if pads.size != 8 or np.any(pads < 0):
            return "only non-negative pads of a 4-D tensor fold"
        if np.any(pads[[0, 1, 4, 5]] != 0):
            return "pads on the batch or channel axis"
        if np.any(np.asarray(value) != 0):
            return "pad value is not 0"
        readers = index.consumers.get(pad.output[0], [])
        if pad.output[0] in index.graph_outputs or not readers:
            return "output is a graph output or unread"
        for conv in readers:
            auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if conv.op_type != "Conv" or list(conv.input).index(pad.output[0]) != 0 or auto_pad not in ("NOTSET", ""):
                return f"read by '{conv.name}' ({conv.op_type}), not only by Conv inputs with explicit pads"
        return None

    def _spatial_pads(self, pad: onnx.NodeProto, index: GraphIndex) -> list[int]:
        pads, _, _ = self._pads_and_value(pad, index)
        return [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]
