"""The executor: runs a Program layer by layer on integer tensors.

Float feeds are quantized at the input ports (ONNX QuantizeLinear: x / scale in float32, round
half to even, saturate) and outputs dequantized ((q - zp) * scale in float32) unless the caller
asks for raw integers. Any leading batch size is accepted. A tensor is freed as soon as its last
reader has run.
"""
from __future__ import annotations

import time

import numpy as np

from . import float_ops
from . import kernels as fast_kernels
from . import kernels_reference as reference_kernels
from .errors import ProgramError
from .fixed_point import dequantize, quantize
from .ir import INTEGER_DTYPES, LAYER_KINDS, RAW_DTYPES, TENSOR_DTYPES, Layer, Program

KERNEL_SETS = {"fast": fast_kernels.KERNELS, "reference": reference_kernels.KERNELS}


def _kernel_set(kernels: str) -> dict:
    try:
        return KERNEL_SETS[kernels]
    except KeyError:
        raise ProgramError(f"kernels must be one of {sorted(KERNEL_SETS)}, got {kernels!r}") from None


def validate(program: Program) -> None:
    """Structural checks: every tensor declared with a known dtype, each tensor written once,
    read only after it is written, layer kinds known. Raises ProgramError naming the layer."""
    for name, info in program.tensors.items():
        if info.name != name:
            raise ProgramError(f"tensor table key '{name}' holds tensor '{info.name}'")
        if info.dtype not in TENSOR_DTYPES:
            raise ProgramError(f"tensor '{name}': unknown dtype {info.dtype!r}")
    written = set()
    for name in program.inputs:
        if name not in program.tensors:
            raise ProgramError(f"input '{name}' is not a declared tensor")
        written.add(name)
    for layer in program.layers:
        where = f"layer '{layer.name}' ({layer.op})"
        if layer.kind not in LAYER_KINDS:
            raise ProgramError(f"{where}: unknown kind {layer.kind!r}")
        for name in layer.inputs:
            if name not in written:
                raise ProgramError(f"{where}: input '{name}' is not produced before the layer")
        for name in layer.outputs:
            if name not in program.tensors:
                raise ProgramError(f"{where}: output '{name}' is not a declared tensor")
            if name in written:
                raise ProgramError(f"{where}: tensor '{name}' is written twice")
            written.add(name)
    for name in program.outputs:
        if name not in written:
            raise ProgramError(f"output '{name}' is never produced")


def last_uses(program: Program) -> dict[str, int]:
    """Tensor -> index of the last layer reading it (-1: only the ports use it). Program outputs
    are never freed, so they are left out."""
    last = {name: -1 for name in program.inputs}
    for i, layer in enumerate(program.layers):
        for name in layer.inputs + layer.outputs:
            last[name] = i
    for name in program.outputs:
        last.pop(name, None)
    return last


def run_layer(program: Program, layer: Layer, inputs: list[np.ndarray], kernels: str = "fast") -> list[np.ndarray]:
    """Run one layer on integer inputs; checks the output dtypes and shapes (batch may differ)."""
    where = f"layer '{layer.name}' ({layer.op})"
    if layer.kind not in ("integer", "lut", "float"):  # a lut layer is a kernel like any integer one
        raise ProgramError(f"{where}: layers of kind '{layer.kind}' are not implemented in IR v1 runtime")
    if (layer.kind == "lut") != (layer.op == "lut"):
        raise ProgramError(f"{where}: kind 'lut' and op 'lut' go together (kind is '{layer.kind}')")
    # a float layer: dequantize -> ONNX op in float -> quantize (runtime/float_ops.py)
    table = {layer.op: float_ops.run_float_layer} if layer.kind == "float" else _kernel_set(kernels)
    if layer.op not in table:
        raise ProgramError(f"{where}: unknown op '{layer.op}'; known: {', '.join(sorted(table))}")
    try:
        in_infos = [program.tensors[n] for n in layer.inputs]
        out_infos = [program.tensors[n] for n in layer.outputs]
    except KeyError as e:
        raise ProgramError(f"{where}: tensor {e} is not declared") from None
    if len(inputs) != len(in_infos):
        raise ProgramError(f"{where}: expected {len(in_infos)} inputs, got {len(inputs)}")
    try:
        outputs = table[layer.op](layer, list(inputs), in_infos, out_infos)
    except (ProgramError, ValueError, OverflowError, TypeError, IndexError) as e:
        raise ProgramError(f"{where}: {e}") from e
    for y, info in zip(outputs, out_infos):
        if y.dtype != np.dtype(info.dtype) or y.shape[1:] != info.shape[1:] or len(y.shape) != len(info.shape):
            raise ProgramError(
                f"{where}: output '{info.name}' is {y.dtype}{list(y.shape)}, declared {info.dtype}{list(info.shape)}"
            )
    return outputs


def _port_feed(program: Program, name: str, value, raw: bool) -> np.ndarray:
    info = program.tensors[name]
    value = np.asarray(value)
    if value.ndim != len(info.shape) or value.shape[1:] != info.shape[1:] or (value.ndim and value.shape[0] < 1):
        raise ProgramError(
            f"input '{name}': shape {list(value.shape)} does not match declared {list(info.shape)} (batch may differ)"
        )
    if info.dtype not in INTEGER_DTYPES:  # a float port (float-fallback programs)
        return value.astype(info.dtype)
    if raw:
        if value.dtype != np.dtype(info.dtype):
            raise ProgramError(f"input '{name}': raw feed must be {info.dtype}, got {value.dtype}")
        return value
    if value.dtype.kind != "f":
        raise ProgramError(
            f"input '{name}': float feed expected (pass raw_inputs=True for {info.dtype}), got {value.dtype}"
        )
    return quantize(value, info.scale, info.zero_point, info.dtype, info.axis)


def execute(
    program: Program,
    feeds: dict,
    *,
    raw_inputs: bool = False,
    raw_outputs: bool = False,
    trace: bool = False,
    kernels: str = "fast",
    stats: dict | None = None,
    keep_float_weights: bool = True,
):
    """Run the program. Returns {output name: array}; with trace=True, (outputs, trace) where
    trace maps every layer output to its integer array. ``stats``, if given, is filled with
    peak_live_tensors, peak_live_bytes and layer_seconds (layer name -> seconds).
    ``keep_float_weights`` (fast kernels): keep each conv/gemm layer's weights as float32 copies
    for the BLAS products after its first run (fastest; 4 bytes per weight on top of the
    program), or convert them from the integer weights at each call (memory: the program's
    weights, the live activations and one layer's scratch)."""
    token = fast_kernels.KEEP_FLOAT_WEIGHTS.set(bool(keep_float_weights))
    try:
        return _execute(program, feeds, raw_inputs, raw_outputs, trace, kernels, stats)
    finally:
        fast_kernels.KEEP_FLOAT_WEIGHTS.reset(token)


def _execute(program: Program, feeds: dict, raw_inputs: bool, raw_outputs: bool, trace: bool, kernels: str,
             stats: dict | None):
    validate(program)
    _kernel_set(kernels)
    missing = [n for n in program.inputs if n not in feeds]
    extra = [n for n in feeds if n not in program.inputs]
    if missing or extra:
        raise ProgramError(f"feeds do not match the inputs {program.inputs}: missing {missing}, unknown {extra}")
    env = {name: _port_feed(program, name, feeds[name], raw_inputs) for name in program.inputs}
    last = last_uses(program)
    for name in [n for n, i in last.items() if i < 0]:
        del env[name]  # an input nothing reads
    traced = {}
    peak_tensors = len(env)
    peak_bytes = sum(a.nbytes for a in env.values())
    seconds = {}
    for i, layer in enumerate(program.layers):
        start = time.perf_counter()
        outputs = run_layer(program, layer, [env[n] for n in layer.inputs], kernels)
        seconds[layer.name] = time.perf_counter() - start
        for name, value in zip(layer.outputs, outputs):
            env[name] = value
            if trace:
                traced[name] = value
        peak_tensors = max(peak_tensors, len(env))
        peak_bytes = max(peak_bytes, sum(a.nbytes for a in env.values()))
        for name in set(layer.inputs + layer.outputs):
            if last.get(name) == i:
                del env[name]
    result = {}
    for name in program.outputs:
        q = env[name]
        info = program.tensors[name]
        if raw_outputs or info.dtype not in INTEGER_DTYPES or info.dtype in RAW_DTYPES:
            result[name] = q
        else:
            result[name] = dequantize(q, info.scale, info.zero_point, info.axis)
    if stats is not None:
        stats.update(peak_live_tensors=peak_tensors, peak_live_bytes=peak_bytes, layer_seconds=seconds)
    return (result, traced) if trace else result
