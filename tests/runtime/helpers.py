"""Builders shared by the runtime tests: tensors, layers and tiny programs."""
from __future__ import annotations

import numpy as np

from runtime.fixed_point import DTYPE_LIMITS
from runtime.ir import Layer, Program, TensorInfo


def info(name, dtype, shape, scale=1.0, zp=0, axis=None) -> TensorInfo:
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), scale=scale, zero_point=zp, axis=axis)


def rand_int(rng, dtype, shape, extreme=False) -> np.ndarray:
    """Uniform integers of ``dtype``; extreme=True draws only the two limits."""
    lo, hi = DTYPE_LIMITS[dtype]
    if extreme:
        return np.where(rng.random(shape) < 0.5, lo, hi).astype(dtype)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def rand_zp(rng, dtype, n=None) -> np.ndarray:
    lo, hi = DTYPE_LIMITS[dtype]
    return rng.integers(lo, hi, size=n or 1, endpoint=True).astype(np.int64)


def layer(op, inputs=("x",), outputs=("y",), attrs=None, **params) -> Layer:
    return Layer(name=f"{op}0", op=op, inputs=list(inputs), outputs=list(outputs),
                 attrs=dict(attrs or {}), params={k: np.asarray(v) for k, v in params.items()})


def run_kernel(kernels: dict, lay: Layer, inputs, in_infos, out_infos):
    return kernels[lay.op](lay, list(inputs), list(in_infos), list(out_infos))


def single_layer_program(lay: Layer, in_infos, out_infos) -> Program:
    tensors = {t.name: t for t in list(in_infos) + list(out_infos)}
    return Program(inputs=[t.name for t in in_infos], outputs=[t.name for t in out_infos],
                   tensors=tensors, layers=[lay])


def fork_program(batch: int = 1) -> Program:
    """x -> conv(3x3, relu) -> a; a -> requantize -> b; add(a, b) -> s; global avgpool -> g;
    reshape [0, -1] -> f; gemm -> out. 'a' is read twice, so liveness has something to do."""
    rng = np.random.default_rng(0)
    t = {}
    t["x"] = info("x", "uint8", (batch, 2, 6, 6), 1 / 64, 128)
    t["a"] = info("a", "uint8", (batch, 3, 6, 6), 0.05, 0)
    t["b"] = info("b", "int16", (batch, 3, 6, 6), 0.001, 0)
    t["s"] = info("s", "int8", (batch, 3, 6, 6), 0.1, -10)
    t["g"] = info("g", "int8", (batch, 3, 1, 1), 0.1, -10)
    t["f"] = info("f", "int8", (batch, 3), 0.1, -10)
    t["out"] = info("out", "int8", (batch, 4), 0.07, 3)
    layers = [
        Layer("conv1", "conv", ["x"], ["a"], attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]},
              params={"weight": rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8),
                          "bias": np.array([100, -200, 300], np.int32),
                          "multiplier": np.array([180, 200, 220], np.int32), "shift": np.array([14, 14, 14], np.int8),
                          "clamp_lo": np.array([0], np.int32)},
              acc_dtype="int32", rounding="half_up", source_nodes=["Conv_0", "Relu_1"]),
        Layer("to16", "requantize", ["a"], ["b"], params={"multiplier": np.array([25600], np.int32), "shift": np.array([9], np.int8)},
              rounding="half_up"),
        Layer("add1", "add", ["a", "b"], ["s"], params={"multiplier": np.array([16384, 328], np.int32), "shift": np.array([15], np.int8)},
              rounding="half_up", source_nodes=["Add_2"]),
        Layer("pool", "avgpool", ["s"], ["g"], attrs={"kernel_shape": [6, 6]},
              params={"multiplier": np.array([29127], np.int32), "shift": np.array([20], np.int8)}),
        Layer("flat", "reshape", ["g"], ["f"], attrs={"shape": [0, -1]}),
        Layer("fc", "gemm", ["f"], ["out"],
              params={"weight": rng.integers(-127, 128, (4, 3)).astype(np.int8), "bias": np.array([5, 6, 7, 8], np.int32),
                          "multiplier": np.array([1234567890], np.int32), "shift": np.array([37], np.int8)},
              acc_dtype="int32", rounding="half_up"),
    ]
    return Program(inputs=["x"], outputs=["out"], tensors=t, layers=layers, metadata={"model": "fork", "target": "mmav2"})
