"""Fast kernels against the int64 reference kernels, bit for bit, on seeded random cases; and
the reference itself against brute-force loops and onnxruntime's pooling geometry."""
import numpy as np
import pytest
from runtime_test_helpers import info, layer, rand_int, rand_zp, run_kernel

from runtime import kernels as fast
from runtime import kernels_reference as ref
from runtime.errors import ProgramError
from runtime.fixed_point import DTYPE_LIMITS, quantize_multiplier
from runtime.kernel_common import conv_geometry, pool_geometry

DTYPE_PAIRS = [("uint8", "int8"), ("int8", "int8"), ("uint8", "uint8"), ("int16", "int16"), ("uint16", "int16"), ("int16", "int8")]


def random_conv_case(rng):
    """A random conv geometry that has a non-empty output."""
    while True:
        style = rng.choice(["dense", "depthwise", "pointwise", "grouped"])
        g = 1 if style in ("dense", "pointwise") else int(rng.integers(2, 5))
        cg = 1 if style == "depthwise" else int(rng.integers(1, 5))
        og = int(rng.integers(1, 3)) if style == "depthwise" else int(rng.integers(1, 5))
        kh, kw = (1, 1) if style == "pointwise" else tuple(int(v) for v in rng.integers(1, 5, 2))
        attrs = {
            "kernel_shape": [kh, kw],
            "strides": [int(v) for v in rng.integers(1, 4, 2)],
            "pads": [int(v) for v in rng.integers(0, 3, 4)] if rng.random() < 0.7 else [0, 0, 0, 0],
            "dilations": [int(v) for v in rng.integers(1, 3, 2)] if rng.random() < 0.4 else [1, 1],
            "group": g,
        }
        x_shape = (int(rng.integers(1, 4)), g * cg, int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        w_shape = (g * og, cg, kh, kw)
        try:
            conv_geometry(attrs, x_shape, w_shape)
        except ProgramError:
            continue
        return attrs, x_shape, w_shape


def test_conv_accumulate_fast_equals_reference_random():
    rng = np.random.default_rng(2024)
    for case in range(1500):
        attrs, x_shape, w_shape = random_conv_case(rng)
        xd, wd = DTYPE_PAIRS[case % len(DTYPE_PAIRS)]
        extreme = case % 5 == 0
        x = rand_int(rng, xd, x_shape, extreme)
        w = rand_int(rng, wd, w_shape, extreme)
        zp_x = int(rand_zp(rng, xd)[0]) if case % 3 else DTYPE_LIMITS[xd][0]  # incl. zp at a limit
        zp_w = rand_zp(rng, wd, w_shape[0] if case % 2 else 1)
        expected = ref.conv_accumulate(x, w, zp_x, zp_w, attrs)
        assert expected.dtype == np.int64
        got = fast.conv_accumulate(x, w, zp_x, zp_w, attrs)
        assert np.array_equal(got, expected), (case, attrs, x_shape, w_shape, xd, wd)
        forced = fast.conv_accumulate(x, w, zp_x, zp_w, attrs, force_dtype=np.int64)
        assert np.array_equal(forced, expected), ("int64 fallback", case, attrs)


def test_compute_dtype_bounds():
    assert fast.compute_dtype(128, 128, 1024) == np.float64  # 2^24 exactly is not below 2^24
    assert fast.compute_dtype(128, 127, 1024) == np.float32
    assert fast.compute_dtype(128, 128, 1025) == np.float64
    assert fast.compute_dtype(65535, 65535, 2**21) == np.float64
    assert fast.compute_dtype(65535, 65535, 2**22) == np.int64
    assert fast.dtype_bound(np.uint8, 0) == 255 and fast.dtype_bound(np.int16, -32768) == 65535


def test_conv_16bit_near_float64_limit_and_int64_fallback():
    rng = np.random.default_rng(5)
    x = rand_int(rng, "int16", (1, 40, 3, 3), extreme=True)
    w = rand_int(rng, "int16", (2, 40, 3, 3), extreme=True)
    attrs = {"pads": [1, 1, 1, 1]}
    expected = ref.conv_accumulate(x, w, -32768, np.array([32767, -32768]), attrs)
    assert np.array_equal(fast.conv_accumulate(x, w, -32768, np.array([32767, -32768]), attrs), expected)
    assert np.abs(expected).max() > 2**24  # the float64 path was needed
    assert fast.compute_dtype(65535, 65535, 40 * 9) == np.float64


def test_conv_im2col_in_batch_chunks(monkeypatch):
    rng = np.random.default_rng(9)
    x = rand_int(rng, "uint8", (5, 4, 9, 9))
    w = rand_int(rng, "int8", (6, 4, 3, 3))
    attrs = {"pads": [1, 0, 2, 1], "strides": [2, 1]}
    expected = ref.conv_accumulate(x, w, 17, np.arange(6) - 3, attrs)
    monkeypatch.setattr(fast, "IM2COL_BUDGET_BYTES", 1)  # one batch item per chunk
    assert np.array_equal(fast.conv_accumulate(x, w, 17, np.arange(6) - 3, attrs), expected)


def conv_layer(rng, w, per_channel: bool, out_dtype: str, relu: bool, wide: bool):
    """Random conv params; ``wide`` (16-bit operands) caps the multiplier at 16 bits so that
    acc * m stays inside int64, as the lowering must."""
    o = w.shape[0]
    n = o if per_channel else 1
    real = np.exp2(rng.uniform(-14, -6, n))
    m, k = quantize_multiplier(real, int(rng.choice([8, 16] if wide else [8, 16, 31])))
    lo, hi = DTYPE_LIMITS[out_dtype]
    params = {"weight": w, "multiplier": m, "shift": k, "bias": rng.integers(-5000, 5000, o).astype(np.int32)}
    params["weight_zero_point"] = rng.integers(-3, 4, n).astype(np.int64)
    if relu:
        params["clamp_lo"] = np.full(n, lo + 20, np.int32)
        params["clamp_hi"] = rng.integers(hi - 40, hi + 1, n).astype(np.int32)
    return params


def test_conv_layer_fast_equals_reference():
    rng = np.random.default_rng(11)
    for case in range(500):
        attrs, x_shape, w_shape = random_conv_case(rng)
        xd, wd = DTYPE_PAIRS[case % len(DTYPE_PAIRS)]
        out_dtype = ["int8", "uint8", "int16", "int32"][case % 4]
        w = rand_int(rng, wd, w_shape, case % 7 == 0)
        params = conv_layer(rng, w, case % 2 == 0, out_dtype, case % 3 == 0, "16" in xd + wd)
        lay = layer("conv", attrs=attrs, **params)
        x = rand_int(rng, xd, x_shape)
        geo = conv_geometry(attrs, x_shape, w_shape)
        ins = [info("x", xd, x_shape, 0.1, int(rand_zp(rng, xd)[0]))]
        outs = [info("y", out_dtype, (x_shape[0], w_shape[0]) + geo["out"], 0.2, int(rand_zp(rng, out_dtype)[0]))]
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
        got = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]
        assert expected.dtype == np.dtype(out_dtype)
        assert np.array_equal(got, expected), (case, attrs)


def test_gemm_and_matmul_fast_equals_reference():
    rng = np.random.default_rng(12)
    for case in range(80):
        xd, wd = DTYPE_PAIRS[case % len(DTYPE_PAIRS)]
        lead = tuple(int(v) for v in rng.integers(1, 4, int(rng.integers(1, 4))))
        kdim, o = int(rng.integers(1, 70)), int(rng.integers(1, 9))
        x = rand_int(rng, xd, lead + (kdim,), case % 6 == 0)
        w = rand_int(rng, wd, (o, kdim), case % 6 == 0)
        zp_x = int(rand_zp(rng, xd)[0])
        zp_w = rand_zp(rng, wd, o if case % 2 else 1)
        expected = ref.gemm_accumulate(x, w, zp_x, zp_w)
        assert np.array_equal(fast.gemm_accumulate(x, w, zp_x, zp_w), expected)
        assert np.array_equal(fast.gemm_accumulate(x, w, zp_x, zp_w, force_dtype=np.int64), expected)
        # matmul with batch broadcasting: a [.., M, K] @ b [.., K, P]
        a = rand_int(rng, xd, (2, 1, 3, kdim))
        b = rand_int(rng, wd, (4, kdim, 5))
        zp_a, zp_b = int(rand_zp(rng, xd)[0]), int(rand_zp(rng, wd)[0])
        expected = ref.matmul_accumulate(a, b, zp_a, zp_b)
        assert expected.shape == (2, 4, 3, 5)
        assert np.array_equal(fast.matmul_accumulate(a, b, zp_a, zp_b), expected)
        # full layers
        out_dtype = ["int8", "uint8", "int16"][case % 3]
        n = o if case % 2 else 1
        # 16-bit accumulators reach 2^38: a 31-bit multiplier would leave int64 (requantize refuses)
        m, k = quantize_multiplier(np.exp2(rng.uniform(-12, -4, n)), 31 if "16" not in xd + wd else 16)
        lay = layer("gemm", weight=w, weight_zero_point=zp_w, multiplier=m, shift=k,
                    bias=rng.integers(-999, 999, o), clamp_lo=np.full(n, DTYPE_LIMITS[out_dtype][0] + 3))
        ins, outs = [info("x", xd, x.shape, 1.0, zp_x)], [info("y", out_dtype, lead + (o,), 1.0, 3)]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], run_kernel(ref.KERNELS, lay, [x], ins, outs)[0])
        lay = layer("matmul", inputs=("a", "b"), multiplier=m[:1], shift=k[:1])
        ins = [info("a", xd, a.shape, 1.0, zp_a), info("b", wd, b.shape, 1.0, zp_b)]
        outs = [info("y", out_dtype, (2, 4, 3, 5), 1.0, -1 if out_dtype != "uint8" else 1)]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [a, b], ins, outs)[0], run_kernel(ref.KERNELS, lay, [a, b], ins, outs)[0])


def random_pool_case(rng):
    while True:
        kernel = [int(v) for v in rng.integers(1, 5, 2)]
        attrs = {
            "kernel_shape": kernel,
            "strides": [int(v) for v in rng.integers(1, 4, 2)],
            "pads": [int(rng.integers(0, kernel[0])), int(rng.integers(0, kernel[1])),
                  int(rng.integers(0, kernel[0])), int(rng.integers(0, kernel[1]))],
            "dilations": [int(v) for v in rng.integers(1, 3, 2)] if rng.random() < 0.3 else [1, 1],
            "ceil_mode": int(rng.random() < 0.5),
        }
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        try:
            return attrs, shape, pool_geometry(attrs, shape)
        except ProgramError:
            continue


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_pools_fast_equal_reference(dtype):
    rng = np.random.default_rng(list(DTYPE_LIMITS).index(dtype))
    for case in range(60):
        attrs, shape, geo = random_pool_case(rng)
        x = rand_int(rng, dtype, shape, case % 8 == 0)
        zp = int(rand_zp(rng, dtype)[0])
        ins = [info("x", dtype, shape, 0.5, zp)]
        outs = [info("y", dtype, shape[:2] + geo["out"], 0.5, zp)]
        lay = layer("maxpool", attrs=attrs)
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]), attrs
        if case % 2:
            m = rng.integers(1, 2**15, geo["out"]).astype(np.int32)  # one divisor per output position
        else:
            m = np.array([int(rng.integers(1, 2**15))], np.int32)
        lay = layer("avgpool", attrs=attrs, multiplier=m, shift=np.array([int(rng.integers(12, 20))], np.int8))
        outs = [info("y", dtype, shape[:2] + geo["out"], 0.5, int(rand_zp(rng, dtype)[0]))]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]), attrs


def test_global_avgpool_fast_path():
    rng = np.random.default_rng(4)
    x = rand_int(rng, "uint8", (3, 5, 7, 6))
    lay = layer("avgpool", attrs={"kernel_shape": [7, 6]}, multiplier=[21400], shift=[20])  # ~1/49
    ins, outs = [info("x", "uint8", x.shape, 1.0, 9)], [info("y", "uint8", (3, 5, 1, 1), 1.0, 4)]
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    s = (x.astype(np.int64) - 9).sum(axis=(2, 3), keepdims=True)
    assert np.array_equal(expected, np.clip(4 + ((s * 21400 + 2**19) >> 20), 0, 255))


# --- the oracle itself ----------------------------------------------------------------------------

def brute_force_conv(x, w, zp_x, zp_w, attrs):
    """Seven nested loops, padding by bounds checks: the definition, nothing else."""
    geo = conv_geometry(attrs, x.shape, w.shape)
    (pt, pl, _, _), (sh, sw), (dh, dw), (ho, wo), g = geo["pads"], geo["strides"], geo["dilations"], geo["out"], geo["group"]
    n, _c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    zp_w = np.broadcast_to(np.asarray(zp_w), (o,))
    y = np.zeros((n, o, ho, wo), dtype=object)
    for b in range(n):
        for oc in range(o):
            grp = oc // (o // g)
            for oh in range(ho):
                for ow in range(wo):
                    total = 0
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                r, q = oh * sh - pt + i * dh, ow * sw - pl + j * dw
                                xv = int(x[b, grp * cg + ci, r, q]) if 0 <= r < h and 0 <= q < wd else int(zp_x)
                                total += (int(w[oc, ci, i, j]) - int(zp_w[oc])) * (xv - int(zp_x))
                    y[b, oc, oh, ow] = total
    return y


def test_reference_conv_equals_brute_force():
    rng = np.random.default_rng(77)
    for case in range(25):
        attrs, x_shape, w_shape = random_conv_case(rng)
        x = rand_int(rng, "uint8", x_shape)
        w = rand_int(rng, "int8", w_shape)
        zp_w = rand_zp(rng, "int8", w_shape[0])
        assert np.array_equal(ref.conv_accumulate(x, w, 100, zp_w, attrs), brute_force_conv(x, w, 100, zp_w, attrs)), attrs


def test_reference_maxpool_and_window_sums_match_onnxruntime():
    """Pool geometry (pads, strides, dilations, ceil mode) against onnxruntime's MaxPool/AveragePool."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(31)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for case in range(30):
        attrs, shape, geo = random_pool_case(rng)
        x = rand_int(rng, "uint8", shape)
        op = "MaxPool" if case % 2 else "AveragePool"
        node_attrs = dict(attrs)
        if op == "AveragePool":
            node_attrs.update(ceil_mode=0, count_include_pad=1)
            geo = pool_geometry(node_attrs, shape)
        elem = TensorProto.UINT8 if op == "MaxPool" else TensorProto.FLOAT
        graph = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"], **node_attrs)], "p",
            [helper.make_tensor_value_info("x", elem, shape)], [helper.make_tensor_value_info("y", elem, None)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ins = [info("x", "uint8", shape, 1.0, 0)]
        if op == "MaxPool":
            expected = session.run(None, {"x": x})[0]
            outs = [info("y", "uint8", shape[:2] + geo["out"], 1.0, 0)]
            got = run_kernel(ref.KERNELS, layer("maxpool", attrs=attrs), [x], ins, outs)[0]
            assert np.array_equal(got, expected), attrs
        else:
            mean = session.run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)
            window = attrs["kernel_shape"][0] * attrs["kernel_shape"][1]
            outs = [info("y", "int32", shape[:2] + geo["out"], 1.0, 0)]
            lay = layer("avgpool", attrs=node_attrs, multiplier=[1], shift=[0])  # y = S
            got = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
            assert np.array_equal(got, np.rint(mean * window)), node_attrs


def test_pool_all_padding_window_and_padding_never_wins():
    x = np.full((1, 1, 2, 2), -128, np.int8)
    lay = layer("maxpool", attrs={"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "strides": [1, 1]})
    ins, outs = [info("x", "int8", x.shape, 1.0, 5)], [info("y", "int8", (1, 1, 3, 3), 1.0, 5)]
    for table in (ref.KERNELS, fast.KERNELS):
        assert np.array_equal(run_kernel(table, lay, [x], ins, outs)[0], x.min() * np.ones((1, 1, 3, 3)))
