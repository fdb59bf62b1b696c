"""The data-movement kernels (runtime/kernels_shape.py) against onnxruntime running the same ONNX
op on the integer tensors (Transpose, Slice, Pad, DepthToSpace, SpaceToDepth accept int8/uint8),
against ConvTranspose on integer-valued float tensors (exact: every partial sum is an integer
far below 2^24), and against brute-force loops written here (resize tables, linear weights)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_test_helpers import info, layer, rand_int, run_kernel

from compiler.onnx_runner import make_session
from runtime import kernels, kernels_reference
from runtime.errors import ProgramError

ONNX_TYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}


def ort_single(op: str, x: np.ndarray, inits: dict, opset: int = 13, **attrs) -> np.ndarray:
    """Run one ONNX node on x (inputs: x then the initializers in order)."""
    node = helper.make_node(op, ["x"] + list(inits), ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", ONNX_TYPE[x.dtype.name], list(x.shape))],
                              [helper.make_tensor_value_info("y", ONNX_TYPE[x.dtype.name], None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return make_session(model).run(["y"], {"x": x})[0]


def both(lay, inputs, in_infos, out_infos):
    """The reference result, after checking the fast set gives the same integers."""
    (ref,) = run_kernel(kernels_reference.KERNELS, lay, inputs, in_infos, out_infos)
    (fast,) = run_kernel(kernels.KERNELS, lay, inputs, in_infos, out_infos)
    np.testing.assert_array_equal(ref, fast)
    assert ref.dtype == np.dtype(out_infos[0].dtype)
    return ref


def same_infos(dtype, in_shape, out_shape, zp=3):
    return [info("x", dtype, in_shape, 0.1, zp)], [info("y", dtype, out_shape, 0.1, zp)]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_transpose_matches_onnxruntime(dtype):
    x = rand_int(np.random.default_rng(1), dtype, (2, 3, 4, 5))
    perm = [0, 2, 3, 1]
    expected = ort_single("Transpose", x, {}, perm=perm)
    got = both(layer("transpose", attrs={"perm": perm}), [x], *same_infos(dtype, x.shape, expected.shape))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1, 0], [3, 100], [1, 3], [1, 2]),
    ([-1, 5], [-100, 0], [2, 3], [-1, -2]),
    ([2], [2], [3], [1]),  # empty is not useful downstream but the bounds rule must still hold
    ([-3, 1], [1000, -1], [-1, -2], [1, 1]),
])
def test_slice_matches_onnxruntime_after_the_compilers_bound_rule(starts, ends, axes, steps):
    from compiler.lower_shape_ops import normalize_slice

    x = rand_int(np.random.default_rng(2), "int8", (1, 3, 6, 7))
    inits = {n: np.array(v, np.int64) for n, v in zip("seat", (starts, ends, axes, steps))}
    expected = ort_single("Slice", x, inits)
    attrs = {"axes": [], "starts": [], "stops": [], "steps": []}
    for s, e, a, t in zip(starts, ends, axes, steps):
        b, stop = normalize_slice(s, e, t, x.shape[a])
        attrs["axes"].append(a % 4)
        attrs["starts"].append(b)
        attrs["stops"].append(stop)
        attrs["steps"].append(t)
    got = both(layer("slice", attrs=attrs), [x], *same_infos("int8", x.shape, expected.shape))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("pads", [[0, 1, 2, 3, 0, 0, 1, 2], [0, 0, -1, 2, 0, 0, 2, -2], [0, -1, 1, -1, 0, 0, -2, 3]])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_pad_matches_onnxruntime(mode, dtype, pads):
    """Negative pads crop; with wrap the order (crop, then pad) is visible, and is onnxruntime's."""
    x = rand_int(np.random.default_rng(3), dtype, (1, 2, 4, 5))
    inits = {"p": np.array(pads, np.int64)}
    fill = 77 if dtype == "uint8" else -77
    if mode == "constant":
        inits["v"] = np.array(fill, np.dtype(dtype))
    expected = ort_single("Pad", x, inits, opset=19, mode=mode)
    lay = layer("pad", attrs={"pads": pads, "mode": mode}, **({"fill": [fill]} if mode == "constant" else {}))
    got = both(lay, [x], *same_infos(dtype, x.shape, expected.shape))
    np.testing.assert_array_equal(got, expected)


def test_pad_refuses_a_fill_outside_the_dtype_and_changed_qparams():
    x = np.zeros((1, 1, 2, 2), np.uint8)
    with pytest.raises(ProgramError, match="outside"):
        both(layer("pad", attrs={"pads": [0, 0, 1, 1, 0, 0, 1, 1]}, fill=[300]), [x], *same_infos("uint8", x.shape, (1, 1, 4, 4)))
    with pytest.raises(ProgramError, match="qparams"):
        both(layer("pad", attrs={"pads": [0] * 8, "mode": "edge"}), [x],
             [info("x", "uint8", x.shape, 0.1, 0)], [info("y", "uint8", x.shape, 0.2, 0)])


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_matches_onnxruntime(mode):
    x = rand_int(np.random.default_rng(4), "uint8", (2, 12, 3, 4))
    expected = ort_single("DepthToSpace", x, {}, blocksize=2, mode=mode)
    got = both(layer("depth_to_space", attrs={"blocksize": 2, "mode": mode}), [x],
               *same_infos("uint8", x.shape, expected.shape))
    np.testing.assert_array_equal(got, expected)


def test_space_to_depth_matches_onnxruntime_and_inverts_dcr():
    x = rand_int(np.random.default_rng(5), "uint8", (1, 3, 4, 6))
    expected = ort_single("SpaceToDepth", x, {}, blocksize=2)
    got = both(layer("space_to_depth", attrs={"blocksize": 2}), [x], *same_infos("uint8", x.shape, expected.shape))
    np.testing.assert_array_equal(got, expected)
    back = both(layer("depth_to_space", attrs={"blocksize": 2, "mode": "DCR"}), [got],
                *same_infos("uint8", got.shape, x.shape))
    np.testing.assert_array_equal(back, x)


def test_resize_nearest_gathers_by_the_tables():
    rng = np.random.default_rng(6)
    x = rand_int(rng, "int8", (1, 2, 3, 4))
    ih, iw = np.array([0, 0, 1, 2, 2]), np.array([3, 1, 0, 0, 2, 1])
    got = both(layer("resize_nearest", attrs={"axes": [2, 3]}, index_2=ih, index_3=iw), [x],
               *same_infos("int8", x.shape, (1, 2, 5, 6)))
    for n, c, h, w in np.ndindex(got.shape):
        assert got[n, c, h, w] == x[n, c, ih[h], iw[w]]
    with pytest.raises(ProgramError, match="outside"):
        both(layer("resize_nearest", attrs={"axes": [2]}, index_2=[0, 3]), [x], *same_infos("int8", x.shape, (1, 2, 2, 4)))


@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
def test_resize_linear_against_exact_integer_loops(rounding):
    rng = np.random.default_rng(7)
    bits = 22
    x = rand_int(rng, "uint8", (2, 2, 3, 4))
    zp = 100
    oh, ow = 5, 7
    lower_h, lower_w = rng.integers(0, 3, oh), rng.integers(0, 4, ow)
    upper_h, upper_w = np.minimum(lower_h + 1, 2), np.minimum(lower_w + 1, 3)
    u_h = rng.integers(0, 2**bits + 1, oh)
    u_w = np.array([0, 2**bits, 2**(bits - 1), 2**(bits - 2), 3 * 2**(bits - 2), 12345, 2**bits - 1])
    lay = layer("resize_linear", attrs={"axes": [2, 3], "fraction_bits": bits}, lower_2=lower_h, upper_2=upper_h,
                weight_2=u_h, lower_3=lower_w, upper_3=upper_w, weight_3=u_w)
    lay.rounding = rounding
    got = both(lay, [x], *same_infos("uint8", x.shape, (2, 2, oh, ow), zp=zp))
    one = 2**bits
    for n, c, h, w in np.ndindex(got.shape):
        acc = 0
        for hi, wh in ((lower_h[h], one - int(u_h[h])), (upper_h[h], int(u_h[h]))):
            for wi, ww in ((lower_w[w], one - int(u_w[w])), (upper_w[w], int(u_w[w]))):
                acc += wh * ww * (int(x[n, c, hi, wi]) - zp)
        q, r = divmod(acc, one * one)  # python ints: exact floor division
        half = one * one // 2
        up = r > half or (r == half and (rounding == "half_up" or q % 2 == 1))
        assert got[n, c, h, w] == min(max(zp + q + up, 0), 255), (n, c, h, w)


def ort_conv_transpose(x, w, b, **attrs) -> np.ndarray:
    inits = {"w": w.astype(np.float32)}
    if b is not None:
        inits["b"] = b.astype(np.float32)
    return ort_single("ConvTranspose", x.astype(np.float32), inits, **attrs)


GEOMETRIES = [
    {"strides": [2, 2]},
    {"strides": [2, 3], "pads": [1, 0, 0, 2], "output_padding": [1, 2]},
    {"strides": [1, 1], "dilations": [2, 1], "pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "group": 2, "pads": [0, 1, 1, 0]},
    {"strides": [2, 2], "group": 4},
]


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_conv_transpose_accumulator_matches_onnxruntime_on_integers(geo):
    from runtime.kernels_shape import conv_transpose_accumulate

    rng = np.random.default_rng(8)
    g = geo.get("group", 1)
    c_in, c_out_g, kh, kw = 4, 2 if g < 4 else 1, 3, 2
    x = rng.integers(-128, 128, (2, c_in, 4, 5))
    w_onnx = rng.integers(-127, 128, (c_in, c_out_g, kh, kw))
    zp_x, zp_w = 5, rng.integers(-3, 4, c_out_g * g)
    # the kernel's output-major layout [O, C_in/group, kh, kw], O = group * C_out/group
    w_ir = w_onnx.reshape(g, c_in // g, c_out_g, kh, kw).transpose(0, 2, 1, 3, 4).reshape(g * c_out_g, c_in // g, kh, kw)
    w_centered = w_ir - zp_w.reshape(-1, 1, 1, 1)
    w_centered_onnx = w_centered.reshape(g, c_out_g, c_in // g, kh, kw).transpose(0, 2, 1, 3, 4).reshape(w_onnx.shape)
    expected = ort_conv_transpose(x - zp_x, w_centered_onnx, None, **geo)
    acc = conv_transpose_accumulate(x.astype(np.int8), w_ir.astype(np.int8), zp_x, zp_w, geo)
    assert acc.shape == expected.shape
    np.testing.assert_array_equal(acc, expected.astype(np.int64))


def test_conv_transpose_kernel_requantizes_per_channel():
    rng = np.random.default_rng(9)
    x = rand_int(rng, "uint8", (1, 3, 3, 3))
    w = rng.integers(-127, 128, (2, 3, 2, 2)).astype(np.int8)  # [O, C, kh, kw]
    bias = np.array([500, -700], np.int32)
    m, k = np.array([1 << 20, 3 << 19], np.int32), np.array([30, 29], np.int8)
    attrs = {"strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1, "output_padding": [0, 0]}
    lay = layer("conv_transpose", attrs=attrs, weight=w, bias=bias, multiplier=m, shift=k)
    lay.rounding = "half_up"
    in_infos, out_infos = [info("x", "uint8", x.shape, 0.1, 128)], [info("y", "int8", (1, 2, 6, 6), 0.2, -4)]
    got = both(lay, [x], in_infos, out_infos)
    acc = ort_conv_transpose(x.astype(np.int64) - 128, w.transpose(1, 0, 2, 3), bias, strides=[2, 2]).astype(np.int64)
    for o in range(2):
        r = (acc[:, o] * int(m[o]) + (1 << (int(k[o]) - 1))) >> int(k[o])  # round half up
        np.testing.assert_array_equal(got[:, o], np.clip(r - 4, -128, 127))


def test_unknown_modes_and_bad_params_are_program_errors():
    x = np.zeros((1, 4, 2, 2), np.int8)
    with pytest.raises(ProgramError, match="DCR or CRD"):
        both(layer("depth_to_space", attrs={"blocksize": 2, "mode": "XYZ"}), [x], *same_infos("int8", x.shape, (1, 1, 4, 4)))
    with pytest.raises(ProgramError, match="permutation"):
        both(layer("transpose", attrs={"perm": [0, 1, 1, 2]}), [x], *same_infos("int8", x.shape, x.shape))
    with pytest.raises(ProgramError, match="fraction bits"):
        both(layer("resize_linear", attrs={"axes": [1, 2, 3], "fraction_bits": 8}), [x],
             *same_infos("int8", x.shape, x.shape))


def test_every_shape_kernel_is_registered_in_both_sets():
    from runtime.kernels_shape import KERNELS as SHAPE

    for op in SHAPE:
        assert op in kernels_reference.KERNELS and op in kernels.KERNELS, op
