"""FuseActivations: annotations, the public helpers, the reasons for not fusing.

Fusion only annotates (node metadata_props), so onnxruntime must give bit-identical outputs
before and after: rtol = atol = 0.
"""
import numpy as np
import pytest
from graphs import assert_same_outputs, check, init, make_model, node, ops, rand
from onnx import helper

from passes.activation_fusion import (
    PATTERNS,
    FuseActivations,
    activation_bounds,
    fused_activation_of,
    fused_groups,
    is_fused_activation,
)
from passes.errors import PassError
from passes.graph import GraphIndex, get_meta, set_meta

RNG = np.random.default_rng(7)


def producer_graph(op, act_nodes, act_inits=(), opset=17, extra_outputs=()):
    """x -> <op> 'p' -> 'pre' -> activation node(s) -> 'y'."""
    if op == "Conv":
        p = helper.make_node("Conv", ["x", "w", "b"], ["pre"], name="p", pads=[1, 1, 1, 1])
        inits, shape_in, shape_out = [init("w", rand(RNG, 4, 3, 3, 3)), init("b", rand(RNG, 4))], [1, 3, 5, 5], [1, 4, 5, 5]
    elif op == "ConvTranspose":
        p = helper.make_node("ConvTranspose", ["x", "w"], ["pre"], name="p")
        inits, shape_in, shape_out = [init("w", rand(RNG, 3, 4, 2, 2))], [1, 3, 4, 4], [1, 4, 5, 5]
    elif op == "Gemm":
        p = helper.make_node("Gemm", ["x", "w", "b"], ["pre"], name="p", transB=1)
        inits, shape_in, shape_out = [init("w", rand(RNG, 4, 3)), init("b", rand(RNG, 4))], [2, 3], [2, 4]
    elif op == "MatMul":
        p = helper.make_node("MatMul", ["x", "w"], ["pre"], name="p")
        inits, shape_in, shape_out = [init("w", rand(RNG, 3, 4))], [2, 3], [2, 4]
    else:  # Add
        p = helper.make_node("Add", ["x", "w"], ["pre"], name="p")
        inits, shape_in, shape_out = [init("w", rand(RNG, 2, 3))], [2, 3], [2, 3]
    outputs = [("y", shape_out)] + [(name, shape_out) for name in extra_outputs]
    model = make_model([p] + list(act_nodes), [("x", shape_in)], outputs, inits + list(act_inits), opset=opset)
    return model, {"x": rand(RNG, *shape_in, scale=2.0)}


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add"])
def test_producer_plus_relu_fuses(op):
    model, feeds = producer_graph(op, [helper.make_node("Relu", ["pre"], ["y"], name="r1")])
    result = FuseActivations()(model)
    out = result.model
    assert ops(out) == [op, "Relu"]  # fusion annotates, it does not delete
    p, r = node(out, "p"), node(out, "r1")
    assert {e.key: e.value for e in p.metadata_props} == {"qlower.fused_activation": "r1"}
    assert {e.key: e.value for e in r.metadata_props} == {"qlower.fused_into": "p"}
    assert fused_activation_of(p) == "r1" and is_fused_activation(r) and not is_fused_activation(p)
    assert list(fused_groups(out)) == ["p"] and fused_groups(out)["p"].name == "r1"
    assert result.changes == [f"fused 1 activations ({op}+Relu x1)"]
    check(out)
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_fusion_is_idempotent():
    model, _ = producer_graph("Conv", [helper.make_node("Relu", ["pre"], ["y"], name="r1")])
    once = FuseActivations()(model).model
    twice = FuseActivations()(once)
    assert not twice.modified and twice.changes == []


@pytest.mark.parametrize("opset", [6, 10])
def test_clip_attribute_form_relu6(opset):
    clip = helper.make_node("Clip", ["pre"], ["y"], name="relu6", min=0.0, max=6.0)
    model, feeds = producer_graph("Conv", [clip], opset=opset)
    out = FuseActivations()(model).model
    assert fused_groups(out)["p"].name == "relu6"
    assert activation_bounds(node(out, "relu6"), GraphIndex(out.graph)) == (0.0, 6.0)
    check(out)
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_clip_attribute_form_defaults_are_unbounded():
    clip = helper.make_node("Clip", ["pre"], ["y"], name="c", max=2.5)
    model, _ = producer_graph("Gemm", [clip], opset=10)
    assert activation_bounds(node(model, "c"), GraphIndex(model.graph)) == (None, 2.5)
    lowest = helper.make_node("Clip", ["pre"], ["y"], name="c", min=float(np.finfo(np.float32).min))
    assert activation_bounds(lowest, GraphIndex(model.graph)) == (None, None)


@pytest.mark.parametrize("opset", [11, 13])
def test_clip_input_form_relu6(opset):
    clip = helper.make_node("Clip", ["pre", "lo", "hi"], ["y"], name="relu6")
    bounds = [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    model, feeds = producer_graph("Conv", [clip], bounds, opset=opset)
    out = FuseActivations()(model).model
    assert fused_groups(out)["p"].name == "relu6"
    assert activation_bounds(node(out, "relu6"), GraphIndex(out.graph)) == (0.0, 6.0)
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_clip_input_form_absent_bound_is_unbounded():
    clip = helper.make_node("Clip", ["pre", "", "hi"], ["y"], name="c")
    model, feeds = producer_graph("Add", [clip], [init("hi", np.array(1.5, np.float32))], opset=13)
    out = FuseActivations()(model).model
    assert fused_activation_of(node(out, "p")) == "c"
    assert activation_bounds(node(out, "c"), GraphIndex(out.graph)) == (None, 1.5)
    only_input = helper.make_node("Clip", ["pre"], ["y"], name="c2")
    assert activation_bounds(only_input, GraphIndex(out.graph)) == (None, None)
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_clip_bounds_from_constant_nodes():
    nodes = [helper.make_node("Constant", [], ["lo"], name="klo", value_float=-1.0),
             helper.make_node("Clip", ["pre", "lo"], ["y"], name="c")]
    model, _feeds = producer_graph("Gemm", nodes, opset=13)
    out = FuseActivations()(model).model
    assert fused_activation_of(node(out, "p")) == "c"
    assert activation_bounds(node(out, "c"), GraphIndex(out.graph)) == (-1.0, None)


def test_relu_bounds():
    relu = helper.make_node("Relu", ["a"], ["b"], name="r")
    assert activation_bounds(relu, GraphIndex(helper.make_graph([relu], "g", [], []))) == (0.0, None)


def test_non_activation_bounds_is_an_error():
    sig = helper.make_node("Sigmoid", ["a"], ["b"], name="s")
    with pytest.raises(PassError, match="node 's' \\(Sigmoid\\)"):
        activation_bounds(sig, GraphIndex(helper.make_graph([sig], "g", [], [])))


def test_non_constant_clip_bounds_do_not_fuse():
    nodes = [helper.make_node("ReduceMax", ["x"], ["hi"], name="rmax", keepdims=0),
             helper.make_node("Clip", ["pre", "", "hi"], ["y"], name="c")]
    model, _feeds = producer_graph("Add", nodes, opset=13)
    result = FuseActivations()(model)
    assert not result.modified
    assert result.changes == ["Add 'p' + Clip 'c' not fused: Clip max 'hi' is not a constant"]
    with pytest.raises(PassError, match="Clip max 'hi' is not a constant"):
        activation_bounds(node(model, "c"), GraphIndex(model.graph))
    assert fused_groups(result.model) == {}


def test_shared_producer_output_does_not_fuse():
    nodes = [helper.make_node("Relu", ["pre"], ["r"], name="r1"),
             helper.make_node("Add", ["r", "pre"], ["y"], name="add3")]
    model, _feeds = producer_graph("Conv", nodes)
    result = FuseActivations()(model)
    assert result.changes == ["Conv 'p' + Relu 'r1' not fused: conv output also read by 'add3'"]
    assert fused_groups(result.model) == {}
    assert get_meta(node(result.model, "r1"), "fused_into") is None


def test_graph_output_producer_does_not_fuse():
    model, _feeds = producer_graph("Gemm", [helper.make_node("Relu", ["pre"], ["y"], name="r1")],
                                  extra_outputs=["pre"])
    result = FuseActivations()(model)
    assert result.changes == ["Gemm 'p' + Relu 'r1' not fused: gemm output 'pre' is a graph output"]
    assert not result.modified


def test_add_relu_chain_fuses_each_pair_once():
    # Conv -> Relu -> Add -> Relu: two independent pairs
    nodes = [helper.make_node("Relu", ["pre"], ["r"], name="r1"),
             helper.make_node("Add", ["r", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="r2")]
    model = make_model([helper.make_node("Conv", ["x", "w"], ["pre"], name="p", pads=[1, 1, 1, 1])] + nodes,
                       [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])], [init("w", rand(RNG, 3, 3, 3, 3))])
    result = FuseActivations()(model)
    assert {k: v.name for k, v in fused_groups(result.model).items()} == {"p": "r1", "add": "r2"}
    assert result.changes == ["fused 2 activations (Add+Relu x1, Conv+Relu x1)"]


def test_stale_annotations_are_dropped():
    model, _ = producer_graph("Conv", [helper.make_node("Relu", ["pre"], ["y"], name="r1")], extra_outputs=["pre"])
    set_meta(node(model, "p"), "fused_activation", "r1")  # a pair that no longer fuses
    set_meta(node(model, "r1"), "fused_into", "p")
    result = FuseActivations()(model)
    assert result.modified
    assert result.changes[0] == "dropped 2 stale fusion annotations"
    assert fused_groups(result.model) == {}
    assert len(node(result.model, "p").metadata_props) == 0


def test_patterns_table_is_in_written_order():
    assert [p.name for p in PATTERNS] == ["relu", "clip"]
    for pattern in PATTERNS:
        assert set(pattern.producers) == {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}


def test_annotations_survive_a_save_and_load(tmp_path):
    import onnx
    model, _ = producer_graph("Conv", [helper.make_node("Relu", ["pre"], ["y"], name="r1")])
    path = tmp_path / "fused.onnx"
    onnx.save(FuseActivations()(model).model, str(path))
    assert fused_groups(onnx.load(str(path)))["p"].name == "r1"


def test_requires_named_nodes():
    model, _ = producer_graph("Conv", [helper.make_node("Relu", ["pre"], ["y"])])
    with pytest.raises(PassError, match="pass 'fuse_activations', node '' \\(Relu\\): has no name"):
        FuseActivations()(model)
