"""A fixed, readable text form of a Program, stable enough for golden tests.

Floats print with %.9g (round-trips float32), integers exactly; large arrays are summarized as
dtype[shape] with min, max and their first values. Nothing depends on dict order or numpy's
print options.
"""
from __future__ import annotations

import numpy as np

from .ir import Program, TensorInfo

MAX_LISTED = 8  # arrays up to this size are printed in full, larger ones as their first values
HEAD = 4


def _num(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), ".9g")
    return repr(v)


def _values(a: np.ndarray) -> str:
    flat = np.asarray(a).ravel()
    if flat.size <= MAX_LISTED:
        return "[" + ", ".join(_num(v) for v in flat) + "]"
    return "[" + ", ".join(_num(v) for v in flat[:HEAD]) + f", ...] ({flat.size} values)"


def _value(v) -> str:
    """An attr or metadata value: numbers, strings, lists of them."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(v[k])}" for k in sorted(v)) + "}"
    if isinstance(v, str):
        return repr(v)
    if v is None:
        return "none"
    return _num(v)


def tensor_line(t: TensorInfo) -> str:
    """name dtype[shape] scale=... zp=... (axis=... for per-axis quantization)."""
    shape = ",".join(str(d) for d in t.shape)
    text = f"{t.name} {t.dtype}[{shape}]"
    if t.dtype == "float32":
        return text
    scale = _num(t.scale[0]) if t.scale.size == 1 else _values(t.scale)
    zp = _num(t.zero_point[0]) if t.zero_point.size == 1 else _values(t.zero_point)
    text += f" scale={scale} zp={zp}"
    if t.axis is not None:
        text += f" axis={t.axis}"
    return text


def param_line(name: str, a: np.ndarray) -> str:
    """name dtype[shape] = [all values] when few, else min, max and the first values."""
    a = np.asarray(a)
    shape = ",".join(str(d) for d in a.shape)
    if a.size <= MAX_LISTED:
        return f"{name} {a.dtype}[{shape}] = {_values(a)}"
    return f"{name} {a.dtype}[{shape}] min={_num(a.min())} max={_num(a.max())} {_values(a)}"


def program_to_text(program: Program) -> str:
    lines = [f"qlower-ir version {program.version}"]
    for key in sorted(program.metadata):
        lines.append(f"meta {key} = {_value(program.metadata[key])}")
    for name in program.inputs:
        lines.append(f"input  {tensor_line(program.tensors[name])}")
    for name in program.outputs:
        lines.append(f"output {tensor_line(program.tensors[name])}")
    for layer in program.layers:
        lines.append("")
        lines.append(f"layer {layer.name}: {layer.op} ({layer.kind})")
        for name in layer.inputs:
            lines.append(f"  in   {tensor_line(program.tensors[name])}")
        for name in layer.outputs:
            lines.append(f"  out  {tensor_line(program.tensors[name])}")
        for key in sorted(layer.attrs):
            lines.append(f"  attr {key} = {_value(layer.attrs[key])}")
        for key in sorted(layer.params):
            lines.append(f"  param {param_line(key, layer.params[key])}")
        if layer.acc_dtype:
            lines.append(f"  acc {layer.acc_dtype}")
        if layer.rounding:
            lines.append(f"  rounding {layer.rounding}")
        if layer.source_nodes:
            lines.append("  from " + ", ".join(layer.source_nodes))
    return "\n".join(lines) + "\n"
