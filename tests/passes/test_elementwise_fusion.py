"""FuseElementwiseChains: which subgraphs become one lookup-table chain, and which do not.

The pass only annotates, so the graph's numbers are unchanged: checked bit for bit in
onnxruntime (tolerance 0)."""
import numpy as np
from graphs import assert_same_outputs, check, init, make_model, node
from onnx import helper

from passes.activation_fusion import FuseActivations, fused_groups
from passes.elementwise_fusion import (
    FuseElementwiseChains,
    chain_end_of,
    chain_nodes,
    is_chain_member,
)

SHAPE = [1, 3, 4, 4]


def chains(model):
    """head name -> [names of the chain's nodes in graph order]."""
    return {n.name: [m.name for m in chain_nodes(model.graph, n)] for n in model.graph.node if chain_end_of(n)}


def gelu_erf():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Div", ["c", "r2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="add"),
             helper.make_node("Mul", ["c", "a"], ["m"], name="mul"),
             helper.make_node("Mul", ["m", "half"], ["y"], name="half_mul")]
    inits = [init("w", np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32)),
             init("r2", np.float32(np.sqrt(2))), init("one", np.float32(1)), init("half", np.float32(0.5))]
    return make_model(nodes, [("x", SHAPE)], [("y", SHAPE)], inits)


def test_gelu_erf_form_is_one_chain_headed_by_the_node_reading_the_source():
    model = gelu_erf()
    result = FuseElementwiseChains()(model)
    assert result.modified
    assert chains(result.model) == {"div": ["div", "erf", "add", "mul", "half_mul"]}
    assert chain_end_of(node(result.model, "div")) == "half_mul"
    assert is_chain_member(node(result.model, "mul")) and not is_chain_member(node(result.model, "conv"))
    check(result.model)
    feeds = {"x": np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)}
    assert_same_outputs(model, result.model, feeds, rtol=0, atol=0)
    again = FuseElementwiseChains()(result.model)
    assert not again.modified and chains(again.model) == chains(result.model)


def test_two_independent_sources_and_inner_tensors_read_outside_do_not_fuse():
    nodes = [helper.make_node("Sigmoid", ["b"], ["g"], name="gate"),
             helper.make_node("Mul", ["a", "g"], ["y"], name="scale"),  # a * sigmoid(b): two sources
             helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
             helper.make_node("Exp", ["t"], ["z"], name="exp")]  # t is also a graph output
    model = make_model(nodes, [("a", SHAPE), ("b", SHAPE)], [("y", SHAPE), ("t", SHAPE), ("z", SHAPE)])
    result = FuseElementwiseChains()(model)
    assert chains(result.model) == {} and not result.modified


def test_relu_after_conv_stays_a_fused_clamp_and_activation_fusion_skips_chain_members():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["k"], name="relu6"),
             helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["y"], name="div6")]
    inits = [init("w", np.ones((3, 3, 1, 1), np.float32)), init("three", np.float32(3)),
             init("zero", np.float32(0)), init("six", np.float32(6))]
    model = make_model(nodes, [("x", SHAPE)], [("y", SHAPE)], inits)
    chained = FuseElementwiseChains()(model).model
    assert chains(chained) == {"add3": ["add3", "relu6", "mul", "div6"]}  # hardswish of r, without the Relu
    fused = FuseActivations()(chained).model
    assert {k: v.name for k, v in fused_groups(fused).items()} == {"conv": "relu"}  # not add3 + relu6
