"""Checking the integer program against the QDQ model: "the runtime matches the QDQ model" (DESIGN.md): onnxruntime runs the
QDQ model with graph optimizations disabled and exposes every quantized tensor and the float value
each QuantizeLinear rounds; each IR layer is fed the QDQ model's integer inputs and its integer
output compared with the QDQ model's. A mismatch is excused only if it is one step and the value
QuantizeLinear rounded lies within TIE_TOLERANCE of a rounding tie (x.5 in units of the output
step) — where onnxruntime's round-half-even on a float32 value and the IR's round-half-up on an
exact integer may honestly differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from passes.insert_qdq import ONNX_DTYPES, prequant_name, quantized_name
from runtime.executor import run_layer

from .onnx_runner import make_session

# Distance from a tie (in output steps) within which a one-step mismatch is genuine: float32
# rounding of onnxruntime's sums (relative 2^-24 per operation, a few hundred terms) plus the
# IR's multiplier error (2^-31 relative), with margin.
TIE_TOLERANCE_ABS = 2e-3
TIE_TOLERANCE_REL = 1e-5


@dataclass
class LayerCheck:
    layer: str
    op: str
    elements: int
    mismatches: int
    unexcused: int
    worst_unexcused_tie_distance: float
    worst_excused_tie_distance: float

    @property
    def ok(self) -> bool:
        return self.unexcused == 0


def qdq_values(result, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every quantized tensor (integers) and every pre-quantization float of the QDQ model."""
    model = onnx.ModelProto()
    model.CopyFrom(result.qdq_model)
    existing = {o.name for o in model.graph.output}
    for tensor in result.plan.activation_tensors():
        qp = result.qparams[tensor]
        names = [(quantized_name(tensor), ONNX_DTYPES[qp.dtype])]
        if tensor not in result.plan.inputs:
            names.append((prequant_name(tensor), onnx.TensorProto.FLOAT))
        for name, elem in names:
            if name not in existing:
                model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    session = make_session(model, optimize=False)
    outs = [o.name for o in session.get_outputs()]
    return dict(zip(outs, session.run(outs, feeds)))


def tie_distance(prequant: np.ndarray, scale: float, zero_point: int) -> tuple[np.ndarray, np.ndarray]:
    """(|frac(v) - 0.5|, |v - zp|) for v = x / s + zp, the value QuantizeLinear rounds (in steps)."""
    v = prequant.astype(np.float64) / np.float64(np.float32(scale)) + zero_point
    return np.abs(v - np.floor(v) - 0.5), np.abs(v - zero_point)


def check_layers(result, feeds: dict[str, np.ndarray], kernels: str = "fast", program=None) -> list[LayerCheck]:
    """Per layer, fed the QDQ model's integers: how many outputs differ, and whether each is a tie."""
    program = program or result.program
    values = qdq_values(result, feeds)
    checks = []
    for layer in program.layers:
        inputs = [values[quantized_name(t)] for t in layer.inputs]
        (ours,) = run_layer(program, layer, inputs, kernels=kernels)
        out = layer.outputs[0]
        expected = values[quantized_name(out)]
        diff = ours.astype(np.int64) - expected.astype(np.int64)
        bad = diff != 0
        unexcused, worst, worst_excused = int(bad.sum()), 0.0, 0.0
        if bad.any():
            info = program.tensors[out]
            dist, magnitude = tie_distance(values[prequant_name(out)], info.scale[0], int(info.zero_point[0]))
            tolerance = TIE_TOLERANCE_ABS + TIE_TOLERANCE_REL * magnitude
            excused = bad & (np.abs(diff) == 1) & (dist <= tolerance)
            unexcused = int((bad & ~excused).sum())
            worst = float(dist[bad & ~excused].max()) if unexcused else 0.0
            worst_excused = float(dist[excused].max()) if excused.any() else 0.0
        checks.append(LayerCheck(layer.name, layer.op, int(diff.size), int(bad.sum()), unexcused, worst, worst_excused))
    return checks
