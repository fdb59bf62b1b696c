"""The integer IR: a small versioned data model of a lowered program (IR version 1).

A program is a list of layers in execution order over named tensors. Every tensor between
layers is an integer tensor with its quantization (real = scale * (q - zero_point)); the
program's inputs are quantized at the port (ONNX QuantizeLinear semantics) and its outputs are
dequantized at the port unless the caller asks for raw integers.

A layer is one fused group of the source graph (for example Conv + BatchNorm + ReLU6). Its
``kind`` is ``integer`` (integer arithmetic only), ``lut`` (a lookup table on an 8-bit input) or
``float`` (dequantize -> float op -> quantize: a float-fallback layer whose ``op`` is the ONNX op
type, run by runtime/float_ops.py). Its ``params`` hold the integer constants: ``weight`` and
``weight_zero_point``, ``bias``, requantization ``multiplier`` (int32) and ``shift`` (signed),
``clamp_lo``/``clamp_hi`` (per output channel), ``table`` (a float layer: its ONNX constants).
Float layers may write raw tensors (dtype int32/int64/bool, scale 1, zero point 0: Shape, ArgMax,
Equal outputs), which are never quantized or dequantized.
``rounding`` names the requantization rounding mode ("half_up": add 2^(k-1), arithmetic shift).
The integer rule of every op is written in docs/ir.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IR_VERSION = 1

INTEGER_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "int64")
TENSOR_DTYPES = INTEGER_DTYPES + ("float32", "bool")
# dtypes of exact, unquantized tensors (float layers' Shape/ArgMax/Equal outputs): scale 1, zero point 0
RAW_DTYPES = ("int32", "int64", "bool")
LAYER_KINDS = ("integer", "lut", "float")


@dataclass
class TensorInfo:
    """A named tensor of the program: dtype, static shape and quantization.

    ``scale`` has one entry per tensor or one per slice along ``axis``; float tensors carry
    scale [1.0] and zero point [0].
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        self.scale = np.atleast_1d(np.asarray(self.scale, dtype=np.float32))
        self.zero_point = np.atleast_1d(np.asarray(self.zero_point, dtype=np.int64))


@dataclass
class Layer:
    """One IR layer: ``op`` names the integer rule (docs/ir.md), ``kind`` how it executes."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    kind: str = "integer"
    attrs: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    acc_dtype: str | None = None
    rounding: str | None = None
    source_nodes: list[str] = field(default_factory=list)

    def __getstate__(self) -> dict:
        """Pickled without the fast kernels' prepared plan (``_fast_plan``: chunks, constants,
        float weights), which the receiving process rebuilds on its first run."""
        state = dict(self.__dict__)
        state.pop("_fast_plan", None)
        return state


@dataclass
class Program:
    """A lowered program: ports, tensors, and layers in execution order."""

    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, TensorInfo]
    layers: list[Layer]
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = IR_VERSION

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def run(self, feeds: dict, raw: bool = False, kernels: str = "fast", keep_float_weights: bool = True,
            stats: dict | None = None) -> dict:
        """Run on float feeds (quantized at the ports); ``raw`` returns the outputs' integers
        instead of dequantizing them; ``keep_float_weights=False`` trades a little speed for
        memory; ``stats`` receives peak memory and per-layer seconds (runtime.execute). For
        integer feeds and traces, use runtime.execute."""
        from .executor import execute

        return execute(self, feeds, raw_outputs=raw, kernels=kernels, keep_float_weights=keep_float_weights,
                       stats=stats)

    def save(self, path) -> None:
        """Write the program to a .qir file (runtime.save_program)."""
        from .serialize import save_program

        save_program(self, path)

    def to_text(self) -> str:
        """The fixed text form (runtime.program_to_text)."""
        from .text import program_to_text

        return program_to_text(self)
