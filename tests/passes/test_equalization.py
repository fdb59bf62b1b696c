"""Cross-layer equalization and weight outlier clipping.

Equalization must not change the float function: onnxruntime (optimizations off) before and after,
rtol 1e-5 / atol 1e-5 x output scale (float32 rescaling of weights moves the last bits only).
The weight ranges are checked against max|w| recomputed here with plain numpy slicing.
"""
import numpy as np
import pytest
from graphs import check, init, make_model, node, run
from onnx import helper, numpy_helper

from passes.activation_fusion import FuseActivations
from passes.cleanup import NameNodes
from passes.equalization import (
    ClipWeightOutliers,
    EqualizeLayers,
    equalization_scales,
    find_pairs,
)

RNG = np.random.default_rng(11)


def unbalanced(shape, axis, rng=RNG, spread=3.0):
    """Random weights whose slices along ``axis`` differ in scale by up to 10^spread."""
    w = rng.standard_normal(shape).astype(np.float32)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    return (w * 10.0 ** rng.uniform(-spread / 2, spread / 2, scale_shape)).astype(np.float32)


def conv_chain(act="Relu", clip_max=None):
    """x[1,3,8,8] -> conv1 (3->8, 3x3) -> act -> dw (8, group 8, multiplier 2 -> 16) -> Relu
    -> pw (16->5, 1x1) -> y. ``act`` None leaves conv1 -> dw without an activation."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["t1"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [init("w1", unbalanced((8, 3, 3, 3), 0)), init("b1", RNG.standard_normal(8).astype(np.float32))]
    mid = "t1"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["t1"], ["a1"], name="act1"))
        mid = "a1"
    elif act == "Clip":
        inputs = ["t1", "lo"] + (["hi"] if clip_max is not None else [])
        nodes.append(helper.make_node("Clip", inputs, ["a1"], name="act1"))
        inits.append(init("lo", np.array(0.0, np.float32)))
        if clip_max is not None:
            inits.append(init("hi", np.array(clip_max, np.float32)))
        mid = "a1"
    nodes += [helper.make_node("Conv", [mid, "w2", "b2"], ["t2"], name="dw", group=8, pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["t2"], ["a2"], name="act2"),
              helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="pw")]
    inits += [init("w2", unbalanced((16, 1, 3, 3), 0)), init("b2", RNG.standard_normal(16).astype(np.float32)),
              init("w3", unbalanced((5, 16, 1, 1), 1)), init("b3", RNG.standard_normal(5).astype(np.float32))]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 5, 8, 8])], inits)
    return FuseActivations()(NameNodes()(model).model).model


def gemm_chain():
    """x[4,6] -> Gemm (transB=1, 6->10) -> Relu -> Gemm (transB=0, 10->3) -> y."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["t1"], name="g1", transB=1),
             helper.make_node("Relu", ["t1"], ["a1"], name="act1"),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["y"], name="g2")]
    inits = [init("w1", unbalanced((10, 6), 0)), init("b1", RNG.standard_normal(10).astype(np.float32)),
             init("w2", unbalanced((10, 3), 0)), init("b2", RNG.standard_normal(3).astype(np.float32))]
    model = make_model(nodes, [("x", [4, 6])], [("y", [4, 3])], inits)
    return FuseActivations()(model).model


def weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def imbalance(out_w, in_w):
    """max_i |log(r1_i / r2_i)|: r1 = range of output channel i of the first weight (axis 0),
    r2 = range of everything the second weight reads from channel i (given as [C, -1] rows)."""
    r1 = np.abs(out_w.reshape(out_w.shape[0], -1)).max(axis=1)
    r2 = np.abs(in_w).max(axis=1)
    return float(np.abs(np.log(r1 / r2)).max())


def assert_equivalent(before, after, feeds, rtol=1e-5):
    ref, = run(before, feeds)
    got, = run(after, feeds)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("act", [None, "Relu", "Clip"])
def test_conv_chain_keeps_the_float_function_and_balances_ranges(act):
    model = conv_chain(act)
    result = EqualizeLayers()(model)
    check(result.model)
    assert result.modified
    assert result.changes[0].startswith("equalized 2 pairs")  # conv1 -> dw, dw -> pw
    x = RNG.uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32)
    assert_equivalent(model, result.model, {"x": x})

    w0, w = weights(model), weights(result.model)
    # conv1 output channel i is read by dw outputs 2i, 2i+1 (depthwise, multiplier 2).
    before = imbalance(w0["w1"], w0["w2"].reshape(8, -1))
    after = imbalance(w["w1"], w["w2"].reshape(8, -1))
    assert before > 1.0
    assert after < 0.01
    # dw output channel j is read by pw input channel j.
    assert imbalance(w["w2"], w["w3"][:, :, 0, 0].T) < 0.01
    assert imbalance(w0["w2"], w0["w3"][:, :, 0, 0].T) > 1.0


def test_gemm_pair_with_both_weight_layouts():
    model = gemm_chain()
    result = EqualizeLayers()(model)
    assert result.changes[0].startswith("equalized 1 pairs")
    x = RNG.uniform(-2, 2, (4, 6)).astype(np.float32)
    assert_equivalent(model, result.model, {"x": x})
    w = weights(result.model)
    # g1 (transB=1): output channel i is row w1[i]; g2 (transB=0): input channel i is row w2[i].
    assert imbalance(w["w1"], w["w2"]) < 1e-3
    assert imbalance(weights(model)["w1"], weights(model)["w2"]) > 0.5


def test_relu6_pair_is_skipped_with_its_reason():
    model = conv_chain("Clip", clip_max=6.0)
    pairs, skipped = find_pairs(model)
    assert [(p.first.name, p.second.name) for p in pairs] == [("dw", "pw")]
    assert len(skipped) == 1 and "conv1" in skipped[0] and "not scale-equivariant" in skipped[0]
    result = EqualizeLayers()(model)
    w0, w = weights(model), weights(result.model)
    np.testing.assert_array_equal(w["w1"], w0["w1"])  # the skipped producer is untouched
    assert any("not equalized" in c for c in result.changes)
    x = RNG.uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32)
    assert_equivalent(model, result.model, {"x": x})


def test_tensor_with_two_readers_is_not_a_pair():
    model = conv_chain(None)
    model.graph.output.append(helper.make_tensor_value_info("t1", 1, None))
    pairs, _ = find_pairs(model)
    assert [(p.first.name, p.second.name) for p in pairs] == [("dw", "pw")]


def test_equalization_scales_formula_and_dead_channels():
    r1 = np.array([4.0, 1.0, 0.0, 2.0])
    r2 = np.array([1.0, 4.0, 3.0, 0.0])
    s = equalization_scales(r1, r2)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose((r1 / s)[:2], (r2 * s)[:2])


def test_nothing_to_equalize_reports_unmodified():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    model = make_model(nodes, [("x", [1, 2])], [("y", [1, 2])])
    result = EqualizeLayers()(model)
    assert not result.modified


def test_clip_weight_outliers_per_channel():
    w = RNG.standard_normal((4, 50)).astype(np.float32)
    w[1, 7] = 40.0  # one far outlier in channel 1
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)]
    model = make_model(nodes, [("x", [2, 50])], [("y", [2, 4])], [init("w", w)])
    result = ClipWeightOutliers(3.0)(model)
    got = weights(result.model)["w"]
    rows = w.astype(np.float64)
    for c in range(4):
        med, sd = np.median(rows[c]), rows[c].std()
        np.testing.assert_allclose(got[c], np.clip(rows[c], med - 3 * sd, med + 3 * sd), rtol=1e-6)
    assert got[1, 7] < 40.0 * 0.5
    assert result.modified and "clipped" in result.changes[0]
    assert node(result.model, "g").input[1] == "w"
    with pytest.raises(ValueError, match="positive"):
        ClipWeightOutliers(0.0)
