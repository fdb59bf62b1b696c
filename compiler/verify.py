"""Checking the integer program against the QDQ model: "the runtime matches the QDQ model" (DESIGN.md): onnxruntime runs the
QDQ model with graph optimizations disabled and exposes every quantized tensor and the float value
each QuantizeLinear rounds; each IR layer is fed the QDQ model's integer inputs and its integer
output compared with the QDQ model's. A mismatch is excused only if it is one step and the value
QuantizeLinear rounded lies within TIE_TOLERANCE of a rounding tie (x.5 in units of the output
step) — where onnxruntime's round-half-even on a float32 value and the IR's round-half-up on an
exact integer may honestly differ — or, for conv/gemm, within the bound on the float32 error of
onnxruntime's own sum (``qdq_accumulation_noise``; it matters for 16-bit operands).
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
# IR's multiplier error, with margin. The multiplier error is 2^-31 relative with a 31-bit m and
# float32 noise (<= 2^-22) with a short one, because scale selection nudges the weight scales (and
# gives layers without weights an effective input scale) so that the QDQ model describes m / 2^k
# itself; a short multiplier makes exact ties common, and each is still checked here.
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
    for tensor, dtype in result.plan.raw_tensors().items():  # exact int/bool outputs (ArgMax, Shape)
        if tensor not in existing:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            model.graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
    session = make_session(model, optimize=False)
    outs = [o.name for o in session.get_outputs()]
    return dict(zip(outs, session.run(outs, feeds)))


def tie_distance(prequant: np.ndarray, scale: float, zero_point: int) -> tuple[np.ndarray, np.ndarray]:
    """(|frac(v) - 0.5|, |v - zp|) for v = x / s + zp, the value QuantizeLinear rounds (in steps)."""
    v = prequant.astype(np.float64) / np.float64(np.float32(scale)) + zero_point
    return np.abs(v - np.floor(v) - 0.5), np.abs(v - zero_point)


def qdq_accumulation_noise(layer, inputs, program) -> np.ndarray:
    """Bound (in output steps) on the float32 error of the QDQ model's conv/gemm, per output.

    onnxruntime sums K products of dequantized values in float32; whatever the order, the error
    is at most (K + 2) * 2^-24 * sum|terms| (the standard gamma_K bound, plus the dequantize and
    scale roundings), i.e. in output steps (K + 2) 2^-24 (sum|w - zp_w||x - zp_x| + |bias|) M[o]
    with M = m / 2^k. When 16-bit operands cancel this exceeds the fixed tolerance, and a value
    within it of a tie is one whose side the QDQ model cannot decide: a genuine tie."""
    from runtime import kernels_reference as ref

    info = program.tensors[layer.inputs[0]]
    x = np.abs(inputs[0].astype(np.int64) - int(np.asarray(info.zero_point).ravel()[0]))
    w = layer.params["weight"].astype(np.int64)
    zp_w = np.asarray(layer.params.get("weight_zero_point", np.zeros(1)), np.int64)
    w = np.abs(w - zp_w.reshape(-1, *[1] * (w.ndim - 1)))
    bias = np.abs(np.asarray(layer.params.get("bias", np.zeros(1)), np.int64)).ravel()
    if layer.attrs.get("input_zero_point_folded"):
        bias = np.zeros(1, np.int64)  # the folded term cancels; the QDQ model adds q_b itself
    mult = layer.params["multiplier"].astype(np.float64) * np.exp2(-layer.params["shift"].astype(np.float64))
    if layer.op == "conv":
        total = ref.conv_accumulate(x, w, 0, 0, layer.attrs).astype(np.float64) + bias.reshape(1, -1, 1, 1)
        scale = mult.reshape(1, -1, 1, 1)
    else:
        total = ref.gemm_accumulate(x, w, 0, 0).astype(np.float64) + bias
        scale = mult
    return (w[0].size + 2) * 2.0**-24 * total * scale


def check_layers(result, feeds: dict[str, np.ndarray], kernels: str = "fast", program=None) -> list[LayerCheck]:
    """Per layer, fed the QDQ model's integers: how many outputs differ, and whether each is a tie.

    A layer with several outputs (a float fallback Split, or TopK's values and raw indices) gets one
    LayerCheck per output, named ``layer`` for the first and ``layer:output`` for the others."""
    program = program or result.program
    values = qdq_values(result, feeds)
    raw = result.plan.raw_tensors()
    for name in raw:
        values[quantized_name(name)] = values[name]  # a raw tensor is its own integer value
    checks = []
    for layer in program.layers:
        inputs = [values[quantized_name(t)] for t in layer.inputs]
        results = run_layer(program, layer, inputs, kernels=kernels)
        if len(results) != len(layer.outputs):
            raise ValueError(f"layer '{layer.name}' ({layer.op}) returned {len(results)} outputs for "
                             f"{len(layer.outputs)} declared")
        for position, (out, ours) in enumerate(zip(layer.outputs, results)):
            name = layer.name if position == 0 else f"{layer.name}:{out}"
            checks.append(_check_output(program, layer, name, out, ours, inputs, values, raw))
    return checks


def _check_output(program, layer, name: str, out: str, ours: np.ndarray, inputs: list[np.ndarray],
                  values: dict[str, np.ndarray], raw: dict[str, str]) -> LayerCheck:
    """Compare one output of a layer with the QDQ model's integers (ties excused as above)."""
    expected = values[quantized_name(out)]
    diff = ours.astype(np.int64) - expected.astype(np.int64)
    bad = diff != 0
    unexcused, worst, worst_excused = int(bad.sum()), 0.0, 0.0
    if bad.any() and out not in raw:  # a raw (exact) output has no tie to excuse a difference
        info = program.tensors[out]
        dist, magnitude = tie_distance(values[prequant_name(out)], info.scale[0], int(info.zero_point[0]))
        tolerance = TIE_TOLERANCE_ABS + TIE_TOLERANCE_REL * magnitude
        if layer.op in ("conv", "gemm"):
            tolerance = np.maximum(tolerance, qdq_accumulation_noise(layer, inputs, program))
        excused = bad & (np.abs(diff) == 1) & (dist <= tolerance)
        unexcused = int((bad & ~excused).sum())
        worst = float(dist[bad & ~excused].max()) if unexcused else 0.0
        worst_excused = float(dist[excused].max()) if excused.any() else 0.0
    return LayerCheck(name, layer.op, int(diff.size), int(bad.sum()), unexcused, worst, worst_excused)
