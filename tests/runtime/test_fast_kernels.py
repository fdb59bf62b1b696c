"""The fast kernels against the int64 oracle (runtime/kernels_reference.py), bit for bit, on
hypothesis-drawn shapes and values, with the paths the fast kernels choose between forced into
use: float32 reduction chunks, float64, int64; the fused int32 / int64 epilogue and the
reference epilogue; im2col row chunks and stacked images; the plan cache."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_test_helpers import info, layer, rand_int, run_kernel

from runtime import kernels as fast
from runtime import kernels_reference as ref
from runtime.errors import ProgramError
from runtime.fixed_point import DTYPE_LIMITS, quantize_multiplier
from runtime.kernel_common import conv_geometry

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
X_DTYPES = ["uint8", "int8", "int16", "uint16"]
W_DTYPES = ["int8", "uint8", "int16"]


def _values(rng, dtype, shape, mode):
    """'uniform' values, 'extreme' (only the two limits) or 'max' (all at one limit)."""
    lo, hi = DTYPE_LIMITS[dtype]
    if mode == "max":
        return np.full(shape, hi if rng.random() < 0.5 else lo, dtype=dtype)
    return rand_int(rng, dtype, shape, extreme=mode == "extreme")


@st.composite
def conv_cases(draw):
    style = draw(st.sampled_from(["dense", "pointwise", "depthwise", "grouped", "multiplier"]))
    g = 1 if style in ("dense", "pointwise") else draw(st.integers(2, 6))
    cg = 1 if style in ("depthwise", "multiplier") else draw(st.integers(1, 6))
    og = draw(st.integers(2, 3)) if style == "multiplier" else 1 if style == "depthwise" else draw(st.integers(1, 5))
    kh, kw = (1, 1) if style == "pointwise" else (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    attrs = {"kernel_shape": [kh, kw], "group": g,
                 "strides": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
                 "pads": [draw(st.integers(0, 2)) for _ in range(4)] if draw(st.booleans()) else [0, 0, 0, 0],
                 "dilations": [draw(st.integers(1, 2)), draw(st.integers(1, 2))] if draw(st.booleans()) else [1, 1]}
    x_shape = (draw(st.integers(1, 3)), g * cg, draw(st.integers(1, 11)), draw(st.integers(1, 11)))
    w_shape = (g * og, cg, kh, kw)
    try:
        conv_geometry(attrs, x_shape, w_shape)
    except ProgramError:
        draw(st.just(None).filter(lambda _: False))  # reject: empty output
    xd = draw(st.sampled_from(X_DTYPES))
    wd = draw(st.sampled_from(W_DTYPES))
    mode = draw(st.sampled_from(["uniform", "uniform", "extreme", "max"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return attrs, x_shape, w_shape, xd, wd, mode, seed


def _zp(rng, dtype, n=1, at_limit=False):
    lo, hi = DTYPE_LIMITS[dtype]
    if at_limit:
        return np.full(n, lo if rng.random() < 0.5 else hi, dtype=np.int64)
    return rng.integers(lo, hi, size=n, endpoint=True).astype(np.int64)


@SETTINGS
@given(conv_cases())
def test_conv_accumulate_equals_oracle(case):
    attrs, x_shape, w_shape, xd, wd, mode, seed = case
    rng = np.random.default_rng(seed)
    x = _values(rng, xd, x_shape, mode)
    w = _values(rng, wd, w_shape, mode)
    zp_x = int(_zp(rng, xd, at_limit=mode == "max")[0])
    zp_w = _zp(rng, wd, w_shape[0] if rng.random() < 0.5 else 1)
    expected = ref.conv_accumulate(x, w, zp_x, zp_w, attrs)
    assert np.array_equal(fast.conv_accumulate(x, w, zp_x, zp_w, attrs), expected)
    for forced in (np.int64, np.float64):
        got = fast.conv_accumulate(x, w, zp_x, zp_w, attrs, force_dtype=forced)
        if forced is np.int64 or np.abs(expected).max(initial=0) < 2**53:
            assert np.array_equal(got, expected)


def _conv_params(rng, w, out_dtype, bits, per_channel, rounding_even, clamp):
    o = w.shape[0]
    n = o if per_channel else 1
    m, k = quantize_multiplier(np.exp2(rng.uniform(-16, -4, n)), bits)
    params = {"weight": w, "multiplier": m, "shift": k, "bias": rng.integers(-50000, 50000, o).astype(np.int32),
                  "weight_zero_point": rng.integers(-3, 4, n).astype(np.int64)}
    if clamp:
        lo, hi = DTYPE_LIMITS[out_dtype]
        params["clamp_lo"] = rng.integers(lo, lo + 30, n).astype(np.int64)
        params["clamp_hi"] = rng.integers(max(hi - 60, lo + 31), hi + 1, n).astype(np.int64)
    return params


@SETTINGS
@given(conv_cases(), st.sampled_from(["int8", "uint8", "int16", "int32"]), st.sampled_from([8, 16, 31]),
       st.booleans(), st.booleans(), st.booleans())
def test_conv_layer_equals_oracle(case, out_dtype, bits, per_channel, rounding_even, clamp):
    """Whole layers: the fused epilogue (int32 or int64 work) or the reference one, as chosen."""
    attrs, x_shape, w_shape, xd, wd, mode, seed = case
    rng = np.random.default_rng(seed)
    x = _values(rng, xd, x_shape, mode)
    w = _values(rng, wd, w_shape, mode)
    if "16" in xd + wd:
        bits = min(bits, 16)  # 16-bit accumulators times a 31-bit multiplier leave int64
    params = _conv_params(rng, w, out_dtype, bits, per_channel, rounding_even, clamp)
    lay = layer("conv", attrs=attrs, **params)
    lay.rounding = "half_even" if rounding_even else "half_up"
    geo = conv_geometry(attrs, x_shape, w_shape)
    ins = [info("x", xd, x_shape, 0.1, int(_zp(rng, xd)[0]))]
    outs = [info("y", out_dtype, (x_shape[0], w_shape[0]) + geo["out"], 0.2, int(_zp(rng, out_dtype)[0]))]
    try:
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    except OverflowError:
        with pytest.raises(OverflowError):
            run_kernel(fast.KERNELS, lay, [x], ins, outs)
        return
    got = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    again = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]  # from the cached plan
    assert np.array_equal(again, expected)
    token = fast.KEEP_FLOAT_WEIGHTS.set(False)  # weights converted at each call instead
    try:
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    finally:
        fast.KEEP_FLOAT_WEIGHTS.reset(token)


def _conv_layer_case(rng, x_shape, w_shape, attrs, xd="uint8", wd="int8", out_dtype="uint8", bits=8):
    x = rand_int(rng, xd, x_shape)
    w = rand_int(rng, wd, w_shape)
    lay = layer("conv", attrs=attrs, **_conv_params(rng, w, out_dtype, bits, True, False, True))
    lay.rounding = "half_up"
    geo = conv_geometry(attrs, x_shape, w_shape)
    ins = [info("x", xd, x_shape, 0.1, int(_zp(rng, xd)[0]))]
    outs = [info("y", out_dtype, (x_shape[0], w_shape[0]) + geo["out"], 0.2, int(_zp(rng, out_dtype)[0]))]
    return lay, x, ins, outs


def test_float32_chunks_at_the_bound():
    """All inputs at 255 and all weights at -128 over K = 2304 reach 255*128*2304 ~ 2^26: float32
    needs chunks, each below 2^24, and the result is still exact."""
    x = np.full((1, 256, 5, 5), 255, np.uint8)
    w = np.full((4, 256, 3, 3), -128, np.int8)
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    ct, chunks = fast.reduction_plan(np.abs(w.astype(np.int64)).reshape(4, -1), fast.dtype_bound(np.uint8, 0))
    per_chunk = (2**24 - 1) // (255 * 128)  # 514 columns of |x*w| = 32640 stay below 2^24
    assert ct == np.float32 and chunks == [(a, min(a + per_chunk, 2304)) for a in range(0, 2304, per_chunk)]
    expected = ref.conv_accumulate(x, w, 0, np.zeros(1, np.int64), attrs)
    assert expected.min() == -255 * 128 * 2304  # the centre pixels see the full window
    assert np.array_equal(fast.conv_accumulate(x, w, 0, np.zeros(1, np.int64), attrs), expected)


def test_reduction_plan_chunks_respect_every_row_bound():
    rng = np.random.default_rng(3)
    for _ in range(30):
        rows, k = int(rng.integers(1, 20)), int(rng.integers(1, 5000))
        abs_w = np.abs(rng.integers(-128, 128, (rows, k)))
        xb = int(rng.choice([127, 128, 255]))
        ct, chunks = fast.reduction_plan(abs_w, xb)
        assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]] and chunks[-1][1] == k
        limit = 2**24 if ct == np.float32 else 2**53
        for a, b in chunks:
            assert (xb * abs_w[:, a:b].sum(axis=1)).max() < limit
        if ct == np.float32 and len(chunks) > 1:  # greedy: no chunk could take the next column
            for (a, b), _ in itertools.pairwise(chunks):
                assert (xb * abs_w[:, a:b + 1].sum(axis=1)).max() >= 2**24


def test_16bit_uses_float64_and_int64_beyond():
    abs_w = np.full((2, 9), 32768)
    assert fast.reduction_plan(abs_w, 65535)[0] == np.float64
    assert fast.reduction_plan(np.full((1, 2**22), 32768), 65535)[0] == np.float64  # chunked
    assert fast.reduction_plan(np.full((1, 4), 2**40), 2**20)[0] == np.int64  # one product >= 2^53


def test_16bit_conv_layer_with_int64_accumulators_equals_oracle():
    rng = np.random.default_rng(8)
    for xd, wd in (("int16", "int16"), ("uint16", "int16"), ("int16", "int8")):
        lay, x, ins, outs = _conv_layer_case(rng, (2, 12, 6, 6), (5, 12, 3, 3), {"pads": [1] * 4}, xd, wd,
                                             "int16", bits=16)
        x[:] = DTYPE_LIMITS[xd][1]  # accumulators near 2^34
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
        plan = lay.__dict__["_fast_plan"]
        assert plan.ct == np.float64 and plan.epilogue is not None and not plan.epilogue.static32


def test_epilogue_int32_static_dynamic_and_int64():
    """The work dtype follows the bound: int32 when proved (statically or on the block's max),
    int64 otherwise; all three give the formula's integers (written out here), clamps included."""
    rng = np.random.default_rng(12)
    o = 6
    bias = rng.integers(-1000, 1000, o)
    lo, hi = np.full(o, -128), np.full(o, 127)
    m, k = quantize_multiplier(np.exp2(rng.uniform(-12, -8, o)), 8)
    for bound, acc_scale, static in ((2.0**10, 2**10, True), (2.0**40, 2**10, False), (2.0**40, 2**33, False)):
        ep = fast.Epilogue.build(bias, m, k, lo, hi, 3, np.full(o, bound), "half_up")
        assert ep.static32 is static
        acc = rng.integers(-acc_scale, acc_scale, (o, 2, 50))
        want = np.clip(3 + ((acc + bias[:, None, None]) * m[:, None, None].astype(np.int64)
                            + (1 << (k[:, None, None].astype(np.int64) - 1)) >> k[:, None, None]), -128, 127)
        y = np.empty(acc.shape, np.int8)
        ep.apply([acc.astype(np.float64)], y)
        assert np.array_equal(y, want)
        half = acc // 3  # the same accumulator as two chunk results (float32 where they fit)
        parts = [half.astype(np.float32 if acc_scale < 2**24 else np.float64), (acc - half).astype(np.float64)]
        y = np.empty(acc.shape, np.int8)
        ep.apply(parts, y)
        assert np.array_equal(y, want)
    assert fast.Epilogue.build(bias, m, k, lo, hi, 3, np.full(o, 1.0), "half_even") is None
    assert fast.Epilogue.build(bias, m, -np.abs(k), lo, hi, 3, np.full(o, 1.0), "half_up") is None
    assert fast.Epilogue.build(bias, np.full(o, 2**31 - 1), k + 20, lo, hi, 3, np.full(o, 2.0**34), None) is None


def test_saturated_channels_become_constants_and_keep_the_layer_in_int32():
    """A near-dead channel whose bias dwarfs its weights (bias ~1e9 and shift 33, as bias fitting
    leaves pruned channels) gives one output integer whatever the input, but its bound used to
    push the whole layer out of int32. It is made a constant (m = 0, c = v * 2^k): the layer
    stays in int32 (depthwise ones fused) and equals the oracle bit for bit."""
    rng = np.random.default_rng(4)
    for w_shape, x_channels, attrs in (((6, 1, 3, 3), 6, {"group": 6, "pads": [1] * 4}),
                                       ((6, 4, 3, 3), 4, {"pads": [1] * 4})):
        lay, x, ins, outs = _conv_layer_case(rng, (2, x_channels, 9, 9), w_shape, attrs)
        lay.params["bias"][[1, 4]] = [10**9, -(10**9)]
        lay.params["multiplier"][[1, 4]] = [200, 150]
        lay.params["shift"][[1, 4]] = [33, 34]
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
        assert len(np.unique(expected[:, 1])) == 1 and len(np.unique(expected[:, 4])) == 1
        plan = lay.__dict__["_fast_plan"]
        assert plan.epilogue.static32 and list(plan.epilogue.m[[1, 4]]) == [0, 0]
        assert (plan.dw_fused is not None) == (w_shape[1] == 1)


def test_im2col_row_chunks_and_stacked_images(monkeypatch):
    rng = np.random.default_rng(21)
    lay, x, ins, outs = _conv_layer_case(rng, (9, 6, 7, 7), (8, 6, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]})
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)  # images stacked
    monkeypatch.setattr(fast, "IM2COL_BUDGET_BYTES", 1)  # one output row per chunk, one image
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 7)  # epilogue blocks of one channel
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)


@pytest.mark.parametrize(("waste", "channels_last_span"), [(0, 0), (10**9, 10**9)],
                         ids=["whole-runs-channels-first", "output-columns-channels-last"])
@SETTINGS
@given(case=conv_cases())
def test_conv_layouts_agree(waste, channels_last_span, case):
    """im2col either copies whole tap runs (padding columns computed, then dropped) or W_out
    columns per row, and depthwise convs run channels-first or (small maps) channels-last; every
    combination must give the oracle's integers on every geometry, fused epilogues included."""
    attrs, x_shape, w_shape, xd, wd, mode, seed = case
    rng = np.random.default_rng(seed)
    x = _values(rng, xd, x_shape, mode)
    w = _values(rng, wd, w_shape, mode)
    zp_x = int(_zp(rng, xd, at_limit=mode == "max")[0])
    zp_w = _zp(rng, wd, w_shape[0])
    expected = ref.conv_accumulate(x, w, zp_x, zp_w, attrs)
    lay, lx, ins, outs = _conv_layer_case(rng, x_shape, w_shape, attrs, xd, wd)
    layer_expected = run_kernel(ref.KERNELS, lay, [lx], ins, outs)[0]
    old = fast.PITCHED_IM2COL_WASTE, fast.CHANNELS_LAST_MAX_SPAN
    fast.PITCHED_IM2COL_WASTE = waste  # 0: always whole runs; 10**9: W_out columns unless equal
    fast.CHANNELS_LAST_MAX_SPAN = channels_last_span  # 0: never; 10**9: every depthwise conv
    try:
        assert np.array_equal(fast.conv_accumulate(x, w, zp_x, zp_w, attrs), expected)
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [lx], ins, outs)[0], layer_expected)
    finally:
        fast.PITCHED_IM2COL_WASTE, fast.CHANNELS_LAST_MAX_SPAN = old


def test_plan_cache_follows_params_and_input_dtype():
    rng = np.random.default_rng(5)
    lay, x, ins, outs = _conv_layer_case(rng, (1, 4, 5, 5), (3, 4, 3, 3), {"pads": [1] * 4})
    first = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]
    plan = lay.__dict__["_fast_plan"]
    assert run_kernel(fast.KERNELS, lay, [x], ins, outs)[0].tobytes() == first.tobytes()
    assert lay.__dict__["_fast_plan"] is plan
    lay.params["weight"] = -lay.params["weight"].astype(np.int16).clip(-127, 127).astype(np.int8)  # a new array
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    assert lay.__dict__["_fast_plan"] is not plan
    x16 = x.astype(np.int16) * 100
    ins16 = [info("x", "int16", x.shape, 0.1, 7)]
    expected = run_kernel(ref.KERNELS, lay, [x16], ins16, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x16], ins16, outs)[0], expected)


def test_unknown_layer_params_take_the_reference_path():
    """A param or attr the fast kernel does not know sends the layer through the reference
    epilogue (here: the folded zero-point attr, which the fused path handles, and a made-up one)."""
    rng = np.random.default_rng(6)
    lay, x, ins, outs = _conv_layer_case(rng, (2, 4, 6, 6), (4, 4, 3, 3), {"pads": [1] * 4})
    lay.attrs["input_zero_point_folded"] = 1
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    lay.attrs["future_attr"] = 1
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)


@SETTINGS
@given(st.sampled_from(X_DTYPES), st.sampled_from(["int8", "uint8", "int16"]), st.sampled_from([8, 16, 31]),
       st.integers(1, 3000), st.integers(1, 12), st.sampled_from(["uniform", "extreme", "max"]),
       st.integers(0, 2**32 - 1))
def test_gemm_layer_equals_oracle(xd, out_dtype, bits, kdim, o, mode, seed):
    rng = np.random.default_rng(seed)
    wd = "int16" if xd in ("int16", "uint16") and rng.random() < 0.5 else "int8"
    if "16" in xd + wd:
        bits = min(bits, 16)
    x = _values(rng, xd, (int(rng.integers(1, 5)), kdim), mode)
    w = _values(rng, wd, (o, kdim), mode)
    params = _conv_params(rng, w, out_dtype, bits, rng.random() < 0.5, False, rng.random() < 0.5)
    lay = layer("gemm", **params)
    lay.rounding = "half_up"
    ins = [info("x", xd, x.shape, 1.0, int(_zp(rng, xd)[0]))]
    outs = [info("y", out_dtype, (x.shape[0], o), 1.0, int(_zp(rng, out_dtype)[0]))]
    try:
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    except OverflowError:
        return
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    token = fast.KEEP_FLOAT_WEIGHTS.set(False)
    try:
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    finally:
        fast.KEEP_FLOAT_WEIGHTS.reset(token)
    acc = ref.gemm_accumulate(x, w, ins[0].zero_point[0], params["weight_zero_point"])
    assert np.array_equal(fast.gemm_accumulate(x, w, ins[0].zero_point[0], params["weight_zero_point"]), acc)


@SETTINGS
@given(st.sampled_from(X_DTYPES), st.sampled_from(X_DTYPES), st.sampled_from(["int8", "uint8", "int16"]),
       st.integers(0, 31), st.integers(1, 2**31 - 1), st.integers(-(2**31), 2**31 - 1),
       st.sampled_from(["uniform", "extreme", "max"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_add_equals_oracle(ad, bd, out_dtype, k, ma, mb, mode, even, seed):
    """Eltwise add: int32 work when the bound allows (small multipliers), int64 otherwise, and
    the reference where the fused form could leave int64 or rounds to even."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 5)), 7, int(rng.integers(1, 9)))
    a, b = _values(rng, ad, shape, mode), _values(rng, bd, shape, mode)
    if rng.random() < 0.5:
        ma, mb = ma >> 20, mb >> 20  # TIDL-sized multipliers: the int32 path
    lay = layer("add", inputs=("a", "b"), multiplier=np.array([ma, mb], np.int64), shift=np.array([k], np.int8))
    lay.rounding = "half_even" if even else "half_up"
    if rng.random() < 0.5:
        lo, hi = DTYPE_LIMITS[out_dtype]
        lay.params["clamp_lo"] = np.array([lo + 5])
        lay.params["clamp_hi"] = np.array([hi - 9])
    ins = [info("a", ad, shape, 1.0, int(_zp(rng, ad)[0])), info("b", bd, shape, 1.0, int(_zp(rng, bd)[0]))]
    outs = [info("y", out_dtype, shape, 1.0, int(_zp(rng, out_dtype)[0]))]
    expected = run_kernel(ref.KERNELS, lay, [a, b], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [a, b], ins, outs)[0], expected)


def test_depthwise_large_images_in_channel_blocks(monkeypatch):
    rng = np.random.default_rng(30)
    lay, x, ins, outs = _conv_layer_case(rng, (2, 24, 20, 20), (48, 1, 5, 5),
                                         {"group": 24, "pads": [2] * 4, "strides": [2, 2]})
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 300)  # several channel blocks per image
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    assert lay.__dict__["_fast_plan"].ct == np.int32


def test_small_blocks_equal_the_oracle(monkeypatch):
    """With blocks of 64 elements the epilogue, depthwise and add work is cut into many blocks
    (and the last one short); the integers do not change."""
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 64)
    rng = np.random.default_rng(40)
    cases = [((2, 16, 9, 9), (16, 1, 3, 3), {"group": 16, "pads": [1] * 4}),
             ((3, 6, 8, 8), (10, 6, 3, 3), {"pads": [1] * 4, "strides": [2, 2]}),
             ((2, 12, 5, 5), (20, 12, 1, 1), {})]
    for x_shape, w_shape, attrs in cases:
        lay, x, ins, outs = _conv_layer_case(rng, x_shape, w_shape, attrs)
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
        assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    shape = (2, 8, 9, 9)
    a, b = rand_int(rng, "int8", shape), rand_int(rng, "uint8", shape)
    lay = layer("add", inputs=("a", "b"), multiplier=np.array([187, 93]), shift=np.array([8]))
    ins = [info("a", "int8", shape, 1.0, -3), info("b", "uint8", shape, 1.0, 7)]
    outs = [info("y", "int8", shape, 1.0, 2)]
    expected = run_kernel(ref.KERNELS, lay, [a, b], ins, outs)[0]
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [a, b], ins, outs)[0], expected)


@SETTINGS
@given(st.sampled_from(["uint8", "int8"]), st.sampled_from(["int8", "uint8"]), st.sampled_from(["int8", "uint8", "int32"]),
       st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 2),
       st.booleans(), st.booleans(), st.sampled_from(["uniform", "extreme", "max"]), st.integers(0, 2**32 - 1))
def test_depthwise_fused_multiplier_equals_oracle(xd, wd, out_dtype, og, kh, kw, stride, dil, pad, per_channel, mode, seed):
    """8-bit depthwise convs (channel multiplier og, strides, dilations, pads, per-channel or
    per-tensor m and k, clamps, extreme values) take the path with m folded into the taps, and
    give the oracle's integers."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 7))
    x_shape = (int(rng.integers(1, 3)), g, int(rng.integers(kh, 12)), int(rng.integers(kw, 12)))
    attrs = {"kernel_shape": [kh, kw], "group": g, "strides": [stride, stride], "dilations": [dil, dil],
             "pads": [int(v) for v in rng.integers(0, 3, 4)] if pad else [0, 0, 0, 0]}
    w_shape = (g * og, 1, kh, kw)
    try:
        geo = conv_geometry(attrs, x_shape, w_shape)
    except ProgramError:
        return  # empty output: nothing to compare
    x, w = _values(rng, xd, x_shape, mode), _values(rng, wd, w_shape, mode)
    lay = layer("conv", attrs=attrs, **_conv_params(rng, w, out_dtype, 8, per_channel, False, True))
    _small_requant(rng, lay, per_channel)
    ins = [info("x", xd, x_shape, 0.1, int(_zp(rng, xd, at_limit=mode == "max")[0]))]
    outs = [info("y", out_dtype, (x_shape[0], w_shape[0]) + geo["out"], 0.2, int(_zp(rng, "int8")[0]))]
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    got = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    plan = lay.__dict__["_fast_plan"]
    assert plan.dw_fused is not None  # 8-bit data, m < 2^8, k <= 18, |bias| < 2^13: int32 bound holds


def _small_requant(rng, lay, per_channel=True):
    """m, k, bias of a typical 8-bit layer (m / 2^k in 2^-10..2^-4, 8-bit m, |bias| < 5000), so
    that |acc| * m + |c| stays below 2^31 and the fused depthwise path applies."""
    o = lay.params["weight"].shape[0]
    m, k = quantize_multiplier(np.exp2(rng.uniform(-10, -4, o if per_channel else 1)), 8)
    lay.params.update(multiplier=m, shift=k, bias=rng.integers(-5000, 5000, o).astype(np.int32))
    lay.rounding = "half_up"


def test_depthwise_fused_at_the_int32_bound():
    """All inputs at 255, all weights at -128: every tap sum reaches the static bound
    B = 255 * 9 * 128. The largest m with B * m + 2^(k-1) < 2^31 * (1 - 2^-20) (the epilogue's
    margin) folds m into the taps; m + 1 does not and takes the int64-safe epilogue; both give
    the oracle's integers, read out in int32 so that no clamp hides a wrong value."""
    bound, k = 255 * 9 * 128, 20
    m_max = int((2**31 * (1 - 2.0**-20) - 2 ** (k - 1)) // bound)
    x = np.full((1, 4, 6, 6), 255, dtype=np.uint8)
    w = np.full((4, 1, 3, 3), -128, dtype=np.int8)
    for m, fused in ((m_max, True), (m_max + 1, False)):
        lay = layer("conv", attrs={"kernel_shape": [3, 3], "group": 4}, weight=w,
                    multiplier=np.array([m], dtype=np.int32), shift=np.array([k]))
        lay.rounding = "half_up"
        ins = [info("x", "uint8", x.shape, 0.1, 0)]
        outs = [info("y", "int32", (1, 4, 4, 4), 0.2, 0)]
        expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
        assert expected.min() == ((-bound * m + 2 ** (k - 1)) >> k)  # brute force: the extreme reached
        got = run_kernel(fast.KERNELS, lay, [x], ins, outs)[0]
        assert np.array_equal(got, expected)
        assert (lay.__dict__["_fast_plan"].dw_fused is not None) is fused


def test_depthwise_fused_in_channel_blocks(monkeypatch):
    """Several channel blocks per image (the fused constants are sliced per block), stride 2,
    channel multiplier 2, per-channel multipliers and shifts."""
    rng = np.random.default_rng(31)
    lay, x, ins, outs = _conv_layer_case(rng, (2, 24, 20, 20), (48, 1, 3, 3),
                                         {"group": 24, "pads": [1] * 4, "strides": [2, 2]})
    _small_requant(rng, lay)
    expected = run_kernel(ref.KERNELS, lay, [x], ins, outs)[0]
    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 150)
    assert np.array_equal(run_kernel(fast.KERNELS, lay, [x], ins, outs)[0], expected)
    assert lay.__dict__["_fast_plan"].dw_fused is not None
