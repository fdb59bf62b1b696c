"""QDQ import: read a pre-quantized model's QuantizeLinear/DequantizeLinear nodes, remove them, and
keep their scales as annotations (the reverse of insert_qdq).

Recognized structure (what PyTorch and onnxruntime's ``quantize_static`` export):
    activation:  X -> QuantizeLinear -> Xq -> DequantizeLinear -> Xdq -> consumers
    weight:      int8 initializer -> DequantizeLinear, or float initializer -> QuantizeLinear -> DequantizeLinear
    bias:        int32 initializer -> DequantizeLinear, or a plain float initializer
After the pass, consumers of Xdq read X (a graph output keeps its name: X is renamed to it), and a
dequantized constant becomes a float32 initializer holding exactly what DequantizeLinear computes,
``float32(q - zp) * float32(scale)`` (for a float weight behind a Q, q is first QuantizeLinear's
``saturate(round_half_even(w / s) + zp)``), so re-quantizing it with the same scale gives back q.

The annotations live in ``model.metadata_props`` under ``ANNOTATION_KEY`` as JSON: tensor ->
{scale, zero_point, dtype, axis, role, q_output, q_input, node}; ``q_output`` / ``q_input`` name
the integer tensor and the float tensor that the QuantizeLinear reads in the source model, so a
checker can compare layer by layer with onnxruntime running that same QDQ model. Scales are stored
as float32 values written exactly (JSON doubles hold every float32).

``KeepQDQBoundaries`` runs after activation fusion: a Relu/Clip fused into its producer is split
off again when the QDQ model quantized the producer's output with an encoding other than the
activation's, because Q2(relu(DQ1(Q1(v)))) is not Q2(relu(v)) then (two roundings). With equal
encodings the fused form is exact: Q(relu(DQ(Q(v)))) = max(Q(v), zp) = Q(relu(v)).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from .activation_fusion import FUSED_ACTIVATION, FUSED_INTO, fused_groups
from .base import GraphPass, PassResult
from .graph import (
    GraphIndex,
    del_meta,
    drop_stale_value_info,
    drop_unused_initializers,
    get_attr,
    remove_nodes,
    rename_output,
    replace_input_uses,
)
from .qparams import DTYPE_RANGES

ANNOTATION_KEY = "qlower.qdq_import"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

_ONNX_TO_DTYPE = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
                  onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16",
                  onnx.TensorProto.INT32: "int32"}

# Where the per-channel axis of a weight (input 1) or bias (input 2) must be, per consumer op.
_BIAS_AXIS = 0


def has_qdq(model: onnx.ModelProto) -> bool:
    """True when the main graph holds a QuantizeLinear or DequantizeLinear node."""
    return any(n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node)


def read_annotations(model: onnx.ModelProto) -> dict[str, dict]:
    """The imported quantization parameters kept by ``ImportQDQ`` (empty if there are none)."""
    for entry in model.metadata_props:
        if entry.key == ANNOTATION_KEY:
            return json.loads(entry.value)
    return {}


def write_annotations(model: onnx.ModelProto, annotations: dict[str, dict]) -> None:
    for i, entry in enumerate(model.metadata_props):
        if entry.key == ANNOTATION_KEY:
            del model.metadata_props[i]
            break
    model.metadata_props.add(key=ANNOTATION_KEY, value=json.dumps(annotations))


def expected_weight_axis(node: onnx.NodeProto, input_index: int, rank: int) -> int | None:
    """The axis that indexes output channels of a weight (input 1) or bias (input 2) of ``node``:
    Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last; None for other ops."""
    if input_index == 2 and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return _BIAS_AXIS
    if input_index != 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return None


class _Params:
    """Scale, zero point, dtype and axis read from one Q or DQ node (validated)."""

    def __init__(self, node: onnx.NodeProto, index: GraphIndex, fail, data_dtype: str | None = None):
        self.node = node
        if len(node.input) < 2 or not index.is_constant(node.input[1]):
            raise fail("the scale is not a constant (only static QDQ is imported)", node)
        scale = np.asarray(index.constant(node.input[1]))
        if scale.dtype != np.float32:
            raise fail(f"scale '{node.input[1]}' is {scale.dtype}; only float32 scales are imported", node)
        if get_attr(node, "block_size", 0):
            raise fail("blocked quantization (block_size) is not supported", node)
        has_zp = len(node.input) > 2 and bool(node.input[2])
        if has_zp:
            if not index.is_constant(node.input[2]):
                raise fail("the zero point is not a constant", node)
            zp_tensor = index.initializers.get(node.input[2])
            zp = np.asarray(index.constant(node.input[2]))
            dtype = _ONNX_TO_DTYPE.get(zp_tensor.data_type) if zp_tensor is not None else str(zp.dtype)
            if dtype not in DTYPE_RANGES or dtype == "int64":
                raise fail(f"zero point '{node.input[2]}' has type {dtype}; only int8/uint8/int16/uint16/int32 "
                           "are imported", node)
            raw = _stored_integers(zp_tensor) if zp_tensor is not None else zp.astype(np.int64)
            lo, hi = DTYPE_RANGES[dtype]
            if np.any(raw < lo) or np.any(raw > hi):
                raise fail(f"zero point '{node.input[2]}' = {raw.reshape(-1)[:4].tolist()} is outside the "
                           f"{dtype} range [{lo}, {hi}]", node)
            zp = raw
        else:
            out_type = get_attr(node, "output_dtype", 0)
            dtype = data_dtype or _ONNX_TO_DTYPE.get(out_type, "uint8")
            zp = np.zeros(scale.shape, np.int64)
        if dtype not in ("int8", "uint8", "int16", "uint16", "int32"):
            raise fail(f"quantized type {dtype} is not supported", node)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise fail(f"scale '{node.input[1]}' must be finite and positive, got "
                       f"{scale.reshape(-1)[:4].tolist()}", node)
        if zp.size != scale.size and zp.size != 1:
            raise fail(f"zero point '{node.input[2]}' has {zp.size} entries but the scale has {scale.size}", node)
        self.scale = scale.astype(np.float32).reshape(-1)
        self.zero_point = np.broadcast_to(zp.astype(np.int64).reshape(-1), self.scale.shape).copy()
        self.dtype = dtype
        self.axis = int(get_attr(node, "axis", 1)) if self.scale.size > 1 else None

    def same_as(self, other: _Params) -> bool:
        return (self.dtype == other.dtype and self.axis == other.axis and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def describe(self) -> str:
        if self.scale.size == 1:
            return f"{self.dtype} scale={float(self.scale[0]):.9g} zp={int(self.zero_point[0])}"
        return f"{self.dtype} {self.scale.size} scales on axis {self.axis}"

    def annotation(self, role: str, **extra) -> dict:
        return {"scale": [float(s) for s in self.scale], "zero_point": [int(z) for z in self.zero_point],
                "dtype": self.dtype, "axis": self.axis, "role": role, "node": self.node.name, **extra}


def _stored_integers(tensor: onnx.TensorProto) -> np.ndarray:
    """Integer values as stored, before numpy casts them to the tensor's type (an int8 tensor keeps
    its values in int32_data, where 200 can be written and would silently wrap to -56)."""
    if not tensor.HasField("raw_data") and len(tensor.int32_data):
        return np.asarray(tensor.int32_data, dtype=np.int64)
    return numpy_helper.to_array(tensor).astype(np.int64)


def quantize_linear(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(float32(x) / float32(scale)) + zp)."""
    s, z = _broadcast(scale, zp, x.ndim, axis)
    q = np.rint(x.astype(np.float32) / s.astype(np.float32)).astype(np.float64) + z
    lo, hi = DTYPE_RANGES[dtype]
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize_linear(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX DequantizeLinear in float32, as onnxruntime computes it: float32(q - zp) * scale."""
    s, z = _broadcast(scale, zp, q.ndim, axis)
    return (q.astype(np.int64) - z).astype(np.float32) * s.astype(np.float32)


def _broadcast(scale, zp, ndim, axis):
    if scale.size == 1:
        return scale.reshape(()), zp.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape), zp.reshape(shape)


class ImportQDQ(GraphPass):
    """Remove every Q/DQ node, keeping the scales as annotations (see the module docstring)."""

    name = "import_qdq"

    def requires(self, model):
        nested = [n.name for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                  and any(m.op_type in QDQ_OPS for m in a.g.node)]
        if nested:
            raise self.fail(f"QDQ inside subgraphs (If/Loop) is not imported: {nested[:4]}")

    def ensures(self, model):
        left = [n for n in model.graph.node if n.op_type in QDQ_OPS]
        if left:
            raise self.fail("a QuantizeLinear/DequantizeLinear node survived the import", left[0])

    def apply(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        annotations: dict[str, dict] = dict(read_annotations(model))
        candidates = set()
        changes = []
        index = GraphIndex(graph)
        doomed: list[onnx.NodeProto] = []
        n_const = n_act = 0

        # 1. Constants: [float -> Q ->] DQ becomes one float32 initializer.
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
            src = dq.input[0]
            q_node = index.producer.get(src)
            from_float = q_node is not None and q_node.op_type == "QuantizeLinear" and index.is_constant(q_node.input[0])
            if not (index.is_constant(src) or from_float):
                continue
            if from_float:
                qp = _Params(q_node, index, self.fail)
                dqp = _Params(dq, index, self.fail, qp.dtype)
                self._check_pair(q_node, qp, dq, dqp, q_node.input[0])
                w = np.asarray(index.constant(q_node.input[0]))
                if w.dtype != np.float32:
                    raise self.fail(f"weight '{q_node.input[0]}' is {w.dtype}, expected float32", q_node)
                self._check_axis(qp, w.shape, q_node, q_node.input[0])
                role = self._constant_role(dq.output[0], index, dq, qp, w.ndim)
                self._check_axis_length(qp, w.shape, q_node, q_node.input[0])
                q = quantize_linear(w, qp.scale, qp.zero_point, qp.dtype, qp.axis)
                readers = [r for r in index.consumers.get(q_node.output[0], []) if r is not dq]
                if readers or q_node.output[0] in index.graph_outputs:
                    raise self.fail(f"quantized weight '{q_node.output[0]}' is read by nodes other than its "
                                    "DequantizeLinear", q_node)
                doomed.append(q_node)
                candidates.update(q_node.input)
            else:
                stored = index.initializers.get(src)
                data_dtype = _ONNX_TO_DTYPE.get(stored.data_type) if stored is not None else None
                dqp = _Params(dq, index, self.fail, data_dtype)
                q = np.asarray(index.constant(src)).astype(np.int64)
                qp = dqp
                self._check_axis(qp, q.shape, dq, src)
                role = self._constant_role(dq.output[0], index, dq, qp, q.ndim)
                self._check_axis_length(qp, q.shape, dq, src)
            values = dequantize_linear(q, dqp.scale, dqp.zero_point, dqp.axis)
            name = dq.output[0]
            annotations[name] = qp.annotation(role)
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
            doomed.append(dq)
            candidates.update(dq.input)
            n_const += 1
        remove_nodes(graph, doomed)
        drop_unused_initializers(model, candidates)
        index = GraphIndex(graph)

        # 2. Activations: X -> Q -> DQ(s) -> consumers becomes X -> consumers.
        seen: dict[str, _Params] = {}
        doomed = []
        for q_node in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
            qp = _Params(q_node, index, self.fail)
            x = q_node.input[0]
            if qp.scale.size > 1:
                raise self.fail(f"activation '{x}' is quantized per channel (axis {qp.axis}); only "
                                "per-tensor activation scales are supported", q_node)
            readers = index.consumers.get(q_node.output[0], [])
            dqs = [r for r in readers if r.op_type == "DequantizeLinear" and r.input[0] == q_node.output[0]]
            if not dqs or len(dqs) != len(readers) or q_node.output[0] in index.graph_outputs:
                others = [f"'{r.name}' ({r.op_type})" for r in readers if r not in dqs]
                what = ("is a graph output" if q_node.output[0] in index.graph_outputs
                        else f"is read by {', '.join(others)}" if others else "is read by nothing")
                raise self.fail(f"QuantizeLinear without its DequantizeLinear: its integer output "
                                f"'{q_node.output[0]}' {what}; only Q -> DQ pairs are imported", q_node)
            if x in seen and not seen[x].same_as(qp):
                raise self.fail(f"tensor '{x}' is quantized twice with different parameters: "
                                f"'{seen[x].node.name}' uses {seen[x].describe()}, this node {qp.describe()}",
                                q_node)
            seen[x] = qp
            key = x
            consumer_scales: dict[str, float] = {}
            for dq in dqs:
                dqp = _Params(dq, index, self.fail, qp.dtype)
                if not qp.same_as(dqp):
                    consumer_scales.update(self._consumer_scales(q_node, qp, dq, dqp, x, index))
                if dq.output[0] in index.graph_outputs:
                    producer = index.producer.get(key)
                    if producer is None or key != x:
                        raise self.fail(f"tensor '{x}' reaches graph output '{dq.output[0]}' through a "
                                        "DequantizeLinear, and cannot be renamed to it", dq)
                    rename_output(graph, producer, key, dq.output[0])
                    key = dq.output[0]
                else:
                    replace_input_uses(graph, dq.output[0], key)
                doomed.append(dq)
            if key != x:
                replace_input_uses(graph, x, key)  # other Qs and readers of x follow the rename
                if x in seen:
                    seen[key] = seen.pop(x)
            annotations[key] = qp.annotation("activation", q_output=q_node.output[0], q_input=x)
            if consumer_scales:
                annotations[key]["consumer_scales"] = consumer_scales
            doomed.append(q_node)
            candidates.update(q_node.input[1:])
            n_act += 1
        remove_nodes(graph, doomed)
        # A DQ left over reads a non-constant integer tensor that no Q made (an integer graph input).
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
            raise self.fail(f"DequantizeLinear of '{dq.input[0]}', which is neither a constant nor a "
                            "QuantizeLinear output (integer model inputs are not supported)", dq)
        drop_unused_initializers(model, candidates)
        drop_stale_value_info(graph)
        write_annotations(model, annotations)
        changes.append(f"imported {n_act} activation Q/DQ pairs and {n_const} quantized constants")
        return PassResult(model, bool(n_act or n_const), changes)

    def _check_pair(self, q_node, qp: _Params, dq, dqp: _Params, tensor: str) -> None:
        if not qp.same_as(dqp):
            raise self.fail(f"tensor '{tensor}': producer-side QuantizeLinear '{q_node.name}' ({qp.describe()}) "
                            f"and consumer-side DequantizeLinear '{dq.name}' ({dqp.describe()}) disagree", dq)

    def _consumer_scales(self, q_node, qp: _Params, dq, dqp: _Params, tensor: str,
                         index: GraphIndex) -> dict[str, float]:
        """A DequantizeLinear that reads the integers at another scale (same type and zero point):
        reader node name -> that scale. The compiler decides whether the reader can take it (an Add,
        Concat or pooling requantizes each input with its own multiplier); any other disagreement
        (type, zero point, per-channel) is an error here."""
        if dqp.dtype != qp.dtype or dqp.axis is not None or not np.array_equal(dqp.zero_point, qp.zero_point):
            self._check_pair(q_node, qp, dq, dqp, tensor)
        readers = index.consumers.get(dq.output[0], [])
        unnamed = [r.op_type for r in readers if not r.name]
        if unnamed or dq.output[0] in index.graph_outputs:
            self._check_pair(q_node, qp, dq, dqp, tensor)
        return {r.name: float(dqp.scale[0]) for r in readers}

    def _check_axis(self, qp: _Params, shape: tuple[int, ...], node, tensor: str) -> None:
        if qp.axis is None:
            return
        rank = len(shape)
        if not -rank <= qp.axis < rank:
            raise self.fail(f"tensor '{tensor}': QDQ axis {qp.axis} is out of range for rank {rank}", node)
        qp.axis %= rank

    def _check_axis_length(self, qp: _Params, shape: tuple[int, ...], node, tensor: str) -> None:
        if qp.axis is not None and shape[qp.axis] != qp.scale.size:
            raise self.fail(f"tensor '{tensor}': {qp.scale.size} scales on axis {qp.axis}, whose length is "
                            f"{shape[qp.axis]}", node)

    def _constant_role(self, name: str, index: GraphIndex, dq, qp: _Params, rank: int) -> str:
        """'weight' or 'bias' (by the reader's input slot), checking a per-channel axis against the op."""
        role = "constant"
        for reader in index.consumers.get(name, []):
            for slot, inp in enumerate(reader.input):
                if inp != name:
                    continue
                role = {1: "weight", 2: "bias"}.get(slot, role) if reader.op_type in (
                    "Conv", "ConvTranspose", "Gemm", "MatMul") else role
                if qp.axis is None:
                    continue
                want = expected_weight_axis(reader, slot, rank)
                if want is None or qp.axis != want:
                    what = (f"needs axis {want}" if want is not None
                            else "does not take a per-channel tensor in this input")
                    raise self.fail(f"tensor '{name}' is quantized per channel on axis {qp.axis}, but input {slot} "
                                    f"of node '{reader.name}' ({reader.op_type}) {what}", dq)
        return role


class KeepQDQBoundaries(GraphPass):
    """Undo an activation fusion that would drop a rounding the QDQ model performs (see module
    docstring); runs after FuseActivations on an imported model."""

    name = "keep_qdq_boundaries"

    def apply(self, model: onnx.ModelProto) -> PassResult:
        annotations = read_annotations(model)
        if not annotations:
            return PassResult(model, False)
        changes = []
        by_name = {n.name: n for n in model.graph.node}
        for producer_name, act in fused_groups(model).items():
            inner, outer = annotations.get(act.input[0]), annotations.get(act.output[0])
            if inner is None:
                continue
            same = outer is not None and all(inner[k] == outer[k] for k in ("scale", "zero_point", "dtype", "axis"))
            if same:
                continue
            del_meta(by_name[producer_name], FUSED_ACTIVATION)
            del_meta(act, FUSED_INTO)
            changes.append(f"kept '{act.name}' ({act.op_type}) apart from '{producer_name}': the QDQ model "
                           f"quantizes '{act.input[0]}' between them")
        return PassResult(model, bool(changes), changes)
